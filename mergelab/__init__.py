"""mergelab: merge fine-tuned neural networks in parameter space, and predict whether they merge well.

Public entry points (imported lazily so ``mergelab --help`` stays fast):

- :func:`merge` (:func:`mergelab.merging.merge`): run a merge spec, write a loadable model;
- :class:`MergeSpec`, :func:`load_spec`: the validated merge specification;
- :mod:`mergelab.ops`: the task-vector operators; :mod:`mergelab.methods`: the methods.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "merge": ("mergelab.merging", "merge"),
    "MergeResult": ("mergelab.merging.publish", "MergeResult"),
    "MergeSpec": ("mergelab.spec", "MergeSpec"),
    "load_spec": ("mergelab.spec", "load_spec"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mergelab' has no attribute {name!r}")
