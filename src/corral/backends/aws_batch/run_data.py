"""Removing a run's data from the EFS workspace (``corral aws teardown --run R``).

The run's files can only be reached by a job that mounts the file system, so teardown submits one
job running the cleanup command (:func:`corral.storage.aws.cleanup_container_argv`: ``rm -rf`` of
the run's folder, refusing anything else; it needs only ``/bin/sh``) in the run's queue with the
run's access point mounted, waits for it with bounded polling and backoff, and only then may the
access point go. Where the run is: its record in the state table (DynamoDB, else the local SQLite
store) holds its queue and, since this change, its file system, access point and job roles; for
older runs these are found from the access point tagged ``corral:run`` and the job definition
that mounts it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch.client import AwsClients, aws_errors
from corral.backends.aws_batch.common import RUN_TAG, is_managed
from corral.backends.aws_batch.run_facts import RunFacts
from corral.backends.aws_batch.submit import run_prefix
from corral.backends.aws_batch.waiting import Poller
from corral.errors import ProvisionError, StateError
from corral.model import RunRecord, RunState
from corral.state.base import StateStore

DATA_TIMEOUT = 1800.0  # seconds: a queue may need to start an instance first
DATA_STAGE = "corral-teardown-data"


@dataclass
class DataOutcome:
    """What became of the run's EFS data: ``removed``, ``skipped`` (nothing to do) or ``failed``."""

    status: str
    message: str
    access_point: str | None = None
    job_id: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def _open_run(clients: AwsClients, run_id: str, table: str | None) -> tuple[StateStore, RunRecord] | None:
    """(store, record) of the run: the DynamoDB state table (``table``, else corral's default),
    else this machine's SQLite store (an AWS run recorded locally); None when neither has it."""
    from corral.backends.aws_batch.environment import DEFAULT_TABLE
    from corral.state.dynamodb import DynamoStore

    dynamo = DynamoStore(table or DEFAULT_TABLE, clients.dynamodb)
    try:
        return dynamo, dynamo.get_run(run_id)
    except StateError:
        pass
    from corral.api import corral_home

    path = corral_home() / "state.db"
    if not path.exists():
        return None
    from corral.state.sqlite import SqliteStore

    store = SqliteStore(path)
    try:
        run = store.get_run(run_id)
    except StateError:
        store.close()
        return None
    if run.backend != "aws":
        store.close()
        return None
    return store, run


def find_run(clients: AwsClients, run_id: str, *, table: str | None = None) -> RunRecord | None:
    """The run's record (see :func:`_open_run`), or None."""
    found = _open_run(clients, run_id, table)
    if found is None:
        return None
    store, run = found
    store.close()
    return run


def still_running(clients: AwsClients, run_id: str, *, table: str | None = None) -> bool:
    """Whether the run still has tasks in flight, after reading their states from Batch (a record
    says RUNNING until some client refreshes it). The failure-path cleanup is not submitted here:
    teardown removes the data itself."""
    found = _open_run(clients, run_id, table)
    if found is None:
        return False
    store, run = found
    try:
        if run.state != RunState.RUNNING:
            return False
        from corral.backends.aws_batch.backend import AwsBatchBackend

        tasks = AwsBatchBackend(clients).refresh(run, store, final_cleanup=False)
        return any(not t.state.terminal for t in tasks)
    finally:
        store.close()


def _access_point(clients: AwsClients, run_id: str, fs_id: str | None) -> tuple[str, str] | None:
    """(file system id, access point id) of the run's access point (tagged with the run)."""
    from corral.backends.aws_batch.common import Ctx
    from corral.backends.aws_batch.provisioned import ProvisionReport
    from corral.backends.aws_batch.teardown import _managed_file_systems

    efs = clients.efs
    fs_ids = [fs_id] if fs_id else [
        f["FileSystemId"] for f in _managed_file_systems(Ctx(clients=clients, report=ProvisionReport(), tags={}))
    ]
    for fid in fs_ids:
        for page in efs.get_paginator("describe_access_points").paginate(FileSystemId=fid):
            for ap in page["AccessPoints"]:
                if is_managed(ap.get("Tags"), run_id) and ap.get("LifeCycleState", "available") == "available":
                    return fid, ap["AccessPointId"]
    return None


def _roles_mounting(clients: AwsClients, access_point: str) -> tuple[str, str]:
    """(job role, execution role) of an ACTIVE job definition that mounts ``access_point``."""
    for page in clients.batch.get_paginator("describe_job_definitions").paginate(status="ACTIVE"):
        for jd in page["jobDefinitions"]:
            c = jd.get("containerProperties") or {}
            for v in c.get("volumes") or []:
                auth = (v.get("efsVolumeConfiguration") or {}).get("authorizationConfig") or {}
                if auth.get("accessPointId") == access_point:
                    return c.get("jobRoleArn", ""), c.get("executionRoleArn", "")
    return "", ""


def remove_run_data(
    clients: AwsClients,
    run_id: str,
    *,
    table: str | None = None,
    timeout: float = DATA_TIMEOUT,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
    run: RunRecord | None = None,
) -> DataOutcome:
    """Submit the job removing the run's EFS folder and wait for it (at most ``timeout`` seconds)."""
    run = run or find_run(clients, run_id, table=table)
    if run is None:
        return DataOutcome("skipped", f"no record of run {run_id} in the state table or the local store: "
                                      "its EFS data, if any, is not removed")
    facts = RunFacts.of(run)
    with aws_errors(f"find the EFS workspace of run {run_id}"):
        found = _access_point(clients, run_id, facts.efs_id or None)
    if found is None:
        return DataOutcome("skipped", f"run {run_id} has no EFS workspace (no access point tagged with it: "
                                      "it used none, or it was torn down already): no data to remove")
    fs_id, ap = found
    queue = facts.job_queue
    if not queue:
        return DataOutcome("failed", f"run {run_id} has no job queue recorded to run the data removal in",
                           access_point=ap)
    job_role, exec_role = facts.job_role_arn or "", facts.execution_role_arn or ""
    if not job_role:
        with aws_errors("find the job roles of the run's workspace"):
            job_role, exec_role = _roles_mounting(clients, ap)
    ctx = pl.JobContext(
        region=clients.region, account_id=clients.account_id(), partition=clients.partition(),
        job_role_arn=job_role, execution_role_arn=exec_role, log_group=facts.log_group or "",
        efs_id=fs_id, efs_access_point=ap, tags={"corral:managed": "true", RUN_TAG: run_id},
        assign_public_ip=facts.assign_public_ip is not False,
    )
    # A Fargate-only run has no EC2 queue: its default queue is the Fargate one.
    fargate = bool(facts.fargate_job_queue) and facts.fargate_job_queue == queue
    from corral.spec import Stage
    from corral.storage.aws import cleanup_container_argv, job_stage

    spec = pl.job_definition(job_stage(Stage(name=DATA_STAGE, kind="cleanup", per="run")), ctx, fargate=fargate)
    workdir = pl.workdir_for(run_id, ctx)
    argv = cleanup_container_argv(workdir, root=workdir.rsplit("/", 1)[0])
    batch = clients.batch
    with aws_errors(f"submit the job removing run {run_id}'s EFS data"):
        defs = batch.describe_job_definitions(jobDefinitionName=spec.name, status="ACTIVE")["jobDefinitions"]
        arn = (max(defs, key=lambda d: d.get("revision", 0))["jobDefinitionArn"] if defs
               else batch.register_job_definition(**spec.kwargs)["jobDefinitionArn"])
        kwargs = pl.submit_kwargs(job_name=f"{run_prefix(run_id)}teardown-data", job_queue=queue,
                                  job_definition=arn, size=1, table=None, env={}, tags=ctx.tags)
        kwargs["containerOverrides"]["command"] = argv
        job_id: str = batch.submit_job(**kwargs)["jobId"]

    def ended() -> dict[str, Any] | None:
        with aws_errors(f"follow job {job_id}"):
            jobs = batch.describe_jobs(jobs=[job_id])["jobs"]
        return jobs[0] if jobs and jobs[0]["status"] in ("SUCCEEDED", "FAILED") else None

    poller = Poller(first=2.0, factor=1.6, cap=30.0)
    if sleep:
        poller.sleep = sleep
    if clock:
        poller.clock = clock
    try:
        job = poller.poll(ended, what=f"job {job_id} removing run {run_id}'s EFS data", timeout=timeout)
    except ProvisionError:
        return DataOutcome("failed", f"job {job_id} did not end within {timeout:g}s (it may still run)",
                           access_point=ap, job_id=job_id)
    if job["status"] != "SUCCEEDED":
        why = job.get("statusReason") or (job.get("container") or {}).get("reason") or "no reason given"
        return DataOutcome("failed", f"job {job_id} failed: {why}", access_point=ap,
                           job_id=job_id)
    return DataOutcome("removed", f"run {run_id}'s EFS data ({workdir}, job {job_id})", access_point=ap,
                       job_id=job_id)
