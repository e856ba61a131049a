"""Choosing a merge's hyperparameters on validation data, as the papers do.

A comparison row with a ``grid`` (task arithmetic, TIES, DARE, the spectral methods: lambda; TIES: the trim
scope) is merged at every point of the grid (the product of its parameters' candidate values), each merge is
scored on the validation split of the training data (:func:`mergelab.tasks.validation_split`, under the
comparison's BatchNorm protocol; never the test split), and the best mean validation accuracy is kept
(:func:`select_on_validation`), as Ilharco et al. 2023 (lambda in 0.05..1 on held-out validation data) and
Yadav et al. 2023 (lambda on validation, app. C) do. Ties go to the first grid point; an invalid merge
(non-finite logits) scores -inf and never wins.
"""

from __future__ import annotations

import itertools
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mergelab.merging import merge


def search_grid(grid: Mapping[str, Sequence[Any]], user: Mapping[str, Any], select: str,
                quick: bool) -> dict[str, tuple[Any, ...]]:
    """The grid to search on validation data: a row's ``grid`` minus the parameters the ``user`` fixed; empty
    unless ``select == "validation"`` (quick: each parameter's first, middle and last values)."""
    if select != "validation":
        return {}
    searched = {k: tuple(v) for k, v in grid.items() if k not in user}
    if quick:
        searched = {k: tuple(dict.fromkeys((v[0], v[len(v) // 2], v[-1]))) for k, v in searched.items()}
    return searched


def select_on_validation(spec: dict[str, Any], grid: Mapping[str, tuple[Any, ...]], heads: Sequence[Any],
                         tasks: Sequence[str], work: Path, evaluate: Callable[..., Any]) -> dict[str, Any]:
    """Merge ``spec`` at every point of ``grid`` (in-process, in ``work``), score each with ``evaluate`` on the
    validation split, and return ``{parameter: {"grid", "validation_accuracy", "chosen"}}`` with the best mean
    validation accuracy (ties: the first grid point; invalid merges never win)."""
    names = list(grid)
    points = list(itertools.product(*(grid[n] for n in names)))
    scores: list[float] = []
    for point in points:
        out = work / "validation-candidate"
        candidate = {**spec, "parameters": {**spec["parameters"], **dict(zip(names, point))}}
        merge(candidate, out, overwrite=True, progress=False)
        r = evaluate(out, heads, tasks=tasks, split="validation")
        scores.append(r.mean_accuracy if r.valid else -math.inf)
        shutil.rmtree(out, ignore_errors=True)
    best = max(range(len(points)), key=lambda i: (scores[i], -i))
    return {n: {"grid": list(grid[n]) if len(names) == 1 else [p[j] for p in points],
                "validation_accuracy": [s if math.isfinite(s) else None for s in scores],
                "chosen": points[best][j]} for j, n in enumerate(names)}


__all__ = ["search_grid", "select_on_validation"]
