"""``mergelab experiment``: run a named study preset, resumably, locally or on Ray, and write its report.

* ``mergelab experiment scaling|noise|pool [--full] [--out DIR] [--set FIELD=VALUE ...] [--config FILE.yaml]
  [--backend local|ray] [--workers N] [--ray-address ADDR] [--db PATH] [--cache DIR]`` runs the preset
  (:mod:`mergelab.experiments.presets`), records every fine-tune and merge in the results database (a rerun
  skips finished work; an interrupted run resumes), prints the verdicts and writes ``DIR/report.json`` and
  ``DIR/report.html`` (default ``DIR``: ``./mergelab-experiments/<preset>``).
* ``mergelab experiment --list`` prints the presets and their settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mergelab.errors import SpecError
from mergelab.experiments.runners import RunOptions
from mergelab.output_paths import refuse_overlap
from mergelab.runtime import prefer_passive_omp


def _assignment(text: str) -> tuple[str, Any]:
    # deferred: yaml (about 90 ms); not on --help
    from mergelab.spec import read_yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set expects FIELD=VALUE, got {text!r}")
    return key.strip(), read_yaml(raw) if raw.strip() else None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment",
        help="run a study preset (scaling laws, effective noise, pool scaling) and write its HTML report",
        description="Run a named study with its small default (or --full), resumable through the results "
                    "database, on a local process pool or a Ray cluster; print the theory-vs-measurement "
                    "verdicts and write report.json and report.html into --out.",
    )
    p.add_argument("preset", nargs="?", help="scaling | noise | pool (add --full for the full-size variant)")
    p.add_argument("--full", action="store_true", help="the full-size variant of the preset")
    p.add_argument("--list", action="store_true", help="list the presets and their settings, then exit")
    p.add_argument("--out", help="study folder (default ./mergelab-experiments/<preset>)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one setting of the preset (YAML value, e.g. lr_grid=[0.01,0.1]); repeatable")
    p.add_argument("--config", metavar="FILE.yaml", help="a YAML mapping of settings to override")
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="where tasks run (default local)")
    p.add_argument("--workers", type=int, default=2, help="tasks at once (default 2)")
    p.add_argument("--ray-address", help="ray.init(address=...): a cluster address, 'auto', or unset for a local Ray")
    p.add_argument("--db", help="results database (default: $MERGELAB_CACHE/results.sqlite)")
    p.add_argument("--cache", help="expert cache root, shared by all workers (default: $MERGELAB_CACHE or ~/.cache/mergelab)")
    p.add_argument("--no-html", action="store_true", help="write report.json only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _list() -> int:
    # deferred: the studies load torch; not on --help
    from mergelab.experiments.presets import PRESETS

    for name, preset in PRESETS.items():
        print(f"{name:14s} {preset.description}")
        for cfg in preset.configs:
            print("    " + json.dumps(cfg.model_dump(mode="json"), sort_keys=True))
    return 0


def run(args: argparse.Namespace) -> int:
    prefer_passive_omp()  # before torch is imported (mergelab.runtime)

    # deferred: the studies load torch; not on --help
    from mergelab.experiments.presets import get_preset, run_preset
    from mergelab.spec import read_yaml_file

    if args.list:
        return _list()
    if not args.preset:
        raise SpecError("name a preset (scaling, noise, pool) or use --list")
    if args.workers < 1:
        raise SpecError(f"--workers must be >= 1, got {args.workers}")
    preset = get_preset(args.preset, args.full)
    overrides: dict[str, Any] = {}
    if args.config:
        data = read_yaml_file(args.config)
        if not isinstance(data, dict):
            raise SpecError(f"{args.config}: expected a mapping of settings, got {type(data).__name__}")
        overrides.update(data)
    overrides.update(dict(_assignment(s) for s in args.sets))
    out = Path(args.out or Path("mergelab-experiments") / preset.name)
    if args.config:  # the study writes report.json/.html into --out: never over the settings file
        for name in ("report.json", "report.html"):
            refuse_overlap(out / name, [args.config], what="--out", replaces=False)

    def say(msg: str) -> None:
        print(f"[{preset.name}] {msg}", file=sys.stderr, flush=True)

    options = RunOptions(store=args.db, backend=args.backend, workers=args.workers, ray_address=args.ray_address,
                         cache_dir=args.cache, progress=not args.quiet, say=say)
    doc = run_preset(preset.name, out, overrides=overrides, options=options)
    verdicts = doc.verdicts()
    if verdicts:
        print(f"{'claim':58s} {'agrees':9s} measured")
        for v in verdicts:
            print(f"{v.claim[:58]:58s} {v.mark:9s} {v.measured}")
    print(f"report document: {out / 'report.json'}")
    if not args.no_html:
        # deferred: the HTML renderer (matplotlib for figures); not on --help
        from mergelab.report.html import write_html

        print(f"HTML report: {write_html(doc, out / 'report.html')}")
    return 0
