"""On-disk cache of built tasks: one ``.npz`` file per task, keyed by a version string, written atomically.

Location, first match wins: the ``cache_dir`` argument (used as is), ``$MERGELAB_CACHE/tasks``,
``~/.cache/mergelab/tasks``. A task is stored as ``<dir>/<name>-v<version>.npz`` where ``version`` is
``SUITE_VERSION`` joined with the task's own version, so a change to a generator invalidates exactly the
files it affects (older versions are left in place and simply no longer read). Files are written to a
temporary name in the same directory and moved into place with :func:`os.replace`, so readers never see a
partial file and concurrent builders of the same task are harmless. A file that cannot be read or does not
match its expected version is logged and rebuilt.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from mergelab.tasks.base import IMAGE_SIZE, TaskData

log = logging.getLogger(__name__)

#: Bumped when code shared by all tasks (source splits, normalisation, file layout) changes.
SUITE_VERSION = "1"

_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The directory holding task files (not created here)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MERGELAB_CACHE")
    if env:
        return Path(env).expanduser() / "tasks"
    return Path.home() / ".cache" / "mergelab" / "tasks"


def cache_key(task_version: str) -> str:
    """The version string of a task file: suite version and task version."""
    return f"{SUITE_VERSION}.{task_version}"


def cache_path(cache_dir: Path, name: str, task_version: str) -> Path:
    """Path of the cache file of task ``name`` at ``task_version``."""
    return cache_dir / f"{name}-v{cache_key(task_version)}.npz"


def save_task(task: TaskData, path: Path, version: str) -> None:
    """Write ``task`` to ``path`` atomically (temporary file in the same directory, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(
                fh,
                x_train=task.x_train.numpy(), y_train=task.y_train.numpy(),
                x_test=task.x_test.numpy(), y_test=task.y_test.numpy(),
                name=np.asarray(task.name), num_classes=np.asarray(task.num_classes, dtype=np.int64),
                description=np.asarray(task.description),
                class_names=np.asarray(task.class_names, dtype=np.str_),
                norm=np.asarray(task.norm, dtype=np.float64),
                version=np.asarray(version),
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_task(path: Path, name: str, version: str) -> TaskData | None:
    """Read a cached task; ``None`` if the file is missing, unreadable, or not the expected name/version."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["version"]) != version or str(z["name"]) != name:
                log.warning("cache file %s holds %s v%s, expected %s v%s; rebuilding",
                            path, z["name"], z["version"], name, version)
                return None
            arrays = {k: z[k] for k in _ARRAYS}
            task = TaskData(
                name=name,
                num_classes=int(z["num_classes"]),
                x_train=torch.from_numpy(arrays["x_train"]),
                y_train=torch.from_numpy(arrays["y_train"]),
                x_test=torch.from_numpy(arrays["x_test"]),
                y_test=torch.from_numpy(arrays["y_test"]),
                description=str(z["description"]),
                class_names=tuple(str(c) for c in z["class_names"]),
                norm=(float(z["norm"][0]), float(z["norm"][1])),
            )
    except (OSError, EOFError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        log.warning("cache file %s is unreadable (%s: %s); rebuilding", path, type(exc).__name__, exc)
        return None
    for split in ("train", "test"):
        x, y = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
        if (x.dtype != torch.float32 or y.dtype != torch.int64 or x.ndim != 4
                or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE) or x.shape[0] != y.shape[0]):
            log.warning("cache file %s has malformed %s arrays; rebuilding", path, split)
            return None
    return task
