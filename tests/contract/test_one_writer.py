"""One writer per run: the lease on both stores, two local `corral resume` at once, and
conditional task writes (a claim is never overwritten by a refresh)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import corral_cmd, wait_for, write_workflow

import corral
from contract.stores import STORE_FACTORIES
from corral import api
from corral.model import RunRecord, TaskRecord, TaskState
from corral.state.base import StateStore
from corral.state.lease import LeaseHeld
from corral.state.sqlite import SqliteStore


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    s = STORE_FACTORIES[request.param](tmp_path, request)
    s.param = request.param  # type: ignore[attr-defined]
    yield s
    s.close()


_HOLDER = textwrap.dedent("""
    import sys, time
    kind, where = sys.argv[1], sys.argv[2]
    if kind == "sqlite":
        from corral.state.sqlite import SqliteStore
        store = SqliteStore(where)
    else:
        import boto3
        from corral.state.dynamodb import DynamoStore
        store = DynamoStore(where, boto3.client("dynamodb"))
    with store.lease("r1", "resume"):
        print("held", flush=True)
        time.sleep(120)
""")


def _hold(store: StateStore, tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    where = str(tmp_path / "state.db") if store.param == "sqlite" else store.table  # type: ignore[attr-defined]
    proc = subprocess.Popen([sys.executable, str(script), store.param, where], stdout=subprocess.PIPE,  # type: ignore[attr-defined]
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_told_who_holds_the_run(store: StateStore, tmp_path: Path) -> None:
    proc = _hold(store, tmp_path)
    try:
        with pytest.raises(LeaseHeld) as info, store.lease("r1", "cancel", wait=0.3):
            pass
        line = info.value.one_line()
        assert f"pid {proc.pid} on {socket.gethostname()}" in line and "`corral resume`" in line and "since" in line
        with store.lease("r2", "run", wait=0):  # another run is not held
            pass
    finally:
        proc.kill()
        proc.wait(timeout=10)
    if store.param == "sqlite":  # type: ignore[attr-defined]
        # the OS released it with the process (kill -9); re-entrant in one process
        with store.lease("r1", "resume", wait=0), store.lease("r1", "resume", wait=0):
            pass


def test_an_expired_dynamodb_lease_is_taken_over(aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    from corral.state import dynamodb

    s = dynamodb.DynamoStore("corral-state-lease", boto3.client("dynamodb"))
    s.create_table_if_missing()
    s.client.put_item(TableName=s.table, Item={
        "pk": {"S": "RUN#r1"}, "sk": {"S": "LEASE"}, "owner": {"S": "gone:1:x"},
        "holder": {"S": '{"host": "gone", "pid": 1, "since": 0, "purpose": "run"}'}, "expires": {"N": "1"},
    })
    with s.lease("r1", "resume", wait=0):
        item = s.client.get_item(TableName=s.table, Key={"pk": {"S": "RUN#r1"}, "sk": {"S": "LEASE"}})["Item"]
        assert item["owner"]["S"].startswith(f"{socket.gethostname()}:{os.getpid()}:")
    assert "Item" not in s.client.get_item(TableName=s.table, Key={"pk": {"S": "RUN#r1"}, "sk": {"S": "LEASE"}})


def test_update_tasks_writes_only_over_the_records_read(store: StateStore) -> None:
    run = RunRecord(run_id="r1", workflow_name="wf", backend="aws", created_at=1.0)
    store.create_run(run, b"{}", [TaskRecord("r1", f"t{i}", "s", f"k{i}", i) for i in range(600)])
    tasks = store.get_tasks("r1")
    claim = tasks[300].replace(state=TaskState.PENDING, external_id="intent:x-f1:0:1")
    assert store.swap_task(tasks[300], claim)  # another process's claim, after our read
    refreshed = [t.replace(state=TaskState.FAILED, reason="upstream") for t in tasks]
    written = store.update_tasks(list(zip(tasks, refreshed, strict=True)))
    assert len(written) == 599 and all(w.task_id != "t300" for w in written)
    now = store.get_tasks("r1")
    assert now[300] == claim and {t.state for i, t in enumerate(now) if i != 300} == {TaskState.FAILED}


# -- two `corral resume` of one local run at once -----------------------------------------------------
def test_two_concurrent_local_resumes_one_runs_the_other_says_who(tmp_path: Path) -> None:
    items = ", ".join(f"{{i: {i}}}" for i in range(6))
    wf = write_workflow(tmp_path, f"""
name: twice
items: [{items}]
stages:
  - name: a
    command: "test -f go || exit 1; echo ran >> a_{{i}}.log; sleep 1"
""")
    rec = corral.run(wf)  # every task fails: nothing to go on with until `go` exists
    assert {t.state for t in corral.status(rec.run_id)} == {TaskState.FAILED}
    (tmp_path / "go").write_text("")
    procs = [subprocess.Popen(corral_cmd("resume", rec.run_id, "--max-parallel", "6"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, outs
    loser = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode != 0)
    assert f"is in use by `corral resume` (pid {next(p.pid for p in procs if p.returncode == 0)}" in loser
    assert "Traceback" not in loser
    for i in range(6):
        assert (tmp_path / f"a_{i}.log").read_text().count("ran") == 1  # each task ran once


def test_run_holds_the_lease_until_it_ends(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, "name: held\nitems: [{i: 1}]\nstages:\n  - {name: a, command: 'touch started; sleep 30'}\n")
    proc = subprocess.Popen(corral_cmd("run", str(wf)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "started").exists(), 30, "the task to start")
        store = SqliteStore(api.corral_home() / "state.db")
        run_id = store.list_runs(1)[0].run_id
        with pytest.raises(LeaseHeld, match=rf"`corral run` \(pid {proc.pid} "), store.lease(run_id, "resume", wait=0):
            pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    with store.lease(run_id, "resume", wait=0):  # released by the kernel at kill -9
        pass
