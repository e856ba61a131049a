"""A derivative-free line search on ``[0, upper]``: a coarse grid, then golden-section steps around its best point."""

from __future__ import annotations

import math
from collections.abc import Callable


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def line_search(phi: Callable[[float], float], f0: float, upper: float = 1.0, *, grid: int = 5,
                steps: int = 6) -> tuple[float, float, int]:
    """Minimise ``phi`` on ``[0, upper]``: a ``grid``-point grid (``phi(0) = f0`` is given), then ``steps``
    golden-section evaluations in the bracket around the best grid point. Returns ``(gamma, phi(gamma),
    evaluations)``; the best point seen, so ``phi(gamma) <= f0``."""
    pts = [upper * i / (grid - 1) for i in range(grid)]
    vals = [f0] + [phi(g) for g in pts[1:]]
    evals = grid - 1
    b = min(range(grid), key=lambda i: (vals[i], i))
    best = (pts[b], vals[b])
    lo, hi = pts[max(b - 1, 0)], pts[min(b + 1, grid - 1)]
    if steps <= 0:
        return best[0], best[1], evals
    c, d = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fc = phi(c)
    evals += 1
    fd = phi(d) if steps > 1 else math.inf
    evals += steps > 1
    for gamma, value in ((c, fc), (d, fd)):
        if value < best[1]:
            best = (gamma, value)
    for _ in range(steps - 2):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - _GOLDEN * (hi - lo)
            fc = phi(c)
            gamma, value = c, fc
        else:
            lo, c, fc = c, d, fd
            d = lo + _GOLDEN * (hi - lo)
            fd = phi(d)
            gamma, value = d, fd
        evals += 1
        if value < best[1]:
            best = (gamma, value)
    return best[0], best[1], evals
