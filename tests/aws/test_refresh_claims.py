"""Two watchers refresh a failed AWS run: the slower one's task-state write comes after the
faster one has claimed and submitted the workspace cleanup. The write is conditional, so the
claim stands and the cleanup is submitted once (a blind write put the old state back and the
slower watcher submitted the cleanup a second time)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fake_batch import ACCOUNT, REGION, FakeBatch
from test_backend_support import FakeEnvironment, record_run
from test_refresh import offline_clients

from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch.backend import AwsBatchBackend
from corral.backends.base import RunOptions
from corral.model import TaskRecord
from corral.plan import CLEANUP_STAGE, make_plan
from corral.spec import loads_workflow
from corral.state.sqlite import SqliteStore

# The run of test_cleanup_after_failure, played at the Batch seam by FakeBatch (no moto).
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
EXITED = "Essential container in task exited"


def _backend(fake: FakeBatch, env: Any, said: list[str]) -> AwsBatchBackend:
    return AwsBatchBackend(offline_clients(), environment=env, sleep=lambda s: None, say=said.append,
                           wall_clock=lambda: 1_800_000_000.0, api=fake)


def _start_and_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeBatch, Any, SqliteStore]:
    """A run on an "EFS" workspace whose fetch of item 1 fails: Batch fails the convert child and
    the dependent cleanup job; everything else succeeded."""
    monkeypatch.setattr(pl, "EFS_MOUNT", str(tmp_path / "efs"))
    # the cleanup job runs in the rclone image: name one, so start() copies none into ECR (the fake
    # Batch seam answers Batch alone; tests/aws/test_rclone_image.py tests the copy)
    monkeypatch.setenv("CORRAL_RCLONE_IMAGE", "registry.example/corral-test/rclone:1")
    fake = FakeBatch()
    env = FakeEnvironment(region=REGION, account_id=ACCOUNT, job_queue=fake.queue_arn("test-queue"),
                          job_role_arn=f"arn:aws:iam::{ACCOUNT}:role/job",
                          execution_role_arn=f"arn:aws:iam::{ACCOUNT}:role/exec",
                          efs_id="fs-12345678", efs_access_point="fsap-12345678")
    plan = make_plan(loads_workflow(WF), items=[{"session": f"s{i}"} for i in range(3)])
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan, RUN)
    _backend(fake, env, []).start(plan, run, store, RunOptions(wait=False))
    ext = {(t.stage, t.item_index): t.external_id for t in store.get_tasks(RUN)}
    for e in ext.values():
        fake.steer(fake.children[e], "SUCCEEDED", exit_code=0)
    fake.steer(fake.children[ext[("fetch", 1)]], "FAILED", EXITED, 1)
    fake.steer(fake.children[ext[("convert", 1)]], "FAILED", "Dependent Job failed")
    fake.steer(fake.children[ext[(CLEANUP_STAGE, None)]], "FAILED", "Dependent Job failed")
    return fake, env, store


class _SlowWatcher(SqliteStore):
    """Its first task-state write waits until the other watcher has done everything."""

    def __init__(self, path: Path, reached: threading.Event, go: threading.Event) -> None:
        super().__init__(path)
        self.reached, self.go, self.first = reached, go, True

    def _gate(self) -> None:
        if self.first:
            self.first = False
            self.reached.set()
            assert self.go.wait(timeout=60)

    def save_tasks(self, tasks: Sequence[TaskRecord]) -> None:
        self._gate()
        super().save_tasks(tasks)

    def update_tasks(self, pairs: Sequence[tuple[TaskRecord, TaskRecord]]) -> list[TaskRecord]:
        self._gate()
        return super().update_tasks(pairs)


def test_a_slow_watcher_does_not_overwrite_the_cleanup_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake, env, store = _start_and_fail(tmp_path, monkeypatch)
    reached, go = threading.Event(), threading.Event()
    said: list[str] = []
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            s = _SlowWatcher(tmp_path / "s.db", reached, go)
            _backend(fake, env, said).refresh(s.get_run(RUN), s)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=slow)
    t.start()
    assert reached.wait(timeout=60)
    fast = SqliteStore(tmp_path / "s.db")
    _backend(fake, env, said).refresh(fast.get_run(RUN), fast)  # claims and submits the cleanup
    assert len(fake.parents(PREFIX)) == 2
    go.set()
    t.join(timeout=60)
    assert not errors, errors
    cleanups = fake.parents(PREFIX)  # in submission order
    assert len(cleanups) == 2 and len(said) == 1  # the original and exactly one resubmission
    assert not cleanups[1].depends_on and cleanups[1].name.startswith(cleanups[0].name + "-f")
    (cleanup,) = [t for t in store.get_tasks(RUN) if t.stage == CLEANUP_STAGE]
    assert cleanup.external_id == cleanups[1].job_id
