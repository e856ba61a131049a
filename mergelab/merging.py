"""``merge``: run a merge spec with the engine that suits it.

Two engines compute the data-free methods:

- the numpy engine (:mod:`mergelab.numpy_engine`) for task arithmetic and weight averaging on the CPU from
  safetensors inputs, the common case: it never imports torch (1.5 s of a merge's start-up here) and reads
  each input block by block straight into cache-sized buffers;
- the torch engine (:mod:`mergelab.engine`) for everything else: every method, torch files, GPUs.

``engine: auto`` (the default) picks the numpy engine when it supports the spec and the inputs, else torch.
For task arithmetic with unit weights the two give bit-identical results; with other weights or lambda they
may differ in the last bit of a float32 intermediate (torch fuses ``acc + w * tau`` into one rounding).
This module imports neither torch nor the engines until it needs them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from mergelab.errors import SpecError
from mergelab.merge_inputs import MergeResult, refuse_input_overlap
from mergelab.methods import METHODS, get_method
from mergelab.spec import MergeSpec, load_spec, parse_spec

Engine = Literal["auto", "numpy", "torch"]
ENGINES = ("auto", "numpy", "torch")


def merge(
    spec: MergeSpec | Mapping[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    hash_inputs: bool = True,
    engine: Engine = "auto",
) -> MergeResult:
    """Merge the checkpoints described by ``spec`` into a safetensors folder at ``out_dir``.

    ``spec`` is a :class:`~mergelab.spec.MergeSpec`, a mapping of the same shape, or the path of a YAML file.
    The output folder holds the (sharded) weights, the base model's config/tokenizer files, and
    ``mergelab_merge.json`` (method, resolved parameters, inputs with SHA-256 content hashes, versions, the
    engine used). ``engine``: ``auto`` (numpy when it supports the merge, else torch), ``numpy`` (an error
    saying why when it cannot) or ``torch``. An ``out_dir`` that is, contains or lies inside an input (the
    base, a model, a data-informed expert's folder), or that is the current folder or ``/``, is refused
    before anything is read (:mod:`mergelab.output_paths`), with or without ``overwrite``. Raises :class:`~mergelab.errors.MergeLabError` subclasses on
    bad input; nothing is written then.
    """
    started = time.perf_counter()
    if engine not in ENGINES:
        raise SpecError(f"engine: {engine!r} is not one of {', '.join(ENGINES)}")
    spec = load_spec(spec) if isinstance(spec, (str, Path)) else parse_spec(spec)
    if spec.method not in METHODS:  # data-informed (they import torch), or unknown: get_method says so
        from mergelab.methods import data_informed

        if spec.method in data_informed.registry():
            refuse_input_overlap(spec, out_dir, expert_folders=True)
            if engine == "numpy":
                raise SpecError(f"engine: the numpy engine does not run '{spec.method}' (a data-informed method)")
            return data_informed.run_merge(spec, out_dir, overwrite=overwrite, progress=progress,
                                           hash_inputs=hash_inputs)
        get_method(spec.method)
    if spec.data is not None:
        raise SpecError(f"data: method '{spec.method}' is data-free and takes no data section")
    refuse_input_overlap(spec, out_dir)
    if engine != "torch":
        from mergelab import numpy_engine

        reason = numpy_engine.unsupported(spec)
        if reason is None:
            return numpy_engine.merge_numpy(spec, out_dir, overwrite=overwrite, progress=progress,
                                              hash_inputs=hash_inputs, started=started)
        if engine == "numpy":
            raise SpecError(f"engine: the numpy engine cannot run this merge: {reason} (use auto or torch)")
    from mergelab.engine import merge_streaming

    return merge_streaming(spec, out_dir, overwrite=overwrite, progress=progress, hash_inputs=hash_inputs,
                           started=started)
