"""A merge interrupted by a signal leaves nothing behind, and a killed one's temporary folder is removed by the next
merge to the same target, never a live writer's.

Each test runs ``mergelab merge`` in a real subprocess that pauses deterministically in the middle of writing
(``$MERGELAB_TEST_PAUSE``: after its first tensor reached the temporary folder it creates a marker file and
sleeps), then signals or kills it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mergelab.checkpoints import load_state_dict, save_state_dict
from mergelab.checkpoints.writer import remove_stale_temporaries
from mergelab.merging import merge
from mergelab.process_identity import start_ticks
from mergelab.stale_temporaries import OWNER_NAME

pytestmark = pytest.mark.usefixtures("isolated_cache")

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 240  # only a bound on a hung subprocess; the tests wait for events, not for time


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(8, 8, generator=g) for i in range(4)}


def _spec(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    base = save_state_dict(_state(0), models / "base.safetensors")
    experts = [save_state_dict(_state(1 + i), models / f"e{i}.safetensors") for i in range(2)]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base),
                                    "models": [str(e) for e in experts]}))
    return spec


def _start(tmp_path: Path, spec: Path, out: Path, engine: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / f"paused-{out.name}-{engine}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MERGELAB_TEST_PAUSE": str(marker),
           "MERGELAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mergelab.cli import main; sys.exit(main())", "merge", str(spec),
         "--out", str(out), "--no-progress", "--no-hash", "--engine", engine, *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + WAIT_S
    while not marker.exists():  # the event: the writer paused with data in its temporary folder
        if proc.poll() is not None:
            raise AssertionError(f"merge ended before pausing: {proc.returncode} {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the merge never paused")
        time.sleep(0.02)
    while not marker.read_text().endswith("\n"):
        time.sleep(0.02)
    tmp = Path(marker.read_text().strip())
    assert tmp.is_dir() and tmp.name.startswith(out.name + ".") and tmp.name.endswith(".tmp")
    assert (tmp / "model.safetensors").is_file()  # mid-write: the shard is open, its first tensor written
    return proc, tmp


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_sigterm_mid_write_leaves_no_debris(tmp_path: Path, engine: str, overwrite: bool) -> None:
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"the previous model")
    proc, tmp = _start(tmp_path, spec, out, engine, *(["--overwrite"] if overwrite else []))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "mergelab merge: terminated by SIGTERM"
    assert not tmp.exists()
    assert _siblings(out) == []
    if overwrite:
        assert sorted(os.listdir(out)) == ["model.safetensors"]
        assert (out / "model.safetensors").read_bytes() == b"the previous model"
    else:
        assert not out.exists()


def test_sighup_is_handled_like_sigterm(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    proc, tmp = _start(tmp_path, spec, out, "numpy")
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 128 + signal.SIGHUP
    assert err.strip().splitlines()[-1] == "mergelab merge: terminated by SIGHUP"
    assert _siblings(out) == []


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_the_next_merge_removes_a_killed_writers_temporary_folder(tmp_path: Path, engine: str, caplog) -> None:
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    proc, tmp = _start(tmp_path, spec, out, engine)
    owner = json.loads((tmp / OWNER_NAME).read_text())
    assert owner["pid"] == proc.pid and isinstance(owner["start"], int)
    proc.kill()
    proc.communicate(timeout=WAIT_S)
    assert _siblings(out) == [tmp.name]  # SIGKILL cannot be handled: the debris is there
    with caplog.at_level("WARNING", logger="mergelab"):
        merge(str(spec), out, progress=False, engine=engine)
    assert _siblings(out) == []
    assert set(load_state_dict(out)) == set(_state(0))
    assert not (out / OWNER_NAME).exists()  # the record is not published
    assert [r.getMessage() for r in caplog.records if "removed" in r.getMessage()] == [
        f"{out}: removed {tmp}, the temporary folder of an interrupted writer (pid {proc.pid}, no longer running)"]


def test_a_live_writers_temporary_folder_is_left_alone(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    proc, tmp = _start(tmp_path, spec, out, "numpy")
    try:
        assert remove_stale_temporaries(out) == []
        assert tmp.is_dir() and (tmp / "model.safetensors").is_file()
        # a second merge to the same target publishes without touching the running writer's folder
        merge(str(spec), out, progress=False)
        assert _siblings(out) == [tmp.name]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=WAIT_S)
    assert _siblings(out) == []


def test_a_folder_whose_pid_was_reused_is_stale_and_one_without_owner_is_reported(tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    reused = tmp_path / "out.0123abcd.tmp"
    reused.mkdir()
    # this process's PID, but another start time: the writer that recorded it is gone
    (reused / OWNER_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                 "start": start_ticks(os.getpid()) - 1}))
    orphan = tmp_path / "out.4567cdef.tmp"
    orphan.mkdir()
    (tmp_path / "outer.89abcdef.tmp").mkdir()  # another target's
    with caplog.at_level("WARNING", logger="mergelab"):
        assert remove_stale_temporaries(out) == [reused]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.4567cdef.tmp", "outer.89abcdef.tmp"]
    assert f"{out}: leaving {orphan} alone: it names no owner" in caplog.text


def test_a_killed_trainers_staging_folder_is_removed_by_the_next_writer_of_the_artifact(tmp_path: Path,
                                                                                      caplog) -> None:
    """The zoo's artifact folders (pretrained backbones, experts) are staged the same way: a staging folder whose
    owner is gone is removed by the next writer of that artifact, a running owner's is kept."""
    from mergelab.models.artifact_dir import staged_dir

    target = tmp_path / "expert"
    dead = tmp_path / ".expert.staging-99-0123abcd"
    dead.mkdir()
    (dead / "weights.pt").write_bytes(b"x" * 100)
    (dead / OWNER_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                               "start": start_ticks(os.getpid()) - 1}))
    live = tmp_path / ".expert.staging-98-4567cdef"
    live.mkdir()
    (live / OWNER_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                               "start": start_ticks(os.getpid())}))
    other = tmp_path / ".expert2.staging-97-89abcdef"  # another artifact's
    other.mkdir()
    with caplog.at_level("WARNING", logger="mergelab"), staged_dir(target) as stage:
        assert OWNER_NAME in os.listdir(stage)
        (stage / "a.txt").write_text("a")
    assert sorted(os.listdir(target)) == ["a.txt"]  # the owner record is not published
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "expert"])
    assert f"removed {dead}, the temporary folder of an interrupted writer" in caplog.text
