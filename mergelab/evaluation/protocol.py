"""The evaluation protocol of merged backbones: how BatchNorm statistics are obtained, which heads are used.

Every comparison row (pretrained, every merge) is evaluated under one declared protocol, recorded in the row,
the table, the report and its verdicts.

BatchNorm statistics (``bn``)
-----------------------------
``merged``    the running statistics as the merge produced them (kept as merged). Data-free merges of zoo
              backbones get their BN statistics as the experts' weighted mean (:func:`statistics_overrides`),
              so they are valid, but they are the statistics of the *experts'* activations, not of the merged
              network's (variance collapse, Jordan et al. 2023, "REPAIR").
``joint``     re-estimated once on the union of the group's unlabelled training images (20 batches of 128),
              one merged model for all tasks. **Default for BatchNorm architectures**: re-estimating BN
              statistics after averaging or interpolating weights is the linear-mode-connectivity
              literature's standard practice (Frankle et al. 2020 and Ainsworth et al. 2023, "Git Re-Basin",
              reset BN statistics on training data before measuring a barrier; Jordan et al. 2023 show that
              without it merged ResNets look broken when they are not), it needs no labels and no task
              identity, and it keeps one model for all tasks, as merging promises.
``per_task``  re-estimated separately on each task's training images before scoring that task (task-specific
              statistics: uses the task's identity at test time, as each task's head already does).

Architectures without BatchNorm (``vit_s``: LayerNorm) have nothing to re-estimate: their protocol is
recorded as ``none``.

BatchNorm buffers are not task vectors. For data-free methods, a comparison adds per-tensor overrides
(:func:`statistics_overrides`) so that ``running_mean`` / ``running_var`` are never trimmed, never dropped and
never scaled by lambda: they become the weighted mean of the experts' statistics (task arithmetic / DARE:
``lambda = 1 / sum_i w_i``, no drop; TSV-Merge, Iso-C, Iso-CTS: ``lambda = N / sum_i w_i``; TIES / DARE-TIES:
density 1, lambda 1, agreeing-weight divisor, i.e. a weighted mean of the agreeing experts' values) — a convex
combination of valid statistics, so a running variance can never go negative. Data-informed methods treat them as their modules document (Fisher and
RegMean average them; AdaMerging and FW-Merging with ``bn: batch`` normalise with batch statistics while
optimising and re-estimate at the end, which is what comparisons pass under ``joint`` and ``per_task``).

A merge whose logits are non-finite on any example is **invalid** (:attr:`EvaluationResult.valid`): its
accuracy is not reported as a number and it can never count as agreeing with a paper.

Heads (``head``)
----------------
``expert``  each task's expert head, trained jointly with its backbone (the zoo's ``head_mode: trained``);
            the pretrained row uses the same expert heads.
``frozen``  one head per task, fitted once as a linear probe on the pretrained backbone and frozen during
            fine-tuning (``head_mode: frozen``; the papers' CLIP protocol, where the zero-shot heads are fixed):
            the pretrained model, every expert and every merge use the same head.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from mergelab.errors import SpecError
from mergelab.models.registry import build_backbone

BN_PROTOCOLS: dict[str, str] = {
    "merged": "BN statistics kept as merged",
    "joint": "BN statistics re-estimated jointly on the group's unlabelled training images",
    "per_task": "BN statistics re-estimated per task on that task's unlabelled training images",
    "none": "no BatchNorm in the architecture (nothing to re-estimate)",
}
#: The default protocol of comparisons, the quickstart and the studies for BatchNorm architectures.
DEFAULT_BN = "joint"
#: Tensor-name pattern of BatchNorm running statistics (an override pattern of the merge spec).
STATISTICS_PATTERN = "re:running_(mean|var)$"


@functools.lru_cache(maxsize=None)
def has_batchnorm(arch: str) -> bool:
    """Whether ``arch``'s backbone has BatchNorm layers (built once on the CPU and inspected)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in build_backbone(arch).modules())


def resolve_bn(bn: str | bool | None, arch: str) -> str:
    """The BN protocol for ``arch``: ``None`` -> the default (:data:`DEFAULT_BN`; ``none`` without BatchNorm);
    ``True`` -> ``joint``, ``False``/``"off"`` -> ``merged``; names are validated; idempotent (a resolved
    name resolves to itself)."""
    if bn is None:
        name = DEFAULT_BN
    elif isinstance(bn, bool):
        name = "joint" if bn else "merged"
    else:
        name = {"off": "merged", "per-task": "per_task"}.get(str(bn), str(bn))
    if name not in BN_PROTOCOLS:
        raise SpecError(f"bn must be one of merged, joint, per_task, got {bn!r}")
    if not has_batchnorm(arch):
        return "none"
    if name == "none":
        raise SpecError(f"bn: {arch} has BatchNorm layers; choose merged, joint or per_task, not 'none'")
    return name


def evaluation_reset(protocol: str) -> str:
    """The ``reset_bn`` argument of :func:`mergelab.evaluation.evaluate` for a protocol."""
    return {"merged": "merged", "none": "merged", "joint": "joint", "per_task": "per_task"}[protocol]


def describe(protocol: str, head: str = "expert") -> str:
    """One line naming the protocol (for tables, reports and verdicts)."""
    heads = {"expert": "each task's expert head", "frozen": "frozen probe heads shared by every row"}
    return f"{BN_PROTOCOLS[protocol]}; {heads.get(head, head)}"


def statistics_overrides(method: str, weights: Sequence[float]) -> list[dict[str, Any]]:
    """Per-tensor overrides that make a data-free ``method`` merge BN running statistics as the experts'
    weighted mean (module docstring); ``[]`` for methods that already do or have no such parameters.

    Task arithmetic ``theta_0 + lambda sum_i w_i tau_i`` with ``lambda = 1 / sum_i w_i`` is
    ``sum_i w_i theta_i / sum_i w_i``; TIES with density 1, lambda 1 and the agreeing-weight divisor is
    ``theta_0 + sum_{i in A} w_i tau_i / sum_{i in A} w_i``, the weighted mean of the agreeing experts'
    values (A: experts whose delta has the elected sign; all of them when every delta is 0). TSV-Merge,
    Iso-C and Iso-CTS take ``theta_0 + lambda sum_i w_i tau_i / N`` on 1-D tensors: ``lambda = N / sum_i w_i``.
    """
    total = float(sum(weights))
    if not math.isfinite(total) or total <= 0:
        return []
    mean = {"lambda": 1.0 / total}
    # TSV-Merge, Iso-C, Iso-CTS merge a 1-D tensor as theta_0 + lambda sum_i w_i tau_i / N
    spectral_mean = {"lambda": len(weights) / total}
    params: dict[str, dict[str, Any]] = {
        **dict.fromkeys(("tsv_merge", "iso_c", "iso_cts"), spectral_mean),
        "task_arithmetic": mean,
        "dare_linear": {"density": 1.0, **mean},
        "ties": {"density": 1.0, "lambda": 1.0, "disjoint_divisor": "weight"},
        "dare_ties": {"density": 1.0, "lambda": 1.0, "disjoint_divisor": "weight"},
        "breadcrumbs": {"density": 1.0, "gamma": 0.0, **mean},
    }
    if method not in params:
        return []
    return [{"pattern": STATISTICS_PATTERN, "parameters": params[method]}]


__all__ = ["BN_PROTOCOLS", "DEFAULT_BN", "STATISTICS_PATTERN", "describe", "evaluation_reset", "has_batchnorm",
           "resolve_bn", "statistics_overrides"]
