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

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

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
    TrimRescale,
    TrimScope,
    ZeroSign,
)

if TYPE_CHECKING:
    import torch

ops_spacing = Literal["paper", "mergekit"]  # DELLA's rank spacing (mergelab.ops.magprune_keep_probabilities)


class WeightAverageParams(MethodParams):
    normalize: bool = Field(True, description="divide by the weights' sum (false: the plain weighted sum "
                                              "sum_i w_i theta_i, mergekit's linear with normalize: false)")


class TaskArithmeticParams(ScaledParams):
    pass


ZERO_SIGN_HELP = "sign elected where the sign sum is exactly 0: 'drop' (0, the entry is 0) or 'positive' (+1, mergekit)"
TRIM_RESCALE_HELP = ("rescaling of each trimmed task vector: 'none' (the paper's) or 'l1' (mergekit's rescale: true: "
                     "times ||tau_i||_1 / ||trimmed tau_i||_1 per tensor)")


class TiesParams(ScaledParams, DensityMixin):
    density: float = 0.2
    trim_scope: TrimScope = "global"
    rescale: TrimRescale = Field("none", description=TRIM_RESCALE_HELP)
    sign_election: SignElection = "mass"
    disjoint_divisor: DisjointDivisor = "count"
    sign_test: SignTest = "tau"
    zero_sign: ZeroSign = Field("drop", description=ZERO_SIGN_HELP)


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
    zero_sign: ZeroSign = Field("drop", description=ZERO_SIGN_HELP)


class BreadcrumbsParams(ScaledParams, DensityMixin):
    density: float = 0.9
    gamma: float = Field(0.01, description="fraction of largest-magnitude entries removed")
    rescale: TrimRescale = Field("none", description=TRIM_RESCALE_HELP)

    @field_validator("gamma")
    @classmethod
    def _gamma_range(cls, v: float) -> float:
        if not (0.0 <= v < 1.0):
            raise ValueError(f"gamma must be in [0, 1), got {v}")
        return v


#: The parameter models whose ``rescale`` is a trim's or band's (``none`` / ``l1``), not DARE's or DELLA's.
TRIM_RESCALED = (TiesParams, BreadcrumbsParams)


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
    ``normalize: false`` (mergekit's ``linear`` with ``normalize: false``): the plain weighted sum
    ``sum_i w_i theta_i``, each product rounded before it is added, in model order (mergekit's operations).
    """
    if not p.normalize:
        return ops.combine([e.to(inp.compute_dtype) for e in inp.experts], inp.weights)
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

    ``rescale: l1`` (mergekit's ``rescale: true``; source ``mergekit/sparsify.py``, ``magnitude`` and
    ``rescaled_masked_tensor`` with ``RescaleNorm.l1``): each trimmed task vector is scaled back to its
    task vector's L1 norm, per model and per tensor, before the weights and the consensus:
    ``hat tau_i = trim(tau_i) * ||tau_i||_1 / ||trim(tau_i)||_1``, unscaled when either norm is below 1e-7
    (the norms by the L1 block rule of :mod:`mergelab.ops.l1_rule`). With ``trim_scope: global`` the threshold
    is the whole model's and the norms are still per tensor (mergekit trims and rescales per tensor only);
    ``density`` 1 neither trims nor rescales. Default ``none`` (the paper's).

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
    sign = ops.elect_sign(taus, inp.weights, by=p.sign_election, zero=p.zero_sign)
    merged = ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor, test=p.sign_test)
    return ops.scale(merged, p.lambda_) + _base(inp)


# The sparsification step T of each sparsifying method (``Method.sparsify``), on the task vectors of one
# tensor: the references apply it, and so does the analysis layer (Corollary 1's operator T,
# :func:`mergelab.analysis.diagnostics.apply_operator`). A method whose ``combination`` is
# ``disjoint_mean`` follows it with the sign consensus.


def trimmed(taus: list[torch.Tensor], inp: TensorInputs, p: TiesParams) -> list[torch.Tensor]:
    """TIES's trim (step 1) of each task vector: ``trim(tau_i, density)`` per tensor, or at the whole-model
    thresholds ``inp.thresholds`` (``trim_scope: global``); a model's own ``density`` trims per tensor;
    ``rescale: l1`` scales each trimmed vector to its task vector's L1 norm (per tensor).
    ``density`` 1 and empty tensors: the task vectors unchanged."""
    if inp.model_params is not None:
        return [ops.trim(t, d, rescale=p.rescale) if (d := inp.per_model(i, "density", p.density)) < 1.0
                and t.numel() else t for i, t in enumerate(taus)]
    if p.density < 1.0 and taus[0].numel() > 0:
        if p.trim_scope == "global":
            if inp.thresholds is None:
                raise ValueError(
                    f"ties with trim_scope 'global' needs whole-model thresholds for tensor '{inp.name}'; "
                    "merge through mergelab.merge (which computes them) or use trim_scope 'tensor'"
                )
            quotas = inp.tie_quotas
            return [ops.trim(t, p.density, threshold=inp.thresholds[i], ties=None if quotas is None else quotas[i],
                             rescale=p.rescale) for i, t in enumerate(taus)]
        return [ops.trim(t, p.density, rescale=p.rescale) for t in taus]
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
    """Breadcrumbs' band of each task vector (:func:`mergelab.ops.trim_band`), rescaled to its task vector's L1
    norm with ``rescale: l1``."""
    return [ops.trim_band(tau, inp.per_model(i, "density", p.density), inp.per_model(i, "gamma", p.gamma),
                          rescale=p.rescale)
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
    sign = ops.elect_sign(taus, inp.weights, by=p.sign_election, zero=p.zero_sign)
    merged = ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor, test=p.sign_test)
    return _base(inp) + ops.scale(merged, p.lambda_)


def breadcrumbs(inp: TensorInputs, p: BreadcrumbsParams) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): ``theta_0 + lambda * sum_i w_i band(tau_i)``.

    ``band`` (:func:`mergelab.ops.trim_band`) removes per tensor the ``gamma`` fraction of largest-magnitude
    entries (outliers) and the smallest ones, keeping a ``density`` fraction. The paper tunes both per
    setting; defaults density 0.9 and gamma 0.01 are mergekit's.

    ``rescale: l1`` (mergekit's ``rescale: true``; source ``mergekit/sparsify.py``, ``magnitude_outliers`` and
    ``rescaled_masked_tensor`` with ``RescaleNorm.l1``): per model and per tensor, before the weights,
    ``band(tau_i) * ||tau_i||_1 / ||band(tau_i)||_1``, unscaled when either norm is below 1e-7 (the norms by
    the L1 block rule of :mod:`mergelab.ops.l1_rule`); a model with density 1 is neither banded nor rescaled.
    Default ``none`` (the paper's).
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


# ------------------------------------------------------------------- issue 15: mergekit's further methods


class DellaMixin(BaseModel):
    epsilon: float = Field(0.1, description="spread of the drop probabilities (paper: full width; mergekit: half)")
    spacing: ops_spacing = Field("paper", description="rank spacing of the probabilities: 'paper' or 'mergekit'")

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> DellaMixin:
        density = getattr(self, "density", 1.0)
        if density < 1.0:
            half = self.epsilon / 2.0 if self.spacing == "paper" else self.epsilon
            if not (self.epsilon >= 0.0 and density - half > 0.0 and density + half <= 1.0):
                raise ValueError(f"epsilon {self.epsilon} with density {density} puts keep probabilities outside "
                                 f"(0, 1] (spacing {self.spacing!r}: density +- {half:g})")
        return self


class DellaLinearParams(DareLinearParams, DellaMixin):
    pass


class DellaParams(DareTiesParams, DellaMixin):
    pass


class BreadcrumbsTiesParams(BreadcrumbsParams):
    sign_election: SignElection = "mass"
    disjoint_divisor: DisjointDivisor = "count"
    sign_test: SignTest = "tau"
    zero_sign: ZeroSign = Field("drop", description=ZERO_SIGN_HELP)


class SceParams(MethodParams):
    select_topk: float = Field(1.0, description="fraction of the entries of highest variance kept (select step)")
    min_energy: float = Field(0.0, description="equal weights when the summed energy is below this (mergekit: 1e-6)")
    zero_sign: ZeroSign = Field("drop", description=ZERO_SIGN_HELP)

    @field_validator("select_topk")
    @classmethod
    def _topk_range(cls, v: float) -> float:
        if not (0.0 < v <= 1.0):
            raise ValueError(f"select_topk must be in (0, 1], got {v}")
        return v


class NuSlerpParams(MethodParams):
    flatten: bool = Field(True, description="one interpolation of the flattened tensors (mergekit's nuslerp_flatten)")
    row_wise: bool = Field(False, description="without flatten: interpolate columns (dim 0) instead of rows")


class MultiSlerpParams(MethodParams):
    normalize_weights: bool = True
    eps: float = 1e-8


class KarcherParams(MethodParams):
    max_iter: int = Field(10, ge=0)
    tol: float = Field(1e-5, gt=0.0)


class NearSwapParams(MethodParams):
    t: float = Field(1e-4, gt=0.0, description="distance below which an entry takes the model's value")


class ArceeFusionParams(MethodParams):
    pass


class PassthroughParams(MethodParams):
    scale: float = Field(1.0, description="factor applied to the model's tensors (mergekit's per-model scale)")


class RamParams(MethodParams):
    epsilon: float = Field(1e-5, ge=0.0, description="|tau| above which an entry counts as changed by a model")

    @field_validator("epsilon")
    @classmethod
    def _epsilon_finite(cls, v: float) -> float:
        return _finite_value(v, "epsilon")


class RamPlusParams(RamParams):
    r: float = Field(0.1, ge=0.0, description="strength of the unique entries' rescaling")
    alpha: float = Field(0.2, ge=0.0, description="cap of the overlap ratio rho in the rescaling")

    @field_validator("r", "alpha")
    @classmethod
    def _finite(cls, v: float, info: Any) -> float:
        return _finite_value(v, info.field_name)


def _finite_value(v: float, name: str) -> float:
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def della_pruned(taus: list[torch.Tensor], inp: TensorInputs, p: DellaLinearParams) -> list[torch.Tensor]:
    """DELLA's MAGPRUNE of each task vector (:func:`mergelab.ops.magprune`), masks seeded by (``seed``, expert
    index, tensor name) as DARE's."""
    return [
        ops.magprune(tau, inp.per_model(i, "density", p.density), inp.per_model(i, "epsilon", p.epsilon),
                     spacing=p.spacing, rescale=p.rescale, generator=inp.generator(p.seed, i))
        for i, tau in enumerate(taus)
    ]


def della(inp: TensorInputs, p: DellaParams) -> torch.Tensor:
    """DELLA-Merging (Deep et al. 2024): MAGPRUNE -> elect_sign -> disjoint_mean -> scale.

    MAGPRUNE (:func:`mergelab.ops.magprune`): within each row (output node) of ``tau_i``, rank the entries by
    magnitude (``r = 0`` the largest), drop entry j with probability ``p_j = p - epsilon/2 + epsilon r_j / n``
    (``p = 1 - density``), rescale survivors by ``1 / (1 - p_j)``; then TIES's sign election and mean over the
    agreeing models, and ``theta = theta_0 + lambda * merged``.

    Defaults: the paper has no single default; it tunes the drop rate p, the window epsilon and lambda per
    merge on validation data. The authors' code (github.com/declare-lab/della) requires the drop rate
    (``merge.py --drop_rate``, no default), defaults the window to 0 (DARE) and documents one run in its README,
    ``--drop_rate 0.3 --window_size 0.14 --lambda_factor 1.1`` (density 0.7, epsilon 0.14 in the paper's
    full-width convention: the code passes ``window_size / 2`` as the half width); its MAGPRUNE functions
    default to half width 0.05, i.e. epsilon 0.1. mergelab keeps density 0.5 (DARE's neutral middle, as
    :func:`dare_linear`) and epsilon 0.1 (the code's function default): a starting point to tune, as the paper
    does; mergekit's defaults differ (``epsilon`` 0.15 half width, ``density`` 1).
    mergekit's ``della`` (``spacing: mergekit``: keep probabilities ``density +- epsilon`` at the ends,
    ``rescale: l1``, ``sign_test: weighted``, ``disjoint_divisor: weight``) is the same composition.
    """
    taus = della_pruned(inp.task_vectors(), inp, p)
    sign = ops.elect_sign(taus, inp.weights, by=p.sign_election, zero=p.zero_sign)
    merged = ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor, test=p.sign_test)
    return _base(inp) + ops.scale(merged, p.lambda_)


def della_linear(inp: TensorInputs, p: DellaLinearParams) -> torch.Tensor:
    """DELLA's MAGPRUNE, then task arithmetic (mergekit's ``della_linear``):
    ``theta = theta_0 + lambda * sum_i w_i magprune(tau_i)`` (MAGPRUNE and defaults as :func:`della`)."""
    merged = ops.weighted_sum(della_pruned(inp.task_vectors(), inp, p), inp.weights)
    return _base(inp) + ops.scale(merged, p.lambda_)


def breadcrumbs_ties(inp: TensorInputs, p: BreadcrumbsTiesParams) -> torch.Tensor:
    """Breadcrumbs with TIES's consensus (mergekit's ``breadcrumbs_ties``): band -> elect_sign ->
    disjoint_mean -> scale. The band as :func:`breadcrumbs` (exactly ``n_keep`` entries, ties by position),
    then ``theta_0 + lambda * sum_{i in A} w_i band(tau_i) / |A|`` over the models agreeing with the elected
    sign (options as :func:`ties`; mergekit's defaults: ``disjoint_divisor: none`` for its ``normalize:
    false``, ``sign_test: weighted``). Defaults density 0.9, gamma 0.01 (mergekit's). ``rescale: l1`` scales
    each band to its task vector's L1 norm before the consensus, as :func:`breadcrumbs`:
    ``band(tau_i) * ||tau_i||_1 / ||band(tau_i)||_1``."""
    taus = banded(inp.task_vectors(), inp, p)
    sign = ops.elect_sign(taus, inp.weights, by=p.sign_election, zero=p.zero_sign)
    merged = ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor, test=p.sign_test)
    return _base(inp) + ops.scale(merged, p.lambda_)


def sce_selected(taus: list[torch.Tensor], p: SceParams) -> list[torch.Tensor]:
    """SCE's select step on the task vectors of one tensor (all of them when ``select_topk`` is 1)."""
    if p.select_topk >= 1.0 or taus[0].numel() == 0:
        return taus
    mask = ops.select_mask(ops.expert_variance(taus), p.select_topk)
    return [tau * mask for tau in taus]


def sce(inp: TensorInputs, p: SceParams) -> torch.Tensor:
    """SCE, select-calculate-erase (Wan et al. 2024, FuseChat, sec. 3.3; mergekit's ``sce``), per tensor:

    1. select: keep the ``floor(select_topk * #{var_j != 0})`` entries of largest variance across the task
       vectors, ``var_j = mean_i (tau_ij - mean_i tau_ij)^2`` (ties by position), zero the rest;
    2. calculate: ``w_i = E_i / sum_k E_k`` with ``E_i = mean_j tau_ij^2`` of the selected task vectors (block
       sums of float32 dots in float64, :func:`mergelab.ops.gram`); equal weights when all are zero (or below ``min_energy``;
       mergekit 1e-6);
    3. erase: the elected sign ``gamma = sgn(sum_i tau_i)`` (unweighted mass) and
       ``theta = theta_0 + sum_{i in A} w_i tau_i / sum_{i in A} w_i`` over the models agreeing with it.

    The models' own weights are not used (as mergekit). Default ``select_topk`` 1 (mergekit's; the paper
    treats it as a hyperparameter). Differences from mergekit: an exact tie of the sign sum elects 0 (mergekit
    +1), and ties of the variance at the cut are kept by position (mergekit: ``topk``'s order).
    """
    taus = sce_selected(inp.task_vectors(), p)
    numel = taus[0].numel()
    g = ops.gram(taus) if numel else [[0.0] * len(taus) for _ in taus]
    weights = ops.energy_weights([g[i][i] for i in range(len(taus))], numel, p.min_energy)
    sign = ops.elect_sign(taus, [1.0] * len(taus), by="mass", zero=p.zero_sign)
    return _base(inp) + ops.disjoint_mean(taus, sign, weights, divisor="weight")


def _sphere_inputs(inp: TensorInputs) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The vectors NuSLERP and Multi-SLERP interpolate: the task vectors when there is a base model (as
    mergekit with ``base_model``), else the models; and the origin to add back (the base, or None)."""
    if inp.base is not None:
        return inp.task_vectors(), _base(inp)
    return [e.to(inp.compute_dtype) for e in inp.experts], None


def nuslerp(inp: TensorInputs, p: NuSlerpParams) -> torch.Tensor:
    """NuSLERP (mergekit's ``nuslerp``): spherical interpolation of two models (or of their task vectors
    when a base is given, then added back) at ``t = w_1 / (w_0 + w_1)`` from the models' weights.

    ``slerp(v_0, v_1; t) = (sin((1-t) theta) v_0 + sin(t theta) v_1) / sin theta``, ``cos theta`` from the
    vectors normalised (norms clamped at 1e-7), linear where ``|sin theta| < 1e-8``
    (:func:`mergelab.ops.nuslerp_coefficients`). ``flatten`` (default, mergekit's): one angle per tensor,
    from the block Gram matrix (:func:`mergelab.ops.gram`); else one per row (``row_wise: false``, the last axis) or column. No paper:
    defaults are mergekit's.
    """
    vectors, origin = _sphere_inputs(inp)
    t = ops.nuslerp_t(inp.weights)
    if p.flatten or vectors[0].dim() < 2:
        c = ops.nuslerp_coefficients(ops.gram(vectors), t) if vectors[0].numel() else (1.0 - t, t)
        out = ops.combine(vectors, c)
    else:
        out = ops.nuslerp_rows(vectors[0], vectors[1], t, 0 if p.row_wise else -1)
    return out if origin is None else out.add_(origin)


def multislerp(inp: TensorInputs, p: MultiSlerpParams) -> torch.Tensor:
    """Multi-SLERP (Goddard 2025, "multislerp"; mergekit's ``multislerp``): barycentric interpolation of N
    models (or task vectors when a base is given, added back) on the hypersphere, at the weights ``w_i``.

    Unit vectors ``u_i = x_i / (|x_i| + eps)``, mean direction ``m = normalise(sum_i w_i u_i)``, the tangent
    mean at m mapped back, scaled by ``sum_i w_i |x_i|``; the tangent mean is zero, so the result is
    ``(sum_i w_i |x_i|) m`` (:func:`mergelab.ops.multislerp_coefficients`, from the block Gram matrix).
    Defaults ``normalize_weights: true``, ``eps: 1e-8`` (mergekit's).
    """
    vectors, origin = _sphere_inputs(inp)
    if len(vectors) == 1 or vectors[0].numel() == 0:
        out = vectors[0].clone()
    else:
        c = ops.multislerp_coefficients(ops.gram(vectors), inp.weights, normalize_weights=p.normalize_weights,
                                        eps=p.eps)
        out = ops.combine(vectors, c)
    return out if origin is None else out.add_(origin)


def karcher(inp: TensorInputs, p: KarcherParams) -> torch.Tensor:
    """Karcher mean (Karcher 1977; the Riemannian, or Frechet, mean on the unit sphere; mergekit's
    ``karcher``) of the models' directions, scaled by their weighted mean norm, per tensor:
    ``argmin_u sum_i alpha_i d(u, x_i/|x_i|)^2`` on the sphere (d the angle), by the fixed-point iteration of
    :func:`mergelab.ops.karcher_coefficients` (``max_iter`` 10, ``tol`` 1e-5: mergekit's defaults), times
    ``sum_i alpha_i |x_i|``, ``alpha_i = w_i / sum_j w_j``. On the models themselves (a base only supplies
    config files; mergekit averages the base too when it is listed among the models). With two models it is
    SLERP at ``t = alpha_2`` (test_methods).
    """
    vectors = [e.to(inp.compute_dtype) for e in inp.experts]
    if len(vectors) == 1 or vectors[0].numel() == 0:
        return vectors[0].clone()
    c = ops.karcher_coefficients(ops.gram(vectors), inp.weights, max_iter=p.max_iter, tol=p.tol)
    return ops.combine(vectors, c)


def nearswap(inp: TensorInputs, p: NearSwapParams) -> torch.Tensor:
    """NearSwap (alchemonaut 2024, the QuartetAnemoi-70B-t0.0001 merge; mergekit's ``nearswap``), entry by
    entry between the base ``a`` and the one model ``b``: ``w b + (1 - w) a``,
    ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)`` (:func:`mergelab.ops.nearswap`). Default t = 1e-4 (the value
    of the merge it was introduced with; mergekit requires t)."""
    return ops.nearswap(_base(inp), inp.experts[0].to(inp.compute_dtype), p.t)


def arcee_fusion(inp: TensorInputs, p: ArceeFusionParams) -> torch.Tensor:
    """Arcee Fusion (Arcee AI 2025; mergekit's ``arcee_fusion``): the base ``a`` takes the model ``b``'s
    value only at its most important entries.

    Importance ``s_ij = |b_ij - a_ij| KL(softmax(b_i) + 1e-8 || softmax(a_i) + 1e-8)`` per row i (the last
    axis; :func:`mergelab.ops.fusion_importance`); threshold ``median(s) + 1.5 (q3(s) - q1(s))`` with the
    quantiles ``sorted(s)[floor(q (n - 1))]`` (exact selection; mergekit samples 10^6 entries of larger
    tensors at random); ``theta = a + (b - a) [s >= threshold]``. No parameters (as mergekit).
    """
    a = _base(inp)
    b = inp.experts[0].to(inp.compute_dtype)
    if a.numel() == 0:
        return a.clone()
    a_rows, b_rows = ops.fusion_rows(a), ops.fusion_rows(b)
    importance = ops.fusion_importance(a_rows, b_rows, ops.fusion_row_divergence(a_rows, b_rows)).reshape(-1)
    q1, median, q3 = ops.kth_largest_many(importance, ops.quantile_ranks(importance.numel()))
    return ops.fusion_merge(a, b - a, importance.reshape(a.shape), ops.fusion_threshold(q1, median, q3))


def passthrough(inp: TensorInputs, p: PassthroughParams) -> torch.Tensor:
    """Passthrough (mergekit's ``passthrough``): the one model's tensor, times ``scale`` (default 1: a copy).
    Stacking layers of several models is the spec's ``slices`` (one model per slice: mergelab.merging.layout)."""
    x = inp.experts[0].to(inp.compute_dtype)
    return x.clone() if p.scale == 1.0 else x * p.scale


def ram_split(inp: TensorInputs, epsilon: float) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """RAM's split of one tensor (:mod:`mergelab.ops.overlap`): the task vectors ``tau_i``, the masks
    ``m_ij = |tau_ij| > epsilon`` and the counts ``c_j = sum_i m_ij``."""
    taus = inp.task_vectors()
    masks = ops.active_masks(taus, epsilon)
    return taus, masks, ops.active_count(masks, taus[0].dtype)


def ram(inp: TensorInputs, p: RamParams) -> torch.Tensor:
    """RAM, Reinforced Agent Merging (Yuan et al. 2026, arXiv 2601.13572; mergekit's ``ram``), entry by entry:

    ``theta = theta_0 + sum_i m_ij * (tau_ij if c_j = 1 else tau_ij / c_j)``, ``m_ij = [|tau_ij| > epsilon]``,
    ``c_j = sum_i m_ij``: an entry only one model changed keeps that model's change, an entry several changed
    takes their mean, an entry with ``|tau_ij| <= epsilon`` for every model stays at theta_0
    (:func:`mergelab.ops.overlap_merge`). Models changed by RL are sparse and mostly disjoint, and a plain
    average would divide each unique change by N. Default ``epsilon`` 1e-5: the authors' code
    (github.com/xiangchi-yuan/mrl, ``--threshold``) and mergekit. The models' weights are not used (as the paper
    and mergekit).
    """
    taus, masks, count = ram_split(inp, p.epsilon)
    return _base(inp) + ops.overlap_merge(taus, masks, count)


def ramplus_tl(inp: TensorInputs, p: RamPlusParams) -> torch.Tensor:
    """RAM+ with per-tensor ratios (mergekit's ``ramplus_tl``, "tensor-local"; Yuan et al. 2026,
    arXiv 2601.13572): RAM (:func:`ram`) with model i's unique entries scaled by

    ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``, ``rho_i = S_i / U_i``,

    ``S_i`` and ``U_i`` the numbers of this tensor's entries model i changed that others changed too (shared)
    and that only it changed (unique) (:func:`mergelab.ops.shared_unique_counts`,
    :func:`mergelab.ops.unique_scale`): a model whose changes overlap more lost more to the averaging, and its
    unique entries are boosted to compensate. Defaults ``r`` 0.1, ``alpha`` 0.2 (so ``lambda <= 1.02``) and
    ``epsilon`` 1e-5 are mergekit's. The paper's RAM+ (the authors' code, ``arm-r-v2``) counts S_i and U_i over
    the whole model and uses ``1 + (R - 1) min(rho_i, 1)`` with ``R`` 1.05 by default (1.2 in its README's
    example), i.e. ``r = R - 1``, ``alpha = 1`` in this formula; the whole-model ratio is not implemented here.
    """
    taus, masks, count = ram_split(inp, p.epsilon)
    scales = [ops.unique_scale(s, u, p.r, p.alpha) for s, u in ops.shared_unique_counts(masks, count)]
    return _base(inp) + ops.overlap_merge(taus, masks, count, scales)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("weight_average", "weighted mean of the models (model soup)", WeightAverageParams, weight_average,
               needs_base=False, weights_nonzero=True, linear=True, combination="mean"),
        Method("task_arithmetic", "theta_0 + lambda * sum of weighted task vectors", TaskArithmeticParams,
               task_arithmetic, linear=True, combination="sum",
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
        # issue 15: mergekit's further methods
        Method("della", "DELLA: magnitude-ranked drop (MAGPRUNE) and rescale, then TIES sign consensus",
               DellaParams, della, operator="della", per_model=("density", "epsilon"), sparsify=della_pruned,
               combination="disjoint_mean"),
        Method("della_linear", "DELLA's MAGPRUNE, then task arithmetic", DellaLinearParams, della_linear,
               operator="magprune", per_model=("density", "epsilon"), sparsify=della_pruned, combination="sum"),
        Method("breadcrumbs_ties", "breadcrumbs' band, then TIES sign consensus", BreadcrumbsTiesParams,
               breadcrumbs_ties, operator="breadcrumbs_ties", per_model=("density", "gamma"), sparsify=banded,
               combination="disjoint_mean"),
        Method("sce", "select by variance, weights from energy, erase minority signs (SCE)", SceParams, sce,
               uses_weights=False, combination="disjoint_mean"),
        Method("nuslerp", "spherical interpolation of two models at w_1/(w_0+w_1), optionally of task vectors",
               NuSlerpParams, nuslerp, needs_base=False, min_models=2, max_models=2,
               combination="interpolation"),
        Method("multislerp", "barycentric spherical interpolation of N models or task vectors", MultiSlerpParams,
               multislerp, needs_base=False, weights_nonzero=True, combination="interpolation"),
        Method("karcher", "Karcher (Riemannian) mean of the models' directions on the sphere", KarcherParams,
               karcher, needs_base=False, weights_nonzero=True, combination="interpolation"),
        Method("nearswap", "take the model's value where it is within t of the base", NearSwapParams, nearswap,
               max_models=1, uses_weights=False, combination="interpolation"),
        Method("arcee_fusion", "take the model's value at its outlying importance (Arcee Fusion)",
               ArceeFusionParams, arcee_fusion, max_models=1, uses_weights=False, combination="interpolation"),
        Method("passthrough", "copy the one model (times scale)", PassthroughParams, passthrough,
               needs_base=False, max_models=1, uses_weights=False, combination="mean"),
        Method("ram", "Reinforced Agent Merging: unique changes kept, shared changes averaged", RamParams, ram,
               uses_weights=False, combination="disjoint_mean"),
        Method("ramplus_tl", "RAM with unique changes rescaled by each model's per-tensor overlap ratio (RAM+)",
               RamPlusParams, ramplus_tl, uses_weights=False, combination="disjoint_mean"),
    )
}

MethodName = Literal[
    "weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "model_stock", "slerp",
    "tsv_merge", "iso_c", "iso_cts",
    "della", "della_linear", "breadcrumbs_ties", "sce", "nuslerp", "multislerp", "karcher", "nearswap",
    "arcee_fusion", "passthrough", "ram", "ramplus_tl",
]
