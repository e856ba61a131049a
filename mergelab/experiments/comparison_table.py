"""The results of a method comparison: one :class:`MethodRow` per row, the :class:`ComparisonTable` that holds
them (JSON and CSV in and out), and the paired tests between its rows.

**Paired tests between rows** (:meth:`ComparisonTable.paired_comparisons`). Every row is scored on the same
test examples and keeps its per-example correctness (``MethodRow.per_task_correct``, bit-packed), so every
merge is compared with each row of :data:`~mergelab.experiments.comparison_rows.PAIRED_REFERENCES` (the
pretrained floor and task arithmetic, the data-free baseline the papers' claims are stated against; fixed in
advance, not the best row of this table, which would be chosen on the very examples it is tested on) by
:func:`mergelab.analysis.statistics.paired_accuracy_test`: the difference of task-averaged accuracy, its 95%
interval (stratified by task) and McNemar's exact p-value. The p-values are Holm-adjusted over all the table's
comparisons (one family per table, also used by the report's paper claims), so the chance that a table with no
real difference shows *any* significant one is at most 5%; an adjusted p >= 0.05 is *undecided*. Tables written
before per-example results were kept load and print without the paired block.

Presentation of a table (terminal text, report document) lives in :mod:`mergelab.report`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergelab.atomic_files import write_csv_atomic, write_text_atomic
from mergelab.experiments.comparison_rows import PAIRED_REFERENCES, REFERENCE_ROWS

PathLike = str | os.PathLike[str]


@dataclass
class MethodRow:
    """One method's results. Accuracies in [0, 1]; ``wall_s`` seconds; ``peak_mb`` MiB (NaN: not measured)."""

    method: str
    per_task: dict[str, float]
    per_task_loss: dict[str, float]
    average: float
    normalized: float
    wall_s: float
    peak_mb: float
    params: dict
    base_mb: float = math.nan
    error: str | None = None
    #: The evaluation protocol of this row (:mod:`mergelab.evaluation.protocol`): BN statistics and heads.
    bn: str = ""
    head: str = "expert"
    #: Why the merge is invalid (non-finite logits, negative BN variances), or None.
    invalid: str | None = None
    #: ``{task: bit-packed per-example correctness}`` on the test split (``TaskEvaluation.correct``), for the
    #: paired tests between rows (:meth:`ComparisonTable.paired_test`); empty for tables written before it.
    per_task_correct: dict[str, str] = field(default_factory=dict)
    #: ``{task: number of test examples}`` (the length of each ``per_task_correct`` entry).
    per_task_n: dict[str, int] = field(default_factory=dict)

    def outcomes(self) -> dict[str, Any] | None:
        """``{task: per-example correctness}`` (numpy booleans), or None when not every task's was kept."""
        # deferred: numpy (and torch, through mergelab.evaluation); tables are read and printed on paths that
        # never load them
        from mergelab.evaluation.outcomes import unpack_outcomes

        if not self.per_task or any(t not in self.per_task_correct or t not in self.per_task_n for t in self.per_task):
            return None
        return {t: unpack_outcomes(self.per_task_correct[t], self.per_task_n[t]) for t in self.per_task}

    @property
    def usable(self) -> bool:
        """Ran without error and is a valid model: its numbers may be compared."""
        return self.error is None and self.invalid is None

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_number(v) for k, v in asdict(self).items()}


def failed_row(name: str, error: str, params: dict) -> MethodRow:
    """The row of a method that failed while running: no numbers, ``error`` says why."""
    nan = math.nan
    return MethodRow(name, {}, {}, nan, nan, nan, nan, params, nan, error)


def _json_number(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_number(x) for k, x in v.items()}
    return v


def number(v: Any) -> float:
    """``v`` as a float, None (a JSON null) as NaN."""
    return math.nan if v is None else float(v)


@dataclass(frozen=True)
class PairedComparison:
    """Row ``method`` against row ``reference`` on the same test examples: the paired ``test``
    (:class:`~mergelab.analysis.statistics.PairedTest`) and its p-value Holm-adjusted over the table's
    ``family`` comparisons."""

    method: str
    reference: str
    test: Any
    p_adjusted: float
    family: int

    @property
    def verdict(self) -> bool | None:
        """True: ``method`` more accurate than ``reference``; False: less; None: undecided (adjusted p >= alpha)."""
        # deferred: numpy (analysis.statistics); see MethodRow.outcomes
        from mergelab.analysis.statistics import ALPHA

        return None if not self.p_adjusted < ALPHA else self.test.difference > 0

    @property
    def label(self) -> str:
        return {True: "better", False: "worse", None: "undecided"}[self.verdict]


@dataclass
class ComparisonTable:
    """Rows of a comparison on ``tasks``; ``meta`` says how it was measured."""

    arch: str
    tasks: list[str]
    rows: list[MethodRow]
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, method: str) -> MethodRow:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(f"no row {method!r}; rows: {', '.join(r.method for r in self.rows)}")

    def paired_test(self, a: str, b: str) -> Any:
        """The paired test of row ``a`` against row ``b`` on the same test examples
        (:func:`mergelab.analysis.statistics.paired_accuracy_test`: difference of task-averaged accuracy, its
        interval, McNemar's exact p-value), or None when either row is unusable or has no per-example results."""
        # deferred: numpy (analysis.statistics); see MethodRow.outcomes
        from mergelab.analysis.statistics import paired_accuracy_test

        rows = [next((r for r in self.rows if r.method == m and r.usable), None) for m in (a, b)]
        outs = [r.outcomes() if r is not None else None for r in rows]
        if outs[0] is None or outs[1] is None:
            return None
        return paired_accuracy_test({t: outs[0][t] for t in self.tasks}, {t: outs[1][t] for t in self.tasks})

    def paired_comparisons(self, references: Sequence[str] = PAIRED_REFERENCES) -> list[PairedComparison]:
        """Every usable merge row (not one of
        :data:`~mergelab.experiments.comparison_rows.REFERENCE_ROWS`) against every row of ``references``
        (itself excluded), by :meth:`paired_test`, with p-values Holm-adjusted over all the comparisons made (the
        family: pairs where both rows are usable and kept per-example results). Empty for tables without them."""
        # deferred: numpy (analysis.statistics); see MethodRow.outcomes
        from mergelab.analysis.statistics import holm

        pairs = [(r.method, ref) for ref in references for r in self.rows
                 if r.method not in REFERENCE_ROWS and r.method != ref]
        tested = [(a, b, t) for a, b in pairs if (t := self.paired_test(a, b)) is not None]
        adjusted = holm([t.p_value for _, _, t in tested])
        return [PairedComparison(a, b, t, p, len(tested)) for (a, b, t), p in zip(tested, adjusted)]

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "tasks": list(self.tasks), "rows": [r.to_dict() for r in self.rows],
                "meta": _json_number(dict(self.meta))}

    def to_json(self, path: PathLike) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    def to_csv(self, path: PathLike) -> Path:
        """One line per method: accuracy and loss per task, average, normalized, wall_s, peak_mb, base_mb."""
        cols = (["method"] + [f"acc:{t}" for t in self.tasks] + [f"loss:{t}" for t in self.tasks]
                + ["average", "normalized", "wall_s", "peak_mb", "base_mb", "bn", "head", "invalid", "error", "params"])

        def cell(v: Any) -> Any:
            return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v

        return write_csv_atomic(path, cols, (
            [r.method] + [cell(r.per_task.get(t)) for t in self.tasks] + [cell(r.per_task_loss.get(t)) for t in self.tasks]
            + [cell(r.average), cell(r.normalized), cell(r.wall_s), cell(r.peak_mb), cell(r.base_mb), r.bn, r.head,
               r.invalid or "", r.error or "",
               json.dumps(r.params, sort_keys=True, default=str)]
            for r in self.rows))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComparisonTable:
        rows = [MethodRow(**{k: (number(v) if k in ("average", "normalized", "wall_s", "peak_mb", "base_mb") else v)
                             for k, v in r.items()}) for r in data["rows"]]
        return cls(data["arch"], list(data["tasks"]), rows, dict(data.get("meta") or {}))


__all__ = ["ComparisonTable", "MethodRow", "PairedComparison", "failed_row", "number"]
