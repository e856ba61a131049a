"""Task functions the studies hand to :func:`mergelab.experiments.runners.run_tasks` (module-level, so worker
processes and Ray can import them; each takes one JSON-able spec and returns a metrics dict).

* :func:`finetune_job` ``{"spec": ExpertSpec fields, "cache_dir": str | None}``: fine-tune (or fetch from the
  expert cache) one expert; returns its folder, spec hash, test accuracy/loss, training-set size, wall time.
* :func:`merge_eval_job` ``{"arch", "method", "parameters", "members": [{"task", "spec_hash", "step"}],
  "reset_bn", "data_samples", "cache_dir"}``: merge the members' backbones with
  :func:`mergelab.engine.merge` into a temporary folder (``base`` = the pretrained backbone theta_0) and
  evaluate the merge on every member's task through that member's head
  (:func:`mergelab.evaluation.evaluate`). A member with ``step`` is the checkpoint of that expert at that
  step (its backbone and head). Returns the mean over tasks of the test loss and accuracy, the joint
  (pooled) test loss and accuracy, and per-task rows.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from mergelab.errors import SpecError


def finetune_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune one expert (cached by spec hash); see the module docstring."""
    from mergelab.training import finetune

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
    from mergelab.models.paths import expert_dir
    from mergelab.training.result import read_expert

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


def merge_eval_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Merge the members and evaluate the merge on their tasks; see the module docstring."""
    from mergelab.engine import merge
    from mergelab.evaluation import evaluate
    from mergelab.methods.data_informed import registry
    from mergelab.models.paths import pretrained_dir

    arch, cache_dir = spec["arch"], spec.get("cache_dir")
    experts = [member_expert(m, arch, cache_dir) for m in spec["members"]]
    tasks = [e.task for e in experts]
    if len(set(tasks)) != len(tasks):
        raise SpecError(f"merge members must be of distinct tasks, got {tasks}")
    base = pretrained_dir(arch, cache_dir) / "backbone.safetensors"
    merge_spec: dict[str, Any] = {
        "method": spec["method"],
        "base": str(base),
        "models": [str(Path(e.path) / "backbone.safetensors") for e in experts],
        "parameters": dict(spec.get("parameters") or {}),
        "device": "cpu",
    }
    if spec["method"] in registry():
        merge_spec["data"] = {"tasks": tasks, "samples_per_task": int(spec.get("data_samples", 100))}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mergelab-study-") as tmp:
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
