#!/usr/bin/env python
"""Merge throughput and peak memory: mergelab against mergekit on a ~700M-parameter Llama-style model.

Run with mergelab's interpreter (``.venv/bin/python bench/merge_throughput.py`` or ``make bench``).

1. Generates once, into ``--cache`` (default ``bench/.cache``, gitignored), a Llama-style bf16 checkpoint
   (hidden 2048, intermediate 5504, 12 layers, vocab 32000, tied embeddings: 672M parameters, 1.34 GB) in
   three safetensors shards with an index and a LlamaConfig ``config.json``, plus ``--experts`` (default 4)
   "fine-tuned" variants: base + N(0, (0.01 * rms(tensor))^2) per tensor, rounded to bf16. Tensors come
   from seeded generators in chunks, so generation holds about one tensor at a time.
2. Times, each run in a fresh subprocess and the tools ALTERNATING (mergelab, mergekit, mergelab, ...),
   every data-free method of the catalog (:data:`CASES`, ``--methods`` to choose): task arithmetic (lambda
   1, unit weights; mergekit ``task_arithmetic``, ``normalize: false``), TIES (density 0.5, per-tensor trim,
   divisor = agreeing weight, election by mass; mergekit ``ties``) and TIES over the whole model (mergelab
   only), weight averaging (mergekit ``linear``), DARE linear and DARE-TIES (density 0.5), breadcrumbs
   (density 0.9, gamma 0.01), model stock and SLERP (base -> first expert, t 0.5), each against mergekit's
   method of the same name; the last six ``--slow-repeats`` times (default once). mergekit's other methods
   (DELLA, DELLA linear, breadcrumbs-TIES, SCE, NuSLERP, Multi-SLERP, Karcher mean, NearSwap, Arcee Fusion,
   passthrough, RAM, RAM+; once each) run mergelab's translation of the mergekit config (``translated`` cases).
   Wall time and the child's own peak RSS come from ``os.wait4`` (the rusage of exactly that child).
   The floor is a child that reads every tensor of every input once with mergelab's reader, as the numpy
   engine reads (raw bytes in blocks into one reused buffer, no torch import). Task arithmetic runs on the
   numpy engine (the default for it); its torch engine (``--engine torch``) is timed alongside.
   mergelab runs with a warm SHA-256 digest cache (``$MERGELAB_CACHE`` under the cache folder); one extra
   TA run with the digest cache cleared shows the cost of hashing the inputs the first time.
3. Checks once that mergelab's and mergekit's outputs agree within bf16 rounding (TA and TIES).

``--baseline CHECKOUT`` times another mergelab source tree (an earlier commit, e.g. from
``git worktree add /tmp/before <commit>``) in the same run, alternating with this one on both engines, and
prints baseline/mergelab ratios: the before/after table of a change to the engine, free of machine drift.

mergekit is looked for at ``--mergekit`` or ``.venv-mergekit/bin/mergekit-yaml`` (a separate venv: it is
not a mergelab dependency); without it only mergelab is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergelab.checkpoints import CheckpointWriter, open_checkpoint
from mergelab.checkpoints.shards import plan_shards

ROOT = Path(__file__).resolve().parents[1]
TORCH_ENGINE = "mergelab (torch eng.)"
BASELINE = "mergelab (baseline)"
BASELINE_TORCH = "baseline (torch eng.)"
DEFAULT_CACHE = ROOT / "bench" / ".cache"

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, HEADS = 2048, 5504, 12, 32000, 16
N_SHARDS = 3
GEN_VERSION = 1  # bump to invalidate cached models when the generator changes
CHUNK = 1 << 23  # elements generated at a time
NOISE = 0.01  # fine-tune noise, relative to the tensor's RMS

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": HEADS,
    "head_dim": HIDDEN // HEADS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 2048,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}


def llama_plan() -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor, in the order HF writes a Llama checkpoint."""
    bf16 = torch.bfloat16
    plan = [("model.embed_tokens.weight", (VOCAB, HIDDEN), bf16)]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (HIDDEN,), bf16),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE), bf16),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN), bf16),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN), bf16),
            (p + "post_attention_layernorm.weight", (HIDDEN,), bf16),
            (p + "self_attn.k_proj.weight", (HIDDEN, HIDDEN), bf16),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN), bf16),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN), bf16),
            (p + "self_attn.v_proj.weight", (HIDDEN, HIDDEN), bf16),
        ]
    plan.append(("model.norm.weight", (HIDDEN,), bf16))
    return plan


def _shard_limit(plan, n_shards: int) -> int:
    """The smallest shard size limit for which the greedy writer makes ``n_shards`` shards."""
    sizes = [math.prod(s) * d.itemsize for _, s, d in plan]
    limit = -(-sum(sizes) // n_shards)
    while len(plan_shards(plan, limit)) > n_shards:
        limit += min(sizes)
    return limit


def _seed(*parts: object) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def _generate_tensor(name: str, shape: tuple[int, ...], base: torch.Tensor | None, variant: int) -> torch.Tensor:
    """Base weights (variant 0): norms ~ 1 + N(0, 0.02), matrices ~ N(0, 0.02). Variants: base + noise."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(_seed(GEN_VERSION, variant, name))
    is_norm = len(shape) == 1
    if base is not None:
        flat_base = base.reshape(-1)
        rms = float(flat_base.float().pow(2).mean().sqrt())
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        x = torch.randn(m, generator=gen)
        if base is None:
            x.mul_(0.02)
            if is_norm:
                x.add_(1.0)
        else:
            x.mul_(NOISE * rms).add_(flat_base[start : start + m].float())
        out[start : start + m] = x
    return out.reshape(shape)


def _write_model(path: Path, variant: int, base_dir: Path | None) -> None:
    plan = llama_plan()
    base = open_checkpoint(base_dir) if base_dir is not None else None
    try:
        with CheckpointWriter(path, plan, max_shard_bytes=_shard_limit(plan, N_SHARDS), overwrite=True) as w:
            for name, shape, _ in plan:
                w.write(name, _generate_tensor(name, shape, base.get(name) if base else None, variant))
            config_dir = path.parent / f".{path.name}.config"
            config_dir.mkdir(parents=True, exist_ok=True)
            (config_dir / "config.json").write_text(json.dumps(LLAMA_CONFIG, indent=2) + "\n")
            w.finish(copy_files_from=config_dir)
            shutil.rmtree(config_dir)
    finally:
        if base is not None:
            base.close()


def ensure_models(cache: Path, n_experts: int) -> tuple[Path, list[Path]]:
    """Generate (once) the base model and ``n_experts`` variants under ``cache/models``."""
    models = cache / "models"
    meta_path = models / "models.json"
    meta = {"version": GEN_VERSION, "config": LLAMA_CONFIG, "noise": NOISE}
    base = models / "base"
    experts = [models / f"expert{i}" for i in range(1, n_experts + 1)]
    try:
        done = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        done = {}
    have = set(done.get("complete", [])) if {k: done.get(k) for k in meta} == meta else set()
    if "base" not in have:
        have = set()  # the variants derive from the base: regenerate everything
    for i, path in enumerate([base] + experts):
        if path.name in have and path.is_dir():
            continue
        t0 = time.perf_counter()
        _write_model(path, i, None if i == 0 else base)
        have.add(path.name)
        models.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps({**meta, "complete": sorted(have)}, indent=2))
        print(f"generated {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return base, experts


# ----------------------------------------------------------------------------------------------- running


@dataclass
class Run:
    label: str
    wall: float  # seconds
    cpu: float  # user + system seconds of the child
    rss: int  # peak resident set of the child, bytes
    load: float  # 1-minute load average when the run started (other work on the machine skews wall time)
    ok: bool


@dataclass
class Series:
    method: str
    tool: str
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.runs if r.ok]
        return statistics.median(values) if values else None


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run_child(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` to completion; its wall time and its own peak RSS (``os.wait4`` rusage)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        load = _load()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    ok = proc.returncode == 0
    if not ok:
        tail = log.read_text().splitlines()[-15:]
        print(f"  FAILED (exit {proc.returncode}): {' '.join(cmd)}\n    " + "\n    ".join(tail), flush=True)
    return Run(label=" ".join(cmd[:2]), wall=wall, cpu=usage.ru_utime + usage.ru_stime, rss=rss, load=load, ok=ok)


@dataclass(frozen=True)
class Case:
    """One timed merge: mergelab's method and parameters, and the same merge in mergekit (None: mergelab only)."""

    method: str
    params: dict
    mergekit: str | None = None
    mergekit_model: dict = field(default_factory=dict)  # per-model parameters (besides weight 1)
    mergekit_global: dict = field(default_factory=dict)
    experts: int | None = None  # experts used (None: all)
    repeats: int | None = None  # runs (None: --repeats); the slow CPU-bound ones default to --slow-repeats
    # the mergelab spec is mergelab's translation of the mergekit config (mergelab.mergekit_config), so both
    # tools run the same merge by construction (the methods added with mergekit parity, issue 15)
    translated: bool = False
    with_base: bool = True  # the mergekit config names the base (base_model, and first among the models)
    weighted: bool = True  # the mergekit config gives each expert weight 1


#: Every data-free method of the catalog, as the benchmark times it (the key is the row label).
CASES: dict[str, Case] = {
    "weight_average": Case("weight_average", {}, "linear", {}, {"normalize": True}),
    "task_arithmetic": Case("task_arithmetic", {"lambda": 1.0}, "task_arithmetic", {},
                            {"normalize": False, "lambda": 1.0}),
    "ties": Case("ties", {"density": 0.5, "lambda": 1.0, "trim_scope": "tensor", "disjoint_divisor": "weight",
                          "sign_election": "mass"}, "ties", {"density": 0.5}, {"normalize": True, "lambda": 1.0}),
    # the paper's whole-model trim: mergekit has no equivalent
    "ties_global": Case("ties", {"density": 0.5, "lambda": 1.0, "trim_scope": "global", "disjoint_divisor": "weight",
                                 "sign_election": "mass"}),
    "dare_linear": Case("dare_linear", {"density": 0.5, "lambda": 1.0}, "dare_linear", {"density": 0.5},
                        {"normalize": False, "lambda": 1.0}, repeats=-1),
    "dare_ties": Case("dare_ties", {"density": 0.5, "lambda": 1.0, "disjoint_divisor": "weight"}, "dare_ties",
                      {"density": 0.5}, {"normalize": True, "lambda": 1.0}, repeats=-1),
    "breadcrumbs": Case("breadcrumbs", {"density": 0.9, "gamma": 0.01, "lambda": 1.0}, "breadcrumbs",
                        {"density": 0.9, "gamma": 0.01}, {"normalize": False, "lambda": 1.0}, repeats=-1),
    "model_stock": Case("model_stock", {}, "model_stock", {}, {}, repeats=-1),
    "slerp": Case("slerp", {"t": 0.5}, "slerp", {}, {"t": 0.5}, experts=1, repeats=-1),
    # mergekit's other methods, as tests/test_mergekit_equivalence.py configures them (density and gamma as
    # the DARE and breadcrumbs rows above); mergelab runs mergelab's translation of the same config
    "della": Case("della", {}, "della", {"density": 0.5}, {"lambda": 1.0}, repeats=-1, translated=True),
    "della_linear": Case("della_linear", {}, "della_linear", {"density": 0.5}, {"normalize": False, "lambda": 1.0},
                         repeats=-1, translated=True),
    "breadcrumbs_ties": Case("breadcrumbs_ties", {}, "breadcrumbs_ties", {"density": 0.9, "gamma": 0.01},
                             {"lambda": 1.0}, repeats=-1, translated=True),
    "sce": Case("sce", {}, "sce", {}, {"select_topk": 0.5}, repeats=-1, translated=True, weighted=False),
    "nuslerp": Case("nuslerp", {}, "nuslerp", {}, {}, experts=2, repeats=-1, translated=True, with_base=False),
    "multislerp": Case("multislerp", {}, "multislerp", {}, {}, repeats=-1, translated=True),
    "karcher": Case("karcher", {}, "karcher", {}, {}, repeats=-1, translated=True, with_base=False, weighted=False),
    "nearswap": Case("nearswap", {}, "nearswap", {}, {"t": 0.01}, experts=1, repeats=-1, translated=True,
                     weighted=False),
    "arcee_fusion": Case("arcee_fusion", {}, "arcee_fusion", {}, {}, experts=1, repeats=-1, translated=True,
                         weighted=False),
    # RAM: mergekit's defaults (epsilon 1e-5; RAM+ r 0.1, alpha 0.2), no weights
    "ram": Case("ram", {}, "ram", {}, {}, repeats=-1, translated=True, weighted=False),
    "ramplus_tl": Case("ramplus_tl", {}, "ramplus_tl", {}, {}, repeats=-1, translated=True, weighted=False),
    "passthrough": Case("passthrough", {}, "passthrough", {}, {}, experts=1, repeats=-1, translated=True,
                        with_base=False, weighted=False),
}
#: Rows run by default: every method (ties per tensor and over the whole model).
DEFAULT_METHODS = ",".join(CASES)


def mergelab_spec(method: str, base: Path, experts: list[Path]) -> dict:
    case = CASES[method]
    if case.translated:
        from mergelab.mergekit_config import translate

        spec = translate(mergekit_config(method, base, experts, None) or {}, source=f"bench case {method}")
        return {**spec, "device": "cpu"}
    used = experts if case.experts is None else experts[: case.experts]
    spec: dict = {
        "method": case.method,
        "base": str(base),
        "models": [{"path": str(e), "weight": 1.0} for e in used],
        "dtype": "bfloat16",
        "device": "cpu",
    }
    if case.params:
        spec["parameters"] = dict(case.params)
    return spec


def mergekit_config(method: str, base: Path, experts: list[Path], compute_dtype: str | None) -> dict | None:
    """The same merge as :func:`mergelab_spec` in mergekit's YAML, or None when mergekit has no such merge."""
    case = CASES[method]
    if case.mergekit is None:
        return None
    used = experts if case.experts is None else experts[: case.experts]
    uses_weights = case.mergekit not in ("model_stock", "slerp") and case.weighted
    models = [{"model": str(base)}] if case.with_base else []
    for e in used:
        entry: dict = {"model": str(e)}
        params = {**({"weight": 1.0} if uses_weights else {}), **case.mergekit_model}
        if params:
            entry["parameters"] = params
        models.append(entry)
    cfg: dict = {"merge_method": case.mergekit, "base_model": str(base), "models": models, "out_dtype": "bfloat16"}
    if not case.with_base:
        del cfg["base_model"]
    if case.mergekit == "linear":  # a weighted mean of the experts: no base
        del cfg["base_model"]
        cfg["models"] = models[1:]
    if compute_dtype not in (None, "auto"):
        cfg["dtype"] = compute_dtype  # mergekit computes in this dtype (default: the inputs', bf16 here)
    if case.mergekit_global:
        cfg["parameters"] = dict(case.mergekit_global)
    return cfg


def _write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _mergelab_cmd(args: argparse.Namespace) -> list[str]:
    exe = Path(sys.executable).parent / "mergelab"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from mergelab.cli import main; sys.exit(main())"]


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MERGELAB_CACHE"] = str(cache / "mergelab-cache")
    # both tools run offline; these keep transformers/huggingface_hub from trying the network
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return env


def _rm(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


READ_ALL = """
import sys
from mergelab.checkpoints import open_checkpoint
# as the numpy engine reads: raw bytes, block by block (2**18 bf16 entries), into one reused buffer; no torch
block = bytearray(2 * 2**18)
view = memoryview(block)
total = 0
for p in sys.argv[1:]:
    with open_checkpoint(p) as r:
        for name in r.keys():
            info = r.info(name)
            size = info.storage.itemsize
            for d in info.shape:
                size *= d
            for start in range(0, size, len(block)):
                r.read_range(name, start, view[: min(len(block), size - start)])
            total += size
print(f"read {total} bytes")
"""


# ------------------------------------------------------------------------------------------- comparing


def compare(a_dir: Path, b_dir: Path, base_dir: Path) -> dict:
    """Per tensor: max |a - b| relative to the tensor's scale (max |base|), and how many entries differ.

    One bf16 ulp at the tensor's largest magnitude is at most 2**-7 of it, so outputs that agree "within
    bf16 rounding" have ``max_rel <= 2**-7``; ``frac_diff`` counts entries that are not bit-identical and
    ``frac_gt_ulp`` those differing by more than one ulp of their own magnitude.
    """
    worst = {"max_rel": 0.0, "tensor": None}
    n_total = n_diff = n_gt_ulp = 0
    missing, extra = [], []
    with open_checkpoint(a_dir) as a, open_checkpoint(b_dir) as b, open_checkpoint(base_dir) as base:
        a_keys, b_keys = set(a.keys()), set(b.keys())
        missing = sorted(a_keys - b_keys)
        extra = sorted(b_keys - a_keys)
        for name in a.keys():
            if name not in b_keys:
                continue
            x, y = a.get(name).float(), b.get(name).float()
            scale = float(base.get(name).float().abs().max()) if name in base else float(x.abs().max())
            d = (x - y).abs()
            rel = float(d.max()) / max(scale, 1e-30)
            if rel > worst["max_rel"]:
                worst = {"max_rel": rel, "tensor": name}
            n_total += d.numel()
            n_diff += int(torch.count_nonzero(d))
            # one bf16 ulp of the larger magnitude: 2**(floor(log2|v|) - 7)
            mag = torch.maximum(x.abs(), y.abs()).clamp_min(1e-30)
            ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
            n_gt_ulp += int(torch.count_nonzero(d > ulp * 1.0001))
    return {
        **worst,
        "frac_diff": n_diff / max(n_total, 1),
        "frac_gt_ulp": n_gt_ulp / max(n_total, 1),
        "only_in_mergelab": missing,
        "only_in_mergekit": extra,
        "within_bf16": worst["max_rel"] <= 2.0**-7 and not missing,
    }


def identical_tensors(a_dir: Path, b_dir: Path) -> tuple[int, list[str]]:
    """How many tensors the two outputs hold, and the names of those whose bits (or dtype, shape, presence)
    differ: the before/after check of ``--baseline`` on the benchmark model."""
    differ = []
    with open_checkpoint(a_dir) as a, open_checkpoint(b_dir) as b:
        names = sorted(set(a.keys()) | set(b.keys()))
        for name in names:
            if name not in a.keys() or name not in b.keys():
                differ.append(name)
                continue
            x, y = a.get(name), b.get(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(
                    x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
                differ.append(name)
    return len(names), differ


def _in_fresh_process(fn, *args):
    """``fn(*args)`` in a spawned interpreter. The checks load whole tensors; run in the benchmark's own
    process they would raise its peak RSS, which every later timed child inherits as the starting value of its
    ``ru_maxrss`` (Linux keeps the high-water mark across fork and exec), inflating the memory column."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def ties_kept_fraction(base_dir: Path, expert_dir: Path, density: float) -> float:
    """Fraction of task-vector entries that survive mergelab's per-tensor trim (:func:`mergelab.ops.trim`).

    mergekit keeps exactly ``floor(density * n)`` entries per tensor (argsort, ties broken arbitrarily);
    mergelab keeps exactly as many, breaking the massive ties of bf16 task vectors by position. Printed to
    show that the two trims keep the same number of entries on these inputs.
    """
    from mergelab.ops import trim

    kept = total = 0
    with open_checkpoint(base_dir) as b, open_checkpoint(expert_dir) as e:
        for name in b.keys():
            tau = e.get(name).float() - b.get(name).float()
            kept += int(torch.count_nonzero(trim(tau, density) != 0))
            total += tau.numel()
    return kept / total


def profile_merge(method: str, base: Path, experts: list[Path], cache: Path, cold_digests: bool) -> dict:
    """One in-process merge with each stage timed on the thread that runs it: reading (the read-ahead
    thread), the method's arithmetic (the main thread, plus its compute threads for TIES), writing (the
    write-behind thread, including the fsync of a full shard), finishing (last fsync, rename) and hashing
    the inputs. Stages overlap, so their wall times add up to more than the total; thread CPU time shows
    what each costs. Run in a fresh interpreter (``--profile``) so nothing is warm but the page cache."""
    import resource

    import mergelab.merging.torch_backend as engine
    import mergelab.provenance as provenance
    from mergelab.checkpoints import writer
    from mergelab.methods import get_method

    stages: dict[str, list[float]] = {}

    def timed(owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        def wrapper(*a, **k):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                acc = stages.setdefault(label, [0.0, 0.0])
                acc[0] += time.perf_counter() - t0
                acc[1] += time.thread_time() - c0

        setattr(owner, attr, wrapper)

    m = get_method(method)
    timed(engine.TorchInputs, "read", "read inputs (read-ahead thread)")
    timed(writer.CheckpointWriter, "write", "write tensors (write-behind thread)")
    timed(writer.CheckpointWriter, "finish", "finish (last fsync, rename)")
    timed(provenance, "file_digest", "hash inputs (SHA-256, main thread)")
    holder = type("H", (), {"kernel": staticmethod(engine.kernel(m))})
    timed(holder, "kernel", f"method ({method}, main thread)")
    engine.KERNELS[m.name] = holder.kernel

    os.environ["MERGELAB_CACHE"] = str(cache / "mergelab-cache")
    digests = cache / "mergelab-cache" / "digests.json"
    if cold_digests and digests.exists():
        digests.unlink()
    out = cache / "runs" / f"out-profile-{method}"
    _rm(out)
    t0, c0 = time.perf_counter(), time.process_time()
    from mergelab.spec import parse_spec

    # the torch engine's stages (the numpy engine has no separate read and compute stages to time)
    engine.merge_streaming(parse_spec(mergelab_spec(method, base, experts)), out, progress=False)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"total": total, "cpu": cpu, "stages": stages, "load": _load(),
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)}


def print_profile(method: str, result: dict, label: str) -> None:
    print(f"profile: {method}, {label}: {result['total']:.2f} s wall, {result['cpu']:.2f} CPU-s (all threads), "
          f"peak RSS {result['rss'] / 1e9:.2f} GB, load {result['load']:.1f}")
    for name, (wall, cpu) in result["stages"].items():
        print(f"  {name:42s} {wall:7.2f} s wall {cpu:7.2f} s thread CPU")


# ---------------------------------------------------------------------------------------------- main


def _fmt(v: float | None, scale: float = 1.0, width: int = 9, prec: int = 2) -> str:
    return f"{'-':>{width}s}" if v is None else f"{v / scale:{width}.{prec}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="models, outputs and logs (default bench/.cache)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help=f"comma-separated rows of CASES (default: all of them, {DEFAULT_METHODS})")
    ap.add_argument("--slow-repeats", type=int, default=1,
                    help="runs of the slow CPU-bound methods (DARE, breadcrumbs, model stock, SLERP, the translated mergekit "
                         "methods; default 1)")
    ap.add_argument("--mergekit", type=Path, default=ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml",
                    help="mergekit-yaml executable (skipped when absent)")
    ap.add_argument("--no-mergekit", action="store_true", help="time mergelab only")
    ap.add_argument("--mergekit-dtype", default="auto",
                    help="mergekit's compute dtype for the timed runs; 'auto' leaves it to mergekit (the inputs' "
                         "dtype, bf16 here), its fastest on CPU")
    ap.add_argument("--check-dtype", default="float32",
                    help="mergekit's compute dtype for the equivalence check (mergelab computes in float32); "
                         "if it differs from --mergekit-dtype, one extra mergekit run per method")
    ap.add_argument("--mergekit-args", default="--out-shard-size 500M --no-copy-tokenizer --no-write-model-card --quiet",
                    help="extra mergekit-yaml flags (default: its fastest, lowest-memory CPU settings found here)")
    ap.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                    help="another mergelab source tree (e.g. `git worktree add /tmp/before <commit>`), timed "
                         "alternately with this one as 'mergelab (baseline)' with the same interpreter: a same-run "
                         "before/after table; a method the baseline lacks is reported as failed for it")
    ap.add_argument("--no-check", action="store_true", help="skip the output equivalence check")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep every merged model under CACHE/runs (default: each method's outputs are removed once "
                         "it is checked; at 1.3 GB each, all of them need ~100 GB)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--profile", metavar="METHOD",
                    help="instead of timing: time the stages of one torch-engine merge on their threads in a fresh process, "
                         "first with an empty digest cache, then with a warm one")
    ap.add_argument("--_profile-child", dest="profile_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    cache = args.cache.resolve()
    env = _env(cache)
    base, experts = ensure_models(cache, args.experts)
    if args.profile_child:
        method, cold = args.profile_child.split(":")
        result = profile_merge(method, base, experts, cache, cold == "cold")
        print_profile(method, result, "digests not cached (first run: inputs hashed)" if cold == "cold"
                      else "digests cached")
        return 0
    if args.profile:
        for mode in ("cold", "warm"):
            subprocess.run([sys.executable, __file__, "--cache", str(cache), "--experts", str(args.experts),
                            "--_profile-child", f"{args.profile}:{mode}"], check=True, env=env)
        return 0
    inputs = [base] + experts
    in_bytes = sum(f.stat().st_size for d in inputs for f in d.glob("*.safetensors"))
    print(f"inputs: {len(inputs)} checkpoints, {in_bytes / 1e9:.2f} GB in total; {os.cpu_count()} CPUs, "
          f"load average {_load():.2f}", flush=True)

    mergekit = None if args.no_mergekit else args.mergekit
    if mergekit is not None and not mergekit.exists():
        print(f"mergekit not found at {mergekit}: timing mergelab only", flush=True)
        mergekit = None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in CASES]
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)}; choose from {DEFAULT_METHODS}")
    from mergelab.merging.backend import backend

    numpy_methods = backend("numpy").methods  # the others run on the torch engine (the default for them)
    work = cache / "runs"
    logs = cache / "logs"
    ml_cmd = _mergelab_cmd(args)
    baseline_env = None
    if args.baseline is not None:
        if not (args.baseline / "mergelab" / "cli.py").is_file():
            ap.error(f"--baseline: {args.baseline} is not a mergelab source tree (no mergelab/cli.py)")
        # the baseline's package first on the path, ahead of this venv's editable install
        baseline_env = {**env, "PYTHONPATH": str(args.baseline.resolve())}
    # -P: no working directory on sys.path, so PYTHONPATH, not the tree the bench runs from, gives mergelab
    baseline_cmd = [sys.executable, "-P", "-c", "import sys; from mergelab.cli import main; sys.exit(main())"]
    series: dict[tuple[str, str], Series] = {}

    def show(method: str, tool: str, i: int, run: Run) -> None:
        print(f"{method:16s} {tool:18s} run {i}: {run.wall:7.2f} s wall {run.cpu:7.2f} s cpu "
              f"{run.rss / 1e9:5.2f} GB  (load {run.load:.1f})", flush=True)

    # the floor: read every tensor of every input once
    floor = series.setdefault(("read all inputs", "mergelab"), Series("read all inputs", "mergelab"))
    for r in range(args.repeats):
        run = run_child([sys.executable, "-c", READ_ALL, *map(str, inputs)], logs / f"read-{r}.log", env)
        floor.runs.append(run)
        show("read all inputs", "mergelab", r + 1, run)

    # one mergelab run with an empty digest cache: SHA-256 of every input file (later runs reuse the digests)
    digests = Path(env["MERGELAB_CACHE"]) / "digests.json"
    if "task_arithmetic" in methods:
        if digests.exists():
            digests.unlink()
        spec = _write_yaml(work / "task_arithmetic.mergelab.yaml", mergelab_spec("task_arithmetic", base, experts))
        out = work / "out-mergelab-task_arithmetic"
        _rm(out)
        run = run_child([*ml_cmd, "merge", str(spec), "--out", str(out), "--no-progress"],
                        logs / "mergelab-ta-cold-digests.log", env)
        series[("task_arithmetic", "mergelab (hashing)")] = Series("task_arithmetic", "mergelab (hashing)", [run])
        show("task_arithmetic", "mergelab (hashing)", 1, run)

    check_outputs: dict[str, Path] = {}
    checks: dict[str, dict] = {}
    identical: dict[str, tuple[int, list[str]]] = {}
    for method in methods:
        case = CASES[method]
        ml_spec = _write_yaml(work / f"{method}.mergelab.yaml", mergelab_spec(method, base, experts))
        mk_yaml = mergekit_config(method, base, experts, args.mergekit_dtype)
        mk_cfg = None if mk_yaml is None else _write_yaml(work / f"{method}.mergekit.yml", mk_yaml)
        method_mergekit = mergekit if mk_cfg is not None else None
        repeats = args.repeats if case.repeats is None else min(args.repeats, args.slow_repeats)
        both_engines = case.method in numpy_methods  # else auto is the torch engine: one series
        ml_out = work / f"out-mergelab-{method}"
        mk_out = work / f"out-mergekit-{method}"
        s_ml = series.setdefault((method, "mergelab"), Series(method, "mergelab"))
        # both methods run on the numpy engine; the torch engine is timed alongside for comparison
        s_torch = series.setdefault((method, TORCH_ENGINE), Series(method, TORCH_ENGINE))
        s_mk = series.setdefault((method, "mergekit"), Series(method, "mergekit"))
        s_base = series.setdefault((method, BASELINE), Series(method, BASELINE))
        s_base_torch = series.setdefault((method, BASELINE_TORCH), Series(method, BASELINE_TORCH))
        for r in range(repeats):
            _rm(ml_out)
            run = run_child([*ml_cmd, "merge", str(ml_spec), "--out", str(ml_out), "--no-progress"],
                            logs / f"mergelab-{method}-{r}.log", env)
            s_ml.runs.append(run)
            show(method, "mergelab", r + 1, run)
            if baseline_env is not None and (r == 0 or any(x.ok for x in s_base.runs)):
                out = work / f"out-baseline-{method}"
                _rm(out)
                run = run_child([*baseline_cmd, "merge", str(ml_spec), "--out", str(out), "--no-progress"],
                                logs / f"baseline-{method}-{r}.log", baseline_env)
                s_base.runs.append(run)
                show(method, BASELINE, r + 1, run)
            if both_engines:
                _rm(ml_out)
                run = run_child([*ml_cmd, "merge", str(ml_spec), "--out", str(ml_out), "--no-progress",
                                 "--engine", "torch"], logs / f"mergelab-torch-{method}-{r}.log", env)
                s_torch.runs.append(run)
                show(method, TORCH_ENGINE, r + 1, run)
                if baseline_env is not None and (r == 0 or any(x.ok for x in s_base_torch.runs)):
                    out = work / f"out-baseline-{method}"
                    _rm(out)
                    run = run_child([*baseline_cmd, "merge", str(ml_spec), "--out", str(out), "--no-progress",
                                     "--engine", "torch"], logs / f"baseline-torch-{method}-{r}.log", baseline_env)
                    s_base_torch.runs.append(run)
                    show(method, BASELINE_TORCH, r + 1, run)
            if method_mergekit is not None:
                _rm(mk_out)
                run = run_child([str(mergekit), str(mk_cfg), str(mk_out), *args.mergekit_args.split()],
                                logs / f"mergekit-{method}-{r}.log", env)
                s_mk.runs.append(run)
                show(method, "mergekit", r + 1, run)
        if not both_engines:
            del series[(method, TORCH_ENGINE)]
        if method_mergekit is None:
            del series[(method, "mergekit")]
        if baseline_env is None:
            del series[(method, BASELINE)]
        if baseline_env is None or not both_engines:
            del series[(method, BASELINE_TORCH)]
        if method_mergekit is not None and not args.no_check and args.check_dtype != args.mergekit_dtype:
            cfg = _write_yaml(work / f"{method}.mergekit-{args.check_dtype}.yml",
                              mergekit_config(method, base, experts, args.check_dtype) or {})
            out = work / f"out-mergekit-{method}-{args.check_dtype}"
            _rm(out)
            tool = f"mergekit ({args.check_dtype})"
            run = run_child([str(mergekit), str(cfg), str(out), *args.mergekit_args.split()],
                            logs / f"mergekit-{method}-{args.check_dtype}.log", env)
            series[(method, tool)] = Series(method, tool, [run])
            show(method, tool, 1, run)
            check_outputs[method] = out
        elif method_mergekit is not None:
            check_outputs[method] = mk_out
        if case.method.startswith(("dare", "della")):  # random masks: the two tools' draws differ: no check
            check_outputs.pop(method, None)
        # this method's checks now, then its outputs go (each is a whole model: 1.3 GB here)
        ml_out = work / f"out-mergelab-{method}"
        if not args.no_check and method in check_outputs:
            mk_out = check_outputs[method]
            if ml_out.is_dir() and mk_out.is_dir():
                checks[f"{method} vs {mk_out.name}"] = _in_fresh_process(compare, ml_out, mk_out, base)
            timed = work / f"out-mergekit-{method}"
            if timed != mk_out and ml_out.is_dir() and timed.is_dir():
                checks[f"{method} vs {timed.name} (mergekit computing in {args.mergekit_dtype})"] = \
                    _in_fresh_process(compare, ml_out, timed, base)
        before_out = work / f"out-baseline-{method}"
        if baseline_env is not None and ml_out.is_dir() and before_out.is_dir() and any(r.ok for r in s_base.runs):
            identical[method] = _in_fresh_process(identical_tensors, ml_out, before_out)
        if not args.keep_outputs:
            for out in (ml_out, work / f"out-mergekit-{method}", work / f"out-mergekit-{method}-{args.check_dtype}",
                        before_out):
                _rm(out)

    kept = None
    if "ties" in methods and not args.no_check:
        kept = ties_kept_fraction(base, experts[0], 0.5)

    # ---- report
    print()
    print(f"{'method':18s} {'tool':20s} {'runs':>4s} {'wall s':>9s} {'cpu s':>9s} {'peak RSS GB':>12s} {'load':>6s}"
          "   (medians)")
    for (method, tool), s in series.items():
        n = sum(r.ok for r in s.runs)
        print(f"{method:18s} {tool:20s} {n:4d} {_fmt(s.median('wall'))} {_fmt(s.median('cpu'))} "
              f"{_fmt(s.median('rss'), 1e9, 12)} {_fmt(s.median('load'), 1, 6, 1)}")
    print()

    def med(method: str, tool: str, attr: str = "wall") -> float | None:
        s = series.get((method, tool))
        return s.median(attr) if s else None

    ratios: dict[str, float] = {}
    for method in methods:
        for attr in ("wall", "cpu"):
            ml, mk = med(method, "mergelab", attr), med(method, "mergekit", attr)
            if ml and mk:
                ratios[f"{method}: mergekit/mergelab ({attr})"] = mk / ml
            before = med(method, BASELINE, attr)
            if ml and before:
                ratios[f"{method}: baseline/mergelab ({attr})"] = before / ml
            before, now = med(method, BASELINE_TORCH, attr), med(method, TORCH_ENGINE, attr)
            if now and before:
                ratios[f"{method}: baseline/mergelab, torch engine ({attr})"] = before / now
    for attr in ("wall", "cpu"):
        ta, ties = med("task_arithmetic", "mergelab", attr), med("ties", "mergelab", attr)
        if ta and ties:
            ratios[f"mergelab TIES/TA ({attr})"] = ties / ta
        ta_torch, ties_torch = med("task_arithmetic", TORCH_ENGINE, attr), med("ties", TORCH_ENGINE, attr)
        if ta_torch and ties_torch:
            ratios[f"torch engine TIES/TA ({attr})"] = ties_torch / ta_torch
        if ties_torch and ties:
            ratios[f"TIES torch engine/numpy engine ({attr})"] = ties_torch / ties
    targets = {"task_arithmetic: mergekit/mergelab": (">=", 3.0), "ties: mergekit/mergelab": (">=", 10.0),
               "mergelab TIES/TA": ("<=", 2.0),
               # issue 14: every data-free method at least 3x faster than mergekit
               **{f"{m}: mergekit/mergelab": (">=", 3.0) for m in CASES if m not in ("task_arithmetic", "ties")}}
    for key, value in ratios.items():
        op, goal = targets.get(key.rsplit(" (", 1)[0], ("", None))
        met = "" if goal is None else (f"   target {op} {goal:g}: " +
                                       ("met" if (value >= goal if op == ">=" else value <= goal) else "MISSED"))
        print(f"{key:42s} {value:6.2f}{met}")
    peak = max((r.rss for (m, t), s in series.items() if t == "mergelab" and m in methods for r in s.runs), default=0)
    if peak:
        print(f"{'mergelab max peak RSS GB':42s} {peak / 1e9:6.2f}   target < 2.5: {'met' if peak < 2.5e9 else 'MISSED'}")
    for key, c in checks.items():
        print(f"equivalence {key}: max|mergelab - mergekit| / max|base| = {c['max_rel']:.2e} (in {c['tensor']}); "
              f"{c['frac_diff'] * 100:.3f}% of entries differ, {c['frac_gt_ulp'] * 100:.4f}% by more than one bf16 ulp; "
              f"within bf16 rounding of the tensor scale: {c['within_bf16']}"
              + (f"; only in mergekit's output: {c['only_in_mergekit']}" if c["only_in_mergekit"] else "")
              + (f"; missing from mergekit's output: {c['only_in_mergelab']}" if c["only_in_mergelab"] else ""))
    for method, (n, differ) in identical.items():
        print(f"baseline vs this tree, {method}: " + ("all {n} tensors bit-identical".format(n=n) if not differ else
              f"{len(differ)} of {n} tensors differ ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''})"))
    if kept is not None:
        print(f"TIES trim at density 0.5 on these bf16 inputs: mergelab keeps {kept * 100:.2f}% of each task vector "
              "(ties at the threshold broken by position); mergekit keeps exactly 50% (ties broken by argsort order)")
    if args.json:
        args.json.write_text(json.dumps({
            "series": [{"method": s.method, "tool": s.tool, "runs": [r.__dict__ for r in s.runs]}
                       for s in series.values()],
            "ratios": ratios, "checks": checks, "input_bytes": in_bytes,
            "baseline_identical": {m: {"tensors": n, "differ": d} for m, (n, d) in identical.items()},
            "ties_kept_fraction": kept,
        }, indent=2))
    # a method the baseline lacks fails there by design: only this tree's and mergekit's runs count
    failed = any(not r.ok for s in series.values() if s.tool not in (BASELINE, BASELINE_TORCH) for r in s.runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
