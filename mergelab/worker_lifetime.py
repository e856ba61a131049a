"""Pool workers that exit when their driver dies, so a killed study leaves no idle processes behind.

A process pool's workers block on the pool's queue; when the driver is killed outright (``kill -9``, or a
SIGTERM it does not handle) nobody tells them to stop, and they -- and multiprocessing's resource tracker,
which exits only when every process holding its pipe has exited -- would wait forever. A worker calls
:func:`exit_with_parent` in its initializer with the driver's identity:

- on Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (prctl(2)): the kernel sends the worker SIGTERM the moment
  the thread that started it exits. The pool starts its workers from the thread that submits work, which is
  the thread running the study for as long as the pool lives;
- everywhere (POSIX), a daemon thread checks every :data:`POLL_S` seconds whether the worker's parent is
  still the driver (``os.getppid()`` changes when the parent dies and the worker is re-parented). If not, it
  sends the worker SIGTERM and, should the worker still run :data:`GRACE_S` seconds later (a task that
  handles SIGTERM without exiting), ends it with ``os._exit``.

Both also cover a driver that died before the initializer ran.

SIGTERM, not SIGKILL: a task's own SIGTERM handler (if it installs one) gets to clean up its temporary files.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

#: Seconds between two checks of the watchdog thread.
POLL_S = 1.0

#: Seconds the watchdog waits after its SIGTERM before ending the worker with ``os._exit(EXIT_CODE)``.
GRACE_S = 10.0

#: Exit status of a worker ended by the watchdog (128 + SIGTERM, as a shell reports a SIGTERM'd process).
EXIT_CODE = 128 + signal.SIGTERM

#: prctl(2) option: signal to send when the parent thread exits (linux/prctl.h).
PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask the Linux kernel to send ``signum`` to this process when its parent (thread) exits.

    Returns whether it was set (``False`` off Linux or when libc's ``prctl`` is unavailable).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return False
    except (OSError, AttributeError) as exc:
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
        return False
    return True


def _orphaned(parent_pid: int) -> bool:
    return os.getppid() != parent_pid


def _end_self() -> None:
    """SIGTERM to this process; if that does not end it within :data:`GRACE_S` seconds, ``os._exit``."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(EXIT_CODE)


def _watch(parent_pid: int) -> None:
    while not _orphaned(parent_pid):
        time.sleep(POLL_S)
    _end_self()


def exit_with_parent(parent_pid: int) -> None:
    """Make this worker exit when process ``parent_pid`` (its parent, the driver) dies; see the module
    docstring. Exits at once if the parent is already gone. A no-op off POSIX."""
    if os.name != "posix":
        return
    set_parent_death_signal(signal.SIGTERM)
    if _orphaned(parent_pid):  # the driver died before the death signal was set
        _end_self()
    threading.Thread(target=_watch, args=(parent_pid,), name="mergelab-parent-watch", daemon=True).start()
