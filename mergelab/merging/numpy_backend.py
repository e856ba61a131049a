"""The numpy back-end: task arithmetic, weight averaging, passthrough, NearSwap, RAM, TIES and the Gram-matrix
methods (model stock, SLERP, NuSLERP, Multi-SLERP, Karcher) on the CPU, without torch.

The linear methods are the common merge, and on the CPU they are bound by memory and I/O, not by
arithmetic: the torch back-end spent as long importing torch (1.5 s here) as computing. This back-end
computes the same formulas with numpy (``ml_dtypes`` supplies bfloat16) and never imports torch; which
methods it runs is the keys of :data:`KERNELS` (TIES: :mod:`mergelab.merging.numpy_kernels`). Its merge of the
benchmark's four 1.3 GB experts is measured in ``bench/merge_throughput.py``.

Per tensor, in the reference's storage order, the entries are split into blocks of ``BLOCK`` entries
and the blocks over the cores (:func:`mergelab.merging.pipeline.run_blocks`). For each block every input's
bytes are read with ``pread`` straight into a small per-thread buffer, so they arrive in the cache and
are converted to the compute dtype there, instead of being copied into a tensor-sized buffer first and read
back from memory. The rounded block goes into the output tensor, which a write-behind thread hands to the
:class:`~mergelab.checkpoints.CheckpointWriter` while the next tensor is computed (at most
``PIPELINE_BYTES`` of outputs wait). Memory: the outputs in flight plus a few MiB of block buffers per
thread, whatever the number of experts.

Arithmetic, entry by entry in the compute dtype (float32; float64 if an input is float64), one rounding
to the output dtype at the end (round to nearest even, as torch):

- task arithmetic: ``s = sum_i w_i (theta_i - theta_0)`` in model order, ``theta = lambda * s + theta_0``
  (the ``lambda`` multiply is skipped at 1, exactly);
- weight averaging: ``d = sum_i w_i (theta_i - theta_1)``, ``theta = d / sum_i w_i + theta_1``;
- passthrough, NearSwap and RAM: their catalog references' operations, entry by entry (bit-identical at any weights:
  they take none);
- the Gram-matrix methods: two passes over the blocks, the first for the Gram partials (the one rule of
  :mod:`mergelab.ops.gram_matrix`, summed in block order), the second for the combination with the coefficients
  computed from them, in the torch kernels' operations and order (bit-identical at any weights: each product is
  rounded before it is added, on both engines).

These are the torch engine's operations in the torch engine's order, so with unit weights the outputs
are bit-identical; torch computes ``acc + w * tau`` with one rounding where numpy rounds ``w * tau``
first, so other weights may differ in the last bit of an intermediate.

The rules of every merge (:mod:`mergelab.merging.torch_backend`) hold here too: inputs validated from their headers
before any data is read (:class:`~mergelab.merging.plan.MergeInputs`), integer tensors copied from the
reference, NaN/Inf refused naming the file and tensor (through the output, as both methods propagate
non-finite values: a non-finite output block triggers a rescan of that tensor's inputs), atomic output.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mergelab.checkpoints import CheckpointReader, CheckpointWriter
from mergelab.checkpoints.safetensors_format import StorageDtype
from mergelab.errors import NonFiniteError
from mergelab.merging.numpy_arrays import compute_dtype, exponent_scratch, numpy_dtype
from mergelab.merging.numpy_kernels import (
    BUFFERS,
    GRAM_KERNELS,
    BlockSelection,
    GramKernel,
    TiesKernel,
    count_blocks,
    nearswap_block,
    passthrough_block,
    ram_block,
    sample_magnitudes,
    select_global,
    task_arithmetic_block,
    tensor_trims,
    trim_at,
    trim_l1_factors,
    weight_average_block,
)
from mergelab.merging.pipeline import PIPELINE_BYTES, nbytes, read_ahead, run_blocks, stream_tensors
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
from mergelab.methods import get_method
from mergelab.ops import selection
from mergelab.ops.gram_matrix import gram_from_partials
from mergelab.ops.selection import keep_count
from mergelab.runtime import freeze_imported_objects, reuse_freed_memory
from mergelab.spec import MergeSpec

log = logging.getLogger(__name__)

#: Floating storage dtypes it reads and writes (float8 inputs go to the torch engine).
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
#: Entries per block: 1 MiB of float32 per buffer (measured on the benchmark: 2**16 and 2**18 within 5%,
#: 2**14 1.6x slower from the per-call overhead).
BLOCK = 1 << 18


def unsupported(spec: MergeSpec) -> str | None:
    """Why this engine cannot run ``spec`` (method, device, input format or dtype), or None if it can.

    Opens the inputs' headers to look at their formats and dtypes; errors in the inputs themselves are
    raised as they would be by the merge."""
    if spec.method not in KERNELS:
        names = list(KERNELS)
        return f"it computes {', '.join(names[:-1])} and {names[-1]}, not {spec.method}"
    if spec.device != "cpu":
        return f"it runs on the CPU (device: cpu), the spec asks for device: {spec.device}"
    params_of = ParamResolver(spec, get_method(spec.method))
    if params_of.varies_by_model:
        return "it takes one weight per model and no per-model parameters (the spec sets them per tensor)"
    for params in [params_of.default, *(p for _, p in params_of.rules)]:
        if getattr(params, "sign_test", "tau") != "tau" or getattr(params, "disjoint_divisor", None) == "none":
            return "its TIES kernel tests the sign of tau_i and divides (sign_test: tau, disjoint_divisor count/weight)"
        if getattr(params, "filter_wise", False) or not getattr(params, "flatten", True):
            return "its Gram-matrix kernels take one angle per tensor (filter_wise: false, flatten: true)"
    if spec.base is None and get_method(spec.method).needs_base:
        return None  # the merge itself reports the missing base
    with MergeInputs.open(spec) as inputs:
        for reader in inputs.readers:
            if not reader.is_safetensors:
                return f"{reader.path} is not a safetensors checkpoint"
        for name in inputs.names:
            for reader in inputs.readers_of(name):
                storage = reader.info(name).storage
                if storage.is_floating_point and storage.code not in FLOAT_CODES:
                    return f"tensor '{name}' of {reader.info(name).file} is stored as {storage}"
    return None


def merge_numpy(
    spec: MergeSpec, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
    hash_inputs: bool = True, started: float | None = None,
) -> MergeResult:
    """Merge the task-arithmetic or weight-averaging ``spec`` into ``out_dir`` (call
    :func:`mergelab.merging.merge`, which checks :func:`unsupported` first). ``started``: the caller's clock."""
    started = time.perf_counter() if started is None else started
    refuse_input_overlap(spec, out_dir)
    method = get_method(spec.method)
    check_models(spec, method)
    params_of = ParamResolver(spec, method)
    reuse_freed_memory()
    freeze_imported_objects()
    with MergeInputs.open(spec) as inputs:
        record = merge_record(spec, method, params_of.default, inputs, hash_inputs)
        plan = output_plan(inputs, spec.dtype)
        weights = [m.weight for m in spec.models]
        kernel = KERNELS[method.name]
        if kernel is None:  # TIES: whole tensors read ahead (its selection samples them at random positions)
            def stream(writer: CheckpointWriter, bar: Any) -> None:
                _stream_ties(inputs, plan, params_of, weights, writer, bar, progress)
        else:
            def stream(writer: CheckpointWriter, bar: Any) -> None:
                _stream(inputs, plan, method.name, kernel, params_of, weights, writer, bar)
        return write_merge(spec, method, inputs, record, plan, out_dir, stream, engine="numpy",
                           overwrite=overwrite, progress=progress, started=started)


def _stream(
    inputs: MergeInputs,
    plan: Sequence[tuple[str, tuple[int, ...], StorageDtype]],
    method: str,
    kernel: Callable[..., bool] | GramKernel,
    params_of: ParamResolver,
    weights: Sequence[float],
    writer: CheckpointWriter,
    bar: Any,
) -> None:
    """The linear and Gram-matrix methods' part of the streaming loop (:func:`mergelab.merging.pipeline.stream_tensors`,
    no read-ahead: the kernel reads each block's bytes straight from the files): each tensor on all cores."""
    needs_base = get_method(method).needs_base
    out_plan = {name: (shape, storage) for name, shape, storage in plan}

    def compute(name: str, _: None) -> tuple[Any, int]:
        shape, storage = out_plan[name]
        base, experts, _ = inputs.sources(name)  # this tensor's inputs (a layer slice's when stacking)
        if storage.is_floating_point and isinstance(kernel, GramKernel):
            out = _gram_tensor(name, shape, storage, base, experts, method, kernel, params_of(name),
                               inputs.pick(name, weights))
        elif storage.is_floating_point:
            # task arithmetic reads theta_0 and the experts; weight averaging only the experts
            readers = ([base] if needs_base else []) + list(experts)
            out = _merge_tensor(name, shape, storage, readers, method, kernel, params_of(name),
                                inputs.pick(name, weights))
        else:  # integer and bool tensors are copied from the reference (never averaged)
            out = _read_whole(inputs.readers_of(name)[0], name)
        return out, out.nbytes

    stream_tensors([name for name, _, _ in plan], compute, writer, bar)


def _stream_ties(
    inputs: MergeInputs,
    plan: Sequence[tuple[str, tuple[int, ...], StorageDtype]],
    params_of: ParamResolver,
    weights: Sequence[float],
    writer: CheckpointWriter,
    bar: Any,
    progress: bool,
) -> None:
    """TIES's part of the streaming loop (:func:`mergelab.merging.pipeline.stream_tensors`): an I/O thread
    reads the next tensors' inputs whole (the selection samples them at random positions and both passes
    read them) while all cores merge the current one (:mod:`mergelab.merging.numpy_kernels`), and a
    write-behind thread writes the previous ones. Tensors trimmed with ``trim_scope: global`` get their
    whole-model thresholds first, from two more streaming passes."""
    io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-read")
    loaders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mergelab-load")
    out_plan = {name: (shape, storage) for name, shape, storage in plan}

    def read(name: str) -> list[Any]:  # the inputs on both loader threads (the start waits for the first)
        futures = [loaders.submit(_read_whole, r, name) for r in inputs.readers_of(name)]
        return [f.result().reshape(-1) for f in futures]

    def size(name: str) -> int:
        return sum(nbytes(r.info(name).shape, r.info(name).storage) for r in inputs.readers_of(name))

    try:
        global_trims = _global_selections(inputs, params_of, read, size, io, progress)

        def compute(name: str, arrays: list[Any]) -> tuple[Any, int]:
            shape, storage = out_plan[name]
            if storage.is_floating_point:
                out = _ties_tensor(name, storage, arrays, params_of(name), inputs.pick(name, weights),
                                   inputs.readers_of(name), global_trims.pop(name, None))
            else:  # integer and bool tensors are copied from the base (never averaged)
                out = arrays[0]
            out = out.reshape(shape)
            return out, out.nbytes

        stream_tensors([name for name, _, _ in plan], compute, writer, bar, read=read, input_bytes=size, io=io)
    finally:
        io.shutdown(wait=True, cancel_futures=True)
        loaders.shutdown(wait=True, cancel_futures=True)


def _ties_tensor(name: str, storage: StorageDtype, arrays: Sequence[Any], params: Any,
                 weights: Sequence[float], readers: Sequence[CheckpointReader],
                 global_trim: tuple[list[BlockSelection], list[int]] | None) -> Any:
    """One tensor of TIES from its inputs (flat, stored dtypes; ``arrays[0]`` the base); ``global_trim``:
    this tensor's counts against the whole-model thresholds and its tie quotas (``trim_scope: global``)."""
    base, experts = arrays[0], arrays[1:]
    compute = compute_dtype(a.dtype for a in arrays)
    out = np.empty(base.size, dtype=numpy_dtype(storage))
    if base.size == 0:
        return out
    with np.errstate(all="ignore"):  # non-finite inputs reach the output, which is checked
        if params.density >= 1.0:
            trims = None
        elif global_trim is not None:
            selections, quotas = global_trim
            trims = [trim_at(s, q, base, e, compute) for s, q, e in zip(selections, quotas, experts)]
        else:
            trims = tensor_trims(base, experts, params.density, compute)
    # with unit weights the sum of the agreeing weights is the agreeing count, exactly: count in bytes
    divisor = "count" if all(w == 1.0 for w in weights) else params.disjoint_divisor
    factors = None
    if trims is not None and params.rescale == "l1":
        with np.errstate(all="ignore"):
            factors = trim_l1_factors(base, experts, trims, compute)
    kernel = TiesKernel(tuple(weights), params.sign_election, divisor, params.lambda_, params.zero_sign)
    kernel.merge(base, experts, trims, out, compute, lambda: _explain_nonfinite(name, readers, out, "ties"),
                 factors)
    return out


#: Sample size of a whole-model selection, spread over the tensors by size (the torch engine's too).
GLOBAL_SAMPLE = 1 << 16


def _global_selections(
    inputs: MergeInputs, params_of: ParamResolver, read: Callable[[str], list[Any]], size: Callable[[str], int],
    io: ThreadPoolExecutor, progress: bool,
) -> dict[str, tuple[list[BlockSelection], list[int]]]:
    """Whole-model trims (``trim_scope: global``, the TIES paper's): for each group of tensors sharing a
    density, each expert's k-th largest ``|tau_i|`` over the group (k = floor(density * group size)), by
    two streaming passes: a sample spread over the tensors by size gives a bracket, then every tensor's
    blocks are counted against it (as :func:`mergelab.merging.numpy_kernels.tensor_trims` does within a tensor; a
    bracket that misses, with probability ~1e-6, is widened and counted again). The entries tied at the
    threshold are kept first come in model order, so exactly k survive per expert. Returns, per tensor,
    its counts (reduced to its blocks' tie counts) and how many tied entries it keeps per expert."""
    groups = global_trim_groups(inputs, get_method("ties"), params_of)
    n_experts = len(inputs.experts)
    result: dict[str, tuple[list[BlockSelection], list[int]]] = {}
    for density, names in groups.items():
        sizes = {name: math.prod(inputs.reference.info(name).shape) for name in names}
        total = sum(sizes.values())
        k = keep_count(total, density)

        def stream(desc: str) -> Any:
            return tqdm(read_ahead(io, names, read, size, PIPELINE_BYTES), total=len(names), unit="tensor",
                        desc=f"global threshold (density {density:g}): {desc}", disable=not progress, leave=False)

        rng = np.random.default_rng(0)
        samples: list[list[Any]] = [[] for _ in range(n_experts)]
        for name, arrays in stream("sampling"):
            m = max(1, round(GLOBAL_SAMPLE * sizes[name] / total))
            with np.errstate(all="ignore"):
                for i, x in enumerate(sample_magnitudes(arrays[0], arrays[1:], m, rng,
                                                                compute_dtype(a.dtype for a in arrays))):
                    samples[i].append(x)
        ordered = [np.sort(np.concatenate(x)) for x in samples]
        selections: dict[str, list[Any]] = {name: [None] * n_experts for name in names}
        found: list[tuple[float, int] | None] = [None] * n_experts
        pending, attempt = list(range(n_experts)), 0
        while pending:  # a bracket that missed is widened (selection.retry_width) and counted again
            width = selection.retry_width(attempt)
            brackets = [selection.bracket_values(ordered[i], (total - k) / total, width) for i in pending]
            for name, arrays in stream("selecting"):
                with np.errstate(all="ignore"):
                    counted = count_blocks(arrays[0], [arrays[1 + i] for i in pending], brackets,
                                           compute_dtype(a.dtype for a in arrays))
                for i, counts in zip(pending, counted):
                    selections[name][i] = counts
            for i in pending:
                found[i] = select_global([selections[name][i] for name in names], k)
            pending = [i for i in pending if found[i] is None]
            attempt += 1
        quotas: dict[str, list[int]] = {name: [0] * n_experts for name in names}
        for i, (_, above) in enumerate(found):  # type: ignore[misc]
            split = selection.split_ties(k - above, [selections[name][i].ties() for name in names])
            for name, take in zip(names, split):
                quotas[name][i] = take
                selections[name][i].settle()
        for name in names:
            result[name] = (selections[name], quotas[name])
    return result


def _read_whole(reader: CheckpointReader, name: str) -> Any:
    info = reader.info(name)
    raw = np.empty(nbytes(info.shape, info.storage), dtype=np.uint8)
    if raw.size:
        reader.read_range(name, 0, memoryview(raw))
    return raw.view(numpy_dtype(info.storage)).reshape(info.shape)


def _for_blocks(name: str, readers: Sequence[CheckpointReader], n: int, buffers: Callable[[int], Any],
                body: Callable[[int, int, int, list[Any], Any], None]) -> None:
    """``body(j, start, stop, xs, bufs)`` for every block ``j`` of ``BLOCK`` entries of tensor ``name``, on all
    cores: ``xs`` each reader's block as stored, read with ``pread`` straight into a per-thread buffer (so it
    arrives in the cache), ``bufs = buffers(block size)`` made once per thread."""
    in_dtypes = [numpy_dtype(r.info(name).storage) for r in readers]
    widest = max(d.itemsize for d in in_dtypes)

    def work(indices: Iterator[int]) -> None:
        raws = [np.empty(min(n, BLOCK) * widest, dtype=np.uint8) for _ in readers]
        bufs = buffers(min(n, BLOCK))
        for j in indices:
            start, stop = j * BLOCK, min(n, (j + 1) * BLOCK)
            m = stop - start
            xs = []
            for reader, raw, dtype in zip(readers, raws, in_dtypes):
                chunk = raw[: m * dtype.itemsize]
                reader.read_range(name, start * dtype.itemsize, memoryview(chunk))
                xs.append(chunk.view(dtype))
            body(j, start, stop, xs, bufs)

    run_blocks(-(-n // BLOCK), work)


def _merge_tensor(
    name: str, shape: tuple[int, ...], storage: StorageDtype, readers: Sequence[CheckpointReader],
    method: str, kernel: Callable[..., bool], params: Any, weights: Sequence[float],
) -> Any:
    compute = compute_dtype(numpy_dtype(r.info(name).storage) for r in readers)
    out_dtype = numpy_dtype(storage)
    n = math.prod(shape)
    out = np.empty(n, dtype=out_dtype)
    nonfinite: list[int] = []

    def buffers(size: int) -> tuple[list[Any], Any]:
        return [np.empty(size, dtype=compute) for _ in range(BUFFERS.get(method, 3))], exponent_scratch(out_dtype, size)

    def body(j: int, start: int, stop: int, xs: list[Any], bufs: tuple[list[Any], Any]) -> None:
        m = stop - start
        with np.errstate(all="ignore"):  # NaN/Inf are found here and reported with file and tensor below
            if kernel(xs, [b[:m] for b in bufs[0]], out[start:stop], weights, params, bufs[1][:m]):
                nonfinite.append(j)

    _for_blocks(name, readers, n, buffers, body)
    if nonfinite:
        _explain_nonfinite(name, readers, out, method)
    return out.reshape(shape)


def _gram_tensor(
    name: str, shape: tuple[int, ...], storage: StorageDtype, base: CheckpointReader | None,
    experts: Sequence[CheckpointReader], method: str, kernel: GramKernel, params: Any, weights: Sequence[float],
) -> Any:
    """One tensor of a Gram-matrix method (:class:`~mergelab.merging.numpy_kernels.GramKernel`): a pass over the
    blocks for the Gram partials (kept per block, summed in block order), the coefficients, a pass for the
    combination (model stock's from the base and the first pass's sum of task vectors). A non-finite Gram matrix means a non-finite input: it is reported before the coefficients."""
    origin, vector_readers = kernel.readers(base, experts)
    readers = ([origin] if origin is not None else []) + vector_readers
    compute = compute_dtype(numpy_dtype(r.info(name).storage) for r in readers)
    out_dtype = numpy_dtype(storage)
    n = math.prod(shape)
    out = np.empty(n, dtype=out_dtype)
    k = len(vector_readers)
    has_origin = origin is not None

    def buffers(size: int) -> tuple[Any, Any]:  # one row per buffer: the vectors' rows are one 2-D view
        return np.empty((kernel.buffers(k), size), dtype=compute), exponent_scratch(out_dtype, size)

    partials: list[list[float]] = [[] for _ in range(-(-n // BLOCK))]
    total = np.empty(n, dtype=compute) if kernel.mean_first else None  # model stock: sum_i tau_i

    def gram_body(j: int, start: int, stop: int, xs: list[Any], bufs: tuple[list[Any], Any]) -> None:
        with np.errstate(all="ignore"):
            partials[j] = kernel.partials(xs, has_origin, bufs[0][:, : stop - start],
                                          None if total is None else total[start:stop])

    _for_blocks(name, readers, n, buffers, gram_body)
    g = gram_from_partials(partials, k)
    if not all(math.isfinite(v) for row in g for v in row):
        _explain_nonfinite(name, readers, out, method)
    coefficients = kernel.coefficients(g, params, weights)
    nonfinite: list[int] = []

    def body(j: int, start: int, stop: int, xs: list[Any], bufs: tuple[list[Any], Any]) -> None:
        m = stop - start
        with np.errstate(all="ignore"):
            if total is not None:
                flagged = kernel.combine_mean(xs[0], total[start:stop], k, coefficients[0],
                                              bufs[0][:, :m], out[start:stop], bufs[1][:m])
            else:
                flagged = kernel.combine(xs, has_origin, coefficients, bufs[0][:, :m], out[start:stop],
                                         bufs[1][:m])
        if flagged:
            nonfinite.append(j)

    _for_blocks(name, [origin] if total is not None else readers, n, buffers, body)
    if nonfinite:
        _explain_nonfinite(name, readers, out, method)
    return out.reshape(shape)


def _explain_nonfinite(name: str, readers: Sequence[CheckpointReader], out: Any, method: str) -> None:
    """Raise :class:`NonFiniteError` naming the first input holding NaN/Inf in ``name``, else the output."""
    for reader in readers:
        counts = _nonfinite_counts(_read_whole(reader, name))
        if counts is not None:
            raise NonFiniteError(nonfinite_message(str(reader.info(name).file), name, *counts))
    raise NonFiniteError(nonfinite_message(f"merge result ({method})", name, *(_nonfinite_counts(out) or (0, 0))))


def _nonfinite_counts(values: Any) -> tuple[int, int] | None:
    """(non-finite entries, NaN entries) of a floating array, or None when every entry is finite."""
    values = values.astype(np.float64 if values.dtype == np.float64 else np.float32)
    finite = np.isfinite(values)
    if finite.all():
        return None
    return int((~finite).sum()), int(np.isnan(values).sum())


#: This back-end's kernels, by method: the block kernel of an elementwise method (inputs read block by block
#: straight from the files), a :class:`~mergelab.merging.numpy_kernels.GramKernel` (two such passes), or None for TIES (:func:`_stream_ties`, whole tensors read ahead). The
#: methods it runs are exactly these keys.
KERNELS: dict[str, Callable[..., bool] | GramKernel | None] = {
    "task_arithmetic": task_arithmetic_block,
    "weight_average": weight_average_block,
    "passthrough": passthrough_block,
    "nearswap": nearswap_block,
    "ram": ram_block,
    "ties": None,
    **GRAM_KERNELS,
}


class NumpyBackend:
    """The numpy back-end (:class:`mergelab.merging.backend.Backend`): the methods of :data:`KERNELS`, on
    the CPU, from safetensors inputs in float64/32/16 or bfloat16."""

    name = "numpy"
    methods = frozenset(KERNELS)

    def unsupported(self, spec: MergeSpec) -> str | None:
        return unsupported(spec)

    def run(self, spec: MergeSpec, out_dir: str | Path, *, overwrite: bool, progress: bool, hash_inputs: bool,
            started: float) -> MergeResult:
        return merge_numpy(spec, out_dir, overwrite=overwrite, progress=progress, hash_inputs=hash_inputs,
                           started=started)


BACKEND = NumpyBackend()
