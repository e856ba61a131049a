"""The torch back-end: checkpoints -> task vectors -> operators -> merged tensors -> writer.

It runs every data-free method of the catalog, on the CPU or a GPU, with the block kernel it registers
for it (:data:`mergelab.merging.torch_kernels.KERNELS`: every catalog method today); a method added to the
catalog without a kernel runs as its reference composition of operators on whole tensors
(:mod:`mergelab.methods.catalog`). :func:`mergelab.merging.merge` prefers the numpy back-end
(:mod:`mergelab.merging.numpy_backend`, no torch import) where that one has the kernel.

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
blocks are independent (all but DARE, whose masks are drawn in order: its experts run in parallel
instead) split a tensor's blocks over ``mergelab.merging.pipeline.compute_workers()`` threads themselves.

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

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergelab.checkpoints import CheckpointReader, CheckpointWriter
from mergelab.errors import NonFiniteError, SpecError
from mergelab.merging.pipeline import PIPELINE_BYTES, nbytes, read_ahead, stream_tensors
from mergelab.merging.plan import (
    MergeInputs,
    ParamResolver,
    check_models,
    global_trim_groups,
    nonfinite_message,
    output_plan,
    refuse_input_overlap,
)
from mergelab.merging.publish import MergeResult, merge_record, write_merge
from mergelab.merging.torch_kernels import KERNELS, PER_MODEL_KERNELS, Kernel
from mergelab.methods import METHODS, Method, TensorInputs, get_method
from mergelab.ops import StreamingKthLargest, keep_count
from mergelab.runtime import freeze_imported_objects, reuse_freed_memory
from mergelab.spec import MergeSpec

log = logging.getLogger(__name__)



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


def resolve_device(device: str) -> torch.device:
    """The torch device of a spec's ``device`` (``auto``: cuda when available); a SpecError for an absent cuda."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecError("device: 'cuda' was requested but no CUDA device is available (use cpu or auto)")
    return torch.device(device)


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite, cheaply: a finite sum proves it (a non-finite sum may come from
    overflow, so only then is the exact count needed)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if torch.isfinite(tensor.sum()):
        return True
    return bool(torch.isfinite(tensor).all())


def check_finite(tensor: torch.Tensor, where: str, name: str) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` and ``name`` if ``tensor`` holds a NaN or Inf."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if torch.isfinite(tensor.sum()):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise NonFiniteError(nonfinite_message(where, name, bad, int(torch.isnan(tensor).sum())))


class TorchInputs(MergeInputs):
    """The opened, validated checkpoints of one merge (:class:`~mergelab.merging.plan.MergeInputs`), read
    as torch tensors."""

    def read(self, name: str, check: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Tensor ``name`` of the base (None without one) and of every expert, on the CPU; with ``check``,
        a NaN/Inf in any of them is a :class:`NonFiniteError` naming its file. Thread-safe (``pread``)."""

        def get(reader: CheckpointReader) -> torch.Tensor:
            tensor = reader.get(name)
            if check:
                check_finite(tensor, str(reader.info(name).file), name)
            return tensor

        base_reader, experts, _ = self.sources(name)
        base = get(base_reader) if base_reader is not None else None
        return base, [get(r) for r in experts]

    def check(self, name: str, base: torch.Tensor | None, experts: Sequence[torch.Tensor]) -> None:
        """Raise :class:`NonFiniteError` naming the file if ``base`` or an expert's ``name`` is not finite."""
        base_reader, readers, _ = self.sources(name)
        if base is not None:
            check_finite(base, str(base_reader.info(name).file), name)
        for reader, tensor in zip(readers, experts):
            check_finite(tensor, str(reader.info(name).file), name)

    def load(self, name: str, device: torch.device) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        base, experts = self.read(name)
        return _to_device(base, device), [_to_device(e, device) for e in experts]  # type: ignore[misc]


def _to_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if tensor is None or device.type == "cpu":
        return tensor
    return tensor.to(device, non_blocking=True)


def _prefetched(
    io: ThreadPoolExecutor, inputs: TorchInputs, names: Sequence[str], check: bool
) -> Iterator[tuple[str, torch.Tensor | None, list[torch.Tensor]]]:
    """Yield ``(name, base, experts)`` for each name in order, read ahead on the I/O thread ``io``
    (:func:`~mergelab.merging.pipeline.read_ahead`, at most ``PIPELINE_BYTES`` beyond the next tensor)."""

    def input_bytes(name: str) -> int:
        return sum(nbytes(r.info(name).shape, r.info(name).dtype) for r in inputs.readers_of(name))

    for name, (base, experts) in read_ahead(io, names, lambda n: inputs.read(n, check), input_bytes,
                                            PIPELINE_BYTES):
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


def compute_dtype(base: torch.Tensor | None, experts: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32: the dtype methods compute in."""
    tensors = ([base] if base is not None else []) + list(experts)
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def global_thresholds(
    inputs: TorchInputs, method: Method, params_of: ParamResolver, device: torch.device, progress: bool,
    reader: ThreadPoolExecutor | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Whole-model trim thresholds: for each group of tensors sharing a density, each expert's k-th largest
    |tau| over the group (k = floor(density * group size)), by two streaming passes; and for each tensor
    how many entries tied at the threshold it keeps, so that exactly k entries survive per expert.
    Tensors are read ahead on ``reader`` (a private thread when None)."""
    if reader is None:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-read") as own:
            return global_thresholds(inputs, method, params_of, device, progress, own)
    groups = global_trim_groups(inputs, method, params_of)
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
                dtype = compute_dtype(base, experts)
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
    inputs: TorchInputs,
    plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    method: Method,
    params_of: ParamResolver,
    thresholds: Mapping[str, list[float]],
    tie_quotas: Mapping[str, list[int]],
    device: torch.device,
    reader: ThreadPoolExecutor,
    writer: CheckpointWriter,
    bar: tqdm,
) -> None:
    """The torch back-end's part of the streaming loop (:func:`mergelab.merging.pipeline.stream_tensors`):
    read a tensor's inputs as torch tensors (on the ``reader`` thread, ahead), merge them with the method's
    kernel on ``device``, hand the output back on the CPU. Inputs of a method whose output shows any NaN/Inf
    of its inputs (``method.propagates_nonfinite``) are checked through the output: only a non-finite
    output rescans them, to name the offending file.
    """
    check_inputs = not method.propagates_nonfinite
    out_dtypes = {name: (shape, dtype) for name, shape, dtype in plan}

    def compute(name: str, read: tuple[torch.Tensor | None, list[torch.Tensor]]) -> tuple[torch.Tensor, int]:
        shape, dtype = out_dtypes[name]
        base = _to_device(read[0], device)
        experts = [_to_device(e, device) for e in read[1]]  # type: ignore[misc]
        if not dtype.is_floating_point:
            merged = (base if base is not None else experts[0]).to(dtype)
        else:
            model_params = inputs.pick(name, params_of.model_params(name))  # of this tensor's models
            tensor_inputs = TensorInputs(
                name=name, base=base, experts=experts, weights=inputs.pick(name, params_of.weights(name)),
                thresholds=thresholds.get(name), tie_quotas=tie_quotas.get(name),
                compute_dtype=compute_dtype(base, experts), out_dtype=dtype, model_params=model_params,
            )
            # per-model values run the reference unless the kernel reads them (PER_MODEL_KERNELS)
            run = kernel(method) if model_params is None or method.name in PER_MODEL_KERNELS else method.reference
            merged = run(tensor_inputs, params_of(name)).to(dtype)
            del tensor_inputs
            if check_inputs or not is_finite(merged):
                if not check_inputs:
                    inputs.check(name, base, experts)  # names the input file if one is bad
                check_finite(merged, f"merge result ({method.name})", name)
        return merged.cpu(), nbytes(shape, dtype)

    def input_bytes(name: str) -> int:
        return sum(nbytes(r.info(name).shape, r.info(name).dtype) for r in inputs.readers_of(name))

    stream_tensors([name for name, _, _ in plan], compute, writer, bar,
                   read=lambda n: inputs.read(n, check_inputs), input_bytes=input_bytes, io=reader)


def kernel(method: Method | str) -> Kernel:
    """The function this back-end merges one tensor of ``method`` with: its block kernel if it registers
    one (:data:`~mergelab.merging.torch_kernels.KERNELS`), else the method's reference composition."""
    method = get_method(method) if isinstance(method, str) else method
    return KERNELS.get(method.name, method.reference)


class TorchBackend:
    """The torch back-end (:class:`mergelab.merging.backend.Backend`): every catalog method, any device,
    any checkpoint format torch reads."""

    name = "torch"

    @property
    def methods(self) -> frozenset[str]:
        """Every method with a kernel or a reference (all of the catalog)."""
        return frozenset(KERNELS) | frozenset(METHODS)

    def unsupported(self, spec: MergeSpec) -> str | None:
        if spec.method not in self.methods:
            return f"it has no kernel for {spec.method}"
        return None

    def run(self, spec: MergeSpec, out_dir: str | Path, *, overwrite: bool, progress: bool, hash_inputs: bool,
            started: float) -> MergeResult:
        return merge_streaming(spec, out_dir, overwrite=overwrite, progress=progress, hash_inputs=hash_inputs,
                               started=started)


BACKEND = TorchBackend()


def merge_streaming(
    spec: MergeSpec, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
    hash_inputs: bool = True, started: float | None = None,
) -> MergeResult:
    """The torch engine: merge the data-free ``spec`` into a safetensors folder at ``out_dir``, streaming
    tensor by tensor on three threads (see the module docstring). :func:`mergelab.merging.merge` chooses
    the back-end; call that. ``started`` is when the caller's clock started."""
    started = time.perf_counter() if started is None else started
    refuse_input_overlap(spec, out_dir)
    method = get_method(spec.method)
    check_models(spec, method)
    params_of = ParamResolver(spec, method)
    device = resolve_device(spec.device)
    reuse_freed_memory()
    freeze_imported_objects()

    inputs = TorchInputs.open(spec)
    try:
        record = merge_record(spec, method, params_of.default, inputs, hash_inputs)
        plan = [(name, shape, dtype.to_torch()) for name, shape, dtype in output_plan(inputs, spec.dtype)]
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-read")
        try:
            with _intra_op_threads(_threads(device)):
                thresholds, tie_quotas = global_thresholds(inputs, method, params_of, device, progress, reader)
                return write_merge(
                    spec, method, inputs, record, plan, out_dir,
                    lambda writer, bar: _merge_tensors(inputs, plan, method, params_of, thresholds,
                                                       tie_quotas, device, reader, writer, bar),
                    engine="torch", overwrite=overwrite, progress=progress, started=started,
                )
        finally:
            reader.shutdown(wait=True, cancel_futures=True)
    finally:
        inputs.close()
