"""Fine-tuning experts with full hyperparameter control (``mergelab finetune``, ``mergelab zoo``).

Public API (imported lazily, so ``import mergelab.training`` is cheap)::

    ExpertSpec, make_spec, load_spec_file      the validated spec            (spec.py)
    finetune, expert_path, resolve_spec,
    frozen_head                                train or fetch one expert     (finetuning.py)
    ExpertResult, read_expert, load_expert,
    load_expert_model, NoiseScale              the sidecar and readers       (result.py)
    branch_spec, resolve_parent                bifurcation protocol          (branching.py)
    build_zoo, default_spec, ZooResult         one expert per task           (zoo.py)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExpertSpec": "spec",
    "BranchFrom": "spec",
    "make_spec": "spec",
    "load_spec_file": "spec",
    "finetune": "finetuning",
    "expert_path": "finetuning",
    "resolve_spec": "finetuning",
    "frozen_head": "finetuning",
    "ExpertResult": "result",
    "NoiseScale": "result",
    "read_expert": "result",
    "load_expert": "result",
    "load_expert_model": "result",
    "branch_spec": "branching",
    "resolve_parent": "branching",
    "build_zoo": "zoo",
    "default_spec": "zoo",
    "ZooResult": "zoo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mergelab.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mergelab.training' has no attribute {name!r}")
