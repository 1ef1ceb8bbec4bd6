"""Status refresh of 10,000 items in few arrays: a refresh lists only what may have changed (nothing
new = one DescribeJobs) yet always agrees with a full listing of every child.

The refresh tests play Batch at the seam corral owns (``BatchApi``) with the in-memory
:class:`fake_batch.FakeBatch`: 10,000 children are steered in microseconds and every call the
refresh makes is counted there. The clients given to the backend refuse any request (no call
may go around the seam). The chunking test at the end sends its SubmitJobs to moto, under the
strict-AWS layer.
"""

from __future__ import annotations

import collections
import math
import random
from pathlib import Path
from typing import Any

import pytest
from fake_batch import ACCOUNT, REGION, FakeBatch
from test_backend_support import FakeEnvironment, make_environment, record_run

from corral.backends.aws_batch.backend import AwsBatchBackend, task_state_of
from corral.backends.aws_batch.client import AwsClients
from corral.backends.base import RunOptions
from corral.model import TaskRecord, TaskState
from corral.plan import Plan, make_plan
from corral.spec import loads_workflow
from corral.state.sqlite import SqliteStore

# The bench's refresh workflow and items (bench/aws_submit.py): one stage, 10,000 items.
ONE_STAGE = "name: wide\ndefaults: {image: busybox}\nstages:\n  - {name: work, command: 'work {session}'}\n"
STATUSES = ["SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED"]
EXITED = "Essential container in task exited"
_PLANS: dict[int, Plan] = {}


def _plan(n: int) -> Plan:
    if n not in _PLANS:
        items = [{"session": f"ses-{i:05d}", "subject": f"sub-{i % 97:03d}"} for i in range(n)]
        _PLANS[n] = make_plan(loads_workflow(ONE_STAGE), items=items)
    return _PLANS[n]


class _CountingStore(SqliteStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.saved = 0

    def save_tasks(self, tasks: Any) -> None:
        self.saved += len(tasks)
        super().save_tasks(tasks)

    def update_tasks(self, pairs: Any) -> Any:  # refresh writes conditionally
        self.saved += len(pairs)
        return super().update_tasks(pairs)


def offline_clients() -> AwsClients:
    """Clients that refuse every request (before anything is sent): all of Batch is behind the seam."""
    import boto3

    session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)
    clients = AwsClients(region=REGION, endpoint_url="http://127.0.0.1:9", session=session)

    def refuse(model: Any, **kw: Any) -> None:
        raise AssertionError(f"{model.service_model.service_name} {model.name} went around the Batch seam")

    clients.register_hook("before-call.*.*", refuse)
    return clients


def _full_listing(fake: FakeBatch, parents: list[str]) -> dict[str, TaskState]:
    """Every child's state from ListJobs of every status of every array: no inference at all."""
    out: dict[str, TaskState] = {}
    for p in parents:
        for status in STATUSES:
            for s in fake.list_jobs("list", arrayJobId=p, jobStatus=status):
                out[s["jobId"]] = task_state_of(s["status"], s.get("statusReason", "") or "")
    return out


def _states(tasks: list[TaskRecord]) -> dict[str, TaskState]:
    return {t.external_id: t.state for t in tasks}


def _start(n: int, store: SqliteStore) -> tuple[AwsBatchBackend, Any, list[str], FakeBatch]:
    fake = FakeBatch()
    env = FakeEnvironment(region=REGION, account_id=ACCOUNT, job_queue=fake.queue_arn("test-queue"),
                          job_role_arn=f"arn:aws:iam::{ACCOUNT}:role/job",
                          execution_role_arn=f"arn:aws:iam::{ACCOUNT}:role/exec")
    plan = _plan(n)
    run = record_run(store, plan)
    be = AwsBatchBackend(offline_clients(), environment=env, sleep=lambda s: None, api=fake)
    be.start(plan, run, store, RunOptions(wait=False))
    parents = sorted({t.external_id.split(":")[0] for t in store.get_tasks(run.run_id)})
    return be, run, parents, fake


def _check_describes(fake: FakeBatch, before: dict[str, TaskState], after: list[TaskRecord]) -> int:
    """The DescribeJobs calls of one refresh: the array parents in one call (≤ 100 of them), then
    only children that just ended, each once, 100 per call — those whose attempts the refresh
    counts (ListJobs summaries carry none; which ones depends on the stage's retries, and AWS,
    unlike moto, returns the ``retryStrategy`` that tells). Returns the children described."""
    described = [kw["jobs"] for op, kw in fake.calls if op == "describe_jobs"]
    assert described and all(":" not in i for i in described[0]), "the parents first, in one call"
    kids = [i for ids in described[1:] for i in ids]
    assert all(":" in i for i in kids)
    ended = {t.external_id for t in after if t.state.terminal and not before[t.external_id].terminal}
    assert len(kids) == len(set(kids)) and set(kids) <= ended
    assert len(described) - 1 == math.ceil(len(kids) / 100)
    return len(kids)


def _recorded(store: SqliteStore, run: Any) -> dict[str, TaskState]:
    return {t.external_id: t.state for t in store.get_tasks(run.run_id)}


def test_ten_thousand_items_in_few_arrays_and_refresh_lists_only_what_changed(tmp_path: Path) -> None:
    store = _CountingStore(tmp_path / "s.db")
    be, run, parents, fake = _start(10_000, store)
    # No task ids in the rows (the stage does not use {task}): 10,000 items need few arrays, even
    # with every array's overrides under ECS's 8,192 characters (the fake refuses a SubmitJob over).
    assert 2 <= len(parents) <= 10, len(parents)
    children = {p: fake.jobs[p].children for p in parents}
    assert sum(len(c) for c in children.values()) == 10_000
    assert fake.count("submit_job") == len(parents)

    # Mid-run at its worst: failed, running and succeeded children in every array.
    for p in parents:
        for i, child in enumerate(children[p]):
            if i % 10 == 0:
                fake.steer(child, "FAILED", EXITED, 1)
            elif i % 20 == 1:
                fake.steer(child, "RUNNING")
            elif i % 20 == 3:
                fake.steer(child, "RUNNABLE")
            else:
                fake.steer(child, "SUCCEEDED", exit_code=0)
    fake.reset_calls()
    before = _recorded(store, run)
    got = be.refresh(store.get_run(run.run_id), store)
    # FAILED, RUNNING and the waiting ones listed per array, SUCCEEDED inferred.
    assert fake.count("list_jobs") == 3 * len(parents) <= 30, fake.ops()
    assert {(kw["arrayJobId"], kw["jobStatus"]) for op, kw in fake.calls if op == "list_jobs"} == {
        (p, s) for p in parents for s in ("FAILED", "RUNNING", "RUNNABLE")}
    _check_describes(fake, before, got)
    assert len(fake.calls) == fake.count("list_jobs") + fake.count("describe_jobs")
    assert _states(got) == _full_listing(fake, parents)

    # Nothing changed: one DescribeJobs for the (≤ 100) parents, no ListJobs, nothing written.
    fake.reset_calls()
    store.saved = 0
    again = be.refresh(store.get_run(run.run_id), store)
    assert fake.ops() == ["describe_jobs"]
    assert store.saved == 0 and _states(again) == _states(got)

    # New failures (and a start) in the first array only: only that array is listed.
    first = parents[0]
    moved = [c for i, c in enumerate(children[first]) if i % 20 == 1][:7]
    for c in moved:
        fake.steer(c, "FAILED", EXITED, 2)
    fake.steer(next(c for i, c in enumerate(children[first]) if i % 20 == 3), "RUNNING")
    fake.reset_calls()
    store.saved = 0
    before = _recorded(store, run)
    got = be.refresh(store.get_run(run.run_id), store)
    lists = [kw["arrayJobId"] for op, kw in fake.calls if op == "list_jobs"]
    assert lists and set(lists) == {first}, fake.calls
    _check_describes(fake, before, got)
    assert store.saved == len(moved) + 1  # only the tasks that changed are written
    assert _states(got) == _full_listing(fake, parents)

    # Everything ends: arrays all succeeded cost no ListJobs; the rest list only their new changes.
    for p in parents:
        for c in children[p]:
            if c.status not in ("FAILED", "SUCCEEDED"):
                fake.steer(c, "SUCCEEDED", exit_code=0)
        assert fake.jobs[p].status == "FAILED"
    fake.reset_calls()
    before = _recorded(store, run)
    got = be.refresh(store.get_run(run.run_id), store)
    # No new failure and nothing running or waiting: the new successes are inferred from the counts.
    assert fake.count("list_jobs") == 0
    _check_describes(fake, before, got)
    assert _states(got) == _full_listing(fake, parents)
    fake.reset_calls()
    assert _states(be.refresh(store.get_run(run.run_id), store)) == _states(got)
    assert fake.calls == []  # every task has ended: nothing to ask Batch


@pytest.mark.parametrize("seed", range(3))
def test_incremental_refresh_agrees_with_a_full_listing(tmp_path: Path, seed: int) -> None:
    """Random progress between refreshes (children start, fail, succeed, wait; terminal ones stay):
    after each refresh the recorded states equal a listing of every child, and a refresh that
    ignores what is known (all tasks reset to SUBMITTED) gives the same states."""
    rng = random.Random(seed)
    store = SqliteStore(tmp_path / "s.db")
    be, run, parents, fake = _start(10_000, store)
    kids = [c for p in parents for c in fake.jobs[p].children]
    for c in kids:
        fake.steer(c, "RUNNABLE")
    fresh = _CountingStore(tmp_path / "fresh.db")
    fresh_run = record_run(fresh, _plan(10_000))
    for step in range(6):
        # Move a random few children of a random subset of arrays (some arrays do not move at all).
        moving = {p for p in parents if rng.random() < 0.6}
        for c in kids:
            if c.job_id.split(":")[0] not in moving or c.status in ("SUCCEEDED", "FAILED") or rng.random() > 0.15:
                continue
            nxt = {"RUNNABLE": ["STARTING", "RUNNING", "FAILED"], "STARTING": ["RUNNING"],
                   "RUNNING": ["SUCCEEDED", "SUCCEEDED", "FAILED"]}[c.status]
            status = rng.choice(nxt)
            reason = rng.choice([EXITED, "Dependent Job failed", "cancelled by corral"]) if status == "FAILED" else None
            fake.steer(c, status, reason, 1 if status == "FAILED" else 0 if status == "SUCCEEDED" else None)
        fake.reset_calls()
        got = be.refresh(store.get_run(run.run_id), store)
        assert {kw["arrayJobId"] for op, kw in fake.calls if op == "list_jobs"} <= moving  # no news: not listed
        truth = _full_listing(fake, parents)
        assert _states(got) == truth, f"step {step}"
        # The same answer from nothing known: every task in flight, refreshed in another store.
        fresh.save_tasks([t.replace(state=TaskState.SUBMITTED) for t in got])
        assert _states(be.refresh(fresh.get_run(fresh_run.run_id), fresh)) == truth


@pytest.mark.aws
def test_one_chunking_when_only_some_stages_carry_task_ids(aws: str, tmp_path: Path) -> None:
    """A stage using {task} has bigger rows: the shared chunking follows it, every SubmitJob stays
    under 30 KiB, and child k is the same item in both stages."""
    from test_backend_support import moto_parent_jobs

    from corral.backends.aws_batch import payloads as pl
    from corral.backends.aws_batch.submit import child_tasks, job_name

    clients = AwsClients()
    env = make_environment(clients)
    text = """
name: mixed
defaults: {image: busybox}
stages:
  - {name: a, command: "work {session}"}
  - {name: b, needs: [a], command: "tag {session}", env: {TAG: "t-{task}"}}
"""
    n = 6000
    plan = make_plan(loads_workflow(text), items=[{"session": f"ses-{i:05d}"} for i in range(n)])
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan)
    bodies: list[int] = []
    clients.register_hook("before-send.batch.SubmitJob", lambda request, **kw: bodies.append(len(request.body or b"")))
    AwsBatchBackend(clients, environment=env, sleep=lambda s: None).start(plan, run, store, RunOptions(wait=False))
    sizes = run.options["aws_batch"]["round0_chunks"]
    assert len(sizes) >= 3 and sum(sizes) == n  # task ids (incompressible) cut b, hence a, in chunks
    assert bodies and max(bodies) < 30 * 1024
    jobs = {j["jobName"]: j for j in moto_parent_jobs()}
    ids = {t.id for t in plan.tasks}
    runs: collections.Counter[str] = collections.Counter()
    for c, size in enumerate(sizes):
        a, b = jobs[job_name(run.run_id, "a", 0, c)], jobs[job_name(run.run_id, "b", 0, c)]
        ta, tb = child_tasks(plan, run.run_id, a), child_tasks(plan, run.run_id, b)
        assert len(ta) == len(tb) == size
        assert all(x is not None and y is not None and x.index == y.index for x, y in zip(ta, tb, strict=True))
        runs.update(t.id for t in ta + tb if t is not None)
        rows = {name: pl.decode_table({e["name"]: e["value"] for e in job["container"]["environment"]}[pl.TABLE_VAR])
                for name, job in (("a", a), ("b", b))}
        assert not any(tid in row for row in rows["a"] for tid in ids)
        assert all(t is not None and t.id in row for t, row in zip(tb, rows["b"], strict=True))
    assert runs == collections.Counter({t.id: 1 for t in plan.tasks})
