"""A report written as a folder: ``report.json`` (the :class:`~mergelab.report.document.ReportDocument`),
``report.md``, PNG plots drawn at write time and text attachments.

:class:`Report` assembles a document section by section for analyses that draw their own matplotlib plots
(``mergelab analyze``)::

    report = diagnostics_report(diag)                       # the pool-diagnostics sections
    report.add_section("Loss barriers", markdown, data={...},
                       figures=[Drawing("barrier.png", "Loss along the path", draw)], key="landscape")
    report.write("out/")                                    # report.json, report.md, barrier.png, ...

A :class:`Drawing` is drawn lazily at :meth:`Report.write` by a callable returning a
:class:`matplotlib.figure.Figure` (or given as one), with the Agg backend and no pyplot state, so building a
report never needs a display; in the document it is an :class:`~mergelab.report.document.Image` naming the
PNG. A drawing that fails is logged and left out of the document. All files are written atomically
(temporary name, then rename).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergelab.atomic_files import open_atomic, write_text_atomic
from mergelab.errors import MergeLabError
from mergelab.report.document import REPORT_FILENAME, Image, ReportDocument, Section, versions
from mergelab.report.markdown import document_markdown

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure as MplFigure

log = logging.getLogger(__name__)

MARKDOWN_FILENAME = "report.md"


@dataclass
class Drawing:
    """A plot drawn by the analysis: written as ``filename`` (PNG), shown with ``caption``.

    ``draw`` is a matplotlib figure or a callable returning one; it is called only when the report is
    written, so a report can be built (and serialised to JSON) without matplotlib.
    """

    filename: str
    caption: str
    draw: Callable[[], MplFigure] | MplFigure

    def __post_init__(self) -> None:
        if Path(self.filename).name != self.filename or not self.filename.endswith(".png"):
            raise ValueError(f"figure filename must be a plain '*.png' name, got {self.filename!r}")


@dataclass
class ReportPaths:
    """What :meth:`Report.write` wrote."""

    out_dir: Path
    json: Path
    markdown: Path
    figures: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


class Report:
    """A document being assembled (see the module docstring); ``meta`` becomes the document's ``config``."""

    def __init__(self, title: str = "Mergeability report", *, intro: str = "", meta: Mapping[str, Any] | None = None,
                 study: str = "analyze"):
        self.title = title
        self.intro = intro
        self.study = study
        self.meta: dict[str, Any] = dict(meta or {})
        self.sections: list[Section] = []
        self._drawings: dict[str, Drawing] = {}
        self._files: dict[str, str] = {}

    def add_section(
        self,
        title: str,
        markdown: str,
        data: Any = None,
        figures: Sequence[Drawing] = (),
        *,
        key: str | None = None,
        files: Mapping[str, str] | None = None,
    ) -> Section:
        """Append a section; ``key`` defaults to the title in snake case and must be unique in the report,
        and figure and attachment file names must be unique too. ``data`` must be JSON data (NaN becomes null)."""
        key = key or "_".join("".join(c if c.isalnum() else " " for c in title.lower()).split())
        if any(s.key == key for s in self.sections):
            raise ValueError(f"the report already has a section with key {key!r}")
        taken = set(self._drawings) | set(self._files) | {REPORT_FILENAME, MARKDOWN_FILENAME}
        for name in [f.filename for f in figures] + list(files or {}):
            if name in taken:
                raise ValueError(f"file name {name!r} is already used in the report")
            if Path(name).name != name:
                raise ValueError(f"attachment name must be a plain file name, got {name!r}")
            taken.add(name)
        section = Section(key=key, title=title, text=markdown, data=data,
                          images=[Image(file=f.filename, caption=f.caption) for f in figures],
                          attachments=list(files or {}))
        self.sections.append(section)
        self._drawings.update({f.filename: f for f in figures})
        self._files.update(files or {})
        return section

    def section(self, key: str) -> Section:
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(key)

    def document(self, *, drawn: set[str] | None = None) -> ReportDocument:
        """The document; with ``drawn``, only the images whose files were drawn are kept."""
        sections = [s if drawn is None else s.model_copy(update={"images": [i for i in s.images if i.file in drawn]})
                    for s in self.sections]
        return ReportDocument(title=self.title, study=self.study, summary=self.intro, config=self.meta,
                              sections=sections, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), versions=versions())

    def write(self, out_dir: str | Path, *, plots: bool = True) -> ReportPaths:
        """Write ``report.json``, ``report.md``, the figures (if ``plots``) and attachments into ``out_dir``
        (created if needed). A figure that fails to draw is logged and left out; the rest is written."""
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MergeLabError(f"{out}: cannot create the report folder: {exc.strerror or exc}") from None
        paths = ReportPaths(out_dir=out, json=out / REPORT_FILENAME, markdown=out / MARKDOWN_FILENAME)
        drawn: set[str] = set()
        if plots:
            for name, drawing in self._drawings.items():
                try:
                    _save_figure(drawing, out / name)
                except MergeLabError:
                    raise
                except Exception as exc:  # a plotting bug must not lose the report
                    log.warning("figure %s could not be drawn: %s: %s", name, type(exc).__name__, exc)
                    continue
                drawn.add(name)
                paths.figures.append(out / name)
        for name, text in self._files.items():
            write_text_atomic(out / name, text)
            paths.files.append(out / name)
        doc = self.document(drawn=drawn)
        doc.to_json(paths.json)
        write_text_atomic(paths.markdown, document_markdown(doc))
        return paths


def _save_figure(figure: Drawing, path: Path) -> None:
    # deferred: matplotlib (a heavy load) only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg", force=False)
    fig = figure.draw() if callable(figure.draw) else figure.draw
    with open_atomic(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")


__all__ = ["Drawing", "MARKDOWN_FILENAME", "Report", "ReportPaths"]
