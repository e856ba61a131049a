"""Evaluating a backbone (expert, pretrained or merged) on the task suite with per-task heads.

For every task ``t`` with head ``h_t``, ``acc_t`` and ``loss_t`` (mean cross-entropy) are measured on the
task's test split with the model ``h_t(backbone(x))`` in eval mode. Reported on top:

* **normalized accuracy** ``acc_t / acc_expert_t`` where ``acc_expert_t`` is the test accuracy of task
  ``t``'s own expert (from its sidecar), and its mean over tasks (THEORY.md section 2);
* **joint** metrics over the union of the tasks' test sets (each example scored with its own task's head):
  ``sum_t correct_t / sum_t n_t`` and the example-weighted mean loss.

Heads: ``experts`` mode (default) uses each task's expert head — the default zoo expert of the architecture
unless expert folders are given. ``probe`` mode fits a linear probe per task on the backbone's own features
(:func:`mergelab.models.probe.fit_linear_probe`, training split) — the "pretrained + fitted head" baseline.

**BatchNorm.** A merged backbone's BN running statistics are merged like parameters (averaged by most
methods), which mismatches the merged network's activations. ``reset_bn`` re-estimates them
(:func:`mergelab.evaluation.bn.reset_bn_statistics`, ``bn_batches`` batches of 128 training images):
``"joint"`` (or ``True``) once on the union of the tasks' training splits -- one merged model for all
tasks; ``"per_task"`` separately for each task on its own training split before scoring it -- the merged
parameters with task-specific BN statistics (a few task images, no labels). ``"merged"`` (default; also
``False``/``"off"``) uses the merged statistics as they are. The protocols and the default that
comparisons use are in :mod:`mergelab.evaluation.protocol`. Evaluation never changes files on disk.

**Splits.** ``split="test"`` (default) scores the test split; ``split="validation"`` scores
:func:`mergelab.tasks.validation_split` (a fixed sample of the *training* split), for choosing a merge's
hyperparameters without looking at the test split.

**Validity.** A task whose logits are non-finite for some example (NaN/Inf BN statistics or weights) records
the count in ``nonfinite``; :attr:`EvaluationResult.valid` is False then, and its accuracy is meaningless
(argmax of NaN): comparisons mark such a row *invalid*.

**Per-example outcomes.** Each row keeps its examples' correctness bit-packed (``TaskEvaluation.correct``,
1 bit per example, :meth:`TaskEvaluation.outcomes`), so two models scored on the same test split can be
compared pair by pair (:func:`mergelab.analysis.statistics.paired_accuracy_test`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from mergelab.errors import CheckpointError, MergeLabError, SpecError
from mergelab.evaluation.bn import reset_bn_statistics
from mergelab.evaluation.metrics import Metrics, classifier_outputs
from mergelab.evaluation.outcomes import pack_outcomes, unpack_outcomes
from mergelab.models.device import default_device
from mergelab.models.probe import extract_features, fit_linear_probe
from mergelab.models.registry import build_backbone, infer_arch
from mergelab.models.state import load_backbone_state, load_head, read_backbone_state
from mergelab.tasks import get_task, list_tasks, validation_split
from mergelab.training.provenance import data_fingerprint
from mergelab.training.result import ExpertResult, load_expert
from mergelab.training.zoo import default_spec, finetune_if_cached
from mergelab.untrusted_input import read_json_file

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


class TaskEvaluation(BaseModel):
    """One task's row: test metrics of backbone + head, the expert's own accuracy and the ratio."""

    task: str
    n_test: int
    accuracy: float
    loss: float
    expert_accuracy: float | None = None
    normalized_accuracy: float | None = None
    head: str = ""
    nonfinite: int = 0
    #: Per-example correctness in test order, bit-packed (:func:`mergelab.evaluation.outcomes.pack_outcomes`,
    #: 1 bit per example), for paired tests between methods evaluated on the same examples; "" when not kept.
    correct: str = ""

    def outcomes(self) -> np.ndarray | None:
        """The per-example correctness (``n_test`` booleans), or None when it was not kept."""
        return unpack_outcomes(self.correct, self.n_test) if self.correct else None


class EvaluationResult(BaseModel):
    """Per-task rows, joint metrics over the union of test sets, and means over tasks."""

    backbone: str
    arch: str
    heads: str
    reset_bn: str = "merged"
    split: str = "test"
    tasks: list[TaskEvaluation]
    joint: Metrics
    mean_accuracy: float
    mean_normalized_accuracy: float | None = None

    def by_task(self) -> dict[str, TaskEvaluation]:
        return {row.task: row for row in self.tasks}

    @property
    def valid(self) -> bool:
        """False when any example of any task got non-finite logits (the model is broken, not just bad)."""
        return all(row.nonfinite == 0 for row in self.tasks)

    def table(self) -> str:
        """A fixed-width text table (one row per task, then mean and joint rows)."""
        lines = [f"backbone: {self.backbone}  (arch {self.arch}, heads: {self.heads}{'' if self.reset_bn == 'merged' else ', BN reset: ' + self.reset_bn}{'' if self.split == 'test' else ', split: ' + self.split})"]
        lines.append(f"{'task':<22} {'n':>6} {'acc':>7} {'loss':>8} {'expert':>7} {'norm':>7}")
        fmt = lambda v: "   -   " if v is None else f"{v:7.4f}"  # noqa: E731
        for r in self.tasks:
            lines.append(
                f"{r.task:<22} {r.n_test:>6} {r.accuracy:7.4f} {r.loss:8.4f} "
                f"{fmt(r.expert_accuracy)} {fmt(r.normalized_accuracy)}"
            )
        lines.append(
            f"{'mean over tasks':<22} {'':>6} {self.mean_accuracy:7.4f} {'':>8} {'':>7} "
            f"{fmt(self.mean_normalized_accuracy)}"
        )
        lines.append(f"{'joint (union)':<22} {self.joint.n:>6} {self.joint.accuracy:7.4f} {self.joint.loss:8.4f}")
        return "\n".join(lines)


def _arch_from_sidecar(path: Path) -> str | None:
    folder = path if path.is_dir() else path.parent
    for name in ("expert.json", "pretrained.json"):
        f = folder / name
        if f.is_file():
            try:
                return read_json_file(f, what="sidecar").get("arch")
            except (OSError, MergeLabError, AttributeError):  # unreadable or not an object: arch unknown
                return None
    return None


def load_backbone(backbone: PathLike | Mapping[str, torch.Tensor], arch: str | None = None) -> tuple[torch.nn.Module, str]:
    """``(module, arch)`` for a backbone path or state dict; ``arch`` is inferred when not given."""
    if isinstance(backbone, Mapping):
        state, source = dict(backbone), "<state dict>"
    else:
        state, source = read_backbone_state(backbone), str(backbone)
        arch = arch or _arch_from_sidecar(Path(backbone))
    arch = arch or infer_arch(state)
    module = build_backbone(arch)
    load_backbone_state(module, state, source=source)
    return module, arch


def _expert_heads(experts: Sequence[object], arch: str | None):
    """``{task: ExpertResult}`` and the experts' common architecture."""
    heads: dict[str, ExpertResult] = {}
    archs = set()
    for e in experts:
        r = e if isinstance(e, ExpertResult) else load_expert(e)  # type: ignore[arg-type]
        if r.task in heads:
            raise SpecError(f"two experts for task {r.task!r}: {heads[r.task].path} and {r.path}")
        heads[r.task] = r
        archs.add(r.arch)
    if len(archs) > 1:
        raise SpecError(f"experts of different architectures: {sorted(archs)}")
    if archs and arch is not None and arch not in archs:
        raise SpecError(f"--arch {arch} but the experts are {archs.pop()}")
    return heads, (archs.pop() if archs else arch)


def default_experts(arch: str, tasks: Sequence[str] | None = None, cache_dir: PathLike | None = None, required: bool = True) -> list:
    """The cached default zoo experts of ``arch`` for ``tasks`` (default: all tasks).

    Missing experts raise :class:`SpecError` (``required``) or are skipped.
    """
    found, missing = [], []
    for t in tasks if tasks is not None else list_tasks():
        r = finetune_if_cached(default_spec(t, arch), cache_dir)
        (found.append(r) if r is not None else missing.append(t))
    if missing and required:
        raise SpecError(
            f"no cached default {arch} expert for task(s) {', '.join(missing)}; build them with "
            f"`mergelab zoo --arch {arch}` or pass expert folders"
        )
    return found


def evaluate(
    backbone: PathLike | Mapping[str, torch.Tensor],
    experts: Sequence[object] | None = None,
    *,
    arch: str | None = None,
    tasks: Sequence[str] | None = None,
    heads: str = "experts",
    cache_dir: PathLike | None = None,
    reset_bn: bool | str = False,
    bn_batches: int = 20,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    split: str = "test",
) -> EvaluationResult:
    """Evaluate ``backbone`` on each task with that task's head; see the module docstring.

    Args:
        backbone: a path (expert or pretrained folder, merged folder, weights file) or a state dict.
        experts: expert folders / :class:`ExpertResult` s whose heads (and accuracies) to use; default: the
            cached default zoo experts of ``arch`` for ``tasks``.
        arch: architecture; inferred from the experts, the backbone's sidecar or its tensors if not given.
        tasks: restrict to these tasks (default: the experts' tasks, or all tasks).
        heads: ``"experts"`` or ``"probe"`` (fit a linear probe per task on this backbone's features).
        reset_bn: ``"merged"`` (also ``False``/``"off"``), ``True``/``"joint"`` or ``"per_task"`` BatchNorm
            re-estimation on ``bn_batches`` batches of training images (module docstring).
        split: ``"test"`` or ``"validation"`` (module docstring).
    """
    bn_mode = {False: "merged", True: "joint"}[reset_bn] if isinstance(reset_bn, bool) else reset_bn
    bn_mode = "merged" if bn_mode == "off" else bn_mode
    if bn_mode not in ("merged", "joint", "per_task"):
        raise SpecError(f"reset_bn must be merged (off), joint or per_task, got {reset_bn!r}")
    if split not in ("test", "validation"):
        raise SpecError(f"split must be 'test' or 'validation', got {split!r}")
    if heads not in ("experts", "probe"):
        raise SpecError(f"heads must be 'experts' or 'probe', got {heads!r}")
    if experts is not None and len(experts) == 0:
        raise SpecError("empty list of experts")
    head_map: dict = {}
    if experts is not None:
        head_map, arch = _expert_heads(experts, arch)
    model, arch = load_backbone(backbone, arch)
    if experts is None:
        head_map, _ = _expert_heads(default_experts(arch, tasks, cache_dir, required=heads == "experts"), arch)
    task_names = list(tasks) if tasks is not None else (list(head_map) if experts is not None or heads == "experts" else None)
    if task_names is None:
        task_names = list_tasks()
    unknown = [t for t in task_names if heads == "experts" and t not in head_map]
    if unknown:
        raise SpecError(f"no expert head for task(s) {unknown}")
    dev = default_device(device)
    model.to(dev)
    datas = {t: get_task(t) for t in task_names}
    if bn_mode == "joint":
        x_all = torch.cat([d.x_train for d in datas.values()])
        reset_bn_statistics(model, x_all, num_batches=bn_batches)
    rows, all_correct, all_loss = [], [], []
    for t, data in datas.items():
        expert = head_map.get(t)
        if expert is not None and expert.test_fingerprint != data_fingerprint(data.x_test, data.y_test):
            raise SpecError(
                f"expert {expert.path} was trained and scored on another version of task {t!r} "
                f"(its test split changed); rebuild it (e.g. `mergelab zoo --arch {expert.arch}`)"
            )
        if bn_mode == "per_task":
            reset_bn_statistics(model, data.x_train, num_batches=bn_batches)
        if heads == "probe":
            head = fit_linear_probe(extract_features(model, data.x_train, device=dev), data.y_train, data.num_classes)
            head_desc = "linear probe"
        else:
            head = load_head(expert.head_path, model.feature_dim)
            head_desc = str(expert.head_path)
        if head.out_features != data.num_classes:
            raise SpecError(f"head {head_desc} has {head.out_features} classes, task {t!r} has {data.num_classes}")
        x_eval, y_eval = (data.x_test, data.y_test) if split == "test" else validation_split(data)
        correct, losses = classifier_outputs(model, head.to(dev), x_eval, y_eval, batch_size)
        acc, loss = correct.double().mean().item(), losses.mean().item()
        nonfinite = int((~torch.isfinite(losses)).sum().item())
        if nonfinite:
            log.warning("%s on task %s: %d of %d examples have non-finite logits (invalid model)",
                        backbone if not isinstance(backbone, Mapping) else "<state dict>", t, nonfinite, len(losses))
        ref = expert.test_metrics.accuracy if expert is not None and split == "test" else None
        rows.append(
            TaskEvaluation(
                task=t,
                n_test=len(correct),
                accuracy=acc,
                loss=loss,
                expert_accuracy=ref,
                normalized_accuracy=(acc / ref) if ref else None,
                head=head_desc,
                nonfinite=nonfinite,
                correct=pack_outcomes(correct.numpy()),
            )
        )
        all_correct.append(correct)
        all_loss.append(losses)
    if not rows:
        raise SpecError("no tasks to evaluate")
    correct_cat, loss_cat = torch.cat(all_correct), torch.cat(all_loss)
    norms = [r.normalized_accuracy for r in rows]
    return EvaluationResult(
        backbone=str(backbone) if not isinstance(backbone, Mapping) else "<state dict>",
        arch=arch,
        heads=heads,
        reset_bn=bn_mode,
        split=split,
        tasks=rows,
        joint=Metrics(accuracy=correct_cat.double().mean().item(), loss=loss_cat.mean().item(), n=len(correct_cat)),
        mean_accuracy=sum(r.accuracy for r in rows) / len(rows),
        mean_normalized_accuracy=(sum(norms) / len(norms)) if all(n is not None for n in norms) else None,  # type: ignore[arg-type]
    )
