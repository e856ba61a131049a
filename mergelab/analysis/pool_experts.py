"""The experts of a merge spec as the data analysis needs them: zoo expert folders (``expert.json`` sidecar,
backbone, head) checked against the task suite as it builds the tasks now, their training data exactly as
fine-tuning loaded it, display labels, and seeded task samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergelab.errors import MergeLabError, SpecError
from mergelab.untrusted_input import read_json_file

if TYPE_CHECKING:  # pragma: no cover
    from mergelab.spec import DataSpec, MergeSpec
    from mergelab.training.result import ExpertResult


def expert_folder(path: str | Path) -> Path | None:
    """The expert folder ``path`` is (or whose ``backbone.safetensors`` it is), or ``None`` if it is no expert."""
    # deferred: training and tasks load the task suite; `mergelab analyze` imports this module on its data-free path
    from mergelab.training.result import read_expert

    p = Path(path)
    folder = p.parent if p.is_file() else p
    try:
        return folder if read_expert(folder) is not None else None
    except Exception:  # noqa: BLE001 - an unreadable sidecar is "not an expert" here; load_expert says why later
        return None


def expert_training_data(expert: ExpertResult) -> Any:
    """The expert's training data as fine-tuning loaded it: the task, subset to ``data_ratio`` with
    ``data_seed`` (:func:`mergelab.training.finetuning.load_task_data`)."""
    # deferred: the task suite, see expert_folder
    from mergelab.training.finetuning import load_task_data

    return load_task_data(expert.spec)


def stale_reason(expert: ExpertResult) -> str | None:
    """Why ``expert`` no longer matches its task as the task suite builds it now (a task whose generator changed
    after the expert was trained), or ``None`` when it matches. Compares the data fingerprints the sidecar
    records when it has them, else the class count and split sizes."""
    # deferred: the task suite, see expert_folder
    from mergelab.tasks import get_task

    try:
        task = get_task(expert.task)
    except Exception as exc:  # noqa: BLE001 - an unknown or unbuildable task is a reason too
        return f"task {expert.task!r} cannot be loaded: {exc}"
    diffs = []
    recorded = (getattr(expert, "train_fingerprint", None), getattr(expert, "test_fingerprint", None))
    if all(recorded):
        # deferred: the task suite, see expert_folder
        from mergelab.training.finetuning import fingerprints

        if tuple(fingerprints(expert_training_data(expert))) != recorded:
            diffs.append("the task's data changed since it was trained (data fingerprints differ)")
    if task.num_classes != expert.num_classes:
        diffs.append(f"its head has {expert.num_classes} classes, the task now has {task.num_classes}")
    if task.n_test != expert.n_test:
        diffs.append(f"it was tested on {expert.n_test} examples, the task's test split now has {task.n_test}")
    if expert.spec.data_ratio == 1.0 and task.n_train != expert.n_train:
        diffs.append(f"it trained on {expert.n_train} examples, the task's training split now has {task.n_train}")
    if not diffs:
        return None
    return (f"expert {expert.path} was fine-tuned on another version of task {expert.task!r} ("
            + "; ".join(diffs) + f"): rebuild it (e.g. `mergelab zoo --arch {expert.arch}`)")


def has_fingerprints(expert: ExpertResult) -> bool:
    """Whether the sidecar records the data fingerprints that prove which task data the expert saw (older
    sidecars do not; :func:`mergelab.evaluation.evaluate` refuses such experts)."""
    return bool(getattr(expert, "train_fingerprint", None) and getattr(expert, "test_fingerprint", None))


@dataclass
class PoolExperts:
    """The experts of a spec read from their folders, with display labels, merge weights and the tasks the
    landscape and CKA are evaluated on."""

    base_path: Path
    arch: str
    experts: list[ExpertResult]
    labels: list[str]
    weights: list[float]
    tasks: list[str]
    warnings: list[str] = field(default_factory=list)

    def head_for(self, task: str) -> Path:
        for e in self.experts:
            if e.task == task:
                return e.head_path
        raise SpecError(f"no expert in the pool for task '{task}'")


def resolve_pool(spec: MergeSpec, data: DataSpec, *, source: str = "spec") -> PoolExperts:
    """Read the spec's experts for the data analysis, raising :class:`SpecError` with a clear message when
    a model is not a zoo expert folder, the experts mix architectures, the base is missing, or ``data.tasks``
    names a task no expert of the pool was fine-tuned on (its head and data would be needed)."""
    # deferred: the task suite, see expert_folder
    from mergelab.training.result import load_expert

    if spec.base is None:
        raise SpecError(f"{source}: base: the data analysis needs the pretrained backbone theta_0 (the zoo's "
                        "pretrained folder)")
    not_experts = [str(m.path) for m in spec.models if expert_folder(m.path) is None]
    if not_experts:
        raise SpecError(
            f"{source}: models: the data analysis needs mergelab expert folders (expert.json + backbone + head, "
            f"from `mergelab finetune` / `mergelab zoo`) to know each expert's task, head and hyperparameters; "
            f"not expert folder(s): {', '.join(not_experts)}"
        )
    experts = [load_expert(expert_folder(m.path)) for m in spec.models]  # type: ignore[arg-type]
    archs = sorted({e.arch for e in experts})
    if len(archs) > 1:
        raise SpecError(f"{source}: models: experts of different architectures {archs} cannot be analysed together")
    stale = [r for r in (stale_reason(e) for e in experts) if r]
    if stale:
        raise SpecError(f"{source}: models: " + "; ".join(stale))
    unverified = [e.task for e in experts if not has_fingerprints(e)]
    own = list(dict.fromkeys(e.task for e in experts))
    tasks = list(data.tasks) if data.tasks is not None else own
    missing = [t for t in tasks if t not in own]
    if missing:
        raise SpecError(
            f"{source}: data.tasks: no expert in the pool for task(s) {', '.join(missing)} (the analysis needs "
            f"that task's expert head); the pool's tasks are: {', '.join(own)}"
        )
    warnings = []
    if unverified:
        warnings.append(f"expert(s) {unverified} record no data fingerprints (trained before they existed): their "
                        "class counts and split sizes match the current tasks, the data themselves cannot be checked")
    base = Path(spec.base)
    base_folder = base.parent if base.is_file() else base
    sidecar = base_folder / "pretrained.json"
    if sidecar.is_file():
        try:
            pid = read_json_file(sidecar, what="sidecar", error=SpecError).get("pretrained_id")
        except (OSError, MergeLabError, AttributeError):  # unreadable or not an object: no pretrained_id to check
            pid = None
        other = sorted({e.pretrained_id for e in experts if pid is not None and e.pretrained_id != pid})
        if other:
            warnings.append(f"base {base} has pretrained_id {pid} but expert(s) were fine-tuned from {other}: "
                            "theta_0 is not their starting point")
    else:
        warnings.append(f"base {base} is not a zoo pretrained folder (no pretrained.json): quantities 'at theta_0' "
                        "are measured at this base")
    branched = [e.task for e in experts if e.parent is not None]
    if branched:
        warnings.append(f"expert(s) {branched} were branched from a parent checkpoint, not fine-tuned from theta_0")
    counts: dict[str, int] = {}
    for e in experts:
        counts[e.task] = counts.get(e.task, 0) + 1
    seen: dict[str, int] = {}
    labels = []
    for e in experts:
        if counts[e.task] == 1:
            labels.append(e.task)
        else:
            seen[e.task] = seen.get(e.task, 0) + 1
            labels.append(f"{e.task}#{seen[e.task]}")
    return PoolExperts(base, archs[0], experts, labels, [m.weight for m in spec.models], tasks, warnings)


def task_samples(task: str, split: str, n: int, seed: int, data: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of ``task``'s ``split`` drawn without replacement under ``seed`` (the same draw as
    :meth:`mergelab.methods.data_informed.context.MergeContext.samples`); ``data`` is a preloaded
    :class:`~mergelab.tasks.TaskData` (e.g. an expert's training subset)."""
    if data is None:
        # deferred: the task suite, see expert_folder
        from mergelab.tasks import get_task

        data = get_task(task)
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    gen = torch.Generator().manual_seed(seed + sum(map(ord, task)))
    idx = torch.randperm(len(y), generator=gen)[: min(n, len(y))]
    return x[idx], y[idx]
