"""Mergeability analysis: data-free pool diagnostics and the mergeability report.

- :func:`pool_diagnostics` (:mod:`mergelab.analysis.diagnostics`): streamed, per-layer and whole-model
  task-vector norms, cosines, sign conflicts, dispersion, and each operator's dispersion reduction Delta_T
  (Corollary 1 of THEORY.md, section 1);
- :class:`Report`, :func:`write_report` (:mod:`mergelab.analysis.report`): report.json + report.md + PNG
  plots, built from sections so further analyses can add theirs.

Other analyses live in their own modules (import them by their full name). Names here are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "DiagnosticsConfig": "mergelab.analysis.diagnostics",
    "LayerDiagnostics": "mergelab.analysis.diagnostics",
    "OPERATORS": "mergelab.analysis.diagnostics",
    "PoolDiagnostics": "mergelab.analysis.diagnostics",
    "PoolStats": "mergelab.analysis.diagnostics",
    "apply_operator": "mergelab.analysis.diagnostics",
    "coordinate_dispersion": "mergelab.analysis.diagnostics",
    "expected_ranking": "mergelab.analysis.diagnostics",
    "pool_diagnostics": "mergelab.analysis.diagnostics",
    "sign_consensus": "mergelab.analysis.diagnostics",
    "tensor_stats": "mergelab.analysis.diagnostics",
    "Figure": "mergelab.analysis.report",
    "Report": "mergelab.analysis.report",
    "Section": "mergelab.analysis.report",
    "diagnostics_report": "mergelab.analysis.report",
    "write_report": "mergelab.analysis.report",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mergelab.analysis' has no attribute {name!r}")
