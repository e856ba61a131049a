"""The report document: the one model of a report, independent of how it is drawn.

A study (scaling laws, effective noise, pool scaling, a method comparison, the quickstart) or an analysis
(``mergelab analyze``) describes its results as a :class:`ReportDocument`: sections holding line/bar
:class:`Figure` s (plain numbers: series of x, y and optional error bars), :class:`Table` s, :class:`Verdict` s
(a theory's prediction next to what was measured and whether they agree), and, for analyses that draw their
own plots, a ``key`` (the section's stable name), JSON ``data``, :class:`Image` s (PNG files written beside
the document) and text ``attachments`` (e.g. a CSV). The document is saved as ``report.json`` beside the
study's other outputs; :func:`mergelab.report.html.write_html` draws it into a static page and
:func:`mergelab.report.markdown.document_markdown` into ``report.md``. Keeping the numbers in the document
(not only in pictures) means a report can be redrawn, diffed and tested.

Formats read: 2 (this one), 1 (no keys, data, images or attachments: every format-1 document is a valid
format-2 one) and the unversioned layout ``mergelab analyze`` wrote before the two report models were one
(``{"title", "meta", "sections": {key: {"title", "data", "figures", "files"}}}``, see :func:`_from_analysis_layout`).

This module imports no study or analysis code, so every layer may build documents.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mergelab import __version__
from mergelab.atomic_files import write_text_atomic
from mergelab.errors import SpecError
from mergelab.untrusted_input import read_json_file

PathLike = str | os.PathLike[str]
REPORT_FORMAT = 2
#: Versioned formats :meth:`ReportDocument.parse` reads (format 1 lacks the section fields added in 2).
READABLE_FORMATS = (1, 2)
REPORT_FILENAME = "report.json"


def _clean(v: Any) -> float | None:
    """A finite float, or ``None`` for NaN/Inf/None (JSON has no NaN; a missing point is drawn as a gap)."""
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def plain_json(v: Any) -> Any:
    """``v`` as plain JSON types: non-finite floats become ``None``, mapping keys strings, tuples lists, numpy
    and torch scalars/arrays their ``tolist()``; anything else raises ``ValueError``."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return _clean(v)
    if isinstance(v, Mapping):
        return {str(k): plain_json(t) for k, t in v.items()}
    if isinstance(v, list | tuple):
        return [plain_json(t) for t in v]
    if hasattr(v, "tolist") and callable(v.tolist):
        return plain_json(v.tolist())
    raise ValueError(f"{type(v).__name__} is not JSON data")


def _plain_file_name(name: str, suffix: str = "") -> str:
    if Path(name).name != name or name in ("", ".", "..") or not name.endswith(suffix):
        raise ValueError(f"expected a plain {'*' + suffix + ' ' if suffix else ''}file name, got {name!r}")
    return name


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


class Image(_Model):
    """A picture drawn by the analysis itself (e.g. a heatmap), saved as the PNG ``file`` beside ``report.json``."""

    file: str
    caption: str = ""

    @field_validator("file")
    @classmethod
    def _png(cls, v: str) -> str:
        return _plain_file_name(v, ".png")


class Section(_Model):
    """A part of a report. ``text`` is Markdown-light prose (paragraphs separated by blank lines; analyses put
    Markdown tables in it); ``key`` names the section for programs (unique in a document when given);
    ``data`` holds the section's numbers as JSON; ``attachments`` names text files written beside the document."""

    title: str
    key: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$")
    text: str = ""
    data: Any = None
    figures: list[Figure] = Field(default_factory=list)
    images: list[Image] = Field(default_factory=list)
    tables: list[Table] = Field(default_factory=list)
    verdicts: list[Verdict] = Field(default_factory=list)
    attachments: list[str] = Field(default_factory=list)

    @field_validator("data", mode="before")
    @classmethod
    def _json_data(cls, v: Any) -> Any:
        return plain_json(v)

    @field_validator("attachments")
    @classmethod
    def _plain_names(cls, v: list[str]) -> list[str]:
        return [_plain_file_name(n) for n in v]


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
    #: The folder the document was read from (where its images and attachments are), not saved.
    _folder: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _unique_names(self) -> ReportDocument:
        seen: set[str] = set()
        keys: set[str] = set()
        files: set[str] = {REPORT_FILENAME}
        for s in self.sections:
            for f in s.figures:
                if f.id in seen:
                    raise ValueError(f"figure id {f.id!r} is used twice")
                seen.add(f.id)
            if s.key:
                if s.key in keys:
                    raise ValueError(f"section key {s.key!r} is used twice")
                keys.add(s.key)
            for name in [i.file for i in s.images] + s.attachments:
                if name in files:
                    raise ValueError(f"file name {name!r} is used twice")
                files.add(name)
        return self

    @property
    def folder(self) -> Path | None:
        """The folder :meth:`from_json` read the document from (``None`` for a document built in memory)."""
        return self._folder

    def __eq__(self, other: object) -> bool:
        """Equal content: where a document was read from is not part of it."""
        return isinstance(other, ReportDocument) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # mutable, like every pydantic model

    def section(self, key: str) -> Section:
        """The section with ``key`` (``KeyError`` if none)."""
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(key)

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

        return write_text_atomic(path, self.model_dump_json(indent=1))

    @classmethod
    def from_json(cls, path: PathLike) -> ReportDocument:
        """Read a document from ``path`` (a ``report.json`` or a study folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_FILENAME

        try:
            data = read_json_file(path, what="cannot read the report document", error=SpecError)
        except FileNotFoundError:
            raise SpecError(f"{path}: no report document here (a study writes {REPORT_FILENAME} into its folder)") from None
        doc = cls.parse(data, str(path))
        doc._folder = path.parent
        return doc

    @classmethod
    def parse(cls, data: Mapping[str, Any], where: str = "report document") -> ReportDocument:
        """Validate ``data`` (any readable format, see the module docstring) into a document."""
        if not isinstance(data, Mapping):
            raise SpecError(f"{where}: a report document is a JSON object, got {type(data).__name__}")
        if "format" not in data and isinstance(data.get("sections"), Mapping):
            data = _from_analysis_layout(data)
        if data.get("format", REPORT_FORMAT) not in READABLE_FORMATS:
            raise SpecError(f"{where}: report format {data.get('format')!r}, this mergelab reads "
                            f"{', '.join(map(str, READABLE_FORMATS))}")
        data = {**data, "format": REPORT_FORMAT}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
            raise SpecError(f"{where}: invalid report document:\n" + "\n".join(lines)) from None


def _from_analysis_layout(data: Mapping[str, Any]) -> dict[str, Any]:
    """The unversioned ``mergelab analyze`` layout as a format-2 document: ``meta`` becomes ``config`` (its
    ``created`` and ``mergelab_version`` the document's ``created`` and ``versions``), each section keeps its
    key, title and data, its figure names become :class:`Image` s and its file names ``attachments``. The
    Markdown bodies lived only in ``report.md``, so the sections have no text."""
    meta = dict(data.get("meta") or {}) if isinstance(data.get("meta"), Mapping) else {}
    created = meta.pop("created", "")
    version = meta.pop("mergelab_version", None)
    sections = []
    for key, sec in data["sections"].items():
        sec = sec if isinstance(sec, Mapping) else {}
        sections.append({"key": key, "title": sec.get("title", key), "data": sec.get("data"),
                         "images": [{"file": f} for f in sec.get("figures") or []],
                         "attachments": list(sec.get("files") or [])})
    return {"format": REPORT_FORMAT, "title": data.get("title", "Mergeability report"), "study": "analyze",
            "config": meta, "sections": sections, "created": str(created or ""),
            "versions": {"mergelab": str(version)} if version else {}}


def versions() -> dict[str, str]:
    """Versions of mergelab, Python and torch, for the report's footer."""
    out = {"mergelab": __version__, "python": platform.python_version()}
    try:
        # deferred: torch (seconds) only for its version; the document model imports torch-free
        import torch

        out["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


