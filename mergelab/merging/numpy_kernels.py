"""The numpy back-end's kernels: TIES-Merging, task arithmetic, weight averaging, passthrough, NearSwap, RAM and
the Gram-matrix methods (:class:`GramKernel`: model stock, SLERP, NuSLERP, Multi-SLERP, Karcher) on numpy blocks.

Each computes what its catalog reference (:mod:`mergelab.methods.catalog`) computes, tested against it
(tests/test_numpy_engine.py, tests/test_streaming.py), without torch. TIES is the long one:

TIES (Yadav et al. 2023) per tensor, with ``tau_i = theta_i - theta_0`` in the compute dtype (float32;
float64 if an input is float64):

1. trim: ``hat tau_i`` keeps the ``k = floor(density * n)`` entries of largest ``|tau_i|`` (exactly k:
   all entries above the k-th largest magnitude ``t_i`` and the first ones tied at ``t_i`` in flat order,
   as :func:`mergelab.ops.trim`);
2. elect: ``gamma = sgn(sum_i w_i hat tau_i)`` (``sign_election: mass``) or ``sgn(sum_i sgn(hat tau_i))``
   (``count``);
3. disjoint mean over the models agreeing with ``gamma`` (``sgn(hat tau_ij) = gamma_j != 0``):
   ``sum_{i in A} w_i hat tau_i / |A|`` (``disjoint_divisor: count``) or ``/ sum_{i in A} w_i``
   (``weight``); 0 where nobody agrees;
4. ``theta = theta_0 + lambda * merged``, rounded once to the output dtype.

With ``rescale: l1`` (mergekit's ``rescale: true``) step 1 is followed by
``hat tau_i *= ||tau_i||_1 / ||hat tau_i||_1`` per tensor (unscaled when either norm is below 1e-7), the norms
by the L1 block rule of :mod:`mergelab.ops.l1_rule` from a pass over the blocks between the selection and the
merge (:func:`trim_l1_factors`).

The parameters and their defaults (from the paper) are :class:`mergelab.methods.catalog.TiesParams`.

How it is computed, for a tensor whose inputs are in memory in their stored dtype:

- **Threshold** (per expert, ``trim_scope: tensor``): exact sample-based selection
  (:mod:`mergelab.ops.selection`). A uniform sample of ``|tau_i|`` gives a value bracket ``[lo, hi]``
  around the target rank; one pass over cache-sized blocks (on all cores) counts per block the magnitudes
  below ``lo`` and either counts those equal to ``lo`` (a collapsed bracket, as bf16 task vectors give:
  their magnitudes take few values) or collects those inside the bracket; the k-th largest is then selected
  among a few percent of the entries (or, with probability ~1e-6, among all of them). Tensors of at most
  ``selection.SMALL`` entries are selected whole. With ``trim_scope: global`` (the paper's) the same
  counts are taken over every tensor of the model against one bracket (:func:`select_global`; the engine
  streams the model twice for it), and the tied entries are kept first in model order.
- **Ties as a cut-off position.** Keeping the first ``q = k - #{|tau_i| > t_i}`` entries tied at ``t_i`` in
  flat order is keeping ``|tau_i| >= t_i`` before a position ``c_i`` (just after the q-th tie) and
  ``|tau_i| > t_i`` from it on. The per-block tie counts of the selection pass locate the block holding
  ``c_i``; only that block is searched. The trim of any block is then one or two comparisons, so blocks
  are merged in any order, on all cores.
- **Merge** (a second pass over the blocks), from the positive and negative parts of the trimmed task
  vectors: ``up_i = tau_i > lambda_i``, ``down_i = tau_i < -lambda_i`` (the trim, signed: no ``|tau|``
  pass), ``P = sum_i w_i tau_i up_i`` and ``N = sum_i w_i tau_i down_i`` in model order, and the counts
  (or weights) of each side in bytes. The elected sign is that of ``P + N`` (mass; as
  :func:`mergelab.ops.elect_sign` sums it) or of ``#up - #down`` (count); the agreeing models' sum is then
  ``P`` or ``N``, exactly the masked sum the torch engine forms, and the divisor that side's count or
  weight. With unit weights the output equals the torch engine's bit for bit (tested); with other weights
  an intermediate may differ in its last bit (torch fuses ``acc + w * x``).

Non-finite inputs always reach the output (``NaN * False`` is NaN, so a NaN survives the trim; Inf is kept,
and the parts enter the numerator by a product, not a selection), where the engine finds them by their
exponent bits and names the input file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mergelab.merging.numpy_arrays import (
    any_nonfinite,
    exponent_scratch,
    is_bfloat16,
    round_bfloat16,
    widen_bfloat16,
)
from mergelab.merging.pipeline import run_blocks
from mergelab.ops import selection as rules
from mergelab.ops.l1_rule import block_l1, l1_factor, l1_from_partials
from mergelab.ops.gram_matrix import (
    gram_partials,
    karcher_coefficients,
    model_stock_ratio_from_gram,
    multislerp_coefficients,
    nuslerp_coefficients,
    nuslerp_t,
    slerp_coefficients_from_gram,
)

#: Entries per block. Each block costs about 40 ufunc calls, and each call holds the GIL for its set-up,
#: so small blocks serialise the threads: on an 11M-entry bf16 tensor with 4 experts, merge pass on 1 / 2
#: threads: 2**16 103 / 73 ms, 2**17 104 / 51 ms, 2**18 89 / 46 ms, 2**19 92 / 55 ms (selection 31 / 18 ms
#: at 2**18). The buffers then live in L3, not L2, which costs less than the lost parallelism.
BLOCK = 1 << 18


@dataclass(frozen=True)
class Trim:
    """The trim of one task vector: keep ``|tau| > below`` (i.e. ``|tau| >= threshold``) at flat positions
    before ``cutoff`` and ``|tau| > threshold`` from ``cutoff`` on (see the module docstring)."""

    threshold: float
    below: float
    cutoff: int

    @classmethod
    def at(cls, threshold: Any, cutoff: int, compute: np.dtype) -> Trim:
        """The trim at ``threshold`` (a value of the ``compute`` dtype) with ties kept before ``cutoff``."""
        t = compute.type(threshold)
        below = float(np.nextafter(t, compute.type(-np.inf))) if t > 0 else 0.0
        return cls(float(t), below, int(cutoff))


def whole_trim(magnitude: Any, k: int) -> Trim:
    """The trim keeping the ``k`` largest entries of the flat array ``magnitude`` (ties first in order)."""
    n = magnitude.size
    t = np.partition(magnitude, n - k)[n - k]
    ties = k - int(np.count_nonzero(magnitude > t))
    tied = np.flatnonzero(magnitude == t)
    cutoff = n if ties >= tied.size else (int(tied[ties - 1]) + 1 if ties > 0 else 0)
    return Trim.at(t, cutoff, magnitude.dtype)


class NumpyArrays:
    """The work on one block of values of exact selection (:class:`mergelab.ops.selection.BlockArrays`),
    with numpy."""

    def count(self, magnitude: Any, lo: float, hi: float, collapsed: bool, flags: Any) -> tuple[int, Any]:
        """Below ``lo`` and equal to it (or inside ``[lo, hi]``) by comparisons into ``flags`` (a bool
        scratch buffer of the block's size)."""
        below = 0 if lo == -math.inf else int(np.count_nonzero(np.less(magnitude, lo, out=flags)))
        if collapsed:
            return below, int(np.count_nonzero(np.equal(magnitude, lo, out=flags)))
        np.greater_equal(magnitude, lo, out=flags)
        if hi != math.inf:
            flags &= magnitude <= hi
        return below, magnitude[flags]  # a copy

    def select(self, parts: Sequence[Any], local: int) -> tuple[float, int, int]:
        inside = np.concatenate(list(parts)) if parts else np.empty(0)
        value = np.partition(inside, local)[local]
        return float(value), inside.size, int(np.count_nonzero(inside > value))

    def count_equal(self, values: Any, t: float) -> int:
        return int(np.count_nonzero(values == t))

    def size(self, values: Any) -> int:
        return int(values.size)


#: The numpy side of exact selection's block counts (:class:`mergelab.ops.selection.BlockCounts`).
NUMPY_ARRAYS = NumpyArrays()


class BlockSelection(rules.BlockCounts):
    """Counts of one tensor's magnitudes against a value bracket ``[lo, hi]``, block by block of ``BLOCK``
    entries (:class:`mergelab.ops.selection.BlockCounts` on numpy arrays, the same bookkeeping as the
    torch back-end's :class:`mergelab.ops.BlockKthLargest`); :meth:`cutoff` places the tie cut-off."""

    def __init__(self, n: int, lo: float, hi: float, blocks: int) -> None:
        super().__init__(n, lo, hi, blocks, NUMPY_ARRAYS)

    def cutoff(self, ties: int, block_magnitude: Callable[[int], Any]) -> int:
        """The position just after the ``ties``-th entry equal to the selected value, in flat order;
        ``block_magnitude(j)`` recomputes block ``j`` (only the block holding it is searched)."""
        counts = self.tie_counts()
        if ties <= 0:
            return 0
        if ties >= sum(counts):
            return self.n
        seen = 0
        for j, c in enumerate(counts):
            if seen + c >= ties:
                tied = np.flatnonzero(block_magnitude(j) == self.value)
                return j * BLOCK + int(tied[ties - seen - 1]) + 1
            seen += c
        raise AssertionError("unreachable: ties < sum(counts)")


#: ``(t, #{> t})`` for the k-th largest magnitude over every tensor counted by the selections (the rule
#: shared by every back-end: :func:`mergelab.ops.selection.select_counted`).
select_global = rules.select_counted


def _block(n: int, j: int) -> tuple[int, int]:
    return j * BLOCK, min(n, (j + 1) * BLOCK)


def _into_compute(x: Any, out: Any) -> Any:
    """``out = x`` converted to ``out``'s (compute) dtype: bfloat16 to float32 by a shift
    (:func:`~mergelab.merging.numpy_arrays.widen_bfloat16`, exact, 2x faster than ml_dtypes' cast)."""
    if out.dtype == np.float32 and is_bfloat16(x.dtype):
        return widen_bfloat16(x, out)
    np.copyto(out, x, casting="unsafe")
    return out


def _magnitude_into(x: Any, base: Any, out: Any) -> Any:
    """``out = |x - base|`` in ``out``'s dtype (``base`` already in it). The absolute value clears the sign
    bit (``np.abs`` on floats is not vectorised: 0.12 against 0.03 ns an entry here)."""
    _into_compute(x, out)
    np.subtract(out, base, out=out)
    bits = out.view(f"i{out.itemsize}")
    np.bitwise_and(bits, (1 << (8 * out.itemsize - 1)) - 1, out=bits)
    return out


def sample_magnitudes(base: Any, experts: Sequence[Any], m: int, rng: np.random.Generator,
                      compute: np.dtype) -> list[Any]:
    """``|tau_i|`` at ``m`` uniform positions (drawn with replacement by ``rng``), per expert."""
    idx = rng.integers(0, base.size, m)
    b = base[idx].astype(compute)
    return [np.abs(e[idx].astype(compute) - b) for e in experts]


def count_blocks(base: Any, experts: Sequence[Any], brackets: Sequence[tuple[float, float]],
                 compute: np.dtype) -> list[BlockSelection]:
    """One pass over the blocks of a tensor (all cores) counting each expert's ``|tau_i|`` against its bracket."""
    n = base.size
    blocks = -(-n // BLOCK)
    selections = [BlockSelection(n, lo, hi, blocks) for lo, hi in brackets]

    def work(indices: Iterator[int]) -> None:
        b, magnitude = np.empty(BLOCK, compute), np.empty(BLOCK, compute)
        flags = np.empty(BLOCK, bool)
        for j in indices:
            start, end = _block(n, j)
            m = end - start
            _into_compute(base[start:end], b[:m])
            for selection, e in zip(selections, experts):
                selection.observe(j, _magnitude_into(e[start:end], b[:m], magnitude[:m]), flags[:m])

    run_blocks(blocks, work)
    return selections


def trim_at(selection: BlockSelection, ties: int, base: Any, expert: Any, compute: np.dtype) -> Trim:
    """The trim at ``selection``'s value keeping its first ``ties`` tied entries (``base`` and ``expert``:
    the tensor's flat inputs, to search the block where the ties run out)."""

    def block_magnitude(j: int) -> Any:
        start, end = _block(selection.n, j)
        return _magnitude_into(expert[start:end], base[start:end].astype(compute), np.empty(end - start, compute))

    return Trim.at(selection.value, selection.cutoff(ties, block_magnitude), compute)


def tensor_trims(base: Any, experts: Sequence[Any], density: float, compute: np.dtype) -> list[Trim]:
    """Per-tensor trims of ``tau_i = experts[i] - base`` (flat arrays in their stored dtypes) at ``density``."""
    n = base.size
    k = rules.keep_count(n, density)
    if n <= rules.SMALL:
        b = base.astype(compute)
        return [whole_trim(np.abs(e.astype(compute) - b), k) for e in experts]
    samples = sample_magnitudes(base, experts, rules.SAMPLE, np.random.default_rng(0), compute)
    brackets = [rules.bracket_values(np.sort(x), (n - k) / n, rules.WIDTH) for x in samples]
    trims = []
    for selection, e in zip(count_blocks(base, experts, brackets, compute), experts):
        found = selection.result(k)
        if found is None:  # the rank fell outside the bracket: select among all entries
            trims.append(whole_trim(np.abs(e.astype(compute) - base.astype(compute)), k))
        else:
            trims.append(trim_at(selection, k - found[1], base, e, compute))
    return trims


@dataclass(frozen=True)
class TiesKernel:
    """The merge pass of TIES over blocks, for one tensor's parameters (see the module docstring).

    ``weights``: per expert; ``sign_election``: ``mass`` or ``count``; ``divisor``: ``count`` or ``weight``;
    ``zero_sign``: ``drop`` (an exact tie elects 0) or ``positive`` (+1, mergekit's);
    ``lambda_``: the scale of the merged task vector."""

    weights: tuple[float, ...]
    sign_election: str
    divisor: str
    lambda_: float
    zero_sign: str = "drop"

    def merge(self, base: Any, experts: Sequence[Any], trims: Sequence[Trim] | None, out: Any,
              compute: np.dtype, on_nonfinite: Callable[[], None],
              factors: Sequence[float | None] | None = None) -> None:
        """Write the merged flat tensor into ``out`` (its storage dtype), all cores over the blocks;
        calls ``on_nonfinite`` (which raises) when an output entry is NaN or Inf. ``factors``: per expert, the
        ``rescale: l1`` factor of its trimmed task vector (:func:`trim_l1_factors`; None: unscaled)."""
        n = base.size
        bad: list[int] = []

        def work(indices: Iterator[int]) -> None:
            buffers = _Buffers(len(experts), compute, min(n, BLOCK))
            exponent = exponent_scratch(out.dtype, min(n, BLOCK))
            for j in indices:
                start, end = _block(n, j)
                block_out = out[start:end]
                with np.errstate(all="ignore"):  # NaN/Inf reach the output and are reported from there
                    flagged = self._block(base[start:end], [e[start:end] for e in experts], trims, start,
                                          block_out, buffers.sized(end - start), factors)
                if flagged if flagged is not None else any_nonfinite(block_out, exponent):
                    bad.append(j)

        run_blocks(-(-n // BLOCK), work)
        if bad:
            on_nonfinite()

    def _block(self, base: Any, experts: Sequence[Any], trims: Sequence[Trim] | None, start: int,
               out: Any, buf: _Buffers, factors: Sequence[float | None] | None = None) -> bool | None:
        """One block: positive and negative parts of the trimmed task vectors, then the election and the
        disjoint mean from them (see :func:`mergelab.ops.elect_sign`). Returns whether an output entry is
        NaN or Inf when the rounding found out (float32 to bfloat16), else None (the caller checks)."""
        b, tau, tmp, pos, neg = buf.base, buf.tau, buf.tmp, buf.pos, buf.neg
        up, down = buf.up, buf.down
        _into_compute(base, b)
        for i, (x, w) in enumerate(zip(experts, self.weights)):
            _into_compute(x, tau)
            np.subtract(tau, b, out=tau)
            if trims is None:  # density 1: every entry kept
                np.greater(tau, 0, out=up)
                np.less(tau, 0, out=down)
            else:
                signed_keep(tau, trims[i], start, up, down)
                if factors is not None and factors[i] is not None:  # rescale l1: (tau c) keep = (tau keep) c
                    np.multiply(tau, factors[i], out=tau)
            # positive part: tau where kept and > 0 (NaN * False stays NaN, so NaN reaches the output)
            for part, keep in ((pos, up), (neg, down)):
                term = np.multiply(tau, keep, out=part if i == 0 else tmp)
                if w != 1.0:
                    np.multiply(term, w, out=term)
                if i > 0:
                    np.add(part, tmp, out=part)
            self._tally(i, w, up, down, buf)
        # the elected sign: up = (gamma > 0), down = (gamma < 0)
        if self.sign_election == "mass":
            total = np.add(pos, neg, out=tmp)
            # zero_sign positive: an exact zero (either sign) elects +1 (a NaN reaches the output through the
            # products below whatever is elected)
            (np.greater_equal if self.zero_sign == "positive" else np.greater)(total, 0, out=up)
            np.less(total, 0, out=down)
        else:
            (np.greater_equal if self.zero_sign == "positive" else np.greater)(buf.n_up, buf.n_down, out=up)
            np.less(buf.n_up, buf.n_down, out=down)
        # numerator: the agreeing part (a product, not a selection, so a NaN in either part stays)
        np.multiply(pos, up, out=pos)
        np.multiply(neg, down, out=neg)
        numerator = np.add(pos, neg, out=pos)
        self._divide(numerator, up, down, buf)
        if self.lambda_ != 1.0:  # x * 1 == x exactly: skip the pass
            np.multiply(numerator, self.lambda_, out=numerator)
        np.add(numerator, b, out=numerator)
        if numerator.dtype == np.float32 and is_bfloat16(out.dtype):
            return round_bfloat16(numerator, out, tmp.view(np.uint32))
        np.copyto(out, numerator, casting="unsafe")
        return None

    def _tally(self, i: int, w: float, up: Any, down: Any, buf: _Buffers) -> None:
        """Count the positive and negative kept entries (or sum their weights), for the election by
        count and the divisor."""
        for total, keep in ((buf.n_up, up), (buf.n_down, down)):
            if i == 0:
                np.copyto(total, keep, casting="unsafe")
            else:
                np.add(total, keep.view(np.uint8), out=total, casting="unsafe")
        if self.divisor == "weight":
            for total, keep in ((buf.w_up, up), (buf.w_down, down)):
                term = np.multiply(keep, w, out=buf.tmp)
                if i == 0:
                    np.copyto(total, term)
                else:
                    np.add(total, term, out=total)

    def _divide(self, numerator: Any, up: Any, down: Any, buf: _Buffers) -> None:
        """``numerator /= denominator`` of the agreeing side; 0 where no model agrees (numerator +-0)."""
        if self.divisor == "count":
            count = buf.n_up
            np.multiply(count, up.view(np.uint8), out=count, casting="unsafe")
            np.multiply(buf.n_down, down.view(np.uint8), out=buf.n_down, casting="unsafe")
            np.add(count, buf.n_down, out=count)
            np.maximum(count, buf.ones, out=count)  # against an array: vectorised (a scalar is not, for bytes)
            np.copyto(buf.tmp, count, casting="unsafe")
            np.divide(numerator, buf.tmp, out=numerator)
            return
        denominator = np.multiply(buf.w_up, up, out=buf.w_up)
        np.multiply(buf.w_down, down, out=buf.w_down)
        np.add(denominator, buf.w_down, out=denominator)
        tiny = np.finfo(numerator.dtype).tiny
        if min(self.weights) >= tiny:  # a clamped denominator keeps +-0 / tiny = 0 where nobody agrees
            np.maximum(denominator, tiny, out=denominator)
        else:  # agreeing weights may cancel: the entry is 0
            empty = denominator == 0
            numerator[empty] = 0.0
            denominator[empty] = 1.0
        np.divide(numerator, denominator, out=numerator)


def signed_keep(tau: Any, trim: Trim, start: int, up: Any, down: Any) -> None:
    """``up`` / ``down`` (bool) = the entries of the task-vector block at flat position ``start`` that the
    trim keeps and that are positive / negative (``tau > lambda`` / ``tau < -lambda``: no ``|tau|`` pass)."""
    split = min(max(trim.cutoff - start, 0), tau.size)
    for lo, hi, level in ((0, split, trim.below), (split, tau.size, trim.threshold)):
        if lo < hi:
            np.greater(tau[lo:hi], level, out=up[lo:hi])
            np.less(tau[lo:hi], -level, out=down[lo:hi])


def trim_l1_factors(base: Any, experts: Sequence[Any], trims: Sequence[Trim], compute: np.dtype
                    ) -> list[float | None]:
    """Per expert, TIES's ``rescale: l1`` factor ``||tau_i||_1 / ||trim(tau_i)||_1`` (None: unscaled, either norm
    below 1e-7: :func:`mergelab.ops.l1_rule.l1_factor`), by the L1 block rule (:mod:`mergelab.ops.l1_rule`): one
    pass over the blocks (all cores; a trim is positional, so any order) forms ``tau_i`` and its trim
    (:func:`signed_keep`) and takes both blocks' :func:`~mergelab.ops.l1_rule.block_l1`, summed per expert in
    block order. ``base``, ``experts``: the tensor's flat inputs in their stored dtypes."""
    n = base.size
    blocks = -(-n // BLOCK)
    parts: list[list[tuple[float, float]]] = [[(0.0, 0.0)] * len(experts) for _ in range(blocks)]

    def work(indices: Iterator[int]) -> None:
        size = min(n, BLOCK)
        b, tau = np.empty(size, compute), np.empty(size, compute)
        up, down = np.empty(size, bool), np.empty(size, bool)
        for j in indices:
            start, end = _block(n, j)
            m = end - start
            _into_compute(base[start:end], b[:m])
            for i, (e, trim) in enumerate(zip(experts, trims)):
                t = np.subtract(_into_compute(e[start:end], tau[:m]), b[:m], out=tau[:m])
                before = block_l1(t)
                signed_keep(t, trim, start, up[:m], down[:m])
                kept = np.logical_or(up[:m], down[:m], out=up[:m])
                parts[j][i] = (before, block_l1(np.multiply(t, kept, out=t)))

    run_blocks(blocks, work)
    return [l1_factor(l1_from_partials([part[i][0] for part in parts]),
                      l1_from_partials([part[i][1] for part in parts])) for i in range(len(experts))]


class _Buffers:
    """One thread's block buffers for :class:`TiesKernel`; :meth:`sized` views them at a block's size."""

    FLOATS = ("base", "tau", "tmp", "pos", "neg", "w_up", "w_down")
    BYTES = ("up", "down")

    def __init__(self, experts: int, compute: np.dtype, size: int) -> None:
        counts = np.uint8 if experts < 256 else np.uint32
        self.arrays = {name: np.empty(size, compute) for name in self.FLOATS}
        self.arrays.update({name: np.empty(size, bool) for name in self.BYTES})
        self.arrays.update({name: np.empty(size, counts) for name in ("n_up", "n_down")})
        self.arrays["ones"] = np.ones(size, counts)

    def sized(self, m: int) -> _Buffers:
        view = object.__new__(_Buffers)
        view.arrays = {}
        view.__dict__.update({name: a[:m] for name, a in self.arrays.items()})
        return view

    # the views :meth:`sized` sets (declared for readers and type checkers)
    base: Any
    tau: Any
    tmp: Any
    pos: Any
    neg: Any
    w_up: Any
    w_down: Any
    up: Any
    down: Any
    n_up: Any
    n_down: Any
    ones: Any


# ------------------------------------------------------------- task arithmetic and weight averaging


def _round_into(acc: Any, base: Any, out: Any, spare: Any, flags: Any) -> bool:
    """``out = round(acc + base)``: straight into ``out`` when it has the compute dtype, else through ``acc``
    (float32 to bfloat16 by integer rounding, :func:`~mergelab.merging.numpy_arrays.round_bfloat16`, into
    ``spare``'s bits as scratch); returns whether an output entry is NaN or Inf (``flags``: from
    :func:`~mergelab.merging.numpy_arrays.exponent_scratch` for ``out``)."""
    if out.dtype == acc.dtype:
        np.add(acc, base, out=out)
        return any_nonfinite(out, flags)
    np.add(acc, base, out=acc)
    if acc.dtype == np.float32 and is_bfloat16(out.dtype):
        return round_bfloat16(acc, out, spare.view(np.uint32))
    np.copyto(out, acc, casting="unsafe")
    return any_nonfinite(out, flags)


def _as_compute(x: Any, buffer: Any) -> Any:
    """``x`` in the compute dtype: itself when it already is, else converted into ``buffer`` (bfloat16 to
    float32 by a shift, :func:`~mergelab.merging.numpy_arrays.widen_bfloat16`)."""
    if x.dtype == buffer.dtype:
        return x
    if buffer.dtype == np.float32 and is_bfloat16(x.dtype):
        return widen_bfloat16(x, buffer)
    np.copyto(buffer, x, casting="unsafe")
    return buffer


def _weighted_differences(xs: Sequence[Any], ref: Any, weights: Sequence[float], acc: Any, tmp: Any) -> None:
    """``acc = sum_i w_i (x_i - ref)`` in model order, in ``acc``'s dtype (each stored ``x_i`` is converted
    in cache: bfloat16 widened by a shift into the target first, other dtypes inside numpy's buffered ufunc
    loop; the same values either way); ``tmp`` is scratch of the same size."""
    for i, (x, w) in enumerate(zip(xs, weights)):
        target = acc if i == 0 else tmp
        if acc.dtype == np.float32 and is_bfloat16(x.dtype):
            np.subtract(widen_bfloat16(x, target), ref, out=target)
        else:
            np.subtract(x, ref, out=target, dtype=acc.dtype)
        if w != 1.0:
            np.multiply(target, w, out=target)
        if i > 0:
            np.add(acc, tmp, out=acc)


def task_arithmetic_block(xs: Sequence[Any], buffers: Sequence[Any], out: Any, weights: Sequence[float],
                          params: Any, flags: Any) -> bool:
    """One block of task arithmetic: ``xs`` = [theta_0, theta_1, ...] as stored; see
    :mod:`mergelab.merging.numpy_backend`. Returns whether an output entry is NaN or Inf."""
    base_buf, acc, tau = buffers
    base = _as_compute(xs[0], base_buf)
    _weighted_differences(xs[1:], base, weights, acc, tau)
    if params.lambda_ != 1.0:  # x * 1 == x exactly: skip the pass
        np.multiply(acc, params.lambda_, out=acc)
    return _round_into(acc, base, out, tau, flags)


def _combine_into(vectors: Iterable[Any], coefficients: Sequence[float], acc: Any, tmp: Any) -> Any:
    """``acc = sum_i c_i v_i`` in model order, each product rounded before it is added (the operations of
    :func:`mergelab.ops.combine`); ``tmp``: scratch of ``acc``'s size. ``vectors`` may be a generator that
    reuses one buffer: each vector is used before the next is made."""
    for i, (v, c) in enumerate(zip(vectors, coefficients)):
        np.multiply(v, c, out=acc if i == 0 else tmp)
        if i:
            np.add(acc, tmp, out=acc)
    return acc


def weight_average_block(xs: Sequence[Any], buffers: Sequence[Any], out: Any, weights: Sequence[float],
                         params: Any, flags: Any) -> bool:
    """One block of weight averaging: ``xs`` = [theta_1, theta_2, ...] as stored (the base is not
    averaged); see :mod:`mergelab.merging.numpy_backend`. ``normalize: false``: ``sum_i w_i theta_i``, each
    product rounded, then added (:func:`mergelab.ops.combine`'s order). Returns whether an output entry is NaN
    or Inf."""
    first_buf, acc, diff = buffers
    if not params.normalize:
        # each model converted into first_buf, then its product into diff (the conversion is consumed first)
        _combine_into((_as_compute(x, first_buf) for x in xs), weights, acc, diff)
        return _store(acc, out, diff, flags)
    first = _as_compute(xs[0], first_buf)
    _weighted_differences(xs, first, weights, acc, diff)
    np.divide(acc, float(sum(weights)), out=acc)
    return _round_into(acc, first, out, diff, flags)


# ------------------------------------------------------------- elementwise methods of one model


def _store(acc: Any, out: Any, spare: Any, flags: Any) -> bool:
    """``out = round(acc)`` (``acc`` in the compute dtype, ``out`` in the output dtype; bfloat16 by integer
    rounding into ``spare``'s bits as scratch); returns whether an output entry is NaN or Inf."""
    if out.dtype == acc.dtype:
        np.copyto(out, acc)
        return any_nonfinite(out, flags)
    if acc.dtype == np.float32 and is_bfloat16(out.dtype):
        return round_bfloat16(acc, out, spare.view(np.uint32))
    np.copyto(out, acc, casting="unsafe")
    return any_nonfinite(out, flags)


def passthrough_block(xs: Sequence[Any], buffers: Sequence[Any], out: Any, weights: Sequence[float],
                      params: Any, flags: Any) -> bool:
    """One block of passthrough (:func:`mergelab.methods.catalog.passthrough`): ``xs`` = [theta_1] as stored;
    ``theta = scale * theta_1`` in the compute dtype (the multiply skipped at 1, exactly), rounded once; at
    scale 1 into the input's own dtype, a copy of the stored values (converting a float exactly and rounding it
    back gives its bits). Returns whether an output entry is NaN or Inf."""
    if params.scale == 1.0 and xs[0].dtype == out.dtype:
        np.copyto(out, xs[0])
        return any_nonfinite(out, flags)
    x_buf, spare, _ = buffers
    x = _as_compute(xs[0], x_buf)
    if params.scale != 1.0:
        x = np.multiply(x, params.scale, out=x_buf)
    return _store(x, out, spare, flags)


def nearswap_block(xs: Sequence[Any], buffers: Sequence[Any], out: Any, weights: Sequence[float],
                   params: Any, flags: Any) -> bool:
    """One block of NearSwap (:func:`mergelab.ops.nearswap`): ``xs`` = [a = theta_0, b = theta_1] as stored;
    ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``, ``theta = b w + a (1 - w)``, the reference's operations in its
    order, each rounded to the compute dtype. Returns whether an output entry is NaN or Inf."""
    a_buf, b_buf, w = buffers
    a = _as_compute(xs[0], a_buf)
    b = _as_compute(xs[1], b_buf)
    dtype = w.dtype.type
    np.subtract(a, b, out=w)
    bits = w.view(f"u{w.itemsize}")  # |a - b|: clear the sign bit (np.abs on floats is not vectorised)
    np.bitwise_and(bits, (1 << (8 * w.itemsize - 1)) - 1, out=bits)
    np.maximum(w, dtype(1e-6), out=w)
    np.divide(dtype(params.t), w, out=w)
    np.clip(w, dtype(0.0), dtype(1.0), out=w)
    bw = np.multiply(b, w, out=b_buf)
    np.subtract(dtype(1.0), w, out=w)  # 1 - w, as the reference's -w + 1 (the same rounding)
    np.multiply(a, w, out=w)
    np.add(bw, w, out=w)
    return _store(w, out, a_buf, flags)  # a is consumed: its buffer is the rounding's scratch


def _magnitude_above(tau: Any, epsilon: Any, out: Any) -> Any:
    """``out = [|tau| > epsilon]`` as 0/1 in ``out``'s (compute) dtype (the sign bit cleared on a copy)."""
    np.copyto(out, tau)
    bits = out.view(f"u{out.itemsize}")
    np.bitwise_and(bits, (1 << (8 * out.itemsize - 1)) - 1, out=bits)
    return np.greater(out, epsilon, out=out)


def ram_block(xs: Sequence[Any], buffers: Sequence[Any], out: Any, weights: Sequence[float],
              params: Any, flags: Any) -> bool:
    """One block of RAM (:func:`mergelab.ops.overlap_merge` without scales): ``xs`` = [theta_0, theta_1, ...] as
    stored; ``m_i = [|tau_i| > epsilon]``, ``c = sum_i m_i``, then per model in order
    ``(t u) + (t s) / max(c, 1)`` with ``t = tau_i m_i``, ``u = [c = 1]``, ``s = [c >= 2]``, summed, plus theta_0:
    the reference's operations in its order (the masks as 0/1 in the compute dtype: ``x * 1.0`` and ``x * 0.0``
    are what ``x * True`` and ``x * False`` give, NaN included). ``tau_i`` is formed twice (the counts need every
    model first). Takes :data:`BUFFERS` ``["ram"]`` buffers. Returns whether an output entry is NaN or Inf."""
    b_buf, tau, m, count, unique, shared, acc, term = buffers
    b = _as_compute(xs[0], b_buf)
    eps = acc.dtype.type(params.epsilon)

    def task_vector(x: Any) -> Any:
        return np.subtract(_as_compute(x, tau), b, out=tau)

    for i, x in enumerate(xs[1:]):
        _magnitude_above(task_vector(x), eps, m if i else count)
        if i:
            np.add(count, m, out=count)
    np.equal(count, 1, out=unique)
    np.greater(count, 1, out=shared)
    np.maximum(count, 1, out=count)  # the divisor
    for i, x in enumerate(xs[1:]):
        t = task_vector(x)
        part = np.multiply(t, _magnitude_above(t, eps, m), out=t)
        target = acc if i == 0 else term
        np.multiply(part, unique, out=target)
        np.multiply(part, shared, out=part)
        np.divide(part, count, out=part)
        np.add(target, part, out=target)
        if i:
            np.add(acc, term, out=acc)
    return _round_into(acc, b, out, tau, flags)


#: Compute-dtype block buffers per kernel (3 unless listed).
BUFFERS = {"ram": 8}


# ------------------------------------------------------------- Gram-matrix methods


@dataclass(frozen=True)
class GramKernel:
    """A method whose output is a linear combination of its vectors with coefficients from their Gram matrix
    (:mod:`mergelab.ops.gram_matrix`: model stock, SLERP, NuSLERP, Multi-SLERP, Karcher), in two passes over a
    tensor's blocks: :meth:`partials` (the block's Gram partials, the rule's one dot function), then, with the
    coefficients :meth:`coefficients` takes from the summed Gram matrix, :meth:`combine` (the torch kernels'
    operations in their order, so the outputs are theirs bit for bit).

    ``vectors``: which inputs are combined: ``models`` (Karcher), ``ends`` (SLERP: the base and the one model,
    or the two models), ``task_vectors`` (model stock: ``theta_i - theta_0``, the base added back), or
    ``task_vectors_if_base`` (NuSLERP, Multi-SLERP: task vectors when the spec has a base, else the models).
    ``coefficients(g, params, weights)``: the coefficients; ``mean_first``: model stock's combination,
    ``t * (sum_i tau_i / N)`` instead of ``sum_i c_i v_i``: the first pass also writes ``sum_i tau_i`` (in model
    order, the torch kernel's sum) into a tensor-sized buffer, so the second reads the base and that sum only
    (:meth:`combine_mean`): one float32 copy of the tensor instead of every model read, converted and
    subtracted again (benchmark, 4 experts: 1 ms a block of 2^18 entries)."""

    vectors: str
    coefficients: Callable[[Any, Any, Sequence[float]], Sequence[float]]
    mean_first: bool = False

    def readers(self, base: Any, experts: Sequence[Any]) -> tuple[Any, list[Any]]:
        """``(origin, vector inputs)`` of a tensor from its base (None without one) and models' inputs."""
        if self.vectors == "task_vectors" or (self.vectors == "task_vectors_if_base" and base is not None):
            return base, list(experts)
        if self.vectors == "ends" and len(experts) == 1:  # SLERP from the base
            return None, [base, experts[0]]
        return None, list(experts)

    @staticmethod
    def buffers(k: int) -> int:
        """Compute-dtype block buffers the passes take for ``k`` vectors: origin, vectors, accumulator, scratch."""
        return k + 3

    @staticmethod
    def _vectors(xs: Sequence[Any], origin: bool, buffers: Any) -> tuple[Any, Any]:
        """The block's origin (or None) and vectors in the compute dtype (task vectors formed as the torch
        kernels form them: ``theta_i`` converted, minus the converted base). ``buffers``: a 2-D array, one
        row per buffer; the vectors are returned as its rows ``1 .. k`` (a 2-D view, for the one-call dots of
        :func:`~mergelab.ops.gram_matrix.gram_partials`) unless some are the inputs themselves (already in
        the compute dtype, not copied)."""
        k = len(xs) - (1 if origin else 0)
        rows = buffers[1 : k + 1]
        if not origin:
            if all(x.dtype == rows.dtype for x in xs):
                return None, list(xs)
            for x, buf in zip(xs, rows):
                _into_compute(x, buf)
            return None, rows
        o = _as_compute(xs[0], buffers[0])
        for x, buf in zip(xs[1:], rows):
            np.subtract(_into_compute(x, buf), o, out=buf)
        return o, rows

    def partials(self, xs: Sequence[Any], origin: bool, buffers: Sequence[Any], total: Any = None) -> list[float]:
        """The Gram partials of one block (:func:`mergelab.ops.gram_matrix.gram_partials`); ``xs``: the block
        of each input as stored, the origin first when ``origin``; ``total`` (:attr:`mean_first`): receives the
        block's ``sum_i v_i`` in model order."""
        vs = self._vectors(xs, origin, buffers)[1]
        if total is not None:
            if len(vs) == 1:
                np.copyto(total, vs[0])
            else:  # ((v_1 + v_2) + v_3) + ...
                np.add(vs[0], vs[1], out=total)
                for v in vs[2:]:
                    np.add(total, v, out=total)
        return gram_partials(vs)

    def combine(self, xs: Sequence[Any], origin: bool, coefficients: Sequence[float], buffers: Sequence[Any],
                out: Any, flags: Any) -> bool:
        """One block of the output: ``sum_i c_i v_i`` (each product rounded, then added: :func:`mergelab.ops.combine`)
        plus the origin, rounded once into ``out``. Returns whether an output entry is NaN or Inf."""
        k = len(xs) - (1 if origin else 0)
        acc, tmp = buffers[k + 1], buffers[k + 2]
        o, vs = self._vectors(xs, origin, buffers)
        _combine_into(vs, coefficients, acc, tmp)
        if o is None:
            return _store(acc, out, tmp, flags)
        return _round_into(acc, o, out, tmp, flags)

    @staticmethod
    def combine_mean(base: Any, total: Any, count: int, t: float, buffers: Sequence[Any], out: Any,
                     flags: Any) -> bool:
        """One block of model stock's output from the base block as stored and the first pass's block of
        ``sum_i tau_i``: ``(sum / N) * t + theta_0`` (the torch kernel's ``div_``, ``mul_``, ``add_``), rounded
        once into ``out``. Returns whether an output entry is NaN or Inf."""
        o, acc, tmp = buffers[0], buffers[-2], buffers[-1]
        o = _as_compute(base, o)
        np.divide(total, acc.dtype.type(count), out=acc)
        np.multiply(acc, t, out=acc)
        return _round_into(acc, o, out, tmp, flags)


def _model_stock(g: Any, p: Any, weights: Sequence[float]) -> list[float]:
    return [model_stock_ratio_from_gram(g, extrapolate=p.extrapolate)]


def _slerp(g: Any, p: Any, weights: Sequence[float]) -> tuple[float, float]:
    return slerp_coefficients_from_gram(g, p.t, p.parallel_threshold)


def _nuslerp(g: Any, p: Any, weights: Sequence[float]) -> tuple[float, float]:
    return nuslerp_coefficients(g, nuslerp_t(weights))


def _multislerp(g: Any, p: Any, weights: Sequence[float]) -> list[float]:
    if len(weights) == 1:
        return [1.0]
    return multislerp_coefficients(g, weights, normalize_weights=p.normalize_weights, eps=p.eps)


def _karcher(g: Any, p: Any, weights: Sequence[float]) -> list[float]:
    if len(weights) == 1:
        return [1.0]
    return karcher_coefficients(g, weights, max_iter=p.max_iter, tol=p.tol)


#: The Gram-matrix methods' kernels (the numpy back-end's ``KERNELS`` entries for them).
GRAM_KERNELS = {
    "model_stock": GramKernel("task_vectors", _model_stock, mean_first=True),
    "slerp": GramKernel("ends", _slerp),
    "nuslerp": GramKernel("task_vectors_if_base", _nuslerp),
    "multislerp": GramKernel("task_vectors_if_base", _multislerp),
    "karcher": GramKernel("models", _karcher),
}
