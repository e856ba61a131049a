"""Scaling-law study (stability paper, section V; THEORY.md section 1): how fine-tuning hyperparameters and the
number of merged tasks change the merged model, measured and as the (derived) bound predicts.

Protocol (:func:`run_scaling_study`, preset ``scaling`` of ``mergelab experiment``):

1. **Experts.** For every task of ``tasks`` and every grid value of one hyperparameter (the others at the
   zoo's defaults, plus ``base`` overrides):

   * ``K`` (steps): checkpoints along ONE run per task, a constant learning rate for ``max(steps_grid)`` steps
     checkpointing every ``gcd(steps_grid)`` steps (a constant rate so that a checkpoint at step K is "K
     steps of the same SGD", the bound's reading; the decayed schedule of the other experts is not);
   * ``b`` (batch size), ``eta`` (learning rate), ``n`` (data ratio): one expert per value, ``steps`` fixed;
   * ``N`` (number of merged tasks): the default experts, groups of each size in ``n_tasks_grid``.

   Fine-tunes are cached by spec hash in the expert cache (the zoo's default experts are reused). Every expert
   is fine-tuned once per seed of ``seeds`` (default 0, 1, 2; seed 0 is the spec's default seed, so its experts
   and merges are the single-seed study's), and each group is merged per seed from that seed's experts.
2. **Merges.** For each setting, ``groups`` distinct random task groups of ``group_size`` tasks (for ``N``: of
   each size; all groups when there are fewer), seeded and the same groups for every setting of a
   hyperparameter. Each group is merged with every method in ``methods`` (default: simple averaging,
   ``weight_average``, as the paper does for its CNN family; the full preset adds the transformer family with
   TIES, DARE and AdaMerging) and evaluated on the group's tasks through each expert's head, with BatchNorm
   statistics re-estimated on the group's training images (``reset_bn="joint"``; plain averaging of BN
   statistics is a separate, large effect on this zoo). Measured: the mean over the group's tasks of the test
   cross-entropy (the bound's quantity) and of the test accuracy.
3. **Experts alone.** Every merge member (expert or checkpoint) is evaluated on its own task under the
   merges' BatchNorm protocol applied to it alone (``reset_bn="joint"`` on a group of one task: statistics
   re-estimated on its task's training images; cached as ``expert_eval`` jobs), so each merge has an **excess
   loss** ``excess = loss(merge) - mean_i loss(expert_i on task i)``, the bound's quantity.
4. **Bound** *(derived)*. Per task, ``F_{S_i}(theta_0)``, ``sigma_i^2``, ``grad F_i`` and ``L_i`` are measured once
   at theta_0 (they do not depend on how the experts are trained; cached). Each merge gets the excess-loss form's
   terms (:data:`mergelab.analysis.excess_bound.EXCESS_FORMULA`): ``OPT`` and ``STAB`` from its experts' real
   hyperparameters (K, eta, b, momentum, the schedule's moments, n_i) and ``HET`` from the dispersion of its
   experts' task vectors (BatchNorm statistics excluded) after the method's operator. The constants are fitted
   per method with an intercept on standardised columns (:func:`mergelab.analysis.bound_fit.fit_excess`,
   non-negative slopes; ordinary least squares reported too), and tested by **leave-one-hyperparameter-out**
   prediction (fit on four sweeps' merges, predict the fifth's, Spearman of the pooled held-out predictions
   with the measured excess) with delete-one-task jackknife intervals. The **elasticities** of the excess loss
   (slope of ``log excess`` on ``log K``, ``log eta``, ``log n``, ``log b`` and on ``N``, within each sweep)
   are tested against the predicted signs and values (1, 2, -1 for K, eta, n) without fitted constants.
5. **Verdicts.** For each hyperparameter, the measured curve's shape against THEORY.md's predicted trend
   (:data:`PREDICTED`). The groups share tasks, so they are not independent samples: each grid value's mean (over
   groups of the group's mean over seeds) and each step between consecutive values get a delete-one-task
   jackknife standard error (:mod:`mergelab.analysis.statistics`); a step counts only when its interval at
   5% / (number of steps) excludes 0, otherwise the curve is "flat" and the verdict undecided (at most ~5% false
   verdicts under no true effect, tests/test_studies.py). The bound's held-out Spearman is checked against
   the target 0.8 and each elasticity against its prediction: ``agrees`` only when the interval supports it.

Everything runs through the results store and a runner (local process pool or Ray), so a rerun skips
finished fine-tunes and merges and an interrupted study resumes.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import re
from collections.abc import Sequence
from functools import reduce
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from scipy import stats

from mergelab.analysis.bound_fit import (
    elasticity,
    fit_excess,
    leave_one_out,
    merge_bootstrap,
    spearman,
    task_jackknife,
    task_offset_matrix,
    within_spearman,
)
from mergelab.analysis.calibration_study import StudyConfig, draw_pools, expert_measurements
from mergelab.analysis.excess_bound import EXCESS_FORMULA, excess_terms, merge_operator_vectors, task_vector_dispersion
from mergelab.analysis.merge_coefficients import bound_pool, merge_coefficients
from mergelab.analysis.statistics import Observation, contrast, significant_signs, step_contrasts
from mergelab.analysis.theory_at_init import pool_measurement
from mergelab.atomic_files import write_csv_atomic
from mergelab.errors import SpecError
from mergelab.evaluation.protocol import STATISTICS_PATTERN
from mergelab.experiments.jobs import expert_eval_job, finetune_job, member_expert, merge_eval_job
from mergelab.experiments.runners import RunOptions
from mergelab.experiments.store import key_of
from mergelab.experiments.task import Task
from mergelab.models import read_backbone_state
from mergelab.models.paths import pretrained_dir
from mergelab.models.pretraining import ensure_pretrained
from mergelab.report import Figure, ReportDocument, Section, Series, Table, Verdict
from mergelab.report.document import versions
from mergelab.tasks import list_tasks
from mergelab.training import finetune
from mergelab.training.result import BACKBONE_FILE
from mergelab.training.spec import make_spec

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
HYPERPARAMETERS: tuple[str, ...] = ("K", "b", "eta", "n", "N")
LABELS = {"K": "fine-tuning steps K", "b": "batch size b", "eta": "learning rate eta", "n": "data ratio (n / n_full)",
          "N": "number of merged tasks N"}
SPEC_FIELD = {"K": "steps", "b": "batch_size", "eta": "lr", "n": "data_ratio"}
SCALING_TASKS: tuple[str, ...] = ("mnist", "mnist_rot90", "mnist_invert", "digits", "shapes", "mnist1d")

#: THEORY.md's predicted trend per hyperparameter, and the measured loss shapes (of
#: :func:`mergelab.analysis.bound_predictions.classify_shape`) that agree with it.
PREDICTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "K": ("an optimum K* (U-shaped loss, inverted-U accuracy) or a monotone decline (loss rising with K)", ("U", "increasing")),
    "eta": ("large learning rates collapse the merge (loss rising at the large end)", ("increasing", "U")),
    "b": ("at small eta larger batches merge better (loss falling with b)", ("decreasing",)),
    "n": ("monotone improvement with more data (loss falling with n)", ("decreasing",)),
    "N": ("decline with more tasks (loss rising with N)", ("increasing",)),
}


#: The bound's held-out fits reported (:func:`bound_analysis`): ``nnls`` is the one the verdict uses; the others
#: are *(derived)* variants shown beside it (:mod:`mergelab.analysis.bound_fit`): the multiplicative form fitted
#: in logs, per-task offsets, and the offsets alone -- no bound -- the baseline a fit with offsets must beat.
BOUND_FITS: dict[str, dict[str, Any]] = {
    "nnls": {"label": "NNLS slopes (used)", "method": "nnls", "form": "linear", "offsets": False, "terms": True},
    "ols": {"label": "OLS (reference)", "method": "ols", "form": "linear", "offsets": False, "terms": True},
    "nnls_log": {"label": "NNLS, log excess on log terms (derived)", "method": "nnls", "form": "log",
                 "offsets": False, "terms": True},
    "nnls_offsets": {"label": "NNLS + per-task offsets (derived)", "method": "nnls", "form": "linear",
                     "offsets": True, "terms": True},
    "offsets_only": {"label": "per-task offsets alone (no bound; baseline)", "method": "nnls", "form": "linear",
                     "offsets": True, "terms": False},
}


class ScalingConfig(BaseModel):
    """Settings of the scaling-law study (module docstring). Grids must be increasing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "resnet_s"
    tasks: tuple[str, ...] = SCALING_TASKS
    group_size: int = Field(4, ge=2)
    groups: int = Field(15, ge=2)
    seed: int = 0
    #: Fine-tuning seeds: every expert of every setting is trained once per seed (seed 0 is the expert's default
    #: spec, so its experts and merges are the single-seed study's). Seeds are nested in a (group, value) cell.
    seeds: tuple[int, ...] = (0, 1, 2)
    steps_grid: tuple[int, ...] = (25, 50, 100, 200, 400)
    batch_grid: tuple[int, ...] = (16, 32, 64, 128)
    lr_grid: tuple[float, ...] = (0.01, 0.05, 0.2, 0.5)
    data_ratio_grid: tuple[float, ...] = (0.1, 0.3, 1.0)
    n_tasks_grid: tuple[int, ...] = (2, 3, 4, 5, 6)
    hyperparameters: tuple[Literal["K", "b", "eta", "n", "N"], ...] = HYPERPARAMETERS
    methods: tuple[str, ...] = ("weight_average",)
    method_parameters: dict[str, dict[str, Any]] = Field(default_factory=dict)
    base: dict[str, Any] = Field(default_factory=dict)
    reset_bn: Literal["off", "joint", "per_task"] = "joint"
    data_samples: int = Field(100, ge=1)
    samples: int = Field(128, ge=2)
    hessian_iters: int = Field(10, ge=1)

    @field_validator("reset_bn", mode="before")
    @classmethod
    def _bn_words(cls, v: Any) -> Any:
        """YAML reads ``off`` as ``False``: ``False`` means ``off`` and ``True`` ``joint``."""
        return {False: "off", True: "joint"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("steps_grid", "batch_grid", "lr_grid", "data_ratio_grid", "n_tasks_grid")
    @classmethod
    def _increasing(cls, v: tuple[Any, ...]) -> tuple[Any, ...]:
        if len(v) < 2:
            raise ValueError("a grid needs at least 2 values")
        if any(b <= a for a, b in zip(v, v[1:])) or v[0] <= 0:
            raise ValueError(f"grid values must be positive and increasing, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ScalingConfig:
        unknown = [t for t in self.tasks if t not in list_tasks()]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError("tasks must be distinct")
        if self.group_size > len(self.tasks):
            raise ValueError(f"group_size {self.group_size} exceeds the {len(self.tasks)} tasks")
        if max(self.n_tasks_grid) > len(self.tasks) or min(self.n_tasks_grid) < 2:
            raise ValueError(f"n_tasks_grid must lie in 2..{len(self.tasks)} (the number of tasks)")
        if max(self.data_ratio_grid) > 1:
            raise ValueError("data ratios must be <= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, got {list(self.seeds)}")
        forbidden = {"task", "arch", "checkpoint_every", "branch_from", "seed"} & set(self.base)
        if forbidden:
            raise ValueError(f"base cannot set {sorted(forbidden)}: the study sets them")
        return self


def _spec_fields(cfg: ScalingConfig, task: str, hp: str | None = None, value: float | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """ExpertSpec fields of ``task`` at one grid point (``hp is None``: the default expert) and fine-tuning
    ``seed`` (0: the spec's default, left unset so seed-0 experts keep the single-seed study's spec hash)."""
    fields: dict[str, Any] = {"task": task, "arch": cfg.arch, **cfg.base}
    if seed:
        fields["seed"] = seed
    if hp == "K":
        fields.update(steps=max(cfg.steps_grid), schedule="constant", checkpoint_every=reduce(math.gcd, cfg.steps_grid))
    elif hp in ("b", "eta", "n"):
        fields[SPEC_FIELD[hp]] = value
    return fields


def grid(cfg: ScalingConfig, hp: str) -> tuple[float, ...]:
    return {"K": cfg.steps_grid, "b": cfg.batch_grid, "eta": cfg.lr_grid, "n": cfg.data_ratio_grid,
            "N": cfg.n_tasks_grid}[hp]


def task_groups(cfg: ScalingConfig, size: int) -> list[tuple[str, ...]]:
    """``cfg.groups`` distinct seeded groups of ``size`` tasks (all of them when there are fewer)."""
    idx = draw_pools(len(cfg.tasks), cfg.groups, size, size, seed=cfg.seed + 1000 * size)
    return [tuple(cfg.tasks[i] for i in g) for g in idx]


class Plan(BaseModel):
    """The study's work: the fine-tunes (spec fields) and, per setting, the merges (members per group)."""

    finetunes: list[dict[str, Any]]
    settings: list[dict[str, Any]]  # {"hp", "value", "seed", "groups": [[member, ...], ...]}


def plan(cfg: ScalingConfig, cache_dir: PathLike | None = None) -> Plan:
    """Resolve every expert spec (hashes included) and every merge of the study."""
    finetunes: dict[str, dict[str, Any]] = {}

    def expert(fields: dict[str, Any]) -> tuple[str, str]:
        spec = make_spec(fields)
        h = spec.spec_hash()
        finetunes.setdefault(h, spec.canonical())
        return spec.task, h

    settings = []
    for seed in cfg.seeds:
        for hp in cfg.hyperparameters:
            for value in grid(cfg, hp):
                members: dict[str, dict[str, Any]] = {}
                for task in cfg.tasks:
                    if hp == "K":
                        t, h = expert(_spec_fields(cfg, task, "K", seed=seed))
                        members[task] = {"task": t, "spec_hash": h, "step": int(value)}
                    elif hp == "N":
                        t, h = expert(_spec_fields(cfg, task, seed=seed))
                        members[task] = {"task": t, "spec_hash": h, "step": None}
                    else:
                        t, h = expert(_spec_fields(cfg, task, hp, value, seed=seed))
                        members[task] = {"task": t, "spec_hash": h, "step": None}
                size = int(value) if hp == "N" else cfg.group_size
                groups = [[members[t] for t in g] for g in task_groups(cfg, size)]
                settings.append({"hp": hp, "value": value, "seed": seed, "groups": groups})
    # heaviest fine-tunes first (batch x steps), so the pool's tail is short
    order = sorted(finetunes.values(), key=lambda s: -s["batch_size"] * s["steps"])
    return Plan(finetunes=order, settings=settings)


def _merge_spec(cfg: ScalingConfig, method: str, members: list[dict[str, Any]], cache_dir: str | None) -> dict[str, Any]:
    return {"arch": cfg.arch, "method": method, "parameters": dict(cfg.method_parameters.get(method, {})),
            "members": members, "reset_bn": cfg.reset_bn, "data_samples": cfg.data_samples, "cache_dir": cache_dir}


# ------------------------------------------------------------------------------------------------ the study
def run_scaling_study(
    cfg: ScalingConfig,
    out: PathLike,
    options: RunOptions | None = None,
) -> Any:
    """Run (or resume) the study and write ``report.json`` (and ``merges.csv``) into ``out``.

    Returns the :class:`~mergelab.report.ReportDocument`.
    """
    opts = options or RunOptions()
    say = opts.say or log.info
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store, cache = opts.open_store(), opts.cache()
    study = "scaling"
    say(f"pretrained {cfg.arch}: ensuring it exists (pretrains once on an empty cache)")
    ensure_pretrained(cfg.arch, cache)
    p = plan(cfg, cache)
    ft_tasks = [Task("finetune", {"spec": s, "cache_dir": cache}, finetune_job, study=study) for s in p.finetunes]
    say(f"fine-tuning {len(ft_tasks)} experts ({opts.backend}, {opts.workers} workers; cached ones are skipped)")
    s1 = opts.run(ft_tasks, store)
    if s1.failed:
        raise SpecError(f"{len(s1.failed)} fine-tune(s) failed; see `mergelab results --study {study} --status failed`")
    merges: list[tuple[dict[str, Any], str, dict[str, Any]]] = []  # (setting, method, merge spec)
    for setting in p.settings:
        for method in cfg.methods:
            for members in setting["groups"]:
                merges.append((setting, method, _merge_spec(cfg, method, members, cache)))
    # settings that share experts (b = 64, eta = 0.05, n = 1 and N = group_size are all the default experts)
    # share their merges: one task per distinct merge
    m_tasks = [Task("merge_eval", spec, merge_eval_job, study=study) for _, _, spec in merges]
    say(f"merging and evaluating {len({t.key for t in m_tasks})} task groups")
    s2 = opts.run(m_tasks, store)
    if s2.failed:
        log.warning("%d merge(s) failed; they are left out of the report", len(s2.failed))
    records = []
    for setting, method, spec in merges:
        row = store.get(key_of("merge_eval", spec))
        if row is None or row.status != "done":
            continue
        records.append({"hp": setting["hp"], "value": setting["value"], "seed": setting["seed"], "method": method,
                        "members": spec["members"], **{k: row.metrics[k] for k in ("loss", "accuracy", "joint_loss", "joint_accuracy")}})
    say("experts alone on their tasks under the merges' BatchNorm protocol (cached)")
    s3 = attach_excess(cfg, records, opts, store, cache, study)
    say("theory quantities at theta_0 (once per task, cached)")
    attach_bound(cfg, records, cache, out)
    doc = build_report(cfg, records, {"finetunes": s1.counts, "merges": s2.counts, "experts_alone": s3.counts,
                                      "backend": opts.backend})
    doc.to_json(out)
    _write_csv(records, out / "merges.csv")
    return doc


def _member_key(m: dict[str, Any]) -> tuple[Any, ...]:
    return (m["task"], m["spec_hash"], m.get("step"))


def expert_eval_spec(cfg: ScalingConfig, member: dict[str, Any], cache: str | None) -> dict[str, Any]:
    """The :func:`~mergelab.experiments.jobs.expert_eval_job` spec of one merge member."""
    return {"arch": cfg.arch, "member": {"task": member["task"], "spec_hash": member["spec_hash"],
                                         "step": member.get("step")},
            "reset_bn": cfg.reset_bn, "cache_dir": cache}


def attach_excess(cfg: ScalingConfig, records: list[dict[str, Any]], opts: RunOptions, store: Any, cache: str | None,
                  study: str = "scaling") -> Any:
    """Evaluate every member of the recorded merges alone (cached ``expert_eval`` jobs) and add to each record
    ``expert_loss`` (mean over its members of their own-task test loss under the same BN protocol) and
    ``excess = loss - expert_loss`` (NaN when a member's evaluation failed). Returns the run summary."""
    specs = {_member_key(m): expert_eval_spec(cfg, m, cache) for r in records for m in r["members"]}
    summary = opts.run([Task("expert_eval", sp, expert_eval_job, study=study) for sp in specs.values()], store)
    if summary.failed:
        log.warning("%d expert evaluation(s) failed; their merges have no excess loss", len(summary.failed))
    losses: dict[tuple[Any, ...], float] = {}
    for k, sp in specs.items():
        row = store.get(key_of("expert_eval", sp))
        losses[k] = float(row.metrics["loss"]) if row is not None and row.status == "done" else math.nan
    for r in records:
        el = float(np.mean([losses[_member_key(m)] for m in r["members"]]))
        r["expert_loss"] = el
        r["excess"] = float(r["loss"]) - el
    return summary


def attach_bound(cfg: ScalingConfig, records: list[dict[str, Any]], cache: str | None, out: Path) -> None:
    """Add the *(derived)* excess-loss form's terms ``opt``, ``stab`` and ``het`` to every record (module
    docstring, item 4), with ``predicted`` (the fit to all of the method's merges) and ``heldout`` (the
    leave-one-hyperparameter-out prediction) of the excess loss when records carry ``excess``."""
    if not records:
        return
    # theta_0 statistics come from each task's default expert (cached; trained here only when no study used it)
    defaults = {task: finetune(_spec_fields(cfg, task), cache_dir=cache) for task in cfg.tasks}
    scfg = StudyConfig(arch=cfg.arch, samples=cfg.samples, hessian_iters=cfg.hessian_iters)
    inits, _ = expert_measurements(pretrained_dir(cfg.arch, cache), list(defaults.values()), scfg,
                                   cache=out / "measurements")
    at_init = {d.task: i for d, i in zip(defaults.values(), inits)}
    base = read_backbone_state(pretrained_dir(cfg.arch, cache) / BACKBONE_FILE)
    statistics = re.compile(STATISTICS_PATTERN.removeprefix("re:"))
    names = [k for k, v in base.items() if v.is_floating_point() and not statistics.search(k)]
    members: dict[tuple[Any, ...], Any] = {}  # each expert's sidecar and weights are read once, not once per merge
    taus: dict[tuple[Any, ...], dict[str, Any]] = {}

    def expert(m: dict[str, Any]) -> Any:
        key = _member_key(m)
        if key not in members:
            members[key] = member_expert(m, cfg.arch, cache)
            state = read_backbone_state(Path(members[key].path) / BACKBONE_FILE)
            taus[key] = {k: state[k].double() - base[k].double() for k in names}  # BN statistics are not task vectors
        return members[key]

    for rec in records:
        experts = [expert(m) for m in rec["members"]]
        group_inits = [at_init[e.task].with_n(int(e.n_train)) for e in experts]
        coeffs = merge_coefficients(rec["method"], cfg.method_parameters.get(rec["method"], {}), [1.0] * len(experts))
        pool = bound_pool(pool_measurement(group_inits), experts, coeffs)
        vectors = [taus[_member_key(m)] for m in rec["members"]]
        op, transformed = merge_operator_vectors(rec["method"], cfg.method_parameters.get(rec["method"], {}), vectors)
        d_id = task_vector_dispersion(vectors)
        d = d_id if op == "identity" else task_vector_dispersion(transformed)
        t = excess_terms(pool, d, smoothness=[at_init[e.task].L for e in experts], dispersion_identity=d_id,
                         operator=op)
        rec.update(opt=t.opt, stab=t.stab, het=t.het, operator=op, dispersion=float(np.mean(d)),
                   bound_valid=bool(all(e.eta() * pool.smoothness * e.steps <= 1.0 for e in pool.experts)))
    for method in sorted({r["method"] for r in records}):
        idx = [i for i, r in enumerate(records) if r["method"] == method]
        X = np.array([[records[i][k] for k in ("opt", "stab", "het")] for i in idx], dtype=np.float64)
        y = np.array([records[i].get("excess", math.nan) for i in idx], dtype=np.float64)
        ok = np.isfinite(y) & np.all(np.isfinite(X), axis=1)
        if ok.sum() < 2:
            continue
        fit = fit_excess(X[ok], y[ok])
        held = leave_one_out(X, y, [records[i]["hp"] for i in idx], keys=[_merge_key(records[i]) for i in idx])
        for j, i in enumerate(idx):
            records[i]["predicted"] = float(fit.predict(X[j:j + 1])[0])
            records[i]["heldout"] = held.predicted[j]


def _merge_key(rec: dict[str, Any]) -> tuple[Any, ...]:
    """A merge's identity: its method and members (the default experts' merges recur in several sweeps)."""
    return (rec["method"], *(_member_key(m) for m in rec["members"]))


def bound_analysis(records: Sequence[dict[str, Any]], method: str, *, bootstrap: int = 1000) -> dict[str, Any]:
    """The bound's tests on ``method``'s merges *(derived form)*: leave-one-hyperparameter-out Spearman (NNLS and
    OLS fits, and each term alone) with delete-one-task jackknife intervals (and the merge bootstrap for
    reference), the fit on all merges, and the elasticities of the excess loss per sweep
    (:mod:`mergelab.analysis.bound_fit`). Empty when the records have no excess loss or terms."""
    sub = [r for r in records if r["method"] == method and all(k in r for k in ("excess", "opt", "stab", "het"))]
    X = np.array([[r["opt"], r["stab"], r["het"]] for r in sub], dtype=np.float64).reshape(len(sub), 3)
    y = np.array([r["excess"] for r in sub], dtype=np.float64)
    ok = np.isfinite(y) & np.all(np.isfinite(X), axis=1)
    if ok.sum() < 4:
        return {}
    sub = [r for r, k in zip(sub, ok) if k]
    X, y = X[ok], y[ok]
    hps = [r["hp"] for r in sub]
    keys = [_merge_key(r) for r in sub]
    memberships = [[m["task"] for m in r["members"]] for r in sub]
    clusters = ["+".join(sorted(ms)) for ms in memberships]
    W, _ = task_offset_matrix(memberships)
    out: dict[str, Any] = {"n": len(sub), "heldout": {}, "fits": {}, "terms": {}}
    for fm, spec in BOUND_FITS.items():
        cols = X if spec["terms"] else X[:, :0]

        def held(idx: np.ndarray, spec: dict[str, Any] = spec, cols: np.ndarray = cols) -> Any:
            return leave_one_out(cols[idx], y[idx], [hps[i] for i in idx], keys=[keys[i] for i in idx],
                                 method=spec["method"], form=spec["form"],
                                 offsets=W[idx] if spec["offsets"] else None)

        def stat(mask: np.ndarray) -> float:
            idx = np.flatnonzero(mask) if mask.dtype == bool else np.asarray(mask)
            return held(idx).spearman

        def stat_within(mask: np.ndarray) -> float:
            idx = np.flatnonzero(mask)
            return within_spearman(held(idx).predicted, y[idx], [clusters[i] for i in idx])

        ho = held(np.arange(len(sub)))
        out["heldout"][fm] = {
            "result": ho,
            "jackknife": task_jackknife(stat, memberships, fisher_z=True),
            "bootstrap": merge_bootstrap(stat, len(sub), replicates=bootstrap),
            "within": within_spearman(ho.predicted, y, clusters),
            "within_jackknife": task_jackknife(stat_within, memberships, fisher_z=True),
        }
        if fm in ("nnls", "ols"):
            out["fits"][fm] = fit_excess(X, y, method=fm)
    for j, name in enumerate(("opt", "stab", "het")):
        col = X[:, j]
        out["terms"][name] = {
            "spearman": spearman(col, y),
            "within": within_spearman(col, y, clusters),
            "within_jackknife": task_jackknife(lambda mask, col=col: within_spearman(
                col[mask], y[mask], [clusters[i] for i in np.flatnonzero(mask)]), memberships, fisher_z=True),
            "jackknife": task_jackknife(lambda mask, col=col: spearman(col[mask], y[mask]), memberships, fisher_z=True),
            "per_hp": {h: spearman(col[[i for i, g in enumerate(hps) if g == h]], y[[i for i, g in enumerate(hps) if g == h]])
                       for h in sorted(set(hps))},
        }
    out["elasticities"] = {}
    for h in HYPERPARAMETERS:
        rows = [i for i, g in enumerate(hps) if g == h]
        if len({sub[i]["value"] for i in rows}) < 2:
            continue
        out["elasticities"][h] = elasticity(h, [float(sub[i]["value"]) for i in rows], y[rows],
                                            [memberships[i] for i in rows])
    return out


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def observations(records: Sequence[dict[str, Any]], hp: str, method: str, key: str) -> list[Any]:
    """The merges of ``hp`` and ``method`` as :class:`~mergelab.analysis.statistics.Observation` s of ``key``:
    level = grid value, cell = the task group (its seeds are replicates of the cell), units = the group's tasks
    (the independent units of the jackknife)."""
    out = []
    for r in records:
        if r["hp"] == hp and r["method"] == method:
            tasks = tuple(m["task"] for m in r["members"])
            out.append(Observation(frozenset(tasks), r["value"], tasks, float(r.get(key, math.nan))))
    return out


def curve(records: Sequence[dict[str, Any]], hp: str, method: str, key: str) -> tuple[list[float], list[float], list[float], list[int]]:
    """``(values, mean, standard error, count)`` of ``key`` per grid value: the mean over task groups of each
    group's mean over seeds, its delete-one-task jackknife standard error (NaN when not estimable, e.g. one
    group holding every task; :mod:`mergelab.analysis.statistics`), and the number of merges."""
    obs = observations(records, hp, method, key)
    vals = sorted({o.level for o in obs})
    means, errs, counts = [], [], []
    for v in vals:
        e = contrast(obs, {v: 1.0})
        means.append(e.value)
        errs.append(e.se)
        counts.append(sum(1 for o in obs if o.level == v))
    return [float(v) for v in vals], means, errs, counts


def shape_of_steps(signs: Sequence[int]) -> str:
    """The curve's shape from the signs of its consecutive steps (+1 up, -1 down, 0 tie): ``flat``,
    ``increasing``, ``decreasing``, ``U`` (down then up), ``inverted-U`` (up then down) or ``non-monotone``."""
    moves = [s for s in signs if s != 0]
    if not moves:
        return "flat"
    if all(s > 0 for s in moves):
        return "increasing"
    if all(s < 0 for s in moves):
        return "decreasing"
    turns = sum(1 for a, b in zip(moves, moves[1:]) if a != b)
    if turns == 1:
        return "U" if moves[0] < 0 else "inverted-U"
    return "non-monotone"


def step_signs(obs: Sequence[Any], alpha: float = 0.05) -> tuple[list[int], list[Any]]:
    """Signs of the steps between consecutive grid values of ``obs`` (:func:`observations`) and their estimates.

    Each step is the difference of the two values' means over task groups (paired over the groups present at
    both), with a delete-one-task jackknife standard error (t with tasks - 1 degrees of freedom); its sign counts
    only when its interval at ``alpha / steps`` excludes 0 (Bonferroni, so a curve without a trend shows a
    significant step with probability <= ``alpha``); 0 = undecided, NaN error included."""
    levels = sorted({o.level for o in obs})
    steps = step_contrasts(obs, levels)
    return significant_signs(steps, alpha), steps


def trend_verdict(hp: str, obs: Sequence[Any], alpha: float = 0.05) -> dict[str, Any]:
    """The measured loss curve's shape from its significant steps (:func:`step_signs`) against
    :data:`PREDICTED`: ``agrees`` None (undecided) when no step is significant."""
    if len({o.level for o in obs}) < 2:
        return {"shape": "undetermined", "agrees": None, "predicted": PREDICTED[hp][0], "signs": [], "steps": []}
    signs, steps = step_signs(obs, alpha)
    shape = shape_of_steps(signs)
    predicted, ok = PREDICTED[hp]
    agrees: bool | None = None if shape == "flat" else shape in ok
    return {"shape": shape, "agrees": agrees, "predicted": predicted, "signs": signs, "steps": steps}


def _step_text(step: Any, sign: int) -> str:
    lo, hi = step.interval()
    ci = "n/a" if not math.isfinite(lo) else f"{lo:+.3f} to {hi:+.3f}"
    return f"{step.value:+.3f} [95% CI {ci}]" + ("" if sign else " (n.s.)")


def _curve_shape(values: Sequence[float]) -> str:
    """Shape of a noiseless curve (the bound's), ties within 1e-9 relative."""
    y = np.asarray(values, dtype=float)
    tol = 1e-9 * max(float(np.max(np.abs(y))), 1e-300)
    return shape_of_steps([0 if abs(d) <= tol else (1 if d > 0 else -1) for d in np.diff(y)])


def _bound_figures(records: Sequence[dict[str, Any]], hp: str, method: str, log_x: bool) -> list[Any]:
    """Per sweep: the measured excess loss with the bound's held-out and fitted predictions, and its three terms
    (unit constants) *(derived)*."""
    xs, exc, eerr, n = curve(records, hp, method, "excess")
    if not xs or not all(np.isfinite(exc)):
        return []
    _, held, _, _ = curve(records, hp, method, "heldout")
    _, fitted, _, _ = curve(records, hp, method, "predicted")
    sub = [r for r in records if r["hp"] == hp and r["method"] == method]
    rho = _spearman([r.get("heldout", math.nan) for r in sub], [r.get("excess", math.nan) for r in sub])
    tag, label, scale = f"{method}-{hp}", LABELS[hp], "log" if log_x else "linear"
    figs = [Figure(
        id=f"{tag}-excess", title=f"{method}: excess loss over the experts vs {label}", xlabel=label,
        ylabel="merged loss - mean expert loss", xscale=scale,
        series=[Series(label=f"measured (mean +- s.e. over {max(n)} groups)", x=xs, y=exc, yerr=eerr),
                Series(label="bound (derived), held out: fitted without this sweep", x=xs, y=held, style="dashed"),
                Series(label="bound (derived), fitted on all sweeps", x=xs, y=fitted, style="points")],
        caption=f"within this sweep, Spearman(held-out bound, measured excess) over {len(sub)} merges {rho:.2f}")]
    terms = {k: curve(records, hp, method, k)[1] for k in ("opt", "stab", "het")}
    if all(all(np.isfinite(v)) and min(v) > 0 for v in terms.values()):
        figs.append(Figure(
            id=f"{tag}-terms", title=f"{method}: the bound's three terms (derived, unit constants) vs {label}",
            xlabel=label, ylabel="term (mean over merges)", xscale=scale, yscale="log",
            series=[Series(label="OPT (optimisation)", x=xs, y=terms["opt"]),
                    Series(label="STAB (per-task stability)", x=xs, y=terms["stab"]),
                    Series(label="HET (task-vector dispersion)", x=xs, y=terms["het"])],
            caption=f"OPT {_curve_shape(terms['opt'])}, STAB {_curve_shape(terms['stab'])}, HET "
                    f"{_curve_shape(terms['het'])} in {label}"))
    return figs


def _iv_text(iv: Any) -> str:
    return f"[{iv.low:.2f}, {iv.high:.2f}]" if math.isfinite(iv.low) and math.isfinite(iv.high) else "n/a"


def _bound_sections(records: Sequence[dict[str, Any]], method: str, target: float = 0.8) -> list[Any]:
    """The bound's report section for ``method`` *(derived)*: held-out prediction, fitted constants, each term
    alone, and the elasticities, with their verdicts (:func:`bound_analysis`)."""
    res = bound_analysis(records, method)
    if not res:
        return []
    hps = sorted(res["heldout"]["nnls"]["result"].per_group)
    held_rows, verdicts = [], []
    for fm, spec in BOUND_FITS.items():
        h = res["heldout"][fm]
        jk, bs = h["jackknife"], h["bootstrap"]
        held_rows.append([spec["label"], h["result"].spearman, _iv_text(jk), _iv_text(bs), h["within"],
                          _iv_text(h["within_jackknife"]), *(h["result"].per_group.get(g, math.nan) for g in hps),
                          res["n"]])
    for name, label in (("opt", "OPT alone"), ("stab", "STAB alone"), ("het", "HET alone")):
        t = res["terms"][name]
        held_rows.append([label + " (no fit)", t["spearman"], _iv_text(t["jackknife"]), "", t["within"],
                          _iv_text(t["within_jackknife"]), *(t["per_hp"].get(g, math.nan) for g in hps), res["n"]])
    held_table = Table(
        title=f"{method}: the bound's held-out prediction of the excess loss (leave one hyperparameter out; derived form)",
        columns=["fit", "Spearman (pooled)", "95% CI, task jackknife", "95% CI, merge bootstrap (ignores overlap)",
                 "within task group (mean)", "95% CI, task jackknife", *(f"within {g}" for g in hps), "merges"],
        rows=held_rows, digits=3,
        caption="Each sweep's merges are predicted by the fit on the other sweeps (merges identical to a held-out one "
                "are left out of its fit) and the predictions of all sweeps are pooled; 'within' columns rank inside "
                "one sweep, 'within task group' inside the merges of one set of tasks (averaged over sets: what the "
                "hyperparameters do, with the tasks' level removed). Rows 'alone' rank merges by one term without "
                "any fit. Derived variants: the multiplicative form fitted on logs; per-task offsets (one free "
                "intercept per task, averaged over the merged tasks), whose baseline without any bound term is "
                "shown: a fit with offsets is credited only with what it adds to it. " + EXCESS_FORMULA)
    jk = res["heldout"]["nnls"]["jackknife"]
    rho = res["heldout"]["nnls"]["result"].spearman
    agrees = None if not math.isfinite(jk.low) else (True if jk.low >= target else (False if jk.high < target else None))
    verdicts.append(Verdict(
        claim=f"the corrected bound orders merges ({method}): held-out Spearman >= {target:g}",
        predicted=f"Spearman >= {target:g} (issue 13's target)",
        measured=f"{rho:.2f}, 95% CI {_iv_text(jk)} (task jackknife, {jk.replicates} replicates); "
                 + ("meets" if rho >= target else f"falls short by {target - rho:.2f}")
                 + "; terms alone: " + ", ".join(f"{k.upper()} {res['terms'][k]['spearman']:.2f}" for k in ("opt", "stab", "het"))
                 + "; derived variants: " + ", ".join(
                     f"{fm} {res['heldout'][fm]['result'].spearman:.2f} {_iv_text(res['heldout'][fm]['jackknife'])}"
                     for fm in ("nnls_log", "nnls_offsets", "offsets_only")),
        agrees=agrees))
    fit_rows = []
    for fm in ("nnls", "ols"):
        f = res["fits"][fm]
        c = f.constants
        fit_rows.append([fm, f.intercept, *f.standardized, c.c0, c.c_opt, c.c_stab, c.c_het, f.r2])
    fit_table = Table(
        title=f"{method}: fitted constants on all merges (derived form; intercept free, standardised columns)",
        columns=["fit", "intercept", "OPT per s.d.", "STAB per s.d.", "HET per s.d.", "c0", "c_opt", "c_stab",
                 "c_het", "R^2"], rows=fit_rows, digits=4)
    el_rows = []
    for h, e in res["elasticities"].items():
        iv = e.interval
        el_rows.append([LABELS[h], e.regressor, e.slope, _iv_text(iv), "+" if e.predicted_sign > 0 else "-",
                        "-" if e.predicted_value is None else f"{e.predicted_value:g}", e.sign_verdict,
                        e.value_verdict, e.n, e.dropped])
        mark = {"agrees": True, "disagrees": False, "undecided": None}
        decisive = e.value_verdict if e.predicted_value is not None else e.sign_verdict
        verdicts.append(Verdict(
            claim=f"elasticity of the excess loss in {LABELS[h]} ({method})",
            predicted=("sign " + ("+" if e.predicted_sign > 0 else "-")
                       + ("" if e.predicted_value is None else f", value {e.predicted_value:g} (per-task stability, derived)")),
            measured=f"d log(excess) / d {e.regressor} = {e.slope:.2f}, 95% CI {_iv_text(iv)} (task jackknife); sign "
                     f"{e.sign_verdict}" + ("" if e.predicted_value is None else f", value {e.value_verdict}"),
            agrees=mark[decisive]))
    el_table = Table(
        title=f"{method}: elasticities of the excess loss within each sweep (no fitted constants)",
        columns=["hyperparameter", "regressor", "slope", "95% CI (task jackknife)", "predicted sign",
                 "predicted value", "sign", "value", "merges", "dropped (excess <= 0)"],
        rows=el_rows, digits=3,
        caption="OLS slope of log excess loss on the log hyperparameter (on N for the number of tasks), the other "
                "hyperparameters fixed; intervals by the delete-one-task jackknife (t, T-1 df). Predicted values are "
                "the per-task stability term's (derived) elasticities eta^2 K / n; signs THEORY.md's scaling laws.")
    return [Section(title=f"{method}: the bound (derived) against measurement",
                    text="The excess-loss form of the stability bound (derived, THEORY.md section 1, 'Where N "
                         "enters'); 'agrees' only when the interval supports the prediction.",
                    tables=[held_table, fit_table, el_table], verdicts=verdicts)]


def build_report(cfg: ScalingConfig, records: Sequence[dict[str, Any]], counts: dict[str, Any]) -> Any:
    """The study's :class:`~mergelab.report.ReportDocument`."""
    sections = []
    verdict_rows = []
    for method in cfg.methods:
        for hp in cfg.hyperparameters:
            xs, loss, lerr, n = curve(records, hp, method, "loss")
            if not xs:
                continue
            _, acc, aerr, _ = curve(records, hp, method, "accuracy")
            tv = trend_verdict(hp, observations(records, hp, method, "loss"))
            log_x = hp in ("K", "b", "eta", "n")
            tag = f"{method}-{hp}"
            figs = [
                Figure(id=f"{tag}-loss", title=f"{method}: merged test loss vs {LABELS[hp]}", xlabel=LABELS[hp],
                       ylabel="mean test cross-entropy", xscale="log" if log_x else "linear",
                       series=[Series(label=f"measured (mean +- jackknife s.e. over tasks; {max(n)} merges)",
                                      x=xs, y=loss, yerr=lerr)],
                       caption=f"measured shape {tv['shape']}"),
                Figure(id=f"{tag}-acc", title=f"{method}: merged test accuracy vs {LABELS[hp]}", xlabel=LABELS[hp],
                       ylabel="mean test accuracy", xscale="log" if log_x else "linear",
                       series=[Series(label="measured (mean +- jackknife s.e. over tasks)", x=xs, y=acc, yerr=aerr)]),
            ]
            figs += _bound_figures(records, hp, method, log_x)
            _, exc, eerr, _ = curve(records, hp, method, "excess")
            _, held, _, _ = curve(records, hp, method, "heldout")
            rows = [[f"{x:g}", l_, le, a, ae, e, ee, h, c]
                    for x, l_, le, a, ae, e, ee, h, c in zip(xs, loss, lerr, acc, aerr, exc, eerr, held, n)]
            table = Table(title=f"{method}: {LABELS[hp]}", columns=["value", "loss", "loss s.e.", "accuracy",
                                                                     "accuracy s.e.", "excess loss", "excess s.e.",
                                                                     "bound (held out, derived)", "merges"],
                          rows=rows, digits=4,
                          caption="Mean over task groups of each group's mean over seeds; s.e.: delete-one-task "
                                  "jackknife (groups share tasks; empty where not estimable). Excess loss: merged "
                                  "loss minus the members' mean own-task loss under the same BN protocol.")
            verdict = Verdict(
                claim=f"{LABELS[hp]} ({method})", predicted=PREDICTED[hp][0],
                measured=f"loss {tv['shape']} over {', '.join(f'{x:g}' for x in xs)} (steps "
                         f"{', '.join(_step_text(d, s) for d, s in zip(tv['steps'], tv['signs']))})",
                agrees=tv["agrees"],
                detail="A step counts when its 95%/steps (Bonferroni) interval excludes 0; intervals: delete-one-"
                       "task jackknife over the overlapping task groups (seeds averaged within a group), t with "
                       "tasks - 1 degrees of freedom (mergelab.analysis.statistics). Otherwise undecided.",
            )
            verdict_rows.append(verdict)
            sections.append(Section(title=f"{method}: {LABELS[hp]}", figures=figs, tables=[table], verdicts=[verdict]))
    summary_table = Table(
        title="the five predicted trends",
        columns=["hyperparameter", "predicted", "measured", "agrees"],
        rows=[[v.claim, v.predicted, v.measured, v.mark] for v in verdict_rows],
    )
    bound_sections = [sec for method in cfg.methods for sec in _bound_sections(records, method)]
    valid = sum(bool(r.get("bound_valid")) for r in records)
    summary = (
        f"{len(records)} merges of {cfg.arch} experts over {len(cfg.tasks)} tasks ({', '.join(cfg.tasks)}); groups of "
        f"{cfg.group_size} tasks ({cfg.groups} per setting); BatchNorm statistics: {cfg.reset_bn}. Loss = mean over the "
        f"group's tasks of the test cross-entropy through each expert's head; excess loss = loss minus the mean of "
        f"the members' own-task losses under the same BatchNorm protocol. The bound is the (derived) excess-loss "
        f"form of THEORY.md section 1 ('Where N enters'), tested by leave-one-hyperparameter-out prediction and by "
        f"the excess loss's elasticities; {valid} of {len(records)} merges have every expert inside its step-size "
        f"condition eta <= 1/(L K) (elsewhere the bound is extrapolated).")
    head = Section(title="Summary", tables=[summary_table])
    return ReportDocument(
        title="Scaling laws of merging: measurement vs the stability bound",
        study="scaling",
        summary=summary,
        config={**cfg.model_dump(mode="json"), "runs": counts},
        sections=[head, *bound_sections, *sections],
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions=versions(),
    )


def _write_csv(records: Sequence[dict[str, Any]], path: Path) -> None:
    cols = ["hp", "value", "seed", "method", "tasks", "loss", "accuracy", "joint_loss", "joint_accuracy",
            "expert_loss", "excess", "opt", "stab", "het", "predicted", "heldout"]
    write_csv_atomic(path, cols, ([r["hp"], r["value"], r.get("seed", 0), r["method"],
                                   "+".join(m["task"] for m in r["members"]), *(r.get(k, "") for k in cols[5:])]
                                  for r in records))
