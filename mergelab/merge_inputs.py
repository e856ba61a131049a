"""What every data-free merge does before and after computing, shared by both engines and free of torch.

Both the torch engine (:mod:`mergelab.engine`) and the numpy engine (:mod:`mergelab.numpy_engine`) open
the checkpoints of a spec and validate them against each other from their headers (:class:`MergeInputs`),
check the model list against the method (:func:`check_models`), resolve per-tensor parameters
(:class:`ParamResolver`), lay out the output (:func:`output_plan`), and stream their tensors into an
atomic writer that publishes the folder with the same merge record (:func:`write_merge`). Nothing here
reads tensor data or imports torch.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Self, TypeVar

from mergelab.checkpoints import CheckpointReader, CheckpointWriter, open_checkpoint
from mergelab.checkpoints.writer import support_files
from mergelab.checkpoints.safetensors_format import STORAGE_DTYPES, StorageDtype
from mergelab.errors import SpecError, TensorMismatchError
from mergelab.methods import Method, MethodParams
from mergelab.output_paths import check_replaceable, refuse_overlap
from mergelab.provenance import environment, input_digest
from mergelab.spec import MergeSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The spec's output dtypes other than ``auto`` (each tensor keeps the reference model's dtype).
OUTPUT_DTYPES: dict[str, StorageDtype] = {
    "float32": STORAGE_DTYPES["F32"], "float16": STORAGE_DTYPES["F16"], "bfloat16": STORAGE_DTYPES["BF16"],
}


@dataclass
class MergeResult:
    out_dir: Path
    method: str
    tensors: int
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


def few(items: Sequence[str], n: int = 5) -> str:
    """The first ``n`` items, quoted, and how many more there are."""
    shown = ", ".join(repr(i) if not i.endswith(")") else i for i in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def nonfinite_message(where: str, name: str, bad: int, n_nan: int) -> str:
    """The error for a tensor holding ``bad`` non-finite values, ``n_nan`` of them NaN."""
    return (
        f"{where}: tensor '{name}' holds {bad} non-finite value(s) ({n_nan} NaN, {bad - n_nan} Inf); "
        "refusing to merge"
    )


class MergeInputs:
    """The opened checkpoints of one merge (``base``, ``experts``, ``readers`` = both), validated against
    each other from their headers; ``reference`` is the base, or the first expert without one, and gives
    the tensor order (``names``). Takes ownership of the readers: they are closed if validation fails,
    else by :meth:`close` (or leaving a ``with`` block). :meth:`open` opens a spec's checkpoints."""

    def __init__(self, base: CheckpointReader | None, experts: Sequence[CheckpointReader]) -> None:
        self.base = base
        self.experts = list(experts)
        self.readers = ([base] if base is not None else []) + self.experts
        self.warnings: list[str] = []
        self.reference = base if base is not None else self.experts[0]
        self.names = self.reference.keys()
        try:
            self._validate()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, spec: MergeSpec) -> Self:
        """Open the base (if any) and every model of ``spec`` and validate them."""
        base = None if spec.base is None else partial(open_checkpoint, spec.base)
        return cls.from_openers(base, [partial(open_checkpoint, m.path) for m in spec.models])

    @classmethod
    def from_openers(
        cls, base: Callable[[], CheckpointReader] | None, experts: Sequence[Callable[[], CheckpointReader]]
    ) -> Self:
        """Call each opener, closing what was opened if one fails, and validate the checkpoints."""
        opened: list[CheckpointReader] = []
        try:
            for opener in ([base] if base is not None else []) + list(experts):
                opened.append(opener())
        except BaseException:
            for reader in opened:
                reader.close()
            raise
        return cls(opened[0], opened[1:]) if base is not None else cls(None, opened)

    def _validate(self) -> None:
        """Same tensor names and shapes everywhere, no floating-vs-integer mismatch; floating tensors stored
        in different precisions are allowed with a warning (merged in float32, float64 if an input is)."""
        ref = self.reference
        ref_keys = set(self.names)
        for reader in self.readers:
            if reader is ref:
                continue
            keys = set(reader.keys())
            missing = [n for n in self.names if n not in keys]
            extra = sorted(keys - ref_keys)
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"missing {len(missing)} tensor(s) present in {ref.path}: {few(missing)}")
                if extra:
                    parts.append(f"has {len(extra)} tensor(s) not in {ref.path}: {few(extra)}")
                raise TensorMismatchError(f"{reader.path}: " + "; ".join(parts))
        mixed: set[str] = set()
        for name in self.names:
            info = ref.info(name)
            for reader in self.readers:
                if reader is ref:
                    continue
                other = reader.info(name)
                if other.shape != info.shape:
                    raise TensorMismatchError(
                        f"{other.file}: tensor '{name}' has shape {other.shape} but {info.file} has {info.shape}"
                    )
                if other.storage.is_floating_point != info.storage.is_floating_point:
                    raise TensorMismatchError(
                        f"{other.file}: tensor '{name}' is {other.storage} but {info.file} has {info.storage}; "
                        "floating and integer tensors cannot be merged"
                    )
                if other.storage != info.storage:
                    mixed.add(f"{name} ({info.storage} vs {other.storage} in {other.file})")
        if mixed:
            msg = (
                f"inputs store {len(mixed)} tensor(s) in different floating dtypes, e.g. {few(sorted(mixed), 2)}; "
                "they are merged in float32 (float64 if an input is float64) and written in the output dtype"
            )
            log.warning(msg)
            self.warnings.append(msg)

    def close(self) -> None:
        for reader in self.readers:
            with contextlib.suppress(Exception):
                reader.close()

    def __enter__(self) -> MergeInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def refuse_input_overlap(spec: MergeSpec, out_dir: str | Path, *, expert_folders: bool = False) -> None:
    """Refuse an ``out_dir`` that is, lies inside or contains the base or a model of ``spec``
    (:func:`mergelab.output_paths.refuse_overlap`) or has no name (:func:`~mergelab.output_paths.check_replaceable`);
    checks paths only, so it runs before any input is opened. ``expert_folders``: a model given by a file
    also reads the folder holding it (a zoo expert's head and sidecar, for the data-informed methods)."""
    check_replaceable(out_dir)
    paths: list[Path | None] = [spec.base]
    for m in spec.models:
        paths.append(m.path)
        if expert_folders and Path(m.path).is_file():
            paths.append(Path(m.path).parent)
    refuse_overlap(out_dir, paths)


def check_models(spec: MergeSpec, method: Method) -> None:
    """The model list suits ``method`` (count, base model, per-model weights); a :class:`SpecError` otherwise."""
    n = len(spec.models)
    if n < method.min_models:
        raise SpecError(f"models: method '{method.name}' needs at least {method.min_models} models, got {n}")
    if method.max_models is not None and n > method.max_models:
        raise SpecError(f"models: method '{method.name}' takes at most {method.max_models} models, got {n}")
    if method.needs_base and spec.base is None:
        raise SpecError(f"base: method '{method.name}' needs a base model (the pretrained checkpoint)")
    if method.name == "slerp" and n == 1 and spec.base is None:
        raise SpecError("base: slerp with one model interpolates from the base model; give base or two models")
    if not method.uses_weights and any(m.weight != 1.0 for m in spec.models):
        raise SpecError(f"models: method '{method.name}' does not use per-model weights; remove 'weight'")
    if method.uses_weights and method.name == "weight_average" and sum(m.weight for m in spec.models) == 0:
        raise SpecError("models: the weights sum to zero; weight averaging is undefined")


class ParamResolver:
    """Per-tensor parameters: the spec's parameters, updated by the first override whose pattern matches."""

    def __init__(self, spec: MergeSpec, method: Method) -> None:
        self.default = method.parse_params(spec.parameters)
        self.rules = [
            (o, method.parse_params({**spec.parameters, **o.parameters}, where=f"overrides[{i}] ({o.pattern!r})"))
            for i, o in enumerate(spec.overrides)
        ]

    def __call__(self, name: str) -> MethodParams:
        for override, params in self.rules:
            if override.matches(name):
                return params
        return self.default


def global_trim_groups(inputs: MergeInputs, method: Method, params_of: ParamResolver) -> dict[float, list[str]]:
    """The tensors trimmed over the whole model (``method.global_trim_density``), grouped by density, in the
    reference's order: each group shares one threshold per expert. Empty and non-floating tensors are left
    out (nothing to trim)."""
    groups: dict[float, list[str]] = {}
    for name in inputs.names:
        info = inputs.reference.info(name)
        if not info.storage.is_floating_point or math.prod(info.shape) == 0:
            continue
        density = method.global_trim_density(params_of(name))
        if density is not None:
            groups.setdefault(density, []).append(name)
    return groups


def output_plan(inputs: MergeInputs, dtype: str) -> list[tuple[str, tuple[int, ...], StorageDtype]]:
    """(name, shape, stored dtype) of every output tensor in the reference's order: floating tensors in the
    spec's output ``dtype`` (``auto``: the reference's), others as the reference stores them."""
    out = OUTPUT_DTYPES.get(dtype)
    plan = []
    for name in inputs.names:
        info = inputs.reference.info(name)
        plan.append((name, info.shape, out if (out is not None and info.storage.is_floating_point) else info.storage))
    return plan


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
        "overrides": [o.model_dump() for o in spec.overrides],
        "dtype": spec.dtype,
        "environment": environment(),
        "inputs": {
            "base": None if inputs.base is None else describe(inputs.base, None, hash_inputs),
            "models": [describe(r, m.weight, hash_inputs) for r, m in zip(inputs.experts, spec.models)],
        },
    }


#: Methods whose merge waits for the disk rather than the CPU (written through the page cache).
DISK_BOUND_METHODS = ("task_arithmetic", "weight_average")


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
    from tqdm.auto import tqdm

    total = sum(nbytes(shape, dtype) for _, shape, dtype in plan)
    if inputs.reference.config_dir is not None:  # refused support files fail now, before the merge
        support_files(inputs.reference.config_dir)
    # CPU-bound merges write around the page cache (whose copy cost TIES 1.2-1.9 CPU-s on the benchmark);
    # the linear methods wait for the disk anyway, where the page cache's deeper write-back is faster
    direct_io = method.name not in DISK_BOUND_METHODS
    with CheckpointWriter(out_dir, plan, max_shard_bytes=spec.shard_size, overwrite=overwrite,
                          direct_io=direct_io) as writer:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"merge ({method.name})",
                  disable=not progress) as bar:
            compute(writer, bar)
        seconds = time.perf_counter() - started
        record.update(seconds=round(seconds, 3), engine=engine, warnings=inputs.warnings)
        path = writer.finish(copy_files_from=inputs.reference.config_dir, record=record)
    log.info("merged %d tensors with %s into %s in %.1f s (%s engine)", len(plan), method.name, path, seconds,
             engine)
    return MergeResult(out_dir=Path(path), method=method.name, tensors=len(plan), bytes_written=total,
                       seconds=seconds, warnings=inputs.warnings, record=record)


def nbytes(shape: Sequence[int], dtype: Any) -> int:
    """Bytes of a contiguous tensor of ``shape`` and ``dtype`` (anything with ``itemsize``)."""
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def read_ahead(
    io: Executor, names: Sequence[str], read: Callable[[str], T], size: Callable[[str], int], budget: int
) -> Iterator[tuple[str, T]]:
    """Yield ``(name, read(name))`` for each name in order, reading ahead on the executor ``io`` while the
    caller works on the current one: the next name always, further ones while the reads in flight hold
    at most ``budget`` bytes (``size(name)`` each), so memory stays bounded by two items plus that and a
    stall of one stage (a read held up by the disk) does not stop the caller at once."""
    pending: collections.deque[tuple[Future[T], int]] = collections.deque()
    queued = 0
    ahead = 0  # next index to submit

    def submit() -> None:
        nonlocal queued, ahead
        nbytes_ = size(names[ahead])
        pending.append((io.submit(read, names[ahead]), nbytes_))
        queued += nbytes_
        ahead += 1

    for name in names:
        while ahead < len(names) and (not pending or queued + size(names[ahead]) <= budget):
            submit()
        future, nbytes_ = pending.popleft()
        queued -= nbytes_
        value = future.result()
        if ahead < len(names) and not pending:  # the next read starts before the caller works on this one
            submit()
        yield name, value
