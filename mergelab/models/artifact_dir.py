"""Atomic publication of an artifact directory (a pretrained backbone, an expert).

Files are written into a private staging directory next to the target, which is then renamed into place;
readers never see a half-written artifact, and concurrent writers of the same artifact (two processes
training an identical spec) simply let the last complete copy win. A staging directory names its owner
(:mod:`mergelab.stale_temporaries`), so one left by a process killed outright (SIGKILL, the OOM killer) is
removed, with a warning, by the next writer of the same artifact; a running writer's is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergelab.atomic_files import remove_leftover
from mergelab.stale_temporaries import OWNER_NAME, remove_stale, temporary_folders, write_owner


def _staging_siblings(target: Path) -> list[Path]:
    """The staging directories of ``target``'s writers (``.<name>.staging-<pid>-<8 hex>``), real folders only."""
    return temporary_folders(target.parent, re.escape(f".{target.name}.staging-") + r"[0-9]+-[0-9a-f]{8}")


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success move it to ``target`` (replacing it), else delete it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(_staging_siblings(target), target)
    stage = target.parent / f".{target.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        write_owner(stage)
        yield stage
        (stage / OWNER_NAME).unlink(missing_ok=True)
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
