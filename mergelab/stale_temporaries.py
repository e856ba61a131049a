"""Temporary folders that name their owner, and the removal of those whose owner is gone.

A writer that builds its output in a temporary folder and renames it into place (the checkpoint writer, the
zoo's artifact folders) deletes that folder when it fails or is interrupted by a signal it can handle. A process
killed outright (SIGKILL, the OOM killer, a power cut) cannot, so each such folder holds :data:`OWNER_NAME`, a
JSON record of its owner: the host, the PID and the process's start time (field 22 of ``/proc/PID/stat``,
:class:`mergelab.process_identity.ProcessIdentity`), and the writer removes it just before publishing. The next
writer of the same target calls :func:`remove_stale` on the temporary folders next to it: a folder is removed
only when its record names this host and a process that no longer exists, or whose PID now belongs to a process
started at another time. A running owner's folder is never touched; a folder of another host, or one without a
readable record (a writer that has just created it, or an older mergelab), is left alone and named in a warning.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Iterable
from pathlib import Path

from mergelab.atomic_files import remove_leftover
from mergelab.process_identity import ProcessIdentity

logger = logging.getLogger(__name__)

#: The file in a temporary folder that names its owner (removed before the folder is published).
OWNER_NAME = ".mergelab-writer.json"


def temporary_folders(parent: Path, pattern: str) -> list[Path]:
    """The folders in ``parent`` whose whole name matches the regular expression ``pattern`` (a target's
    temporary folders), sorted; symbolic links are never listed, and an unreadable ``parent`` lists none."""
    name = re.compile(pattern)
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if name.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def write_owner(folder: Path) -> None:
    """Record in ``folder`` (new and empty) that this process writes it: host, PID and process start time."""
    me = ProcessIdentity.of()
    record = {"host": socket.gethostname(), "pid": me.pid, "start": me.start}
    with open(Path(folder) / OWNER_NAME, "x", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def owner_status(folder: Path) -> tuple[str, str]:
    """``("gone" | "running" | "unknown", why)`` for ``folder``'s owner: gone (the process exited, or its PID
    names another process now), running, or unknown (no readable record, or another host)."""
    try:
        owner = json.loads((Path(folder) / OWNER_NAME).read_text(encoding="utf-8"))
        host, pid, start = owner["host"], int(owner["pid"]), owner["start"]
        start = None if start is None else int(start)
    except (OSError, ValueError, TypeError, KeyError):
        return "unknown", "it names no owner (delete it by hand if no writer of this target is running)"
    if host != socket.gethostname():
        return "unknown", f"its writer ran on host {host}"
    state = ProcessIdentity(pid, start).state()
    if state == "gone":
        return "gone", f"pid {pid}, no longer running"
    if state == "reused":
        return "gone", f"pid {pid}, which now names another process"
    return "running", f"its writer (pid {pid}) is running"


def remove_stale(candidates: Iterable[Path], target: str | Path) -> list[Path]:
    """Remove the folders among ``candidates`` (temporary folders of ``target``'s writers) whose owner is gone;
    returns them. Each removal is a warning naming the folder and its owner; folders without an owner record or
    of another host are named in a warning and kept; a running owner's folder is kept silently."""
    removed: list[Path] = []
    for folder in candidates:
        status, why = owner_status(folder)
        if status == "running":
            logger.debug("%s: %s: %s", target, folder, why)
            continue
        if status != "gone":
            logger.warning("%s: leaving %s alone: %s", target, folder, why)
            continue
        if remove_leftover(folder, f"{target}: the temporary folder of a writer that is gone ({why})"):
            logger.warning("%s: removed %s, the temporary folder of an interrupted writer (%s)", target, folder, why)
            removed.append(folder)
    return removed
