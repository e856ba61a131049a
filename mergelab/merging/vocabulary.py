"""The output vocabulary of a merge and every input's embedding rows in it (mergekit's tokenizer merging).

With a spec's ``tokenizer:`` section, :meth:`Vocabulary.build` builds the output tokenizer
(:mod:`mergelab.tokenizers`: the base's, the union, or another model's) and each input's permutation; each
input checkpoint is then read through a :class:`PermutedReader`, which presents its vocabulary tensors
(:data:`VOCAB_TENSOR`: ``embed_tokens``, ``lm_head``, ...; tied embeddings are one tensor) already permuted,
row block by row block, so the merge methods run on them unchanged and nothing loads a whole model.

The rows (mergekit 0.1.5's ``PermutedVocabulary``, ``mergekit/tokenizer/embed.py``). ``V`` is the output
vocabulary (token ``v`` has id ``v`` in ``[0, |V|)``), ``R`` = ``|V|`` rounded up to ``pad_to_multiple_of``,
``p_m(v)`` the row of token ``v`` in input ``m`` (its tokenizer's id if below the model's ``vocab_size``, else
absent). Input ``m``'s tensor ``E_m`` (``vocab_size_m`` rows) becomes ``E'_m`` with ``R`` rows:

    E'_m[v] = E_m[p_m(v)]   when m has v and v is not forced
    E'_m[v] = D[v]          otherwise (a token some input lacks, or ``force: true``)
    E'_m[r] = (1/|V|) sum_{v < |V|} E'_m[v]   for the padding rows |V| <= r < R

with the default row ``D[v]`` over the tensor's inputs ``M`` (in the spec's order, the base first):
the token's ``tokens:`` entry when it has a source (``zero``; a model: that model's row of ``v``; ``{model,
token | token_id}``: that model's own row of that token / row number); else, by mergekit's rules, the row of
the one input having ``v``, zero when none has it (a warning), the base's row when the base is an input and
has ``v``, else the mean of the rows of the inputs having it (summed in input order, divided once).

The merge then runs on the ``E'_m`` as on any tensor: an input lacking a token contributes the default row,
so for the methods that merge differences from the base a token taken from the base moves nothing, and a
token only one expert has keeps that expert's row in every input (its difference from the others is zero).

Precision: ``D`` and the padding means are computed in float32 (float64 for float64 inputs; the padding mean
is summed in float64) and rounded once to the input's stored dtype, which the permuted tensor keeps; copied
rows are the stored bytes. Memory: a vocabulary tensor's default rows (one per token some input lacks) and
padding means are held for the merge; the copied rows are read from the files when the engine reads them. Departures from mergekit where it crashes: a model token beyond its
``vocab_size`` is absent (mergekit: ``KeyError``); a ``tokens:`` entry without a source follows the default
rules (mergekit: ``NotImplementedError``).
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mergelab.checkpoints import CheckpointReader, TensorInfo
from mergelab import tokenizers
from mergelab.errors import SpecError
from mergelab.merging.numpy_arrays import numpy_dtype
from mergelab.spec import TokenizerSpec, TokenSource

log = logging.getLogger(__name__)

#: names of tensors indexed by token id along their first axis (input embeddings, output heads)
VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head|wte|word_embeddings|embed_out|tok_embeddings)\.weight$")


def is_vocab_tensor(name: str) -> bool:
    """Whether tensor ``name`` is indexed by token id along its first axis (:data:`VOCAB_TENSOR`)."""
    return VOCAB_TENSOR.search(name) is not None


def model_key(path: Path | str) -> Path:
    """The key of a model in a vocabulary: its resolved path."""
    return Path(path).expanduser().resolve()


@dataclass
class _Run:
    """Output rows ``[start, start + count)`` of one input: its own rows from ``source`` on (``kind`` "own"),
    default row ``source`` (one row, "default") or its padding mean (one row, "pad")."""

    start: int
    count: int
    kind: str
    source: int


class _TensorRows:
    """One vocabulary tensor's rows for every input feeding it: the default rows (stored bytes), each
    input's runs of rows and padding mean. Built on first read (:meth:`Vocabulary.rows`)."""

    def __init__(self, row_bytes: int, defaults: bytes, runs: dict[Path, list[_Run]], pads: dict[Path, bytes]):
        self.row_bytes, self.defaults, self.runs, self.pads = row_bytes, defaults, runs, pads
        self.starts = {k: [r.start for r in rs] for k, rs in runs.items()}


class Vocabulary:
    """The output vocabulary (``tokens``: token -> id, ``size`` of them, ``rows`` after padding) and each
    input's permutation (``perms[key][v]``: its row of token ``v``, -1 when absent), built by :meth:`build`.
    ``tokenizer`` is the output tokenizer (transformers), ``base`` the key of the spec's base (None without);
    each vocabulary tensor's inputs and base are set by :meth:`bind`."""

    def __init__(self, spec: TokenizerSpec, tokenizer: Any, tokens: dict[str, int], perms: dict[Path, np.ndarray],
                 originals: dict[Path, dict[str, int]], vocab_sizes: dict[Path, int], base: Path | None) -> None:
        self.spec, self.tokenizer, self.tokens = spec, tokenizer, tokens
        self.size = len(tokens)
        pad = spec.pad_to_multiple_of
        self.rows = self.size if not pad or self.size % pad == 0 else (self.size // pad + 1) * pad
        self.perms, self.originals, self.vocab_sizes, self.base = perms, originals, vocab_sizes, base
        self.by_id = [""] * self.size
        for tok, v in tokens.items():
            if not 0 <= v < self.size:
                raise SpecError(f"tokenizer: the output vocabulary's ids are not 0..{self.size - 1} (token {tok!r} "
                                f"has id {v})")
            self.by_id[v] = tok
        self._inputs: dict[str, list[tuple[Path, Any]]] = {}
        self._base: dict[str, Path | None] = {}
        self._rows: dict[str, _TensorRows] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def build(cls, spec: TokenizerSpec, base: CheckpointReader | None,
              experts: Sequence[CheckpointReader]) -> Vocabulary:
        """The vocabulary of ``spec`` over the inputs (the tokenizer base is ``base``, else the first model),
        checking every input's vocabulary tensors against its ``vocab_size`` (headers only)."""

        readers = ([base] if base is not None else []) + list(experts)
        order: list[tuple[Path, CheckpointReader]] = []
        for reader in readers:
            key = model_key(reader.path)
            if key not in dict(order):
                order.append((key, reader))
        sizes: dict[Path, int] = {}
        for key, reader in order:
            sizes[key] = _vocab_size(reader, tokenizers.vocab_size(reader.config_dir))
        loaded: dict[Path, Any] = {}
        for i, (key, reader) in enumerate(order):
            tok = tokenizers.load_tokenizer(reader.config_dir, f"tokenizer: {reader.path}")
            if i == 0:  # the tokenizer base, stripped to its vocab_size
                tok = tokenizers.stripped(tok, sizes[key], f"tokenizer: {reader.path}")
            loaded[key] = tok
        originals = {key: dict(tok.get_vocab()) for key, tok in loaded.items()}
        first = order[0][0]
        if spec.source == "base":
            out = loaded[first]
        elif spec.source == "union":
            out = tokenizers.union(loaded[first], [(loaded[k], sizes[k]) for k, _ in order])
        else:
            out = tokenizers.load_tokenizer(spec.source, "tokenizer.source")
        existing = set(out.get_vocab())
        for tok in spec.tokens:
            if tok not in existing:
                out.add_tokens(tok)
                existing.add(tok)
        tokens = dict(out.get_vocab())
        perms: dict[Path, np.ndarray] = {}
        for key, _ in order:
            own, size = originals[key], sizes[key]
            perm = np.full(len(tokens), -1, dtype=np.int64)
            beyond = 0
            for tok, v in tokens.items():
                idx = own.get(tok)
                if idx is None:
                    continue
                if idx >= size:
                    beyond += 1
                    continue
                perm[v] = idx
            if beyond:
                log.warning("%s: %d token(s) of its tokenizer have ids >= its vocab_size %d (padding?); they count "
                            "as absent", key, beyond, size)
            perms[key] = perm
        for text, entry in spec.tokens.items():
            src = entry.source
            model = src.model if isinstance(src, TokenSource) else src if isinstance(src, Path) else None
            if model is not None and model_key(model) not in perms:
                raise SpecError(f"tokenizer.tokens[{text!r}]: model {model} is not an input of the merge")
        vocab = cls(spec, out, tokens, perms, originals, sizes, None if base is None else model_key(base.path))
        log.info("output vocabulary: %d tokens (%d rows) from %s", vocab.size, vocab.rows,
                 spec.source if isinstance(spec.source, str) else f"the tokenizer of {spec.source}")
        return vocab

    def wrap(self, reader: CheckpointReader) -> PermutedReader:
        """``reader`` with its vocabulary tensors permuted into this vocabulary."""
        return PermutedReader(reader, model_key(reader.path), self)

    def bind(self, name: str, inputs: Sequence[PermutedReader], base: PermutedReader | None) -> None:
        """Set the inputs feeding output tensor ``name`` (their order is the defaults' summation order) and its
        base (None when no base feeds it; a slice's own ``base_model`` where it has one)."""
        seen: dict[Path, PermutedReader] = {}
        for r in inputs:  # a model that is also the base is one input
            seen.setdefault(r.key, r)
        self._inputs[name] = list(seen.items())
        self._base[name] = None if base is None else base.key

    # ------------------------------------------------------------------------------------------ the rows

    def rows_of(self, name: str) -> _TensorRows:
        """The rows of vocabulary tensor ``name``, computed on first use (thread-safe)."""
        with self._lock:
            rows = self._rows.get(name)
            if rows is None:
                rows = self._rows[name] = self._compute(name)
            return rows

    def _compute(self, name: str) -> _TensorRows:
        inputs = self._inputs.get(name)
        if not inputs:
            raise SpecError(f"tokenizer: tensor {name!r} has no bound inputs (internal error)")
        first = inputs[0][1].reader.info(name)
        width = math.prod(first.shape[1:])
        storage = first.storage
        if not storage.is_floating_point:
            raise SpecError(f"{first.file}: vocabulary tensor {name!r} is stored as {storage}, not floating point")
        dtype = numpy_dtype(storage)
        compute = np.float64 if storage.itemsize == 8 else np.float32
        row_bytes = width * storage.itemsize
        keys = [k for k, _ in inputs]
        reader_of = dict(inputs)
        base = self._base.get(name)

        def row(key: Path, index: int) -> np.ndarray:
            raw = np.empty(row_bytes, dtype=np.uint8)
            reader_of[key].read_own(name, index * row_bytes, memoryview(raw))
            return raw.view(dtype).astype(compute)

        present = np.stack([self.perms[k] >= 0 for k in keys])
        forced = np.zeros(self.size, dtype=bool)
        for text, entry in self.spec.tokens.items():
            if entry.force:
                forced[self.tokens[text]] = True
        needs = np.flatnonzero(forced | ~present.all(axis=0))
        defaults: list[np.ndarray] = []
        default_of: dict[int, int] = {}
        zero_tokens = 0
        for v in needs.tolist():
            text = self.by_id[v]
            entry = self.spec.tokens.get(text)
            src = None if entry is None else entry.source
            where = f"tokenizer.tokens[{text!r}]"
            if src is None:
                having = [k for k, p in zip(keys, present[:, v]) if p]
                if len(having) == 1:
                    value = row(having[0], int(self.perms[having[0]][v]))
                elif not having:
                    value = np.zeros(width, dtype=compute)
                    zero_tokens += 1
                elif base is not None and self.perms[base][v] >= 0:
                    value = row(base, int(self.perms[base][v]))
                else:
                    value = row(having[0], int(self.perms[having[0]][v]))
                    for k in having[1:]:
                        value = value + row(k, int(self.perms[k][v]))
                    value = value / compute(len(having))
            elif src == "zero":
                value = np.zeros(width, dtype=compute)
            elif isinstance(src, TokenSource):
                key = model_key(src.model)
                if key not in reader_of:
                    raise SpecError(f"{where}: model {src.model} does not feed tensor {name!r}")
                index = src.token_id
                if index is None:
                    if src.token not in self.originals[key]:
                        raise SpecError(f"{where}: token {src.token!r} is not in the vocabulary of {src.model}")
                    index = self.originals[key][src.token]
                if index >= self.vocab_sizes[key]:
                    raise SpecError(f"{where}: row {index} is beyond the {self.vocab_sizes[key]} rows of {src.model}")
                value = row(key, index)
            else:
                key = model_key(src)
                if key not in reader_of:
                    raise SpecError(f"{where}: model {src} does not feed tensor {name!r}")
                if self.perms[key][v] < 0:
                    raise SpecError(f"{where}: token {text!r} is not in the vocabulary of {src}")
                value = row(key, int(self.perms[key][v]))
            default_of[v] = len(defaults)
            defaults.append(value)
        if zero_tokens:
            log.warning("%s: %d token(s) of the output vocabulary are in no input; their rows are zero", name,
                        zero_tokens)
        table = (np.stack(defaults) if defaults else np.zeros((0, width), dtype=compute)).astype(dtype)
        runs: dict[Path, list[_Run]] = {}
        for k in keys:
            src_rows = self.perms[k].copy()
            for v, d in default_of.items():
                if forced[v] or src_rows[v] < 0:
                    src_rows[v] = -1 - d
            runs[k] = _runs(src_rows) + [_Run(r, 1, "pad", 0) for r in range(self.size, self.rows)]
        rows = _TensorRows(row_bytes, table.tobytes(), runs, {})
        if self.rows > self.size:  # each input's padding rows: the mean of its vocabulary rows
            for k in keys:
                total = np.zeros(width, dtype=np.float64)
                block = max(1, (64 << 20) // max(row_bytes, 1))
                for start in range(0, self.size, block):
                    n = min(block, self.size - start)
                    raw = np.empty(n * row_bytes, dtype=np.uint8)
                    _read_rows(rows, reader_of[k], name, start * row_bytes, memoryview(raw))
                    total += raw.view(dtype).reshape(n, width).astype(np.float64).sum(axis=0)
                rows.pads[k] = (total / self.size).astype(compute).astype(dtype).tobytes()
        return rows

    # ------------------------------------------------------------------------------------------ outputs

    def record(self) -> dict[str, Any]:
        """The vocabulary's entry in the merge record."""
        return {"source": str(self.spec.source), "tokens": self.size, "rows": self.rows,
                "token_sources": {t: e.model_dump(mode="json") for t, e in self.spec.tokens.items()},
                "pad_to_multiple_of": self.spec.pad_to_multiple_of}


def _vocab_size(reader: CheckpointReader, configured: int | None) -> int:
    """The input's vocabulary size (its config's ``vocab_size``, else its vocabulary tensor's rows), checked
    against every vocabulary tensor's rows."""
    names = [n for n in reader.keys() if is_vocab_tensor(n)]
    if not names:
        raise SpecError(f"tokenizer: {reader.path} has no vocabulary tensor (names ending in embed_tokens.weight, "
                        "lm_head.weight, wte.weight, word_embeddings.weight, embed_out.weight, tok_embeddings.weight)")
    size = configured
    for name in names:
        info: TensorInfo = reader.info(name)
        if not info.shape:
            raise SpecError(f"{info.file}: vocabulary tensor {name!r} is a scalar")
        if size is None:
            size = info.shape[0]
        if info.shape[0] != size:
            said = "config.json's vocab_size" if configured is not None else "the other vocabulary tensors"
            raise SpecError(f"{info.file}: tensor {name!r} has {info.shape[0]} rows but {said} is {size}; the "
                            "embedding rows and the vocabulary size must agree")
    assert size is not None
    return size


def _runs(src_rows: np.ndarray) -> list[_Run]:
    """Runs of output rows: consecutive own rows (``src >= 0``, increasing by one) as one run, each default
    row (``src = -1 - d``) as its own."""
    n = len(src_rows)
    if n == 0:
        return []
    own = src_rows >= 0
    cont = np.zeros(n, dtype=bool)
    cont[1:] = own[1:] & own[:-1] & (src_rows[1:] == src_rows[:-1] + 1)
    starts = np.flatnonzero(~cont).tolist() + [n]
    out = []
    for a, b in zip(starts[:-1], starts[1:]):
        s = int(src_rows[a])
        out.append(_Run(a, b - a, "own", s) if s >= 0 else _Run(a, 1, "default", -1 - s))
    return out


def _read_rows(rows: _TensorRows, reader: PermutedReader, name: str, offset: int, out: memoryview) -> None:
    """Bytes ``[offset, offset + len(out))`` of ``reader``'s permuted tensor ``name``."""
    rb = rows.row_bytes
    runs, starts = rows.runs[reader.key], rows.starts[reader.key]
    end, pos, done = offset + len(out), offset, 0
    while pos < end:
        if rb == 0:
            break
        i = bisect.bisect_right(starts, pos // rb) - 1
        run = runs[i]
        inner = pos - run.start * rb
        n = min(end, (run.start + run.count) * rb) - pos
        target = out[done:done + n]
        if run.kind == "own":
            reader.read_own(name, run.source * rb + inner, target)
        elif run.kind == "default":
            target[:] = rows.defaults[run.source * rb + inner: run.source * rb + inner + n]
        else:
            target[:] = rows.pads[reader.key][inner:inner + n]
        pos += n
        done += n


class PermutedReader:
    """A checkpoint whose vocabulary tensors are read permuted into a :class:`Vocabulary` (shape
    ``(rows, ...)``, the stored dtype); every other tensor as stored. Closing it closes the checkpoint."""

    def __init__(self, reader: CheckpointReader, key: Path, vocabulary: Vocabulary) -> None:
        self.reader, self.key, self.vocabulary = reader, key, vocabulary
        self.path, self.files, self.config_dir = reader.path, reader.files, reader.config_dir
        self.metadata = getattr(reader, "metadata", None)
        self._whole: dict[str, np.ndarray] = {}

    @property
    def is_safetensors(self) -> bool:
        return self.reader.is_safetensors

    def keys(self) -> list[str]:
        return self.reader.keys()

    def info(self, name: str) -> Any:
        info = self.reader.info(name)
        if not is_vocab_tensor(name):
            return info
        return TensorInfo(info.name, (self.vocabulary.rows, *info.shape[1:]), info.storage, info.file)

    def read_own(self, name: str, offset: int, out: memoryview) -> None:
        """Bytes of the checkpoint's own (unpermuted) tensor ``name``; a torch file's tensor is read whole."""
        if self.reader.is_safetensors:
            self.reader.read_range(name, offset, out)
            return
        whole = self._whole.get(name)
        if whole is None:
            t = self.reader.get(name).contiguous()
            import torch

            whole = self._whole[name] = t.reshape(-1).view(torch.uint8).numpy()
        out[:] = memoryview(whole[offset:offset + len(out)])

    def read_range(self, name: str, offset: int, out: memoryview) -> None:
        if not is_vocab_tensor(name):
            self.reader.read_range(name, offset, out)
            return
        _read_rows(self.vocabulary.rows_of(name), self, name, offset, out)

    def get(self, name: str) -> Any:
        if not is_vocab_tensor(name):
            return self.reader.get(name)
        import torch

        info = self.info(name)
        buf = torch.empty(math.prod(info.shape) * info.storage.itemsize, dtype=torch.uint8)
        if buf.numel():
            _read_rows(self.vocabulary.rows_of(name), self, name, 0, memoryview(buf.numpy()).cast("B"))
        self._whole.pop(name, None)
        return buf.view(info.storage.to_torch()).reshape(info.shape)

    def __contains__(self, name: object) -> bool:
        return name in self.reader

    def close(self) -> None:
        self._whole.clear()
        self.reader.close()


__all__ = ["VOCAB_TENSOR", "PermutedReader", "Vocabulary", "is_vocab_tensor", "model_key"]
