"""Task-changing transformations of ink-intensity images ``[N, 28, 28]`` in [0, 1], and label maps.

Image transforms are applied identically to train and test splits; random ones (noise, the patch
permutation) take an explicit ``numpy.random.Generator`` so they are deterministic.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mergelab.tasks.sources import upsample


def rotate(p: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate every image counter-clockwise by ``degrees`` about its centre (bilinear, zero fill, same size).

    Multiples of 90 degrees are exact (``np.rot90``).
    """
    if float(degrees) % 90 == 0:
        return np.ascontiguousarray(np.rot90(p, k=int(degrees // 90) % 4, axes=(1, 2)))
    out = ndimage.rotate(p, degrees, axes=(2, 1), reshape=False, order=1, mode="constant", cval=0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def mirror(p: np.ndarray) -> np.ndarray:
    """Left-right mirror image."""
    return np.ascontiguousarray(p[:, :, ::-1])


def invert(p: np.ndarray) -> np.ndarray:
    """Photographic negative ``1 - p`` (after per-task standardisation this equals negating the input)."""
    return (1.0 - p).astype(np.float32)


def add_noise(p: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add i.i.d. Gaussian pixel noise of standard deviation ``std`` and clip back to [0, 1]."""
    noise = rng.standard_normal(p.shape) * std
    return np.clip(p + noise, 0.0, 1.0).astype(np.float32)


def low_resolution(p: np.ndarray, factor: int = 4) -> np.ndarray:
    """Average-pool by ``factor`` (28 -> 7 for 4) and upsample back bilinearly: a blurred, blocky digit."""
    n, h, w = p.shape
    small = p.reshape(n, h // factor, factor, w // factor, factor).mean(axis=(2, 4))
    return np.clip(upsample(small, h), 0.0, 1.0).astype(np.float32)


def patch_permutation(grid: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of ``grid * grid`` patches that moves every patch (a derangement)."""
    n = grid * grid
    while True:
        perm = rng.permutation(n)
        if np.all(perm != np.arange(n)):
            return perm


def permute_patches(p: np.ndarray, perm: np.ndarray, grid: int) -> np.ndarray:
    """Cut each image into ``grid x grid`` square patches and rearrange them: output patch ``k`` is input
    patch ``perm[k]`` (row-major patch order)."""
    n, h, w = p.shape
    s = h // grid
    patches = p.reshape(n, grid, s, grid, s).transpose(0, 1, 3, 2, 4).reshape(n, grid * grid, s, s)
    patches = patches[:, perm]
    return np.ascontiguousarray(patches.reshape(n, grid, grid, s, s).transpose(0, 1, 3, 2, 4).reshape(n, h, w))


# Label maps on digit labels 0..9: (mapping array, class names).
LABEL_MAPS: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {
    "parity": (np.arange(10) % 2, ("even", "odd")),
    "ge5": ((np.arange(10) >= 5).astype(np.int64), ("<5", ">=5")),
    "mod3": (np.arange(10) % 3, ("0 mod 3", "1 mod 3", "2 mod 3")),
}


def map_labels(y: np.ndarray, name: str) -> np.ndarray:
    """Apply the digit label map ``name`` (one of :data:`LABEL_MAPS`) to labels ``y``."""
    table, _ = LABEL_MAPS[name]
    return table.astype(np.int64)[y]
