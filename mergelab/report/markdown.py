"""A report document as Markdown (``report.md``), and the number formatting of Markdown tables.

:func:`document_markdown` writes the title, the summary, then per section its title as a heading, its text
(already Markdown), its images (``![caption](file)`` and the caption in italics), its tables and verdicts as
Markdown tables, and links to its attachments. Data figures (series of numbers) are listed by title: they are
drawn by the HTML report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mergelab.report.document import ReportDocument, Section


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a table: ``n/a`` for NaN/None, integers as they are, floats with ``digits`` significant
    digits (scientific notation outside [1e-3, 1e5))."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int | np.integer):
        return str(int(x))
    if isinstance(x, float | np.floating):
        f = float(x)
        if math.isnan(f):
            return "n/a"
        if f == 0 or 1e-3 <= abs(f) < 1e5:
            return f"{f:.{digits}g}"
        return f"{f:.{max(digits - 1, 1)}e}"
    return str(x)


def pct(x: float) -> str:
    """A fraction as a percentage (``n/a`` for NaN)."""
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are formatted with :func:`fmt` unless already strings."""
    def cell(v: Any) -> str:
        return (v if isinstance(v, str) else fmt(v)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def section_markdown(s: Section, *, with_images: bool = True) -> list[str]:
    """The lines of one section (heading included)."""
    parts = [f"## {s.title}", ""]
    if s.text.strip():
        parts += [s.text.strip(), ""]
    if with_images:
        for im in s.images:
            parts += [f"![{im.caption}]({im.file})", "", f"*{im.caption}*", ""]
    for f in s.figures:
        parts += [f"Figure: {f.title} (drawn in the HTML report)", ""]
    for t in s.tables:
        parts += [f"**{t.title}**", "", markdown_table(t.columns, t.rows), ""]
    if s.verdicts:
        parts += [markdown_table(["claim", "predicted", "measured", "agrees"],
                                 [[v.claim, v.predicted, v.measured, v.mark] for v in s.verdicts]), ""]
    for name in s.attachments:
        parts += [f"Attachment: [{name}]({name})", ""]
    return parts


def document_markdown(doc: ReportDocument, *, with_images: bool = True) -> str:
    """The whole document as Markdown (see the module docstring)."""
    parts = [f"# {doc.title}", ""]
    if doc.summary:
        parts += [doc.summary.strip(), ""]
    for s in doc.sections:
        parts += section_markdown(s, with_images=with_images)
    return "\n".join(parts).rstrip() + "\n"


__all__ = ["document_markdown", "fmt", "markdown_table", "pct", "section_markdown"]
