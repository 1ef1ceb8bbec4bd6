"""shareIdentifier on SubmitJob to a fair-share queue (aws.queue with a scheduling policy), nothing on others."""

from __future__ import annotations

from pathlib import Path

import pytest
from provision_helpers import CallLog
from test_backend_support import make_environment, record_run

from corral.backends.aws_batch.backend import AwsBatchBackend
from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.fair_share import FairShare
from corral.backends.base import RunOptions
from corral.plan import make_plan
from corral.spec import loads_workflow
from corral.state.sqlite import SqliteStore

pytestmark = pytest.mark.aws

WF = """
name: fs
items: [{k: a}, {k: b}]
aws: {queue: %s, share_identifier: lab_a}
stages:
  - {name: one, image: "busybox:1.36", command: "echo {k}"}
"""


def test_fair_share_kwargs_only_for_a_users_queue_with_a_policy() -> None:
    asked: list[list[str]] = []

    def describe(jobQueues: list[str]) -> dict:  # noqa: N803 (the API's name)
        asked.append(jobQueues)
        arn = "arn:aws:batch:us-east-2:123456789012:scheduling-policy/p" if jobQueues[0].endswith("fair") else None
        return {"jobQueues": [{"jobQueueName": jobQueues[0], **({"schedulingPolicyArn": arn} if arn else {})}]}

    fs = FairShare(describe, "lab_a", user_queues=["fair", "plain"])
    assert fs.submit_kwargs("arn:aws:batch:us-east-2:123456789012:job-queue/fair") == {"shareIdentifier": "lab_a"}
    assert fs.submit_kwargs("arn:aws:batch:us-east-2:123456789012:job-queue/fair") == {"shareIdentifier": "lab_a"}
    assert fs.submit_kwargs("plain") == {} and fs.submit_kwargs("corral") == {}
    assert len(asked) == 2  # once per user queue; corral's own queues are never asked about


def test_jobs_on_a_fair_share_queue_carry_the_share_identifier(aws: str, tmp_path: Path) -> None:
    clients = AwsClients()
    env = make_environment(clients)
    policy = clients.batch.create_scheduling_policy(
        name="lab", fairsharePolicy={"shareDecaySeconds": 3600, "shareDistribution": [
            {"shareIdentifier": "lab_a", "weightFactor": 1.0}]})["arn"]
    ce = clients.batch.describe_job_queues(jobQueues=[env.job_queue])["jobQueues"][0]["computeEnvironmentOrder"]
    fair = clients.batch.create_job_queue(jobQueueName="lab-fair", state="ENABLED", priority=1,
                                          schedulingPolicyArn=policy, computeEnvironmentOrder=ce)["jobQueueArn"]
    env.job_queue = fair
    plan = make_plan(loads_workflow(WF % "lab-fair"))
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan)
    log = CallLog(clients)
    be = AwsBatchBackend(clients, environment=env, settings=plan.workflow.aws, sleep=lambda s: None)
    be.start(plan, run, store, RunOptions(wait=False))
    submits = [p for s, n, p in log.calls if n == "SubmitJob"]
    assert submits and all(p.get("shareIdentifier") == "lab_a" for p in submits)

    # the same workflow on a queue without a policy sends no shareIdentifier
    plain = make_plan(loads_workflow(WF % "test-queue"))
    env.job_queue = clients.batch.describe_job_queues(jobQueues=["test-queue"])["jobQueues"][0]["jobQueueArn"]
    log.clear()
    run2 = record_run(store, plain, "run-2")
    AwsBatchBackend(clients, environment=env, settings=plain.workflow.aws, sleep=lambda s: None).start(
        plain, run2, store, RunOptions(wait=False))
    submits = [p for s, n, p in log.calls if n == "SubmitJob"]
    assert submits and not any("shareIdentifier" in p for p in submits)
