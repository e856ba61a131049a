"""The data-dependent analysis of a pool (``mergelab analyze`` with a ``data:`` section).

When the models of a merge spec are mergelab zoo expert folders (``expert.json`` sidecar, backbone and head)
and the base is the pretrained backbone theta_0 they were fine-tuned from, a little labelled data per task
lets the mergeability report go beyond the data-free diagnostics:

1. **Theory quantities at theta_0** (:func:`measure_expert_at_init`, one expert at a time): for expert ``i``,
   on ``samples_per_task`` seeded samples of its own *training* subset ``S_i`` (the ``data_ratio`` subset its
   sidecar's spec names): ``F_{S_i}(theta_0)``, the per-sample gradient variance ``sigma_i^2 = tr(Sigma_i)``
   and the mean gradient ``grad F_i`` over the backbone parameters, and ``L_i`` (power iteration on
   Hessian-vector products, few iterations by default). Each task is seen the way its fine-tuning started:
   the backbone's BatchNorm statistics are re-estimated on the task's training images and the loss goes
   through the **initial head** recomputed exactly as fine-tuning computed it (``heads="init"``: the linear
   probe of LP-FT, or the seeded zero/random head), or through the expert's final head (``heads="expert"``).
   Pool quantities follow: ``L = max_i L_i``, ``delta_i^2 = ||grad F_i - grad F||^2`` with
   ``F = sum_i (n_i/n) F_i`` and ``n_i`` the expert's training-set size from its sidecar. The effective noise
   scale is reported from the sidecar (``eta / (B (1 - beta))``) and measured
   (``T = eta / (B (1 - beta)) * tr(Sigma)``, ``tr(Sigma)`` over all trained parameters at theta_0).
2. **The stability bound** *(derived)* of :mod:`mergelab.analysis.bound` for this pool and the spec's merge
   coefficients (:func:`merge_coefficients`), with ``chi^2(alpha || w)`` and each expert's validity flag
   ``eta_i L K_i <= 1``; calibrated constants come from a JSON file written by ``mergelab calibrate``
   (:func:`load_constants`), else ``c_opt = c_stab = 1`` (the raw derived bound, a scale-free ranking score).
3. **Predicted trends** *(derived)* along K, eta, b, n (data ratio) and N, and a merge-friendly setting for the
   next expert (:func:`mergelab.analysis.bound_predictions.predict_trends`, :func:`~mergelab.analysis.bound_predictions.recommend`).
4. **Landscape**: loss and accuracy along the linear interpolation between the first two experts (barrier,
   midpoint gain, per task) and along the task-arithmetic path ``theta_0 + a sum_i tau_i`` of the whole pool,
   on ``samples_per_task`` seeded samples of each task's evaluation split (default test), each task through
   its expert's head.
5. **Linear CKA** of penultimate features between every expert and the task-arithmetic merge (and theta_0) on
   one fixed batch (the evaluation samples of all analysed tasks).

Everything runs on small samples by default (100 per task, 10 power iterations) so that 4 resnet_s experts
take well under a minute of compute; the options make each piece bigger. Computation
(:func:`analyze_pool_data`, here) and presentation (:func:`mergelab.analysis.pool_report.add_data_sections`)
are separate; the pieces: :mod:`~mergelab.analysis.pool_experts` (which experts, their data),
:mod:`~mergelab.analysis.theory_at_init` (item 1), :mod:`~mergelab.analysis.merge_coefficients` and
:mod:`~mergelab.analysis.bound_constants` (item 2), :mod:`~mergelab.analysis.pool_report` and
:mod:`~mergelab.analysis.pool_report_plots` (the report's sections).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from mergelab.analysis.bound import evaluate_bound
from mergelab.analysis.bound_constants import LoadedConstants
from mergelab.analysis.bound_predictions import predict_trends, recommend
from mergelab.analysis.cka import features, linear_cka
from mergelab.analysis.landscape import EvalTask, linear_interpolation, task_arithmetic_path, task_arithmetic_state
from mergelab.analysis.merge_coefficients import MergeCoefficients, bound_pool, merge_coefficients
from mergelab.analysis.pool_experts import PoolExperts, resolve_pool, task_samples
from mergelab.analysis.theory_at_init import ExpertAtInit, measure_expert_at_init, pool_measurement
from mergelab.errors import SpecError
from mergelab.evaluation.bn import reset_bn_statistics
from mergelab.models import build_backbone, load_backbone_state, load_head, read_backbone_state

if TYPE_CHECKING:  # pragma: no cover
    from mergelab.analysis.bound import BoundPool, BoundReport
    from mergelab.analysis.bound_predictions import BoundTrend, MergeRecommendation
    from mergelab.analysis.estimators import PoolMeasurement
    from mergelab.analysis.landscape import PathResult
    from mergelab.spec import DataSpec, MergeSpec

log = logging.getLogger(__name__)


BNMode = Literal["interpolate", "reset"]


@dataclass(frozen=True)
class DataAnalysisOptions:
    """Sizes and switches of the data-dependent analysis (see the module docstring).

    ``samples_per_task``/``seed`` come from the spec's ``data:`` section unless overridden; ``eval_split`` is
    the split of the landscape and CKA samples (theory quantities always use the training split, they are
    ``F_S`` quantities). ``hessian_iters = 0`` skips the smoothness estimate (then ``L`` cannot be formed and
    the bound is not evaluated). ``bn`` is the BatchNorm mode of the landscape paths
    (:mod:`mergelab.analysis.landscape`): ``"interpolate"`` is what a plain weight-space merge does.
    """

    samples_per_task: int = 100
    eval_split: Literal["train", "test"] = "test"
    seed: int = 0
    batch_size: int = 64
    hessian_iters: int = 10
    hessian_tol: float = 1e-2
    heads: Literal["init", "expert"] = "init"
    grid: int = 11
    bn: BNMode = "interpolate"
    landscape: bool = True
    cka: bool = True
    noise: bool = True
    device: str | None = None

    def __post_init__(self) -> None:
        if self.samples_per_task < 2:
            raise SpecError(f"samples per task must be >= 2, got {self.samples_per_task}")
        if self.hessian_iters < 0:
            raise SpecError(f"hessian iterations must be >= 0, got {self.hessian_iters}")
        if self.grid < 3:
            raise SpecError(f"the interpolation grid needs >= 3 points, got {self.grid}")
        if self.heads not in ("init", "expert"):
            raise SpecError(f"heads must be 'init' or 'expert', got {self.heads!r}")
        if self.bn not in ("interpolate", "reset"):
            raise SpecError(f"bn must be 'interpolate' or 'reset', got {self.bn!r}")


def _progress(enabled: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if enabled:
            print(f"  {msg}", file=sys.stderr, flush=True)
        log.info(msg)

    return say


@dataclass
class PoolDataAnalysis:
    """Everything the data-dependent sections show (see :func:`analyze_pool_data`)."""

    pool: PoolExperts
    options: DataAnalysisOptions
    inits: list[ExpertAtInit]
    measurement: PoolMeasurement
    coefficients: MergeCoefficients
    constants: LoadedConstants
    bound_pool: BoundPool | None
    bound: BoundReport | None
    trends: dict[str, BoundTrend]
    recommendation: MergeRecommendation | None
    interpolation: PathResult | None = None
    interpolation_endpoints: tuple[str, str] | None = None
    ta_path: PathResult | None = None
    ta_lambda: float | None = None
    cka: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def predicted_loss(self) -> float | None:
        """Calibrated bound + floor (a loss prediction) when the constants are calibrated, else ``None``."""
        if self.bound is None or not self.constants.calibrated:
            return None
        return self.bound.bound + self.constants.floor


def _module_with(arch: str, state: Mapping[str, torch.Tensor], source: str) -> torch.nn.Module:
    m = build_backbone(arch)
    load_backbone_state(m, state, source=source)
    return m.eval()


def analyze_pool_data(
    spec: MergeSpec,
    data: DataSpec,
    options: DataAnalysisOptions | None = None,
    *,
    constants: LoadedConstants | None = None,
    pool: PoolExperts | None = None,
    source: str = "spec",
    progress: bool = False,
) -> PoolDataAnalysis:
    """Run the data-dependent analyses of the module docstring for a merge spec whose models are experts."""
    opts = options or DataAnalysisOptions()
    consts = constants or LoadedConstants()
    say = _progress(progress)
    pool = pool or resolve_pool(spec, data, source=source)
    seconds: dict[str, float] = {}
    warnings = list(pool.warnings)

    t0 = time.perf_counter()
    base_state = read_backbone_state(pool.base_path)
    inits = []
    for i, (e, label) in enumerate(zip(pool.experts, pool.labels)):
        say(f"theta_0 quantities {i + 1}/{len(pool.experts)}: {label} ({opts.samples_per_task} samples)")
        inits.append(measure_expert_at_init(
            base_state, e, label=label, samples=opts.samples_per_task, seed=opts.seed, heads=opts.heads,
            hessian_iters=opts.hessian_iters, hessian_tol=opts.hessian_tol, chunk_size=opts.batch_size,
            noise=opts.noise, device=opts.device,
        ))
    settings = {"samples_per_task": opts.samples_per_task, "split": "train", "seed": opts.seed,
                "heads": opts.heads, "hessian_iters": opts.hessian_iters, "hessian_tol": opts.hessian_tol,
                "bn": "re-estimated on each task's training subset (as fine-tuning does)", "mode": "eval",
                "params": "backbone", "sigma2_normalisation": "1/n (population)"}
    measurement = pool_measurement(inits, settings)
    seconds["theory"] = time.perf_counter() - t0
    unconverged = [i.label for i in inits if i.measured.smoothness is not None and not i.measured.smoothness.converged]
    if unconverged:
        warnings.append(f"power iteration did not converge for {unconverged} in {opts.hessian_iters} iterations: "
                        "L is a rough estimate (raise --hessian-iters)")

    coeffs = merge_coefficients(spec.method, spec.parameters, pool.weights)
    t0 = time.perf_counter()
    bpool = bound = rec = None
    trends: dict[str, BoundTrend] = {}
    if opts.hessian_iters > 0:
        bpool = bound_pool(measurement, pool.experts, coeffs, name=source)
        bound = evaluate_bound(bpool, consts.constants)
        trends = predict_trends(bpool, constants=consts.constants, seed=opts.seed)
        rec = recommend(bpool, constants=consts.constants)
        if not bound.all_valid:
            bad = [e["name"] for e in bound.experts if not e["valid"]]
            warnings.append(f"(derived bound) {len(bad)} of {len(bound.experts)} experts violate eta <= 1/(L K) "
                            f"({', '.join(bad)}): the bound is extrapolated outside its step-size condition")
    else:
        warnings.append("smoothness not measured (--hessian-iters 0): the bound, trends and recommendation are skipped")
    seconds["bound"] = time.perf_counter() - t0

    analysis = PoolDataAnalysis(pool, opts, inits, measurement, coeffs, consts, bpool, bound, trends, rec,
                                seconds=seconds, warnings=warnings)
    if not (opts.landscape or opts.cka):
        return analysis

    # ---- landscape and CKA: evaluation samples of each analysed task through its expert's head
    t0 = time.perf_counter()

    dev = None if opts.device is None else torch.device(opts.device)
    heads = {t: load_head(pool.head_for(t), None).eval() for t in dict.fromkeys(pool.tasks + [e.task for e in pool.experts])}
    samples = {t: task_samples(t, opts.eval_split, opts.samples_per_task, opts.seed) for t in heads}
    bn_data = {t: task_samples(t, "train", max(opts.samples_per_task, 128), opts.seed + 1)[0] for t in heads} \
        if opts.bn == "reset" else {}

    def eval_task(t: str) -> EvalTask:
        return EvalTask(name=t, data=samples[t], head=heads[t], bn_data=bn_data.get(t), batch_size=256)

    expert_states = [read_backbone_state(e.backbone_path) for e in pool.experts]
    base_module = _module_with(pool.arch, base_state, str(pool.base_path))
    if opts.landscape:
        grid = np.linspace(0.0, 1.0, opts.grid)
        if not np.any(np.isclose(grid, 0.5)):
            grid = np.sort(np.append(grid, 0.5))
        a_mod = _module_with(pool.arch, expert_states[0], str(pool.experts[0].backbone_path))
        ends = (pool.labels[0], pool.labels[1])
        interp_tasks = (list(dict.fromkeys([pool.experts[0].task, pool.experts[1].task]))
                        if data.tasks is None else list(pool.tasks))
        say(f"interpolation {ends[0]} -> {ends[1]} on {', '.join(interp_tasks)} ({len(grid)} points, BN {opts.bn})")
        analysis.interpolation = linear_interpolation(a_mod, expert_states[1], [eval_task(t) for t in interp_tasks],
                                                      grid, bn=opts.bn, device=dev)
        analysis.interpolation_endpoints = ends
        n = len(pool.experts)
        ta_grid = np.unique(np.round(np.concatenate([np.linspace(0.0, 1.0, opts.grid), [1.0 / n]]), 12))
        say(f"task-arithmetic path over {n} experts on {', '.join(pool.tasks)} ({len(ta_grid)} points)")
        analysis.ta_path = task_arithmetic_path(base_module, expert_states, [eval_task(t) for t in pool.tasks],
                                                ta_grid, bn=opts.bn, device=dev)
    seconds["landscape"] = time.perf_counter() - t0
    if opts.cka:
        t0 = time.perf_counter()
        say("linear CKA against the task-arithmetic merge")
        analysis.cka, analysis.ta_lambda = _cka(pool, base_module, base_state, expert_states, samples, spec, opts)
        seconds["cka"] = time.perf_counter() - t0
        if not analysis.cka["merge_features_finite"]:
            warnings.append("the task-arithmetic merge's features are not finite (negative combined BN variances): "
                            "CKA with the merge is n/a; try --bn reset")
    bad = nonfinite_points(analysis)
    if bad:
        warnings.append(f"non-finite losses along the landscape paths at {'; '.join(bad)} (see the landscape section)")
    return analysis


def _cka(pool: PoolExperts, base_module: torch.nn.Module, base_state: Mapping[str, torch.Tensor],
         expert_states: Sequence[Mapping[str, torch.Tensor]], samples: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
         spec: MergeSpec, opts: DataAnalysisOptions) -> tuple[dict[str, Any], float]:
    """Linear CKA of penultimate features on one fixed batch: every expert vs the TA merge and vs theta_0."""
    n = len(expert_states)
    lam = None
    if "lambda" in spec.parameters or "lambda_" in spec.parameters:
        try:
            lam = float(spec.parameters.get("lambda", spec.parameters.get("lambda_")))
        except (TypeError, ValueError):
            lam = None
    lam_source = "the spec's lambda"
    if lam is None:
        lam, lam_source = 1.0 / n, "1/N (the simple average; the spec sets no lambda)"
    merged = _module_with(pool.arch, task_arithmetic_state(base_state, expert_states, lam), "task-arithmetic merge")
    x = torch.cat([samples[t][0] for t in pool.tasks])
    dev = opts.device
    if dev is not None:
        merged.to(dev)
        base_module = base_module.to(dev)
    if opts.bn == "reset":
        x_train = torch.cat([task_samples(t, "train", max(opts.samples_per_task, 128), opts.seed + 1)[0]
                             for t in pool.tasks])
        reset_bn_statistics(merged, x_train, seed=opts.seed)
    f_merged = features(merged, x, device=dev)
    f_base = features(base_module, x, device=dev)
    finite = bool(torch.isfinite(f_merged).all())

    def cka(a: torch.Tensor, b: torch.Tensor) -> float:
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            return float("nan")
        return linear_cka(a, b)

    rows = []
    for label, e, st in zip(pool.labels, pool.experts, expert_states):
        f_e = features(_module_with(pool.arch, st, str(e.backbone_path)), x, device=dev)
        rows.append({"expert": label, "task": e.task, "cka_merge": cka(f_e, f_merged), "cka_base": cka(f_e, f_base)})
    return {
        "merge_features_finite": finite,
        "bn": opts.bn,
        "lambda": lam, "lambda_source": lam_source, "merge": f"theta_0 + {lam:.4g} * sum_i tau_i",
        "batch": {"tasks": list(pool.tasks), "per_task": int(len(x) // max(len(pool.tasks), 1)), "n": int(len(x)),
                  "split": opts.eval_split, "seed": opts.seed},
        "experts": rows, "cka_merge_base": linear_cka(f_merged, f_base),
        "features": "backbone output (penultimate), eval mode, BN running statistics as merged",
    }, lam


def nonfinite_points(a: PoolDataAnalysis) -> list[str]:
    """The interpolation / task-arithmetic path points where some task's loss is not finite, as text."""
    out = []
    for kind, path in (("interpolation", a.interpolation), ("task-arithmetic", a.ta_path)):
        if path is None:
            continue
        alphas = sorted({al for c in path.curves.values() for al, v in zip(c.alphas, c.loss) if not math.isfinite(v)})
        if alphas:
            out.append(f"{kind} a = {', '.join(f'{al:g}' for al in alphas)}")
    return out
