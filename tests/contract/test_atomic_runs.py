"""A run is recorded whole or not at all: the client is stopped at every write of ``create_run``
(SQLite: a process killed at its Nth statement; DynamoDB: the Nth write call fails, as a
connection reset or an error response), and no reader — another process, ``list_runs``,
``resume`` — ever sees part of a run. ``resume`` rebuilds task records missing from the
manifest and runs every task."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import corral
from corral import api
from corral.errors import StateError
from corral.model import RunRecord, TaskRecord, TaskState
from corral.state.sqlite import SqliteStore

WRITES = ("PutItem", "BatchWriteItem", "UpdateItem", "DeleteItem", "TransactWriteItems")


def _run(run_id: str = "r1") -> RunRecord:
    return RunRecord(run_id=run_id, workflow_name="wf", backend="aws", created_at=100.0)


def _tasks(run_id: str, n: int) -> list[TaskRecord]:
    return [TaskRecord(run_id, f"t{i:05d}", "s", f"k{i}", i) for i in range(n)]


def _sees_nothing(store: Any, run_id: str) -> None:
    with pytest.raises(StateError):
        store.get_run(run_id)
    with pytest.raises(StateError):
        store.load_manifest(run_id)
    assert run_id not in [r.run_id for r in store.list_runs()]


# -- SQLite: kill -9 at each statement -------------------------------------------------------------
_KILLER = textwrap.dedent("""
    import os, sys
    from corral.model import RunRecord, TaskRecord
    from corral.state.sqlite import SqliteStore

    class Dying:
        def __init__(self, db, at):
            self.db, self.at, self.n = db, at, 0
        def _count(self, sql):
            if sql.split()[0].upper() in ("INSERT", "UPDATE", "DELETE", "COMMIT"):
                self.n += 1
                if self.n == self.at:
                    os._exit(9)  # as a kill -9: no rollback, no close
        def execute(self, sql, *a):
            self._count(sql)
            return self.db.execute(sql, *a)
        def executemany(self, sql, rows):
            self._count(sql)
            if sql.startswith("INSERT INTO tasks"):  # die part-way through the task rows
                rows = list(rows)
                self.db.executemany(sql, rows[: len(rows) // 2])
                self._count("INSERT")
                return self.db.executemany(sql, rows[len(rows) // 2 :])
            return self.db.executemany(sql, rows)
        def __getattr__(self, name):
            return getattr(self.db, name)

    store = SqliteStore(sys.argv[1])
    store._db = Dying(store._db, int(sys.argv[2]))
    run = RunRecord(run_id="r1", workflow_name="wf", backend="local", created_at=100.0)
    store.create_run(run, b"manifest" * 1000, [TaskRecord("r1", f"t{i:05d}", "s", f"k{i}", i) for i in range(500)])
    print("recorded")
""")


def test_sqlite_create_run_killed_at_every_write_leaves_no_half_run(tmp_path: Path) -> None:
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for at in range(1, 6):
        db = tmp_path / f"s{at}.db"
        res = subprocess.run([sys.executable, str(script), str(db), str(at)], env=env, capture_output=True,
                             text=True, timeout=60)
        other = SqliteStore(db)  # another process, after the kill
        if res.returncode == 9:
            _sees_nothing(other, "r1")
            assert other.get_tasks("r1") == []
            assert other.integrity_ok()
        else:  # past the last write: the whole run
            assert res.returncode == 0 and "recorded" in res.stdout, res.stderr
            assert len(other.get_tasks("r1")) == 500 and other.load_manifest("r1") == b"manifest" * 1000
        other.close()
    assert res.returncode == 0  # the loop went past the last write


# -- DynamoDB: the Nth write fails ----------------------------------------------------------------------
class _StopAt:
    """A botocore hook that stops the Nth DynamoDB write: a connection reset (no response at all)
    or a 500 from the service."""

    def __init__(self, at: int, how: str) -> None:
        self.at, self.how, self.n = at, how, 0

    def __call__(self, model: Any, params: Any, **kw: Any) -> None:
        if model.name not in WRITES:
            return
        self.n += 1
        if self.n == self.at:
            from botocore.exceptions import ClientError, ConnectionClosedError

            if self.how == "reset":
                raise ConnectionClosedError(endpoint_url="http://127.0.0.1")
            raise ClientError({"Error": {"Code": "InternalServerError", "Message": "boom"}}, model.name)


@pytest.mark.aws
@pytest.mark.parametrize("how", ["reset", "error"])
def test_dynamodb_create_run_stopped_at_every_write_leaves_no_half_run(aws: str, how: str) -> None:
    import boto3

    from corral.state.dynamodb import DynamoStore

    table = "corral-state-atomic"
    DynamoStore(table, boto3.client("dynamodb")).create_table_if_missing()
    manifest = os.urandom(900_000)  # 3 manifest parts (incompressible)
    tasks = _tasks("r1", 1200)  # 5 task pages
    total = None
    for at in range(1, 12):
        client = boto3.client("dynamodb")
        stop = _StopAt(at, how)
        client.meta.events.register("before-call.dynamodb", stop)
        store = DynamoStore(table, client, sleep=lambda s: None)
        run_id = f"r{at}"
        try:
            store.create_run(_run(run_id), manifest, _tasks(run_id, len(tasks)))
        except StateError as exc:
            assert "\n" not in exc.one_line() and exc.hint  # one line with a hint, not an AttributeError
            fresh = DynamoStore(table, boto3.client("dynamodb"))  # another machine
            _sees_nothing(fresh, run_id)
            continue
        total = stop.n
        fresh = DynamoStore(table, boto3.client("dynamodb"))
        assert fresh.load_manifest(run_id) == manifest
        assert [t.task_id for t in fresh.get_tasks(run_id)] == [t.task_id for t in _tasks(run_id, len(tasks))]
        break
    assert total is not None and total <= 3  # the whole run in at most 3 write calls (head last)


@pytest.mark.aws
def test_dynamodb_connection_errors_are_one_line_state_errors(aws: str) -> None:
    import boto3
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    from corral.state.dynamodb import DynamoStore

    for exc in (ConnectionClosedError(endpoint_url="http://127.0.0.1"),
                EndpointConnectionError(endpoint_url="http://127.0.0.1")):
        client = boto3.client("dynamodb")

        def fail(exc: Exception = exc, **kw: Any) -> None:
            raise exc

        client.meta.events.register("before-call.dynamodb", fail)
        with pytest.raises(StateError) as info:
            DynamoStore("corral-state", client).get_run("r1")
        assert "corral-state" in info.value.one_line() and info.value.hint


# -- resume rebuilds what the manifest has and the store lacks ------------------------------------
def test_resume_rebuilds_missing_task_records_and_runs_every_task(tmp_path: Path) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text("name: rebuild\nitems: [{i: 1}, {i: 2}, {i: 3}]\nstages:\n"
                  "  - {name: a, command: 'echo ran >> a_{i}.log'}\n"
                  "  - {name: b, needs: [a], command: 'echo ran >> b_{i}.log'}\n")
    rec = corral.run(wf)
    store = SqliteStore(api.corral_home() / "state.db")
    # A run recorded by a version that wrote rows one by one and was stopped: 4 of 6 rows gone.
    store._db.execute("DELETE FROM tasks WHERE run_id=? AND ord > 1", (rec.run_id,))
    assert len(store.get_tasks(rec.run_id)) == 2
    for f in tmp_path.glob("*.log"):
        f.unlink()
    corral.resume(rec.run_id, store=store)
    tasks = store.get_tasks(rec.run_id)
    assert len(tasks) == 6 and all(t.state == TaskState.SUCCEEDED for t in tasks)
    ran = sorted(f.name for f in tmp_path.glob("*.log"))
    assert len(ran) == 4  # the 4 rebuilt ones ran; the 2 recorded as done did not run again
