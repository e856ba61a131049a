"""The merge specification (YAML or Python), validated with pydantic at the boundary.

```yaml
method: ties            # any method of `mergelab methods` (mergelab.methods.catalog.METHODS, data-informed ones too)
base: path/to/base      # folder or file (optional for weight_average and slerp with two models)
models:
  - path: path/to/expert1
    weight: 1.0
    parameters: {density: 0.3}      # this model's own values of the method's per-model parameters
parameters:             # method parameters (see `mergelab methods`)
  density: 0.2
  lambda: 1.0
overrides:              # per-tensor parameters by name pattern; the first matching pattern wins
  - pattern: "*attention*"          # fnmatch glob on the tensor name, or "re:<regex>" (re.search)
    parameters: {density: 0.5}
    weights: [1.0]                  # optional: the models' weights for these tensors
    model_parameters: [{density: 0.4}]   # optional: the models' own parameters for these tensors
slices:                # optional layer stacking (mergekit's slices): the output's layers, slice by slice
  - layers: 2                       # this slice's output layers (numbered on from the previous slices')
    base_layer: 0                   # the base's first layer feeding it (omit: the base is not in this slice)
    model_layers: [0, null]         # each model's first layer feeding it, in models' order (null: not in it)
    base_model: null                # optional: a model (index) that is this slice's base instead (its layers
                                    # from its model_layers entry; base_layer null): mergekit's per-slice base
tokenizer:              # optional: build the output vocabulary (mergekit's tokenizer merging; needs mergelab[hf])
  source: union                     # base | union | path/to/model (whose tokenizer is the output's)
  tokens:                           # optional: where a token's embedding rows come from
    "<|im_start|>": {source: path/to/model, force: false}   # or source: zero, or {model: ..., token: ...}
  pad_to_multiple_of: 64            # optional: output rows padded with each model's mean row
chat_template: chatml   # optional: a named template (alpaca, chatml, exaone, llama3, mistral), auto, or Jinja text
dtype: auto             # output dtype: auto (each tensor keeps the base's dtype) | float32 | float16 | bfloat16
device: cpu             # cpu | cuda | auto (cuda when available)
shard_size: 2GB         # maximum bytes per output shard: an int or a string like 500MB, 2GB
data:                   # only for data-informed methods (adamerging, fw_hard, fw_soft, fisher, regmean, surgery)
  tasks: [mnist]        # default: the experts' own tasks
  samples_per_task: 100
```

Relative paths in a YAML file are resolved against the file's folder.

With ``slices``, output layer ``o_s + k`` of slice ``s`` (``o_s`` the layers of the slices before it) is
merged from layer ``base_layer + k`` of the base and ``model_layers[i] + k`` of each model ``i`` in the
slice, by the method over those inputs only; tensors outside the layers come from the first slice's inputs
(embeddings) or the last's (final norm, head), and ``config.json`` gets the new number of layers
(:mod:`mergelab.merging.layout`). Patterns of ``overrides`` match the output's tensor names. A slice's
``base_model: i`` makes model ``i`` its base (mergekit's per-slice ``base_model``): there the method takes model
``i``'s layers (from ``model_layers[i]``) as theta_0 and the slice's other models as the experts, and model
``i``'s weight is not used; the spec's ``base`` does not feed that slice (``base_layer`` null) but still
gives the config files.

With ``tokenizer``, every input's embedding rows (``embed_tokens``, ``lm_head``) are permuted into the output
vocabulary before the method merges them, and a token an input lacks gets a row by mergekit's rules
(:mod:`mergelab.merging.vocabulary`); the output gets the built tokenizer's files and ``config.json`` its
``vocab_size``. ``chat_template`` is written with the output tokenizer (:mod:`mergelab.tokenizers`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.errors import SpecError
from mergelab.untrusted_input import MAX_DEPTH, MAX_YAML_NODES, check_structure, read_limited

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as ``"500MB"``, ``"2GB"``, ``"1.5GiB"`` (decimal unless ``i``)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ValueError(f"not a size: {value!r} (use e.g. 500MB, 2GB or a number of bytes)")
        unit = (m.group(2) or "").lower().rstrip("b")
        size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path
    weight: float = 1.0
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, v: float) -> float:
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"weight must be finite, got {v}")
        return v


class Override(BaseModel):
    """Parameters for the tensors whose name matches ``pattern`` (glob, or ``re:<regex>``)."""

    model_config = ConfigDict(extra="forbid")
    pattern: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    weights: list[float] | None = None
    model_parameters: list[dict[str, Any]] | None = None

    @field_validator("weights")
    @classmethod
    def _finite_weights(cls, v: list[float] | None) -> list[float] | None:
        for w in v or ():
            if w != w or w in (float("inf"), float("-inf")):
                raise ValueError(f"weights must be finite, got {w}")
        return v

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, v: str) -> str:
        if v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as exc:
                raise ValueError(f"invalid regular expression {v[3:]!r}: {exc}") from None
        return v

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.search(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


class DataSpec(BaseModel):
    """The ``data:`` section of a merge spec, for data-informed methods.

    ```yaml
    data:
      tasks: [mnist, mnist_rot90]   # default: the experts' own tasks
      samples_per_task: 100         # labelled (or unlabelled) samples per task (FW-Merging paper: 100)
      split: train                  # train | test; default: the method's (AdaMerging: test, unlabelled)
      batch_size: 64
      seed: 0
    ```
    """

    model_config = ConfigDict(extra="forbid")
    tasks: list[str] | None = None
    samples_per_task: int = Field(100, ge=1)
    split: Literal["train", "test"] | None = None
    batch_size: int = Field(64, ge=1)
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(v) == 0:
            raise ValueError("tasks is empty; omit it to use the experts' own tasks")
        return v


class Slice(BaseModel):
    """One slice of a stacked merge (``slices``): ``layers`` output layers, fed by the base's layers from
    ``base_layer`` (None: the base is not in the slice) and model ``i``'s from ``model_layers[i]`` (None:
    model ``i`` is not in it). ``base_model``: the model that is this slice's base instead of the spec's base
    (mergekit's per-slice ``base_model``; None: the spec's base, where ``base_layer`` is set)."""

    model_config = ConfigDict(extra="forbid")
    layers: int = Field(ge=1)
    base_layer: int | None = Field(None, ge=0)
    model_layers: list[int | None]
    base_model: int | None = Field(None, ge=0)

    @field_validator("model_layers")
    @classmethod
    def _non_negative(cls, v: list[int | None]) -> list[int | None]:
        for a in v:
            if a is not None and a < 0:
                raise ValueError(f"a first layer must be >= 0, got {a}")
        return v


class TokenSource(BaseModel):
    """A row taken from one model's own embedding: its ``token`` (a string of that model's vocabulary) or its
    row ``token_id``, exactly one of them."""

    model_config = ConfigDict(extra="forbid")
    model: Path
    token: str | None = None
    token_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one(self) -> TokenSource:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of token or token_id")
        return self


class TokenEmbedding(BaseModel):
    """Where output token's rows come from: ``zero``, a model (its row of this token), a
    :class:`TokenSource`, or None (mergekit's default rules); ``force``: every model gets it, not only
    those lacking the token."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["zero"] | TokenSource | Path | None = None
    force: bool = False


class TokenizerSpec(BaseModel):
    """The ``tokenizer:`` section: the output vocabulary's ``source`` (``base``, ``union`` or a model folder),
    per-token row sources (``tokens``; each is added to the vocabulary when missing) and
    ``pad_to_multiple_of``."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["base", "union"] | Path = "union"
    tokens: dict[str, TokenEmbedding] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(None, ge=1)


class MergeSpec(BaseModel):
    """A validated merge specification. See the module docstring for the YAML form."""

    model_config = ConfigDict(extra="forbid")
    method: str
    base: Path | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    overrides: list[Override] = Field(default_factory=list)
    slices: list[Slice] | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    shard_size: int = 2 * 10**9
    data: DataSpec | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_entries(cls, v: Any) -> Any:
        # allow a bare list of paths
        if isinstance(v, list):
            return [{"path": item} if isinstance(item, (str, Path)) else item for item in v]
        return v

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)

    @model_validator(mode="after")
    def _override_lengths(self) -> MergeSpec:
        n = len(self.models)
        for i, o in enumerate(self.overrides):
            for key in ("weights", "model_parameters"):
                values = getattr(o, key)
                if values is not None and len(values) != n:
                    raise ValueError(f"overrides[{i}].{key} has {len(values)} entries for {n} models")
        if self.slices is not None:
            if not self.slices:
                raise ValueError("slices is empty; omit it to merge every layer of every model")
            used = [False] * n
            for s, sl in enumerate(self.slices):
                if len(sl.model_layers) != n:
                    raise ValueError(f"slices[{s}].model_layers has {len(sl.model_layers)} entries for {n} models "
                                     "(null for a model not in the slice)")
                if sl.base_layer is not None and self.base is None:
                    raise ValueError(f"slices[{s}].base_layer is set but the spec has no base")
                if sl.base_layer is None and all(a is None for a in sl.model_layers):
                    raise ValueError(f"slices[{s}]: no input takes part (set base_layer or a model_layers entry)")
                if sl.base_model is not None:
                    if sl.base_model >= n:
                        raise ValueError(f"slices[{s}].base_model is {sl.base_model} but there are {n} models")
                    if sl.model_layers[sl.base_model] is None:
                        raise ValueError(f"slices[{s}].base_model is models[{sl.base_model}], which is not in the "
                                         "slice (give its first layer in model_layers)")
                    if sl.base_layer is not None:
                        raise ValueError(f"slices[{s}]: base_layer and base_model are both set; a slice has one base")
                for i, a in enumerate(sl.model_layers):
                    used[i] = used[i] or a is not None
            unused = [i for i, u in enumerate(used) if not u]
            if unused:
                raise ValueError(f"models[{unused[0]}] ({self.models[unused[0]].path}) is in no slice "
                                 "(every model must feed some slice: give its first layer in model_layers)")
        return self

    def resolve_paths(self, root: Path) -> MergeSpec:
        """A copy with relative paths made relative to ``root`` (the YAML file's folder)."""
        def fix(p: Path) -> Path:
            p = p.expanduser()
            return p if p.is_absolute() else (root / p)

        update: dict[str, Any] = {
            "base": None if self.base is None else fix(self.base),
            "models": [m.model_copy(update={"path": fix(m.path)}) for m in self.models],
        }
        tok = self.tokenizer
        if tok is not None:
            tokens = {}
            for text, entry in tok.tokens.items():
                src = entry.source
                if isinstance(src, Path):
                    src = fix(src)
                elif isinstance(src, TokenSource):
                    src = src.model_copy(update={"model": fix(src.model)})
                tokens[text] = entry.model_copy(update={"source": src})
            update["tokenizer"] = tok.model_copy(update={
                "source": fix(tok.source) if isinstance(tok.source, Path) else tok.source, "tokens": tokens})
        return self.model_copy(update=update)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown field (allowed: {', '.join(MergeSpec.model_fields)})"
        lines.append(f"  {loc}: {msg}")
    return f"{source}: invalid merge spec:\n" + "\n".join(lines)


def parse_spec(data: Mapping[str, Any] | MergeSpec, *, source: str = "spec", root: Path | None = None) -> MergeSpec:
    """Validate a mapping (or pass a :class:`MergeSpec` through), raising :class:`SpecError` with every problem."""
    if isinstance(data, MergeSpec):
        spec = data
    else:
        if not isinstance(data, Mapping):
            raise SpecError(f"{source}: a merge spec must be a mapping, got {type(data).__name__}")
        try:
            spec = MergeSpec.model_validate(dict(data))
        except ValidationError as exc:
            raise SpecError(_format_errors(exc, source)) from None
    return spec.resolve_paths(root) if root is not None else spec


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-6`` is a float, not the string '1e-6'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str, source: str = "YAML") -> Any:
    """Parse YAML safely, reading ``1e-6``-style numbers as floats (PyYAML alone reads them as strings).

    Hostile documents are a :class:`SpecError` naming ``source``: invalid YAML, nesting deeper than
    :data:`~mergelab.untrusted_input.MAX_DEPTH` (or a self-referencing alias), and alias bombs expanding to
    more than :data:`~mergelab.untrusted_input.MAX_YAML_NODES` values (:mod:`mergelab.untrusted_input`).
    """
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except RecursionError:
        raise SpecError(f"{source}: YAML: nested more than {MAX_DEPTH} levels deep") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {exc}") from None
    return check_structure(data, source, what="YAML", error=SpecError, max_nodes=MAX_YAML_NODES)


def read_yaml_file(path: str | Path) -> Any:
    """The parsed content of a YAML (or JSON) spec file; :class:`SpecError` naming the file if it cannot be
    read, is larger than 100 MiB, is not valid YAML (see :func:`read_yaml`), or is empty."""
    path = Path(path)
    try:
        raw = read_limited(path, what="spec", error=SpecError)
    except FileNotFoundError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not valid YAML: not UTF-8 text ({exc})") from None
    data = read_yaml(text, str(path))
    if data is None:
        raise SpecError(f"{path}: the spec is empty")
    return data


def load_spec(path: str | Path) -> MergeSpec:
    """Read and validate a YAML (or JSON) merge spec; relative paths resolve against its folder. A mergekit
    config (``merge_method:``) is translated into the equivalent spec (:mod:`mergelab.mergekit_config`)."""
    # deferred: mergekit_config imports this module (its translation is a merge spec); only a mergekit file needs it
    from mergelab.mergekit_config import is_mergekit_config, translate

    path = Path(path)
    data = read_yaml_file(path)
    if is_mergekit_config(data):
        data = translate(data, source=str(path), root=path.resolve().parent)
    return parse_spec(data, source=str(path), root=path.resolve().parent)
