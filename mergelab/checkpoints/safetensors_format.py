"""The safetensors on-disk format: header parsing/validation and header serialization.

A safetensors file is::

    [8 bytes]  N, the header length, unsigned 64-bit little-endian
    [N bytes]  UTF-8 JSON: {"__metadata__": {str: str}, (optional)
                            "<tensor name>": {"dtype": "F32", "shape": [d0, d1, ...],
                                              "data_offsets": [begin, end]}, ...}
               (the writer pads it with spaces so that 8 + N is a multiple of 8)
    [rest]     the data section; a tensor's raw little-endian, row-major bytes are
               data[begin:end], with offsets relative to the start of the data section.

This module only deals with the header: :func:`read_header` reads and validates it from an open file
descriptor (the tensor data is never touched, so opening a checkpoint costs a few KiB of I/O), and
:func:`build_header` produces the bytes a writer puts in front of the tensor data. Shared by
:mod:`mergelab.checkpoints.reader` and :mod:`mergelab.checkpoints.writer`.

It does not import torch: dtypes are :class:`StorageDtype` records (code, name, size, kind), convertible
to and from torch and numpy dtypes by name, so that a merge which never computes with torch (the numpy
back-end of :mod:`mergelab.merging.numpy_backend`) never pays the 1.5 s of ``import torch``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mergelab.errors import CheckpointError
from mergelab.untrusted_input import parse_json

if TYPE_CHECKING:
    import torch

#: Largest header we accept (the reference implementation uses the same bound).
MAX_HEADER_BYTES = 100 * 1024 * 1024

DtypeKind = Literal["float", "int", "bool", "complex", "other"]


@dataclass(frozen=True)
class StorageDtype:
    """How a tensor's entries are stored: safetensors ``code`` (None for dtypes safetensors cannot hold,
    which only torch files have), ``name`` (torch's and numpy's spelling: ``bfloat16``), ``itemsize`` in
    bytes and ``kind``. :meth:`to_torch` gives the torch dtype (importing torch)."""

    code: str | None
    name: str
    itemsize: int
    kind: DtypeKind

    @property
    def is_floating_point(self) -> bool:
        return self.kind == "float"

    def to_torch(self) -> torch.dtype:
        # deferred: torch, only for a torch dtype or tensor; the numpy engine reads and writes without it
        import torch

        return getattr(torch, self.name)

    def __str__(self) -> str:
        return self.name


_STORAGE = [
    StorageDtype("F64", "float64", 8, "float"),
    StorageDtype("F32", "float32", 4, "float"),
    StorageDtype("F16", "float16", 2, "float"),
    StorageDtype("BF16", "bfloat16", 2, "float"),
    StorageDtype("I64", "int64", 8, "int"),
    StorageDtype("I32", "int32", 4, "int"),
    StorageDtype("I16", "int16", 2, "int"),
    StorageDtype("I8", "int8", 1, "int"),
    StorageDtype("U8", "uint8", 1, "int"),
    StorageDtype("BOOL", "bool", 1, "bool"),
    StorageDtype("U16", "uint16", 2, "int"),
    StorageDtype("U32", "uint32", 4, "int"),
    StorageDtype("U64", "uint64", 8, "int"),
    StorageDtype("F8_E4M3", "float8_e4m3fn", 1, "float"),
    StorageDtype("F8_E5M2", "float8_e5m2", 1, "float"),
]
#: safetensors dtype code -> storage dtype.
STORAGE_DTYPES: dict[str, StorageDtype] = {d.code: d for d in _STORAGE}  # type: ignore[misc]
_BY_NAME: dict[str, StorageDtype] = {d.name: d for d in _STORAGE}


def storage_dtype(dtype: Any) -> StorageDtype:
    """The :class:`StorageDtype` of a torch dtype, a numpy dtype, a dtype name (``"bfloat16"``) or a
    StorageDtype; ``TypeError`` if ``dtype`` is none of these."""
    if isinstance(dtype, StorageDtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype
    elif type(dtype).__module__ == "torch":  # a torch.dtype: "torch.bfloat16"
        name = str(dtype).removeprefix("torch.")
        if name not in _BY_NAME:  # complex, quantized, ...: describe it from torch itself
            kind: DtypeKind = (
                "complex" if dtype.is_complex else "float" if dtype.is_floating_point else "other"
            )
            return StorageDtype(None, name, dtype.itemsize, kind)
    elif hasattr(dtype, "itemsize") and hasattr(dtype, "name"):  # a numpy dtype (ml_dtypes' bfloat16 too)
        name = "bool" if dtype.name == "bool" else dtype.name
    else:
        raise TypeError(f"{dtype!r} is not a dtype")
    try:
        return _BY_NAME[name]
    except KeyError:
        raise TypeError(f"{dtype!r} is not a dtype safetensors can store") from None


def dtype_code(dtype: Any, *, where: str) -> str:
    """The safetensors name of ``dtype`` (torch, numpy or storage dtype); CheckpointError (prefixed by
    ``where``) if it has none."""
    try:
        code = storage_dtype(dtype).code
    except TypeError:
        code = None
    if code is None:
        raise CheckpointError(
            f"{where}: dtype {dtype} cannot be stored in safetensors "
            f"(supported: {', '.join(d.name for d in _STORAGE)})"
        )
    return code


def tensor_nbytes(shape: Sequence[int], dtype: Any) -> int:
    """Number of bytes of a contiguous tensor of this shape and dtype (anything with ``itemsize``)."""
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as described by a header; ``begin``/``end`` are relative to the data section."""

    name: str
    dtype: StorageDtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed, validated header. ``entries`` are in data-offset order."""

    entries: list[HeaderEntry]
    metadata: dict[str, str] | None
    data_start: int  # absolute file offset of the data section
    data_size: int  # bytes available in the data section


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(fd: int, path: Path) -> Header:
    """Read and validate the header of the safetensors file open as ``fd``.

    Checks: the file is long enough for the length prefix, the header length is sane and within the
    file, the header is valid UTF-8 JSON of the expected shape, every dtype is known, each tensor's byte
    range matches numel * itemsize, ranges do not overlap, and every range lies within the data section
    (otherwise the file is reported as truncated). Raises CheckpointError naming ``path`` (and the tensor).
    """
    file_size = os.fstat(fd).st_size
    if file_size < 8:
        raise CheckpointError(
            f"{path}: not a safetensors file: only {file_size} bytes, too short for the 8-byte header length"
        )
    (header_len,) = struct.unpack("<Q", _pread_exact(fd, 8, 0))
    if header_len > file_size - 8:
        raise CheckpointError(
            f"{path}: corrupt header: header length {header_len} exceeds the file size ({file_size} bytes)"
        )
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: corrupt header: header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes"
        )
    raw = _pread_exact(fd, header_len, 8)
    if len(raw) != header_len:
        raise CheckpointError(f"{path}: truncated while reading the {header_len}-byte header")
    parsed = parse_json(raw, str(path), what="corrupt header", error=CheckpointError,
                        object_pairs_hook=_reject_duplicates)
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path}: corrupt header: expected a JSON object, got {type(parsed).__name__}")

    metadata = parsed.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise CheckpointError(f"{path}: corrupt header: __metadata__ must map strings to strings")

    data_start = 8 + header_len
    data_size = file_size - data_start
    entries: list[HeaderEntry] = []
    for name, spec in parsed.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(spec, dict):
            raise CheckpointError(f"{where}: corrupt header: entry is not a JSON object")
        code = spec.get("dtype")
        shape = spec.get("shape")
        offsets = spec.get("data_offsets")
        if code not in STORAGE_DTYPES:
            raise CheckpointError(
                f"{where}: unknown dtype {code!r} (supported: {', '.join(STORAGE_DTYPES)})"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: corrupt header: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(f"{where}: corrupt header: bad data_offsets {offsets!r}")
        dtype = STORAGE_DTYPES[code]
        begin, end = offsets
        expected = tensor_nbytes(shape, dtype)
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: corrupt header: data_offsets [{begin}, {end}) span {end - begin} bytes but "
                f"shape {tuple(shape)} of {code} needs {expected}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} needs bytes [{begin}, {end}) but the data section "
                f"has only {data_size} bytes"
            )
        entries.append(HeaderEntry(name, dtype, tuple(shape), begin, end))

    entries.sort(key=lambda e: (e.begin, e.end))
    previous: HeaderEntry | None = None
    for entry in entries:
        if previous is not None and entry.begin < previous.end and entry.end > entry.begin:
            raise CheckpointError(
                f"{path}: corrupt header: tensors {previous.name!r} and {entry.name!r} overlap "
                f"([{previous.begin}, {previous.end}) and [{entry.begin}, {entry.end}))"
            )
        if entry.end > entry.begin:
            previous = entry
    return Header(entries=entries, metadata=metadata, data_start=data_start, data_size=data_size)


def build_header(
    tensors: Sequence[tuple[str, tuple[int, ...], Any]],
    metadata: Mapping[str, str] | None,
    *,
    where: str,
) -> bytes:
    """Serialize a header for ``tensors`` (name, shape, torch/numpy/storage dtype) laid out back to back in
    the given order.

    Returns the 8-byte length prefix plus the JSON, padded with spaces so the data section starts at a
    multiple of 8 bytes (as the reference implementation does). ``metadata`` must be str -> str.
    """
    obj: dict[str, object] = {}
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise CheckpointError(
                    f"{where}: metadata must map strings to strings, got {key!r}: {value!r}"
                )
        obj["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape, dtype in tensors:
        if name == "__metadata__":
            raise CheckpointError(f"{where}: '__metadata__' is reserved and cannot be a tensor name")
        nbytes = tensor_nbytes(shape, dtype)
        obj[name] = {
            "dtype": dtype_code(dtype, where=f"{where}: tensor {name!r}"),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    padded = len(text) + (-(8 + len(text)) % 8)
    text = text.ljust(padded, b" ")
    return struct.pack("<Q", len(text)) + text


def tensor_bytes(tensor: Any) -> memoryview:
    """The raw little-endian bytes of a torch tensor or numpy array in row-major order, without copying
    when it is already contiguous (on the CPU); one copy otherwise. Works for every dtype, bf16 and float8
    included."""
    if type(tensor).__module__.startswith("torch"):
        # deferred: torch, only for a torch dtype or tensor; the numpy engine reads and writes without it
        import torch

        flat = tensor.detach().cpu().contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy()).cast("B")
    # deferred: numpy; the checkpoint package imports without numpy or torch
    import numpy as np

    return memoryview(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)).cast("B")
