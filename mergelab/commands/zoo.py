"""Model-zoo verbs: ``mergelab pretrain``, ``mergelab finetune``, ``mergelab zoo``, ``mergelab evaluate``.

* ``pretrain --arch A``           pretrain a backbone on the pretraining pool (cached).
* ``finetune [SPEC] --task T ...`` fine-tune one expert from flags and/or a YAML/JSON spec file (flags win).
* ``zoo --arch A``                one expert per task at default hyperparameters, in parallel.
* ``evaluate BACKBONE``           per-task / joint / normalized accuracy of a backbone with expert heads.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mergelab.atomic_files import write_text_atomic
from mergelab.errors import SpecError
from mergelab.output_paths import refuse_overlap
from mergelab.runtime import prefer_passive_omp

_SPEC_FLAGS: list[tuple[str, type, str]] = [
    ("task", str, "task name (see the task suite)"),
    ("arch", str, "architecture: resnet_s, resnet_m, resnet_l, vit_s (default resnet_s)"),
    ("optimizer", str, "sgd | adam | adamw (default: sgd for ResNets, adamw for the ViT)"),
    ("lr", float, "learning rate (default: sgd 0.05, adam/adamw 1e-3)"),
    ("batch_size", int, "batch size B (default 64)"),
    ("steps", int, "optimizer steps K (default 300)"),
    ("data_ratio", float, "fraction of the training split, in (0, 1] (default 1)"),
    ("data_seed", int, "seed of the data subset (default 0)"),
    ("weight_decay", float, "weight decay (default: sgd 5e-4, adam 0, adamw 0.01)"),
    ("momentum", float, "SGD momentum / Adam beta1, in [0, 1) (default 0.9)"),
    ("beta2", float, "Adam beta2 (default 0.999)"),
    ("schedule", str, "constant | cosine | wsd | wsd_sqrt (default cosine)"),
    ("warmup_frac", float, "warmup fraction of the steps (default 0)"),
    ("decay_frac", float, "WSD decay fraction of the steps (default 0.2)"),
    ("min_lr_ratio", float, "final lr / lr (default 0)"),
    ("head_init", str, "probe | zero | random (default probe)"),
    ("head_mode", str, "trained | frozen (default trained); frozen: the task's probe head on the pretrained "
     "backbone, shared by every expert of the task and never updated (the CLIP protocol of task arithmetic)"),
    ("seed", int, "seed of data order, augmentation and random head init (default 0)"),
    ("checkpoint_every", int, "save model + optimizer every k steps (default 0: never)"),
]


def _bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction, default=None, help=help)


def _cache_flag(p: argparse.ArgumentParser, training: str | None = None) -> None:
    """``--cache-dir`` and ``--threads``: for a training verb (``training`` names what it trains) the pinned
    intra-op thread count of the run, recorded in the spec / config; otherwise this process's setting."""
    p.add_argument("--cache-dir", help="cache root (default $MERGELAB_CACHE or ~/.cache/mergelab)")
    if training:
        p.add_argument("--threads", type=int, help=f"torch intra-op threads {training} is pinned to (default 1, "
                       "whatever the machine: the same weights everywhere); another count trains other weights, "
                       "so it is recorded and enters the spec hash / pretrained id")
    else:
        p.add_argument("--threads", type=int, help="torch intra-op threads in this process (default: torch's "
                       "choice; use 1 when the CPU is shared: OpenMP threads spin badly under oversubscription)")


def _set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        # deferred: torch, only when the command runs; not on --help
        import torch

        torch.set_num_threads(max(1, args.threads))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a backbone on the pretraining pool (cached)")
    p.add_argument("--arch", required=True, help="architecture (resnet_s, resnet_m, resnet_l, vit_s)")
    p.add_argument("--steps", type=int, help="override the default number of steps")
    p.add_argument("--batch-size", type=int, help="override the default batch size")
    p.add_argument("--lr", type=float, help="override the default learning rate")
    p.add_argument("--seed", type=int, help="override the default seed (0)")
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.add_argument("--json", help="write the pretraining record to this JSON file")
    _cache_flag(p, "pretraining")
    p.set_defaults(func=run_pretrain)

    f = sub.add_parser("finetune", help="fine-tune one expert (flags and/or a YAML/JSON spec file)")
    f.add_argument("spec", nargs="?", help="YAML or JSON spec file; flags override its fields")
    for name, typ, help_ in _SPEC_FLAGS:
        f.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, help=help_)
    _bool_flag(f, "augment", "random affine augmentation (default off)")
    _bool_flag(f, "nesterov", "Nesterov momentum (SGD only)")
    f.add_argument("--branch-from", metavar="PARENT@STEP", help="continue from a parent's checkpoint (spec hash or expert folder)")
    f.add_argument("--decay-steps", type=int, help="with --branch-from: bifurcation child of the parent's spec that "
                   "decays (WSD) over this many steps from the branch point; other flags override its fields")
    f.add_argument("--force", action="store_true", help="retrain even if cached")
    f.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    f.add_argument("--json", help="write the expert's sidecar (with its path) to this JSON file")
    _cache_flag(f, "fine-tuning")
    f.set_defaults(func=run_finetune)

    z = sub.add_parser("zoo", help="build one expert per task at default hyperparameters, in parallel")
    z.add_argument("--arch", required=True, help="architecture")
    z.add_argument("--tasks", nargs="+", help="only these tasks (default: all)")
    z.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    z.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a spec field for every expert")
    z.add_argument("--force", action="store_true", help="retrain cached experts")
    z.add_argument("--no-progress", action="store_true", help="no progress bar")
    z.add_argument("--json", help="write a summary (per task: path, accuracies, time) to this JSON file")
    _cache_flag(z, "each expert's fine-tuning (as --set threads=N; pretraining, if needed, runs on 1)")
    z.set_defaults(func=run_zoo)

    e = sub.add_parser("evaluate", help="per-task, joint and normalized accuracy of a backbone with task heads")
    e.add_argument("backbone", help="backbone: expert / pretrained folder, merged folder, or weights file")
    e.add_argument("--experts", nargs="+", help="expert folders whose heads to use (default: the arch's default zoo)")
    e.add_argument("--arch", help="architecture (default: inferred)")
    e.add_argument("--tasks", nargs="+", help="only these tasks")
    e.add_argument("--probe", action="store_true", help="fit a linear probe per task instead of expert heads")
    e.add_argument("--reset-bn", nargs="?", const="joint", default="off", choices=["off", "joint", "per-task"],
                   help="re-estimate BatchNorm statistics on training images: joint (the default when given: "
                   "the union of the tasks) or per-task (each task's own images before scoring it)")
    e.add_argument("--bn-batches", type=int, default=20, help="batches for --reset-bn (default 20)")
    e.add_argument("--json", help="write the result to this JSON file")
    _cache_flag(e)
    e.set_defaults(func=run_evaluate)


def _write_json(path: str | None, payload: Any) -> None:
    if path:
        write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def run_pretrain(args: argparse.Namespace) -> int:
    prefer_passive_omp()  # before torch is imported (mergelab.runtime)
    # deferred: torch (models), after prefer_passive_omp; not on --help
    from mergelab.models.pretraining import PretrainConfig, pretrain
    from mergelab.models.registry import arch_info

    arch_info(args.arch)
    given = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "threads": args.threads}
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        config = PretrainConfig.default(args.arch).model_copy(update=overrides)
        config = PretrainConfig.model_validate(config.model_dump())
    except ValueError as exc:
        raise SpecError(f"invalid pretraining settings: {exc}") from None
    r = pretrain(args.arch, args.cache_dir, config, force=args.force, progress=True)
    print(f"pretrained {r.arch} (id {r.pretrained_id}) in {r.path}")
    print(f"  pool: {r.num_classes} classes, {r.n_train} train; train acc {r.train_metrics['accuracy']:.4f}, "
          f"test acc {r.test_metrics['accuracy']:.4f}; {r.wall_time_s:.1f} s")
    _write_json(args.json, r.model_dump(mode="json"))
    return 0


def _parse_branch(value: str) -> dict[str, Any]:
    parent, sep, step = value.rpartition("@")
    if not sep or not parent or not step.isdigit():
        raise SpecError(f"--branch-from expects PARENT@STEP (a spec hash or expert folder, then a step), got {value!r}")
    return {"parent": parent, "step": int(step)}


def run_finetune(args: argparse.Namespace) -> int:
    prefer_passive_omp()  # before torch is imported (mergelab.runtime)
    # deferred: torch (training), after prefer_passive_omp; not on --help
    from mergelab.training.finetuning import finetune
    from mergelab.training.spec import load_spec_file, make_spec

    if args.json:  # the sidecar must not replace the spec it was trained from
        refuse_overlap(args.json, [args.spec], what="--json")
    data: dict[str, Any] = load_spec_file(args.spec) if args.spec else {}
    for name, _, _ in _SPEC_FLAGS:
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    for name in ("augment", "nesterov", "threads"):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)

    if args.decay_steps is not None:
        if not args.branch_from:
            raise SpecError("--decay-steps needs --branch-from PARENT@STEP")
        spec = _bifurcation_child(args, data)
    else:
        if args.branch_from:
            data["branch_from"] = _parse_branch(args.branch_from)
        if "task" not in data:
            raise SpecError("no task given (--task or a spec file with 'task')")
        spec = make_spec(data)
    r = finetune(spec, args.cache_dir, force=args.force, progress=args.progress)
    state = "cached" if r.cached else f"trained in {r.wall_time_s:.1f} s"
    print(f"expert {r.arch}/{r.task} {r.spec_hash} ({state}): {r.path}")
    init = f"{r.init_test_metrics.accuracy:.4f}" if r.init_test_metrics else "-"
    print(f"  n_train {r.n_train}; test acc {r.test_metrics.accuracy:.4f} (initial {init}); "
          f"train acc {r.train_metrics.accuracy:.4f}; noise scale {r.noise_scale.value:.3g} [{r.noise_scale.form}]")
    _write_json(args.json, {**json.loads(r.sidecar_json()), "path": r.path, "cached": r.cached})
    return 0


def _bifurcation_child(args: argparse.Namespace, data: dict[str, Any]):
    """``branch_spec(parent, step, seed, decay_steps, **other fields given)`` for ``--decay-steps``."""
    # deferred: torch (training), after prefer_passive_omp; not on --help
    from mergelab.training.branching import branch_spec, find_expert

    branch = _parse_branch(args.branch_from)
    parent = find_expert(branch["parent"], args.cache_dir)
    if parent is None:
        raise SpecError(f"--branch-from: no expert folder or cached spec hash {branch['parent']!r}")
    seed = data.pop("seed", parent.spec.seed)
    return branch_spec(parent, branch["step"], seed, args.decay_steps, **data)


def _parse_sets(items: list[str]) -> dict[str, Any]:
    # deferred: yaml (about 90 ms); not on --help
    from mergelab.spec import read_yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set expects FIELD=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = read_yaml(value)
    return out


def run_zoo(args: argparse.Namespace) -> int:
    prefer_passive_omp()  # before torch is imported (mergelab.runtime)
    # deferred: torch (training), after prefer_passive_omp; not on --help
    from mergelab.models.registry import arch_info
    from mergelab.training.zoo import build_zoo

    arch_info(args.arch)
    overrides = _parse_sets(args.set)
    if args.threads is not None:
        overrides.setdefault("threads", args.threads)
    z = build_zoo(
        args.arch, args.tasks, args.cache_dir, workers=args.workers, overrides=overrides,
        force=args.force, progress=not args.no_progress,
    )
    print(f"{'task':<22} {'n_train':>7} {'init':>7} {'expert':>7} {'train':>7} {'time s':>7}  cached")
    for r in z.experts:
        init = r.init_test_metrics.accuracy if r.init_test_metrics else float("nan")
        print(f"{r.task:<22} {r.n_train:>7} {init:7.4f} {r.test_metrics.accuracy:7.4f} "
              f"{r.train_metrics.accuracy:7.4f} {r.wall_time_s:7.1f}  {'yes' if r.cached else 'no'}")
    if z.experts:
        n = len(z.experts)
        mean_init = sum(r.init_test_metrics.accuracy for r in z.experts if r.init_test_metrics) / n
        print(f"{'mean':<22} {'':>7} {mean_init:7.4f} {sum(r.test_metrics.accuracy for r in z.experts) / n:7.4f}")
    print(f"{len(z.experts)} experts ({z.trained} trained) for {z.arch} in {z.wall_time_s:.1f} s "
          f"with {z.workers} workers (pretraining {z.pretrain_time_s:.1f} s)")
    for task, msg in z.failures.items():
        print(f"FAILED {task}: {msg}")
    _write_json(args.json, {
        "arch": z.arch, "wall_time_s": z.wall_time_s, "workers": z.workers, "trained": z.trained,
        "experts": [{"task": r.task, "path": r.path, "spec_hash": r.spec_hash, "n_train": r.n_train,
                     "test_accuracy": r.test_metrics.accuracy,
                     "init_test_accuracy": r.init_test_metrics.accuracy if r.init_test_metrics else None,
                     "train_accuracy": r.train_metrics.accuracy, "wall_time_s": r.wall_time_s, "cached": r.cached}
                    for r in z.experts],
        "failures": z.failures,
    })
    return 1 if z.failures else 0


def run_evaluate(args: argparse.Namespace) -> int:
    _set_threads(args)
    # deferred: torch (evaluation); not on --help
    from mergelab.evaluation.task_suite import evaluate

    r = evaluate(
        args.backbone, args.experts, arch=args.arch, tasks=args.tasks, heads="probe" if args.probe else "experts",
        cache_dir=args.cache_dir, reset_bn=args.reset_bn.replace("-", "_"), bn_batches=args.bn_batches,
    )
    print(r.table())
    _write_json(args.json, r.model_dump(mode="json"))
    return 0
