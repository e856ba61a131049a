"""The numpy engine (task arithmetic and weight averaging without torch): closed-form references, equality
with the torch engine, engine selection and its errors, and that a CLI merge never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergelab import numpy_engine
from mergelab.checkpoints import load_state_dict, save_state_dict
from mergelab.errors import SpecError
from mergelab.merging import merge
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
    assert "task_arithmetic, weight_average and ties, not dare_linear" in why
    assert numpy_engine.unsupported(parse_spec(_spec("ties", paths, parameters={"trim_scope": "tensor"}))) is None
    assert numpy_engine.unsupported(parse_spec(_spec("ties", paths, parameters={"density": 1.0}))) is None
    why = numpy_engine.unsupported(parse_spec(_spec("ties", paths)))  # the paper's whole-model trim
    assert "parameters ask for trim_scope: global" in why
    spec = _spec("ties", paths, parameters={"trim_scope": "tensor"},
                 overrides=[{"pattern": "w", "parameters": {"trim_scope": "global"}}])
    assert "overrides ('w') ask for trim_scope: global" in numpy_engine.unsupported(parse_spec(spec))
    assert "device: cpu" in numpy_engine.unsupported(parse_spec(_spec("task_arithmetic", paths, device="auto")))
    # auto falls back to torch for what numpy cannot run
    assert merge(_spec("ties", paths), tmp_path / "t", progress=False).record["engine"] == "torch"
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


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_cli_merge_does_not_import_torch(tmp_path, method):
    """The numpy engine's point: `mergelab merge` of task arithmetic or TIES never pays for `import torch`."""
    paths = _models(tmp_path, [torch.bfloat16] * 3)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(method, paths, parameters={"trim_scope": "tensor"}
                                              if method == "ties" else {})))
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
