"""The CLI's top level: every failure is one line on stderr and a non-zero exit; a traceback only with -vv.

Each case runs ``mergelab`` in a fresh interpreter (what a user sees), with a command patched to fail in a
chosen way where no input reaches that failure by itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], tmp_path: Path, raise_in_results: str | None = None) -> subprocess.CompletedProcess:
    """``mergelab ARGS`` in a subprocess; ``raise_in_results`` is an expression raised by ``mergelab results``."""
    patch = ""
    if raise_in_results is not None:
        patch = ("import mergelab.commands.results as r\n"
                 f"def failing(args):\n    raise {raise_in_results}\n"
                 "r.run_results = failing\n")
    code = patch + "import sys\nfrom mergelab.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MERGELAB_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_user_error_is_one_line(tmp_path):
    r = run_cli(["merge", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")], tmp_path)
    assert r.returncode == 1
    assert one_line(r.stderr).startswith(f"mergelab merge: error: {tmp_path / 'missing.yaml'}: cannot read")


def test_os_error_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "cache").mkdir()
    from mergelab.experiments import ResultsStore

    db = tmp_path / "r.sqlite"
    ResultsStore(db).close()
    target = tmp_path / "a-folder.csv"
    target.mkdir()
    r = run_cli(["results", "--db", str(db), "--csv", str(target)], tmp_path)
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert line.startswith("mergelab results: error: ") and str(target) in line and "Is a directory" in line


def test_unexpected_exception_is_an_internal_error_line_and_vv_shows_the_traceback(tmp_path):
    r = run_cli(["results"], tmp_path, raise_in_results="RuntimeError('boom\\nsecond line')")
    assert r.returncode == 1
    assert one_line(r.stderr) == ("mergelab results: internal error: RuntimeError: boom second line "
                                  "(run with -vv for the traceback)")
    r = run_cli(["-v", "results"], tmp_path, raise_in_results="RuntimeError('boom')")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = run_cli(["-vv", "results"], tmp_path, raise_in_results="RuntimeError('boom')")
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "RuntimeError: boom" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "mergelab results: internal error: RuntimeError: boom"


@pytest.mark.parametrize("exc", ["RecursionError('maximum recursion depth exceeded')", "KeyError('x')",
                                 "AssertionError()", "MemoryError()"])
def test_every_exception_type_is_one_line(tmp_path, exc):
    r = run_cli(["results"], tmp_path, raise_in_results=exc)
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert line.startswith(f"mergelab results: internal error: {exc.split('(')[0]}")
    assert line.endswith(" (run with -vv for the traceback)") and "  " not in line


def test_keyboard_interrupt_exits_130_with_one_line(tmp_path):
    r = run_cli(["results"], tmp_path, raise_in_results="KeyboardInterrupt()")
    assert r.returncode == 130
    assert one_line(r.stderr) == "mergelab results: interrupted"


def test_user_error_traceback_only_with_vv(tmp_path):
    r = run_cli(["-vv", "merge", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")], tmp_path)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("mergelab merge: error: ")
