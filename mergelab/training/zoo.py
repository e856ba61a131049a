"""Building a zoo: one expert per task of the suite, at default hyperparameters, in parallel.

``build_zoo(arch)`` pretrains ``arch`` if needed (in the calling process), then fine-tunes
``make_spec(task=t, arch=arch, **overrides)`` for every task ``t`` in :func:`mergelab.tasks.list_tasks` in
a process pool of ``workers`` processes (spawned; ``torch.set_num_threads(1)`` in each), skipping experts
already in the cache. Results come back in task order; an expert that fails (e.g. diverges) is reported in
``ZooResult.failures`` and does not stop the others.

Every run is pinned to its spec's intra-op thread count (``threads``, default 1; pretraining to its config's,
:mod:`mergelab.training.threads`), so a zoo is bit-identical whatever the machine's cores, its load or the
number of workers: the parallelism is across experts, not inside one.

``overrides`` apply to every expert, e.g. ``{"head_mode": "frozen"}`` (``mergelab zoo --set head_mode=frozen``)
for the frozen shared heads protocol of the papers' CLIP setting (Ilharco et al. 2023: zero-shot heads kept
frozen during fine-tuning): each task's head is its probe on the pretrained backbone, shared by the
pretrained model, every expert of the task and every merge (:class:`~mergelab.training.spec.ExpertSpec`).

Defaults (the :class:`~mergelab.training.spec.ExpertSpec` defaults): K = 300 steps, batch 64, cosine
schedule, linear-probe head init, no augmentation; ResNets SGD lr 0.05 momentum 0.9 wd 5e-4; ViT AdamW lr
1e-3 wd 0.01. Measured on the 21-task suite (test accuracy, mean over tasks; "probe" = the pretrained
backbone with a linear probe fitted per task, ``mergelab evaluate <pretrained> --probe``), and the wall
time of ``mergelab zoo --arch A`` from an empty zoo cache on an otherwise idle 2-core CPU::

    arch       probe   expert   pretrain   21 experts   total
    resnet_s   0.830   0.972      33 s       108 s       144 s
    resnet_l   0.827   0.976     125 s       360 s       487 s
    vit_s      0.707   0.860      55 s       119 s       176 s
    resnet_m   0.835   0.977     (not timed idle)

(measured before training was pinned to one intra-op thread: pretraining used both cores then, and takes
longer on one when the machine is idle, see :mod:`mergelab.training.threads`; the experts already ran on one
thread per worker.)
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from mergelab.models.paths import expert_dir
from mergelab.models.pretraining import ensure_pretrained, read_pretrained
from mergelab.tasks import list_tasks
from mergelab.training.finetuning import cached_problem, finetune, load_task_data
from mergelab.training.result import ExpertResult, read_expert
from mergelab.training.spec import ExpertSpec, make_spec
from mergelab.worker_lifetime import exit_with_parent

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def default_spec(task: str, arch: str = "resnet_s", **overrides: Any) -> ExpertSpec:
    """The zoo's spec for ``task``: the :class:`ExpertSpec` defaults of ``arch``, updated by ``overrides``
    (e.g. ``head_mode="frozen"``)."""
    return make_spec(task=task, arch=arch, **overrides)


@dataclass
class ZooResult:
    """Experts of one architecture (task order), the wall time of the build and how many were trained."""

    arch: str
    experts: list[ExpertResult]
    wall_time_s: float
    trained: int
    workers: int
    pretrain_time_s: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)


def _init_worker(level: int, driver_pid: int) -> None:
    """Pool initializer: one torch thread, the driver's log level, and exit when the driver ``driver_pid``
    dies (:func:`~mergelab.worker_lifetime.exit_with_parent`: a killed ``build_zoo`` leaves no workers)."""
    exit_with_parent(driver_pid)
    torch.set_num_threads(1)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _run(spec: dict[str, Any], cache_dir: str | None, force: bool) -> ExpertResult:
    return finetune(spec, cache_dir, force=force)


def build_zoo(
    arch: str,
    tasks: Sequence[str] | None = None,
    cache_dir: PathLike | None = None,
    workers: int = 2,
    overrides: Mapping[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
) -> ZooResult:
    """Fine-tune (or reuse) one expert per task; see the module docstring.

    Args:
        arch: architecture name. tasks: subset of task names (default: all of ``list_tasks()``).
        cache_dir: cache root. workers: processes (1 = in this process). overrides: spec fields applied to
        every expert. force: retrain cached experts. progress: tqdm bar over experts.
    """
    t0 = time.perf_counter()
    task_names = list(dict.fromkeys(tasks)) if tasks is not None else list_tasks()
    specs = [default_spec(t, arch, **dict(overrides or {})) for t in task_names]
    ensure_pretrained(arch, cache_dir, progress=progress)
    t_pre = time.perf_counter() - t0
    results: dict[str, ExpertResult] = {}
    failures: dict[str, str] = {}
    todo = []
    for spec in specs:
        if not force:
            cached = finetune_if_cached(spec, cache_dir)
            if cached is not None:
                results[spec.task] = cached
                continue
        todo.append(spec)
    bar = tqdm(total=len(specs), initial=len(results), desc=f"zoo {arch}", unit="expert", disable=not progress)
    cdir = None if cache_dir is None else str(cache_dir)
    try:
        if workers <= 1 or len(todo) <= 1:
            for spec in todo:
                try:
                    results[spec.task] = finetune(spec, cache_dir, force=force)
                except Exception as exc:  # as in the pool: keep building the rest, report at the end
                    failures[spec.task] = f"{type(exc).__name__}: {exc}"
                    log.error("expert %s/%s failed: %s", arch, spec.task, failures[spec.task])
                bar.update(1)
        else:
            level = logging.getLogger().getEffectiveLevel()
            pool_args = dict(max_workers=min(workers, len(todo)), mp_context=_spawn(), initializer=_init_worker,
                             initargs=(level, os.getpid()))
            with ProcessPoolExecutor(**pool_args) as pool:
                futures = {pool.submit(_run, spec.canonical(), cdir, force): spec.task for spec in todo}
                for fut in as_completed(futures):
                    task = futures[fut]
                    try:
                        results[task] = fut.result()
                    except Exception as exc:  # keep building the rest; report at the end
                        failures[task] = f"{type(exc).__name__}: {exc}"
                        log.error("expert %s/%s failed: %s", arch, task, failures[task])
                    bar.update(1)
    finally:
        bar.close()
    experts = [results[t] for t in task_names if t in results]
    return ZooResult(
        arch=arch,
        experts=experts,
        wall_time_s=time.perf_counter() - t0,
        trained=sum(not r.cached for r in experts),
        workers=workers,
        pretrain_time_s=t_pre,
        failures=failures,
    )


def finetune_if_cached(spec: ExpertSpec, cache_dir: PathLike | None = None) -> ExpertResult | None:
    """The cached expert of ``spec`` if it is reusable (current pretrained backbone and task data), else ``None``."""
    pre = read_pretrained(spec.arch, cache_dir)
    found = read_expert(expert_dir(spec.arch, spec.task, spec.spec_hash(), cache_dir))
    if found is None or pre is None or cached_problem(found, pre.pretrained_id, load_task_data(spec)) is not None:
        return None
    return found.model_copy(update={"cached": True})


def _spawn():  # a fresh interpreter per worker: no inherited OpenMP thread pools
    return multiprocessing.get_context("spawn")
