"""Expert fine-tuning: schedules, sampling, spec validation, cache, sidecar, data ratio, branching, CLI, zoo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import mergelab.tasks
from mergelab.cli import main
from mergelab.errors import SpecError
from mergelab.models.pretraining import PretrainConfig
from mergelab.models.state import read_backbone_state
from tiny_zoo import pretrain_tiny
from mergelab.training import ExpertSpec, branch_spec, build_zoo, finetune, load_expert, make_spec, read_expert
from mergelab.training.sampler import BatchSampler
from mergelab.training.loop import LoopSettings
from mergelab.training.schedule import lr_factor



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is as fast as two and immune to CPU oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TASK = "mnist_rot90"
BASE = dict(task=TASK, arch="resnet_s", steps=30, batch_size=32, data_ratio=0.2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache root holding a tiny pretrained resnet_s (15 steps on a synthetic pool)."""
    root = tmp_path_factory.mktemp("zoo")
    pretrain_tiny(root, PretrainConfig(steps=15, batch_size=32, lr=0.05))
    return root


def _same_weights(a, b) -> bool:
    sa, sb = read_backbone_state(a), read_backbone_state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------ pure pieces
def test_schedules():
    assert lr_factor(0, 100, "constant") == 1.0
    assert lr_factor(0, 100, "cosine") == 1.0
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    assert [lr_factor(t, 100, "cosine", warmup_frac=0.1) for t in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    wsd = [lr_factor(t, 100, "wsd", decay_frac=0.2) for t in range(100)]
    assert wsd[:80] == [1.0] * 80 and wsd[80] == pytest.approx(0.95) and wsd[99] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(wsd, wsd[1:]))


def test_wsd_sqrt_schedule_is_the_one_minus_sqrt_cooldown():
    """``wsd_sqrt``: stable at 1, then ``m + (1 - m) (1 - sqrt(p))`` with ``p = (t - start + 1) / D``."""
    steps, start, d, m = 100, 80, 20, 0.1
    got = [lr_factor(t, steps, "wsd_sqrt", decay_frac=0.2, min_lr_ratio=m) for t in range(steps)]
    assert got[:start] == [1.0] * start
    for t in range(start, steps):
        assert got[t] == pytest.approx(m + (1 - m) * (1 - math.sqrt((t - start + 1) / d)), abs=1e-15)
    assert got[84] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)))  # a quarter of the way: 1 - 1/2
    assert got[-1] == pytest.approx(m)
    linear = [lr_factor(t, steps, "wsd", decay_frac=0.2, min_lr_ratio=m) for t in range(steps)]
    # the square-root cooldown falls faster at first and lies below the linear one everywhere inside the decay
    assert all(s < lin for s, lin in zip(got[start:-1], linear[start:-1])) and got[-1] == pytest.approx(linear[-1])
    with pytest.raises(ValueError, match="unknown schedule 'wsd-sqrt'; known: constant, cosine, wsd, wsd_sqrt"):
        lr_factor(0, 10, "wsd-sqrt")


def test_branch_spec_decay_shape():
    parent = make_spec(task="digits", steps=8, schedule="constant", checkpoint_every=4)
    assert branch_spec(parent, 4, 1, 4).schedule == "wsd"
    child = branch_spec(parent, 4, 1, 4, decay="sqrt")
    assert (child.schedule, child.decay_frac, child.steps) == ("wsd_sqrt", 0.5, 8)
    settings = LoopSettings(lr=0.2, steps=child.steps, batch_size=8, seed=1, schedule=child.schedule,
                            decay_frac=child.decay_frac)
    assert [settings.lr_at(t) for t in range(4, 8)] == pytest.approx([0.2 * (1 - math.sqrt(k / 4)) for k in (1, 2, 3, 4)])
    with pytest.raises(SpecError, match="decay must be 'linear' or 'sqrt', got 'cosine'"):
        branch_spec(parent, 4, 1, 4, decay="cosine")


def test_sampler_is_a_pure_function_of_seed_and_step():
    s = BatchSampler(10, 4, seed=1)
    first_epochs = torch.cat([s.indices(t) for t in range(5)])  # 20 positions = 2 epochs
    assert sorted(first_epochs[:10].tolist()) == list(range(10)) and sorted(first_epochs[10:].tolist()) == list(range(10))
    assert torch.equal(BatchSampler(10, 4, seed=1).indices(3), s.indices(3))  # fresh sampler, same batch
    assert not torch.equal(BatchSampler(10, 4, seed=2).indices(0), s.indices(0))


# ------------------------------------------------------------------------------------------ the spec
def test_spec_defaults_are_resolved_and_hashed():
    s = make_spec(task=TASK)
    assert (s.arch, s.optimizer, s.lr, s.momentum, s.weight_decay) == ("resnet_s", "sgd", 0.05, 0.9, 5e-4)
    v = make_spec(task=TASK, arch="vit_s")
    assert (v.optimizer, v.lr, v.weight_decay) == ("adamw", 1e-3, 0.01)
    assert make_spec(task=TASK, optimizer="adam").lr == 1e-3
    assert s.spec_hash() == make_spec(s.canonical()).spec_hash() == ExpertSpec(**s.canonical()).spec_hash()
    assert s.spec_hash() != make_spec(task=TASK, seed=1).spec_hash()
    assert s.noise_scale() == pytest.approx(0.05 / (64 * 0.1))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(task="no_such_task"), r"task: unknown task 'no_such_task'; known: mnist"),
        (dict(task=TASK, lr=-0.1), r"lr: Input should be greater than 0 \(got -0.1\)"),
        (dict(task=TASK, lr=0), r"lr: Input should be greater than 0"),
        (dict(task=TASK, lr=float("inf")), r"lr: Input should be a finite number"),
        (dict(task=TASK, data_ratio=0), r"data_ratio: Input should be greater than 0"),
        (dict(task=TASK, data_ratio=1.5), r"data_ratio: Input should be less than or equal to 1"),
        (dict(task=TASK, batch_size=0), r"batch_size: Input should be greater than or equal to 1"),
        (dict(task=TASK, momentum=1.0), r"momentum: Input should be less than 1"),
        (dict(task=TASK, arch="vgg"), r"arch: unknown architecture 'vgg'"),
        (dict(task=TASK, optimizer="lion"), r"optimizer: Input should be 'sgd', 'adam' or 'adamw'"),
        (dict(task=TASK, schedule="step"), r"schedule: Input should be"),
        (dict(task=TASK, learning_rate=0.1), r"learning_rate: Extra inputs are not permitted"),
        (dict(task=TASK, steps=10, branch_from={"parent": "abc", "step": 10}), r"branch_from.step \(10\) must be < steps"),
    ],
)
def test_bad_specs_fail_with_a_clear_message(fields, message):
    with pytest.raises(SpecError, match=message):
        make_spec(fields)
    with pytest.raises(SpecError, match="invalid expert spec"):
        ExpertSpec(**fields)


# ------------------------------------------------------------------------------------------ fine-tuning
def test_the_sidecar_records_the_saved_expert_and_round_trips(cache):
    """Only what holds by construction: no margin over the pretrained model (a training outcome)."""
    from mergelab.evaluation.metrics import evaluate_classifier
    from mergelab.training import load_expert_model

    r = finetune(dict(BASE, steps=20), cache)
    assert not r.cached
    assert len(r.loss_curve) == 20 and r.wall_time_s > 0 and r.versions["torch"] == torch.__version__
    assert all(math.isfinite(v) for v in r.loss_curve) and r.threads == 1
    backbone, head, _ = load_expert_model(r.path)  # the recorded metrics are those of the saved weights
    data = mergelab.tasks.get_task(TASK)
    m = evaluate_classifier(backbone, head, data.x_test, data.y_test)
    assert m.accuracy == r.test_metrics.accuracy and m.loss == pytest.approx(r.test_metrics.loss, rel=1e-6)
    assert not _same_weights(r.backbone_path, cache / "zoo/resnet_s/pretrained")  # 20 SGD steps moved it
    assert r.noise_scale.value == pytest.approx(0.05 / (32 * 0.1)) and r.noise_scale.beta_source == "sgd momentum"
    sidecar = json.loads((r.backbone_path.parent / "expert.json").read_text())
    assert sidecar["spec"] == r.spec.canonical() and sidecar["spec_hash"] == r.spec_hash
    back = read_expert(r.path)
    assert back.model_dump(exclude={"cached"}) == r.model_dump(exclude={"cached"})


def test_identical_spec_reuses_the_cache(cache, monkeypatch):
    first = finetune(dict(BASE, steps=5), cache)

    def no_training(*a, **k):
        raise AssertionError("retrained a cached expert")

    monkeypatch.setattr("mergelab.training.finetuning.run_steps", no_training)
    again = finetune(make_spec(dict(BASE, steps=5)), cache)
    assert again.cached and again.spec_hash == first.spec_hash and again.path == first.path
    assert again.wall_time_s == first.wall_time_s  # the recorded time of the original run


def test_a_cached_expert_is_retrained_when_its_task_data_changed(cache):
    first = finetune(dict(BASE, steps=4), cache)
    assert first.train_fingerprint and first.test_fingerprint
    sidecar = first.backbone_path.parent / "expert.json"
    rec = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(rec, train_fingerprint="0" * 16)))  # as if the task had changed
    again = finetune(dict(BASE, steps=4), cache)
    assert not again.cached and again.train_fingerprint == first.train_fingerprint
    assert finetune(dict(BASE, steps=4), cache).cached


def test_data_ratio_really_subsets(cache):
    full = mergelab.tasks.get_task(TASK).n_train
    r = finetune(dict(BASE, steps=3, data_ratio=0.05), cache)
    assert r.n_train == round(0.05 * full) < full
    assert json.loads((r.backbone_path.parent / "expert.json").read_text())["n_train"] == r.n_train


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_branching_from_a_checkpoint_resumes_exactly(cache, optimizer):
    spec = dict(BASE, steps=12, optimizer=optimizer, augment=True, checkpoint_every=6, seed=3)
    parent = finetune(spec, cache)
    assert parent.checkpoints == [6, 12]
    assert (parent.checkpoint_dir(6) / "optimizer.pt").is_file()
    child = finetune(dict(spec, checkpoint_every=0, branch_from={"parent": parent.spec_hash, "step": 6}), cache)
    assert child.parent.step == 6 and child.loss_curve_start == 6
    assert child.loss_curve == parent.loss_curve[6:]
    assert _same_weights(child.backbone_path, parent.backbone_path)
    assert _same_weights(child.head_path, parent.head_path)
    by_path = finetune(dict(spec, checkpoint_every=0, branch_from={"parent": parent.path, "step": 6}), cache)
    assert by_path.cached and by_path.spec_hash == child.spec_hash  # a path pins to the parent's hash


def test_bifurcation_children_decay_from_the_branch_point(cache):
    parent = finetune(dict(BASE, steps=10, schedule="constant", checkpoint_every=5), cache)
    a = branch_spec(parent, step=5, seed=1, decay_steps=4)
    b = branch_spec(parent, step=5, seed=2, decay_steps=4)
    assert (a.steps, a.schedule, a.branch_from.step) == (9, "wsd", 5)
    assert [lr_factor(t, a.steps, a.schedule, a.warmup_frac, a.decay_frac) for t in range(5, 9)] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    ra, rb = finetune(a, cache), finetune(b, cache)
    assert ra.spec_hash != rb.spec_hash and not _same_weights(ra.backbone_path, rb.backbone_path)
    out = cache / "child.json"
    assert main(["finetune", "--branch-from", f"{parent.spec_hash}@5", "--seed", "7", "--decay-steps", "4",
                 "--no-progress", "--cache-dir", str(cache), "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["spec"]["steps"] == 9 and rec["spec"]["schedule"] == "wsd" and rec["spec"]["seed"] == 7
    assert rec["parent"]["spec_hash"] == parent.spec_hash and rec["loss_curve_start"] == 5
    with pytest.raises(SpecError, match="no checkpoint at step 3; available: \\[5, 10\\]"):
        finetune(dict(BASE, steps=10, schedule="constant", branch_from={"parent": parent.spec_hash, "step": 3}), cache)
    with pytest.raises(SpecError, match="optimizer='sgd'.*optimizer='adam'"):
        finetune(dict(BASE, steps=10, optimizer="adam", branch_from={"parent": parent.path, "step": 5}), cache)
    with pytest.raises(SpecError, match="neither an expert folder nor the spec hash"):
        finetune(dict(BASE, steps=10, branch_from={"parent": "0123456789abcdef", "step": 5}), cache)


# ------------------------------------------------------------------------------------------ CLI and zoo
def test_cli_finetune_from_flags_and_spec_file(cache, tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(f"task: {TASK}\nsteps: 4\nbatch_size: 32\ndata_ratio: 0.1\nhead_init: zero\n")
    out_json = tmp_path / "expert.json"
    assert main(["finetune", str(spec_file), "--lr", "0.02", "--threads", "1", "--no-progress", "--cache-dir", str(cache),
                 "--json", str(out_json)]) == 0
    rec = json.loads(out_json.read_text())
    assert rec["spec"]["lr"] == 0.02 and rec["spec"]["head_init"] == "zero" and rec["spec"]["steps"] == 4
    assert rec["spec"]["threads"] == rec["threads"] == 1  # --threads is a spec field, recorded
    assert load_expert(rec["path"]).spec_hash == rec["spec_hash"]
    assert "test acc" in capsys.readouterr().out
    assert main(["finetune", "--task", TASK, "--lr", "-1", "--cache-dir", str(cache)]) == 1
    assert "lr: Input should be greater than 0" in capsys.readouterr().err
    assert main(["finetune", "--task", "nope", "--cache-dir", str(cache)]) == 1
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_zoo_builds_in_parallel_and_reuses_the_cache(cache):
    tasks = ["mnist_parity", "mnist_ge5"]
    z = build_zoo("resnet_s", tasks, cache, workers=2, overrides=dict(steps=3, batch_size=16, data_ratio=0.05), progress=False)
    assert [r.task for r in z.experts] == tasks and z.trained == 2 and not z.failures
    z2 = build_zoo("resnet_s", tasks, cache, workers=2, overrides=dict(steps=3, batch_size=16, data_ratio=0.05), progress=False)
    assert z2.trained == 0 and all(r.cached for r in z2.experts)


def test_divergence_is_a_clear_error_and_leaves_no_expert(cache, monkeypatch):
    """The loss turns NaN at step 3 by construction (a poisoned loss), not by hoping a large lr diverges."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from mergelab.training.finetuning import expert_path
    from mergelab.training.loop import TrainingDivergedError

    calls = []

    def poisoned(logits, target):
        calls.append(1)
        loss = F.cross_entropy(logits, target)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr("mergelab.training.loop.F", SimpleNamespace(cross_entropy=poisoned))  # the loop's loss only
    spec = dict(BASE, steps=6, head_init="random")
    with pytest.raises(TrainingDivergedError, match="at step 2 .*lower the learning rate"):
        finetune(spec, cache)
    assert not expert_path(spec, cache).exists()


def test_training_is_bit_identical_whatever_the_callers_thread_count(tmp_path):
    """Pretraining, fine-tuning, a branch and multi-task training pin torch's intra-op threads
    (mergelab.runtime.TRAINING_THREADS): the same specs trained under 1 and under 2 caller threads give the same
    bytes (by construction), the runs record the pinned count, and the caller's settings are restored."""
    from safetensors.torch import load_file

    from mergelab.runtime import TRAINING_THREADS
    from mergelab.training.multitask import MultitaskSpec, train_multitask

    before = torch.get_num_threads()
    weights, ids = [], []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            root = tmp_path / f"t{threads}"
            pre = pretrain_tiny(root, PretrainConfig(steps=6, batch_size=32, lr=0.05))
            assert torch.get_num_threads() == threads and pre.threads == TRAINING_THREADS
            spec = dict(task="mnist", steps=4, batch_size=32, data_ratio=0.05, checkpoint_every=2)
            expert = finetune(spec, root)
            assert torch.get_num_threads() == threads and expert.threads == TRAINING_THREADS
            branch = finetune(dict(spec, seed=1, checkpoint_every=0, branch_from={"parent": expert.spec_hash, "step": 2}),
                              root)
            mtl = train_multitask(MultitaskSpec(tasks=["mnist"], head_init="experts",
                                                head_experts={"mnist": expert.spec_hash}, steps=2, batch_size=8), root)
            assert torch.get_num_threads() == threads and mtl.threads == TRAINING_THREADS
            assert not torch.are_deterministic_algorithms_enabled()  # restored too
            weights.append([load_file(str(Path(p) / "backbone.safetensors"))
                            for p in (pre.path, expert.path, branch.path, mtl.path)])
            ids.append((pre.pretrained_id, expert.spec_hash, mtl.spec_hash))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*weights):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ids[0] == ids[1] and len(ids[0][0].split("-")) == 2  # config id - weights digest


def test_an_explicit_thread_count_is_recorded_and_hashed(cache):
    spec = make_spec(dict(BASE, steps=2))
    assert spec.threads == 1 and make_spec(spec.canonical(), threads=2).spec_hash() != spec.spec_hash()
    before = torch.get_num_threads()
    r = finetune(dict(BASE, steps=2, head_init="zero", threads=2), cache)  # zero head: no probe on 2 threads
    assert r.spec.threads == 2 and r.threads == 2 and torch.get_num_threads() == before
    with pytest.raises(SpecError, match="threads: Input should be greater than or equal to 1"):
        make_spec(dict(BASE, threads=0))


def test_an_expert_of_another_backbone_with_the_same_config_is_stale(tmp_path):
    """The pretrained id carries a digest of the weights: the same config pretrained to other weights (here
    another pool; another machine alike) makes the cached expert stale, so it is retrained."""
    cfg = PretrainConfig(steps=3, batch_size=32, lr=0.05)
    first_pre = pretrain_tiny(tmp_path, cfg)
    spec = dict(BASE, steps=2, data_ratio=0.05)
    first = finetune(spec, tmp_path)
    assert first.pretrained_id == first_pre.pretrained_id and finetune(spec, tmp_path).cached
    other = pretrain_tiny(tmp_path, cfg, seed=1, force=True)
    assert other.pretrained_id.split("-")[0] == first_pre.pretrained_id.split("-")[0]  # one config id
    again = finetune(spec, tmp_path)
    assert not again.cached and again.pretrained_id == other.pretrained_id != first.pretrained_id


# ------------------------------------------------------------------------------------------ frozen shared heads
def test_frozen_heads_are_the_tasks_probe_shared_by_every_expert_and_never_updated(cache, tmp_path):
    from mergelab.models.state import read_head_state
    from mergelab.training import default_spec, frozen_head

    a = finetune(dict(BASE, steps=6, head_mode="frozen", checkpoint_every=3), cache)
    # another lr, seed, data subset and a weight decay that would visibly shrink a head in the optimizer
    b = finetune(dict(BASE, steps=4, head_mode="frozen", lr=0.01, seed=5, data_ratio=0.1, weight_decay=0.5), cache)
    ha, hb, h0 = read_head_state(a.head_path), read_head_state(b.head_path), frozen_head(TASK, "resnet_s", cache)
    assert all(torch.equal(ha[k], hb[k]) and torch.equal(ha[k], getattr(h0, k).detach()) for k in ("weight", "bias"))
    assert not _same_weights(a.backbone_path, b.backbone_path)  # the backbones did train
    assert a.spec.head_mode == "frozen" and default_spec(TASK, head_mode="frozen").head_mode == "frozen"
    # a branch of a frozen parent keeps the head and resumes exactly; a trained-head branch of it is refused
    child = finetune(dict(BASE, steps=6, head_mode="frozen", branch_from={"parent": a.spec_hash, "step": 3}), cache)
    assert _same_weights(child.backbone_path, a.backbone_path) and _same_weights(child.head_path, a.head_path)
    with pytest.raises(SpecError, match="head_mode='frozen'.*head_mode='trained'"):
        finetune(dict(BASE, steps=6, branch_from={"parent": a.spec_hash, "step": 3}), cache)
    with pytest.raises(SpecError, match="head_mode 'frozen' keeps the task's probe head: it needs head_init 'probe'"):
        make_spec(dict(BASE, head_mode="frozen", head_init="zero"))
    out = tmp_path / "frozen.json"
    assert main(["finetune", "--task", TASK, "--steps", "2", "--batch-size", "32", "--data-ratio", "0.05",
                 "--head-mode", "frozen", "--no-progress", "--cache-dir", str(cache), "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["spec"]["head_mode"] == "frozen" and _same_weights(Path(rec["path"]) / "head.safetensors", a.head_path)
