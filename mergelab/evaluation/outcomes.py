"""Per-example outcomes of an evaluation, stored compactly: the correctness of each test example in test order as
base64 of its bit-packed bytes (``numpy.packbits``, big-endian bit order), 1 bit per example (1,000 examples:
168 characters).

An evaluation row (:class:`mergelab.evaluation.task_suite.TaskEvaluation`, a comparison table's
``per_task_correct``) keeps them so that two methods evaluated on the same examples can be compared pair by pair
(:func:`mergelab.analysis.statistics.paired_accuracy_test`). Numpy only: evaluation writes them and the analysis
layer reads them, so they sit in the lower of the two layers.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np

__all__ = ["pack_outcomes", "unpack_outcomes"]


def pack_outcomes(correct: Sequence[bool] | np.ndarray) -> str:
    """Per-example correctness as base64 of its bit-packed bytes (``numpy.packbits``, big-endian bit order):
    1 bit per example (1,000 examples: 168 characters)."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode("ascii")


def unpack_outcomes(packed: str, n: int) -> np.ndarray:
    """The ``n`` booleans :func:`pack_outcomes` packed (ValueError when ``packed`` holds fewer)."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(packed.encode("ascii")), dtype=np.uint8))
    if bits.size < n or bits.size - n >= 8:
        raise ValueError(f"packed outcomes hold {bits.size} bits, not {n} examples")
    return bits[:n].astype(bool)
