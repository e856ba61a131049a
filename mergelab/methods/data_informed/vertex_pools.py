"""Vertex pools: the checkpoints a merge searches the convex hull of, loaded one at a time on demand.

:class:`VertexPool` is the interface (``len``, ``load(i)`` as fresh tensors, ``label(i)``); :class:`TensorPool`
holds its vertices in memory (tests, small problems), :class:`ContextPool` reads a
:class:`~mergelab.methods.data_informed.context.MergeContext`'s experts from disk on every load, so memory
does not grow with the pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from mergelab.errors import NonFiniteError, TensorMismatchError
from mergelab.methods.data_informed.context import MergeContext
from mergelab.methods.data_informed.objectives import Point


class VertexPool(Protocol):
    """The checkpoints (vertices). ``load(i)`` returns vertex i's tensors as fresh tensors the caller owns
    (and may modify in place), on the working device; nothing is cached."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Point: ...

    def label(self, index: int) -> str: ...


class TensorPool:
    """An in-memory pool (tests, small problems): ``load`` returns copies of the given vertices."""

    def __init__(self, vertices: Sequence[Mapping[str, torch.Tensor]], labels: Sequence[str] | None = None) -> None:
        if not vertices:
            raise ValueError("the pool is empty")
        self.vertices = [dict(v) for v in vertices]
        self.labels = list(labels) if labels is not None else [f"v{i}" for i in range(len(vertices))]
        self.loads = 0

    def __len__(self) -> int:
        return len(self.vertices)

    def load(self, index: int) -> Point:
        self.loads += 1
        return {k: v.detach().clone() for k, v in self.vertices[index].items()}

    def label(self, index: int) -> str:
        return self.labels[index]


class ContextPool:
    """The experts of a :class:`MergeContext`, read from disk on every ``load`` (one at a time).

    Checks each expert against ``reference`` (names, shapes; finiteness on its first read) and returns its
    floating tensors in float32 on the context's device.
    """

    def __init__(self, context: MergeContext, reference: Mapping[str, torch.Tensor]) -> None:
        self.context = context
        self.shapes = {n: tuple(t.shape) for n, t in reference.items()}
        self.floating = [n for n, t in reference.items() if t.is_floating_point()]
        self._checked: set[int] = set()
        tasks = [e.task for e in context.experts]
        self.labels = [t if tasks.count(t) == 1 else f"{t}#{i}" for i, t in enumerate(tasks)]

    def __len__(self) -> int:
        return len(self.context.experts)

    def label(self, index: int) -> str:
        return self.labels[index]

    def load(self, index: int) -> Point:
        state = self.context.expert_state(index)
        source = str(self.context.experts[index].backbone_path)
        missing = sorted(set(self.shapes) - set(state))
        extra = sorted(set(state) - set(self.shapes))
        if missing or extra:
            parts = ([f"missing {len(missing)} tensor(s), e.g. {missing[:3]}"] if missing else []) + (
                [f"unexpected {len(extra)} tensor(s), e.g. {extra[:3]}"] if extra else [])
            raise TensorMismatchError(
                f"{source}: does not match the base {self.context.base_path}: " + "; ".join(parts))
        out: Point = {}
        device = self.context.device
        for name in self.floating:
            t = state.pop(name)
            if tuple(t.shape) != self.shapes[name]:
                raise TensorMismatchError(
                    f"{source}: tensor '{name}' has shape {tuple(t.shape)}, the base has {self.shapes[name]}")
            if not t.is_floating_point():
                raise TensorMismatchError(f"{source}: tensor '{name}' is {t.dtype}, the base's is floating")
            t = t.to(device=device, dtype=torch.float32)
            if index not in self._checked and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"{source}: tensor '{name}' holds NaN or Inf values")
            out[name] = t
        self._checked.add(index)
        del state
        return out
