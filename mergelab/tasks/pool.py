"""The pretraining pool: labelled data disjoint from every expert task, as one joint classification task.

Components, in label-offset order:

================  =======  ===========  ================================================================
component         classes  train/test   source
================  =======  ===========  ================================================================
mnist_pretrain    10       1,250 / 250  the 1,500 MNIST digits of ``mnist_split().pretrain``, which no
                                        expert task uses (expert tasks use ``.train`` / ``.test``)
grid_position     9        2,000 / 500  pool-only procedural generator
texture_type      4        2,000 / 500  pool-only procedural generator
polygon_outline   4        2,000 / 500  pool-only procedural generator
line_count        4        2,000 / 500  pool-only procedural generator
================  =======  ===========  ================================================================

Total 31 classes, 9,250 train / 2,250 test examples. Component ``k``'s labels are offset by the number of
classes of the components before it. Disjointness: the MNIST indices are disjoint from all expert tasks'
by construction (tested); sklearn digits and MNIST-1D are used by expert tasks only; the pool's procedural
generators are not used by any expert task and draw from their own seeds. The pool is standardised like a
task, with the mean/std of its whole train split; train and test examples are shuffled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mergelab.tasks import procedural
from mergelab.tasks.base import RawTask, TaskData, finalize, task_rng
from mergelab.tasks.sources import load_mnist, mnist_split, stratified_split

POOL_NAME = "pretraining_pool"
POOL_VERSION = "1"
POOL_DESCRIPTION = ("pretraining pool disjoint from the expert tasks: held-out MNIST digits + 4 pool-only "
                    "procedural tasks (grid position, texture type, polygon sides, line count), joint labels")
POOL_PROCEDURAL_TRAIN = 2000
POOL_PROCEDURAL_TEST = 500
MNIST_PRETRAIN_TEST_PER_CLASS = 25


@dataclass(frozen=True)
class PoolComponent:
    """One sub-task of the pool and the slice ``[offset, offset + num_classes)`` of the joint labels."""

    name: str
    num_classes: int
    offset: int
    class_names: tuple[str, ...]


def pool_components() -> tuple[PoolComponent, ...]:
    """The pool's components with their label offsets (cheap: nothing is built)."""
    parts = [("mnist_pretrain", tuple(str(d) for d in range(10)))]
    parts += [(name, t.class_names) for name, t in procedural.POOL_GENERATORS.items()]
    out, offset = [], 0
    for name, classes in parts:
        out.append(PoolComponent(name, len(classes), offset, classes))
        offset += len(classes)
    return tuple(out)


def _mnist_pretrain() -> RawTask:
    p, y = load_mnist()
    pre = mnist_split().pretrain
    per_class = int(np.bincount(y[pre]).min())
    train, test = stratified_split(y[pre], [per_class - MNIST_PRETRAIN_TEST_PER_CLASS, -1],
                                   task_rng("pool:mnist_pretrain"))
    return RawTask(p[pre[train]], y[pre[train]], p[pre[test]], y[pre[test]])


def _procedural(name: str) -> RawTask:
    gen = procedural.POOL_GENERATORS[name].generate
    n_train = POOL_PROCEDURAL_TRAIN
    p, y = gen(n_train + POOL_PROCEDURAL_TEST, task_rng(f"pool:{name}"))
    return RawTask(p[:n_train], y[:n_train], p[n_train:], y[n_train:])


def build_pool() -> TaskData:
    """Build the pool (uncached): all components, joint labels, shuffled, standardised."""
    comps = pool_components()
    raws = [_mnist_pretrain()] + [_procedural(c.name) for c in comps[1:]]
    rng = task_rng(POOL_NAME)
    splits = {}
    for split in ("train", "test"):
        p = np.concatenate([getattr(r, f"p_{split}") for r in raws])
        y = np.concatenate([getattr(r, f"y_{split}") + c.offset for r, c in zip(raws, comps)])
        order = rng.permutation(len(y))
        splits[split] = (p[order], y[order])
    raw = RawTask(splits["train"][0], splits["train"][1], splits["test"][0], splits["test"][1])
    class_names = tuple(f"{c.name}:{n}" for c in comps for n in c.class_names)
    return finalize(POOL_NAME, len(class_names), POOL_DESCRIPTION, raw, class_names)
