"""The one merge path: ``merge`` runs a merge spec with the back-end that suits it.

Layout (each module one idea; data flows plan -> pipeline -> kernels -> publish):

- :mod:`~mergelab.merging.plan`: input validation from the headers, model list, parameter resolution,
  whole-model trim groups, the output layout; refuses an output overlapping an input;
- :mod:`~mergelab.merging.vocabulary`: the output vocabulary (``tokenizer:``) and every input's embedding rows
  permuted into it, read block by block through the plan's inputs;
- :mod:`~mergelab.merging.pipeline`: the one streaming loop (:func:`~mergelab.merging.pipeline.stream_tensors`:
  read-ahead, compute, write-behind), parameterised by each back-end's read and compute; blocks over threads;
- :mod:`mergelab.ops.selection`: exact selection's rules (one retry policy, one tie cut-off rule) and its
  block counts (:class:`~mergelab.ops.selection.BlockCounts`), array-agnostic, shared by both back-ends;
- :mod:`~mergelab.merging.publish`: the atomic writer, the merge record, :class:`MergeResult`, and
  :func:`~mergelab.merging.publish.write_state` for the data-informed methods;
- :mod:`~mergelab.merging.backend`: the back-end interface and registry ("where do I add a back-end?");
- :mod:`~mergelab.merging.torch_backend` (+ :mod:`~mergelab.merging.torch_kernels`): every catalog method,
  each as a block kernel, any device; :mod:`~mergelab.merging.numpy_backend` (+ :mod:`~mergelab.merging.numpy_kernels`,
  :mod:`~mergelab.merging.numpy_arrays`): task arithmetic, weight averaging and TIES without torch.

What a method is (parameters, traits, reference composition of operators) lives in the catalog,
:mod:`mergelab.methods.catalog` ("where do I add a method?"); the data-informed methods
(:mod:`mergelab.methods.data_informed`) publish through :mod:`~mergelab.merging.publish`.

``engine: auto`` (the default) picks the first back-end of :data:`~mergelab.merging.backend.BACKENDS`
(numpy, then torch) that supports the spec and the inputs. For task arithmetic with unit weights the two
give bit-identical results; with other weights or lambda they may differ in the last bit of a float32
intermediate (torch fuses ``acc + w * tau`` into one rounding). This module imports neither torch nor a
back-end until it needs one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from mergelab.errors import SpecError
from mergelab.merging.backend import BACKENDS, backend
from mergelab.merging.plan import refuse_input_overlap
from mergelab.merging.publish import MergeResult
from mergelab.methods import METHODS, get_method
from mergelab.spec import MergeSpec, load_spec, parse_spec

Engine = Literal["auto", "numpy", "torch"]
ENGINES = ("auto", *BACKENDS)


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
    The output folder holds the (sharded) weights, the base model's config/tokenizer files (with a
    ``tokenizer:`` section, the built vocabulary's tokenizer and the permuted embeddings:
    :mod:`~mergelab.merging.vocabulary`), and
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
    if spec.method not in METHODS:  # data-informed, or unknown: get_method says so
        # the data-informed methods import torch: a data-free merge never loads them
        from mergelab.methods import data_informed

        if spec.method in data_informed.registry():
            if spec.slices:
                raise SpecError(f"slices: layer stacking runs the data-free methods, not '{spec.method}'")
            if spec.tokenizer is not None or spec.chat_template is not None:
                raise SpecError(f"tokenizer: tokenizer merging and chat templates run with the data-free methods, "
                                f"not '{spec.method}'")
            refuse_input_overlap(spec, out_dir, expert_folders=True)
            if engine == "numpy":
                raise SpecError(f"engine: the numpy engine does not run '{spec.method}' (a data-informed method)")
            return data_informed.run_merge(spec, out_dir, overwrite=overwrite, progress=progress,
                                           hash_inputs=hash_inputs)
        get_method(spec.method)
    if spec.data is not None:
        raise SpecError(f"data: method '{spec.method}' is data-free and takes no data section")
    refuse_input_overlap(spec, out_dir)
    names = list(BACKENDS) if engine == "auto" else [engine]
    for name in names:
        chosen = backend(name)
        reason = chosen.unsupported(spec)
        if reason is None:
            return chosen.run(spec, out_dir, overwrite=overwrite, progress=progress, hash_inputs=hash_inputs,
                              started=started)
        if engine != "auto":
            raise SpecError(f"engine: the {name} engine cannot run this merge: {reason} (use auto or torch)")
    raise SpecError(f"engine: no back-end runs method '{spec.method}'")  # unreachable: torch runs every method


__all__ = ["ENGINES", "Engine", "MergeResult", "merge"]
