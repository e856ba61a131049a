"""Layer stacking: which input tensor each output tensor of a sliced merge is computed from.

A merge spec with ``slices`` builds its output layer by layer from layer ranges of its inputs (mergekit's
``slices`` / ``layer_range``, the "frankenmerge"). Slice ``s`` has ``L_s`` layers and, for each input that
takes part in it, the first source layer ``a_{s,i}``; its output layers are numbered on from the previous
slices', ``o_s = L_0 + ... + L_{s-1}``. Then, for ``k < L_s``::

    output  <prefix>(o_s + k).<rest>   <-  input i's  <prefix>(a_{s,i} + k).<rest>   for every input i of slice s

merged by the spec's method over the inputs of slice ``s`` only, with the spec's base as theta_0 or, when the
slice names one of its models as its base (mergekit's per-slice ``base_model``), that model's layer. A tensor outside the layers (embeddings,
final norm, head) is taken from the inputs of the first slice when it precedes the layers (its name
names an embedding: ``embed``, ``wte``, ``wpe``, ``position_ids``) and from those of the last slice
otherwise -- mergekit's rule for its architectures' pre- and post-weights (``mergekit/plan.py``,
``plan_module``). A layer's tensors are those of the first input of its slice (at its source layer), in
storage order; the output lists the leading tensors, then the layers in order, then the trailing ones.

Layer-numbered names are recognised as ``<prefix>N.<rest>`` where the prefix ends in ``layers.``,
``layer.``, ``h.`` or ``blocks.`` (``model.layers.N.`` in Llama/Mistral/Qwen, ``transformer.h.N.`` in
GPT-2, ``encoder.layer.N.`` in BERT); a model without such names cannot be sliced (an error says which
naming is expected). Torch-free: the plan and the mergekit translation both use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergelab.errors import SpecError

#: a layer-numbered tensor name: ``<prefix>N.<rest>``
LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h|blocks)\.)(?P<index>\d+)\.")
#: the naming :data:`LAYER` expects, for error messages
EXPECTED_NAMING = "'model.layers.N.' (Llama, Mistral, Qwen), 'transformer.h.N.' (GPT-2) or 'encoder.layer.N.' (BERT)"
#: a tensor outside the layers that precedes them (mergekit's pre-weights): embeddings and position ids
_LEADING = re.compile(r"(?:^|\.)(?:[^.]*embed[^.]*|wte|wpe|position_ids)(?:\.|$)")
#: config.json keys holding the number of layers, in the order tried
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_index(name: str) -> int | None:
    """The layer index of tensor ``name``, or None outside the layers."""
    m = LAYER.match(name)
    return None if m is None else int(m.group("index"))


def num_layers(names: Sequence[str]) -> int:
    """The number of layers of a model with tensors ``names`` (1 + the largest layer index; 0 without any)."""
    indexes = [i for i in map(layer_index, names) if i is not None]
    return max(indexes) + 1 if indexes else 0


def is_leading(name: str) -> bool:
    """Whether a tensor outside the layers precedes them (embeddings, position ids), else it follows them."""
    return _LEADING.search(name) is not None


@dataclass(frozen=True)
class TensorSources:
    """The inputs of one output tensor: the base's tensor name (None: no base is an input of it) and
    ``(model index, tensor name)`` of each other model that is, in the order of the spec's models;
    ``base_model``: the model whose tensor ``base`` is (a slice's own base), None for the spec's base."""

    base: str | None
    models: tuple[tuple[int, str], ...]
    base_model: int | None = None


@dataclass(frozen=True)
class SliceRange:
    """One slice of a stacked merge: ``layers`` output layers, from the base's layers ``base_start + k``
    (None: the base is not in the slice) and model ``i``'s ``model_starts[i] + k`` (None: not in it);
    ``base_model``: the model that is this slice's base instead (mergekit's per-slice ``base_model``)."""

    layers: int
    base_start: int | None
    model_starts: tuple[int | None, ...]
    base_model: int | None = None


def stack_layout(
    slices: Sequence[SliceRange], base_names: Sequence[str] | None, model_names: Sequence[Sequence[str]],
    labels: Sequence[str],
) -> dict[str, TensorSources]:
    """Output tensor name -> its inputs, in output order (module docstring), for ``slices`` over the base
    (tensor names ``base_names``, None without a base) and the models (``model_names``). ``labels`` name the
    inputs in errors: the base's first when there is one, then the models'. A :class:`SpecError` for a
    layer beyond an input's layers, an input whose layer-numbered names are not recognised, or an input
    lacking a tensor its slice needs."""
    inputs: list[tuple[str | None, Sequence[str] | None]] = [("base", base_names)] + [
        (None, names) for names in model_names
    ]
    label = dict(zip([k for k, (_, names) in enumerate(inputs) if names is not None], labels))
    by_layer: dict[int, dict[int, list[str]]] = {}  # input -> layer -> its tensor names, storage order
    outside: dict[int, list[str]] = {}
    for k, (_, names) in enumerate(inputs):
        if names is None:
            continue
        layers: dict[int, list[str]] = {}
        other: list[str] = []
        for name in names:
            i = layer_index(name)
            (layers.setdefault(i, []) if i is not None else other).append(name)
        by_layer[k], outside[k] = layers, other

    def members(s: int, sl: SliceRange) -> list[tuple[int, int]]:
        starts = [(0, sl.base_start)] + [(k + 1, a) for k, a in enumerate(sl.model_starts)]
        out = [(k, a) for k, a in starts if a is not None]
        for k, a in out:
            if k not in by_layer:
                raise SpecError(f"slices[{s}]: the base takes part in the slice but the spec has no base")
            if not by_layer[k]:
                raise SpecError(f"slices[{s}]: {label[k]}: no layer-numbered tensor names found; layer slices "
                                f"need names like {EXPECTED_NAMING}")
            n = max(by_layer[k]) + 1
            if a < 0 or a + sl.layers > n:
                raise SpecError(f"slices[{s}]: {label[k]}: layers [{a}, {a + sl.layers}) go beyond its {n} "
                                f"layers (0..{n - 1})")
        if not out:
            raise SpecError(f"slices[{s}]: no input takes part (set base_layer or a model_layers entry)")
        return out

    def sources(s: int, k_members: list[tuple[int, str]]) -> TensorSources:
        own = slices[s].base_model  # a model as this slice's base: input own + 1
        b = 0 if own is None else own + 1
        base = next((n for k, n in k_members if k == b), None)
        return TensorSources(base, tuple((k - 1, n) for k, n in k_members if k not in (0, b)), own)

    def rename(name: str, index: int) -> str:
        m = LAYER.match(name)
        assert m is not None
        return f"{m.group('prefix')}{index}.{name[m.end():]}"

    def unshared(s: int, k_members: list[tuple[int, int]], names: list[str]) -> None:
        for k, _ in k_members:
            have = set(outside[k])
            missing = [n for n in names if n not in have]
            if missing:
                raise SpecError(f"slices[{s}]: {label[k]} has no tensor {missing[0]!r} (taken from the inputs of "
                                f"slice {s}, the {'first' if s == 0 else 'last'} slice)")

    layout: dict[str, TensorSources] = {}
    all_members = [members(s, sl) for s, sl in enumerate(slices)]
    first, last = all_members[0], all_members[-1]
    leading = [n for n in outside[first[0][0]] if is_leading(n)]
    trailing = [n for n in outside[last[0][0]] if not is_leading(n)]
    unshared(0, first, leading)
    unshared(len(slices) - 1, last, trailing)
    for name in leading:
        layout[name] = sources(0, [(k, name) for k, _ in first])
    offset = 0
    first_prefix = None
    for s, (sl, mem) in enumerate(zip(slices, all_members)):
        prefix = LAYER.match(by_layer[mem[0][0]][mem[0][1]][0]).group("prefix")  # type: ignore[union-attr]
        if first_prefix is not None and prefix != first_prefix:
            raise SpecError(f"slices[{s}]: {label[mem[0][0]]} names its layers '{prefix}N.', slice 0 "
                            f"'{first_prefix}N.'; stacked slices need one architecture's naming")
        first_prefix = prefix
        for j in range(sl.layers):
            ref_k, ref_a = mem[0]
            for ref_name in by_layer[ref_k][ref_a + j]:
                rest = ref_name[LAYER.match(ref_name).end():]  # type: ignore[union-attr]
                out_name = f"{prefix}{offset + j}.{rest}"
                picked: list[tuple[int, str]] = []
                for k, a in mem:
                    have = by_layer[k].get(a + j, [])
                    src = next((n for n in have if n[LAYER.match(n).end():] == rest), None)  # type: ignore[union-attr]
                    if src is None:
                        raise SpecError(f"slices[{s}]: {label[k]} has no tensor '*.{a + j}.{rest}' in its layer "
                                        f"{a + j} (needed for output tensor {out_name!r})")
                    picked.append((k, src))
                layout[out_name] = sources(s, picked)
        offset += sl.layers
    for name in trailing:
        layout[name] = sources(len(slices) - 1, [(k, name) for k, _ in last])
    return layout


def set_layer_count(config: dict[str, Any], layers: int) -> str | None:
    """Set the number of layers in a model's ``config`` (the first of :data:`LAYER_COUNT_KEYS` it has, as
    mergekit sets its architecture's ``num_hidden_layers``); the key set, or None when it has none."""
    for key in LAYER_COUNT_KEYS:
        if key in config:
            config[key] = layers
            return key
    return None


def slice_of(slices: Sequence[Any], name: str) -> int:
    """The slice an output tensor belongs to: by its layer index; the first slice for a leading tensor
    outside the layers, the last for a trailing one. ``slices`` need a ``layers`` count each."""
    index = layer_index(name)
    if index is None:
        return 0 if is_leading(name) else len(slices) - 1
    for s, sl in enumerate(slices):
        if index < sl.layers:
            return s
        index -= sl.layers
    return len(slices) - 1


__all__ = ["EXPECTED_NAMING", "LAYER", "LAYER_COUNT_KEYS", "SliceRange", "TensorSources", "is_leading",
           "layer_index", "num_layers", "set_layer_count", "slice_of", "stack_layout"]
