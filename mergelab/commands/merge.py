"""``mergelab merge SPEC.yaml --out DIR`` and ``mergelab methods``."""

from __future__ import annotations

import argparse

from mergelab.errors import SpecError
from mergelab.methods import METHODS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge checkpoints as described by a YAML spec or a mergekit config",
                       description="Merge checkpoints as described by a YAML spec (see the README's YAML reference) "
                                   "or a mergekit config (merge_method: ..., run with mergekit's semantics).")
    p.add_argument("spec", help="the merge spec or mergekit config (YAML)")
    p.add_argument("--out", "-o", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="override the spec's output dtype")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="override the spec's device")
    p.add_argument("--shard-size", help="override the spec's shard size (e.g. 500MB, 2GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-hash", action="store_true", help="do not record SHA-256 content hashes of the inputs")
    p.add_argument("--engine", choices=["auto", "numpy", "torch"], default="auto",
                   help="numpy: task arithmetic / weight averaging on the CPU without torch; torch: every method; "
                        "auto (default): numpy when it can run the merge")
    p.set_defaults(func=run_merge)

    m = sub.add_parser("methods", help="list the merging methods and their parameters")
    m.set_defaults(func=run_methods)

    c = sub.add_parser("convert", help="print the mergelab spec equivalent to a mergekit config",
                       description="Print the native merge spec (YAML) equivalent to a mergekit config, with "
                                   "mergekit's semantics as explicit options (see the README's mergekit section).")
    c.add_argument("config", help="the mergekit config (YAML)")
    c.set_defaults(func=run_convert)


def run_merge(args: argparse.Namespace) -> int:
    # deferred: the merge engine (yaml, numpy, kernels); not on --help
    from mergelab.merging import merge
    from mergelab.spec import load_spec, parse_size

    spec = load_spec(args.spec)
    updates = {}
    if args.dtype:
        updates["dtype"] = args.dtype
    if args.device:
        updates["device"] = args.device
    if args.shard_size:
        try:
            updates["shard_size"] = parse_size(args.shard_size)
        except ValueError as exc:
            raise SpecError(f"--shard-size: {exc}") from None
    if updates:
        spec = spec.model_copy(update=updates)
    result = merge(spec, args.out, overwrite=args.overwrite, progress=not args.no_progress,
                   hash_inputs=not args.no_hash, engine=args.engine)
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(f"merged {result.tensors} tensors ({result.bytes_written / 1e6:.1f} MB) with {result.method} "
          f"into {result.out_dir} in {result.seconds:.2f} s")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    # deferred: the mergekit reader (yaml, the merge engine); not on --help
    from mergelab.mergekit_config import load_mergekit, to_yaml
    from mergelab.spec import parse_spec

    native = load_mergekit(args.config)
    parse_spec(native, source=f"{args.config} (converted)")  # the printed spec is valid
    print(to_yaml(native), end="")
    return 0


def run_methods(args: argparse.Namespace) -> int:
    for method in METHODS.values():
        print(f"{method.name:16s} {method.summary}")
        for name, f in method.params.model_fields.items():
            default = f.default
            print(f"{'':18s}{f.alias or name} = {default!r}")
    return 0
