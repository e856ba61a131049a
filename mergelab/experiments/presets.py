"""Named study presets for ``mergelab experiment``: each a small default that runs on 2 cores and a full-size
variant (``--full``) for machines or clusters with time to spare.

==============  ===========================================================================================
``scaling``     :mod:`mergelab.experiments.scaling_laws`. Default: resnet_s, 6 tasks, all 15 groups of 4,
                K in 25..400 (checkpoints), b in 16..128, eta in 0.01..0.5, data ratio 0.1..1, N in 2..6,
                simple averaging, 3 fine-tuning seeds (~180 fine-tunes, ~900 merges; seed 0 alone: ~60 and
                ~300). Full: 8 tasks, wider grids, plus the
                transformer family (vit_s) merged with TIES, DARE and AdaMerging.
``noise``       :mod:`mergelab.experiments.noise_study`. Default: resnet_s on mnist and mnist1d, lr in
                {0.0125, 0.05, 0.2, 0.8} x B in {16, 64}, weight decay / momentum / augmentation sweeps,
                3 branch points x 2 seed pairs per cell, square-root decay (26 parents of 250 steps, 312
                branches of 100 steps, 156 merges; at the measured ~40 ms/step for B 64, ~20 ms/step for B 16
                and ~1.5 s per merge on one thread, ~30 CPU-minutes: ~15-20 min on 2 idle cores). Full: 3 tasks,
                5 learning rates x 3 batch sizes, 3 branch points x 2 seed pairs, decay 150 steps (72 parents,
                864 branches, 432 merges: ~4x the default's steps).
``pool``        :mod:`mergelab.experiments.pool_scaling`, both protocols (irrelevant, relevant). Default:
                sizes 4, 12, 20 with task arithmetic, TIES, FW-soft and FW-hard; full: sizes 4..20 step 4
                and every pool-scaling method. Needs the full resnet_s zoo (built if missing).
==============  ===========================================================================================

Any field of a preset's configuration can be overridden (``--set field=value`` on the command line, or a
YAML mapping with ``--config``); unknown fields are errors that list the allowed ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergelab.errors import SpecError
from mergelab.evaluation import default_experts
from mergelab.experiments.comparison_table import ComparisonTable
from mergelab.experiments.jobs import pool_size_job
from mergelab.experiments.noise_study import NoiseConfig, run_noise_study
from mergelab.experiments.pool_scaling import PoolScalingResult, plan_pools
from mergelab.experiments.runners import RunOptions
from mergelab.experiments.scaling_laws import ScalingConfig, run_scaling_study
from mergelab.experiments.store import key_of
from mergelab.experiments.task import Task
from mergelab.report import ReportDocument
from mergelab.report.convert import merge_pool_scaling_documents, pool_scaling_document
from mergelab.training.zoo import build_zoo

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]


class PoolConfig(BaseModel):
    """Settings of the pool-scaling preset (see :func:`mergelab.experiments.pool_scaling.run_pool_scaling`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "resnet_s"
    modes: tuple[str, ...] = ("irrelevant", "relevant")
    sizes: tuple[int, ...] = (4, 12, 20)
    methods: tuple[str, ...] = ("task_arithmetic", "ties", "fw_soft", "fw_hard")
    samples_per_task: int = Field(100, ge=1)
    seed: int = 0
    bn: Literal["joint", "per_task", "merged"] = "joint"  # BatchNorm protocol (mergelab.evaluation.protocol)
    select: Literal["validation", "fixed"] = "validation"  # lambda of TA/TIES/DARE on validation data
    tasks: tuple[str, ...] | None = None  # evaluated group (irrelevant) or task order (relevant); default as compare
    quick: bool = False  # tiny budgets for every method (smoke tests)


@dataclass(frozen=True)
class Preset:
    name: str
    study: str
    description: str
    configs: tuple[BaseModel, ...]


_FULL_TASKS = ("mnist", "mnist_rot90", "mnist_invert", "digits", "shapes", "mnist1d", "mnist_noise", "bar_orientation")

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("scaling", "scaling", "scaling laws in K, b, eta, n, N (resnet_s, simple averaging)", (ScalingConfig(),)),
    Preset("scaling-full", "scaling", "scaling laws, full size: CNN (averaging) and transformer (TIES, DARE, AdaMerging)", (
        ScalingConfig(tasks=_FULL_TASKS, steps_grid=(25, 50, 100, 200, 400, 800), batch_grid=(16, 32, 64, 128, 256),
                      lr_grid=(0.005, 0.01, 0.05, 0.2, 0.5), data_ratio_grid=(0.05, 0.1, 0.3, 0.6, 1.0),
                      n_tasks_grid=(2, 3, 4, 6, 8)),
        ScalingConfig(arch="vit_s", tasks=_FULL_TASKS, steps_grid=(25, 50, 100, 200, 400, 800),
                      batch_grid=(16, 32, 64, 128, 256), lr_grid=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
                      data_ratio_grid=(0.05, 0.1, 0.3, 0.6, 1.0), n_tasks_grid=(2, 3, 4, 6, 8), reset_bn="off",
                      methods=("ties", "dare_linear", "adamerging"),
                      method_parameters={"ties": {"lambda": 1.0, "density": 0.2},
                                         "dare_linear": {"density": 0.5, "lambda": 0.3},
                                         "adamerging": {"steps": 100}}),
    )),
    Preset("noise", "noise", "effective noise scale vs merge gain (bifurcation protocol, resnet_s)", (NoiseConfig(),)),
    Preset("noise-full", "noise", "effective noise scale, full size: 3 tasks, 5 x 3 grid, 3 branch points", (
        NoiseConfig(tasks=("mnist", "mnist1d", "mnist_noise"), lr_grid=(0.003125, 0.0125, 0.05, 0.2, 0.8),
                    batch_grid=(16, 64, 256), branch_steps=(100, 200, 300), decay_steps=150,
                    weight_decay_grid=(0.0, 1e-4, 5e-4, 2e-3, 5e-3), momentum_grid=(0.0, 0.5, 0.8, 0.9, 0.95)),
    )),
    Preset("pool", "pool", "FW-Merging pool scaling: irrelevant and relevant experts join (resnet_s)", (PoolConfig(),)),
    Preset("pool-full", "pool", "pool scaling at every size 4..20 with every pool-scaling method", (
        PoolConfig(sizes=(4, 8, 12, 16, 20), methods=("task_arithmetic", "ties", "dare", "adamerging", "fw_soft", "fw_hard")),
    )),
)}


def get_preset(name: str, full: bool = False) -> Preset:
    key = f"{name}-full" if full and not name.endswith("-full") else name
    if key not in PRESETS:
        raise SpecError(f"unknown experiment preset {key!r}; known: {', '.join(PRESETS)}")
    return PRESETS[key]


def configure(config: BaseModel, overrides: Mapping[str, Any]) -> BaseModel:
    """``config`` with ``overrides`` applied and validated; errors name the field and list the allowed ones."""
    if not overrides:
        return config
    cls = type(config)
    unknown = sorted(set(overrides) - set(cls.model_fields))
    if unknown:
        raise SpecError(f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}; allowed: {', '.join(cls.model_fields)}")
    try:
        return cls.model_validate({**config.model_dump(), **dict(overrides)})
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg'].removeprefix('Value error, ')}"
                 for e in exc.errors()]
        raise SpecError(f"invalid {cls.__name__}:\n" + "\n".join(lines)) from None


def run_preset(
    name: str,
    out: PathLike,
    *,
    full: bool = False,
    overrides: Mapping[str, Any] | None = None,
    options: RunOptions | None = None,
) -> Any:
    """Run (or resume) a preset into ``out`` and return its :class:`~mergelab.report.ReportDocument` (also
    written to ``out/report.json``; a preset with several configurations writes each into a subfolder and the
    combined document at the top)."""
    opts = options or RunOptions()
    preset = get_preset(name, full)
    configs = [configure(c, overrides or {}) for c in preset.configs]
    out = Path(out)
    docs = []
    with opts.session():  # one Ray session for every phase of every configuration
        for i, cfg in enumerate(configs):
            sub = out if len(configs) == 1 else out / f"{i + 1}-{getattr(cfg, 'arch', 'run')}"
            if isinstance(cfg, ScalingConfig):
                docs.append(run_scaling_study(cfg, sub, opts))
            elif isinstance(cfg, NoiseConfig):
                docs.append(run_noise_study(cfg, sub, opts))
            else:
                docs.append(_run_pool(cfg, sub, opts))
    if len(docs) == 1:
        return docs[0]
    combined = ReportDocument(
        title=docs[0].title, study=preset.study, summary=" | ".join(d.summary for d in docs),
        config={f"run {i + 1}": d.config for i, d in enumerate(docs)},
        sections=[s.model_copy(update={"title": f"[{d.config.get('arch', i + 1)}] {s.title}",
                                       "figures": [f.model_copy(update={"id": f"r{i + 1}-{f.id}"}) for f in s.figures]})
                  for i, d in enumerate(docs) for s in d.sections],
        created=docs[-1].created, versions=docs[-1].versions)
    combined.to_json(out)
    return combined


def _run_pool(cfg: PoolConfig, out: Path, opts: RunOptions) -> Any:
    """The pool-scaling protocol, one task per (mode, pool size) through the results database and the runner
    (resumable; each comparison still runs its methods in fresh processes to time them)."""
    say, store, cache = opts.say or log.info, opts.open_store(), opts.cache()
    out.mkdir(parents=True, exist_ok=True)
    say(f"zoo {cfg.arch}: fine-tuning the missing default experts (cached ones are reused)")
    build_zoo(cfg.arch, cache_dir=cache, workers=opts.workers or 1, progress=opts.progress)
    experts = {e.task: e for e in default_experts(cfg.arch, None, cache, required=False)}
    doc = None
    for mode in cfg.modes:
        pools, evals = plan_pools(mode, list(experts), cfg.tasks, cfg.sizes, cfg.seed)  # type: ignore[arg-type]
        specs = {n: {"arch": cfg.arch, "mode": mode, "size": n, "eval_tasks": evals[n],
                     "pool": [{"task": t, "spec_hash": experts[t].spec_hash} for t in pools[n]],
                     "methods": list(cfg.methods), "samples_per_task": cfg.samples_per_task, "bn": cfg.bn,
                     "select": cfg.select, "quick": cfg.quick, "cache_dir": cache} for n in pools}
        say(f"pool scaling ({mode}): sizes {sorted(pools)}, methods {list(cfg.methods)}")
        summary = opts.run([Task("pool_size", spec, pool_size_job, study="pool") for spec in specs.values()], store)
        if summary.failed:
            raise SpecError(f"{len(summary.failed)} pool size(s) failed; see `mergelab results --study pool --status failed --errors`")
        tables = {n: ComparisonTable.from_dict(store.get(key_of("pool_size", spec)).metrics) for n, spec in specs.items()}
        result = PoolScalingResult(mode, cfg.arch, sorted(pools), list(cfg.methods), pools, evals, tables,
                                   {"seed": cfg.seed, "samples_per_task": cfg.samples_per_task, "quick": cfg.quick,
                                    "bn": cfg.bn, "select": cfg.select})
        result.to_json(out / f"pool_scaling_{mode}.json")
        doc = merge_pool_scaling_documents(doc, pool_scaling_document(result, config=cfg.model_dump(mode="json")))
    assert doc is not None
    doc.to_json(out)
    return doc
