"""``ExpertResult``: the JSON sidecar (``expert.json``) of a fine-tuned expert, and readers for it.

An expert folder ``<root>/zoo/<arch>/experts/<task>/<spec_hash>/`` holds ``backbone.safetensors``,
``head.safetensors`` (format: :mod:`mergelab.models.state`), ``expert.json`` and, when
``checkpoint_every > 0``, ``checkpoints/step_<s>/`` with ``backbone.safetensors``, ``head.safetensors``,
``optimizer.pt`` (``torch.save`` of the optimizer state dict) and ``meta.json``.

The sidecar records the full resolved spec and its hash, the effective noise scale, the per-step training
loss (``loss_curve[i]`` is the loss of global step ``loss_curve_start + i``), final train/test metrics
(train = the training subset, eval mode, no augmentation), ``init_test_metrics`` (the starting model:
pretrained backbone + initial head, after the BN re-estimation that ``head_init="probe"`` performs; absent
for branches), sizes and data fingerprints (:func:`~mergelab.training.provenance.data_fingerprint` of the
training subset and of the test split), the pretrained backbone's id, the intra-op thread count the run was
pinned to (``threads``, :mod:`mergelab.training.threads`), wall time, device and versions.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from mergelab.errors import CheckpointError
from mergelab.evaluation.metrics import Metrics
from mergelab.models.registry import build_backbone
from mergelab.models.state import BACKBONE_FILE, HEAD_FILE, load_backbone_state, load_head, read_backbone_state
from mergelab.training.spec import ExpertSpec

SIDECAR = "expert.json"
CHECKPOINTS = "checkpoints"
SIDECAR_FORMAT = "mergelab-expert/1"
PathLike = str | os.PathLike[str]


class NoiseScale(BaseModel):
    """Effective noise scale proxy ``value = eta / (B (1 - beta))`` (THEORY.md section 2).

    ``beta`` is the SGD momentum (0 without momentum) or, for Adam/AdamW, ``beta1`` (``beta_source`` says
    which). ``value_squared`` is the variant ``eta / (B (1 - beta)^2)`` used by one version of the paper.
    """

    value: float
    value_squared: float
    form: str = "eta / (B * (1 - beta))"
    eta: float
    batch_size: int
    beta: float
    beta_source: str

    @classmethod
    def of(cls, spec: ExpertSpec) -> NoiseScale:
        beta = spec.momentum
        return cls(
            value=spec.noise_scale(),
            value_squared=spec.lr / (spec.batch_size * (1 - beta) ** 2),
            eta=spec.lr,
            batch_size=spec.batch_size,
            beta=beta,
            beta_source="sgd momentum" if spec.optimizer == "sgd" else f"{spec.optimizer} beta1",
        )


class ParentRef(BaseModel):
    """The checkpoint a branched expert continued from."""

    spec_hash: str
    path: str
    step: int


class ExpertResult(BaseModel):
    """A fine-tuned expert: the sidecar's content plus ``path`` (its folder) and ``cached`` (reused, not trained)."""

    format: str = SIDECAR_FORMAT
    spec: ExpertSpec
    spec_hash: str
    arch: str
    task: str
    num_classes: int
    feature_dim: int
    noise_scale: NoiseScale
    n_train: int
    n_test: int
    train_fingerprint: str | None = None
    test_fingerprint: str | None = None
    loss_curve: list[float]
    loss_curve_start: int = 0
    train_metrics: Metrics
    test_metrics: Metrics
    init_test_metrics: Metrics | None = None
    checkpoints: list[int] = Field(default_factory=list)
    parent: ParentRef | None = None
    pretrained_id: str
    wall_time_s: float
    threads: int | None = None  # intra-op threads the training ran on (spec.threads; None: before they were pinned)
    device: str
    versions: dict[str, str]
    created: str
    path: str = ""
    cached: bool = False

    def sidecar_json(self) -> str:
        """The sidecar text (everything except ``path`` and ``cached``)."""
        return self.model_dump_json(indent=2, exclude={"path", "cached"})

    @property
    def backbone_path(self) -> Path:
        return Path(self.path) / BACKBONE_FILE

    @property
    def head_path(self) -> Path:
        return Path(self.path) / HEAD_FILE

    def checkpoint_dir(self, step: int) -> Path:
        return Path(self.path) / CHECKPOINTS / f"step_{step:06d}"


def read_expert(path: PathLike) -> ExpertResult | None:
    """The expert stored in folder ``path``, or ``None`` if it holds no complete expert."""
    folder = Path(path)
    sidecar = folder / SIDECAR
    if not sidecar.is_file() or not (folder / BACKBONE_FILE).is_file() or not (folder / HEAD_FILE).is_file():
        return None
    try:
        result = ExpertResult.model_validate_json(sidecar.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{sidecar}: unreadable expert sidecar: {exc}") from exc
    return result.model_copy(update={"path": str(folder), "cached": False})


def load_expert(path: PathLike) -> ExpertResult:
    """Like :func:`read_expert` but raises :class:`CheckpointError` when ``path`` is not an expert folder."""
    result = read_expert(path)
    if result is None:
        raise CheckpointError(f"{path}: not an expert folder (needs {SIDECAR}, {BACKBONE_FILE}, {HEAD_FILE})")
    return result


def load_expert_model(path: PathLike) -> tuple[torch.nn.Module, torch.nn.Linear, ExpertResult]:
    """``(backbone, head, result)`` of the expert in folder ``path``, on CPU, in eval mode."""
    result = load_expert(path)
    backbone = build_backbone(result.arch)
    load_backbone_state(backbone, read_backbone_state(result.backbone_path), source=str(result.backbone_path))
    head = load_head(result.head_path, backbone.feature_dim)
    return backbone.eval(), head.eval(), result
