"""AWS runs in the report: every attempt from DescribeJobs, instance types from ECS, cost on them."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from corral.cost import actual_cost
from corral.model import TaskRecord, TaskState
from corral.plan import make_plan
from corral.report import bars, batch_attempts, collect, ecs_instance_types, render
from corral.spec import loads_workflow

sys.path.insert(0, str(Path(__file__).parent.parent / "aws"))
sys.path.insert(0, str(Path(__file__).parent.parent))

CI = "arn:aws:ecs:us-east-2:123456789012:container-instance/corral-cluster/"


class FakeEcs:
    def __init__(self, types: dict[str, str]) -> None:
        self.types = types
        self.calls: list[tuple[str, list[str]]] = []

    def describe_container_instances(self, cluster: str, containerInstances: list[str]) -> dict[str, Any]:  # noqa: N803
        self.calls.append((cluster, list(containerInstances)))
        return {"containerInstances": [
            {"containerInstanceArn": a, "attributes": [{"name": "ecs.os-type", "value": "linux"},
                                                       {"name": "ecs.instance-type", "value": self.types[a]}]}
            for a in containerInstances if a in self.types]}


def test_attempts_and_instance_types_of_a_retried_job() -> None:
    plan = make_plan(loads_workflow("""
name: m2g
items: [{scan: a}, {scan: b}]
aws: {instance_types: [r5]}
stages: [{name: m2g, image: x, resources: {vcpus: 2, memory: 15200MiB}, command: "true"}]
""", source="wf.yaml", base_dir=Path.cwd()))
    ta, tb = plan.tasks
    tasks = [
        TaskRecord(run_id="r", task_id=ta.id, stage="m2g", item_key="a", item_index=0, state=TaskState.SUCCEEDED,
                   attempts=2, started_at=4000.0, ended_at=7600.0, external_id="job-1:0"),
        TaskRecord(run_id="r", task_id=tb.id, stage="m2g", item_key="b", item_index=1, state=TaskState.RUNNING,
                   attempts=1, started_at=1000.0, external_id="job-1:1"),
    ]
    jobs = {
        "job-1:0": {"jobId": "job-1:0", "status": "SUCCEEDED", "attempts": [
            {"container": {"containerInstanceArn": CI + "i1", "exitCode": None, "logStreamName": "s/1"},
             "startedAt": 1_000_000, "stoppedAt": 2_800_000, "statusReason": "Host EC2 (instance i-1) terminated."},
            {"container": {"containerInstanceArn": CI + "i2", "exitCode": 0, "logStreamName": "s/2"},
             "startedAt": 4_000_000, "stoppedAt": 7_600_000},
        ]},
        "job-1:1": {"jobId": "job-1:1", "status": "RUNNING", "attempts": [], "startedAt": 1_000_000,
                    "container": {"containerInstanceArn": "TBD"}},
    }
    asked: list[list[str]] = []

    def describe(ids: list[str]) -> dict[str, Any]:
        asked.append(ids)
        return {i: jobs[i] for i in ids}

    ecs = FakeEcs({CI + "i1": "r5.large", CI + "i2": "r5.xlarge"})
    got = batch_attempts("r", tasks, describe, ecs)
    assert asked == [["job-1:0", "job-1:1"]]
    assert ecs.calls == [("corral-cluster", [CI + "i1", CI + "i2"])]  # one call; "TBD" is not asked about
    a1, a2 = got[ta.id]
    assert (a1.state, a1.instance_type, a1.started_at, a1.ended_at) == (TaskState.FAILED, "r5.large", 1000.0, 2800.0)
    assert a1.reason.startswith("Host EC2") and a2.stdout == "s/2"
    assert (a2.state, a2.instance_type, a2.exit_code) == (TaskState.SUCCEEDED, "r5.xlarge", 0)
    (running,) = got[tb.id]
    assert running.state == TaskState.RUNNING and running.ended_at is None and running.instance_type == ""
    # on-demand: 30 min of r5.large (1 task: 0.126/h) + 1 h of r5.xlarge shared by 2 such tasks (0.252/2)
    # + the running one, 1 h so far, on the estimate's r5.large = 0.063 + 0.126 + 0.126
    cost = actual_cost(plan, tasks, got, run_id="r", at=4600.0)
    assert [round(a.usd or 0, 6) for a in cost.attempts] == [0.063, 0.126, 0.126]
    assert [a.estimated for a in cost.attempts] == [False, False, True]


def test_old_style_container_instance_arns_are_tried_on_the_environments_clusters() -> None:
    old = "arn:aws:ecs:us-east-2:1:container-instance/0f1e2d"
    ecs = FakeEcs({old: "c5.large"})
    assert ecs_instance_types(ecs, [old, "TBD", ""], ["arn:cluster-a", "arn:cluster-b"]) == {old: "c5.large"}
    assert [c for c, _ in ecs.calls] == ["arn:cluster-a"]  # found there: the next cluster is not asked


@pytest.mark.aws
def test_report_of_a_run_on_moto(aws: str, tmp_path: Path) -> None:
    from helpers import run_cli
    from test_backend_support import make_environment, record_run, workflow_text

    from corral.backends.aws_batch.backend import AwsBatchBackend
    from corral.backends.aws_batch.client import AwsClients
    from corral.backends.base import RunOptions
    from corral.state.dynamodb import DynamoStore

    clients = AwsClients()
    env = make_environment(clients)
    plan = make_plan(loads_workflow(workflow_text(4), source="wf.yaml", base_dir=tmp_path))
    store = DynamoStore("corral-state", clients.dynamodb)  # the table `--backend aws` reads
    store.create_table_if_missing()
    run = record_run(store, plan)
    be = AwsBatchBackend(clients, environment=env, sleep=lambda s: None)
    be.start(plan, run, store, RunOptions(wait=False))
    deadline = time.monotonic() + 60
    delay = 0.05
    while True:
        tasks = be.refresh(store.get_run(run.run_id), store)
        if all(t.state.terminal for t in tasks) or time.monotonic() > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    assert all(t.state == TaskState.SUCCEEDED for t in tasks)
    data = collect(store, run.run_id, backend=be)
    assert len(bars(data)) == len(tasks) == 12
    assert all(a.stdout for ats in data.attempts.values() for a in ats)  # log streams from DescribeJobs
    assert data.cost is not None and data.cost.estimated_attempts == 12  # moto reports no container instance
    assert render(data).count('<rect class="bar"') == 12

    out = tmp_path / "aws-report.html"
    res = run_cli("report", run.run_id, "--backend", "aws", "-o", str(out), env={"CORRAL_HOME": str(tmp_path / "h")})
    assert res.returncode == 0, res.stderr
    assert "12 attempts" in res.stderr and out.read_text().count('<rect class="bar"') == 12
