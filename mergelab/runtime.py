"""Process-wide runtime settings for CPU-heavy commands.

:func:`prefer_passive_omp` lets idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``)
unless the user chose a policy. On a 2-core machine that other processes also use, torch's spinning intra-op
threads are descheduled mid-region and every parallel region waits for them: a resnet_s training step
measured 1.0-1.9 s with 2 threads under the default policy against 0.07-0.16 s with 2 passive threads, on the
same loaded machine. OpenMP reads the variable once, when torch loads it, so this must run before torch is
imported; the training and evaluation commands call it first thing (the merge engine sets its own threads).
"""

from __future__ import annotations

import os
import sys


def prefer_passive_omp() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` if it is unset and torch is not imported yet; return whether it took."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
