"""Task runners: local process pool and Ray, skipping finished work, recording failures, resuming.

Task functions live at module level here so spawned workers can import them (``test_runners:...``); every
call leaves a marker file, so the tests count how often each task really ran.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from mergelab.experiments import ResultsStore, Task, TaskOutput, key_of, run_tasks

TESTS_DIR = Path(__file__).resolve().parent


def _calls(markers: str | Path, name: str) -> int:
    return sum(1 for p in Path(markers).iterdir() if p.name.startswith(f"{name}."))


def tiny_task(spec, artifacts_dir=None):
    """Square ``spec["x"]``; optionally wait for another task to start, fail, sleep on its first call, write an
    artifact, or report torch's thread count."""
    markers = Path(spec["markers"])
    first_call = _calls(markers, spec["name"]) == 0
    (markers / f"{spec['name']}.{os.getpid()}.{uuid.uuid4().hex}").touch()
    deadline = time.monotonic() + 60
    while spec.get("wait_for") and not _calls(markers, spec["wait_for"]) and time.monotonic() < deadline:
        time.sleep(0.05)  # until that task has started
    if spec.get("fail"):
        raise ValueError(f"task {spec['name']} fails on purpose")
    if spec.get("sleep_first") and first_call:
        time.sleep(spec["sleep_first"])
    if spec.get("write") and artifacts_dir is not None:
        artifacts_dir.mkdir(parents=True, exist_ok=True)
        (artifacts_dir / "out.txt").write_text(str(spec["x"]))
    out = {"square": spec["x"] ** 2, "half": np.float32(0.5)}
    if spec.get("torch"):  # a task importing torch itself gets one intra-op thread
        import torch

        out["threads"] = torch.get_num_threads()
    return out


def crash_task(spec):
    """Kill the worker process outright (a segfault or the OOM killer, as the pool sees it)."""
    if spec.get("crash"):
        os._exit(3)
    return {"x": spec["x"]}


def output_task(spec):
    return TaskOutput(metrics={"x": spec["x"]}, artifacts={"elsewhere": "/data/x.bin"})


def _tasks(markers: Path, specs: list[dict], study: str = "s") -> list[Task]:
    return [Task("tiny", {"markers": str(markers), **s}, tiny_task, study=study) for s in specs]


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    d = tmp_path / "markers"
    d.mkdir()
    return d


# --- tasks -----------------------------------------------------------------------------------------------


def test_task_key_and_function_checks():
    t = Task("finetune", {"b": 1, "a": 2}, tiny_task, study="x")
    assert t.key == key_of("finetune", {"a": 2, "b": 1}) and t.fn_ref == "test_runners:tiny_task"
    assert Task("finetune", {"a": 2, "b": 1}, "test_runners:tiny_task").key == t.key
    with pytest.raises(ValueError, match="module-level"):
        Task("k", {}, lambda spec: {})

    def nested(spec):
        return {}

    with pytest.raises(ValueError, match="module-level"):
        Task("k", {}, nested)
    with pytest.raises(ValueError, match="module:function"):
        Task("k", {}, "no_colon")


def test_run_tasks_rejects_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="backend"):
        run_tasks([], tmp_path / "r.sqlite", backend="slurm")
    with pytest.raises(ValueError, match="retries"):
        run_tasks([], tmp_path / "r.sqlite", retries=-1)


# --- local backend ---------------------------------------------------------------------------------------


def test_local_runs_records_failure_and_rerun_skips(tmp_path: Path, markers: Path):
    store = ResultsStore(tmp_path / "results.sqlite")
    specs = [{"name": "a", "x": 1, "write": True, "torch": True}, {"name": "b", "x": 2},
             {"name": "bad", "x": 3, "fail": True},
             {"name": "c", "x": 4}]
    tasks = _tasks(markers, specs)
    tasks.append(Task("tiny", {**tasks[0].spec}, tiny_task))  # a duplicate, run once
    tasks.append(Task("out", {"x": 7}, output_task, study="s"))
    art = tmp_path / "artifacts"
    summary = run_tasks(tasks, store, workers=2, artifacts_dir=art, progress=False, retries=1)

    assert summary.counts == {"done": 4, "skipped": 0, "failed": 1, "interrupted": 0}, summary
    assert not summary.ok and str(summary).startswith("4 done, 0 skipped, 1 failed")
    # every task ran once; the failing one twice (retries=1), and the others still completed
    assert [_calls(markers, n) for n in ("a", "b", "c", "bad")] == [1, 1, 1, 2]
    rows = {r.spec.get("name", "out"): r for r in store.query(study="s")}
    assert set(rows) == {"a", "b", "c", "bad", "out"}
    a = rows["a"]
    assert a.status == "done" and a.key == tasks[0].key and a.attempts == 1
    assert a.metrics == {"square": 1, "half": 0.5, "threads": 1}  # numpy -> JSON; one torch thread per worker
    assert a.timings["wall_s"] >= 0 and {"cpu_s", "started", "finished", "host", "pid"} <= set(a.timings)
    assert a.versions["fn"] == "test_runners:tiny_task" and a.versions["mergelab"] and a.versions["torch"]
    assert Path(a.artifacts["out.txt"]).read_text() == "1"
    assert Path(a.artifacts["out.txt"]).parent == art / f"tiny-{a.key[:16]}"
    assert rows["b"].artifacts is None and rows["c"].metrics == {"square": 16, "half": 0.5}
    assert rows["out"].metrics == {"x": 7} and rows["out"].artifacts == {"elsewhere": "/data/x.bin"}
    bad = rows["bad"]
    assert bad.status == "failed" and bad.attempts == 2 and bad.metrics is None
    assert bad.error.startswith("ValueError: task bad fails on purpose") and "Traceback" in bad.error
    assert "tiny_task" in bad.error and bad.timings["wall_s"] >= 0

    # a rerun skips finished work without starting a pool; the failed task is still pending work
    good = [t for t in tasks[:4] if t.spec["name"] != "bad"]
    again = run_tasks(good, store, workers=2, progress=False)
    assert again.counts == {"done": 0, "skipped": 3, "failed": 0, "interrupted": 0}
    assert [_calls(markers, n) for n in ("a", "b", "c")] == [1, 1, 1]
    assert [t.spec["name"] for t in store.pending(tasks[:4])] == ["bad"]


class _StopAfterFirst:
    def __init__(self):
        self.seen = []

    def __call__(self, task, row):
        self.seen.append((task.spec["name"], row.status))
        raise KeyboardInterrupt


def test_interrupted_run_resumes(tmp_path: Path, markers: Path):
    """Ctrl-C in the driver keeps finished rows, puts running ones back to pending; the next run resumes.
    Rows left running by a driver killed outright are taken over once its process is gone (same host),
    while a row running under a live driver is left alone."""
    import multiprocessing
    import socket

    store = ResultsStore(tmp_path / "results.sqlite")
    specs = [{"name": "fast", "x": 1, "wait_for": "slow"}, {"name": "slow", "x": 2, "sleep_first": 60},
             {"name": "c", "x": 3},
             {"name": "orphan", "x": 4}, {"name": "busy", "x": 5}]
    tasks = _tasks(markers, specs, study="resume")
    stop = _StopAfterFirst()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_tasks(tasks, store, workers=2, progress=False, on_result=stop)
    assert time.perf_counter() - t0 < 50  # the sleeping worker was stopped, not waited for
    assert stop.seen == [("fast", "done")]
    status = {r.spec["name"]: r.status for r in store.query(study="resume")}
    assert status == {"fast": "done", "slow": "pending", "c": "pending", "orphan": "pending", "busy": "pending"}
    assert _calls(markers, "slow") == 1 and _calls(markers, "c") == 0

    # meanwhile: a killed driver left "orphan" running, a live one is running "busy"
    dead = multiprocessing.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    host = socket.gethostname()
    store.mark_running(tasks[3].key, owner=f"{host}:{dead.pid}")
    store.mark_running(tasks[4].key, owner=f"{host}:{os.getppid()}")

    summary = run_tasks(tasks, store, workers=1, progress=False)
    assert summary.counts == {"done": 3, "skipped": 2, "failed": 0, "interrupted": 0}
    assert summary.skipped == [tasks[0].key, tasks[4].key]
    assert [_calls(markers, n) for n in ("fast", "slow", "c", "orphan", "busy")] == [1, 2, 1, 1, 0]
    rows = {r.spec["name"]: r for r in store.query(study="resume")}
    assert {n: r.status for n, r in rows.items()} == {"fast": "done", "slow": "done", "c": "done", "orphan": "done",
                                                      "busy": "running"}
    assert rows["slow"].attempts == 2 and rows["slow"].metrics["square"] == 4


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_row_of_a_reused_pid_is_rerun_with_a_warning(tmp_path: Path, markers: Path, caplog):
    """A row left running by a dead driver whose PID a live, unrelated process holds now (here: this process,
    recorded with another start time) is taken over and run again, with a warning; a row running under a
    live driver with the right identity (PID and start time) is skipped."""
    import socket
    import subprocess
    import sys

    def ticks(pid: int) -> int:  # /proc/PID/stat field 22
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text[text.rfind(")") + 2:].split()[19])

    store = ResultsStore(tmp_path / "results.sqlite")
    tasks = _tasks(markers, [{"name": "reused", "x": 2}, {"name": "busy", "x": 3}], study="reuse")
    store.ensure_many((t.kind, t.spec, t.study) for t in tasks)
    host = socket.gethostname()
    driver = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        stale = f"{host}:{os.getpid()}:{ticks(os.getpid()) - 1}"
        store.mark_running(tasks[0].key, owner=stale)
        store.mark_running(tasks[1].key, owner=f"{host}:{driver.pid}:{ticks(driver.pid)}")
        with caplog.at_level("WARNING"):
            summary = run_tasks(tasks, store, workers=1, progress=False)
    finally:
        driver.kill()
        driver.wait()
    assert summary.done == [tasks[0].key] and summary.skipped == [tasks[1].key]
    assert [_calls(markers, n) for n in ("reused", "busy")] == [1, 0]
    assert store.get(tasks[0].key).metrics["square"] == 4 and store.get(tasks[1].key).status == "running"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{store.path}: tiny row {tasks[0].key[:12]} was left running by driver {stale}, whose PID now belongs "
        f"to another process; taking it over"]


def test_dead_worker_is_recorded_and_the_pool_replaced(tmp_path: Path):
    store = ResultsStore(tmp_path / "results.sqlite")
    tasks = [Task("crash", {"x": 1, "crash": True}, crash_task), Task("crash", {"x": 2}, crash_task)]
    summary = run_tasks(tasks, store, workers=1, progress=False)
    assert summary.counts == {"done": 1, "skipped": 0, "failed": 1, "interrupted": 0}
    assert "died abruptly" in store.get(tasks[0].key).error
    assert store.get(tasks[1].key).metrics == {"x": 2}


_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from test_runners import _tasks
from mergelab.experiments import ResultsStore, run_tasks
from pathlib import Path
markers = Path({markers!r})
tasks = _tasks(markers, [{{"name": "slow1", "x": 1, "sleep_first": 600}}, {{"name": "slow2", "x": 2, "sleep_first": 600}}])
run_tasks(tasks, ResultsStore({db!r}), workers=2, progress=False)
"""


def _children(pid: int) -> dict[int, str]:
    """Processes whose parent is ``pid``: PID -> command line."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            if int(text[text.rfind(")") + 2:].split()[1]) == pid:
                out[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return out


def _running(pid: int, start: str) -> bool:
    """Whether the process ``pid`` that started at tick ``start`` still runs (not a zombie, PID not reused)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = text[text.rfind(")") + 2:].split()
    return fields[0] != "Z" and fields[19] == start


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_workers_and_resource_tracker_exit_when_the_driver_is_killed(tmp_path: Path, markers: Path, signame: str):
    """A driver killed outright (SIGKILL, or SIGTERM, whose default action gives Python no chance to clean
    up) leaves no process behind: its pool workers -- busy in a long task -- and multiprocessing's resource
    tracker exit by themselves."""
    import signal
    import subprocess
    import sys

    import mergelab

    script = _DRIVER.format(tests=str(TESTS_DIR), markers=str(markers), db=str(tmp_path / "results.sqlite"))
    code = str(Path(mergelab.__file__).resolve().parent.parent)  # the mergelab under test
    driver = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join(
        [code, os.environ.get("PYTHONPATH", "")])})
    try:
        deadline = time.monotonic() + 300
        while _calls(markers, "slow1") + _calls(markers, "slow2") < 2:  # both tasks started in their workers
            assert driver.poll() is None, f"the driver exited early with {driver.returncode}"
            assert time.monotonic() < deadline, "the workers did not start within 300 s"
            time.sleep(0.1)
        workers = {int(p.name.split(".")[1]) for p in markers.iterdir()}
        children = _children(driver.pid)
        assert workers <= set(children) and len(workers) == 2
        assert any("resource_tracker" in cmd for cmd in children.values())
        starts = {pid: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19] for pid in children}
    finally:
        driver.send_signal(getattr(signal, signame))
        driver.wait()
    deadline = time.monotonic() + 60
    left = dict(children)
    while left and time.monotonic() < deadline:
        left = {pid: cmd for pid, cmd in left.items() if _running(pid, starts[pid])}
        time.sleep(0.1)
    for pid in left:  # do not leave them behind if the test fails
        os.kill(pid, signal.SIGKILL)
    assert left == {}, f"still running 60 s after the driver got {signame}"


# --- Ray backend -----------------------------------------------------------------------------------------


def test_ray_backend_without_ray_is_a_clear_error(tmp_path: Path, monkeypatch):
    import sys

    from mergelab.errors import MergeLabError

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    store = ResultsStore(tmp_path / "results.sqlite")
    task = Task("tiny", {"x": 1}, tiny_task)
    with pytest.raises(MergeLabError, match=r"pip install 'mergelab\[ray\]'"):
        run_tasks([task], store, backend="ray", progress=False)
    assert store.get(task.key).status == "pending"  # nothing left running


@pytest.mark.slow
def test_ray_backend(tmp_path: Path, markers: Path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'mergelab[ray]'")
    if ray.is_initialized():  # pragma: no cover
        pytest.skip("a Ray session is already running in this process")
    # Ray workers start from the raylet's environment: let them import this module.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    store = ResultsStore(tmp_path / "results.sqlite")
    tasks = _tasks(markers, [{"name": "r1", "x": 1, "write": True}, {"name": "r2", "x": 2},
                             {"name": "rbad", "x": 3, "fail": True}], study="ray")
    summary = run_tasks(tasks, store, backend="ray", workers=2, artifacts_dir=tmp_path / "shared", progress=False,
                        ray_init_kwargs={"num_cpus": 2, "_node_ip_address": "127.0.0.1",
                                         "include_dashboard": False})
    assert not ray.is_initialized()  # the session run_tasks started is shut down
    assert summary.counts == {"done": 2, "skipped": 0, "failed": 1, "interrupted": 0}
    rows = {r.spec["name"]: r for r in store.query(study="ray")}
    assert rows["r1"].status == "done" and rows["r1"].metrics["square"] == 1 and rows["r2"].metrics["square"] == 4
    assert Path(rows["r1"].artifacts["out.txt"]).read_text() == "1"
    assert rows["r1"].timings["pid"] != os.getpid() and rows["r1"].versions["fn"] == "test_runners:tiny_task"
    assert rows["rbad"].status == "failed" and "fails on purpose" in rows["rbad"].error
    # rerun: nothing to do, Ray is not even started
    again = run_tasks(tasks[:2], store, backend="ray", progress=False)
    assert again.counts["skipped"] == 2 and not ray.is_initialized()


def test_run_options_dedupe_and_resolve_the_cache(tmp_path: Path, markers: Path, monkeypatch):
    import contextlib

    from mergelab.experiments.runners import RunOptions

    monkeypatch.chdir(tmp_path)
    opts = RunOptions(store=tmp_path / "r.sqlite", workers=1, cache_dir="rel/cache", progress=False)
    assert opts.cache() == str(tmp_path / "rel" / "cache")  # workers may run elsewhere: an absolute path
    assert RunOptions().cache() is None
    assert isinstance(opts.session(), contextlib.nullcontext)  # local backend: no session to keep
    tasks = _tasks(markers, [{"name": "d", "x": 3}]) * 2  # the same task twice
    summary = opts.run(tasks, opts.open_store())
    assert summary.counts["done"] == 1 and _calls(markers, "d") == 1
