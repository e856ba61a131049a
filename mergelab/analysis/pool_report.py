"""The data-dependent sections of the mergeability report (``mergelab analyze`` with a ``data:`` section).

When the models of a merge spec are mergelab zoo expert folders (``expert.json`` sidecar, backbone and head)
and the base is the pretrained backbone theta_0 they were fine-tuned from, a little labelled data per task
lets the report go beyond the data-free diagnostics:

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
   next expert (:func:`mergelab.analysis.bound.predict_trends`, :func:`~mergelab.analysis.bound.recommend`).
4. **Landscape**: loss and accuracy along the linear interpolation between the first two experts (barrier,
   midpoint gain, per task) and along the task-arithmetic path ``theta_0 + a sum_i tau_i`` of the whole pool,
   on ``samples_per_task`` seeded samples of each task's evaluation split (default test), each task through
   its expert's head.
5. **Linear CKA** of penultimate features between every expert and the task-arithmetic merge (and theta_0) on
   one fixed batch (the evaluation samples of all analysed tasks).

Everything runs on small samples by default (100 per task, 10 power iterations) so that 4 resnet_s experts
take well under a minute of compute; the options make each piece bigger. Computation
(:func:`analyze_pool_data`) and presentation (:func:`add_data_sections`) are separate.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from mergelab.errors import MergeLabError, SpecError
from mergelab.methods.catalog import METHODS
from mergelab.report.figure_text import literal
from mergelab.untrusted_input import read_json_file

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure as MplFigure

    from mergelab.analysis.bound import BoundPool, BoundReport, BoundTrend, MergeRecommendation
    from mergelab.analysis.estimators import NoiseScaleReport, PoolMeasurement, PowerIterationResult
    from mergelab.analysis.landscape import PathResult
    from mergelab.report.folder import Report
    from mergelab.spec import DataSpec, MergeSpec
    from mergelab.training.result import ExpertResult

log = logging.getLogger(__name__)

#: ``format`` field of a constants file written by ``mergelab calibrate`` and read by ``analyze --constants``.
CONSTANTS_FORMAT = "mergelab-bound-constants/1"

#: Section keys this module adds to a report, in order.
SECTION_KEYS = ("theory", "bound", "trends", "landscape", "cka")


#: What THEORY.md section 1 says each hyperparameter does to mergeability (to compare with the bound's shape).
THEORY_EXPECTATIONS = {
    "K": "optimum K* (inverted-U in merged performance) or monotone decline",
    "eta": "large learning rates collapse the merge (stability grows as eta^2)",
    "b": "trade-off; at small eta larger b merges better",
    "n": "monotone improvement with more data (stability falls as 1/n)",
    "N": "decline: heterogeneity accumulates faster than optimisation improves",
}
_HP_LABELS = {"K": "steps K", "eta": "learning rate eta", "b": "batch size b", "n": "data size n (data ratio)",
              "N": "number of tasks N"}

BNMode = Literal["interpolate", "reset"]


# ---------------------------------------------------------------------------------------------- options
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


# ------------------------------------------------------------------------------------- the pool's experts
def expert_folder(path: str | Path) -> Path | None:
    """The expert folder ``path`` is (or whose ``backbone.safetensors`` it is), or ``None`` if it is no expert."""
    from mergelab.training.result import read_expert

    p = Path(path)
    folder = p.parent if p.is_file() else p
    try:
        return folder if read_expert(folder) is not None else None
    except Exception:  # noqa: BLE001 - an unreadable sidecar is "not an expert" here; load_expert says why later
        return None


def expert_training_data(expert: ExpertResult) -> Any:
    """The expert's training data as fine-tuning loaded it: the task, subset to ``data_ratio`` with
    ``data_seed`` (the training module's own loader)."""
    from mergelab.training import finetuning

    loader = getattr(finetuning, "load_task_data", None) or getattr(finetuning, "_load_data", None)
    if loader is not None:
        return loader(expert.spec)
    from mergelab.tasks import get_task, subset

    data = get_task(expert.task)
    return subset(data, expert.spec.data_ratio, expert.spec.data_seed) if expert.spec.data_ratio < 1.0 else data


def stale_reason(expert: ExpertResult) -> str | None:
    """Why ``expert`` no longer matches its task as the task suite builds it now (a task whose generator changed
    after the expert was trained), or ``None`` when it matches. Compares the data fingerprints the sidecar
    records when it has them, else the class count and split sizes."""
    from mergelab.tasks import get_task

    try:
        task = get_task(expert.task)
    except Exception as exc:  # noqa: BLE001 - an unknown or unbuildable task is a reason too
        return f"task {expert.task!r} cannot be loaded: {exc}"
    diffs = []
    recorded = (getattr(expert, "train_fingerprint", None), getattr(expert, "test_fingerprint", None))
    if all(recorded):
        from mergelab.training import finetuning

        fingerprints = getattr(finetuning, "fingerprints", None)
        if fingerprints is not None and tuple(fingerprints(expert_training_data(expert))) != recorded:
            diffs.append("the task's data changed since it was trained (data fingerprints differ)")
    if task.num_classes != expert.num_classes:
        diffs.append(f"its head has {expert.num_classes} classes, the task now has {task.num_classes}")
    if task.n_test != expert.n_test:
        diffs.append(f"it was tested on {expert.n_test} examples, the task's test split now has {task.n_test}")
    if expert.spec.data_ratio == 1.0 and task.n_train != expert.n_train:
        diffs.append(f"it trained on {expert.n_train} examples, the task's training split now has {task.n_train}")
    if not diffs:
        return None
    return (f"expert {expert.path} was fine-tuned on another version of task {expert.task!r} ("
            + "; ".join(diffs) + f"): rebuild it (e.g. `mergelab zoo --arch {expert.arch}`)")


def has_fingerprints(expert: ExpertResult) -> bool:
    """Whether the sidecar records the data fingerprints that prove which task data the expert saw (older
    sidecars do not; :func:`mergelab.evaluation.evaluate` refuses such experts)."""
    return bool(getattr(expert, "train_fingerprint", None) and getattr(expert, "test_fingerprint", None))


@dataclass
class PoolExperts:
    """The experts of a spec read from their folders, with display labels, merge weights and the tasks the
    landscape and CKA are evaluated on."""

    base_path: Path
    arch: str
    experts: list[ExpertResult]
    labels: list[str]
    weights: list[float]
    tasks: list[str]
    warnings: list[str] = field(default_factory=list)

    def head_for(self, task: str) -> Path:
        for e in self.experts:
            if e.task == task:
                return e.head_path
        raise SpecError(f"no expert in the pool for task '{task}'")


def resolve_pool(spec: MergeSpec, data: DataSpec, *, source: str = "spec") -> PoolExperts:
    """Read the spec's experts for the data analysis, raising :class:`SpecError` with a clear message when
    a model is not a zoo expert folder, the experts mix architectures, the base is missing, or ``data.tasks``
    names a task no expert of the pool was fine-tuned on (its head and data would be needed)."""
    from mergelab.training.result import load_expert

    if spec.base is None:
        raise SpecError(f"{source}: base: the data analysis needs the pretrained backbone theta_0 (the zoo's "
                        "pretrained folder)")
    not_experts = [str(m.path) for m in spec.models if expert_folder(m.path) is None]
    if not_experts:
        raise SpecError(
            f"{source}: models: the data analysis needs mergelab expert folders (expert.json + backbone + head, "
            f"from `mergelab finetune` / `mergelab zoo`) to know each expert's task, head and hyperparameters; "
            f"not expert folder(s): {', '.join(not_experts)}"
        )
    experts = [load_expert(expert_folder(m.path)) for m in spec.models]  # type: ignore[arg-type]
    archs = sorted({e.arch for e in experts})
    if len(archs) > 1:
        raise SpecError(f"{source}: models: experts of different architectures {archs} cannot be analysed together")
    stale = [r for r in (stale_reason(e) for e in experts) if r]
    if stale:
        raise SpecError(f"{source}: models: " + "; ".join(stale))
    unverified = [e.task for e in experts if not has_fingerprints(e)]
    own = list(dict.fromkeys(e.task for e in experts))
    tasks = list(data.tasks) if data.tasks is not None else own
    missing = [t for t in tasks if t not in own]
    if missing:
        raise SpecError(
            f"{source}: data.tasks: no expert in the pool for task(s) {', '.join(missing)} (the analysis needs "
            f"that task's expert head); the pool's tasks are: {', '.join(own)}"
        )
    warnings = []
    if unverified:
        warnings.append(f"expert(s) {unverified} record no data fingerprints (trained before they existed): their "
                        "class counts and split sizes match the current tasks, the data themselves cannot be checked")
    base = Path(spec.base)
    base_folder = base.parent if base.is_file() else base
    sidecar = base_folder / "pretrained.json"
    if sidecar.is_file():
        try:
            pid = read_json_file(sidecar, what="sidecar", error=SpecError).get("pretrained_id")
        except (OSError, MergeLabError, AttributeError):  # unreadable or not an object: no pretrained_id to check
            pid = None
        other = sorted({e.pretrained_id for e in experts if pid is not None and e.pretrained_id != pid})
        if other:
            warnings.append(f"base {base} has pretrained_id {pid} but expert(s) were fine-tuned from {other}: "
                            "theta_0 is not their starting point")
    else:
        warnings.append(f"base {base} is not a zoo pretrained folder (no pretrained.json): quantities 'at theta_0' "
                        "are measured at this base")
    branched = [e.task for e in experts if e.parent is not None]
    if branched:
        warnings.append(f"expert(s) {branched} were branched from a parent checkpoint, not fine-tuned from theta_0")
    counts: dict[str, int] = {}
    for e in experts:
        counts[e.task] = counts.get(e.task, 0) + 1
    seen: dict[str, int] = {}
    labels = []
    for e in experts:
        if counts[e.task] == 1:
            labels.append(e.task)
        else:
            seen[e.task] = seen.get(e.task, 0) + 1
            labels.append(f"{e.task}#{seen[e.task]}")
    return PoolExperts(base, archs[0], experts, labels, [m.weight for m in spec.models], tasks, warnings)


def task_samples(task: str, split: str, n: int, seed: int, data: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of ``task``'s ``split`` drawn without replacement under ``seed`` (the same draw as
    :meth:`mergelab.methods.data_informed.context.MergeContext.samples`); ``data`` is a preloaded
    :class:`~mergelab.tasks.TaskData` (e.g. an expert's training subset)."""
    if data is None:
        from mergelab.tasks import get_task

        data = get_task(task)
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    gen = torch.Generator().manual_seed(seed + sum(map(ord, task)))
    idx = torch.randperm(len(y), generator=gen)[: min(n, len(y))]
    return x[idx], y[idx]


# -------------------------------------------------------------------------------- theory at theta_0
@dataclass
class ExpertAtInit:
    """The theory quantities of one expert's task measured at theta_0 (module docstring, item 1).

    ``grad`` is ``grad F_{S_i}(theta_0)`` over the backbone parameters (float64, flat), kept for the pool's
    heterogeneity; ``n`` is the expert's training-set size ``n_i``; ``n_used`` the samples measured.
    """

    label: str
    task: str
    path: str
    spec_hash: str
    n: int
    n_used: int
    init_loss: float
    sigma2: float
    grad_norm2: float
    smoothness: PowerIterationResult | None
    grad: torch.Tensor = field(repr=False)
    noise_sidecar: NoiseScaleReport | None = None
    noise_measured: NoiseScaleReport | None = None
    heads: str = "init"
    seconds: float = 0.0

    @property
    def L(self) -> float:
        return float("nan") if self.smoothness is None else self.smoothness.spectral_norm

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (without the gradient)."""
        return {
            "label": self.label, "task": self.task, "path": self.path, "spec_hash": self.spec_hash, "n": self.n,
            "n_used": self.n_used, "init_loss": self.init_loss, "sigma2": self.sigma2,
            "grad_norm2": self.grad_norm2, "L": self.L,
            "smoothness": None if self.smoothness is None else self.smoothness.to_dict(),
            "noise_scale_sidecar": None if self.noise_sidecar is None else self.noise_sidecar.to_dict(),
            "noise_scale_measured": None if self.noise_measured is None else self.noise_measured.to_dict(),
            "heads": self.heads, "seconds": self.seconds,
        }

    def to_record(self) -> dict[str, Any]:
        """Everything, gradient included, for ``torch.save`` (a per-expert measurement cache)."""
        return {**self.to_dict(), "grad": self.grad}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> ExpertAtInit:
        from mergelab.analysis.estimators import NoiseScaleReport, PowerIterationResult

        sm = rec.get("smoothness")
        smooth = None if sm is None else PowerIterationResult(
            sm["eigenvalue"], tuple(sm["trace"]), sm["iterations"], sm["converged"], sm["residual"], sm["tol"])

        def noise(d: Mapping[str, Any] | None) -> NoiseScaleReport | None:
            return None if d is None else NoiseScaleReport(**dict(d))

        return cls(rec["label"], rec["task"], rec["path"], rec["spec_hash"], int(rec["n"]), int(rec["n_used"]),
                   float(rec["init_loss"]), float(rec["sigma2"]), float(rec["grad_norm2"]), smooth, rec["grad"],
                   noise(rec.get("noise_scale_sidecar")), noise(rec.get("noise_scale_measured")),
                   rec.get("heads", "init"), float(rec.get("seconds", 0.0)))


def initial_model(base_state: Mapping[str, torch.Tensor], expert: ExpertResult, heads: str = "init",
                  train_data: Any = None) -> tuple[torch.nn.Module, torch.nn.Linear, Any]:
    """``(backbone at theta_0 with the task's BN statistics, head, training subset)`` for ``expert``.

    ``heads="init"`` recomputes the head fine-tuning started from with the training module's own procedure
    (:func:`mergelab.training.finetuning._init_head`: BN statistics re-estimated on the training subset, then
    the linear probe; or the seeded zero/random head). ``heads="expert"`` loads the expert's final head (the BN
    statistics are re-estimated the same way).
    """
    from mergelab.evaluation.bn import reset_bn_statistics
    from mergelab.models import build_backbone, load_backbone_state, load_head
    from mergelab.training import finetuning

    data = train_data if train_data is not None else expert_training_data(expert)
    bn_batch = getattr(finetuning, "BN_ADAPT_BATCH", 128)
    bn_batches = getattr(finetuning, "BN_ADAPT_BATCHES", 20)
    backbone = build_backbone(expert.arch)
    load_backbone_state(backbone, base_state, source="base (theta_0)")
    if heads == "init":
        init_head = getattr(finetuning, "_init_head", None)
        if init_head is not None:  # the training module's own procedure, so the head is the one training used
            head = init_head(expert.spec, backbone, data.x_train, data.y_train, data.num_classes)
        else:  # pragma: no cover - the same procedure, should the private helper move
            head = _initial_head(expert.spec, backbone, data)
        if expert.spec.head_init != "probe":  # probe init already adapted BN; do it for the others too
            reset_bn_statistics(backbone, data.x_train, batch_size=bn_batch, num_batches=bn_batches)
    else:
        reset_bn_statistics(backbone, data.x_train, batch_size=bn_batch, num_batches=bn_batches)
        head = load_head(expert.head_path, backbone.feature_dim)
    return backbone.eval(), head.eval(), data


def _initial_head(spec: Any, backbone: torch.nn.Module, data: Any) -> torch.nn.Linear:
    """Fine-tuning's head initialisation (:mod:`mergelab.training.finetuning`, step 3 of its docstring)."""
    from mergelab.evaluation.bn import reset_bn_statistics
    from mergelab.models import extract_features, fit_linear_probe, make_head
    from mergelab.training.sampler import derive_seed

    if spec.head_init == "probe":
        reset_bn_statistics(backbone, data.x_train, batch_size=128, num_batches=20)
        return fit_linear_probe(extract_features(backbone, data.x_train), data.y_train, data.num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(spec.seed, 2))
        head = make_head(backbone.feature_dim, data.num_classes)
    if spec.head_init == "zero":
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    return head


def measure_expert_at_init(
    base_state: Mapping[str, torch.Tensor],
    expert: ExpertResult,
    *,
    label: str | None = None,
    samples: int = 100,
    seed: int = 0,
    heads: Literal["init", "expert"] = "init",
    hessian_iters: int = 10,
    hessian_tol: float = 1e-2,
    chunk_size: int = 64,
    noise: bool = True,
    device: str | torch.device | None = None,
) -> ExpertAtInit:
    """Measure ``F_{S_i}(theta_0)``, ``sigma_i^2``, ``grad F_i``, ``L_i`` and the noise scale of one expert.

    ``samples`` seeded samples (:func:`task_samples` with ``seed``) of the expert's training subset; gradients
    over the backbone parameters in eval mode (:func:`mergelab.analysis.estimators.measure_tasks`, with the
    BN statistics already adapted by :func:`initial_model`); ``L_i`` by ``hessian_iters`` power iterations on
    one batch of all the samples (0: skipped); the measured noise scale over all parameters (backbone and
    head) at theta_0 (:func:`~mergelab.analysis.estimators.measured_noise_scale`).
    """
    from mergelab.analysis.estimators import effective_noise_scale, measure_tasks, measured_noise_scale
    from mergelab.models import Classifier
    from mergelab.models.device import default_device

    t0 = time.perf_counter()
    dev = default_device(device)
    backbone, head, data = initial_model(base_state, expert, heads)
    backbone.to(dev)
    head.to(dev)
    x, y = task_samples(expert.task, "train", samples, seed, data)
    name = label or expert.task
    m = measure_tasks(
        backbone, [head], [(x, y)], [name], n=[expert.n_train], adapt_bn=False, max_samples=None,
        chunk_size=chunk_size, hessian=hessian_iters > 0, hessian_batch_size=len(x),
        hessian_iters=max(hessian_iters, 1), hessian_tol=hessian_tol, seed=seed,
    )
    t = m.tasks[0]
    sidecar = effective_noise_scale(expert)
    measured = None
    if noise:
        measured = measured_noise_scale(expert, Classifier(backbone, head), x, y, max_samples=None, seed=seed)
    return ExpertAtInit(
        label=name, task=expert.task, path=str(expert.path), spec_hash=expert.spec_hash, n=int(expert.n_train),
        n_used=t.n_used, init_loss=t.init_loss, sigma2=t.sigma2, grad_norm2=t.grad_norm2, smoothness=t.smoothness,
        grad=t.grad.detach().double().cpu(), noise_sidecar=sidecar, noise_measured=measured, heads=heads,
        seconds=time.perf_counter() - t0,
    )


def pool_measurement(inits: Sequence[ExpertAtInit], settings: Mapping[str, Any] | None = None) -> PoolMeasurement:
    """A :class:`~mergelab.analysis.estimators.PoolMeasurement` from per-expert measurements: heterogeneity
    ``delta_i^2`` weighted by the training-set sizes ``n_i`` and ``L = max_i L_i``."""
    from mergelab.analysis.estimators import PoolMeasurement, TaskMeasurement, gradient_heterogeneity

    if not inits:
        raise ValueError("pool_measurement needs at least one expert")
    tasks = tuple(TaskMeasurement(i.label, i.n, i.n_used, i.init_loss, i.sigma2, i.grad_norm2, i.smoothness, i.grad)
                  for i in inits)
    het = gradient_heterogeneity([i.grad for i in inits], [i.n for i in inits])
    lmax = max((i.L for i in inits if i.smoothness is not None), default=float("nan"))
    return PoolMeasurement(tasks, het, lmax, (), dict(settings or {}))


# ------------------------------------------------------------------------------------- merge coefficients
@dataclass(frozen=True)
class MergeCoefficients:
    """The coefficients ``alpha_i`` of ``tau_i`` in the spec's merge as the bound sees them, and the
    :class:`~mergelab.analysis.bound.BoundPool` rule expressing them (``mean``/``task_arithmetic`` when the
    spec's weights are equal, so that sub-pools in the N trend keep the rule's meaning)."""

    alphas: tuple[float, ...]
    rule: str
    lam: float
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge_coefficients(method: str, parameters: Mapping[str, Any], weights: Sequence[float]) -> MergeCoefficients:
    """``alpha_i`` for the spec's ``method``, ``parameters`` and model weights ``w_i``.

    * averaging (weight_average; model_stock and slerp approximately): ``alpha_i = w_i / sum_j w_j``;
    * task arithmetic, DARE-linear, breadcrumbs: ``alpha_i = lambda w_i`` (sparsification changes tau_i, not
      alpha: Corollary 1's Delta_T is in the operators section);
    * TIES, DARE-TIES (disjoint mean): ``alpha_i ~ lambda w_i / sum_j w_j`` (exact where all experts agree);
    * TSV-Merge, Iso-C, Iso-CTS (spectral): ``alpha_i ~ lambda w_i`` (their matrices are about the sum);
    * data-informed methods choose their coefficients from data: the bound is evaluated for the simple average.
    """
    w = np.asarray([float(v) for v in weights], dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise SpecError("models: the bound needs nonnegative merge weights with a positive sum")
    lam = 1.0
    try:
        from mergelab.methods import get_method

        params = get_method(method).parse_params(dict(parameters))
        lam = float(getattr(params, "lambda_", 1.0))
    except Exception:  # noqa: BLE001 - data-informed methods are not in the data-free registry
        params = None
    equal = bool(np.allclose(w, w[0]))
    # how the method combines the task vectors: a trait of the catalog (Method.combination)
    combination = METHODS[method].combination if method in METHODS else None
    if combination == "sum":
        alphas = lam * w
        note = f"{method}: alpha_i = lambda * w_i (lambda = {lam:g})"
        rule = "task_arithmetic" if equal else "weighted"
    elif combination == "spectral":
        alphas = lam * w
        note = (f"{method}: alpha_i ~ lambda * w_i (lambda = {lam:g}; on matrices the merge keeps the task "
                "matrices' singular subspaces with a re-weighted spectrum, other tensors take lambda * w_i / N)")
        rule = "task_arithmetic" if equal else "weighted"
    elif combination == "disjoint_mean":
        alphas = lam * w / w.sum()
        note = (f"{method}: alpha_i ~ lambda * w_i / sum_j w_j (lambda = {lam:g}; the disjoint mean divides by the "
                "number of agreeing experts per coordinate, so this is exact only where all agree)")
        rule = "mean" if equal and lam == 1.0 else "weighted"  # sub-pools keep sum alpha = lambda
    elif combination in ("mean", "interpolation"):
        alphas = w / w.sum()
        note = f"{method}: alpha_i = w_i / sum_j w_j" + ("" if combination == "mean" else " (approximation)")
        rule = "mean" if equal else "weighted"
    else:
        alphas = np.full(len(w), 1.0 / len(w))
        note = (f"{method}: a data-informed method chooses its coefficients from data; the bound is evaluated for "
                "the simple average alpha_i = 1/N")
        rule = "mean"
    lam_rule = float(alphas[0]) if rule == "task_arithmetic" else 1.0
    return MergeCoefficients(tuple(float(a) for a in alphas), rule, lam_rule, note)


def bound_pool(measurement: PoolMeasurement, experts: Sequence[ExpertResult], coefficients: MergeCoefficients,
               name: str = "") -> BoundPool:
    """The :class:`~mergelab.analysis.bound.BoundPool` of ``experts`` measured by ``measurement`` *(derived)*."""
    from mergelab.analysis.bound import BoundPool

    if not (measurement.smoothness > 0 and math.isfinite(measurement.smoothness)):
        raise SpecError("the bound needs the smoothness L: run with at least one Hessian power iteration")
    return BoundPool.from_measurement(measurement, experts, merge=coefficients.rule,  # type: ignore[arg-type]
                                      lam=coefficients.lam, alphas=coefficients.alphas, name=name)


# ----------------------------------------------------------------------------------------- constants
@dataclass(frozen=True)
class LoadedConstants:
    """Bound constants and where they came from (``calibrated`` False: the unit defaults)."""

    c_opt: float = 1.0
    c_stab: float = 1.0
    floor: float = 0.0
    source: str | None = None
    calibrated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def constants(self) -> Any:
        from mergelab.analysis.bound import BoundConstants

        return BoundConstants(self.c_opt, self.c_stab)

    @property
    def note(self) -> str:
        if not self.calibrated:
            return ("constants c_opt = c_stab = 1 (not calibrated): the raw derived bound, meaningful as a ranking "
                    "score between pools, not as a loss value; calibrate with `mergelab calibrate` and pass "
                    "`--constants`")
        extra = []
        for key, label in (("n_pools", "pools"), ("test_spearman", "held-out Spearman"), ("arch", "arch")):
            if self.meta.get(key) is not None:
                v = self.meta[key]
                extra.append(f"{label} {v:.3g}" if isinstance(v, float) else f"{label} {v}")
        return (f"calibrated constants from {self.source}: c_opt = {self.c_opt:.4g}, c_stab = {self.c_stab:.4g}"
                + (f", floor = {self.floor:.4g}" if self.floor else "") + (f" ({', '.join(extra)})" if extra else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"c_opt": self.c_opt, "c_stab": self.c_stab, "floor": self.floor, "source": self.source,
                "calibrated": self.calibrated, "note": self.note, "calibration": dict(self.meta)}


def load_constants(path: str | Path | None) -> LoadedConstants:
    """Constants from a JSON file written by ``mergelab calibrate`` (``c_opt``, ``c_stab`` and optionally
    ``floor`` at the top level or under ``"constants"``); ``None`` gives the unit constants."""
    if path is None:
        return LoadedConstants()
    p = Path(path)
    try:
        raw = read_json_file(p, what="constants file", error=SpecError)
    except FileNotFoundError as exc:
        raise SpecError(f"{p}: cannot read constants: {exc.strerror or exc}") from None
    if not isinstance(raw, Mapping):
        raise SpecError(f"{p}: constants file must hold a JSON object with c_opt and c_stab")
    src = raw.get("constants", raw) if isinstance(raw.get("constants"), Mapping) else raw
    values = {}
    for key in ("c_opt", "c_stab", "floor"):
        v = src.get(key, raw.get(key, 0.0 if key == "floor" else None))
        if v is None:
            raise SpecError(f"{p}: constants file has no {key!r} (expected the output of `mergelab calibrate`)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise SpecError(f"{p}: {key} must be a finite nonnegative number, got {v!r}")
        values[key] = float(v)
    if values["c_opt"] == 0 and values["c_stab"] == 0:
        raise SpecError(f"{p}: c_opt and c_stab are both 0: the calibrated bound would be constant")
    fmt_ = raw.get("format")
    if fmt_ is not None and fmt_ != CONSTANTS_FORMAT:
        log.warning("%s: format %r, expected %r; reading c_opt/c_stab anyway", p, fmt_, CONSTANTS_FORMAT)
    meta = {k: raw[k] for k in ("arch", "method", "n_pools", "n_train", "n_test", "test_spearman",
                                "test_spearman_raw", "created", "form") if k in raw}
    return LoadedConstants(values["c_opt"], values["c_stab"], values["floor"], str(p), True, meta)


# ------------------------------------------------------------------------------------------- the analysis
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
    from mergelab.models import build_backbone, load_backbone_state

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
    from mergelab.analysis.bound import evaluate_bound, predict_trends, recommend
    from mergelab.models import load_head, read_backbone_state

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
    unconverged = [i.label for i in inits if i.smoothness is not None and not i.smoothness.converged]
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
    from mergelab.analysis.landscape import EvalTask

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
        from mergelab.analysis.landscape import linear_interpolation, task_arithmetic_path

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
    bad = _nonfinite_points(analysis)
    if bad:
        warnings.append(f"non-finite losses along the landscape paths at {'; '.join(bad)} (see the landscape section)")
    return analysis


def _cka(pool: PoolExperts, base_module: torch.nn.Module, base_state: Mapping[str, torch.Tensor],
         expert_states: Sequence[Mapping[str, torch.Tensor]], samples: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
         spec: MergeSpec, opts: DataAnalysisOptions) -> tuple[dict[str, Any], float]:
    """Linear CKA of penultimate features on one fixed batch: every expert vs the TA merge and vs theta_0."""
    from mergelab.analysis.cka import features, linear_cka
    from mergelab.analysis.landscape import task_arithmetic_state

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
        from mergelab.evaluation.bn import reset_bn_statistics

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


# ------------------------------------------------------------------------------------------ presentation
def _fmt(x: Any, digits: int = 4) -> str:
    from mergelab.report.markdown import fmt

    return fmt(x, digits)


def _noise_cell(n: NoiseScaleReport | None, attr: str) -> Any:
    return None if n is None else getattr(n, attr)


def _theory_section(a: PoolDataAnalysis) -> tuple[str, dict[str, Any]]:
    from mergelab.report.markdown import markdown_table

    m = a.measurement
    rows = []
    for i, init in enumerate(a.inits):
        ns = init.noise_sidecar
        nm = init.noise_measured
        rows.append([
            init.label, init.n, init.n_used, init.init_loss, init.sigma2, float(m.heterogeneity.delta2[i]),
            init.grad_norm2, init.L,
            "n/a" if init.smoothness is None else f"{init.smoothness.iterations}{'' if init.smoothness.converged else ' (not conv.)'}",
            _noise_cell(ns, "proxy"), _noise_cell(nm, "trace_sigma"), _noise_cell(nm, "T"),
        ])
    o = a.options
    body = [
        "Measured at theta_0 (the base) on each expert's own **training** subset, "
        f"{o.samples_per_task} seeded samples per task (seed {o.seed}); gradients over the backbone parameters "
        "in eval mode with BatchNorm statistics re-estimated on the task's training images, the loss through the "
        + ("**initial head** fine-tuning started from (recomputed: LP-FT linear probe, or the seeded zero/random head)"
           if o.heads == "init" else "**expert's final head**") + ".",
        "",
        markdown_table(
            ["expert", "n_i", "samples", "F_{S_i}(theta_0)", "sigma_i^2 = tr(Sigma_i)", "delta_i^2",
             "||grad F_i||^2", "L_i", "power its", "noise proxy eta/(B(1-beta))", "tr(Sigma) all params",
             "T measured"],
            rows,
        ),
        "",
        f"Pool: **L = max_i L_i = {_fmt(m.smoothness)}**; heterogeneity D = sum_i (n_i/n) delta_i^2 = "
        f"{_fmt(m.heterogeneity.mean_delta2)}; ||grad F||^2 = {_fmt(m.heterogeneity.mean_grad_norm2)} "
        "(F = sum_i (n_i/n) F_i, n_i = the expert's training-set size from its sidecar).",
        "",
        f"L_i: power iteration on Hessian-vector products, at most {o.hessian_iters} iterations (tolerance "
        f"{o.hessian_tol:g}) on one batch of the samples: a small-sample estimate of the top eigenvalue. Noise scale: "
        "the sidecar's proxy (linear (1 - beta) form) and T = proxy x tr(Sigma), tr(Sigma) the per-sample gradient "
        "variance over all trained parameters (backbone and head) at theta_0"
        + (" (augmentation-aware when the expert trained with augmentation)." if o.noise else "; not measured here."),
    ]
    data = {
        "experts": [dict(i.to_dict(), delta2=float(m.heterogeneity.delta2[k])) for k, i in enumerate(a.inits)],
        "pool": {"smoothness": m.smoothness, "heterogeneity": m.heterogeneity.to_dict(),
                 "num_params": int(a.inits[0].grad.numel())},
        "settings": dict(m.settings),
    }
    return "\n".join(body), data


def _bound_section(a: PoolDataAnalysis) -> tuple[str, dict[str, Any]]:
    from mergelab.analysis.bound import BOUND_FORMULA, FORM, SOURCE
    from mergelab.report.markdown import markdown_table

    c = a.constants
    head = [
        "**(derived)** This bound is our own derivation from the stated dependencies of the stability framework "
        "(THEORY.md section 1), not a formula from the paper; read it as a prediction to check by measurement.",
        "",
        f"Constants: {c.note}.",
        "",
        f"Merge coefficients: {a.coefficients.note}; alpha = ({', '.join(_fmt(x, 3) for x in a.coefficients.alphas)}).",
        "",
    ]
    data: dict[str, Any] = {"form": FORM, "formula": BOUND_FORMULA, "source": SOURCE, "constants": c.to_dict(),
                            "coefficients": a.coefficients.to_dict()}
    if a.bound is None:
        return "\n".join(head + ["Not evaluated: the smoothness L was not measured."]), {**data, "bound": None}
    b = a.bound
    rows = [
        ["optimisation: initial-loss decay F0 / sqrt(N P)", b.opt_init],
        ["optimisation: minibatch noise L sum a_i^2 (S1_i/K_i) sigma_i^2 / b_i", b.opt_var],
        ["optimisation: heterogeneity chi^2(alpha||w) x D", b.opt_het],
        ["opt (sum)", b.opt],
        ["stability eps^2 = sum_i (n_i/n) alpha_i^2 eps_i^2", b.eps2],
        ["generalisation gen* = eps sqrt(2 L F) + L eps^2 / 2 (F = opt proxy)", b.gen],
        ["gamma*", b.gamma_star],
        ["**bound = c_opt opt + c_stab gen**", b.bound],
        ["raw bound (unit constants)", b.raw_bound],
        ["chi^2(alpha || w)", b.chi2],
    ]
    pred = a.predicted_loss()
    if pred is not None:
        rows.append(["predicted merged loss (calibrated bound + floor)", pred])
    exp_rows = [[e["name"], e["eta"], e["steps"], e["batch_size"], e["n"], e["alpha"], e["weight_w"], e["eps2"],
                 e["eta_L_K"], "yes" if e["valid"] else "**no**"] for e in b.experts]
    n_bad = sum(not e["valid"] for e in b.experts)
    body = head + [
        markdown_table(["term (derived)", "value"], rows),
        "",
        "Per expert (eta = lr / (1 - momentum), the heavy-ball step; w_i = FedNova effective weights; valid: "
        "eta L K <= 1, the step-size condition of the stability argument):",
        "",
        markdown_table(["expert", "eta", "K", "b", "n_i", "alpha_i", "w_i", "eps_i^2", "eta L K", "valid"], exp_rows),
        "",
        (f"**{n_bad} of {len(b.experts)} experts violate eta <= 1/(L K)**: the bound is extrapolated outside the "
         "condition under which it was derived; treat its value as a score, not a guarantee." if n_bad else
         "All experts satisfy the step-size condition."),
        "",
        f"Formula: `{BOUND_FORMULA}`",
    ]
    data.update({"bound": b.to_dict(), "chi2": b.chi2, "all_valid": b.all_valid,
                 "validity": [{"expert": e["name"], "eta_L_K": e["eta_L_K"], "valid": e["valid"]} for e in b.experts],
                 "predicted_loss": pred})
    return "\n".join(body), data


def _trend_section(a: PoolDataAnalysis) -> tuple[str, dict[str, Any]]:
    from mergelab.report.markdown import markdown_table

    if not a.trends:
        return "Not evaluated: the smoothness L was not measured.", {"form": "derived", "trends": {}, "recommendation": None}
    rows = []
    for hp, t in a.trends.items():
        i1 = int(np.argmin(np.abs(np.log(np.asarray(t.factors)))))
        rows.append([_HP_LABELS[hp], t.shape, f"x{t.argmin_factor:.3g}" + (" (edge)" if t.argmin_at_edge else ""),
                     ", ".join(f"{k}: {v}" for k, v in t.term_shapes.items()), f"{100 * t.valid_fraction[i1]:.0f}%",
                     THEORY_EXPECTATIONS[hp]])
    rec = a.recommendation
    body = [
        "**(derived)** The bound re-evaluated with every expert's K, eta (base lr), b or n (and data ratio) multiplied "
        "by 0.25 ... 4, statistics at theta_0 held fixed; for N, sub-pools of the measured experts (heterogeneity "
        "recomputed from the task-gradient Gram matrix) and cyclic replication above the pool size. These are "
        "predictions of the formula, to be checked against measured merges; they are not measurements.",
        "",
        markdown_table(["hyperparameter", "bound shape", "argmin", "term shapes", "valid at x1",
                        "THEORY.md expectation"], rows),
        "",
        "### Merge-friendly recommendation for the next expert (derived)",
        "",
    ]
    if rec is not None:
        r = rec.recommended
        body += [
            markdown_table(["setting", "typical pool expert", "recommended"], [
                ["learning rate", rec.base["lr"], r["lr"]], ["steps K", rec.base["steps"], r["steps"]],
                ["batch size", rec.base["batch_size"], r["batch_size"]],
                ["data ratio", rec.base["data_ratio"], r["data_ratio"]],
            ]),
            "",
            *[f"- {line}" for line in rec.reasoning],
        ]
    data = {"form": "derived", "factors_model": "every expert's setting x factor; N: sub-pools / replication",
            "trends": {hp: t.to_dict() for hp, t in a.trends.items()},
            "recommendation": None if rec is None else rec.to_dict(), "theory_expectation": dict(THEORY_EXPECTATIONS)}
    return "\n".join(body), data


def _landscape_section(a: PoolDataAnalysis) -> tuple[str, dict[str, Any]]:
    from mergelab.report.markdown import markdown_table

    o = a.options
    body = [f"Evaluated on {o.samples_per_task} seeded **{o.eval_split}** samples per task, each task through its "
            f"expert's head; BatchNorm statistics `{o.bn}` along the paths "
            + ("(combined like the weights, as a plain merge does; averaging shrinks activations, which inflates "
               "barriers of ResNets -- `--bn reset` re-estimates them)." if o.bn == "interpolate" else
               "(re-estimated on training samples at every point).")]
    data: dict[str, Any] = {"samples_per_task": o.samples_per_task, "split": o.eval_split, "bn": o.bn}
    if a.interpolation is not None and a.interpolation_endpoints is not None:
        s = a.interpolation.summary()
        curves = dict(a.interpolation.curves, mean=a.interpolation.mean_curve())
        rows = [[t, v["loss_barrier"], v["accuracy_barrier"], v["loss_gain"], v["accuracy_gain"],
                 curves[t].loss[0], curves[t].loss[-1]] for t, v in s.items()]
        ea, eb = a.interpolation_endpoints
        body += ["", f"### Linear interpolation (1 - a) theta_{{{ea}}} + a theta_{{{eb}}}", "",
                 markdown_table(["task", "loss barrier", "accuracy barrier", "loss gain L(.5) - mean ends",
                                 "accuracy gain A(.5) - mean ends", "loss at a=0", "loss at a=1"], rows),
                 "", "Barrier: largest gap above the endpoints' chord; gain: the midpoint merge against the endpoints' "
                 "mean (accuracy: positive is good; loss: negative is good)."]
        data["interpolation"] = {"endpoints": [ea, eb], **a.interpolation.to_dict()}
    if a.ta_path is not None:
        p = a.ta_path
        n = len(a.pool.experts)
        mean = p.mean_curve()
        idx_avg = int(np.argmin(np.abs(np.asarray(p.alphas) - 1.0 / n)))
        rows = []
        for name, c in list(p.curves.items()) + ([("mean", mean)] if len(p.curves) > 1 else []):
            ba, bv = c.best("accuracy")
            la, lv = c.best("loss")
            rows.append([name, c.accuracy[0], c.accuracy[idx_avg], c.loss[idx_avg], ba, bv, la, lv])
        body += ["", f"### Task-arithmetic path theta_0 + a sum_i tau_i ({n} experts)", "",
                 markdown_table(["task", "acc at a=0 (theta_0)", f"acc at a=1/N={1 / n:.3g} (average)",
                                 "loss at a=1/N", "best a (acc)", "best acc", "best a (loss)", "best loss"], rows)]
        data["task_arithmetic"] = p.to_dict()
    bad = _nonfinite_points(a)
    if bad:
        body += ["", f"**Non-finite losses** at {', '.join(bad)}: "
                 + ("the combined BatchNorm running variances turn negative when the path extrapolates "
                    "(a * N > 1 on the task-arithmetic path), so the network outputs NaN there (accuracy at those "
                    "points is meaningless). This is what a plain merge with that coefficient produces; "
                    "`--bn reset` re-estimates the statistics instead." if o.bn == "interpolate" else
                    "the merged network diverges there.")]
        data["nonfinite_points"] = bad
    return "\n".join(body), data


def _nonfinite_points(a: PoolDataAnalysis) -> list[str]:
    out = []
    for kind, path in (("interpolation", a.interpolation), ("task-arithmetic", a.ta_path)):
        if path is None:
            continue
        alphas = sorted({al for c in path.curves.values() for al, v in zip(c.alphas, c.loss) if not math.isfinite(v)})
        if alphas:
            out.append(f"{kind} a = {', '.join(f'{al:g}' for al in alphas)}")
    return out


def _cka_section(a: PoolDataAnalysis) -> tuple[str, dict[str, Any]]:
    from mergelab.report.markdown import markdown_table

    c = a.cka or {}
    rows = [[r["expert"], r["cka_merge"], r["cka_base"]] for r in c.get("experts", [])]
    b = c.get("batch", {})
    body = [
        f"Linear CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) of column-centred penultimate features on one fixed "
        f"batch of {b.get('n')} inputs ({b.get('per_task')} seeded {b.get('split')} samples of each of "
        f"{', '.join(b.get('tasks', []))}). Merge: {c.get('merge')} (lambda from {c.get('lambda_source')}).",
        "",
        markdown_table(["expert", "CKA(expert, TA merge)", "CKA(expert, theta_0)"], rows),
        "",
        f"CKA(TA merge, theta_0) = {_fmt(c.get('cka_merge_base'))}. An expert whose features the merge preserves "
        "has CKA near 1 with it; a low value flags the expert the merge loses most.",
    ]
    if not c.get("merge_features_finite", True):
        body += ["", "**The merged network's features are not finite** on this batch (CKA n/a): with BatchNorm "
                 "statistics combined like the weights, lambda * N > 1 extrapolates the running variances below 0. "
                 "`--bn reset` re-estimates them before measuring."]
    return "\n".join(body), c


# ------------------------------------------------------------------------------------------------ plots
def _new_fig(w: float, h: float) -> MplFigure:
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(w, h))


def plot_theory(a: PoolDataAnalysis) -> MplFigure:
    labels = [i.label for i in a.inits]
    series = {
        "F_S(theta_0)": [i.init_loss for i in a.inits],
        "sigma^2": [i.sigma2 for i in a.inits],
        "delta^2": [float(d) for d in a.measurement.heterogeneity.delta2],
        "L_i": [i.L for i in a.inits],
    }
    fig = _new_fig(max(6.0, 1.2 * len(labels) + 3), 3.8)
    ax = fig.add_subplot()
    k = len(series)
    width = 0.8 / k
    x = np.arange(len(labels))
    for j, (name, vals) in enumerate(series.items()):
        v = np.asarray(vals, dtype=float)
        ax.bar(x + (j - (k - 1) / 2) * width, np.where(v > 0, v, np.nan), width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([literal(x) for x in labels], rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=7, ncol=4)
    ax.set_title("theory quantities at theta_0 (log scale)", fontsize=9)
    return fig


def plot_bound_terms(a: PoolDataAnalysis) -> MplFigure:
    b = a.bound
    assert b is not None
    c = a.constants
    names = ["opt: init decay", "opt: noise", "opt: chi^2 het.", "gen"]
    vals = [c.c_opt * b.opt_init, c.c_opt * b.opt_var, c.c_opt * b.opt_het, c.c_stab * b.gen]
    fig = _new_fig(7.0, 3.4)
    ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    pos = [v for v in vals if v > 0]
    ax0.barh(names, [v if v > 0 else np.nan for v in vals], color=["C0", "C1", "C2", "C3"])
    if pos:
        ax0.set_xscale("log")
        lo = min(pos)
        for k, v in enumerate(vals):
            ax0.text(v if v > 0 else lo, k, f" {v:.3g}", va="center", fontsize=7)
    ax0.set_title("(derived) bound terms x constants", fontsize=9)
    ax0.tick_params(labelsize=7)
    labels = [e["name"] for e in b.experts]
    ratio = [e["eta_L_K"] for e in b.experts]
    ax1.bar(range(len(labels)), ratio, color=["tab:green" if e["valid"] else "tab:red" for e in b.experts])
    ax1.axhline(1.0, color="k", lw=0.8, ls="--")
    ax1.set_yscale("log")
    ax1.set_xticks(range(len(labels)))
    ax1.set_xticklabels([literal(x) for x in labels], rotation=30, ha="right", fontsize=7)
    ax1.set_title("eta L K (valid <= 1)", fontsize=9)
    return fig


def plot_trends(a: PoolDataAnalysis) -> MplFigure:
    hps = list(a.trends)
    fig = _new_fig(3.0 * len(hps), 3.0)
    axes = fig.subplots(1, len(hps), squeeze=False)[0]
    for ax, hp in zip(axes, hps):
        t = a.trends[hp]
        xs = np.asarray(t.values, dtype=float)
        ax.plot(xs, t.bound, "o-", ms=3, color="k", label="bound")
        ax.plot(xs, np.asarray(t.opt) * a.constants.c_opt, "--", lw=0.9, label="c_opt opt")
        ax.plot(xs, np.asarray(t.gen) * a.constants.c_stab, ":", lw=0.9, label="c_stab gen")
        cur = xs[int(np.argmin(np.abs(np.log(np.asarray(t.factors)))))]
        ax.axvline(cur, color="tab:blue", lw=0.8, alpha=0.6)
        ax.plot([t.argmin_value], [min(t.bound)], "v", color="tab:red", ms=7)
        ax.set_xscale("log")
        if all(v > 0 for v in list(t.bound) + list(t.opt) + list(t.gen)):
            ax.set_yscale("log")
        from matplotlib.ticker import NullFormatter

        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(_HP_LABELS[hp], fontsize=8)
        ax.set_title(f"{hp}: {t.shape}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    fig.suptitle("(derived) predicted trends of the bound (blue: current setting, red: argmin)", fontsize=9)
    return fig


def plot_paths(path: PathResult, title: str) -> MplFigure:
    from mergelab.analysis.landscape import plot_interpolation

    fig = _new_fig(10.0, 3.6)
    ax0, ax1 = fig.subplots(1, 2)
    plot_interpolation(path, "loss", ax=ax0)
    plot_interpolation(path, "accuracy", ax=ax1)
    fig.suptitle(literal(title), fontsize=9)
    return fig


def plot_cka(a: PoolDataAnalysis) -> MplFigure:
    rows = (a.cka or {}).get("experts", [])
    fig = _new_fig(max(5.0, 1.0 * len(rows) + 2.5), 3.4)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["cka_merge"] for r in rows], 0.4, label="CKA(expert, TA merge)")
    ax.bar(x + 0.2, [r["cka_base"] for r in rows], 0.4, label="CKA(expert, theta_0)")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(x)
    ax.set_xticklabels([literal(r["expert"]) for r in rows], rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title("linear CKA of penultimate features", fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------- assembly
def add_data_sections(report: Report, a: PoolDataAnalysis) -> Report:
    """Add the sections ``theory``, ``bound``, ``trends``, ``landscape`` and ``cka`` (those computed) to ``report``."""
    from mergelab.analysis.diagnostics import to_jsonable
    from mergelab.report.folder import Drawing

    md, data = _theory_section(a)
    report.add_section("Theory quantities at theta_0", md, to_jsonable(data), key="theory",
                       figures=[Drawing("theory.png", "F_S(theta_0), sigma^2, delta^2 and L_i per expert",
                                       lambda: plot_theory(a))])
    md, data = _bound_section(a)
    figs = [Drawing("bound.png", "(derived) bound terms and the step-size condition per expert",
                   lambda: plot_bound_terms(a))] if a.bound is not None else []
    report.add_section("Stability bound (derived)", md, to_jsonable(data), figs, key="bound")
    md, data = _trend_section(a)
    figs = [Drawing("trends.png", "(derived) the bound along K, eta, b, n and N", lambda: plot_trends(a))] if a.trends else []
    report.add_section("Predicted trends and recommendation (derived)", md, to_jsonable(data), figs, key="trends")
    if a.interpolation is not None or a.ta_path is not None:
        md, data = _landscape_section(a)
        figs = []
        if a.interpolation is not None and a.interpolation_endpoints is not None:
            ea, eb = a.interpolation_endpoints
            interp = a.interpolation
            figs.append(Drawing("interpolation.png", f"Loss and accuracy along (1-a) {ea} + a {eb}",
                               lambda: plot_paths(interp, f"linear interpolation {ea} -> {eb}")))
        if a.ta_path is not None:
            ta = a.ta_path
            figs.append(Drawing("ta_path.png", "Loss and accuracy along theta_0 + a sum tau_i",
                               lambda: plot_paths(ta, "task-arithmetic coefficient path")))
        report.add_section("Loss landscape: interpolation and task-arithmetic path", md, to_jsonable(data), figs,
                           key="landscape")
    if a.cka is not None:
        md, data = _cka_section(a)
        report.add_section("Linear CKA: experts vs the task-arithmetic merge", md, to_jsonable(data),
                           [Drawing("cka.png", "Linear CKA of each expert with the TA merge and theta_0",
                                   lambda: plot_cka(a))], key="cka")
    report.meta["data_analysis"] = to_jsonable({
        "options": asdict(a.options), "seconds": a.seconds, "warnings": a.warnings,
        "experts": [str(e.path) for e in a.pool.experts], "tasks": a.pool.tasks,
    })
    return report


def format_data_summary(a: PoolDataAnalysis) -> str:
    """A few lines for the terminal."""
    m = a.measurement
    lines = [f"data analysis ({sum(a.seconds.values()):.1f} s): L = {_fmt(m.smoothness)}, "
             f"D = sum p_i delta_i^2 = {_fmt(m.heterogeneity.mean_delta2)}"]
    for i, init in enumerate(a.inits):
        lines.append(f"  {init.label:20s} F0 {_fmt(init.init_loss):>9s}  sigma^2 {_fmt(init.sigma2):>9s}  "
                     f"delta^2 {_fmt(float(m.heterogeneity.delta2[i])):>9s}  L_i {_fmt(init.L):>9s}")
    if a.bound is not None:
        b = a.bound
        lines.append(f"(derived) bound {_fmt(b.bound)} (opt {_fmt(b.opt)}, gen {_fmt(b.gen)}), chi^2(alpha||w) "
                     f"{_fmt(b.chi2)}, valid experts {sum(e['valid'] for e in b.experts)}/{len(b.experts)}; "
                     + ("calibrated" if a.constants.calibrated else "constants 1/1 (uncalibrated)"))
        lines.append("(derived) trends: " + ", ".join(f"{hp} {t.shape}" for hp, t in a.trends.items()))
    if a.interpolation is not None:
        s = a.interpolation.summary()
        lines.append("interpolation: " + ", ".join(
            f"{t} barrier {_fmt(v['loss_barrier'], 3)} acc-gain {_fmt(v['accuracy_gain'], 3)}" for t, v in s.items()))
    if a.cka is not None:
        lines.append("CKA(expert, TA merge): " + ", ".join(f"{r['expert']} {_fmt(r['cka_merge'], 3)}"
                                                          for r in a.cka["experts"]))
    return "\n".join(lines)


__all__ = [
    "CONSTANTS_FORMAT",
    "DataAnalysisOptions",
    "ExpertAtInit",
    "LoadedConstants",
    "MergeCoefficients",
    "PoolDataAnalysis",
    "PoolExperts",
    "add_data_sections",
    "analyze_pool_data",
    "bound_pool",
    "expert_folder",
    "expert_training_data",
    "format_data_summary",
    "has_fingerprints",
    "initial_model",
    "load_constants",
    "measure_expert_at_init",
    "merge_coefficients",
    "pool_measurement",
    "resolve_pool",
    "stale_reason",
    "task_samples",
]
