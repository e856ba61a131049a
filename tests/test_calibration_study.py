"""``mergelab calibrate``: pools, real merges, bound features, fit, outputs, and the constants round trip into analyze.

Runs end to end on a tiny zoo (a few pretraining and fine-tuning steps) in a temporary cache root.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mergelab.analysis.bound import evaluate_bound
from mergelab.analysis.calibration_study import (
    StudyConfig,
    discover_experts,
    draw_pools,
    expert_measurements,
    parse_size_range,
    pool_bound,
)
from mergelab.cli import main
from mergelab.errors import SpecError
from mergelab.evaluation import evaluate
from mergelab.models.pretraining import PretrainConfig
from mergelab.models.state import read_backbone_state
from tiny_zoo import pretrain_tiny
from mergelab.training import finetune


def keyed(doc: dict) -> dict:
    """The sections of a ``report.json`` by key."""
    return {s["key"]: s for s in doc["sections"]}

TASKS = ("digits", "digits_invert", "mnist_parity")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    pre = pretrain_tiny(root, PretrainConfig(steps=4, batch_size=16, lr=0.05), n=128, seed=1)
    experts = [finetune(dict(task=t, steps=5, batch_size=16, data_ratio=0.05), root) for t in TASKS]
    return root, Path(pre.path), experts


@pytest.fixture(scope="module")
def study(zoo, tmp_path_factory):
    root, _, _ = zoo
    out = tmp_path_factory.mktemp("calib") / "run"
    argv = ["calibrate", "--cache-dir", str(root), "--pools", "4", "--pool-size", "2..3", "--holdout", "0.25",
            "--samples", "12", "--hessian-iters", "2", "--repeats", "3", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return out, json.loads((out / "calibration.json").read_text())


def test_study_runs_end_to_end_and_writes_its_files(study, zoo):
    out, rep = study
    _, _, experts = zoo
    for name in ("constants.json", "calibration.json", "calibration.md", "calibration.png"):
        assert (out / name).is_file(), name
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep["form"] == "derived" and len(rep["pools"]) == 4  # all distinct pools of 2..3 among 3 experts
    assert sorted(tuple(sorted(p["members"])) for p in rep["pools"]) == sorted(
        [tuple(sorted(c)) for c in (TASKS[:2], TASKS[::2], TASKS[1:], TASKS)])
    assert [p["split"] for p in rep["pools"]].count("test") == 1
    for p in rep["pools"]:
        assert math.isfinite(p["measured_loss"]) and p["opt"] > 0 and p["gen"] >= 0
        assert p["raw_bound"] == pytest.approx(p["opt"] + p["gen"])
    cal = rep["calibration"]
    assert cal["form"] == "derived" and cal["n_train"] == 3 and cal["n_test"] == 1
    assert cal["constants"]["c_opt"] >= 0 and cal["constants"]["c_stab"] >= 0
    assert set(rep["baselines"]["test"]) >= {"calibrated_bound", "raw_bound", "pool_size_N"}
    md = (out / "calibration.md").read_text()
    assert "Held-out ranking" in md and "uncalibrated bound (baseline)" in md
    # one measurement cache file per expert
    assert len(list((out / "measurements").glob("*.pt"))) == len(experts)


def test_measured_loss_is_the_real_average_merge(study, zoo):
    """The study's loss for the full pool equals evaluating the in-memory average of the experts."""
    _, rep = study
    _, pre, experts = zoo
    pool = next(p for p in rep["pools"] if p["size"] == 3)
    states = [read_backbone_state(e.path) for e in experts]
    avg = {k: (sum(s[k].double() for s in states) / 3).to(states[0][k].dtype) if states[0][k].is_floating_point()
           else read_backbone_state(pre)[k] for k in states[0]}
    r = evaluate(avg, experts)
    assert pool["measured_loss"] == pytest.approx(np.mean([t.loss for t in r.tasks]), rel=1e-5)
    assert pool["measured_accuracy"] == pytest.approx(r.mean_accuracy)


def test_features_are_the_bound_on_cached_measurements(study, zoo):
    out, rep = study
    root, pre, experts = zoo
    cfg = StudyConfig(pools=4, min_size=2, max_size=3, samples=12, hessian_iters=2)
    inits, fresh = expert_measurements(pre, experts, cfg, out / "measurements")
    assert fresh == 0  # all read from the study's cache
    pool = next(p for p in rep["pools"] if p["size"] == 3)
    order = [next(i for i, e in enumerate(experts) if e.task == t) for t in pool["members"]]
    b = evaluate_bound(pool_bound([inits[i] for i in order], [experts[i] for i in order]))
    assert (b.opt, b.gen) == (pytest.approx(pool["opt"]), pytest.approx(pool["gen"]))


def test_constants_round_trip_into_analyze(study, zoo, tmp_path):
    out, rep = study
    _, pre, experts = zoo
    consts = json.loads((out / "constants.json").read_text())
    assert consts["format"] == "mergelab-bound-constants/1" and consts["form"] == "derived"
    assert consts["c_opt"] == rep["calibration"]["constants"]["c_opt"] and consts["n_pools"] == 4
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"method: weight_average\nbase: {pre}\nmodels:\n" + "".join(f"  - {e.path}\n" for e in experts[:2])
                    + "data:\n  samples_per_task: 8\n")
    res = tmp_path / "rep"
    assert main(["analyze", str(spec), "-o", str(res), "--constants", str(out / "constants.json"), "--no-progress",
                 "--no-plots", "--no-landscape", "--no-cka", "--hessian-iters", "2"]) == 0
    sec = keyed(json.loads((res / "report.json").read_text()))["bound"]["data"]
    c = sec["constants"]
    assert c["calibrated"] is True and c["c_opt"] == consts["c_opt"] and c["c_stab"] == consts["c_stab"]
    b = sec["bound"]
    assert b["bound"] == pytest.approx(consts["c_opt"] * b["opt"] + consts["c_stab"] * b["gen"])
    assert sec["predicted_loss"] == pytest.approx(b["bound"] + consts["floor"])


def test_pools_and_size_ranges():
    pools = draw_pools(10, 12, 2, 6, seed=3)
    assert len(pools) == 12 and len(set(pools)) == 12
    assert all(2 <= len(p) <= 6 and list(p) == sorted(set(p)) for p in pools)
    assert pools == draw_pools(10, 12, 2, 6, seed=3) and pools != draw_pools(10, 12, 2, 6, seed=4)
    assert sorted(draw_pools(3, 12, 2, 6)) == [(0, 1), (0, 1, 2), (0, 2), (1, 2)]  # all that exist
    with pytest.raises(SpecError, match="exceeds"):
        draw_pools(3, 4, 4, 5)
    assert parse_size_range("2..6") == (2, 6) and parse_size_range("3") == (3, 3) and parse_size_range("2-4") == (2, 4)
    for bad in ("6..2", "x", "0..3"):
        with pytest.raises(SpecError):
            parse_size_range(bad)
    with pytest.raises(SpecError, match="at least 3 pools"):
        StudyConfig(pools=2)


def test_clear_errors_without_a_zoo(tmp_path, capsys, zoo):
    assert main(["calibrate", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "no pretrained resnet_s backbone" in capsys.readouterr().err
    root, _, _ = zoo
    with pytest.raises(SpecError, match="no cached resnet_s expert for task"):
        discover_experts("resnet_s", root, tasks=["digits", "mnist_rot90"])
    assert main(["calibrate", "--cache-dir", str(root), "--pool-size", "4..5", "--out", str(tmp_path / "o2"),
                 "--no-progress"]) == 1
    assert "needs at least 4" in capsys.readouterr().err


def test_refuses_to_write_into_an_expert_folder(tmp_path, capsys, zoo):
    root, _, experts = zoo
    target = Path(experts[0].path) / "calibration"
    before = sorted(p.name for p in Path(experts[0].path).iterdir())
    assert main(["calibrate", "--cache-dir", str(root), "--pools", "4", "--pool-size", "2..3", "--out", str(target),
                 "--no-progress"]) == 1
    assert f"--out {target}: refusing to write there: it lies inside that input's folder" in capsys.readouterr().err
    assert sorted(p.name for p in Path(experts[0].path).iterdir()) == before
