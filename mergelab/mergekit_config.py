"""mergekit configurations, unchanged: recognise a mergekit YAML and translate it into a native merge spec.

A file is a mergekit config when its top level has ``merge_method`` (a native spec has ``method``).
:func:`translate` returns the equivalent :class:`~mergelab.spec.MergeSpec` as a mapping (``mergelab
convert`` prints it; ``mergelab merge`` runs it), with mergekit's semantics selected explicitly:

========================  ====================================================================================
mergekit                  native spec
========================  ====================================================================================
``linear``                ``weight_average`` (``normalize: true``, mergekit's default; ``false``: the plain sum)
``task_arithmetic``       ``task_arithmetic``; ``normalize: true`` divides each tensor's weights by their sum
``ties``                  ``ties`` with ``trim_scope: tensor``, ``sign_election: mass``, ``sign_test: weighted``,
                          ``disjoint_divisor: weight`` (``normalize: true``, default) or ``none`` (``false``);
                          ``rescale: true`` -> ``rescale: l1`` (default ``false``: the native default ``none``)
``dare_ties``             ``dare_ties`` with ``rescale: l1`` (``rescale: true``, default) or ``none``,
                          ``sign_test: weighted``, ``disjoint_divisor: none`` (default) or ``weight``
``dare_linear``           ``dare_linear`` (``rescale`` as above; ``normalize: true`` divides the weights)
``breadcrumbs``           ``breadcrumbs`` (per-model ``density``, ``gamma``; ``rescale: true`` -> ``rescale: l1``)
``model_stock``           ``model_stock`` with ``extrapolate: true`` (and ``filter_wise``)
``slerp``                 ``slerp`` from ``base_model`` to the other model, ``parallel_threshold: 0.9995``
``della``                 ``della`` with ``spacing: mergekit``, ``rescale: l1`` (default) or ``none``,
                          ``sign_test: weighted``, ``disjoint_divisor: weight`` (default) or ``none``; per-model
                          ``density``, ``epsilon`` (0.15)
``della_linear``          ``della_linear`` (as ``della``; ``normalize: true`` divides the weights)
``breadcrumbs_ties``      ``breadcrumbs_ties`` with ``sign_test: weighted``, ``disjoint_divisor: none`` (default)
                          or ``weight``; per-model ``density``, ``gamma``; ``rescale: true`` -> ``rescale: l1``
(the TIES family)          ``ties``, ``dare_ties``, ``della``, ``breadcrumbs_ties`` also get ``zero_sign: positive``
                          (mergekit elects +1 where the sign sum is exactly 0)
``sce``                   ``sce`` with ``select_topk``, ``min_energy: 1e-6``, ``zero_sign: positive``
``nuslerp``               ``nuslerp`` (``nuslerp_flatten`` -> ``flatten``, ``nuslerp_row_wise`` -> ``row_wise``;
                          task vectors when there is a ``base_model``)
``multislerp``            ``multislerp`` (``normalize_weights``, ``eps``; task vectors when there is a base)
``karcher``               ``karcher`` (``max_iter``, ``tol``) over every model, ``base_model`` included
``nearswap``              ``nearswap`` (``t``)
``arcee_fusion``          ``arcee_fusion``
``passthrough``           ``passthrough`` of the one model (per-model ``scale``); with ``slices``, layer stacking
``ram``                   ``ram`` (``epsilon``, 1e-5)
``ramplus_tl``            ``ramplus_tl`` (``r`` 0.1, ``alpha`` 0.2, ``epsilon`` 1e-5)
========================  ====================================================================================

mergekit's per-model parameters default as mergekit's do (``density`` 1.0, ``gamma`` 0.01), not as the papers'
defaults of the native methods. Parameter values follow mergekit's ``evaluate_setting``
(``mergekit/config.py``): a number; a **gradient** list ``[v_0, ..., v_{m-1}]`` read at layer position
``t in [0, 1]`` as ``s = t (m - 1)``, ``i = floor(s)``, ``(1 - (s - i)) v_i + (s - i) v_{min(i+1, m-1)}``, with
``t = l / (L - 1)`` for layer ``l`` of ``L`` (``t = 1`` when ``L = 1``) and ``t = 0`` for tensors outside the
layers (embeddings, final norm, head); or a list of ``{filter, value}`` entries, the first whose ``filter`` is
a substring of the tensor name (or is absent or ``*``) giving the value. A model's own ``parameters`` come
first, then the slice's, then the top level's (``mergekit.config.ConfigReader.parameter``). Per-tensor values
become the spec's ``overrides`` (per-model ``weights`` and ``model_parameters``), grouped by layer.

Layer stacking (``slices`` whose ``layer_range`` values are not every layer of each model, or several slices)
becomes the native spec's ``slices`` (:mod:`mergelab.merging.layout`): slice ``s``'s output layers are
numbered on from the previous slices'; output layer ``o_s + k`` is merged from each source's layer
``layer_range[0] + k`` (mergekit's ``MergePlanner.plan_slice``), so a slice's sources need equal-length ranges.
Tensors outside the layers are merged from the first slice's sources when they precede the layers
(embeddings) and from the last slice's when they follow (final norm, head), with that slice's parameters at
``t = 0`` (mergekit's ``plan_module``); within a slice ``t = k / (L_s - 1)`` (1 for a one-layer slice). A
model's values are read from its entry in that slice, evaluated on its input tensor's name; the method's
shared values on the output tensor's name (mergekit's ``resolve_parameters``). The base model takes part in a
slice only as one of its sources (mergekit adds it only to a ``models:`` config); ``linear``, ``karcher`` and
``passthrough`` merge every source alike. A slice's own ``base_model`` (mergekit's
``OutputSliceDefinition.base_model``, ``ConfigReader.base_model``: it replaces the config's for that slice's
tensors, the first slice's for the tensors before the layers, the last's for those after) must be one of its
sources and becomes that slice's ``base_model`` (the index of the model among the spec's models); the
config's base model is then one of that slice's models (with a weight) when it is among its sources, and
still gives the config files. The output ``config.json`` gets the summed layer count
(mergekit's ``_model_out_config``). There is one ``merge_method`` per config (mergekit has no per-slice method).

Model references must be local folders (or files): a Hugging Face hub id, a ``@revision`` or a ``+lora`` is
an error, since mergelab never downloads. Relative paths resolve against the current folder (as mergekit
does), else against the config's folder. Not supported yet (a clear error each): ``modules``, a per-slice
``base_model`` other than the config's with ``linear``, ``nuslerp``, ``multislerp``, ``karcher`` or ``passthrough`` (whose base
is not theta_0 of a formula), and ``residual_weight``.

Tokenizers (the native ``tokenizer:`` section and ``chat_template``; :mod:`mergelab.merging.vocabulary` and
:mod:`mergelab.tokenizers` state the rules; transformers needed, ``pip install mergelab[hf]``):

========================================  ==========================================================================
mergekit                                  native spec
========================================  ==========================================================================
(no ``tokenizer_source``/``tokenizer``)   none: the reference's tokenizer files are copied as they are
``tokenizer_source: base``                ``tokenizer: {source: base}``: the base's vocabulary (stripped to its
                                          ``vocab_size``), every input's embedding rows permuted into it
``tokenizer_source: union``               ``tokenizer: {source: union}``: the union of the inputs' vocabularies
``tokenizer_source: MODEL``               ``tokenizer: {source: MODEL}``: that model's tokenizer
``tokenizer: {source, tokens,             ``tokenizer: {source, tokens, pad_to_multiple_of}``; ``source`` defaults to
pad_to_multiple_of}``                     ``union``; a token's ``source`` ``{kind: zero}`` -> ``zero``, a model ->
                                          its folder, ``{kind: model_token, model, token | token_id}`` ->
                                          ``{model, token | token_id}``; ``force`` as is
``chat_template: NAME | auto | TEXT``     ``chat_template`` as is (named: alpaca, chatml, exaone, llama3, mistral)
========================================  ==========================================================================
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from mergelab.checkpoints import open_checkpoint
from mergelab.errors import SpecError
from mergelab.merging.layout import EXPECTED_NAMING, LAYER, SliceRange, layer_index, slice_of, stack_layout
from mergelab.spec import read_yaml_file

log = logging.getLogger(__name__)

#: mergekit merge_method -> native method
METHOD_MAP = {
    "linear": "weight_average",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_ties": "dare_ties",
    "dare_linear": "dare_linear",
    "breadcrumbs": "breadcrumbs",
    "model_stock": "model_stock",
    "slerp": "slerp",
    "della": "della",
    "della_linear": "della_linear",
    "breadcrumbs_ties": "breadcrumbs_ties",
    "sce": "sce",
    "nuslerp": "nuslerp",
    "multislerp": "multislerp",
    "karcher": "karcher",
    "nearswap": "nearswap",
    "arcee_fusion": "arcee_fusion",
    "passthrough": "passthrough",
    "ram": "ram",
    "ramplus_tl": "ramplus_tl",
}
#: mergekit methods mergelab does not run, and why
PENDING: dict[str, str] = {}
#: method parameters (top level) and per-model parameters each mergekit method reads, with mergekit's defaults
_GTA = {"int8_mask": False, "normalize": None, "rescale": None, "lambda": 1.0}
METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {**_GTA, "normalize": False, "rescale": False},
    "ties": {**_GTA, "normalize": True, "rescale": False},
    "dare_ties": {**_GTA, "normalize": False, "rescale": True},
    "dare_linear": {**_GTA, "normalize": False, "rescale": True},
    "breadcrumbs": {**_GTA, "normalize": False, "rescale": False},
    "model_stock": {"filter_wise": False},
    "slerp": {"t": None},
    "della": {**_GTA, "normalize": True, "rescale": True},
    "della_linear": {**_GTA, "normalize": False, "rescale": True},
    "breadcrumbs_ties": {**_GTA, "normalize": False, "rescale": False},
    "sce": {"int8_mask": False, "select_topk": 1.0},
    "nuslerp": {"nuslerp_row_wise": False, "nuslerp_flatten": True},
    "multislerp": {"normalize_weights": True, "eps": 1e-8},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    "nearswap": {"t": None},
    "arcee_fusion": {},
    "passthrough": {},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
}
MODEL_PARAMS: dict[str, dict[str, Any]] = {
    "linear": {"weight": None},
    "task_arithmetic": {"weight": None, "density": 1.0},
    "ties": {"weight": None, "density": 1.0},
    "dare_ties": {"weight": None, "density": 1.0},
    "dare_linear": {"weight": None, "density": 1.0},
    "breadcrumbs": {"weight": None, "density": 1.0, "gamma": 0.01},
    "model_stock": {},
    "slerp": {},
    "della": {"weight": None, "density": 1.0, "epsilon": 0.15},
    "della_linear": {"weight": None, "density": 1.0, "epsilon": 0.15},
    "breadcrumbs_ties": {"weight": None, "density": 1.0, "gamma": 0.01},
    "sce": {},
    "nuslerp": {"weight": None},
    "multislerp": {"weight": None},
    "karcher": {},
    "nearswap": {},
    "arcee_fusion": {},
    "passthrough": {"scale": 1.0},
    "ram": {},
    "ramplus_tl": {},
}
#: mergekit methods without a base model (the others need base_model)
_NO_BASE = ("linear", "slerp", "nuslerp", "multislerp", "karcher", "passthrough")
#: mergekit's generalized task arithmetic methods with TIES's sign consensus
_CONSENSUS = ("ties", "dare_ties", "breadcrumbs_ties", "della")
TOP_LEVEL = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "name")
UNSUPPORTED_TOP_LEVEL = {
    "modules": "per-module configs (multi-module architectures)",
}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
SLERP_THRESHOLD = 0.9995  # mergekit/merge_methods/slerp.py DOT_THRESHOLD
_LAYER = LAYER
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_mergekit_config(data: Any) -> bool:
    """Whether parsed YAML ``data`` is a mergekit config (it has ``merge_method``, a native spec ``method``)."""
    return isinstance(data, Mapping) and "merge_method" in data


# ------------------------------------------------------------------------------------- parameter values


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """A mergekit parameter value for ``tensor_name`` at layer position ``t`` (mergekit's
    ``evaluate_setting``): a scalar as is; a list of numbers interpolated linearly at ``t (len - 1)``; a list of
    ``{filter, value}`` conditions, the first matching (substring) one evaluated; ``None`` when no condition
    matches (the lookup then falls through to the next level)."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if setting and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if setting and all(isinstance(v, (bool, int, float, str)) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"value", "filter"}:
                raise SpecError(f"a parameter list must hold numbers or {{filter, value}} entries, got {cond!r}")
            f = cond.get("filter")
            if f is None or f == "*" or (tensor_name and str(f) in tensor_name):
                return evaluate(cond["value"], tensor_name, t)
        return None
    raise SpecError(f"unexpected parameter value {setting!r} (a number, a list of numbers or {{filter, value}} entries)")


def layer_position(name: str, num_layers: int) -> tuple[int | None, float]:
    """The layer index of tensor ``name`` (``None`` outside the layers) and mergekit's gradient position
    ``t = index / (num_layers - 1)`` (1 for a single layer; 0 outside the layers)."""
    m = _LAYER.match(name)
    if m is None:
        return None, 0.0
    index = int(m.group("index"))
    return index, (index / (num_layers - 1) if num_layers > 1 else 1.0)


# ------------------------------------------------------------------------------------------- models


def resolve_model(ref: Any, where: str, root: Path) -> Path:
    """The local folder (or file) of a mergekit model reference; a clear error for a hub id, a revision, a
    LoRA or a missing path. Relative paths: the current folder first (mergekit's rule), then ``root``."""
    if isinstance(ref, Mapping):  # mergekit's expanded form {model: {path: ...}, lora: ...}
        if ref.get("lora"):
            raise SpecError(f"{where}: LoRA adapters are not supported (merge the adapter into its model first)")
        inner = ref.get("model", ref)
        ref = inner.get("path") if isinstance(inner, Mapping) else inner
        if isinstance(inner, Mapping) and inner.get("revision"):
            raise SpecError(f"{where}: a revision ({inner['revision']!r}) names a hub repository; mergelab reads "
                            "local folders only (no download)")
    if not isinstance(ref, str) or not ref:
        raise SpecError(f"{where}: a model reference must be a path, got {ref!r}")
    if "+" in ref and not Path(ref).exists():
        raise SpecError(f"{where}: {ref!r} applies a LoRA adapter ('model+lora'); not supported (merge the "
                        "adapter into its model first)")
    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, root / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    if "@" in ref or _HUB_ID.match(ref):
        raise SpecError(
            f"{where}: {ref!r} is not a local folder; it looks like a Hugging Face hub id. mergelab reads local "
            "folders only (no download): download it first (e.g. `huggingface-cli download "
            f"{ref.split('@')[0]} --local-dir DIR`) and give DIR"
        )
    raise SpecError(f"{where}: model {ref!r} not found (looked in {', '.join(str(c) for c in candidates)})")


def _tensor_names(path: Path) -> list[str]:
    with open_checkpoint(path) as reader:
        return reader.keys()


def _num_layers(names: list[str]) -> int:
    indexes = [i for i, _ in (layer_position(n, 1) for n in names) if i is not None]
    return max(indexes) + 1 if indexes else 0


# ------------------------------------------------------------------------------------------ translate


class _Source:
    def __init__(self, path: Path, parameters: Mapping[str, Any], where: str, ref: Any) -> None:
        self.path, self.parameters, self.where, self.ref = path, dict(parameters or {}), where, ref
        # a slice's source: its first layer, number of layers, the model's layers and tensor names
        self.start, self.length, self.layers, self.names = 0, 0, 0, list[str]()


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise SpecError(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)})")


def _check_params(params: Mapping[str, Any] | None, allowed: dict[str, Any], method: str, where: str) -> dict:
    params = dict(params or {})
    if not isinstance(params, dict):
        raise SpecError(f"{where}: parameters must be a mapping")
    for key in params:
        if key not in allowed:
            raise SpecError(f"{where}: mergekit's {method} takes no parameter {key!r} "
                            f"(it reads: {', '.join(allowed) or 'none'})")
    return params


def translate(data: Mapping[str, Any], *, source: str = "config", root: Path | None = None) -> dict[str, Any]:
    """The native merge spec (a mapping for :func:`mergelab.spec.parse_spec`) equivalent to the mergekit config
    ``data``. Reads the models' tensor names (headers only) to resolve gradients and filters per tensor."""
    root = Path.cwd() if root is None else root
    if not is_mergekit_config(data):
        raise SpecError(f"{source}: not a mergekit config (no merge_method)")
    for key, what in UNSUPPORTED_TOP_LEVEL.items():
        if key in data and data[key] is not None:
            raise SpecError(f"{source}: {key!r} ({what}) is not supported")
    _check_keys(data, TOP_LEVEL + tuple(UNSUPPORTED_TOP_LEVEL), source)
    mk_method = data["merge_method"]
    if mk_method not in METHOD_MAP:
        if mk_method in PENDING:
            raise SpecError(f"{source}: merge_method {mk_method!r} is not in mergelab yet ({PENDING[mk_method]}); "
                            f"supported: {', '.join(METHOD_MAP)}")
        raise SpecError(f"{source}: unknown merge_method {mk_method!r} (supported: {', '.join(METHOD_MAP)})")
    if ("models" in data) == ("slices" in data):
        raise SpecError(f"{source}: give exactly one of 'models' or 'slices'")
    method_allowed = METHOD_PARAMS[mk_method]
    model_allowed = MODEL_PARAMS[mk_method]
    # top-level parameters may hold method parameters and per-model defaults
    top = _check_params(data.get("parameters"), {**method_allowed, **model_allowed}, mk_method,
                        f"{source}: parameters")
    base = None if data.get("base_model") is None else resolve_model(data["base_model"], f"{source}: base_model", root)
    slice_params: dict[str, Any] = {}
    sources: list[_Source] = []
    stacked: list[_Slice] | None = None
    if "models" in data:
        if not isinstance(data["models"], list) or not data["models"]:
            raise SpecError(f"{source}: models must be a non-empty list")
        for i, entry in enumerate(data["models"]):
            where = f"{source}: models[{i}]"
            if not isinstance(entry, Mapping) or "model" not in entry:
                raise SpecError(f"{where}: each entry needs 'model:'")
            _check_keys(entry, ("model", "parameters"), where)
            params = _check_params(entry.get("parameters"), model_allowed, mk_method, f"{where}.parameters")
            sources.append(_Source(resolve_model(entry["model"], where, root), params, where, entry["model"]))
    else:
        slices = _read_slices(data["slices"], base, source, root, mk_method, method_allowed, model_allowed)
        if (len(slices) == 1 and slices[0].base is None
                and all(s.start == 0 and s.length == s.layers for s in slices[0].sources)):
            sources, slice_params = slices[0].sources, slices[0].parameters  # every layer: a plain merge
        else:
            stacked = slices
            sources = slices[0].sources

    # mergekit adds the base model as a source when it is not listed; the base is never a task vector
    experts = [s for s in sources if base is None or s.path != base]
    base_listed = [s for s in sources if base is not None and s.path == base]
    reference = base if base is not None else sources[0].path
    names = _tensor_names(reference)
    num_layers = _num_layers(names)

    def method_value(key: str, name: str, t: float, slice_level: Mapping[str, Any]) -> Any:
        for level in (slice_level, top):
            if key in level:
                value = evaluate(level[key], name, t)
                if value is not None:
                    return value
        return method_allowed[key]

    def model_value(src: _Source, key: str, name: str, t: float, slice_level: Mapping[str, Any]) -> Any:
        for level in (src.parameters, slice_level, top):
            if key in level:
                value = evaluate(level[key], name, t)
                if value is not None:
                    return value
        default = model_allowed[key]
        if default is None:
            raise SpecError(f"{src.where}: mergekit's {mk_method} needs parameter {key!r} (for tensor {name!r})")
        return default

    native = METHOD_MAP[mk_method]
    if mk_method not in _NO_BASE and base is None and not (stacked and all(sl.base for sl in stacked)):
        raise SpecError(f"{source}: mergekit's {mk_method} needs base_model")
    if stacked is not None:
        for k, sl in enumerate(stacked):
            _check_counts(mk_method, sl.base or base, sl.sources, f"{source}: slices[{k}]", slices_form=True)
    else:
        _check_counts(mk_method, base, sources, source, slices_form=False)
    if mk_method == "karcher" and base is not None and not base_listed:
        # mergekit averages every model it reads, the base model among them
        experts = [_Source(base, {}, f"{source}: base_model", data["base_model"])] + experts
    elif mk_method == "karcher":
        experts = sources
    if mk_method == "linear":
        experts = sources  # linear averages every listed model, the base among them if listed
        if base is not None and not base_listed and stacked is None:
            raise SpecError(f"{source}: linear with a base_model that is not in models: mergekit adds it without "
                            "a weight (and fails); list it under models with a weight, or remove base_model")

    def resolve(name: str, t: float, members: list[tuple[_Source, str]],
                slice_level: Mapping[str, Any]) -> tuple[tuple, tuple, tuple]:
        """Output tensor ``name``'s method parameters, and each member's weight and own parameters (mergekit
        evaluates a model's values on its input tensor's name, the shared ones on the output's)."""
        params: dict[str, Any] = {}
        weights: list[float] = []
        per_model: list[dict[str, Any]] = []

        def mv(key: str) -> Any:
            return method_value(key, name, t, slice_level)

        def each(key: str) -> list[Any]:
            return [model_value(src, key, in_name, t, slice_level) for src, in_name in members]

        if mk_method == "slerp":
            t_value = mv("t")
            if t_value is None:
                raise SpecError(f"{source}: slerp needs parameter 't' (for tensor {name!r})")
            params = {"t": float(t_value), "parallel_threshold": SLERP_THRESHOLD}
        elif mk_method == "model_stock":
            params = {"extrapolate": True, "filter_wise": bool(mv("filter_wise"))}
        elif mk_method == "sce":
            params = {"select_topk": float(mv("select_topk")), "min_energy": 1e-6, "zero_sign": "positive"}
        elif mk_method == "karcher":
            params = {"max_iter": int(mv("max_iter")), "tol": float(mv("tol"))}
        elif mk_method == "nearswap":
            t_value = mv("t")
            if t_value is None:
                raise SpecError(f"{source}: nearswap needs parameter 't' (for tensor {name!r})")
            params = {"t": float(t_value)}
        elif mk_method == "arcee_fusion":
            params = {}
        elif mk_method in ("ram", "ramplus_tl"):
            params = {k: float(mv(k)) for k in method_allowed}
        elif mk_method == "passthrough":
            params = {"scale": float(each("scale")[0])}
        elif mk_method in ("nuslerp", "multislerp"):
            weights = [float(w) for w in each("weight")]
            if mk_method == "nuslerp":
                params = {"flatten": bool(mv("nuslerp_flatten")), "row_wise": bool(mv("nuslerp_row_wise"))}
            else:
                params = {"normalize_weights": bool(mv("normalize_weights")), "eps": float(mv("eps"))}
        else:
            normalize = bool(mv("normalize"))
            weights = [float(w) for w in each("weight")]
            if mk_method == "linear":
                if not normalize:
                    params["normalize"] = False
            else:
                lam = float(mv("lambda"))
                rescale = bool(mv("rescale"))
                params["lambda"] = lam
                densities = [float(d) for d in each("density")]
                if mk_method != "task_arithmetic":
                    per_model = [{"density": d} for d in densities]
                    extra = {"breadcrumbs": "gamma", "breadcrumbs_ties": "gamma", "della": "epsilon",
                             "della_linear": "epsilon"}.get(mk_method)
                    if extra is not None:
                        for pm, value in zip(per_model, each(extra)):
                            pm[extra] = float(value)
                if mk_method in ("dare_ties", "dare_linear", "della", "della_linear"):
                    params["rescale"] = "l1" if rescale else "none"
                    if mk_method.startswith("della"):
                        params["spacing"] = "mergekit"
                elif rescale:  # ties, breadcrumbs, breadcrumbs_ties: magnitude pruning rescaled to the L1 norm
                    params["rescale"] = "l1"
                if mk_method in _CONSENSUS:
                    params.update(sign_election="mass", sign_test="weighted", zero_sign="positive",
                                  disjoint_divisor="weight" if normalize else "none")
                    if mk_method == "ties":
                        params["trim_scope"] = "tensor"
                elif normalize:  # task arithmetic, dare_linear, della_linear, breadcrumbs: divide by sum_i w_i
                    total = sum(weights)
                    total = 1.0 if abs(total) < 1e-8 else total
                    weights = [w / total for w in weights]
                if mk_method == "task_arithmetic" and any(d != 1.0 for d in densities):
                    raise SpecError(f"{source}: task_arithmetic does not sparsify; remove 'density'")
                if mk_method == "task_arithmetic":
                    per_model = []
        return (tuple(sorted(params.items())), tuple(weights), tuple(tuple(sorted(p.items())) for p in per_model))

    if stacked is not None:
        return _stacked_spec(data, stacked, base, mk_method, native, resolve, source, root)
    resolved = {name: resolve(name, layer_position(name, num_layers)[1], [(e, name) for e in experts], slice_params)
                for name in names}
    default = Counter(resolved.values()).most_common(1)[0][0] if resolved else ((), (), ())
    spec: dict[str, Any] = {"method": native}
    if mk_method == "slerp":
        spec["base"] = str(base)
        spec["models"] = [{"path": str(experts[0].path)}]
    else:
        if base is not None and mk_method != "linear":
            spec["base"] = str(base)
        elif base is not None:
            spec["base"] = str(base)  # config and tokenizer files come from it
        models = []
        for k, s in enumerate(experts):
            entry: dict[str, Any] = {"path": str(s.path)}
            if default[1]:
                entry["weight"] = default[1][k]
            if default[2] and dict(default[2][k]):
                entry["parameters"] = dict(default[2][k])
            models.append(entry)
        spec["models"] = models
    spec["parameters"] = dict(default[0])
    spec["overrides"] = _overrides(resolved, default, names)
    return _finish(spec, data, source, root)


def _model_or_keyword(value: Any, keywords: tuple[str, ...], where: str, root: Path) -> str:
    """A keyword of ``keywords`` as is, else the local folder of a model reference."""
    if isinstance(value, str) and value in keywords:
        return value
    return str(resolve_model(value, where, root))


def _token_source(value: Any, where: str, root: Path) -> Any:
    """A ``tokens:`` entry's ``source`` in the native form: ``zero``, a model folder, ``{model, token |
    token_id}`` (mergekit's ``{kind: zero}``, a model reference, ``{kind: model_token, ...}``), or None."""
    if value is None:
        return None
    if isinstance(value, Mapping) and "kind" in value:
        if value["kind"] == "zero":
            _check_keys(value, ("kind",), where)
            return "zero"
        if value["kind"] == "model_token":
            _check_keys(value, ("kind", "model", "token", "token_id"), where)
            out: dict[str, Any] = {"model": str(resolve_model(value.get("model"), f"{where}.model", root))}
            for key in ("token", "token_id"):
                if value.get(key) is not None:
                    out[key] = value[key]
            if len(out) != 2:
                raise SpecError(f"{where}: a model_token source needs exactly one of token or token_id")
            return out
        raise SpecError(f"{where}: unknown source kind {value['kind']!r} (zero or model_token)")
    return str(resolve_model(value, where, root))


def _tokenizer(data: Mapping[str, Any], source: str, root: Path) -> dict[str, Any] | None:
    """The native ``tokenizer:`` section of mergekit's ``tokenizer_source`` (``base``, ``union`` or a model) or
    ``tokenizer:`` section (``source``, default ``union``; ``tokens``; ``pad_to_multiple_of``); None without
    either (the reference's tokenizer files are copied)."""
    tok_source, section = data.get("tokenizer_source"), data.get("tokenizer")
    if tok_source is not None and section is not None:
        raise SpecError(f"{source}: give tokenizer_source or tokenizer, not both (mergekit refuses both)")
    if tok_source is not None:
        return {"source": _model_or_keyword(tok_source, ("base", "union"), f"{source}: tokenizer_source", root)}
    if section is None:
        return None
    where = f"{source}: tokenizer"
    if not isinstance(section, Mapping):
        raise SpecError(f"{where}: must be a mapping with source, tokens, pad_to_multiple_of")
    _check_keys(section, ("source", "tokens", "pad_to_multiple_of"), where)
    out: dict[str, Any] = {"source": _model_or_keyword(section.get("source", "union"), ("base", "union"),
                                                       f"{where}.source", root)}
    tokens = section.get("tokens") or {}
    if not isinstance(tokens, Mapping):
        raise SpecError(f"{where}.tokens: must map each token to {{source, force}}")
    native: dict[str, Any] = {}
    for text, entry in tokens.items():
        at = f"{where}.tokens[{text!r}]"
        entry = entry or {}
        if not isinstance(entry, Mapping):
            raise SpecError(f"{at}: must be a mapping with source and force")
        _check_keys(entry, ("source", "force"), at)
        native[str(text)] = {"source": _token_source(entry.get("source"), f"{at}.source", root),
                             "force": bool(entry.get("force", False))}
    if native:
        out["tokens"] = native
    if section.get("pad_to_multiple_of") is not None:
        out["pad_to_multiple_of"] = section["pad_to_multiple_of"]
    return out


def _finish(spec: dict[str, Any], data: Mapping[str, Any], source: str, root: Path) -> dict[str, Any]:
    """``spec`` with the config's output dtype, tokenizer section (:func:`_tokenizer`) and chat template;
    empty ``overrides``/``parameters`` left out."""
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        if str(dtype) not in DTYPES:
            raise SpecError(f"{source}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        spec["dtype"] = DTYPES[str(dtype)]
    tokenizer = _tokenizer(data, source, root)
    if tokenizer is not None:
        spec["tokenizer"] = tokenizer
    if data.get("chat_template") is not None:
        if not isinstance(data["chat_template"], str) or not data["chat_template"]:
            raise SpecError(f"{source}: chat_template must be a template name or a Jinja template text")
        spec["chat_template"] = data["chat_template"]
    if not spec.get("overrides"):
        spec.pop("overrides", None)
    if not spec.get("parameters"):
        spec.pop("parameters", None)
    return spec


#: mergekit methods that merge every source of a slice alike, the base model too when it is one
_BASE_AS_MODEL = ("linear", "karcher", "passthrough")


#: mergekit methods whose base model is not theta_0 of a formula (ignored, averaged, or optional task vectors):
#: a per-slice ``base_model`` other than the config's is refused with them
_SLICE_BASE_REFUSED = ("linear", "nuslerp", "multislerp", "karcher", "passthrough")


class _Slice:
    """One mergekit output slice: its sources (each with ``start``, ``length``), parameters, place in the config;
    ``base``: its own ``base_model`` when that is not the config's (else None)."""

    def __init__(self, sources: list[_Source], parameters: dict[str, Any], where: str,
                 base: Path | None = None) -> None:
        self.sources, self.parameters, self.where, self.base = sources, parameters, where, base
        self.length = sources[0].length


def _read_slices(raw: Any, base: Path | None, source: str, root: Path, mk_method: str,
                 method_allowed: dict[str, Any], model_allowed: dict[str, Any]) -> list[_Slice]:
    """mergekit's ``slices``, checked: each source a local model with a ``layer_range`` ``[a, b)`` inside its
    layers, every source of a slice as long as the others, no model twice in a slice; a slice's own
    ``base_model`` (if not the config's) among its sources, with a method whose base is theta_0."""
    if not isinstance(raw, list) or not raw:
        raise SpecError(f"{source}: slices must be a non-empty list")
    names_of: dict[Path, list[str]] = {}
    out: list[_Slice] = []
    for k, entry in enumerate(raw):
        where = f"{source}: slices[{k}]"
        if not isinstance(entry, Mapping):
            raise SpecError(f"{where}: each slice must be a mapping with 'sources:'")
        _check_keys(entry, ("sources", "parameters", "base_model", "residual_weight"), where)
        if entry.get("residual_weight") is not None:
            raise SpecError(f"{where}: residual_weight is not supported (mergekit 0.1.5 does not read it either)")
        own: Path | None = None
        if entry.get("base_model") is not None:
            own = resolve_model(entry["base_model"], f"{where}.base_model", root)
            if own == base:
                own = None
            elif mk_method in _SLICE_BASE_REFUSED:
                raise SpecError(f"{where}: a per-slice base_model other than the config's is not supported with "
                                f"{mk_method} (its base model is not theta_0 of a formula)")
        params = _check_params(entry.get("parameters"), {**method_allowed, **model_allowed}, mk_method,
                               f"{where}.parameters")
        raw_sources = entry.get("sources")
        if not isinstance(raw_sources, list) or not raw_sources:
            raise SpecError(f"{where}: a slice needs a non-empty list of sources")
        sources: list[_Source] = []
        for i, src in enumerate(raw_sources):
            at = f"{where}.sources[{i}]"
            if not isinstance(src, Mapping) or "model" not in src:
                raise SpecError(f"{at}: each source needs 'model:' and 'layer_range:'")
            _check_keys(src, ("model", "layer_range", "parameters"), at)
            path = resolve_model(src["model"], at, root)
            if path not in names_of:
                names_of[path] = _tensor_names(path)
            n = _num_layers(names_of[path])
            if n == 0:
                raise SpecError(f"{at}: {src['model']!r}: no layer-numbered tensor names found; slices need names "
                                f"like {EXPECTED_NAMING}")
            lr = src.get("layer_range")
            if (not isinstance(lr, (list, tuple)) or len(lr) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in lr)):
                raise SpecError(f"{at}: layer_range must be two integers [first, end), got {lr!r}")
            a, b = lr
            if not 0 <= a < b:
                raise SpecError(f"{at}: layer_range {list(lr)} is empty or negative (need 0 <= first < end)")
            if b > n:
                raise SpecError(f"{at}: layer_range {list(lr)} goes beyond the {n} layers of {src['model']!r} "
                                f"(layers 0..{n - 1})")
            if any(s.path == path for s in sources):
                raise SpecError(f"{at}: {src['model']!r} is listed twice in one slice (mergekit keeps one of them)")
            item = _Source(path, _check_params(src.get("parameters"), model_allowed, mk_method, f"{at}.parameters"),
                           at, src["model"])
            item.start, item.length, item.layers, item.names = a, b - a, n, names_of[path]
            sources.append(item)
        lengths = [s.length for s in sources]
        if len(set(lengths)) > 1:
            shown = ", ".join(f"{s.ref!r} {s.length}" for s in sources)
            raise SpecError(f"{where}: the sources' layer_range lengths differ ({shown}); every source of a slice "
                            "gives the same number of layers")
        if own is not None and not any(s.path == own for s in sources):
            raise SpecError(f"{where}: base_model {entry['base_model']!r} is not among this slice's sources; "
                            "mergekit merges a slice's sources only, so list it there with a layer_range")
        out.append(_Slice(sources, params, where, own))
    return out


def _check_counts(mk_method: str, base: Path | None, sources: list[_Source], where: str, *, slices_form: bool) -> None:
    """The inputs of one merge (or of one slice) suit ``mk_method``: the base model where it needs one, the
    number of other models."""
    experts = [s for s in sources if base is None or s.path != base]
    base_in = len(experts) < len(sources)
    if slices_form and base is not None and not base_in and mk_method not in _BASE_AS_MODEL:
        raise SpecError(f"{where}: base_model is not among this slice's sources; mergekit merges a slice's sources "
                        "only, so list the base model there with a layer_range")
    if mk_method == "slerp" and (base is None or len(experts) != 1):
        raise SpecError(f"{where}: slerp needs base_model and exactly one other model "
                        f"(got base {'set' if base else 'missing'}, {len(experts)} other model(s))")
    if mk_method == "model_stock" and (base is None or len(experts) < 2):
        raise SpecError(f"{where}: model_stock needs base_model and at least two other models")
    if mk_method in ("nearswap", "arcee_fusion") and len(experts) != 1:
        raise SpecError(f"{where}: {mk_method} needs base_model and exactly one other model (got {len(experts)})")
    if mk_method == "nuslerp" and len(experts) != 2:
        raise SpecError(f"{where}: nuslerp needs exactly two models besides the optional base_model "
                        f"(got {len(experts)})")
    if mk_method == "passthrough":
        if slices_form and len(sources) != 1:
            raise SpecError(f"{where}: passthrough copies one model per slice (got {len(sources)} sources)")
        if not slices_form and (len(sources) != 1 or base_in):
            raise SpecError(f"{where}: passthrough copies exactly one model (got {len(sources)}); to stack layers "
                            "of several models, give one slice per model")


def _stacked_spec(data: Mapping[str, Any], slices: list[_Slice], base: Path | None, mk_method: str, native: str,
                  resolve: Callable[..., tuple[tuple, tuple, tuple]], source: str, root: Path) -> dict[str, Any]:
    """The native spec of a mergekit config stacking layers (several slices, or parts of the models): its
    ``slices`` give each slice's first layer of every input (:mod:`mergelab.merging.layout`), ``overrides``
    the per-tensor values evaluated as mergekit does within each slice (``t`` runs over the slice's layers;
    the tensors before the layers take the first slice's values and inputs, those after the last's). A slice
    with its own ``base_model`` (mergekit's ``OutputSliceDefinition.base_model``: that slice's tensors are merged
    with it as the base) gets ``base_model``, the index of that model among the spec's models; the config's
    base model is then one of that slice's models when it is among its sources."""
    as_model = mk_method in _BASE_AS_MODEL
    models: list[Path] = []
    for sl in slices:
        for s in sl.sources:
            # the config's base model is the base (base_layer) of the slices it does not give a base of their own
            if (as_model or s.path != base or sl.base is not None) and s.path not in models:
                models.append(s.path)
    ranges: list[SliceRange] = []
    for sl in slices:
        starts = {s.path: s.start for s in sl.sources}
        if sl.base is not None:  # its own base: one of its sources, among the models
            ranges.append(SliceRange(sl.length, None, tuple(starts.get(p) for p in models), models.index(sl.base)))
            continue
        base_start = None if as_model or base is None else starts.get(base)
        ranges.append(SliceRange(sl.length, base_start,
                                 tuple(starts.get(p) if (as_model or p != base) else None for p in models)))
    names_of = {s.path: s.names for sl in slices for s in sl.sources}
    base_names = None
    if base is not None and any(r.base_start is not None for r in ranges):
        base_names = names_of.get(base) or _tensor_names(base)
    labels = ([f"base_model ({base})"] if base_names is not None else []) + [str(p) for p in models]
    layout = stack_layout(ranges, base_names, [names_of[p] for p in models], labels)
    n = len(models)
    resolved: dict[str, tuple] = {}
    for name, src in layout.items():
        k = slice_of(ranges, name)
        sl = slices[k]
        index = layer_index(name)
        if index is None:
            t = 0.0
        else:
            j = index - sum(r.layers for r in ranges[:k])
            t = j / (sl.length - 1) if sl.length > 1 else 1.0
        by_path = {s.path: s for s in sl.sources}
        members = [(by_path[models[i]], in_name) for i, in_name in src.models]
        params, weights, per_model = resolve(name, t, members, sl.parameters)
        full_w: list[Any] = [None] * n if weights else []
        full_p: list[Any] = [None] * n if per_model else []
        for m, (i, _) in enumerate(src.models):
            if weights:
                full_w[i] = weights[m]
            if per_model:
                full_p[i] = per_model[m]
        resolved[name] = (params, tuple(full_w), tuple(full_p))
    # the engine reads only a tensor's own models' values; the others' take each model's commonest value
    # (so a model whose values do not vary needs no override)
    for part, empty in ((1, 1.0), (2, ())):
        common = [Counter(r[part][i] for r in resolved.values() if r[part] and r[part][i] is not None)
                  for i in range(n)]
        fill = [c.most_common(1)[0][0] if c else empty for c in common]
        for name, r in resolved.items():
            if r[part]:
                filled = tuple(fill[i] if v is None else v for i, v in enumerate(r[part]))
                resolved[name] = (*r[:part], filled, *r[part + 1:])
    default = Counter(resolved.values()).most_common(1)[0][0]
    spec: dict[str, Any] = {"method": native}
    if base is not None:
        spec["base"] = str(base)  # the base's layers where it is an input; the config and tokenizer files
    entries = []
    for k, p in enumerate(models):
        entry: dict[str, Any] = {"path": str(p)}
        if default[1]:
            entry["weight"] = default[1][k]
        if default[2] and dict(default[2][k]):
            entry["parameters"] = dict(default[2][k])
        entries.append(entry)
    spec["models"] = entries
    spec["parameters"] = dict(default[0])
    spec["overrides"] = _overrides(resolved, default, list(layout))
    spec["slices"] = [
        {"layers": r.layers, **({"base_layer": r.base_start} if r.base_start is not None else {}),
         "model_layers": list(r.model_starts), **({"base_model": r.base_model} if r.base_model is not None else {})}
        for r in ranges
    ]
    return _finish(spec, data, source, root)


def _overrides(resolved: dict[str, tuple], default: tuple, names: list[str]) -> list[dict[str, Any]]:
    """Overrides for the tensors whose resolution is not ``default``: one per (layer, resolution), the layer's
    prefix when the whole layer shares it, else the exact names."""
    by_layer: dict[str | None, list[str]] = {}
    for name in names:
        m = _LAYER.match(name)
        by_layer.setdefault(m.group(0) if m else None, []).append(name)
    out: list[dict[str, Any]] = []
    for layer, members in by_layer.items():
        groups: dict[tuple, list[str]] = {}
        for name in members:
            if resolved[name] != default:
                groups.setdefault(resolved[name], []).append(name)
        for resolution, group in groups.items():
            if layer is not None and len(group) == len(members):
                pattern = "re:^" + re.escape(layer)
            else:
                pattern = "re:^(?:" + "|".join(re.escape(n) for n in group) + ")$"
            entry: dict[str, Any] = {"pattern": pattern}
            if resolution[0] != default[0]:
                entry["parameters"] = dict(resolution[0])
            if resolution[1] != default[1]:
                entry["weights"] = list(resolution[1])
            if resolution[2] != default[2]:
                entry["model_parameters"] = [dict(p) for p in resolution[2]]
            out.append(entry)
    return out


def load_mergekit(path: str | Path) -> dict[str, Any]:
    """Read the mergekit config at ``path`` and translate it (:func:`translate`)."""
    path = Path(path)
    return translate(read_yaml_file(path), source=str(path), root=path.resolve().parent)


def to_yaml(spec: Mapping[str, Any]) -> str:
    """The native spec as YAML (lists of numbers on one line)."""
    class _Dumper(yaml.SafeDumper):
        pass

    def _list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
        flow = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    _Dumper.add_representer(list, _list)
    return yaml.dump(dict(spec), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


__all__ = ["METHOD_MAP", "evaluate", "is_mergekit_config", "layer_position", "load_mergekit", "to_yaml", "translate"]
