"""The ``mergelab`` command line: ``mergelab <verb> ...``.

Each verb lives in its own module under :mod:`mergelab.commands` and exposes ``register(subparsers)``,
which adds its sub-parser and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and
returning an exit status). Heavy imports happen inside the command functions so ``mergelab --help`` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import traceback
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


def _verbosity(argv: Sequence[str]) -> int:
    """How many ``-v`` the top-level options hold (before the verb), for failures before parsing ends."""
    n = 0
    for arg in argv:
        if not arg.startswith("-"):
            break
        if arg == "--verbose":
            n += 1
        elif len(arg) > 1 and set(arg[1:]) == {"v"}:
            n += len(arg) - 1
    return n


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _os_error(exc: OSError) -> str:
    """``<file>: <reason>`` (both files of a failed rename) for an OSError the command did not wrap."""
    reason = exc.strerror or str(exc)
    files = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{' -> '.join(files)}: {reason}" if files else reason


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mergelab ARGV``; returns the exit status.

    Every failure is one line on stderr, ``mergelab <verb>: ...``, and a non-zero status: a
    :class:`~mergelab.errors.MergeLabError` (bad input) or an ``OSError`` (a file that cannot be read or
    written) is ``error: <message>`` with status 1; any other exception is a bug, ``internal error: <type>:
    <message> (run with -vv for the traceback)``, status 1; Ctrl-C is ``interrupted``, status 130 (128 +
    SIGINT, the shell's convention); SIGTERM and SIGHUP are handled the same way (``terminated by SIGTERM``,
    status 143 / 129). The traceback is printed, before that line, only with ``-vv``.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = _verbosity(argv)
    verb = _verb_module(argv)
    prog = f"mergelab {verb}" if verb else "mergelab"
    try:
        parser = build_parser(verb)
        args = parser.parse_args(argv)
        verbose = args.verbose
        if getattr(args, "command", None):
            prog = f"mergelab {args.command}"
        level = logging.WARNING - 10 * min(args.verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        with signals_as_interrupts():  # SIGTERM / SIGHUP unwind like Ctrl-C (temporary files are removed)
            return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        _traceback_if(verbose)
        print(f"{prog}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP
    except MergeLabError as exc:
        _traceback_if(verbose)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `mergelab results | head`: the reader left; nothing more to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except OSError as exc:
        _traceback_if(verbose)
        print(f"{prog}: error: {_one_line(_os_error(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the one place that turns any bug into one line
        _traceback_if(verbose)
        hint = "" if verbose >= 2 else " (run with -vv for the traceback)"
        detail = _one_line(str(exc))
        what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        print(f"{prog}: internal error: {what}{hint}", file=sys.stderr)
        return 1


def _traceback_if(verbose: int) -> None:
    """The current exception's traceback on stderr, with ``-vv`` only."""
    if verbose >= 2:
        traceback.print_exc()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
