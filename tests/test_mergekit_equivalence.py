"""Optional: mergelab's data-free merges equal mergekit's on tiny Llama models, with the semantics matched.

mergekit is not a mergelab dependency. These tests run when either

* ``MERGELAB_MERGEKIT_YAML`` names a ``mergekit-yaml`` executable (e.g. one in a separate venv:
  ``MERGELAB_MERGEKIT_YAML=.venv-mergekit/bin/mergekit-yaml pytest tests/test_mergekit_equivalence.py``), or
* ``mergekit`` is importable in the test interpreter (it is then run as ``python -m mergekit.scripts.run_yaml``);

otherwise the module is skipped at collection (no model is built, nothing slow runs).

Semantics matched (see DESIGN.md, "name the semantics that differ between libraries"):

* ``linear`` (mergekit, ``normalize: true`` by default) == ``weight_average``: ``sum_i w_i theta_i / sum_i w_i``;
* ``task_arithmetic`` with ``normalize: false`` == ``task_arithmetic``: ``theta_0 + lambda sum_i w_i tau_i``;
* ``ties`` (mergekit trims each tensor, elects the sign of ``sum_i w_i tau_i`` and divides by the agreeing
  weights) == ``ties`` with ``trim_scope: tensor``, ``sign_election: mass``, ``disjoint_divisor: weight``.
  mergekit elects +1 on an exact tie and mergelab 0, and mergekit keeps exactly ``floor(density * n)`` entries
  where mergelab keeps every entry tied with the threshold; neither happens with random float32 values.
  Weights are positive here: with a negative weight the two differ (mergekit tests the sign of ``w_i tau_i``
  against the elected sign, mergelab the sign of ``tau_i``), about half the entries on these models.

Everything is float32 in and out, so the results agree to float32 rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_ENV = "MERGELAB_MERGEKIT_YAML"

if os.environ.get(_ENV):
    _EXE = Path(os.environ[_ENV])
    if not _EXE.exists():
        pytest.skip(f"{_ENV}={_EXE} does not exist", allow_module_level=True)
    MERGEKIT_CMD = [str(_EXE)]
else:
    pytest.importorskip("mergekit", reason=f"mergekit is not installed (or set {_ENV}=/path/to/mergekit-yaml)")
    MERGEKIT_CMD = [sys.executable, "-m", "mergekit.scripts.run_yaml"]

import torch  # noqa: E402
import yaml  # noqa: E402

from mergelab.checkpoints import load_state_dict, save_state_dict  # noqa: E402
from mergelab.merging import merge  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 16, 32, 32, 2

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": 1,
    "num_attention_heads": HEADS,
    "num_key_value_heads": HEADS,
    "head_dim": HIDDEN // HEADS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def _shapes() -> dict[str, tuple[int, ...]]:
    p = "model.layers.0."
    return {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        p + "input_layernorm.weight": (HIDDEN,),
        p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        p + "post_attention_layernorm.weight": (HIDDEN,),
        p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }


def _save(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_state_dict(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny float32 Llama base and three fine-tuned variants (base + noise of varied sizes)."""
    root = tmp_path_factory.mktemp("mergekit_models")
    gen = torch.Generator().manual_seed(1234)
    base = {}
    for name, shape in _shapes().items():
        t = torch.randn(shape, generator=gen) * 0.02
        base[name] = t + 1.0 if len(shape) == 1 else t
    out = {"base": _save(root / "base", base)}
    for i, noise in enumerate((0.01, 0.02, 0.005), start=1):
        out[f"ft{i}"] = _save(
            root / f"ft{i}",
            {n: t + torch.randn(t.shape, generator=gen) * noise for n, t in base.items()},
        )
    return out


def _run_mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    cfg = out.parent / f"{out.name}.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [*MERGEKIT_CMD, str(cfg), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, f"mergekit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return load_state_dict(out)


def _run_mergelab(spec: dict, out: Path) -> dict[str, torch.Tensor]:
    merge(spec, out, progress=False, hash_inputs=False)
    return load_state_dict(out)


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs), (sorted(set(ours) ^ set(theirs)))
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype == torch.float32, name
        torch.testing.assert_close(t, theirs[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def _mk_models(models: dict[str, Path], names: list[str], params: list[dict]) -> list[dict]:
    return [{"model": str(models[n]), "parameters": p} for n, p in zip(names, params)]


WEIGHTS = [0.3, 0.7, 1.25]
EXPERTS = ["ft1", "ft2", "ft3"]


def test_linear_equals_weight_average(models: dict[str, Path], tmp_path: Path) -> None:
    theirs = _run_mergekit(
        {
            "merge_method": "linear",  # normalize: true by default
            "models": _mk_models(models, EXPERTS, [{"weight": w} for w in WEIGHTS]),
            "dtype": "float32",
            "out_dtype": "float32",
        },
        tmp_path / "mergekit",
    )
    ours = _run_mergelab(
        {
            "method": "weight_average",
            "models": [{"path": str(models[n]), "weight": w} for n, w in zip(EXPERTS, WEIGHTS)],
            "dtype": "float32",
        },
        tmp_path / "mergelab",
    )
    _assert_same(ours, theirs)


def test_task_arithmetic(models: dict[str, Path], tmp_path: Path) -> None:
    theirs = _run_mergekit(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(models["base"]),
            "models": _mk_models(models, EXPERTS, [{"weight": w} for w in WEIGHTS]),
            "parameters": {"normalize": False, "lambda": 0.8},
            "dtype": "float32",
            "out_dtype": "float32",
        },
        tmp_path / "mergekit",
    )
    ours = _run_mergelab(
        {
            "method": "task_arithmetic",
            "base": str(models["base"]),
            "models": [{"path": str(models[n]), "weight": w} for n, w in zip(EXPERTS, WEIGHTS)],
            "parameters": {"lambda": 0.8},
            "dtype": "float32",
        },
        tmp_path / "mergelab",
    )
    _assert_same(ours, theirs)


@pytest.mark.parametrize("density", [0.5, 0.3])
def test_ties_per_tensor_weight_divisor(models: dict[str, Path], tmp_path: Path, density: float) -> None:
    theirs = _run_mergekit(
        {
            "merge_method": "ties",
            "base_model": str(models["base"]),
            "models": _mk_models(models, EXPERTS, [{"weight": w, "density": density} for w in WEIGHTS]),
            "parameters": {"normalize": True, "lambda": 1.0},
            "dtype": "float32",
            "out_dtype": "float32",
        },
        tmp_path / "mergekit",
    )
    ours = _run_mergelab(
        {
            "method": "ties",
            "base": str(models["base"]),
            "models": [{"path": str(models[n]), "weight": w} for n, w in zip(EXPERTS, WEIGHTS)],
            "parameters": {
                "density": density,
                "lambda": 1.0,
                "trim_scope": "tensor",
                "sign_election": "mass",
                "disjoint_divisor": "weight",
            },
            "dtype": "float32",
        },
        tmp_path / "mergelab",
    )
    _assert_same(ours, theirs)
