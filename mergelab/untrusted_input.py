"""Parsing JSON and YAML that mergelab did not write itself: size and nesting limits, and errors that name
the file.

Checkpoint headers and shard indexes, config and sidecar files, merge specs, ``report.json`` and result files
come from outside. Python's parsers fail on hostile input in ways that are not ``ValueError``: a document of
100,000 nested ``[`` raises :class:`RecursionError` (a traceback that names no file), a YAML document whose
aliases refer to aliases (``b: [*a, *a, ...]``, the "billion laughs") loads in milliseconds into a structure
that expands to 10^9 nodes the moment anything walks it, and a self-referencing alias (``a: &a [*a]``) is a
cycle. The functions here turn all of these into one error naming the file, before any other code sees the
data:

* :func:`read_limited` reads at most ``max_bytes`` (default :data:`MAX_DOCUMENT_BYTES`, the safetensors
  format's own header limit) and refuses larger files without reading them whole;
* :func:`parse_json` parses, reporting invalid JSON and ``RecursionError`` alike, then :func:`check_structure`;
* :func:`check_structure` walks the parsed value without recursion and refuses nesting deeper than
  :data:`MAX_DEPTH` (a cycle is infinitely deep) and, for YAML, more than :data:`MAX_YAML_NODES` nodes
  counted with every alias expanded.

Each takes the error type to raise (``CheckpointError`` for checkpoint files, ``SpecError`` for specs and
reports), so callers keep their own exception hierarchy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergelab.errors import MergeLabError

#: Deepest nesting of arrays/objects accepted. mergelab's own files nest at most about 8 levels (a report's
#: sections -> figures -> series -> values); Python's parsers and pydantic recurse once per level and fail
#: near 1,000, so 100 leaves room for any real document and fails long before the interpreter does.
MAX_DEPTH = 100

#: Largest JSON/YAML document read, in bytes: 100 MiB, the limit the safetensors format puts on its header
#: (``MAX_HEADER_SIZE`` in the reference implementation), which is also far above any index or sidecar.
MAX_DOCUMENT_BYTES = 100 * 1024 * 1024

#: Most nodes a YAML document may expand to, every alias counted each time it is used. A JSON document
#: cannot hold more nodes than bytes; a YAML one with aliases can hold exponentially many.
MAX_YAML_NODES = 1_000_000


def read_limited(
    path: str | os.PathLike[str],
    *,
    what: str,
    error: type[MergeLabError] = MergeLabError,
    max_bytes: int | None = None,
) -> bytes:
    """The bytes of ``path``; ``error`` naming the file if it cannot be read or holds more than ``max_bytes``
    (default :data:`MAX_DOCUMENT_BYTES`). ``what`` names the file's role in messages ("shard index").

    ``FileNotFoundError`` is re-raised as it is, so callers can treat a missing file differently from a bad one.
    """
    limit = MAX_DOCUMENT_BYTES if max_bytes is None else int(max_bytes)
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # a device or FIFO has no size to check first; read one byte past the limit
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{path}: {what} is larger than the limit of {limit} bytes")
    return data


def check_structure(
    value: Any,
    source: str,
    *,
    what: str,
    error: type[MergeLabError] = MergeLabError,
    max_depth: int = MAX_DEPTH,
    max_nodes: int | None = None,
) -> Any:
    """Return ``value`` (parsed JSON/YAML) after checking, without recursion, that no list/dict in it is nested
    more than ``max_depth`` levels deep (``value`` itself is level 1; a cycle never ends, so it fails too) and,
    when ``max_nodes`` is given, that walking it visits at most ``max_nodes`` nodes (shared objects such as YAML
    aliases are visited once per reference). Raises ``error`` as ``"<source>: <what>: ..."``."""
    containers = (dict, list, tuple)  # what parsers build; exact types keep the walk fast (no ABC checks)
    if not isinstance(value, containers):
        return value
    stack: list[tuple[Any, int]] = [(value, 1)]
    nodes = 1
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise error(f"{source}: {what}: nested more than {max_depth} levels deep"
                        + (" (or it refers to itself)" if max_nodes is not None else ""))
        children = item.values() if isinstance(item, dict) else item
        nodes += len(children)
        if max_nodes is not None and nodes > max_nodes:
            raise error(f"{source}: {what}: more than {max_nodes} values once its aliases are expanded "
                        "(an alias bomb?)")
        stack.extend((child, depth + 1) for child in children if isinstance(child, containers))
    return value


def parse_json(
    text: str | bytes,
    source: str,
    *,
    what: str,
    error: type[MergeLabError] = MergeLabError,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """Parse JSON ``text`` (``bytes`` are decoded as UTF-8) from ``source`` and :func:`check_structure` it.

    Invalid UTF-8, invalid JSON (including a ``ValueError`` from ``object_pairs_hook``) and nesting too deep
    for the parser or deeper than :data:`MAX_DEPTH` raise ``error`` as ``"<source>: <what>: not valid UTF-8
    JSON (...)"``, ``"... not valid JSON (...)"`` or ``"... nested more than 100 levels deep"``.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        parsed = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise error(f"{source}: {what}: nested more than {MAX_DEPTH} levels deep") from None
    except UnicodeDecodeError as exc:
        raise error(f"{source}: {what}: not valid UTF-8 JSON ({exc})") from None
    except ValueError as exc:
        raise error(f"{source}: {what}: not valid JSON ({exc})") from None
    return check_structure(parsed, source, what=what, error=error)


def read_json_file(
    path: str | os.PathLike[str],
    *,
    what: str,
    error: type[MergeLabError] = MergeLabError,
    max_bytes: int | None = None,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """:func:`read_limited` then :func:`parse_json`: the checked content of the JSON file ``path``.
    ``FileNotFoundError`` passes through; every other problem is ``error`` naming the file."""
    data = read_limited(path, what=what, error=error, max_bytes=max_bytes)
    return parse_json(data, str(path), what=what, error=error, object_pairs_hook=object_pairs_hook)


__all__ = ["MAX_DEPTH", "MAX_DOCUMENT_BYTES", "MAX_YAML_NODES", "check_structure", "parse_json", "read_json_file",
           "read_limited"]
