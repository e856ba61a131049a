"""Core types of the task suite: the built :class:`TaskData`, the unbuilt :class:`TaskSpec`, raw splits.

Every task is built in two stages:

1. a *builder* returns a :class:`RawTask`: images as **ink intensities** ``p`` in ``[0, 1]`` (float,
   shape ``[N, 28, 28]``; 0 = background, 1 = full ink) and int64 labels, for a train and a test split;
2. :func:`finalize` quantises the images to 8 bits like real image files, ``u = rint(255 * p)``, and
   standardises them with **one scalar mean and standard deviation computed over all pixels of that task's
   train split**: ``x = (u / 255 - mean) / std`` (computed in float64, stored as float32). Every train split
   thus has mean ~0 and standard deviation ~1; the test split uses the *train* statistics. The images get a
   channel axis: ``x`` is float32 ``[N, 1, 28, 28]``.

The ``(mean, std)`` pair is kept in :attr:`TaskData.norm`, so ``p = x * std + mean`` recovers the ink
intensities (e.g. for plotting), and ``rint(255 * p)`` the exact 8-bit images (what the cache stores).
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
    """Check a :class:`RawTask`, quantise it to 8 bits, standardise with its train statistics, wrap it."""
    for split, p, y in (("train", raw.p_train, raw.y_train), ("test", raw.p_test, raw.y_test)):
        if p.ndim != 3 or p.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or p.shape[0] != y.shape[0]:
            raise ValueError(f"task {spec_name!r}: bad {split} shapes {p.shape} / {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"task {spec_name!r}: {split} labels outside [0, {num_classes})")
        if not np.all(np.isfinite(p)):
            raise ValueError(f"task {spec_name!r}: non-finite {split} pixels")
    u_train, u_test = quantise(raw.p_train), quantise(raw.p_test)
    ink = u_train.astype(np.float64) / 255.0
    norm = (float(ink.mean()), float(ink.std()))
    return from_uint8(spec_name, num_classes, description, u_train, raw.y_train, u_test, raw.y_test,
                      norm, class_names)


def quantise(p: np.ndarray) -> np.ndarray:
    """Ink intensities in [0, 1] -> 8-bit images ``rint(255 * clip(p, 0, 1))``."""
    return np.rint(np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def standardise(u: np.ndarray, mean: float, std: float) -> np.ndarray:
    """8-bit images ``[N, 28, 28]`` -> contiguous float32 ``[N, 1, 28, 28]`` ``(u / 255 - mean) / std``."""
    x = (u.astype(np.float64) / 255.0 - mean) / std
    return np.ascontiguousarray(x.astype(np.float32)[:, None, :, :])


def to_uint8(x: torch.Tensor, norm: tuple[float, float]) -> np.ndarray:
    """Invert :func:`standardise`: float32 ``[N, 1, 28, 28]`` -> the 8-bit images ``[N, 28, 28]``."""
    mean, std = norm
    return np.rint((x[:, 0].numpy().astype(np.float64) * std + mean) * 255.0).clip(0, 255).astype(np.uint8)


def from_uint8(name: str, num_classes: int, description: str, u_train: np.ndarray, y_train: np.ndarray,
               u_test: np.ndarray, y_test: np.ndarray, norm: tuple[float, float],
               class_names: tuple[str, ...] = ()) -> TaskData:
    """Assemble a :class:`TaskData` from 8-bit images, labels and the ``(mean, std)`` of standardisation."""
    mean, std = float(norm[0]), float(norm[1])
    return TaskData(
        name=name,
        num_classes=int(num_classes),
        x_train=torch.from_numpy(standardise(u_train, mean, std)),
        y_train=torch.from_numpy(np.array(y_train, dtype=np.int64, copy=True)),
        x_test=torch.from_numpy(standardise(u_test, mean, std)),
        y_test=torch.from_numpy(np.array(y_test, dtype=np.int64, copy=True)),
        description=description,
        class_names=tuple(class_names),
        norm=(mean, std),
    )
