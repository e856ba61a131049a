"""A unit of work for the runners (:class:`Task`: ``fn(spec)`` recorded under ``key_of(kind, spec)``), what a task
function may return (:class:`TaskOutput`) and what a run did (:class:`RunSummary`).

A task function is a module-level callable or its import path ``"package.module:function"``
(:func:`fn_path`), so worker processes and Ray workers can import it (:func:`resolve_fn`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from mergelab.experiments.store import key_of, to_jsonable


def fn_path(fn: Callable[..., Any] | str) -> str:
    """The import path ``"module:qualname"`` of a module-level function (or ``fn`` itself if a string).

    Raises ``ValueError`` for lambdas, nested functions and other callables worker processes cannot import.
    """
    if isinstance(fn, str):
        if ":" not in fn:
            raise ValueError(f"a task function path must look like 'package.module:function', got {fn!r}")
        return fn
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise ValueError(
            f"task function {fn!r} cannot be sent to worker processes: use a module-level function "
            f"(not a lambda or a nested function), or its import path 'package.module:function'")
    return f"{module}:{qualname}"


def resolve_fn(ref: Callable[..., Any] | str) -> Callable[..., Any]:
    """The callable behind ``ref`` (``"module:function"`` or ``"module:Class.method"``), imported."""
    if not isinstance(ref, str):
        return ref
    module_name, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass(frozen=True)
class Task:
    """One unit of work: ``fn(spec)`` recorded under ``key_of(kind, spec)`` in ``study``.

    ``spec`` may be a mapping or a pydantic model (an :class:`~mergelab.training.ExpertSpec` is keyed by its
    canonical dict); it is stored as canonical JSON. ``fn`` is a module-level function or ``"module:func"``.
    """

    kind: str
    spec: Any
    fn: Callable[..., Any] | str
    study: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", to_jsonable(self.spec))
        fn_path(self.fn)  # fail early on a lambda or nested function
        object.__setattr__(self, "_key", key_of(self.kind, self.spec))

    @property
    def key(self) -> str:
        return self._key  # type: ignore[attr-defined]

    @property
    def fn_ref(self) -> str:
        return fn_path(self.fn)


@dataclasses.dataclass
class TaskOutput:
    """What a task function may return instead of a plain metrics dict: metrics plus named artifacts."""

    metrics: dict[str, Any]
    artifacts: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunSummary:
    """What :func:`run_tasks` did: keys done now, skipped (already done, or running under another live
    driver), failed (after all retries) and put back to pending by an interruption."""

    done: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    interrupted: list[str] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        return {"done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed),
                "interrupted": len(self.interrupted)}

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def __str__(self) -> str:
        c = self.counts
        text = f"{c['done']} done, {c['skipped']} skipped, {c['failed']} failed"
        if c["interrupted"]:
            text += f", {c['interrupted']} interrupted"
        return f"{text} in {self.wall_s:.1f} s"
