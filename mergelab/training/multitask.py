"""Traditional multi-task learning (MTL): one backbone fine-tuned jointly on several tasks, one head per task.

The reference point model merging is measured against (e.g. Ilharco et al. 2023, Yadav et al. 2023, Yang et
al. 2024 report "multi-task learning" next to the merges): instead of fine-tuning one expert per task and
merging them, fine-tune a single backbone on the union of the tasks' training data.

Procedure (``MultitaskSpec`` fields in ``code``):

1. Start from the cached pretrained backbone theta_0 of ``arch`` (the experts' starting point).
2. Heads (``head_init``): ``experts`` (default when experts are given) copies each task's expert head, the
   head the merged models are evaluated with; ``probe`` fits a linear probe per task on frozen pretrained
   features (after re-estimating the BatchNorm statistics on the union of the tasks' training images, as
   :func:`mergelab.training.finetune` does for one task). Heads are trained jointly with the backbone
   (``train_heads: true``) or kept frozen.
3. ``steps`` optimizer steps of the multi-task objective::

       L(theta, h_1..h_T) = (1/T) sum_t mean_{(x, y) in B_t} CE(h_t(f(x; theta)), y)

   with a batch ``B_t`` of ``batch_size`` examples from *every* task at every step (tasks sampled
   uniformly, whatever their training-set sizes); the T batches go through the backbone as one
   concatenated batch, so BatchNorm sees mixed-task batch statistics and its running statistics become
   those of the task mixture. Optimizer, learning rate, momentum, weight decay and schedule default to the
   experts' (:class:`~mergelab.training.spec.ExpertSpec`: SGD, lr 0.05, momentum 0.9, weight decay 5e-4,
   cosine for the ResNets; AdamW 1e-3 for the ViT). Batches are a function of ``(seed, task, step)``; the
   run is pinned to ``threads`` intra-op threads (default 1, :mod:`mergelab.training.threads`), so a spec gives
   the same weights on any machine of a kind.
4. Test metrics per task, and the folder ``<root>/zoo/<arch>/multitask/<spec_hash>/`` with
   ``backbone.safetensors``, ``heads/<task>/head.safetensors`` and ``multitask.json``, published atomically.

Defaults ``steps = 200``, ``batch_size = 32`` per task: about a minute or two for four tasks on resnet_s on a
shared 2-core CPU (each step costs ~T/2 expert steps), i.e. ~2 epochs of each 2,800-image MNIST-family
training split (an expert sees ~7 epochs: 300 steps of 64). Raise ``steps`` for a stronger MTL baseline.

Caching: the spec (tasks sorted, so the order does not matter; the experts whose heads initialise it, by
spec hash) is hashed like an expert spec; a cached model is reused when it was trained from the current
pretrained backbone on the current task data (fingerprints), and retrained otherwise.

Python API: :func:`multitask_spec` (build a spec for tasks and experts), :func:`train_multitask` (train or
fetch), :func:`read_multitask`, :func:`multitask_path`, and :meth:`MultitaskResult.head_experts` (expert
records whose heads are the MTL heads, for :func:`mergelab.evaluation.evaluate`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import resource
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tqdm import tqdm

from mergelab.errors import CheckpointError, SpecError
from mergelab.evaluation.bn import reset_bn_statistics
from mergelab.evaluation.metrics import Metrics, evaluate_classifier
from mergelab.models import BACKBONE_FILE, HEAD_FILE, load_head, save_backbone, save_head
from mergelab.models.artifact_dir import staged_dir
from mergelab.models.device import default_device
from mergelab.models.paths import arch_dir, expert_dir
from mergelab.models.pretraining import ensure_pretrained, load_pretrained_backbone
from mergelab.models.probe import extract_features, fit_linear_probe
from mergelab.runtime import TRAINING_THREADS
from mergelab.tasks import get_task, list_tasks
from mergelab.training.loop import LoopSettings, TrainingDivergedError
from mergelab.training.optim import build_optimizer
from mergelab.training.provenance import data_fingerprint, versions
from mergelab.training.result import ExpertResult, load_expert, read_expert
from mergelab.training.sampler import BatchSampler, derive_seed
from mergelab.training.spec import fill_optimizer_defaults, format_validation_error, known_arch
from mergelab.training.threads import pinned_threads

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
SIDECAR = "multitask.json"
HEADS = "heads"
MULTITASK_FORMAT = 2  # bump when a code change alters what a spec trains to (2: pinned intra-op threads)


class MultitaskSpec(BaseModel):
    """A joint fine-tuning run over ``tasks`` (see the module docstring for fields and defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[str] = Field(min_length=1)
    arch: str = "resnet_s"
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    beta2: float = Field(0.999, ge=0, lt=1)
    batch_size: int = Field(32, ge=1, description="examples per task per step")
    steps: int = Field(200, ge=1)
    schedule: Literal["constant", "cosine", "wsd"] = "cosine"
    warmup_frac: float = Field(0.0, ge=0, lt=1)
    decay_frac: float = Field(0.2, gt=0, le=1)
    head_init: Literal["experts", "probe"] = "probe"
    head_experts: dict[str, str] | None = Field(None, description="task -> spec hash of the expert whose head is used")
    train_heads: bool = True
    seed: int = 0
    threads: int = Field(TRAINING_THREADS, ge=1, description="torch intra-op threads (mergelab.training.threads)")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc, "multi-task spec")) from None

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        return fill_optimizer_defaults(data) if isinstance(data, Mapping) else data

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        return known_arch(arch)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        known = list_tasks()
        bad = [t for t in tasks if t not in known]
        if bad:
            raise ValueError(f"unknown task(s) {', '.join(map(repr, bad))}; known: {', '.join(known)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError("a task is listed twice")
        return sorted(tasks)

    @model_validator(mode="after")
    def _heads_given(self) -> MultitaskSpec:
        if self.head_init == "experts":
            missing = [t for t in self.tasks if not self.head_experts or t not in self.head_experts]
            if missing:
                raise ValueError(f"head_init 'experts' needs an expert for every task; none for {', '.join(missing)}")
        elif self.head_experts:
            raise ValueError("head_experts is only used with head_init 'experts'")
        if self.head_experts and set(self.head_experts) - set(self.tasks):
            raise ValueError(f"head_experts names tasks not in tasks: {sorted(set(self.head_experts) - set(self.tasks))}")
        return self

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def spec_hash(self) -> str:
        """16 hex digits of SHA-256 over the canonical JSON and :data:`MULTITASK_FORMAT`."""
        blob = json.dumps({"format": MULTITASK_FORMAT, "kind": "multitask", "spec": self.canonical()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class MultitaskResult(BaseModel):
    """A trained multi-task model: the sidecar's content plus ``path`` and ``cached``."""

    format: str = "mergelab-multitask/1"
    spec: MultitaskSpec
    spec_hash: str
    arch: str
    tasks: list[str]
    pretrained_id: str
    fingerprints: dict[str, list[str]]
    loss_curve: list[float]
    test_metrics: dict[str, Metrics]
    init_test_metrics: dict[str, Metrics]
    wall_time_s: float
    threads: int | None = None  # intra-op threads the training ran on (spec.threads; None: before they were pinned)
    peak_rss_mb: float | None = Field(
        None, description="ru_maxrss of the training process at the end (its high-water mark: the training's "
                          "peak only when it ran in a fresh process)")
    device: str
    versions: dict[str, str]
    created: str
    path: str = ""
    cached: bool = False

    @property
    def backbone_path(self) -> Path:
        return Path(self.path) / BACKBONE_FILE

    def head_path(self, task: str) -> Path:
        if task not in self.tasks:
            raise SpecError(f"the multi-task model {self.path} has no head for task {task!r}; its tasks: {', '.join(self.tasks)}")
        return Path(self.path) / HEADS / task / HEAD_FILE

    def head_experts(self, experts: Sequence[Any]) -> list[Any]:
        """Copies of ``experts`` (ExpertResults or folders) whose head is this model's head for their task.

        For :func:`mergelab.evaluation.evaluate`: each task is read through the MTL head, and normalized
        accuracy stays relative to the task's own expert (its sidecar accuracy).
        """
        out = []
        for e in experts:
            r = e if isinstance(e, ExpertResult) else load_expert(e)
            out.append(r.model_copy(update={"path": str(self.head_path(r.task).parent)}))
        return out


def multitask_spec(tasks: Sequence[str], arch: str = "resnet_s", experts: Sequence[Any] | None = None,
                   **overrides: Any) -> MultitaskSpec:
    """A spec for ``tasks``; with ``experts`` (ExpertResults or folders), heads start from theirs by default."""
    data: dict[str, Any] = {"tasks": list(tasks), "arch": arch}
    if experts is not None and overrides.get("head_init", "experts") == "experts":
        by_task: dict[str, str] = {}
        for e in experts:
            r = e if isinstance(e, ExpertResult) else load_expert(e)
            if r.task in data["tasks"]:
                by_task.setdefault(r.task, r.spec_hash)
        data["head_init"] = "experts"
        data["head_experts"] = by_task
    data.update(overrides)
    return MultitaskSpec(**data)


def multitask_path(spec: MultitaskSpec, cache_dir: PathLike | None = None) -> Path:
    """``<root>/zoo/<arch>/multitask/<spec_hash>`` (whether or not it has been trained)."""
    return arch_dir(spec.arch, cache_dir) / "multitask" / spec.spec_hash()


def read_multitask(path: PathLike) -> MultitaskResult | None:
    """The multi-task model stored in folder ``path``, or ``None`` if it holds no complete one."""
    folder = Path(path)
    sidecar = folder / SIDECAR
    if not sidecar.is_file() or not (folder / BACKBONE_FILE).is_file():
        return None
    try:
        result = MultitaskResult.model_validate_json(sidecar.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{sidecar}: unreadable multi-task sidecar: {exc}") from exc
    result = result.model_copy(update={"path": str(folder), "cached": False})
    if not all(result.head_path(t).is_file() for t in result.tasks):
        return None
    return result


def _fingerprints(datas: Mapping[str, Any]) -> dict[str, list[str]]:
    return {t: [data_fingerprint(d.x_train, d.y_train), data_fingerprint(d.x_test, d.y_test)] for t, d in datas.items()}


def _resolve_head_experts(spec: MultitaskSpec, experts: Sequence[Any] | None, cache_dir: PathLike | None) -> dict[str, Any]:
    """``{task: ExpertResult}`` for ``head_init: experts``: from ``experts`` or looked up by hash in the cache."""
    if spec.head_init != "experts":
        return {}
    given = {}
    for e in experts or ():
        r = e if isinstance(e, ExpertResult) else load_expert(e)
        given.setdefault((r.task, r.spec_hash), r)
    out = {}
    for task, h in (spec.head_experts or {}).items():
        r = given.get((task, h)) or read_expert(expert_dir(spec.arch, task, h, cache_dir))
        if r is None:
            raise SpecError(f"head_experts: no expert {h} for task {task!r} (pass it in experts or build it in the cache)")
        if r.arch != spec.arch:
            raise SpecError(f"head_experts: expert {r.path} is {r.arch}, the multi-task model is {spec.arch}")
        out[task] = r
    return out


def train_multitask(
    spec: MultitaskSpec | Mapping[str, Any],
    cache_dir: PathLike | None = None,
    *,
    experts: Sequence[Any] | None = None,
    force: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> MultitaskResult:
    """Train (or fetch from the cache) the multi-task model of ``spec``; see the module docstring.

    ``experts``: ExpertResults or folders holding the heads named by ``spec.head_experts`` (otherwise they are
    looked up by spec hash in the cache). ``force`` retrains a cached model.
    """
    spec = spec if isinstance(spec, MultitaskSpec) else MultitaskSpec(**dict(spec))
    out = multitask_path(spec, cache_dir)
    pre = ensure_pretrained(spec.arch, cache_dir)
    datas = {t: get_task(t) for t in spec.tasks}
    fps = _fingerprints(datas)
    if not force:
        cached = read_multitask(out)
        if cached is not None and cached.pretrained_id == pre.pretrained_id and cached.fingerprints == fps:
            log.info("multi-task model %s/%s found in cache", spec.arch, spec.spec_hash())
            return cached.model_copy(update={"cached": True})
        if cached is not None:
            log.warning("cached multi-task model %s is stale (other pretrained backbone or task data); retraining", out)
    heads_from = _resolve_head_experts(spec, experts, cache_dir)
    with pinned_threads(spec.threads):
        return _train(spec, datas, fps, heads_from, pre.pretrained_id, out, cache_dir, device, progress)


def _train(spec: MultitaskSpec, datas: Mapping[str, Any], fps: dict[str, list[str]], heads_from: Mapping[str, Any],
           pretrained_id: str, out: Path, cache_dir: PathLike | None, device: str | torch.device | None,
           progress: bool) -> MultitaskResult:
    t0 = time.perf_counter()
    dev = default_device(device)
    backbone, _ = load_pretrained_backbone(spec.arch, cache_dir)
    backbone.to(dev)
    tasks = list(spec.tasks)
    heads: dict[str, torch.nn.Linear] = {}
    if spec.head_init == "experts":
        for t in tasks:
            heads[t] = load_head(heads_from[t].head_path, backbone.feature_dim)
            if heads[t].out_features != datas[t].num_classes:
                raise SpecError(f"head of {heads_from[t].path} has {heads[t].out_features} classes, task {t!r} has "
                                f"{datas[t].num_classes}")
    else:
        x_all = torch.cat([datas[t].x_train for t in tasks])
        reset_bn_statistics(backbone, x_all, batch_size=128, num_batches=20)
        for t in tasks:
            heads[t] = fit_linear_probe(extract_features(backbone, datas[t].x_train), datas[t].y_train, datas[t].num_classes)
    heads = {t: h.to(dev) for t, h in heads.items()}
    init_metrics = {t: evaluate_classifier(backbone, heads[t], datas[t].x_test, datas[t].y_test) for t in tasks}

    params = list(backbone.parameters())
    for h in heads.values():
        h.requires_grad_(spec.train_heads)
        if spec.train_heads:
            params += list(h.parameters())
    optimizer = build_optimizer(params, spec.optimizer, spec.lr, spec.momentum, spec.weight_decay, spec.beta2)
    settings = LoopSettings(lr=spec.lr, steps=spec.steps, batch_size=spec.batch_size, seed=spec.seed,
                            schedule=spec.schedule, warmup_frac=spec.warmup_frac, decay_frac=spec.decay_frac)
    samplers = {t: BatchSampler(datas[t].n_train, spec.batch_size, derive_seed(spec.seed, i))
                for i, t in enumerate(tasks)}
    xs = {t: datas[t].x_train.to(dev) for t in tasks}
    ys = {t: datas[t].y_train.to(dev) for t in tasks}
    bar = None
    if progress:
        bar = tqdm(total=spec.steps, desc=f"multitask {spec.arch} ({len(tasks)} tasks)", unit="step")
    backbone.train()
    for h in heads.values():
        h.train()
    losses: list[float] = []
    try:
        for step in range(spec.steps):
            lr = settings.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = {t: samplers[t].indices(step).to(dev) for t in tasks}
            xb = torch.cat([xs[t][idx[t]] for t in tasks])
            feats = backbone(xb).split([len(idx[t]) for t in tasks])
            loss = sum(F.cross_entropy(heads[t](f), ys[t][idx[t]]) for t, f in zip(tasks, feats)) / len(tasks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.item())
            if value != value or value in (float("inf"), float("-inf")):
                raise TrainingDivergedError(f"multi-task training diverged at step {step} (loss {value}, lr {lr:g}); "
                                            "lower the learning rate")
            losses.append(value)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    backbone.eval()
    test_metrics = {t: evaluate_classifier(backbone, heads[t], datas[t].x_test, datas[t].y_test) for t in tasks}
    spec_hash = spec.spec_hash()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    meta = {"arch": spec.arch, "spec_hash": spec_hash, "kind": "multitask-backbone"}
    with staged_dir(out) as stage:
        save_backbone(backbone, stage / "backbone.safetensors", meta)
        for t in tasks:
            (stage / HEADS / t).mkdir(parents=True)
            save_head(heads[t].cpu(), stage / HEADS / t / HEAD_FILE,
                      {**meta, "kind": "multitask-head", "task": t, "num_classes": str(datas[t].num_classes)})
        result = MultitaskResult(
            spec=spec, spec_hash=spec_hash, arch=spec.arch, tasks=tasks, pretrained_id=pretrained_id,
            fingerprints=fps, loss_curve=losses, test_metrics=test_metrics, init_test_metrics=init_metrics,
            wall_time_s=time.perf_counter() - t0, threads=torch.get_num_threads(), peak_rss_mb=peak, device=str(dev),
            versions=versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        (stage / SIDECAR).write_text(result.model_dump_json(indent=2, exclude={"path", "cached"}))
    log.info("multi-task %s %s (%s): mean test acc %.4f in %.1fs", spec.arch, spec_hash, ", ".join(tasks),
             sum(m.accuracy for m in test_metrics.values()) / len(tasks), result.wall_time_s)
    return result.model_copy(update={"path": str(out)})


__all__ = ["HEADS", "SIDECAR", "MultitaskResult", "MultitaskSpec", "multitask_path", "multitask_spec",
           "read_multitask", "train_multitask"]
