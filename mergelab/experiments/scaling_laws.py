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
3. **Bound.** Per task, ``F_{S_i}(theta_0)``, ``sigma_i^2``, ``grad F_i`` and ``L_i`` are measured once at
   theta_0 (they do not depend on how the experts are trained; cached), each merge gets its
   :class:`~mergelab.analysis.bound.BoundPool` from its experts' real hyperparameters (K, eta, b, momentum, the
   schedule's moments, n_i), and the two constants ``c_opt, c_stab`` are fitted by NNLS to all of the
   study's measured losses (per method). The calibrated prediction is drawn over the measurement.
4. **Verdicts.** For each hyperparameter, the measured curve's shape against THEORY.md's predicted trend
   (:data:`PREDICTED`). The groups share tasks, so they are not independent samples: each grid value's mean (over
   groups of the group's mean over seeds) and each step between consecutive values get a delete-one-task
   jackknife standard error (:mod:`mergelab.analysis.statistics`); a step counts only when its interval at
   5% / (number of steps) excludes 0, otherwise the curve is "flat" and the verdict undecided (at most ~5% false
   verdicts under no true effect, tests/test_studies.py). Also the Spearman rank correlation of the calibrated
   bound with the measured loss, over the grid means and over all merges of that hyperparameter.

Everything runs through the results store and a runner (local process pool or Ray), so a rerun skips
finished fine-tunes and merges and an interrupted study resumes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from functools import reduce
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergelab.errors import SpecError
from mergelab.experiments.runners import RunOptions

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
HYPERPARAMETERS: tuple[str, ...] = ("K", "b", "eta", "n", "N")
LABELS = {"K": "fine-tuning steps K", "b": "batch size b", "eta": "learning rate eta", "n": "data ratio (n / n_full)",
          "N": "number of merged tasks N"}
SPEC_FIELD = {"K": "steps", "b": "batch_size", "eta": "lr", "n": "data_ratio"}
SCALING_TASKS: tuple[str, ...] = ("mnist", "mnist_rot90", "mnist_invert", "digits", "shapes", "mnist1d")

#: THEORY.md's predicted trend per hyperparameter, and the measured loss shapes (of
#: :func:`mergelab.analysis.bound.classify_shape`) that agree with it.
PREDICTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "K": ("an optimum K* (U-shaped loss, inverted-U accuracy) or a monotone decline (loss rising with K)", ("U", "increasing")),
    "eta": ("large learning rates collapse the merge (loss rising at the large end)", ("increasing", "U")),
    "b": ("at small eta larger batches merge better (loss falling with b)", ("decreasing",)),
    "n": ("monotone improvement with more data (loss falling with n)", ("decreasing",)),
    "N": ("decline with more tasks (loss rising with N)", ("increasing",)),
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
        from mergelab.tasks import list_tasks

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
    from mergelab.analysis.calibration_study import draw_pools

    idx = draw_pools(len(cfg.tasks), cfg.groups, size, size, seed=cfg.seed + 1000 * size)
    return [tuple(cfg.tasks[i] for i in g) for g in idx]


class Plan(BaseModel):
    """The study's work: the fine-tunes (spec fields) and, per setting, the merges (members per group)."""

    finetunes: list[dict[str, Any]]
    settings: list[dict[str, Any]]  # {"hp", "value", "seed", "groups": [[member, ...], ...]}


def plan(cfg: ScalingConfig, cache_dir: PathLike | None = None) -> Plan:
    """Resolve every expert spec (hashes included) and every merge of the study."""
    from mergelab.training.spec import make_spec

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
    from mergelab.experiments.jobs import finetune_job, merge_eval_job
    from mergelab.experiments.runners import Task
    from mergelab.experiments.store import key_of
    from mergelab.models.pretraining import ensure_pretrained

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
    say("theory quantities at theta_0 (once per task, cached)")
    attach_bound(cfg, records, cache, out)
    doc = build_report(cfg, records, {"finetunes": s1.counts, "merges": s2.counts, "backend": opts.backend})
    doc.to_json(out)
    _write_csv(records, out / "merges.csv")
    return doc


def attach_bound(cfg: ScalingConfig, records: list[dict[str, Any]], cache: str | None, out: Path) -> None:
    """Add the bound's unit-constant features ``opt``, ``gen`` and the calibrated ``predicted`` loss to every
    record (constants fitted per method by NNLS over all of that method's merges)."""
    from dataclasses import replace

    from mergelab.analysis.bound import BoundConstants, evaluate_bound
    from mergelab.analysis.calibration import fit_constants, predict_losses
    from mergelab.analysis.calibration_study import StudyConfig, expert_measurements
    from mergelab.analysis.pool_report import bound_pool, merge_coefficients, pool_measurement
    from mergelab.experiments.jobs import member_expert
    from mergelab.models.paths import pretrained_dir
    from mergelab.training import finetune

    if not records:
        return
    # theta_0 statistics come from each task's default expert (cached; trained here only when no study used it)
    defaults = {task: finetune(_spec_fields(cfg, task), cache_dir=cache) for task in cfg.tasks}
    scfg = StudyConfig(arch=cfg.arch, samples=cfg.samples, hessian_iters=cfg.hessian_iters)
    inits, _ = expert_measurements(pretrained_dir(cfg.arch, cache), list(defaults.values()), scfg,
                                   cache=out / "measurements")
    at_init = {d.task: i for d, i in zip(defaults.values(), inits)}
    members: dict[tuple[Any, ...], Any] = {}  # each expert's sidecar is read once, not once per merge

    def expert(m: dict[str, Any]) -> Any:
        key = (m["task"], m["spec_hash"], m.get("step"))
        if key not in members:
            members[key] = member_expert(m, cfg.arch, cache)
        return members[key]

    pools = []
    for rec in records:
        experts = [expert(m) for m in rec["members"]]
        group_inits = [replace(at_init[e.task], n=int(e.n_train)) for e in experts]
        coeffs = merge_coefficients(rec["method"], cfg.method_parameters.get(rec["method"], {}), [1.0] * len(experts))
        pools.append(bound_pool(pool_measurement(group_inits), experts, coeffs))
    bound_log = logging.getLogger("mergelab.analysis.bound")
    level = bound_log.level
    bound_log.setLevel(logging.ERROR)  # its per-pool validity message is counted per merge instead
    try:
        reports = [evaluate_bound(pool, BoundConstants()) for pool in pools]
    finally:
        bound_log.setLevel(level)
    feats = np.array([(r.opt, r.gen) for r in reports], dtype=np.float64).reshape(len(reports), 2)
    for rec, r in zip(records, reports):
        rec["opt"], rec["gen"], rec["bound_valid"] = float(r.opt), float(r.gen), bool(r.all_valid)
    for method in sorted({r["method"] for r in records}):
        idx = [i for i, r in enumerate(records) if r["method"] == method]
        y = np.array([records[i]["loss"] for i in idx])
        ok = np.isfinite(y) & np.all(np.isfinite(feats[idx]), axis=1)
        if ok.sum() < 2:
            continue
        c, floor = fit_constants(feats[idx][ok], y[ok], method="nnls")
        pred = predict_losses(feats[idx], c, floor)
        for i, v in zip(idx, pred):
            records[i]["predicted"] = float(v)
            records[i]["c_opt"], records[i]["c_stab"] = c.c_opt, c.c_stab


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy import stats

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
    from mergelab.analysis.statistics import Observation

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
    from mergelab.analysis.statistics import contrast

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
    from mergelab.analysis.statistics import significant_signs, step_contrasts

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


def build_report(cfg: ScalingConfig, records: Sequence[dict[str, Any]], counts: dict[str, Any]) -> Any:
    """The study's :class:`~mergelab.report.ReportDocument`."""
    import datetime as _dt

    from mergelab.report import Figure, ReportDocument, Section, Series, Table, Verdict
    from mergelab.report.document import versions

    sections = []
    verdict_rows = []
    for method in cfg.methods:
        for hp in cfg.hyperparameters:
            xs, loss, lerr, n = curve(records, hp, method, "loss")
            if not xs:
                continue
            _, acc, aerr, _ = curve(records, hp, method, "accuracy")
            _, pred, _, _ = curve(records, hp, method, "predicted")
            sub = [r for r in records if r["hp"] == hp and r["method"] == method]
            rho_all = _spearman([r.get("predicted", math.nan) for r in sub], [r["loss"] for r in sub])
            rho_grid = _spearman(pred, loss)
            tv = trend_verdict(hp, observations(records, hp, method, "loss"))
            pshape = _curve_shape(pred) if all(np.isfinite(pred)) else "undetermined"
            log_x = hp in ("K", "b", "eta", "n")
            tag = f"{method}-{hp}"
            figs = [
                Figure(id=f"{tag}-loss", title=f"{method}: merged test loss vs {LABELS[hp]}", xlabel=LABELS[hp],
                       ylabel="mean test cross-entropy", xscale="log" if log_x else "linear",
                       series=[Series(label=f"measured (mean +- jackknife s.e. over tasks; {max(n)} merges)",
                                      x=xs, y=loss, yerr=lerr),
                               Series(label="bound, calibrated", x=xs, y=pred, style="dashed")],
                       caption=f"measured shape {tv['shape']}; bound's shape {pshape}; Spearman(bound, measured) "
                               f"over grid means {rho_grid:.2f}, over all {len(sub)} merges {rho_all:.2f}"),
                Figure(id=f"{tag}-acc", title=f"{method}: merged test accuracy vs {LABELS[hp]}", xlabel=LABELS[hp],
                       ylabel="mean test accuracy", xscale="log" if log_x else "linear",
                       series=[Series(label="measured (mean +- jackknife s.e. over tasks)", x=xs, y=acc, yerr=aerr)]),
            ]
            _, opt, _, _ = curve(records, hp, method, "opt")
            _, gen, _, _ = curve(records, hp, method, "gen")
            if all(np.isfinite(opt)) and all(np.isfinite(gen)) and min(opt + gen) > 0:
                figs.append(Figure(
                    id=f"{tag}-terms", title=f"{method}: the bound's two terms (unit constants) vs {LABELS[hp]}",
                    xlabel=LABELS[hp], ylabel="term (mean over merges)", xscale="log" if log_x else "linear",
                    yscale="log", series=[Series(label="optimisation term", x=xs, y=opt),
                                          Series(label="generalisation (stability) term", x=xs, y=gen)],
                    caption=f"optimisation term {_curve_shape(opt)}, stability term {_curve_shape(gen)} in "
                            f"{LABELS[hp]}; the calibrated bound weighs them by c_opt and c_stab"))
            rows = [[f"{x:g}", l_, le, a, ae, p, c] for x, l_, le, a, ae, p, c in zip(xs, loss, lerr, acc, aerr, pred, n)]
            table = Table(title=f"{method}: {LABELS[hp]}", columns=["value", "loss", "loss s.e.", "accuracy",
                                                                     "accuracy s.e.", "bound (calibrated)", "merges"],
                          rows=rows, digits=4,
                          caption="Mean over task groups of each group's mean over seeds; s.e.: delete-one-task "
                                  "jackknife (groups share tasks; empty where not estimable).")
            verdict = Verdict(
                claim=f"{LABELS[hp]} ({method})", predicted=PREDICTED[hp][0],
                measured=f"loss {tv['shape']} over {', '.join(f'{x:g}' for x in xs)} (steps "
                         f"{', '.join(_step_text(d, s) for d, s in zip(tv['steps'], tv['signs']))}); bound {pshape}; "
                         f"Spearman(bound, measured) {rho_grid:.2f} (grid means), {rho_all:.2f} (all merges)",
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
    c_rows = sorted({(r["method"], r.get("c_opt"), r.get("c_stab")) for r in records if "c_opt" in r})
    valid = sum(bool(r.get("bound_valid")) for r in records)
    const_table = Table(title="calibrated constants (NNLS over all merges of the method)",
                        columns=["method", "c_opt", "c_stab"], rows=[list(c) for c in c_rows], digits=6)
    summary = (
        f"{len(records)} merges of {cfg.arch} experts over {len(cfg.tasks)} tasks ({', '.join(cfg.tasks)}); groups of "
        f"{cfg.group_size} tasks ({cfg.groups} per setting); BatchNorm statistics: {cfg.reset_bn}. Loss = mean over the "
        f"group's tasks of the test cross-entropy through each expert's head. The bound is the (derived) form of "
        f"THEORY.md section 1 with constants fitted to these measurements; {valid} of {len(records)} merges have "
        f"every expert inside its step-size condition eta <= 1/(L K) (elsewhere the bound is extrapolated).")
    head = Section(title="Summary", tables=[summary_table, const_table])
    return ReportDocument(
        title="Scaling laws of merging: measurement vs the stability bound",
        study="scaling",
        summary=summary,
        config={**cfg.model_dump(mode="json"), "runs": counts},
        sections=[head, *sections],
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions=versions(),
    )


def _write_csv(records: Sequence[dict[str, Any]], path: Path) -> None:
    from mergelab.atomic_files import write_csv_atomic

    cols = ["hp", "value", "seed", "method", "tasks", "loss", "accuracy", "joint_loss", "joint_accuracy", "opt", "gen",
            "predicted"]
    write_csv_atomic(path, cols, ([r["hp"], r["value"], r.get("seed", 0), r["method"],
                                   "+".join(m["task"] for m in r["members"]), *(r.get(k, "") for k in cols[5:])]
                                  for r in records))
