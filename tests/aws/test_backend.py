"""AwsBatchBackend against moto: refresh in few calls, state mapping, resume of exactly the failed
tasks, cancel, logs (paginated and followed), and refusals before any API call."""

from __future__ import annotations

import collections
import datetime
import time
from pathlib import Path
from typing import Any

import pytest
from test_backend_support import (
    CallCounter,
    make_environment,
    moto_batch_backend,
    moto_parent_jobs,
    record_run,
)

from corral.backends.aws_batch.backend import CANCEL_REASON, AwsBatchBackend
from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.logs import LogReader
from corral.backends.aws_batch.submit import child_tasks
from corral.backends.base import RunOptions
from corral.errors import PlanError
from corral.model import RunState, TaskState
from corral.plan import make_plan
from corral.spec import AwsSettings, loads_workflow
from corral.state.sqlite import SqliteStore

pytestmark = pytest.mark.aws

SMALL = """
name: small
defaults: {image: busybox, retries: 1}
stages:
  - {name: fetch, command: "fetch {session}"}
  - {name: convert, needs: [fetch], command: "convert {session}"}
  - {name: report, per: run, needs: [convert], command: "report"}
"""


def _plan(n: int, text: str = SMALL) -> Any:
    return make_plan(loads_workflow(text), items=[{"session": f"s{i:05d}"} for i in range(n)])


def _backend(clients: AwsClients, env: Any, **kw: Any) -> AwsBatchBackend:
    return AwsBatchBackend(clients, environment=env, sleep=lambda s: None, **kw)


def _steer(job_id: str, status: str, reason: str | None = None, exit_code: int | None = None) -> None:
    """Set a moto job's state (moto without Docker ends every job at once)."""
    job = moto_batch_backend()._jobs[job_id]
    job.status = status
    if status in ("SUCCEEDED", "FAILED"):
        job.job_stopped = True
        job.job_stopped_at = datetime.datetime.now()
        job.job_stopped_reason = reason
        job.exit_code = exit_code
    else:
        job.job_stopped = False
        job.job_stopped_reason = None
        job.exit_code = None


class _CountingStore(SqliteStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.saved: list[int] = []

    def save_tasks(self, tasks: Any) -> None:
        self.saved.append(len(tasks))
        super().save_tasks(tasks)

    def update_tasks(self, pairs: Any) -> Any:  # refresh writes conditionally
        self.saved.append(len(pairs))
        return super().update_tasks(pairs)


def test_refresh_of_ten_thousand_children_in_few_calls(aws: str, tmp_path: Path) -> None:
    clients = AwsClients()
    env = make_environment(clients)
    one_stage = "name: wide\ndefaults: {image: busybox}\nstages:\n  - {name: work, command: 'work {session}'}\n"
    plan = _plan(10_000, one_stage)
    store = _CountingStore(tmp_path / "s.db")
    run = record_run(store, plan)
    be = _backend(clients, env)
    be.start(plan, run, store, RunOptions(wait=False))
    tasks = store.get_tasks(run.run_id)
    parents = sorted({t.external_id.split(":")[0] for t in tasks})
    assert len(parents) <= 8  # ~1,400 items per array under the 30 KiB payload limit
    # After the run: in every array 10% FAILED, the rest SUCCEEDED.
    failed, running = set(), set()
    for p in parents:
        job = moto_batch_backend()._jobs[p]
        job.status = "FAILED"
        for i, child in enumerate(job._child_jobs):
            if i % 10 == 0:
                _steer(child.job_id, "FAILED", "Essential container in task exited", 3)
                failed.add(child.job_id)
    counter = CallCounter(clients)
    store.saved.clear()
    got = be.refresh(run, store)
    assert len(got) == 10_000
    # One DescribeJobs for the parents, one ListJobs(FAILED) per array: no DescribeJobs of children.
    assert counter.count("batch") == 1 + len(parents) <= 12, counter.calls
    assert sum(store.saved) == 10_000  # all changed from SUBMITTED
    # Mid-run: running children too. One more ListJobs per array and status present, no more.
    store.save_tasks([t.replace(state=TaskState.SUBMITTED) for t in got])
    for p in parents:
        job = moto_batch_backend()._jobs[p]
        job.status = "RUNNING"
        for i, child in enumerate(job._child_jobs):
            if i % 20 == 1:
                _steer(child.job_id, "RUNNING")
                running.add(child.job_id)
    counter.reset()
    got = be.refresh(run, store)
    assert counter.count("batch") == 1 + 2 * len(parents), counter.calls
    states = {t.external_id: t for t in got}
    assert all(states[j].state == TaskState.FAILED and states[j].exit_code == 3 for j in failed)
    assert "Essential container" in states[next(iter(failed))].reason
    assert all(states[j].state == TaskState.RUNNING for j in running)
    ok = [t for t in got if t.external_id not in failed | running]
    assert ok and all(t.state == TaskState.SUCCEEDED for t in ok)

    # Only what changed is written back; an all-succeeded array costs no ListJobs.
    for j in failed | running:
        _steer(j, "SUCCEEDED", exit_code=0)
    for p in parents:
        moto_batch_backend()._jobs[p].status = "SUCCEEDED"
    counter.reset()
    store.saved.clear()
    got = be.refresh(store.get_run(run.run_id), store)
    assert counter.count("batch", "ListJobs") == 0 and counter.count("batch") <= len(parents) // 100 + 1
    assert sum(store.saved) == len(running)  # failed tasks are terminal; succeeded ones did not change
    assert collections.Counter(t.state for t in got) == {TaskState.SUCCEEDED: 10_000 - len(failed),
                                                         TaskState.FAILED: len(failed)}
    assert store.get_run(run.run_id).state == RunState.FAILED


def test_failures_map_to_states_and_resume_resubmits_exactly_them(aws: str, tmp_path: Path) -> None:
    clients = AwsClients()
    env = make_environment(clients)
    plan = _plan(8)
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan)
    be = _backend(clients, env)
    be.start(plan, run, store, RunOptions(wait=False))
    ext = {(t.stage, t.item_index): t.external_id for t in store.get_tasks(run.run_id)}
    for p in {e.split(":")[0] for e in ext.values()}:
        _steer(p, "RUNNING")
    _steer(ext[("fetch", 3)], "FAILED", "Essential container in task exited", 1)
    _steer(ext[("convert", 3)], "FAILED", "Dependent Job failed")
    _steer(ext[("convert", 5)], "FAILED", "Host EC2 (instance i-1) terminated.")
    _steer(ext[("report", None)], "FAILED", "Dependent Job failed")
    tasks = {(t.stage, t.item_index): t for t in be.refresh(run, store)}
    assert tasks[("fetch", 3)].state == TaskState.FAILED and tasks[("fetch", 3)].exit_code == 1
    assert tasks[("convert", 3)].state == TaskState.UPSTREAM_FAILED
    assert tasks[("convert", 5)].state == TaskState.FAILED
    assert tasks[("report", None)].state == TaskState.UPSTREAM_FAILED
    assert store.get_run(run.run_id).state == RunState.FAILED
    bad = {tasks[k].task_id for k in [("fetch", 3), ("convert", 3), ("convert", 5), ("report", None)]}

    before = {j["jobId"] for j in moto_parent_jobs()}
    counter = CallCounter(clients)
    be2 = _backend(AwsClients(), env)  # another machine
    counter2 = CallCounter(be2.clients)
    be2.resume(plan, store.get_run(run.run_id), store, RunOptions(wait=False))
    new_jobs = [j for j in moto_parent_jobs() if j["jobId"] not in before]
    real: collections.Counter[str] = collections.Counter()
    padding = 0
    for j in new_jobs:
        for task in child_tasks(plan, run.run_id, j):
            if task is None:
                padding += 1
            else:
                real[task.id] += 1
    assert real == collections.Counter({tid: 1 for tid in bad})
    assert padding == 1  # fetch of item 5 succeeded: a padding child keeps the arrays aligned
    by_name = {j["jobName"]: j for j in new_jobs}
    fetch1 = by_name[f"corral-{run.run_id}-fetch-r1-c0"]
    conv1 = by_name[f"corral-{run.run_id}-convert-r1-c0"]
    assert fetch1["size"] == conv1["size"] == 2
    assert conv1["dependsOn"] == [{"jobId": fetch1["jobId"], "type": "N_TO_N"}]
    assert counter.count("batch", "SubmitJob") + counter2.count("batch", "SubmitJob") == 3
    after = {(t.stage, t.item_index): t for t in store.get_tasks(run.run_id)}
    assert all(after[k].external_id == tasks[k].external_id for k in after if tasks[k].task_id not in bad)
    assert all(after[k].state == TaskState.SUBMITTED for k in after if tasks[k].task_id in bad)
    assert store.get_run(run.run_id).state == RunState.RUNNING
    final = be2.refresh(store.get_run(run.run_id), store)
    assert all(t.state == TaskState.SUCCEEDED for t in final)
    assert store.get_run(run.run_id).state == RunState.SUCCEEDED


def test_cancel_terminates_each_parent_once_and_marks_tasks(aws: str, tmp_path: Path) -> None:
    clients = AwsClients()
    env = make_environment(clients)
    plan = _plan(30)
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan)
    _backend(clients, env).start(plan, run, store, RunOptions(wait=False))
    parents = {t.external_id.split(":")[0] for t in store.get_tasks(run.run_id)}
    counter = CallCounter(clients)
    _backend(clients, env).cancel(store.get_run(run.run_id), store)
    assert counter.count("batch", "TerminateJob") == len(parents) == 3
    for p in parents:
        assert moto_batch_backend()._jobs[p].job_stopped_reason == CANCEL_REASON
    tasks = store.get_tasks(run.run_id)
    assert all(t.state == TaskState.CANCELLED for t in tasks)
    assert store.get_run(run.run_id).state == RunState.CANCELLED


def test_logs_paginated_and_followed(aws: str, tmp_path: Path) -> None:
    clients = AwsClients()
    env = make_environment(clients)
    plan = _plan(2)
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan)
    _backend(clients, env).start(plan, run, store, RunOptions(wait=False))
    task = next(t for t in store.get_tasks(run.run_id) if t.stage == "convert" and t.item_index == 1)
    job = clients.batch.describe_jobs(jobs=[task.external_id])["jobs"][0]
    stream = job["container"]["logStreamName"]
    logs = clients.logs
    logs.create_log_group(logGroupName=env.log_group)
    logs.create_log_stream(logGroupName=env.log_group, logStreamName=stream)
    t0 = int(time.time() * 1000) - 60_000  # CloudWatch (and moto) drop events older than 14 days
    logs.put_log_events(logGroupName=env.log_group, logStreamName=stream,
                        logEvents=[{"timestamp": t0 + i, "message": f"line {i}"} for i in range(25)])
    be = _backend(clients, env)
    assert list(be.logs(run, store, task, None, False)) == [f"line {i}" for i in range(25)]
    # Pages: a small page size still yields everything, once.
    lines, _ = LogReader(logs, page_limit=7).read(env.log_group, stream)
    assert lines == [f"line {i}" for i in range(25)]

    # Follow a running task: lines arrive between polls; it stops once the job ends.
    _steer(task.external_id, "RUNNING")
    polls = {"n": 0}

    def sleep(s: float) -> None:
        assert 0 < s <= 5.0
        polls["n"] += 1
        logs.put_log_events(logGroupName=env.log_group, logStreamName=stream,
                            logEvents=[{"timestamp": t0 + 100 + polls["n"], "message": f"more {polls['n']}"}])
        if polls["n"] == 3:
            _steer(task.external_id, "SUCCEEDED", exit_code=0)

    follower = AwsBatchBackend(clients, environment=env, sleep=sleep)
    got = list(follower.logs(run, store, task, None, True))
    assert got == [f"line {i}" for i in range(25)] + ["more 1", "more 2", "more 3"]

    pending = next(t for t in store.get_tasks(run.run_id) if t.stage == "report").replace(external_id="")
    assert "not been submitted" in next(iter(be.logs(run, store, pending, None, False)))


def test_check_refuses_before_any_call(aws: str) -> None:
    clients = AwsClients()
    counter = CallCounter(clients)
    be = AwsBatchBackend(clients, AwsSettings(instance_types=["m5.large"]))
    cases = {
        "transfer stage": "stages: [{name: t, image: x, from: s3://a/b, to: /tmp/c}]",
        "no image": "stages: [{name: t, command: 'true'}]",
        "local environment": "stages: [{name: t, image: x, command: 'true', secrets: {TOKEN: 'env:TOKEN'}}]",
        "reserves": "stages: [{name: t, image: x, command: 'true', env: {AWS_BATCH_JOB_ID: x}}]",
        "vCPU": "stages: [{name: t, image: x, command: 'true', resources: {vcpus: 64}}]",
    }
    for words, stages in cases.items():
        wf = loads_workflow(f"name: w\nitems: [{{a: 1}}]\n{stages}\n")
        with pytest.raises(PlanError) as info:
            be.check(make_plan(wf))
        assert words in info.value.message or words in str(info.value), (words, info.value)
        assert info.value.hint
    assert counter.count() == 0


def test_through_the_api_with_real_provisioning(aws: str, tmp_path: Path) -> None:
    """corral.api.run → provisioning → submission → status/cancel/resume/logs, DynamoDB state
    (the state table does not exist beforehand: the first run makes it)."""
    import corral.api as api

    wf = loads_workflow(
        """
name: e2e
defaults: {image: busybox, retries: 1}
items: [{s: a}, {s: b}, {s: c}]
stages:
  - {name: one, command: "echo {s}"}
  - {name: two, needs: [one], command: "echo two {s}"}
  - {name: fin, per: run, needs: [two], command: "echo fin"}
"""
    )
    rec = api.run(wf, backend="aws", options=RunOptions(wait=True))
    assert rec.state == RunState.SUCCEEDED
    assert rec.options["aws_batch"]["round0_chunks"] == [3]
    store = api.open_store("aws", wf)
    assert api.counts(api.status(rec.run_id, store=store))["SUCCEEDED"] == 7
    api.cancel(rec.run_id, store=store)  # nothing left to cancel: the run keeps its state
    assert store.get_run(rec.run_id).state == RunState.SUCCEEDED
    jobs_before = len(moto_parent_jobs())
    again = api.resume(rec.run_id, store=store, options=RunOptions(wait=False))
    assert again.state == RunState.SUCCEEDED and len(moto_parent_jobs()) == jobs_before  # nothing resubmitted
    lines = list(api.logs(rec.run_id, "two[b]", store=store))
    assert len(lines) == 1 and "no output" in lines[0]  # moto without Docker writes no log streams


def test_refresh_lists_only_what_it_cannot_infer(aws: str, tmp_path: Path) -> None:
    clients = AwsClients()
    env = make_environment(clients)
    one_stage = "name: few\ndefaults: {image: busybox}\nstages:\n  - {name: work, command: 'work {session}'}\n"
    plan = _plan(30, one_stage)
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan)
    be = _backend(clients, env)
    be.start(plan, run, store, RunOptions(wait=False))
    (parent,) = {t.external_id.split(":")[0] for t in store.get_tasks(run.run_id)}
    children = moto_batch_backend()._jobs[parent]._child_jobs
    # Everything still waiting: the parent's summary says so; no ListJobs at all.
    moto_batch_backend()._jobs[parent].status = "RUNNABLE"
    for c in children:
        _steer(c.job_id, "RUNNABLE")
    counter = CallCounter(clients)
    got = be.refresh(run, store)
    assert counter.calls == [("batch", "DescribeJobs")]
    assert all(t.state == TaskState.SUBMITTED for t in got)
    # Mixed: FAILED and RUNNING are listed; the waiting ones are listed and the SUCCEEDED inferred.
    for i, c in enumerate(children):
        if i >= 16:
            _steer(c.job_id, "SUCCEEDED", exit_code=0)
        elif i >= 11:
            _steer(c.job_id, "RUNNING")
        elif i == 10:
            _steer(c.job_id, "FAILED", "Essential container in task exited", 2)
    counter.reset()
    got = be.refresh(run, store)
    assert sorted(counter.calls) == [("batch", "DescribeJobs")] + [("batch", "ListJobs")] * 3
    by_index = {int(t.external_id.split(":")[1]): t.state for t in got}
    assert [by_index[i] for i in (0, 9, 10, 11, 15, 16, 29)] == [
        TaskState.SUBMITTED, TaskState.SUBMITTED, TaskState.FAILED, TaskState.RUNNING, TaskState.RUNNING,
        TaskState.SUCCEEDED, TaskState.SUCCEEDED,
    ]
