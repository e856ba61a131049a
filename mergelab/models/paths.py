"""Where the zoo lives on disk.

Cache root: ``cache_dir`` if given, else ``$MERGELAB_CACHE``, else ``~/.cache/mergelab``. Layout::

    <root>/zoo/<arch>/pretrained/            backbone.safetensors, head.safetensors (pool head),
                                              pretrained.json
    <root>/zoo/<arch>/experts/<task>/<hash>/  backbone.safetensors, head.safetensors, expert.json,
                                              checkpoints/step_<s>/ (when checkpoint_every > 0)
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root directory (not created)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MERGELAB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mergelab"


def arch_dir(arch: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<root>/zoo/<arch>``."""
    return cache_root(cache_dir) / "zoo" / arch


def pretrained_dir(arch: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<root>/zoo/<arch>/pretrained``."""
    return arch_dir(arch, cache_dir) / "pretrained"


def expert_dir(arch: str, task: str, spec_hash: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<root>/zoo/<arch>/experts/<task>/<spec_hash>``."""
    return arch_dir(arch, cache_dir) / "experts" / task / spec_hash
