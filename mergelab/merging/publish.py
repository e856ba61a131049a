"""Publishing a merge: the atomic writer, the merge record and the result, for every back-end and for the
data-informed methods.

A streamed merge (:func:`write_merge`) opens an atomic :class:`~mergelab.checkpoints.CheckpointWriter`, lets
its back-end write every tensor, then publishes the folder with the reference model's config files (with a
``tokenizer:`` section or a ``chat_template``, the tokenizer files it builds instead of the reference's:
:func:`tokenizer_files`; ``config.json`` edited by :func:`output_config`) and ``mergelab_merge.json``
(:func:`merge_record`: method, resolved parameters, inputs with SHA-256 content hashes, versions, the
back-end, warnings, seconds). A method that holds the merged model in memory anyway
(the data-informed ones) publishes it with :func:`write_state`, through the same writer. Either way a
failed merge leaves nothing at the target path.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from mergelab.checkpoints import CheckpointReader, CheckpointWriter, open_checkpoint
from mergelab.checkpoints.support_files import support_files
from mergelab.errors import CheckpointError
from mergelab.merging.layout import LAYER_COUNT_KEYS, set_layer_count
from mergelab.merging.pipeline import nbytes
from mergelab.merging.plan import OUTPUT_DTYPES, MergeInputs
from mergelab.methods import Method, MethodParams
from mergelab.provenance import environment, input_digest
from mergelab.spec import MergeSpec
from mergelab import tokenizers
from mergelab.tokenizers import TOKENIZER_FILES

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    out_dir: Path
    method: str
    tensors: int
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


def describe(reader: CheckpointReader, weight: float | None, hash_inputs: bool) -> dict[str, Any]:
    """An input's entry in the merge record: its path, data files with SHA-256 (unless not hashing), weight."""
    out: dict[str, Any] = {
        "path": str(reader.path),
        "files": [
            {"path": str(f), "sha256": input_digest(f) if hash_inputs else None} for f in reader.files
        ],
    }
    if weight is not None:
        out["weight"] = weight
    return out


def describe_path(path: Path, weight: float | None, hash_inputs: bool) -> dict[str, Any]:
    """Like :func:`describe` for a checkpoint given by path (opened only to list its data files)."""
    with open_checkpoint(path) as reader:
        return describe(reader, weight, hash_inputs)


def merge_record(
    spec: MergeSpec, method: Method, params: MethodParams, inputs: MergeInputs, hash_inputs: bool
) -> dict[str, Any]:
    """The record written as ``mergelab_merge.json``: method, parameters, overrides, dtype, versions and the
    inputs with their content hashes (:func:`write_merge` adds seconds, engine and warnings when done)."""
    return {
        "method": method.name,
        "parameters": params.model_dump(by_alias=True),
        "overrides": [o.model_dump(exclude_none=True) for o in spec.overrides],
        "model_parameters": [m.parameters for m in spec.models],
        # a slice's base_model only when set (the records of slices without one are as before it existed)
        **({"slices": [{k: v for k, v in sl.model_dump().items() if k != "base_model" or v is not None}
                       for sl in spec.slices]} if spec.slices else {}),
        **({"tokenizer": inputs.vocabulary.record()} if inputs.vocabulary is not None else {}),
        **({"chat_template": spec.chat_template} if spec.chat_template is not None else {}),
        "dtype": spec.dtype,
        "environment": environment(),
        "inputs": {
            "base": None if inputs.base is None else describe(inputs.base, None, hash_inputs),
            "models": [describe(r, m.weight, hash_inputs) for r, m in zip(inputs.experts, spec.models)],
        },
    }


def output_config(inputs: MergeInputs) -> dict[str, str] | None:
    """The reference's ``config.json`` with the output's number of layers when the merge stacks layers
    (``slices``; :func:`mergelab.merging.layout.set_layer_count`) and its vocabulary size when it builds a
    vocabulary (``vocab_size``, of ``text_config`` when only that has one; mergekit's
    ``_update_config_vocab``), as ``{"config.json": text}``; None when there is nothing to change (neither,
    or no config). A config without a layer-count key is copied as is, with a warning."""
    vocab = inputs.vocabulary
    if (inputs.layers is None and vocab is None) or inputs.reference.config_dir is None:
        return None
    path = Path(inputs.reference.config_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the config to set its number of layers: {exc}") from None
    if not isinstance(config, dict):
        return None
    changed = False
    if inputs.layers is not None:
        if set_layer_count(config, inputs.layers) is None:
            msg = (f"{path} has no number-of-layers key ({', '.join(LAYER_COUNT_KEYS)}); the output's config.json "
                   f"is copied unchanged though the merge has {inputs.layers} layers")
            log.warning(msg)
            inputs.warnings.append(msg)
        else:
            changed = True
    if vocab is not None:
        text = config.get("text_config")
        section = text if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text else config
        section["vocab_size"] = vocab.rows
        changed = True
    return {"config.json": json.dumps(config, indent=2, sort_keys=False) + "\n"} if changed else None


def tokenizer_files(spec: MergeSpec, inputs: MergeInputs) -> dict[str, bytes]:
    """The tokenizer files the merge writes itself (:mod:`mergelab.tokenizers`): the built vocabulary's
    tokenizer, or the reference's re-saved with ``chat_template`` (mergekit re-saves it then too); empty when
    the reference's files are copied as they are."""
    if inputs.vocabulary is None and spec.chat_template is None:
        return {}

    template = None
    if spec.chat_template is not None:
        folders = list(dict.fromkeys(r.config_dir for r in inputs.readers))  # the base listed as a model: once
        template = tokenizers.chat_template(spec.chat_template, folders)
    if inputs.vocabulary is not None:
        tokenizer = inputs.vocabulary.tokenizer
    else:
        tokenizer = tokenizers.load_tokenizer(inputs.reference.config_dir, f"chat_template: {inputs.reference.path}")
    return tokenizers.saved_files(tokenizer, template)


def write_merge(
    spec: MergeSpec,
    method: Method,
    inputs: MergeInputs,
    record: dict[str, Any],
    plan: Sequence[tuple[str, tuple[int, ...], Any]],
    out_dir: str | Path,
    compute: Callable[[CheckpointWriter, Any], None],
    *,
    engine: str,
    overwrite: bool,
    progress: bool,
    started: float,
) -> MergeResult:
    """Open an atomic :class:`CheckpointWriter` for ``plan`` at ``out_dir``, let ``compute(writer, bar)``
    write every tensor (``bar`` is a progress bar over output bytes), then publish the folder with the
    reference's config files and ``record`` plus the seconds since ``started``, the engine and the warnings.
    Any error leaves nothing at ``out_dir``."""
    total = sum(nbytes(shape, dtype) for _, shape, dtype in plan)
    if inputs.reference.config_dir is not None:  # refused support files fail now, before the merge
        support_files(inputs.reference.config_dir)
    files: dict[str, str | bytes] = dict(tokenizer_files(spec, inputs))  # a bad chat template fails now too
    skip = TOKENIZER_FILES if files else frozenset()
    if files:
        record["tokenizer_files"] = sorted(files)
    # every merge writes around the page cache (direct I/O; the writer falls back to buffered writes where
    # the file system refuses it, $MERGELAB_DIRECT_IO=0 forces them): copying 1.34 GB into the page cache
    # cost 1.4-1.9 CPU-s on the benchmark, which the other core needs for the merge. Task arithmetic there,
    # medians of 3 alternating: 2.95 s / 3.70 CPU-s direct, 3.94 s / 5.13 CPU-s buffered.
    with CheckpointWriter(out_dir, plan, max_shard_bytes=spec.shard_size, overwrite=overwrite,
                          direct_io=True) as writer:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"merge ({method.name})",
                  disable=not progress) as bar:
            compute(writer, bar)
        seconds = time.perf_counter() - started
        record.update(seconds=round(seconds, 3), engine=engine, warnings=inputs.warnings)
        files.update(output_config(inputs) or {})
        path = writer.finish(copy_files_from=inputs.reference.config_dir, record=record, files=files, skip=skip)
    log.info("merged %d tensors with %s into %s in %.1f s (%s engine)", len(plan), method.name, path, seconds,
             engine)
    return MergeResult(out_dir=Path(path), method=method.name, tensors=len(plan), bytes_written=total,
                       seconds=seconds, warnings=inputs.warnings, record=record)


def write_state(
    state: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    record: Mapping[str, Any],
    dtype: str = "auto",
    shard_size: int = 2 * 10**9,
    overwrite: bool = False,
    copy_files_from: Path | None = None,
) -> Path:
    """Write an in-memory state dict like a streamed merge: atomically, sharded, with its record.

    For methods that must hold the merged model anyway (the data-informed ones). Floating tensors are cast
    to ``dtype`` unless it is ``auto``; non-finite values are refused, naming the tensor.
    """
    # the torch back-end's finiteness check; a streamed merge publishes without importing torch
    from mergelab.merging.torch_backend import check_finite

    out_dtype = OUTPUT_DTYPES[dtype].to_torch() if dtype in OUTPUT_DTYPES else None
    tensors = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if out_dtype is not None and t.is_floating_point():
            t = t.to(out_dtype)
        check_finite(t, f"merge result ({record.get('method', '?')})", name)
        tensors[name] = t.contiguous()
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with CheckpointWriter(out_dir, plan, max_shard_bytes=shard_size, overwrite=overwrite) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
        return writer.finish(copy_files_from=copy_files_from, record=dict(record))
