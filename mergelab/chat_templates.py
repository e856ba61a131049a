"""Named chat templates for ``chat_template: NAME`` (mergekit configs and native specs).

Each template is Jinja written for mergelab from the prompt format it implements (no text is copied from
another project). Every tag trims the whitespace around it (``{%- -%}``, ``{{- -}}``), so the output is
made only of the quoted strings and message contents and does not depend on the environment's
``trim_blocks``/``lstrip_blocks``. For a conversation ``messages`` (dicts with ``role`` and ``content``),
``add_generation_prompt`` and the tokenizer's ``bos_token``/``eos_token``:

- ``chatml``: per message ``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` (contents as given); the generation
  prompt ``<|im_start|>assistant\\n``.
- ``llama3``: ``bos_token`` before the first message; per message
  ``<|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>`` with CONTENT stripped of surrounding
  whitespace, messages back to back; the generation prompt ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``.
- ``mistral``: ``bos_token``, then the turns after an optional leading system message, which must alternate
  user, assistant, user, ... (else a template error); a user turn is `` [INST] CONTENT [/INST]``, the first
  one with ``SYSTEM\\n\\n`` before CONTENT; an assistant turn is `` CONTENT`` + ``eos_token``; any other role
  is an error; no generation prompt (the format ends a user turn with ``[/INST]``).
- ``alpaca``: the last system message's content (stripped; empty without one), ``\\n\\n``, then the user
  (``### Instruction:``), ``user_context`` (``### Input:``) and assistant (``### Response:``) turns, each the
  header, ``\\n`` and the stripped content, separated by ``\\n\\n``; the generation prompt (unless the last
  message is the assistant's) ``\\n\\n### Response:\\n``. Other roles write nothing.
- ``exaone``: per message ``[|ROLE|]CONTENT`` ended by ``\\n`` for a user turn and ``[|endofturn|]\\n`` otherwise,
  an empty ``[|system|][|endofturn|]\\n`` first when the conversation does not open with a system message;
  the generation prompt ``[|assistant|]``.

Against mergekit 0.1.5's templates of the same names, rendered by transformers (``trim_blocks``,
``lstrip_blocks``): chatml and mistral give the same prompts (mistral's error messages are worded
differently); mergekit's multi-line llama3 adds ``\\n`` after each ``<|eot_id|>``, its alpaca puts the
generation prompt's ``### Response:`` right after the last turn's text (no ``\\n\\n``), and its exaone adds
the templates' indentation and extra newlines, none of which is in those formats; mergelab writes the formats
(``tests/test_mergekit_equivalence.py`` asserts exactly these differences).
"""

from __future__ import annotations

_CHATML = r"""
{%- for message in messages -%}
    {{- '<|im_start|>' ~ message.role ~ '\n' ~ message.content ~ '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

_LLAMA3 = r"""
{%- for message in messages -%}
    {%- if loop.first -%}
        {{- bos_token -}}
    {%- endif -%}
    {{- '<|start_header_id|>' ~ message.role ~ '<|end_header_id|>\n\n' ~ (message.content | trim) ~ '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""

_MISTRAL = r"""
{%- set has_system = messages | length > 0 and messages[0].role == 'system' -%}
{%- set turns = messages[1:] if has_system else messages -%}
{{- bos_token -}}
{%- for turn in turns -%}
    {%- if (turn.role == 'user') != (loop.index0 is even) -%}
        {{- raise_exception('mistral template: turns must alternate user, assistant, user, ...') -}}
    {%- elif turn.role == 'user' -%}
        {%- set prefix = messages[0].content ~ '\n\n' if has_system and loop.first else '' -%}
        {{- ' [INST] ' ~ prefix ~ turn.content ~ ' [/INST]' -}}
    {%- elif turn.role == 'assistant' -%}
        {{- ' ' ~ turn.content ~ eos_token -}}
    {%- else -%}
        {{- raise_exception('mistral template: role ' ~ turn.role ~ ' is not supported') -}}
    {%- endif -%}
{%- endfor -%}
"""

_ALPACA = r"""
{%- set headers = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} -%}
{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}
{%- set respond = add_generation_prompt and (messages | length == 0 or messages[-1].role != 'assistant') -%}
{{- ((systems | last).content | trim) if systems else '' -}}
{{- '\n\n' -}}
{%- for message in messages -%}
    {%- if message.role in headers -%}
        {{- headers[message.role] ~ '\n' ~ (message.content | trim) -}}
        {%- if respond or not loop.last -%}
            {{- '\n\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if respond -%}
    {{- '### Response:\n' -}}
{%- endif -%}
"""

_EXAONE = r"""
{%- for message in messages -%}
    {%- if loop.first and message.role != 'system' -%}
        {{- '[|system|][|endofturn|]\n' -}}
    {%- endif -%}
    {{- '[|' ~ message.role ~ '|]' ~ message.content -}}
    {{- '\n' if message.role == 'user' else '[|endofturn|]\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '[|assistant|]' -}}
{%- endif -%}
"""

#: template name -> Jinja text
CHAT_TEMPLATES: dict[str, str] = {
    "alpaca": _ALPACA.strip() + "\n",
    "chatml": _CHATML.strip() + "\n",
    "exaone": _EXAONE.strip() + "\n",
    "llama3": _LLAMA3.strip() + "\n",
    "mistral": _MISTRAL.strip() + "\n",
}

__all__ = ["CHAT_TEMPLATES"]
