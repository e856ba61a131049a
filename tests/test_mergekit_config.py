"""mergekit configs run unchanged: translation to the native spec, gradient/filter values by hand, errors,
and merges of tiny Llama-like safetensors folders through the CLI against hand-computed tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mergelab.checkpoints import load_state_dict, save_state_dict
from mergelab.cli import main
from mergelab.errors import SpecError
from mergelab.mergekit_config import evaluate, layer_position, translate
from mergelab.spec import parse_spec

LAYERS, HIDDEN, VOCAB, INTER = 3, 4, 8, 6


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "self_attn.q_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A float32 Llama-like base (3 layers) and three variants, each a folder with config.json."""
    root = tmp_path_factory.mktemp("mk")
    gen = torch.Generator().manual_seed(7)
    base = {n: torch.randn(s, generator=gen) for n, s in _shapes().items()}
    out = {}
    for key, state in [("base", base)] + [
        (f"ft{i}", {n: t + 0.1 * i * torch.randn(t.shape, generator=gen) for n, t in base.items()}) for i in (1, 2, 3)
    ]:
        folder = root / key
        folder.mkdir()
        save_state_dict(state, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": LAYERS}))
        out[key] = folder
    return out


def _cfg(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- parameter values by hand


def test_gradient_values_at_known_positions():
    g = [0, 0.5, 0.3, 0.7, 1]
    assert evaluate(g, "x", 0.0) == 0
    assert evaluate(g, "x", 1.0) == 1
    assert evaluate(g, "x", 0.3) == pytest.approx(0.8 * 0.5 + 0.2 * 0.3)  # s = 1.2
    assert evaluate([1, 0.7, 0.1], "x", 0.5) == pytest.approx(0.7)  # s = 1
    assert evaluate([1, 0.7, 0.1], "x", 0.75) == pytest.approx(0.4)  # s = 1.5: (0.7 + 0.1) / 2
    assert evaluate([0, 0.3, 0.7, 1], "x", 0.5) == pytest.approx(0.5)  # s = 1.5: (0.3 + 0.7) / 2
    # positions: t = l / (L - 1), 0 outside the layers
    assert layer_position("model.layers.2.mlp.up_proj.weight", 5) == (2, 0.5)
    assert layer_position("model.norm.weight", 5) == (None, 0.0)
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == (0, 1.0)


def test_filters_pick_the_first_matching_condition():
    t = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.5}]
    assert evaluate(t, "model.layers.1.self_attn.q_proj.weight", 0.25) == pytest.approx(0.25)
    assert evaluate(t, "model.layers.1.mlp.up_proj.weight", 0.25) == pytest.approx(0.75)
    assert evaluate(t, "model.norm.weight", 0.25) == 0.5
    assert evaluate([{"filter": "mlp", "value": 2.0}], "model.norm.weight", 0.0) is None  # falls through


# ------------------------------------------------------------------------------------ translations


def test_linear_translates_to_weight_average(models):
    spec = translate({"merge_method": "linear", "dtype": "float16", "models": [
        {"model": str(models["ft1"]), "parameters": {"weight": 1.0}},
        {"model": str(models["ft2"]), "parameters": {"weight": 0.3}},
    ]})
    assert spec == {"method": "weight_average",
                    "models": [{"path": str(models["ft1"]), "weight": 1.0}, {"path": str(models["ft2"]), "weight": 0.3}],
                    "dtype": "float16"}


def test_linear_without_normalize_is_the_plain_weighted_sum(models, tmp_path):
    """mergekit's linear with normalize: false is sum_i w_i theta_i (no division): weight_average with
    normalize: false, computed as mergekit does (each product rounded, then added in model order)."""
    cfg = {"merge_method": "linear", "parameters": {"normalize": False}, "models": [
        {"model": str(models["ft1"]), "parameters": {"weight": 0.5}},
        {"model": str(models["ft2"]), "parameters": {"weight": 0.7}},
    ]}
    spec = translate(cfg)
    assert spec["method"] == "weight_average" and spec["parameters"] == {"normalize": False}
    out = _merge_cfg(tmp_path, cfg)
    e1, e2 = load_state_dict(models["ft1"]), load_state_dict(models["ft2"])
    for name, value in out.items():
        if value.is_floating_point():
            assert torch.equal(value, e1[name] * 0.5 + e2[name] * 0.7), name


def test_ties_translates_with_mergekits_semantics(models):
    spec = translate({"merge_method": "ties", "base_model": str(models["base"]), "dtype": "bfloat16",
                      "parameters": {"normalize": False, "int8_mask": True},
                      "models": [{"model": str(models["ft1"]), "parameters": {"density": 0.5, "weight": 0.5}},
                                 {"model": str(models["ft2"]), "parameters": {"density": 0.5, "weight": 0.5}}]})
    assert spec == {
        "method": "ties", "base": str(models["base"]),
        "models": [{"path": str(models["ft1"]), "weight": 0.5, "parameters": {"density": 0.5}},
                   {"path": str(models["ft2"]), "weight": 0.5, "parameters": {"density": 0.5}}],
        "parameters": {"disjoint_divisor": "none", "lambda": 1.0, "sign_election": "mass", "sign_test": "weighted",
                       "trim_scope": "tensor", "zero_sign": "positive"},
        "dtype": "bfloat16",
    }
    parse_spec(spec)


def test_dare_ties_defaults_and_base_listed_among_models(models):
    spec = translate({"merge_method": "dare_ties", "base_model": str(models["base"]),
                      "models": [{"model": str(models["base"])},
                                 {"model": str(models["ft1"]), "parameters": {"density": 0.3, "weight": 1.0}}]})
    assert spec["models"] == [{"path": str(models["ft1"]), "weight": 1.0, "parameters": {"density": 0.3}}]
    assert spec["parameters"] == {"disjoint_divisor": "none", "lambda": 1.0, "rescale": "l1",
                                  "sign_election": "mass", "sign_test": "weighted", "zero_sign": "positive"}


def test_ties_example_gradients_become_per_layer_overrides(models):
    # mergekit's examples/ties.yml shape: a density gradient, a weight gradient and a filtered weight
    spec = translate({"merge_method": "ties", "base_model": str(models["base"]),
                      "parameters": {"normalize": True},
                      "models": [
                          {"model": str(models["ft1"]), "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                          {"model": str(models["ft2"]), "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                          {"model": str(models["ft3"]), "parameters": {
                              "density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}}]})
    parsed = parse_spec(spec)
    from mergelab.merging.plan import ParamResolver
    from mergelab.methods import get_method

    r = ParamResolver(parsed, get_method("ties"))
    # layer 1 of 3: t = 0.5: density_1 = 0.7, weight_2 = 0.5 (s = 1.5 of [0, 0.3, 0.7, 1])
    assert r.weights("model.layers.1.mlp.up_proj.weight") == pytest.approx([1.0, 0.5, 0.5])
    assert r.weights("model.layers.1.self_attn.q_proj.weight") == pytest.approx([1.0, 0.5, 0.0])
    assert [m["density"] for m in r.model_params("model.layers.1.mlp.up_proj.weight")] == pytest.approx([0.7, 0.5, 0.33])
    # layer 2: t = 1: density_1 = 0.1, weight_2 = 1
    assert r.weights("model.layers.2.mlp.up_proj.weight") == pytest.approx([1.0, 1.0, 0.5])
    assert r.model_params("model.layers.2.input_layernorm.weight")[0]["density"] == pytest.approx(0.1)
    # outside the layers t = 0: density_1 = 1, weight_2 = 0; lm_head is not an mlp tensor
    assert r.weights("lm_head.weight") == pytest.approx([1.0, 0.0, 0.0])
    assert r.model_params("model.embed_tokens.weight")[0]["density"] == 1.0


def test_gradient_slerp_translates_per_layer_and_filter(models):
    spec = translate({"slices": [{"sources": [{"model": str(models["base"]), "layer_range": [0, LAYERS]},
                                              {"model": str(models["ft1"]), "layer_range": [0, LAYERS]}]}],
                      "merge_method": "slerp", "base_model": str(models["base"]),
                      "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
                      "dtype": "float16"})
    assert spec["method"] == "slerp" and spec["base"] == str(models["base"])
    assert spec["models"] == [{"path": str(models["ft1"])}]
    parsed = parse_spec(spec)
    from mergelab.merging.plan import ParamResolver
    from mergelab.methods import get_method

    r = ParamResolver(parsed, get_method("slerp"))
    # t = 0, 0.5, 1 over 3 layers -> s = 0, 2, 4 of the 5-point gradients
    for layer, attn, mlp in [(0, 0.0, 1.0), (1, 0.3, 0.7), (2, 1.0, 0.0)]:
        assert r(f"model.layers.{layer}.self_attn.q_proj.weight").t == pytest.approx(attn)
        assert r(f"model.layers.{layer}.mlp.up_proj.weight").t == pytest.approx(mlp)
        assert r(f"model.layers.{layer}.input_layernorm.weight").t == 0.5
        assert r(f"model.layers.{layer}.input_layernorm.weight").parallel_threshold == 0.9995
    assert r("lm_head.weight").t == 0.5


# ------------------------------------------------------------------------------------------- errors


def test_hub_id_is_a_clear_error(models):
    with pytest.raises(SpecError, match="looks like a Hugging Face hub id.*local folders only"):
        translate({"merge_method": "linear", "models": [{"model": "psmathur/orca_mini_v3_13b",
                                                         "parameters": {"weight": 1.0}}]})


@pytest.mark.parametrize("config, message", [
    ({"merge_method": "linear", "models": [], "modules": {"text": {}}}, "'modules'"),
    ({"merge_method": "linear", "models": [], "seed": 3}, "unknown key 'seed' .*allowed: merge_method"),
    ({"merge_method": "frobnicate", "models": []}, "unknown merge_method 'frobnicate' \\(supported: linear"),
])
def test_unsupported_keys_and_methods_are_named(config, message):
    with pytest.raises(SpecError, match=message):
        translate(config)


def test_ram_takes_mergekits_parameters_and_defaults(models):
    """ram reads epsilon (1e-5), ramplus_tl r (0.1), alpha (0.2) and epsilon: mergekit's names and defaults;
    neither takes a per-model weight (mergekit's ram has none)."""
    base, ft = str(models["base"]), [{"model": str(models[k])} for k in ("ft1", "ft2")]
    spec = translate({"merge_method": "ram", "base_model": base, "models": ft})
    assert spec["method"] == "ram" and spec["parameters"] == {"epsilon": 1e-5}
    assert all("weight" not in m for m in spec["models"])
    spec = translate({"merge_method": "ramplus_tl", "base_model": base, "models": ft, "parameters": {"r": 0.3}})
    assert spec["method"] == "ramplus_tl" and spec["parameters"] == {"alpha": 0.2, "epsilon": 1e-5, "r": 0.3}
    with pytest.raises(SpecError, match="ram takes no parameter 'weight'"):
        translate({"merge_method": "ram", "base_model": base,
                   "models": [{"model": str(models["ft1"]), "parameters": {"weight": 1.0}}]})
    with pytest.raises(SpecError, match="needs base_model"):
        translate({"merge_method": "ramplus_tl", "models": ft})


def test_unknown_parameter_and_missing_weight_are_named(models):
    with pytest.raises(SpecError, match="ties takes no parameter 'densty'"):
        translate({"merge_method": "ties", "base_model": str(models["base"]),
                   "models": [{"model": str(models["ft1"]), "parameters": {"densty": 0.5, "weight": 1.0}}]})
    with pytest.raises(SpecError, match="needs parameter 'weight'"):
        translate({"merge_method": "ties", "base_model": str(models["base"]),
                   "models": [{"model": str(models["ft1"])}]})


def _slice(model, first, end, **params):
    return {"model": str(model), "layer_range": [first, end], **({"parameters": params} if params else {})}


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory) -> dict[str, Path]:
    """A 2-layer model of the same shapes as ``models`` and one whose tensors are not layer-numbered."""
    root = tmp_path_factory.mktemp("odd")
    gen = torch.Generator().manual_seed(11)
    short = {n: torch.randn(s, generator=gen) for n, s in _shapes().items() if ".layers.2." not in n}
    flat = {"net.0.weight": torch.randn(4, 4, generator=gen), "net.1.weight": torch.randn(4, 4, generator=gen)}
    out = {}
    for key, state in (("short", short), ("flat", flat)):
        (root / key).mkdir()
        save_state_dict(state, root / key / "model.safetensors")
        out[key] = root / key
    return out


@pytest.mark.parametrize("make, message", [
    (lambda m, o: {"merge_method": "slerp", "base_model": str(m["base"]), "parameters": {"t": 0.5},
                   "slices": [{"sources": [_slice(m["base"], 0, 2), _slice(m["ft1"], 0, 3)]}]},
     r"slices\[0\]: the sources' layer_range lengths differ \(.* 2, .* 3\)"),
    (lambda m, o: {"merge_method": "passthrough",
                   "slices": [{"sources": [_slice(m["base"], 0, 2)]}, {"sources": [_slice(o["short"], 1, 3)]}]},
     r"slices\[1\]\.sources\[0\]: layer_range \[1, 3\] goes beyond the 2 layers of .*short"),
    (lambda m, o: {"merge_method": "passthrough",
                   "slices": [{"sources": [_slice(m["base"], 0, 2)]}, {"sources": [_slice(o["flat"], 0, 1)]}]},
     r"no layer-numbered tensor names found; slices need names like 'model\.layers\.N\.'"),
    (lambda m, o: {"merge_method": "slerp", "base_model": str(m["base"]), "parameters": {"t": 0.5},
                   "slices": [{"sources": [_slice(m["base"], 0, 2), _slice(m["ft1"], 0, 2)]},
                              {"sources": [_slice(m["ft2"], 2, 3), _slice(m["ft1"], 2, 3)]}]},
     r"slices\[1\]: base_model is not among this slice's sources"),
    (lambda m, o: {"merge_method": "passthrough",
                   "slices": [{"sources": [_slice(m["base"], 0, 2), _slice(m["ft1"], 0, 2)]}]},
     r"slices\[0\]: passthrough copies one model per slice \(got 2 sources\)"),
    (lambda m, o: {"merge_method": "linear", "parameters": {"weight": 1.0},
                   "slices": [{"sources": [_slice(m["base"], 0, 2), _slice(m["base"], 1, 3)]}]},
     r"listed twice in one slice"),
])
def test_slice_errors_are_one_clear_line(models, odd_models, make, message):
    with pytest.raises(SpecError, match=message) as info:
        translate(make(models, odd_models))
    assert "\n" not in str(info.value)


def test_native_slice_errors(models, odd_models, tmp_path):
    from mergelab.merging import merge

    a, b = str(models["base"]), str(models["ft1"])
    with pytest.raises(SpecError, match=r"models\[1\] \(.*ft1\) is in no slice"):
        parse_spec({"method": "passthrough", "models": [a, b], "slices": [{"layers": 2, "model_layers": [0, None]}]})
    with pytest.raises(SpecError, match=r"slices\[0\]\.model_layers has 1 entries for 2 models"):
        parse_spec({"method": "passthrough", "models": [a, b], "slices": [{"layers": 2, "model_layers": [0]}]})
    with pytest.raises(SpecError, match=r"slices\[1\]: models\[1\] \(.*ft1\): layers \[2, 4\) go beyond its 3"):
        merge({"method": "passthrough", "models": [a, b], "slices": [{"layers": 2, "model_layers": [0, None]},
                                                                     {"layers": 2, "model_layers": [None, 2]}]},
              tmp_path / "x", progress=False)
    with pytest.raises(SpecError, match=r"slices\[1\]: models\[1\] \(.*flat\): no layer-numbered tensor names "
                                        r"found; layer slices need names like 'model\.layers\.N\.'"):
        merge({"method": "passthrough", "models": [a, str(odd_models["flat"])],
               "slices": [{"layers": 2, "model_layers": [0, None]}, {"layers": 1, "model_layers": [None, 0]}]},
              tmp_path / "y", progress=False)
    with pytest.raises(SpecError, match=r"slices\[0\]: method 'task_arithmetic' needs the base model in every slice"):
        merge({"method": "task_arithmetic", "base": a, "models": [b],
               "slices": [{"layers": 2, "model_layers": [0]}]}, tmp_path / "z", progress=False)


def test_cli_passthrough_stacks_layers_bit_identically(models, tmp_path):
    """layers [0, 2) of A then [1, 3) of B: output layers 0..3 = A0, A1, B1, B2; embeddings from A (the
    first slice), final norm and head from B (the last); config.json says 4 layers."""
    a, b = _load(models, "base", "ft1")
    out = _merge_cfg(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [_slice(models["base"], 0, 2)]}, {"sources": [_slice(models["ft1"], 1, 3)]}]})
    expect = {"model.embed_tokens.weight": a["model.embed_tokens.weight"], "model.norm.weight": b["model.norm.weight"],
              "lm_head.weight": b["lm_head.weight"]}
    for o, (src, i) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2)]):
        for n in ("input_layernorm.weight", "self_attn.q_proj.weight", "mlp.up_proj.weight"):
            expect[f"model.layers.{o}.{n}"] = src[f"model.layers.{i}.{n}"]
    assert sorted(out) == sorted(expect)
    for name, tensor in expect.items():
        assert torch.equal(out[name], tensor), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == {"model_type": "llama", "num_hidden_layers": 4}
    record = json.loads((tmp_path / "out" / "mergelab_merge.json").read_text())
    assert record["slices"][1] == {"layers": 2, "base_layer": None, "model_layers": [None, 1]}


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's slerp by hand: angle of the normalised tensors, lerp when nearly parallel (|dot| > 0.9995)."""
    a64, b64 = a.double(), b.double()
    dot = float((a64 / a64.norm() * b64 / b64.norm()).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        return ((1 - t) * a64 + t * b64).float()
    theta = math.acos(dot)
    return ((math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)).float()


def test_cli_slices_with_slerp_and_linear_by_hand(models, tmp_path):
    """Each slice merges its own sources with t (or the weights) evaluated over the slice's layers; the
    tensors outside the layers use the first slice's (embeddings) or the last slice's (norm, head) values."""
    b, e1, e2 = _load(models, "base", "ft1", "ft2")
    cfg = {"merge_method": "slerp", "base_model": str(models["base"]), "parameters": {"t": [0.2, 0.6]},
           "slices": [{"sources": [_slice(models["base"], 1, 3), _slice(models["ft1"], 0, 2)]},
                      {"sources": [_slice(models["base"], 0, 1), _slice(models["ft1"], 2, 3)],
                       "parameters": {"t": 0.9}}]}
    out = _merge_cfg(tmp_path / "slerp", cfg)
    pairs = {"model.embed_tokens.weight": ("model.embed_tokens.weight", "model.embed_tokens.weight", 0.2),
             "model.norm.weight": ("model.norm.weight", "model.norm.weight", 0.9),
             "lm_head.weight": ("lm_head.weight", "lm_head.weight", 0.9)}
    for o, (i_base, i_model, t) in enumerate([(1, 0, 0.2), (2, 1, 0.6), (0, 2, 0.9)]):
        for n in ("input_layernorm.weight", "self_attn.q_proj.weight", "mlp.up_proj.weight"):
            pairs[f"model.layers.{o}.{n}"] = (f"model.layers.{i_base}.{n}", f"model.layers.{i_model}.{n}", t)
    assert sorted(out) == sorted(pairs)
    for name, (nb, nm, t) in pairs.items():
        torch.testing.assert_close(out[name], _slerp(b[nb], e1[nm], t), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "slerp" / "out" / "config.json").read_text())["num_hidden_layers"] == 3

    # linear: per-source weights per slice; the first slice averages ft1 and ft2, the second base and ft2
    cfg = {"merge_method": "linear",
           "slices": [{"sources": [_slice(models["ft1"], 0, 2, weight=1.0), _slice(models["ft2"], 1, 3, weight=3.0)]},
                      {"sources": [_slice(models["base"], 2, 3, weight=1.0), _slice(models["ft2"], 0, 1, weight=1.0)]}]}
    out = _merge_cfg(tmp_path / "linear", cfg)
    for o, (x, ix, wx, y, iy, wy) in enumerate([(e1, 0, 1, e2, 1, 3), (e1, 1, 1, e2, 2, 3), (b, 2, 1, e2, 0, 1)]):
        for n in ("input_layernorm.weight", "mlp.up_proj.weight"):
            expect = (wx * x[f"model.layers.{ix}.{n}"] + wy * y[f"model.layers.{iy}.{n}"]) / (wx + wy)
            torch.testing.assert_close(out[f"model.layers.{o}.{n}"], expect, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["model.embed_tokens.weight"],
                               (e1["model.embed_tokens.weight"] + 3 * e2["model.embed_tokens.weight"]) / 4)
    torch.testing.assert_close(out["lm_head.weight"], (b["lm_head.weight"] + e2["lm_head.weight"]) / 2)


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_convert_round_trip_of_a_sliced_merge(models, tmp_path, capsys, engine):
    """The printed native spec merges bit-identically to the mergekit config (task arithmetic on slices,
    per-slice weights and a gradient; both engines)."""
    from mergelab.merging import merge

    # the numpy engine takes one weight per model: a gradient only for torch
    weight = 0.8 if engine == "numpy" else [0.2, 0.8]
    cfg = _cfg(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
                          "parameters": {"weight": weight},
                          "slices": [{"sources": [_slice(models["base"], 0, 2), _slice(models["ft1"], 1, 3),
                                                  _slice(models["ft2"], 0, 2, weight=0.5)]},
                                     {"sources": [_slice(models["base"], 2, 3), _slice(models["ft3"], 0, 1)]}]})
    assert main(["convert", str(cfg)]) == 0
    printed = capsys.readouterr().out
    native = yaml.safe_load(printed)
    assert native["slices"] == [{"layers": 2, "base_layer": 0, "model_layers": [1, 0, None]},
                                {"layers": 1, "base_layer": 2, "model_layers": [None, None, 0]}]
    (tmp_path / "native.yml").write_text(printed)
    merge(tmp_path / "native.yml", tmp_path / "a", progress=False, hash_inputs=False, engine=engine)
    merge(cfg, tmp_path / "b", progress=False, hash_inputs=False, engine=engine)
    a, b = load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b")
    assert list(a) == list(b)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert json.loads((tmp_path / "a" / "mergelab_merge.json").read_text())["engine"] == engine
    base, e1, e2, e3 = _load(models, "base", "ft1", "ft2", "ft3")
    n = "mlp.up_proj.weight"  # output layer 1: t = 1 in slice 0 -> weight 0.8 (ft1), 0.5 (ft2)
    expect = base[f"model.layers.1.{n}"] + 0.8 * (e1[f"model.layers.2.{n}"] - base[f"model.layers.1.{n}"]) \
        + 0.5 * (e2[f"model.layers.1.{n}"] - base[f"model.layers.1.{n}"])
    torch.testing.assert_close(a[f"model.layers.1.{n}"], expect, rtol=1e-6, atol=1e-6)
    n = "model.layers.2.mlp.up_proj.weight"  # slice 1 has one layer: t = 1 -> weight 0.8
    expect = base[n] + 0.8 * (e3["model.layers.0.mlp.up_proj.weight"] - base[n])
    torch.testing.assert_close(a[n], expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_per_slice_base_model_by_hand(models, tmp_path, capsys, engine):
    """mergekit's per-slice base_model: slice 0 merges ft1 onto the config's base (layers 0-1), slice 1 onto
    ft2 (its own base_model), where the config's base is one of the merged models with its weight. Embeddings
    follow slice 0's base, the final norm and head slice 1's (mergekit's pre/post weights use the first/last
    slice's base). The translation names ft2 as slice 1's base_model; the native spec merges the same bits."""
    from mergelab.merging import merge

    cfg = _cfg(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
                          "slices": [{"sources": [_slice(models["base"], 0, 2), _slice(models["ft1"], 1, 3, weight=0.5)]},
                                     {"base_model": str(models["ft2"]),
                                      "sources": [_slice(models["ft2"], 2, 3), _slice(models["ft1"], 0, 1, weight=0.5),
                                                  _slice(models["base"], 1, 2, weight=0.25)]}]})
    assert main(["convert", str(cfg)]) == 0
    printed = capsys.readouterr().out
    native = yaml.safe_load(printed)
    assert [m["path"] for m in native["models"]] == [str(models["ft1"]), str(models["ft2"]), str(models["base"])]
    assert native["base"] == str(models["base"])
    assert native["slices"] == [{"layers": 2, "base_layer": 0, "model_layers": [1, None, None]},
                                {"layers": 1, "model_layers": [0, 2, 1], "base_model": 1}]
    (tmp_path / "native.yml").write_text(printed)
    merge(cfg, tmp_path / "out", progress=False, hash_inputs=False, engine=engine)
    merge(tmp_path / "native.yml", tmp_path / "native", progress=False, hash_inputs=False, engine=engine)
    out, again = load_state_dict(tmp_path / "out"), load_state_dict(tmp_path / "native")
    assert json.loads((tmp_path / "out" / "mergelab_merge.json").read_text())["engine"] == engine
    assert list(out) == list(again) and all(torch.equal(out[n], again[n]) for n in out)
    b, e1, e2 = _load(models, "base", "ft1", "ft2")

    def ta(theta0, pairs):
        return theta0 + sum(w * (x - theta0) for w, x in pairs)

    for n in ("input_layernorm.weight", "self_attn.q_proj.weight", "mlp.up_proj.weight"):
        for o in (0, 1):
            expect = ta(b[f"model.layers.{o}.{n}"], [(0.5, e1[f"model.layers.{o + 1}.{n}"])])
            torch.testing.assert_close(out[f"model.layers.{o}.{n}"], expect, rtol=1e-6, atol=1e-6)
        expect = ta(e2[f"model.layers.2.{n}"], [(0.5, e1[f"model.layers.0.{n}"]), (0.25, b[f"model.layers.1.{n}"])])
        torch.testing.assert_close(out[f"model.layers.2.{n}"], expect, rtol=1e-6, atol=1e-6)
    n = "model.embed_tokens.weight"
    torch.testing.assert_close(out[n], ta(b[n], [(0.5, e1[n])]), rtol=1e-6, atol=1e-6)
    for n in ("model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(out[n], ta(e2[n], [(0.5, e1[n]), (0.25, b[n])]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("make", "message"), [
    (lambda m: {"merge_method": "ties", "base_model": str(m["base"]),
                "slices": [{"base_model": str(m["ft2"]), "sources": [_slice(m["base"], 0, 3, weight=1.0),
                                                                     _slice(m["ft1"], 0, 3, weight=1.0)]}]},
     r"slices\[0\]: base_model .*ft2.* is not among this slice's sources"),
    (lambda m: {"merge_method": "linear",
                "slices": [{"base_model": str(m["ft2"]), "sources": [_slice(m["ft2"], 0, 3, weight=1.0),
                                                                     _slice(m["ft1"], 0, 3, weight=1.0)]}]},
     r"slices\[0\]: a per-slice base_model other than the config's is not supported with linear"),
    (lambda m: {"merge_method": "task_arithmetic", "base_model": str(m["base"]),
                "slices": [{"base_model": str(m["ft2"]), "sources": [_slice(m["ft2"], 0, 3),
                                                                     _slice(m["base"], 0, 3)]}]},
     r"needs parameter 'weight'"),
])
def test_per_slice_base_model_errors(models, make, message):
    with pytest.raises(SpecError, match=message) as info:
        translate(make(models))
    assert "\n" not in str(info.value)


def test_native_slice_base_model_errors(models, tmp_path):
    from mergelab.merging import merge

    a, b, c = str(models["base"]), str(models["ft1"]), str(models["ft2"])
    for sl, message in (({"layers": 3, "model_layers": [0, 0], "base_model": 2}, r"base_model is 2 but there are 2"),
                        ({"layers": 3, "model_layers": [0, None], "base_model": 1}, r"models\[1\], which is not in "
                                                                                     r"the slice"),
                        ({"layers": 3, "base_layer": 0, "model_layers": [0, 0], "base_model": 1},
                         r"base_layer and base_model are both set")):
        with pytest.raises(SpecError, match=message):
            parse_spec({"method": "task_arithmetic", "base": a, "models": [b, c], "slices": [sl]})
    with pytest.raises(SpecError, match=r"slices\[0\]: method 'weight_average' takes no base model"):
        merge({"method": "weight_average", "models": [b, c], "slices": [{"layers": 3, "model_layers": [0, 0],
                                                                       "base_model": 1}]}, tmp_path / "x",
              progress=False)
    with pytest.raises(SpecError, match=r"slices\[1\]: method 'task_arithmetic' needs at least 1 models, got 0"):
        merge({"method": "task_arithmetic", "models": [b, c],
               "slices": [{"layers": 1, "model_layers": [0, 0], "base_model": 1},
                          {"layers": 2, "model_layers": [None, 1], "base_model": 1}]}, tmp_path / "y", progress=False)
    # a model as every slice's base needs no spec base
    merge({"method": "task_arithmetic", "models": [b, c], "slices": [{"layers": 3, "model_layers": [0, 0],
                                                                    "base_model": 1}]}, tmp_path / "z", progress=False)
    e1, e2 = _load(models, "ft1", "ft2")
    out = load_state_dict(tmp_path / "z")
    assert all(torch.equal(out[n], e2[n] + (e1[n] - e2[n])) for n in out)


# ---------------------------------------------------------------------------- merges through the CLI


def test_cli_convert_prints_a_valid_native_spec(models, tmp_path, capsys):
    cfg = _cfg(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
                          "models": [{"model": str(models["ft1"]), "parameters": {"weight": 0.5}}]})
    assert main(["convert", str(cfg)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == {"method": "task_arithmetic", "base": str(models["base"]),
                       "models": [{"path": str(models["ft1"]), "weight": 0.5}], "parameters": {"lambda": 1.0}}


def test_cli_merges_ties_normalize_false_with_a_negative_weight(models, tmp_path):
    cfg = _cfg(tmp_path, {"merge_method": "ties", "base_model": str(models["base"]),
                          "parameters": {"normalize": False},
                          "models": [{"model": str(models["ft1"]), "parameters": {"weight": 1.0}},
                                     {"model": str(models["ft2"]), "parameters": {"weight": -0.5}}]})
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--no-progress", "--no-hash"]) == 0
    out = load_state_dict(tmp_path / "out")
    b, e1, e2 = (load_state_dict(models[k] / "model.safetensors") for k in ("base", "ft1", "ft2"))
    for name in b:
        wt = [1.0 * (e1[name] - b[name]), -0.5 * (e2[name] - b[name])]  # density 1 (mergekit's default)
        sign = torch.sign(wt[0] + wt[1])
        expect = b[name] + sum(torch.where(torch.sign(x) == sign, x, 0.0) for x in wt)
        torch.testing.assert_close(out[name], expect, rtol=1e-6, atol=1e-6)


def test_cli_merges_gradient_slerp(models, tmp_path):
    cfg = _cfg(tmp_path, {"models": [{"model": str(models["base"])}, {"model": str(models["ft1"])}],
                          "merge_method": "slerp", "base_model": str(models["base"]),
                          "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                               {"value": 0.5}]}})
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--no-progress", "--no-hash"]) == 0
    out = load_state_dict(tmp_path / "out")
    a, b = (load_state_dict(models[k] / "model.safetensors") for k in ("base", "ft1"))
    for name in a:
        layer, _ = layer_position(name, LAYERS)
        t = (0.0, 0.3, 1.0)[layer] if (layer is not None and "self_attn" in name) else 0.5
        x, y = a[name].double().reshape(-1), b[name].double().reshape(-1)
        cos = float(x @ y / (x.norm() * y.norm()))
        if abs(cos) > 0.9995:
            expect = (1 - t) * x + t * y
        else:
            om = math.acos(cos)
            expect = math.sin((1 - t) * om) / math.sin(om) * x + math.sin(t * om) / math.sin(om) * y
        torch.testing.assert_close(out[name].double().reshape(-1), expect, rtol=1e-5, atol=1e-6)


def test_cli_merge_reports_a_hub_id_in_one_line(tmp_path, capsys):
    cfg = _cfg(tmp_path, {"merge_method": "linear", "models": [{"model": "org/some-model", "parameters": {"weight": 1}}]})
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "org/some-model" in err and "local folders only" in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ issue 15's methods


def test_della_translates_with_mergekits_semantics(models):
    spec = translate({"merge_method": "della", "base_model": str(models["base"]),
                      "parameters": {"lambda": 0.9},
                      "models": [{"model": str(models["ft1"]), "parameters": {"weight": 1.0, "density": 0.5,
                                                                               "epsilon": 0.1}},
                                 {"model": str(models["ft2"]), "parameters": {"weight": 0.5, "density": 0.6}}]})
    assert spec["method"] == "della"
    assert spec["models"][0]["parameters"] == {"density": 0.5, "epsilon": 0.1}
    assert spec["models"][1]["parameters"] == {"density": 0.6, "epsilon": 0.15}  # mergekit's default epsilon
    assert spec["parameters"] == {"disjoint_divisor": "weight", "lambda": 0.9, "rescale": "l1",
                                  "sign_election": "mass", "sign_test": "weighted", "spacing": "mergekit",
                                  "zero_sign": "positive"}
    parse_spec(spec)
    spec = translate({"merge_method": "della_linear", "base_model": str(models["base"]),
                      "parameters": {"normalize": True, "rescale": False},
                      "models": [{"model": str(models["ft1"]), "parameters": {"weight": 3.0, "density": 0.5}},
                                 {"model": str(models["ft2"]), "parameters": {"weight": 1.0, "density": 0.5}}]})
    assert [m["weight"] for m in spec["models"]] == [0.75, 0.25]
    assert spec["parameters"] == {"lambda": 1.0, "rescale": "none", "spacing": "mergekit"}


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_rescale_true_translates_to_l1_for_magnitude_pruning(models, tmp_path, method):
    """``rescale: true`` with ties / breadcrumbs / breadcrumbs_ties (mergekit's magnitude pruning rescaled to the
    L1 norm) becomes the native ``rescale: l1``; ``false`` (their default) leaves the native default ``none``
    (the spec unchanged), and the translated merge runs."""
    config = {"merge_method": method, "base_model": str(models["base"]),
              "models": [{"model": str(models["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": str(models["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    plain = translate(config)
    assert "rescale" not in plain["parameters"]
    assert translate({**config, "parameters": {"rescale": False}}) == plain
    spec = translate({**config, "parameters": {"rescale": True}})
    assert spec["parameters"] == {**plain["parameters"], "rescale": "l1"}
    assert spec["models"] == plain["models"]
    assert parse_spec(spec).parameters["rescale"] == "l1"
    out = _merge_cfg(tmp_path / "l1", {**config, "parameters": {"rescale": True}})
    none = _merge_cfg(tmp_path / "none", config)
    assert any(not torch.equal(out[name], none[name]) for name in out if out[name].is_floating_point())


def _merge_cfg(tmp_path, config):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = _cfg(tmp_path, config)
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--no-progress", "--no-hash"]) == 0
    return load_state_dict(tmp_path / "out")


def _load(models, *keys):
    return [load_state_dict(models[k] / "model.safetensors") for k in keys]


def test_cli_merges_nearswap_passthrough_and_arcee_fusion_by_hand(models, tmp_path):
    b, e1 = _load(models, "base", "ft1")
    out = _merge_cfg(tmp_path / "ns", {"merge_method": "nearswap", "base_model": str(models["base"]),
                                        "parameters": {"t": 0.05}, "models": [{"model": str(models["ft1"])}]})
    for name in b:
        w = (0.05 / (b[name] - e1[name]).abs().clamp_min(1e-6)).clamp(0, 1)
        torch.testing.assert_close(out[name], w * e1[name] + (1 - w) * b[name])
    out = _merge_cfg(tmp_path / "pt", {"merge_method": "passthrough",
                                        "models": [{"model": str(models["ft1"]), "parameters": {"scale": 0.5}}]})
    for name in b:
        assert torch.equal(out[name], e1[name] * 0.5)
    out = _merge_cfg(tmp_path / "af", {"merge_method": "arcee_fusion", "base_model": str(models["base"]),
                                        "models": [{"model": str(models["ft1"])}]})
    for name in b:  # every entry is the base's or the model's
        assert torch.equal((out[name] == b[name]) | (out[name] == e1[name]), torch.ones_like(b[name], dtype=torch.bool))


def test_cli_karcher_averages_the_base_model_too(models, tmp_path):
    """mergekit's karcher reads every model, base_model included: three equal-weight directions."""
    from mergelab.methods import TensorInputs, get_method

    b, e1, e2 = _load(models, "base", "ft1", "ft2")
    out = _merge_cfg(tmp_path, {"merge_method": "karcher", "base_model": str(models["base"]),
                                "models": [{"model": str(models["ft1"])}, {"model": str(models["ft2"])}]})
    m = get_method("karcher")
    for name in b:
        expect = m.reference(TensorInputs(name, None, [b[name], e1[name], e2[name]], [1.0] * 3), m.parse_params({}))
        assert torch.equal(out[name], expect)


@pytest.mark.parametrize("method, params, model_params", [
    ("breadcrumbs_ties", {}, {"density": 0.5, "gamma": 0.1}),
    ("sce", {"select_topk": 0.5}, {}),
    ("nuslerp", {}, {}),
    ("multislerp", {}, {}),
    ("della_linear", {}, {"density": 0.5, "epsilon": 0.1}),
    ("ram", {"epsilon": 0.05}, {}),
    ("ramplus_tl", {"epsilon": 0.1, "r": 0.5, "alpha": 1.5}, {}),
])
def test_cli_runs_each_new_method(models, tmp_path, method, params, model_params):
    """Each of issue 15's mergekit methods runs unchanged and equals its catalog reference on every tensor."""
    from mergelab.methods import TensorInputs, get_method
    from mergelab.spec import parse_spec as parse

    weighted = method not in ("sce", "ram", "ramplus_tl")
    entries = [{"model": str(models[k]), "parameters": {**model_params, **({"weight": w} if weighted else {})}}
               for k, w in (("ft1", 1.0), ("ft2", 0.5))]
    config = {"merge_method": method, "base_model": str(models["base"]), "models": entries}
    if params:
        config["parameters"] = params
    out = _merge_cfg(tmp_path, config)
    spec = parse(translate(config))
    m = get_method(method)
    p = m.parse_params(spec.parameters)
    b, e1, e2 = _load(models, "base", "ft1", "ft2")
    own = [dict(x.parameters) for x in spec.models]
    for name in b:
        inp = TensorInputs(name, b[name], [e1[name], e2[name]], [x.weight for x in spec.models],
                           model_params=own if any(own) else None)
        assert torch.equal(out[name], m.reference(inp, p)), name
