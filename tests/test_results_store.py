"""The SQLite results store: keys, rows, filters, CSV, concurrency, schema versions, ``mergelab results``."""

from __future__ import annotations

import csv
import multiprocessing
import socket
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from mergelab.cli import main
from mergelab.experiments import ResultsStore, StoreError, canonical_json, key_of, to_csv
from mergelab.experiments.store import SCHEMA_VERSION


@pytest.fixture
def store(tmp_path: Path) -> ResultsStore:
    with ResultsStore(tmp_path / "results.sqlite") as s:
        yield s


# --- keys ------------------------------------------------------------------------------------------------


def test_key_is_independent_of_dict_order():
    a = {"task": "digits", "lr": 0.1, "optim": {"momentum": 0.9, "name": "sgd"}, "seeds": [1, 2]}
    b = {"seeds": [1, 2], "optim": {"name": "sgd", "momentum": 0.9}, "lr": 0.1, "task": "digits"}
    assert key_of("finetune", a) == key_of("finetune", b)
    assert len(key_of("finetune", a)) == 64 and int(key_of("finetune", a), 16) >= 0


def test_key_changes_with_spec_and_kind():
    base = {"task": "digits", "lr": 0.1, "seeds": [1, 2]}
    k = key_of("finetune", base)
    assert key_of("finetune", {**base, "lr": 0.2}) != k
    assert key_of("finetune", {**base, "seeds": [2, 1]}) != k  # list order is meaningful
    assert key_of("finetune", {**base, "extra": None}) != k
    assert key_of("merge", base) != k
    assert key_of("finetune", {**base, "lr": "0.1"}) != k  # types are part of the spec


def test_key_normalises_numpy_paths_and_tuples():
    a = {"lr": np.float64(0.1), "steps": np.int64(5), "path": Path("/x/y"), "shape": (2, 3), "flag": np.bool_(True)}
    b = {"lr": 0.1, "steps": 5, "path": "/x/y", "shape": [2, 3], "flag": True}
    assert key_of("k", a) == key_of("k", b)
    assert canonical_json(b) == '{"flag":true,"lr":0.1,"path":"/x/y","shape":[2,3],"steps":5}'


def test_key_refuses_nan_and_empty_kind():
    with pytest.raises(ValueError, match="NaN"):
        key_of("k", {"lr": float("nan")})
    with pytest.raises(ValueError, match="kind"):
        key_of("", {"lr": 0.1})


def test_key_of_pydantic_spec_is_its_canonical_dict():
    from mergelab.training import make_spec

    spec = make_spec({"task": "digits"})
    assert key_of("finetune", spec) == key_of("finetune", spec.canonical())


# --- rows ------------------------------------------------------------------------------------------------


def _fill(store: ResultsStore) -> dict[str, str]:
    keys = {}
    keys["a"] = store.put("finetune", {"task": "digits", "lr": 0.1, "opt": {"name": "sgd", "momentum": 0.9}},
                          study="noise", status="done", metrics={"accuracy": 0.9, "loss": 0.3},
                          timings={"wall_s": 1.5}, versions={"torch": "x"}, artifacts={"model": "/m/a"})
    keys["b"] = store.put("finetune", {"task": "digits", "lr": 1, "opt": {"name": "adam", "momentum": 0.0}},
                          study="noise", status="done", metrics={"accuracy": 0.5})
    keys["c"] = store.put("merge", {"method": "ties", "density": 0.2, "nesterov": True, "tags": ["x", "y"]},
                          study="merge-study", status="failed", error="ValueError: bad")
    keys["d"] = store.ensure("evaluate", {"model": "m", "nesterov": False}, study="noise")
    return keys


def test_put_get_roundtrip(store: ResultsStore):
    keys = _fill(store)
    row = store.get(keys["a"])
    assert row.key == keys["a"] == key_of("finetune", {"lr": 0.1, "task": "digits",
                                                        "opt": {"momentum": 0.9, "name": "sgd"}})
    assert (row.kind, row.study, row.status) == ("finetune", "noise", "done")
    assert row.spec == {"task": "digits", "lr": 0.1, "opt": {"name": "sgd", "momentum": 0.9}}
    assert row.metrics == {"accuracy": 0.9, "loss": 0.3}
    assert row.timings == {"wall_s": 1.5} and row.versions == {"torch": "x"} and row.artifacts == {"model": "/m/a"}
    assert row.error is None and row.created and row.updated
    assert store.get("0" * 64) is None
    assert keys["a"] in store and "nope" not in store and len(store) == 4
    assert store.get(keys["d"]).status == "pending" and store.get(keys["d"]).metrics is None
    # put again replaces the fields but keeps the creation time
    created = row.created
    store.put("finetune", row.spec, study="noise", status="done", metrics={"accuracy": 0.95})
    again = store.get(keys["a"])
    assert again.metrics == {"accuracy": 0.95} and again.created == created and again.artifacts is None
    # ensure never overwrites an existing row
    store.ensure("finetune", row.spec, study="other")
    assert store.get(keys["a"]).status == "done" and store.get(keys["a"]).study == "noise"


def test_query_filters(store: ResultsStore):
    keys = _fill(store)

    def q(**kw):
        return {r.key for r in store.query(**kw)}

    assert q() == set(keys.values())
    assert q(study="noise") == {keys["a"], keys["b"], keys["d"]}
    assert q(kind="finetune") == {keys["a"], keys["b"]}
    assert q(status="failed") == {keys["c"]}
    assert q(status=["done", "pending"]) == {keys["a"], keys["b"], keys["d"]}
    assert q(study="noise", kind="finetune", status="done") == {keys["a"], keys["b"]}
    assert q(where={"spec.lr": 0.1}) == {keys["a"]}
    assert q(where={"lr": 1.0}) == {keys["b"]}  # bare name = spec field; 1 == 1.0
    assert q(where={"spec.opt.name": "adam"}) == {keys["b"]}  # nested
    assert q(where={"metrics.accuracy": 0.9}) == {keys["a"]}
    assert q(where={"nesterov": True}) == {keys["c"]}
    assert q(where={"nesterov": False}) == {keys["d"]}
    assert q(where={"spec.tags": ["x", "y"]}) == {keys["c"]}
    assert q(where={"spec.density": None}) == {keys["a"], keys["b"], keys["d"]}  # missing field
    assert q(where={"spec.task": "digits", "metrics.loss": 0.3}) == {keys["a"]}
    assert q(key_prefix=keys["c"][:8]) == {keys["c"]}
    assert len(store.query(limit=2)) == 2
    assert store.counts() == {"pending": 1, "running": 0, "done": 2, "failed": 1}
    assert store.counts(study="noise")["done"] == 2
    with pytest.raises(StoreError, match="unknown status"):
        store.query(status="finished")


def test_non_finite_metrics_roundtrip_and_stay_queryable(store: ResultsStore):
    """A diverged run's NaN/inf metrics are kept, and do not break JSON queries over the other rows."""
    import math

    bad = store.put("finetune", {"lr": 10.0}, status="done", metrics={"loss": float("nan"), "grad": [float("inf")],
                                                                     "acc": -float("inf")})
    good = store.put("finetune", {"lr": 0.1}, status="done", metrics={"loss": 0.2})
    m = store.get(bad).metrics
    assert math.isnan(m["loss"]) and m["grad"] == [math.inf] and m["acc"] == -math.inf
    assert [r.key for r in store.query(where={"metrics.loss": 0.2})] == [good]
    assert [r.key for r in store.query(where={"spec.lr": 10})] == [bad]


def test_status_transitions_and_pending(store: ResultsStore):
    spec = {"x": 1}
    key = store.ensure("sq", spec, study="s")
    other = store.ensure("sq", {"x": 2}, study="s")
    store.mark_running(key)
    row = store.get(key)
    assert row.status == "running" and row.attempts == 1 and row.owner.split(":")[1] == str(__import__('os').getpid())
    store.mark_failed(key, "RuntimeError: x", timings={"wall_s": 0.1})
    assert store.get(key).status == "failed" and store.get(key).error == "RuntimeError: x"
    store.mark_running(key)
    store.mark_done(key, metrics={"y": 1}, timings={"wall_s": 0.2}, artifacts={"f": "/tmp/f"})
    row = store.get(key)
    assert (row.status, row.metrics, row.error, row.attempts, row.owner) == ("done", {"y": 1}, None, 2, None)
    # pending() filters finished work: Task-like objects, (kind, spec) pairs or keys
    assert store.pending([("sq", spec), ("sq", {"x": 2}), ("sq", {"x": 3})]) == [("sq", {"x": 2}), ("sq", {"x": 3})]
    assert store.pending([key, other]) == [other]
    with pytest.raises(KeyError):
        store.mark_done("0" * 64)
    # interrupted rows go back to pending
    store.mark_running(other)
    assert store.reset_running(study="s") == 1 and store.get(other).status == "pending"


def test_claim_takes_over_rows_of_dead_drivers_only(store: ResultsStore):
    key = store.ensure("sq", {"x": 1})
    host = socket.gethostname()
    dead = multiprocessing.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    store.mark_running(key, owner=f"{host}:{dead.pid}")  # a driver that was killed
    assert store.claim(key, owner="me:1") and store.get(key).owner == "me:1"
    parent = __import__("os").getppid()  # a live process on this host
    store.mark_running(key, owner=f"{host}:{parent}")
    assert not store.claim(key)  # running under another live driver: left alone
    store.mark_running(key)  # our own (e.g. interrupted earlier in this process)
    assert store.claim(key)
    store.mark_done(key, metrics={})
    assert not store.claim(key)  # done rows are never claimed


def _proc_start_ticks(pid: int) -> int:
    """Field 22 of /proc/PID/stat (start time in clock ticks after boot), read here independently of mergelab."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rfind(")") + 2:].split()[19])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_claim_tells_a_reused_pid_from_its_owner(store: ResultsStore, caplog):
    """A running row is owned by a PID *and* its start time: a row whose PID now belongs to another process
    (simulated by recording a wrong start time for a live PID) is taken over with a warning; a row of a live
    process with the right start time is left alone. Rows written before start times were recorded
    (``host:pid``) are taken over when the PID's process started after the row was marked running."""
    import os
    import subprocess
    import sys

    host = socket.gethostname()
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        ticks = _proc_start_ticks(other.pid)
        key = store.ensure("sq", {"x": 1})
        store.mark_running(key, owner=f"{host}:{other.pid}:{ticks}")
        assert not store.claim(key, owner="me:1")  # the live owner: skipped
        assert store.get(key).owner == f"{host}:{other.pid}:{ticks}"
        for pid, start in ((other.pid, ticks + 1), (os.getpid(), _proc_start_ticks(os.getpid()) - 1)):
            store.mark_running(key, owner=f"{host}:{pid}:{start}")  # that PID's owner died; PID reused since
            caplog.clear()
            with caplog.at_level("WARNING", logger="mergelab.experiments.store"):
                assert store.claim(key, owner="me:1")
            assert store.get(key).owner == "me:1"
            assert [r.getMessage() for r in caplog.records] == [
                f"{store.path}: sq row {key[:12]} was left running by driver {host}:{pid}:{start}, whose PID now "
                f"belongs to another process; taking it over"]
        # old rows without a start time: a PID whose process started after the row was marked is not its owner
        store.mark_running(key, owner=f"{host}:{other.pid}")
        with store.transaction() as conn:
            conn.execute("UPDATE runs SET updated = '2000-01-01T00:00:00.000Z' WHERE key = ?", (key,))
        with caplog.at_level("WARNING", logger="mergelab.experiments.store"):
            assert store.claim(key, owner="me:1")
        assert "whose PID now belongs to another process" in caplog.records[-1].getMessage()
        store.mark_running(key, owner=f"{host}:{other.pid}")  # marked now, by a process started before: alive
        assert not store.claim(key, owner="me:1")
    finally:
        other.kill()
        other.wait()
    assert store.claim(key, owner="me:1")  # its owner is gone now
    # this process's own rows are taken over (an earlier run in it was interrupted), silently
    store.mark_running(key)
    assert store.get(key).owner == f"{host}:{os.getpid()}:{_proc_start_ticks(os.getpid())}"
    caplog.clear()
    assert store.claim(key) and not caplog.records


def test_csv_roundtrip(store: ResultsStore, tmp_path: Path):
    keys = _fill(store)
    rows = store.query(order="key")
    out = to_csv(rows, tmp_path / "sub" / "rows.csv")
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames
        back = {r["key"]: r for r in reader}
    assert columns[:4] == ["key", "kind", "study", "status"] and columns[-1] == "error"
    for col in ("spec.lr", "spec.opt.name", "spec.opt.momentum", "spec.tags", "spec.method", "metrics.accuracy",
                "metrics.loss", "timings.wall_s", "versions.torch", "artifacts.model"):
        assert col in columns, col
    assert columns.index("spec.lr") < columns.index("metrics.accuracy") < columns.index("timings.wall_s")
    assert set(back) == set(keys.values())
    a = back[keys["a"]]
    assert float(a["spec.lr"]) == 0.1 and a["spec.opt.name"] == "sgd" and float(a["metrics.accuracy"]) == 0.9
    assert a["artifacts.model"] == "/m/a" and a["error"] == ""
    assert back[keys["b"]]["metrics.loss"] == ""  # missing field: empty cell
    assert back[keys["c"]]["spec.tags"] == '["x", "y"]' and back[keys["c"]]["error"] == "ValueError: bad"
    # the CSV agrees with the rows it came from
    for r in rows:
        assert back[r.key]["status"] == r.status and back[r.key]["study"] == (r.study or "")
    # the store's alias
    assert store.to_csv(rows[:1], tmp_path / "one.csv").read_text().count("\n") == 2


# --- files, schema, concurrency ---------------------------------------------------------------------------


def test_file_is_wal_with_schema_version_and_indexes(store: ResultsStore):
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"runs_study", "runs_kind", "runs_status"} <= indexes
    conn.close()
    assert store.schema_version() == SCHEMA_VERSION
    ResultsStore(store.path).close()  # reopening does not migrate again
    assert sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1


def test_newer_schema_is_refused(tmp_path: Path):
    path = tmp_path / "r.sqlite"
    ResultsStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        ResultsStore(path)


def test_corrupt_file_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "r.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=str(path.name)):
        ResultsStore(path)


def _writer(path: str, worker: int, n: int, start=None) -> None:
    store = ResultsStore(path)
    if start is not None:
        start.wait(60)  # a barrier: all writers go at once
    for i in range(n):
        key = store.put("sq", {"worker": worker, "i": i}, study="concurrent", status="running")
        store.mark_done(key, metrics={"y": i * i})
    store.close()


def test_concurrent_writers_lose_no_rows(tmp_path: Path):
    path = tmp_path / "results.sqlite"
    ResultsStore(path).close()
    n = 100
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=_writer, args=(str(path), w, n, start)) for w in range(2)]
    for p in procs:
        p.start()
    _writer(str(path), 2, n, start)  # and this process writes at the same time
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = ResultsStore(path)
    rows = store.query(study="concurrent")
    assert len(rows) == 3 * n and all(r.status == "done" for r in rows)
    assert {(r.spec["worker"], r.spec["i"]) for r in rows} == {(w, i) for w in range(3) for i in range(n)}
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_store_is_picklable_and_reopens(store: ResultsStore):
    import pickle

    store.put("k", {"a": 1}, status="done")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.path == store.path and len(copy) == 1


# --- CLI --------------------------------------------------------------------------------------------------


def test_cli_results_table_and_csv(store: ResultsStore, tmp_path: Path, capsys):
    keys = _fill(store)
    out = tmp_path / "export.csv"
    assert main(["results", "--db", str(store.path), "--study", "noise", "--kind", "finetune",
                 "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert keys["a"][:12] in printed and keys["b"][:12] in printed and keys["c"][:12] not in printed
    assert "spec.lr" in printed and "metrics.accuracy" in printed and "2 row(s): 2 done" in printed
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["key"] for r in rows} == {keys["a"], keys["b"]}

    assert main(["results", "--db", str(store.path), "--where", "lr=0.1", "--where", "opt.name=sgd",
                 "--csv", str(out), "-q"]) == 0
    with open(out, newline="") as fh:
        assert [r["key"] for r in csv.DictReader(fh)] == [keys["a"]]
    assert main(["results", "--db", str(store.path), "--status", "failed", "--errors"]) == 0
    assert "ValueError: bad" in capsys.readouterr().out
    assert main(["results", "--db", str(store.path), "--limit", "1", "--columns", "key", "metrics.accuracy"]) == 0
    assert "1 row(s)" in capsys.readouterr().out
    assert main(["results", "--db", str(store.path), "--where", "lr=5"]) == 0
    assert "no matching rows" in capsys.readouterr().out


def test_cli_results_errors(tmp_path: Path, monkeypatch, capsys):
    assert main(["results", "--db", str(tmp_path / "missing.sqlite")]) == 1
    assert "no results database" in capsys.readouterr().err
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    assert main(["results"]) == 1
    assert str(tmp_path / "cache" / "results.sqlite") in capsys.readouterr().err
    ResultsStore(tmp_path / "cache" / "results.sqlite").close()
    assert main(["results", "--where", "novalue"]) == 1
    assert "FIELD=VALUE" in capsys.readouterr().err
    assert main(["results"]) == 0


# --- a database that exists but lost its content (issue 12) ----------------------------------------------


def _digest(path: Path) -> bytes:
    import hashlib

    return hashlib.sha256(path.read_bytes()).digest()


def _filled_db(path: Path, rows: int = 300) -> Path:
    with ResultsStore(path) as s:
        for i in range(rows):
            s.put("finetune", {"i": i, "pad": "x" * 200}, study="s", status="done", metrics={"acc": i / rows})
    conn = sqlite3.connect(path)  # fold the WAL into the file, as a closed database is
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


def test_truncated_database_is_an_error_and_is_not_touched(tmp_path: Path, capsys):
    path = _filled_db(tmp_path / "results.sqlite")
    path.write_bytes(b"")  # it existed and lost its content
    assert main(["results", "--db", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: the results database is empty (0 bytes)" in err and "no matching rows" not in err
    with pytest.raises(StoreError, match=r"results\.sqlite: the results database is empty \(0 bytes\)"):
        ResultsStore(path)  # what `mergelab experiment` opens
    assert path.read_bytes() == b""  # never initialised over


def test_corrupt_page_is_an_error_and_the_file_is_not_modified(tmp_path: Path, capsys):
    path = _filled_db(tmp_path / "results.sqlite")
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) >= 8 * page
    data[3 * page:len(data) - page] = b"\xa5" * (len(data) - 4 * page)  # garble every page but the first two and last
    path.write_bytes(bytes(data))
    before = _digest(path)
    assert main(["results", "--db", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: the results database is corrupt" in err and "did not modify it" in err
    assert "Traceback" not in err
    with pytest.raises(StoreError, match=r"results\.sqlite: the results database is corrupt"):
        ResultsStore(path)
    assert _digest(path) == before


def test_a_foreign_sqlite_file_is_refused_unmodified(tmp_path: Path):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.commit()
    conn.close()
    before = _digest(path)
    with pytest.raises(StoreError, match=r"other\.sqlite: not a mergelab results database \(it holds tables: photos\)"):
        ResultsStore(path)
    assert _digest(path) == before
    empty = tmp_path / "tables-dropped.sqlite"
    conn = sqlite3.connect(empty)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("DROP TABLE t")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=r"tables-dropped\.sqlite: the results database holds no tables"):
        ResultsStore(empty)


def test_a_missing_database_is_created_whole(tmp_path: Path):
    path = tmp_path / "new" / "results.sqlite"
    with ResultsStore(path) as s:
        assert len(s) == 0 and s.schema_version() == SCHEMA_VERSION
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith("results.sqlite")) == []
    with pytest.raises(StoreError, match=r"no results database at .*nothing\.sqlite"):
        ResultsStore(tmp_path / "nothing.sqlite", create=False)
    assert not (tmp_path / "nothing.sqlite").exists()
