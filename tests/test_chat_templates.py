"""The named chat templates (:data:`mergelab.chat_templates.CHAT_TEMPLATES`) render the prompt formats they
implement: the conversations of :mod:`chat_conversations`, with and without a generation prompt, against
prompts written out by hand here; rendered by transformers' ``apply_chat_template`` and by plain jinja2 with
and without ``trim_blocks``/``lstrip_blocks`` (the templates trim their own whitespace, so all agree)."""

from __future__ import annotations

from typing import Any, Callable

import pytest

jinja2 = pytest.importorskip("jinja2")

from chat_conversations import CONVERSATIONS, render_jinja, render_transformers, tiny_tokenizer  # noqa: E402
from jinja2.exceptions import TemplateError  # noqa: E402

from mergelab.chat_templates import CHAT_TEMPLATES  # noqa: E402

SH, EH, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
#: (template, conversation) -> (prompt without, prompt with add_generation_prompt)
EXPECTED: dict[tuple[str, str], tuple[str, str]] = {}


def _expect(template: str, conversation: str, prompt: str, generation: str) -> None:
    EXPECTED[(template, conversation)] = (prompt, prompt + generation)


# chatml: contents verbatim, each message closed by <|im_end|> and a newline
_expect("chatml", "system_user",
        "<|im_start|>system\n  You are terse. <|im_end|>\n<|im_start|>user\n Name a colour.\n<|im_end|>\n",
        "<|im_start|>assistant\n")
_expect("chatml", "three_turns",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n Hello! <|im_end|>\n<|im_start|>user\nBye<|im_end|>\n",
        "<|im_start|>assistant\n")
_expect("chatml", "with_context",
        "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nTranslate the input.<|im_end|>\n"
        "<|im_start|>user_context\n good morning <|im_end|>\n<|im_start|>assistant\nbonjour\n<|im_end|>\n",
        "<|im_start|>assistant\n")
# llama3: bos first, stripped contents, messages back to back
_expect("llama3", "system_user",
        f"<s>{SH}system{EH}\n\nYou are terse.{EOT}{SH}user{EH}\n\nName a colour.{EOT}", f"{SH}assistant{EH}\n\n")
_expect("llama3", "three_turns",
        f"<s>{SH}user{EH}\n\nHi{EOT}{SH}assistant{EH}\n\nHello!{EOT}{SH}user{EH}\n\nBye{EOT}", f"{SH}assistant{EH}\n\n")
_expect("llama3", "with_context",
        f"<s>{SH}system{EH}\n\nAnswer in French.{EOT}{SH}user{EH}\n\nTranslate the input.{EOT}"
        f"{SH}user_context{EH}\n\ngood morning{EOT}{SH}assistant{EH}\n\nbonjour{EOT}", f"{SH}assistant{EH}\n\n")
# mistral: the system text folded into the first [INST]; contents verbatim; no generation prompt
_expect("mistral", "system_user", "<s> [INST]   You are terse. \n\n Name a colour.\n [/INST]", "")
_expect("mistral", "three_turns", "<s> [INST] Hi [/INST]  Hello! </s> [INST] Bye [/INST]", "")
# alpaca: the system text, then headed turns with stripped contents; no prompt after the assistant's turn
_expect("alpaca", "system_user", "You are terse.\n\n### Instruction:\nName a colour.", "\n\n### Response:\n")
_expect("alpaca", "three_turns", "\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\nBye",
        "\n\n### Response:\n")
_expect("alpaca", "with_context",
        "Answer in French.\n\n### Instruction:\nTranslate the input.\n\n### Input:\ngood morning"
        "\n\n### Response:\nbonjour", "")
# exaone: an empty system turn when none opens the conversation; user turns end with a newline only
_expect("exaone", "system_user", "[|system|]  You are terse. [|endofturn|]\n[|user|] Name a colour.\n\n",
        "[|assistant|]")
_expect("exaone", "three_turns",
        "[|system|][|endofturn|]\n[|user|]Hi\n[|assistant|] Hello! [|endofturn|]\n[|user|]Bye\n", "[|assistant|]")
_expect("exaone", "with_context",
        "[|system|]Answer in French.[|endofturn|]\n[|user|]Translate the input.\n"
        "[|user_context|] good morning [|endofturn|]\n[|assistant|]bonjour\n[|endofturn|]\n", "[|assistant|]")

#: mistral's errors: conversation -> message pattern
MISTRAL_ERRORS = {
    "two_users": "user, assistant, user",
    "assistant_first": "user, assistant, user",
    "late_system": "role system is not supported",
    "with_context": "role user_context is not supported",
}


@pytest.fixture(scope="module")
def renderers() -> dict[str, Callable[..., str]]:
    out: dict[str, Callable[..., str]] = {
        "jinja2": render_jinja,
        "jinja2-untrimmed": lambda t, m, g: render_jinja(t, m, g, trim=False),
    }
    try:
        tokenizer = tiny_tokenizer()
    except ImportError:
        return out
    out["transformers"] = lambda t, m, g: render_transformers(t, m, g, tokenizer)
    return out


RENDERERS = ("transformers", "jinja2", "jinja2-untrimmed")


def _renderer(renderers: dict[str, Callable[..., str]], name: str) -> Callable[..., str]:
    if name not in renderers:
        pytest.skip("transformers is not installed")
    return renderers[name]


def test_the_named_templates() -> None:
    assert sorted(CHAT_TEMPLATES) == ["alpaca", "chatml", "exaone", "llama3", "mistral"]


@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize("case", sorted(EXPECTED), ids=lambda c: f"{c[0]}-{c[1]}")
def test_prompts(case: tuple[str, str], renderer: str, renderers: Any) -> None:
    render = _renderer(renderers, renderer)
    template, conversation = case
    for add_generation_prompt, expected in zip((False, True), EXPECTED[case]):
        got = render(CHAT_TEMPLATES[template], CONVERSATIONS[conversation], add_generation_prompt)
        assert got == expected, (template, conversation, add_generation_prompt)


@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize("conversation", sorted(MISTRAL_ERRORS))
def test_mistral_rejects_other_turn_orders(conversation: str, renderer: str, renderers: Any) -> None:
    """After the optional leading system message the turns alternate user, assistant, user, ...; a turn out
    of that order, or a role other than user and assistant, is a template error."""
    render = _renderer(renderers, renderer)
    with pytest.raises(TemplateError, match=MISTRAL_ERRORS[conversation]):
        render(CHAT_TEMPLATES["mistral"], CONVERSATIONS[conversation], False)
