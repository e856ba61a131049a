"""Provenance recorded in every sidecar: library versions and the device used."""

from __future__ import annotations

import platform

import torch

import mergelab


def versions() -> dict[str, str]:
    """``{"torch", "mergelab", "python"}`` version strings."""
    return {"torch": torch.__version__, "mergelab": mergelab.__version__, "python": platform.python_version()}
