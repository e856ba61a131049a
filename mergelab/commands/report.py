"""``mergelab report``: draw study folders' ``report.json`` documents into a static HTML page.

* ``mergelab report DIR`` writes ``DIR/report.html`` from ``DIR/report.json`` and prints its path.
* ``mergelab report DIR1 DIR2 ... [--out FILE.html]`` writes **one combined page** holding every study in
  the order given (default ``./mergelab-report.html``); ``--separate`` instead writes one page per study,
  next to each ``report.json``.

Each argument is a study folder holding ``report.json`` or a ``.json`` report document itself. A missing or
invalid document is an error naming the file and what is wrong, with a non-zero exit status; nothing is
written then.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mergelab.errors import SpecError
from mergelab.output_paths import refuse_overlap
from mergelab.report.document import ReportDocument

COMBINED_DEFAULT = "mergelab-report.html"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write a static HTML report (figures, tables, verdicts) of one or more study folders",
        description="Read each study folder's report.json (or a report .json file) and write a self-contained "
                    "HTML page: figures, tables, theory-vs-measurement verdicts, configuration. One study: "
                    "STUDY_DIR/report.html by default; several: one combined page (--out, default "
                    f"./{COMBINED_DEFAULT}) or one page each (--separate).",
    )
    p.add_argument("studies", nargs="+", metavar="STUDY_DIR", help="study folder with report.json, or a report .json file")
    p.add_argument("--out", help="HTML file to write (one page for all the studies)")
    p.add_argument("--separate", action="store_true", help="one page per study, written next to its report.json")
    p.add_argument("--title", help="page title of a combined report")
    p.set_defaults(func=run_report)


def _html_name(arg: str) -> Path:
    path = Path(arg)
    if path.is_dir():
        return path / "report.html"
    return path.with_suffix(".html")


def _document_path(arg: str) -> Path:
    """The report document a study argument names (a folder's ``report.json``, or the file itself)."""
    path = Path(arg)
    return path / "report.json" if path.is_dir() else path


def run_report(args: argparse.Namespace) -> int:
    # deferred: the HTML renderer (matplotlib for figures); not on --help
    from mergelab.report.html import write_html

    for arg in args.studies:
        if not Path(arg).exists():
            raise SpecError(f"{arg}: no such study folder or report file")
    docs = [ReportDocument.from_json(a) for a in args.studies]  # every document is checked before writing
    if args.separate:
        if args.out:
            raise SpecError("--out names one combined page; with --separate each page goes next to its report.json")
        pages = [_html_name(arg) for arg in args.studies]
        for page in pages:
            refuse_overlap(page, [_document_path(a) for a in args.studies])
        for page, doc in zip(pages, docs):
            print(write_html(doc, page))
        return 0
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise SpecError(f"--out {out}: is a folder; name the HTML file to write (e.g. {out / 'report.html'})")
    elif len(docs) == 1:
        out = _html_name(args.studies[0])
    else:
        out = Path(COMBINED_DEFAULT)
    refuse_overlap(out, [_document_path(a) for a in args.studies], what="--out" if args.out else "output")
    print(write_html(docs if len(docs) > 1 else docs[0], out, title=args.title))
    return 0
