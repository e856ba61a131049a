"""Where a checkpoint's weights live: resolving a user-given path to its data files.

Accepted layouts (the Hugging Face names; a folder is searched in this order, as transformers does):

* a single file: ``*.safetensors``, or a torch file ``*.pt`` / ``*.pth`` / ``*.bin``, or a shard index
  ``*.index.json``;
* a folder with ``model.safetensors``;
* a folder with ``model.safetensors.index.json`` (``{"weight_map": {tensor: shard file}}``) and its shards;
* a folder with ``pytorch_model.bin``;
* a folder with ``pytorch_model.bin.index.json`` and its shards;
* a mergelab zoo folder (an expert or the pretrained model) with ``backbone.safetensors``: the backbone,
  which is what merging acts on (each task keeps its expert's ``head.safetensors``).

This module only looks at file names and index files; it never reads tensor data. It also defines which
files count as weights, so the writer can copy everything else (config, tokenizer, ...) next to a merged
model.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path

from mergelab.errors import CheckpointError
from mergelab.untrusted_input import parse_json, read_limited

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")

#: Folder contents tried in order; the first present wins.
FOLDER_CANDIDATES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "backbone.safetensors",  # a mergelab zoo expert or pretrained folder: merging acts on the backbone
)

#: Files that hold weights (of this model or another format of it) and are never copied next to a
#: merged model; ``mergelab_merge.json`` is the record of an earlier merge.
WEIGHT_FILE_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.index.json",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.gguf",
    "mergelab_merge.json",
)


def is_weight_file(name: str) -> bool:
    """True for file names that hold model weights (see :data:`WEIGHT_FILE_PATTERNS`)."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_FILE_PATTERNS)


@dataclass(frozen=True)
class DataFile:
    """One file holding tensors. ``expected`` lists the names an index assigns to it (None: no index)."""

    path: Path
    kind: str  # "safetensors" or "torch"
    expected: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Layout:
    """The resolved layout of a checkpoint."""

    path: Path
    files: list[DataFile]
    config_dir: Path | None
    index: Path | None = None


def file_kind(path: Path) -> str:
    """"safetensors" or "torch" from the file suffix; CheckpointError for anything else."""
    name = path.name.lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        return "safetensors"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    raise CheckpointError(
        f"{path}: unsupported checkpoint file type (expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}, *.index.json, or an HF-style folder)"
    )


def _read_index(index: Path) -> list[DataFile]:
    try:
        data = read_limited(index, what="shard index", error=CheckpointError)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{index}: cannot read shard index: {exc.strerror}") from None
    parsed = parse_json(data, str(index), what="corrupt shard index", error=CheckpointError)
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: corrupt shard index: expected a 'weight_map' of tensor name -> file")
    by_shard: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(tensor)
    files: list[DataFile] = []
    for shard in sorted(by_shard):
        shard_path = index.parent / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"{index}: shard {shard!r} must be a path relative to the index's folder")
        if not shard_path.is_file():
            raise CheckpointError(
                f"{index}: shard {shard!r} is missing (expected at {shard_path}); "
                f"it holds {len(by_shard[shard])} tensors, e.g. {by_shard[shard][0]!r}"
            )
        files.append(DataFile(shard_path, file_kind(shard_path), tuple(by_shard[shard])))
    return files


def resolve(path: str | Path) -> Layout:
    """Resolve ``path`` (file or folder) to its data files; CheckpointError if there are none."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return Layout(path, _read_index(path), None, index=path)
        return Layout(path, [DataFile(path, file_kind(path))], None)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a regular file or folder")

    present = [name for name in FOLDER_CANDIDATES if (path / name).is_file()]
    if not present:
        try:
            contents = sorted(p.name for p in path.iterdir())
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot list folder: {exc}") from None
        found = "the folder is empty" if not contents else f"found: {', '.join(contents[:20])}"
        if len(contents) > 20:
            found += f", ... ({len(contents)} entries)"
        raise CheckpointError(
            f"{path}: no recognised weights; looked for {', '.join(FOLDER_CANDIDATES)} ({found})"
        )
    chosen = present[0]
    if len(present) > 1:
        logger.info("%s: several weight layouts present (%s); using %s", path, ", ".join(present), chosen)
    target = path / chosen
    if chosen.endswith(".index.json"):
        return Layout(path, _read_index(target), path, index=target)
    return Layout(path, [DataFile(target, file_kind(target))], path)
