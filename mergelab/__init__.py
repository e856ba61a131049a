"""mergelab: merge fine-tuned neural networks in parameter space, and predict whether they merge well."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
