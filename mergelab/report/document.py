"""The report document: what a study hands to the HTML report, independent of how it is drawn.

A study (scaling laws, effective noise, pool scaling, a method comparison, the quickstart) describes its
results as a :class:`ReportDocument`: sections holding line/bar :class:`Figure` s (plain numbers: series of
x, y and optional error bars), :class:`Table` s, and :class:`Verdict` s (a theory's prediction next to what
was measured and whether they agree). The document is saved as ``report.json`` beside the study's other
outputs; :func:`mergelab.report.html.write_html` draws it with matplotlib into a static page. Keeping the
numbers in the document (not only in pictures) means a report can be redrawn, diffed and tested.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.analysis.statistics import mean_and_error  # noqa: F401 - re-exported by mergelab.report
from mergelab.errors import SpecError

PathLike = str | os.PathLike[str]
REPORT_FORMAT = 1
REPORT_FILENAME = "report.json"


def _clean(v: Any) -> float | None:
    """A finite float, or ``None`` for NaN/Inf/None (JSON has no NaN; a missing point is drawn as a gap)."""
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Series(_Model):
    """One curve: ``y`` against ``x`` with optional symmetric error bars ``yerr`` (``None`` = missing point)."""

    label: str
    x: list[float | str]
    y: list[float | None]
    yerr: list[float | None] | None = None
    style: Literal["line", "dashed", "points"] = "line"

    @field_validator("y", "yerr", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        if v is None:
            return None
        return [_clean(t) for t in v]

    @model_validator(mode="after")
    def _lengths(self) -> Series:
        if len(self.x) != len(self.y):
            raise ValueError(f"series {self.label!r}: {len(self.x)} x values but {len(self.y)} y values")
        if self.yerr is not None and len(self.yerr) != len(self.y):
            raise ValueError(f"series {self.label!r}: {len(self.yerr)} error bars for {len(self.y)} points")
        return self


class Figure(_Model):
    """A plot: ``kind`` line (x numeric or categorical) or bar (x categorical, one bar group per series)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    title: str
    xlabel: str = ""
    ylabel: str = ""
    kind: Literal["line", "bar"] = "line"
    xscale: Literal["linear", "log"] = "linear"
    yscale: Literal["linear", "log"] = "linear"
    series: list[Series] = Field(min_length=1)
    caption: str = ""


class Table(_Model):
    """A table: ``columns`` names and ``rows`` of cells (numbers are formatted with ``digits`` decimals)."""

    title: str
    columns: list[str] = Field(min_length=1)
    rows: list[list[Any]]
    caption: str = ""
    digits: int = Field(3, ge=0, le=10)

    @model_validator(mode="after")
    def _widths(self) -> Table:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.title!r}: row {i} has {len(row)} cells for {len(self.columns)} columns")
        self.rows = [[_clean(c) if isinstance(c, float) else c for c in row] for row in self.rows]
        return self


class Verdict(_Model):
    """A prediction checked against measurement: ``agrees`` is ``None`` when the data cannot decide."""

    claim: str
    predicted: str
    measured: str
    agrees: bool | None
    detail: str = ""

    @property
    def mark(self) -> str:
        """``yes``, ``no`` or ``undecided``."""
        return {True: "yes", False: "no", None: "undecided"}[self.agrees]


class Section(_Model):
    title: str
    text: str = ""
    figures: list[Figure] = Field(default_factory=list)
    tables: list[Table] = Field(default_factory=list)
    verdicts: list[Verdict] = Field(default_factory=list)


class ReportDocument(_Model):
    """A study's report: ``config`` is the study's resolved configuration (shown verbatim)."""

    format: int = REPORT_FORMAT
    title: str
    study: str
    summary: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    sections: list[Section] = Field(default_factory=list)
    created: str = ""
    versions: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_figure_ids(self) -> ReportDocument:
        seen: set[str] = set()
        for s in self.sections:
            for f in s.figures:
                if f.id in seen:
                    raise ValueError(f"figure id {f.id!r} is used twice")
                seen.add(f.id)
        return self

    def figures(self) -> list[Figure]:
        return [f for s in self.sections for f in s.figures]

    def verdicts(self) -> list[Verdict]:
        return [v for s in self.sections for v in s.verdicts]

    # -- persistence -------------------------------------------------------------------------------
    def to_json(self, path: PathLike) -> Path:
        """Write the document atomically (temporary file + rename) and return its path."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_FILENAME
        from mergelab.atomic_files import write_text_atomic

        return write_text_atomic(path, self.model_dump_json(indent=1))

    @classmethod
    def from_json(cls, path: PathLike) -> ReportDocument:
        """Read a document from ``path`` (a ``report.json`` or a study folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_FILENAME
        from mergelab.untrusted_input import read_json_file

        try:
            data = read_json_file(path, what="cannot read the report document", error=SpecError)
        except FileNotFoundError:
            raise SpecError(f"{path}: no report document here (a study writes {REPORT_FILENAME} into its folder)") from None
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: Mapping[str, Any], where: str = "report document") -> ReportDocument:
        if not isinstance(data, Mapping):
            raise SpecError(f"{where}: a report document is a JSON object, got {type(data).__name__}")
        if data.get("format", REPORT_FORMAT) != REPORT_FORMAT:
            raise SpecError(f"{where}: report format {data.get('format')!r}, this mergelab reads {REPORT_FORMAT}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
            raise SpecError(f"{where}: invalid report document:\n" + "\n".join(lines)) from None


def versions() -> dict[str, str]:
    """Versions of mergelab, Python and torch, for the report's footer."""
    import platform

    from mergelab import __version__

    out = {"mergelab": __version__, "python": platform.python_version()}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


