"""Data-informed merging methods: they use a model, its task heads and a little data.

Each method module defines ``METHODS: list[DataInformedMethod]``; the registry below collects them. A
method's ``run(context, params)`` returns the merged backbone state dict; :func:`run_merge` validates the
spec, builds the :class:`~mergelab.methods.data_informed.context.MergeContext`, runs the method and writes
the result atomically with a merge record through the data-free merges' publisher
(:mod:`mergelab.merging.publish`).
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoints.support_files import support_files
from mergelab.errors import SpecError
from mergelab.merging.plan import refuse_input_overlap
from mergelab.merging.publish import MergeResult, describe_path, write_state
from mergelab.merging.torch_backend import resolve_device
from mergelab.methods.base import Method, MethodParams
from mergelab.methods.data_informed.context import DataSpec, ExpertHandle, MergeContext
from mergelab.provenance import environment

log = logging.getLogger(__name__)

#: Modules under this package that define data-informed methods (absent ones are skipped).
METHOD_MODULES = ("adamerging", "frank_wolfe", "fisher", "regmean", "surgery")


@dataclass(frozen=True)
class DataInformedMethod:
    """A registered data-informed method. ``run(context, params) -> merged backbone state dict``.

    ``extra_outputs`` are extra state dicts some methods produce (e.g. surgery's per-task modules), written
    by the method itself next to the merged backbone through ``context``; most methods have none.
    """

    name: str
    summary: str
    params: type[MethodParams]
    run: Callable[[MergeContext, Any], dict[str, torch.Tensor]]
    min_models: int = 1


def registry() -> dict[str, DataInformedMethod]:
    found: dict[str, DataInformedMethod] = {}
    for name in METHOD_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        for method in getattr(module, "METHODS", ()):
            found[method.name] = method
    return found


def parse_params(method: DataInformedMethod, raw: dict[str, Any]) -> MethodParams:
    """Validate ``raw`` against the method's parameters (same messages as the data-free methods)."""
    shim = Method(method.name, method.summary, method.params, lambda inp, p: inp.base)
    return shim.parse_params(raw)


def run_merge(spec: Any, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
              hash_inputs: bool = True) -> MergeResult:
    """Run a data-informed merge spec (a validated :class:`~mergelab.spec.MergeSpec`); see the module doc."""
    started = time.perf_counter()
    refuse_input_overlap(spec, out_dir, expert_folders=True)
    method = registry()[spec.method]
    if spec.overrides:
        raise SpecError(f"overrides: per-tensor overrides are not supported by data-informed method '{method.name}'")
    if len(spec.models) < method.min_models:
        raise SpecError(f"models: method '{method.name}' needs at least {method.min_models} models")
    params = parse_params(method, spec.parameters)
    device = resolve_device(spec.device)
    context = MergeContext.from_spec(spec.base, [(m.path, m.weight) for m in spec.models], spec.data, device,
                                     progress)
    context.out_dir = Path(out_dir)
    if Path(context.base_path).is_dir():  # refused support files fail now, before the merge runs
        support_files(context.base_path)
    state = method.run(context, params)
    seconds = time.perf_counter() - started
    record = {
        "method": method.name,
        "parameters": params.model_dump(by_alias=True),
        "data": context.data.model_dump() | {"tasks": context.tasks},
        "arch": context.arch,
        "dtype": spec.dtype,
        "environment": environment(),
        "inputs": {
            "base": describe_path(context.base_path, None, hash_inputs),
            "models": [describe_path(e.backbone_path, e.weight, hash_inputs) | {"task": e.task}
                       for e in context.experts],
        },
        "seconds": round(seconds, 3),
        **({"outputs": context.outputs} if context.outputs else {}),
    }
    out = write_state(state, out_dir, record=record, dtype=spec.dtype, shard_size=spec.shard_size,
                      overwrite=overwrite, copy_files_from=Path(context.base_path) if Path(context.base_path).is_dir() else None)
    log.info("merged with %s into %s in %.1f s", method.name, out, seconds)
    total = sum(t.numel() * t.element_size() for t in state.values())
    return MergeResult(out_dir=out, method=method.name, tensors=len(state), bytes_written=total,
                       seconds=seconds, record=record)


__all__ = ["DataInformedMethod", "DataSpec", "ExpertHandle", "MergeContext", "METHOD_MODULES", "parse_params",
           "registry", "run_merge"]
