"""Atomic writes of whole files (JSON, CSV, Markdown, HTML, PNG figures, caches): a failed or interrupted write
never leaves a half-written file where a good one is expected, and never writes through a planted symlink.

The content goes to a temporary file created with :func:`tempfile.mkstemp` (``O_EXCL``, a random name) in the
target's folder (same file system), which then replaces the target with :func:`os.replace`; on any error the
temporary file is removed and the target is untouched. The file gets the permissions a plain
``open(path, "w")`` would give (``0o666`` less the umask), not ``mkstemp``'s ``0o600``. Every temporary file
mergelab writes goes through :func:`open_atomic`; checkpoints have their own streaming writer
(:mod:`mergelab.checkpoints`), whose temporary names are random and created with ``O_EXCL`` too.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike[str]

logger = logging.getLogger(__name__)


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import (os.umask is process-wide)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextmanager
def open_atomic(path: PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a new file that becomes ``path`` when the ``with`` block ends without an exception.

    ``mode`` is ``"w"`` (UTF-8 text, newlines as written) or ``"wb"``. The file is created by
    :func:`tempfile.mkstemp` in ``path``'s folder (created if needed): an unpredictable name opened with
    ``O_CREAT | O_EXCL``, so a symlink planted in the folder is never followed; it is renamed over ``path``
    with :func:`os.replace`, which replaces a symlink at ``path`` rather than writing through it. On any
    exception the temporary file is removed and ``path`` is untouched. Permissions are those of a plain
    ``open(path, "w")`` (``0o666`` less the umask).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic writes new files only: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if mode == "w" else {})) as fh:
            yield fh
        os.chmod(tmp, plain_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plain_file_mode() -> int:
    """The permissions a plain ``open(path, "w")`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~_UMASK


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`open_atomic`), creating its folder; returns the path."""
    with open_atomic(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`open_atomic`), creating its folder; returns the path."""
    with open_atomic(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_csv_atomic(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV file (``header`` then ``rows``, :mod:`csv`'s default dialect) atomically; returns the path."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buf.getvalue())


def remove_leftover(path: PathLike, what: str) -> bool:
    """Delete ``path`` (a folder tree, a file or a link; a missing path is fine), e.g. the previous output a
    publication renamed away. What cannot be deleted stays, and a warning says ``{what}, ``path`` is left
    behind`` with the first failure (the path and the system's reason): never a silent leftover. Returns
    True when nothing is left."""
    path = Path(path)
    errors: list[str] = []

    def failed(_func: object, where: str, exc_info: tuple) -> None:
        exc = exc_info[1]
        errors.append(f"{where}: {getattr(exc, 'strerror', None) or exc}")

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=failed)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
    if not errors and not os.path.lexists(path):
        return True
    reason = errors[0] if errors else "it reappeared"
    logger.warning("%s: %s is left behind (%s); delete it by hand", what, path, reason)
    return False
