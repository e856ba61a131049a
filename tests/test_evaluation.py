"""Evaluation: per-task / joint / normalized accuracy, merged folders, probes, BN re-estimation, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mergelab.cli import main
from mergelab.errors import SpecError, TensorMismatchError
from mergelab.evaluation import evaluate, evaluate_classifier, reset_bn_statistics
from mergelab.evaluation.metrics import classifier_outputs
from mergelab.models import build_backbone, load_backbone_state, make_head, read_backbone_state
from mergelab.models.probe import extract_features, fit_linear_probe
from mergelab.models.pretraining import PretrainConfig
from mergelab.models.state import backbone_state
from mergelab.tasks import get_task
from tiny_zoo import pretrain_tiny
from mergelab.training import finetune

TASKS = ["mnist_parity", "mnist_rot90"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is as fast as two and immune to CPU oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(cache root, pretrained folder, two experts) with a tiny pretrained resnet_s."""
    root = tmp_path_factory.mktemp("zoo")
    pre = pretrain_tiny(root, PretrainConfig(steps=15, batch_size=32, lr=0.05))
    experts = [finetune(dict(task=t, steps=25, batch_size=32, data_ratio=0.1), root) for t in TASKS]
    return root, pre.path, experts


def test_an_expert_has_normalized_accuracy_one_on_its_own_task(zoo):
    _, _, experts = zoo
    e = experts[0]
    r = evaluate(e.path, [e])
    row = r.by_task()[e.task]
    assert r.arch == "resnet_s" and [t.task for t in r.tasks] == [e.task]
    assert row.accuracy == pytest.approx(e.test_metrics.accuracy)
    assert row.normalized_accuracy == pytest.approx(1.0) and r.mean_normalized_accuracy == pytest.approx(1.0)
    assert row.loss == pytest.approx(e.test_metrics.loss)


def test_joint_metrics_are_the_union_of_test_sets(zoo):
    _, pre_path, experts = zoo
    r = evaluate(pre_path, [e.path for e in experts])  # the pretrained backbone with each expert's head
    rows = r.tasks
    n = sum(t.n_test for t in rows)
    assert r.joint.n == n
    assert r.joint.accuracy == pytest.approx(sum(t.accuracy * t.n_test for t in rows) / n)
    assert r.joint.loss == pytest.approx(sum(t.loss * t.n_test for t in rows) / n)
    assert r.mean_accuracy == pytest.approx(sum(t.accuracy for t in rows) / len(rows))
    assert r.mean_normalized_accuracy == pytest.approx(sum(t.normalized_accuracy for t in rows) / len(rows))
    for t, e in zip(rows, experts):
        assert t.expert_accuracy == e.test_metrics.accuracy
        assert t.normalized_accuracy == pytest.approx(t.accuracy / e.test_metrics.accuracy)
    assert "joint (union)" in r.table() and "mnist_rot90" in r.table()


def test_a_merged_backbone_folder_evaluates_and_bn_can_be_reset(zoo, tmp_path):
    from mergelab.merging import merge

    _, pre_path, experts = zoo
    out = tmp_path / "merged"
    merge({"method": "weight_average", "models": [str(e.backbone_path) for e in experts]}, out, progress=False)
    plain = evaluate(out, experts)  # arch inferred from the tensors of the merged folder
    assert plain.arch == "resnet_s" and len(plain.tasks) == 2 and 0 <= plain.mean_accuracy <= 1
    reset = evaluate(out, experts, reset_bn=True, bn_batches=3)
    assert reset.reset_bn == "joint"
    # by construction, not by whether the accuracy happened to change: the joint reset is exactly the plain
    # evaluation of the folder's backbone with its BN statistics re-estimated by hand on the union of the
    # tasks' training inputs, and those statistics differ from the folder's (they are estimated from data)
    merged = read_backbone_state(out)
    model = build_backbone("resnet_s")
    load_backbone_state(model, merged)
    assert reset_bn_statistics(model, torch.cat([get_task(t).x_train for t in TASKS]), num_batches=3) > 0
    by_hand = {k: v for k, v in model.state_dict().items() if k in merged}
    assert not torch.equal(by_hand["stem.bn.running_mean"], merged["stem.bn.running_mean"])
    expected = evaluate(by_hand, experts)
    assert [(t.accuracy, t.loss) for t in reset.tasks] == [(t.accuracy, t.loss) for t in expected.tasks]
    per_task = evaluate(out, experts, reset_bn="per_task", bn_batches=3)
    assert per_task.reset_bn == "per_task"
    # per-task re-estimation of one task equals a joint re-estimation on that task alone
    alone = evaluate(out, experts, tasks=[experts[0].task], reset_bn="joint", bn_batches=3)
    assert per_task.tasks[0].accuracy == alone.tasks[0].accuracy
    with pytest.raises(SpecError, match="reset_bn must be"):
        evaluate(out, experts, reset_bn="sometimes")
    json.loads(reset.model_dump_json())


def test_probe_heads_need_no_experts(zoo):
    root, pre_path, _ = zoo
    r = evaluate(pre_path, heads="probe", tasks=["mnist_parity"], cache_dir=root)
    row = r.tasks[0]
    assert row.head == "linear probe" and row.expert_accuracy is None and r.mean_normalized_accuracy is None
    # the score is the linear probe fitted on the backbone's training features, applied to the test split
    # (computed here by hand); how well a probe does on these weak features is an accident of training
    model = build_backbone("resnet_s")
    load_backbone_state(model, read_backbone_state(pre_path))
    data = get_task("mnist_parity")
    head = fit_linear_probe(extract_features(model, data.x_train), data.y_train, data.num_classes)
    correct, losses = classifier_outputs(model, head, data.x_test, data.y_test)
    assert row.accuracy == correct.double().mean().item() and row.loss == losses.mean().item()


def test_evaluation_errors(zoo):
    root, pre_path, experts = zoo
    with pytest.raises(TensorMismatchError, match="does not match the backbone architecture"):
        evaluate(backbone_state(build_backbone("vit_s")), experts)
    with pytest.raises(SpecError, match="two experts for task"):
        evaluate(pre_path, [experts[0], experts[0]])
    with pytest.raises(SpecError, match="no cached default resnet_s expert.*mergelab zoo --arch resnet_s"):
        evaluate(pre_path, cache_dir=root, tasks=["mnist"])
    with pytest.raises(SpecError, match="no expert head for task"):
        evaluate(pre_path, experts, tasks=["mnist"])


def test_an_expert_scored_on_another_version_of_its_task_is_refused(zoo, tmp_path):
    import shutil

    _, _, experts = zoo
    stale = tmp_path / "stale"
    shutil.copytree(experts[0].path, stale)
    rec = json.loads((stale / "expert.json").read_text())
    (stale / "expert.json").write_text(json.dumps(dict(rec, test_fingerprint="0" * 16)))
    with pytest.raises(SpecError, match="another version of task 'mnist_parity'.*rebuild"):
        evaluate(stale, [stale])


def test_reset_bn_statistics_recomputes_running_moments():
    bn = nn.Sequential(nn.BatchNorm2d(3)).eval()
    x = torch.randn(64, 3, 4, 4) * 2 + 1
    assert reset_bn_statistics(bn, x, batch_size=16, num_batches=4) == 1
    assert torch.allclose(bn[0].running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert bn[0].momentum == 0.1 and not bn.training
    vit = build_backbone("vit_s")
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    assert reset_bn_statistics(vit, torch.randn(8, 1, 28, 28)) == 0
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


def test_evaluate_classifier_matches_a_manual_computation():
    torch.manual_seed(0)
    backbone, head = build_backbone("vit_s").eval(), make_head(64, 3)
    x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 3, (10,))
    m = evaluate_classifier(backbone, head, x, y, batch_size=4)
    logits = head(backbone(x))
    assert m.n == 10
    assert m.accuracy == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert m.loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def test_cli_evaluate_prints_a_table_and_writes_json(zoo, tmp_path, capsys):
    _, _, experts = zoo
    out = tmp_path / "eval.json"
    assert main(["evaluate", experts[1].path, "--experts", *[e.path for e in experts], "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert experts[1].task in text and "joint (union)" in text
    rec = json.loads(out.read_text())
    assert {t["task"] for t in rec["tasks"]} == set(TASKS)
    own = next(t for t in rec["tasks"] if t["task"] == experts[1].task)
    assert own["normalized_accuracy"] == pytest.approx(1.0)
    assert main(["evaluate", "/no/such/path", "--experts", experts[0].path]) == 1
    assert "no such file" in capsys.readouterr().err
