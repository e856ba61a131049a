"""Which process is this: a PID plus the process's start time, so a reused PID is not mistaken for its owner.

A PID alone does not name a process for long: once a process exits, the kernel hands its number to the next
process it starts (``/proc/sys/kernel/pid_max`` is 32768 or 4194304; a busy machine wraps it in hours). A
record that says "running under PID 1234" must therefore also say *which* 1234: here, the process's start
time, field 22 (``starttime``) of ``/proc/PID/stat``, in clock ticks since boot (``SC_CLK_TCK``, usually 100
per second; proc(5)). Two processes alive at different times never share ``(pid, starttime)``.

The absolute start time (:func:`start_epoch`) adds ``btime`` of ``/proc/stat`` (the boot time in seconds since
the epoch, which the kernel derives from the clock and may report a second apart between reads); it serves to
judge records that carry only a PID (:data:`EPOCH_SLACK_S`).

Off Linux (no ``/proc``) the start time is unknown (``None``) and callers fall back to the PID alone.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

#: Tolerance, in seconds, when comparing an absolute start time with a wall-clock timestamp: ``btime`` may
#: move by a second between reads (clock adjustments), and the start tick is rounded down to 1/CLK_TCK.
EPOCH_SLACK_S = 2.0


def start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks after boot (``/proc/PID/stat`` field 22), or ``None``
    when it is not running or the platform has no ``/proc``."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    # field 2 (comm) is parenthesised and may itself hold spaces and ')': split after the last ')'
    rest = text[text.rfind(")") + 2:].split()
    try:
        return int(rest[19])  # rest[0] is field 3 (state), so field 22 is rest[19]
    except (IndexError, ValueError):
        return None


def boot_epoch() -> float | None:
    """``btime`` of ``/proc/stat``: the boot time in seconds since the epoch (``None`` off Linux)."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def start_epoch(pid: int) -> float | None:
    """When process ``pid`` started, in seconds since the epoch (``btime + starttime / SC_CLK_TCK``), or
    ``None`` when unknown. Good to about :data:`EPOCH_SLACK_S`."""
    ticks, boot = start_ticks(pid), boot_epoch()
    if ticks is None or boot is None:
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def pid_exists(pid: int) -> bool:
    """Whether a process with this PID exists (``kill(pid, 0)``; one owned by another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclasses.dataclass(frozen=True)
class ProcessIdentity:
    """A process named by ``pid`` and ``start`` (:func:`start_ticks`; ``None`` when unknown)."""

    pid: int
    start: int | None

    @classmethod
    def of(cls, pid: int | None = None) -> ProcessIdentity:
        """The identity of process ``pid`` (default: this process) as it is now."""
        pid = os.getpid() if pid is None else int(pid)
        return cls(pid, start_ticks(pid))

    def state(self) -> str:
        """``"alive"`` (the same process runs), ``"gone"`` (no process has the PID), ``"reused"`` (another
        process has the PID now: its start time differs) or ``"unknown"`` (the PID is taken but either start
        time is unknown, so it may be the same process)."""
        now = start_ticks(self.pid)  # read first: a PID that exits in between is "gone", not "unknown"
        if now is None:
            return "unknown" if pid_exists(self.pid) else "gone"
        if self.start is None:
            return "unknown"
        return "alive" if now == self.start else "reused"
