"""Representation Surgery (Yang et al., ICML 2024, "Representation Surgery for Multi-Task Model Merging").

A merged backbone f (frozen) gives task t the features ``z = f(x)``, biased away from what t's own expert
f_t would give. Surgery adds, per task, a lightweight module on top of the merged features that subtracts
an estimate of that representation bias::

    z' = z - Proj_t(z),        Proj_t(z) = W_up ReLU(W_down z)        W_down [r, d], W_up [d, r], no biases

trained to bring the corrected merged features close to the expert's own features on **unlabelled** data
of task t (paper eq. 6-7)::

    min_{W_down, W_up}  mean_{x}  || z'(x) - f_t(x) ||_1              (mean absolute error over examples and dims)

The task's head ``h_t`` then reads ``z'``. Nothing else changes: the merged backbone is returned unchanged.

Defaults, from the paper (sec. 4-5) and the official code (``EnnengYang/RepresentationSurgery``,
``src/merging_model.py`` and ``src/main_*_with_surgery.py``): rank ``r = 16``; ``W_down`` initialised like
PyTorch's default ``nn.Linear`` (Kaiming-uniform, a = sqrt(5)) and ``W_up`` **initialised to zero**, so an
untrained module is exactly the identity; ``torch.nn.L1Loss`` (mean); Adam, lr ``1e-3``, betas
``(0.9, 0.999)``; 500 iterations, each taking two batches of 16 unlabelled *test* examples per task with one
Adam step per batch, i.e. ``steps = 1000`` Adam steps per task (the default here). The merged model the
paper starts from is any merging method's (weight averaging, task arithmetic with lambda 0.3, TIES,
AdaMerging); here ``merged`` (a merged backbone path) or ``from`` (a mergelab method computed in memory on
the same pool, default ``task_arithmetic`` with ``lambda: 0.3``, the paper's task-arithmetic setting).

Mapping to mergelab:

* Each task's examples are ``data.samples_per_task`` examples of ``data.split`` (default ``test``, labels
  unused); batches of ``data.batch_size`` (seed ``data.seed``). Both backbones are frozen and run in eval
  mode, so their features are computed once and training runs on the cached features (cheap).
* Experts are read one at a time: memory is the merged backbone + one expert + the features.
* BatchNorm: the merged backbone is used as given (its running statistics are whatever the merge produced).
* Output: ``run`` returns the merged backbone unchanged; the per-task modules go to ``modules_dir`` as
  ``<task>.safetensors`` (tensors ``down.weight [r, d]``, ``up.weight [d, r]``) plus ``surgery.json``
  (rank, tasks, L1 feature gaps before and after). ``modules_dir`` is required until the framework tells
  methods their output folder (then the default is the output folder's sibling ``<out>.surgery``).

Python API: :class:`SurgeryModule`, :func:`train_surgery`, :func:`apply_surgery`,
:func:`evaluate_with_surgery`, :func:`save_surgery_modules` / :func:`load_surgery_modules`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from tqdm import tqdm

from mergelab.checkpoints import load_state_dict, save_state_dict
from mergelab.errors import CheckpointError, NonFiniteError, SpecError, TensorMismatchError
from mergelab.evaluation.metrics import Metrics, classifier_outputs
from mergelab.evaluation.outcomes import pack_outcomes
from mergelab.evaluation.task_suite import EvaluationResult, TaskEvaluation, load_backbone
from mergelab.merging import merge
from mergelab.methods import METHODS as DATA_FREE
from mergelab.methods.base import MethodParams
from mergelab.methods.data_informed import DataInformedMethod, parse_params, registry
from mergelab.methods.data_informed.adamerging import TaskBatches, record_output
from mergelab.methods.data_informed.context import MergeContext
from mergelab.models import default_device, load_backbone_state, load_head, read_backbone_state
from mergelab.output_paths import refuse_overlap
from mergelab.tasks import get_task
from mergelab.training.provenance import data_fingerprint
from mergelab.training.result import ExpertResult, load_expert
from mergelab.untrusted_input import read_json_file

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
SIDECAR = "surgery.json"
DEFAULT_FROM_PARAMETERS: dict[str, dict[str, Any]] = {"task_arithmetic": {"lambda": 0.3}}


class SurgeryParams(MethodParams):
    merged: str | None = Field(None, description="an already merged backbone (folder or file); else `from`")
    from_: str = Field("task_arithmetic", alias="from", description="method computing the merged backbone in memory")
    from_parameters: dict[str, Any] | None = Field(
        None, description="parameters of `from` (default: lambda 0.3 for task_arithmetic, else the method's)")
    rank: int = Field(16, ge=1, description="rank r of Proj_t")
    steps: int = Field(1000, ge=0, description="Adam steps per task")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    modules_dir: str | None = Field(None, description="folder for the per-task modules (<task>.safetensors)")

    @field_validator("merged", "modules_dir", mode="before")
    @classmethod
    def _path_to_str(cls, v: Any) -> Any:
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @field_validator("lr")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be finite, got {v}")
        return v


# -------------------------------------------------------------------------------------------- module


class SurgeryModule(nn.Module):
    """``z -> z - W_up ReLU(W_down z)`` with ``W_down [rank, dim]``, ``W_up [dim, rank]`` (no biases).

    ``W_down`` is initialised like ``nn.Linear`` (Kaiming-uniform, a = sqrt(5)), ``W_up`` to zero: an
    untrained module is the identity (as in the official code). ``generator`` makes the init reproducible.
    """

    def __init__(self, dim: int, rank: int = 16, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if dim < 1 or rank < 1:
            raise ValueError(f"SurgeryModule needs dim >= 1 and rank >= 1, got dim {dim}, rank {rank}")
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.up.weight)

    @property
    def dim(self) -> int:
        return self.down.in_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    def bias(self, z: torch.Tensor) -> torch.Tensor:
        """The estimated representation bias ``Proj(z) = W_up ReLU(W_down z)``."""
        return self.up(F.relu(self.down(z)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.bias(z)


class SurgeredBackbone(nn.Module):
    """``module(backbone(x))``: a backbone followed by one task's surgery (what the task's head reads)."""

    def __init__(self, backbone: nn.Module, module: SurgeryModule) -> None:
        super().__init__()
        self.backbone = backbone
        self.surgery = module
        self.feature_dim = module.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.surgery(self.backbone(x))


def apply_surgery(backbone: nn.Module, modules: Mapping[str, SurgeryModule], task: str,
                  x: torch.Tensor) -> torch.Tensor:
    """Task ``task``'s corrected features ``modules[task](backbone(x))`` (modules in their current mode)."""
    if task not in modules:
        raise SpecError(f"no surgery module for task '{task}'; modules exist for: {', '.join(modules) or 'none'}")
    return modules[task](backbone(x))


# ------------------------------------------------------------------------------------------ training


@dataclass
class SurgeryReport:
    """Per task: the mean L1 feature gap ``mean |z' - f_t(x)|`` before (identity) and after training."""

    rank: int
    steps: int
    gap_before: dict[str, float]
    gap_after: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "steps": self.steps, "l1_gap_before": self.gap_before,
                "l1_gap_after": self.gap_after}


@torch.no_grad()
def _features(backbone: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    backbone.eval()
    if len(x) == 0:
        raise ValueError("no examples to compute features on")
    return torch.cat([backbone(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _task_seed(seed: int, task: str) -> int:
    return seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(task))


def train_surgery_module(merged_features: torch.Tensor, expert_features: torch.Tensor, *, rank: int = 16,
                         steps: int = 1000, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                         ) -> tuple[SurgeryModule, float, float]:
    """Fit one task's module on cached features: ``(module, L1 gap before, L1 gap after)``.

    Minimises ``mean |module(z_merged) - z_expert|`` with Adam (betas 0.9, 0.999) over ``steps`` minibatches.
    """
    if merged_features.shape != expert_features.shape or merged_features.ndim != 2:
        raise ValueError(f"feature shapes differ: {tuple(merged_features.shape)} vs {tuple(expert_features.shape)}")
    gen = torch.Generator().manual_seed(seed)
    module = SurgeryModule(merged_features.shape[1], rank, generator=gen).to(merged_features.device)
    before = F.l1_loss(merged_features, expert_features).item()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, betas=(0.9, 0.999))
    idx = torch.arange(len(merged_features), device=merged_features.device)
    batches = TaskBatches({"i": idx}, batch_size, seed)
    for _ in range(steps):
        b = batches.next()["i"]
        loss = F.l1_loss(module(merged_features[b]), expert_features[b])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        after = F.l1_loss(module(merged_features), expert_features).item()
    return module, before, after


def train_surgery(context: MergeContext, merged: Mapping[str, torch.Tensor], *, rank: int = 16, steps: int = 1000,
                  lr: float = 1e-3) -> tuple[dict[str, SurgeryModule], SurgeryReport]:
    """One surgery module per task of ``context.tasks`` on top of the merged backbone state ``merged``.

    Uses ``data.samples_per_task`` unlabelled examples of ``data.split`` (default test) per task; the task's
    expert (the first of the pool for that task) gives the target features. Returns CPU modules.
    """
    backbone = context.build_backbone()
    load_backbone_state(backbone, merged, source="merged backbone")
    backbone.eval()
    split = context.split("test")
    modules: dict[str, SurgeryModule] = {}
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    for task in tqdm(context.tasks, desc="surgery", unit="task", disable=not context.progress):
        x, _ = context.samples(task, split)  # unlabelled: the labels are not used
        z_merged = _features(backbone, x)
        if not torch.isfinite(z_merged).all():
            bad = [n for n, t in merged.items() if n.endswith("running_var") and bool((t < 0).any())]
            raise NonFiniteError(
                f"surgery: the merged backbone gives non-finite features on task '{task}'"
                + (f" (negative BN running variance in {', '.join(bad[:3])}: task-vector extrapolation with "
                   "coefficients summing past 1; use a smaller lambda)" if bad else "")
            )
        index = next(i for i, e in enumerate(context.experts) if e.task == task)
        expert = context.build_backbone()
        load_backbone_state(expert, context.expert_state(index), source=str(context.experts[index].backbone_path))
        z_expert = _features(expert, x)
        del expert
        module, before[task], after[task] = train_surgery_module(
            z_merged, z_expert, rank=rank, steps=steps, lr=lr, batch_size=context.data.batch_size,
            seed=_task_seed(context.data.seed, task))
        modules[task] = module.cpu()
        log.info("surgery %s: L1 feature gap %.4f -> %.4f (%d %s examples, rank %d, %d steps)", task, before[task],
                 after[task], len(x), split, rank, steps)
    return modules, SurgeryReport(rank, steps, before, after)


# ----------------------------------------------------------------------------------------- files


def save_surgery_modules(modules: Mapping[str, SurgeryModule], folder: PathLike,
                         info: Mapping[str, Any] | None = None) -> Path:
    """Write ``<folder>/<task>.safetensors`` per module and ``surgery.json``, replacing the folder atomically.

    An existing ``folder`` is replaced only if it is empty or a surgery folder (has ``surgery.json``).
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / SIDECAR).is_file())):
        raise CheckpointError(f"{folder}: exists and is not a surgery modules folder; refusing to replace it")
    for task in modules:
        if not task or "/" in task or task.startswith("."):
            raise SpecError(f"task name {task!r} cannot be used as a file name")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for task, m in modules.items():
            state = {"down.weight": m.down.weight.detach().cpu().contiguous(),
                     "up.weight": m.up.weight.detach().cpu().contiguous()}
            save_state_dict(state, tmp / f"{task}.safetensors",
                            metadata={"task": task, "rank": str(m.rank), "dim": str(m.dim)})
        sidecar = {"format": "mergelab-surgery/1", "tasks": list(modules)} | dict(info or {})
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_surgery_modules(folder: PathLike, tasks: Sequence[str] | None = None) -> dict[str, SurgeryModule]:
    """The modules saved by :func:`save_surgery_modules` (all, or ``tasks``), frozen, in eval mode, on CPU."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such surgery modules folder")
    files = {p.name[: -len(".safetensors")]: p for p in sorted(folder.glob("*.safetensors"))}
    try:  # the sidecar's task order, when readable
        order = read_json_file(folder / SIDECAR, what="sidecar", error=CheckpointError).get("tasks", [])
        files = {t: files[t] for t in order if t in files} | files
    except (OSError, CheckpointError, AttributeError, TypeError):
        pass
    wanted = list(tasks) if tasks is not None else list(files)
    missing = [t for t in wanted if t not in files]
    if missing:
        raise CheckpointError(f"{folder}: no surgery module for task(s) {', '.join(missing)}; "
                              f"found: {', '.join(files) or 'none'}")
    out = {}
    for task in wanted:
        state = load_state_dict(files[task])
        down, up = state.get("down.weight"), state.get("up.weight")
        if set(state) != {"down.weight", "up.weight"} or down is None or up is None or down.ndim != 2 \
                or up.shape != down.shape[::-1]:
            raise TensorMismatchError(
                f"{files[task]}: a surgery module needs 'down.weight' [r, d] and 'up.weight' [d, r], got "
                + ", ".join(f"{k} {tuple(v.shape)}" for k, v in state.items()))
        m = SurgeryModule(down.shape[1], down.shape[0])
        m.load_state_dict({"down.weight": down.float(), "up.weight": up.float()})
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        out[task] = m
    return out


# ---------------------------------------------------------------------------------------- evaluation


def evaluate_with_surgery(backbone: PathLike | Mapping[str, torch.Tensor] | nn.Module,
                          modules: Mapping[str, SurgeryModule] | PathLike, experts: Sequence[object], *,
                          tasks: Sequence[str] | None = None, batch_size: int = 512,
                          device: str | torch.device | None = None) -> Any:
    """Per-task test accuracy of ``head_t(module_t(backbone(x)))`` with each task's expert head.

    ``backbone``: a merged folder/file, a state dict or a module; ``modules``: a mapping or a folder written
    by :func:`save_surgery_modules`; ``experts``: expert folders or :class:`ExpertResult` s (heads and
    reference accuracies). ``tasks`` defaults to the modules' tasks; each needs an expert. Returns an
    :class:`~mergelab.evaluation.EvaluationResult` (per-task and normalized accuracy, joint metrics).
    """
    if not isinstance(modules, Mapping):
        modules = load_surgery_modules(modules)
    results = [e if isinstance(e, ExpertResult) else load_expert(e) for e in experts]  # type: ignore[arg-type]
    by_task: dict[str, Any] = {}
    for r in results:
        by_task.setdefault(r.task, r)
    if isinstance(backbone, nn.Module):
        model, desc = backbone, "<module>"
    else:
        archs = {r.arch for r in results}
        model, _ = load_backbone(backbone, archs.pop() if len(archs) == 1 else None)
        desc = str(backbone) if not isinstance(backbone, Mapping) else "<state dict>"
    dev = default_device(device)
    model.to(dev)
    task_names = list(tasks) if tasks is not None else list(modules)
    if not task_names:
        raise SpecError("no tasks to evaluate (no surgery modules)")
    rows, all_correct, all_loss = [], [], []
    for t in task_names:
        if t not in by_task:
            raise SpecError(f"no expert head for task '{t}'")
        if t not in modules:
            raise SpecError(f"no surgery module for task '{t}'; modules exist for: {', '.join(modules)}")
        module = modules[t]
        feature_dim = getattr(model, "feature_dim", module.dim)
        if module.dim != feature_dim:
            raise TensorMismatchError(
                f"surgery module for '{t}' expects {module.dim} features, the backbone gives {feature_dim}")
        head = load_head(by_task[t].head_path, module.dim).to(dev)
        data = get_task(t)
        if by_task[t].test_fingerprint != data_fingerprint(data.x_test, data.y_test):  # as evaluate() checks
            raise SpecError(f"expert {by_task[t].path} was trained and scored on another version of task {t!r} "
                            f"(its test split changed); rebuild it (e.g. `mergelab zoo --arch {by_task[t].arch}`)")
        wrapped = SurgeredBackbone(model, module.to(dev))
        correct, losses = classifier_outputs(wrapped, head, data.x_test, data.y_test, batch_size)
        acc, ref = correct.double().mean().item(), by_task[t].test_metrics.accuracy
        rows.append(TaskEvaluation(task=t, n_test=len(correct), accuracy=acc, loss=losses.mean().item(),
                                   expert_accuracy=ref, normalized_accuracy=acc / ref if ref else None,
                                   head=f"{by_task[t].head_path} + surgery (rank {module.rank})",
                                   correct=pack_outcomes(correct.numpy())))
        all_correct.append(correct)
        all_loss.append(losses)
    correct_cat, loss_cat = torch.cat(all_correct), torch.cat(all_loss)
    norms = [r.normalized_accuracy for r in rows]
    return EvaluationResult(
        backbone=desc, arch=results[0].arch if results else "",
        heads="experts + surgery", tasks=rows,
        joint=Metrics(accuracy=correct_cat.double().mean().item(), loss=loss_cat.mean().item(), n=len(correct_cat)),
        mean_accuracy=sum(r.accuracy for r in rows) / len(rows),
        mean_normalized_accuracy=(sum(norms) / len(norms))  # type: ignore[arg-type]
        if all(n is not None for n in norms) else None,
    )


# ------------------------------------------------------------------------------------------ method


def merged_backbone(context: MergeContext, params: SurgeryParams) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone surgery starts from, and a description: ``merged`` read from disk, or ``from`` computed."""
    explicit_from = "from_" in params.model_fields_set or "from_parameters" in params.model_fields_set
    if params.merged is not None:
        if explicit_from:
            raise SpecError("parameters: give either 'merged' (a merged backbone) or 'from' (a method), not both")
        return read_backbone_state(params.merged), str(params.merged)
    name = params.from_
    raw = params.from_parameters if params.from_parameters is not None else DEFAULT_FROM_PARAMETERS.get(name, {})
    informed = registry()
    if name == "surgery" or (name not in DATA_FREE and name not in informed):
        known = sorted(set(DATA_FREE) | set(informed) - {"surgery"})
        raise SpecError(f"parameters.from: '{name}' is not a merging method surgery can start from; "
                        f"available: {', '.join(known)}")
    if name in informed:
        return informed[name].run(context, parse_params(informed[name], dict(raw))), f"{name} {raw}"
    DATA_FREE[name].parse_params(dict(raw), where="parameters.from_parameters")
    spec = {
        "method": name,
        "base": str(context.base_path),
        "models": [{"path": str(e.backbone_path), "weight": e.weight} for e in context.experts],
        "parameters": dict(raw),
        "device": "cuda" if context.device.type == "cuda" else "cpu",
    }
    with tempfile.TemporaryDirectory(prefix="mergelab-surgery-") as tmp:
        merge(spec, Path(tmp) / "merged", progress=False, hash_inputs=False)
        return read_backbone_state(Path(tmp) / "merged"), f"{name} {raw}"


def _modules_dir(context: MergeContext, params: SurgeryParams) -> Path:
    if params.modules_dir is not None:
        return Path(params.modules_dir)
    out = getattr(context, "out_dir", None)
    if out is not None:
        out = Path(out)
        return out.with_name(out.name + ".surgery")
    raise SpecError("parameters.modules_dir: surgery writes its per-task modules there (<task>.safetensors); "
                    "set it, e.g. to '<output folder>.surgery'")


def _run(context: MergeContext, params: SurgeryParams) -> dict[str, torch.Tensor]:
    folder = _modules_dir(context, params)
    refuse_overlap(folder, [context.base_path, *(e.path for e in context.experts)], what="parameters.modules_dir")
    state, source = merged_backbone(context, params)
    modules, report = train_surgery(context, state, rank=params.rank, steps=params.steps, lr=params.lr)
    info = {"merged": source, "split": context.split("test"), "samples_per_task": context.data.samples_per_task,
            "lr": params.lr} | report.to_dict()
    save_surgery_modules(modules, folder, info)
    log.info("surgery modules for %d task(s) written to %s", len(modules), folder)
    record_output(context, "surgery", {"modules_dir": str(folder)} | info)
    return state


METHODS = [
    DataInformedMethod(
        name="surgery",
        summary="Representation Surgery: per-task low-rank feature correction on a merged backbone "
                "(backbone unchanged; modules written to modules_dir)",
        params=SurgeryParams,
        run=_run,
        min_models=1,
    )
]

__all__ = ["METHODS", "SurgeredBackbone", "SurgeryModule", "SurgeryParams", "SurgeryReport", "apply_surgery",
           "evaluate_with_surgery", "load_surgery_modules", "merged_backbone", "save_surgery_modules",
           "train_surgery", "train_surgery_module"]
