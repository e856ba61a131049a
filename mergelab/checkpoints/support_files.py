"""The non-weight files of a model folder (config, tokenizer, ...) copied next to a merged model, checked first.

Regular files only, symlinks followed only inside the model folder (or a Hugging Face cache snapshot's blob
store), sizes capped: see :func:`support_files`.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from mergelab.checkpoints.layout import is_weight_file
from mergelab.errors import CheckpointError

logger = logging.getLogger(__name__)


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


def copy_support_files(source: Path, dest: Path, skip: Collection[str] = ()) -> list[str]:
    """Copy every non-weight file of ``source`` and its sub-folders into ``dest`` (config, tokenizer, ...) as
    regular files, after checking them all with :func:`support_files` (which states what is refused).
    Files already in ``dest`` are kept (never clobber what the writer produced), and so are the top-level
    names in ``skip`` left out (a merge writing its own tokenizer leaves out the reference's). Returns the
    copied paths relative to ``source``."""
    copied: list[str] = []
    for item in support_files(source):
        if str(item.rel) in skip:
            continue
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
