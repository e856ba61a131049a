"""``mergelab calibrate --arch resnet_s --pools 12 --pool-size 2..6 --holdout 0.33 --out DIR``.

Fits the two scale constants of the *(derived)* stability bound on real merges of random pools of cached zoo
experts and reports, on held-out pools, the Spearman rank correlation between the bound and the measured merged
loss (see :mod:`mergelab.analysis.calibration_study`). ``DIR/constants.json`` feeds
``mergelab analyze --constants``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mergelab.runtime import prefer_passive_omp


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="calibrate the (derived) stability bound's constants on real merges of cached zoo experts",
        description=(
            "Draw random pools of cached zoo experts (seeded), merge each by simple averaging and measure its mean "
            "test loss, compute the (derived) bound's terms from theta_0 measurements (cached per expert), fit "
            "c_opt and c_stab on the training pools and report the held-out Spearman rank correlation against the "
            "uncalibrated bound and the pool size. Writes constants.json (for `mergelab analyze --constants`), "
            "calibration.json, calibration.md and calibration.png."
        ),
    )
    p.add_argument("--arch", default="resnet_s", help="architecture of the zoo (default resnet_s)")
    p.add_argument("--pools", type=int, default=12, help="number of random pools (default 12)")
    p.add_argument("--pool-size", default="2..6", metavar="MIN..MAX", help="pool sizes, uniform (default 2..6)")
    p.add_argument("--holdout", type=float, default=0.33, help="fraction of pools held out (default 0.33)")
    p.add_argument("--out", "-o", help="output folder (default calibration-<arch>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pools, splits and measurement samples")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="draw pools only from these tasks' experts")
    p.add_argument("--samples", type=int, default=128,
                   help="training samples per task for the theta_0 measurements (default 128)")
    p.add_argument("--hessian-iters", type=int, default=10, help="power iterations for L_i (default 10)")
    p.add_argument("--heads", choices=["init", "expert"], default="init",
                   help="head for the theta_0 quantities (default: the recomputed initial head)")
    p.add_argument("--fit", choices=["nnls", "relative", "log"], default="nnls",
                   help="fitting method (default nnls: least squares with nonnegative constants)")
    p.add_argument("--floor", action="store_true", help="also fit an irreducible-loss floor")
    p.add_argument("--reset-bn", action="store_true",
                   help="re-estimate the merged model's BatchNorm statistics before evaluating")
    p.add_argument("--repeats", type=int, default=200,
                   help="further random train/held-out splits for the held-out Spearman distribution (default 200)")
    p.add_argument("--cache-dir", help="cache root (default $MERGELAB_CACHE or ~/.cache/mergelab)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="device (default cpu)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    prefer_passive_omp()  # before torch is imported (mergelab.runtime)

    # deferred: torch, only when the command runs; not on --help
    import torch

    from mergelab.analysis.calibration_study import StudyConfig, format_summary, parse_size_range, run_study

    if args.threads:
        torch.set_num_threads(max(1, args.threads))
    lo, hi = parse_size_range(args.pool_size)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = StudyConfig(
        arch=args.arch, pools=args.pools, min_size=lo, max_size=hi, holdout=args.holdout, seed=args.seed,
        samples=args.samples, hessian_iters=args.hessian_iters, heads=args.heads, fit_method=args.fit,
        floor=args.floor, reset_bn=args.reset_bn, repeats=args.repeats,
        tasks=tuple(args.tasks) if args.tasks else None, device=device,
    )
    out = Path(args.out) if args.out else Path(f"calibration-{args.arch}")
    res = run_study(cfg, out, cache_dir=args.cache_dir, progress=not args.no_progress)
    for note in res.notes:
        print(f"note: {note}")
    print(format_summary(res))
    return 0
