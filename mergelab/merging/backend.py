"""The back-end interface: what a merge back-end is, and the registry the entry point chooses from.

A back-end runs a data-free merge plan end to end on one kind of arrays: it reads the inputs' bytes into its
arrays, computes each tensor with the kernel it registers for the method, checks finiteness its own way
(naming the input file of a NaN/Inf), and streams the results through the shared pipeline
(:mod:`mergelab.merging.pipeline`) into the shared publisher (:mod:`mergelab.merging.publish`). The plan
(:mod:`mergelab.merging.plan`) and the selection rules (:mod:`mergelab.ops.selection`) are shared too.

Which methods a back-end runs is derived from the kernels it registers (``methods``), never listed apart:
the torch back-end registers block kernels and runs every other catalog method by its reference
composition; the numpy back-end runs exactly the methods of its ``KERNELS``.

**Where do I add a back-end?** Write a module here with a class implementing :class:`Backend` (see
:mod:`mergelab.merging.numpy_backend` for a small one: its ``KERNELS``, ``unsupported`` and ``run``), test
its kernels against the catalog's references and its merges against the torch back-end's
(tests/test_numpy_engine.py), and add it to :data:`BACKENDS` in the order ``engine: auto`` should try it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mergelab.spec import MergeSpec

if TYPE_CHECKING:
    from mergelab.merging.publish import MergeResult


class Backend(Protocol):
    """A merge back-end."""

    #: its name in a spec's ``engine`` and in the merge record
    name: str

    @property
    def methods(self) -> frozenset[str]:
        """The methods it has a kernel for (derived from its kernel registry)."""
        ...

    def unsupported(self, spec: MergeSpec) -> str | None:
        """Why it cannot run ``spec`` (method, device, input formats, dtypes), or None if it can."""
        ...

    def run(self, spec: MergeSpec, out_dir: str | Path, *, overwrite: bool, progress: bool, hash_inputs: bool,
            started: float) -> MergeResult:
        """Merge ``spec`` into ``out_dir`` (validated, streamed, published atomically)."""
        ...


#: name -> module defining ``BACKEND``, in the order ``engine: auto`` tries them (numpy first: no torch)
BACKENDS: dict[str, str] = {
    "numpy": "mergelab.merging.numpy_backend",
    "torch": "mergelab.merging.torch_backend",
}


def backend(name: str) -> Backend:
    """The back-end called ``name``, imported on first use (the torch one imports torch: a merge the numpy
    back-end runs never pays for it)."""
    return importlib.import_module(BACKENDS[name]).BACKEND  # type: ignore[no-any-return]
