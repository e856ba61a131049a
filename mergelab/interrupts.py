"""SIGTERM and SIGHUP handled like Ctrl-C: the work unwinds through its ``with`` blocks and ``finally`` clauses
(an atomic writer deletes its temporary folder), then the command exits non-zero with a one-line message.

Python turns SIGINT into :class:`KeyboardInterrupt`, but by default SIGTERM (``kill``, a batch scheduler, a
container stop) and SIGHUP (a closed terminal or SSH session) end the process at once and leave its temporary
files behind. Under :func:`signals_as_interrupts` they raise :class:`Terminated`, a :class:`KeyboardInterrupt`,
in the main thread instead. Only the first signal raises: a second one while the first unwinds is ignored, so
the clean-up is not itself interrupted (SIGKILL still ends everything; a later merge to the same target then
removes the dead writer's temporary folder, see :mod:`mergelab.checkpoints.writer`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

#: The signals handled like Ctrl-C.
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when a terminating signal arrives; ``signum`` is the signal's number and the
    conventional exit status is ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_as_interrupts(signals: tuple[signal.Signals, ...] = TERMINATING_SIGNALS) -> Iterator[None]:
    """Within the block, each of ``signals`` (default SIGTERM and SIGHUP) raises :class:`Terminated` in the main
    thread (the first one only; later ones are ignored until the block ends); the previous handlers are restored
    afterwards. Outside the main thread (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if raised:
            return
        raised = True
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
