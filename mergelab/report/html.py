"""Draw :class:`~mergelab.report.document.ReportDocument` s into one static, self-contained HTML page.

The page needs nothing but a browser: every figure is drawn with matplotlib (Agg backend, a private
``matplotlib.figure.Figure``, no pyplot state) and embedded as a base64 PNG ``<img>`` whose ``alt`` text is the
figure's title; tables are HTML tables; the light CSS and a six-line script are inline; nothing is fetched
from the network, so the page works offline and can be mailed or archived as one file.

What is drawn:

* **Figures**: user text (axis labels, series labels, categories) is drawn as text, never as matplotlib math
  (:func:`~mergelab.report.figure_text.literal`). ``kind="line"`` plots each series against x (numeric x on a linear or log axis; non-numeric x
  as equally spaced categories), ``style`` line / dashed / points, symmetric error bars where ``yerr`` is
  given, ``None`` (missing) points as gaps in the line. ``kind="bar"``: one group of bars per x category and
  one bar per series in each group, error bars where given, no bar for a missing value. A figure with no
  finite point at all is drawn as an empty frame saying so (never an error). Non-positive values on a log
  axis are left out by matplotlib (with no warning shown in the page).
* **Images** (an analysis's own PNGs, e.g. ``mergelab analyze``'s heatmaps): embedded from the folder the
  document was read from, linked by file name otherwise; **attachments** are linked by file name.
* **Tables**: numbers with the table's ``digits`` decimals (integers as they are, booleans as yes/no),
  missing values (``None``, NaN) as an em dash, anything else as escaped text.
* **Verdicts**: one table per section, each row the claim, the prediction, the measurement and a marker:
  ``✓ agrees``, ``✗ disagrees`` or ``? undecided`` (``agrees`` True / False / None), with a count at the top.
* **Configuration** as pretty-printed JSON in a ``<pre>``; versions and creation time in a footer; a table of
  contents at the top.

Several documents (``mergelab report A B``) become one page: a combined table of contents, then each
document in turn (its own title, summary, sections, configuration and footer); ids are prefixed per
document so figures with the same id in two studies do not clash.

All text from a document is escaped with :func:`html.escape`. The page records, once loaded, how many of its
``<img>`` elements decoded (``<body data-images-loaded=... data-images-total=... data-tables=...>``), which
the headless-Chromium test reads back; ``data-figures`` / ``data-tables-expected`` hold what the page
should contain.

:func:`write_html` writes atomically: the page is rendered completely in memory, written to a temporary
file next to the target and renamed over it, so a failure leaves no file (or the previous one) behind.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergelab.atomic_files import write_text_atomic
from mergelab.errors import SpecError
from mergelab.report.document import Figure, Image, ReportDocument, Section, Series, Table, Verdict
from mergelab.report.figure_text import literal

PathLike = str | os.PathLike[str]

HTML_FILENAME = "report.html"
EM_DASH = "\u2014"
#: Marker text and CSS class for ``Verdict.agrees`` True / False / None.
VERDICT_MARKERS: dict[bool | None, tuple[str, str]] = {
    True: ("\u2713 agrees", "agree"),
    False: ("\u2717 disagrees", "disagree"),
    None: ("? undecided", "undecided"),
}

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #eee}
nav.toc{background:#f7f7f9;border:1px solid #e3e3e8;padding:.5em 1.2em;border-radius:4px}
nav.toc ul{margin:.2em 0;padding-left:1.2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.92em}
th,td{border:1px solid #ddd;padding:.25em .6em;vertical-align:top}th{background:#f2f2f5;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}caption{caption-side:top;text-align:left;
font-weight:600;padding:.3em 0}
p.caption{color:#555;font-size:.9em;margin-top:.2em}
figure{margin:1em 0 1.6em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-weight:600}
.agree{color:#176b2c;font-weight:600;white-space:nowrap}.disagree{color:#a11;font-weight:600;white-space:nowrap}
.undecided{color:#666;font-weight:600;white-space:nowrap}
.verdict-summary{font-size:.95em;color:#333}
pre{background:#f7f7f9;border:1px solid #e3e3e8;padding:.8em;overflow:auto;font-size:.85em}
footer{margin-top:2.5em;border-top:1px solid #ddd;color:#666;font-size:.85em;padding-top:.5em}
article.study+article.study{margin-top:3em;border-top:3px double #ccc}
"""

# Records, after load, how many images decoded and how many tables exist (read by the Chromium test).
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", String(ok));
  document.body.setAttribute("data-images-total", String(imgs.length));
  document.body.setAttribute("data-tables", String(document.querySelectorAll("table").length));
  document.body.setAttribute("data-ready", "1");
});
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


# ------------------------------------------------------------------------------------------- figures


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _categories(fig: Figure) -> list[str]:
    """The x categories of a bar figure or a line figure with non-numeric x, in order of first appearance."""
    seen: dict[str, None] = {}
    for s in fig.series:
        for x in s.x:
            seen.setdefault(_xlabel(x), None)
    return list(seen)


def _xlabel(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """Draw ``fig`` with matplotlib (Agg, :func:`draw_figure`) and return the PNG bytes."""
    mpl = draw_figure(fig, dpi)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log axes with non-positive values, all-NaN error bars
        mpl.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def draw_figure(fig: Figure, dpi: int = 100) -> Any:
    """``fig`` drawn on a new matplotlib ``Figure`` (Agg canvas, no pyplot state), ready to save."""
    # deferred: matplotlib (a heavy load) only when a figure is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    mpl = MplFigure(figsize=(7.0, 4.0), dpi=dpi)
    FigureCanvasAgg(mpl)
    ax = mpl.add_subplot(1, 1, 1)
    any_point = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log axes with non-positive values, all-NaN error bars
        if fig.kind == "bar":
            any_point = _draw_bars(ax, fig)
        else:
            any_point = _draw_lines(ax, fig)
        if fig.yscale == "log" and any_point:
            ax.set_yscale("log")
        if not any_point:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#888")
        ax.set_xlabel(literal(fig.xlabel))
        ax.set_ylabel(literal(fig.ylabel))
        ax.grid(True, alpha=0.3)
        if any_point and (len(fig.series) > 1 or fig.series[0].label):
            ax.legend(fontsize=8, loc="best")
        mpl.tight_layout()
    return mpl


_LINESTYLES = {"line": dict(linestyle="-", marker="o", markersize=4),
               "dashed": dict(linestyle="--", marker="", markersize=0),
               "points": dict(linestyle="none", marker="D", markersize=7)}


def _draw_lines(ax: Any, fig: Figure) -> bool:
    numeric = all(_is_number(x) for s in fig.series for x in s.x)
    cats = {} if numeric else {c: i for i, c in enumerate(_categories(fig))}
    any_point = False
    for s in fig.series:
        xs = [float(x) for x in s.x] if numeric else [float(cats[_xlabel(x)]) for x in s.x]
        ys = [_nan(y) for y in s.y]
        if numeric and fig.xscale == "log":  # a non-positive x cannot be drawn on a log axis: a gap
            ys = [y if x > 0 else math.nan for x, y in zip(xs, ys)]
        if not any(math.isfinite(y) for y in ys):
            ax.plot([], [], label=literal(s.label), **_LINESTYLES[s.style])
            continue
        any_point = True
        style = _LINESTYLES[s.style]
        if s.yerr is not None and _finite(s.yerr):
            err = [0.0 if e is None else abs(float(e)) for e in s.yerr]
            ax.errorbar(xs, ys, yerr=err, label=literal(s.label), capsize=3, **style)
        else:
            ax.plot(xs, ys, label=literal(s.label), **style)
    if numeric and fig.xscale == "log" and any_point:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(list(cats.values()))
        ax.set_xticklabels([literal(c) for c in cats], rotation=30 if len(cats) > 4 else 0, ha="right" if len(cats) > 4 else "center")
    return any_point


def _draw_bars(ax: Any, fig: Figure) -> bool:
    cats = {c: i for i, c in enumerate(_categories(fig))}
    n = len(fig.series)
    width = 0.8 / n
    any_point = False
    for k, s in enumerate(fig.series):
        xs, hs, es = [], [], []
        for x, y, e in zip(s.x, s.y, s.yerr or [None] * len(s.y)):
            if y is None or not math.isfinite(y) or (fig.yscale == "log" and y <= 0):
                continue  # a missing value: no bar
            xs.append(cats[_xlabel(x)] - 0.4 + width * (k + 0.5))
            hs.append(float(y))
            es.append(0.0 if e is None else abs(float(e)))
        any_point = any_point or bool(xs)
        ax.bar(xs, hs, width=width * 0.95, label=literal(s.label), yerr=es if s.yerr is not None and any(es) else None,
               capsize=3 if s.yerr is not None else 0)
    ax.set_xticks(list(cats.values()))
    rotate = len(cats) > 4 or max((len(c) for c in cats), default=0) > 12
    ax.set_xticklabels([literal(c) for c in cats], rotation=35 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    return any_point


# -------------------------------------------------------------------------------------------- tables


def format_cell(value: Any, digits: int = 3) -> str:
    """A table cell as (unescaped) text: ``digits`` decimals for floats, an em dash for None/NaN/Inf."""
    if value is None:
        return EM_DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else EM_DASH
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        cells = []
        for c in row:
            cls = ' class="num"' if _is_number(c) or c is None else ""
            cells.append(f"<td{cls}>{_e(format_cell(c, table.digits))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f'<p class="caption">{_e(table.caption)}</p>' if table.caption else ""
    return (f'<table class="data"><caption>{_e(table.title)}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>{cap}")


def _verdicts_html(verdicts: Sequence[Verdict]) -> str:
    rows = []
    for v in verdicts:
        text, cls = VERDICT_MARKERS[v.agrees]
        rows.append(f'<tr data-verdict="{cls}"><td>{_e(v.claim)}</td><td>{_e(v.predicted)}</td>'
                    f'<td>{_e(v.measured)}</td><td class="{cls}">{_e(text)}</td><td>{_e(v.detail)}</td></tr>')
    return ('<table class="verdicts"><caption>Theory vs measurement</caption><thead><tr><th>claim</th>'
            "<th>predicted</th><th>measured</th><th>verdict</th><th>detail</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def verdict_counts(doc: ReportDocument) -> dict[str, int]:
    """``{"agree": a, "disagree": d, "undecided": u}`` over the document's verdicts."""
    out = {"agree": 0, "disagree": 0, "undecided": 0}
    for v in doc.verdicts():
        out[VERDICT_MARKERS[v.agrees][1]] += 1
    return out


# -------------------------------------------------------------------------------------------- page


def _paragraphs(text: str) -> str:
    parts = [p.strip() for p in text.split("\n\n") if p.strip()]
    return "".join(f"<p>{_e(p)}</p>" for p in parts)


def _figure_html(fig: Figure, anchor: str) -> str:
    data = base64.b64encode(figure_png(fig)).decode("ascii")
    cap = f'<p class="caption">{_e(fig.caption)}</p>' if fig.caption else ""
    return (f'<figure id="{_e(anchor)}"><figcaption>{_e(fig.title)}</figcaption>'
            f'<img src="data:image/png;base64,{data}" alt="{_e(fig.title)}" data-figure="{_e(fig.id)}">'
            f"{cap}</figure>")


def _image_html(image: Image, folder: Path | None) -> str:
    """An analysis's own PNG, embedded when the document was read from a folder holding it (else linked)."""
    path = folder / image.file if folder is not None else None
    src = _e(image.file)
    if path is not None and path.is_file():
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    cap = f'<p class="caption">{_e(image.caption)}</p>' if image.caption else ""
    return f'<figure><img src="{src}" alt="{_e(image.caption or image.file)}">{cap}</figure>'


def _section_html(section: Section, anchor: str, prefix: str, folder: Path | None = None) -> str:
    out = [f'<section id="{_e(anchor)}"><h2>{_e(section.title)}</h2>', _paragraphs(section.text)]
    out.extend(_figure_html(f, f"{prefix}fig-{f.id}") for f in section.figures)
    out.extend(_image_html(i, folder) for i in section.images)
    out.extend(_table_html(t) for t in section.tables)
    if section.verdicts:
        out.append(_verdicts_html(section.verdicts))
    if section.attachments:
        out.append("<p>Attachments: " + ", ".join(f'<a href="{_e(n)}">{_e(n)}</a>' for n in section.attachments)
                   + "</p>")
    out.append("</section>")
    return "".join(out)


def _document_html(doc: ReportDocument, prefix: str) -> str:
    counts = verdict_counts(doc)
    out = [f'<article class="study" id="{_e(prefix)}top" data-study="{_e(doc.study)}">',
           f"<h1>{_e(doc.title)}</h1>", _paragraphs(doc.summary)]
    if sum(counts.values()):
        out.append(f'<p class="verdict-summary">Verdicts: <span class="agree">{counts["agree"]} agree</span>, '
                   f'<span class="disagree">{counts["disagree"]} disagree</span>, '
                   f'<span class="undecided">{counts["undecided"]} undecided</span>.</p>')
    for j, s in enumerate(doc.sections):
        out.append(_section_html(s, f"{prefix}s{j}", prefix, doc.folder))
    out.append(f'<section id="{_e(prefix)}config"><h2>Configuration</h2>'
               f"<pre>{_e(json.dumps(doc.config, indent=2, default=str))}</pre></section>")
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in doc.versions.items()) or EM_DASH
    out.append(f"<footer>Study <code>{_e(doc.study)}</code>; created {_e(doc.created or EM_DASH)}; "
               f"versions: {versions}.</footer></article>")
    return "".join(out)


def _toc(docs: Sequence[ReportDocument], prefixes: Sequence[str]) -> str:
    def sections(doc: ReportDocument, prefix: str) -> str:
        items = [f'<li><a href="#{_e(prefix)}s{j}">{_e(s.title)}</a></li>' for j, s in enumerate(doc.sections)]
        items.append(f'<li><a href="#{_e(prefix)}config">Configuration</a></li>')
        return "<ul>" + "".join(items) + "</ul>"

    if len(docs) == 1:
        body = sections(docs[0], prefixes[0])
    else:
        body = "<ul>" + "".join(f'<li><a href="#{_e(p)}top">{_e(d.title)}</a>{sections(d, p)}</li>'
                                for d, p in zip(docs, prefixes)) + "</ul>"
    return f'<nav class="toc"><strong>Contents</strong>{body}</nav>'


def render_html(docs: ReportDocument | Sequence[ReportDocument], title: str | None = None) -> str:
    """The whole page for one document, or one combined page for several (see the module docstring)."""
    docs = [docs] if isinstance(docs, ReportDocument) else list(docs)
    if not docs:
        raise SpecError("no report document to render")
    for d in docs:
        if not isinstance(d, ReportDocument):
            raise SpecError(f"render_html expects ReportDocument objects, got {type(d).__name__}")
    single = len(docs) == 1
    page_title = title or (docs[0].title if single else f"mergelab report: {len(docs)} studies")
    prefixes = [""] if single else [f"d{i}-" for i in range(len(docs))]
    n_fig = sum(len(d.figures()) for d in docs)
    n_tab = sum(len(s.tables) + (1 if s.verdicts else 0) for d in docs for s in d.sections)
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_e(page_title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>",
             f'<body data-figures="{n_fig}" data-tables-expected="{n_tab}">']
    if not single:
        parts.append(f"<h1>{_e(page_title)}</h1>")
    parts.append(_toc(docs, prefixes))
    for d, p in zip(docs, prefixes):
        parts.append(_document_html(d, p))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(doc: ReportDocument | Sequence[ReportDocument], out: PathLike, title: str | None = None) -> Path:
    """Render ``doc`` (or several documents into one page) and write it atomically to ``out``.

    ``out`` is the HTML file, or an existing folder (then ``<out>/report.html``). Returns the path written.
    """
    path = Path(out)
    if path.is_dir():
        path = path / HTML_FILENAME
    text = render_html(doc, title)  # fully rendered before anything touches the disk
    return write_text_atomic(path, text)


__all__ = ["HTML_FILENAME", "VERDICT_MARKERS", "draw_figure", "figure_png", "format_cell", "render_html", "verdict_counts",
           "write_html"]
