"""The merge record: what was merged, how, from which exact inputs.

Content hashes of multi-GB inputs are expensive (SHA-256 runs at about 1.5 GB/s here), and the same
inputs are typically merged many times while sweeping methods and parameters. :func:`input_digest` caches
each file's digest keyed by (absolute path, size, mtime_ns, inode) in ``<cache>/digests.json``, the way
git's index trusts stat data: a file that changed in any of these is hashed again.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any

from mergelab import __version__
from mergelab.atomic_files import write_text_atomic
from mergelab.checkpoints import file_digest
from mergelab.errors import MergeLabError
from mergelab.untrusted_input import read_json_file

_LOCK = threading.Lock()


def cache_dir() -> Path:
    """mergelab's cache folder: ``$MERGELAB_CACHE`` or ``~/.cache/mergelab``."""
    return Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab"))


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _read_digest_cache(store: Path) -> dict[str, str]:
    """The digest cache's entries; empty when it is missing, unreadable or not a JSON object of strings (a
    damaged cache is rebuilt, never an error)."""
    try:
        cached = read_json_file(store, what="digest cache")
    except (OSError, MergeLabError):
        return {}
    if not isinstance(cached, dict):
        return {}
    return {k: v for k, v in cached.items() if isinstance(v, str)}


def input_digest(path: Path, *, use_cache: bool = True) -> str:
    """``sha256:<hex>`` of ``path``, reusing a cached digest when the file's stat data is unchanged."""
    path = Path(path)
    if not use_cache:
        return file_digest(path)
    key = _stat_key(path)
    store = cache_dir() / "digests.json"
    with _LOCK:
        cached = _read_digest_cache(store)
        if key in cached:
            return cached[key]
    digest = file_digest(path)
    with _LOCK:
        cached = _read_digest_cache(store)
        cached[key] = digest
        try:
            write_text_atomic(store, json.dumps(cached))  # a random O_EXCL temporary name: no planted link is followed
        except OSError:
            pass  # the cache is an optimisation; a read-only home must not fail a merge
    return digest


def environment() -> dict[str, Any]:
    """Versions of mergelab, torch and Python; torch's comes from the loaded module when imported, else from
    the installed distribution's metadata (so recording it does not import torch)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch_version = torch.__version__
    else:
        try:
            torch_version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            torch_version = None
    return {
        "mergelab": __version__,
        "torch": torch_version,
        "python": platform.python_version(),
    }
