"""Shared helpers for the Batch submission tests (no tests here): a minimal queue made with boto3."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from corral.backends.aws_batch.client import AwsClients


@dataclass
class FakeEnvironment:
    """The attributes of provision.Environment that submission reads."""

    region: str
    account_id: str
    job_queue: str
    gpu_job_queue: str | None = None
    job_role_arn: str = ""
    execution_role_arn: str = ""
    log_group: str = "/aws/batch/corral-test"
    table_name: str = "corral-state-test"
    efs_id: str | None = None
    efs_access_point: str | None = None
    tags: dict[str, str] = field(default_factory=lambda: {"corral:managed": "true"})


def make_environment(clients: AwsClients, *, gpu: bool = False) -> FakeEnvironment:
    iam = clients.iam
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "batch.amazonaws.com"},
                                                      "Action": "sts:AssumeRole"}]}
    role = iam.create_role(RoleName="test-batch-service", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    batch = clients.batch
    ce = batch.create_compute_environment(
        computeEnvironmentName="test-ce", type="UNMANAGED", state="ENABLED", serviceRole=role
    )["computeEnvironmentArn"]
    queue = batch.create_job_queue(
        jobQueueName="test-queue", state="ENABLED", priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}],
    )["jobQueueArn"]
    gpu_queue = None
    if gpu:
        gpu_queue = batch.create_job_queue(
            jobQueueName="test-gpu-queue", state="ENABLED", priority=1,
            computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}],
        )["jobQueueArn"]
    return FakeEnvironment(
        region=clients.region, account_id="123456789012", job_queue=queue, gpu_job_queue=gpu_queue,
        job_role_arn="arn:aws:iam::123456789012:role/job", execution_role_arn="arn:aws:iam::123456789012:role/exec",
    )


class CallCounter:
    """Counts API calls per operation with a botocore ``before-call`` hook."""

    def __init__(self, clients: AwsClients) -> None:
        self.calls: list[tuple[str, str]] = []
        clients.register_hook("before-call.*.*", self._hook)

    def _hook(self, model: Any, **kwargs: Any) -> None:
        self.calls.append((model.service_model.service_name, model.name))

    def count(self, service: str | None = None, op: str | None = None) -> int:
        return sum(1 for s, o in self.calls if (service is None or s == service) and (op is None or o == op))

    def reset(self) -> None:
        self.calls.clear()


def record_run(store: Any, plan: Any, run_id: str = "run-1") -> Any:
    """What corral.api.run does before backend.start: the run and all its tasks, PENDING."""
    from corral.model import RunRecord, TaskRecord

    run = RunRecord(run_id=run_id, workflow_name=plan.workflow.name, backend="aws", created_at=1.0)
    tasks = [
        TaskRecord(run_id=run_id, task_id=t.id, stage=t.stage.name, item_key=t.key, item_index=t.index)
        for t in plan.tasks
    ]
    store.create_run(run, plan.manifest(), tasks)
    return run


def workflow_text(n_items: int, *, extra_stage: str = "") -> str:
    items = "\n".join(f"  - {{session: s{i:05d}, subject: sub{i % 7}}}" for i in range(n_items))
    return f"""
name: bench
defaults:
  image: public.ecr.aws/docker/library/busybox:latest
  retries: 2
  timeout: 30m
items:
{items}
stages:
  - name: fetch
    command: fetch --session {{session}} --out {{workdir}}/raw/{{session}}
  - name: convert
    needs: [fetch]
    command: convert {{workdir}}/raw/{{session}} {{workdir}}/nwb/{{subject}}_{{session}}.nwb
    resources: {{vcpus: 2, memory: 4GiB}}
  - name: upload
    needs: [convert]
    command: upload {{workdir}}/nwb/{{subject}}_{{session}}.nwb
{extra_stage}"""


def moto_batch_backend(region: str = "us-east-2") -> Any:
    """The in-process moto server's Batch state (tests only: to inspect or steer jobs quickly)."""
    from moto.batch.models import batch_backends

    return batch_backends["123456789012"][region]


def moto_parent_jobs() -> list[dict[str, Any]]:
    """Every parent and plain job moto holds, as {jobId, jobName, environment, dependsOn, size}."""
    out = []
    for job in list(moto_batch_backend()._jobs.values()):
        if ":" in job.job_id:
            continue
        env = (job.container_overrides or {}).get("environment", [])
        out.append({
            "jobId": job.job_id, "jobName": job.job_name, "container": {"environment": env},
            "dependsOn": job.depends_on or [], "size": len(job._child_jobs or []) or 1,
        })
    return out


def item_text(value: Any) -> str:
    """A DynamoDB item (or any value) as text, binary attributes decompressed when they are gzip:
    what a canary search looks through."""
    import gzip

    if isinstance(value, dict):
        return " ".join(f"{k} {item_text(v)}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(item_text(v) for v in value)
    if isinstance(value, bytes):
        try:
            return gzip.decompress(value).decode(errors="replace")
        except OSError:
            return value.decode(errors="replace")
    return str(value)
