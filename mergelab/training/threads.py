"""Pinned intra-op threads: training gives the same weights on every machine of a kind, whatever its cores or load.

A float reduction that torch splits over ``n`` intra-op threads adds ``n`` partial sums, so its last bits, and
after a few hundred optimizer steps the weights, depend on ``n``. Torch's default ``n`` is the core count (or
``OMP_NUM_THREADS``), which differs between machines and callers: two fresh machines pretrained different
resnet_s backbones from one config (60.8 vs 53.4 % pretrained accuracy downstream), while ``--threads 1`` in
two empty caches gave bit-identical weights.

Every training entry point (:func:`mergelab.models.pretraining.pretrain`, :func:`mergelab.training.finetune`
for experts and branches, :func:`mergelab.training.multitask.train_multitask`) therefore runs inside
:func:`pinned_threads` with the count its spec or config names: the field ``threads``, default
:data:`mergelab.runtime.TRAINING_THREADS` (1). Inside, ``torch.set_num_threads(threads)`` and
``torch.use_deterministic_algorithms(True, warn_only=True)`` hold (an op without a deterministic kernel warns
instead of failing; on the CPU the mode cost 1-4 % of a resnet_s step); both are restored afterwards, so the
caller's own setting (1 or 2 threads, any load) no longer enters the weights. BatchNorm re-estimation and
linear probes run inside it too. Another count is an explicit override (``--threads N`` of ``mergelab
pretrain`` / ``finetune`` / ``zoo``): it trains other weights, so it is part of the spec hash / pretrained id,
and every sidecar records the count the run used (``threads``).

Inter-op threads are left alone: eager training runs no inter-op work (they serve TorchScript forks), and
``torch.set_num_interop_threads`` may be called only once per process, before any such work.

Parallelism comes from training several experts at once instead (``mergelab zoo`` runs a process pool of
one-thread workers). Pretraining, one process, pays for it on an idle machine: the 1000 steps of resnet_s
took 53-63 s on two threads at load ~1 on a shared 2-core machine, and one thread costs ~96 ms a step there
(~95-100 s); under a load of 4-5 from other processes one thread was the faster (116 s against 150 s on two,
whose threads wait for each other). Pinned to two threads (``--threads 2``) the run reproduced the earlier
unpinned two-thread backbone bit for bit: the deterministic-algorithms mode changes no CPU weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mergelab.runtime import TRAINING_THREADS

__all__ = ["TRAINING_THREADS", "pinned_threads"]


@contextmanager
def pinned_threads(threads: int | None = None) -> Iterator[int]:
    """Run the block on ``threads`` torch intra-op threads (default :data:`TRAINING_THREADS`) with deterministic
    algorithms (warn-only); restore the caller's settings afterwards. Yields the thread count in effect."""
    n = TRAINING_THREADS if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    previous = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield torch.get_num_threads()
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(previous)
