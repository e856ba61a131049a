#!/usr/bin/env python
"""Peak memory of FW-Merging (hard, soft) and AdaMerging against the pool size, plus time per iteration.

Run with mergelab's interpreter: ``.venv/bin/python bench/fw_memory.py`` (options: ``--help``).

Pool: the resnet_s zoo in ``~/.cache/mergelab/zoo`` (``--zoo``) when it holds enough experts; else a small
synthetic zoo is fine-tuned once into ``bench/.cache/fwzoo`` (tiny experts, a few steps each). The objective
tasks are ``--tasks`` (default 4: mnist, mnist_rot90, digits, shapes); a pool of size N holds their experts
first, then the other experts in name order (the "irrelevant" ones of the FW-Merging paper's pool-scaling
experiment).

Every (method, N, repeat) runs in a fresh subprocess, which

1. imports everything, builds the merge context, loads the tasks' data and heads, and runs one
   forward/backward pass of the backbone on that data (so activations, the allocator and the libraries are
   warm and common to all methods); its peak RSS so far is the baseline;
2. runs the method and reports what it added at its peak: the C heap in use (glibc ``mallinfo2``
   ``uordblks + hblkhd``, where torch's CPU tensors live; sampled every 2 ms by a thread) minus its value
   before, and ``peak RSS - baseline`` (``getrusage(RUSAGE_SELF).ru_maxrss``). The heap figure is the precise
   one: RSS also keeps pages the allocator holds after frees, and its noise (a few MB) is of the order of a
   whole resnet_s pool (0.3 MB per expert).

Methods: ``fw_hard`` (published defaults except ``--fw-iterations``), ``fw_soft`` (k = number of tasks,
``--fw-iterations``, ``--pgd-steps``), ``adamerging`` (layer-wise, ``--ada-steps`` Adam steps: its memory
peak is reached at the first step, when all N task vectors are stacked, so a few steps suffice), if that
module exists. Prints a table of medians over ``--repeats`` runs: the memory added (MB) and the seconds per
FW iteration (per Adam step for AdaMerging).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ZOO = Path.home() / ".cache" / "mergelab" / "zoo"
SYNTHETIC_CACHE = ROOT / "bench" / ".cache" / "fwzoo"
DEFAULT_TASKS = ["mnist", "mnist_rot90", "digits", "shapes"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class HeapSampler(threading.Thread):
    """Bytes in use in the C heap (glibc ``mallinfo2``: ``uordblks + hblkhd``; torch's CPU tensors live there),
    sampled every ``interval`` seconds; ``peak_mb`` is the largest sample. Unlike the RSS high-water mark it
    does not count memory that was freed but kept by the allocator. ``None`` without glibc >= 2.33."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self._stop_event = threading.Event()
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = _Mallinfo2
            self._mallinfo = libc.mallinfo2
        except (OSError, AttributeError):
            self._mallinfo = None

    def used(self) -> int:
        m = self._mallinfo()
        return int(m.uordblks + m.hblkhd)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(self.interval)

    def measure(self) -> None:
        if self._mallinfo is not None:
            self.peak = self.used()
            self.start()

    def stop(self) -> float | None:
        if self._mallinfo is None:
            return None
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self.used())
        return self.peak / 2**20


def _experts(zoo: Path, arch: str) -> dict[str, Path]:
    """task -> expert folder (the first spec folder of each task) in ``zoo/<arch>/experts``."""
    out: dict[str, Path] = {}
    for task_dir in sorted((zoo / arch / "experts").glob("*")):
        folders = sorted(p for p in task_dir.iterdir() if (p / "expert.json").exists())
        if folders:
            out[task_dir.name] = folders[0]
    return out


def _synthetic_zoo(n: int, tasks: list[str]) -> Path:
    """A zoo of ``n`` quick resnet_s experts fine-tuned into ``bench/.cache/fwzoo`` (reused when present)."""
    import torch

    from mergelab.models.pretraining import PretrainConfig, pretrain
    from mergelab.tasks import list_tasks
    from mergelab.training import finetune

    torch.set_num_threads(1)
    root = SYNTHETIC_CACHE
    pretrain("resnet_s", root, PretrainConfig(steps=100, batch_size=64, lr=0.05))
    names = tasks + [t for t in list_tasks() if t not in tasks]
    for task in names[:n]:
        finetune(dict(task=task, arch="resnet_s", steps=60, batch_size=32, data_ratio=0.2), root)
    return root


def _zoo_root(args: argparse.Namespace) -> Path:
    zoo = Path(args.zoo).expanduser()
    if args.synthetic or len(_experts(zoo, "resnet_s")) < max(args.pool_sizes):
        print(f"(no resnet_s zoo with {max(args.pool_sizes)} experts at {zoo}: fine-tuning a synthetic one into "
              f"{SYNTHETIC_CACHE})", file=sys.stderr)
        _synthetic_zoo(max(args.pool_sizes), args.tasks)
        # pretrain/finetune(cache_dir=root) store under root/zoo/<arch>/...
        return SYNTHETIC_CACHE / "zoo"
    return zoo


# -------------------------------------------------------------------------------------------- the worker


def worker(args: argparse.Namespace) -> None:
    import torch

    from mergelab.methods.data_informed.context import MergeContext
    from mergelab.methods.data_informed.frank_wolfe import FWHardParams, FWSoftParams, frank_wolfe
    from mergelab.methods.data_informed.objectives import ModelObjective
    from mergelab.models import read_backbone_state
    from mergelab.spec import DataSpec

    torch.set_num_threads(1)
    zoo = Path(args.zoo_root)
    experts = _experts(zoo, "resnet_s")
    order = args.tasks + sorted(t for t in experts if t not in args.tasks)
    pool = [experts[t] for t in order[: args.n]]
    context = MergeContext.from_spec(zoo / "resnet_s" / "pretrained", [(p, 1.0) for p in pool],
                                     DataSpec(tasks=args.tasks, samples_per_task=args.samples), torch.device("cpu"),
                                     progress=False)
    # warm-up common to every method: data, heads, one forward/backward pass of the backbone
    backbone = context.build_backbone()
    data = {t: context.samples(t, "train") for t in context.tasks}
    context.samples(context.tasks[0], "test")
    heads = {t: context.head(t) for t in context.tasks}
    base = {k: v.float() for k, v in read_backbone_state(context.base_path).items()}
    ModelObjective(backbone, heads, data, "ce", context.data.batch_size).value_and_grad(base)
    del base, backbone, data
    gc.collect()
    baseline = _rss_mb()
    sampler = HeapSampler()
    heap_baseline = sampler.used() / 2**20 if sampler._mallinfo is not None else None
    sampler.measure()
    started = time.perf_counter()
    if args.method == "fw_hard":
        _, trace = frank_wolfe(context, FWHardParams(iterations=args.fw_iterations))
        per_it = statistics.mean(it.seconds for it in trace.iterations)
    elif args.method == "fw_soft":
        _, trace = frank_wolfe(context, FWSoftParams(iterations=args.fw_iterations, pgd_steps=args.pgd_steps))
        per_it = statistics.mean(it.seconds for it in trace.iterations)
    else:
        from mergelab.methods.data_informed.adamerging import AdaMergingParams, adamerging

        adamerging(context, AdaMergingParams(steps=args.ada_steps))
        per_it = (time.perf_counter() - started) / max(args.ada_steps, 1)
    total = time.perf_counter() - started
    heap_peak = sampler.stop()
    print(json.dumps({"method": args.method, "n": args.n, "baseline_mb": baseline, "peak_mb": _rss_mb(),
                      "added_mb": _rss_mb() - baseline,
                      "heap_added_mb": None if heap_peak is None else heap_peak - heap_baseline,
                      "seconds": total, "seconds_per_iteration": per_it}))


# ---------------------------------------------------------------------------------------------- the driver


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", default=str(DEFAULT_ZOO), help="zoo folder (default ~/.cache/mergelab/zoo)")
    ap.add_argument("--synthetic", action="store_true", help="use (and build) the synthetic zoo")
    ap.add_argument("--pool-sizes", default="4,8,12,16,20", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), type=lambda s: s.split(","))
    ap.add_argument("--methods", default="fw_hard,fw_soft,adamerging", type=lambda s: s.split(","))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=100, help="samples per task (paper: 100)")
    ap.add_argument("--fw-iterations", type=int, default=2)
    ap.add_argument("--pgd-steps", type=int, default=10)
    ap.add_argument("--ada-steps", type=int, default=10)
    ap.add_argument("--json", help="also write the raw runs here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--zoo-root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return

    import importlib.util

    methods = [m for m in args.methods
               if m != "adamerging" or importlib.util.find_spec("mergelab.methods.data_informed.adamerging")]
    zoo_root = _zoo_root(args)
    runs = []
    for rep in range(args.repeats):
        for n in args.pool_sizes:
            for method in methods:  # methods interleaved, so machine load drifts hit all of them alike
                cmd = [sys.executable, __file__, "--worker", "--method", method, "--n", str(n), "--zoo-root",
                       str(zoo_root), "--tasks", ",".join(args.tasks), "--samples", str(args.samples),
                       "--fw-iterations", str(args.fw_iterations), "--pgd-steps", str(args.pgd_steps),
                       "--ada-steps", str(args.ada_steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    raise SystemExit(f"{method} N={n} failed:\n{proc.stderr[-3000:]}")
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                runs.append(run)
                print(f"  rep {rep} {method:10s} N={n:2d}: +{run['added_mb']:.1f} MB, "
                      f"{run['seconds_per_iteration']:.2f} s/it", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))

    def med(method: str, n: int, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["method"] == method and r["n"] == n)

    sizes = args.pool_sizes
    print(f"\nzoo: {zoo_root}  tasks: {', '.join(args.tasks)}  medians of {args.repeats} runs")
    header = f"{'method':12s}" + "".join(f"{'N=' + str(n):>9s}" for n in sizes) + f"{'MB/expert':>11s}"

    def row(m: str, key: str) -> str:
        vals = [med(m, n, key) for n in sizes]
        slope = (vals[-1] - vals[0]) / (sizes[-1] - sizes[0]) if len(sizes) > 1 else float("nan")
        return f"{m:12s}" + "".join(f"{v:9.1f}" for v in vals) + f"{slope:11.2f}"

    if all(r["heap_added_mb"] is not None for r in runs):
        print("\nC-heap memory in use added by the method at its peak (MB; glibc mallinfo2, sampled every 2 ms)")
        print(header)
        for m in methods:
            print(row(m, "heap_added_mb"))
    print("\npeak RSS added by the method (MB, ru_maxrss - warm baseline)")
    print(header)
    for m in methods:
        print(row(m, "added_mb"))
    print("\nseconds per FW iteration (per Adam step for adamerging)")
    print(f"{'method':12s}" + "".join(f"{'N=' + str(n):>9s}" for n in sizes))
    for m in methods:
        print(f"{m:12s}" + "".join(f"{med(m, n, 'seconds_per_iteration'):9.2f}" for n in sizes))
    baselines = {m: statistics.median(r["baseline_mb"] for r in runs if r["method"] == m) for m in methods}
    print("\nbaseline RSS (MB): " + ", ".join(f"{m} {v:.0f}" for m, v in baselines.items()))


if __name__ == "__main__":
    main()
