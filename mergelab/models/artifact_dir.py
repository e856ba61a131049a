"""Atomic publication of an artifact directory (a pretrained backbone, an expert).

Files are written into a private staging directory next to the target, which is then renamed into place;
readers never see a half-written artifact, and concurrent writers of the same artifact (two processes
training an identical spec) simply let the last complete copy win.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergelab.atomic_files import remove_leftover


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success move it to ``target`` (replacing it), else delete it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.parent / f".{target.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(target, old)
        except FileNotFoundError:
            old = None
    try:
        os.replace(stage, target)
    except OSError:
        shutil.rmtree(stage, ignore_errors=True)
        if not target.exists():
            raise
    if old is not None:
        remove_leftover(old, f"{target}: replaced, but the previous copy could not be removed")
