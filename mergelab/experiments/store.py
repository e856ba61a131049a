"""An embedded SQLite results store: one row per fine-tune, merge or evaluation, keyed by its spec.

Every unit of work of a study is a *run* identified by ``key = sha256(canonical JSON of {kind, spec})``
(:func:`key_of`). Re-running a study therefore finds its finished rows and skips them, and an interrupted
study resumes where it stopped (:func:`ResultsStore.pending`, :func:`mergelab.experiments.run_tasks`).

Schema (version :data:`SCHEMA_VERSION`)::

    runs(key TEXT PRIMARY KEY,   -- sha256 hex of the canonical JSON of {"kind": kind, "spec": spec}
         kind TEXT,              -- finetune | merge | evaluate | ... (free text)
         study TEXT,             -- the study that asked for it (NULL: none)
         status TEXT,            -- pending | running | done | failed
         spec JSON, metrics JSON, timings JSON, versions JSON, artifacts JSON,   -- JSON text
         error TEXT,             -- traceback tail of the last failure
         attempts INTEGER,       -- how many times it was started
         owner TEXT,             -- "host:pid:start" of the driver that marked it running (owner_id)
         created TEXT, updated TEXT)   -- ISO-8601 UTC timestamps
    schema_version(version INTEGER)    -- one row; migrations in _MIGRATIONS bring old files forward

Concurrency. The file is opened in WAL mode (readers never block the writer and vice versa), every write is
a short ``BEGIN IMMEDIATE`` transaction (it takes the write lock up front, so two writers never deadlock on
a lock upgrade), and a busy timeout (default 60 s) makes a writer wait for the lock instead of failing.
Several processes on one machine can therefore write to the same file safely. A connection is never shared
across ``fork``: a store object used in a child process reopens its own connection.

Network file systems. SQLite's locking (and WAL's shared-memory index in particular) does not work over
NFS and most network shares: concurrent writers there can corrupt the database. The runners are designed
so this never matters: only the *driver* process opens the store; workers -- local processes or Ray tasks
on other nodes -- only compute and return their results (artifacts go to a shared ``artifacts_dir``), and
the driver writes the rows. Keep the database on the driver's local disk; put only artifacts on the share.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import socket
import sqlite3
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mergelab.atomic_files import plain_file_mode, write_csv_atomic
from mergelab.errors import MergeLabError
from mergelab.process_identity import EPOCH_SLACK_S, ProcessIdentity, pid_exists, start_epoch

log = logging.getLogger(__name__)

#: The schema version this code writes. A file with a newer version is refused (written by newer code).
SCHEMA_VERSION = 1

#: The statuses a run can have.
STATUSES = ("pending", "running", "done", "failed")

#: Columns holding JSON text, parsed into Python objects in :class:`Row`.
JSON_COLUMNS = ("spec", "metrics", "timings", "versions", "artifacts")

#: Default busy timeout, in seconds: how long a writer waits for another writer's lock.
DEFAULT_TIMEOUT = 60.0

# version -> statements bringing a file from version-1 to version. Add a new entry per schema change
# (ALTER TABLE ADD COLUMN ..., new indexes) and bump SCHEMA_VERSION; never edit an old entry.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE IF NOT EXISTS runs (
               key       TEXT PRIMARY KEY,
               kind      TEXT NOT NULL,
               study     TEXT,
               status    TEXT NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'running', 'done', 'failed')),
               spec      TEXT NOT NULL,
               metrics   TEXT,
               timings   TEXT,
               versions  TEXT,
               artifacts TEXT,
               error     TEXT,
               attempts  INTEGER NOT NULL DEFAULT 0,
               owner     TEXT,
               created   TEXT NOT NULL,
               updated   TEXT NOT NULL
           )""",
        "CREATE INDEX IF NOT EXISTS runs_study ON runs (study)",
        "CREATE INDEX IF NOT EXISTS runs_kind ON runs (kind)",
        "CREATE INDEX IF NOT EXISTS runs_status ON runs (status)",
    ),
}


class StoreError(MergeLabError):
    """The results database cannot be opened or used (corrupt, newer schema, bad query)."""


# ---------------------------------------------------------------------------------------------------------
# Opening: a missing file is created whole; an existing one must be an intact mergelab database

#: What every message about a damaged database ends with: mergelab never repairs, recreates or writes to it.
_LEAVE_IT = ("mergelab did not modify it: restore it from a backup, or move it away and mergelab starts a new, "
             "empty database there")


def _database_error(path: Path, exc: sqlite3.DatabaseError) -> StoreError:
    """A :class:`StoreError` for an SQLite error on ``path``: corruption (``SQLITE_CORRUPT``,
    ``SQLITE_NOTADB``) says the database is corrupt and how to recover; anything else is quoted."""
    name = getattr(exc, "sqlite_errorname", "")
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or type(exc) is sqlite3.DatabaseError:
        return StoreError(f"{path}: the results database is corrupt ({exc}); {_LEAVE_IT}")
    return StoreError(f"{path}: results database error: {exc}")


def _check_database_file(path: Path, timeout: float) -> None:
    """Refuse, without writing anything, an existing ``path`` that is not an intact mergelab results database:
    0 bytes (a database that existed and lost its content: SQLite would silently start a new one in it), no
    tables, someone else's tables, or pages that ``PRAGMA quick_check`` finds corrupt. Reads only (a WAL
    database's ``-wal``/``-shm`` files are SQLite's own)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise StoreError(f"{path}: cannot open the results database: {exc.strerror or exc}") from None
    if size == 0:
        raise StoreError(f"{path}: the results database is empty (0 bytes): it existed and lost its content "
                         f"(truncated?); {_LEAVE_IT}")
    try:
        conn = sqlite3.connect(path, timeout=timeout)
    except sqlite3.DatabaseError as exc:
        raise _database_error(path, exc) from exc
    try:
        tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        if not tables:
            raise StoreError(f"{path}: the results database holds no tables: it existed and lost its content; "
                             f"{_LEAVE_IT}")
        if not {"runs", "schema_version"} <= set(tables):
            raise StoreError(f"{path}: not a mergelab results database (it holds tables: {', '.join(tables)}); "
                             "pass another --db, or move the file away")
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StoreError(f"{path}: the results database is corrupt ({'; '.join(problems)}); {_LEAVE_IT}")
    except sqlite3.DatabaseError as exc:
        raise _database_error(path, exc) from exc
    finally:
        conn.close()


def _create_database_file(path: Path) -> None:
    """Create the database ``path`` whole: the schema is written into a temporary file next to it, which is
    then hard-linked into place (never replacing a file another process created meanwhile). So ``path``
    either does not exist or holds a complete schema, and a 0-byte file there always means lost content."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, plain_file_mode())
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            _apply_migrations(conn, path)
            conn.execute("COMMIT")  # rollback-journal mode: the schema is in the file itself, not in a WAL
            conn.execute("PRAGMA journal_mode = WAL")
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(tmp, path)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: cannot create the results database: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"{path}: cannot create the results database: {exc.strerror or exc}") from None
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# Canonical JSON and keys


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: pydantic models, dataclasses, paths, numpy/torch scalars and arrays,
    tuples and sets are converted; mapping keys become strings. Anything else raises ``TypeError``."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_jsonable(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "model_dump"):  # pydantic v2 model (ExpertSpec, MergeSpec, ...)
        return to_jsonable(obj.model_dump(mode="json"))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars/arrays, torch tensors
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        return to_jsonable(obj.item())
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable: {obj!r}")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON of ``obj``: keys sorted, no whitespace, ASCII only. NaN/Inf are refused.

    JSON types are kept: ``1`` and ``1.0`` are different specs (pass specs through a schema such as
    :class:`~mergelab.training.ExpertSpec` to normalise types before keying them).
    """
    try:
        return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"a spec cannot hold NaN or infinity: {exc}") from None


def key_of(kind: str, spec: Any) -> str:
    """The run key: 64 hex digits of SHA-256 over ``canonical_json({"kind": kind, "spec": spec})``.

    Independent of dict order; any change of kind or of a spec value (type included) changes it.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    return hashlib.sha256(canonical_json({"kind": kind, "spec": spec}).encode()).hexdigest()


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _finite_or_text(obj: Any) -> Any:
    """Non-finite floats as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``: Python's JSON writes them
    as bare ``NaN``, which is not JSON, and SQLite's JSON functions then refuse the whole column."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _finite_or_text(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_text(v) for v in obj]
    return obj


def _restore_nonfinite(obj: Any) -> Any:
    if isinstance(obj, str):
        return _NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _restore_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore_nonfinite(v) for v in obj]
    return obj


def _dumps(obj: Any) -> str | None:
    """JSON text of a metrics/timings/versions/artifacts mapping (always valid JSON; see _finite_or_text)."""
    if obj is None:
        return None
    return json.dumps(_finite_or_text(to_jsonable(obj)), allow_nan=False)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def owner_id() -> str:
    """``host:pid:start`` of this process: what :meth:`ResultsStore.claim` records as a running row's owner.

    ``start`` is the process's start time in clock ticks after boot (:func:`mergelab.process_identity.
    start_ticks`), so a later process that reuses the PID is not taken for the owner; off Linux it is
    unknown and the owner is ``host:pid``.
    """
    me = ProcessIdentity.of()
    base = f"{socket.gethostname()}:{me.pid}"
    return base if me.start is None else f"{base}:{me.start}"


def _parse_owner(owner: str) -> tuple[str, ProcessIdentity] | None:
    """``"host:pid:start"`` or the older ``"host:pid"`` as ``(host, identity)``; ``None`` if unparsable."""
    parts = owner.split(":")
    if len(parts) == 3 and parts[2].isdigit():
        host, pid, start = parts[0], parts[1], int(parts[2])
    else:
        (host, _, pid), start = owner.rpartition(":"), None
    return (host, ProcessIdentity(int(pid), start)) if pid.isdigit() else None


def _epoch(timestamp: str | None) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(timestamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def owner_state(owner: str | None, since: str | None = None) -> str:
    """Whether the driver that marked a row running still runs it.

    ``owner`` is the row's owner (:func:`owner_id`); ``since`` when it was marked running (ISO-8601, the row's
    ``updated``). Returns

    - ``"alive"``: that process still runs on this host (or ``"remote"``: another host, which cannot be
      checked, so it is assumed alive);
    - ``"self"``: this very process (an earlier run in it was interrupted);
    - ``"gone"``: no process has its PID, or the owner is missing or unparsable;
    - ``"reused"``: a *different* process has the PID now -- its start time differs from the recorded one,
      or, for an owner recorded without a start time (``host:pid``, older mergelab or no ``/proc``), the
      process with that PID started more than :data:`~mergelab.process_identity.EPOCH_SLACK_S` after
      ``since``, so it cannot have marked the row.

    An owner without a start time whose PID is taken by a process of unknown start time counts as alive.
    """
    parsed = _parse_owner(owner) if owner else None
    if parsed is None:
        return "gone"
    host, ident = parsed
    if host != socket.gethostname():
        return "remote"
    if ident.start is None:  # recorded without a start time: compare the PID's start with the claim time
        started, claimed = start_epoch(ident.pid), _epoch(since)
        if started is not None and claimed is not None and started > claimed + EPOCH_SLACK_S:
            return "reused"
        if ident.pid == os.getpid():
            return "self"
        return "alive" if pid_exists(ident.pid) else "gone"
    state = ident.state()
    if state == "alive" and ident.pid == os.getpid():
        return "self"
    return "alive" if state == "unknown" else state


# ---------------------------------------------------------------------------------------------------------
# Rows


@dataclasses.dataclass
class Row:
    """One run, with its JSON columns parsed."""

    key: str
    kind: str
    study: str | None
    status: str
    spec: Any
    metrics: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    versions: dict[str, Any] | None = None
    artifacts: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0
    owner: str | None = None
    created: str | None = None
    updated: str | None = None

    @classmethod
    def from_sql(cls, r: sqlite3.Row) -> Row:
        data = {k: r[k] for k in r.keys()}
        for col in JSON_COLUMNS:
            if data.get(col) is not None:
                value = json.loads(data[col])
                data[col] = value if col == "spec" else _restore_nonfinite(value)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def flat(self) -> dict[str, Any]:
        """One flat dict: the plain columns, then ``spec.*``, ``metrics.*``, ``timings.*``, ``versions.*``,
        ``artifacts.*`` (nested dicts joined with dots; lists kept as JSON text)."""
        out: dict[str, Any] = {
            "key": self.key, "kind": self.kind, "study": self.study, "status": self.status,
            "attempts": self.attempts, "created": self.created, "updated": self.updated,
        }
        for col in JSON_COLUMNS:
            value = getattr(self, col)
            if isinstance(value, Mapping):
                out.update(_flatten(value, col))
            elif value is not None:
                out[col] = value if not isinstance(value, list) else json.dumps(value)
        out["error"] = self.error
        return out


def _flatten(d: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        name = f"{prefix}.{k}"
        if isinstance(v, Mapping) and v:
            yield from _flatten(v, name)
        elif isinstance(v, (list, dict)):
            yield name, json.dumps(v)
        else:
            yield name, v


_FIXED_FIRST = ("key", "kind", "study", "status", "attempts", "created", "updated")


def flat_columns(rows: Sequence[Row]) -> tuple[list[str], list[dict[str, Any]]]:
    """The union of the flattened columns of ``rows`` (fixed columns, then spec/metrics/timings/versions/
    artifacts fields in first-seen order, then ``error``) and the flattened rows."""
    flats = [r.flat() for r in rows]
    groups: dict[str, dict[str, None]] = {g: {} for g in JSON_COLUMNS}
    for f in flats:
        for name in f:
            head = name.split(".", 1)[0]
            if head in groups and name != head or name in JSON_COLUMNS:
                groups[head][name] = None
    columns = list(_FIXED_FIRST)
    for g in JSON_COLUMNS:
        columns.extend(groups[g])
    columns.append("error")
    return columns, flats


def to_csv(rows: Iterable[Row], path: str | os.PathLike) -> Path:
    """Write ``rows`` to ``path`` as CSV, one column per flattened field (``spec.lr``, ``metrics.accuracy``,
    ...; see :meth:`Row.flat`). Missing fields are empty cells. Written atomically; returns the path."""
    rows = list(rows)
    columns, flats = flat_columns(rows)

    return write_csv_atomic(path, columns, ([("" if f.get(c) is None else f[c]) for c in columns] for f in flats))


# ---------------------------------------------------------------------------------------------------------
# The store


def default_db_path() -> Path:
    """``$MERGELAB_CACHE/results.sqlite`` (``~/.cache/mergelab/results.sqlite`` without the variable)."""
    # deferred: provenance (20 ms) stays off the 'mergelab --help' path, which imports the store
    from mergelab.provenance import cache_dir

    return cache_dir() / "results.sqlite"


def _task_key(item: Any) -> str:
    if isinstance(item, str):
        return item
    key = getattr(item, "key", None)
    if isinstance(key, str):
        return key
    if isinstance(item, tuple) and len(item) == 2:
        return key_of(item[0], item[1])
    raise TypeError(f"expected a Task, a (kind, spec) pair or a key, got {type(item).__name__}")


def _study_kind(study: str | None, kind: str | None) -> tuple[list[str], list[Any]]:
    """SQL clauses and parameters selecting rows of ``study`` and ``kind`` (each ``None``: any)."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (("study", study), ("kind", kind)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    return clauses, params


def _where_path(name: str) -> tuple[str, str]:
    """``"spec.optim.lr"`` -> (``"spec"``, ``"$.optim.lr"``); a bare ``"lr"`` means ``spec.lr``."""
    head, _, rest = name.partition(".")
    if head not in JSON_COLUMNS or not rest:
        head, rest = "spec", name
    parts = rest.split(".")
    for p in parts:
        if not p or '"' in p:
            raise StoreError(f"bad field name in where: {name!r}")
    return head, "$" + "".join(f'."{p}"' for p in parts)


def _apply_migrations(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the database open as ``conn`` (inside a write transaction) to :data:`SCHEMA_VERSION`."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    version = row[0] or 0
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path}: results database schema version {version} is newer than this "
                         f"mergelab understands ({SCHEMA_VERSION}); upgrade mergelab")
    for v in range(version + 1, SCHEMA_VERSION + 1):
        for stmt in _MIGRATIONS[v]:
            conn.execute(stmt)
    if version < SCHEMA_VERSION:
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))


class ResultsStore:
    """The results database at ``path``.

    A missing file is created whole, with its folder (``create=False``: :class:`StoreError` instead). An
    existing file must be an intact mergelab database: one of 0 bytes, without tables, with someone else's
    tables or with pages ``PRAGMA quick_check`` finds corrupt is a :class:`StoreError` naming it, and is never
    written to, repaired or recreated (:func:`_check_database_file`). Corruption found later by a query or a
    write is the same error.

    >>> store = ResultsStore(tmp / "results.sqlite")               # doctest: +SKIP
    >>> key = store.put("finetune", {"task": "digits", "lr": 0.1}, study="noise", status="done",
    ...                 metrics={"accuracy": 0.93})                 # doctest: +SKIP
    >>> store.query(study="noise", where={"spec.lr": 0.1})[0].metrics  # doctest: +SKIP
    {'accuracy': 0.93}

    Thread-safe (one connection per process, guarded by a lock) and process-safe (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 create: bool = True):
        self.path = Path(path) if path is not None else default_db_path()
        self.timeout = float(timeout)
        self._lock = threading.RLock()
        self._conn_obj: sqlite3.Connection | None = None
        self._pid = -1
        if not os.path.lexists(self.path):
            if not create:
                raise StoreError(f"no results database at {self.path}")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot create the results database's folder: "
                                 f"{exc.strerror or exc}") from None
            _create_database_file(self.path)
        _check_database_file(self.path, self.timeout)
        self._migrate()

    # --- connection -------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # e.g. a file system without shared memory support
                raise StoreError(f"{self.path}: cannot switch the database to WAL mode (got {mode!r}); "
                                 f"is it on a network file system? Keep the results database on local disk")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable across application crashes
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: cannot open the results database: {exc}") from exc
        return conn

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._conn_obj is None or self._pid != os.getpid():  # never reuse a connection across fork
            self._conn_obj = self._connect()
            self._pid = os.getpid()
        return self._conn_obj

    def close(self) -> None:
        with self._lock:
            if self._conn_obj is not None and self._pid == os.getpid():
                self._conn_obj.close()
            self._conn_obj = None

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # picklable: the copy reopens its own connection
        return {"path": self.path, "timeout": self.timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], timeout=state["timeout"])

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: ``BEGIN IMMEDIATE`` (waits up to the busy timeout for the write lock),
        committed on success, rolled back on any exception."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreError(f"{self.path}: cannot lock the results database for writing: {exc}") from exc
            try:
                yield conn
            except sqlite3.DatabaseError as exc:
                with suppress(sqlite3.DatabaseError):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.IntegrityError):
                    raise
                raise _database_error(self.path, exc) from exc
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                raise StoreError(f"{self.path}: query failed: {exc}") from exc
            except sqlite3.DatabaseError as exc:  # a corrupt page found by this query
                raise _database_error(self.path, exc) from exc

    # --- schema -----------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self.transaction() as conn:
            _apply_migrations(conn, self.path)

    def schema_version(self) -> int:
        return int(self._read("SELECT MAX(version) FROM schema_version")[0][0])

    # --- reading ----------------------------------------------------------------------------------------
    key_of = staticmethod(key_of)
    to_csv = staticmethod(to_csv)

    def get(self, key: str) -> Row | None:
        """The row with ``key`` (a full key), or ``None``."""
        rows = self._read("SELECT * FROM runs WHERE key = ?", (key,))
        return Row.from_sql(rows[0]) if rows else None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self._read("SELECT 1 FROM runs WHERE key = ?", (key,)))

    def __len__(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM runs")[0][0])

    def query(
        self,
        study: str | None = None,
        kind: str | None = None,
        status: str | Sequence[str] | None = None,
        where: Mapping[str, Any] | None = None,
        *,
        key_prefix: str | None = None,
        limit: int | None = None,
        order: str = "created",
    ) -> list[Row]:
        """Rows matching every given filter, oldest first (``order``: ``created`` | ``updated`` | ``key``).

        ``where`` maps a JSON field to a value: ``{"spec.lr": 0.1, "metrics.accuracy": 1.0,
        "spec.optim.momentum": 0.9}``; a bare name (``"lr"``) means a ``spec`` field. Numbers compare by value
        (``1 == 1.0``), ``True``/``False`` match JSON booleans, ``None`` matches a JSON null or a missing
        field, lists and dicts match by canonical JSON.
        """
        clauses, params = _study_kind(study, kind)
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            bad = [s for s in statuses if s not in STATUSES]
            if bad:
                raise StoreError(f"unknown status {bad[0]!r}; expected one of {', '.join(STATUSES)}")
            clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
            params.extend(statuses)
        if key_prefix:
            clauses.append("substr(key, 1, ?) = ?")
            params.extend([len(key_prefix), key_prefix.lower()])
        for name, value in (where or {}).items():
            col, jpath = _where_path(name)
            expr = f"json_extract({col}, ?)"
            if value is None:
                clauses.append(f"{expr} IS NULL")
                params.append(jpath)
            elif isinstance(value, (list, tuple, Mapping)):
                clauses.append(f"json({expr}) = json(?)")
                params.extend([jpath, json.dumps(to_jsonable(value), separators=(",", ":"))])
            elif isinstance(value, bool):
                clauses.append(f"{expr} = ? AND json_type({col}, ?) = ?")
                params.extend([jpath, int(value), jpath, "true" if value else "false"])
            else:
                if isinstance(value, float) and not math.isfinite(value):
                    raise StoreError(f"cannot match a non-finite value in where: {name}={value}")
                clauses.append(f"{expr} = ?")
                params.extend([jpath, to_jsonable(value)])
        if order not in ("created", "updated", "key"):
            raise StoreError(f"order must be created, updated or key, got {order!r}")
        sql = "SELECT * FROM runs"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += f" ORDER BY {order}, key"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [Row.from_sql(r) for r in self._read(sql, params)]

    def counts(self, study: str | None = None, kind: str | None = None) -> dict[str, int]:
        """Number of rows per status (every status present, zero when absent)."""
        clauses, params = _study_kind(study, kind)
        sql = "SELECT status, COUNT(*) FROM runs" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self._read(sql + " GROUP BY status", params):
            out[status] = int(n)
        return out

    def done_keys(self, keys: Iterable[str]) -> set[str]:
        """The subset of ``keys`` whose rows are done."""
        keys = list(dict.fromkeys(keys))
        found: set[str] = set()
        for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = keys[i:i + 500]
            rows = self._read(f"SELECT key FROM runs WHERE status = 'done' AND key IN ({', '.join('?' * len(chunk))})",
                              chunk)
            found.update(r[0] for r in rows)
        return found

    def pending(self, tasks: Iterable[Any]) -> list[Any]:
        """The items of ``tasks`` not done yet, in order. Items are :class:`~mergelab.experiments.Task`
        objects (anything with a ``key``), ``(kind, spec)`` pairs or keys."""
        tasks = list(tasks)
        done = self.done_keys(_task_key(t) for t in tasks)
        return [t for t in tasks if _task_key(t) not in done]

    # --- writing ----------------------------------------------------------------------------------------
    def put(
        self,
        kind: str,
        spec: Any,
        *,
        study: str | None = None,
        status: str = "pending",
        metrics: Mapping[str, Any] | None = None,
        timings: Mapping[str, Any] | None = None,
        versions: Mapping[str, Any] | None = None,
        artifacts: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> str:
        """Insert or replace the row of ``(kind, spec)`` with these fields (``created`` and ``attempts`` of an
        existing row are kept). Returns its key."""
        if status not in STATUSES:
            raise StoreError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        key = key_of(kind, spec)
        now = _now()
        with self.transaction() as conn:
            conn.execute(
                """INSERT INTO runs (key, kind, study, status, spec, metrics, timings, versions, artifacts,
                                     error, created, updated)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (key) DO UPDATE SET
                       study = excluded.study, status = excluded.status, metrics = excluded.metrics,
                       timings = excluded.timings, versions = excluded.versions, artifacts = excluded.artifacts,
                       error = excluded.error, owner = NULL, updated = excluded.updated""",
                (key, kind, study, status, canonical_json(spec), _dumps(metrics), _dumps(timings),
                 _dumps(versions), _dumps(artifacts), error, now, now),
            )
        return key

    def ensure(self, kind: str, spec: Any, *, study: str | None = None) -> str:
        """Add ``(kind, spec)`` as pending unless a row exists (whatever its status). Returns its key."""
        return self.ensure_many([(kind, spec, study)])[0]

    def ensure_many(self, items: Iterable[tuple[str, Any, str | None]]) -> list[str]:
        """:meth:`ensure` for many ``(kind, spec, study)`` triples in one transaction. Returns their keys."""
        now = _now()
        rows = [(key_of(kind, spec), kind, study, canonical_json(spec), now, now) for kind, spec, study in items]
        with self.transaction() as conn:
            conn.executemany(
                """INSERT INTO runs (key, kind, study, status, spec, created, updated)
                   VALUES (?, ?, ?, 'pending', ?, ?, ?) ON CONFLICT (key) DO NOTHING""",
                rows,
            )
        return [r[0] for r in rows]

    def _update(self, key: str, sets: str, params: Sequence[Any], *, where: str = "") -> bool:
        with self.transaction() as conn:
            cur = conn.execute(f"UPDATE runs SET {sets}, updated = ? WHERE key = ?{where}",
                               (*params, _now(), key))
            return cur.rowcount > 0

    def mark_running(self, key: str, *, owner: str | None = None) -> None:
        """Set ``key`` running (attempts + 1). ``owner`` defaults to this process (:func:`owner_id`)."""
        if not self._update(key, "status = 'running', attempts = attempts + 1, owner = ?, error = NULL",
                            (owner or owner_id(),)):
            raise KeyError(key)

    def claim(self, key: str, *, owner: str | None = None) -> bool:
        """Atomically mark ``key`` running unless it is done or running under another live driver.

        A running row whose owner (:func:`owner_state`) is this process, gone, a process that reused the
        owner's PID (logged as a warning), or unknown is taken over (the leftovers of an interrupted or killed
        run). Rows of live drivers and of other hosts are left alone. Returns whether the claim succeeded.
        """
        owner = owner or owner_id()
        with self.transaction() as conn:
            r = conn.execute("SELECT status, owner, kind, updated FROM runs WHERE key = ?", (key,)).fetchone()
            if r is None:
                raise KeyError(key)
            if r["status"] == "done":
                return False
            if r["status"] == "running":
                state = owner_state(r["owner"], r["updated"])
                if state in ("alive", "remote"):
                    return False
                if state == "reused":
                    log.warning("%s: %s row %s was left running by driver %s, whose PID now belongs to another "
                                "process; taking it over", self.path, r["kind"], key[:12], r["owner"])
                elif state == "gone":
                    log.info("%s: %s row %s was left running by driver %s, which is gone; taking it over",
                             self.path, r["kind"], key[:12], r["owner"])
            conn.execute("UPDATE runs SET status = 'running', attempts = attempts + 1, owner = ?, error = NULL, "
                         "updated = ? WHERE key = ?", (owner, _now(), key))
            return True

    def mark_done(
        self,
        key: str,
        *,
        metrics: Mapping[str, Any] | None = None,
        timings: Mapping[str, Any] | None = None,
        versions: Mapping[str, Any] | None = None,
        artifacts: Mapping[str, Any] | None = None,
    ) -> None:
        """Set ``key`` done with its results (clears error and owner)."""
        if not self._update(key, "status = 'done', metrics = ?, timings = ?, versions = ?, artifacts = ?, "
                                 "error = NULL, owner = NULL",
                            (_dumps(metrics), _dumps(timings), _dumps(versions), _dumps(artifacts))):
            raise KeyError(key)

    def mark_failed(
        self,
        key: str,
        error: str,
        *,
        timings: Mapping[str, Any] | None = None,
        versions: Mapping[str, Any] | None = None,
    ) -> None:
        """Set ``key`` failed with ``error`` (metrics and artifacts cleared)."""
        if not self._update(key, "status = 'failed', error = ?, metrics = NULL, artifacts = NULL, timings = ?, "
                                 "versions = ?, owner = NULL",
                            (str(error), _dumps(timings), _dumps(versions))):
            raise KeyError(key)

    def mark_pending(self, keys: Iterable[str]) -> int:
        """Put running rows among ``keys`` back to pending (an interrupted run). Returns how many."""
        n = 0
        with self.transaction() as conn:
            for key in keys:
                n += conn.execute("UPDATE runs SET status = 'pending', owner = NULL, updated = ? "
                                  "WHERE key = ? AND status = 'running'", (_now(), key)).rowcount
        return n

    def reset_running(self, study: str | None = None) -> int:
        """Put every running row (of ``study``) back to pending, e.g. after a crashed driver. Returns how many."""
        sql = "UPDATE runs SET status = 'pending', owner = NULL, updated = ? WHERE status = 'running'"
        params: list[Any] = [_now()]
        if study is not None:
            sql += " AND study = ?"
            params.append(study)
        with self.transaction() as conn:
            return conn.execute(sql, params).rowcount

    def delete(self, key: str) -> bool:
        """Remove the row ``key``; returns whether it existed."""
        with self.transaction() as conn:
            return conn.execute("DELETE FROM runs WHERE key = ?", (key,)).rowcount > 0
