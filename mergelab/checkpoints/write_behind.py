"""Write-behind: a checkpoint writer's ``write`` on a background thread, so the next tensor is computed
while the last one is written."""

from __future__ import annotations

import collections
import contextlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergelab.checkpoints.writer import CheckpointWriter


#: Test hook: with ``$MERGELAB_TEST_PAUSE`` set to a file path, the first :meth:`WriteBehind.put` waits for its
#: tensor to be written, creates that file (holding the temporary folder's path) and sleeps, so a test can signal
#: or kill a merge in the middle of writing deterministically. Sleeps at most this many seconds.
TEST_PAUSE_SECONDS = 300


def _pause_for_tests(writer: CheckpointWriter) -> None:
    marker = os.environ.get("MERGELAB_TEST_PAUSE")
    if not marker or os.path.exists(marker):
        return
    with open(marker, "w", encoding="utf-8") as f:
        f.write(f"{writer.temporary_folder}\n")
    deadline = time.monotonic() + TEST_PAUSE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.05)


class WriteBehind:
    """Hands tensors to a :class:`CheckpointWriter` on a background thread, in order, so the caller computes
    the next tensor while the last one is written (``write`` releases the GIL). One tensor may always wait;
    more while the waiting ones hold at most ``budget`` bytes, so a write held up by the disk does not stop
    the caller at once. Leaving the ``with`` block waits for every pending write (re-raising a write's error;
    after an exception in the block, pending writes still end before the writer may abort and delete)."""

    def __init__(self, writer: CheckpointWriter, budget: int) -> None:
        self.writer = writer
        self.budget = budget
        self._pending: collections.deque[tuple[Future, int]] = collections.deque()
        self._waiting = 0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-write")

    def put(self, name: str, tensor: Any, nbytes: int) -> None:
        """Queue ``tensor`` (``nbytes`` bytes) as the next tensor ``name``; blocks while over budget."""
        while self._pending and self._waiting + nbytes > self.budget:
            done, size = self._pending.popleft()
            done.result()
            self._waiting -= size
        self._pending.append((self._thread.submit(self.writer.write, name, tensor), nbytes))
        self._waiting += nbytes
        if "MERGELAB_TEST_PAUSE" in os.environ:
            for pending, _ in self._pending:
                pending.result()
            _pause_for_tests(self.writer)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            for pending, _ in self._pending:
                if exc_type is None:
                    pending.result()
                else:
                    with contextlib.suppress(BaseException):
                        pending.result()
        finally:
            self._thread.shutdown(wait=True)
