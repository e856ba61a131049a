"""Tests for mergelab.merging.merge: full merges equal the per-tensor methods, global vs per-tensor TIES
trimming, overrides, dtype rules, the merge record, YAML specs, the CLI, and clear, atomic failures."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from mergelab.checkpoints import load_state_dict, save_state_dict
from mergelab.cli import main
from mergelab.merging import merge
from mergelab.errors import CheckpointError, NonFiniteError, SpecError, TensorMismatchError
from mergelab.merging.torch_backend import kernel
from mergelab.methods import TensorInputs, get_method


pytestmark = pytest.mark.usefixtures("isolated_cache")  # conftest: tmp digest cache, one thread


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def model_state(seed: int, dtype: torch.dtype = torch.float32, step: int = 5) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {
        "layers.0.weight": torch.randn(6, 5, generator=g).to(dtype),
        "layers.0.bias": torch.randn(5, generator=g).to(dtype),
        "bn.num_batches_tracked": torch.tensor(step, dtype=torch.int64),
        "layers.1.weight": torch.randn(5, 4, generator=g).to(dtype),
        "layers.1.bias": torch.randn(4, generator=g).to(dtype),
        "scale": torch.randn((), generator=g).to(dtype),
        "empty": torch.empty(0, 3, dtype=dtype),
    }


def write_models(folder: Path, n_experts: int = 2, dtype: torch.dtype = torch.float32):
    """base.safetensors and e<i>.safetensors in ``folder``; returns (base path, expert paths, states)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = model_state(0, dtype, step=5)
    experts = [model_state(10 + i, dtype, step=7 + i) for i in range(n_experts)]
    base_path = save_state_dict(base, folder / "base.safetensors")
    paths = [save_state_dict(e, folder / f"e{i}.safetensors") for i, e in enumerate(experts)]
    return base_path, paths, base, experts


def assert_nothing_written(out: Path) -> None:
    assert not os.path.lexists(out), f"{out} exists after a failed merge"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(out.name + ".")]
    assert not leftovers, f"temporary siblings left behind: {leftovers}"


def global_thresholds(base, experts, density: float) -> list[float]:
    """Reference whole-model trim threshold per expert: the k-th largest |tau| over the concatenation of all
    floating tensors, by a full sort (k = max(1, floor(density * total)))."""
    out = []
    for e in experts:
        mags = torch.cat([(e[n].float() - base[n].float()).abs().reshape(-1)
                          for n in base if base[n].is_floating_point()])
        k = max(1, int(math.floor(density * mags.numel())))
        out.append(float(torch.sort(mags, descending=True).values[k - 1]))
    return out


# ------------------------------------------------------------------------------------- full merges


CASES = [
    ("weight_average", {}, [1.0, 2.0]),
    ("task_arithmetic", {"lambda": 0.5}, [1.0, 2.0]),
    ("ties", {"density": 0.3, "lambda": 0.8}, [1.0, 0.5]),
    ("ties", {"density": 0.3, "trim_scope": "tensor", "sign_election": "count", "disjoint_divisor": "weight"},
     [1.0, 0.5]),
    ("dare_linear", {"density": 0.5, "seed": 3, "lambda": 0.9}, [1.0, 2.0]),
    ("dare_ties", {"density": 0.4, "rescale": "l1"}, [2.0, 1.0]),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, [1.0, 1.0]),
    ("model_stock", {}, None),
    ("slerp", {"t": 0.3}, None),
]


@pytest.mark.parametrize(("name", "params", "weights"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_full_merge_equals_per_tensor_reference(tmp_path: Path, name: str, params: dict, weights) -> None:
    base_path, paths, base, experts = write_models(tmp_path / "in")
    models = [str(p) if weights is None else {"path": str(p), "weight": w} for p, w in zip(paths, weights or paths)]
    spec = {"method": name, "base": str(base_path), "models": models, "parameters": params}
    result = merge(spec, tmp_path / "out", progress=False)
    merged = load_state_dict(tmp_path / "out")
    assert list(merged) == list(base) and result.tensors == len(base)

    method = get_method(name)
    p = method.parse_params(params)
    w = weights or [1.0, 1.0]
    thresholds = None
    if name == "ties" and p.trim_scope == "global":
        thresholds = global_thresholds(base, experts, p.density)
    for tensor, value in base.items():
        got = merged[tensor]
        assert got.dtype == value.dtype and got.shape == value.shape, tensor
        if not value.is_floating_point():
            assert torch.equal(got, value), tensor  # integer buffers come from the base
            continue
        ref = kernel(method)(TensorInputs(tensor, value, [e[tensor] for e in experts], w, thresholds), p)
        assert torch.equal(got, ref.to(value.dtype)), (name, tensor, (got - ref).abs().max())


def test_slerp_one_model_and_weight_average_without_base(tmp_path: Path) -> None:
    base_path, paths, base, experts = write_models(tmp_path / "in")
    merge({"method": "slerp", "base": str(base_path), "models": [str(paths[0])], "parameters": {"t": 0.25}},
          tmp_path / "s", progress=False)
    merged = load_state_dict(tmp_path / "s")
    for tensor in ("layers.0.weight", "layers.1.bias"):
        ref = kernel("slerp")(TensorInputs(tensor, base[tensor], [experts[0][tensor]], [1.0]),
                                        get_method("slerp").parse_params({"t": 0.25}))
        assert torch.equal(merged[tensor], ref)
    # no base: weight_average copies integer buffers from the first model
    merge({"method": "weight_average", "models": [str(p) for p in paths]}, tmp_path / "w", progress=False)
    merged = load_state_dict(tmp_path / "w")
    assert int(merged["bn.num_batches_tracked"]) == 7
    assert torch.allclose(merged["layers.0.weight"], (experts[0]["layers.0.weight"] + experts[1]["layers.0.weight"]) / 2)


def test_dare_merge_is_reproducible(tmp_path: Path) -> None:
    base_path, paths, _, _ = write_models(tmp_path / "in")
    spec = {"method": "dare_ties", "base": str(base_path), "models": [str(p) for p in paths],
            "parameters": {"density": 0.3, "seed": 11}}
    merge(spec, tmp_path / "a", progress=False)
    merge(spec, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------- TIES trimming scope


def test_ties_global_vs_tensor_scope(tmp_path: Path) -> None:
    # one expert over a zero base (so the output is exactly the trimmed task vector); tensor "big" holds
    # every large magnitude. Total 100 entries, density 0.2 -> k = 20.
    g = _gen(1)
    sign = lambda n: torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)  # noqa: E731
    big = sign(30) * (10 + 10 * torch.rand(30, generator=g))  # |tau| in [10, 20)
    small = sign(70) * (0.1 + 0.9 * torch.rand(70, generator=g))  # |tau| in [0.1, 1)
    base = {"big": torch.zeros(30), "small": torch.zeros(70)}
    expert = {"big": big, "small": small}
    save_state_dict(base, tmp_path / "base.safetensors")
    save_state_dict(expert, tmp_path / "e.safetensors")
    spec = {"method": "ties", "base": str(tmp_path / "base.safetensors"),
            "models": [str(tmp_path / "e.safetensors")], "parameters": {"density": 0.2}}

    merge(spec, tmp_path / "global", progress=False)
    out = load_state_dict(tmp_path / "global")
    t = float(torch.sort(torch.cat([big.abs(), small.abs()]), descending=True).values[19])
    assert torch.equal(out["big"], big * (big.abs() >= t))  # the threshold is the exact 20th largest overall
    assert int((out["big"] != 0).sum()) == 20  # global: the 20 largest, all from "big" ...
    assert int((out["small"] != 0).sum()) == 0  # ... and nothing of "small"

    merge({**spec, "parameters": {"density": 0.2, "trim_scope": "tensor"}}, tmp_path / "tensor", progress=False)
    out = load_state_dict(tmp_path / "tensor")
    assert int((out["big"] != 0).sum()) == 6  # floor(0.2 * 30)
    assert int((out["small"] != 0).sum()) == 14  # floor(0.2 * 70)
    t_small = float(torch.sort(small.abs(), descending=True).values[13])
    assert torch.equal(out["small"], small * (small.abs() >= t_small))


def test_ties_global_threshold_exact_for_float64(tmp_path: Path) -> None:
    # the 3rd largest of 0.1 .. 1.0 is 0.8; rounded to float32 it would be 0.800000011920929 > 0.8 and the
    # '>=' rule would keep only two entries
    base = {"w": torch.zeros(10, dtype=torch.float64)}
    expert = {"w": torch.arange(1, 11, dtype=torch.float64) / 10}
    save_state_dict(base, tmp_path / "base.safetensors")
    save_state_dict(expert, tmp_path / "e.safetensors")
    merge({"method": "ties", "base": str(tmp_path / "base.safetensors"), "models": [str(tmp_path / "e.safetensors")],
           "parameters": {"density": 0.3}}, tmp_path / "out", progress=False)
    out = load_state_dict(tmp_path / "out")["w"]
    assert out.dtype == torch.float64
    assert torch.equal(out, expert["w"] * (expert["w"] >= 0.8))


# ---------------------------------------------------------------------------------------- overrides


def _override_models(tmp_path: Path):
    g = _gen(2)
    names = ["encoder.attn.weight", "encoder.mlp.weight", "decoder.attn.weight", "head.weight"]
    base = {n: torch.zeros(20) for n in names}
    expert = {n: torch.randn(20, generator=g) for n in names}
    save_state_dict(base, tmp_path / "base.safetensors")
    save_state_dict(expert, tmp_path / "e.safetensors")
    return {"method": "ties", "base": str(tmp_path / "base.safetensors"), "models": [str(tmp_path / "e.safetensors")]}


def test_overrides_by_glob_and_regex_per_tensor(tmp_path: Path) -> None:
    spec = {
        **_override_models(tmp_path),
        "parameters": {"density": 0.2, "trim_scope": "tensor"},
        "overrides": [
            {"pattern": "*.attn.*", "parameters": {"density": 0.5}},
            {"pattern": r"re:^head\.", "parameters": {"density": 1.0}},
            {"pattern": "re:attn", "parameters": {"density": 0.9}},  # never wins: the glob above matches first
        ],
    }
    merge(spec, tmp_path / "out", progress=False)
    kept = {n: int((t != 0).sum()) for n, t in load_state_dict(tmp_path / "out").items()}
    assert kept == {"encoder.attn.weight": 10, "encoder.mlp.weight": 4, "decoder.attn.weight": 10, "head.weight": 20}
    record = json.loads((tmp_path / "out" / "mergelab_merge.json").read_text())
    assert [o["pattern"] for o in record["overrides"]] == ["*.attn.*", r"re:^head\.", "re:attn"]


def test_overrides_with_global_scope_make_their_own_group(tmp_path: Path) -> None:
    # tensors sharing a density share one whole-model threshold: head alone at 0.5 keeps 10 of 20; the
    # other three (60 entries) at 0.2 keep 12 between them, chosen by one threshold over the three
    spec = {**_override_models(tmp_path), "parameters": {"density": 0.2},
            "overrides": [{"pattern": "head.*", "parameters": {"density": 0.5}}]}
    merge(spec, tmp_path / "out", progress=False)
    out = load_state_dict(tmp_path / "out")
    expert = load_state_dict(tmp_path / "e.safetensors")
    assert int((out["head.weight"] != 0).sum()) == 10
    rest = ["encoder.attn.weight", "encoder.mlp.weight", "decoder.attn.weight"]
    t = float(torch.sort(torch.cat([expert[n].abs() for n in rest]), descending=True).values[11])
    for n in rest:
        assert torch.equal(out[n], expert[n] * (expert[n].abs() >= t)), n
    assert sum(int((out[n] != 0).sum()) for n in rest) == 12


def test_override_group_of_empty_tensors(tmp_path: Path) -> None:
    # a global-scope group with no entries at all must not crash the threshold pass
    base_path, paths, base, experts = write_models(tmp_path / "in")
    spec = {"method": "ties", "base": str(base_path), "models": [str(p) for p in paths],
            "overrides": [{"pattern": "empty", "parameters": {"density": 0.5}}]}
    merge(spec, tmp_path / "out", progress=False)
    assert load_state_dict(tmp_path / "out")["empty"].shape == (0, 3)


def test_bad_override_is_a_spec_error(tmp_path: Path) -> None:
    base_path, paths, _, _ = write_models(tmp_path / "in")
    spec = {"method": "ties", "base": str(base_path), "models": [str(p) for p in paths],
            "overrides": [{"pattern": "layers.*", "parameters": {"density": 2.0}}]}
    with pytest.raises(SpecError, match=r"overrides\[0\].*density"):
        merge(spec, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")
    spec["overrides"] = [{"pattern": "re:(", "parameters": {}}]
    with pytest.raises(SpecError, match="regular expression"):
        merge(spec, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


# ------------------------------------------------------------------------------------------- dtypes


def test_integer_buffers_are_copied_from_base(tmp_path: Path) -> None:
    base_path, paths, _, _ = write_models(tmp_path / "in")  # steps: base 5, experts 7 and 8
    for name in ("weight_average", "task_arithmetic", "ties"):
        merge({"method": name, "base": str(base_path), "models": [str(p) for p in paths]},
              tmp_path / name, progress=False)
        nbt = load_state_dict(tmp_path / name)["bn.num_batches_tracked"]
        assert nbt.dtype == torch.int64 and int(nbt) == 5, name


def test_mixed_precision_merges_in_float32_writes_base_dtype(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    base_path, paths, base, experts = write_models(folder, dtype=torch.bfloat16)
    experts[0] = {k: (v.float() if v.is_floating_point() else v) for k, v in experts[0].items()}
    save_state_dict(experts[0], paths[0])  # expert 0 in float32, base and expert 1 in bf16
    spec = {"method": "task_arithmetic", "base": str(base_path), "models": [str(p) for p in paths],
            "parameters": {"lambda": 0.7}}
    result = merge(spec, tmp_path / "out", progress=False)
    merged = load_state_dict(tmp_path / "out")
    p = get_method("task_arithmetic").parse_params({"lambda": 0.7})
    for tensor in ("layers.0.weight", "layers.1.bias", "scale"):
        assert merged[tensor].dtype == torch.bfloat16
        ref = kernel("task_arithmetic")(
            TensorInputs(tensor, base[tensor], [e[tensor] for e in experts], [1.0, 1.0]), p)
        assert ref.dtype == torch.float32  # computed in float32 ...
        assert torch.equal(merged[tensor], ref.to(torch.bfloat16))  # ... written in the base's dtype
    assert len(result.warnings) == 1
    assert "6 tensor(s) in different floating dtypes" in result.warnings[0]  # every float tensor, incl. empty
    assert "bfloat16 vs float32" in result.warnings[0] and "merged in float32" in result.warnings[0]
    record = json.loads((tmp_path / "out" / "mergelab_merge.json").read_text())
    assert record["warnings"] == result.warnings

    merge({**spec, "dtype": "float32"}, tmp_path / "f32", progress=False)
    merged = load_state_dict(tmp_path / "f32")
    ref = kernel("task_arithmetic")(
        TensorInputs("layers.0.weight", base["layers.0.weight"], [e["layers.0.weight"] for e in experts],
                     [1.0, 1.0]), p)
    assert merged["layers.0.weight"].dtype == torch.float32 and torch.equal(merged["layers.0.weight"], ref)
    assert merged["bn.num_batches_tracked"].dtype == torch.int64  # the dtype override only touches floats


def test_identical_models_weight_average_bit_exact(tmp_path: Path) -> None:
    state = model_state(3)
    for i in range(2):
        save_state_dict(state, tmp_path / f"m{i}.safetensors")
    merge({"method": "weight_average", "models": [str(tmp_path / f"m{i}.safetensors") for i in range(2)]},
          tmp_path / "out", progress=False)
    merged = load_state_dict(tmp_path / "out")
    for name, value in state.items():
        assert torch.equal(merged[name], value), name


def test_identical_three_models_weight_average_bit_exact(tmp_path: Path) -> None:
    state = {"w": torch.randn(1000, generator=_gen(4))}
    for i in range(3):
        save_state_dict(state, tmp_path / f"m{i}.safetensors")
    merge({"method": "weight_average", "models": [str(tmp_path / f"m{i}.safetensors") for i in range(3)]},
          tmp_path / "out", progress=False)
    assert torch.equal(load_state_dict(tmp_path / "out")["w"], state["w"])


# ------------------------------------------------------------------------------------------ bad input


def _spec(base: Path, models: list, method: str = "task_arithmetic", **extra) -> dict:
    return {"method": method, "base": str(base), "models": [str(m) if isinstance(m, Path) else m for m in models],
            **extra}


def _broken_expert(tmp_path: Path, edit) -> tuple[dict, Path]:
    base_path, paths, base, experts = write_models(tmp_path / "in")
    bad = dict(experts[1])
    edit(bad)
    bad_path = tmp_path / "in" / "bad.safetensors"
    save_state_dict(bad, bad_path)
    return _spec(base_path, [paths[0], bad_path]), bad_path


def _expect_failure(tmp_path: Path, spec, exc_type, *needles: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(exc_type) as info:
        merge(spec, out, progress=False)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert_nothing_written(out)


def test_missing_key_in_one_expert(tmp_path: Path) -> None:
    spec, bad = _broken_expert(tmp_path, lambda s: s.pop("layers.1.bias"))
    _expect_failure(tmp_path, spec, TensorMismatchError, str(bad), "'layers.1.bias'", "missing")


def test_extra_key_in_one_expert(tmp_path: Path) -> None:
    spec, bad = _broken_expert(tmp_path, lambda s: s.__setitem__("lora.extra", torch.ones(2)))
    _expect_failure(tmp_path, spec, TensorMismatchError, str(bad), "'lora.extra'")


def test_shape_mismatch(tmp_path: Path) -> None:
    spec, bad = _broken_expert(tmp_path, lambda s: s.__setitem__("layers.0.weight", torch.ones(5, 6)))
    _expect_failure(tmp_path, spec, TensorMismatchError, str(bad), "'layers.0.weight'", "(5, 6)", "(6, 5)")


def test_int_vs_float_mismatch(tmp_path: Path) -> None:
    spec, bad = _broken_expert(tmp_path, lambda s: s.__setitem__("layers.1.bias", torch.ones(4, dtype=torch.int32)))
    _expect_failure(tmp_path, spec, TensorMismatchError, str(bad), "'layers.1.bias'", "int32", "float32")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])  # found in the write loop / in the global pre-pass
def test_nan_in_an_expert(tmp_path: Path, method: str) -> None:
    def poison(s):
        s["layers.1.bias"] = s["layers.1.bias"].clone()
        s["layers.1.bias"][2] = float("nan")

    spec, bad = _broken_expert(tmp_path, poison)
    spec["method"] = method
    _expect_failure(tmp_path, spec, NonFiniteError, str(bad), "'layers.1.bias'", "NaN")


def test_inf_in_the_base(tmp_path: Path) -> None:
    base_path, paths, base, _ = write_models(tmp_path / "in")
    base["scale"] = torch.tensor(float("-inf"))
    save_state_dict(base, base_path)
    _expect_failure(tmp_path, _spec(base_path, paths), NonFiniteError, str(base_path), "'scale'", "Inf")


def test_corrupt_file(tmp_path: Path) -> None:
    base_path, paths, _, _ = write_models(tmp_path / "in")
    paths[1].write_bytes(bytes(range(256)) * 3)
    _expect_failure(tmp_path, _spec(base_path, paths), CheckpointError, str(paths[1]))


def test_truncated_file(tmp_path: Path) -> None:
    base_path, paths, _, _ = write_models(tmp_path / "in")
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 40])
    _expect_failure(tmp_path, _spec(base_path, paths), CheckpointError, str(paths[1]), "truncated")


def test_missing_path(tmp_path: Path) -> None:
    base_path, paths, _, _ = write_models(tmp_path / "in")
    missing = tmp_path / "in" / "nope.safetensors"
    _expect_failure(tmp_path, _spec(base_path, [paths[0], missing]), CheckpointError, str(missing))


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (lambda s: s.update(method="tie"), ["unknown method 'tie'", "did you mean 'ties'"]),
        (lambda s: s.update(parameters={"lamda": 0.5}), ["'lamda'", "task_arithmetic", "lambda"]),
        (lambda s: s.update(method="ties", parameters={"density": 0.0}), ["density", "(0, 1]"]),
        (lambda s: s.update(method="dare_linear", parameters={"density": 1.2}), ["density", "(0, 1]"]),
        (lambda s: s.update(models=[]), ["models", "at least 1"]),
        (lambda s: s.update(method="model_stock", models=[{"path": m, "weight": 2.0} for m in s["models"]]),
         ["model_stock", "weight"]),
        (lambda s: s.update(method="slerp", models=s["models"] * 2), ["slerp", "at most 2"]),
        (lambda s: s.update(method="model_stock", models=s["models"][:1]), ["model_stock", "at least 2"]),
        (lambda s: s.pop("base"), ["base", "task_arithmetic"]),
        (lambda s: s.update(dtype="float8"), ["dtype"]),
        (lambda s: s.update(desnity=0.3), ["desnity", "unknown field"]),
    ],
    ids=["unknown-method", "unknown-param", "density-0", "density-1.2", "no-models", "model-stock-weights",
         "slerp-3", "model-stock-1", "no-base", "bad-dtype", "unknown-field"],
)
def test_bad_specs(tmp_path: Path, edit, needles: list[str]) -> None:
    base_path, paths, _, _ = write_models(tmp_path / "in")
    spec = _spec(base_path, [str(p) for p in paths])
    edit(spec)
    _expect_failure(tmp_path, spec, SpecError, *needles)


def test_existing_output_without_overwrite_is_kept(tmp_path: Path) -> None:
    base_path, paths, _, _ = write_models(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the old model")
    with pytest.raises(CheckpointError, match="already exists"):
        merge(_spec(base_path, paths), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"the old model"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out.")]
    merge(_spec(base_path, paths), out, overwrite=True, progress=False)
    assert set(load_state_dict(out)) == set(model_state(0))
    # an existing empty folder is fine without overwrite
    (tmp_path / "empty_out").mkdir()
    merge(_spec(base_path, paths), tmp_path / "empty_out", progress=False)


def test_failed_overwrite_keeps_the_previous_model(tmp_path: Path) -> None:
    # a merge that fails half-way (NaN in the last tensor, found while writing) with overwrite=True must
    # leave the previous good model in place
    spec, _ = _broken_expert(tmp_path, lambda s: s.__setitem__("empty", torch.empty(0, 3)))
    out = tmp_path / "out"
    merge(spec, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad_path = tmp_path / "in" / "bad.safetensors"
    bad = load_state_dict(bad_path)
    bad["layers.1.bias"][0] = float("nan")
    save_state_dict(bad, bad_path)
    with pytest.raises(NonFiniteError, match="layers.1.bias"):
        merge(spec, out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out.")]


# ------------------------------------------------------------------------------------ record, YAML, CLI


def test_merge_record(tmp_path: Path) -> None:
    base_path, paths, _, _ = write_models(tmp_path / "in")
    spec = _spec(base_path, [{"path": str(paths[0]), "weight": 0.25}, str(paths[1])], method="ties",
                 parameters={"density": 0.4, "lambda": 0.9})
    result = merge(spec, tmp_path / "out", progress=False)
    record = json.loads((tmp_path / "out" / "mergelab_merge.json").read_text())
    assert record["method"] == "ties" and result.method == "ties"
    assert record["parameters"]["density"] == 0.4 and record["parameters"]["lambda"] == 0.9
    assert record["parameters"]["trim_scope"] == "global"  # resolved defaults are recorded too
    files = record["inputs"]["base"]["files"]
    assert files[0]["path"] == str(base_path)
    assert files[0]["sha256"] == "sha256:" + hashlib.sha256(base_path.read_bytes()).hexdigest()
    models = record["inputs"]["models"]
    assert [m["weight"] for m in models] == [0.25, 1.0]
    assert models[1]["files"][0]["sha256"] == "sha256:" + hashlib.sha256(paths[1].read_bytes()).hexdigest()
    assert (tmp_path / "cache" / "digests.json").exists()  # the digest cache went to MERGELAB_CACHE
    merge(spec, tmp_path / "nohash", progress=False, hash_inputs=False)
    record = json.loads((tmp_path / "nohash" / "mergelab_merge.json").read_text())
    assert record["inputs"]["base"]["files"][0]["sha256"] is None


def _yaml_project(tmp_path: Path) -> Path:
    write_models(tmp_path / "proj" / "models")
    spec_dir = tmp_path / "proj" / "specs"
    spec_dir.mkdir()
    spec = spec_dir / "merge.yaml"
    spec.write_text(yaml.safe_dump({
        "method": "weight_average",
        "base": "../models/base.safetensors",
        "models": ["../models/e0.safetensors", {"path": "../models/e1.safetensors", "weight": 3.0}],
    }))
    return spec


def test_yaml_spec_relative_paths_resolve_against_its_folder(tmp_path: Path, monkeypatch) -> None:
    spec = _yaml_project(tmp_path)
    monkeypatch.chdir(tmp_path)  # relative to the cwd these paths would not exist
    merge(spec, tmp_path / "out", progress=False)
    merge(str(spec), tmp_path / "out2", progress=False)
    merged = load_state_dict(tmp_path / "out")
    e0, e1 = model_state(10), model_state(11)
    assert torch.allclose(merged["layers.0.weight"], (e0["layers.0.weight"] + 3 * e1["layers.0.weight"]) / 4)
    record = json.loads((tmp_path / "out" / "mergelab_merge.json").read_text())
    assert Path(record["inputs"]["models"][0]["path"]).resolve() == (tmp_path / "proj" / "models" / "e0.safetensors")


def test_cli_merge_success_and_bad_spec(tmp_path: Path, capsys) -> None:
    spec = _yaml_project(tmp_path)
    assert main(["merge", str(spec), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "merged 7 tensors" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").exists()

    bad = tmp_path / "proj" / "specs" / "bad.yaml"
    bad.write_text("method: tie\nmodels: [../models/e0.safetensors]\n")
    assert main(["merge", str(bad), "--out", str(tmp_path / "bad_out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "mergelab merge: error" in err and "unknown method 'tie'" in err
    assert_nothing_written(tmp_path / "bad_out")

    bad.write_text("method: [unclosed\n")
    assert main(["merge", str(bad), "--out", str(tmp_path / "bad_out"), "--no-progress"]) == 1
    assert "not valid YAML" in capsys.readouterr().err
    assert_nothing_written(tmp_path / "bad_out")


def test_global_ties_keeps_exactly_k_entries_of_a_bf16_model(tmp_path: Path, monkeypatch) -> None:
    # bf16 task vectors tie massively at the threshold; exactly floor(density * n) entries must survive
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    gen = torch.Generator().manual_seed(5)
    base = {"a": torch.randn(300, 200, generator=gen).to(torch.bfloat16),
            "b": torch.randn(50_000, generator=gen).to(torch.bfloat16)}
    def moved(v: torch.Tensor) -> torch.Tensor:  # |noise| >= 0.5 always changes a bf16 value of N(0, 1) scale
        noise = torch.sign(torch.randn(v.shape, generator=gen)) * (0.5 + torch.rand(v.shape, generator=gen))
        return (v.float() + noise).to(torch.bfloat16)

    expert = {k: moved(v) for k, v in base.items()}
    save_state_dict(base, tmp_path / "base.safetensors")
    save_state_dict(expert, tmp_path / "e.safetensors")
    changed_inputs = sum(int(torch.count_nonzero(expert[k] != base[k])) for k in base)
    total = sum(v.numel() for v in base.values())
    assert changed_inputs == total  # every coordinate moved, so kept entries are exactly the changed ones
    merge({"method": "ties", "base": str(tmp_path / "base.safetensors"), "models": [str(tmp_path / "e.safetensors")],
           "parameters": {"density": 0.5}}, tmp_path / "out", progress=False)
    merged = load_state_dict(tmp_path / "out")
    kept = sum(int(torch.count_nonzero(merged[k] != base[k])) for k in base)
    assert kept == total // 2
