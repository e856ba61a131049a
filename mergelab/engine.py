"""The streaming merge engine: checkpoints -> task vectors -> operators -> merged tensors -> writer.

Memory model. Tensors are processed one name at a time, in the base model's storage order: the engine
reads that tensor from the base and from every expert (lazily, from disk), hands them to the method,
casts the result and streams it to the :class:`~mergelab.checkpoints.CheckpointWriter`, then drops all of
them. Three threads form a pipeline one tensor apart: a read-ahead thread reads tensor k+1 while the main
thread merges tensor k and a write-behind thread writes tensor k-1 (``pread``, ``write`` and torch kernels
release the GIL); small tensors queue deeper, up to ``PIPELINE_BYTES`` (256 MiB) of inputs read ahead and
of outputs waiting to be written, so a stall of one stage (a write held up by the disk) does not stop the
others at once. Peak memory is therefore about three tensors' worth plus those two budgets: the inputs of
the current and the next tensor in storage dtype, and two outputs. Methods work on cache-sized blocks
(:mod:`mergelab.ops.blocks`), so their float32 temporaries are a few MiB, independent of the tensor size.
A whole-model trim threshold (TIES with ``trim_scope: global``) comes from two extra streaming passes
(:class:`mergelab.ops.StreamingKthLargest`), never from concatenating models.

Threads. During a merge on the CPU, torch runs its kernels on one intra-op thread (restored afterwards;
``$MERGELAB_MERGE_THREADS`` overrides): block-sized kernels do not gain from splitting, and idle OpenMP
workers spinning next to the reader and writer threads multiplied the CPU time by ten. Methods whose
blocks are independent (task arithmetic, weight averaging, TIES) split a tensor's blocks over
``mergelab.ops.compute_workers()`` threads themselves.

Rules applied to every merge:

- keys, shapes and dtype kinds are checked from the headers before any data is read: missing or extra
  tensors, shape mismatches and float-vs-integer mismatches are errors naming the file and tensor;
- floating tensors stored in different precisions (say a bf16 base and an fp32 expert) are merged in
  float32 (float64 if any input is float64) and written in the output dtype; a warning says so;
- integer and bool tensors (BatchNorm's ``num_batches_tracked``, position ids, masks) are never averaged:
  they are copied from the base model (the first model when there is no base);
- NaN or Inf in an input tensor is an error naming the file and tensor. Methods whose output is a linear
  combination of the inputs (``Method.propagates_nonfinite``: task arithmetic, weight averaging, DARE
  linear) check only their output, since a non-finite input always makes it non-finite; a non-finite
  output then rescans that tensor's inputs to name the file. Other methods check each input as it is read
  (cheaply: a finite sum proves every entry finite; only a non-finite sum triggers the exact check);
- the output is written atomically: a failed merge leaves nothing at the target path.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergelab.checkpoints import CheckpointReader, CheckpointWriter, open_checkpoint
from mergelab.errors import CheckpointError, NonFiniteError, SpecError, TensorMismatchError
from mergelab.methods import Method, MethodParams, TensorInputs, get_method
from mergelab.ops import StreamingKthLargest, keep_count
from mergelab.provenance import environment, input_digest
from mergelab.spec import MergeSpec, load_spec, parse_spec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class MergeResult:
    out_dir: Path
    method: str
    tensors: int
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


def reuse_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS at once.

    Merging allocates and frees tensors of tens of MB per tensor; by default each such allocation is a
    fresh ``mmap`` whose pages fault in on first touch, which made element-wise work 3-4x slower than the
    arithmetic itself (measured in ``bench/merge_throughput.py``). Setting ``M_MMAP_MAX = 0`` and a large
    ``M_TRIM_THRESHOLD`` makes freed blocks reusable; peak RSS is unchanged (it is the peak either way).
    ``M_ARENA_MAX = 1`` makes the engine's reader thread allocate from that same (main) arena: in a
    per-thread arena, whose heaps are capped at 64 MiB, a tensor buffer could not be reused and faulted in
    afresh (reading the benchmark's inputs on a thread: 205k page faults and 1.5 s of system time, against
    none and 1.0 s). A no-op where glibc's ``mallopt`` is unavailable. Process-wide, so it is applied once,
    by the engine, before it starts its threads.
    """
    if getattr(reuse_freed_memory, "_done", False):
        return
    reuse_freed_memory._done = True  # type: ignore[attr-defined]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
        libc.mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _threads(device: torch.device) -> int | None:
    """torch intra-op threads during a merge on ``device``: ``$MERGELAB_MERGE_THREADS`` if set, else 1 on
    the CPU (unchanged on a GPU).

    Methods work on cache-sized blocks, where splitting a kernel over threads costs more than it saves
    (blocked task arithmetic on a 65M-entry tensor: 0.39 s on one thread, 0.60 s on two), and the reader
    and writer threads need the other core: with torch's default of one thread per core, their OpenMP
    workers spun while waiting and a task-arithmetic merge of the benchmark took 76 CPU-s instead of 8.
    """
    value = os.environ.get("MERGELAB_MERGE_THREADS")
    if value:
        return int(value)
    return 1 if device.type == "cpu" else None


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecError("device: 'cuda' was requested but no CUDA device is available (use cpu or auto)")
    return torch.device(device)


def _is_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite, cheaply: a finite sum proves it (a non-finite sum may come from
    overflow, so only then is the exact count needed)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if torch.isfinite(tensor.sum()):
        return True
    return bool(torch.isfinite(tensor).all())


def _check_finite(tensor: torch.Tensor, where: str, name: str) -> None:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if torch.isfinite(tensor.sum()):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        n_nan = int(torch.isnan(tensor).sum())
        raise NonFiniteError(
            f"{where}: tensor '{name}' holds {bad} non-finite value(s) ({n_nan} NaN, {bad - n_nan} Inf); "
            "refusing to merge"
        )


class _Inputs:
    """The opened checkpoints of one merge, validated against each other from their headers."""

    def __init__(self, spec: MergeSpec, method: Method) -> None:
        self.readers: list[CheckpointReader] = []
        self.warnings: list[str] = []
        try:
            self.base = open_checkpoint(spec.base) if spec.base is not None else None
            if self.base is not None:
                self.readers.append(self.base)
            self.experts = []
            for entry in spec.models:
                reader = open_checkpoint(entry.path)
                self.readers.append(reader)
                self.experts.append(reader)
            self.reference = self.base if self.base is not None else self.experts[0]
            self.names = self.reference.keys()
            self._validate(method)
        except BaseException:
            self.close()
            raise

    def _validate(self, method: Method) -> None:
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
                    parts.append(f"missing {len(missing)} tensor(s) present in {ref.path}: {_few(missing)}")
                if extra:
                    parts.append(f"has {len(extra)} tensor(s) not in {ref.path}: {_few(extra)}")
                raise TensorMismatchError(f"{reader.path}: " + "; ".join(parts))
        mixed: set[str] = set()
        for name in self.names:
            info = ref.info(name)
            for reader in self.readers:
                if reader is ref:
                    continue
                other = reader.info(name)
                if tuple(other.shape) != tuple(info.shape):
                    raise TensorMismatchError(
                        f"{other.file}: tensor '{name}' has shape {tuple(other.shape)} but {info.file} has "
                        f"{tuple(info.shape)}"
                    )
                if other.dtype.is_floating_point != info.dtype.is_floating_point:
                    raise TensorMismatchError(
                        f"{other.file}: tensor '{name}' is {other.dtype} but {info.file} has {info.dtype}; "
                        "floating and integer tensors cannot be merged"
                    )
                if other.dtype != info.dtype:
                    mixed.add(f"{name} ({info.dtype} vs {other.dtype} in {other.file})")
        if mixed:
            msg = (
                f"inputs store {len(mixed)} tensor(s) in different floating dtypes, e.g. {_few(sorted(mixed), 2)}; "
                "they are merged in float32 (float64 if an input is float64) and written in the output dtype"
            )
            log.warning(msg)
            self.warnings.append(msg)

    def read(self, name: str, check: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Tensor ``name`` of the base (None without one) and of every expert, on the CPU; with ``check``,
        a NaN/Inf in any of them is a :class:`NonFiniteError` naming its file. Thread-safe (``pread``)."""

        def get(reader: CheckpointReader) -> torch.Tensor:
            tensor = reader.get(name)
            if check:
                _check_finite(tensor, str(reader.info(name).file), name)
            return tensor

        base = get(self.base) if self.base is not None else None
        return base, [get(r) for r in self.experts]

    def check(self, name: str, base: torch.Tensor | None, experts: Sequence[torch.Tensor]) -> None:
        """Raise :class:`NonFiniteError` naming the file if ``base`` or an expert's ``name`` is not finite."""
        if base is not None:
            _check_finite(base, str(self.base.info(name).file), name)  # type: ignore[union-attr]
        for reader, tensor in zip(self.experts, experts):
            _check_finite(tensor, str(reader.info(name).file), name)

    def load(self, name: str, device: torch.device) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        base, experts = self.read(name)
        return _to_device(base, device), [_to_device(e, device) for e in experts]  # type: ignore[misc]

    def close(self) -> None:
        for reader in self.readers:
            with contextlib.suppress(Exception):
                reader.close()


def _to_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if tensor is None or device.type == "cpu":
        return tensor
    return tensor.to(device, non_blocking=True)


# Bytes that may wait in each pipeline queue beyond the one tensor always allowed: the inputs read ahead
# and the outputs waiting to be written. Small tensors then queue several deep, so a stall of one stage
# (a write blocked by the disk, a read by another process) does not stop the others at once.
PIPELINE_BYTES = 256 * 1024**2


def _prefetched(
    io: ThreadPoolExecutor, inputs: _Inputs, names: Sequence[str], check: bool
) -> Iterator[tuple[str, torch.Tensor | None, list[torch.Tensor]]]:
    """Yield ``(name, base, experts)`` for each name in order, reading ahead on the I/O thread ``io`` while
    the caller works on the current one: the next tensor always, further ones while the tensors read
    ahead hold at most ``PIPELINE_BYTES``, so memory stays bounded by two tensors' inputs plus that."""
    pending: collections.deque[tuple[Future, int]] = collections.deque()
    queued = 0
    ahead = 0  # next index to submit

    def input_bytes(name: str) -> int:
        return sum(_nbytes(r.info(name).shape, r.info(name).dtype) for r in inputs.readers)

    for name in names:
        # keep the next tensor in flight, and more while they fit the budget
        while ahead < len(names) and (not pending or queued + input_bytes(names[ahead]) <= PIPELINE_BYTES):
            size = input_bytes(names[ahead])
            pending.append((io.submit(inputs.read, names[ahead], check), size))
            queued += size
            ahead += 1
        future, size = pending.popleft()
        queued -= size
        base, experts = future.result()
        if ahead < len(names) and not pending:  # the next read starts before the caller works on this one
            size = input_bytes(names[ahead])
            pending.append((io.submit(inputs.read, names[ahead], check), size))
            queued += size
            ahead += 1
        yield name, base, experts


@contextlib.contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """Run torch kernels on ``n`` threads inside the block (restored afterwards); ``None`` leaves it."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) if not i.endswith(")") else i for i in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


class _ParamResolver:
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


def _check_models(spec: MergeSpec, method: Method) -> None:
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


def _compute_dtype(base: torch.Tensor | None, experts: Sequence[torch.Tensor]) -> torch.dtype:
    tensors = ([base] if base is not None else []) + list(experts)
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _global_thresholds(
    inputs: _Inputs, method: Method, params_of: _ParamResolver, device: torch.device, progress: bool,
    reader: ThreadPoolExecutor | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Whole-model trim thresholds: for each group of tensors sharing a density, each expert's k-th largest
    |tau| over the group (k = floor(density * group size)), by two streaming passes; and for each tensor
    how many entries tied at the threshold it keeps, so that exactly k entries survive per expert.
    Tensors are read ahead on ``reader`` (a private thread when None)."""
    if reader is None:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-read") as own:
            return _global_thresholds(inputs, method, params_of, device, progress, own)
    groups: dict[float, list[str]] = defaultdict(list)
    for name in inputs.names:
        info = inputs.reference.info(name)
        if not info.dtype.is_floating_point or math.prod(info.shape) == 0:  # empty: nothing to trim
            continue
        density = method.global_trim_density(params_of(name))
        if density is not None:
            groups[density].append(name)
    if not groups:
        return {}, {}
    thresholds: dict[str, list[float]] = {}
    ties: dict[str, list[int]] = {}
    n_exp = len(inputs.experts)
    for density, names in groups.items():
        total = sum(math.prod(inputs.reference.info(n).shape) for n in names)
        selectors = [StreamingKthLargest(total, keep_count(total, density)) for _ in range(n_exp)]

        def stream(observe: str, desc: str, active: list[int]) -> None:
            items = _prefetched(reader, inputs, names, check=True)
            for name, base, experts in tqdm(items, total=len(names), desc=desc, unit="tensor",
                                            disable=not progress, leave=False):
                base, experts = _to_device(base, device), [_to_device(e, device) for e in experts]
                dtype = _compute_dtype(base, experts)
                b = base.to(dtype)
                for i in active:
                    getattr(selectors[i], observe)((experts[i].to(dtype) - b).abs_())

        everyone = list(range(n_exp))
        stream("observe_sample", f"global threshold (density {density}): sampling", everyone)
        pending = everyone
        values: list[float | None] = [None] * n_exp
        while pending:
            for i in pending:
                selectors[i].bracket()
            stream("observe_exact", f"global threshold (density {density}): selecting", pending)
            for i in pending:
                values[i] = selectors[i].result()
            pending = [i for i in pending if values[i] is None]
        quotas = [sel.tie_quotas() for sel in selectors]
        for j, name in enumerate(names):
            thresholds[name] = [float(v) for v in values]  # type: ignore[arg-type]
            ties[name] = [q[j] for q in quotas]
    return thresholds, ties


def _merge_tensors(
    inputs: _Inputs,
    plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    method: Method,
    params_of: _ParamResolver,
    weights: Sequence[float],
    thresholds: Mapping[str, list[float]],
    tie_quotas: Mapping[str, list[int]],
    device: torch.device,
    reader: ThreadPoolExecutor,
    writer: CheckpointWriter,
    bar: tqdm,
) -> None:
    """The streaming loop: three stages on three threads, one tensor apart.

    The ``reader`` thread reads tensor k+1 (``pread``, which releases the GIL) while this thread merges
    tensor k (torch kernels release it too) and a writer thread writes tensor k-1; one tensor may always
    wait at each stage, more while they fit ``PIPELINE_BYTES``, so memory is bounded by about three
    tensors' worth plus twice that budget. Inputs of a method whose
    output shows any NaN/Inf of its inputs (``method.propagates_nonfinite``) are checked through the
    output: only a non-finite output rescans them, to name the offending file.
    """
    check_inputs = not method.propagates_nonfinite
    items = _prefetched(reader, inputs, [name for name, _, _ in plan], check_inputs)
    writes: collections.deque[tuple[Future, int]] = collections.deque()  # oldest first
    waiting = 0  # bytes of the outputs in ``writes``
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-write") as writing:
        try:
            for (name, shape, dtype), (_, base, experts) in zip(plan, items):
                base = _to_device(base, device)
                experts = [_to_device(e, device) for e in experts]  # type: ignore[misc]
                if not dtype.is_floating_point:
                    merged = (base if base is not None else experts[0]).to(dtype)
                else:
                    tensor_inputs = TensorInputs(
                        name=name, base=base, experts=experts, weights=weights,
                        thresholds=thresholds.get(name), tie_quotas=tie_quotas.get(name),
                        compute_dtype=_compute_dtype(base, experts), out_dtype=dtype,
                    )
                    merged = method.merge(tensor_inputs, params_of(name)).to(dtype)
                    del tensor_inputs
                    if check_inputs or not _is_finite(merged):
                        if not check_inputs:
                            inputs.check(name, base, experts)  # names the input file if one is bad
                        _check_finite(merged, f"merge result ({method.name})", name)
                del base, experts
                size = _nbytes(shape, dtype)
                # one output always may wait to be written; more while they fit PIPELINE_BYTES
                while writes and waiting + size > PIPELINE_BYTES:
                    done, done_size = writes.popleft()
                    done.result()
                    waiting -= done_size
                writes.append((writing.submit(writer.write, name, merged.cpu()), size))
                waiting += size
                del merged
                bar.update(size)
        except BaseException:
            for pending, _ in writes:  # pending writes end before the writer may abort and delete
                with contextlib.suppress(BaseException):
                    pending.result()
            raise
        for pending, _ in writes:
            pending.result()


def _record(spec: MergeSpec, method: Method, params: MethodParams) -> dict[str, Any]:
    return {
        "method": method.name,
        "parameters": params.model_dump(by_alias=True),
        "overrides": [o.model_dump() for o in spec.overrides],
        "dtype": spec.dtype,
        "environment": environment(),
    }


def merge(
    spec: MergeSpec | Mapping[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    hash_inputs: bool = True,
) -> MergeResult:
    """Merge the checkpoints described by ``spec`` into a safetensors folder at ``out_dir``.

    ``spec`` is a :class:`~mergelab.spec.MergeSpec`, a mapping of the same shape, or the path of a YAML file.
    The output folder holds the (sharded) weights, the base model's config/tokenizer files, and
    ``mergelab_merge.json`` (method, resolved parameters, inputs with SHA-256 content hashes, versions).
    Raises :class:`~mergelab.errors.MergeLabError` subclasses on bad input; nothing is written then.
    """
    started = time.perf_counter()
    if isinstance(spec, (str, Path)):
        spec = load_spec(spec)
    else:
        spec = parse_spec(spec)
    from mergelab.methods import data_informed

    if spec.method in data_informed.registry():
        return data_informed.run_merge(spec, out_dir, overwrite=overwrite, progress=progress,
                                       hash_inputs=hash_inputs)
    if spec.data is not None:
        raise SpecError(f"data: method '{spec.method}' is data-free and takes no data section")
    method = get_method(spec.method)
    _check_models(spec, method)
    params_of = _ParamResolver(spec, method)
    device = _resolve_device(spec.device)
    out_dtype = _DTYPES.get(spec.dtype)
    reuse_freed_memory()

    inputs = _Inputs(spec, method)
    try:
        record = _record(spec, method, params_of.default)
        record["inputs"] = {
            "base": None if inputs.base is None else _describe(inputs.base, None, hash_inputs),
            "models": [
                _describe(r, m.weight, hash_inputs) for r, m in zip(inputs.experts, spec.models)
            ],
        }
        plan = []
        for name in inputs.names:
            info = inputs.reference.info(name)
            dtype = out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype
            plan.append((name, tuple(info.shape), dtype))

        weights = [m.weight for m in spec.models]
        total_bytes = sum(_nbytes(shape, dtype) for _, shape, dtype in plan)
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-read")
        try:
            with _intra_op_threads(_threads(device)):
                thresholds, tie_quotas = _global_thresholds(inputs, method, params_of, device, progress, reader)
                with CheckpointWriter(out_dir, plan, max_shard_bytes=spec.shard_size,
                                      overwrite=overwrite) as writer:
                    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"merge ({method.name})",
                               disable=not progress)
                    with bar:
                        _merge_tensors(inputs, plan, method, params_of, weights, thresholds, tie_quotas, device,
                                       reader, writer, bar)
                    seconds = time.perf_counter() - started
                    record["seconds"] = round(seconds, 3)
                    record["warnings"] = inputs.warnings
                    path = writer.finish(copy_files_from=inputs.reference.config_dir, record=record)
        finally:
            reader.shutdown(wait=True, cancel_futures=True)
    finally:
        inputs.close()
    log.info("merged %d tensors with %s into %s in %.1f s", len(plan), method.name, path, seconds)
    return MergeResult(out_dir=Path(path), method=method.name, tensors=len(plan), bytes_written=total_bytes,
                       seconds=seconds, warnings=inputs.warnings, record=record)


def _describe(reader: CheckpointReader, weight: float | None, hash_inputs: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": str(reader.path),
        "files": [
            {"path": str(f), "sha256": input_digest(f) if hash_inputs else None} for f in reader.files
        ],
    }
    if weight is not None:
        out["weight"] = weight
    return out


def _describe_path(path: Path, weight: float | None, hash_inputs: bool) -> dict[str, Any]:
    """Like :func:`_describe` for a checkpoint given by path (opened only to list its data files)."""
    with open_checkpoint(path) as reader:
        return _describe(reader, weight, hash_inputs)


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
    out_dtype = _DTYPES.get(dtype)
    tensors = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if out_dtype is not None and t.is_floating_point():
            t = t.to(out_dtype)
        _check_finite(t, f"merge result ({record.get('method', '?')})", name)
        tensors[name] = t.contiguous()
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with CheckpointWriter(out_dir, plan, max_shard_bytes=shard_size, overwrite=overwrite) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
        return writer.finish(copy_files_from=copy_files_from, record=dict(record))


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n
