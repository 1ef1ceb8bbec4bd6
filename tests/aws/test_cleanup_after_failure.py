"""The run's workspace cleanup on AWS also after a failure: Batch fails the dependent cleanup job, so
a refresh that finds the failed run ended submits the cleanup again without dependencies, exactly
once (two machines refreshing at once, a crash between SubmitJob and the store write), and its
container command — run here with /bin/sh — removes exactly the run's workspace."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from test_backend import _steer
from test_backend_support import make_environment, moto_batch_backend, record_run

from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch.backend import CLAIM_LEASE, AwsBatchBackend
from corral.backends.aws_batch.client import AwsClients
from corral.backends.base import RunOptions
from corral.errors import BackendError
from corral.model import RunState, TaskRecord, TaskState
from corral.plan import CLEANUP_STAGE, make_plan
from corral.spec import loads_workflow
from corral.state.sqlite import SqliteStore

pytestmark = pytest.mark.aws

WF = """
name: ws
cleanup: true
defaults: {image: busybox}
stages:
  - {name: fetch, command: "fetch {session} {workdir}"}
  - {name: convert, needs: [fetch], command: "convert {session}"}
"""
RUN = "run-1"
PREFIX = f"corral-{RUN}-{CLEANUP_STAGE}-"



def _fail_item_one(store: Any) -> dict[tuple[str, int | None], str]:
    """Steer moto: every job succeeded except item 1's fetch (its convert and the cleanup then
    fail as Batch fails dependents); (stage, item index) → job id."""
    ext = {(t.stage, t.item_index): t.external_id for t in store.get_tasks(RUN)}
    for p in {e.split(":")[0] for e in ext.values()}:
        _steer(p, "RUNNING")
    for e in ext.values():
        _steer(e, "SUCCEEDED", exit_code=0)
    _steer(ext[("fetch", 1)], "FAILED", "Essential container in task exited", 1)
    _steer(ext[("convert", 1)], "FAILED", "Dependent Job failed")
    _steer(ext[(CLEANUP_STAGE, None)], "FAILED", "Dependent Job failed")
    return ext

def _plan() -> Any:
    return make_plan(loads_workflow(WF), items=[{"session": f"s{i}"} for i in range(3)])


class _Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _backend(env: Any, said: list[str], clock: _Clock | None = None, **kw: Any) -> AwsBatchBackend:
    return AwsBatchBackend(AwsClients(), environment=env, sleep=lambda s: None, say=said.append,
                           wall_clock=clock or _Clock(), **kw)


def _jobs(prefix: str = PREFIX) -> list[Any]:
    return sorted((j for j in moto_batch_backend()._jobs.values() if j.job_name.startswith(prefix)),
                  key=lambda j: j.job_name)


def _start_and_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, SqliteStore, Any]:
    """A run on an "EFS" workspace (a temp folder) whose fetch of item 1 fails: Batch fails the
    convert child and the dependent cleanup job."""
    monkeypatch.setattr(pl, "EFS_MOUNT", str(tmp_path / "efs"))
    clients = AwsClients()
    env = make_environment(clients)
    env.efs_id, env.efs_access_point = "fs-12345678", "fsap-12345678"
    plan = _plan()
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan, RUN)
    _backend(env, []).start(plan, run, store, RunOptions(wait=False))
    ext = _fail_item_one(store)
    return env, plan, store, ext


def _workspaces(tmp_path: Path) -> tuple[Path, Path]:
    mine = tmp_path / "efs" / "runs" / RUN
    other = tmp_path / "efs" / "runs" / "run-2"
    for d in (mine / "raw" / "s0", other / "raw"):
        d.mkdir(parents=True)
        (d / "data.bin").write_bytes(b"x" * 100)
    return mine, other


def _run_container(job: Any, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the job as its container would: the definition's command under /bin/sh, the overrides' env."""
    command = job.job_definition.container_properties["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    env = {e["name"]: e["value"] for e in job.container_overrides["environment"]}
    return subprocess.run(command, env={**env, "PATH": os.environ["PATH"], "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)


def test_failed_run_gets_its_cleanup_once_and_it_removes_only_its_workspace(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, _plan_, store, ext = _start_and_fail(tmp_path, monkeypatch)
    mine, other = _workspaces(tmp_path)
    said: list[str] = []
    tasks = {t.stage: t for t in _backend(env, said).refresh(store.get_run(RUN), store)}
    assert store.get_run(RUN).state == RunState.FAILED
    assert len(said) == 1 and said[0].startswith(f"run {RUN} ended with failures; submitted its workspace cleanup")

    original, final = _jobs()  # names sort: …-r0 before …-r0-f<time>
    assert original.job_id == ext[(CLEANUP_STAGE, None)] and original.depends_on
    assert final.job_name.startswith(original.job_name + "-f")
    assert not final.depends_on  # runs whatever happened upstream
    assert final.job_definition.arn == original.job_definition.arn
    cleanup = tasks[CLEANUP_STAGE]
    assert cleanup.state == TaskState.SUBMITTED and cleanup.external_id == final.job_id
    assert final.job_id in said[0]
    assert all(t.state == TaskState.FAILED for t in store.get_tasks(RUN) if (t.stage, t.item_index) == ("fetch", 1))

    r = _run_container(final, tmp_path)
    assert r.returncode == 0, r.stderr
    assert not mine.exists()
    assert (other / "raw" / "data.bin").read_bytes() == b"x" * 100
    assert (tmp_path / "efs" / "runs").is_dir()

    # Later refreshes (moto ended the job at once): recorded, nothing submitted or said again.
    again: list[str] = []
    for _ in range(2):
        tasks = {t.stage: t for t in _backend(env, again).refresh(store.get_run(RUN), store)}
    assert tasks[CLEANUP_STAGE].state == TaskState.SUCCEEDED
    assert len(_jobs()) == 2 and again == []
    assert store.get_run(RUN).state == RunState.FAILED


def test_success_path_submits_nothing_more(aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pl, "EFS_MOUNT", str(tmp_path / "efs"))
    clients = AwsClients()
    env = make_environment(clients)
    plan = _plan()
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan, RUN)
    said: list[str] = []
    _backend(env, said).start(plan, run, store, RunOptions(wait=False))
    n = len(moto_batch_backend()._jobs)
    tasks = _backend(env, said).refresh(store.get_run(RUN), store)
    assert all(t.state == TaskState.SUCCEEDED for t in tasks)
    assert store.get_run(RUN).state == RunState.SUCCEEDED
    assert len(moto_batch_backend()._jobs) == n and len(_jobs()) == 1 and said == []


def test_cancelled_run_keeps_its_workspace(aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As locally: after `corral cancel` the cleanup does not run (so `resume` can go on)."""
    env, _plan_, store, _ext = _start_and_fail(tmp_path, monkeypatch)
    for j in moto_batch_backend()._jobs.values():
        if j.job_name.startswith(PREFIX):
            _steer(j.job_id, "RUNNING")  # not failed yet when the user cancels
    said: list[str] = []
    be = _backend(env, said)
    be.cancel(store.get_run(RUN), store)
    be.refresh(store.get_run(RUN), store)
    assert store.get_run(RUN).state == RunState.CANCELLED
    assert len(_jobs()) == 1 and said == []


class _RacingStore(SqliteStore):
    """Two of these (two machines) reach the claim together before either writes."""

    def __init__(self, path: Path, barrier: threading.Barrier) -> None:
        super().__init__(path)
        self.barrier = barrier

    def swap_task(self, old: TaskRecord, new: TaskRecord) -> bool:
        self.barrier.wait(timeout=30)
        return super().swap_task(old, new)


def test_two_machines_refreshing_at_once_submit_one_cleanup(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, _plan_, store, _ext = _start_and_fail(tmp_path, monkeypatch)
    barrier = threading.Barrier(2)
    said: list[str] = []
    errors: list[BaseException] = []

    def machine() -> None:
        try:
            s = _RacingStore(tmp_path / "s.db", barrier)
            _backend(env, said).refresh(s.get_run(RUN), s)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=machine) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(_jobs()) == 2  # the original and exactly one resubmission
    assert len(said) == 1
    (cleanup,) = [t for t in store.get_tasks(RUN) if t.stage == CLEANUP_STAGE]
    assert cleanup.external_id == _jobs()[1].job_id


class _Crash(Exception):
    pass


def test_crash_after_submit_is_adopted_not_resubmitted(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, _plan_, store, _ext = _start_and_fail(tmp_path, monkeypatch)

    def crash(name: str, job_id: str) -> None:
        raise _Crash(name)

    with pytest.raises(_Crash):
        _backend(env, [], after_submit=crash).refresh(store.get_run(RUN), store)
    (claimed,) = [t for t in store.get_tasks(RUN) if t.stage == CLEANUP_STAGE]
    assert claimed.state == TaskState.PENDING and claimed.external_id.startswith("intent:")
    said: list[str] = []
    for _ in range(2):
        _backend(env, said).refresh(store.get_run(RUN), store)
    assert len(_jobs()) == 2
    (cleanup,) = [t for t in store.get_tasks(RUN) if t.stage == CLEANUP_STAGE]
    assert cleanup.external_id == _jobs()[1].job_id and cleanup.state == TaskState.SUCCEEDED
    assert len(said) == 1


def test_crash_before_submit_is_taken_over_after_the_lease(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, _plan_, store, _ext = _start_and_fail(tmp_path, monkeypatch)
    clock = _Clock()
    crasher = _backend(env, [], clock)

    def crash(**kw: Any) -> None:
        raise _Crash()

    crasher.clients.register_hook("before-call.batch.SubmitJob", crash)
    with pytest.raises(_Crash):
        crasher.refresh(store.get_run(RUN), store)
    said: list[str] = []
    clock.t += CLAIM_LEASE / 2  # the claimer may still be submitting: leave it alone
    _backend(env, said, clock).refresh(store.get_run(RUN), store)
    assert len(_jobs()) == 1 and said == []
    clock.t += CLAIM_LEASE  # nobody submitted: take it over, once
    _backend(env, said, clock).refresh(store.get_run(RUN), store)
    _backend(env, said, clock).refresh(store.get_run(RUN), store)
    assert len(_jobs()) == 2 and len(said) == 1
    assert not _jobs()[1].depends_on


def test_resume_resubmits_the_failed_tasks_then_the_cleanup_dependent_again(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, plan, store, ext = _start_and_fail(tmp_path, monkeypatch)
    said: list[str] = []
    _backend(env, said).refresh(store.get_run(RUN), store)
    _backend(env, said).refresh(store.get_run(RUN), store)  # the cleanup after failure: SUCCEEDED
    before = {j.job_id for j in moto_batch_backend()._jobs.values()}
    _backend(env, said).resume(plan, store.get_run(RUN), store, RunOptions(wait=False))
    new = {j.job_name: j for j in moto_batch_backend()._jobs.values() if j.job_id not in before and ":" not in j.job_id}
    assert set(new) == {f"corral-{RUN}-fetch-r1-c0", f"corral-{RUN}-convert-r1-c0", f"corral-{RUN}-{CLEANUP_STAGE}-r1"}
    cleanup = new[f"corral-{RUN}-{CLEANUP_STAGE}-r1"]
    assert {d["jobId"] for d in cleanup.depends_on} == {
        new[f"corral-{RUN}-{s}-r1-c0"].job_id for s in ("fetch", "convert")
    }
    assert len(said) == 1  # resume's own refresh did not submit a cleanup


def test_resume_refuses_while_the_cleanup_after_failure_runs(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, plan, store, ext = _start_and_fail(tmp_path, monkeypatch)
    _backend(env, []).refresh(store.get_run(RUN), store)
    _steer(_jobs()[1].job_id, "RUNNING")
    with pytest.raises(BackendError) as info:
        _backend(env, []).resume(plan, store.get_run(RUN), store, RunOptions(wait=False))
    assert "still running" in info.value.message and info.value.hint


def test_corral_status_says_it_once_on_stderr(aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the CLI, with the run in the DynamoDB state table (as `corral run --backend aws` records it)."""
    from helpers import run_cli

    from corral.state.dynamodb import DynamoStore

    clients = AwsClients()
    env = make_environment(clients)
    store = DynamoStore("corral-state", clients.dynamodb)
    store.create_table_if_missing()
    plan = _plan()
    run = record_run(store, plan, RUN)
    _backend(env, []).start(plan, run, store, RunOptions(wait=False))
    _fail_item_one(store)

    first = run_cli("status", RUN, "--backend", "aws")
    second = run_cli("status", RUN, "--backend", "aws", "--json")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    (final,) = [j for j in _jobs() if "-f" in j.job_name[len(PREFIX):]]
    line = f"run {RUN} ended with failures; submitted its workspace cleanup (job {final.job_id})"
    assert first.stderr.count(line) == 1 and "ended with failures" not in second.stderr
    assert line not in first.stdout + second.stdout
    assert len(_jobs()) == 2


def test_a_refused_submission_does_not_break_status_and_is_tried_again(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, _plan_, store, _ext = _start_and_fail(tmp_path, monkeypatch)

    def refuse(**kw: Any) -> Any:
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "ClientException", "Message": "queue is disabled"}}, "SubmitJob")

    clock = _Clock()
    said: list[str] = []
    be = _backend(env, said, clock)
    be.clients.register_hook("before-call.batch.SubmitJob", refuse)
    tasks = be.refresh(store.get_run(RUN), store)  # no exception: status still works
    assert len(said) == 1 and "could not be submitted" in said[0] and "queue is disabled" in said[0]
    assert {t.stage for t in tasks} >= {CLEANUP_STAGE} and len(_jobs()) == 1
    clock.t += CLAIM_LEASE + 1
    _backend(env, said, clock).refresh(store.get_run(RUN), store)
    assert len(_jobs()) == 2 and not _jobs()[1].depends_on
    assert "submitted its workspace cleanup" in said[-1]
