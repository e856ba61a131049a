"""``mergelab demo``: the fast end-to-end demonstration (see :mod:`mergelab.demo`)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="pretrain, fine-tune 3 experts on real digits, merge with every method",
                       description="Pretrain a small MLP, fine-tune three experts on real 8x8 digits, merge their "
                                   "backbones with every data-free method and print an accuracy table.")
    p.add_argument("--workdir", help="keep the checkpoints here (default: a temporary folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred: torch and scikit-learn (the demo); not on --help
    from mergelab.demo import format_table, run_demo

    if args.workdir:
        rows = run_demo(Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="mergelab-demo-") as tmp:
            rows = run_demo(Path(tmp))
    print(format_table(rows))
    return 0
