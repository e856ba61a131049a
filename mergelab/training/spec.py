"""``ExpertSpec``: everything that determines how one expert is fine-tuned, validated at the boundary.

Defaults (fields left unset are resolved when the spec is built, so a stored spec is always explicit):

===============  =============================================================================
arch             ``resnet_s``
optimizer        by family: ``sgd`` for ResNets, ``adamw`` for the ViT
lr               by optimizer: sgd 0.05, adam/adamw 1e-3
momentum         0.9 (SGD heavy-ball coefficient; Adam/AdamW ``beta1``)
weight_decay     by optimizer: sgd 5e-4, adam 0, adamw 0.01
beta2            0.999 (Adam/AdamW only)
batch_size       64;  steps (K) 300;  data_ratio 1.0 (data_seed 0 picks the subset)
schedule         ``cosine`` (also ``constant``, ``wsd``, ``wsd_sqrt``); warmup_frac 0; decay_frac 0.2 (wsd);
                 min_lr_ratio 0
augment          off (random affine: +-10 deg, +-10 % scale, +-2 px)
head_init        ``probe`` (linear probe on frozen pretrained features: LP-FT), or ``zero``/``random``
head_mode        ``trained`` (the head is fine-tuned with the backbone), or ``frozen``: the task's shared
                 probe head, fitted once on the pretrained backbone and never updated (see below)
seed             0 — controls data order, augmentation and (``random``) head init
checkpoint_every 0 (none); k > 0 saves model + optimizer state every k steps
branch_from      none; ``{parent, step}`` continues from the parent's checkpoint at ``step``
threads          1 (:data:`mergelab.runtime.TRAINING_THREADS`): torch intra-op threads of the run, pinned
                 whatever the caller's setting, so that a spec trains to the same weights on any machine of
                 a kind (:mod:`mergelab.training.threads`); another count is an explicit override and
                 trains other weights (it is part of the hash)
===============  =============================================================================

**Branching** (the bifurcation protocol, THEORY.md section 2): a child spec with
``branch_from = {parent, step: s}`` loads the parent's model *and optimizer state* at step ``s`` and runs
global steps ``s .. steps-1`` with its own seed, learning rate and schedule (evaluated at the global step).
``parent`` is a parent spec hash (looked up in the cache) or a path to an expert folder. A child with the
parent's exact hyperparameters and seed reproduces the parent's uninterrupted run.
:func:`mergelab.training.branching.branch_spec` builds a WSD child that decays from the branch point.

**Frozen shared heads** (``head_mode: frozen``), the protocol of the papers' CLIP setting (Ilharco et al.
2023, "Editing models with task arithmetic": the classification heads are the zero-shot heads, kept frozen
during fine-tuning, so the pretrained model, every expert and every merge use the same head per task): the
head is the linear probe of the ``probe`` init (:func:`mergelab.training.finetuning.frozen_head`: BatchNorm
re-estimated on the task's training images, then an L-BFGS probe on the pretrained features), fitted on the
task's *full* training split whatever ``data_ratio``, so it depends only on the pretrained backbone and the
task. It is left out of the optimizer (``requires_grad`` off: no gradient step, no weight decay) and the
expert's saved head is exactly that probe head, bit-identical for every expert of the task on the same
pretrained backbone. It needs ``head_init: probe``.

The **spec hash** is the first 16 hex digits of SHA-256 over the canonical JSON of the resolved spec plus
the training code version (:data:`TRAINING_FORMAT`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.errors import SpecError
from mergelab.models.registry import arch_info, list_archs
from mergelab.runtime import TRAINING_THREADS
from mergelab.spec import read_yaml_file
from mergelab.tasks import list_tasks
from mergelab.untrusted_input import read_json_file

TRAINING_FORMAT = 2  # bump when a code change alters what a spec trains to (2: threads pinned)

DEFAULT_OPTIMIZER = {"resnet": "sgd", "vit": "adamw"}
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adam": 0.0, "adamw": 0.01}
DEFAULT_MOMENTUM = 0.9


class BranchFrom(BaseModel):
    """Where a branch starts: the parent (spec hash or expert folder path) and the checkpoint step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parent: str = Field(min_length=1)
    step: int = Field(ge=1)


class ExpertSpec(BaseModel):
    """A fine-tuning run of one expert (see the module docstring for fields and defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    task: str
    arch: str = "resnet_s"
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float = Field(gt=0)
    batch_size: int = Field(64, ge=1)
    steps: int = Field(300, ge=1)
    data_ratio: float = Field(1.0, gt=0, le=1)
    data_seed: int = 0
    weight_decay: float = Field(ge=0)
    momentum: float = Field(ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    nesterov: bool = False
    augment: bool = False
    schedule: Literal["constant", "cosine", "wsd", "wsd_sqrt"] = "cosine"
    warmup_frac: float = Field(0.0, ge=0, lt=1)
    decay_frac: float = Field(0.2, gt=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    head_init: Literal["probe", "zero", "random"] = "probe"
    head_mode: Literal["trained", "frozen"] = "trained"
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0)
    branch_from: BranchFrom | None = None
    threads: int = Field(TRAINING_THREADS, ge=1)

    def __init__(self, **data: Any) -> None:
        """Validate ``data``; problems raise :class:`SpecError` with one line per field."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        """Resolve the architecture- and optimizer-dependent defaults."""
        return fill_optimizer_defaults(data) if isinstance(data, Mapping) else data

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        return known_arch(arch)

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        known = list_tasks()
        if task not in known:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(known)}")
        return task

    @model_validator(mode="after")
    def _consistent(self) -> ExpertSpec:
        if self.head_mode == "frozen" and self.head_init != "probe":
            raise ValueError(f"head_mode 'frozen' keeps the task's probe head: it needs head_init 'probe', "
                             f"got {self.head_init!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0")
        if self.branch_from is not None and self.branch_from.step >= self.steps:
            raise ValueError(f"branch_from.step ({self.branch_from.step}) must be < steps ({self.steps})")
        if self.schedule in ("wsd", "wsd_sqrt") and round(self.warmup_frac * self.steps) + round(self.decay_frac * self.steps) > self.steps:
            raise ValueError("warmup_frac + decay_frac exceed the run length")
        return self

    # ------------------------------------------------------------------------------------------------
    def canonical(self) -> dict[str, Any]:
        """The resolved spec as a JSON-able dict (every field explicit)."""
        return self.model_dump(mode="json")

    def spec_hash(self) -> str:
        """16 hex digits of SHA-256 over the canonical JSON and :data:`TRAINING_FORMAT`."""
        blob = json.dumps({"format": TRAINING_FORMAT, "spec": self.canonical()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def noise_scale(self) -> float:
        """Effective noise scale proxy ``T = lr / (batch_size * (1 - momentum))`` (THEORY.md section 2).

        The linear ``(1 - beta)`` form; ``beta`` is SGD momentum (0 without momentum) or Adam's ``beta1``.
        For Adam the proxy only compares runs of the same optimizer (its update is normalised per coordinate).
        """
        return self.lr / (self.batch_size * (1.0 - self.momentum))


def known_arch(arch: str) -> str:
    """``arch`` if it is a registered architecture; else ``ValueError`` listing the known ones (for validators)."""
    if arch not in list_archs():
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(list_archs())}")
    return arch


def fill_optimizer_defaults(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without ``None`` values and with the architecture- and optimizer-dependent defaults filled in:
    ``optimizer`` by family (:data:`DEFAULT_OPTIMIZER`), then ``lr`` and ``weight_decay`` by optimizer, and
    ``momentum``. Shared by :class:`ExpertSpec` and the multi-task spec."""
    out = {k: v for k, v in data.items() if v is not None}
    family = _family(out.get("arch", "resnet_s")) or "resnet"  # an unknown arch is reported by its own validator
    out.setdefault("optimizer", DEFAULT_OPTIMIZER[family])
    opt = out.get("optimizer")
    if isinstance(opt, str) and opt in DEFAULT_LR:
        out.setdefault("lr", DEFAULT_LR[opt])
        out.setdefault("weight_decay", DEFAULT_WEIGHT_DECAY[opt])
    out.setdefault("momentum", DEFAULT_MOMENTUM)
    return out


def _family(arch: Any) -> str | None:
    """The registry family of ``arch``, or ``None`` when it is not a known architecture."""
    try:
        return arch_info(arch).family if isinstance(arch, str) else None
    except SpecError:
        return None


def format_validation_error(exc: ValidationError, what: str = "expert spec") -> str:
    """One line per problem: ``field: message (got value)``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(spec)"
        msg = err["msg"].removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], Mapping) else ""
        lines.append(f"  {loc}: {msg}{got}")
    return f"invalid {what}:\n" + "\n".join(lines)


def make_spec(spec: ExpertSpec | Mapping[str, Any] | None = None, **overrides: Any) -> ExpertSpec:
    """Validate ``spec`` (a mapping or an ExpertSpec) updated with ``overrides``; raise :class:`SpecError`."""
    data: dict[str, Any] = {}
    if isinstance(spec, ExpertSpec):
        data = spec.model_dump()
    elif spec is not None:
        data = dict(spec)
    data.update(overrides)
    try:
        return ExpertSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from None


def load_spec_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON spec file into a dict (not yet validated)."""
    p = Path(path)
    if p.suffix == ".json":
        try:
            data = read_json_file(p, what="spec file", error=SpecError)
        except FileNotFoundError as exc:
            raise SpecError(f"{p}: cannot read spec file: {exc.strerror}") from None
    else:
        data = read_yaml_file(p)
    if not isinstance(data, dict):
        raise SpecError(f"{p}: a spec file must hold a mapping of fields, got {type(data).__name__}")
    return data
