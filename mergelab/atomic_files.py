"""Atomic writes of small text files (JSON, CSV, Markdown, HTML): a failed or interrupted write never leaves a
half-written file where a good one is expected.

The text goes to a temporary file in the target's folder (same file system), which then replaces the target
with :func:`os.replace`; on any error the temporary file is removed and the target is untouched. The file gets
the permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
Checkpoints have their own streaming writer (:mod:`mergelab.checkpoints`).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]

logger = logging.getLogger(__name__)


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import (os.umask is process-wide)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
