"""Branching from checkpoints: the bifurcation protocol of THEORY.md section 2.

Protocol: train a parent with a constant learning rate (``schedule="constant"``, or the stable phase of a
WSD run) and ``checkpoint_every = k``; from a checkpoint at step ``s`` branch two (or more) children with
different seeds and a decayed learning rate; merge their endpoints at ``a = 0.5`` and record the gain.

:func:`branch_spec` builds such a child: ``steps = s + decay_steps``, a WSD schedule with
``decay_frac = decay_steps / steps`` (the decay phase starts exactly at the branch point) whose cooldown is
linear (``decay="linear"``: ``schedule = "wsd"``, the default here for compatibility) or the square-root
cooldown of the optimizer-bias paper (``decay="sqrt"``: ``schedule = "wsd_sqrt"``, the noise study's default;
:mod:`mergelab.training.schedule` has both curves), and the parent's
warmup expressed as a fraction of the child's length, so the child's learning rate before ``s`` equals the
parent's (irrelevant for training, kept for a faithful record). Children never checkpoint unless asked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mergelab.errors import SpecError
from mergelab.models.paths import cache_root
from mergelab.training.result import ExpertResult, read_expert
from mergelab.training.schedule import WSD_SHAPES
from mergelab.training.spec import BranchFrom, ExpertSpec, make_spec

PathLike = str | os.PathLike[str]
_HASH_CHARS = set("0123456789abcdef")


def find_expert(ref: str, cache_dir: PathLike | None = None) -> ExpertResult | None:
    """The expert named by ``ref``: an expert folder path, or a spec hash anywhere in the cache."""
    if Path(ref).is_dir():
        return read_expert(ref)
    if ref and set(ref) <= _HASH_CHARS:
        for folder in sorted((cache_root(cache_dir) / "zoo").glob(f"*/experts/*/{ref}")):
            found = read_expert(folder)
            if found is not None:
                return found
    return None


def resolve_parent(spec: ExpertSpec, cache_dir: PathLike | None = None) -> ExpertResult:
    """The parent expert of a branched ``spec``, checked for compatibility and for the checkpoint.

    ``branch_from.parent`` is an expert folder path or the spec hash of an expert in the cache.
    """
    assert spec.branch_from is not None
    ref, step = spec.branch_from.parent, spec.branch_from.step
    parent = find_expert(ref, cache_dir)
    if parent is None:
        raise SpecError(
            f"branch_from.parent {ref!r}: neither an expert folder nor the spec hash of an expert in the "
            f"cache {cache_root(cache_dir)} (fine-tune the parent first)"
        )
    for field in ("arch", "task", "optimizer", "head_mode"):  # head_mode: the optimizer state's parameters
        if getattr(parent.spec, field) != getattr(spec, field):
            raise SpecError(
                f"branch_from: parent {parent.spec_hash} has {field}={getattr(parent.spec, field)!r}, "
                f"the branch has {field}={getattr(spec, field)!r}; they must match"
            )
    if step not in parent.checkpoints:
        raise SpecError(
            f"branch_from: parent {parent.spec_hash} has no checkpoint at step {step}; "
            f"available: {parent.checkpoints or 'none (set checkpoint_every on the parent)'}"
        )
    return parent


def branch_spec(
    parent: ExpertSpec | ExpertResult,
    step: int,
    seed: int,
    decay_steps: int,
    decay: str = "linear",
    **overrides: Any,
) -> ExpertSpec:
    """A WSD child of ``parent`` branching at ``step`` and decaying over ``decay_steps`` with the ``decay``
    shape, ``"linear"`` or ``"sqrt"`` (module docstring).

    ``overrides`` replace any other field (e.g. ``lr``, ``min_lr_ratio``, ``batch_size``).
    """
    pspec = parent.spec if isinstance(parent, ExpertResult) else parent
    if decay_steps < 1:
        raise SpecError(f"decay_steps must be >= 1, got {decay_steps}")
    schedule = {shape: name for name, shape in WSD_SHAPES.items()}.get(decay)
    if schedule is None:
        raise SpecError(f"decay must be 'linear' or 'sqrt', got {decay!r}")
    total = step + decay_steps
    warmup_steps = round(pspec.warmup_frac * pspec.steps)
    if warmup_steps > step:
        raise SpecError(f"cannot branch at step {step}: the parent is still warming up until step {warmup_steps}")
    fields = pspec.model_dump(exclude={"branch_from"})
    fields.update(
        seed=seed,
        steps=total,
        schedule=schedule,
        decay_frac=decay_steps / total,
        warmup_frac=warmup_steps / total,
        checkpoint_every=0,
        branch_from=BranchFrom(parent=pspec.spec_hash(), step=step),
    )
    fields.update(overrides)
    return make_spec(fields)
