"""Data-free pool diagnostics: how much a pool of task vectors interferes, measured tensor by tensor.

Notation: base theta_0, experts theta_i (i = 1..N), task vectors tau_i = theta_i - theta_0, all flattened;
``tau_i[l]`` is the part of ``tau_i`` in tensor (layer) ``l``. Every quantity below is a sum over
coordinates, so it is accumulated tensor by tensor (and chunk by chunk inside a tensor) and the whole-model
value is the sum of the per-layer values: memory is one tensor of each expert at a time, never N models.

Raw sums kept per layer (:class:`PoolStats`), from which everything else is derived:

- Gram matrix ``G_ij = <tau_i, tau_j>``; norms ``||tau_i|| = sqrt(G_ii)``; cosine ``G_ij / (||tau_i|| ||tau_j||)``;
- pairwise sign conflict: ``both_ij = #{k : tau_ik != 0, tau_jk != 0}`` ("both change"),
  ``disagree_ij = #{k : tau_ik tau_jk < 0}``; rate ``disagree_ij / both_ij``. With ``s = sgn(tau)``:
  ``both = |s| |s|^T`` and ``disagree = (both - s s^T) / 2``;
- pool sign conflict: among the coordinates where at least two experts are nonzero, the fraction where the
  nonzero signs are not all equal;
- dispersion (heterogeneity) around the consensus mean ``bar tau = (1/N) sum_j tau_j``:
  ``D = sum_i ||tau_i - bar tau||^2 = sum_i ||tau_i||^2 - N ||bar tau||^2``, and its normalised form
  ``D / sum_i ||tau_i||^2`` in ``[0, 1]`` (0: identical task vectors; ``1 - 1/N``: orthogonal ones of
  equal norm; 1: task vectors summing to zero). The mean is unweighted (the merge weights only enter the
  mass sign election), matching THEORY.md's empirical heterogeneity.

The empirical ``Delta_T`` of Corollary 1 (THEORY.md, section 1): for an operator ``T`` applied to every task
vector, ``D_T = sum_i ||T(tau_i) - (1/N) sum_j T(tau_j)||^2`` and ``Delta_T = D - D_T``. Operators measured
(:data:`OPERATORS`; all per tensor unless ``trim_scope="global"``):

- ``sign``: sign consensus alone: zero every coordinate whose sign disagrees with the elected sign
  ``gamma = sgn(sum_i w_i tau_i)`` (mass election; ``count`` optional), as TIES's disjoint merge does;
- ``trim``: TIES magnitude trim alone (keep the top ``density`` fraction of ``|tau_i|``);
- ``ties``: trim, then sign consensus on the trimmed vectors (the TIES operator);
- ``dare``: DARE random drop with ``1/density`` rescale (seeded exactly as the ``dare_*`` merge methods);
- ``dare_ties``: DARE drop, then sign consensus;
- ``breadcrumbs``: :func:`mergelab.ops.trim_band` (drop the top ``gamma`` outliers and the small entries);
- ``magprune``: DELLA's MAGPRUNE (:func:`mergelab.ops.magprune`: a random drop whose probability falls with the
  entry's magnitude rank in its row, window ``della_epsilon``, rescaled; seeded as the ``della*`` merges);
- ``della``: MAGPRUNE, then sign consensus (DELLA-Merging);
- ``breadcrumbs_ties``: the breadcrumbs band, then sign consensus.

What is and is not guaranteed (the honest reading of Corollary 1 for this dispersion measure):

* **Sign consensus never increases the dispersion, coordinate by coordinate.** Fix one coordinate with
  values ``x_1..x_N``, ``S = sum_i x_i``. Then ``D(x) = sum_i x_i^2 - S^2 / N``. Zeroing a set ``Z`` of
  entries changes it by ``D(x) - D(y) = sum_{i in Z} x_i^2 + (S_Z^2 - 2 S S_Z) / N`` with ``S_Z`` the sum
  over ``Z``. If ``Z`` is every entry of one sign, say the negative ones with total ``-M`` and the positive
  ones summing to ``P`` (``S = P - M``), this is ``sum_Z x_i^2 + M (2P - M) / N``. By Cauchy-Schwarz
  ``sum_Z x_i^2 >= M^2 / |Z| >= M^2 / N``, so ``D(x) - D(y) >= 2 P M / N >= 0``. This holds whichever sign is
  removed, hence for mass or count election with any positive weights; an exact tie elects 0 and zeroes
  the coordinate (``D(y) = 0``). Summing over coordinates gives ``Delta_sign >= 0`` for every layer and the
  whole model, and likewise ``D(ties) <= D(trim)``, ``D(dare_ties) <= D(dare)``, ``D(della) <= D(magprune)``
  and ``D(breadcrumbs_ties) <= D(breadcrumbs)``.
* **Magnitude trimming alone can increase the dispersion.** Zeroing entries of the *same* sign is not
  covered by the argument: two experts ``(1.0, 0.9)`` and ``(0.9, 1.0)`` have ``D = 0.01``; trimming each to
  its top half gives ``(1, 0)`` and ``(0, 1)`` with ``D = 1``. So ``Delta_ties`` can be negative when
  trimming makes agreeing experts disjoint; the report shows the measured value, not the corollary's sign.
* **DARE with the ``1/density`` rescale increases the dispersion in expectation**: with independent masks,
  ``E[D_dare] = D + (1/density - 1)(1 - 1/N) sum_i ||tau_i||^2`` (each rescaled entry gains variance
  ``x^2 (1/density - 1)``). Its measured ``Delta_T`` is therefore typically negative; the drop is unbiased
  (``E[drop(tau)] = tau``) but not a dispersion-reducing operator in this sense. MAGPRUNE is the same drop
  with a keep probability ``q_j`` per entry and rescale ``1/q_j``: each kept entry gains variance
  ``x_j^2 (1/q_j - 1)``, so the same holds with ``1/density`` replaced entry by entry.

Exact zeros count as "unchanged" for the sign statistics; task vectors are computed as the merge engine
computes them (float32, float64 if an input is float64) and all sums are accumulated in float64.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from mergelab import ops
from mergelab.checkpoints import TensorInfo, open_checkpoint
from mergelab.merging.torch_backend import TorchInputs, compute_dtype, global_thresholds, resolve_device
from mergelab.errors import MergeLabError, SpecError
from mergelab.methods import METHODS, Method, TensorInputs, get_method
from mergelab.methods.catalog import della_pruned

log = logging.getLogger(__name__)

OperatorName = Literal["sign", "trim", "ties", "dare", "dare_ties", "breadcrumbs", "magprune", "della",
                       "breadcrumbs_ties"]

#: The methods of the catalog with a Corollary-1 operator T (``Method.operator``), by operator name.
METHOD_OF_OPERATOR: dict[str, Method] = {m.operator: m for m in METHODS.values() if m.operator is not None}
#: The operators T whose dispersion reduction Delta_T is measured, in report order: the sign consensus and
#: TIES's trim alone, then every catalog method's operator (derived from the catalog, never listed here).
OPERATORS: tuple[str, ...] = ("sign", "trim", *METHOD_OF_OPERATOR)

def _is_magprune(op: str) -> bool:
    """Whether the operator ``op`` sparsifies with DELLA's MAGPRUNE (its catalog step is ``della_pruned``)."""
    method = METHOD_OF_OPERATOR.get(op)
    return method is not None and method.sparsify is della_pruned


#: One-line description of each operator, for tables.
OPERATOR_DESCRIPTIONS: dict[str, str] = {
    "sign": "sign consensus only: zero coordinates disagreeing with the elected sign",
    "trim": "TIES magnitude trim only (keep top density |tau|)",
    "ties": "TIES: trim, then sign consensus",
    "dare": "DARE: random drop, rescale 1/density",
    "dare_ties": "DARE drop, then sign consensus",
    "breadcrumbs": "breadcrumbs: drop top-gamma outliers and small entries",
    "magprune": "DELLA's MAGPRUNE: magnitude-ranked random drop, rescale 1/keep probability",
    "della": "DELLA: MAGPRUNE, then sign consensus",
    "breadcrumbs_ties": "breadcrumbs band, then sign consensus",
}

#: What is proven about D_T (see the module docstring): ``sign`` never increases D, coordinate by
#: coordinate; ``ties`` and ``dare_ties`` never exceed the dispersion after their sparsification step.
OPERATOR_GUARANTEES: dict[str, str] = {
    "sign": "D_T <= D (per coordinate)",
    "trim": "none: can increase D",
    "ties": "D_T <= D(trim) only",
    "dare": "none: E[D_T] = D + (1/d - 1)(1 - 1/N) sum ||tau_i||^2",
    "dare_ties": "D_T <= D(dare) only",
    "breadcrumbs": "none: can increase D",
    "magprune": "none: E[D_T] > D, as DARE's (rescale 1/q_j per entry)",
    "della": "D_T <= D(magprune) only",
    "breadcrumbs_ties": "D_T <= D(breadcrumbs) only",
}

_CHUNK = 1 << 20  # coordinates per statistics chunk: N * 8 MB of float64 per chunk


# ----------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Parameters of the operators whose dispersion reduction is measured.

    ``density`` is shared by trim, DARE, MAGPRUNE and breadcrumbs so their Delta_T compare at equal sparsity;
    ``della_epsilon`` and ``della_spacing`` are MAGPRUNE's window and rank spacing as the ``della*`` methods
    take them: keep probabilities ``density +- della_epsilon / 2`` (``paper``, full width) or ``density +-
    della_epsilon`` (``mergekit``, half width). When that window leaves ``(0, 1]`` at this density, the MAGPRUNE
    operators are left out of the default operator set (a warning says so) and refused when named.
    ``trim_scope``: ``tensor`` trims each tensor separately (one streaming pass, as mergekit); ``global``
    finds each expert's whole-model threshold first with the engine's two streaming passes (the TIES paper,
    and mergelab's ``ties`` default). ``seed`` seeds DARE exactly like the ``dare_linear``/``dare_ties``
    merges (per seed, expert index and tensor name), so the measured drop is the one a merge would apply.
    ``dare_rescale`` is DARE's and MAGPRUNE's rescaling, ``trim_rescale`` the trim's and breadcrumbs' band's
    (``none``, the papers', or mergekit's ``l1``: the methods' ``rescale`` parameter).
    """

    density: float = 0.2
    trim_scope: Literal["tensor", "global"] = "tensor"
    sign_election: Literal["mass", "count"] = "mass"
    dare_rescale: Literal["inverse", "l1", "none"] = "inverse"
    trim_rescale: Literal["none", "l1"] = "none"
    breadcrumbs_gamma: float = 0.01
    della_epsilon: float = 0.1
    della_spacing: Literal["paper", "mergekit"] = "paper"
    seed: int = 0
    operators: tuple[str, ...] = OPERATORS

    def __post_init__(self) -> None:
        if not (0.0 < self.density <= 1.0) or math.isnan(self.density):
            raise SpecError(f"density must be in (0, 1], got {self.density}")
        if self.trim_scope not in ("tensor", "global"):
            raise SpecError(f"trim_scope must be 'tensor' or 'global', got {self.trim_scope!r}")
        if self.sign_election not in ("mass", "count"):
            raise SpecError(f"sign_election must be 'mass' or 'count', got {self.sign_election!r}")
        if self.dare_rescale not in ("inverse", "l1", "none"):
            raise SpecError(f"dare_rescale must be 'inverse', 'l1' or 'none', got {self.dare_rescale!r}")
        if self.trim_rescale not in ("none", "l1"):
            raise SpecError(f"trim_rescale must be 'none' or 'l1', got {self.trim_rescale!r}")
        if not (0.0 <= self.breadcrumbs_gamma < 1.0):
            raise SpecError(f"breadcrumbs_gamma must be in [0, 1), got {self.breadcrumbs_gamma}")
        unknown = [op for op in self.operators if op not in OPERATORS]
        if unknown:
            raise SpecError(f"unknown operator(s) {unknown}; available: {', '.join(OPERATORS)}")
        if not (self.della_epsilon >= 0.0 and math.isfinite(self.della_epsilon)):
            raise SpecError(f"della_epsilon must be finite and >= 0, got {self.della_epsilon}")
        if self.della_spacing not in ("paper", "mergekit"):
            raise SpecError(f"della_spacing must be 'paper' or 'mergekit', got {self.della_spacing!r}")
        half = self.della_epsilon / 2.0 if self.della_spacing == "paper" else self.della_epsilon
        if self.density < 1.0 and not (self.density - half > 0.0 and self.density + half <= 1.0):
            magprune = [op for op in self.operators if _is_magprune(op)]
            if magprune and tuple(self.operators) == OPERATORS:
                log.warning("density %g with della_epsilon %g puts MAGPRUNE's keep probabilities outside (0, 1]: "
                            "operators %s not measured", self.density, self.della_epsilon, ", ".join(magprune))
                object.__setattr__(self, "operators", tuple(op for op in self.operators if not _is_magprune(op)))
            elif magprune:
                raise SpecError(f"operators {magprune}: density {self.density} +- {half:g} (della_epsilon "
                                f"{self.della_epsilon}, spacing {self.della_spacing}) leaves (0, 1]; lower della_epsilon")

    def to_dict(self) -> dict[str, Any]:
        return {
            "density": self.density,
            "trim_scope": self.trim_scope,
            "sign_election": self.sign_election,
            "dare_rescale": self.dare_rescale,
            "trim_rescale": self.trim_rescale,
            "breadcrumbs_gamma": self.breadcrumbs_gamma,
            "della_epsilon": self.della_epsilon,
            "della_spacing": self.della_spacing,
            "seed": self.seed,
            "operators": list(self.operators),
        }


# ----------------------------------------------------------------------------- tensor-level functions


def coordinate_dispersion(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-coordinate dispersion ``sum_i (tau_i - bar tau)^2`` with ``bar tau = (1/N) sum_j tau_j``, in float64.

    Summing it over all coordinates gives the pool dispersion ``D``.
    """
    if len(taus) == 0:
        raise ValueError("need at least one task vector")
    stack = torch.stack([t.to(torch.float64) for t in taus])
    return (stack - stack.mean(dim=0)).square().sum(dim=0)


def sign_consensus(
    taus: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *, by: Literal["mass", "count"] = "mass"
) -> list[torch.Tensor]:
    """Zero, in each task vector, the coordinates whose sign disagrees with the elected sign.

    ``gamma = elect_sign(taus, weights, by)`` (:func:`mergelab.ops.elect_sign`: ``sgn(sum_i w_i tau_i)`` for
    ``mass``), then ``T(tau_i)_k = tau_ik if sgn(tau_ik) = gamma_k else 0``. An exact tie elects 0 and every
    task vector is zeroed there, consistent with :func:`mergelab.ops.disjoint_mean`. Never increases the
    per-coordinate dispersion (argument in the module docstring).
    """
    gamma = ops.elect_sign(taus, weights, by=by)
    return [torch.where(torch.sign(t) == gamma, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in taus]


def apply_operator(
    op: str,
    taus: Sequence[torch.Tensor],
    weights: Sequence[float],
    config: DiagnosticsConfig,
    *,
    name: str = "",
    thresholds: Sequence[float] | None = None,
    ties: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """``[T(tau_1), ..., T(tau_N)]`` for the operator ``op`` (see :data:`OPERATORS`) on one tensor.

    ``thresholds`` are the experts' whole-model trim thresholds (``trim_scope="global"``), else ``None``
    (per-tensor trimming). ``name`` is the tensor name, which seeds DARE's masks as the merge methods do.
    """
    if op == "sign":
        return sign_consensus(taus, weights, by=config.sign_election)
    method = get_method("ties") if op == "trim" else METHOD_OF_OPERATOR.get(op)
    if method is None or method.sparsify is None:
        raise ValueError(f"unknown operator {op!r}; available: {', '.join(OPERATORS)}")
    # the method's parameters from the configuration (one density for every operator), and its own
    # sparsification step from the catalog, as its reference applies it
    settings = {"density": config.density, "trim_scope": "tensor" if thresholds is None else "global",
                "sign_election": config.sign_election,
                "gamma": config.breadcrumbs_gamma, "epsilon": config.della_epsilon,
                "spacing": config.della_spacing, "seed": config.seed}
    if "rescale" in method.params.model_fields:  # the random drops' rescale, or the trim's and band's
        settings["rescale"] = config.dare_rescale if method.name.startswith(("dare", "della")) else config.trim_rescale
    fields = {f.alias or n for n, f in method.params.model_fields.items()}
    params = method.parse_params({k: v for k, v in settings.items() if k in fields})
    inputs = TensorInputs(name=name, base=None, experts=[], weights=list(weights), thresholds=thresholds,
                          tie_quotas=None if thresholds is None else ties)
    out = method.sparsify(list(taus), inputs, params)
    if op != "trim" and method.combination == "disjoint_mean":
        return sign_consensus(out, weights, by=config.sign_election)
    return out


# ------------------------------------------------------------------------------------------ statistics


def _nan_div(a: np.ndarray | float, b: np.ndarray | float) -> Any:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(b) != 0, np.asarray(a, dtype=np.float64) / np.where(np.asarray(b) != 0, b, 1), np.nan)


@dataclass
class OperatorStats:
    """Raw sums after an operator T: ``D_T``, ``||T(tau_i)||^2`` and the nonzero count of each ``T(tau_i)``."""

    dispersion: float
    sqnorms: np.ndarray
    nonzero: np.ndarray

    @classmethod
    def empty(cls, n: int) -> OperatorStats:
        return cls(0.0, np.zeros(n), np.zeros(n, dtype=np.int64))

    def add_(self, other: OperatorStats) -> OperatorStats:
        self.dispersion += other.dispersion
        self.sqnorms = self.sqnorms + other.sqnorms
        self.nonzero = self.nonzero + other.nonzero
        return self


@dataclass
class PoolStats:
    """Additive raw sums over a set of coordinates (one tensor, or the whole model); see the module docstring.

    ``gram`` (N x N), ``changed`` (N: nonzero entries of each tau_i), ``both_changed`` and ``disagree``
    (N x N counts), ``multi`` (coordinates with >= 2 nonzero experts), ``conflict`` (those whose nonzero signs
    are not all equal), ``conflict_chance`` (the sum over those coordinates of ``1 - 2^(1-k)``, k the number of
    nonzero experts there: the conflicts expected if signs were independent fair coins), ``dispersion`` (D),
    ``operators`` (``OperatorStats`` per operator). Two ``PoolStats`` over disjoint coordinates add up
    (``add_``).
    """

    n_experts: int
    numel: int = 0
    gram: np.ndarray = field(default=None)  # type: ignore[assignment]
    changed: np.ndarray = field(default=None)  # type: ignore[assignment]
    both_changed: np.ndarray = field(default=None)  # type: ignore[assignment]
    disagree: np.ndarray = field(default=None)  # type: ignore[assignment]
    multi: int = 0
    conflict: int = 0
    conflict_chance: float = 0.0
    dispersion: float = 0.0
    operators: dict[str, OperatorStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.n_experts
        if self.gram is None:
            self.gram = np.zeros((n, n))
        if self.changed is None:
            self.changed = np.zeros(n, dtype=np.int64)
        if self.both_changed is None:
            self.both_changed = np.zeros((n, n), dtype=np.int64)
        if self.disagree is None:
            self.disagree = np.zeros((n, n), dtype=np.int64)

    def add_(self, other: PoolStats) -> PoolStats:
        """Add the sums of ``other`` (disjoint coordinates) into ``self``; returns ``self``."""
        if other.n_experts != self.n_experts:
            raise ValueError("cannot add statistics of pools of different sizes")
        self.numel += other.numel
        self.gram = self.gram + other.gram
        self.changed = self.changed + other.changed
        self.both_changed = self.both_changed + other.both_changed
        self.disagree = self.disagree + other.disagree
        self.multi += other.multi
        self.conflict += other.conflict
        self.conflict_chance += other.conflict_chance
        self.dispersion += other.dispersion
        for op, st in other.operators.items():
            mine = self.operators.setdefault(op, OperatorStats.empty(self.n_experts))
            mine.add_(st)
        return self

    # --- derived quantities ---------------------------------------------------------------------------

    @property
    def sqnorms(self) -> np.ndarray:
        """``||tau_i||^2`` per expert."""
        return np.diag(self.gram).copy()

    @property
    def norms(self) -> np.ndarray:
        """``||tau_i||`` per expert."""
        return np.sqrt(np.maximum(self.sqnorms, 0.0))

    @property
    def total_sqnorm(self) -> float:
        """``sum_i ||tau_i||^2``."""
        return float(np.trace(self.gram))

    def cosine(self) -> np.ndarray:
        """``cos(tau_i, tau_j) = G_ij / (||tau_i|| ||tau_j||)``; NaN where a task vector is zero."""
        n = self.norms
        return _nan_div(self.gram, np.outer(n, n))

    def mean_cosine(self) -> float:
        """Mean of the off-diagonal cosines (NaN if N < 2 or all undefined)."""
        c = self.cosine()
        off = c[~np.eye(self.n_experts, dtype=bool)]
        off = off[~np.isnan(off)]
        return float(off.mean()) if off.size else math.nan

    def pairwise_conflict(self) -> np.ndarray:
        """``disagree_ij / both_ij``: sign disagreement among the coordinates both experts change (NaN if none)."""
        return _nan_div(self.disagree, self.both_changed)

    def mean_pairwise_conflict(self) -> float:
        c = self.pairwise_conflict()
        off = c[~np.eye(self.n_experts, dtype=bool)]
        off = off[~np.isnan(off)]
        return float(off.mean()) if off.size else math.nan

    @property
    def pool_conflict_rate(self) -> float:
        """Among coordinates where >= 2 experts are nonzero, the fraction whose nonzero signs are not all equal."""
        return float(_nan_div(self.conflict, self.multi))

    @property
    def pool_conflict_chance(self) -> float:
        """The pool conflict rate expected if the nonzero signs were independent fair coins (same support):
        ``mean over multi-changed coordinates of 1 - 2^(1-k)``. It grows with N (0.5 for N = 2, 0.75 for
        three nonzero experts), so compare :attr:`pool_conflict_rate` with it, not across pool sizes."""
        return float(_nan_div(self.conflict_chance, self.multi))

    @property
    def normalized_dispersion(self) -> float:
        """``D / sum_i ||tau_i||^2`` (NaN when every task vector is zero)."""
        return float(_nan_div(self.dispersion, self.total_sqnorm))

    def dispersion_after(self, op: str) -> float:
        return self.operators[op].dispersion

    def delta(self, op: str) -> float:
        """``Delta_T = D - D_T`` (positive: T reduced the dispersion)."""
        return self.dispersion - self.operators[op].dispersion

    def relative_delta(self, op: str) -> float:
        """``Delta_T / D``: the fraction of the dispersion removed by T (negative: T increased it)."""
        return float(_nan_div(self.delta(op), self.dispersion))

    def kept_fraction(self, op: str) -> float:
        """Nonzero entries after T over nonzero entries before, summed over experts."""
        return float(_nan_div(self.operators[op].nonzero.sum(), self.changed.sum()))

    def summary(self) -> dict[str, Any]:
        """Scalar figures and per-expert / pairwise arrays of these coordinates, JSON-ready."""
        return {
            "numel": self.numel,
            "norms": self.norms.tolist(),
            "sqnorm_total": self.total_sqnorm,
            "cosine": self.cosine().tolist(),
            "mean_cosine": self.mean_cosine(),
            "pairwise_conflict": self.pairwise_conflict().tolist(),
            "mean_pairwise_conflict": self.mean_pairwise_conflict(),
            "pool_conflict_rate": self.pool_conflict_rate,
            "coords_multi_changed": self.multi,
            "coords_conflicting": self.conflict,
            "pool_conflict_chance": self.pool_conflict_chance,
            "changed_fraction": (self.changed / self.numel).tolist() if self.numel else [],
            "dispersion": self.dispersion,
            "normalized_dispersion": self.normalized_dispersion,
            "operators": {
                op: {
                    "dispersion_after": st.dispersion,
                    "delta": self.delta(op),
                    "relative_delta": self.relative_delta(op),
                    "kept_fraction": self.kept_fraction(op),
                    "norms_after": np.sqrt(np.maximum(st.sqnorms, 0.0)).tolist(),
                }
                for op, st in self.operators.items()
            },
        }


def _blocks(
    taus: Sequence[torch.Tensor], chunk: int, *, signs: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Coordinate blocks of the flattened task vectors: an (N, <= chunk) float64 copy of the values and,
    with ``signs``, an (N, <= chunk) float32 ``sgn``. The two buffers are allocated once and reused, so a
    block is only valid until the next one is produced."""
    flat = [t.reshape(-1) for t in taus]
    n, numel = len(flat), flat[0].numel()
    width = min(chunk, numel)
    values = torch.empty(n, width, dtype=torch.float64, device=flat[0].device)
    sgn = torch.empty(n, width, dtype=torch.float32, device=flat[0].device) if signs else None
    for start in range(0, numel, chunk):
        m = min(chunk, numel - start)
        for i, f in enumerate(flat):
            piece = f[start : start + m]
            values[i, :m].copy_(piece)
            if sgn is not None:
                sgn[i, :m].copy_(torch.sign(piece))
        yield values[:, :m], (None if sgn is None else sgn[:, :m])


def _block_stats(x: torch.Tensor, s: torch.Tensor) -> PoolStats:
    """Raw sums of one block: values ``x`` (N, m) float64 and signs ``s`` (N, m) float32 (m <= 2**24, so the
    float32 sign counts are exact integers).

    ``both = |s| |s|^T`` (its diagonal: each expert's nonzero count), ``disagree = (both - s s^T) / 2``; with
    ``k = sum_i |s_i|`` and ``net = sum_i s_i`` per coordinate, a coordinate conflicts iff ``|net| < k`` (which
    implies k >= 2). ``D = sum_i ||x_i||^2 - ||sum_i x_i||^2 / N`` (algebraically ``sum_i ||x_i - bar x||^2``;
    float64 rounding ~1e-16 of ``sum_i ||x_i||^2``; clamped at 0).
    """
    n = x.shape[0]
    gram = x @ x.T
    total = torch.ones(1, n, dtype=x.dtype, device=x.device) @ x
    a = s.abs()
    both = a @ a.T
    agree_minus_disagree = s @ s.T
    ones = torch.ones(1, n, dtype=s.dtype, device=s.device)
    k = (ones @ a).squeeze(0)
    net = (ones @ s).squeeze(0)
    counts = torch.bincount(k.to(torch.int64), minlength=n + 1).cpu().numpy()
    ks = np.arange(n + 1)
    chance = float((counts[2:] * (1.0 - np.exp2(1.0 - ks[2:]))).sum())
    both_np = both.round().long().cpu().numpy()
    return PoolStats(
        n_experts=n,
        numel=x.shape[1],
        gram=gram.cpu().numpy(),
        changed=np.diag(both_np).copy(),
        both_changed=both_np,
        disagree=((both - agree_minus_disagree) / 2).round().long().cpu().numpy(),
        multi=int(counts[2:].sum()),
        conflict=int((net.abs() < k).sum()),
        conflict_chance=chance,
        dispersion=max(0.0, float(gram.trace() - total.square().sum() / n)),
    )


def _block_operator_stats(y: torch.Tensor) -> OperatorStats:
    """``D_T`` and ``||T(tau_i)||^2`` of one (N, m) float64 block of operator outputs (nonzero counts: 0)."""
    n = y.shape[0]
    sq = torch.linalg.vector_norm(y, dim=1).square()
    total = torch.ones(1, n, dtype=y.dtype, device=y.device) @ y
    return OperatorStats(
        dispersion=max(0.0, float(sq.sum() - total.square().sum() / n)),
        sqnorms=sq.cpu().numpy(),
        nonzero=np.zeros(n, dtype=np.int64),
    )


#: Operators that are "sparsify, then sign consensus", and their sparsification step measured alone: TIES's
#: trim, and for the others the operator of the catalog method with the same sparsification and no consensus
#: (``dare_ties``: ``dare``, ``della``: ``magprune``, ``breadcrumbs_ties``: ``breadcrumbs``).
_CONSENSUS_OF: dict[str, str] = {"ties": "trim", **{
    m.operator: alone.operator
    for m in METHOD_OF_OPERATOR.values() if m.combination == "disjoint_mean" and m.operator != "ties"
    for alone in METHOD_OF_OPERATOR.values()
    if alone.sparsify is m.sparsify and alone.combination != "disjoint_mean"
}}


def tensor_stats(
    taus: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    config: DiagnosticsConfig | None = None,
    *,
    name: str = "",
    thresholds: Sequence[float] | None = None,
    ties: Sequence[int] | None = None,
    chunk: int = _CHUNK,
) -> PoolStats:
    """All raw sums (:class:`PoolStats`) of one tensor's task vectors, operators included.

    When both a sparsification and its consensus variant are measured (``trim`` and ``ties``, ``dare`` and
    ``dare_ties``, ``magprune`` and ``della``, ``breadcrumbs`` and ``breadcrumbs_ties``), the sparsified vectors
    are computed once and reused. Peak memory: the N task vectors, at
    most two operators' N outputs, and two (N, ``chunk``) blocks (float64 values, float32 signs).
    """
    if not 1 <= chunk <= 1 << 24:
        raise ValueError(f"chunk must be in [1, 2**24] (float32 sign counts are exact up to 2**24), got {chunk}")
    config = config or DiagnosticsConfig()
    n = len(taus)
    weights = [1.0] * n if weights is None else list(weights)
    stats = PoolStats(n_experts=n)
    if taus[0].numel() == 0:
        for op in config.operators:
            stats.operators[op] = OperatorStats.empty(n)
        return stats
    for x, s in _blocks(taus, chunk, signs=True):
        stats.add_(_block_stats(x, s))  # type: ignore[arg-type]
    reuse: dict[str, list[torch.Tensor]] = {}
    ops_list = list(config.operators)
    for pos, op in enumerate(ops_list):
        step = _CONSENSUS_OF.get(op)
        if step is not None and step in reuse:
            outs = sign_consensus(reuse.pop(step), weights, by=config.sign_election)
        else:
            outs = apply_operator(op, taus, weights, config, name=name, thresholds=thresholds, ties=ties)
        if any(_CONSENSUS_OF.get(later) == op for later in ops_list[pos + 1 :]):
            reuse[op] = outs
        acc = OperatorStats.empty(n)
        for y, _ in _blocks(outs, chunk, signs=False):
            acc.add_(_block_operator_stats(y))
        acc.nonzero = np.array([int(torch.count_nonzero(o)) for o in outs], dtype=np.int64)
        stats.operators[op] = acc
        del outs
    return stats


# --------------------------------------------------------------------------------------------- inputs


class _MemoryCheckpoint:
    """A state dict in memory, presented with the reader interface the engine's input checks use."""

    def __init__(self, state: Mapping[str, torch.Tensor], label: str) -> None:
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise MergeLabError(f"{label}: not a state dict of named tensors (bad entries: {bad[:5]})")
        self.path = Path(label)
        self.files = [self.path]
        self.config_dir = None
        self._state = dict(state)

    def keys(self) -> list[str]:
        return list(self._state)

    def info(self, name: str) -> TensorInfo:
        t = self._state[name]
        return TensorInfo(name, tuple(t.shape), t.dtype, self.path)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]

    def close(self) -> None:
        pass


Source = str | Path | Mapping[str, torch.Tensor]


def _open(source: Source, label: str) -> Any:
    if isinstance(source, Mapping):
        return _MemoryCheckpoint(source, label)
    return open_checkpoint(source)


def _open_pool(base: Source, experts: Sequence[Source], labels: Sequence[str]) -> TorchInputs:
    """Open ``base`` and ``experts`` (paths or in-memory state dicts named ``<label>``) and validate them
    against each other exactly as a merge does (keys, shapes, float-vs-integer; NaN/Inf on read), as the
    torch back-end's :class:`~mergelab.merging.torch_backend.TorchInputs`."""
    return TorchInputs.from_openers(partial(_open, base, "<base>"),
                                    [partial(_open, source, f"<{label}>") for source, label in zip(experts, labels)])


# ------------------------------------------------------------------------------------------- results


@dataclass
class LayerDiagnostics:
    """The diagnostics of one tensor: its name, shape and raw sums."""

    name: str
    shape: tuple[int, ...]
    stats: PoolStats

    def row(self) -> dict[str, Any]:
        """A flat table row: name, size, norms, conflict rates, dispersion and each operator's Delta_T."""
        s = self.stats
        out: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "numel": s.numel,
            "norms": s.norms.tolist(),
            "mean_cosine": s.mean_cosine(),
            "pool_conflict_rate": s.pool_conflict_rate,
            "mean_pairwise_conflict": s.mean_pairwise_conflict(),
            "coords_conflicting": s.conflict,
            "dispersion": s.dispersion,
            "normalized_dispersion": s.normalized_dispersion,
        }
        for op in s.operators:
            out[f"dispersion_{op}"] = s.dispersion_after(op)
            out[f"relative_delta_{op}"] = s.relative_delta(op)
        return out


@dataclass
class PoolDiagnostics:
    """Result of :func:`pool_diagnostics`: per-layer statistics, their whole-model sum, and the inputs."""

    base: str
    experts: list[str]
    weights: list[float]
    config: DiagnosticsConfig
    layers: list[LayerDiagnostics]
    total: PoolStats
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def layer(self, name: str) -> LayerDiagnostics:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def layer_table(self) -> list[dict[str, Any]]:
        """One row per analysed tensor, in storage order (see :meth:`LayerDiagnostics.row`)."""
        return [layer.row() for layer in self.layers]

    def operator_table(self) -> list[dict[str, Any]]:
        """Whole-model Delta_T per operator: D before and after, Delta_T, relative change, kept fraction,
        and what is guaranteed about its sign."""
        t = self.total
        return [
            {
                "operator": op,
                "description": OPERATOR_DESCRIPTIONS[op],
                "dispersion_before": t.dispersion,
                "dispersion_after": t.dispersion_after(op),
                "delta": t.delta(op),
                "relative_delta": t.relative_delta(op),
                "kept_fraction": t.kept_fraction(op),
                "layers_increased": sum(1 for layer in self.layers if layer.stats.delta(op) < 0),
                "guarantee": OPERATOR_GUARANTEES[op],
            }
            for op in t.operators
        ]

    def worst_layers(self, k: int = 10, *, min_coords: int = 64) -> list[LayerDiagnostics]:
        """The ``k`` tensors with the highest pool sign-conflict rate, among those with at least
        ``min_coords`` coordinates changed by >= 2 experts (all tensors if none qualifies); ties by count."""
        rated = [layer for layer in self.layers if not math.isnan(layer.stats.pool_conflict_rate)]
        big = [layer for layer in rated if layer.stats.multi >= min_coords] or rated
        big.sort(key=lambda layer: (layer.stats.pool_conflict_rate, layer.stats.conflict), reverse=True)
        return big[:k]

    def summary(self) -> dict[str, Any]:
        """Whole-model figures (see :meth:`PoolStats.summary`) plus counts of tensors."""
        out = self.total.summary()
        out["tensors"] = len(self.layers)
        out["tensors_skipped"] = len(self.skipped)
        return out

    def expected_ranking(self) -> dict[str, Any]:
        """The heuristic method ranking of :func:`expected_ranking`."""
        return expected_ranking(self)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (NaN becomes ``None``)."""
        return to_jsonable({
            "base": self.base,
            "experts": [{"path": p, "weight": w} for p, w in zip(self.experts, self.weights)],
            "config": self.config.to_dict(),
            "summary": self.summary(),
            "operators": self.operator_table(),
            "expected_ranking": self.expected_ranking(),
            "worst_layers": [layer.name for layer in self.worst_layers()],
            "layers": self.layer_table(),
            "skipped": self.skipped,
            "warnings": self.warnings,
            "seconds": self.seconds,
        })


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------- heuristic

#: Thresholds of :func:`expected_ranking` (a heuristic, stated so it can be checked and changed).
HEURISTIC_THRESHOLDS: dict[str, float] = {
    "conflict_high": 0.35,  # mean pairwise sign conflict (chance level 0.5) at or above which consensus helps
    "conflict_low": 0.20,  # at or below (with cosine above cosine_aligned): little to resolve
    "cosine_aligned": 0.30,
    "sign_delta_high": 0.30,  # fraction of D removed by sign consensus alone
    "norm_ratio": 10.0,  # largest / smallest task-vector norm above which one expert dominates a sum
}


def expected_ranking(diag: PoolDiagnostics) -> dict[str, Any]:
    """A **heuristic** ranking of merging methods from the data-free diagnostics; not a prediction from theory.

    Rules (thresholds in :data:`HEURISTIC_THRESHOLDS`), with ``c`` the mean *pairwise* sign-conflict rate
    (chance level 0.5 whatever N; the pool rate's chance level grows with N), ``cos`` the mean pairwise cosine
    and ``r`` the fraction of the dispersion removed by sign consensus (the ``sign`` operator):

    - *conflicting* (``c >= 0.35`` or ``r >= 0.3``): many coordinates cancel under averaging; methods that
      resolve signs (TIES, DARE-TIES) are expected to beat task arithmetic, which beats weight averaging;
    - *aligned* (``c <= 0.2`` and ``cos >= 0.3``): little to resolve; weight averaging / task arithmetic are
      expected to do as well as the sparsifying methods, which only discard signal here;
    - *mixed* otherwise: no clear expectation; try task arithmetic and TIES and tune lambda.

    A large spread of task-vector norms (ratio >= 10) is flagged: the largest expert dominates any sum.
    """
    t = diag.total
    th = HEURISTIC_THRESHOLDS
    c = t.mean_pairwise_conflict()
    cos = t.mean_cosine()
    r = t.relative_delta("sign") if "sign" in t.operators else math.nan
    figures = f"mean pairwise sign conflict {c:.3f} (chance 0.5), mean cosine {cos:.3f}"
    if not math.isnan(r):
        figures += f", sign consensus removes {r:.1%} of the dispersion"
    reasons: list[str] = []
    if (not math.isnan(c) and c >= th["conflict_high"]) or (not math.isnan(r) and r >= th["sign_delta_high"]):
        regime = "conflicting"
        ranking = ["ties", "dare_ties", "task_arithmetic", "weight_average"]
        reasons.append(
            f"{figures}: conflict >= {th['conflict_high']} or removal >= {th['sign_delta_high']:.0%}, so many "
            "coordinates cancel under averaging; sign-consensus methods are expected to help"
        )
    elif not math.isnan(c) and c <= th["conflict_low"] and not math.isnan(cos) and cos >= th["cosine_aligned"]:
        regime = "aligned"
        ranking = ["weight_average", "task_arithmetic", "ties", "dare_ties"]
        reasons.append(
            f"{figures}: conflict <= {th['conflict_low']} and cosine >= {th['cosine_aligned']}, so the experts "
            "largely agree; averaging loses little and sparsifying only discards signal"
        )
    else:
        regime = "mixed"
        ranking = ["task_arithmetic", "ties", "dare_ties", "weight_average"]
        reasons.append(
            f"{figures}: between the thresholds, so no clear expectation; compare task arithmetic and TIES "
            "with a tuned lambda"
        )
    norms = t.norms
    if norms.size and norms.min() > 0 and norms.max() / norms.min() >= th["norm_ratio"]:
        reasons.append(
            f"task-vector norms differ by {norms.max() / norms.min():.1f}x: the largest expert dominates "
            "any sum; consider per-model weights"
        )
    return {
        "regime": regime,
        "ranking": ranking,
        "reasons": reasons,
        "thresholds": dict(th),
        "heuristic": True,
        "note": "A heuristic from data-free statistics, not a guarantee: validate on held-out data.",
    }


# ------------------------------------------------------------------------------------------ the pass


def pool_diagnostics(
    base: Source,
    experts: Sequence[Source],
    *,
    weights: Sequence[float] | None = None,
    config: DiagnosticsConfig | None = None,
    labels: Sequence[str] | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> PoolDiagnostics:
    """Stream over the tensors of ``base`` and ``experts`` and compute the pool diagnostics.

    ``base`` and each expert are checkpoint paths (anything :func:`mergelab.checkpoints.open_checkpoint`
    reads: safetensors, torch files, HF folders, sharded) or in-memory state dicts. ``weights`` (default 1)
    enter only the mass sign election. Tensors are read one name at a time in the base's storage order;
    integer/bool and empty tensors are skipped (listed in ``skipped``). With ``config.trim_scope ==
    "global"`` two extra streaming passes find each expert's whole-model trim threshold first (the engine's
    own pass, so the trimmed vectors are those a global-scope TIES merge uses).

    Raises :class:`~mergelab.errors.MergeLabError` subclasses on bad input (missing/extra keys, shape or
    kind mismatches, NaN/Inf), naming the file and tensor.
    """
    started = time.perf_counter()
    config = config or DiagnosticsConfig()
    n = len(experts)
    if n < 2:
        raise SpecError(f"models: pool diagnostics need at least two experts, got {n}")
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise SpecError(f"got {n} experts but {len(weights)} weights")
    if any(not math.isfinite(w) for w in weights):
        raise SpecError(f"weights must be finite, got {weights}")
    labels = list(labels) if labels is not None else [
        str(e) if not isinstance(e, Mapping) else f"expert {i + 1}" for i, e in enumerate(experts)
    ]
    dev = resolve_device(device)
    pool = _open_pool(base, experts, labels)
    try:
        thresholds: dict[str, list[float]] = {}
        tie_quotas: dict[str, list[int]] = {}
        if config.trim_scope == "global" and any(op in ("trim", "ties") for op in config.operators):
            ties = get_method("ties")
            params = ties.parse_params({"density": config.density, "trim_scope": "global"})
            thresholds, tie_quotas = global_thresholds(pool, ties, lambda _name: params, dev, progress)
        total = PoolStats(n_experts=n)
        layers: list[LayerDiagnostics] = []
        skipped: list[str] = []
        for name in tqdm(pool.names, desc="analyze", unit="tensor", disable=not progress):
            info = pool.reference.info(name)
            if not info.dtype.is_floating_point or math.prod(info.shape) == 0:
                skipped.append(name)
                continue
            b, es = pool.load(name, dev)
            dtype = compute_dtype(b, es)
            bb = b.to(dtype)
            taus = [e.to(dtype) - bb for e in es]
            del b, es, bb
            stats = tensor_stats(taus, weights, config, name=name, thresholds=thresholds.get(name),
                                 ties=tie_quotas.get(name))
            del taus
            layers.append(LayerDiagnostics(name, tuple(info.shape), stats))
            total.add_(stats)
        warnings = list(pool.warnings)
        base_label = str(base) if not isinstance(base, Mapping) else "base"
    finally:
        pool.close()
    if not layers:
        raise MergeLabError("no floating-point tensor to analyse (every tensor is integer, bool or empty)")
    diag = PoolDiagnostics(
        base=base_label, experts=labels, weights=weights, config=config, layers=layers, total=total,
        skipped=skipped, warnings=warnings, seconds=time.perf_counter() - started,
    )
    log.info(
        "analysed %d tensors (%d coordinates) of %d experts in %.1f s: pool conflict %.3f, normalised D %.3f",
        len(layers), total.numel, n, diag.seconds, total.pool_conflict_rate, total.normalized_dispersion,
    )
    return diag
