"""DynamoStore against the moto server: round trips, big manifests, batching, errors."""

from __future__ import annotations

import os
from typing import Any

import boto3
import pytest

from corral.errors import StateError
from corral.model import AttemptRecord, RunRecord, TaskRecord, TaskState
from corral.state.dynamodb import DynamoStore

TABLE = "corral-state-test"


def _client() -> Any:
    return boto3.client("dynamodb", region_name=os.environ["AWS_REGION"])


@pytest.fixture
def store(aws: str) -> DynamoStore:
    store = DynamoStore(TABLE, _client(), sleep=lambda s: None)
    assert store.create_table_if_missing() is True
    assert store.create_table_if_missing() is False
    return store


def _tasks(run_id: str, n: int) -> list[TaskRecord]:
    return [TaskRecord(run_id, f"t{i:05d}", "s", f"k{i}", i) for i in range(n)]


def test_round_trip_order_and_filter(store: DynamoStore) -> None:
    run = RunRecord("r1", "wf", "aws", created_at=100.0, options={"aws_batch": {"round": 0}})
    tasks = _tasks("r1", 60)[::-1]  # plan order is the given order, not the id order
    store.create_run(run, b"manifest", tasks)
    got = store.get_tasks("r1")
    assert [t.task_id for t in got] == [t.task_id for t in tasks]
    assert store.get_run("r1").options == {"aws_batch": {"round": 0}}
    assert store.load_manifest("r1") == b"manifest"
    changed = [t.replace(state=TaskState.FAILED, reason="exit 3 'quoted' ü", exit_code=3) for t in got[:30]]
    fresh = DynamoStore(TABLE, _client())  # another machine: no cached order
    fresh.save_tasks(changed)
    failed = store.get_tasks("r1", [TaskState.FAILED])
    assert [t.task_id for t in failed] == [t.task_id for t in changed]
    assert failed[0].reason == "exit 3 'quoted' ü" and failed[0].exit_code == 3
    # unknown tasks are not created (same as SQLite's UPDATE)
    fresh.save_tasks([TaskRecord("r1", "nope", "s", "k", 0)])
    assert len(store.get_tasks("r1")) == 60


def test_create_twice_and_missing_run(store: DynamoStore) -> None:
    run = RunRecord("r1", "wf", "aws", created_at=1.0)
    store.create_run(run, b"m", [])
    with pytest.raises(StateError, match="exists already"):
        store.create_run(run, b"m", [])
    with pytest.raises(StateError, match="no run 'zz'"):
        store.get_run("zz")
    with pytest.raises(StateError, match="no run 'zz' to update"):
        store.save_run(RunRecord("zz", "wf", "aws", created_at=1.0))


def test_large_manifest_is_chunked(store: DynamoStore) -> None:
    blob = os.urandom(900_000)  # incompressible: three parts of < 400 KB
    store.create_run(RunRecord("big", "wf", "aws", created_at=1.0), blob, [])
    assert store.load_manifest("big") == blob


def test_list_runs_newest_first_and_save_run(store: DynamoStore) -> None:
    for i in range(5):
        store.create_run(RunRecord(f"r{i}", "wf", "aws", created_at=float(i)), b"", [])
    assert [r.run_id for r in store.list_runs(3)] == ["r4", "r3", "r2"]
    r = store.get_run("r2")
    store.save_run(r.replace(options={"x": 1}))
    assert store.get_run("r2").options == {"x": 1}
    assert store.get_run("r2").updated_at >= r.updated_at


def test_attempts(store: DynamoStore) -> None:
    store.create_run(RunRecord("r", "wf", "aws", created_at=1.0), b"", _tasks("r", 1))
    for n in (2, 1):
        store.save_attempt(AttemptRecord("r", "t00000", n, state=TaskState.FAILED, stdout=f"stream{n}"))
    store.save_attempt(AttemptRecord("r", "t00000", 1, state=TaskState.SUCCEEDED, stdout="stream1"))
    atts = store.get_attempts("r", "t00000")
    assert [(a.attempt, a.state) for a in atts] == [(1, TaskState.SUCCEEDED), (2, TaskState.FAILED)]


class _Flaky:
    """A real client that leaves half of each BatchWriteItem unprocessed the first times."""

    def __init__(self, real: Any, failures: int) -> None:
        self._real = real
        self.failures = failures
        self.calls = 0
        import threading

        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def batch_write_item(self, RequestItems: dict[str, list[Any]]) -> dict[str, Any]:  # noqa: N803
        (table, reqs), = RequestItems.items()
        with self._lock:  # chunks are written from several threads
            self.calls += 1
            fail = self.failures > 0 and len(reqs) > 1
            self.failures -= int(fail)
        if fail:
            half = len(reqs) // 2
            self._real.batch_write_item(RequestItems={table: reqs[:half]})
            return {"UnprocessedItems": {table: reqs[half:]}}
        return self._real.batch_write_item(RequestItems=RequestItems)


def test_unprocessed_items_are_retried(store: DynamoStore) -> None:
    flaky = _Flaky(_client(), failures=4)
    slept: list[float] = []
    s = DynamoStore(TABLE, flaky, sleep=slept.append)
    s.create_run(RunRecord("r", "wf", "aws", created_at=1.0), b"m", _tasks("r", 2000))  # 8 pages + 2 items
    assert len(store.get_tasks("r")) == 2000
    assert flaky.calls == 5 and len(slept) == 4 and all(0 < x <= 2.0 for x in slept)


def test_missing_table_is_a_state_error(aws: str) -> None:
    s = DynamoStore("no-such-table", _client())
    with pytest.raises(StateError, match="does not exist") as info:
        s.get_run("r")
    assert info.value.hint and "corral aws setup" in info.value.hint


def test_save_tasks_writes_one_conditional_put_per_page_last_version_wins(store: DynamoStore) -> None:
    """save_tasks of 1,000 records is one PutItem per page of 250 (several in flight at once),
    not a row per task; a task given twice in one call ends with its last version."""
    import threading

    run = RunRecord("rp", "wf", "aws", created_at=1.0)
    tasks = _tasks("rp", 1000)
    store.create_run(run, b"m", tasks)
    calls: list[str] = []
    threads: set[int] = set()
    lock = threading.Lock()

    def count(params: dict[str, Any], **kw: Any) -> None:
        with lock:
            calls.append(params["Item"]["sk"]["S"])
            threads.add(threading.get_ident())

    store.client.meta.events.register("before-parameter-build.dynamodb.PutItem", count)
    first = tasks[7].replace(state=TaskState.RUNNING)
    updated = [t.replace(state=TaskState.SUCCEEDED, exit_code=0) for t in tasks]
    store.save_tasks([first, *updated])  # tasks[7] twice: RUNNING, then SUCCEEDED
    assert sorted(calls) == [f"PAGE#{n:06d}" for n in range(4)]
    assert len(threads) > 1  # written by more than one thread
    got = DynamoStore(TABLE, _client()).get_tasks("rp")
    assert len(got) == 1000 and all(t.state == TaskState.SUCCEEDED and t.exit_code == 0 for t in got)
