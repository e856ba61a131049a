"""The plan of a merge, before any tensor data is read; shared by every back-end and free of torch.

A back-end opens the checkpoints of a spec and validates them against each other from their headers
(:class:`MergeInputs`: names, shapes, dtype kinds), checks the model list against the method
(:func:`check_models`), maps each output tensor to its inputs' tensors when the spec stacks layers
(``slices``: :mod:`mergelab.merging.layout`; :meth:`MergeInputs.sources`), resolves per-tensor parameters (:class:`ParamResolver`), groups the tensors trimmed
over the whole model (:func:`global_trim_groups`) and lays out the output (:func:`output_plan`). An output
folder overlapping an input is refused first (:func:`refuse_input_overlap`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Self

from mergelab.checkpoints import CheckpointReader, open_checkpoint
from mergelab.checkpoints.safetensors_format import STORAGE_DTYPES, StorageDtype
from mergelab.errors import SpecError, TensorMismatchError
from mergelab.merging.layout import SliceRange, TensorSources, stack_layout
from mergelab.merging.vocabulary import Vocabulary, is_vocab_tensor
from mergelab.methods import Method, MethodParams
from mergelab.output_paths import check_replaceable, refuse_overlap
from mergelab.spec import MergeSpec, TokenizerSpec

log = logging.getLogger(__name__)

#: The spec's output dtypes other than ``auto`` (each tensor keeps the reference model's dtype).
OUTPUT_DTYPES: dict[str, StorageDtype] = {
    "float32": STORAGE_DTYPES["F32"], "float16": STORAGE_DTYPES["F16"], "bfloat16": STORAGE_DTYPES["BF16"],
}


def few(items: Sequence[str], n: int = 5) -> str:
    """The first ``n`` items, quoted, and how many more there are."""
    shown = ", ".join(repr(i) if not i.endswith(")") else i for i in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def nonfinite_message(where: str, name: str, bad: int, n_nan: int) -> str:
    """The error for a tensor holding ``bad`` non-finite values, ``n_nan`` of them NaN."""
    return (
        f"{where}: tensor '{name}' holds {bad} non-finite value(s) ({n_nan} NaN, {bad - n_nan} Inf); "
        "refusing to merge"
    )


class RenamedReader:
    """A checkpoint read under the output's tensor names: ``info``/``get``/``read_range`` of output tensor
    ``X`` read the input's tensor ``names[X]`` (the input of a layer slice). Closing it leaves the
    checkpoint open (its :class:`MergeInputs` closes it)."""

    def __init__(self, reader: CheckpointReader, names: dict[str, str]) -> None:
        self.reader, self.names = reader, names
        self.path, self.files, self.config_dir = reader.path, reader.files, reader.config_dir

    @property
    def is_safetensors(self) -> bool:
        return self.reader.is_safetensors

    def keys(self) -> list[str]:
        return list(self.names)

    def info(self, name: str) -> Any:
        return self.reader.info(self.names[name])

    def get(self, name: str) -> Any:
        return self.reader.get(self.names[name])

    def read_range(self, name: str, offset: int, out: memoryview) -> None:
        self.reader.read_range(self.names[name], offset, out)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def close(self) -> None:
        pass


class MergeInputs:
    """The opened checkpoints of one merge (``base``, ``experts``, ``readers`` = both), validated against
    each other from their headers; ``reference`` is the base, or the first expert without one: it gives the
    config files and, without ``slices``, the tensor order (``names``). With ``slices``
    (:class:`~mergelab.merging.layout.SliceRange`, layer stacking) ``names`` are the output's tensors and
    ``layout`` maps each to its inputs' tensors (:func:`~mergelab.merging.layout.stack_layout`);
    :meth:`sources` gives any output tensor's inputs either way. With a ``tokenizer`` section
    (:class:`~mergelab.spec.TokenizerSpec`) ``vocabulary`` is the output vocabulary and every input is read
    through a :class:`~mergelab.merging.vocabulary.PermutedReader` (its vocabulary tensors permuted into it;
    each vocabulary tensor's inputs bound for its default rows). Takes ownership of the readers: they are
    closed if validation fails, else by :meth:`close` (or leaving a ``with`` block). :meth:`open` opens a
    spec's checkpoints."""

    def __init__(self, base: CheckpointReader | None, experts: Sequence[CheckpointReader],
                 slices: Sequence[SliceRange] | None = None, tokenizer: TokenizerSpec | None = None) -> None:
        self.base = base
        self.experts = list(experts)
        self.readers = ([base] if base is not None else []) + self.experts
        self.warnings: list[str] = []
        self.reference = base if base is not None else self.experts[0]
        self.layout: dict[str, TensorSources] | None = None
        #: the output's number of layers when stacking (``slices``), else None
        self.layers: int | None = None
        #: the output vocabulary when the spec has a ``tokenizer:`` section (:mod:`mergelab.merging.vocabulary`)
        self.vocabulary: Any = None
        self._everyone = list(range(len(self.experts)))
        try:
            if tokenizer is not None:
                self._permute(tokenizer)
            if slices:
                self._stack(slices)
            else:
                self.names = self.reference.keys()
            if self.vocabulary is not None:

                def unwrap(r: Any) -> Any:
                    return r.reader if isinstance(r, RenamedReader) else r

                for name in self.names:
                    if is_vocab_tensor(name):
                        base = self.sources(name)[0]
                        self.vocabulary.bind(name, [unwrap(r) for r in self.readers_of(name)],
                                             None if base is None else unwrap(base))
            self._validate()
        except BaseException:
            self.close()
            raise

    def _permute(self, tokenizer: TokenizerSpec) -> None:
        """Build the output vocabulary and read every input through a
        :class:`~mergelab.merging.vocabulary.PermutedReader` (its vocabulary tensors permuted into it)."""
        self.vocabulary = vocab = Vocabulary.build(tokenizer, self.base, self.experts)
        self.base = None if self.base is None else vocab.wrap(self.base)  # type: ignore[assignment]
        self.experts = [vocab.wrap(r) for r in self.experts]  # type: ignore[misc]
        self.readers = ([self.base] if self.base is not None else []) + self.experts
        self.reference = self.base if self.base is not None else self.experts[0]

    def _stack(self, slices: Sequence[SliceRange]) -> None:
        labels = ([f"base ({self.base.path})"] if self.base is not None else []) + [
            f"models[{i}] ({r.path})" for i, r in enumerate(self.experts)]
        self.layout = stack_layout(slices, None if self.base is None else self.base.keys(),
                                   [r.keys() for r in self.experts], labels)
        self.names = list(self.layout)
        self.layers = sum(sl.layers for sl in slices)
        base_names = {out: src.base for out, src in self.layout.items()
                      if src.base is not None and src.base_model is None}
        model_names: list[dict[str, str]] = [{} for _ in self.experts]
        for out, src in self.layout.items():
            for i, name in src.models:
                model_names[i][out] = name
            if src.base_model is not None and src.base is not None:  # a model as its slice's base
                model_names[src.base_model][out] = src.base
        self._base_view = None if self.base is None else RenamedReader(self.base, base_names)
        self._views = [RenamedReader(r, m) for r, m in zip(self.experts, model_names)]

    def sources(self, name: str) -> tuple[Any, list[Any], list[int]]:
        """Output tensor ``name``'s inputs: the base (None when it is not one; a model's tensor when its slice
        names that model as its base), the other models that are, and their indexes in the spec's models; each
        read under the output's name (:class:`RenamedReader` when stacking layers, else the checkpoints
        themselves)."""
        if self.layout is None:
            return self.base, self.experts, self._everyone
        src = self.layout[name]
        if src.base is None:
            base = None
        else:
            base = self._base_view if src.base_model is None else self._views[src.base_model]
        return base, [self._views[i] for i, _ in src.models], [i for i, _ in src.models]

    def readers_of(self, name: str) -> list[Any]:
        """The inputs of output tensor ``name``, the base first (see :meth:`sources`)."""
        base, experts, _ = self.sources(name)
        return ([base] if base is not None else []) + experts

    def info(self, name: str) -> Any:
        """Header of output tensor ``name``'s reference input (the base when it is an input, else the first
        model that is): its shape and stored dtype give the output's."""
        return self.readers_of(name)[0].info(name)

    def pick(self, name: str, values: Sequence[Any] | None) -> list[Any] | None:
        """Of per-model ``values`` (one per spec model), those of output tensor ``name``'s input models."""
        if values is None:
            return None
        return [values[i] for i in self.sources(name)[2]]

    @classmethod
    def open(cls, spec: MergeSpec) -> Self:
        """Open the base (if any) and every model of ``spec`` and validate them."""
        base = None if spec.base is None else partial(open_checkpoint, spec.base)
        return cls.from_openers(base, [partial(open_checkpoint, m.path) for m in spec.models], slice_ranges(spec),
                                spec.tokenizer)

    @classmethod
    def from_openers(
        cls, base: Callable[[], CheckpointReader] | None, experts: Sequence[Callable[[], CheckpointReader]],
        slices: Sequence[SliceRange] | None = None, tokenizer: TokenizerSpec | None = None,
    ) -> Self:
        """Call each opener, closing what was opened if one fails, and validate the checkpoints."""
        opened: list[CheckpointReader] = []
        try:
            for opener in ([base] if base is not None else []) + list(experts):
                opened.append(opener())
        except BaseException:
            for reader in opened:
                reader.close()
            raise
        if base is not None:
            return cls(opened[0], opened[1:], slices, tokenizer)
        return cls(None, opened, slices, tokenizer)

    def _validate(self) -> None:
        """Same tensor names and shapes everywhere, no floating-vs-integer mismatch; floating tensors stored
        in different precisions are allowed with a warning (merged in float32, float64 if an input is).
        When stacking layers, the same holds for the inputs of each output tensor."""
        if self.layout is None:
            self._check_same_names()
        self._check_inputs_agree()

    def _check_same_names(self) -> None:
        """Every checkpoint holds exactly the reference's tensor names."""
        ref = self.reference
        ref_keys = set(self.names)
        for reader in self.readers:
            if reader is ref:
                continue
            keys = set(reader.keys())
            missing = [n for n in self.names if n not in keys]
            extra = sorted(keys - ref_keys)
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"missing {len(missing)} tensor(s) present in {ref.path}: {few(missing)}")
                if extra:
                    parts.append(f"has {len(extra)} tensor(s) not in {ref.path}: {few(extra)}")
                raise TensorMismatchError(f"{reader.path}: " + "; ".join(parts))

    def _check_inputs_agree(self) -> None:
        """Every input of each output tensor has the reference input's shape and kind (floating or integer);
        floating precisions may differ (a warning). When stacking layers the inputs are other layers' tensors,
        which the messages name."""
        mixed: set[str] = set()
        for name in self.names:
            first, *others = self.readers_of(name)
            info = first.info(name)
            feeds = "" if self.layout is None else f" ('{info.name}'); both feed output tensor '{name}'"
            for reader in others:
                other = reader.info(name)
                if other.shape != info.shape:
                    raise TensorMismatchError(
                        f"{other.file}: tensor '{other.name}' has shape {other.shape} but {info.file} has "
                        f"{info.shape}{feeds}"
                    )
                if other.storage.is_floating_point != info.storage.is_floating_point:
                    raise TensorMismatchError(
                        f"{other.file}: tensor '{other.name}' is {other.storage} but {info.file} has "
                        f"{info.storage}; floating and integer tensors cannot be merged"
                    )
                if other.storage != info.storage:
                    mixed.add(f"{name} ({info.storage} vs {other.storage} in {other.file})")
        if mixed:
            msg = (
                f"inputs store {len(mixed)} tensor(s) in different floating dtypes, e.g. {few(sorted(mixed), 2)}; "
                "they are merged in float32 (float64 if an input is float64) and written in the output dtype"
            )
            log.warning(msg)
            self.warnings.append(msg)

    def close(self) -> None:
        for reader in self.readers:
            with contextlib.suppress(Exception):
                reader.close()

    def __enter__(self) -> MergeInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def slice_ranges(spec: MergeSpec) -> list[SliceRange] | None:
    """The spec's ``slices`` as :class:`~mergelab.merging.layout.SliceRange` (None without slices)."""
    if not spec.slices:
        return None
    return [SliceRange(sl.layers, sl.base_layer, tuple(sl.model_layers), sl.base_model) for sl in spec.slices]


def refuse_input_overlap(spec: MergeSpec, out_dir: str | Path, *, expert_folders: bool = False) -> None:
    """Refuse an ``out_dir`` that is, lies inside or contains the base or a model of ``spec``
    (:func:`mergelab.output_paths.refuse_overlap`) or has no name (:func:`~mergelab.output_paths.check_replaceable`);
    checks paths only, so it runs before any input is opened. ``expert_folders``: a model given by a file
    also reads the folder holding it (a zoo expert's head and sidecar, for the data-informed methods)."""
    check_replaceable(out_dir)
    paths: list[Path | None] = [spec.base]
    for m in spec.models:
        paths.append(m.path)
        if expert_folders and Path(m.path).is_file():
            paths.append(Path(m.path).parent)
    refuse_overlap(out_dir, paths)


def check_models(spec: MergeSpec, method: Method) -> None:
    """The model list suits ``method`` (count, base model, per-model weights); a :class:`SpecError` otherwise.
    With ``slices``, each slice's inputs are checked: the method merges them apart from the other slices'."""
    if spec.slices:
        for s, sl in enumerate(spec.slices):
            n = sum(a is not None for a in sl.model_layers) - (sl.base_model is not None)  # the slice's experts
            has_base = sl.base_layer is not None or sl.base_model is not None
            where = f"slices[{s}]"
            if n < method.min_models:
                raise SpecError(f"{where}: method '{method.name}' needs at least {method.min_models} models, got {n}")
            if method.max_models is not None and n > method.max_models:
                raise SpecError(f"{where}: method '{method.name}' takes at most {method.max_models} models, got {n}")
            if method.needs_base and not has_base:
                raise SpecError(f"{where}: method '{method.name}' needs the base model in every slice (base_layer, "
                                "or one of its models as the slice's base_model)")
            if sl.base_model is not None and not method.needs_base and not method.base_or_two:
                raise SpecError(f"{where}: method '{method.name}' takes no base model; remove base_model")
            if method.base_or_two and n == 1 and not has_base:
                raise SpecError(f"{where}: {method.name} with one model interpolates from the base model; give "
                                "base_layer or two models")
        if not method.uses_weights and any(m.weight != 1.0 for m in spec.models):
            raise SpecError(f"models: method '{method.name}' does not use per-model weights; remove 'weight'")
        return
    n = len(spec.models)
    if n < method.min_models:
        raise SpecError(f"models: method '{method.name}' needs at least {method.min_models} models, got {n}")
    if method.max_models is not None and n > method.max_models:
        raise SpecError(f"models: method '{method.name}' takes at most {method.max_models} models, got {n}")
    if method.needs_base and spec.base is None:
        raise SpecError(f"base: method '{method.name}' needs a base model (the pretrained checkpoint)")
    if method.base_or_two and n == 1 and spec.base is None:
        raise SpecError(f"base: {method.name} with one model interpolates from the base model; give base or two models")
    if not method.uses_weights and any(m.weight != 1.0 for m in spec.models):
        raise SpecError(f"models: method '{method.name}' does not use per-model weights; remove 'weight'")
    if method.weights_nonzero and sum(m.weight for m in spec.models) == 0:
        raise SpecError(f"models: the weights sum to zero; {method.name} is undefined")


class ParamResolver:
    """Per-tensor parameters: the spec's parameters, updated by the first override whose pattern matches.

    Also the per-tensor model weights (:meth:`weights`: the models' ``weight``, or the matching override's
    ``weights``) and per-model parameters (:meth:`model_params`: each model's ``parameters`` updated by the
    override's ``model_parameters``; ``None`` when no model sets any, so block kernels may run)."""

    def __init__(self, spec: MergeSpec, method: Method) -> None:
        self.default = method.parse_params(spec.parameters)
        self.rules = [
            (o, method.parse_params({**spec.parameters, **o.parameters}, where=f"overrides[{i}] ({o.pattern!r})"))
            for i, o in enumerate(spec.overrides)
        ]
        self.default_weights = [m.weight for m in spec.models]
        own = [dict(m.parameters) for m in spec.models]
        self.default_model_params = own if any(own) else None
        self._model_rules: list[tuple[list[float], list[dict[str, Any]] | None]] = []
        for i, (o, params) in enumerate(self.rules):
            merged = own if o.model_parameters is None else [{**a, **b} for a, b in zip(own, o.model_parameters)]
            self._model_rules.append((o.weights or self.default_weights, merged if any(merged) else None))
            if o.weights is not None and not method.uses_weights:
                raise SpecError(f"overrides[{i}].weights: method '{method.name}' does not use per-model weights")
        for where, params, per_model in (
            [("models[].parameters", self.default, self.default_model_params)]
            + [(f"overrides[{i}] ({o.pattern!r})", p, m[1]) for i, ((o, p), m) in enumerate(zip(self.rules, self._model_rules))]
        ):
            for k, values in enumerate(per_model or ()):
                self._check_model_params(method, params, values, f"{where}: model {k}")

    @staticmethod
    def _check_model_params(method: Method, params: MethodParams, values: dict[str, Any], where: str) -> None:
        unknown = sorted(set(values) - set(method.per_model))
        if unknown:
            allowed = ", ".join(method.per_model) or "none"
            raise SpecError(f"{where}: method '{method.name}' takes no per-model parameter(s) "
                            f"{', '.join(map(repr, unknown))}; per-model parameters it takes: {allowed}")
        if values:
            method.parse_params({**params.model_dump(by_alias=True), **values}, where=where)
            if method.whole_model_trim(params):
                raise SpecError(f"{where}: per-model parameters need trim_scope 'tensor' (each model's density "
                                "trims its own tensors); the whole-model trim has one density")

    def __call__(self, name: str) -> MethodParams:
        for override, params in self.rules:
            if override.matches(name):
                return params
        return self.default

    def _model_rule(self, name: str) -> tuple[list[float], list[dict[str, Any]] | None]:
        for (override, _), rule in zip(self.rules, self._model_rules):
            if override.matches(name):
                return rule
        return self.default_weights, self.default_model_params

    def weights(self, name: str) -> list[float]:
        """The models' weights for tensor ``name``."""
        return self._model_rule(name)[0]

    def model_params(self, name: str) -> list[dict[str, Any]] | None:
        """Each model's own parameters for tensor ``name``, or ``None`` when no model sets any."""
        return self._model_rule(name)[1]

    @property
    def varies_by_model(self) -> bool:
        """Whether any tensor has per-model parameters or weights other than the models' ``weight``."""
        return self.default_model_params is not None or any(
            w is not self.default_weights or m is not None for w, m in self._model_rules
        )


def global_trim_groups(inputs: MergeInputs, method: Method, params_of: ParamResolver) -> dict[float, list[str]]:
    """The tensors trimmed over the whole model (``method.global_trim_density``), grouped by density, in the
    reference's order: each group shares one threshold per expert. Empty and non-floating tensors are left
    out (nothing to trim)."""
    groups: dict[float, list[str]] = {}
    for name in inputs.names:
        info = inputs.info(name)
        if not info.storage.is_floating_point or math.prod(info.shape) == 0:
            continue
        density = method.global_trim_density(params_of(name))
        if density is not None:
            if inputs.layout is not None:
                raise SpecError(f"slices: the whole-model trim (trim_scope: global, tensor {name!r}) is not "
                                "defined over stacked slices of different models; use trim_scope: tensor")
            groups.setdefault(density, []).append(name)
    return groups


def output_plan(inputs: MergeInputs, dtype: str) -> list[tuple[str, tuple[int, ...], StorageDtype]]:
    """(name, shape, stored dtype) of every output tensor in the reference's order: floating tensors in the
    spec's output ``dtype`` (``auto``: the reference's), others as the reference stores them."""
    out = OUTPUT_DTYPES.get(dtype)
    plan = []
    for name in inputs.names:
        info = inputs.info(name)
        plan.append((name, info.shape, out if (out is not None and info.storage.is_floating_point) else info.storage))
    return plan


