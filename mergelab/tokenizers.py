"""Tokenizer files of a merge: loading the inputs' tokenizers, building the output's (its base, the union, or
another model's), chat templates, and the files written next to the merged model. Needs ``transformers``
(``pip install mergelab[hf]``), imported on first use; local folders only, nothing is downloaded.

The vocabulary rules follow mergekit 0.1.5 (``mergekit/tokenizer/build.py``, ``mergekit/merge.py``):

- every model's *vocabulary size* is ``vocab_size`` of its ``config.json`` (its embedding's row count, checked
  by :mod:`mergelab.merging.vocabulary`); a token whose id is ``>= vocab_size`` is no token of that model;
- the **base** tokenizer (``base``, else the first model) is *stripped*: tokens with ids ``>= vocab_size`` are
  removed (with the BPE merges using them);
- ``source: base``: the output vocabulary is the stripped base's; ``union``: the base's tokens keep their ids,
  then every other model's tokens missing so far are appended in model order (a model's ordinary tokens
  first, in id order, then its added tokens, special-ness kept; a token added with different settings by two models keeps
  the first's); a model path: that model's tokenizer as saved (not stripped);
- the tokens of ``tokenizer.tokens`` missing from the output vocabulary are then appended (``add_tokens``);
- ``chat_template``: a named template (:data:`CHAT_TEMPLATES`), ``auto`` (the commonest template among the
  inputs' tokenizers; none: left as is) or Jinja text (at least 20 characters, with a ``{``); the output
  tokenizer is written with transformers' ``save_pretrained`` (the template goes where the installed
  transformers puts it: ``chat_template.jinja`` for transformers 5, ``tokenizer_config.json`` before).

Departures from mergekit, where it crashes or depends on chance: a model without tokenizer files is an error
(mergekit assumes the base's vocabulary); the models' order is the spec's (mergekit iterates a ``set``, so
without a base model its "first model" and the order of appended union tokens vary between runs, as does
its walk over each vocabulary, a hash map's order: mergelab goes in id order); the
tokens of ``tokenizer.tokens`` are absent from every model unless its own tokenizer has them (mergekit adds
them to the base's tokenizer object before reading the base's vocabulary, giving them the base's padding
rows when ``vocab_size`` exceeds the tokenizer).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergelab.chat_templates import CHAT_TEMPLATES
from mergelab.errors import SpecError

log = logging.getLogger(__name__)

#: files of a model folder that belong to its tokenizer: not copied next to a merge that writes its own
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
})
#: files from which transformers can build a tokenizer (one of them must be present)
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                "sentencepiece.bpe.model")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise SpecError("tokenizer merging and chat templates need transformers: pip install mergelab[hf]") from None
    return transformers


def has_tokenizer(folder: Path | None) -> bool:
    """Whether ``folder`` holds tokenizer files (``tokenizer_config.json`` or a vocabulary file)."""
    return folder is not None and any((Path(folder) / f).is_file() for f in _VOCAB_FILES)


def load_tokenizer(folder: Path | None, where: str) -> Any:
    """The tokenizer saved in ``folder`` (transformers' ``AutoTokenizer``, fast, local files only); a
    :class:`SpecError` naming ``where`` when there is none or it cannot be read."""
    if not has_tokenizer(folder):
        raise SpecError(f"{where}: no tokenizer files in {folder} (need tokenizer.json or another vocabulary "
                        f"file: {', '.join(_VOCAB_FILES)}); tokenizer merging reads every input's tokenizer")
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds
        raise SpecError(f"{where}: cannot read the tokenizer in {folder}: {exc}") from None


def vocab_size(folder: Path | None) -> int | None:
    """``vocab_size`` of ``folder``'s ``config.json`` (or of its ``text_config``), None without one."""
    if folder is None or not (Path(folder) / "config.json").is_file():
        return None
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{folder}/config.json: cannot read it: {exc}") from None
    for section in (config, config.get("text_config") or {}):
        if isinstance(section, dict) and isinstance(section.get("vocab_size"), int):
            return int(section["vocab_size"])
    return None


def stripped(tokenizer: Any, size: int, where: str) -> Any:
    """``tokenizer`` without its tokens of id ``>= size`` (mergekit's ``get_stripped_tokenizer``): BPE
    vocabularies lose the merges that use them; WordLevel/WordPiece vocabularies just the entries."""
    unused = {tok for tok, idx in tokenizer.get_vocab().items() if idx >= size}
    if not unused:
        return tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise SpecError(f"{where}: the tokenizer has {len(unused)} token(s) beyond vocab_size {size} and no fast "
                        "tokenizer to strip them from")
    import tokenizers

    data = json.loads(tokenizer._tokenizer.to_str())
    kind = data["model"]["type"]
    if kind not in ("BPE", "WordLevel", "WordPiece"):
        raise SpecError(f"{where}: the tokenizer has {len(unused)} token(s) beyond vocab_size {size}; stripping "
                        f"them is implemented for BPE, WordLevel and WordPiece vocabularies, not {kind}")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for tok in unused:
        data["model"]["vocab"].pop(tok, None)
    if kind == "BPE":
        def keep(m: Any) -> bool:
            parts = m.split(" ") if isinstance(m, str) else list(m)
            return not any(p in unused for p in parts)

        data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _copy(tokenizer: Any) -> Any:
    """A fresh copy of ``tokenizer`` (saved and reloaded, as mergekit does before extending the base's)."""
    transformers = _transformers()
    with tempfile.TemporaryDirectory(prefix="mergelab-tok-") as tmp:
        tokenizer.save_pretrained(tmp, legacy_format=False, safe_serialization=True)
        return transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True, local_files_only=True)


def union(base: Any, others: Sequence[tuple[Any, int]]) -> Any:
    """The union tokenizer: ``base``'s vocabulary, then each tokenizer's (in order, ``(tokenizer, vocab
    size)``, the base first) ordinary tokens it lacks, then the added tokens (mergekit's
    ``build_union_tokenizer``)."""
    added: dict[str, Any] = {}
    vocab: dict[str, int] = {}
    warned: set[str] = set()
    for tokenizer, size in others:
        decoder = tokenizer.added_tokens_decoder
        for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if idx < size and tok not in vocab:
                vocab[tok] = len(vocab)
        for idx, info in sorted(decoder.items()):
            if idx >= size:
                continue
            if info.content in added:
                if added[info.content] != info and info.content not in warned:
                    log.warning("token %r added with different settings by two models; using the first's",
                                info.content)
                    warned.add(info.content)
                continue
            added[info.content] = info
    out = _copy(base)
    base_vocab = base.get_vocab()
    for tok in vocab:
        if tok not in added and tok not in base_vocab:
            out.add_tokens(tok)
    for info in added.values():
        out.add_tokens(info)
    return out


def chat_template(value: str, folders: Sequence[Path | None]) -> str | None:
    """The Jinja text of a ``chat_template`` setting (see the module docstring); None for ``auto`` when no
    input has a template. An unknown name is a :class:`SpecError` listing the known ones."""
    if value == "auto":
        found = []
        for folder in folders:
            if not has_tokenizer(folder):
                continue
            template = load_tokenizer(folder, "chat_template: auto").chat_template
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        if value in CHAT_TEMPLATES:
            return CHAT_TEMPLATES[value]
        raise SpecError(f"chat_template: unknown template name {value!r} (known: {', '.join(sorted(CHAT_TEMPLATES))}, "
                        "auto, or a Jinja template text)")
    if len(value) < 20 or "{" not in value:
        raise SpecError(f"chat_template: {value[:40]!r} is neither a template name nor a Jinja template text")
    return value


def saved_files(tokenizer: Any, template: str | None) -> dict[str, bytes]:
    """The files transformers' ``save_pretrained`` writes for ``tokenizer`` (with ``template`` set when given),
    name -> bytes."""
    if template is not None:
        tokenizer.chat_template = template
    with tempfile.TemporaryDirectory(prefix="mergelab-tok-") as tmp:
        tokenizer.save_pretrained(tmp, safe_serialization=True)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


__all__ = ["TOKENIZER_FILES", "chat_template", "has_tokenizer", "load_tokenizer", "saved_files", "stripped", "union",
           "vocab_size"]
