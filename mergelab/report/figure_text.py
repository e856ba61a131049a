"""User text in matplotlib figures is text, never math.

matplotlib reads any text with an even number of unescaped ``$`` as math (mathtext): a task named
``cost $5 vs $10`` is drawn as math (``5 vs`` in italics, the dollar signs gone) and ``$x^$`` makes the math
parser raise while the figure is saved. Every string that comes from a user (task, expert, method, tensor,
series and axis names) therefore goes through :func:`literal` before matplotlib sees it. Escaping, rather than
turning math off (``text.parse_math``), keeps matplotlib's own math: log-axis tick labels such as ``10^{-1}``
are mathtext produced by its formatters.
"""

from __future__ import annotations

from typing import overload


@overload
def literal(text: None) -> None: ...


@overload
def literal(text: object) -> str: ...


def literal(text: object) -> str | None:
    """``str(text)`` with every ``$`` escaped as ``\\$``: no unescaped ``$`` is left, so matplotlib draws the
    text as it is, showing each ``\\$`` as ``$`` (``Text._preprocess_math``; an existing ``\\$`` becomes
    ``\\\\$`` and is drawn as ``\\$``). ``None`` (no label) stays ``None``."""
    return None if text is None else str(text).replace("$", "\\$")


__all__ = ["literal"]
