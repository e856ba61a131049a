"""Calibrating the *(derived)* bound on real merges of a zoo: ``mergelab calibrate``.

Protocol (:func:`run_study`):

1. **Experts**: the complete expert folders of ``arch`` in the cache (``<root>/zoo/<arch>/experts/*/*``) fine-tuned
   from the current pretrained backbone theta_0 (:func:`discover_experts`), optionally restricted to some tasks.
2. **Pools**: ``pools`` distinct random subsets of the experts with sizes drawn uniformly from
   ``min_size .. max_size``, seeded (:func:`draw_pools`).
3. **Measured**: each pool is merged for real by simple averaging (``weight_average`` through
   :func:`mergelab.merging.merge`, into a temporary folder) and the merged backbone is evaluated with
   :func:`mergelab.evaluation.evaluate` on every pool task's full test split through that task's expert head;
   the measured quantity is the mean over the pool's tasks of the test cross-entropy.
4. **Features**: the bound's terms ``(opt, gen)`` at unit constants for the pool
   (:func:`mergelab.analysis.calibration.bound_features`). The statistics at theta_0 of one expert's task
   (``F_{S_i}(theta_0)``, ``sigma_i^2``, ``grad F_i``, ``L_i``: :func:`mergelab.analysis.theory_at_init.measure_expert_at_init`)
   do not depend on the pool, so they are measured once per expert and cached in ``<out>/measurements/``; a pool's
   ``delta_i^2`` (from its tasks' gradients) and ``L = max_i L_i`` are formed from them.
5. **Fit**: ``c_opt, c_stab`` on the training pools (:func:`mergelab.analysis.calibration.calibrate`, NNLS by
   default); on the held-out pools the Spearman rank correlation of the calibrated bound with the measured loss,
   next to baselines: the uncalibrated bound (unit constants), the pool size N alone, each term alone. Because a
   handful of held-out pools gives a very noisy Spearman, the held-out Spearman is also reported over
   ``repeats`` further random train/held-out splits of the same pools (mean, quartiles).

Outputs in ``out``: ``constants.json`` (readable by ``mergelab analyze --constants``), ``calibration.json`` (every
pool, its members, features and measurements, the fit and the baselines), ``calibration.md`` and
``calibration.png`` (predicted vs measured).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from scipy import stats

from mergelab.analysis.bound import evaluate_bound
from mergelab.analysis.bound_constants import CONSTANTS_FORMAT
from mergelab.analysis.calibration import bound_features, calibrate, fit_constants, predict_losses, split_indices
from mergelab.analysis.diagnostics import to_jsonable
from mergelab.analysis.merge_coefficients import bound_pool, merge_coefficients
from mergelab.analysis.pool_experts import has_fingerprints, stale_reason
from mergelab.analysis.theory_at_init import ExpertAtInit, measure_expert_at_init, pool_measurement
from mergelab.atomic_files import open_atomic, write_text_atomic
from mergelab.errors import SpecError
from mergelab.evaluation import evaluate
from mergelab.merging import merge
from mergelab.models import read_backbone_state
from mergelab.models.paths import arch_dir, pretrained_dir
from mergelab.models.pretraining import read_pretrained
from mergelab.output_paths import refuse_overlap
from mergelab.report.markdown import fmt, markdown_table
from mergelab.training.result import read_expert

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure as MplFigure

    from mergelab.analysis.bound import BoundPool
    from mergelab.analysis.calibration import CalibrationResult
    from mergelab.training.result import ExpertResult

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
MEASURED = "mean over the pool's tasks of the test cross-entropy of the simple-average merge (each task through its expert's head)"


@dataclass(frozen=True)
class StudyConfig:
    """Settings of a calibration study (module docstring). ``samples``/``hessian_iters``: size of the theta_0
    measurements per expert; ``fit_method``/``floor``: see :func:`mergelab.analysis.calibration.fit_constants`;
    ``reset_bn``: re-estimate the merged model's BatchNorm statistics before evaluating (default: evaluate the
    plain merge); ``repeats``: extra random splits for the held-out Spearman distribution."""

    arch: str = "resnet_s"
    pools: int = 12
    min_size: int = 2
    max_size: int = 6
    holdout: float = 0.33
    seed: int = 0
    samples: int = 128
    hessian_iters: int = 10
    hessian_tol: float = 1e-2
    heads: Literal["init", "expert"] = "init"
    fit_method: Literal["nnls", "relative", "log"] = "nnls"
    floor: bool = False
    reset_bn: bool = False
    repeats: int = 200
    tasks: tuple[str, ...] | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.min_size < 1 or self.max_size < self.min_size:
            raise SpecError(f"pool size range {self.min_size}..{self.max_size} is empty or below 1")
        if self.pools < 3:
            raise SpecError(f"need at least 3 pools (2 to fit, 1 held out), got {self.pools}")
        if not 0 < self.holdout < 1:
            raise SpecError(f"holdout must be a fraction in (0, 1), got {self.holdout}")
        if self.samples < 2:
            raise SpecError(f"samples per task must be >= 2, got {self.samples}")
        if self.hessian_iters < 1:
            raise SpecError("the bound needs the smoothness L: hessian_iters must be >= 1")


def parse_size_range(text: str) -> tuple[int, int]:
    """``"2..6"``, ``"2-6"`` or ``"4"`` -> ``(min, max)``."""
    t = str(text).strip()
    for sep in ("..", "-", ":"):
        if sep in t:
            lo, hi = t.split(sep, 1)
            break
    else:
        lo = hi = t
    try:
        a, b = int(lo), int(hi)
    except ValueError:
        raise SpecError(f"--pool-size: expected 'MIN..MAX' or one size, got {text!r}") from None
    if a < 1 or b < a:
        raise SpecError(f"--pool-size: need 1 <= MIN <= MAX, got {text!r}")
    return a, b


# ------------------------------------------------------------------------------------------- experts, pools
def discover_experts(arch: str, cache_dir: PathLike | None = None, tasks: Sequence[str] | None = None
                     ) -> tuple[Path, list[ExpertResult], list[str]]:
    """``(pretrained folder, experts, notes)``: the complete cached experts of ``arch`` fine-tuned from the
    current pretrained backbone, sorted by task then spec hash; ``notes`` say what was skipped."""
    pre = read_pretrained(arch, cache_dir)
    if pre is None:
        raise SpecError(f"no pretrained {arch} backbone in {pretrained_dir(arch, cache_dir)}; build the zoo with "
                        f"`mergelab zoo --arch {arch}`")
    root = arch_dir(arch, cache_dir) / "experts"
    experts, notes = [], []
    folders = sorted(p for p in root.glob("*/*") if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        try:
            r = read_expert(folder)
        except Exception as exc:  # noqa: BLE001 - one broken sidecar must not stop the study
            notes.append(f"skipped {folder}: {exc}")
            continue
        if r is None:
            continue
        if r.pretrained_id != pre.pretrained_id:
            notes.append(f"skipped {folder}: fine-tuned from another pretrained backbone ({r.pretrained_id})")
            continue
        if tasks is not None and r.task not in tasks:
            continue
        reason = stale_reason(r)
        if reason is None and not has_fingerprints(r):
            reason = (f"expert {r.path} records no data fingerprints (trained before they existed), so its task data "
                      f"cannot be verified and evaluation refuses it; rebuild it (e.g. `mergelab zoo --arch {arch}`)")
        if reason:
            notes.append(f"skipped: {reason}")
            continue
        experts.append(r)
    if tasks is not None:
        missing = sorted(set(tasks) - {e.task for e in experts})
        if missing:
            raise SpecError(f"no cached {arch} expert for task(s) {', '.join(missing)} in {root}")
    return pretrained_dir(arch, cache_dir), experts, notes


def draw_pools(n_experts: int, pools: int, min_size: int, max_size: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``pools`` distinct sorted index tuples, sizes uniform in ``min_size .. min(max_size, n_experts)``, seeded.

    When fewer distinct pools exist than requested, all of them are returned (in a seeded order)."""
    hi = min(max_size, n_experts)
    if min_size > hi:
        raise SpecError(f"pool size {min_size} exceeds the {n_experts} available experts")
    total = sum(math.comb(n_experts, k) for k in range(min_size, hi + 1))
    rng = np.random.default_rng(seed)
    if total <= pools:
        every = [c for k in range(min_size, hi + 1) for c in itertools.combinations(range(n_experts), k)]
        return [every[i] for i in rng.permutation(len(every))]
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < pools:
        k = int(rng.integers(min_size, hi + 1))
        pool = tuple(sorted(int(i) for i in rng.choice(n_experts, size=k, replace=False)))
        if pool not in seen:
            seen.add(pool)
            out.append(pool)
    return out


# ------------------------------------------------------------------------------------ measurements
def _measurement_key(expert: ExpertResult, cfg: StudyConfig) -> str:
    blob = json.dumps({"spec_hash": expert.spec_hash, "pretrained_id": expert.pretrained_id, "created": expert.created,
                       "train_fingerprint": getattr(expert, "train_fingerprint", None), "samples": cfg.samples,
                       "seed": cfg.seed, "heads": cfg.heads, "hessian_iters": cfg.hessian_iters,
                       "hessian_tol": cfg.hessian_tol, "format": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def expert_measurements(base_path: Path, experts: Sequence[ExpertResult], cfg: StudyConfig,
                        cache: Path | None = None, say: Any = None) -> tuple[list[ExpertAtInit], int]:
    """Per-expert theta_0 measurements, read from / written to ``cache`` (one ``.pt`` file per expert and
    settings). Returns ``(measurements, number measured now)``."""
    base_state = None
    out, fresh = [], 0
    for i, e in enumerate(experts):
        f = None if cache is None else cache / f"{e.task}-{e.spec_hash}-{_measurement_key(e, cfg)}.pt"
        if f is not None and f.is_file():
            try:
                out.append(ExpertAtInit.from_record(torch.load(f, weights_only=True)))
                continue
            except Exception as exc:  # noqa: BLE001 - a stale cache file is re-measured
                log.warning("ignoring unreadable measurement cache %s: %s", f, exc)
        if base_state is None:
            base_state = read_backbone_state(base_path)
        if say:
            say(f"theta_0 measurement {i + 1}/{len(experts)}: {e.task} ({cfg.samples} samples)")
        m = measure_expert_at_init(base_state, e, label=e.task, samples=cfg.samples, seed=cfg.seed, heads=cfg.heads,
                                   hessian_iters=cfg.hessian_iters, hessian_tol=cfg.hessian_tol, noise=False,
                                   device=cfg.device)
        fresh += 1
        if f is not None:
            with open_atomic(f, "wb") as fh:  # not f.with_suffix(".tmp"): a predictable name follows planted links
                torch.save(m.to_record(), fh)
        out.append(m)
    return out, fresh


def pool_bound(inits: Sequence[ExpertAtInit], experts: Sequence[ExpertResult], name: str = "") -> BoundPool:
    """The :class:`~mergelab.analysis.bound.BoundPool` of a simple-average merge of ``experts`` *(derived)*:
    heterogeneity from the pool's own task gradients, ``L = max_i L_i``."""
    meas = pool_measurement(inits)
    return bound_pool(meas, experts, merge_coefficients("weight_average", {}, [1.0] * len(experts)), name=name)


def merged_loss(base_path: Path, experts: Sequence[ExpertResult], *, reset_bn: bool = False,
                device: str = "cpu", workdir: PathLike | None = None) -> dict[str, Any]:
    """Merge ``experts`` by simple averaging with :func:`mergelab.merging.merge` (a real merge, into a temporary
    folder) and evaluate it on their tasks' test splits. Returns the mean loss and the per-task rows."""
    spec = {"method": "weight_average", "base": str(base_path), "models": [str(e.path) for e in experts],
            "device": device if device in ("cpu", "cuda") else "cpu"}
    with tempfile.TemporaryDirectory(prefix="mergelab-calib-", dir=workdir) as tmp:
        out = Path(tmp) / "merged"
        merge(spec, out, progress=False, hash_inputs=False)
        r = evaluate(out, list(experts), reset_bn=reset_bn, device=device)
    rows = [row.model_dump() for row in r.tasks]
    return {
        "loss": float(np.mean([row["loss"] for row in rows])),
        "accuracy": float(r.mean_accuracy),
        "normalized_accuracy": r.mean_normalized_accuracy,
        "joint_loss": r.joint.loss,
        "tasks": rows,
    }


# ---------------------------------------------------------------------------------------------- the study
@dataclass
class PoolRecord:
    """One pool of the study: members, the bound's features and the measured merge."""

    index: int
    members: tuple[str, ...]
    size: int
    opt: float
    gen: float
    raw_bound: float
    all_valid: bool
    measured_loss: float
    measured_accuracy: float
    measured_normalized_accuracy: float | None
    split: str = "train"
    predicted: float | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class StudyResult:
    config: StudyConfig
    experts: list[str]
    pools: list[PoolRecord]
    calibration: CalibrationResult
    baselines: dict[str, Any]
    repeats: dict[str, Any]
    seconds: dict[str, float]
    notes: list[str]
    paths: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            "form": "derived",
            "measured": MEASURED,
            "config": asdict(self.config),
            "experts": self.experts,
            "pools": [asdict(p) for p in self.pools],
            "calibration": self.calibration.to_dict(),
            "baselines": self.baselines,
            "repeated_splits": self.repeats,
            "seconds": self.seconds,
            "notes": self.notes,
            "paths": self.paths,
        })


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def _repeated_splits(features: np.ndarray, sizes: np.ndarray, y: np.ndarray, cfg: StudyConfig) -> dict[str, Any]:
    """Held-out Spearman over ``cfg.repeats`` random splits: calibrated bound, raw bound, pool size."""
    m = len(y)
    if cfg.repeats <= 0 or m < 4:
        return {"repeats": 0}
    cal, raw, size = [], [], []
    for r in range(cfg.repeats):
        tr, te = split_indices(m, cfg.holdout, seed=cfg.seed + 1000 + r)
        try:
            c, fl = fit_constants(features[tr], y[tr], method=cfg.fit_method, floor=cfg.floor)
        except ValueError:
            continue
        cal.append(_spearman(predict_losses(features[te], c, fl), y[te]))
        raw.append(_spearman(features[te].sum(1), y[te]))
        size.append(_spearman(sizes[te], y[te]))

    def summary(v: list[float]) -> dict[str, Any]:
        a = np.asarray([x for x in v if math.isfinite(x)])
        if not len(a):
            return {"n": 0}
        q = np.percentile(a, [25, 50, 75])
        return {"n": int(len(a)), "mean": float(a.mean()), "median": float(q[1]), "q25": float(q[0]),
                "q75": float(q[2]), "fraction_positive": float((a > 0).mean())}

    return {"repeats": cfg.repeats, "n_test": int(len(split_indices(m, cfg.holdout, 0)[1])),
            "calibrated": summary(cal), "raw_bound": summary(raw), "pool_size": summary(size)}


def run_study(cfg: StudyConfig, out: PathLike, *, cache_dir: PathLike | None = None, progress: bool = False
              ) -> StudyResult:
    """Run the calibration study of the module docstring and write its files into ``out``."""
    def say(msg: str) -> None:
        if progress:
            print(f"  {msg}", file=sys.stderr, flush=True)
        log.info(msg)

    out = Path(out)
    seconds: dict[str, float] = {}
    base_path, experts, notes = discover_experts(cfg.arch, cache_dir, cfg.tasks)
    # the study writes files (and merged models, each refusing its inputs) into out: never into an input
    refuse_overlap(out, [base_path, *(e.path for e in experts)], what="--out", replaces=False)
    out.mkdir(parents=True, exist_ok=True)
    if len(experts) < max(2, cfg.min_size):
        raise SpecError(f"found {len(experts)} cached {cfg.arch} expert(s) fine-tuned from the current pretrained "
                        f"backbone; the study needs at least {max(2, cfg.min_size)}")
    pools = draw_pools(len(experts), cfg.pools, cfg.min_size, cfg.max_size, cfg.seed)
    if len(pools) < cfg.pools:
        notes.append(f"only {len(pools)} distinct pools of size {cfg.min_size}..{cfg.max_size} exist among "
                     f"{len(experts)} experts; using all of them")
    if len(pools) < 3:
        raise SpecError(f"only {len(pools)} distinct pools exist: at least 3 are needed (2 to fit, 1 held out)")
    if cfg.max_size > len(experts):
        notes.append(f"pool sizes capped at the {len(experts)} available experts")
    used = sorted({i for p in pools for i in p})
    t0 = time.perf_counter()
    measured_list, fresh = expert_measurements(base_path, [experts[i] for i in used], cfg, out / "measurements", say)
    inits = dict(zip(used, measured_list))
    seconds["theta0_measurements"] = time.perf_counter() - t0
    notes.append(f"theta_0 measurements: {fresh} measured now, {len(used) - fresh} from {out / 'measurements'}")

    t0 = time.perf_counter()
    bpools, records = [], []
    for j, p in enumerate(pools):
        members = [experts[i] for i in p]
        names = tuple(e.task for e in members)
        say(f"pool {j + 1}/{len(pools)} (N={len(p)}): merge + evaluate {', '.join(names)}")
        t1 = time.perf_counter()
        bp = pool_bound([inits[i] for i in p], members, name=f"pool{j}")
        meas = merged_loss(base_path, members, reset_bn=cfg.reset_bn, device=cfg.device, workdir=out)
        bpools.append(bp)
        records.append(PoolRecord(j, names, len(p), 0.0, 0.0, 0.0, True, meas["loss"], meas["accuracy"],
                                  meas["normalized_accuracy"], tasks=meas["tasks"], seconds=time.perf_counter() - t1))
    seconds["merges"] = time.perf_counter() - t0
    feats = bound_features(bpools)

    for rec, bp, f in zip(records, bpools, feats):
        rec.opt, rec.gen, rec.raw_bound = float(f[0]), float(f[1]), float(f.sum())
        rec.all_valid = evaluate_bound(bp).all_valid
    y = np.array([r.measured_loss for r in records])
    sizes = np.array([r.size for r in records], dtype=float)
    tr, te = split_indices(len(records), cfg.holdout, seed=cfg.seed)
    result = calibrate([bpools[i] for i in tr], y[tr], [bpools[i] for i in te], y[te],
                       method=cfg.fit_method, floor=cfg.floor)

    pred_all = predict_losses(feats, result.constants, result.floor)
    for k, rec in enumerate(records):
        rec.split = "test" if k in set(te.tolist()) else "train"
        rec.predicted = float(pred_all[k])
    baselines = {
        "test": {
            "calibrated_bound": result.test_spearman,
            "raw_bound": result.test_spearman_raw,
            "pool_size_N": _spearman(sizes[te], y[te]),
            "opt_term": _spearman(feats[te, 0], y[te]),
            "gen_term": _spearman(feats[te, 1], y[te]),
        },
        "all_pools": {
            "raw_bound": _spearman(feats.sum(1), y),
            "calibrated_bound": _spearman(pred_all, y),
            "pool_size_N": _spearman(sizes, y),
            "opt_term": _spearman(feats[:, 0], y),
            "gen_term": _spearman(feats[:, 1], y),
        },
        "note": "Spearman rank correlation with the measured merged loss; 'test' on the held-out pools only",
    }
    by_size: dict[int, list[int]] = {}
    for k, s in enumerate(sizes.astype(int)):
        by_size.setdefault(int(s), []).append(k)
    within = {str(s): _spearman(feats[idx].sum(1), y[idx]) for s, idx in sorted(by_size.items()) if len(idx) >= 3}
    baselines["within_size_raw_bound"] = within
    baselines["within_size_pools"] = {str(s): len(idx) for s, idx in sorted(by_size.items()) if len(idx) >= 3}
    baselines["pool_size_dependence"] = {"raw_bound_vs_N": _spearman(feats.sum(1), sizes),
                                         "measured_loss_vs_N": _spearman(sizes, y)}
    repeats = _repeated_splits(feats, sizes, y, cfg)
    res = StudyResult(cfg, [str(e.path) for e in experts], records, result, baselines, repeats, seconds, notes)
    write_study(res, out)
    return res


# -------------------------------------------------------------------------------------------------- outputs
def constants_payload(res: StudyResult) -> dict[str, Any]:
    """The ``constants.json`` content (format :data:`mergelab.analysis.bound_constants.CONSTANTS_FORMAT`)."""
    c = res.calibration
    return to_jsonable({
        "format": CONSTANTS_FORMAT,
        "form": "derived",
        "c_opt": c.constants.c_opt,
        "c_stab": c.constants.c_stab,
        "floor": c.floor,
        "method": c.method,
        "arch": res.config.arch,
        "n_pools": len(res.pools),
        "n_train": c.n_train,
        "n_test": c.n_test,
        "test_spearman": c.test_spearman,
        "test_spearman_raw": c.test_spearman_raw,
        "measured": MEASURED,
        "merge_rule": "simple average (alpha_i = 1/N)",
        "settings": {k: v for k, v in asdict(res.config).items() if k not in ("device",)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "(derived) scale constants of bound = c_opt * opt + c_stab * gen, fitted to measured merged losses",
    })


def write_study(res: StudyResult, out: Path) -> None:
    """``constants.json``, ``calibration.json``, ``calibration.md`` and ``calibration.png`` into ``out``."""
    paths = {name: str(out / name) for name in ("constants.json", "calibration.json", "calibration.md",
                                                 "calibration.png")}
    res.paths = paths
    write_text_atomic(out / "constants.json", json.dumps(constants_payload(res), indent=2, allow_nan=False) + "\n")
    try:
        # deferred: matplotlib (a heavy load) only when a figure is drawn
        import matplotlib

        matplotlib.use("Agg", force=False)
        fig = plot_study(res)
        with open_atomic(out / "calibration.png", "wb") as fh:
            fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the numbers
        log.warning("calibration.png could not be drawn: %s: %s", type(exc).__name__, exc)
        paths.pop("calibration.png")
    write_text_atomic(out / "calibration.json", json.dumps(res.to_dict(), indent=2, allow_nan=False) + "\n")
    write_text_atomic(out / "calibration.md", study_markdown(res))


def plot_study(res: StudyResult) -> MplFigure:
    # deferred: matplotlib (a heavy load) only when a figure is drawn
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(10, 4))
    ax0, ax1 = fig.subplots(1, 2)
    for split, marker in (("train", "o"), ("test", "^")):
        ps = [p for p in res.pools if p.split == split]
        if not ps:
            continue
        sc = ax0.scatter([p.predicted for p in ps], [p.measured_loss for p in ps], c=[p.size for p in ps],
                         marker=marker, cmap="viridis", vmin=res.config.min_size, vmax=max(p.size for p in res.pools),
                         s=40, edgecolors="k", label=f"{split} ({len(ps)})")
        ax1.scatter([p.raw_bound for p in ps], [p.measured_loss for p in ps], c=[p.size for p in ps],
                    marker=marker, cmap="viridis", vmin=res.config.min_size, vmax=max(p.size for p in res.pools),
                    s=40, edgecolors="k")
    lo = min(min(p.predicted or 0 for p in res.pools), min(p.measured_loss for p in res.pools))
    hi = max(max(p.predicted or 0 for p in res.pools), max(p.measured_loss for p in res.pools))
    ax0.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    c = res.calibration
    rho = "n/a" if c.test_spearman is None or not math.isfinite(c.test_spearman) else f"{c.test_spearman:.2f}"
    ax0.set_xlabel("calibrated bound c_opt opt + c_stab gen" + (" + floor" if c.floor else ""))
    ax0.set_ylabel("measured merged loss (mean test CE)")
    ax0.set_title(f"(derived) calibrated: held-out Spearman {rho}", fontsize=9)
    ax0.legend(fontsize=7)
    ax1.set_xscale("log")
    # deferred: matplotlib (a heavy load) only when a figure is drawn
    from matplotlib.ticker import NullFormatter

    ax1.xaxis.set_minor_formatter(NullFormatter())
    ax1.set_xlabel("raw bound (unit constants)")
    ax1.set_title("uncalibrated bound vs measured", fontsize=9)
    fig.colorbar(sc, ax=[ax0, ax1], label="pool size N")
    return fig


def _f(x: Any, d: int = 3) -> str:
    return fmt(x, d)


def study_markdown(res: StudyResult) -> str:
    c = res.calibration
    b = res.baselines
    rep = res.repeats
    cfg = res.config
    lines = [
        f"# Calibration of the (derived) stability bound on {cfg.arch}",
        "",
        f"{len(res.pools)} pools of {cfg.min_size}..{cfg.max_size} experts drawn from {len(res.experts)} cached experts "
        f"(seed {cfg.seed}); measured: {MEASURED}. Features: the bound's terms (opt, gen) at unit constants from theta_0 "
        f"measurements ({cfg.samples} training samples per task, {cfg.hessian_iters} power iterations, heads "
        f"'{cfg.heads}'). Fit: {c.method}{' with a floor' if cfg.floor else ''} on {c.n_train} pools, {c.n_test} held out.",
        "",
        "**(derived)**: the bound is our derivation from the framework's stated dependencies (THEORY.md section 1); "
        "these constants make its scale match measurement and the Spearman says whether it orders merges correctly.",
        "",
        "## Constants",
        "",
        markdown_table(["c_opt", "c_stab", "floor", "train RMSE", "train mean rel. error", "train Spearman"],
                       [[c.constants.c_opt, c.constants.c_stab, c.floor, c.train_rmse, c.train_mean_rel_error,
                         c.train_spearman]]),
        "",
        "## Held-out ranking (Spearman with the measured loss)",
        "",
        markdown_table(["predictor", f"held-out ({c.n_test} pools)", f"all {len(res.pools)} pools"], [
            ["calibrated bound", b["test"]["calibrated_bound"], b["all_pools"]["calibrated_bound"]],
            ["uncalibrated bound (baseline)", b["test"]["raw_bound"], b["all_pools"]["raw_bound"]],
            ["pool size N alone (baseline)", b["test"]["pool_size_N"], b["all_pools"]["pool_size_N"]],
            ["opt term alone", b["test"]["opt_term"], b["all_pools"]["opt_term"]],
            ["gen term alone", b["test"]["gen_term"], b["all_pools"]["gen_term"]],
        ]),
        "",
    ]
    if rep.get("repeats"):
        rows = [[name, s.get("n"), s.get("mean"), s.get("q25"), s.get("median"), s.get("q75"),
                 s.get("fraction_positive")] for name, s in (("calibrated bound", rep["calibrated"]),
                                                             ("uncalibrated bound", rep["raw_bound"]),
                                                             ("pool size N", rep["pool_size"]))]
        lines += [f"Over {rep['repeats']} further random splits ({rep['n_test']} held out each), held-out Spearman:", "",
                  markdown_table(["predictor", "splits", "mean", "q25", "median", "q75", "fraction > 0"], rows), ""]
    if b.get("within_size_raw_bound"):
        counts = b.get("within_size_pools", {})
        lines += ["Within a pool size (does the bound order pools of equal N?), Spearman of the raw bound with the "
                  "measured loss: " + ", ".join(f"N={k} ({counts.get(k, '?')} pools): {_f(v)}"
                                                for k, v in b["within_size_raw_bound"].items()), ""]
    dep = b.get("pool_size_dependence", {})
    if dep:
        rb, ml = dep.get("raw_bound_vs_N"), dep.get("measured_loss_vs_N")
        lines += [f"Dependence on the pool size over all pools: Spearman(raw bound, N) = {_f(rb)}, "
                  f"Spearman(measured loss, N) = {_f(ml)}."]
        if rb is not None and ml is not None and math.isfinite(rb) and math.isfinite(ml) and rb * ml < 0:
            lines += ["**The bound and the measured loss move in opposite directions with N**: for a simple "
                      "average alpha_i = 1/N, so eps^2 = sum_i p_i alpha_i^2 eps_i^2 and the minibatch-noise term "
                      "L sum_i a_i^2 (...) shrink with N (alpha_i^2 = 1/N^2 per expert), and chi^2(alpha||w) = 0 "
                      "when the experts share eta and K, "
                      "which removes the one term where heterogeneity enters the optimisation error."]
        lines.append("")
    rows = [[p.index, p.split, p.size, ", ".join(p.members), p.opt, p.gen, p.predicted, p.measured_loss,
             p.measured_accuracy, "yes" if p.all_valid else "no"] for p in res.pools]
    lines += [
        "## Pools",
        "",
        markdown_table(["#", "split", "N", "tasks", "opt", "gen", "calibrated bound", "measured loss",
                        "mean accuracy", "eta<=1/(LK) all"], rows),
        "",
        "![predicted vs measured](calibration.png)",
        "",
    ]
    if res.notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in res.notes] + [""]
    lines.append(f"Time: {', '.join(f'{k} {v:.1f} s' for k, v in res.seconds.items())}.")
    return "\n".join(lines) + "\n"


def format_summary(res: StudyResult) -> str:
    c = res.calibration
    b = res.baselines["test"]
    lines = [
        f"(derived) calibrated on {c.n_train} pools, {c.n_test} held out ({len(res.pools)} pools, "
        f"{len(res.experts)} experts): c_opt = {_f(c.constants.c_opt, 4)}, c_stab = {_f(c.constants.c_stab, 4)}"
        + (f", floor = {_f(c.floor, 4)}" if c.floor else ""),
        f"held-out Spearman: calibrated {_f(b['calibrated_bound'])}, uncalibrated {_f(b['raw_bound'])}, "
        f"pool size N {_f(b['pool_size_N'])}",
    ]
    rep = res.repeats
    if rep.get("repeats"):
        lines.append(f"over {rep['repeats']} random splits: calibrated mean {_f(rep['calibrated'].get('mean'))}, "
                     f"uncalibrated {_f(rep['raw_bound'].get('mean'))}, N alone {_f(rep['pool_size'].get('mean'))}")
    lines.append(f"wrote {', '.join(Path(p).name for p in res.paths.values())} into {Path(next(iter(res.paths.values()))).parent}")
    return "\n".join(lines)


__all__ = [
    "MEASURED",
    "PoolRecord",
    "StudyConfig",
    "StudyResult",
    "constants_payload",
    "discover_experts",
    "draw_pools",
    "expert_measurements",
    "merged_loss",
    "parse_size_range",
    "pool_bound",
    "run_study",
    "study_markdown",
    "write_study",
]
