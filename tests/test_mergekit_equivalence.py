"""Optional: mergekit's own configs give the same merge through ``mergekit-yaml`` and ``mergelab merge``.

mergekit is not a mergelab dependency. These tests run when either

* ``MERGELAB_MERGEKIT_YAML`` names a ``mergekit-yaml`` executable (e.g. one in a separate venv:
  ``MERGELAB_MERGEKIT_YAML=/work/mkvenv/bin/mergekit-yaml pytest tests/test_mergekit_equivalence.py``), or
* ``mergekit`` is importable in the test interpreter (it is then run as ``python -m mergekit.scripts.run_yaml``);

otherwise the module is skipped at collection (no model is built, nothing slow runs). Checked with mergekit
0.1.5. ``MERGELAB_MERGEKIT_REPORT=path.md`` writes the comparison table (case x variant -> max abs diff, %
entries differing) there.

Every case is one mergekit config (``merge_method: ...``), written once and run unchanged by both tools:
``mergekit-yaml CONFIG OUT`` (a subprocess) and ``mergelab merge CONFIG --out OUT`` (:func:`mergelab.cli.main`),
on tiny two-layer Llama checkpoints built here (safetensors + ``config.json``), in three variants:

* ``f32``: float32 models, ``dtype: float32``;
* ``bf16``: bfloat16 models, ``dtype: float32``, ``out_dtype: bfloat16`` (both tools compute in float32 and
  round the result once);
* ``bf16c``: bfloat16 models, ``dtype: bfloat16`` (mergekit loads the tensors as bf16 and computes in bf16:
  task vectors, weights, products and sums each rounded to bf16; mergelab computes in float32 whatever the
  ``dtype`` and rounds once, as its README says). Differences there are mergekit's bf16 arithmetic, bounded by a
  stated tolerance.

Deterministic methods are compared tensor by tensor with the tolerance each case states (its reason in
``EXPECT``). The random ones (``dare_*``, ``della*``: mergekit's masks are torch's Bernoulli draws, mergelab's
are seeded per (seed, model, tensor)) are compared in distribution: keep rates against the formula of the
keep probability, the L1 rescale identity, and paired tests of the two outputs' per-entry statistics.

The tokenizer cases (``tok_*``: ``tokenizer_source``, ``tokenizer:``, ``chat_template``) give the same models
word-level tokenizers of different vocabularies (:data:`TOK_VOCABS`) and compare the output vocabularies (as
sets: mergekit orders a union's appended tokens by a ``set``), the embedding and head row by row *by token*,
every other tensor entry by entry, ``vocab_size`` and the chat template's prompts. The chat cases
(``test_same_chat_prompts``, one per named template) render the conversations of :mod:`chat_conversations`
with both outputs' templates (transformers' ``apply_chat_template``): the same prompts for chatml and mistral,
and for llama3, alpaca and exaone mergekit's prompts with the whitespace its templates add to the formats
(:func:`_mergekit_prompt`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

_ENV = "MERGELAB_MERGEKIT_YAML"

if os.environ.get(_ENV):
    _EXE = Path(os.environ[_ENV])
    if not _EXE.exists():
        pytest.skip(f"{_ENV}={_EXE} does not exist", allow_module_level=True)
    MERGEKIT_CMD = [str(_EXE)]
else:
    pytest.importorskip("mergekit", reason=f"mergekit is not installed (or set {_ENV}=/path/to/mergekit-yaml)")
    MERGEKIT_CMD = [sys.executable, "-m", "mergekit.scripts.run_yaml"]

import torch  # noqa: E402
import yaml  # noqa: E402

from mergelab.checkpoints import load_state_dict, save_state_dict  # noqa: E402
from mergelab.cli import main as mergelab_main  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB, HEADS, LAYERS = 32, 64, 64, 2, 2
VARIANTS = ("f32", "bf16", "bf16c")
#: variant -> (model dtype, mergekit ``dtype``, mergekit ``out_dtype``)
VARIANT_DTYPES = {
    "f32": (torch.float32, "float32", None),
    "bf16": (torch.bfloat16, "float32", "bfloat16"),
    "bf16c": (torch.bfloat16, "bfloat16", None),
}


def _config(dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "head_dim": HIDDEN // HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32" if dtype == torch.float32 else "bfloat16",
    }


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        })
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return shapes


#: expert -> standard deviation of its fine-tuning noise around the base
NOISE = {"ft1": 0.01, "ft2": 0.02, "ft3": 0.005}
#: sparse experts (RL-like: each changes a fraction of the entries): (noise, fraction changed)
SPARSE = {"sp1": (0.01, 0.3), "sp2": (0.02, 0.2), "sp3": (0.005, 0.4)}


def _build_models(root: Path, dtype: torch.dtype) -> dict[str, Path]:
    """A base (weights ~ N(0, 0.02^2), norms ~ 1 + N(0, 0.02^2)) and three experts base + N(0, s^2), rounded
    to ``dtype`` (bf16 task vectors then tie massively, as real ones do); three sparse experts (``SPARSE``) for
    RAM, whose unique, shared and unchanged entries all occur."""
    gen = torch.Generator().manual_seed(1234)
    base = {}
    for name, shape in _shapes().items():
        t = torch.randn(shape, generator=gen) * 0.02
        base[name] = t + 1.0 if len(shape) == 1 else t
    states = {"base": base}
    for expert, noise in NOISE.items():
        states[expert] = {n: t + torch.randn(t.shape, generator=gen) * noise for n, t in base.items()}
    sparse = torch.Generator().manual_seed(4321)  # the dense experts above stay as they were
    for expert, (noise, share) in SPARSE.items():
        states[expert] = {n: t + torch.randn(t.shape, generator=sparse) * noise
                          * (torch.rand(t.shape, generator=sparse) < share) for n, t in base.items()}
    out = {}
    for model, state in states.items():
        folder = root / model
        folder.mkdir(parents=True)
        save_state_dict({n: t.to(dtype) for n, t in state.items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(_config(dtype), indent=2))
        out[model] = folder
    return out


@pytest.fixture(scope="module")
def model_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[torch.dtype, dict[str, Path]]:
    root = tmp_path_factory.mktemp("mergekit_models")
    return {dt: _build_models(root / str(dt).removeprefix("torch."), dt) for dt in (torch.float32, torch.bfloat16)}


# ------------------------------------------------------------------------------------------------- cases


def _m(name: str, **params: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": name}
    if params:
        entry["parameters"] = params
    return entry


def _s(name: str, first: int, end: int, **params: Any) -> dict[str, Any]:
    """A slice source: layers [first, end) of model ``name``."""
    return {**_m(name, **params), "layer_range": [first, end]}


W = (0.3, 0.7, 1.25)


@dataclass(frozen=True)
class Case:
    """A mergekit config (model names are filled in with paths) and what the comparison must show."""

    name: str
    config: dict[str, Any]
    random: bool = False


def _gta(method: str, weights: tuple[float, ...] = W, params: dict[str, Any] | None = None,
         **per_model: Any) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": "base",
        "models": [_m(f"ft{i + 1}", weight=w, **per_model) for i, w in enumerate(weights)],
        **({"parameters": params} if params else {}),
    }


SLERP_T = [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
           {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
           {"value": 0.5}]  # mergekit's examples/gradient-slerp.yml

CASES: list[Case] = [
    Case("linear", {"merge_method": "linear", "models": [_m(f"ft{i + 1}", weight=w) for i, w in enumerate(W)]}),
    Case("linear_sum", {"merge_method": "linear", "parameters": {"normalize": False},
                        "models": [_m(f"ft{i + 1}", weight=w) for i, w in enumerate(W)]}),
    Case("task_arithmetic", {
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": [_m("ft1", weight=[0.2, 0.9]), _m("ft2", weight=0.7), _m("ft3", weight=-0.4)],
        "parameters": {"lambda": 0.8},
    }),
    Case("task_arithmetic_normalize", _gta("task_arithmetic", params={"normalize": True})),
    Case("ties", _gta("ties", density=0.5)),
    Case("ties_negative_weight", _gta("ties", weights=(1.0, -0.5, 0.7), params={"normalize": False}, density=0.3)),
    Case("breadcrumbs", _gta("breadcrumbs", density=0.8, gamma=0.05)),
    Case("breadcrumbs_ties", _gta("breadcrumbs_ties", density=0.8, gamma=0.05)),
    # rescale: true (magnitude pruning rescaled to the L1 norm): mergelab's rescale: l1
    Case("ties_rescale", _gta("ties", params={"rescale": True}, density=0.5)),
    Case("breadcrumbs_rescale", _gta("breadcrumbs", params={"rescale": True}, density=0.8, gamma=0.05)),
    Case("breadcrumbs_ties_rescale", _gta("breadcrumbs_ties", params={"rescale": True}, density=0.8, gamma=0.05)),
    Case("dare_ties_density1", _gta("dare_ties", density=1.0)),
    Case("della_density1", _gta("della", density=1.0)),
    Case("model_stock", {"merge_method": "model_stock", "base_model": "base",
                         "models": [_m("ft1"), _m("ft2"), _m("ft3")]}),
    Case("model_stock_filter_wise", {"merge_method": "model_stock", "base_model": "base",
                                     "models": [_m("ft1"), _m("ft2"), _m("ft3")],
                                     "parameters": {"filter_wise": True}}),
    Case("slerp", {"merge_method": "slerp", "base_model": "base", "models": [_m("base"), _m("ft2")],
                   "parameters": {"t": SLERP_T}}),
    Case("nuslerp", {"merge_method": "nuslerp", "models": [_m("ft1", weight=0.3), _m("ft2", weight=0.7)]}),
    Case("nuslerp_base_row_wise", {"merge_method": "nuslerp", "base_model": "base",
                                   "models": [_m("ft1", weight=0.3), _m("ft2", weight=0.7)],
                                   "parameters": {"nuslerp_row_wise": True}}),
    Case("multislerp", {"merge_method": "multislerp", "base_model": "base",
                        "models": [_m(f"ft{i + 1}", weight=w) for i, w in enumerate(W)]}),
    Case("karcher", {"merge_method": "karcher", "models": [_m("ft1"), _m("ft2"), _m("ft3")]}),
    Case("sce", {"merge_method": "sce", "base_model": "base", "models": [_m("ft1"), _m("ft2"), _m("ft3")],
                 "parameters": {"select_topk": 0.5}}),
    Case("nearswap", {"merge_method": "nearswap", "base_model": "base", "models": [_m("base"), _m("ft1")],
                      "parameters": {"t": 0.01}}),
    Case("arcee_fusion", {"merge_method": "arcee_fusion", "base_model": "base", "models": [_m("base"), _m("ft2")]}),
    Case("passthrough", {"merge_method": "passthrough",
                         "models": [_m("ft1", scale=[{"filter": "mlp", "value": 0.5}, {"value": 1.0}])]}),
    # layer stacking (slices): passthrough copies 4 layers from 3 models; slerp and task arithmetic merge
    # each slice's own sources with values evaluated over the slice's layers
    Case("passthrough_stack", {"merge_method": "passthrough", "slices": [
        {"sources": [_s("ft1", 0, 2)]}, {"sources": [_s("ft2", 1, 2)]}, {"sources": [_s("base", 0, 1)]}]}),
    Case("slerp_slices", {"merge_method": "slerp", "base_model": "base", "parameters": {"t": SLERP_T}, "slices": [
        {"sources": [_s("base", 0, 2), _s("ft2", 0, 2)]},
        {"sources": [_s("base", 1, 2), _s("ft1", 0, 1)], "parameters": {"t": 0.3}}]}),
    Case("task_arithmetic_slices", {"merge_method": "task_arithmetic", "base_model": "base", "slices": [
        {"sources": [_s("base", 0, 2), _s("ft1", 0, 2, weight=0.5), _s("ft2", 0, 2, weight=[0.2, 0.9])]},
        {"sources": [_s("base", 1, 2), _s("ft3", 1, 2, weight=0.7)]}]}),
    # a slice with its own base_model (mergekit's OutputSliceDefinition.base_model), the config's base one of
    # its merged models there
    Case("task_arithmetic_slice_base", {"merge_method": "task_arithmetic", "base_model": "base", "slices": [
        # as many sources in the first slice as in the last: mergekit 0.1.5 gathers the tensors after the layers
        # from only as many of the last slice's sources as the first slice has (plan_module zips the last
        # slice's models with len(slices[0].sources) weight infos), mergelab from all of them
        {"sources": [_s("base", 0, 2), _s("ft1", 0, 2, weight=0.5), _s("ft3", 0, 2, weight=0.3)]},
        {"base_model": "ft2", "sources": [_s("ft2", 1, 2), _s("ft1", 1, 2, weight=0.5), _s("base", 0, 1, weight=0.3)]}]}),
    Case("ties_slice_base", {"merge_method": "ties", "base_model": "base", "slices": [
        {"sources": [_s("base", 0, 2), _s("ft1", 0, 2, weight=1.0, density=0.5), _s("ft3", 0, 2, weight=0.7, density=0.5)]},
        {"base_model": "ft2", "sources": [_s("ft2", 0, 2), _s("ft1", 0, 2, weight=1.0, density=0.5),
                                          _s("base", 0, 2, weight=0.5, density=0.5)]}]}),
    Case("ram", {"merge_method": "ram", "base_model": "base", "models": [_m("sp1"), _m("sp2"), _m("sp3")]}),
    Case("ramplus_tl", {"merge_method": "ramplus_tl", "base_model": "base",
                        "models": [_m("sp1"), _m("sp2"), _m("sp3")]}),
    Case("ramplus_tl_strong", {"merge_method": "ramplus_tl", "base_model": "base",
                               "models": [_m("sp1"), _m("sp2"), _m("sp3")],
                               "parameters": {"r": 0.5, "alpha": 2.0, "epsilon": 0.002}}),
    # random methods: compared in distribution (one expert: keep rates; three: paired per-entry statistics)
    Case("dare_linear_one", _gta("dare_linear", weights=(1.0,), density=0.3), random=True),
    Case("della_linear_one", _gta("della_linear", weights=(1.0,), density=0.4, epsilon=0.2), random=True),
    Case("dare_linear", _gta("dare_linear", density=0.3), random=True),
    Case("dare_ties", _gta("dare_ties", density=0.3), random=True),
    Case("della", _gta("della", density=0.4), random=True),
    Case("della_linear", _gta("della_linear", density=0.4), random=True),
]
RANDOM_VARIANTS = ("f32", "bf16c")


def _materialise(config: Any, models: dict[str, Path]) -> Any:
    """The config with model names (``base``, ``ft1``, ...) replaced by their folders."""
    if isinstance(config, dict):
        return {k: (str(models[v]) if k in ("model", "base_model") else _materialise(v, models))
                for k, v in config.items()}
    if isinstance(config, list):
        return [_materialise(v, models) for v in config]
    return config


# ------------------------------------------------------------------------------------------------- runs


def _run_mergekit(cfg: Path, out: Path, seed: int | None) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    extra = [] if seed is None else ["--random-seed", str(seed)]
    proc = subprocess.run(
        [*MERGEKIT_CMD, str(cfg), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "-j", "1",
         *extra],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, f"mergekit failed on {cfg}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _cached_mergekit(cfg: Path, out: Path, seed: int | None, models: dict[str, Path]) -> None:
    """Run mergekit, or copy its output from ``MERGELAB_MERGEKIT_CACHE`` (keyed by the config with the models'
    contents, the seed and the executable) when set: mergekit takes ~10 s per config to start."""
    cache = os.environ.get("MERGELAB_MERGEKIT_CACHE")
    if not cache:
        _run_mergekit(cfg, out, seed)
        return
    text = cfg.read_text()
    for name in sorted(models, key=lambda n: -len(str(models[n]))):  # temporary folders differ between runs
        text = text.replace(str(models[name]), name)
    h = hashlib.sha256((text + repr((seed, MERGEKIT_CMD))).encode())
    for name in sorted(models):  # tensor contents (the safetensors header may carry metadata)
        for tensor_name, t in sorted(load_state_dict(models[name]).items()):
            h.update(tensor_name.encode() + t.contiguous().view(torch.uint8).numpy().tobytes())
    hit = Path(cache) / h.hexdigest()[:24]
    if not hit.exists():
        _run_mergekit(cfg, out, seed)
        shutil.copytree(out, hit)
    else:
        shutil.copytree(hit, out)


@dataclass
class Outputs:
    mergekit: dict[str, torch.Tensor]
    mergelab: dict[str, torch.Tensor]
    models: dict[str, dict[str, torch.Tensor]]


REPORT: dict[tuple[str, str], dict[str, Any]] = {}
#: mergekit writes float32 although the config says bfloat16: arcee_fusion multiplies by a ``.float()`` mask
#: (``mergekit/merge_methods/arcee_fusion.py``), promoting the bf16 tensors, and nothing casts back without
#: ``out_dtype``. mergelab writes the dtype the config names; the values are compared in it.
#: So does ``ramplus_tl``: its factors lambda_i are a float32 tensor (``mergekit/merge_methods/ram.py``).
FLOAT32_OUTPUT = {("arcee_fusion", "bf16c"), ("ramplus_tl", "bf16c"), ("ramplus_tl_strong", "bf16c")}


def _write_config(case: Case, variant: str, model_sets: dict, tmp: Path) -> Path:
    model_dtype, dtype, out_dtype = VARIANT_DTYPES[variant]
    config = _materialise(case.config, model_sets[model_dtype])
    config["dtype"] = dtype
    if out_dtype:
        config["out_dtype"] = out_dtype
    cfg = tmp / f"{case.name}-{variant}.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    return cfg


def _run_mergelab(cfg: Path, out: Path) -> dict[str, torch.Tensor]:
    status = mergelab_main(["merge", str(cfg), "--out", str(out), "--no-progress", "--no-hash"])
    assert status == 0
    return load_state_dict(out)


def run_both(case: Case, variant: str, model_sets: dict, tmp: Path) -> Outputs:
    model_dtype, dtype, out_dtype = VARIANT_DTYPES[variant]
    models = model_sets[model_dtype]
    cfg = _write_config(case, variant, model_sets, tmp)
    _cached_mergekit(cfg, tmp / "mergekit", 1 if case.random else None, models)
    _run_mergelab(cfg, tmp / "mergelab")
    out_torch = torch.float32 if (out_dtype or dtype) == "float32" else torch.bfloat16
    theirs, ours = load_state_dict(tmp / "mergekit"), load_state_dict(tmp / "mergelab")
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    if (case.name, variant) in FLOAT32_OUTPUT:  # mergekit's dtype slip (see FLOAT32_OUTPUT), compared as stored
        assert all(t.dtype == torch.float32 for t in theirs.values())
        theirs = {n: t.to(out_torch) for n, t in theirs.items()}
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype == out_torch, (name, ours[name].dtype, theirs[name].dtype)
    loaded = {k: load_state_dict(p) for k, p in models.items()}
    return Outputs(theirs, ours, loaded)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in units in the last place of the stored dtype (float32: 2^-23 relative, bfloat16: 2^-7) at
    the tensor's largest magnitude: rounding differences of the same formula are a few of these."""
    bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[a.dtype]
    x, y = a.double(), b.double()
    scale = max(float(x.abs().max()), float(y.abs().max()), torch.finfo(a.dtype).tiny)
    return float((x - y).abs().max()) / 2.0 ** (math.frexp(scale)[1] - 1 - bits)


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |a - b| over every entry, the same in ulps, the % of entries that differ, the number of entries."""
    worst, ulps, differing, total = 0.0, 0.0, 0, 0
    for name, x in a.items():
        d = (x.double() - b[name].double()).abs()
        worst = max(worst, float(d.max()))
        ulps = max(ulps, _ulps(x, b[name]))
        differing += int((d > 0).sum())
        total += d.numel()
    return {"max_abs": worst, "max_ulps": ulps, "pct": 100 * differing / total, "entries": total}


# --------------------------------------------------------------------------------------- deterministic


DETERMINISTIC = [c for c in CASES if not c.random]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", DETERMINISTIC, ids=lambda c: c.name)
def test_same_merge(case: Case, variant: str, model_sets: dict, tmp_path: Path) -> None:
    out = run_both(case, variant, model_sets, tmp_path)
    d = _diff(out.mergelab, out.mergekit)
    ulps, pct, reason = _expect(case.name, variant)
    REPORT[(case.name, variant)] = {**d, "reason": reason}
    assert d["max_ulps"] <= ulps and d["pct"] <= pct, (
        f"{case.name}/{variant}: max |diff| {d['max_abs']:.3g} = {d['max_ulps']:.3g} ulps (allowed {ulps}), "
        f"{d['pct']:.2f}% of entries differ (allowed {pct}%)")
    if "slices" in case.config:  # both write the stacked layer count
        layers = [json.loads((tmp_path / tool / "config.json").read_text())["num_hidden_layers"]
                  for tool in ("mergekit", "mergelab")]
        stacked = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0]
                      for s in case.config["slices"])
        assert layers == [stacked, stacked]
    if variant == "bf16c":  # mergelab computes in float32 whatever mergekit's dtype: the bf16 variant's bits
        (tmp_path / "bf16").mkdir()
        same = _run_mergelab(_write_config(case, "bf16", model_sets, tmp_path / "bf16"), tmp_path / "bf16" / "out")
        for name, t in out.mergelab.items():
            assert torch.equal(t, same[name]), name


def _expect(name: str, variant: str) -> tuple[float, float, str]:
    """(max ulps, max % of entries differing, reason) for a case and variant."""
    if (name, variant) in EXPECT:
        return EXPECT[(name, variant)]
    rule = ROUNDING.get(name)
    if rule is None:
        return 0.0, 0.0, "equal"
    ulps, reason = rule
    if variant == "f32":
        return ulps, 100.0, reason
    if variant == "bf16":
        return 1.0, 100.0, f"{reason}; one bf16 rounding of float32 results a few float32 ulps apart"
    return max(ulps, 2.0), 100.0, f"mergekit computes in bf16 (dtype: bfloat16); {reason}"


#: mergelab's Gram matrix (mergelab.ops.gram_matrix)
GRAM_RULE = "Gram matrix from float32 chunk dots summed in float64"

#: case -> (max float32 ulps, reason): the same formula rounded in another order
ROUNDING: dict[str, tuple[float, str]] = {
    "linear": (1, "rounding order: mergelab x_1 + sum_i w_i (x_i - x_1) / W, mergekit sum_i w_i x_i / W"),
    "linear_sum": (1, "rounding: mergelab rounds w_i x_i before adding it (both engines alike), mergekit's "
                      "addcmul_ fuses it"),
    "task_arithmetic": (1, "rounding: mergelab fuses w_i tau_i into the sum (add_(tau, alpha=w), one rounding), "
                           "mergekit rounds w_i tau_i first"),
    "task_arithmetic_normalize": (1, "rounding: w_i / W before (mergelab's translation) vs the sum / W after "
                                     "(mergekit); fused w_i tau_i"),
    "breadcrumbs": (1, "rounding: fused w_i tau_i (as task_arithmetic)"),
    "model_stock": (2, "rounding order of t mean + (1 - t) theta_0"),
    "model_stock_filter_wise": (2, "rounding order of t mean + (1 - t) theta_0"),
    "slerp": (2, "rounding order of the interpolation"),
    "nuslerp": (2, GRAM_RULE + ", coefficients in float64 (mergelab) vs float32 whole-tensor reductions (mergekit)"),
    "nuslerp_base_row_wise": (2, "float64 row reductions and coefficients (mergelab) vs float32 (mergekit)"),
    "multislerp": (2, GRAM_RULE + ", coefficients in float64 (mergelab) vs float32 whole-tensor reductions (mergekit)"),
    "karcher": (3, GRAM_RULE + ", iteration in float64 (mergelab) vs float32 whole-tensor reductions (mergekit)"),
    "sce": (1, "rounding order of the weighted disjoint mean"),
    "nearswap": (1, "rounding: theta_0 + w (theta_1 - theta_0) vs w theta_1 + (1 - w) theta_0"),
    "slerp_slices": (2, "rounding order of the interpolation"),
    "task_arithmetic_slices": (1, "rounding: fused w_i tau_i (as task_arithmetic)"),
    "task_arithmetic_slice_base": (1, "rounding: fused w_i tau_i (as task_arithmetic)"),
}
_TRIM_TIES = ("bf16 task vectors tie at the trim threshold: mergekit keeps argsort's order of the tied entries, "
              "mergelab position order (README: trim scope)")
_BF16_GTA = ("mergekit computes in bf16: w_i tau_i, sums and the divisor rounded to bf16 move entries across "
             "the trim threshold and the elected sign; bounded by the task vectors' scale")
_ZERO_SUM = ("an exact zero sign sum sum_i w_i tau_i (bf16 inputs) elects +1 in both (zero_sign: positive, set "
             "for mergekit configs)")
_L1_RULE = ("the rescale factor ||tau_i||_1 / ||T(tau_i)||_1: mergelab's L1 block rule (float32 chunk sums added "
            "in float64, mergelab.ops.l1_rule) vs mergekit's torch float32 whole-tensor sums; the float32 factors "
            "differ by one ulp in about half the tensors")
#: (case, variant) -> (max ulps, max % differing, reason); otherwise ROUNDING's rule, else equal
EXPECT: dict[tuple[str, str], tuple[float, float, str]] = {
    **{(name, "f32"): (4, 100.0, _L1_RULE + ("; fused w_i tau_i" if name == "breadcrumbs_rescale" else ""))
       for name in ("ties_rescale", "breadcrumbs_rescale", "breadcrumbs_ties_rescale")},
    ("ties_rescale", "bf16"): (100, 1.0, _TRIM_TIES + "; " + _L1_RULE),
    **{(name, "bf16"): (100, 1.0, _TRIM_TIES.replace("trim threshold", "band's edges") + "; " + _L1_RULE)
       for name in ("breadcrumbs_rescale", "breadcrumbs_ties_rescale")},
    **{(name, "bf16c"): (100, 55.0, _BF16_GTA + "; mergekit's L1 norms and rescale factor are bf16 too")
       for name in ("ties_rescale", "breadcrumbs_rescale", "breadcrumbs_ties_rescale")},
    ("ties", "bf16"): (100, 1.0, _TRIM_TIES),
    ("ties_negative_weight", "bf16"): (100, 1.0, _TRIM_TIES),
    ("ties_slice_base", "bf16"): (100, 1.0, _TRIM_TIES),
    ("breadcrumbs", "bf16"): (100, 1.0, _TRIM_TIES.replace("trim threshold", "band's edges")),
    ("breadcrumbs_ties", "bf16"): (100, 1.0, _TRIM_TIES.replace("trim threshold", "band's edges")),
    ("dare_ties_density1", "bf16"): (0.0, 0.0, "equal: " + _ZERO_SUM),
    ("della_density1", "bf16"): (0.0, 0.0, "equal: " + _ZERO_SUM),
    ("sce", "bf16"): (100, 0.5, "tied bf16 variances at the top-k edge (README: SCE); exact zero sums of tau_i "
                                "elect +1 in both (zero_sign: positive)"),
    **{(name, "bf16c"): (100, 40.0, _BF16_GTA) for name in (
        "ties", "ties_negative_weight", "breadcrumbs", "breadcrumbs_ties", "dare_ties_density1", "della_density1",
        "ties_slice_base")},
    ("sce", "bf16c"): (100, 40.0, "mergekit computes in bf16: variances, energies and the weighted mean rounded "
                                  "to bf16"),
    **{(name, "bf16c"): (2, 20.0, "mergekit computes in bf16: tau_i, tau_i / c_j (and lambda_i tau_i) and their "
                                  "sum rounded to bf16, mergelab in float32 rounded once")
       for name in ("ram", "ramplus_tl", "ramplus_tl_strong")},
    ("arcee_fusion", "bf16c"): (200, 15.0, "mergekit computes softmax, KL and importance in bf16 (another "
                                           "selection), and writes float32 (FLOAT32_OUTPUT)"),
}


# ------------------------------------------------------------------------------------------------ random


RANDOM = [c for c in CASES if c.random]


def _paired_ok(x: torch.Tensor, y: torch.Tensor, z: float = 5.0) -> tuple[bool, float, float]:
    """A paired z test of E[x - y] = 0 over independent entries: |mean(d)| <= z sd(d) / sqrt(n)."""
    d = (x - y).double()
    mean, se = float(d.mean()), float(d.std()) / math.sqrt(d.numel())
    return abs(mean) <= z * se + 1e-12, mean, se


@pytest.mark.parametrize("variant", RANDOM_VARIANTS)
@pytest.mark.parametrize("case", RANDOM, ids=lambda c: c.name)
def test_random_same_distribution(case: Case, variant: str, model_sets: dict, tmp_path: Path) -> None:
    out = run_both(case, variant, model_sets, tmp_path)
    base = out.models["base"]
    names = sorted(base)
    flat = {k: torch.cat([v[n].float().reshape(-1) for n in names]) for k, v in
            (("mergekit", out.mergekit), ("mergelab", out.mergelab))}
    b = torch.cat([base[n].float().reshape(-1) for n in names])
    stats: dict[str, Any] = {}
    # every tool's entries: unchanged from the base, and the size of the change
    for stat, fn in (("unchanged", lambda m: (m == b).double()), ("abs_change", lambda m: (m - b).abs())):
        ok, mean, se = _paired_ok(fn(flat["mergelab"]), fn(flat["mergekit"]))
        stats[stat] = (ok, mean, se, float(fn(flat["mergekit"]).mean()), float(fn(flat["mergelab"]).mean()))
    REPORT[(case.name, variant)] = {
        **_diff(out.mergelab, out.mergekit),
        "reason": "random masks (compared in distribution): " + ", ".join(
            f"{k} mergekit {v[3]:.4g} / mergelab {v[4]:.4g}" for k, v in stats.items()),
    }
    for stat, (ok, mean, se, theirs, ours) in stats.items():
        assert ok, f"{case.name}/{variant}: {stat}: mergelab {ours:.5g} vs mergekit {theirs:.5g} (paired mean " \
                   f"{mean:.3g}, se {se:.3g})"
    if case.name.endswith("_one"):
        _check_one_expert(case, variant, out)


def _check_one_expert(case: Case, variant: str, out: Outputs) -> None:
    """One expert, rescale l1: each tool keeps entry j with mergekit's probability (DARE: density; DELLA:
    density - eps + 2 eps s_j / (n - 1), s_j the ascending rank of |tau_j| in its row), and the kept entries are
    tau_j times sum |tau| / sum_kept |tau| (so sum |merged - base| = sum |tau| per tensor)."""
    params = case.config["models"][0]["parameters"]
    density, eps = params["density"], params.get("epsilon", 0.0)
    base, expert = out.models["base"], out.models["ft1"]
    for tool, merged in (("mergekit", out.mergekit), ("mergelab", out.mergelab)):
        kept, expected, count = [], [], 0
        for name in base:
            tau = expert[name].float() - base[name].float()
            if variant == "bf16c":
                tau = (expert[name] - base[name]).float()
            delta = merged[name].float() - base[name].float()
            rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
            ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).double()
            n = rows.shape[1]
            p = density - eps + 2 * eps * ranks / (n - 1) if eps else torch.full_like(ranks, density)
            nonzero = tau.reshape(rows.shape) != 0
            kept.append((delta.reshape(rows.shape) != 0)[nonzero].double())
            expected.append(p[nonzero])
            if variant == "f32" and tau.numel() >= 1024:  # the L1 identity (float32 rounding only)
                torch.testing.assert_close(delta.abs().sum(), tau.abs().sum(), rtol=1e-4, atol=0,
                                           msg=lambda m: f"{tool} {name}: L1 rescale: {m}")
            count += int(nonzero.sum())
        k, e = torch.cat(kept), torch.cat(expected)
        # keep rate overall and by magnitude quintile, against the Bernoulli probabilities
        order = e.argsort(stable=True)
        for part in torch.tensor_split(order, 5) if eps else (order,):
            observed, mean_p = float(k[part].mean()), float(e[part].mean())
            sd = math.sqrt(float((e[part] * (1 - e[part])).sum())) / part.numel()
            assert abs(observed - mean_p) <= 5 * sd, \
                f"{case.name}/{variant} {tool}: keep rate {observed:.4f}, expected {mean_p:.4f} (sd {sd:.4f})"


# --------------------------------------------------------------------------------------------- tokenizers


_WORDS = [f"w{i}" for i in range(57)]
_SPECIAL = ["<unk>", "<s>", "</s>"]
#: each model's vocabulary (row i of its embedding and head is token i): the base has 60 tokens in 64 rows
#: (4 padding rows); ft1 swaps w0 and w1 and adds x1, x2 and s1, s2; ft2 moves w50.. up and adds y1, y2, s1,
#: s2; ft3 has the base's 60 tokens in 64 rows
TOK_VOCABS = {
    "base": _SPECIAL + _WORDS,
    "ft1": _SPECIAL + [_WORDS[1], _WORDS[0]] + _WORDS[2:] + ["x1", "x2", "s1", "s2"],
    "ft2": _SPECIAL + _WORDS[:50] + ["y1", "y2", "s1", "s2"] + _WORDS[50:],
    "ft3": _SPECIAL + _WORDS,
}


@pytest.fixture(scope="module")
def tok_sets(model_sets: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[torch.dtype, dict[str, Path]]:
    """The models of ``model_sets`` with word-level tokenizers of :data:`TOK_VOCABS` (transformers' fast
    tokenizer over a ``tokenizers`` WordLevel model), the tensors unchanged."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    root = tmp_path_factory.mktemp("mergekit_tok_models")
    out: dict[torch.dtype, dict[str, Path]] = {}
    for dtype, folders in model_sets.items():
        out[dtype] = {}
        for name, tokens in TOK_VOCABS.items():
            folder = root / str(dtype).removeprefix("torch.") / name
            shutil.copytree(folders[name], folder)
            tk = Tokenizer(tok_models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
            tk.pre_tokenizer = pre_tokenizers.Whitespace()
            transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                                 eos_token="</s>").save_pretrained(str(folder))
            out[dtype][name] = folder
    return out


TOK_CASES: list[Case] = [
    Case("tok_union_task_arithmetic", {**_gta("task_arithmetic"), "tokenizer_source": "union"}),
    Case("tok_base_linear", {"merge_method": "linear", "base_model": "base", "tokenizer_source": "base",
                             "models": [_m("base", weight=0.2), _m("ft1", weight=0.3), _m("ft2", weight=0.5)]}),
    Case("tok_model_slerp_tokens", {
        "merge_method": "slerp", "base_model": "base", "models": [_m("base"), _m("ft1")],
        "parameters": {"t": 0.3}, "chat_template": "chatml",
        "tokenizer": {"source": "ft1", "pad_to_multiple_of": 16, "tokens": {
            "x1": {"source": {"kind": "zero"}, "force": True},
            "w5": {"source": "ft1", "force": True},
            "new1": {"source": {"kind": "model_token", "model": "ft1", "token": "x2"}},
            "new2": {"source": {"kind": "model_token", "model": "base", "token_id": 7}}}}}),
    Case("tok_union_ties_pad", {**_gta("ties", density=0.5), "chat_template": "llama3",
                                "tokenizer": {"source": "union", "pad_to_multiple_of": 32}}),
]
#: case -> (max float32 ulps, reason): as the method's case without a tokenizer, plus the rows mergelab computes
TOK_ROUNDING = {
    "tok_union_task_arithmetic": ROUNDING["task_arithmetic"],
    "tok_base_linear": ROUNDING["linear"],
    "tok_model_slerp_tokens": (2, ROUNDING["slerp"][1] + "; padding rows: the mean summed in float64 (mergelab) "
                                  "vs torch's float32 mean (mergekit)"),
    "tok_union_ties_pad": (0, "equal outside the padding rows; there every input's rows are copies of one mean "
                              "row, so TIES's trim meets exact ties of |tau| and the tools keep different tied "
                              "entries (README: trim scope)"),
}


def _tok_materialise(config: Any, models: dict[str, Path]) -> Any:
    """As :func:`_materialise`, also for the tokenizer's model references."""
    if isinstance(config, dict):
        out = {}
        for k, v in config.items():
            if k in ("model", "base_model") or (k in ("source", "tokenizer_source") and isinstance(v, str) and v in models):
                out[k] = str(models[v])
            else:
                out[k] = _tok_materialise(v, models)
        return out
    if isinstance(config, list):
        return [_tok_materialise(v, models) for v in config]
    return config


def _vocab(folder: Path) -> dict[str, int]:
    import transformers

    return dict(transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True).get_vocab())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", TOK_CASES, ids=lambda c: c.name)
def test_same_tokenizer_merge(case: Case, variant: str, tok_sets: dict, tmp_path: Path) -> None:
    """The same output vocabulary (as a set of tokens: mergekit appends a union's tokens in a set's order,
    which varies between runs, mergelab in model order) and, token by token, the same rows of the embedding
    and head; the other tensors entry by entry; the same vocab_size and chat template."""
    model_dtype, dtype, out_dtype = VARIANT_DTYPES[variant]
    models = tok_sets[model_dtype]
    config = _tok_materialise(case.config, models)
    config["dtype"] = dtype
    if out_dtype:
        config["out_dtype"] = out_dtype
    cfg = tmp_path / f"{case.name}-{variant}.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    _cached_mergekit(cfg, tmp_path / "mergekit", None, models)
    _run_mergelab(cfg, tmp_path / "mergelab")
    theirs, ours = load_state_dict(tmp_path / "mergekit"), load_state_dict(tmp_path / "mergelab")
    assert set(ours) == set(theirs)
    v_theirs, v_ours = _vocab(tmp_path / "mergekit"), _vocab(tmp_path / "mergelab")
    assert set(v_theirs) == set(v_ours)
    if "union" not in str(case.config):  # one tokenizer's ids: the same in both
        assert v_theirs == v_ours
    size = len(v_ours)
    configs = [json.loads((tmp_path / t / "config.json").read_text()) for t in ("mergekit", "mergelab")]
    rows = theirs["model.embed_tokens.weight"].shape[0]
    assert configs[0]["vocab_size"] == configs[1]["vocab_size"] == rows == ours["model.embed_tokens.weight"].shape[0]
    # mergekit's rows in mergelab's token order (the padding rows stay where they are)
    order = torch.arange(rows)
    for tok, i in v_ours.items():
        order[i] = v_theirs[tok]
    vocab_names = ("model.embed_tokens.weight", "lm_head.weight")
    aligned = {n: (t[order] if n in vocab_names else t) for n, t in theirs.items()}
    d = _diff(ours, aligned)
    d_pad = None
    if rows > size:  # the padding rows apart: every input's mean row, copied into each padding row
        d_pad = _diff({n: ours[n][size:] for n in vocab_names}, {n: aligned[n][size:] for n in vocab_names})
        d = _diff({n: t[:size] if n in vocab_names else t for n, t in ours.items()},
                  {n: t[:size] if n in vocab_names else t for n, t in aligned.items()})
    ulps, reason = TOK_ROUNDING[case.name]
    pct_allowed = 100.0
    if variant == "bf16":
        ulps, reason = 1.0, f"{reason}; one bf16 rounding of float32 results a few float32 ulps apart"
    elif variant == "bf16c":
        ulps, reason = max(ulps, 2.0), f"mergekit computes in bf16 (dtype: bfloat16); {reason}"
    if case.name.startswith("tok_union_ties") and variant != "f32":
        ulps, pct_allowed = 100.0, (1.0 if variant == "bf16" else 40.0)
        reason = _TRIM_TIES if variant == "bf16" else _BF16_GTA
    if d_pad is not None:
        reason += f"; padding rows apart: max abs diff {d_pad['max_abs']:.3g}, {d_pad['pct']:.1f}% differ"
    REPORT[(case.name, variant)] = {**d, "reason": reason}
    assert d["max_ulps"] <= ulps and d["pct"] <= pct_allowed, (
        f"{case.name}/{variant}: max |diff| {d['max_abs']:.3g} = {d['max_ulps']:.3g} ulps (allowed {ulps}), "
        f"{d['pct']:.2f}% of entries differ")
    if d_pad is not None and not case.name.startswith("tok_union_ties"):
        assert d_pad["max_ulps"] <= max(ulps, 2.0), d_pad
    # TIES: every padding row of an input is the same row, so the trim meets exact ties of |tau| there; the
    # tools keep different ones of the tied entries (README: trim scope), whatever the padding means' last bits

    if "chat_template" in case.config:
        _assert_same_prompts(tmp_path / "mergekit", tmp_path / "mergelab", case.config["chat_template"])


# ------------------------------------------------------------------------------------------ chat templates

_EOT, _RESPONSE = "<|eot_id|>", "\n\n### Response:\n"


def _mergekit_exaone(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """mergekit 0.1.5's exaone prompt: the format's pieces, each with its line's indentation in that
    template (4 or 8 spaces) before it and a newline after it (transformers trims the newlines after block
    tags, not after ``{{ }}`` expressions nor the indentation before them)."""
    out = ""
    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system":
            out += "        [|system|][|endofturn|]\n\n"
        out += f"    [|{m['role']}|]{m['content']}\n"
        out += "        " + ("\n" if m["role"] == "user" else "[|endofturn|]\n") + "\n"
    return out + ("    [|assistant|]\n" if add_generation_prompt else "")


def _mergekit_prompt(template: str, messages: list[dict[str, str]], add_generation_prompt: bool, ours: str) -> str:
    """The prompt mergekit 0.1.5's template of that name gives, from mergelab's. Equal for chatml and
    mistral. Where mergekit's multi-line templates add whitespace the prompt format does not have, mergelab
    writes the format (README, chat templates): llama3 gets a newline after each ``<|eot_id|>``; alpaca's
    generation prompt follows a user (or input) turn's text without the blank line; exaone is indented
    (:func:`_mergekit_exaone`)."""
    if template == "llama3":
        return ours.replace(_EOT, _EOT + "\n")
    if template == "alpaca" and add_generation_prompt and messages[-1]["role"] in ("user", "user_context"):
        assert ours.endswith(_RESPONSE)
        return ours[: -len(_RESPONSE)] + _RESPONSE.lstrip("\n")
    if template == "exaone":
        theirs = _mergekit_exaone(messages, add_generation_prompt)
        assert "".join(theirs.split()) == "".join(ours.split())  # the same up to whitespace
        return theirs
    return ours


def _assert_same_prompts(mergekit_out: Path, mergelab_out: Path, template: str) -> None:
    """The output tokenizers' chat templates (mergelab's: :data:`CHAT_TEMPLATES`) render the conversations of
    :mod:`chat_conversations` with and without a generation prompt (transformers' ``apply_chat_template``) to
    the prompts :func:`_mergekit_prompt` states; where mergelab's raises a template error (mistral's turn
    order and roles), mergekit's raises one too."""
    import transformers
    from chat_conversations import CONVERSATIONS
    from jinja2.exceptions import TemplateError

    from mergelab.chat_templates import CHAT_TEMPLATES

    theirs, ours = (transformers.AutoTokenizer.from_pretrained(str(f), local_files_only=True)
                    for f in (mergekit_out, mergelab_out))
    assert ours.chat_template == CHAT_TEMPLATES[template]
    for name, messages in CONVERSATIONS.items():
        for gp in (False, True):
            try:
                prompt = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=gp)
            except TemplateError:
                with pytest.raises(TemplateError):
                    theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gp)
                continue
            expected = _mergekit_prompt(template, messages, gp, prompt)
            got = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gp)
            assert got == expected, (template, name, gp, got, prompt)


@pytest.mark.parametrize("template", ["alpaca", "chatml", "exaone", "llama3", "mistral"])
def test_same_chat_prompts(template: str, tok_sets: dict, tmp_path: Path) -> None:
    """``chat_template: NAME`` with the base's tokenizer (float32 models, a one-model linear merge): the
    prompts of :func:`_assert_same_prompts`."""
    models = tok_sets[torch.float32]
    config = _tok_materialise({"merge_method": "linear", "models": [_m("base", weight=1.0)], "dtype": "float32",
                               "tokenizer_source": "base", "chat_template": template}, models)
    cfg = tmp_path / f"chat_{template}.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    _cached_mergekit(cfg, tmp_path / "mergekit", None, models)
    _run_mergelab(cfg, tmp_path / "mergelab")
    _assert_same_prompts(tmp_path / "mergekit", tmp_path / "mergelab", template)


# ------------------------------------------------------------------------------------------------ report


@pytest.fixture(scope="module", autouse=True)
def _write_report() -> Any:
    yield
    path = os.environ.get("MERGELAB_MERGEKIT_REPORT")
    if not path or not REPORT:
        return
    lines = ["| case | variant | max abs diff | max ulps | % entries differing | reason |", "|---|---|---|---|---|---|"]
    order = {c.name: i for i, c in enumerate(CASES + TOK_CASES)}
    for (name, variant), r in sorted(REPORT.items(), key=lambda kv: (order[kv[0][0]], VARIANTS.index(kv[0][1]))):
        lines.append(f"| {name} | {variant} | {r['max_abs']:.3g} | {r['max_ulps']:.3g} | {r['pct']:.2f} | {r['reason']} |")
    Path(path).write_text("\n".join(lines) + "\n")
