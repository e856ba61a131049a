"""mergelab.runtime: the OpenMP wait policy is set before torch loads, never over the user's choice; the
objects alive after the imports are frozen out of the garbage collector's passes."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import os, sys
from mergelab.runtime import prefer_passive_omp
took = prefer_passive_omp()
import torch
print(took, os.environ.get("OMP_WAIT_POLICY"), prefer_passive_omp())
"""


def _run(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout.split()


def test_passive_policy_is_set_once_before_torch():
    assert _run({}) == ["True", "PASSIVE", "False"]  # second call: torch is loaded, nothing to do


def test_user_choice_is_kept():
    assert _run({"OMP_WAIT_POLICY": "ACTIVE"}) == ["False", "ACTIVE", "False"]


def test_cli_parser_does_not_import_torch():
    code = "import sys; from mergelab.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"  # so each command can still choose the policy before torch loads


def test_freeze_imported_objects_moves_live_objects_to_the_permanent_generation() -> None:
    """After the call the objects alive at that moment are frozen (the collector's passes skip them); a
    second call changes nothing; objects made later are still collected (a dropped cycle is freed)."""
    import gc
    import weakref

    from mergelab.runtime import freeze_imported_objects

    freeze_imported_objects()
    frozen = gc.get_freeze_count()
    assert frozen > 1000
    freeze_imported_objects()
    assert gc.get_freeze_count() == frozen

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    del a, b
    gc.collect()
    assert ref() is None
