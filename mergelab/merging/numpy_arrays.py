"""Numpy views of stored tensors, for the numpy back-end (:mod:`mergelab.merging.numpy_backend`,
:mod:`mergelab.merging.numpy_kernels`).

The dtype a stored tensor reads as (``ml_dtypes`` supplies bfloat16), the dtype merges of it compute in, and a
NaN/Inf check of a rounded output block by its exponent bits (a float is NaN or Inf exactly when all its
exponent bits are set), which also catches overflow into float16/bfloat16.

bfloat16 <-> float32 by integer operations (:func:`widen_bfloat16`, :func:`round_bfloat16`): a bfloat16 is
the upper half of a float32, so widening is a 16-bit shift, and rounding to nearest even is adding
``0x7FFF + lsb`` to the float32's bits and keeping the upper half. Both are exactly what ``ml_dtypes`` and
torch compute for every finite value (and overflow to Inf the same way), at 0.2 and 0.45 ns an entry
against ml_dtypes' 0.45 and 1.1 ns (its casts are scalar loops; numpy's integer ufuncs are vectorised).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from mergelab.checkpoints.safetensors_format import StorageDtype

#: Exponent masks of the floating dtypes the numpy engine writes.
_EXPONENT_MASKS = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000, "float64": 0x7FF0000000000000}


def numpy_dtype(storage: StorageDtype) -> Any:
    """The numpy dtype of a stored dtype (``ml_dtypes.bfloat16`` for bfloat16)."""
    if storage.name == "bfloat16":
        import ml_dtypes  # only bfloat16 checkpoints need it

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(storage.name)


def compute_dtype(dtypes: Iterable[Any]) -> np.dtype:
    """float64 if any of the inputs' ``dtypes`` is float64, else float32."""
    return np.dtype(np.float64) if any(d == np.float64 for d in dtypes) else np.dtype(np.float32)


_IS_BFLOAT16: dict[Any, bool] = {}


def is_bfloat16(dtype: Any) -> bool:
    """Whether ``dtype`` is ``ml_dtypes.bfloat16`` (checked by name: no import of ml_dtypes; remembered per
    dtype, since the kernels ask for every block and ``np.dtype(...).name`` takes a microsecond)."""
    known = _IS_BFLOAT16.get(dtype)
    if known is None:
        known = _IS_BFLOAT16[dtype] = np.dtype(dtype).name == "bfloat16"
    return known


def widen_bfloat16(x: Any, out: Any) -> Any:
    """``out = float32(x)`` for the flat bfloat16 array ``x`` (``out``: float32 of the same size): its bits
    shifted into the upper half of ``out``'s, exact. Returns ``out``."""
    bits = out.view(np.uint32)
    np.copyto(bits, x.view(np.uint16), casting="safe")
    np.left_shift(bits, 16, out=bits)
    return out


#: The float32 magnitudes (as bits) from which rounding to bfloat16 gives Inf or NaN: 0x7F7F8000 is the
#: midpoint between bfloat16's largest finite value and 2**128, which rounds (to even) to Inf.
_BFLOAT16_OVERFLOW_BITS = 0x7F7F8000


def round_bfloat16(x: Any, out: Any, scratch: Any) -> bool:
    """``out = bfloat16(x)`` rounded to nearest even for the flat float32 array ``x`` (``scratch``: uint32 of
    at least its size; ``x`` is kept), bit-identical to ``ml_dtypes``/torch for every finite result;
    returns whether any result is NaN or Inf. That is decided from ``x`` (a magnitude at or above
    :data:`_BFLOAT16_OVERFLOW_BITS` in bits: NaN, Inf, or rounding up to Inf), not from ``out``, because
    the integer rounding may carry a NaN's payload into its exponent; such outputs are refused anyway."""
    bits = x.view(np.uint32)
    s = scratch[: x.size]
    np.right_shift(bits, 16, out=s)
    np.bitwise_and(s, 1, out=s)
    np.add(s, 0x7FFF, out=s)
    np.add(s, bits, out=s)  # bits + 0x7FFF + lsb: the upper half is the rounded value
    np.right_shift(s, 16, out=out.view(np.uint16), casting="unsafe")
    if not x.size:
        return False
    np.bitwise_and(bits, 0x7FFFFFFF, out=s)
    return bool(s.max() >= _BFLOAT16_OVERFLOW_BITS)


def exponent_scratch(dtype: Any, size: int) -> Any:
    """A scratch buffer for :func:`any_nonfinite` on up to ``size`` values of ``dtype``."""
    return np.empty(size, dtype=f"u{np.dtype(dtype).itemsize}")


def any_nonfinite(values: Any, scratch: Any) -> bool:
    """Whether the flat floating array ``values`` holds a NaN or Inf, from its exponent bits, in one pass
    (``scratch``: from :func:`exponent_scratch`)."""
    mask = _EXPONENT_MASKS[values.dtype.name]
    bits = np.bitwise_and(values.view(scratch.dtype), mask, out=scratch[: values.size])
    return bool(values.size) and bool(bits.max() == mask)
