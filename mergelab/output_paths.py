"""Which output paths a command may write: the rules that keep a command from replacing or deleting its inputs.

Every command that writes an output (a merged model folder, a report, a study folder) checks its output path
here before it reads anything:

* :func:`refuse_overlap`: an output that **is** an input, **lies inside** an input folder, or **contains** an
  input is refused, with or without ``--overwrite`` (a folder that a command only writes named files into,
  such as a report folder, may contain inputs; the files it writes must not be inputs). Paths are compared after resolving symlinks and ``..``
  (:func:`os.path.realpath`), and existing paths also by device and inode (:func:`os.path.samefile`), so a
  symlink, a bind mount or another spelling of an input is caught too. Publishing a merge replaces its output
  folder as a whole (the old one is renamed away and deleted), so an output containing an input would delete
  it; an output inside an input folder would add files to the input (and a later merge from that folder would
  copy them as support files).
* :func:`check_replaceable`: an output folder that is replaced by an atomic rename must have a name and must
  not be the current folder or one of its ancestors (``--out .``, ``--out ..``, ``--out /``): a folder cannot
  be swapped for a new one while the process works inside it; write into a sub-folder instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from mergelab.errors import MergeLabError

PathLike = str | os.PathLike[str]


class OutputPathError(MergeLabError):
    """An output path that would replace, delete or modify an input, or that cannot be written atomically."""


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing (or unreadable): fall back to the resolved spelling
        return a == b


def _chain(path: str) -> list[str]:
    """``path`` (resolved) and each of its ancestors, innermost first."""
    chain = [path]
    while True:
        parent = os.path.dirname(chain[-1])
        if parent == chain[-1]:
            return chain
        chain.append(parent)


def overlap(output: PathLike, input_path: PathLike) -> str | None:
    """How ``output`` overlaps ``input_path``: ``"is"``, ``"lies inside"``, ``"contains"``, or None."""
    out = os.path.realpath(os.fspath(output))
    inp = os.path.realpath(os.fspath(input_path))
    if _same(out, inp):
        return "is"
    if any(_same(ancestor, inp) for ancestor in _chain(out)[1:]):
        return "lies inside"
    if any(_same(ancestor, out) for ancestor in _chain(inp)[1:]):
        return "contains"
    return None


def refuse_overlap(output: PathLike, inputs: Iterable[PathLike | None], *, what: str = "output",
                   replaces: bool = True) -> None:
    """Raise :class:`OutputPathError` if ``output`` is, lies inside, or (when ``replaces``) contains one of
    ``inputs`` (None entries are skipped). ``replaces`` (default True): the output is replaced as a whole, so
    an input inside it would be deleted; False for a folder that named files are written into (a report
    folder), where only "is" and "lies inside" are refused. ``what`` names the output in the message (e.g.
    ``--out``). Reads nothing but the paths' metadata, so it is called before any input is opened."""
    for inp in inputs:
        if inp is None:
            continue
        how = overlap(output, inp)
        if how is None or (how == "contains" and not replaces):
            continue
        if how == "is":
            detail = "it is that input"
        elif how == "lies inside":
            detail = "it lies inside that input's folder (the input would be modified)"
        else:
            detail = "it contains that input (replacing the output would delete it)"
        raise OutputPathError(
            f"{what} {output}: refusing to write there: {detail}: {inp}; choose an output outside every input"
        )


def check_replaceable(output: PathLike, *, what: str = "output") -> Path:
    """The absolute, normalized form of ``output`` if a folder there can be published by renaming a sibling
    into place; :class:`OutputPathError` for ``/``, the current folder or one of its ancestors."""
    raw = os.fspath(output)
    absolute = Path(os.path.abspath(raw))
    if not absolute.name:
        raise OutputPathError(f"{what} {raw}: cannot write a model to the root folder; name a sub-folder")
    cwd = os.getcwd()
    if any(_same(ancestor, os.path.realpath(absolute)) for ancestor in _chain(os.path.realpath(cwd))):
        where = "the current folder" if _same(os.path.realpath(absolute), os.path.realpath(cwd)) else (
            "a parent of the current folder")
        raise OutputPathError(
            f"{what} {raw}: is {where}, which cannot be replaced atomically; name a sub-folder instead "
            f"(e.g. {os.path.join(raw, 'merged')})"
        )
    return absolute
