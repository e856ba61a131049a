"""Representation Surgery: identity at zero steps, L1 feature gap shrinks, rank-r shapes, files, evaluation.

That training shrinks the gap is tested on hand-built features where the first step's effect is known in
closed form; the tiny trained experts only serve properties that hold whatever training gave.
"""

from __future__ import annotations

import json

import pytest
import torch

from mergelab.merging import merge
from mergelab.errors import CheckpointError, NonFiniteError, SpecError
from mergelab.evaluation import evaluate
from mergelab.methods.data_informed.context import MergeContext
from mergelab.methods.data_informed.surgery import (
    SurgeryModule,
    apply_surgery,
    evaluate_with_surgery,
    load_surgery_modules,
    save_surgery_modules,
    train_surgery,
    train_surgery_module,
)
from mergelab.models import load_backbone_state, read_backbone_state
from mergelab.models.pretraining import PretrainConfig
from mergelab.spec import DataSpec
from tiny_zoo import pretrain_tiny
from mergelab.training import finetune

TASKS = ["mnist_parity", "mnist_rot90"]
ZOO_DIR = "tiny_zoo_adamerging_surgery"  # shared with tests/test_adamerging.py (same specs: cached the second time)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(pretrained folder, experts) of a tiny resnet_s zoo: 5 pretraining steps, 10 fine-tuning steps."""
    root = tmp_path_factory.getbasetemp() / ZOO_DIR
    pre = pretrain_tiny(root, PretrainConfig(steps=5, batch_size=16, lr=0.05), n=128)
    experts = [finetune(dict(task=t, steps=10, batch_size=16, data_ratio=0.05), root) for t in TASKS]
    return pre.path, experts


def _spec(zoo, parameters, method="surgery", **extra):
    pre, experts = zoo
    return {"method": method, "base": str(pre), "parameters": parameters,
            "models": [{"path": str(e.path)} for e in experts], **extra}


def _context(zoo, **data) -> MergeContext:
    pre, experts = zoo
    return MergeContext.from_spec(pre, [(e.path, 1.0) for e in experts], DataSpec(**data), torch.device("cpu"),
                                  progress=False)


def test_an_untrained_module_is_the_identity_and_has_rank_r_shapes():
    m = SurgeryModule(64, rank=16)
    assert m.down.weight.shape == (16, 64) and m.up.weight.shape == (64, 16)
    assert m.down.bias is None and m.up.bias is None
    assert torch.count_nonzero(m.up.weight) == 0 and torch.count_nonzero(m.down.weight) > 0
    z = torch.randn(5, 64)
    assert torch.equal(m(z), z)
    z_expert = torch.randn(5, 64)
    m0, before, after = train_surgery_module(z, z_expert, rank=4, steps=0)
    assert m0.rank == 4 and m0.dim == 64 and torch.equal(m0(z), z) and before == after


def test_forward_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    m = SurgeryModule(6, rank=3, generator=g)
    with torch.no_grad():
        m.up.weight.copy_(torch.randn(6, 3, generator=g))
    z = torch.randn(4, 6, generator=g)
    expected = z - torch.relu(z @ m.down.weight.T) @ m.up.weight.T
    assert torch.allclose(m(z), expected, atol=1e-6)


def test_zero_steps_leaves_backbone_and_features_unchanged(zoo, tmp_path):
    pre, experts = zoo
    ta = merge(_spec(zoo, {"lambda": 0.3}, method="task_arithmetic"), tmp_path / "ta", progress=False)
    out = merge(_spec(zoo, {"steps": 0, "modules_dir": str(tmp_path / "mods")}), tmp_path / "s", progress=False)
    expected, got = read_backbone_state(ta.out_dir), read_backbone_state(out.out_dir)
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    modules = load_surgery_modules(tmp_path / "mods")
    assert list(modules) == TASKS
    ctx = _context(zoo)
    backbone = ctx.build_backbone().eval()
    load_backbone_state(backbone, got)
    x = ctx.samples(TASKS[0], "test")[0][:16]
    with torch.no_grad():
        assert torch.equal(apply_surgery(backbone, modules, TASKS[0], x), backbone(x))
    plain = evaluate(out.out_dir, experts).by_task()
    with_surgery = evaluate_with_surgery(out.out_dir, tmp_path / "mods", experts)
    assert [t.task for t in with_surgery.tasks] == TASKS
    for row in with_surgery.tasks:
        assert row.accuracy == pytest.approx(plain[row.task].accuracy)
        assert row.loss == pytest.approx(plain[row.task].loss, rel=1e-5)
    side = json.loads((tmp_path / "mods" / "surgery.json").read_text())
    assert side["rank"] == 16 and side["steps"] == 0 and side["merged"].startswith("task_arithmetic")


def test_one_step_reduces_the_l1_feature_gap_by_a_known_amount():
    """By construction, no training outcome: features ``z`` of norm <= 1 in both signs, targets ``z + 1``, so
    the gap starts at exactly 1. With ``W_up = 0`` only ``W_up`` has a gradient, ``dL/dW_up[j, k] =
    mean_i h_ik / dim >= 0`` with ``h = ReLU(W_down z)`` (positive for every unit: each is active on ``z`` or
    ``-z``); Adam's first step is ``-lr`` on every entry, so the gap becomes ``1 - lr mean_i sum_k h_ik``.
    Kaiming-uniform rows of ``W_down`` have norm <= 1, so ``lr sum_k h_ik <= lr rank < 1``: the gap falls."""
    r = 1 / 2**0.5
    half = torch.tensor([[1.0, 0.0], [0.0, 1.0], [r, r], [r, -r]])
    z = torch.cat([half, -half])
    module, before, after = train_surgery_module(z, z + 1.0, rank=2, steps=1, lr=0.1)
    assert before == 1.0
    h = torch.relu(z @ module.down.weight.T)
    assert (h.sum(0) > 0).all()  # every unit is active on some example
    torch.testing.assert_close(module.up.weight, torch.full((2, 2), -0.1), rtol=1e-6, atol=0)
    assert after == pytest.approx(1.0 - 0.1 * h.sum(1).mean().item(), rel=1e-6)
    assert after < before


def test_surgery_report_gives_the_modules_l1_gaps(zoo):
    """On real (trained) experts, what holds whatever the training gave: one rank-8 module per task, and the
    report's gaps are the mean L1 distances between the expert's features and the merged backbone's features
    before and after its module (computed here independently)."""
    ctx = _context(zoo, samples_per_task=64, batch_size=32)
    merged = read_backbone_state(zoo[0])  # the pretrained backbone as a (badly) "merged" model
    modules, report = train_surgery(ctx, merged, rank=8, steps=20, lr=1e-2)
    assert set(modules) == set(TASKS)
    backbone = ctx.build_backbone().eval()
    load_backbone_state(backbone, merged)
    for i, t in enumerate(TASKS):
        expert = ctx.build_backbone().eval()
        load_backbone_state(expert, ctx.expert_state(i))
        x = ctx.samples(t, "test")[0]
        with torch.no_grad():
            z, target = backbone(x), expert(x)
            assert report.gap_before[t] == pytest.approx((z - target).abs().mean().item(), rel=1e-5)
            assert report.gap_after[t] == pytest.approx((modules[t](z) - target).abs().mean().item(), rel=1e-5)
        assert report.gap_before[t] > 0  # the experts were fine-tuned: their features moved
        assert modules[t].rank == 8 and modules[t].down.weight.shape == (8, 64)


def test_modules_round_trip_through_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    mods = {"a": SurgeryModule(10, 3, generator=g), "b": SurgeryModule(10, 2, generator=g)}
    with torch.no_grad():
        mods["a"].up.weight.normal_(generator=g)
    folder = save_surgery_modules(mods, tmp_path / "m", {"rank": 3})
    back = load_surgery_modules(folder)
    assert list(back) == ["a", "b"] and back["b"].rank == 2
    z = torch.randn(4, 10)
    assert torch.equal(back["a"](z), mods["a"](z))
    save_surgery_modules({"b": mods["b"]}, folder)  # a surgery folder is replaced as a whole
    assert list(load_surgery_modules(folder)) == ["b"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a surgery modules folder"):
        save_surgery_modules(mods, tmp_path / "other")
    with pytest.raises(CheckpointError, match="no surgery module for task"):
        load_surgery_modules(folder, ["a"])


def test_merged_path_and_errors(zoo, tmp_path):
    ta = merge(_spec(zoo, {"lambda": 0.5}, method="task_arithmetic"), tmp_path / "ta", progress=False)
    out = merge(_spec(zoo, {"merged": str(ta.out_dir), "steps": 0, "modules_dir": str(tmp_path / "m1")}),
                tmp_path / "s1", progress=False)
    expected, got = read_backbone_state(ta.out_dir), read_backbone_state(out.out_dir)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # a data-informed starting point, computed in memory on the same pool: AdaMerging at zero steps = TA 0.3
    ada = merge(_spec(zoo, {"from": "adamerging", "from_parameters": {"granularity": "task", "steps": 0},
                            "steps": 0, "modules_dir": str(tmp_path / "m0")}), tmp_path / "s0", progress=False)
    ta3 = merge(_spec(zoo, {"lambda": 0.3}, method="task_arithmetic"), tmp_path / "ta3", progress=False)
    got, expected = read_backbone_state(ada.out_dir), read_backbone_state(ta3.out_dir)
    assert all(torch.allclose(got[k], expected[k], rtol=1e-6, atol=1e-7) for k in expected)
    # without modules_dir the modules go next to the output, in <out>.surgery
    merge(_spec(zoo, {"steps": 0}), tmp_path / "x1", progress=False)
    assert any((tmp_path / "x1.surgery").glob("*.safetensors"))
    with pytest.raises(SpecError, match="either 'merged'.*or 'from'"):
        merge(_spec(zoo, {"merged": str(ta.out_dir), "from": "ties", "modules_dir": str(tmp_path / "m2")}),
              tmp_path / "x2", progress=False)
    with pytest.raises(SpecError, match="from: 'nope' is not a merging method"):
        merge(_spec(zoo, {"from": "nope", "modules_dir": str(tmp_path / "m3")}), tmp_path / "x3", progress=False)
    with pytest.raises(SpecError, match="from_parameters.*density"):
        merge(_spec(zoo, {"from": "ties", "from_parameters": {"density": 2.0}, "modules_dir": str(tmp_path / "m4")}),
              tmp_path / "x4", progress=False)
    with pytest.raises(SpecError, match="rank"):
        merge(_spec(zoo, {"rank": 0, "modules_dir": str(tmp_path / "m5")}), tmp_path / "x5", progress=False)
    with pytest.raises(SpecError, match="no surgery module for task 'mnist'"):
        apply_surgery(torch.nn.Identity(), {"a": SurgeryModule(4, 2)}, "mnist", torch.zeros(1, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1", "s0", "s1", "ta", "ta3", "x1", "x1.surgery"]


def test_non_finite_merged_features_are_refused(zoo):
    ctx = _context(zoo, samples_per_task=8)
    merged = read_backbone_state(zoo[0])
    merged["layer3.0.bn2.running_var"][0] = -1.0  # what task arithmetic with lambdas summing past 1 can produce
    with pytest.raises(NonFiniteError, match="non-finite features on task 'mnist_parity'.*layer3.0.bn2.running_var"):
        train_surgery(ctx, merged, steps=0)
