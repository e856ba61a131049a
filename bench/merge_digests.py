"""Bit-identity harness of the data-free merge path: SHA-256 of every merged tensor, to compare two versions.

Builds small hand-made models (a base and three experts, float32 and bfloat16; 1-D, 2-D and 3-D tensors,
one larger than a compute block and than the selection's "small tensor" size, an empty tensor and an
integer tensor), merges them with every data-free method under each of its semantics options (TIES per
tensor and over the whole model, both sign elections and divisors, DARE with fixed seeds and both
rescalings, ...) on every engine that runs the merge (``torch``; ``numpy`` when it can), and records the
SHA-256 of every output tensor's bytes.

    python bench/merge_digests.py --out digests.json      # record
    python bench/merge_digests.py --check digests.json    # compare: exit 1 on any difference
    python bench/merge_digests.py --check digests.json --methods ties,slerp       # only these methods' cases
    python bench/merge_digests.py --update digests.json --methods breadcrumbs     # re-record only these

``--check`` compares the cases the file records (cases added since are counted, not compared);
``--update`` replaces the named methods' records in the file and keeps every other one: for a change that
alters a method's output on purpose (issue 15: breadcrumbs' band keeps an exact count on tied magnitudes, so
its bf16 outputs changed), stated in the commit that makes it.

A refactoring of the merge engine must leave every digest unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

SHAPES: dict[str, tuple[int, ...]] = {
    "embed.weight": (700, 1000),  # 700k entries: several blocks, sample-based selection
    "layer.0.weight": (64, 48),
    "layer.0.bias": (1000,),
    "layer.1.conv": (3, 5, 7),
    "layer.1.scale": (1,),
    "empty": (0, 4),
}

#: (method, parameters, models used, engines that must run it)
CASES: list[tuple[str, dict[str, Any], int]] = [
    ("weight_average", {}, 3),
    ("task_arithmetic", {}, 3),
    ("task_arithmetic", {"lambda": 0.7}, 3),
    ("ties", {"density": 0.2}, 3),
    ("ties", {"density": 0.2, "trim_scope": "tensor"}, 3),
    ("ties", {"density": 0.05, "trim_scope": "global", "sign_election": "count"}, 3),
    ("ties", {"density": 0.3, "trim_scope": "tensor", "disjoint_divisor": "weight", "lambda": 0.8}, 3),
    ("ties", {"density": 1.0}, 3),
    ("dare_linear", {"density": 0.5, "seed": 7}, 3),
    ("dare_linear", {"density": 0.3, "rescale": "l1", "seed": 1}, 3),
    ("dare_ties", {"density": 0.5, "seed": 3}, 3),
    ("dare_ties", {"density": 0.4, "seed": 3, "sign_election": "count", "disjoint_divisor": "weight"}, 3),
    ("breadcrumbs", {}, 3),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "lambda": 0.9}, 3),
    ("model_stock", {}, 3),
    ("slerp", {"t": 0.3}, 1),
    ("slerp", {"t": 0.6}, 2),
    # issue 15 (recorded with it)
    ("della", {"density": 0.6, "epsilon": 0.2, "seed": 3}, 3),
    ("della_linear", {"density": 0.5, "spacing": "mergekit", "rescale": "l1", "seed": 1}, 3),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}, 3),
    ("sce", {"select_topk": 0.3}, 3),
    ("nuslerp", {}, 2),
    ("multislerp", {}, 3),
    ("karcher", {}, 3),
    ("nearswap", {"t": 0.01}, 1),
    ("arcee_fusion", {}, 1),
    ("passthrough", {}, 1),
    ("ram", {}, 3),
    ("ramplus_tl", {"epsilon": 0.01, "r": 0.5, "alpha": 2.0}, 3),
    ("ties", {"density": 0.5, "trim_scope": "tensor", "zero_sign": "positive"}, 3),
    ("dare_ties", {"density": 1.0, "sign_election": "count", "zero_sign": "positive"}, 3),
    # rescale: l1 for the magnitude trims (recorded with it)
    ("ties", {"density": 0.3, "trim_scope": "tensor", "rescale": "l1"}, 3),
    ("ties", {"density": 0.2, "rescale": "l1", "lambda": 0.8}, 3),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "rescale": "l1"}, 3),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1, "rescale": "l1"}, 3),
]
#: methods that take no per-model weights (merged with unit weights only)
UNWEIGHTED = ("model_stock", "slerp", "sce", "nearswap", "arcee_fusion", "passthrough", "ram", "ramplus_tl")
#: spec sections beyond parameters, per case index (two whole-model trim groups; a narrower output dtype)
EXTRA: dict[int, dict[str, Any]] = {
    3: {"overrides": [{"pattern": "layer.*", "parameters": {"density": 0.5}}]},
    2: {"dtype": "bfloat16"},
}
WEIGHTS = ([1.0, 1.0, 1.0], [0.5, 1.25, 0.75])


def build_models(root: Path, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    """A base and three experts with correlated task vectors (some signs disagree), ties in bf16."""
    gen = torch.Generator().manual_seed(1234)
    base = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    paths = []
    for i in range(4):
        state = {}
        for n, s in SHAPES.items():
            if i == 0:
                t = base[n]
            else:
                shared = torch.randn(s, generator=torch.Generator().manual_seed(99)) * 0.02
                own = torch.randn(s, generator=gen) * 0.02 * (1 + i)
                t = base[n] + shared + own
            state[n] = t.to(dtype).contiguous()
        state["layer.0.num_batches_tracked"] = torch.tensor(10 + i, dtype=torch.int64)
        folder = root / f"{'base' if i == 0 else f'expert{i}'}_{str(dtype).split('.')[-1]}"
        folder.mkdir()
        save_file(state, str(folder / "model.safetensors"))
        paths.append(folder)
    return paths[0], paths[1:]


def digests_of(folder: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    out: dict[str, str] = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            out[name] = f"{t.dtype}:{tuple(t.shape)}:{hashlib.sha256(data).hexdigest()}"
    return out


def run_all(methods: set[str] | None = None) -> dict[str, dict[str, str]]:
    from mergelab.errors import SpecError
    from mergelab.merging import merge

    results: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for dtype in (torch.float32, torch.bfloat16):
            base, experts = build_models(root, dtype)
            for ci, (method, params, n_models) in enumerate(CASES):
                if methods is not None and method not in methods:
                    continue
                for wi, weights in enumerate(WEIGHTS):
                    if wi and method in UNWEIGHTED:
                        continue
                    spec = {"method": method, "base": str(base), "parameters": params,
                            "models": [{"path": str(p), "weight": w}
                                       for p, w in zip(experts[:n_models], weights)],
                            **EXTRA.get(ci, {})}
                    for engine in ("torch", "numpy"):
                        key = f"{str(dtype).split('.')[-1]}/{ci}:{method}{json.dumps(params, sort_keys=True)}/w{wi}/{engine}"
                        out = root / f"out{len(results)}"
                        try:
                            merge(spec, out, progress=False, hash_inputs=False, engine=engine)  # type: ignore[arg-type]
                        except SpecError as exc:
                            if engine == "numpy" and "numpy engine cannot run" in str(exc):
                                continue
                            raise
                        except ValueError as exc:  # a merge the method refuses (recorded: a change is a difference)
                            results[key] = {"error": str(exc)}
                            continue
                        results[key] = digests_of(out)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path)
    group.add_argument("--check", type=Path)
    group.add_argument("--update", type=Path)
    parser.add_argument("--methods", help="comma-separated methods (default: every case)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    methods = None if args.methods is None else set(args.methods.split(","))
    results = run_all(methods)
    n = sum(len(v) for v in results.values())
    if args.update:
        if methods is None:
            parser.error("--update needs --methods (re-record only what changed on purpose)")
        before = json.loads(args.update.read_text())
        kept = {k: v for k, v in before.items() if k.split("/")[1].split(":")[1].split("{")[0] not in methods}
        args.update.write_text(json.dumps({**kept, **results}, indent=1, sort_keys=True))
        print(f"re-recorded {len(results)} merges of {', '.join(sorted(methods))}, kept {len(kept)} -> {args.update}")
        return 0
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
        print(f"recorded {len(results)} merges, {n} tensors -> {args.out}")
        return 0
    before = json.loads(args.check.read_text())
    if methods is not None:
        before = {k: v for k, v in before.items() if k.split("/")[1].split(":")[1].split("{")[0] in methods}
    # cases added after the file was recorded are new, not differences; a recorded case must still be there
    new = sorted(set(results) - set(before))
    diffs = [(k, t) for k in sorted(before)
             for t in sorted(set(before[k]) | set(results.get(k, {})))
             if before[k].get(t) != results.get(k, {}).get(t)]
    for k, t in diffs[:20]:
        print(f"DIFFERENT: {k} {t}: {before.get(k, {}).get(t)} vs {results.get(k, {}).get(t)}")
    print(f"checked {len(results) - len(new)} merges, {n - sum(len(results[k]) for k in new)} tensors against "
          f"{args.check}: {'all identical' if not diffs else f'{len(diffs)} differ'}"
          + (f" ({len(new)} merges of cases the file does not record: not compared)" if new else ""))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
