"""Tiny Llama-shaped checkpoints with their own word-level tokenizers, for the tokenizer-merging tests.

A model's vocabulary is a list of tokens (id = position); its ``embed_tokens`` and ``lm_head`` rows are
hand-chosen: row ``i`` of model ``m`` holds ``code(m, token_i) + j / 100`` in column ``j`` (``lm_head``: the
negative), so a permuted row is recognised by its value. Rows beyond the tokenizer (``rows > len(tokens)``)
are padding rows of value ``-1``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergelab.checkpoints import save_state_dict

HIDDEN, LAYERS = 4, 1
SPECIAL = ["<unk>", "<s>", "</s>"]


def code(model: str, token: str) -> float:
    """The hand-chosen value of ``token``'s embedding row in ``model``."""
    return {"base": 0.0, "ft1": 100.0, "ft2": 200.0, "ft3": 300.0}[model] + sum(map(ord, token)) % 97


def row(model: str, token: str) -> torch.Tensor:
    return code(model, token) + torch.arange(HIDDEN, dtype=torch.float32) / 100


def save_tokenizer(folder: Path, tokens: list[str]) -> None:
    """A word-level fast tokenizer of ``tokens`` (id = position; the first three are special) saved by
    transformers into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))


def config(rows: int, dtype: str = "float32", layers: int = LAYERS) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": 2 * HIDDEN, "num_hidden_layers": layers, "num_attention_heads": 1,
            "num_key_value_heads": 1, "head_dim": HIDDEN, "vocab_size": rows, "max_position_embeddings": 16,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": dtype}


def build_model(folder: Path, model: str, tokens: list[str], rows: int | None = None, *,
                dtype: torch.dtype = torch.float32, seed: int = 0, tokenizer: bool = True,
                config_rows: int | None = None, tied: bool = False) -> Path:
    """Model ``model``'s folder: its tokenizer of ``tokens``, ``config.json`` (``vocab_size = config_rows``,
    default ``rows``), and tensors: the vocabulary tensors by :func:`row` (``rows`` rows, default
    ``len(tokens)``), the others random (``seed``); ``tied``: no ``lm_head`` (tied embeddings)."""
    rows = len(tokens) if rows is None else rows
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    embed = torch.full((rows, HIDDEN), -1.0)
    for i, tok in enumerate(tokens[:rows]):
        embed[i] = row(model, tok)
    state = {"model.embed_tokens.weight": embed}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        state[p + "input_layernorm.weight"] = 1 + torch.randn(HIDDEN, generator=gen) * 0.01
        state[p + "self_attn.q_proj.weight"] = torch.randn(HIDDEN, HIDDEN, generator=gen) * 0.02
        state[p + "mlp.down_proj.weight"] = torch.randn(HIDDEN, 2 * HIDDEN, generator=gen) * 0.02
    state["model.norm.weight"] = 1 + torch.randn(HIDDEN, generator=gen) * 0.01
    if not tied:
        state["lm_head.weight"] = -embed
    save_state_dict({n: t.to(dtype) for n, t in state.items()}, folder / "model.safetensors")
    dtype_name = "float32" if dtype == torch.float32 else "bfloat16"
    (folder / "config.json").write_text(json.dumps(config(rows if config_rows is None else config_rows, dtype_name)))
    if tokenizer:
        save_tokenizer(folder, tokens)
    return folder


#: the vocabularies of the test models: ft1 swaps a and b, adds d and f; ft2 adds e and f; base has 2 padding rows
VOCABS = {
    "base": SPECIAL + ["a", "b", "c"],
    "ft1": SPECIAL + ["b", "a", "c", "d", "f"],
    "ft2": SPECIAL + ["a", "b", "c", "e", "f"],
}


def build_set(root: Path, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """base (6 tokens, 8 rows: two padding rows), ft1 and ft2 (:data:`VOCABS`)."""
    return {
        "base": build_model(root / "base", "base", VOCABS["base"], 8, dtype=dtype, seed=1),
        "ft1": build_model(root / "ft1", "ft1", VOCABS["ft1"], dtype=dtype, seed=2),
        "ft2": build_model(root / "ft2", "ft2", VOCABS["ft2"], dtype=dtype, seed=3),
    }
