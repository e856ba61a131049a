"""Pretraining a backbone on the task suite's pretraining pool.

``pretrain(arch)`` trains ``backbone`` + a pool head (one Linear over the pool's joint label space) on
:func:`mergelab.tasks.pretraining_pool` and caches the result in ``<root>/zoo/<arch>/pretrained/``
(see :mod:`mergelab.models.paths`)::

    backbone.safetensors   the pretrained backbone theta_0 (the merge base for task arithmetic)
    head.safetensors       the pool head
    pretrained.json        config, pretrained_id, weights_sha256, threads, pool metrics, wall time, versions

Defaults (``PretrainConfig.default(arch)``), chosen to take about a minute per architecture on two CPU cores:
ResNets: SGD, momentum 0.9, lr 0.1, weight decay 5e-4; ViT: AdamW, lr 2e-3, weight decay 0.05, betas
(0.9, 0.999). Cosine schedule with 5 % warmup, batch 128, augmentation on, seed 0, ``threads`` 1.

Training runs on ``config.threads`` intra-op threads (default :data:`mergelab.runtime.TRAINING_THREADS`,
whatever the caller's setting; :mod:`mergelab.training.threads`), so one config gives bit-identical weights
on any machine of the same kind; the count used is recorded as ``threads``.

``pretrained_id`` is ``<config id>-<weights digest>``: :func:`config_id` (a hash of the architecture, the
config, thread count included, and :data:`PRETRAIN_FORMAT`), then the first 12 hex digits of
``weights_sha256``, the SHA-256 of the saved backbone tensors (:func:`weights_digest`). Expert and multi-task
sidecars record the id, and everything that compares it (the fine-tuning cache, ``mergelab compare``, the
studies) treats an expert trained from another backbone -- another config *or* other weights for the same
config, e.g. pretrained on another machine -- as stale. The cache folder stays keyed by architecture:
:func:`pretrain` reuses it for the same config id, :func:`ensure_pretrained` takes whatever config it holds
(re-pretraining that config when the record predates the current format), and
:func:`load_pretrained_backbone` refuses a folder whose ``backbone.safetensors`` does not hash to its record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from mergelab import tasks  # tasks.pretraining_pool looked up per call: tests stand a tiny pool in
from mergelab.errors import CheckpointError
from mergelab.evaluation.metrics import evaluate_classifier
from mergelab.models.artifact_dir import staged_dir
from mergelab.models.classifier import Classifier, make_head
from mergelab.models.device import default_device
from mergelab.models.paths import pretrained_dir
from mergelab.models.registry import arch_info, build_backbone
from mergelab.models.state import (
    BACKBONE_FILE,
    HEAD_FILE,
    backbone_state,
    load_backbone_state,
    read_backbone_state,
    save_backbone,
    save_head,
)
from mergelab.runtime import TRAINING_THREADS
from mergelab.training.loop import LoopSettings, run_steps
from mergelab.training.optim import build_optimizer
from mergelab.training.provenance import versions
from mergelab.training.threads import pinned_threads

log = logging.getLogger(__name__)

SIDECAR = "pretrained.json"
PathLike = str | os.PathLike[str]


class PretrainConfig(BaseModel):
    """Hyperparameters of pretraining (see the module docstring for defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["constant", "cosine", "wsd"] = "cosine"
    warmup_frac: float = Field(0.05, ge=0, lt=1)
    augment: bool = True
    seed: int = 0
    threads: int = Field(TRAINING_THREADS, ge=1)

    @classmethod
    def default(cls, arch: str) -> PretrainConfig:
        """The default config of ``arch``'s family."""
        if arch_info(arch).family == "vit":
            return cls(steps=1500, optimizer="adamw", lr=2e-3, weight_decay=0.05)
        return cls()


class PretrainResult(BaseModel):
    """The content of ``pretrained.json`` plus the folder it lives in."""

    arch: str
    config: PretrainConfig
    pretrained_id: str
    num_classes: int
    n_train: int
    train_metrics: dict[str, float]
    test_metrics: dict[str, float]
    wall_time_s: float
    versions: dict[str, str]
    threads: int | None = None  # intra-op threads the training ran on (None: recorded before they were pinned)
    weights_sha256: str | None = None  # weights_digest of backbone.safetensors (None: an older record)
    path: str = ""

    def is_current(self) -> bool:
        """Whether the record was written by the current pretraining code: its id is the current
        ``<config id>-<digest>`` of its config and weights (older records are re-pretrained)."""
        return self.weights_sha256 is not None and self.pretrained_id == pretrained_id(
            self.arch, self.config, self.weights_sha256)


#: Bump when a code change alters what a config pretrains to (2: intra-op threads pinned, ``config.threads``).
PRETRAIN_FORMAT = 2


def config_id(arch: str, config: PretrainConfig) -> str:
    """16-hex-digit hash of ``arch``, ``config`` (thread count included) and :data:`PRETRAIN_FORMAT`: what
    determines the weights (the cache folder is reused for one config)."""
    blob = json.dumps({"arch": arch, "config": config.model_dump(mode="json"), "format": PRETRAIN_FORMAT},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_id(arch: str, config: PretrainConfig, weights_digest: str) -> str:
    """``<config id>-<first 12 hex digits of the weights' SHA-256>``: two backbones with one config but other
    weights (another machine's torch, an edited cache) get different ids, so experts fine-tuned from one are
    never taken for experts of the other."""
    return f"{config_id(arch, config)}-{weights_digest[:12]}"


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors, in name order.

    Taken over what ``backbone.safetensors`` holds (:func:`~mergelab.models.state.backbone_state`: no
    ``num_batches_tracked`` counters), so a folder's file can be checked against its record."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_pretrained(arch: str, cache_dir: PathLike | None = None) -> PretrainResult | None:
    """The cached pretraining record of ``arch``, or ``None`` if there is none."""
    folder = pretrained_dir(arch, cache_dir)
    sidecar = folder / SIDECAR
    if not sidecar.is_file() or not (folder / BACKBONE_FILE).is_file():
        return None
    try:
        result = PretrainResult.model_validate_json(sidecar.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{sidecar}: unreadable pretraining record: {exc}") from exc
    return result.model_copy(update={"path": str(folder)})


def pretrain(
    arch: str,
    cache_dir: PathLike | None = None,
    config: PretrainConfig | None = None,
    force: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> PretrainResult:
    """Pretrain ``arch`` on the pretraining pool, or return the cached result for the same config.

    A cached backbone with a different config (or an older record) is replaced (experts built on it will be
    retrained). Training runs on ``config.threads`` intra-op threads, whatever the caller's setting.
    """
    config = config or PretrainConfig.default(arch)
    cid = config_id(arch, config)
    cached = read_pretrained(arch, cache_dir)
    if cached is not None and not force and cached.is_current() and cached.pretrained_id.split("-")[0] == cid:
        log.info("pretrained %s found in %s", arch, cached.path)
        return cached
    if cached is not None:
        log.warning("replacing cached pretrained %s (id %s) with a backbone of config id %s", arch,
                    cached.pretrained_id, cid)
    with pinned_threads(config.threads):
        return _pretrain(arch, cache_dir, config, device, progress)


def _pretrain(arch: str, cache_dir: PathLike | None, config: PretrainConfig, device: str | torch.device | None,
              progress: bool) -> PretrainResult:
    t0 = time.perf_counter()
    pool = tasks.pretraining_pool()
    dev = default_device(device)
    torch.manual_seed(config.seed)
    backbone = build_backbone(arch)
    head = make_head(backbone.feature_dim, pool.num_classes)
    model = Classifier(backbone, head).to(dev)
    opt = build_optimizer(model.parameters(), config.optimizer, config.lr, config.momentum, config.weight_decay)
    settings = LoopSettings(
        lr=config.lr,
        steps=config.steps,
        batch_size=config.batch_size,
        seed=config.seed,
        augment=config.augment,
        schedule=config.schedule,
        warmup_frac=config.warmup_frac,
    )
    bar = None
    if progress:
        bar = tqdm(total=config.steps, desc=f"pretrain {arch}", unit="step")
    try:
        run_steps(model, opt, pool.x_train, pool.y_train, settings, on_step_end=(lambda s: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    train_m = evaluate_classifier(backbone, head, pool.x_train, pool.y_train)
    test_m = evaluate_classifier(backbone, head, pool.x_test, pool.y_test)
    digest = weights_digest(backbone_state(backbone))
    pid = pretrained_id(arch, config, digest)
    result = PretrainResult(
        arch=arch,
        config=config,
        pretrained_id=pid,
        num_classes=pool.num_classes,
        n_train=len(pool.x_train),
        train_metrics={"accuracy": train_m.accuracy, "loss": train_m.loss},
        test_metrics={"accuracy": test_m.accuracy, "loss": test_m.loss},
        wall_time_s=time.perf_counter() - t0,
        versions=versions(),
        threads=torch.get_num_threads(),
        weights_sha256=digest,
    )
    folder = pretrained_dir(arch, cache_dir)
    meta = {"arch": arch, "kind": "pretrained-backbone", "pretrained_id": pid}
    with staged_dir(folder) as stage:
        save_backbone(backbone, stage / BACKBONE_FILE, meta)
        save_head(head, stage / HEAD_FILE, {**meta, "kind": "pool-head"})
        (stage / SIDECAR).write_text(result.model_dump_json(indent=2, exclude={"path"}))
    log.info("pretrained %s: pool test accuracy %.4f in %.1fs", arch, test_m.accuracy, result.wall_time_s)
    return result.model_copy(update={"path": str(folder)})


def ensure_pretrained(arch: str, cache_dir: PathLike | None = None, **kwargs: object) -> PretrainResult:
    """The cached pretrained ``arch`` whatever its config, pretraining at defaults (or ``kwargs["config"]``) if
    there is none. A record written by older pretraining code (no weights digest in its id, another format) is
    re-pretrained with its own config under the current code."""
    cached = read_pretrained(arch, cache_dir)
    if cached is not None and cached.is_current():
        return cached
    if cached is not None:
        log.warning("cached pretrained %s (id %s) was written by an older mergelab; pretraining its config again",
                    arch, cached.pretrained_id)
        kwargs = {**kwargs, "config": cached.config}
    return pretrain(arch, cache_dir, **kwargs)  # type: ignore[arg-type]


def load_pretrained_backbone(arch: str, cache_dir: PathLike | None = None) -> tuple[torch.nn.Module, PretrainResult]:
    """``(backbone, record)``: the cached pretrained backbone (pretrained at defaults if missing), on CPU.

    Raises :class:`CheckpointError` when ``backbone.safetensors`` does not hash to the record's
    ``weights_sha256`` (a folder mixing two backbones)."""
    record = ensure_pretrained(arch, cache_dir)
    backbone = build_backbone(arch)
    path = Path(record.path) / BACKBONE_FILE
    state = read_backbone_state(path)
    digest = weights_digest(state)
    if digest != record.weights_sha256:
        raise CheckpointError(f"{path}: its weights (sha256 {digest[:12]}) are not the backbone its record "
                              f"{SIDECAR} describes (id {record.pretrained_id}); re-pretrain with "
                              f"`mergelab pretrain --arch {arch} --force`")
    load_backbone_state(backbone, state, source=str(path))
    return backbone, record
