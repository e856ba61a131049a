"""Task functions the studies hand to :func:`mergelab.experiments.runners.run_tasks` (module-level, so worker
processes and Ray can import them; each takes one JSON-able spec and returns a metrics dict).

* :func:`finetune_job` ``{"spec": ExpertSpec fields, "cache_dir": str | None}``: fine-tune (or fetch from the
  expert cache) one expert; returns its folder, spec hash, test accuracy/loss, training-set size, wall time.
* :func:`merge_eval_job` ``{"arch", "method", "parameters", "members": [{"task", "spec_hash", "step"}],
  "reset_bn", "data_samples", "cache_dir"}``: merge the members' backbones with
  :func:`mergelab.merging.merge` into a temporary folder (``base`` = the pretrained backbone theta_0) and
  evaluate the merge on every member's task through that member's head
  (:func:`mergelab.evaluation.evaluate`). A member with ``step`` is the checkpoint of that expert at that
  step (its backbone and head). Returns the mean over tasks of the test loss and accuracy, the joint
  (pooled) test loss and accuracy, and per-task rows.
* :func:`expert_eval_job` ``{"arch", "member": {"task", "spec_hash", "step"}, "reset_bn", "cache_dir"}``: one
  merge member (expert or checkpoint) on its own task under the merges' BatchNorm protocol applied to it alone
  (``joint`` and ``per_task`` re-estimate its statistics on its task's training images, ``off`` keeps its own),
  the reference of a merge's excess loss. Returns its test loss and accuracy.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mergelab.analysis.cka import linear_cka
from mergelab.errors import SpecError
from mergelab.evaluation import evaluate
from mergelab.evaluation.bn import reset_bn_statistics
from mergelab.evaluation.metrics import classifier_outputs
from mergelab.experiments.compare import run_comparison
from mergelab.merging import merge
from mergelab.methods.data_informed import registry
from mergelab.models.paths import expert_dir, pretrained_dir
from mergelab.models.probe import extract_features
from mergelab.models.registry import build_backbone
from mergelab.models.state import load_backbone_state, read_backbone_state, read_head_state
from mergelab.tasks.registry import get_task
from mergelab.training import finetune
from mergelab.training.result import BACKBONE_FILE, HEAD_FILE, SIDECAR, load_expert, read_expert


def finetune_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune one expert (cached by spec hash); see the module docstring."""
    t0 = time.perf_counter()
    r = finetune(spec["spec"], cache_dir=spec.get("cache_dir"))
    return {
        "path": r.path,
        "spec_hash": r.spec_hash,
        "task": r.task,
        "accuracy": r.test_metrics.accuracy,
        "loss": r.test_metrics.loss,
        "n_train": r.n_train,
        "train_wall_s": r.wall_time_s,
        "cached": bool(r.cached),
        "seconds": time.perf_counter() - t0,
    }


def member_expert(member: dict[str, Any], arch: str, cache_dir: str | None) -> Any:
    """The :class:`~mergelab.training.result.ExpertResult` a merge member names; for a checkpoint member, a
    copy whose folder is the checkpoint's (so its backbone and head are read from there) and whose spec says
    ``steps = step`` (the bound reads K from the spec)."""
    folder = expert_dir(arch, member["task"], member["spec_hash"], cache_dir)
    r = read_expert(folder)
    if r is None:
        raise SpecError(f"merge member {member['task']}/{member['spec_hash']}: no expert in {folder} (fine-tune it first)")
    step = member.get("step")
    if step is None:
        return r
    if step not in r.checkpoints:
        raise SpecError(f"expert {folder} has no checkpoint at step {step}; it has {r.checkpoints}")
    spec = r.spec.model_copy(update={"steps": int(step), "checkpoint_every": 0})
    return r.model_copy(update={"path": str(r.checkpoint_dir(step)), "spec": spec})


def expert_folder(expert: Any, dest: Path) -> Path:
    """``expert``'s folder if it is a complete expert folder; otherwise (a checkpoint member) ``dest`` made into
    one: its backbone and head linked and its sidecar written (the spec with ``steps`` = the checkpoint's step;
    the test metrics are the finished expert's)."""
    folder = Path(expert.path)
    if read_expert(folder) is not None:
        return folder
    dest.mkdir(parents=True)
    for name in (BACKBONE_FILE, HEAD_FILE):
        os.symlink(folder / name, dest / name)
    (dest / SIDECAR).write_text(expert.sidecar_json())
    return dest


def merge_eval_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Merge the members and evaluate the merge on their tasks; see the module docstring."""
    arch, cache_dir = spec["arch"], spec.get("cache_dir")
    experts = [member_expert(m, arch, cache_dir) for m in spec["members"]]
    tasks = [e.task for e in experts]
    if len(set(tasks)) != len(tasks):
        raise SpecError(f"merge members must be of distinct tasks, got {tasks}")
    base = pretrained_dir(arch, cache_dir) / "backbone.safetensors"
    informed = spec["method"] in registry()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mergelab-study-") as tmp:
        # data-informed methods read each expert's task and head from an expert folder: a checkpoint member
        # gets one (its files linked, its sidecar saying steps = step) in the temporary folder
        models = ([str(expert_folder(e, Path(tmp) / f"member{i}")) for i, e in enumerate(experts)] if informed
                  else [str(Path(e.path) / "backbone.safetensors") for e in experts])
        merge_spec: dict[str, Any] = {"method": spec["method"], "base": str(base), "models": models,
                                      "parameters": dict(spec.get("parameters") or {}), "device": "cpu"}
        if informed:
            merge_spec["data"] = {"tasks": tasks, "samples_per_task": int(spec.get("data_samples", 100))}
        out = Path(tmp) / "merged"
        merge(merge_spec, out, progress=False, hash_inputs=False)
        t_merge = time.perf_counter() - t0
        r = evaluate(out, experts, tasks=tasks, reset_bn=spec.get("reset_bn", "off"), device="cpu")
    rows = [row.model_dump() for row in r.tasks]
    losses = [row["loss"] for row in rows]
    return {
        "loss": float(sum(losses) / len(losses)),
        "accuracy": float(r.mean_accuracy),
        "normalized_accuracy": r.mean_normalized_accuracy if r.mean_normalized_accuracy is not None else math.nan,
        "joint_loss": r.joint.loss,
        "joint_accuracy": r.joint.accuracy,
        "tasks": rows,
        "merge_s": t_merge,
        "seconds": time.perf_counter() - t0,
    }


def expert_eval_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One merge member on its own task under the merges' BN protocol; see the module docstring.

    The protocol is applied to the expert exactly as :func:`merge_eval_job` applies it to a merge of it alone
    (:func:`mergelab.evaluation.evaluate` with ``tasks = [its task]``): a one-member merge has excess 0.
    """
    expert = member_expert(spec["member"], spec["arch"], spec.get("cache_dir"))
    t0 = time.perf_counter()
    r = evaluate(Path(expert.path) / BACKBONE_FILE, [expert], tasks=[expert.task], reset_bn=spec.get("reset_bn", "off"),
                 device="cpu")
    row = r.tasks[0]
    return {"task": expert.task, "loss": float(row.loss), "accuracy": float(row.accuracy), "nonfinite": row.nonfinite,
            "seconds": time.perf_counter() - t0}


def _interpolate(states: list[dict[str, Any]], weights: list[float], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base + sum_i w_i (s_i - base)`` (or ``sum_i w_i s_i`` without ``base``) for floating tensors; other
    tensors (BatchNorm's ``num_batches_tracked``) are taken from the first state."""
    out = {}
    for k, v in states[0].items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = base[k].double().clone() if base is not None else v.double() * 0
        for s, w in zip(states, weights):
            acc += w * (s[k].double() - (base[k].double() if base is not None else 0))
        out[k] = acc.to(v.dtype)
    return out


def pair_gain_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Merge two models of one task at their midpoint and measure the merge gain (THEORY.md section 2).

    ``spec``: ``{"arch", "task", "a": spec hash, "b": spec hash, "reset_bn": bool, "ta_coefficients": [...],
    "cache_dir"}``. Evaluates on the task's test split, each model as backbone + its own head: endpoints A and
    B, the midpoint ``(theta_A + theta_B) / 2`` with the averaged head, and the task-arithmetic path
    ``theta_0 + a (tau_A + tau_B)`` (head: the averaged head) at each coefficient ``a``; with ``reset_bn``
    every model's BatchNorm statistics are re-estimated on the task's training images first (the same 20
    batches for all). Returns accuracies, losses, the gain ``acc(mid) - (acc(A) + acc(B)) / 2``, the loss
    barrier at the midpoint ``loss(mid) - (loss(A) + loss(B)) / 2``, the standard error of the gain over the test
    samples (paired: ``std_i(c_mid,i - (c_A,i + c_B,i) / 2) / sqrt(n)`` with ``c`` the per-sample correctness), the
    linear CKA of the endpoints'
    penultimate test features, and the path.
    """
    arch, task, cache_dir = spec["arch"], spec["task"], spec.get("cache_dir")
    ea = load_expert(expert_dir(arch, task, spec["a"], cache_dir))
    eb = load_expert(expert_dir(arch, task, spec["b"], cache_dir))
    data = get_task(task)
    sa, sb = read_backbone_state(ea.backbone_path), read_backbone_state(eb.backbone_path)
    s0 = read_backbone_state(pretrained_dir(arch, cache_dir) / "backbone.safetensors")
    ha, hb = read_head_state(ea.head_path), read_head_state(eb.head_path)
    h_mid = {k: (ha[k].double() + hb[k].double()).div(2).to(ha[k].dtype) for k in ha}

    def run(state: dict[str, Any], head_state: dict[str, Any], features: bool = False) -> dict[str, Any]:
        backbone = build_backbone(arch)
        load_backbone_state(backbone, state, source=task)
        head = torch.nn.Linear(backbone.feature_dim, data.num_classes)
        head.load_state_dict({k: v.float() for k, v in head_state.items()})
        if spec.get("reset_bn", True):
            reset_bn_statistics(backbone, data.x_train)
        with torch.no_grad():
            correct, losses = classifier_outputs(backbone, head, data.x_test, data.y_test)
            feats = extract_features(backbone, data.x_test) if features else None
        return {"accuracy": correct.double().mean().item(), "loss": losses.mean().item(), "features": feats,
                "correct": correct.double()}

    with torch.no_grad():
        ra, rb = run(sa, ha, True), run(sb, hb, True)
        rm = run(_interpolate([sa, sb], [0.5, 0.5]), h_mid)
        path = []
        for a in spec.get("ta_coefficients") or []:
            r = run(_interpolate([sa, sb], [float(a), float(a)], base=s0), h_mid)
            path.append({"a": float(a), "accuracy": r["accuracy"], "loss": r["loss"]})
    cka = linear_cka(ra["features"], rb["features"])
    per_sample = rm["correct"] - (ra["correct"] + rb["correct"]) / 2  # paired over the test samples
    gain_se = float(per_sample.std(unbiased=True) / math.sqrt(len(per_sample))) if len(per_sample) > 1 else math.nan
    return {
        "accuracy_a": ra["accuracy"], "accuracy_b": rb["accuracy"], "accuracy_mid": rm["accuracy"],
        "loss_a": ra["loss"], "loss_b": rb["loss"], "loss_mid": rm["loss"],
        "gain": rm["accuracy"] - (ra["accuracy"] + rb["accuracy"]) / 2,
        "gain_se": gain_se,
        "n_test": len(per_sample),
        "barrier": rm["loss"] - (ra["loss"] + rb["loss"]) / 2,
        "cka": cka,
        "ta_path": path,
    }


def pool_size_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One pool size of the pool-scaling protocol: :func:`mergelab.experiments.compare.run_comparison` of the
    ``pool`` experts (``[{"task", "spec_hash"}]``) evaluated on ``eval_tasks`` with ``methods``; ``spec`` also
    holds ``arch``, ``samples_per_task``, ``bn`` (BatchNorm protocol), ``select``, ``quick`` and ``cache_dir``. Returns the comparison
    table as a dict (:meth:`~mergelab.experiments.comparison_table.ComparisonTable.to_dict`)."""
    arch, cache_dir = spec["arch"], spec.get("cache_dir")
    pool = [expert_dir(arch, m["task"], m["spec_hash"], cache_dir) for m in spec["pool"]]
    table = run_comparison(arch, list(spec["eval_tasks"]), list(spec["methods"]), pool=pool,
                           samples_per_task=int(spec.get("samples_per_task", 100)), cache_dir=cache_dir,
                           progress=False, quick=bool(spec.get("quick", False)),
                           bn=spec.get("bn", spec.get("reset_bn")), select=spec.get("select", "fixed"))
    return table.to_dict()
