"""Procedurally generated image tasks, drawn with numpy from a seeded generator.

Shapes are described by **signed distance functions** (SDF, in pixels; negative inside) evaluated at the
pixel centres of a 28x28 grid, and turned into anti-aliased ink by ``coverage = clip(0.5 - d, 0, 1)``.
Every generator has the signature ``generate(n, rng) -> (p, y)`` with ``p`` float32 ``[n, 28, 28]`` ink in
[0, 1] and ``y`` int64 ``[n]``, classes balanced (``n // C`` or ``n // C + 1`` each) in random order.
Nuisance factors (position, size, rotation, stroke width, ink intensity, background noise) are random per
image so the label is the only consistent signal.

Two groups of generators exist: :data:`EXPERT_GENERATORS` (used by expert tasks) and
:data:`POOL_GENERATORS` (used only by the pretraining pool). They share drawing primitives but no
generator, so no expert task's data distribution is part of the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mergelab.tasks.base import IMAGE_SIZE

Generator = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]

# Pixel-centre coordinates, x to the right and y downwards, shape [1, 28, 28] for broadcasting over a batch.
_Y, _X = np.meshgrid(np.arange(IMAGE_SIZE) + 0.5, np.arange(IMAGE_SIZE) + 0.5, indexing="ij")
_X, _Y = _X[None], _Y[None]


def _col(a: np.ndarray | float) -> np.ndarray:
    """Per-image parameters ``[n]`` -> ``[n, 1, 1]`` for broadcasting against the pixel grid."""
    return np.asarray(a, dtype=np.float64).reshape(-1, 1, 1)


def coverage(d: np.ndarray) -> np.ndarray:
    """Anti-aliased ink from a signed distance in pixels."""
    return np.clip(0.5 - d, 0.0, 1.0)


def _local(cx: np.ndarray, cy: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in each image's frame centred at (cx, cy) and rotated by ``theta`` (radians)."""
    dx, dy = _X - _col(cx), _Y - _col(cy)
    c, s = np.cos(_col(theta)), np.sin(_col(theta))
    return c * dx + s * dy, -s * dx + c * dy


def sdf_disk(cx, cy, r) -> np.ndarray:
    """Filled disk of radius ``r``."""
    return np.hypot(_X - _col(cx), _Y - _col(cy)) - _col(r)


def sdf_ring(cx, cy, r, width) -> np.ndarray:
    """Circle outline of radius ``r`` and stroke ``width``."""
    return np.abs(np.hypot(_X - _col(cx), _Y - _col(cy)) - _col(r)) - _col(width) / 2


def sdf_box(cx, cy, half_w, half_h, theta) -> np.ndarray:
    """Filled rectangle with half-sides ``half_w``, ``half_h``, rotated by ``theta``."""
    u, v = _local(cx, cy, theta)
    qx, qy = np.abs(u) - _col(half_w), np.abs(v) - _col(half_h)
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def sdf_polygon(cx, cy, radius, sides, theta) -> np.ndarray:
    """Filled regular polygon (circumradius ``radius``), as the max of its edges' half-plane distances.

    This is exact near edges and slightly underestimates the distance near outer corners, which only
    sharpens the anti-aliasing there. ``sides`` may differ per image.
    """
    sides = np.broadcast_to(np.asarray(sides), np.shape(cx)).astype(int)
    u, v = _local(cx, cy, theta)
    out = np.full(u.shape, -np.inf)
    for k in range(int(sides.max())):
        active = _col(k < sides) > 0
        ang = (2 * k + 1) * np.pi / _col(sides)
        apothem = _col(radius) * np.cos(np.pi / _col(sides))
        d = u * np.cos(ang) + v * np.sin(ang) - apothem
        out = np.where(active, np.maximum(out, d), out)
    return out


def sdf_segment(x0, y0, x1, y1, width) -> np.ndarray:
    """Line segment from (x0, y0) to (x1, y1) with stroke ``width`` and round caps."""
    ax, ay, bx, by = _col(x0), _col(y0), _col(x1), _col(y1)
    px, py, dx, dy = _X - ax, _Y - ay, bx - ax, by - ay
    t = np.clip((px * dx + py * dy) / np.maximum(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
    return np.hypot(px - t * dx, py - t * dy) - _col(width) / 2


def finish(ink: np.ndarray, rng: np.random.Generator, noise: tuple[float, float] = (0.02, 0.12),
           intensity: tuple[float, float] = (0.7, 1.0)) -> np.ndarray:
    """Scale ink by a random per-image intensity, add Gaussian noise of random per-image std, clip to [0, 1]."""
    n = ink.shape[0]
    level = _col(rng.uniform(*intensity, size=n))
    sigma = _col(rng.uniform(*noise, size=n))
    out = ink * level + rng.standard_normal(ink.shape) * sigma
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels, each class ``n // C`` or ``n // C + 1`` times, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Expert generators
# ----------------------------------------------------------------------------------------------------------

SHAPE_CLASSES = ("disk", "square", "triangle", "plus", "ring")


def gen_shapes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One filled shape (disk, square, triangle, plus, ring) at random position, size and rotation."""
    y = balanced_labels(n, len(SHAPE_CLASSES), rng)
    r = rng.uniform(5.0, 10.0, n)
    cx, cy = rng.uniform(4 + r, 24 - r), rng.uniform(4 + r, 24 - r)
    theta = rng.uniform(0, 2 * np.pi, n)
    width = rng.uniform(1.8, 3.2, n)
    arm = r * rng.uniform(0.18, 0.28, n)
    d = np.stack([
        sdf_disk(cx, cy, r * 0.85),
        sdf_box(cx, cy, r * 0.75, r * 0.75, theta),
        sdf_polygon(cx, cy, r, 3, theta),
        np.minimum(sdf_box(cx, cy, r, arm, theta), sdf_box(cx, cy, arm, r, theta)),
        sdf_ring(cx, cy, r * 0.8, width),
    ])  # [5, n, 28, 28]
    return finish(coverage(d[y, np.arange(n)]), rng), y


def gen_count_dots(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1 to 6 non-overlapping dots of random radius (1.3-2.6 px) at random places; label = count - 1."""
    y = balanced_labels(n, 6, rng)
    ink = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE))
    for i in range(n):
        centres: list[tuple[float, float, float]] = []
        while len(centres) < y[i] + 1:
            r = rng.uniform(1.3, 2.6)
            x0, y0 = rng.uniform(2 + r, 26 - r, size=2)
            if all(np.hypot(x0 - a, y0 - b) > r + rb + 1.5 for a, b, rb in centres):
                centres.append((x0, y0, r))
        c = np.asarray(centres)
        d = sdf_disk(c[:, 0], c[:, 1], c[:, 2]).min(axis=0)
        ink[i] = coverage(d)
    return finish(ink, rng), y


BAR_BINS = 12  # orientation classes, 15 degrees apart


def gen_bar_orientation(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One bar at orientation ``k * 15`` degrees (+-5 jitter), k = 0..11; random length/width/place, noise."""
    y = balanced_labels(n, BAR_BINS, rng)
    angle = np.deg2rad(y * 180.0 / BAR_BINS + rng.uniform(-5, 5, n))
    half = rng.uniform(4.0, 10.0, n)
    ext_x, ext_y = half * np.abs(np.cos(angle)), half * np.abs(np.sin(angle))  # half extents of the bar
    cx, cy = rng.uniform(4 + ext_x, 24 - ext_x), rng.uniform(4 + ext_y, 24 - ext_y)
    dx, dy = half * np.cos(angle), -half * np.sin(angle)
    d = sdf_segment(cx - dx, cy - dy, cx + dx, cy + dy, rng.uniform(1.2, 2.6, n))
    return finish(coverage(d), rng, noise=(0.05, 0.3)), y


ARROW_CLASSES = ("E", "NE", "N", "NW", "W", "SW", "S", "SE")


def gen_arrow_direction(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An arrow (shaft + triangular head) pointing in one of 8 compass directions (+-8 degrees jitter)."""
    y = balanced_labels(n, len(ARROW_CLASSES), rng)
    angle = np.deg2rad(y * 45.0 + rng.uniform(-8, 8, n))
    half = rng.uniform(5.0, 10.0, n)
    ux, uy = np.cos(angle), -np.sin(angle)  # image y grows downwards
    ext_x, ext_y = half * np.abs(ux) + 2, half * np.abs(uy) + 2
    cx, cy = rng.uniform(2 + ext_x, 26 - ext_x), rng.uniform(2 + ext_y, 26 - ext_y)
    head = rng.uniform(2.5, 4.5, n)
    tip_x, tip_y = cx + half * ux, cy + half * uy
    shaft = sdf_segment(cx - half * ux, cy - half * uy, tip_x - head * ux, tip_y - head * uy,
                        rng.uniform(1.2, 2.2, n))
    # Equilateral head of circumradius `head` centred `head` behind the tip, one vertex on the tip:
    # sdf_polygon puts vertices at angles 2k*pi/3 of a frame rotated by theta (image y down, so -angle).
    tri = sdf_polygon(tip_x - head * ux, tip_y - head * uy, head, 3, -angle)
    return finish(coverage(np.minimum(shaft, tri)), rng, noise=(0.05, 0.3)), y


MAX_RINGS = 5


def gen_concentric_rings(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1 to 5 thin concentric circles around a random centre, random spacing/stroke; label = count - 1."""
    y = balanced_labels(n, MAX_RINGS, rng)
    count = y + 1
    r0 = rng.uniform(1.5, 3.0, n)
    max_spacing = np.where(count > 1, (12.5 - r0) / np.maximum(count - 1, 1), 4.0)
    spacing = rng.uniform(2.0, np.clip(max_spacing, 2.01, 4.0), n)
    outer = r0 + (count - 1) * spacing
    cx, cy = rng.uniform(1.5 + outer, 26.5 - outer), rng.uniform(1.5 + outer, 26.5 - outer)
    width = rng.uniform(0.8, 1.3, n)
    d = np.full((n, IMAGE_SIZE, IMAGE_SIZE), np.inf)
    for k in range(MAX_RINGS):
        dk = sdf_ring(cx, cy, r0 + k * spacing, width)
        d = np.where(_col(k < count) > 0, np.minimum(d, dk), d)
    return finish(coverage(d), rng, noise=(0.05, 0.3), intensity=(0.5, 1.0)), y


#: Grating frequency classes in cycles per 28 pixels: 8 steps of a factor 5 ** (1/7) ~ 1.26 from 2 to 10.
GRATING_FREQS = tuple(float(f) for f in np.round(2.0 * 5.0 ** (np.arange(8) / 7), 2))
GRATING_ORIENTATIONS = 8  # classes, 22.5 degrees apart


def _grating(n: int, rng: np.random.Generator, freq: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Sinusoidal gratings with given frequency (cycles / 28 px) and orientation, random phase and contrast."""
    phase = rng.uniform(0, 2 * np.pi, n)
    contrast = rng.uniform(0.1, 0.35, n)
    k = 2 * np.pi * _col(freq) / IMAGE_SIZE
    wave = np.sin(k * (_X * np.cos(_col(theta)) + _Y * np.sin(_col(theta))) + _col(phase))
    return np.clip(0.5 + _col(contrast) * wave, 0.0, 1.0)


def gen_grating_freq(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Full-field noisy grating, random orientation/phase; label = one of 8 frequency classes (+-5%)."""
    y = balanced_labels(n, len(GRATING_FREQS), rng)
    freq = np.asarray(GRATING_FREQS)[y] * rng.uniform(0.95, 1.05, n)
    ink = _grating(n, rng, freq, rng.uniform(0, np.pi, n))
    return finish(ink, rng, noise=(0.1, 0.35), intensity=(1.0, 1.0)), y


def gen_grating_orientation(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Full-field noisy grating of random frequency (2-9 cycles); label = orientation, 8 bins of 22.5 deg."""
    y = balanced_labels(n, GRATING_ORIENTATIONS, rng)
    theta = np.deg2rad(y * 180.0 / GRATING_ORIENTATIONS + rng.uniform(-6, 6, n))
    ink = _grating(n, rng, rng.uniform(2.0, 9.0, n), theta)
    return finish(ink, rng, noise=(0.1, 0.35), intensity=(1.0, 1.0)), y


# ----------------------------------------------------------------------------------------------------------
# Pool-only generators
# ----------------------------------------------------------------------------------------------------------

GRID_CLASSES = tuple(f"{r}_{c}" for r in ("top", "middle", "bottom") for c in ("left", "centre", "right"))


def gen_grid_position(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A small blob (disk or square) somewhere in one of the 3x3 cells; label = cell (row-major)."""
    y = balanced_labels(n, 9, rng)
    size = rng.uniform(1.5, 3.5, n)
    cell = IMAGE_SIZE / 3
    cx = (y % 3) * cell + rng.uniform(size, cell - size)
    cy = (y // 3) * cell + rng.uniform(size, cell - size)
    square = _col(rng.random(n) < 0.5) > 0
    d = np.where(square, sdf_box(cx, cy, size, size, rng.uniform(0, np.pi, n)), sdf_disk(cx, cy, size))
    return finish(coverage(d), rng), y


TEXTURE_CLASSES = ("stripes", "checker", "dot_lattice", "blobs")


def gen_texture_type(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Full-field texture: square-wave stripes, checkerboard, dot lattice or smoothed noise blobs."""
    y = balanced_labels(n, 4, rng)
    period = _col(rng.uniform(4.0, 9.0, n))
    u, v = _local(rng.uniform(0, 28, n), rng.uniform(0, 28, n), rng.uniform(0, np.pi, n))
    su, sv = np.sin(2 * np.pi * u / period), np.sin(2 * np.pi * v / period)
    stripes = coverage(-su * period / (2 * np.pi))
    checker = coverage(-su * sv * period / 4)
    fu, fv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
    dots = coverage((np.hypot(fu, fv) - 0.25) * period)
    blobs = np.zeros_like(stripes)
    noise = rng.standard_normal((n, IMAGE_SIZE, IMAGE_SIZE))
    for i in np.flatnonzero(y == 3):
        g = ndimage.gaussian_filter(noise[i], sigma=period[i, 0, 0] / 4, mode="wrap")
        blobs[i] = coverage(-g / (g.std() + 1e-12) * 2.0)
    ink = np.stack([stripes, checker, dots, blobs])[y, np.arange(n)]
    return finish(ink, rng), y


POLYGON_SIDES = (3, 4, 5, 6)


def gen_polygon_outline(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Outline (not filled) of a regular polygon with 3, 4, 5 or 6 sides; random size/rotation/place."""
    y = balanced_labels(n, len(POLYGON_SIDES), rng)
    sides = np.asarray(POLYGON_SIDES)[y]
    r = rng.uniform(6.0, 11.0, n)
    cx, cy = rng.uniform(3 + r, 25 - r), rng.uniform(3 + r, 25 - r)
    width = _col(rng.uniform(1.2, 2.2, n))
    d = np.abs(sdf_polygon(cx, cy, r, sides, rng.uniform(0, 2 * np.pi, n))) - width / 2
    return finish(coverage(d), rng), y


def gen_line_count(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1 to 4 long thin straight lines at random angles and offsets; label = count - 1."""
    y = balanced_labels(n, 4, rng)
    d = np.full((n, IMAGE_SIZE, IMAGE_SIZE), np.inf)
    for k in range(4):
        ang = rng.uniform(0, np.pi, n)
        px, py = rng.uniform(6, 22, n), rng.uniform(6, 22, n)
        half = rng.uniform(8, 14, n)
        dk = sdf_segment(px - half * np.cos(ang), py - half * np.sin(ang),
                         px + half * np.cos(ang), py + half * np.sin(ang), rng.uniform(1.0, 1.6, n))
        d = np.where(_col(k <= y) > 0, np.minimum(d, dk), d)
    return finish(coverage(d), rng), y


@dataclass(frozen=True)
class ProceduralTask:
    """A named generator with its label space."""

    name: str
    generate: Generator
    class_names: tuple[str, ...]
    description: str
    version: str = "1"


EXPERT_GENERATORS: dict[str, ProceduralTask] = {
    t.name: t for t in (
        ProceduralTask("shapes", gen_shapes, SHAPE_CLASSES,
                       "filled shape (disk/square/triangle/plus/ring), random position, size, rotation, noise"),
        ProceduralTask("count_dots", gen_count_dots, tuple(str(k) for k in range(1, 7)),
                       "count 1-6 non-overlapping dots of random size at random places"),
        ProceduralTask("bar_orientation", gen_bar_orientation,
                       tuple(f"{k * 180 / BAR_BINS:g}deg" for k in range(BAR_BINS)),
                       "orientation of a single bar in 12 bins of 15 degrees, random length/width/place",
                       version="2"),
        ProceduralTask("arrow_direction", gen_arrow_direction, ARROW_CLASSES,
                       "compass direction (8 classes) of an arrow, random size and place", version="2"),
        ProceduralTask("concentric_rings", gen_concentric_rings, tuple(str(k) for k in range(1, MAX_RINGS + 1)),
                       "count 1-5 thin concentric circles with random spacing and stroke", version="2"),
        ProceduralTask("grating_freq", gen_grating_freq, tuple(f"{f:g}c" for f in GRATING_FREQS),
                       "spatial frequency (8 classes, 2-10 cycles) of a noisy grating, random orientation",
                       version="2"),
        ProceduralTask("grating_orientation", gen_grating_orientation,
                       tuple(f"{k * 180 / GRATING_ORIENTATIONS:g}deg" for k in range(GRATING_ORIENTATIONS)),
                       "orientation (8 bins of 22.5 deg) of a noisy grating of random frequency",
                       version="2"),
    )
}

POOL_GENERATORS: dict[str, ProceduralTask] = {
    t.name: t for t in (
        ProceduralTask("grid_position", gen_grid_position, GRID_CLASSES,
                       "which of 3x3 cells holds a small blob"),
        ProceduralTask("texture_type", gen_texture_type, TEXTURE_CLASSES,
                       "texture type: stripes / checkerboard / dot lattice / noise blobs"),
        ProceduralTask("polygon_outline", gen_polygon_outline, tuple(f"{s}-gon" for s in POLYGON_SIDES),
                       "number of sides (3-6) of a regular polygon outline"),
        ProceduralTask("line_count", gen_line_count, tuple(str(k) for k in range(1, 5)),
                       "count 1-4 long thin lines"),
    )
}
