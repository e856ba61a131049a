"""Numbers quoted from the papers the studies reproduce, kept apart from the studies that run and the reports
that draw them (both read them from here)."""

from __future__ import annotations

#: Endpoints reported by the FW-Merging paper (Table 3; ViT-B/32, average accuracy %), as {mode: {method: {n: acc}}}.
PAPER_TABLE3: dict[str, dict[str, dict[int, float]]] = {
    "irrelevant": {"task_arithmetic": {4: 70.3, 20: 21.2}, "fw_soft": {4: 74.1, 20: 74.2}},
    "relevant": {"fw_soft": {4: 59.2, 20: 68.3}},
}

__all__ = ["PAPER_TABLE3"]
