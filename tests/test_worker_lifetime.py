"""Workers exit when their parent dies (mergelab.worker_lifetime), by either mechanism.

Each test builds a chain pytest -> parent -> child, where the child calls ``exit_with_parent(parent)`` and
then blocks forever, kills the parent with SIGKILL and waits (bounded) until the child is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mergelab

CODE = str(Path(mergelab.__file__).resolve().parent.parent)  # the mergelab under test

_CHILD = """
import os, signal, sys, time
import mergelab.worker_lifetime as w
{setup}
w.exit_with_parent(os.getppid())
print("ready", flush=True)
while True:        # block until killed; nothing here depends on the parent
    time.sleep(3600)
"""

_PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {child!r}], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         text=True)
assert child.stdout.readline() == "ready\\n"
print(child.pid, flush=True)
sys.stdin.read()
"""


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rfind(")") + 2:].split()[0] != "Z"


def _orphan_exits(setup: str, wait_s: float = 30.0) -> bool:
    """Start the chain with ``setup`` run in the child first, SIGKILL the parent, and report whether the child
    exited within ``wait_s`` seconds."""
    script = _PARENT.format(child=_CHILD.format(setup=setup))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([CODE, os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + wait_s
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(child):
        os.kill(child, signal.SIGKILL)
        return False
    return True


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")


def test_parent_death_signal_alone_ends_the_orphan():
    """prctl(PR_SET_PDEATHSIG) without the watchdog thread."""
    assert _orphan_exits("w._watch = lambda parent: None")


def test_watchdog_alone_ends_the_orphan():
    """The portable fallback: without prctl, the thread polling os.getppid() ends the worker."""
    assert _orphan_exits("w.set_parent_death_signal = lambda *a: False")


def test_watchdog_ends_an_orphan_that_ignores_sigterm():
    """A task that ignores SIGTERM is ended by os._exit after the grace period."""
    assert _orphan_exits("w.set_parent_death_signal = lambda *a: False; w.GRACE_S = 0.2; "
                         "signal.signal(signal.SIGTERM, signal.SIG_IGN)")


def test_without_either_mechanism_the_orphan_stays():
    """The control: with both mechanisms disabled the child outlives its parent (so the tests above are not
    passing for another reason). Waiting longer than 2 s would not change the outcome: nothing ends it."""
    assert not _orphan_exits("w.set_parent_death_signal = lambda *a: False; w._watch = lambda parent: None", 2.0)
