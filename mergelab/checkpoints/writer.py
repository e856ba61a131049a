"""Atomic, streaming writing of safetensors checkpoints.

:class:`CheckpointWriter` writes an HF-style folder of (possibly sharded) safetensors files one tensor at
a time. Because every tensor's name, shape and dtype are declared up front in a *plan*, the shard layout
and every shard's header are fixed before any data arrives (:mod:`mergelab.checkpoints.shards`):
each shard's header is written when the shard is opened, then each tensor's raw bytes are appended as
  it arrives, so memory stays bounded by one tensor (plus a copy if the tensor handed in is not
  contiguous).

Durability without a stall at the end: a shard is fsynced before the folder is published (so a crash
after the rename never exposes a model whose data never reached the disk), with its write-back started as
it is written, or written with ``O_DIRECT`` (:mod:`mergelab.checkpoints.disk_io`).

Atomicity: everything goes into a temporary sibling folder ``<out_dir>.<random>.tmp``. ``finish()``
checks that every planned tensor arrived, fsyncs, writes ``mergelab_merge.json`` and copies
config/tokenizer files (:mod:`mergelab.checkpoints.support_files`), then renames the folder into place (an existing target, with ``overwrite``, is
first renamed away to ``<out_dir>.<random>.old`` and only deleted once the new folder is in place; if
that deletion fails, e.g. on a read-only file, a warning names the leftover and why). Any failure, and leaving the
``with`` block by an exception, deletes the temporary folder: the target never holds a half-written model.

Interrupted writers: the temporary folder holds ``.mergelab-writer.json`` naming its owner (host, PID and the
process's start time; removed before publishing). The CLI turns SIGTERM and SIGHUP into an exception like
Ctrl-C (:mod:`mergelab.interrupts`), so the folder is deleted on the way out; a writer killed outright
(SIGKILL) cannot clean up, and the next writer to the same target removes such folders whose owner is gone
(:func:`remove_stale_temporaries`), never one whose owner still runs.

:class:`~mergelab.checkpoints.write_behind.WriteBehind` runs the writes on a background thread.
:func:`save_state_dict` writes a single ``.safetensors`` file atomically (temporary file + rename).

Tensors may be torch tensors or numpy arrays (ml_dtypes' ``bfloat16`` for bf16); plan dtypes may be torch,
numpy or :class:`~mergelab.checkpoints.safetensors_format.StorageDtype` dtypes. The module does not
import torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

from mergelab.atomic_files import remove_leftover
from mergelab.checkpoints.disk_io import WRITEBACK_BYTES, DirectFile, fsync_dir, start_writeback
from mergelab.checkpoints.safetensors_format import (
    StorageDtype,
    build_header,
    dtype_code,
    storage_dtype,
    tensor_bytes,
)
from mergelab.checkpoints.shards import INDEX_NAME, PlanEntry, plan_shards
from mergelab.checkpoints.support_files import copy_support_files
from mergelab.errors import CheckpointError
from mergelab.output_paths import check_replaceable
from mergelab.stale_temporaries import OWNER_NAME, remove_stale, temporary_folders, write_owner

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

RECORD_NAME = "mergelab_merge.json"


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


def _is_nonempty(path: Path) -> bool:
    """True if ``path`` exists and is anything other than an empty folder."""
    if not os.path.lexists(path):
        return False
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return True


def _temporary_siblings(out_dir: Path) -> list[Path]:
    """The ``<out_dir>.<8 hex>.tmp`` folders next to ``out_dir`` (writers' temporary folders)."""
    return temporary_folders(out_dir.parent, re.escape(out_dir.name) + r"\.[0-9a-f]{8}\.tmp")


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Remove the temporary folders next to ``out_dir`` whose writer is gone (killed by SIGKILL, a power cut)
    and return them (:func:`mergelab.stale_temporaries.remove_stale`: never a running writer's)."""
    out_dir = Path(out_dir)
    return remove_stale(_temporary_siblings(out_dir), out_dir)


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

    def finish(self, *, copy_files_from: Path | None = None, record: Mapping | None = None,
               files: Mapping[str, str | bytes] | None = None, skip: Collection[str] = ()) -> Path:
        """Check every planned tensor was written, add the record and support files, publish atomically.

        ``record`` is written as ``mergelab_merge.json``; ``files`` (name -> text or bytes) are written as given
        (an edited ``config.json``, a built tokenizer), then every other non-weight file of ``copy_files_from``
        (config, tokenizer, sub-folders such as ``1_Pooling``) is copied, but for the top-level names in
        ``skip``. Returns the output folder.
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
            for file_name, text in (files or {}).items():
                self._write_text(tmp / file_name, text)
            if copy_files_from is not None:
                copied = copy_support_files(Path(copy_files_from), tmp, skip)
                logger.debug("copied %d support files from %s", len(copied), copy_files_from)
            (tmp / OWNER_NAME).unlink(missing_ok=True)
            fsync_dir(tmp)
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
    def _write_text(path: Path, text: str | bytes) -> None:
        with open(path, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
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
        fsync_dir(parent)
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
    fsync_dir(path.parent)
    return path
