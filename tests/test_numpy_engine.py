"""The numpy engine (task arithmetic and weight averaging without torch): closed-form references, equality
with the torch engine, engine selection and its errors, and that a CLI merge never imports torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergelab.merging import numpy_backend as numpy_engine
from mergelab.merging import numpy_kernels
from mergelab.ops import gram_matrix
from mergelab.checkpoints import load_state_dict, save_state_dict
from mergelab.errors import NonFiniteError, SpecError
from mergelab.merging import merge
from mergelab.ops import blocks as blocks_mod
from mergelab.spec import parse_spec

pytestmark = pytest.mark.usefixtures("isolated_cache")  # conftest: tmp digest cache, one thread

SHAPES = {"w": (13, 11), "b": (11,), "scalar": (), "empty": (0, 4)}


def _models(folder: Path, dtypes: list[torch.dtype], seed: int = 0) -> list[Path]:
    """One checkpoint per dtype (the first is the base): the same tensors plus noise, and an int counter."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    paths = []
    for i, dtype in enumerate(dtypes):
        state = {k: (v + (0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64) if i else 0)).to(dtype)
                 for k, v in base.items()}
        state["steps"] = torch.tensor([7 + i, 3], dtype=torch.int64)
        paths.append(save_state_dict(state, folder / f"m{i}.safetensors"))
    return paths


def _spec(method: str, paths: list[Path], weights: list[float] | None = None, **extra) -> dict:
    weights = weights or [1.0] * (len(paths) - 1)
    return {"method": method, "base": str(paths[0]), "device": "cpu",
            "models": [{"path": str(p), "weight": w} for p, w in zip(paths[1:], weights)], **extra}


def _as64(path: Path) -> dict[str, np.ndarray]:
    return {k: v.to(torch.float64).numpy() for k, v in load_state_dict(path).items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_task_arithmetic_closed_form(tmp_path, dtype):
    """theta_0 + lambda * sum_i w_i (theta_i - theta_0), computed in float32, rounded once to the storage dtype."""
    paths = _models(tmp_path, [dtype] * 3)
    weights, lam = [0.5, 2.0], 0.3
    result = merge(_spec("task_arithmetic", paths, weights, parameters={"lambda": lam}), tmp_path / "out",
                   progress=False, engine="numpy")
    assert result.record["engine"] == "numpy"
    out = load_state_dict(tmp_path / "out")
    t0, t1, t2 = (_as64(p) for p in paths)
    for name in SHAPES:
        expected = t0[name] + lam * (weights[0] * (t1[name] - t0[name]) + weights[1] * (t2[name] - t0[name]))
        assert out[name].dtype == dtype and tuple(out[name].shape) == SHAPES[name]
        # one rounding to the storage dtype (plus float32 intermediates: a few float32 ulps)
        ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        np.testing.assert_allclose(out[name].to(torch.float64).numpy(), expected, rtol=ulp, atol=ulp)
    assert torch.equal(out["steps"], torch.tensor([7, 3]))  # integer tensors come from the base, not averaged


def test_weight_average_closed_form_and_identical_models(tmp_path):
    paths = _models(tmp_path, [torch.float32] * 4)
    weights = [1.0, 3.0, 0.5]
    merge(_spec("weight_average", paths, weights), tmp_path / "out", progress=False, engine="numpy")
    out = load_state_dict(tmp_path / "out")
    ts = [_as64(p) for p in paths[1:]]
    for name in SHAPES:
        expected = sum(w * t[name] for w, t in zip(weights, ts)) / sum(weights)
        np.testing.assert_allclose(out[name].numpy(), expected, rtol=1e-6, atol=1e-6)
    # a merge of identical models returns that model bit for bit
    same = [paths[1]] * 3
    merge({"method": "weight_average", "device": "cpu", "models": [str(p) for p in same]}, tmp_path / "same",
          progress=False, engine="numpy")
    merge(_spec("task_arithmetic", [paths[1], paths[1], paths[1]]), tmp_path / "same_ta", progress=False,
          engine="numpy")
    original = load_state_dict(paths[1])
    for folder in ("same", "same_ta"):
        merged = load_state_dict(tmp_path / folder)
        for name in original:
            assert torch.equal(merged[name], original[name]), (folder, name)


@pytest.mark.parametrize("method", ["task_arithmetic", "weight_average"])
@pytest.mark.parametrize("dtypes", [[torch.bfloat16] * 4, [torch.float16] * 4,
                                    [torch.bfloat16, torch.float32, torch.bfloat16, torch.float16]])
def test_equals_the_torch_engine_bit_for_bit(tmp_path, monkeypatch, method, dtypes):
    """Unit weights: the same float32 operations in the same order as the torch engine, any block size."""
    paths = _models(tmp_path, dtypes, seed=5)
    spec = _spec(method, paths, parameters={"lambda": 0.7} if method == "task_arithmetic" else {})
    merge(spec, tmp_path / "torch", progress=False, engine="torch")
    monkeypatch.setattr(numpy_engine, "BLOCK", 17)  # several blocks per tensor, split over the threads
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", "2")
    merge(spec, tmp_path / "numpy", progress=False, engine="numpy")
    a, b = load_state_dict(tmp_path / "torch"), load_state_dict(tmp_path / "numpy")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), name


#: the numpy back-end's elementwise kernels beyond TA/WA, with parameters taking each path
ELEMENTWISE_CASES = [
    ("passthrough", {}), ("passthrough", {"scale": 0.5}),
    ("nearswap", {}), ("nearswap", {"t": 0.01}), ("nearswap", {"t": 0.1}),
    ("ram", {}), ("ram", {"epsilon": 0.05}), ("ram", {"epsilon": 0.1}),
]


@pytest.mark.parametrize("out_dtype", [None, "bfloat16", "float32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("method", "params"), ELEMENTWISE_CASES)
def test_elementwise_kernels_equal_their_catalog_references(tmp_path, monkeypatch, method, params, dtype,
                                                             out_dtype):
    """Passthrough, NearSwap and RAM (three experts) run on the numpy back-end by default (``engine: auto``) and write their catalog
    reference (:mod:`mergelab.methods.catalog`) rounded once to the output dtype, bit for bit (several blocks,
    two threads)."""
    from mergelab.methods import TensorInputs, get_method

    paths = _models(tmp_path, [dtype] * (4 if method == "ram" else 2), seed=3)
    spec = _spec(method, paths, parameters=params, **({"dtype": out_dtype} if out_dtype else {}))
    monkeypatch.setattr(numpy_engine, "BLOCK", 17)
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", "2")
    assert numpy_engine.unsupported(parse_spec(spec)) is None
    spec.pop("device")  # the default: engine auto picks numpy
    result = merge(spec, tmp_path / "out", progress=False)
    assert result.record["engine"] == "numpy"
    out = load_state_dict(tmp_path / "out")
    base, *experts = [load_state_dict(p) for p in paths]
    m = get_method(method)
    p = m.parse_params(params)
    target = getattr(torch, out_dtype) if out_dtype else dtype
    for name in SHAPES:
        inp = TensorInputs(name, base[name], [e[name] for e in experts], [1.0] * len(experts))
        ref = m.reference(inp, p).to(target)
        assert out[name].dtype == target, name
        assert torch.equal(out[name].view(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), name
    assert torch.equal(out["steps"], base["steps"])  # integer tensors: copied from the reference input


def test_float64_input_computes_in_float64(tmp_path):
    paths = _models(tmp_path, [torch.float64, torch.float32, torch.float32])
    merge(_spec("task_arithmetic", paths), tmp_path / "out", progress=False, engine="numpy")
    out = load_state_dict(tmp_path / "out")
    t0, t1, t2 = (_as64(p) for p in paths)
    assert out["w"].dtype == torch.float64
    np.testing.assert_array_equal(out["w"].numpy(), (t1["w"] - t0["w"]) + (t2["w"] - t0["w"]) + t0["w"])


def test_output_dtype_and_record(tmp_path):
    paths = _models(tmp_path, [torch.float32] * 3)
    result = merge(_spec("task_arithmetic", paths, dtype="bfloat16", shard_size=100), tmp_path / "out",
                   progress=False)
    assert result.record["engine"] == "numpy"
    out = load_state_dict(tmp_path / "out")
    assert out["w"].dtype == torch.bfloat16 and out["steps"].dtype == torch.int64
    record = json.loads((tmp_path / "out" / "mergelab_merge.json").read_text())
    assert record["engine"] == "numpy" and record["environment"]["torch"] == torch.__version__
    assert [m["weight"] for m in record["inputs"]["models"]] == [1.0, 1.0]
    assert all(f["sha256"].startswith("sha256:") for f in record["inputs"]["base"]["files"])
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()  # sharded at 100 bytes


def test_engine_selection(tmp_path):
    paths = _models(tmp_path, [torch.float32] * 3)
    assert numpy_engine.unsupported(parse_spec(_spec("task_arithmetic", paths))) is None
    why = numpy_engine.unsupported(parse_spec(_spec("dare_linear", paths)))
    assert ("task_arithmetic, weight_average, passthrough, nearswap, ram, ties, model_stock, slerp, nuslerp, "
            "multislerp and karcher, not dare_linear") in why
    # the Gram-matrix kernels take one angle per tensor: per-row variants go to torch
    for method, params in (("model_stock", {"filter_wise": True}), ("nuslerp", {"flatten": False})):
        spec = _plain_spec(method, paths[:3], params)
        assert "one angle per tensor" in numpy_engine.unsupported(parse_spec(spec))
        assert merge(spec, tmp_path / method, progress=False).record["engine"] == "torch"
    assert numpy_engine.unsupported(parse_spec(_spec("ties", paths))) is None  # the paper's whole-model trim
    assert numpy_engine.unsupported(parse_spec(_spec("ties", paths, parameters={"trim_scope": "tensor"}))) is None
    assert "device: cpu" in numpy_engine.unsupported(parse_spec(_spec("task_arithmetic", paths, device="auto")))
    # auto falls back to torch for what numpy cannot run
    assert merge(_spec("ties", paths), tmp_path / "t", progress=False).record["engine"] == "numpy"
    assert merge(_spec("dare_ties", paths), tmp_path / "d", progress=False).record["engine"] == "torch"
    assert merge(_spec("task_arithmetic", paths, device="auto"), tmp_path / "a",
                 progress=False).record["engine"] == "torch"
    # torch files and float8 tensors go to torch too
    pt = tmp_path / "m1.pt"
    torch.save(load_state_dict(paths[1]), pt)
    spec = _spec("task_arithmetic", [paths[0], pt])
    assert "not a safetensors checkpoint" in numpy_engine.unsupported(parse_spec(spec))
    assert merge(spec, tmp_path / "p", progress=False).record["engine"] == "torch"
    f8 = tmp_path / "f8.safetensors"
    save_state_dict({k: (v.to(torch.float8_e4m3fn) if v.is_floating_point() else v)
                     for k, v in load_state_dict(paths[1]).items()}, f8)
    assert "stored as float8_e4m3fn" in numpy_engine.unsupported(parse_spec(_spec("task_arithmetic", [paths[0], f8])))


def test_engine_errors(tmp_path):
    paths = _models(tmp_path, [torch.float32] * 3)
    with pytest.raises(SpecError, match="numpy engine cannot run this merge: it computes"):
        merge(_spec("dare_ties", paths), tmp_path / "o", progress=False, engine="numpy")
    with pytest.raises(SpecError, match="engine: 'gpu' is not one of auto, numpy, torch"):
        merge(_spec("task_arithmetic", paths), tmp_path / "o", progress=False, engine="gpu")
    spec = _spec("task_arithmetic", paths)
    del spec["base"]
    with pytest.raises(SpecError, match="needs a base model"):
        merge(spec, tmp_path / "o", progress=False, engine="numpy")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "model_stock"])
def test_cli_merge_does_not_import_torch(tmp_path, method):
    """The numpy engine's point: `mergelab merge` of task arithmetic, TIES or a Gram-matrix method never pays
    for `import torch`."""
    paths = _models(tmp_path, [torch.bfloat16] * 3)
    spec_path = tmp_path / "spec.yaml"
    spec = (_plain_spec(method, paths) if method == "model_stock"
            else _spec(method, paths, parameters={"trim_scope": "tensor"} if method == "ties" else {}))
    spec_path.write_text(yaml.safe_dump(spec))
    code = (
        "import sys\n"
        "from mergelab.cli import main\n"
        f"status = main(['merge', {str(spec_path)!r}, '--out', {str(tmp_path / 'out')!r}, '--no-progress'])\n"
        "assert status == 0, status\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert load_state_dict(tmp_path / "out")["w"].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ TIES


def _keep_top_k(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Reference trim mask: the k largest magnitudes, ties broken by position (a stable sort)."""
    keep = np.zeros(magnitude.size, bool)
    keep[np.argsort(-magnitude, kind="stable")[:k]] = True
    return keep


def _ties_reference(base, experts, weights, density, sign_election, divisor, lam):
    """TIES written out from the paper's definition in float64 (task vectors formed in float32, as the engines
    form them): stable-sort top-k trim, sign election, disjoint mean over the agreeing models, scale."""
    b32 = base.astype(np.float32)
    taus = [(e.astype(np.float32) - b32).astype(np.float64).reshape(-1) for e in experts]
    if density < 1.0:
        k = max(1, int(np.floor(density * taus[0].size)))
        taus = [t * _keep_top_k(np.abs(t), k) for t in taus]
    if sign_election == "mass":
        gamma = np.sign(sum(w * t for w, t in zip(weights, taus)))
    else:
        gamma = np.sign(sum(np.sign(t) for t in taus))
    agree = [(np.sign(t) == gamma) & (t != 0) for t in taus]
    numerator = sum(w * t * a for w, t, a in zip(weights, taus, agree))
    denominator = sum((1.0 if divisor == "count" else w) * a for w, a in zip(weights, agree))
    merged = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)
    return (base.astype(np.float64).reshape(-1) + lam * merged).reshape(base.shape)


def _small_selection(monkeypatch, block: int = 64, small: int = 100, sample: int = 128) -> None:
    """Blocks, direct-selection size and sample small enough that tiny tensors take the block-wise paths."""
    from mergelab.merging import numpy_kernels as numpy_ties
    from mergelab.ops import selection as order_stats

    monkeypatch.setattr(numpy_ties, "BLOCK", block)
    monkeypatch.setattr(order_stats, "SMALL", small)
    monkeypatch.setattr(order_stats, "SAMPLE", sample)


@pytest.mark.parametrize(("density", "sign_election", "divisor", "weights", "lam"), [
    (0.2, "mass", "count", [1.0, 1.0, 1.0], 1.0),
    (0.5, "count", "weight", [0.5, 2.0, 1.0], 0.7),
    (0.7, "mass", "weight", [1.0, -0.5, 2.0], 1.3),
    (1.0, "mass", "count", [1.0, 1.0, 1.0], 1.0),
])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_ties_closed_form(tmp_path, monkeypatch, density, sign_election, divisor, weights, lam, threads):
    """Per-tensor TIES against the paper's definition, on the block-wise selection path and the direct one."""
    _small_selection(monkeypatch)
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", threads)
    paths = _models(tmp_path, [torch.float32] * 4, seed=3)
    params = {"density": density, "trim_scope": "tensor", "sign_election": sign_election,
              "disjoint_divisor": divisor, "lambda": lam}
    result = merge(_spec("ties", paths, weights, parameters=params), tmp_path / "out", progress=False,
                   engine="numpy")
    assert result.record["engine"] == "numpy"
    out = load_state_dict(tmp_path / "out")
    inputs = [{k: v.numpy() for k, v in load_state_dict(p).items()} for p in paths]
    for name in SHAPES:  # w (143 entries) goes through the blocks and the sample, b and scalar are selected whole
        expected = _ties_reference(inputs[0][name], [m[name] for m in inputs[1:]], weights, density,
                                   sign_election, divisor, lam)
        np.testing.assert_allclose(out[name].numpy(), expected, rtol=2e-6, atol=2e-7, err_msg=name)
    assert torch.equal(out["steps"], torch.tensor([7, 3]))  # copied from the base


@pytest.mark.parametrize("width", [5.0, 0.0])  # 0: a one-rank bracket, which misses on continuous values
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_ties_trim_keeps_exactly_k_first_ties_kept(monkeypatch, width, dtype):
    """Exactly k entries survive each trim, the earliest ties first: bf16 task vectors tie massively at the
    threshold; on float32 ones a missed bracket falls back to selecting among all entries, with the same result."""
    import ml_dtypes

    from mergelab.merging import numpy_kernels as numpy_ties
    from mergelab.ops import selection as order_stats

    _small_selection(monkeypatch, block=97, small=50, sample=256)
    monkeypatch.setattr(order_stats, "WIDTH", width)
    whole, original = [], numpy_ties.whole_trim
    monkeypatch.setattr(numpy_ties, "whole_trim", lambda *a: whole.append(1) or original(*a))
    rng = np.random.default_rng(0)
    stored = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    base = rng.standard_normal(5000).astype(stored)
    experts = [(base.astype(np.float32) + 0.01 * rng.standard_normal(5000)).astype(stored) for _ in range(3)]
    for density in (0.1, 0.5, 0.9):
        trims = numpy_ties.tensor_trims(base, experts, density, np.dtype(np.float32))
        k = int(np.floor(density * 5000))
        for trim, e in zip(trims, experts):
            magnitude = np.abs(e.astype(np.float32) - base.astype(np.float32))
            position = np.arange(magnitude.size)
            kept = np.where(position < trim.cutoff, magnitude >= trim.threshold, magnitude > trim.threshold)
            assert kept.sum() == k
            if dtype == "bfloat16":  # the case this is about: many entries tied at the threshold
                assert np.count_nonzero(magnitude == trim.threshold) > 1
            np.testing.assert_array_equal(kept, _keep_top_k(magnitude, k))
    assert bool(whole) == (width == 0.0 and dtype == "float32")


@pytest.mark.parametrize("dtypes", [[torch.bfloat16] * 4, [torch.float16] * 4, [torch.float32] * 4,
                                    [torch.bfloat16, torch.float32, torch.bfloat16, torch.float16]])
def test_ties_equals_the_torch_engine_bit_for_bit(tmp_path, monkeypatch, dtypes):
    """Per-tensor TIES on both engines, with every option, on the block-wise paths: the same bits."""
    paths = _models(tmp_path, dtypes, seed=11)
    _small_selection(monkeypatch)
    from mergelab.ops import selection as order_stats  # the torch back-end's selection reads the same sizes
    from mergelab.ops import blocks as torch_blocks

    monkeypatch.setattr(torch_blocks, "BLOCK", 40)
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", "2")
    assert order_stats.SMALL == 100
    for params in ({"density": 0.3}, {"density": 0.6, "sign_election": "count", "disjoint_divisor": "weight",
                                      "lambda": 0.5}, {"density": 1.0, "disjoint_divisor": "weight"},
                   {"density": 0.5, "zero_sign": "positive"},
                   {"density": 0.5, "sign_election": "count", "zero_sign": "positive"}):
        spec = _spec("ties", paths, parameters={"trim_scope": "tensor", **params})
        merge(spec, tmp_path / "torch", progress=False, engine="torch", overwrite=True)
        merge(spec, tmp_path / "numpy", progress=False, engine="numpy", overwrite=True)
        a, b = load_state_dict(tmp_path / "torch"), load_state_dict(tmp_path / "numpy")
        for name in a:
            assert a[name].dtype == b[name].dtype
            assert torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), (params, name)


@pytest.mark.parametrize("dtypes", [[torch.bfloat16] * 4, [torch.float32] * 4, [torch.float64] * 4,
                                    [torch.bfloat16, torch.float32, torch.bfloat16, torch.float16]])
def test_ties_rescale_l1_equals_the_torch_engine_bit_for_bit(tmp_path, monkeypatch, dtypes):
    """``rescale: l1`` on both engines, per tensor and over the whole model, with weights and both elections:
    the same bits. Both engines cut the same blocks (the L1 block rule sums per-block partials in block
    order), several per tensor, two threads."""
    from mergelab.merging import numpy_kernels as numpy_ties

    paths = _models(tmp_path, dtypes, seed=13)
    _small_selection(monkeypatch, block=40)
    monkeypatch.setattr(blocks_mod, "BLOCK", 40)
    monkeypatch.setattr(numpy_engine, "GLOBAL_SAMPLE", 64)
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", "2")
    assert numpy_ties.BLOCK == blocks_mod.BLOCK == 40
    for params, weights in (({"density": 0.3, "trim_scope": "tensor"}, None),
                            ({"density": 0.6, "trim_scope": "tensor", "sign_election": "count",
                              "disjoint_divisor": "weight", "lambda": 0.5}, [0.5, 2.0, 1.0]),
                            ({"density": 0.4}, None),  # whole-model threshold, per-tensor norms
                            ({"density": 0.2, "trim_scope": "tensor", "zero_sign": "positive"}, [1.0, -0.5, 2.0])):
        spec = _spec("ties", paths, weights, parameters={"rescale": "l1", **params})
        merge(spec, tmp_path / "torch", progress=False, engine="torch", overwrite=True)
        merge(spec, tmp_path / "numpy", progress=False, engine="numpy", overwrite=True)
        a, b = load_state_dict(tmp_path / "torch"), load_state_dict(tmp_path / "numpy")
        plain = {**spec, "parameters": {**spec["parameters"], "rescale": "none"}}
        merge(plain, tmp_path / "plain", progress=False, engine="numpy", overwrite=True)
        c = load_state_dict(tmp_path / "plain")
        for name in a:
            assert a[name].dtype == b[name].dtype
            assert torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), (params, name)
        assert not torch.equal(b["w"], c["w"]), params  # the rescaling took effect


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_ties_rescale_l1_closed_form(tmp_path, engine):
    """tau = (4, -3, 2, 1) at density 0.5 keeps (4, -3), ||tau||_1 = 10, ||kept||_1 = 7: (4, -3) * 10/7 (one
    expert: the disjoint mean is the trimmed vector). A second tensor of task vector (1e-8, 0, 0, 0) has
    ||tau||_1 < 1e-7 and is left unscaled (mergekit's tolerance). Two experts (4, -3, 2, 1) and
    (-1, 3, 0.5, 2) at density 0.5: (4, -3) * 10/7 and (3, 2) * 6.5/5; entry 0 elects + (40/7 - 0), entry 1
    the sign of -30/7 + 3.9 < 0, entry 3 only the second expert: 2.6."""
    base = {"w": torch.zeros(4), "tiny": torch.zeros(4)}
    e1 = {"w": torch.tensor([4.0, -3.0, 2.0, 1.0]), "tiny": torch.tensor([1e-8, 0.0, 0.0, 0.0])}
    e2 = {"w": torch.tensor([-1.0, 3.0, 0.5, 2.0]), "tiny": torch.zeros(4)}
    paths = [save_state_dict(state, tmp_path / f"m{i}.safetensors") for i, state in enumerate((base, e1, e2))]
    params = {"trim_scope": "tensor", "density": 0.5, "rescale": "l1"}
    merge(_spec("ties", paths[:2], parameters=params), tmp_path / "one", progress=False, engine=engine)
    out = load_state_dict(tmp_path / "one")
    f = np.float32(10.0 / 7.0)
    assert out["w"].tolist() == [np.float32(4.0) * f, np.float32(-3.0) * f, 0.0, 0.0]
    assert out["tiny"].tolist() == [np.float32(1e-8), 0.0, 0.0, 0.0]  # kept (k = 2), not scaled
    merge(_spec("ties", paths, parameters=params), tmp_path / "two", progress=False, engine=engine)
    out = load_state_dict(tmp_path / "two")["w"]
    g = np.float32(6.5 / 5.0)
    np.testing.assert_array_equal(out.numpy(), np.array([4.0 * f, -3.0 * f, 0.0, 2.0 * g], dtype=np.float32))


def test_ties_block_size_is_the_torch_operators_block_size():
    """The L1 block rule of rescale l1 sums per-block partials in block order, so both back-ends must cut the
    same blocks."""
    from mergelab.merging import numpy_kernels as numpy_ties

    assert numpy_ties.BLOCK == blocks_mod.BLOCK


@pytest.mark.parametrize("sign_election", ["mass", "count"])
def test_ties_zero_sign_on_an_exact_tie_both_engines(tmp_path, sign_election):
    """Two experts whose task vectors cancel at entries 0-2 (sign sum exactly 0): ``zero_sign: drop`` merges 0
    there, ``positive`` (mergekit's) keeps the positive side (1, 2, 3); entry 3 agrees (mean 0.375). Both
    engines, both elections, the same bits."""
    base = {"w": torch.zeros(4)}
    e1 = {"w": torch.tensor([1.0, 2.0, -3.0, 0.5])}
    e2 = {"w": torch.tensor([-1.0, -2.0, 3.0, 0.25])}
    paths = [save_state_dict(state, tmp_path / f"m{i}.safetensors") for i, state in enumerate((base, e1, e2))]
    for zero, expect in (("drop", [0.0, 0.0, 0.0, 0.375]), ("positive", [1.0, 2.0, 3.0, 0.375])):
        spec = _spec("ties", paths, parameters={"trim_scope": "tensor", "density": 1.0, "zero_sign": zero,
                                                "sign_election": sign_election})
        outs = {}
        for engine in ("torch", "numpy"):
            merge(spec, tmp_path / engine, progress=False, engine=engine, overwrite=True)
            outs[engine] = load_state_dict(tmp_path / engine)["w"]
        assert outs["torch"].tolist() == expect and torch.equal(outs["torch"], outs["numpy"]), (zero, outs)


def test_ties_invariants(tmp_path):
    """Identical experts return the model; TIES at density 1 with one model equals task arithmetic."""
    paths = _models(tmp_path, [torch.bfloat16] * 3)
    merge(_spec("ties", [paths[0], paths[1], paths[1]], parameters={"trim_scope": "tensor", "density": 1.0}),
          tmp_path / "same", progress=False, engine="numpy")
    original = load_state_dict(paths[1])
    merged = load_state_dict(tmp_path / "same")
    for name in SHAPES:  # floating tensors (the integer counter comes from the base)
        assert torch.equal(merged[name], original[name]), name
    merge(_spec("ties", paths[:2], parameters={"density": 1.0, "lambda": 0.6}), tmp_path / "ties",
          progress=False, engine="numpy")
    merge(_spec("task_arithmetic", paths[:2], parameters={"lambda": 0.6}), tmp_path / "ta", progress=False,
          engine="numpy")
    ties, ta = load_state_dict(tmp_path / "ties"), load_state_dict(tmp_path / "ta")
    for name in ta:
        assert torch.equal(ties[name], ta[name]), name


def test_ties_float64_inputs_compute_in_float64(tmp_path):
    paths = _models(tmp_path, [torch.float64, torch.float64, torch.float64])
    merge(_spec("ties", paths, parameters={"trim_scope": "tensor", "density": 0.5}), tmp_path / "out",
          progress=False, engine="numpy")
    out = load_state_dict(tmp_path / "out")
    inputs = [{k: v.numpy() for k, v in load_state_dict(p).items()} for p in paths]
    assert out["w"].dtype == torch.float64
    # the float64 reference (task vectors in float64 too): equal up to float64 rounding
    b = inputs[0]["w"].reshape(-1)
    taus = [m["w"].reshape(-1) - b for m in inputs[1:]]
    k = int(0.5 * b.size)
    taus = [t * _keep_top_k(np.abs(t), k) for t in taus]
    gamma = np.sign(taus[0] + taus[1])
    agree = [(np.sign(t) == gamma) & (t != 0) for t in taus]
    num, den = sum(t * a for t, a in zip(taus, agree)), sum(a * 1.0 for a in agree)
    expected = b + np.divide(num, den, out=np.zeros_like(num), where=den != 0)
    np.testing.assert_allclose(out["w"].numpy().reshape(-1), expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_ties_nonfinite_input_on_the_block_path_is_named(tmp_path, monkeypatch, bad):
    """A NaN/Inf in an expert reaches TIES's output through the block-wise selection and merge, and the
    error names the file and tensor; nothing is written."""

    _small_selection(monkeypatch)
    paths = _models(tmp_path, [torch.float32] * 4)
    state = load_state_dict(paths[2])
    state["w"][5, 3] = bad
    save_state_dict(state, paths[2])
    with pytest.raises(NonFiniteError) as info:
        merge(_spec("ties", paths, parameters={"trim_scope": "tensor", "density": 0.3}), tmp_path / "out",
              progress=False, engine="numpy")
    assert str(paths[2]) in str(info.value) and "'w'" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [5.0, 0.0])  # 0: the first bracket misses (float32), is widened and recounted
def test_ties_global_trim_closed_form_and_torch_engine(tmp_path, monkeypatch, dtype, width):
    """The paper's whole-model trim: per expert, exactly k = floor(density * N) entries over all tensors of a
    density group survive, ties kept first in model order; the same bits as the torch engine's."""
    from mergelab.ops import selection as order_stats
    from mergelab.checkpoints import open_checkpoint

    paths = _models(tmp_path, [dtype] * 4, seed=21)
    _small_selection(monkeypatch)
    monkeypatch.setattr(order_stats, "WIDTH", width)
    monkeypatch.setattr(numpy_engine, "GLOBAL_SAMPLE", 64)
    spec = _spec("ties", paths, parameters={"density": 0.4},
                 overrides=[{"pattern": "b", "parameters": {"density": 0.6}}])  # two density groups
    merge(spec, tmp_path / "numpy", progress=False, engine="numpy")
    merge(spec, tmp_path / "torch", progress=False, engine="torch")
    a, b = load_state_dict(tmp_path / "torch"), load_state_dict(tmp_path / "numpy")
    for name in a:
        assert torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), name
    # the reference: trim over the concatenated task vectors of each group, in the base's storage order
    with open_checkpoint(paths[0]) as r:
        order = [n for n in r.keys() if n in SHAPES and r.info(n).shape != (0, 4)]
    inputs = [{k: v.float().numpy().reshape(-1) for k, v in load_state_dict(p).items()} for p in paths]
    groups = {0.4: [n for n in order if n != "b"], 0.6: ["b"]}
    kept = {}
    for density, names in groups.items():
        for i, expert in enumerate(inputs[1:]):
            tau = np.concatenate([expert[n] - inputs[0][n] for n in names])
            keep = _keep_top_k(np.abs(tau), max(1, int(np.floor(density * tau.size))))
            offsets = np.cumsum([0] + [inputs[0][n].size for n in names])
            for j, n in enumerate(names):
                kept[n, i] = keep[offsets[j]:offsets[j + 1]]
    for n in order:
        taus = [(e[n] - inputs[0][n]).astype(np.float64) * kept[n, i] for i, e in enumerate(inputs[1:])]
        gamma = np.sign(sum(taus))
        agree = [(np.sign(t) == gamma) & (t != 0) for t in taus]
        num, den = sum(t * g for t, g in zip(taus, agree)), sum(g * 1.0 for g in agree)
        expected = inputs[0][n] + np.divide(num, den, out=np.zeros_like(num), where=den != 0)
        got = b[n].to(torch.float64).numpy().reshape(-1)
        ulp = 8e-3 if dtype == torch.bfloat16 else 1e-6
        np.testing.assert_allclose(got, expected, rtol=ulp, atol=ulp, err_msg=n)


def test_bfloat16_integer_conversions_equal_ml_dtypes():
    """widen_bfloat16 is ml_dtypes' exact widening for all 65536 bfloat16 patterns; round_bfloat16 is its
    round-to-nearest-even for every finite result (ties both ways, subnormals, overflow to Inf) and flags
    exactly the blocks whose rounded result is NaN or Inf."""
    import ml_dtypes

    from mergelab.merging.numpy_arrays import round_bfloat16, widen_bfloat16

    bf16 = np.dtype(ml_dtypes.bfloat16)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(bf16)
    wide = widen_bfloat16(every, np.empty(every.size, np.float32))
    assert np.array_equal(wide.view(np.uint32), every.astype(np.float32).view(np.uint32))

    rng = np.random.default_rng(0)
    finite_max = np.float32(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    edges = np.array([0.0, -0.0, 1.0, 1.00390625, 1.005859375, 1.001953125, 1.0029296875,  # exact, ties
                      1e-40, -3e-39, float(finite_max), np.nextafter(finite_max, np.float32(np.inf)),
                      3.3895314e38, 3.3961775e38, -3.39e38, float(np.finfo(np.float32).max)], dtype=np.float32)
    bits = np.concatenate([rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32),
                           edges.view(np.uint32),
                           (rng.integers(0, 1 << 16, 4096, dtype=np.uint32) << 16) | 0x8000])  # exact ties
    x = bits.view(np.float32)
    finite = np.isfinite(x)
    with np.errstate(invalid="ignore"):
        expected = x.astype(bf16)
    ok = finite & np.isfinite(expected.astype(np.float32))
    out = np.empty(x.size, bf16)
    flagged = round_bfloat16(x, out, np.empty(x.size, np.uint32))
    assert flagged  # the random patterns hold NaN and Inf
    assert np.array_equal(out.view(np.uint16)[ok], expected.view(np.uint16)[ok])
    assert np.array_equal(out.view(np.uint16)[~finite & ~np.isnan(x)], expected.view(np.uint16)[~finite & ~np.isnan(x)])
    for chunk in np.array_split(np.arange(x.size), 512):  # the flag: exactly when a result is not finite
        assert round_bfloat16(x[chunk], out[chunk], np.empty(chunk.size, np.uint32)) == (not ok[chunk].all())
    assert round_bfloat16(x[:0], out[:0], np.empty(0, np.uint32)) is False


@pytest.mark.parametrize(("method", "models", "bad_model"), [
    ("task_arithmetic", 3, 2), ("weight_average", 3, 2), ("passthrough", 2, 1), ("nearswap", 2, 1),
    ("nearswap", 2, 0), ("ram", 3, 2), ("ram", 3, 0), ("model_stock", 3, 2), ("model_stock", 3, 0),
    ("slerp", 2, 1), ("karcher", 3, 1)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bfloat16_nonfinite_input_is_named(tmp_path, method, models, bad_model, bad):
    """bfloat16 inputs take the integer conversions; a NaN/Inf input still fails the merge, naming its file
    (every method here carries a non-finite input into its output, where the check finds it)."""
    paths = _models(tmp_path, [torch.bfloat16] * models)
    state = load_state_dict(paths[bad_model])
    state["w"][4, 5] = bad
    save_state_dict(state, paths[bad_model])
    with pytest.raises(NonFiniteError) as info:
        merge(_plain_spec(method, paths), tmp_path / "out", progress=False, engine="numpy")
    assert str(paths[bad_model]) in str(info.value) and "'w'" in str(info.value)
    assert not (tmp_path / "out").exists()


def _plain_spec(method: str, paths: list[Path], params: dict | None = None, base: bool = True,
                weights: list[float] | None = None) -> dict:
    """A spec of ``method`` on ``paths`` (the first the base, or dropped with ``base=False``); weights only
    where given (model stock and SLERP take none)."""
    models = [{"path": str(p)} if weights is None else {"path": str(p), "weight": w}
              for p, w in zip(paths[1:], weights or [None] * len(paths))]
    spec = {"method": method, "device": "cpu", "models": models, "parameters": params or {}}
    if base:
        spec["base"] = str(paths[0])
    return spec


#: the numpy back-end's Gram-matrix kernels: (method, parameters, models, with a base, weights), taking each
#: path: task vectors or models, one model or several, SLERP's linear fallback, model stock's extrapolation
GRAM_CASES = [
    ("model_stock", {}, 3, True, None),
    ("model_stock", {"extrapolate": True}, 2, True, None),
    ("slerp", {}, 1, True, None),
    ("slerp", {"t": 0.3}, 2, False, None),
    ("slerp", {"parallel_threshold": 0.5}, 2, True, None),  # the linear (1 - t) a + t b
    ("nuslerp", {}, 2, True, [1.0, 3.0]),
    ("nuslerp", {}, 2, False, [2.0, 1.0]),
    ("multislerp", {}, 3, True, [1.0, 2.0, 0.5]),
    ("multislerp", {"normalize_weights": False}, 3, False, [0.2, 0.3, 0.5]),
    ("multislerp", {}, 1, True, [1.0]),
    ("karcher", {}, 3, False, [1.0, 2.0, 0.5]),
    ("karcher", {}, 1, True, [1.0]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("method", "params", "n", "with_base", "weights"), GRAM_CASES)
def test_gram_kernels_equal_the_torch_engine_bit_for_bit(tmp_path, monkeypatch, method, params, n, with_base,
                                                         weights, dtype):
    """Model stock, SLERP, NuSLERP, Multi-SLERP and Karcher run on the numpy back-end by default and write the
    torch engine's output bit for bit: the one Gram rule (mergelab.ops.gram_matrix: the same dot of the same
    blocks, summed in block order; both engines' blocks made small and equal) gives the same coefficients,
    and the combination is the same float32 operations in the same order (several blocks, two threads)."""
    paths = _models(tmp_path, [dtype] * (n + 1), seed=11)
    spec = _plain_spec(method, paths, params, base=with_base, weights=weights)
    monkeypatch.setattr(blocks_mod, "BLOCK", 17)
    monkeypatch.setattr(numpy_engine, "BLOCK", 17)
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", "2")
    merge(spec, tmp_path / "torch", progress=False, engine="torch")
    spec.pop("device")  # the default: engine auto picks numpy
    assert merge(spec, tmp_path / "numpy", progress=False).record["engine"] == "numpy"
    a, b = load_state_dict(tmp_path / "torch"), load_state_dict(tmp_path / "numpy")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), name


@pytest.mark.parametrize(("method", "n", "with_base", "dtype"), [
    ("model_stock", 4, True, torch.bfloat16), ("karcher", 4, False, torch.bfloat16),
    ("multislerp", 5, False, torch.float32)])
def test_gram_kernels_one_call_dots_equal_the_torch_engine(tmp_path, monkeypatch, method, n, with_base, dtype):
    """At the real block size (2^18 entries) with 4 or more vectors the numpy kernels take a block's chunk
    dots in one np.vecdot call (ops.gram_partials of their 2-D row buffer); the output is still the torch
    engine's bit for bit, over two full blocks and a ragged one (two threads); float32 Multi-SLERP without a
    base combines the inputs as read (the pairwise path)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2 * (1 << 18) + 8192 + 5, generator=g, dtype=torch.float64)
    paths = []
    for i in range(n + 1):
        state = {"w": (base + (0.05 * torch.randn(base.shape, generator=g, dtype=torch.float64) if i else 0)).to(dtype)}
        paths.append(save_state_dict(state, tmp_path / f"m{i}.safetensors"))
    weights = None if method == "model_stock" else [1.0 + 0.25 * i for i in range(n)]
    spec = _plain_spec(method, paths, {}, base=with_base, weights=weights)
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", "2")
    merge(spec, tmp_path / "torch", progress=False, engine="torch")
    spec.pop("device")
    shapes: list[tuple[int, ...]] = []

    def spy(blocks):
        shapes.append(np.shape(blocks) if isinstance(blocks, np.ndarray) else (len(blocks),))
        return gram_matrix.gram_partials(blocks)

    monkeypatch.setattr(numpy_kernels, "gram_partials", spy)
    assert merge(spec, tmp_path / "numpy", progress=False).record["engine"] == "numpy"
    a, b = load_state_dict(tmp_path / "torch"), load_state_dict(tmp_path / "numpy")
    assert torch.equal(a["w"].view(-1).view(torch.uint8), b["w"].view(-1).view(torch.uint8))
    rows = dtype == torch.bfloat16 or with_base  # widened or task vectors: the 2-D row buffer
    assert sorted(shapes) == sorted([(n, 1 << 18)] * 2 + [(n, 8192 + 5)] if rows else [(n,)] * 3)


def test_gram_block_size_is_the_torch_operators_block_size():
    """The Gram rule sums per-block partials in block order, so both back-ends must cut the same blocks."""
    assert numpy_engine.BLOCK == blocks_mod.BLOCK


def test_gram_kernels_closed_form(tmp_path, monkeypatch):
    """Hand-built vectors whose Gram matrix is exact in any summation order: model stock of task vectors
    (1, 1, 0, 0) and (1, 0, 1, 0) (cos 1/2, ratio 2 * 0.5 / 1.5 = 2/3: theta_0 + 2/3 mean tau) and SLERP of
    orthogonal (1, 0) and (0, 1) at t = 0.5 (sin(pi/4) / sin(pi/2) each), repeated over several blocks."""
    monkeypatch.setattr(numpy_engine, "BLOCK", 6)
    reps = 5
    base = torch.tensor([0.5, -1.0, 2.0, 0.0] * reps)
    taus = [torch.tensor([1.0, 1.0, 0.0, 0.0] * reps), torch.tensor([1.0, 0.0, 1.0, 0.0] * reps)]
    paths = [save_state_dict({"w": t}, tmp_path / f"m{i}.safetensors")
             for i, t in enumerate([base, base + taus[0], base + taus[1]])]
    merge(_plain_spec("model_stock", paths), tmp_path / "ms", progress=False, engine="numpy")
    expected = base + (2.0 / 3.0) * (taus[0] + taus[1]) / 2
    torch.testing.assert_close(load_state_dict(tmp_path / "ms")["w"], expected, rtol=1e-6, atol=1e-6)
    ends = [torch.tensor([1.0, 0.0] * reps), torch.tensor([0.0, 1.0] * reps)]
    paths = [save_state_dict({"w": t}, tmp_path / f"s{i}.safetensors") for i, t in enumerate(ends)]
    merge(_plain_spec("slerp", paths), tmp_path / "slerp", progress=False, engine="numpy")
    c = math.sin(math.pi / 4)
    torch.testing.assert_close(load_state_dict(tmp_path / "slerp")["w"], c * ends[0] + c * ends[1],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_multislerp_of_cancelling_unit_vectors_is_a_clear_error(tmp_path, engine):
    """Three one-entry task vectors +1, -1, +1 at normalised weights 0.2, 0.5, 0.3: their unit vectors' weighted
    sum is exactly zero, so Multi-SLERP has no direction (mergekit raises too); the merge fails naming the
    tensor, a user error (MethodError), and leaves no output."""
    from mergelab.errors import MethodError

    paths = [save_state_dict({"s": torch.tensor([v]), "w": torch.full((2, 3), v)}, tmp_path / f"m{i}.safetensors")
             for i, v in enumerate([0.0, 1.0, -1.0, 1.0])]
    spec = _plain_spec("multislerp", paths, weights=[0.5, 1.25, 0.75])
    with pytest.raises(MethodError, match="tensor '(s|w)': multislerp: the weighted sum of the unit vectors is zero"):
        merge(spec, tmp_path / "out", progress=False, engine=engine)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_sum_closed_form_and_both_engines(tmp_path, monkeypatch, dtype):
    """weight_average with normalize: false (mergekit's linear without normalising) is sum_i w_i theta_i, each
    product rounded before it is added: the closed form in float32, and the torch engine's bits at any
    weights (several blocks, two threads)."""
    paths = _models(tmp_path, [dtype] * 4, seed=2)
    spec = _plain_spec("weight_average", paths, {"normalize": False}, weights=[0.5, -1.25, 2.0])
    monkeypatch.setattr(blocks_mod, "BLOCK", 17)
    monkeypatch.setattr(numpy_engine, "BLOCK", 17)
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", "2")
    merge(spec, tmp_path / "torch", progress=False, engine="torch")
    spec.pop("device")
    assert merge(spec, tmp_path / "numpy", progress=False).record["engine"] == "numpy"
    a, b = load_state_dict(tmp_path / "torch"), load_state_dict(tmp_path / "numpy")
    xs = [{k: v.float() for k, v in load_state_dict(p).items() if v.is_floating_point()} for p in paths[1:]]
    for name in SHAPES:
        assert torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), name
        expected = (xs[0][name] * 0.5 + xs[1][name] * -1.25) + xs[2][name] * 2.0
        assert torch.equal(b[name], expected.to(dtype)), name
