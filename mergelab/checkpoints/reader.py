"""Lazy, per-tensor reading of checkpoints (safetensors and torch files, single or sharded).

Memory model
------------
Opening a checkpoint reads only headers (safetensors) or the pickled index of a torch zip file; no
tensor data. :meth:`CheckpointReader.get` then reads exactly one tensor and returns a fresh tensor that
owns its memory, so a caller streaming over the tensors of several checkpoints holds one tensor per
checkpoint at a time.

* safetensors: the header is parsed by :mod:`mergelab.checkpoints.safetensors_format`, and a tensor is
  read with ``os.preadv`` straight into a new ``torch.uint8`` buffer, which is then viewed as the tensor's
  dtype (bf16 and float8 included) and reshaped. There is deliberately no memory map: mapped pages count
  toward the process's resident set, which would grow to the size of every input read so far. One file
  descriptor per data file stays open until :meth:`CheckpointReader.close`; ``preadv`` does not move a
  file position, so concurrent ``get`` calls from several threads are safe.
* torch files (``.pt``/``.pth``/``.bin``): loaded with ``torch.load(weights_only=True, mmap=True)``, so
  data pages are only touched when a tensor is copied out by ``get``. Legacy (pre-zip) torch files cannot
  be memory-mapped and are loaded whole. A file holding ``{"state_dict": {...}}`` is accepted.

Opening safetensors checkpoints and reading raw bytes (:meth:`CheckpointReader.read_range`) does not import
torch; :meth:`CheckpointReader.get` and torch files do.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mergelab.checkpoints import layout as _layout
from mergelab.checkpoints.safetensors_format import HeaderEntry, StorageDtype, read_header, storage_dtype
from mergelab.errors import CheckpointError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Largest single read request (Linux caps one read at just under 2 GiB).
_MAX_READ = 1 << 30


class TensorInfo:
    """What a checkpoint says about one tensor, known without reading its data: ``name``, ``shape``,
    ``storage`` (a :class:`~mergelab.checkpoints.safetensors_format.StorageDtype`; ``dtype`` is the torch
    dtype) and ``file``, the data file holding it. Built from a torch, numpy or storage dtype."""

    __slots__ = ("name", "shape", "storage", "file")

    def __init__(self, name: str, shape: tuple[int, ...], dtype: Any, file: Path) -> None:
        self.name = name
        self.shape = tuple(shape)
        self.storage: StorageDtype = storage_dtype(dtype)
        self.file = file

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.to_torch()

    def _key(self) -> tuple:
        return (self.name, self.shape, self.storage, self.file)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TensorInfo) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, {self.shape}, {self.storage.name}, {str(self.file)!r})"


class _SafetensorsFile:
    """One safetensors data file: parsed header plus an open descriptor for positional reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot open: {exc.strerror or exc}") from None
        try:
            header = read_header(self._fd, path)
        except BaseException:
            self.close()
            raise
        self._data_start = header.data_start
        self.metadata = header.metadata
        self.entries: dict[str, HeaderEntry] = {e.name: e for e in header.entries}

    def names(self) -> list[str]:
        return list(self.entries)  # offset order

    def info(self, name: str) -> TensorInfo:
        e = self.entries[name]
        return TensorInfo(name, e.shape, e.dtype, self.path)

    def read_range(self, name: str, offset: int, out: memoryview) -> None:
        """Fill the writable byte buffer ``out`` with bytes ``[offset, offset + len(out))`` of tensor
        ``name``'s data (``pread``: thread-safe, no file position)."""
        e = self.entries[name]
        fd = self._fd
        if fd is None:
            raise CheckpointError(f"{self.path}: checkpoint is closed (reading tensor {name!r})")
        nbytes = len(out)
        if offset < 0 or offset + nbytes > e.end - e.begin:
            raise ValueError(f"bytes [{offset}, {offset + nbytes}) are outside tensor {name!r} ({e.end - e.begin} bytes)")
        done = 0
        position = self._data_start + e.begin + offset
        while done < nbytes:
            try:
                n = os.preadv(fd, [out[done : done + min(nbytes - done, _MAX_READ)]], position + done)
            except OSError as exc:
                raise CheckpointError(
                    f"{self.path}: I/O error reading tensor {name!r}: {exc.strerror or exc}"
                ) from None
            if n == 0:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name!r} needs bytes [{e.begin}, {e.end}) of the data "
                    f"section but the file ended after {e.begin + offset + done} (did it change while open?)"
                )
            done += n

    def get(self, name: str) -> torch.Tensor:
        # deferred: torch, only to return a torch tensor; the numpy engine reads checkpoints without it
        import torch

        e = self.entries[name]
        if self._fd is None:
            raise CheckpointError(f"{self.path}: checkpoint is closed (reading tensor {name!r})")
        buf = torch.empty(e.end - e.begin, dtype=torch.uint8)
        if e.end > e.begin:
            self.read_range(name, 0, memoryview(buf.numpy()).cast("B"))
        return buf.view(e.dtype.to_torch()).reshape(e.shape)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class _TorchFile:
    """One torch-serialized data file (a dict of tensors, possibly under "state_dict")."""

    def __init__(self, path: Path) -> None:
        # deferred: torch, only to return a torch tensor; the numpy engine reads checkpoints without it
        import torch

        self.path = path
        mmap = zipfile.is_zipfile(path)
        if not mmap:
            logger.info("%s: legacy (non-zip) torch file; loading it whole instead of memory-mapping", path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read torch file: {exc}") from None
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path}: cannot load as a weights-only torch file ({type(exc).__name__}: {first_line})"
            ) from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"{path}: expected a dict of tensors (or a dict with a 'state_dict' entry), "
                f"got {type(obj).__name__}"
            )
        bad = [(k, v) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            shown = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise CheckpointError(
                f"{path}: not a state dict: {len(bad)} entries are not string-named tensors: {shown}{more}"
            )
        for name, tensor in obj.items():
            if tensor.layout != torch.strided:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported layout {tensor.layout}")
        self._tensors: dict[str, torch.Tensor] | None = dict(obj)
        self._names = list(obj)
        self.metadata = None

    def names(self) -> list[str]:
        return list(self._names)

    def _tensor(self, name: str) -> torch.Tensor:
        if self._tensors is None:
            raise CheckpointError(f"{self.path}: checkpoint is closed (reading tensor {name!r})")
        return self._tensors[name]

    def info(self, name: str) -> TensorInfo:
        t = self._tensor(name)
        return TensorInfo(name, tuple(t.shape), t.dtype, self.path)

    def get(self, name: str) -> torch.Tensor:
        # deferred: torch, only to return a torch tensor; the numpy engine reads checkpoints without it
        import torch

        t = self._tensor(name)
        return t.detach().clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        self._tensors = None


_DataFile = _SafetensorsFile | _TorchFile


class CheckpointReader:
    """A checkpoint opened for lazy per-tensor reading; use :func:`open_checkpoint` to create one.

    Attributes: ``path`` (what the user gave), ``files`` (the data files, in order; hash these to
    identify the checkpoint), ``config_dir`` (the folder holding config/tokenizer files when the
    checkpoint is an HF-style folder, else None), ``metadata`` (the safetensors ``__metadata__`` of the
    first data file, if any).
    """

    def __init__(self, path: Path, data_files: list[_DataFile], config_dir: Path | None) -> None:
        self.path = path
        self.files: list[Path] = [f.path for f in data_files]
        self.config_dir = config_dir
        self.metadata: dict[str, str] | None = data_files[0].metadata if data_files else None
        self._data_files = data_files
        self._where: dict[str, _DataFile] = {}
        self._closed = False
        for data_file in data_files:
            for name in data_file.names():
                other = self._where.get(name)
                if other is not None:
                    raise CheckpointError(
                        f"{path}: duplicate tensor {name!r} in {other.path} and {data_file.path}"
                    )
                self._where[name] = data_file

    def _file_of(self, name: str) -> _DataFile:
        if self._closed:
            raise CheckpointError(f"{self.path}: checkpoint is closed (looking up tensor {name!r})")
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: no tensor named {name!r} (the checkpoint has {len(self._where)} tensors)"
            ) from None

    def keys(self) -> list[str]:
        """Tensor names in storage order: data-file order, then data-offset order within a file."""
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        """Shape, dtype and file of ``name``, from headers only (no tensor data is read)."""
        return self._file_of(name).info(name)

    def get(self, name: str) -> torch.Tensor:
        """Read only ``name`` and return it as a fresh, writable CPU tensor that owns its memory."""
        return self._file_of(name).get(name)

    def read_range(self, name: str, offset: int, out: memoryview) -> None:
        """Fill the writable byte buffer ``out`` with bytes ``[offset, offset + len(out))`` of tensor
        ``name``'s raw (little-endian, row-major) data, without importing torch. safetensors only:
        ``TypeError`` for a torch file."""
        data_file = self._file_of(name)
        if not isinstance(data_file, _SafetensorsFile):
            raise TypeError(f"{data_file.path}: raw reads need a safetensors file")
        data_file.read_range(name, offset, out)

    @property
    def is_safetensors(self) -> bool:
        """Whether every data file is safetensors (so :meth:`read_range` works for every tensor)."""
        return all(isinstance(f, _SafetensorsFile) for f in self._data_files)

    def close(self) -> None:
        """Release file descriptors and memory maps. Idempotent."""
        self._closed = True
        for data_file in self._data_files:
            data_file.close()

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown; nothing useful to do
            pass

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self)} tensors in {len(self.files)} files)"


def _open_data_file(data_file: _layout.DataFile) -> _DataFile:
    opened: _DataFile = (
        _SafetensorsFile(data_file.path) if data_file.kind == "safetensors" else _TorchFile(data_file.path)
    )
    if data_file.expected is not None:
        present = set(opened.names())
        missing = [n for n in data_file.expected if n not in present]
        if missing:
            opened.close()
            raise CheckpointError(
                f"{data_file.path}: the shard index assigns {len(missing)} tensors to this file that it does "
                f"not contain, e.g. {missing[0]!r}"
            )
        extra = present.difference(data_file.expected)
        if extra:
            logger.warning(
                "%s: %d tensors are not listed in the shard index (e.g. %r); reading them anyway",
                data_file.path,
                len(extra),
                next(iter(extra)),
            )
    return opened


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a checkpoint (file or HF-style folder, see :mod:`mergelab.checkpoints.layout`) lazily."""
    resolved = _layout.resolve(path)
    opened: list[_DataFile] = []
    try:
        for data_file in resolved.files:
            opened.append(_open_data_file(data_file))
        return CheckpointReader(resolved.path, opened, resolved.config_dir)
    except BaseException:
        for data_file in opened:
            data_file.close()
        raise


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint into memory (for small models and tests)."""
    with open_checkpoint(path) as reader:
        return {name: reader.get(name) for name in reader.keys()}
