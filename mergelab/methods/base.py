"""What a data-free merging method is: a named per-tensor computation with validated parameters and traits.

A :class:`Method` declares its parameters (a pydantic model with the papers' defaults), its traits (needs a
base, how many models, per-model weights, linear or not, I/O- or CPU-bound, whole-model trim) and its
``reference``: the composition of :mod:`mergelab.ops` operators on whole tensors that *specifies* it. A
reference receives, for one tensor name, the base tensor, the experts' tensors and weights and the resolved
parameters (:class:`TensorInputs`), and returns the merged tensor in the compute dtype (float32, float64
if an input is float64). The merge back-ends (:mod:`mergelab.merging`) may register faster kernels for a
method (blocks, threads, numpy); each kernel is tested against the reference, and a back-end without a
kernel for a method runs its reference. The back-end handles everything around it: reading, validation,
whole-model statistics, dtype casting, writing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergelab.errors import SpecError

if TYPE_CHECKING:
    import torch


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown parameters are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class ScaledParams(MethodParams):
    lambda_: float = Field(1.0, alias="lambda", description="scaling coefficient of the merged task vector")

    @field_validator("lambda_")
    @classmethod
    def _lambda_finite(cls, v: float) -> float:
        return _finite(v, "lambda")


class DensityMixin(BaseModel):
    density: float = Field(description="fraction of task-vector entries kept, in (0, 1]")

    @field_validator("density")
    @classmethod
    def _density_range(cls, v: float) -> float:
        if not (0.0 < v <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {v}")
        return v


@dataclass
class TensorInputs:
    """Everything a method sees for one tensor.

    ``thresholds[i]`` is expert i's whole-model trim threshold when the method trims with global scope
    (computed by the engine's streaming pre-pass), else ``None``; ``tie_quotas[i]`` is how many of this
    tensor's entries tied at that threshold expert i keeps (so exactly k survive over the model).
    """

    name: str
    base: torch.Tensor | None
    experts: Sequence[torch.Tensor]
    weights: Sequence[float]
    thresholds: Sequence[float] | None = None
    compute_dtype: torch.dtype | None = None  # None: float32
    tie_quotas: Sequence[int] | None = None
    out_dtype: torch.dtype | None = None
    model_params: Sequence[Mapping[str, Any]] | None = None  # per-model parameters (Method.per_model)

    def __post_init__(self) -> None:
        if self.compute_dtype is None:
            # deferred: torch; the catalog (numpy 'mergelab merge', '--help') validates specs without it
            import torch

            self.compute_dtype = torch.float32

    @property
    def result_dtype(self) -> torch.dtype:
        """The dtype a method may return: ``out_dtype`` (the dtype the engine writes) when given, else
        ``compute_dtype``. Methods that compute in blocks round each block into it once."""
        return self.out_dtype if self.out_dtype is not None else self.compute_dtype

    def per_model(self, index: int, name: str, default: Any) -> Any:
        """Model ``index``'s own value of parameter ``name`` for this tensor (a spec's per-model
        ``parameters``), else ``default`` (the method's value)."""
        if self.model_params is None:
            return default
        return self.model_params[index].get(name, default)

    def task_vectors(self) -> list[torch.Tensor]:
        if self.base is None:
            raise SpecError("this method needs a base model")
        base = self.base.to(self.compute_dtype)
        return [e.to(self.compute_dtype) - base for e in self.experts]

    def generator(self, seed: int, index: int) -> torch.Generator:
        """A generator seeded by (seed, expert index, tensor name): reproducible whatever the tensor order."""
        # deferred: torch; the catalog (numpy 'mergelab merge', '--help') validates specs without it
        import torch

        digest = hashlib.blake2b(f"{seed}:{index}:{self.name}".encode(), digest_size=8).digest()
        return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@dataclass(frozen=True)
class Method:
    """A data-free merging method: parameters, traits and its reference composition of operators.

    Traits, read by the merge back-ends, diagnostics and the experiments (never listed anywhere else):

    - ``needs_base``, ``min_models``, ``max_models``, ``uses_weights``: what the model list must be;
      ``base_or_two``: with one model the base is the other end (SLERP); ``weights_nonzero``: the weights
      may not sum to zero (a weighted mean);
    - ``linear``: the output is a linear combination of the inputs with finite coefficients, so a NaN or
      Inf in any input always reaches the output (IEEE addition and multiplication never turn NaN/Inf back
      into a finite number): back-ends check only the output, and rescan a tensor's inputs to name the
      offending file when the output is not finite, instead of checking every input as it is read;
    - ``global_trim_density(params)``: the density at which a back-end must compute whole-model trim
      thresholds for a tensor (TIES with ``trim_scope: global``), or ``None``; the thresholds and tie quotas
      reach the method in :class:`TensorInputs`;
    - ``operator``: the name of the sparsification/consensus operator T the method applies to each task
      vector before combining them (:func:`mergelab.analysis.diagnostics.apply_operator`), or ``None``;
    - ``sparsify(taus, inputs, params)``: that operator's sparsification step (trim, drop, band, MAGPRUNE) on the task
      vectors of one tensor, as the reference applies it, or ``None``;
    - ``combination``: how the (sparsified) task vectors become the merge, as the bound's coefficients
      alpha_i see it (:func:`mergelab.analysis.merge_coefficients.merge_coefficients`): ``mean`` (``sum_i w_i
      theta_i / sum_i w_i``), ``sum`` (``theta_0 + lambda sum_i w_i tau_i``), ``disjoint_mean`` (TIES's sign
      consensus and mean over the agreeing models; the operator T then includes the consensus) or
      ``interpolation`` (between the base or models, about a mean: model stock, SLERP) or ``spectral``
      (the task matrices' singular subspaces with a re-weighted spectrum, about ``lambda sum_i w_i tau_i``
      on matrices and the mean elsewhere: TSV-Merge, Iso-C, Iso-CTS);
    - ``validation_grid``: the hyperparameters its paper chooses on validation data, with the candidates
      searched (``mergelab compare``'s default selection), or empty;
    - ``per_model``: the parameters a model may set for itself (``models[i].parameters`` in a spec, e.g. a
      density per expert as mergekit allows); the reference reads them with :meth:`TensorInputs.per_model`.
    """

    name: str
    summary: str
    params: type[MethodParams]
    reference: Callable[[TensorInputs, Any], torch.Tensor]
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    uses_weights: bool = True
    base_or_two: bool = False
    weights_nonzero: bool = False
    linear: bool = False
    global_trim_density: Callable[[Any], float | None] = field(default=lambda p: None)
    operator: str | None = None
    per_model: tuple[str, ...] = ()
    sparsify: Callable[[list[Any], TensorInputs, Any], list[Any]] | None = None
    combination: Combination = "sum"
    validation_grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def propagates_nonfinite(self) -> bool:
        """A NaN/Inf in any input always reaches the output (``linear``)."""
        return self.linear

    def whole_model_trim(self, params: Any) -> bool:
        """Whether, with ``params``, the method trims over the whole model (needs the thresholds pre-pass)."""
        return self.global_trim_density(params) is not None

    def parse_params(self, raw: dict[str, Any], where: str = "parameters") -> MethodParams:
        """Validate ``raw`` against this method's parameters; a clear :class:`SpecError` otherwise."""
        allowed = sorted(
            (f.alias or n) for n, f in self.params.model_fields.items()
        )
        unknown = sorted(set(raw) - set(allowed) - set(self.params.model_fields))
        if unknown:
            raise SpecError(
                f"{where}: method '{self.name}' does not take parameter(s) {', '.join(map(repr, unknown))}; "
                f"it takes: {', '.join(allowed) if allowed else 'no parameters'}"
            )
        try:
            return self.params.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(  # field: message (got value), as training specs' errors
                f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
                + (f" (got {err['input']!r})" if err["loc"] and "got " not in err["msg"]
                   and not isinstance(err.get("input", {}), Mapping) else "")
                for err in exc.errors()
            )
            raise SpecError(f"{where}: invalid parameter for method '{self.name}': {problems}") from None


Combination = Literal["mean", "sum", "disjoint_mean", "interpolation", "spectral"]
SignElection = Literal["mass", "count"]
ZeroSign = Literal["drop", "positive"]
DisjointDivisor = Literal["count", "weight", "none"]
SignTest = Literal["tau", "weighted"]
TrimScope = Literal["global", "tensor"]
RescaleRule = Literal["inverse", "l1", "none"]
TrimRescale = Literal["none", "l1"]
