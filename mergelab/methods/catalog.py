"""The method catalog: every data-free merging method, its parameters, traits and reference composition.

One entry per method (:data:`METHODS`) declares

- its parameters: a pydantic model, validated, with the papers' defaults (sources in the reference's
  docstring);
- its traits (:class:`~mergelab.methods.base.Method`: needs a base, linear, I/O-bound, whole-model trim, ...);
- its **reference**: the composition of :mod:`mergelab.ops` operators on whole tensors that specifies it
  (TIES = trim -> elect_sign -> disjoint_mean -> scale). The merge back-ends' kernels are tested against it,
  and a back-end with no kernel for a method runs the reference itself (:mod:`mergelab.merging`).

**Where do I add a method?** Here. A data-free method that is a composition of existing operators is one
entry below (its parameter model, its reference, its traits) plus tests of the reference against a
closed-form answer (tests/test_methods.py); the torch back-end then runs it, tensor by tensor, with every
rule of a merge (validation, non-finite checks, atomic output), and the analysis layer and the experiments
read its traits (``operator``/``sparsify``: the operator T of diagnostics and the bound; ``combination``:
the bound's coefficients; ``validation_grid``: what ``mergelab compare`` searches). A block kernel (less
memory, all cores) is optional: register it in a back-end (:mod:`mergelab.merging.torch_kernels`,
:mod:`mergelab.merging.numpy_backend`) and add a case to tests/test_streaming.py, which checks it against
the reference bit for bit.

Notation: base theta_0, experts theta_i with weights w_i, task vectors tau_i = theta_i - theta_0.
``from mergelab import ops`` loads the operators (and torch) on first use, so reading this catalog to
validate a spec, or to merge with the numpy back-end, does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from mergelab import ops
from mergelab.methods.base import (
    DensityMixin,
    DisjointDivisor,
    Method,
    MethodParams,
    RescaleRule,
    ScaledParams,
    SignElection,
    SignTest,
    TensorInputs,
    TrimScope,
)

if TYPE_CHECKING:
    import torch


class WeightAverageParams(MethodParams):
    pass


class TaskArithmeticParams(ScaledParams):
    pass


class TiesParams(ScaledParams, DensityMixin):
    density: float = 0.2
    trim_scope: TrimScope = "global"
    sign_election: SignElection = "mass"
    disjoint_divisor: DisjointDivisor = "count"
    sign_test: SignTest = "tau"


def ties_global_density(p: TiesParams) -> float | None:
    """The density of TIES's whole-model trim (``trim_scope: global`` below density 1), else None."""
    return p.density if p.trim_scope == "global" and p.density < 1.0 else None


class DareLinearParams(ScaledParams, DensityMixin):
    density: float = 0.5
    rescale: RescaleRule = "inverse"
    seed: int = 0


class DareTiesParams(DareLinearParams):
    sign_election: SignElection = "mass"
    disjoint_divisor: DisjointDivisor = "count"
    sign_test: SignTest = "tau"


class BreadcrumbsParams(ScaledParams, DensityMixin):
    density: float = 0.9
    gamma: float = Field(0.01, description="fraction of largest-magnitude entries removed")

    @field_validator("gamma")
    @classmethod
    def _gamma_range(cls, v: float) -> float:
        if not (0.0 <= v < 1.0):
            raise ValueError(f"gamma must be in [0, 1), got {v}")
        return v


class ModelStockParams(MethodParams):
    extrapolate: bool = Field(False, description="mergekit's ratio for task vectors pointing apart (cos <= 0)")
    filter_wise: bool = Field(False, description="one ratio per row (output filter) instead of per tensor")


class SlerpParams(MethodParams):
    t: float = Field(0.5, description="interpolation position: 0 gives the first model, 1 the second")

    @field_validator("t")
    @classmethod
    def _t_range(cls, v: float) -> float:
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"t must be in [0, 1], got {v}")
        return v

    parallel_threshold: float = Field(1.0 - 1e-6, description="|cos| above which slerp falls back to lerp "
                                      "(mergekit: 0.9995)")

    @field_validator("parallel_threshold")
    @classmethod
    def _threshold_range(cls, v: float) -> float:
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"parallel_threshold must be in [0, 1], got {v}")
        return v


class SpectralParams(ScaledParams):
    conv_as_matrix: bool = Field(False, description="merge a k-D (k > 2) weight as the matrix (out, in x kernel) "
                                 "instead of averaging it (the papers' code and FusionBench average it)")


class TsvMergeParams(SpectralParams):
    pass


class IsoCParams(SpectralParams):
    pass


class IsoCtsParams(SpectralParams):
    common_space_fraction: float = Field(0.8, description="fraction of each matrix's rank given to the common "
                                         "subspace of the task-arithmetic sum")

    @field_validator("common_space_fraction")
    @classmethod
    def _fraction_range(cls, v: float) -> float:
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"common_space_fraction must be in [0, 1], got {v}")
        return v


#: lambda candidates of task arithmetic and DARE chosen on validation data (Ilharco et al. 2023; DARE's
#: lambda the same way), from 0.05 to 1.
TA_LAMBDA_GRID: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
#: TIES's lambda on validation (Yadav et al. 2023). The grid contains TA's: where the trimmed task vectors do
#: not overlap, the disjoint mean is the sum, so TIES at lambda *is* task arithmetic at lambda (test_compare);
#: the paper's lambda ~1 assumes small task vectors. On the resnet_s quickstart (task vectors 16-29 % of |W0|)
#: the old grid 0.3 .. 1.3 chose its lower edge, 0.3: validation accuracy fell monotonically from there to 1.3
#: (71.8 -> 52.7 %) and peaks at 0.25 (TA: 0.15-0.2).
TIES_LAMBDA_GRID: tuple[float, ...] = TA_LAMBDA_GRID + (1.3,)
#: TIES's trim scope is searched too: whole-model (the paper's) or per tensor (mergekit's); on the resnet_s zoo
#: the whole-model top 20 % zeroes whole small layers (their deltas are small in magnitude), per tensor does not.
TIES_SCOPE_GRID: tuple[str, ...] = ("global", "tensor")

#: lambda (the papers' alpha) of TSV-Merge, Iso-C and Iso-CTS on validation: the authors' code searches
#: 0.1, 0.2 .. 3.0 on held-out validation data (``np.linspace(0, 3, 31)[1:]`` in both repositories); this grid
#: spans the same range with fewer points.
SPECTRAL_LAMBDA_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)


# ------------------------------------------------------------------------------------------ references


def _base(inp: TensorInputs) -> torch.Tensor:
    return inp.base.to(inp.compute_dtype)  # type: ignore[union-attr]


def weight_average(inp: TensorInputs, p: WeightAverageParams) -> torch.Tensor:
    """Weight averaging / model soup (Wortsman et al. 2022): ``theta = sum_i w_i theta_i / sum_i w_i``.

    The base model is not part of the average (it only supplies the tensor order and config files).
    Computed as ``theta_1 + (sum_i w_i (theta_i - theta_1)) / sum_i w_i`` (algebraically equal), so merging
    identical models returns that model bit-exactly and rounding acts on the small differences only.
    """
    first = inp.experts[0].to(inp.compute_dtype)
    diffs = [e.to(inp.compute_dtype) - first for e in inp.experts]
    return ops.weighted_mean(diffs, inp.weights) + first


def task_arithmetic(inp: TensorInputs, p: TaskArithmeticParams) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``theta = theta_0 + lambda * sum_i w_i tau_i``.

    Default ``lambda = 1`` (the plain sum of task vectors); the paper tunes lambda on validation data
    (0.3-0.5 is typical for 8 vision tasks), so set it for your pool. Computed in the expanded form, entry
    by entry in ``compute_dtype``: ``tau_i = theta_i - theta_0`` (exact for bf16 inputs of similar
    magnitude), ``s = sum_i w_i tau_i`` in model order, ``theta = lambda * s + theta_0``. (The folded form
    ``(1 - lambda sum_i w_i) theta_0 + lambda sum_i w_i theta_i`` rounds at the scale of theta instead of
    tau and does not return the base bit-exactly for identical models.)
    """
    return ops.scale(ops.weighted_sum(inp.task_vectors(), inp.weights), p.lambda_) + _base(inp)


def ties(inp: TensorInputs, p: TiesParams) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023): trim -> elect_sign -> disjoint_mean -> scale.

    ``hat tau_i = trim(tau_i, density)``; ``gamma = sgn(sum_i w_i hat tau_i)``;
    ``theta = theta_0 + lambda * sum_{i in A} w_i hat tau_i / |A|`` over the models A agreeing with gamma.
    Defaults from the paper: density 0.2 (keep top 20%), trimming over the whole model
    (``trim_scope: global``, as in the paper's code and FusionBench: the threshold of expert i is its k-th
    largest ``|tau_i|`` over the model, given in ``inp.thresholds`` with this tensor's share of the tied
    entries in ``inp.tie_quotas``; ``tensor`` trims each tensor separately, as mergekit does), election by
    mass, mean over agreeing entries (``disjoint_divisor: count``; ``weight`` divides by the agreeing
    weights, mergekit's ``normalize: true``; ``none`` takes the plain sum, mergekit's ``normalize: false``),
    agreement tested on ``tau_i`` (``sign_test: tau``; ``weighted`` tests ``w_i tau_i``, as mergekit does,
    which differs for negative weights), lambda 1. Exactly k entries survive a trim (ties first in order).
    A model's own ``density`` (per-model parameter) trims its task vector with scope ``tensor``.

    Known result (resnet_s zoo; mnist, mnist_rot90, digits, shapes; ``joint`` BN): TIES 71.3-72.0 loses to
    task arithmetic 73.6-73.8 at every density (0.1/0.2/0.5/1: best over lambda 71.2/71.8/71.9/72.0) and trim
    scope, so trimming is not the cause: the disjoint mean is. Our task vectors are large (16-29 % of |W0|), so
    the network tolerates a merged vector of only ~0.4x one expert's norm (TA lambda 0.15-0.2; TIES 0.25-0.3,
    not the paper's ~1), and at that norm the per-entry division by the number of agreeing experts spends the
    budget off the task directions (projection onto each tau_i 0.16-0.20 vs TA's 0.23-0.27): at matched norm
    TA 72.8-74.0, TA on trimmed vectors 72.7-73.6, elected sum (``disjoint_divisor: none``) 72.1-73.4,
    disjoint mean (density 1) 70.1-71.9; with 2 tasks 81.7 vs 75.1. With the zoo's lr-0.01 experts (task
    vectors 3-6.5 % of |W0|) the best lambda moves to 0.6-1 and TIES ties TA (73.2-73.5 vs 73.5-73.6 at the
    best lambda; chosen on validation 73.2 vs 72.0). Measured in ``/work/runs/ties-investigation`` (NOTES.md).
    """
    taus = trimmed(inp.task_vectors(), inp, p)
    sign = ops.elect_sign(taus, inp.weights, by=p.sign_election)
    merged = ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor, test=p.sign_test)
    return ops.scale(merged, p.lambda_) + _base(inp)


# The sparsification step T of each sparsifying method (``Method.sparsify``), on the task vectors of one
# tensor: the references apply it, and so does the analysis layer (Corollary 1's operator T,
# :func:`mergelab.analysis.diagnostics.apply_operator`). A method whose ``combination`` is
# ``disjoint_mean`` follows it with the sign consensus.


def trimmed(taus: list[torch.Tensor], inp: TensorInputs, p: TiesParams) -> list[torch.Tensor]:
    """TIES's trim (step 1) of each task vector: ``trim(tau_i, density)`` per tensor, or at the whole-model
    thresholds ``inp.thresholds`` (``trim_scope: global``); a model's own ``density`` trims per tensor.
    ``density`` 1 and empty tensors: the task vectors unchanged."""
    if inp.model_params is not None:
        return [ops.trim(t, d) if (d := inp.per_model(i, "density", p.density)) < 1.0 and t.numel() else t
                for i, t in enumerate(taus)]
    if p.density < 1.0 and taus[0].numel() > 0:
        if p.trim_scope == "global":
            if inp.thresholds is None:
                raise ValueError(
                    f"ties with trim_scope 'global' needs whole-model thresholds for tensor '{inp.name}'; "
                    "merge through mergelab.merge (which computes them) or use trim_scope 'tensor'"
                )
            quotas = inp.tie_quotas
            return [ops.trim(t, p.density, threshold=inp.thresholds[i], ties=None if quotas is None else quotas[i])
                    for i, t in enumerate(taus)]
        return [ops.trim(t, p.density) for t in taus]
    return taus


def dropped(taus: list[torch.Tensor], inp: TensorInputs, p: DareLinearParams) -> list[torch.Tensor]:
    """DARE's random drop and rescale of each task vector (:func:`mergelab.ops.drop`), masks seeded by
    (``seed``, expert index, tensor name)."""
    return [
        ops.drop(tau, inp.per_model(i, "density", p.density), rescale=p.rescale,  # type: ignore[arg-type]
                 generator=inp.generator(p.seed, i))
        for i, tau in enumerate(taus)
    ]


def banded(taus: list[torch.Tensor], inp: TensorInputs, p: BreadcrumbsParams) -> list[torch.Tensor]:
    """Breadcrumbs' band of each task vector (:func:`mergelab.ops.trim_band`)."""
    return [ops.trim_band(tau, inp.per_model(i, "density", p.density), inp.per_model(i, "gamma", p.gamma))
            for i, tau in enumerate(taus)]


def dare_linear(inp: TensorInputs, p: DareLinearParams) -> torch.Tensor:
    """DARE + task arithmetic (Yu et al. 2024): ``theta = theta_0 + lambda * sum_i w_i drop(tau_i)``.

    ``drop`` keeps each entry with probability ``density = 1 - p`` and rescales by ``1/density``
    (``rescale: inverse``, the paper's; ``l1`` matches the L1 norm as mergekit does). Default density 0.5:
    the paper sweeps drop rates 0.1-0.99 and mergekit requires it explicitly, so 0.5 is a neutral middle.
    The masks are reproducible: seeded by ``seed``, the expert's index and the tensor name.
    """
    merged = ops.weighted_sum(dropped(inp.task_vectors(), inp, p), inp.weights)
    return _base(inp) + ops.scale(merged, p.lambda_)


def dare_ties(inp: TensorInputs, p: DareTiesParams) -> torch.Tensor:
    """DARE + TIES consensus (Yu et al. 2024, sec. 4): drop -> elect_sign -> disjoint_mean -> scale.

    Same as :func:`ties` with the magnitude trim replaced by DARE's random drop and rescale.
    """
    taus = dropped(inp.task_vectors(), inp, p)
    sign = ops.elect_sign(taus, inp.weights, by=p.sign_election)
    merged = ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor, test=p.sign_test)
    return _base(inp) + ops.scale(merged, p.lambda_)


def breadcrumbs(inp: TensorInputs, p: BreadcrumbsParams) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): ``theta_0 + lambda * sum_i w_i band(tau_i)``.

    ``band`` (:func:`mergelab.ops.trim_band`) removes per tensor the ``gamma`` fraction of largest-magnitude
    entries (outliers) and the smallest ones, keeping a ``density`` fraction. The paper tunes both per
    setting; defaults density 0.9 and gamma 0.01 are mergekit's.
    """
    taus = banded(inp.task_vectors(), inp, p)
    return _base(inp) + ops.scale(ops.weighted_sum(taus, inp.weights), p.lambda_)


def model_stock(inp: TensorInputs, p: ModelStockParams) -> torch.Tensor:
    """Model Stock (Jang et al. 2024), per tensor: ``theta = t * mean_i theta_i + (1 - t) * theta_0``.

    ``t = N cos / (1 + (N - 1) cos)`` with ``cos`` the mean pairwise cosine between the task vectors of this
    tensor (:func:`mergelab.ops.model_stock_ratio`). Needs N >= 2 experts; per-model weights are not used.
    ``extrapolate``: mergekit's ratio when the task vectors point apart (see the operator; by default the
    ratio is 0 there, the base). ``filter_wise``: one ratio per row of the tensor (its first axis; a 1-D
    tensor is one row), as mergekit's option.
    """
    taus = inp.task_vectors()
    mean_tau = ops.weighted_mean(taus, [1.0] * len(taus))
    if p.filter_wise and mean_tau.dim() >= 2:
        rows = [ops.model_stock_ratio([tau[r] for tau in taus], extrapolate=p.extrapolate)
                for r in range(mean_tau.shape[0])]
        ratio = mean_tau.new_tensor(rows)
        return _base(inp) + mean_tau * ratio.reshape(-1, *([1] * (mean_tau.dim() - 1)))
    t = ops.model_stock_ratio(taus, extrapolate=p.extrapolate)
    return _base(inp) + ops.scale(mean_tau, t)


def slerp(inp: TensorInputs, p: SlerpParams) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985; as used for model merging by mergekit), per tensor.

    With one expert, interpolates from the base (t = 0) to the expert (t = 1); with two experts, from the
    first to the second (the base then only supplies tensor order and config files). Default t = 0.5.
    """
    if len(inp.experts) == 1:
        a, b = inp.base, inp.experts[0]
    else:
        a, b = inp.experts
    return ops.slerp(a.to(inp.compute_dtype), b.to(inp.compute_dtype), p.t,  # type: ignore[union-attr]
                     parallel_threshold=p.parallel_threshold)


def _task_matrix_view(tau: torch.Tensor, conv_as_matrix: bool) -> torch.Tensor | None:
    """The matrix a spectral method merges for a tensor of this shape: a 2-D tensor itself; a k-D weight
    (k > 2, a convolution) as (out, in x kernel) with ``conv_as_matrix``; else None (averaged)."""
    if tau.dim() == 2:
        return tau
    if tau.dim() > 2 and conv_as_matrix:
        return tau.reshape(tau.shape[0], -1)
    return None


def _spectral(inp: TensorInputs, p: SpectralParams,
              merge_matrices: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """``theta_0 + lambda * merge(w_1 tau_1, ..., w_T tau_T)`` on matrices, ``theta_0 + lambda *
    sum_i w_i tau_i / T`` on every other tensor (the rule of TSV-Merge and Iso-C/-CTS)."""
    taus = inp.task_vectors()
    view = _task_matrix_view(taus[0], p.conv_as_matrix)
    if view is None:
        merged = ops.weighted_sum(taus, inp.weights).div_(len(taus))
    else:
        matrices = [ops.scale(_task_matrix_view(t, p.conv_as_matrix), w)  # type: ignore[arg-type]
                    for t, w in zip(taus, inp.weights)]
        merged = merge_matrices(matrices).reshape(taus[0].shape)
    return ops.scale(merged, p.lambda_) + _base(inp)


def tsv_merge(inp: TensorInputs, p: TsvMergeParams) -> torch.Tensor:
    """TSV-Merge, task singular vectors (Gargiulo et al., CVPR 2025), layer by layer.

    On each 2-D tensor (m x n, r = min(m, n)) the task matrices ``M_i = w_i tau_i = U_i diag(s_i) V_i^T``
    keep their k = floor(r / T) leading singular components; the concatenated ``U = [U_1[:, :k] ...]`` and
    ``V`` are decorrelated by orthogonalisation (``U_perp = P Q^T`` from ``U = P Sigma Q^T``, the same for V)
    and ``theta = theta_0 + lambda * U_perp diag(s_1[:k] ... s_T[:k]) V_perp^T``
    (:func:`mergelab.ops.task_singular_vectors`). Orthogonal task subspaces of rank <= k give task
    arithmetic. Every other tensor (biases, norms, BN statistics, embeddings of other rank) is the mean of the
    task vectors: ``theta_0 + lambda * sum_i w_i tau_i / T``. Convolution weights (4-D) are averaged too, as
    in the authors' code and FusionBench (``len(shape) == 2`` selects the matrices); ``conv_as_matrix: true``
    merges them as (out, in x kh x kw) matrices instead (not in the paper). Per-model weights scale the task
    vectors before the SVD (FusionBench's per-task ``alpha`` list).

    Defaults: ``lambda`` 1 (FusionBench's ``alpha: 1``; the authors' code picks it on validation data from
    0.1 .. 3.0, ``mergelab compare`` searches :data:`SPECTRAL_LAMBDA_GRID`), k = floor(r / T) (the paper's
    1/T fraction of each task's spectrum; 0 when r < T, which makes that matrix's task vector 0, as in the
    code). Components beyond a task's numerical rank are dropped before the orthogonalisation, which makes the
    result unique where the code's depends on LAPACK's null-space vectors (:mod:`mergelab.ops.spectral`).
    """
    return _spectral(inp, p, ops.task_singular_vectors)


def iso_c(inp: TensorInputs, p: IsoCParams) -> torch.Tensor:
    """Iso-C, isotropic merging in the common subspace (Marczak et al., ICML 2025), layer by layer.

    On each 2-D tensor the task-arithmetic sum ``Delta = sum_i w_i tau_i = U diag(s) V^T`` gets a flat
    spectrum: ``theta = theta_0 + lambda * sigma_bar U V^T`` with ``sigma_bar`` the mean of Delta's singular
    values (over its numerical rank; the code's thin SVD takes all min(m, n), the same for a full-rank sum)
    (:func:`mergelab.ops.isotropic`). Every other tensor, convolutions included (the authors' code and
    FusionBench; ``conv_as_matrix: true`` reshapes them), is the mean of the task vectors ``lambda * sum_i
    w_i tau_i / T``. Defaults: ``lambda`` 1 (FusionBench's ``scaling_factor: 1.0``; the authors pick it on
    validation from 0.1 .. 3.0, ``mergelab compare`` searches :data:`SPECTRAL_LAMBDA_GRID`).
    """
    def flat_spectrum(matrices: list[torch.Tensor]) -> torch.Tensor:
        return ops.isotropic(ops.weighted_sum(matrices, [1.0] * len(matrices)))

    return _spectral(inp, p, flat_spectrum)


def iso_cts(inp: TensorInputs, p: IsoCtsParams) -> torch.Tensor:
    """Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al., ICML 2025).

    On each 2-D tensor (rank r, T tasks): the common subspace is the top c directions of the task-arithmetic
    sum ``sum_i w_i tau_i``, ``c = r - T d`` with ``d = round((r - floor(f r)) / T)`` (``f =
    common_space_fraction``); each task adds the d leading directions of its residual
    ``w_i tau_i - U_c U_c^T w_i tau_i`` outside the common subspace; the left and right singular vectors
    ``[U_1^R ... U_T^R, U_c]`` are orthogonalised and the spectrum made isotropic:
    ``theta = theta_0 + lambda * sigma_bar U_perp V_perp^T``, ``sigma_bar`` the mean of all the kept
    singular values (:func:`mergelab.ops.isotropic_common_specific`). Other tensors and convolutions as in
    :func:`iso_c`. Defaults: ``common_space_fraction`` 0.8 (paper, authors' README, FusionBench), ``lambda``
    1 (FusionBench's ``scaling_factor: 1.0``; chosen on validation in the paper, as for :func:`iso_c`).
    """
    def common_and_specific(matrices: list[torch.Tensor]) -> torch.Tensor:
        return ops.isotropic_common_specific(matrices, p.common_space_fraction)

    return _spectral(inp, p, common_and_specific)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("weight_average", "weighted mean of the models (model soup)", WeightAverageParams, weight_average,
               needs_base=False, weights_nonzero=True, linear=True, io_bound=True, combination="mean"),
        Method("task_arithmetic", "theta_0 + lambda * sum of weighted task vectors", TaskArithmeticParams,
               task_arithmetic, linear=True, io_bound=True, combination="sum",
               validation_grid={"lambda": TA_LAMBDA_GRID}),
        Method("ties", "trim, elect sign, disjoint mean (TIES-Merging)", TiesParams, ties,
               global_trim_density=ties_global_density, operator="ties", per_model=("density",),
               sparsify=trimmed, combination="disjoint_mean",
               validation_grid={"lambda": TIES_LAMBDA_GRID, "trim_scope": TIES_SCOPE_GRID}),
        Method("dare_linear", "DARE drop-and-rescale, then task arithmetic", DareLinearParams, dare_linear,
               linear=True, operator="dare", per_model=("density",), sparsify=dropped, combination="sum",
               validation_grid={"lambda": TA_LAMBDA_GRID}),
        Method("dare_ties", "DARE drop-and-rescale, then TIES sign consensus", DareTiesParams, dare_ties,
               operator="dare_ties", per_model=("density",), sparsify=dropped, combination="disjoint_mean"),
        Method("breadcrumbs", "drop outliers and small entries per tensor, then task arithmetic",
               BreadcrumbsParams, breadcrumbs, operator="breadcrumbs", per_model=("density", "gamma"),
               sparsify=banded, combination="sum"),
        Method("model_stock", "interpolate the average towards the base by the task vectors' angle",
               ModelStockParams, model_stock, min_models=2, uses_weights=False, combination="interpolation"),
        Method("slerp", "spherical interpolation of two models", SlerpParams, slerp,
               needs_base=False, min_models=1, max_models=2, uses_weights=False, base_or_two=True,
               combination="interpolation"),
        Method("tsv_merge", "task singular vectors: per-layer low-rank SVDs of the task matrices, decorrelated",
               TsvMergeParams, tsv_merge, combination="spectral",
               validation_grid={"lambda": SPECTRAL_LAMBDA_GRID}),
        Method("iso_c", "isotropic merging: the task-arithmetic sum's singular vectors with a flat spectrum",
               IsoCParams, iso_c, combination="spectral", validation_grid={"lambda": SPECTRAL_LAMBDA_GRID}),
        Method("iso_cts", "isotropic merging in the sum's common subspace plus task-specific subspaces",
               IsoCtsParams, iso_cts, combination="spectral", validation_grid={"lambda": SPECTRAL_LAMBDA_GRID}),
    )
}

MethodName = Literal[
    "weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "model_stock", "slerp",
    "tsv_merge", "iso_c", "iso_cts",
]
