"""The ``mergelab`` command line: ``mergelab <verb> ...``.

Each verb lives in its own module under :mod:`mergelab.commands` and exposes ``register(subparsers)``,
which adds its sub-parser and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and
returning an exit status). Heavy imports happen inside the command functions so ``mergelab --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from mergelab import __version__
from mergelab.errors import MergeLabError
from mergelab.interrupts import signals_as_interrupts

# Modules under mergelab.commands, in the order their verbs appear in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "quickstart",
    "merge",
    "demo",
    "zoo",
    "analyze",
    "calibrate",
    "results",
    "compare",
    "experiment",
    "report",
)

log = logging.getLogger("mergelab")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only`` (a name in ``COMMAND_MODULES``), only that module's verbs are
    registered, so running one verb does not import every command's dependencies."""
    parser = argparse.ArgumentParser(
        prog="mergelab",
        description="Merge fine-tuned models in parameter space and analyse their mergeability.",
    )
    parser.add_argument("--version", action="version", version=f"mergelab {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES if only is None else (only,):
        try:
            module = importlib.import_module(f"mergelab.commands.{name}")
        except ModuleNotFoundError as exc:  # a verb whose module is not present in this build
            if exc.name == f"mergelab.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def _verb_module(argv: Sequence[str]) -> str | None:
    """The command module to import alone: the first positional argument when it names a module whose verb
    has that name (``merge``, ``zoo``, ...); None (import all) otherwise, e.g. for ``--help`` or ``methods``."""
    for arg in argv:
        if arg in ("-h", "--help"):  # the top-level help lists every verb
            return None
        if not arg.startswith("-"):
            return arg if arg in COMMAND_MODULES else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_verb_module(argv))
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with signals_as_interrupts():  # SIGTERM / SIGHUP unwind like Ctrl-C (temporary files are removed)
            return int(args.func(args) or 0)
    except MergeLabError as exc:
        print(f"mergelab {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"mergelab {args.command}: {exc or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
