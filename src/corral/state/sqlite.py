"""SQLite state store: one file under ``CORRAL_HOME``, WAL mode, safe to read while a run writes."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from corral.errors import StateError
from corral.model import (
    FAILED_STATES,
    AttemptRecord,
    RunRecord,
    RunState,
    RunSummary,
    TaskRecord,
    TaskState,
    now,
)
from corral.state.lease import LEASE_WAIT_S, file_lease

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    workflow_name TEXT NOT NULL,
    backend TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    state TEXT NOT NULL,
    workflow_path TEXT NOT NULL,
    base_dir TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER,
    options TEXT NOT NULL,
    manifest BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    run_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    item_key TEXT NOT NULL,
    item_index INTEGER,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    exit_code INTEGER,
    reason TEXT NOT NULL,
    started_at REAL,
    ended_at REAL,
    external_id TEXT NOT NULL,
    instance_type TEXT NOT NULL,
    ord INTEGER NOT NULL,
    PRIMARY KEY (run_id, task_id)
);
CREATE INDEX IF NOT EXISTS tasks_by_run ON tasks (run_id, ord);
-- `corral status` aggregates over these two, reading no task row unless it failed: counts per
-- stage and state (GROUP BY), and each stage's durations in order (median: a walk, max: one step)
CREATE INDEX IF NOT EXISTS tasks_by_stage_state ON tasks (run_id, stage, state, ord);
CREATE INDEX IF NOT EXISTS tasks_by_duration ON tasks (run_id, stage, ended_at - started_at)
    WHERE started_at IS NOT NULL AND ended_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS attempts (
    run_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    reason TEXT NOT NULL,
    started_at REAL,
    ended_at REAL,
    stdout TEXT NOT NULL,
    stderr TEXT NOT NULL,
    external_id TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER,
    instance_type TEXT NOT NULL,
    PRIMARY KEY (run_id, task_id, attempt)
);
"""

_TASK_COLS = (
    "run_id, task_id, stage, item_key, item_index, state, attempts, exit_code, reason, "
    "started_at, ended_at, external_id, instance_type"
)
_ATTEMPT_COLS = (
    "run_id, task_id, attempt, state, exit_code, reason, started_at, ended_at, stdout, stderr, "
    "external_id, host, pid, instance_type"
)
_RUN_COLS = "run_id, workflow_name, backend, created_at, updated_at, state, workflow_path, base_dir, host, pid, options"


_F = TypeVar("_F", bound=Callable[..., Any])


def _sql_errors(fn: _F) -> _F:
    """A full disk, a read-only or vanished database: one StateError line, never a traceback."""

    @functools.wraps(fn)
    def wrapper(self: SqliteStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise _state_error(self.path, exc) from None

    return wrapper  # type: ignore[return-value]


def _state_error(path: Path, exc: BaseException) -> StateError:
    text = str(exc)
    if "full" in text:
        hint = "free space where CORRAL_HOME is (or point CORRAL_HOME elsewhere), then `corral resume`"
    elif "readonly" in text or "read-only" in text:
        hint = f"make {path} and its folder writable again, then `corral resume`"
    else:
        hint = "check CORRAL_HOME; `corral doctor` checks the state database"
    return StateError(f"the state database {path} cannot be used: {text}", hint)


class SqliteStore:
    """The local state store. One connection per instance; open one per process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            # CORRAL_HOME is private (0700) and the database 0600: SQLite gives its -wal and -shm files
            # the database file's permissions, so they are 0600 too (state rows name paths and items).
            if not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            if self.path.stat().st_mode & 0o077:
                os.chmod(self.path, 0o600)  # made by an older corral as 0644
            self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StateError(
                f"cannot open the state database {self.path}: {exc}",
                "check that CORRAL_HOME points to a writable folder",
            ) from exc

    # -- runs ---------------------------------------------------------------------------------
    @_sql_errors
    def create_run(self, run: RunRecord, manifest: bytes, tasks: Sequence[TaskRecord]) -> None:
        with self._tx():
            exists = self._db.execute("SELECT 1 FROM runs WHERE run_id=?", (run.run_id,)).fetchone()
            if exists:
                raise StateError(f"run {run.run_id} exists already", "use `corral resume` to go on with it")
            self._db.execute(
                f"INSERT INTO runs ({_RUN_COLS}, manifest) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (*_run_row(run), zlib.compress(manifest)),
            )
            self._db.executemany(
                f"INSERT INTO tasks ({_TASK_COLS}, ord) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(*_task_row(t), i) for i, t in enumerate(tasks)],
            )

    @_sql_errors
    def get_run(self, run_id: str) -> RunRecord:
        row = self._db.execute(f"SELECT {_RUN_COLS} FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise StateError(f"no run {run_id!r} in {self.path}", "`corral status --all` lists the runs")
        return _run_from_row(row)

    @_sql_errors
    def list_runs(self, limit: int = 20) -> list[RunRecord]:
        rows = self._db.execute(
            f"SELECT {_RUN_COLS} FROM runs ORDER BY created_at DESC, run_id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [_run_from_row(r) for r in rows]

    @_sql_errors
    def save_run(self, run: RunRecord) -> None:
        run = run.replace(updated_at=now())
        with self._tx():
            cur = self._db.execute(
                "UPDATE runs SET workflow_name=?, backend=?, created_at=?, updated_at=?, state=?, "
                "workflow_path=?, base_dir=?, host=?, pid=?, options=? WHERE run_id=?",
                (*_run_row(run)[1:], run.run_id),
            )
            if cur.rowcount == 0:
                raise StateError(f"no run {run.run_id!r} to update", "create the run first")

    @_sql_errors
    def load_manifest(self, run_id: str) -> bytes:
        row = self._db.execute("SELECT manifest FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise StateError(f"no run {run_id!r} in {self.path}", "`corral status --all` lists the runs")
        return zlib.decompress(row[0])

    # -- tasks --------------------------------------------------------------------------------
    @_sql_errors
    def get_tasks(self, run_id: str, states: Iterable[TaskState] | None = None) -> list[TaskRecord]:
        sql = f"SELECT {_TASK_COLS} FROM tasks WHERE run_id=?"
        args: list[Any] = [run_id]
        if states is not None:
            # the states are found in the narrow index; only the rows that match are read
            wanted = [TaskState(s).value for s in states]
            sql = (f"SELECT {_TASK_COLS} FROM tasks WHERE rowid IN (SELECT rowid FROM tasks INDEXED BY "
                   f"tasks_by_stage_state WHERE run_id=? AND state IN ({','.join('?' * len(wanted))}))")
            args += wanted
        rows = self._db.execute(sql + " ORDER BY ord", args).fetchall()
        return [_task_from_row(r) for r in rows]

    @_sql_errors
    def summarize_run(self, run_id: str, max_failures: int = 10) -> RunSummary:
        """:class:`RunSummary` of the run, aggregated in SQL over ``tasks_by_stage_state`` and
        ``tasks_by_duration``: a 300,000-task run answers in a fraction of a second, and no task
        row is read unless it failed."""
        rows = self._db.execute(
            "SELECT stage, state, COUNT(*), MIN(ord) FROM tasks INDEXED BY tasks_by_stage_state "
            "WHERE run_id=? GROUP BY stage, state",
            (run_id,),
        ).fetchall()
        first: dict[str, int] = {}
        per_stage: dict[str, dict[str, int]] = {}
        for stage, state, n, lo in rows:
            first[stage] = min(first.get(stage, lo), lo)
            per_stage.setdefault(stage, {})[state] = n
        stages = {s: dict(sorted(per_stage[s].items(), key=lambda kv: _STATE_RANK[kv[0]]))
                  for s in sorted(first, key=first.__getitem__)}
        times = {}
        ended = "FROM tasks INDEXED BY tasks_by_duration WHERE run_id=? AND stage=? AND " + _ENDED
        for stage in stages:
            n = self._db.execute(f"SELECT COUNT(*) {ended}", (run_id, stage)).fetchone()[0]
            if not n:
                continue
            top = self._db.execute(f"SELECT {_DURATION} {ended} ORDER BY {_DURATION} DESC LIMIT 1",
                                   (run_id, stage)).fetchone()[0]
            mid = self._db.execute(f"SELECT {_DURATION} {ended} ORDER BY {_DURATION} LIMIT 2 OFFSET ?",
                                   (run_id, stage, (n - 1) // 2)).fetchall()
            times[stage] = (mid[0][0] if n % 2 else (mid[0][0] + mid[1][0]) / 2, top)
        bad = [s.value for s in FAILED_STATES]
        failed_total = sum(per.get(b, 0) for per in stages.values() for b in bad)
        failures: list[TaskRecord] = []
        if failed_total and max_failures > 0:
            marks = ",".join("?" * len(bad))
            got = self._db.execute(
                f"SELECT {_TASK_COLS} FROM tasks WHERE rowid IN (SELECT rowid FROM tasks INDEXED BY "
                f"tasks_by_stage_state WHERE run_id=? AND state IN ({marks}) ORDER BY ord LIMIT ?) ORDER BY ord",
                (run_id, *bad, max_failures),
            ).fetchall()
            failures = [_task_from_row(r) for r in got]
        return RunSummary(stages=stages, times=times, failures=failures, failed_total=failed_total)

    @_sql_errors
    def save_tasks(self, tasks: Sequence[TaskRecord]) -> None:
        if not tasks:
            return
        with self._tx():
            self._db.executemany(_UPDATE_TASK, [_task_update_row(t) for t in tasks])

    @_sql_errors
    def swap_task(self, old: TaskRecord, new: TaskRecord) -> bool:
        with self._tx():
            cur = self._db.execute(_SWAP_TASK, (*_task_update_row(new), *_task_update_row(old)[:8]))
            return cur.rowcount == 1

    @_sql_errors
    def save_batch(self, tasks: Sequence[TaskRecord], attempts: Sequence[AttemptRecord]) -> None:
        """Tasks and attempts in one transaction (the local scheduler's write path)."""
        with self._tx():
            self._db.executemany(
                f"INSERT OR REPLACE INTO attempts ({_ATTEMPT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [_attempt_row(a) for a in attempts],
            )
            self._db.executemany(_UPDATE_TASK, [_task_update_row(t) for t in tasks])

    # -- attempts -----------------------------------------------------------------------------
    @_sql_errors
    def save_attempt(self, attempt: AttemptRecord) -> None:
        with self._tx():
            self._db.execute(
                f"INSERT OR REPLACE INTO attempts ({_ATTEMPT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                _attempt_row(attempt),
            )

    @_sql_errors
    def get_attempts(self, run_id: str, task_id: str) -> list[AttemptRecord]:
        rows = self._db.execute(
            f"SELECT {_ATTEMPT_COLS} FROM attempts WHERE run_id=? AND task_id=? ORDER BY attempt",
            (run_id, task_id),
        ).fetchall()
        return [_attempt_from_row(r) for r in rows]

    @_sql_errors
    def update_tasks(self, pairs: Sequence[tuple[TaskRecord, TaskRecord]]) -> list[TaskRecord]:
        """For each (old, new): write ``new`` only where the stored record is still ``old``."""
        written = []
        with self._tx():
            for old, new in pairs:
                cur = self._db.execute(_SWAP_TASK, (*_task_update_row(new), *_task_update_row(old)[:8]))
                if cur.rowcount == 1:
                    written.append(new)
        return written

    @_sql_errors
    def restore_tasks(self, run_id: str, tasks: Sequence[TaskRecord]) -> int:
        """Record the tasks the run does not hold yet; the number added."""
        with self._tx():
            top = self._db.execute("SELECT COALESCE(MAX(ord), -1) FROM tasks WHERE run_id=?", (run_id,)).fetchone()[0]
            cur = self._db.executemany(
                f"INSERT OR IGNORE INTO tasks ({_TASK_COLS}, ord) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(*_task_row(t), top + 1 + i) for i, t in enumerate(tasks) if t.run_id == run_id],
            )
            return max(cur.rowcount, 0)

    @contextlib.contextmanager
    def lease(self, run_id: str, purpose: str, wait: float = LEASE_WAIT_S) -> Iterator[None]:
        """The run's lease: an flock the kernel releases when this process ends (see corral.state.lease)."""
        with file_lease(self.path.parent / "locks", run_id, purpose, wait):
            yield

    def integrity_ok(self) -> bool:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def close(self) -> None:
        self._db.close()

    # -- helpers ------------------------------------------------------------------------------
    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise
        else:
            with contextlib.suppress(sqlite3.Error):  # the first error is the one to report
                self.db.execute("ROLLBACK")


_ENDED = "started_at IS NOT NULL AND ended_at IS NOT NULL"  # the WHERE of tasks_by_duration, as written there
_DURATION = "ended_at - started_at"  # its expression, as written there (SQLite matches the text)

_UPDATE_TASK = (
    "UPDATE tasks SET state=?, attempts=?, exit_code=?, reason=?, started_at=?, ended_at=?, "
    "external_id=?, instance_type=? WHERE run_id=? AND task_id=?"
)

_SWAP_TASK = (
    _UPDATE_TASK + " AND state=? AND attempts=? AND exit_code IS ? AND reason=? AND started_at IS ? "
    "AND ended_at IS ? AND external_id=? AND instance_type=?"
)


def _task_update_row(t: TaskRecord) -> tuple[Any, ...]:
    return (
        t.state.value, t.attempts, t.exit_code, t.reason, t.started_at, t.ended_at, t.external_id,
        t.instance_type, t.run_id, t.task_id,
    )


def _run_row(r: RunRecord) -> tuple[Any, ...]:
    return (
        r.run_id, r.workflow_name, r.backend, r.created_at, r.updated_at or r.created_at, r.state.value,
        r.workflow_path, r.base_dir, r.host, r.pid, json.dumps(r.options, sort_keys=True),
    )


def _run_from_row(row: tuple[Any, ...]) -> RunRecord:
    return RunRecord(
        run_id=row[0], workflow_name=row[1], backend=row[2], created_at=row[3], updated_at=row[4],
        state=RunState(row[5]), workflow_path=row[6], base_dir=row[7], host=row[8], pid=row[9],
        options=json.loads(row[10]),
    )


def _task_row(t: TaskRecord) -> tuple[Any, ...]:
    return (
        t.run_id, t.task_id, t.stage, t.item_key, t.item_index, t.state.value, t.attempts, t.exit_code,
        t.reason, t.started_at, t.ended_at, t.external_id, t.instance_type,
    )


_STATE_OF = {s.value: s for s in TaskState}
_STATE_RANK = {s.value: i for i, s in enumerate(TaskState)}  # a dict look-up, not Enum's call machinery, per row


def _task_from_row(r: tuple[Any, ...]) -> TaskRecord:
    # positional, in TaskRecord's field order (= _TASK_COLS): half the cost of keywords per row
    return TaskRecord(r[0], r[1], r[2], r[3], r[4], _STATE_OF[r[5]], r[6], r[7], r[8], r[9], r[10], r[11], r[12])


def _attempt_row(a: AttemptRecord) -> tuple[Any, ...]:
    return (
        a.run_id, a.task_id, a.attempt, a.state.value, a.exit_code, a.reason, a.started_at, a.ended_at,
        a.stdout, a.stderr, a.external_id, a.host, a.pid, a.instance_type,
    )


def _attempt_from_row(row: tuple[Any, ...]) -> AttemptRecord:
    return AttemptRecord(
        run_id=row[0], task_id=row[1], attempt=row[2], state=TaskState(row[3]), exit_code=row[4],
        reason=row[5], started_at=row[6], ended_at=row[7], stdout=row[8], stderr=row[9],
        external_id=row[10], host=row[11], pid=row[12], instance_type=row[13],
    )
