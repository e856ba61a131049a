"""Study and analysis reports: one numbers-first document model (:mod:`.document`), written as a folder
(:mod:`.folder`: report.json, report.md, drawn PNGs), drawn into a static HTML page (:mod:`.html`) or Markdown
(:mod:`.markdown`)."""

from mergelab.report.document import (
    REPORT_FILENAME,
    Figure,
    Image,
    ReportDocument,
    Section,
    Series,
    Table,
    Verdict,
)

__all__ = ["REPORT_FILENAME", "Figure", "Image", "ReportDocument", "Section", "Series", "Table", "Verdict"]
