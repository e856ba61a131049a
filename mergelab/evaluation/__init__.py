"""Evaluation of backbones with per-task heads: accuracy, loss, normalized accuracy, joint metrics.

Public API::

    evaluate, EvaluationResult, TaskEvaluation,
    load_backbone, default_experts                 backbone x task heads          (task_suite.py)
    Metrics, evaluate_classifier                   accuracy / cross-entropy       (metrics.py)
    reset_bn_statistics                            BN re-estimation after merging (bn.py)
"""

from __future__ import annotations

import importlib
from typing import Any

from mergelab.evaluation.metrics import Metrics, classifier_outputs, evaluate_classifier

_LAZY = {
    "evaluate": "task_suite",
    "EvaluationResult": "task_suite",
    "TaskEvaluation": "task_suite",
    "load_backbone": "task_suite",
    "default_experts": "task_suite",
    "reset_bn_statistics": "bn",
}

__all__ = ["Metrics", "classifier_outputs", "evaluate_classifier", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"mergelab.evaluation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mergelab.evaluation' has no attribute {name!r}")
