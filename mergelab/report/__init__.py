"""Study reports: a numbers-first document (:mod:`.document`) drawn into a static HTML page (:mod:`.html`)."""

from mergelab.report.document import (
    REPORT_FILENAME,
    Figure,
    ReportDocument,
    Section,
    Series,
    Table,
    Verdict,
    mean_and_error,
)

__all__ = ["REPORT_FILENAME", "Figure", "ReportDocument", "Section", "Series", "Table", "Verdict", "mean_and_error"]
