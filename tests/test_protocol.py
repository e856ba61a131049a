"""The evaluation protocol: BN statistics merged as the experts' mean, validation split, invalid rows."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab import merge
from mergelab.errors import SpecError
from mergelab.evaluation.protocol import STATISTICS_PATTERN, resolve_bn, statistics_overrides
from mergelab.experiments.comparison_table import ComparisonTable, MethodRow
from mergelab.report.convert import comparison_verdicts
from mergelab.report.text import comparison_text
from mergelab.tasks import TaskData, validation_split


def _write(path, running_var, weight):
    save_file({"layer.running_var": running_var, "layer.running_mean": running_var - 1.0, "layer.weight": weight},
              str(path))
    return path


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"lambda": 0.3}),
    ("ties", {"lambda": 1.7, "density": 0.2}),
    ("dare_linear", {"lambda": 0.9, "density": 0.5}),
    ("dare_ties", {"lambda": 0.9, "density": 0.5}),
    ("breadcrumbs", {"lambda": 0.5}),
])
def test_bn_statistics_are_the_experts_weighted_mean_for_every_data_free_method(tmp_path, method, params):
    # variances that shrink in every expert: task arithmetic at any lambda > 1/N extrapolates them; the
    # statistics overrides give the (weighted) mean of the experts' values instead, whatever lambda
    torch.manual_seed(0)
    base = _write(tmp_path / "base.safetensors", torch.full((64,), 1.0), torch.randn(64))
    variances = [torch.rand(64) * 0.2 + 0.01, torch.rand(64) * 0.5 + 0.01, torch.rand(64) * 0.9 + 0.01]
    weights = [1.0, 2.0, 1.0]
    experts = [_write(tmp_path / f"e{i}.safetensors", v, torch.randn(64)) for i, v in enumerate(variances)]
    spec = {"method": method, "base": str(base),
            "models": [{"path": str(p), "weight": w} for p, w in zip(experts, weights)],
            "parameters": params, "overrides": statistics_overrides(method, weights)}
    merge(spec, tmp_path / "out", progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    stacked = torch.stack(variances)
    # (TIES: the mean of the experts agreeing with the elected sign; every delta is negative here, so all)
    expected = (torch.tensor(weights)[:, None] * stacked).sum(0) / sum(weights)
    torch.testing.assert_close(out["layer.running_var"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["layer.running_mean"], expected - 1.0, rtol=1e-6, atol=1e-6)
    assert bool((out["layer.running_var"] > 0).all())


def test_ties_statistics_with_mixed_signs_are_a_convex_combination(tmp_path):
    base = _write(tmp_path / "base.safetensors", torch.tensor([1.0, 1.0]), torch.zeros(2))
    a = _write(tmp_path / "a.safetensors", torch.tensor([3.0, 0.5]), torch.zeros(2))
    b = _write(tmp_path / "b.safetensors", torch.tensor([0.2, 0.1]), torch.zeros(2))
    c = _write(tmp_path / "c.safetensors", torch.tensor([2.0, 0.4]), torch.zeros(2))
    spec = {"method": "ties", "base": str(base), "models": [str(a), str(b), str(c)],
            "parameters": {"lambda": 3.0}, "overrides": statistics_overrides("ties", [1, 1, 1])}
    merge(spec, tmp_path / "out", progress=False)
    var = load_file(str(tmp_path / "out" / "model.safetensors"))["layer.running_var"]
    # entry 0: deltas +2, -0.8, +1 -> sign +, mean of the agreeing experts' values (3 + 2) / 2
    # entry 1: deltas -0.5, -0.9, -0.6 -> sign -, mean of all three (0.5 + 0.1 + 0.4) / 3
    torch.testing.assert_close(var, torch.tensor([2.5, 1.0 / 3.0]))


def test_statistics_overrides_cover_only_statistics_and_known_methods():
    (o,) = statistics_overrides("task_arithmetic", [1.0, 1.0, 2.0])
    assert o == {"pattern": STATISTICS_PATTERN, "parameters": {"lambda": 0.25}}
    assert statistics_overrides("weight_average", [1.0]) == [] and statistics_overrides("slerp", [1.0]) == []
    assert statistics_overrides("task_arithmetic", [0.0]) == []


def test_bn_protocol_names_and_defaults():
    assert resolve_bn(None, "resnet_s") == "joint" and resolve_bn(True, "resnet_s") == "joint"
    assert resolve_bn(False, "resnet_s") == "merged" and resolve_bn("off", "resnet_s") == "merged"
    assert resolve_bn("per-task", "resnet_s") == "per_task"
    assert resolve_bn(None, "vit_s") == "none" and resolve_bn("joint", "vit_s") == "none"
    assert resolve_bn("none", "vit_s") == "none" and resolve_bn(resolve_bn(None, "resnet_s"), "resnet_s") == "joint"
    with pytest.raises(SpecError, match="has BatchNorm layers"):
        resolve_bn("none", "resnet_s")
    with pytest.raises(SpecError, match="bn must be one of merged, joint, per_task"):
        resolve_bn("sometimes", "resnet_s")


def _task(n_train=300, classes=3):
    y = torch.arange(n_train) % classes
    x = torch.arange(n_train, dtype=torch.float32)[:, None, None, None].expand(n_train, 1, 28, 28).contiguous()
    return TaskData("t", classes, x, y, -x[:50], y[:50], "test task")


def test_validation_split_is_a_fixed_stratified_sample_of_the_training_split():
    task = _task()
    x, y = validation_split(task)
    assert len(y) == 30 and torch.bincount(y).tolist() == [10, 10, 10]
    ids = x[:, 0, 0, 0]
    assert bool((ids >= 0).all())  # training images only (test images are negative here)
    x2, _ = validation_split(task)
    assert torch.equal(x, x2)
    assert len(validation_split(_task(n_train=30000))[1]) == 500
    with pytest.raises(SpecError, match="validation fraction"):
        validation_split(task, fraction=0.0)


def _row(name, avg, invalid=None):
    """Right on the first ``avg * 100`` of 100 test examples (paired tests need per-example results)."""
    from mergelab.evaluation.outcomes import pack_outcomes

    right = [i < round(100 * avg) for i in range(100)]
    return MethodRow(name, {"a": avg}, {"a": 1.0}, avg, avg, 0.0, math.nan, {}, invalid=invalid,
                     per_task_correct={"a": pack_outcomes(right)}, per_task_n={"a": 100})


def test_an_invalid_merge_never_agrees_with_a_paper():
    table = ComparisonTable("resnet_s", ["a"], [_row("task_arithmetic", 0.5), _row("ties", 0.9, "non-finite logits"),
                                                _row("adamerging", 0.7)],
                            {"protocol": "BN statistics kept as merged; each task's expert head", "select": "fixed"})
    verdicts = {v.claim: v for v in comparison_verdicts(table)}
    ties = verdicts["TIES beats task arithmetic"]
    assert ties.agrees is None and "invalid" in ties.measured
    assert verdicts["AdaMerging beats task arithmetic"].agrees is True  # 20 vs 0 discordant, the only comparison
    assert "Holm-adjusted p = 1.91e-06" in verdicts["AdaMerging beats task arithmetic"].measured  # 2 * 0.5^20
    assert "kept as merged" in verdicts["AdaMerging beats task arithmetic"].detail
    assert "INVALID: non-finite logits" in comparison_text(table)
