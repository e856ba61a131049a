"""Fine-tuning one expert from the pretrained backbone: ``finetune(spec) -> ExpertResult``.

Procedure (spec fields in ``code``):

1. Resolve the spec (defaults; a branch's parent path becomes the parent's spec hash) and hash it. If
   ``<root>/zoo/<arch>/experts/<task>/<hash>/`` holds a complete expert trained from the current pretrained
   backbone on the current task data (same data fingerprints), return it (``cached=True``) without training;
   a stale one is retrained (with a warning).
2. Data: ``get_task(task)``; if ``data_ratio < 1``, ``subset(task, data_ratio, data_seed)``.
3. Model: the pretrained backbone (pretrained at defaults if missing) and a head initialised by
   ``head_init``: ``probe`` (default) = a linear probe fitted on frozen pretrained features of the training
   subset (LP-FT, Kumar et al. 2022: starting from a fitted head distorts the features less), ``zero``, or
   ``random`` (PyTorch's Linear init under ``seed``). With ``probe``, the BatchNorm running statistics are
   first re-estimated on the task's training images (up to 20 batches of 128): the pretrained statistics are
   the pool's, and a probe fitted under them meets very different train-mode (batch-statistics) features at
   step 0 -- initial losses of 10-60 nats on some tasks. Only BN buffers change; the parameters stay
   theta_0, and the task's statistics would replace the pool's within the first ~50 steps anyway (BN
   momentum 0.1). ``init_test_metrics`` in the sidecar is this starting model. A branch instead loads model
   and optimizer state from the parent's checkpoint.

   ``head_mode: frozen`` (frozen shared heads, the CLIP protocol of Ilharco et al. 2023, "Editing models
   with task arithmetic": fine-tuning keeps the zero-shot heads fixed, so the pretrained model, every expert
   and every merge share one head per task): the head is :func:`frozen_head`, the same probe fitted on the
   task's *full* training split (BN re-estimated on a copy of the pretrained backbone; no seed but BN's
   fixed batch order), whatever ``data_ratio`` -- a function of the pretrained backbone and the task only,
   bit-identical for every expert of the task. The backbone's BN statistics are then re-estimated on the
   expert's training subset as with ``probe``.
4. ``steps`` optimizer steps of cross-entropy on the whole model (backbone and head; with ``head_mode:
   frozen`` the head is not in the optimizer and has ``requires_grad`` off, so neither gradient steps nor
   weight decay touch it and the saved head is exactly :func:`frozen_head`), see
   :mod:`mergelab.training.loop`; checkpoints every ``checkpoint_every`` steps. Steps 3-5 run on ``threads``
   torch intra-op threads (default 1) whatever the caller's setting (:mod:`mergelab.training.threads`), so a
   spec trains to the same weights on any machine of a kind.
5. Final metrics on the training subset and the test split (eval mode, BatchNorm running statistics), and the
   sidecar (:mod:`mergelab.training.result`). The folder is published atomically.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from mergelab.evaluation.bn import reset_bn_statistics
from mergelab.evaluation.metrics import evaluate_classifier
from mergelab.models.artifact_dir import staged_dir
from mergelab.models.classifier import Classifier, make_head
from mergelab.models.device import default_device
from mergelab.models.paths import expert_dir
from mergelab.models.pretraining import ensure_pretrained, load_pretrained_backbone
from mergelab.models.probe import extract_features, fit_linear_probe
from mergelab.models.registry import build_backbone
from mergelab.models.state import (
    BACKBONE_FILE,
    HEAD_FILE,
    load_backbone_state,
    load_head,
    read_backbone_state,
    save_backbone,
    save_head,
)
from mergelab.tasks import get_task, subset
from mergelab.training.branching import resolve_parent
from mergelab.training.loop import LoopSettings, run_steps
from mergelab.training.optim import build_optimizer, set_hyperparameters
from mergelab.training.provenance import data_fingerprint, versions
from mergelab.training.result import CHECKPOINTS, SIDECAR, ExpertResult, NoiseScale, ParentRef, read_expert
from mergelab.training.sampler import derive_seed
from mergelab.training.spec import BranchFrom, ExpertSpec, make_spec
from mergelab.training.threads import pinned_threads

if TYPE_CHECKING:
    from mergelab.tasks import TaskData

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
OPTIMIZER_FILE = "optimizer.pt"
BN_ADAPT_BATCH = 128  # probe init: BN statistics re-estimated on up to 20 x 128 training images
BN_ADAPT_BATCHES = 20


def resolve_spec(spec: ExpertSpec | Mapping[str, Any], cache_dir: PathLike | None = None) -> tuple[ExpertSpec, ExpertResult | None]:
    """``(resolved spec, parent or None)``: validates ``spec`` and pins a branch's parent to its spec hash."""
    spec = spec if isinstance(spec, ExpertSpec) else make_spec(spec)
    if spec.branch_from is None:
        return spec, None
    parent = resolve_parent(spec, cache_dir)
    pinned = BranchFrom(parent=parent.spec_hash, step=spec.branch_from.step)
    return spec.model_copy(update={"branch_from": pinned}), parent


def expert_path(spec: ExpertSpec | Mapping[str, Any], cache_dir: PathLike | None = None) -> Path:
    """The cache folder of ``spec`` (whether or not it has been trained)."""
    spec, _ = resolve_spec(spec, cache_dir)
    return expert_dir(spec.arch, spec.task, spec.spec_hash(), cache_dir)


def finetune(
    spec: ExpertSpec | Mapping[str, Any],
    cache_dir: PathLike | None = None,
    *,
    force: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> ExpertResult:
    """Fine-tune (or fetch from the cache) the expert described by ``spec``; see the module docstring.

    Args:
        spec: an :class:`ExpertSpec` or a mapping of its fields (unset fields take their defaults).
        cache_dir: cache root (default ``$MERGELAB_CACHE`` or ``~/.cache/mergelab``).
        force: retrain even if a cached expert exists.
        device: torch device (default: cuda when available, else cpu).
        progress: show a tqdm bar over the steps.
    """
    spec, parent = resolve_spec(spec, cache_dir)
    spec_hash = spec.spec_hash()
    out = expert_dir(spec.arch, spec.task, spec_hash, cache_dir)
    pre = ensure_pretrained(spec.arch, cache_dir)
    data = load_task_data(spec)
    if not force:
        cached = read_expert(out)
        problem = cached_problem(cached, pre.pretrained_id, data) if cached is not None else None
        if cached is not None and problem is None:
            log.info("expert %s/%s %s found in cache", spec.arch, spec.task, spec_hash)
            return cached.model_copy(update={"cached": True})
        if cached is not None:
            log.warning("cached expert %s is stale (%s); retraining", out, problem)
    with pinned_threads(spec.threads):
        return _train(spec, spec_hash, parent, pre.pretrained_id, data, out, cache_dir, device, progress)


def fingerprints(data: TaskData) -> tuple[str, str]:
    """``(train, test)`` data fingerprints of a task (after subsetting)."""
    return data_fingerprint(data.x_train, data.y_train), data_fingerprint(data.x_test, data.y_test)


def cached_problem(cached: ExpertResult, pretrained_id: str, data: TaskData) -> str | None:
    """Why a cached expert cannot be reused (another pretrained backbone, changed task data), or ``None``."""
    if cached.pretrained_id != pretrained_id:
        return f"trained from pretrained backbone {cached.pretrained_id}, the cache now holds {pretrained_id}"
    if cached.train_fingerprint is None or cached.test_fingerprint is None:
        return "its sidecar records no data fingerprints (written by an older mergelab)"
    if (cached.train_fingerprint, cached.test_fingerprint) != fingerprints(data):
        return f"the data of task {cached.task!r} changed since it was trained"
    return None


def load_task_data(spec: ExpertSpec) -> TaskData:
    """The task's data, subset to ``data_ratio`` of the training split with ``data_seed``."""
    data = get_task(spec.task)
    if spec.data_ratio < 1.0:
        data = subset(data, spec.data_ratio, spec.data_seed)
    return data


def probe_head(backbone: torch.nn.Module, data: TaskData) -> torch.nn.Linear:
    """The frozen shared head of ``data``'s task on ``backbone`` (left unchanged): BN statistics re-estimated on
    the task's training images on a copy of ``backbone``, then :func:`fit_linear_probe` on its features."""
    probe_backbone = copy.deepcopy(backbone)
    reset_bn_statistics(probe_backbone, data.x_train, batch_size=BN_ADAPT_BATCH, num_batches=BN_ADAPT_BATCHES)
    return fit_linear_probe(extract_features(probe_backbone, data.x_train), data.y_train, data.num_classes)


def frozen_head(task: str, arch: str = "resnet_s", cache_dir: PathLike | None = None) -> torch.nn.Linear:
    """The head every ``head_mode: frozen`` expert of ``task`` fine-tuned from the cached pretrained ``arch``
    keeps (and saves): :func:`probe_head` of the pretrained backbone on the task's full training split, always
    on :data:`~mergelab.runtime.TRAINING_THREADS` pinned threads (also for an expert whose ``threads`` differ),
    so it depends on the backbone and the task only. CPU, eval mode."""
    with pinned_threads():
        backbone, _ = load_pretrained_backbone(arch, cache_dir)
        return probe_head(backbone, get_task(task)).eval()


def initial_head(spec: ExpertSpec, backbone: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 num_classes: int) -> torch.nn.Linear:
    """The head fine-tuning of ``spec`` starts from, on ``backbone`` and the training subset ``(x, y)``.

    ``head_mode: frozen``: the task's shared head (:func:`probe_head` on the full training split), then BN
    statistics re-estimated on ``x``; ``head_init: probe``: BN statistics re-estimated on ``x``, then the linear
    probe on its features; otherwise a head drawn from ``derive_seed(spec.seed, 2)``, zeroed for ``zero``.
    Re-estimating BN changes ``backbone`` in place. Also used to measure an expert's task at theta_0
    (:mod:`mergelab.analysis.theory_at_init`)."""
    dim = backbone.feature_dim
    if spec.head_mode == "frozen":  # the task's shared head (full training split), then BN on the subset
        with pinned_threads():  # the default count whatever spec.threads: one head per task and backbone
            head = probe_head(backbone, get_task(spec.task))
        reset_bn_statistics(backbone, x, batch_size=BN_ADAPT_BATCH, num_batches=BN_ADAPT_BATCHES)
        return head
    if spec.head_init == "probe":
        reset_bn_statistics(backbone, x, batch_size=BN_ADAPT_BATCH, num_batches=BN_ADAPT_BATCHES)
        return fit_linear_probe(extract_features(backbone, x), y, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(spec.seed, 2))
        head = make_head(dim, num_classes)
    if spec.head_init == "zero":
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    return head


def _save_checkpoint(folder: Path, model: Classifier, optimizer: torch.optim.Optimizer, step: int, spec_hash: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "checkpoint", "step": str(step), "spec_hash": spec_hash}
    save_backbone(model.backbone, folder / BACKBONE_FILE, meta)
    save_head(model.head, folder / HEAD_FILE, meta)
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    (folder / "meta.json").write_text(json.dumps({"step": step, "spec_hash": spec_hash}))


def _train(
    spec: ExpertSpec,
    spec_hash: str,
    parent: ExpertResult | None,
    pretrained_id: str,
    data: TaskData,
    out: Path,
    cache_dir: PathLike | None,
    device: str | torch.device | None,
    progress: bool,
) -> ExpertResult:
    t0 = time.perf_counter()
    dev = default_device(device)
    start = 0
    init_metrics = None
    parent_ref = None
    if parent is None:
        backbone, _ = load_pretrained_backbone(spec.arch, cache_dir)
        backbone.to(dev)
        head = initial_head(spec, backbone, data.x_train, data.y_train, data.num_classes).to(dev)
        init_metrics = evaluate_classifier(backbone, head, data.x_test, data.y_test)
    else:
        start = spec.branch_from.step  # type: ignore[union-attr]
        ckpt = parent.checkpoint_dir(start)
        backbone = build_backbone(spec.arch)
        load_backbone_state(backbone, read_backbone_state(ckpt / BACKBONE_FILE), source=str(ckpt / BACKBONE_FILE))
        head = load_head(ckpt / HEAD_FILE, backbone.feature_dim)
        parent_ref = ParentRef(spec_hash=parent.spec_hash, path=parent.path, step=start)
    head.requires_grad_(spec.head_mode == "trained")  # frozen: no gradient, not in the optimizer, no decay
    model = Classifier(backbone, head).to(dev)
    optimizer = build_optimizer(
        [p for p in model.parameters() if p.requires_grad], spec.optimizer, spec.lr, spec.momentum, spec.weight_decay, spec.beta2, spec.nesterov
    )
    if parent is not None:
        state = torch.load(parent.checkpoint_dir(start) / OPTIMIZER_FILE, map_location=dev, weights_only=True)
        optimizer.load_state_dict(state)
        set_hyperparameters(optimizer, spec.momentum, spec.weight_decay, spec.beta2, spec.nesterov)
    settings = LoopSettings(
        lr=spec.lr,
        steps=spec.steps,
        batch_size=spec.batch_size,
        seed=spec.seed,
        augment=spec.augment,
        schedule=spec.schedule,
        warmup_frac=spec.warmup_frac,
        decay_frac=spec.decay_frac,
        min_lr_ratio=spec.min_lr_ratio,
    )
    saved: list[int] = []
    bar = None
    if progress:
        bar = tqdm(total=spec.steps - start, desc=f"{spec.arch}/{spec.task}", unit="step")
    with staged_dir(out) as stage:

        def on_step_end(step: int) -> None:
            if bar is not None:
                bar.update(1)
            if spec.checkpoint_every and step % spec.checkpoint_every == 0:
                _save_checkpoint(stage / CHECKPOINTS / f"step_{step:06d}", model, optimizer, step, spec_hash)
                saved.append(step)

        try:
            losses = run_steps(model, optimizer, data.x_train, data.y_train, settings, start=start, on_step_end=on_step_end)
        finally:
            if bar is not None:
                bar.close()
        train_m = evaluate_classifier(backbone, head, data.x_train, data.y_train)
        test_m = evaluate_classifier(backbone, head, data.x_test, data.y_test)
        train_fp, test_fp = fingerprints(data)
        meta = {"arch": spec.arch, "task": spec.task, "spec_hash": spec_hash, "kind": "expert-backbone"}
        save_backbone(backbone, stage / BACKBONE_FILE, meta)
        save_head(head, stage / HEAD_FILE, {**meta, "kind": "expert-head", "num_classes": str(data.num_classes)})
        result = ExpertResult(
            spec=spec,
            spec_hash=spec_hash,
            arch=spec.arch,
            task=spec.task,
            num_classes=data.num_classes,
            feature_dim=backbone.feature_dim,
            noise_scale=NoiseScale.of(spec),
            n_train=len(data.x_train),
            n_test=len(data.x_test),
            train_fingerprint=train_fp,
            test_fingerprint=test_fp,
            loss_curve=losses,
            loss_curve_start=start,
            train_metrics=train_m,
            test_metrics=test_m,
            init_test_metrics=init_metrics,
            checkpoints=saved,
            parent=parent_ref,
            pretrained_id=pretrained_id,
            wall_time_s=time.perf_counter() - t0,
            threads=torch.get_num_threads(),
            device=str(dev),
            versions=versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        (stage / SIDECAR).write_text(result.sidecar_json())
    log.info(
        "expert %s/%s %s: test acc %.4f (init %.4f) in %.1fs",
        spec.arch,
        spec.task,
        spec_hash,
        test_m.accuracy,
        init_metrics.accuracy if init_metrics else float("nan"),
        result.wall_time_s,
    )
    return result.model_copy(update={"path": str(out)})
