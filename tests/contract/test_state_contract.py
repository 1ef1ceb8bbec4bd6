"""One contract, every state store: what backends and the CLI rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.stores import STORE_FACTORIES
from corral.errors import StateError
from corral.model import AttemptRecord, RunRecord, RunState, TaskRecord, TaskState
from corral.state.base import StateStore


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    s = STORE_FACTORIES[request.param](tmp_path, request)
    yield s
    s.close()


def _run(run_id: str = "r1", created: float = 100.0) -> RunRecord:
    return RunRecord(run_id=run_id, workflow_name="wf", backend="local", created_at=created,
                     workflow_path="/x/wf.yaml", base_dir="/x", host="h", options={"aws": {"region": "r"}})


def _tasks(run_id: str, n: int) -> list[TaskRecord]:
    return [TaskRecord(run_id=run_id, task_id=f"t{i:05d}", stage="s" if i % 2 else "t", item_key=f"k{i}",
                       item_index=i) for i in range(n)]


def test_create_and_read_back(store: StateStore) -> None:
    manifest = b'{"big": "' + b"x" * 600_000 + b'"}'  # bigger than one DynamoDB item
    store.create_run(_run(), manifest, _tasks("r1", 60))
    r = store.get_run("r1")
    assert (r.workflow_name, r.backend, r.state, r.options) == ("wf", "local", RunState.RUNNING, {"aws": {"region": "r"}})
    assert store.load_manifest("r1") == manifest
    tasks = store.get_tasks("r1")
    assert [t.task_id for t in tasks] == [f"t{i:05d}" for i in range(60)]  # plan order kept
    assert all(t.state == TaskState.PENDING and t.attempts == 0 for t in tasks)


def test_run_ids_are_never_recorded_twice(store: StateStore) -> None:
    store.create_run(_run(), b"{}", _tasks("r1", 2))
    with pytest.raises(StateError):
        store.create_run(_run(), b"{}", _tasks("r1", 2))
    assert len(store.get_tasks("r1")) == 2


def test_missing_run_is_a_state_error(store: StateStore) -> None:
    with pytest.raises(StateError, match="nope"):
        store.get_run("nope")


def test_save_tasks_updates_only_given_tasks_and_filters_by_state(store: StateStore) -> None:
    store.create_run(_run(), b"{}", _tasks("r1", 30))
    tasks = store.get_tasks("r1")
    changed = [t.replace(state=TaskState.SUCCEEDED, attempts=1, exit_code=0, started_at=1.0, ended_at=2.5,
                         external_id=f"job:{t.item_index}") for t in tasks[:27]]
    store.save_tasks(changed)
    done = store.get_tasks("r1", [TaskState.SUCCEEDED])
    assert len(done) == 27 and done[3].external_id == "job:3" and done[3].ended_at == 2.5
    assert len(store.get_tasks("r1", [TaskState.PENDING])) == 3
    assert len(store.get_tasks("r1", [TaskState.PENDING, TaskState.SUCCEEDED])) == 30


def test_runs_listed_newest_first_and_saved(store: StateStore) -> None:
    store.create_run(_run("old", 1.0), b"{}", [])
    store.create_run(_run("new", 2.0), b"{}", [])
    assert [r.run_id for r in store.list_runs()] == ["new", "old"]
    store.save_run(store.get_run("old").replace(state=RunState.FAILED, pid=None))
    assert store.get_run("old").state == RunState.FAILED
    assert store.get_run("new").state == RunState.RUNNING


def test_attempts_upsert_and_order(store: StateStore) -> None:
    store.create_run(_run(), b"{}", _tasks("r1", 1))
    a1 = AttemptRecord(run_id="r1", task_id="t00000", attempt=1, started_at=1.0, stdout="o1", stderr="e1")
    store.save_attempt(a1)
    store.save_attempt(a1.replace(state=TaskState.FAILED, exit_code=3, reason="exit code 3", ended_at=2.0))
    store.save_attempt(AttemptRecord(run_id="r1", task_id="t00000", attempt=2, started_at=3.0))
    got = store.get_attempts("r1", "t00000")
    assert [a.attempt for a in got] == [1, 2]
    assert (got[0].state, got[0].exit_code, got[0].reason) == (TaskState.FAILED, 3, "exit code 3")
    assert store.get_attempts("r1", "other") == []


def test_runs_are_isolated(store: StateStore) -> None:
    store.create_run(_run("a", 1.0), b"A", _tasks("a", 3))
    store.create_run(_run("b", 2.0), b"B", _tasks("b", 2))
    assert len(store.get_tasks("a")) == 3 and len(store.get_tasks("b")) == 2
    assert store.load_manifest("b") == b"B"


def test_swap_task_writes_only_over_the_expected_record(store: StateStore) -> None:
    store.create_run(_run(), b"{}", _tasks("r1", 3))
    old = store.get_tasks("r1")[1]
    failed = old.replace(state=TaskState.UPSTREAM_FAILED, external_id="job-1", ended_at=12.5, reason="dep")
    store.save_tasks([failed])
    claim = failed.replace(state=TaskState.PENDING, external_id="intent:x-f1:0:1", ended_at=None)
    assert store.swap_task(old, claim) is False  # not what is stored any more
    assert store.get_tasks("r1")[1] == failed
    assert store.swap_task(failed, claim) is True
    assert store.get_tasks("r1")[1] == claim
    other = failed.replace(state=TaskState.PENDING, external_id="intent:x-f2:0:1", ended_at=None)
    assert store.swap_task(failed, other) is False  # a second claimer of the same record loses
    assert store.get_tasks("r1")[1] == claim
    assert [t.state for i, t in enumerate(store.get_tasks("r1")) if i != 1] == [TaskState.PENDING] * 2
