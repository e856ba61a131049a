"""``mergelab analyze`` with data: the theory, (derived) bound, trends, landscape and CKA sections on tiny experts.

A tiny zoo (a few pretraining and fine-tuning steps on a synthetic pool and small data ratios) in a temporary
cache root; the analysis runs on small samples. Checks are on what the report says, that its numbers are the
library's formulas applied to the measured quantities, and on clear errors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mergelab.analysis.bound import BoundConstants, BoundExpert, BoundPool, chi2_divergence, evaluate_bound, schedule_moments
from mergelab.analysis.bound_predictions import DEFAULT_FACTORS, predict_trends, recommend, typical_expert
from mergelab.analysis.bound_constants import load_constants
from mergelab.analysis.merge_coefficients import merge_coefficients
from mergelab.checkpoints import save_state_dict
from mergelab.cli import main
from mergelab.errors import SpecError
from mergelab.models.pretraining import PretrainConfig
from tiny_zoo import pretrain_tiny
from mergelab.training import finetune


def keyed(doc: dict) -> dict:
    """The sections of a ``report.json`` by key."""
    return {s["key"]: s for s in doc["sections"]}


PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(cache root, pretrained folder, three experts); the third trains for fewer steps (a nonzero chi^2)."""
    root = tmp_path_factory.mktemp("zoo")
    pre = pretrain_tiny(root, PretrainConfig(steps=4, batch_size=16, lr=0.05), n=128)
    experts = [
        finetune(dict(task="digits", steps=6, batch_size=16, data_ratio=0.1), root),
        finetune(dict(task="digits_invert", steps=6, batch_size=16, data_ratio=0.1), root),
        finetune(dict(task="mnist_parity", steps=3, batch_size=16, data_ratio=0.05), root),
    ]
    return root, Path(pre.path), experts


def _write_spec(folder: Path, base: Path, models: list, extra: str = "", method: str = "task_arithmetic",
                params: str = "  lambda: 0.3\n") -> Path:
    lines = [f"method: {method}", f"base: {base}", "models:"] + [f"  - {m}" for m in models]
    text = "\n".join(lines) + f"\nparameters:\n{params}" + extra
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "spec.yaml"
    spec.write_text(text)
    return spec


FAST = ["--no-progress", "--hessian-iters", "3", "--grid", "5"]


@pytest.fixture(scope="module")
def analysed(zoo, tmp_path_factory):
    """One analysis with data (run once, inspected by several tests)."""
    _, pre, experts = zoo
    folder = tmp_path_factory.mktemp("analysis")
    spec = _write_spec(folder, pre, [e.path for e in experts],
                       "data:\n  samples_per_task: 16\n  seed: 1\nanalysis:\n  barrier: true\n")
    out = folder / "out"
    assert main(["analyze", str(spec), "-o", str(out), *FAST]) == 0
    return out, json.loads((out / "report.json").read_text()), experts


def test_analyze_with_data_writes_the_new_sections_and_plots(analysed, capsys):
    out, rep, experts = analysed
    assert list(keyed(rep)) == ["diagnostics", "operators", "expected_ranking", "theory", "bound", "trends",
                                     "landscape", "cka"]
    for name in ("theory.png", "bound.png", "trends.png", "interpolation.png", "ta_path.png", "cka.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    assert {i["file"] for i in keyed(rep)["landscape"]["images"]} == {"interpolation.png", "ta_path.png"}
    assert rep["config"]["spec_sections_not_analysed"] == ["analysis"]  # data was analysed
    md = (out / "report.md").read_text()
    for title in ("## Theory quantities at theta_0", "## Stability bound (derived)",
                  "## Predicted trends and recommendation (derived)", "## Loss landscape", "## Linear CKA"):
        assert title in md

    theory = keyed(rep)["theory"]["data"]
    assert [e["task"] for e in theory["experts"]] == [e.task for e in experts]
    for row, e in zip(theory["experts"], experts):
        assert row["n"] == e.n_train and row["n_used"] == 16
        assert row["sigma2"] > 0 and row["init_loss"] > 0 and row["L"] > 0 and row["delta2"] >= 0
        ns = row["noise_scale_sidecar"]
        assert ns["proxy"] == pytest.approx(e.spec.lr / (e.spec.batch_size * (1 - e.spec.momentum)))
        nm = row["noise_scale_measured"]
        assert nm["T"] == pytest.approx(nm["proxy"] * nm["trace_sigma"])
    # D = sum_i p_i delta_i^2 with p_i = n_i / n
    p = np.array([e.n_train for e in experts], dtype=float)
    p /= p.sum()
    d2 = np.array([r["delta2"] for r in theory["experts"]])
    assert theory["pool"]["heterogeneity"]["mean_delta2"] == pytest.approx(float(p @ d2))
    assert theory["pool"]["smoothness"] == pytest.approx(max(r["L"] for r in theory["experts"]))


def _reported_pool(rep: dict, experts: list) -> BoundPool:
    """The analysed pool rebuilt from the report's measured quantities and the experts' sidecars (task
    arithmetic, lambda 0.3, as the spec says)."""
    theory = keyed(rep)["theory"]["data"]
    bes = []
    for e, row in zip(experts, theory["experts"]):
        m1, m2 = schedule_moments(e.spec.steps, e.spec.schedule, e.spec.warmup_frac, e.spec.decay_frac, e.spec.min_lr_ratio)
        bes.append(BoundExpert(row["label"], e.spec.lr, e.spec.steps, e.spec.batch_size, e.n_train, row["sigma2"],
                               row["delta2"], row["init_loss"], e.spec.momentum, "sgd", m1, m2,
                               data_ratio=e.spec.data_ratio))
    return BoundPool(tuple(bes), theory["pool"]["smoothness"], "task_arithmetic", 0.3)


def test_bound_section_is_derived_and_is_the_formula_on_the_measured_quantities(analysed):
    _, rep, experts = analysed
    sec = keyed(rep)["bound"]
    assert "derived" in sec["title"].lower() and sec["data"]["form"] == "derived"
    assert sec["data"]["constants"]["calibrated"] is False
    assert sec["data"]["constants"]["c_opt"] == 1.0 and "not calibrated" in sec["data"]["constants"]["note"]
    theory = keyed(rep)["theory"]["data"]
    b = sec["data"]["bound"]
    # task arithmetic with lambda 0.3 and unit weights: alpha_i = 0.3
    assert b["alphas"] == pytest.approx([0.3, 0.3, 0.3])
    # rebuild the pool from the reported numbers and the sidecars: the same bound
    pool = _reported_pool(rep, experts)
    bes = pool.experts
    ref = evaluate_bound(pool)
    assert b["bound"] == pytest.approx(ref.bound, rel=1e-9) and b["gen"] == pytest.approx(ref.gen, rel=1e-9)
    # chi^2(alpha || w) by hand: w_i proportional to a_i eta_i K_i m1_i; the third expert trained fewer steps
    s1 = np.array([be.eta() * be.steps * be.lr_factor_mean for be in bes])
    w = s1 / s1.sum()
    assert b["weights"] == pytest.approx(w.tolist())
    assert sec["data"]["chi2"] == pytest.approx(chi2_divergence([1 / 3] * 3, w)) and sec["data"]["chi2"] > 0
    flags = sec["data"]["validity"]
    assert [f["expert"] for f in flags] == [r["label"] for r in theory["experts"]]
    for f in flags:
        assert f["valid"] == (f["eta_L_K"] <= 1.0)


def test_trends_cover_the_five_hyperparameters_and_recommend(analysed):
    """The trends and the recommendation are the formula's on the measured quantities. The bound's shape in
    eta or K is an outcome of those quantities (opt_init ~ 1/sqrt(eta K) against the stability term: a U when
    the initial-loss term dominates, test_bound's case), so it is checked against predict_trends on the rebuilt
    pool; what holds for any measurement is asserted as such: eps^2 ~ eta^2 K rises in eta and K, and scaling
    every expert's n leaves opt unchanged (p_i = n_i / n) while gen falls with eps^2 ~ 1/n."""
    _, rep, experts = analysed
    data = keyed(rep)["trends"]["data"]
    assert data["form"] == "derived"
    assert set(data["trends"]) == {"K", "eta", "b", "n", "N"}
    for hp, t in data["trends"].items():
        assert t["form"] == "derived" and len(t["bound"]) == len(t["factors"]) >= 3
        assert t["shape"] in ("increasing", "decreasing", "flat", "U", "inverted-U", "non-monotone"), hp
    pool = _reported_pool(rep, experts)
    ref = predict_trends(pool, hyperparameters=["K", "eta", "b", "n"])
    for hp, t in ref.items():
        got = data["trends"][hp]
        assert got["factors"] == pytest.approx(list(t.factors)) and got["bound"] == pytest.approx(list(t.bound), rel=1e-9)
        assert got["shape"] == t.shape and got["term_shapes"] == t.term_shapes, hp
    assert data["trends"]["eta"]["term_shapes"]["eps2"] == "increasing"
    assert data["trends"]["K"]["term_shapes"]["eps2"] == "increasing"
    assert data["trends"]["n"]["shape"] == "decreasing" and data["trends"]["n"]["term_shapes"]["opt"] == "flat"
    rec = data["recommendation"]
    assert rec["form"] == "derived" and set(rec["recommended"]) == {"lr", "steps", "batch_size", "data_ratio"}
    expected = recommend(pool)
    assert rec["bound_before"] == pytest.approx(expected.bound_before, rel=1e-9)
    assert rec["bound_after"] == pytest.approx(expected.bound_after, rel=1e-9)
    assert rec["factors"] == pytest.approx(expected.factors) and rec["recommended"] == pytest.approx(expected.recommended)
    # the search is a minimum over a grid that holds the unchanged setting (all factors 1) with all the data
    target = typical_expert(pool)
    unchanged = pool.with_experts([*pool.experts, target.scaled("n", 1 / min(1.0, target.data_ratio))])
    assert 1.0 in DEFAULT_FACTORS and rec["bound_after"] <= evaluate_bound(unchanged).bound * (1 + 1e-12)


def test_landscape_and_cka_sections(analysed):
    _, rep, experts = analysed
    land = keyed(rep)["landscape"]["data"]
    interp = land["interpolation"]
    assert interp["endpoints"] == [experts[0].task, experts[1].task]
    assert set(interp["curves"]) == {experts[0].task, experts[1].task}
    assert 0.5 in interp["alphas"] and interp["alphas"][0] == 0 and interp["alphas"][-1] == 1
    for t, s in interp["summary"].items():
        assert s["loss_barrier"] is None or s["loss_barrier"] >= 0
    ta = land["task_arithmetic"]
    assert set(ta["curves"]) == {e.task for e in experts}
    assert any(math.isclose(a, 1 / 3) for a in ta["alphas"])  # the simple average is on the grid
    cka = keyed(rep)["cka"]["data"]
    assert cka["lambda"] == 0.3 and cka["batch"]["n"] == 16 * 3
    for row in cka["experts"]:
        assert 0.0 <= row["cka_merge"] <= 1.0 + 1e-9 and 0.0 <= row["cka_base"] <= 1.0 + 1e-9


def test_with_data_flag_uses_default_data_settings(zoo, tmp_path, capsys):
    _, pre, experts = zoo
    spec = _write_spec(tmp_path, pre, [experts[0].path, Path(experts[1].path) / "backbone.safetensors"],
                       method="weight_average", params="  {}\n")
    out = tmp_path / "out"
    assert main(["analyze", str(spec), "-o", str(out), "--with-data", "--samples", "8", "--no-landscape",
                 "--no-cka", "--no-plots", "--hessian-iters", "2"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert {"theory", "bound", "trends"} <= set(keyed(rep)) and "landscape" not in keyed(rep)
    assert keyed(rep)["bound"]["data"]["bound"]["alphas"] == pytest.approx([0.5, 0.5])
    assert "(derived) bound" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ errors
def _plain_pool(folder: Path) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        paths.append(save_state_dict({"w": torch.randn(4, generator=g)}, folder / f"m{i}.safetensors"))
    return paths


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("task", "no expert in the pool for task(s) mnist_rot90"),
        ("bad_field", "data.samples: unknown field"),
        ("not_experts", "not expert folder(s)"),
        ("mixed", "not expert folder(s)"),
        ("constants", "has no 'c_stab'"),
        ("stale", "another version of task 'digits' (the task's data changed"),
    ],
)
def test_clear_errors(zoo, tmp_path, capsys, case, message):
    _, pre, experts = zoo
    models = [e.path for e in experts[:2]]
    extra, flags = "data:\n  samples_per_task: 8\n", []
    if case == "task":
        extra = "data:\n  tasks: [digits, mnist_rot90]\n"
    elif case == "bad_field":
        extra = "data:\n  samples: 8\n"
    elif case == "not_experts":
        models, extra, flags = _plain_pool(tmp_path), "", ["--with-data"]
        pre = models[0]
    elif case == "mixed":
        models = [experts[0].path, _plain_pool(tmp_path)[0]]
    elif case == "stale":  # an expert whose recorded data fingerprint no longer matches its task
        stale = tmp_path / "stale"
        shutil.copytree(experts[0].path, stale)
        side = json.loads((stale / "expert.json").read_text())
        side["train_fingerprint"] = "0" * 16
        (stale / "expert.json").write_text(json.dumps(side))
        models = [stale, experts[1].path]
    elif case == "constants":
        (tmp_path / "c.json").write_text(json.dumps({"c_opt": 1.0}))
        flags = ["--constants", str(tmp_path / "c.json")]
    spec = _write_spec(tmp_path / "s", pre, models, extra)
    out = tmp_path / "out"
    assert main(["analyze", str(spec), "-o", str(out), *FAST, *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mergelab analyze: error:") and message in err, err
    assert not out.exists()


def test_data_section_with_plain_checkpoints_is_set_aside(tmp_path, capsys):
    models = _plain_pool(tmp_path)
    spec = _write_spec(tmp_path / "s", models[0], models, "data:\n  samples_per_task: 8\n")
    assert main(["analyze", str(spec), "-o", str(tmp_path / "out"), "--no-progress", "--no-plots"]) == 0
    assert "section 'data' set aside" in capsys.readouterr().out
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "theory" not in keyed(rep) and rep["config"]["spec_sections_not_analysed"] == ["data"]


def test_merge_coefficients_and_constants_file(tmp_path):
    c = merge_coefficients("task_arithmetic", {"lambda": 0.3}, [1, 1])
    assert c.alphas == pytest.approx((0.3, 0.3)) and c.rule == "task_arithmetic" and c.lam == pytest.approx(0.3)
    c = merge_coefficients("weight_average", {}, [1, 3])
    assert c.alphas == pytest.approx((0.25, 0.75)) and c.rule == "weighted"
    c = merge_coefficients("ties", {"lambda": 1.0}, [1, 1, 1, 1])
    assert c.alphas == pytest.approx((0.25,) * 4) and c.rule == "mean"
    c = merge_coefficients("fw_soft", {}, [1, 1])
    assert c.alphas == pytest.approx((0.5, 0.5)) and "data-informed" in c.note
    assert load_constants(None).calibrated is False
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"format": "mergelab-bound-constants/1", "c_opt": 0.5, "c_stab": 2e-3, "floor": 0.1,
                             "n_pools": 12, "test_spearman": 0.4}))
    lc = load_constants(f)
    assert (lc.c_opt, lc.c_stab, lc.floor, lc.calibrated) == (0.5, 2e-3, 0.1, True)
    assert lc.constants == BoundConstants(0.5, 2e-3) and "held-out Spearman 0.4" in lc.note
    f.write_text(json.dumps({"constants": {"c_opt": 1, "c_stab": 2}}))
    assert load_constants(f).c_stab == 2.0
    for bad in ({"c_opt": -1, "c_stab": 1}, {"c_opt": 0, "c_stab": 0}, [1, 2]):
        f.write_text(json.dumps(bad))
        with pytest.raises(SpecError):
            load_constants(f)
    f.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_constants(f)


def test_expert_pool_without_data_section_stays_data_free(zoo, tmp_path):
    _, pre, experts = zoo
    spec = _write_spec(tmp_path, pre, [e.path for e in experts[:2]])
    assert main(["analyze", str(spec), "-o", str(tmp_path / "out"), "--no-progress", "--no-plots"]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(keyed(rep)) == ["diagnostics", "operators", "expected_ranking"]
    spec = _write_spec(tmp_path, pre, [e.path for e in experts[:2]], "data:\n  samples_per_task: 8\n")
    assert main(["analyze", str(spec), "-o", str(tmp_path / "out2"), "--no-progress", "--no-plots", "--no-data"]) == 0
    assert "theory" not in keyed(json.loads((tmp_path / "out2" / "report.json").read_text()))

