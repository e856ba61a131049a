"""Model zoo: architectures, backbone/head state files, linear probes, pretraining cache."""

from __future__ import annotations

import pytest
import torch

from mergelab.errors import NonFiniteError, SpecError, TensorMismatchError
from mergelab.models import (
    Classifier,
    build_backbone,
    fit_linear_probe,
    list_archs,
    load_backbone_state,
    load_head,
    make_head,
    read_backbone_state,
    save_backbone,
    save_head,
)
from mergelab.models.registry import infer_arch
from mergelab.models.state import backbone_state



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is as fast as two and immune to CPU oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ARCHS = ["resnet_s", "resnet_m", "resnet_l", "vit_s"]


def test_registry_lists_the_four_architectures():
    assert list_archs() == ARCHS
    with pytest.raises(SpecError, match="unknown architecture 'vgg'.*resnet_s"):
        build_backbone("vgg")


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes(arch):
    torch.manual_seed(0)
    backbone = build_backbone(arch)
    x = torch.randn(5, 1, 28, 28)
    feats = backbone(x)
    assert feats.shape == (5, backbone.feature_dim) == (5, 64)
    model = Classifier(backbone, make_head(backbone.feature_dim, 7))
    assert model(x).shape == (5, 7)
    model.eval()
    assert model(x[:1]).shape == (1, 7)  # batch of one in eval mode
    names = set(model.state_dict())
    assert any(n.startswith("backbone.") for n in names) and {"head.weight", "head.bias"} <= names


def test_depth_ordering_and_normalisation_layers():
    sizes = [sum(p.numel() for p in build_backbone(a).parameters()) for a in ("resnet_s", "resnet_m", "resnet_l")]
    assert sizes[0] < sizes[1] < sizes[2]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in build_backbone("resnet_s").modules())
    vit = build_backbone("vit_s")
    assert any(isinstance(m, torch.nn.LayerNorm) for m in vit.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in vit.modules())


def test_construction_is_deterministic_under_a_seed():
    torch.manual_seed(3)
    a = build_backbone("vit_s").state_dict()
    torch.manual_seed(3)
    b = build_backbone("vit_s").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_infer_arch_from_tensors(arch):
    assert infer_arch(backbone_state(build_backbone(arch))) == arch


def test_backbone_and_head_files_round_trip(tmp_path):
    torch.manual_seed(0)
    backbone, head = build_backbone("resnet_s"), make_head(64, 3)
    backbone.train()
    backbone(torch.randn(8, 1, 28, 28))  # move BN running stats away from their init
    save_backbone(backbone, tmp_path / "backbone.safetensors", {"arch": "resnet_s"})
    save_head(head, tmp_path / "head.safetensors")
    state = read_backbone_state(tmp_path)  # the folder resolves to backbone.safetensors
    assert not any(k.endswith("num_batches_tracked") for k in state)
    assert "layer1.0.bn1.running_mean" in state
    fresh = build_backbone("resnet_s")
    load_backbone_state(fresh, state, source="test")
    for k, v in backbone.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(fresh.state_dict()[k], v), k
    h2 = load_head(tmp_path, feature_dim=64)
    assert torch.equal(h2.weight, head.weight) and torch.equal(h2.bias, head.bias)
    # prefixed single-file states (``backbone.*`` / ``head.*``) load too
    prefixed = {f"backbone.{k}": v for k, v in state.items()} | {"head.weight": h2.weight, "head.bias": h2.bias}
    load_backbone_state(build_backbone("resnet_s"), prefixed)


def test_backbone_state_errors_name_the_tensor():
    state = backbone_state(build_backbone("resnet_s"))
    with pytest.raises(TensorMismatchError, match="src.*missing 1 tensor.*stem.conv.weight"):
        load_backbone_state(build_backbone("resnet_s"), {k: v for k, v in state.items() if k != "stem.conv.weight"}, "src")
    bad = dict(state, **{"stem.conv.weight": torch.zeros(3, 3)})
    with pytest.raises(TensorMismatchError, match="'stem.conv.weight' has shape"):
        load_backbone_state(build_backbone("resnet_s"), bad)
    nan = dict(state, **{"stem.bn.weight": torch.full_like(state["stem.bn.weight"], float("nan"))})
    with pytest.raises(NonFiniteError, match="stem.bn.weight"):
        load_backbone_state(build_backbone("resnet_s"), nan)
    with pytest.raises(TensorMismatchError, match="unexpected"):
        load_backbone_state(build_backbone("resnet_s"), backbone_state(build_backbone("vit_s")))


def test_half_precision_backbone_loads_into_float32():
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in backbone_state(build_backbone("vit_s")).items()}
    m = build_backbone("vit_s")
    load_backbone_state(m, state)
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_linear_probe_fits_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(400) % 4
    f = centers[y] + torch.randn(400, 16, generator=g) + 5.0  # offset: the probe standardises internally
    head = fit_linear_probe(f, y, 4)
    assert head.weight.shape == (4, 16)
    assert (head(f).argmax(1) == y).float().mean() > 0.97
    again = fit_linear_probe(f, y, 4)
    assert torch.equal(again.weight, head.weight)  # deterministic


def test_pretrain_caches_and_replaces_on_new_config(tmp_path, monkeypatch):
    import mergelab.tasks
    from mergelab.evaluation.metrics import evaluate_classifier
    from mergelab.models.pretraining import PretrainConfig, load_pretrained_backbone, pretrain, read_pretrained
    from tiny_zoo import tiny_pool

    monkeypatch.setattr(mergelab.tasks, "pretraining_pool", tiny_pool)
    cfg = PretrainConfig(steps=15, batch_size=32, lr=0.05)
    r1 = pretrain("resnet_s", tmp_path, cfg)
    assert (tmp_path / "zoo/resnet_s/pretrained/backbone.safetensors").is_file()
    assert r1.num_classes == 4 and r1.n_train == 192
    # the recorded pool metrics are those of the saved weights (not a training outcome: a consistency check)
    pool = tiny_pool()
    backbone, _ = load_pretrained_backbone("resnet_s", tmp_path)
    m = evaluate_classifier(backbone, load_head(tmp_path / "zoo/resnet_s/pretrained"), pool.x_test, pool.y_test)
    assert m.accuracy == r1.test_metrics["accuracy"] and m.loss == pytest.approx(r1.test_metrics["loss"], rel=1e-6)
    assert read_pretrained("resnet_s", tmp_path).pretrained_id == r1.pretrained_id

    def boom(*a, **k):
        raise AssertionError("should not retrain")

    monkeypatch.setattr("mergelab.models.pretraining.run_steps", boom)
    assert pretrain("resnet_s", tmp_path, cfg).pretrained_id == r1.pretrained_id  # cached
    monkeypatch.undo()
    monkeypatch.setattr(mergelab.tasks, "pretraining_pool", tiny_pool)
    r2 = pretrain("resnet_s", tmp_path, cfg.model_copy(update={"steps": 5}))
    assert r2.pretrained_id != r1.pretrained_id
    backbone, record = load_pretrained_backbone("resnet_s", tmp_path)
    assert record.pretrained_id == r2.pretrained_id and backbone.feature_dim == 64
    assert not list((tmp_path / "zoo/resnet_s").glob(".*"))  # no staging leftovers


def test_pretrained_id_carries_a_digest_of_the_weights_and_a_mixed_folder_is_refused(tmp_path):
    import shutil

    from mergelab.errors import CheckpointError
    from mergelab.models.pretraining import PretrainConfig, config_id, load_pretrained_backbone, weights_digest
    from tiny_zoo import pretrain_tiny

    cfg = PretrainConfig(steps=3, batch_size=32, lr=0.05)
    r = pretrain_tiny(tmp_path / "a", cfg)
    cid, digest = r.pretrained_id.split("-")
    assert cid == config_id("resnet_s", cfg) and r.weights_sha256.startswith(digest) and len(digest) == 12
    assert r.weights_sha256 == weights_digest(read_backbone_state(tmp_path / "a/zoo/resnet_s/pretrained"))
    assert r.threads == r.config.threads == 1 and r.is_current()
    # an explicit thread count is another config (it trains other weights)
    assert config_id("resnet_s", cfg.model_copy(update={"threads": 2})) != cid
    # the same config with other weights (here another pool; another machine's torch alike): same config id,
    # another pretrained id, so nothing keyed by the id can mix the two backbones
    other = pretrain_tiny(tmp_path / "b", cfg, seed=1)
    assert other.pretrained_id.split("-")[0] == cid and other.pretrained_id != r.pretrained_id
    shutil.copy(tmp_path / "b/zoo/resnet_s/pretrained/backbone.safetensors", tmp_path / "a/zoo/resnet_s/pretrained")
    with pytest.raises(CheckpointError, match="not the backbone its record"):
        load_pretrained_backbone("resnet_s", tmp_path / "a")


def test_an_older_pretraining_record_is_pretrained_again_with_its_config(tmp_path, monkeypatch):
    import json

    import mergelab.tasks
    from mergelab.models.pretraining import PretrainConfig, ensure_pretrained, read_pretrained
    from tiny_zoo import pretrain_tiny, tiny_pool

    cfg = PretrainConfig(steps=3, batch_size=32, lr=0.05)
    r = pretrain_tiny(tmp_path, cfg)
    sidecar = tmp_path / "zoo/resnet_s/pretrained/pretrained.json"
    rec = json.loads(sidecar.read_text())
    del rec["weights_sha256"], rec["threads"], rec["config"]["threads"]
    sidecar.write_text(json.dumps(dict(rec, pretrained_id=rec["pretrained_id"].split("-")[0])))  # as format 1 wrote
    assert not read_pretrained("resnet_s", tmp_path).is_current()
    monkeypatch.setattr(mergelab.tasks, "pretraining_pool", tiny_pool)
    again = ensure_pretrained("resnet_s", tmp_path)
    assert again.is_current() and again.config == cfg
    assert again.pretrained_id == r.pretrained_id  # its config, pinned threads: the same weights again
    assert ensure_pretrained("resnet_s", tmp_path).wall_time_s == again.wall_time_s  # now current: reused
