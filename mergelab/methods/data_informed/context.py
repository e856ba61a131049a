"""What a data-informed merging method works with: experts with their heads and tasks, and a little data.

Data-informed methods (AdaMerging, Frank-Wolfe merging, Fisher, RegMean, surgery) cannot stream tensor by
tensor: they evaluate the merged model on data. They act on mergelab zoo checkpoints: each model entry of
the spec is an expert folder (``expert.json`` sidecar + ``backbone.safetensors`` + ``head.safetensors``, as
written by ``mergelab finetune`` / ``mergelab zoo``) or the ``backbone.safetensors`` file inside one, and
the base is the pretrained folder of the same architecture. Merging acts on the backbone; each task is
evaluated through its own expert's head.

Memory: :meth:`MergeContext.expert_state` reads an expert's backbone from disk on every call and keeps
nothing, so a method that holds only what it needs (e.g. Frank-Wolfe: the current model, its gradient and
the selected vertices) has memory constant in the pool size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mergelab.errors import SpecError
from mergelab.models import BACKBONE_FILE, HEAD_FILE, build_backbone, load_head, read_backbone_state
from mergelab.spec import DataSpec
from mergelab.tasks import get_task
from mergelab.training.result import load_expert

log = logging.getLogger(__name__)


@dataclass
class ExpertHandle:
    """One expert of the pool: its folder, task, architecture and merge weight (read from its sidecar)."""

    path: Path
    task: str
    arch: str
    weight: float
    num_classes: int
    test_accuracy: float

    @property
    def backbone_path(self) -> Path:
        return self.path / BACKBONE_FILE


def _expert_folder(path: Path) -> Path:
    return path.parent if path.is_file() else path


@dataclass
class MergeContext:
    """Experts, base, tasks and data for a data-informed merge. Build it with :meth:`from_spec`."""

    arch: str
    base_path: Path
    experts: list[ExpertHandle]
    tasks: list[str]
    data: DataSpec
    device: torch.device
    progress: bool = True
    out_dir: Path | None = None  # the merge's output folder (set by run_merge)
    outputs: dict[str, Any] = field(default_factory=dict)  # JSON-able results, stored in the merge record
    _heads: dict[str, nn.Linear] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, base: Path | None, models: Sequence[tuple[Path, float]], data: DataSpec | None,
                  device: torch.device, progress: bool = True) -> MergeContext:
        if base is None:
            raise SpecError("base: data-informed methods need the pretrained model (the zoo's pretrained folder)")
        experts = []
        for path, weight in models:
            folder = _expert_folder(Path(path))
            try:
                r = load_expert(folder)
            except Exception as exc:  # noqa: BLE001 - re-raised with the spec's context
                raise SpecError(
                    f"models: {path} is not a mergelab expert folder (data-informed methods need each expert's "
                    f"task and head, from `mergelab finetune` / `mergelab zoo`): {exc}"
                ) from None
            experts.append(ExpertHandle(folder, r.task, r.arch, weight, r.num_classes, r.test_metrics.accuracy))
        archs = {e.arch for e in experts}
        if len(archs) > 1:
            raise SpecError(f"models: experts of different architectures {sorted(archs)} cannot be merged")
        data = data or DataSpec()
        own_tasks = [e.task for e in experts]
        tasks = list(data.tasks) if data.tasks is not None else list(dict.fromkeys(own_tasks))
        missing = [t for t in tasks if t not in own_tasks]
        if missing:
            raise SpecError(
                f"data.tasks: no expert in the pool for task(s) {', '.join(missing)} (their heads are needed); "
                f"the pool's tasks are: {', '.join(dict.fromkeys(own_tasks))}"
            )
        return cls(archs.pop(), Path(base), experts, tasks, data, device, progress)

    # -- models -------------------------------------------------------------------------------------
    def build_backbone(self) -> nn.Module:
        return build_backbone(self.arch).to(self.device)

    def base_state(self) -> dict[str, torch.Tensor]:
        return read_backbone_state(self.base_path)

    def expert_state(self, index: int) -> dict[str, torch.Tensor]:
        """Expert ``index``'s backbone tensors, read from disk now (nothing is cached)."""
        return read_backbone_state(self.experts[index].backbone_path)

    def expert_for(self, task: str) -> ExpertHandle:
        for e in self.experts:
            if e.task == task:
                return e
        raise SpecError(f"no expert in the pool for task '{task}'")

    def head(self, task: str) -> nn.Linear:
        """The head of the expert fine-tuned on ``task`` (the first one, if several), frozen, on the device."""
        if task not in self._heads:
            feature_dim = build_backbone(self.arch).feature_dim
            head = load_head(self.expert_for(task).path / HEAD_FILE, feature_dim).to(self.device).eval()
            for p in head.parameters():
                p.requires_grad_(False)
            self._heads[task] = head
        return self._heads[task]

    # -- data ---------------------------------------------------------------------------------------
    def samples(self, task: str, split: Literal["train", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
        """``data.samples_per_task`` samples of ``task``'s ``split`` (seeded, without replacement), on the device."""
        t = get_task(task)
        x, y = (t.x_train, t.y_train) if split == "train" else (t.x_test, t.y_test)
        n = min(self.data.samples_per_task, len(y))
        gen = torch.Generator().manual_seed(self.data.seed + sum(map(ord, task)))
        idx = torch.randperm(len(y), generator=gen)[:n]
        return x[idx].to(self.device), y[idx].to(self.device)

    def split(self, default: Literal["train", "test"]) -> Literal["train", "test"]:
        return self.data.split or default
