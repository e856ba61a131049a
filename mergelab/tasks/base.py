"""Core types of the task suite: the built :class:`TaskData`, the unbuilt :class:`TaskSpec`, raw splits.

Every task is built in two stages:

1. a *builder* returns a :class:`RawTask`: images as **ink intensities** ``p`` in ``[0, 1]`` (float32,
   shape ``[N, 28, 28]``; 0 = background, 1 = full ink) and int64 labels, for a train and a test split;
2. :func:`finalize` standardises the images with **one scalar mean and standard deviation computed over all
   pixels of that task's train split** (float64 accumulation), ``x = (p - mean) / std``, so that every train
   split has mean exactly ~0 and standard deviation ~1, and the test split uses the *train* statistics.
   The images then get a channel axis: ``x`` is float32 ``[N, 1, 28, 28]``.

The ``(mean, std)`` pair is kept in :attr:`TaskData.norm`, so ``p = x * std + mean`` recovers the ink
intensities (e.g. for plotting).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

#: Side length of every task image.
IMAGE_SIZE = 28

#: Base seed of the whole suite; each task derives its own stream from it and its name (see :func:`task_rng`).
BASE_SEED = 20_251_122


@dataclass(frozen=True)
class TaskData:
    """One built classification task: standardised images and labels, train and test splits.

    ``x_*`` are float32 ``[N, 1, 28, 28]`` with ``x = (p - norm[0]) / norm[1]`` for ink intensities ``p`` in
    ``[0, 1]``; ``y_*`` are int64 ``[N]`` in ``[0, num_classes)``.
    """

    name: str
    num_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    description: str
    class_names: tuple[str, ...] = ()
    norm: tuple[float, float] = (0.0, 1.0)

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return int(self.y_test.shape[0])


@dataclass(frozen=True)
class RawTask:
    """A task before standardisation: ink intensities in ``[0, 1]``, float32 ``[N, 28, 28]``, int64 labels."""

    p_train: np.ndarray
    y_train: np.ndarray
    p_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class TaskSpec:
    """A registered task that has not necessarily been built yet.

    ``family`` groups related tasks (``"mnist"``, ``"mnist_labelmap"``, ``"digits"``, ``"mnist1d"``,
    ``"geometry"``, ``"texture"``) so experiments can pick close or distant task sets. ``version`` is bumped
    whenever the builder's output changes; it is part of the cache key.
    """

    name: str
    num_classes: int
    description: str
    family: str
    builder: Callable[[], RawTask] = field(repr=False, compare=False)
    class_names: tuple[str, ...] = ()
    version: str = "1"


def task_rng(name: str, *extra: int) -> np.random.Generator:
    """A numpy generator seeded from :data:`BASE_SEED` and a stable (CRC-32) hash of ``name``.

    The stream is identical in every process and on every platform (``PCG64`` via ``SeedSequence``).
    """
    return np.random.default_rng([BASE_SEED, zlib.crc32(name.encode("utf-8")), *extra])


def finalize(spec_name: str, num_classes: int, description: str, raw: RawTask,
             class_names: tuple[str, ...] = ()) -> TaskData:
    """Check a :class:`RawTask`, standardise it with its train statistics and wrap it as :class:`TaskData`."""
    for split, p, y in (("train", raw.p_train, raw.y_train), ("test", raw.p_test, raw.y_test)):
        if p.ndim != 3 or p.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or p.shape[0] != y.shape[0]:
            raise ValueError(f"task {spec_name!r}: bad {split} shapes {p.shape} / {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"task {spec_name!r}: {split} labels outside [0, {num_classes})")
        if not np.all(np.isfinite(p)):
            raise ValueError(f"task {spec_name!r}: non-finite {split} pixels")
    mean = float(np.mean(raw.p_train, dtype=np.float64))
    std = float(np.std(raw.p_train, dtype=np.float64))
    return TaskData(
        name=spec_name,
        num_classes=num_classes,
        x_train=torch.from_numpy(standardise(raw.p_train, mean, std)),
        y_train=torch.from_numpy(np.array(raw.y_train, dtype=np.int64, copy=True)),
        x_test=torch.from_numpy(standardise(raw.p_test, mean, std)),
        y_test=torch.from_numpy(np.array(raw.y_test, dtype=np.int64, copy=True)),
        description=description,
        class_names=tuple(class_names),
        norm=(mean, std),
    )


def standardise(p: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(p - mean) / std`` as a contiguous float32 ``[N, 1, 28, 28]`` array (computed in float64)."""
    x = (p.astype(np.float64) - mean) / std
    return np.ascontiguousarray(x.astype(np.float32)[:, None, :, :])
