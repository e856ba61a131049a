"""Deterministic, stratified, nested subsets of a task's training split (the *data ratio* of scaling laws)."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from mergelab.errors import SpecError
from mergelab.tasks.base import TaskData


def subset_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded ordering of all indices whose every prefix is (nearly) stratified.

    Within class ``c`` (``n_c`` examples) a random permutation gives ranks ``r = 0..n_c-1``; example ``i``
    gets the key ``(r_i + u_c) / n_c`` with ``u_c ~ U[0, 1)`` per class, and indices are sorted by key.
    A prefix of length ``k`` then holds ``k * n_c / N`` examples of class ``c`` up to one, and prefixes
    are nested, so for one seed a smaller data ratio always selects a subset of a larger one.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        ranks = rng.permutation(len(idx))
        keys[idx] = (ranks + rng.random()) / len(idx)
    return np.argsort(keys, kind="stable")


def subset_indices(task: TaskData, data_ratio: float, seed: int) -> np.ndarray:
    """Sorted indices into ``task``'s train split selected by :func:`subset`."""
    if isinstance(data_ratio, bool) or not isinstance(data_ratio, numbers.Real) or not math.isfinite(data_ratio):
        raise SpecError(f"data_ratio must be a number in (0, 1], got {data_ratio!r}")
    if not 0.0 < data_ratio <= 1.0:
        raise SpecError(f"data_ratio must be in (0, 1], got {data_ratio!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise SpecError(f"seed must be an integer, got {seed!r}")
    n = task.n_train
    k = round(data_ratio * n)
    if k < 1:
        raise SpecError(f"data_ratio={data_ratio!r} selects no example of the {n} training examples "
                        f"of task {task.name!r}; use at least {1 / n:.2g}")
    order = subset_order(task.y_train.numpy(), int(seed))
    return np.sort(order[:k])


def subset(task: TaskData, data_ratio: float, seed: int) -> TaskData:
    """Keep ``round(data_ratio * n_train)`` training examples of ``task``; the test split is unchanged.

    Selection is stratified by class (each class keeps its share up to one example), deterministic in
    ``seed``, nested across ratios for a fixed seed, and preserves the original order of the examples.
    ``data_ratio`` outside ``(0, 1]`` (or so small that nothing is selected) raises
    :class:`~mergelab.errors.SpecError`.
    """
    idx = torch.from_numpy(subset_indices(task, data_ratio, seed))
    return TaskData(
        name=task.name,
        num_classes=task.num_classes,
        x_train=task.x_train[idx],
        y_train=task.y_train[idx],
        x_test=task.x_test,
        y_test=task.y_test,
        description=f"{task.description} [train subset: ratio {data_ratio:g}, seed {seed}]",
        class_names=task.class_names,
        norm=task.norm,
    )


#: Seed of the validation split (distinct from every data seed a fine-tuning spec uses by default).
VALIDATION_SEED = 10_007
#: Size of the validation split: this fraction of the training split, at most :data:`VALIDATION_MAX`.
VALIDATION_FRACTION = 0.1
VALIDATION_MAX = 500


def validation_split(task: TaskData, fraction: float = VALIDATION_FRACTION, max_examples: int = VALIDATION_MAX,
                     seed: int = VALIDATION_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_val, y_val)``: a fixed, class-stratified sample of ``task``'s **training** split for choosing
    hyperparameters (e.g. a merge's lambda, as Ilharco et al. 2023 and Yadav et al. 2023 do on validation data).

    ``min(max_examples, round(fraction * n_train))`` examples (at least one), the first ones of
    :func:`subset_order` with ``seed``; deterministic and independent of the test split, which it never
    touches. The zoo's experts are fine-tuned on the whole training split, so these examples are held out
    from the test split, not from fine-tuning.
    """
    if not 0.0 < fraction <= 1.0:
        raise SpecError(f"validation fraction must be in (0, 1], got {fraction!r}")
    if max_examples < 1:
        raise SpecError(f"validation max_examples must be >= 1, got {max_examples!r}")
    k = max(1, min(int(max_examples), round(fraction * task.n_train)))
    idx = torch.from_numpy(np.sort(subset_order(task.y_train.numpy(), int(seed))[:k]))
    return task.x_train[idx], task.y_train[idx]
