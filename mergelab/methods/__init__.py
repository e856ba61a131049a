"""Merging methods. Data-free methods are compositions of :mod:`mergelab.ops`; see :data:`METHODS` (the
catalog, :mod:`mergelab.methods.catalog`, imports without torch; the computations import it when called)."""

from __future__ import annotations

import difflib

from mergelab.errors import SpecError
from mergelab.methods.base import Method, MethodParams, TensorInputs
from mergelab.methods.catalog import METHODS


def get_method(name: str) -> Method:
    """The registered method called ``name``; a :class:`SpecError` listing the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        # deferred: the registry sits above merging and loads torch; the catalog is on the numpy merge path
        from mergelab.methods.data_informed import registry

        known = sorted(METHODS) + sorted(registry())
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SpecError(f"unknown method '{name}'{hint}; available: {', '.join(known)}") from None


__all__ = ["METHODS", "Method", "MethodParams", "TensorInputs", "get_method"]
