"""Content hashing of checkpoint files.

:func:`file_digest` streams a file through SHA-256 in 4 MiB chunks read into one reused buffer, so
hashing a multi-GB shard costs 4 MiB of memory. Used to identify merge inputs in the merge record.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mergelab.errors import CheckpointError

CHUNK_BYTES = 4 * 1024 * 1024


def file_digest(path: Path) -> str:
    """``"sha256:<hex>"`` of the file's bytes; CheckpointError naming the file if it cannot be read."""
    path = Path(path)
    h = hashlib.sha256()
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read for hashing: {exc.strerror or exc}") from None
    return f"sha256:{h.hexdigest()}"
