"""On-disk cache of built tasks: one ``.npz`` file per task, keyed by a version string, written atomically.

Location, first match wins: the ``cache_dir`` argument (used as is), ``$MERGELAB_CACHE/tasks``,
``~/.cache/mergelab/tasks``. A task is stored as ``<dir>/<name>-v<version>.npz`` where ``version`` is
``SUITE_VERSION`` joined with the task's own version, so a change to a generator invalidates exactly the
files it affects (older versions are left in place and simply no longer read). A file holds the 8-bit
images (uncompressed: fast to read, ~2.7 MB per 3,500 images), the labels, the ``(mean, std)`` of
standardisation and the metadata; loading re-standardises with :func:`~mergelab.tasks.base.standardise`,
which reproduces the built float32 arrays bit for bit. Files are written to a
temporary name in the same directory and moved into place with :func:`os.replace`, so readers never see a
partial file and concurrent builders of the same task are harmless. A file that cannot be read or does not
match its expected version is logged and rebuilt.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from mergelab.atomic_files import open_atomic
from mergelab.tasks.base import IMAGE_SIZE, TaskData, from_uint8, standardise, to_uint8

log = logging.getLogger(__name__)

#: Bumped when code shared by all tasks (source splits, normalisation, file layout) changes.
SUITE_VERSION = "2"



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
    """Write ``task`` to ``path`` atomically (temporary file in the same directory, then ``os.replace``).

    The images are stored as 8 bits (see :mod:`mergelab.tasks.base`); a task whose float images are not
    exactly the standardised form of 8-bit images raises ``ValueError`` instead of being cached lossily.
    """
    images = {}
    for split in ("train", "test"):
        x = getattr(task, f"x_{split}")
        u = to_uint8(x, task.norm)
        if not np.array_equal(standardise(u, *task.norm), x.numpy()):
            raise ValueError(f"task {task.name!r}: {split} images are not standardised 8-bit images")
        images[split] = u
    with open_atomic(path, "wb") as fh:
        np.savez(
            fh,
            images_train=images["train"], y_train=task.y_train.numpy(),
            images_test=images["test"], y_test=task.y_test.numpy(),
            name=np.asarray(task.name), num_classes=np.asarray(task.num_classes, dtype=np.int64),
            description=np.asarray(task.description),
            class_names=np.asarray(task.class_names, dtype=np.str_),
            norm=np.asarray(task.norm, dtype=np.float64),
            version=np.asarray(version),
        )


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
            u_train, y_train, u_test, y_test = (z[k] for k in ("images_train", "y_train", "images_test", "y_test"))
            for split, u, y in (("train", u_train, y_train), ("test", u_test, y_test)):
                if (u.dtype != np.uint8 or y.dtype != np.int64 or u.ndim != 3
                        or u.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or u.shape[0] != y.shape[0]):
                    log.warning("cache file %s has malformed %s arrays; rebuilding", path, split)
                    return None
            norm = z["norm"]
            return from_uint8(name, int(z["num_classes"]), str(z["description"]), u_train, y_train, u_test,
                              y_test, (float(norm[0]), float(norm[1])), tuple(str(c) for c in z["class_names"]))
    except (OSError, EOFError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        log.warning("cache file %s is unreadable (%s: %s); rebuilding", path, type(exc).__name__, exc)
        return None
