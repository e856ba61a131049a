"""Atomic, streaming writing of safetensors checkpoints.

:class:`CheckpointWriter` writes an HF-style folder of (possibly sharded) safetensors files one tensor at
a time. Because every tensor's name, shape and dtype are declared up front in a *plan*, the shard layout
and every shard's header are fixed before any data arrives:

* shards are filled greedily in plan order; a new shard starts when the next tensor would push the
  current one past ``max_shard_bytes`` (a tensor larger than the limit gets a shard of its own);
* one shard is named ``model.safetensors`` and no index is written; several are named
  ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``
  (``{"metadata": {"total_size": N}, "weight_map": {...}}``, as transformers writes it);
* each shard's header is written when the shard is opened, then each tensor's raw bytes are appended as
  it arrives, so memory stays bounded by one tensor (plus a copy if the tensor handed in is not
  contiguous).

Durability without a stall at the end: a shard is fsynced before the folder is published (so a crash
after the rename never exposes a model whose data never reached the disk), but each written stretch of
``WRITEBACK_BYTES`` is handed to the kernel for write-back at once (Linux ``sync_file_range``), so the disk
writes while the merge computes and the final fsync waits only for the tail. Without that, the kernel
starts write-back after about 30 s, and the fsync of a 1.35 GB shard stalled the end of a merge for
1.4-2.5 s on the benchmark machine (whose disk writes about 0.5-1 GB/s).

Atomicity: everything goes into a temporary sibling folder ``<out_dir>.<random>.tmp``. ``finish()``
checks that every planned tensor arrived, fsyncs, writes ``mergelab_merge.json`` and copies
config/tokenizer files, then renames the folder into place (an existing target, with ``overwrite``, is
first renamed away to ``<out_dir>.<random>.old`` and only deleted once the new folder is in place; if
that deletion fails, e.g. on a read-only file, a warning names the leftover and why). Any failure, and leaving the
``with`` block by an exception, deletes the temporary folder: the target never holds a half-written model.

Interrupted writers: the temporary folder holds ``.mergelab-writer.json`` naming its owner (host, PID and the
process's start time; removed before publishing). The CLI turns SIGTERM and SIGHUP into an exception like
Ctrl-C (:mod:`mergelab.interrupts`), so the folder is deleted on the way out; a writer killed outright
(SIGKILL) cannot clean up, and the next writer to the same target removes such folders whose owner is gone
(:func:`remove_stale_temporaries`), never one whose owner still runs.

:func:`save_state_dict` writes a single ``.safetensors`` file atomically (temporary file + rename).

Tensors may be torch tensors or numpy arrays (ml_dtypes' ``bfloat16`` for bf16); plan dtypes may be torch,
numpy or :class:`~mergelab.checkpoints.safetensors_format.StorageDtype` dtypes. The module does not
import torch.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

from mergelab.atomic_files import remove_leftover
from mergelab.checkpoints.layout import is_weight_file
from mergelab.checkpoints.safetensors_format import (
    StorageDtype,
    build_header,
    dtype_code,
    storage_dtype,
    tensor_bytes,
    tensor_nbytes,
)
from mergelab.errors import CheckpointError
from mergelab.output_paths import check_replaceable
from mergelab.stale_temporaries import OWNER_NAME, remove_stale, write_owner

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
RECORD_NAME = "mergelab_merge.json"

PlanEntry = tuple[str, tuple[int, ...], Any]  # (name, shape, torch / numpy / storage dtype)

#: Written bytes after which their write-back is started (see the module docstring).
WRITEBACK_BYTES = 32 * 1024**2


def _load_sync_file_range():  # Linux only; None elsewhere
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` of ``fd`` to disk, without waiting for
    it (``sync_file_range(SYNC_FILE_RANGE_WRITE)``). Durability still comes from a later fsync; this only
    moves the disk work earlier. A no-op where unsupported."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


#: Bytes staged before each direct write (a multiple of ``DIRECT_ALIGN``).
DIRECT_CHUNK = 32 * 1024**2
#: Bytes written directly between two ``fdatasync`` calls (see :class:`DirectFile`).
DIRECT_FLUSH_BYTES = 256 * 1024**2
#: Alignment of direct writes' memory, offsets and lengths (covers 512-byte and 4 KiB logical blocks).
DIRECT_ALIGN = 4096


class DirectFile:
    """A new file written with ``O_DIRECT`` through a page-aligned staging buffer, bypassing the page cache.

    A buffered ``write`` copies every byte into freshly allocated page-cache pages, which cost 1.2-1.9 s
    of system CPU time for a 1.35 GB shard on the benchmark machine; staged into a reused buffer and written
    directly it cost 0.2 s, for the same wall time (the disk is the limit either way), and the final fsync
    has little left to do. Data are staged and written in ``DIRECT_CHUNK`` pieces; the last piece is
    padded to ``DIRECT_ALIGN`` and the file truncated back to its length. Every ``DIRECT_FLUSH_BYTES`` an
    ``fdatasync`` asks the device to flush its write cache (on this thread, which writes in the background):
    without it the final fsync of the benchmark's TIES flushed 1.35 GB at once and stalled the end of the
    merge 0.8-1.2 s, with it 0.25 s. :meth:`open` returns None where
    direct I/O is unavailable (no ``O_DIRECT``, or a file system such as tmpfs that refuses it), and the
    writer then uses a buffered file.

    The cost: one write in flight at a time, so a merge that waits for the disk anyway (task arithmetic
    on the benchmark: 3.1 s buffered, 3.3 s direct, medians of 4) is slower; the page-cache write-back
    queues deeper. Hence an option of :class:`CheckpointWriter`, taken by CPU-bound merges.
    """

    def __init__(self, fd: int) -> None:
        import mmap

        import numpy as np

        self._fd: int | None = fd
        self._buffer = mmap.mmap(-1, DIRECT_CHUNK)  # anonymous maps are page-aligned
        self._staged = np.frombuffer(self._buffer, dtype=np.uint8)
        self._fill = 0
        self._written = 0  # bytes accepted so far
        self._unflushed = 0  # bytes written since the last fdatasync

    @classmethod
    def open(cls, path: Path) -> DirectFile | None:
        flag = getattr(os, "O_DIRECT", None)
        if flag is None:
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
        except OSError:
            return None
        return cls(fd)

    def write(self, data: Any) -> None:
        import numpy as np

        src = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        done = 0
        while done < src.size:
            n = min(src.size - done, DIRECT_CHUNK - self._fill)
            self._staged[self._fill : self._fill + n] = src[done : done + n]  # numpy copies without the GIL
            self._fill += n
            done += n
            if self._fill == DIRECT_CHUNK:
                self._flush_staged(DIRECT_CHUNK)
        self._written += src.size

    def _flush_staged(self, nbytes: int) -> None:
        assert self._fd is not None
        view = memoryview(self._buffer)[:nbytes]
        while view:  # a short write leaves an aligned remainder (page-sized units)
            n = os.write(self._fd, view)
            if n <= 0 or n % DIRECT_ALIGN:
                raise OSError(f"direct write wrote {n} of {len(view)} bytes")
            view = view[n:]
        self._fill = 0
        self._unflushed += nbytes
        if self._unflushed >= DIRECT_FLUSH_BYTES:  # spread the device's cache flushes over the run
            os.fdatasync(self._fd)
            self._unflushed = 0

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        """Nothing to flush before :meth:`close_durably` (data wait in the staging buffer)."""

    def close_durably(self) -> None:
        """Write the staged tail (padded to the alignment, then truncated back), fsync and close."""
        assert self._fd is not None
        if self._fill:
            padded = -(-self._fill // DIRECT_ALIGN) * DIRECT_ALIGN
            self._staged[self._fill : padded] = 0
            self._flush_staged(padded)
            os.ftruncate(self._fd, self._written)
        os.fsync(self._fd)
        self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self._staged = None  # type: ignore[assignment]  # release the map's export before closing it
        with contextlib.suppress(BufferError):
            self._buffer.close()


def _fsync_dir(path: Path) -> None:
    """fsync a directory so renames and new entries in it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_sibling(path: Path, suffix: str, *, directory: bool) -> Path:
    """Create a new, uniquely named ``<path>.<random><suffix>`` folder or empty file next to ``path``.

    Unlike :mod:`tempfile`, the default permissions (umask) apply, so the published model is readable
    like any other file the user creates.
    """
    for _ in range(100):
        candidate = path.with_name(f"{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            if directory:
                os.mkdir(candidate, 0o777)
            else:
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"cannot find a free temporary name next to {path}")


def _shard_name(index: int, count: int) -> str:
    if count == 1:
        return SINGLE_FILE_NAME
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


@dataclass
class _Shard:
    name: str
    entries: list[PlanEntry] = field(default_factory=list)
    nbytes: int = 0


def plan_shards(plan: Sequence[PlanEntry], max_shard_bytes: int) -> list[_Shard]:
    """Greedy split of ``plan`` (in order) into shards of at most ``max_shard_bytes`` tensor bytes each."""
    shards: list[_Shard] = []
    current: _Shard | None = None
    for entry in plan:
        size = tensor_nbytes(entry[1], entry[2])
        if current is None or (current.entries and current.nbytes + size > max_shard_bytes):
            current = _Shard(name="")
            shards.append(current)
        current.entries.append(entry)
        current.nbytes += size
    if not shards:
        shards.append(_Shard(name=""))
    for i, shard in enumerate(shards):
        shard.name = _shard_name(i, len(shards))
    return shards


def _is_nonempty(path: Path) -> bool:
    """True if ``path`` exists and is anything other than an empty folder."""
    if not os.path.lexists(path):
        return False
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return True


#: Largest support file (config, tokenizer, ...) copied next to a merged model: a tokenizer is tens of MB;
#: anything larger is not a support file (an unlisted weight format, a dataset) or a file that never ends.
MAX_SUPPORT_FILE_BYTES = 256 * 1024**2
#: Largest total of the support files copied next to a merged model.
MAX_SUPPORT_TOTAL_BYTES = 1024**3


@dataclass(frozen=True)
class SupportFile:
    """A file to copy next to a merged model: ``rel`` (its path in the model folder), ``real`` (the regular
    file it is, or its symlink resolves to) and ``size`` in bytes."""

    rel: Path
    real: Path
    size: int


def _blob_store(folder: Path) -> Path | None:
    """The blob store a Hugging Face cache snapshot links into: ``<repo>/blobs`` for a folder
    ``<repo>/snapshots/<revision>`` (resolved), else None."""
    if folder.parent.name == "snapshots":
        return folder.parent.parent / "blobs"
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def support_files(source: str | Path) -> list[SupportFile]:
    """The non-weight files of ``source`` that :func:`copy_support_files` copies, checked without reading them.

    Regular files only: a symlink is followed only when it resolves inside ``source`` or, for a Hugging Face
    cache snapshot (``.../snapshots/<revision>/``), into that repository's ``blobs/``; a link elsewhere (e.g.
    ``tokenizer_config.json -> ../secret.txt``), a device, FIFO or socket (``vocab.txt -> /dev/zero``) is a
    :class:`CheckpointError` naming the file. Links to folders are not followed. A file over
    :data:`MAX_SUPPORT_FILE_BYTES` (256 MiB), or all together over :data:`MAX_SUPPORT_TOTAL_BYTES` (1 GiB), is
    an error too. Weight files (:func:`mergelab.checkpoints.layout.is_weight_file`) and hidden sub-folders
    (``.git``, ``.cache``) are left out; weights in sub-folders are named in a warning.
    """
    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"{source}: cannot copy config/tokenizer files: not a folder")
    root = Path(os.path.realpath(source))
    allowed = [root] + ([blobs] if (blobs := _blob_store(root)) is not None else [])
    found: list[SupportFile] = []
    skipped_nested: list[str] = []
    total = 0
    for folder, dirs, files in os.walk(source):  # does not descend into links to folders
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .cache (download bookkeeping)
        for name in sorted(files) + sorted(d for d in dirs if (here / d).is_symlink()):
            src = here / name
            rel = src.relative_to(source)
            if is_weight_file(name):
                if len(rel.parts) > 1:
                    skipped_nested.append(str(rel))
                continue
            try:
                link = src.is_symlink()
                real = Path(os.path.realpath(src))
                info = os.stat(real)
            except OSError as exc:
                raise CheckpointError(f"{src}: cannot read config/tokenizer file: {exc}") from None
            if link and not any(real == a or a in real.parents for a in allowed):
                raise CheckpointError(
                    f"{src}: refusing to copy a symlink to {real}, outside the model folder {root}, into the "
                    "merged model"
                )
            if stat.S_ISDIR(info.st_mode) and link:
                logger.warning("%s: not copying a symlink to a folder into the merged model", src)
                continue
            if not stat.S_ISREG(info.st_mode):
                what = f"a symlink to {real}, {_kind(info.st_mode)}" if link else _kind(info.st_mode)
                raise CheckpointError(f"{src}: refusing to copy {what} into the merged model (regular files only)")
            if info.st_size > MAX_SUPPORT_FILE_BYTES:
                raise CheckpointError(
                    f"{src}: {info.st_size} bytes, over the {MAX_SUPPORT_FILE_BYTES} bytes a config/tokenizer file "
                    "may have (MAX_SUPPORT_FILE_BYTES); not copying it into the merged model"
                )
            total += info.st_size
            if total > MAX_SUPPORT_TOTAL_BYTES:
                raise CheckpointError(
                    f"{source}: config/tokenizer files over {MAX_SUPPORT_TOTAL_BYTES} bytes in total "
                    f"(MAX_SUPPORT_TOTAL_BYTES), reached at {rel}; not copying them into the merged model"
                )
            found.append(SupportFile(rel, real, info.st_size))
    if skipped_nested:
        logger.warning(
            "%s: not copying weight files in sub-folders (they were not merged): %s",
            source,
            ", ".join(skipped_nested),
        )
    return found


def _copy_regular(src: Path, real: Path, target: Path) -> None:
    """Copy the regular file ``real`` (checked by :func:`support_files`, re-checked on the open descriptor:
    the name may have been swapped since) to the new file ``target``, at most ``MAX_SUPPORT_FILE_BYTES``."""
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SUPPORT_FILE_BYTES:
            raise CheckpointError(f"{src}: changed while being copied into the merged model; not copying it")
        with open(fd, "rb", closefd=False) as fin, open(target, "xb") as fout:
            remaining = MAX_SUPPORT_FILE_BYTES + 1
            while chunk := fin.read(min(1024**2, remaining)):
                fout.write(chunk)
                remaining -= len(chunk)
                if remaining <= 0:
                    raise CheckpointError(f"{src}: grew past {MAX_SUPPORT_FILE_BYTES} bytes while being copied")
        shutil.copystat(real, target)
    finally:
        os.close(fd)


def copy_support_files(source: Path, dest: Path) -> list[str]:
    """Copy every non-weight file of ``source`` and its sub-folders into ``dest`` (config, tokenizer, ...) as
    regular files, after checking them all with :func:`support_files` (which states what is refused).
    Files already in ``dest`` are kept (never clobber what the writer produced). Returns the copied paths
    relative to ``source``."""
    copied: list[str] = []
    for item in support_files(source):
        target = dest / item.rel
        if os.path.lexists(target):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            _copy_regular(Path(source) / item.rel, item.real, target)
        except OSError as exc:
            raise CheckpointError(f"{Path(source) / item.rel}: cannot copy to {target}: {exc}") from None
        copied.append(str(item.rel))
    return copied


def _temporary_siblings(out_dir: Path) -> list[Path]:
    """The ``<out_dir>.<8 hex>.tmp`` folders next to ``out_dir`` (writers' temporary folders)."""
    pattern = re.compile(re.escape(out_dir.name) + r"\.[0-9a-f]{8}\.tmp")
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Remove the temporary folders next to ``out_dir`` whose writer is gone (killed by SIGKILL, a power cut)
    and return them (:func:`mergelab.stale_temporaries.remove_stale`: never a running writer's)."""
    out_dir = Path(out_dir)
    return remove_stale(_temporary_siblings(out_dir), out_dir)


#: Test hook: with ``$MERGELAB_TEST_PAUSE`` set to a file path, the first :meth:`WriteBehind.put` waits for its
#: tensor to be written, creates that file (holding the temporary folder's path) and sleeps, so a test can signal
#: or kill a merge in the middle of writing deterministically. Sleeps at most this many seconds.
TEST_PAUSE_SECONDS = 300


def _pause_for_tests(writer: CheckpointWriter) -> None:
    marker = os.environ.get("MERGELAB_TEST_PAUSE")
    if not marker or os.path.exists(marker):
        return
    with open(marker, "w", encoding="utf-8") as f:
        f.write(f"{writer.temporary_folder}\n")
    deadline = time.monotonic() + TEST_PAUSE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.05)


class CheckpointWriter:
    """Streaming, atomic writer of a (sharded) safetensors checkpoint folder. See the module docstring.

    ``plan`` lists (name, shape, dtype) of every tensor in the order they will be written. Tensors must
    then be passed to :meth:`write` in exactly that order; :meth:`finish` publishes the folder.
    ``direct_io``: write shards with ``O_DIRECT`` (:class:`DirectFile`) instead of through the page cache,
    for writers whose caller is bound by CPU rather than by the disk (``$MERGELAB_DIRECT_IO`` = 0 / 1
    overrides it either way).
    """

    def __init__(
        self,
        out_dir: str | Path,
        plan: Sequence[PlanEntry],
        max_shard_bytes: int = 2 * 1024**3,
        overwrite: bool = False,
        metadata: Mapping[str, str] | None = None,
        direct_io: bool = False,
    ) -> None:
        check_replaceable(out_dir)  # not "/", ".", nor an ancestor of the current folder
        self.out_dir = Path(os.path.normpath(out_dir))
        self.overwrite = overwrite
        self.direct_io = {"0": False, "1": True}.get(os.environ.get("MERGELAB_DIRECT_IO", ""), direct_io)
        where = str(self.out_dir)
        if max_shard_bytes <= 0:
            raise CheckpointError(f"{where}: max_shard_bytes must be positive, got {max_shard_bytes}")
        entries: list[PlanEntry] = []
        seen: set[str] = set()
        for item in plan:
            try:
                name, shape, dtype = item
                shape = tuple(int(d) for d in shape)
            except (TypeError, ValueError):
                raise CheckpointError(f"{where}: bad plan entry {item!r}; expected (name, shape, dtype)") from None
            if not isinstance(name, str) or not name:
                raise CheckpointError(f"{where}: bad tensor name {name!r} in plan")
            if name in seen:
                raise CheckpointError(f"{where}: tensor {name!r} appears twice in the plan")
            if any(d < 0 for d in shape):
                raise CheckpointError(f"{where}: tensor {name!r}: negative dimension in shape {shape}")
            try:
                storage = storage_dtype(dtype)
            except TypeError:
                if not hasattr(dtype, "itemsize"):
                    raise CheckpointError(f"{where}: tensor {name!r}: {dtype!r} is not a dtype") from None
            dtype_code(dtype, where=f"{where}: tensor {name!r}")  # a dtype safetensors cannot store fails here
            seen.add(name)
            entries.append((name, shape, storage))
        self._plan = entries
        self._metadata = {"format": "pt", **(dict(metadata) if metadata else {})}
        self._shards = plan_shards(entries, max_shard_bytes)
        # Headers are built (and metadata validated) before anything touches the disk.
        self._headers = [build_header(s.entries, self._metadata, where=f"{where}/{s.name}") for s in self._shards]

        if _is_nonempty(self.out_dir) and not overwrite:
            raise CheckpointError(
                f"{self.out_dir}: already exists and is not empty; pass overwrite=True to replace it"
            )
        parent = self.out_dir.parent
        remove_stale_temporaries(self.out_dir)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._tmp: Path | None = _make_sibling(self.out_dir, ".tmp", directory=True)
        except OSError as exc:
            raise CheckpointError(f"{self.out_dir}: cannot create a temporary folder next to it: {exc}") from None
        try:
            write_owner(self._tmp)
        except OSError as exc:
            tmp, self._tmp = self._tmp, None
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{self.out_dir}: cannot write to the temporary folder {tmp}: {exc}") from None

        self._next = 0  # index into self._plan of the next expected tensor
        self._shard_index = -1
        self._shard_remaining = 0
        self._file: BinaryIO | DirectFile | None = None
        self._synced_to = 0  # offset in the current shard up to which write-back was started
        self._finished = False
        logger.debug(
            "writing %d tensors in %d shard(s) to %s via %s", len(entries), len(self._shards), self.out_dir, self._tmp
        )

    # -- streaming -----------------------------------------------------------------------------------

    @property
    def temporary_folder(self) -> Path | None:
        """The folder written until :meth:`finish` publishes it (None once finished or aborted)."""
        return self._tmp

    @property
    def shard_names(self) -> list[str]:
        """File names of the planned shards."""
        return [s.name for s in self._shards]

    def _fail(self, message: str) -> CheckpointError:
        self.abort()
        return CheckpointError(message)

    def _close_shard(self) -> None:
        f, self._file = self._file, None
        if isinstance(f, DirectFile):
            f.close_durably()
        elif f is not None:
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def _open_next_shard(self) -> None:
        assert self._tmp is not None
        self._close_shard()
        self._shard_index += 1
        shard = self._shards[self._shard_index]
        path = self._tmp / shard.name
        self._file = (DirectFile.open(path) if self.direct_io else None) or open(path, "wb")
        self._file.write(self._headers[self._shard_index])
        self._synced_to = 0
        self._shard_remaining = len(shard.entries)

    def write(self, name: str, tensor: torch.Tensor | Any) -> None:
        """Append ``tensor`` (a torch tensor or a numpy array) as ``name``; it must be the next tensor of the
        plan, with its shape and dtype.

        Any error aborts the writer (the temporary folder is deleted) and raises CheckpointError.
        """
        if self._tmp is None or self._finished:
            state = "finished" if self._finished else "aborted"
            raise CheckpointError(f"{self.out_dir}: cannot write tensor {name!r}: the writer is already {state}")
        if self._next >= len(self._plan):
            raise self._fail(f"{self.out_dir}: tensor {name!r} written after all planned tensors were written")
        expected_name, shape, dtype = self._plan[self._next]
        if name != expected_name:
            if name in {entry[0] for entry in self._plan}:
                raise self._fail(
                    f"{self.out_dir}: tensor {name!r} written out of plan order: expected {expected_name!r} next "
                    f"(tensor #{self._next + 1} of {len(self._plan)})"
                )
            raise self._fail(f"{self.out_dir}: tensor {name!r} is not in the plan (expected {expected_name!r} next)")
        if not _is_array(tensor):
            raise self._fail(
                f"{self.out_dir}: tensor {name!r}: expected a torch.Tensor or numpy array, got {type(tensor).__name__}"
            )
        try:
            got: StorageDtype | None = storage_dtype(tensor.dtype)
        except TypeError:
            got = None
        if tuple(tensor.shape) != shape or got != dtype:
            raise self._fail(
                f"{self.out_dir}: tensor {name!r}: got shape {tuple(tensor.shape)} {tensor.dtype}, "
                f"the plan says {shape} {dtype}"
            )
        try:
            if self._shard_remaining == 0:
                self._open_next_shard()
            assert self._file is not None
            data = tensor_bytes(tensor)
            self._file.write(data)
            del data
            position = self._file.tell()
            if not isinstance(self._file, DirectFile) and position - self._synced_to >= WRITEBACK_BYTES:
                self._file.flush()
                start_writeback(self._file.fileno(), self._synced_to, position - self._synced_to)
                self._synced_to = position
            self._shard_remaining -= 1
            self._next += 1
            if self._shard_remaining == 0:
                self._close_shard()
        except OSError as exc:
            raise self._fail(f"{self.out_dir}: cannot write tensor {name!r}: {exc}") from None

    # -- publishing ----------------------------------------------------------------------------------

    def finish(self, *, copy_files_from: Path | None = None, record: Mapping | None = None) -> Path:
        """Check every planned tensor was written, add the record and support files, publish atomically.

        ``record`` is written as ``mergelab_merge.json``; every non-weight file of ``copy_files_from``
        (config, tokenizer, sub-folders such as ``1_Pooling``) is copied. Returns the output folder.
        """
        if self._tmp is None or self._finished:
            state = "finished" if self._finished else "aborted"
            raise CheckpointError(f"{self.out_dir}: cannot finish: the writer is already {state}")
        tmp = self._tmp
        if self._next < len(self._plan):
            missing = [entry[0] for entry in self._plan[self._next :]]
            shown = ", ".join(repr(n) for n in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise self._fail(f"{self.out_dir}: {len(missing)} planned tensors were never written: {shown}{more}")
        try:
            if not self._plan:  # an empty checkpoint still gets its (header-only) file
                self._open_next_shard()
            self._close_shard()
            if len(self._shards) > 1:
                index = {
                    "metadata": {"total_size": sum(s.nbytes for s in self._shards)},
                    "weight_map": {entry[0]: s.name for s in self._shards for entry in s.entries},
                }
                self._write_text(tmp / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
            if record is not None:
                try:
                    text = json.dumps(record, indent=2, default=str) + "\n"
                except (TypeError, ValueError) as exc:
                    raise CheckpointError(f"{self.out_dir}: cannot serialize the merge record: {exc}") from None
                self._write_text(tmp / RECORD_NAME, text)
            if copy_files_from is not None:
                copied = copy_support_files(Path(copy_files_from), tmp)
                logger.debug("copied %d support files from %s", len(copied), copy_files_from)
            (tmp / OWNER_NAME).unlink(missing_ok=True)
            _fsync_dir(tmp)
            self._publish(tmp)
        except CheckpointError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise CheckpointError(f"{self.out_dir}: cannot finish writing: {exc}") from None
        self._finished = True
        self._tmp = None
        logger.info("wrote %d tensors in %d shard(s) to %s", len(self._plan), len(self._shards), self.out_dir)
        return self.out_dir

    @staticmethod
    def _write_text(path: Path, text: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def _publish(self, tmp: Path) -> None:
        target = self.out_dir
        parent = target.parent
        old: Path | None = None
        if os.path.lexists(target):
            if _is_nonempty(target):
                if not self.overwrite:
                    raise CheckpointError(
                        f"{target}: appeared while writing and is not empty; pass overwrite=True to replace it"
                    )
                old = _make_sibling(target, ".old", directory=True)
                old.rmdir()
                os.rename(target, old)
            else:
                target.rmdir()
        try:
            os.rename(tmp, target)
        except OSError:
            if old is not None:
                os.rename(old, target)  # put the previous model back
            raise
        _fsync_dir(parent)
        if old is not None:
            remove_leftover(old, f"{target}: the new model is in place, but the previous one could not be removed")

    def abort(self) -> None:
        """Discard everything written so far (delete the temporary folder). Idempotent."""
        tmp, self._tmp = self._tmp, None
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        if tmp is not None and not self._finished:
            shutil.rmtree(tmp, ignore_errors=True)
            logger.debug("aborted writing %s; removed %s", self.out_dir, tmp)

    def __del__(self) -> None:
        try:
            if getattr(self, "_tmp", None) is not None and not self._finished:
                logger.warning("%s: writer discarded without finish(); removing %s", self.out_dir, self._tmp)
                self.abort()
        except Exception:  # interpreter shutdown; nothing useful to do
            pass

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._finished and self._tmp is not None:
            self.abort()
            raise CheckpointError(f"{self.out_dir}: the writer was closed without finish(); nothing was written")


class WriteBehind:
    """Hands tensors to a :class:`CheckpointWriter` on a background thread, in order, so the caller computes
    the next tensor while the last one is written (``write`` releases the GIL). One tensor may always wait;
    more while the waiting ones hold at most ``budget`` bytes, so a write held up by the disk does not stop
    the caller at once. Leaving the ``with`` block waits for every pending write (re-raising a write's error;
    after an exception in the block, pending writes still end before the writer may abort and delete)."""

    def __init__(self, writer: CheckpointWriter, budget: int) -> None:
        self.writer = writer
        self.budget = budget
        self._pending: collections.deque[tuple[Future, int]] = collections.deque()
        self._waiting = 0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-write")

    def put(self, name: str, tensor: Any, nbytes: int) -> None:
        """Queue ``tensor`` (``nbytes`` bytes) as the next tensor ``name``; blocks while over budget."""
        while self._pending and self._waiting + nbytes > self.budget:
            done, size = self._pending.popleft()
            done.result()
            self._waiting -= size
        self._pending.append((self._thread.submit(self.writer.write, name, tensor), nbytes))
        self._waiting += nbytes
        if "MERGELAB_TEST_PAUSE" in os.environ:
            for pending, _ in self._pending:
                pending.result()
            _pause_for_tests(self.writer)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            for pending, _ in self._pending:
                if exc_type is None:
                    pending.result()
                else:
                    with contextlib.suppress(BaseException):
                        pending.result()
        finally:
            self._thread.shutdown(wait=True)


def _is_array(value: object) -> bool:
    """A torch tensor or a numpy array (what :func:`tensor_bytes` can serialize)."""
    module = type(value).__module__
    return (module.startswith("torch") and hasattr(value, "detach")) or (
        module == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape")
    )


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state`` to the single safetensors file ``path`` atomically; returns ``path``.

    The file is written under a temporary name in the same folder, fsynced, then renamed over ``path``.
    Tensors are written in the mapping's order; shared storage is written once per name (no aliasing).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; save_state_dict writes a single .safetensors file")
    if not path.name.endswith(".safetensors"):
        logger.warning("%s: writing safetensors to a file not named *.safetensors", path)
    entries: list[PlanEntry] = []
    for name, tensor in state.items():
        if not isinstance(name, str) or not _is_array(tensor):
            raise CheckpointError(
                f"{path}: entry {name!r} is not a string-named tensor ({type(tensor).__name__})"
            )
        entries.append((name, tuple(tensor.shape), tensor.dtype))
    header = build_header(entries, {"format": "pt", **(dict(metadata) if metadata else {})}, where=str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_sibling(path, ".tmp", directory=False)
        fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot create a temporary file next to it: {exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for name, tensor in state.items():
                f.write(tensor_bytes(tensor))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise CheckpointError(f"{path}: cannot write: {exc}") from None
        raise
    _fsync_dir(path.parent)
    return path
