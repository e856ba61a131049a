"""Tokenizer merging (``tokenizer:`` and ``chat_template``): the output vocabulary, every input's embedding
rows permuted into it with mergekit's default rows, padding, chat templates and the errors, asserted on
hand-chosen embedding rows (:mod:`tiny_tokenizers`: row ``i`` of model ``m`` is ``code(m, token_i) +
j / 100``, the head its negative)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tiny_tokenizers import VOCABS, build_model, build_set, row  # noqa: E402

from mergelab.chat_templates import CHAT_TEMPLATES  # noqa: E402
from mergelab.checkpoints import load_state_dict, open_checkpoint  # noqa: E402
from mergelab.errors import SpecError  # noqa: E402
from mergelab.mergekit_config import translate  # noqa: E402
from mergelab.merging import merge  # noqa: E402
from mergelab.merging.vocabulary import Vocabulary  # noqa: E402
from mergelab.spec import TokenizerSpec  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_set(tmp_path_factory.mktemp("tok_models"))


def _vocab(folder: Path) -> list[str]:
    import transformers

    vocab = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True).get_vocab()
    return [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]


def _merge(spec: dict, out: Path, engine: str = "auto") -> dict[str, torch.Tensor]:
    merge(spec, out, progress=False, hash_inputs=False, engine=engine)
    return load_state_dict(out)


def test_union_vocabulary_and_rows(models: dict[str, Path], tmp_path: Path) -> None:
    """union: the base's tokens keep their ids, then ft1's new tokens (d, f: its id order), then ft2's (e).
    Task arithmetic on the permuted rows: a token every input has merges its own rows (ft1's a and b are
    swapped in its vocabulary); d (ft1 only) and e (ft2 only) take the one owner's row in every input, so the
    merge keeps it; f (ft1, ft2, not the base) takes their mean in the base, so the merge gives the mean.
    Both engines write the same bytes."""
    spec = {"method": "task_arithmetic", "base": str(models["base"]), "models": [str(models["ft1"]), str(models["ft2"])],
            "tokenizer": {"source": "union"}}
    outs = {e: _merge(spec, tmp_path / e, e) for e in ("torch", "numpy")}
    assert _vocab(tmp_path / "torch") == VOCABS["base"] + ["d", "f", "e"]
    assert json.loads((tmp_path / "torch" / "config.json").read_text())["vocab_size"] == 9
    out = outs["torch"]
    assert out[EMBED].shape == out[HEAD].shape == (9, 4)  # the base's two padding rows are gone
    expected = torch.stack(
        [row("ft1", t) + row("ft2", t) - row("base", t) for t in VOCABS["base"]]
        + [row("ft1", "d"), (row("ft1", "f") + row("ft2", "f")) / 2, row("ft2", "e")])
    torch.testing.assert_close(out[EMBED], expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out[HEAD], -expected, rtol=1e-6, atol=1e-5)
    for name in out:
        assert torch.equal(out[name], outs["numpy"][name]), name
    record = json.loads((tmp_path / "torch" / "mergelab_merge.json").read_text())
    assert record["tokenizer"]["tokens"] == 9 and "tokenizer.json" in record["tokenizer_files"]


def test_base_source_keeps_the_base_vocabulary(models: dict[str, Path], tmp_path: Path) -> None:
    """source: base: the base's 6 tokens (its 8 rows cut to them); ft1's rows are read by token (a, b
    swapped), ft1's and ft2's other tokens are dropped."""
    spec = {"method": "task_arithmetic", "base": str(models["base"]), "models": [str(models["ft1"]), str(models["ft2"])],
            "tokenizer": {"source": "base"}}
    out = _merge(spec, tmp_path / "out")
    assert _vocab(tmp_path / "out") == VOCABS["base"]
    expected = torch.stack([row("ft1", t) + row("ft2", t) - row("base", t) for t in VOCABS["base"]])
    torch.testing.assert_close(out[EMBED], expected, rtol=1e-6, atol=1e-5)


def test_token_sources_force_and_padding(models: dict[str, Path], tmp_path: Path) -> None:
    """source: ft1's tokenizer, weight averaging (no base) of ft1 and ft2 at 0.25 / 0.75. tokens: a forced
    to zero (every input), zz (new, in no input) from ft2's row of e, c forced to ft2's row. d is ft1's
    alone: its row in both. 9 tokens padded to 12 rows, each input's padding rows its mean row."""
    spec = {"method": "weight_average", "models": [{"path": str(models["ft1"]), "weight": 0.25},
                                                   {"path": str(models["ft2"]), "weight": 0.75}],
            "tokenizer": {"source": str(models["ft1"]), "pad_to_multiple_of": 4, "tokens": {
                "a": {"source": "zero", "force": True},
                "zz": {"source": {"model": str(models["ft2"]), "token": "e"}},
                "c": {"source": str(models["ft2"]), "force": True}}}}
    out = _merge(spec, tmp_path / "out")
    vocab = _vocab(tmp_path / "out")
    assert vocab == VOCABS["ft1"] + ["zz"]
    zero = torch.zeros(4)

    def permuted(model: str) -> torch.Tensor:
        rows = []
        for t in vocab:
            if t == "a":
                rows.append(zero)
            elif t == "zz":
                rows.append(row("ft2", "e"))
            elif t == "c":
                rows.append(row("ft2", "c"))
            elif t == "d":
                rows.append(row("ft1", "d"))
            else:
                rows.append(row(model, t))
        m = torch.stack(rows)
        return torch.cat([m, m.double().mean(0).float().expand(3, 4)])

    expected = 0.25 * permuted("ft1") + 0.75 * permuted("ft2")
    assert out[EMBED].shape == (12, 4)
    torch.testing.assert_close(out[EMBED], expected, rtol=1e-6, atol=1e-5)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 12


def test_tied_embeddings_and_stacked_slices(tmp_path: Path) -> None:
    """Tied embeddings (no lm_head): the one vocabulary tensor is permuted. Stacked slices (passthrough of
    ft1's layer, then ft2's): the embedding's inputs are the first slice's (ft1 alone), the head's the last
    slice's (ft2 alone), so a token the tensor's one input lacks is in none of its inputs: a zero row."""
    m = {k: build_model(tmp_path / k, k, VOCABS[k], tied=True) for k in ("ft1", "ft2")}
    out = _merge({"method": "weight_average", "models": [str(m["ft1"]), str(m["ft2"])],
                  "tokenizer": {"source": "union"}}, tmp_path / "tied")
    assert set(out) == {EMBED, "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_proj.weight",
                        "model.layers.0.mlp.down_proj.weight", "model.norm.weight"}
    vocab = VOCABS["ft1"] + ["e"]
    expected = torch.stack([(row("ft1", t) + row("ft2", t)) / 2 if t not in ("d", "e") else
                            row("ft1" if t == "d" else "ft2", t) for t in vocab])
    torch.testing.assert_close(out[EMBED], expected, rtol=1e-6, atol=1e-5)
    s = {k: build_model(tmp_path / f"s{k}", k, VOCABS[k]) for k in ("ft1", "ft2")}
    out = _merge({"method": "passthrough", "models": [str(s["ft1"]), str(s["ft2"])],
                  "slices": [{"layers": 1, "model_layers": [0, None]}, {"layers": 1, "model_layers": [None, 0]}],
                  "tokenizer": {"source": "union"}}, tmp_path / "stacked")
    assert _vocab(tmp_path / "stacked") == vocab
    zero = torch.zeros(4)
    torch.testing.assert_close(out[EMBED], torch.stack([row("ft1", t) if t != "e" else zero for t in vocab]))
    torch.testing.assert_close(out[HEAD], torch.stack([-row("ft2", t) if t != "d" else zero for t in vocab]))
    config = json.loads((tmp_path / "stacked" / "config.json").read_text())
    assert config["vocab_size"] == 9 and config["num_hidden_layers"] == 2


def test_permuted_reads_any_byte_range(models: dict[str, Path]) -> None:
    """The permuted tensor read block-wise (any byte offset and length, as the numpy engine reads it) is the
    whole tensor's bytes."""
    with open_checkpoint(models["base"]) as base, open_checkpoint(models["ft1"]) as ft1, \
            open_checkpoint(models["ft2"]) as ft2:
        vocab = Vocabulary.build(TokenizerSpec(source="union", pad_to_multiple_of=4), base, [ft1, ft2])
        views = [vocab.wrap(r) for r in (base, ft1, ft2)]
        vocab.bind(EMBED, views, views[0])
        for view in views:
            whole = view.get(EMBED).contiguous().view(torch.uint8).numpy().reshape(-1)
            assert whole.size == 12 * 4 * 4
            for offset, n in ((0, whole.size), (3, 50), (17, 1), (100, 92), (whole.size - 5, 5)):
                buf = np.empty(n, dtype=np.uint8)
                view.read_range(EMBED, offset, memoryview(buf))
                assert np.array_equal(buf, whole[offset:offset + n]), (offset, n)


def test_bf16_inputs_keep_their_dtype(tmp_path: Path) -> None:
    """bfloat16 inputs: copied rows are the stored bytes, the mean row rounded once to bfloat16."""
    m = build_set(tmp_path / "m", dtype=torch.bfloat16)
    spec = {"method": "task_arithmetic", "base": str(m["base"]), "models": [str(m["ft1"]), str(m["ft2"])],
            "tokenizer": {"source": "union"}}
    out = _merge(spec, tmp_path / "out")
    assert out[EMBED].dtype == torch.bfloat16
    f = (row("ft1", "f").bfloat16().float() + row("ft2", "f").bfloat16().float()) / 2
    assert torch.equal(out[EMBED][7], f.bfloat16())


@pytest.mark.parametrize("template", ["chatml", "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"])
def test_chat_template_is_written_with_the_tokenizer(models: dict[str, Path], tmp_path: Path, template: str) -> None:
    """A named template or a Jinja text, without a tokenizer section: the base's tokenizer re-saved with it
    (the vocabulary unchanged), loaded back by transformers."""
    import transformers

    spec = {"method": "task_arithmetic", "base": str(models["base"]), "models": [str(models["ft1"])],
            "chat_template": template}
    merge(spec, tmp_path / "out", progress=False, hash_inputs=False)
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert loaded.chat_template == CHAT_TEMPLATES.get(template, template)
    assert _vocab(tmp_path / "out") == VOCABS["base"]


def test_bad_inputs_are_clear_errors_and_write_nothing(models: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    bare = build_model(tmp_path / "bare", "ft3", VOCABS["base"], tokenizer=False)
    wrong = build_model(tmp_path / "wrong", "ft3", VOCABS["base"], 6, config_rows=7)
    base = str(models["base"])
    cases = [
        ({"models": [str(bare)], "tokenizer": {"source": "union"}}, "no tokenizer files in .*bare"),
        ({"models": [str(wrong)], "tokenizer": {"source": "union"}},
         "has 6 rows but config.json's vocab_size is 7"),
        ({"models": [str(models["ft1"])], "chat_template": "chatmlx"}, "unknown template name 'chatmlx'"),
        ({"models": [str(models["ft1"])], "chat_template": "{short"}, "neither a template name"),
        ({"models": [str(models["ft1"])], "tokenizer": {"tokens": {"q": {"source": str(bare)}}}},
         "is not an input of the merge"),
    ]
    for k, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{k}"
        with pytest.raises(SpecError, match=message):
            merge({"method": "task_arithmetic", "base": base, **extra}, out, progress=False)
        assert not out.exists()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SpecError, match=r"pip install mergelab\[hf\]"):
        merge({"method": "task_arithmetic", "base": base, "models": [str(models["ft1"])],
               "tokenizer": {"source": "union"}}, tmp_path / "out_hf", progress=False)
    assert not (tmp_path / "out_hf").exists()


def test_mergekit_tokenizer_settings_translate(models: dict[str, Path]) -> None:
    base, ft1, ft2 = (str(models[k]) for k in ("base", "ft1", "ft2"))
    cfg = {"merge_method": "task_arithmetic", "base_model": base,
           "models": [{"model": ft1, "parameters": {"weight": 1.0}}]}
    assert translate({**cfg, "tokenizer_source": "union"})["tokenizer"] == {"source": "union"}
    assert translate({**cfg, "tokenizer_source": ft2})["tokenizer"] == {"source": ft2}
    assert "tokenizer" not in translate(cfg)
    spec = translate({**cfg, "chat_template": "chatml", "tokenizer": {"pad_to_multiple_of": 8, "tokens": {
        "<x>": {"source": {"kind": "zero"}, "force": True},
        "<y>": {"source": {"kind": "model_token", "model": ft2, "token_id": 3}},
        "<z>": {"source": ft1}}}})
    assert spec["chat_template"] == "chatml"
    assert spec["tokenizer"] == {"source": "union", "pad_to_multiple_of": 8, "tokens": {
        "<x>": {"source": "zero", "force": True}, "<y>": {"source": {"model": ft2, "token_id": 3}, "force": False},
        "<z>": {"source": ft1, "force": False}}}
    with pytest.raises(SpecError, match="tokenizer_source or tokenizer, not both"):
        translate({**cfg, "tokenizer_source": "base", "tokenizer": {"source": "base"}})
    with pytest.raises(SpecError, match="unknown source kind 'mean'"):
        translate({**cfg, "tokenizer": {"tokens": {"<x>": {"source": {"kind": "mean"}}}}})
