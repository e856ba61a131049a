"""Conversations for the chat-template tests, and two ways of rendering a template over them.

``CONVERSATIONS`` (name -> messages): a system and a user message, a user/assistant/user exchange and an
alpaca exchange with a ``user_context`` turn, contents with leading and trailing whitespace; then three
that break mistral's alternation rule or its roles. ``BOS``/``EOS`` are the tokens the templates are
rendered with.
"""

from __future__ import annotations

from typing import Any

BOS, EOS = "<s>", "</s>"

Message = dict[str, str]

CONVERSATIONS: dict[str, list[Message]] = {
    "system_user": [
        {"role": "system", "content": "  You are terse. "},
        {"role": "user", "content": " Name a colour.\n"},
    ],
    "three_turns": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "Bye"},
    ],
    "with_context": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Translate the input."},
        {"role": "user_context", "content": " good morning "},
        {"role": "assistant", "content": "bonjour\n"},
    ],
    "two_users": [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ],
    "assistant_first": [
        {"role": "assistant", "content": "a"},
    ],
    "late_system": [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "s"},
    ],
}


def tiny_tokenizer() -> Any:
    """transformers' fast tokenizer over a word-level vocabulary holding ``<unk>``, BOS and EOS."""
    import transformers
    from tokenizers import Tokenizer, models

    tk = Tokenizer(models.WordLevel({"<unk>": 0, BOS: 1, EOS: 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token=BOS, eos_token=EOS)


def render_transformers(template: str, messages: list[Message], add_generation_prompt: bool,
                        tokenizer: Any = None) -> str:
    """The prompt as transformers makes it: ``apply_chat_template(..., tokenize=False)`` (its sandboxed
    Jinja environment, ``raise_exception`` and the tokenizer's special tokens)."""
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def render_jinja(template: str, messages: list[Message], add_generation_prompt: bool, trim: bool = True) -> str:
    """The prompt from plain jinja2: ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)``
    (the settings Hugging Face uses; both False with ``trim=False``) with a ``raise_exception`` that raises
    ``TemplateError``."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=trim, lstrip_blocks=trim)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=BOS, eos_token=EOS)
