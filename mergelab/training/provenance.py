"""Provenance recorded in every sidecar: library versions and the device used."""

from __future__ import annotations

import hashlib
import platform

import torch

import mergelab


def versions() -> dict[str, str]:
    """``{"torch", "mergelab", "python"}`` version strings."""
    return {"torch": torch.__version__, "mergelab": mergelab.__version__, "python": platform.python_version()}


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """16 hex digits of SHA-256 over the shapes, dtypes and bytes of ``tensors`` (in order).

    Experts record the fingerprints of their training subset and test split, so a cached expert is not
    reused (and evaluation refuses stale references) when a task's data changes, version bump or not.
    """
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
