"""Numpy views of stored tensors, for the numpy back-end (:mod:`mergelab.merging.numpy_backend`,
:mod:`mergelab.merging.numpy_kernels`).

The dtype a stored tensor reads as (``ml_dtypes`` supplies bfloat16), the dtype merges of it compute in, and a
NaN/Inf check of a rounded output block by its exponent bits (a float is NaN or Inf exactly when all its
exponent bits are set), which also catches overflow into float16/bfloat16.
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


def exponent_scratch(dtype: Any, size: int) -> Any:
    """A scratch buffer for :func:`any_nonfinite` on up to ``size`` values of ``dtype``."""
    return np.empty(size, dtype=f"u{np.dtype(dtype).itemsize}")


def any_nonfinite(values: Any, scratch: Any) -> bool:
    """Whether the flat floating array ``values`` holds a NaN or Inf, from its exponent bits, in one pass
    (``scratch``: from :func:`exponent_scratch`)."""
    mask = _EXPONENT_MASKS[values.dtype.name]
    bits = np.bitwise_and(values.view(scratch.dtype), mask, out=scratch[: values.size])
    return bool(values.size) and bool(bits.max() == mask)
