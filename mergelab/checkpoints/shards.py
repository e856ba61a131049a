"""How a checkpoint's tensors are laid out in safetensors shards, as Hugging Face names them.

Shards are filled greedily in plan order; a new shard starts when the next tensor would push the current one
past ``max_shard_bytes`` (a tensor larger than the limit gets a shard of its own). One shard is named
``model.safetensors`` and needs no index; several are named ``model-00001-of-0000N.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {...}}``, as transformers
writes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mergelab.checkpoints.safetensors_format import tensor_nbytes

SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

PlanEntry = tuple[str, tuple[int, ...], Any]  # (name, shape, torch / numpy / storage dtype)


def shard_name(index: int, count: int) -> str:
    if count == 1:
        return SINGLE_FILE_NAME
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


@dataclass
class Shard:
    name: str
    entries: list[PlanEntry] = field(default_factory=list)
    nbytes: int = 0


def plan_shards(plan: Sequence[PlanEntry], max_shard_bytes: int) -> list[Shard]:
    """Greedy split of ``plan`` (in order) into shards of at most ``max_shard_bytes`` tensor bytes each."""
    shards: list[Shard] = []
    current: Shard | None = None
    for entry in plan:
        size = tensor_nbytes(entry[1], entry[2])
        if current is None or (current.entries and current.nbytes + size > max_shard_bytes):
            current = Shard(name="")
            shards.append(current)
        current.entries.append(entry)
        current.nbytes += size
    if not shards:
        shards.append(Shard(name=""))
    for i, shard in enumerate(shards):
        shard.name = shard_name(i, len(shards))
    return shards
