"""Issue 3: stages that fit Fargate run on the Fargate queue with FARGATE job definitions when the
workflow asks for Fargate (``fargate`` in ``aws.instance_types``); the others stay on EC2/GPU.

moto (5.2) gaps these tests do not rely on: it registers FARGATE job definitions without checking
the vCPU/memory pair, the execution role or the network configuration (it only fills in
``fargatePlatformConfiguration`` when missing), and it runs a FARGATE job submitted to an EC2
queue (AWS refuses: a queue's environments and the job definition's platform must match), so
the tests check what corral sends to which queue, not what moto would refuse.
"""

from __future__ import annotations

import collections
import datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli, write_workflow
from test_backend_support import CallCounter, moto_batch_backend, moto_parent_jobs, record_run

from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch.backend import CANCEL_REASON, AwsBatchBackend
from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.provision import ensure_environment, needs_for
from corral.backends.base import RunOptions
from corral.errors import PlanError
from corral.model import RunState, TaskState
from corral.plan import make_plan
from corral.routes import check_fits
from corral.spec import Stage, loads_workflow
from corral.state.sqlite import SqliteStore

pytestmark = pytest.mark.aws

# fetch: 0.25 vCPU / 700 MiB / 50 GiB of disk → Fargate 0.25 vCPU / 1024 MiB, 50 GiB ephemeral;
# sort: 32 vCPUs → EC2; report (per run): 1 vCPU / 3 GiB → Fargate 1 vCPU / 3072 MiB.
MIXED = """
name: mixed
defaults: {image: public.ecr.aws/docker/library/busybox:latest, retries: 2}
aws: {instance_types: [optimal, fargate]}
items: [{s: a}, {s: b}, {s: c}]
stages:
  - {name: fetch, command: "fetch {s}", resources: {vcpus: 0.25, memory: 700MiB, disk: 50GiB}}
  - {name: sort, needs: [fetch], command: "sort {s}", resources: {vcpus: 32, memory: 64GiB}}
  - {name: report, per: run, needs: [sort], command: "report", resources: {vcpus: 1, memory: 3GiB}}
"""


def _jobs_by_queue(clients: AwsClients, queue: str) -> dict[str, dict[str, Any]]:
    """Parent and plain jobs in a queue, described, by job name."""
    ids = [j["jobId"] for j in clients.batch.list_jobs(jobQueue=queue)["jobSummaryList"] if ":" not in j["jobId"]]
    jobs = clients.batch.describe_jobs(jobs=ids)["jobs"] if ids else []
    return {j["jobName"]: j for j in jobs}


def _definition(clients: AwsClients, arn: str) -> dict[str, Any]:
    (d,) = clients.batch.describe_job_definitions(jobDefinitions=[arn])["jobDefinitions"]
    return d


def _steer(job_id: str, status: str, reason: str | None = None, exit_code: int | None = None) -> None:
    job = moto_batch_backend()._jobs[job_id]
    job.status = status
    job.job_stopped = status in ("SUCCEEDED", "FAILED")
    job.job_stopped_at = datetime.datetime.now() if job.job_stopped else None
    job.job_stopped_reason = reason
    job.exit_code = exit_code


def test_mixed_workflow_sends_what_fits_to_fargate(aws: str) -> None:
    import corral.api as api
    from corral.doctor import aws_checks

    wf = loads_workflow(MIXED)
    clients = AwsClients()
    rec = api.run(wf, backend="aws", options=RunOptions(wait=False))
    opts = rec.options["aws_batch"]
    fq, cq = opts["fargate_job_queue"], opts["job_queue"]
    assert fq and cq and fq != cq and "corral-fargate" in fq
    (fq_desc,) = clients.batch.describe_job_queues(jobQueues=[fq])["jobQueues"]
    ce_arns = [o["computeEnvironment"] for o in fq_desc["computeEnvironmentOrder"]]
    types = {c["computeResources"]["type"]
             for c in clients.batch.describe_compute_environments(computeEnvironments=ce_arns)["computeEnvironments"]}
    assert types == {"FARGATE"}

    prefix = f"corral-{rec.run_id}-"
    on_fargate, on_ec2 = _jobs_by_queue(clients, fq), _jobs_by_queue(clients, cq)
    assert set(on_fargate) == {prefix + "fetch-r0-c0", prefix + "report-r0"}
    assert set(on_ec2) == {prefix + "sort-r0-c0"}
    fetch, report, sort = on_fargate[prefix + "fetch-r0-c0"], on_fargate[prefix + "report-r0"], on_ec2[prefix + "sort-r0-c0"]
    # N_TO_N across queues (Batch links jobs by id), the chunking unchanged: one array of 3 each
    assert fetch["arrayProperties"]["size"] == sort["arrayProperties"]["size"] == 3
    assert sort["dependsOn"] == [{"jobId": fetch["jobId"], "type": "N_TO_N"}]
    assert report["dependsOn"] == [{"jobId": sort["jobId"]}]
    assert opts["round0_chunks"] == [3]

    fd = _definition(clients, fetch["jobDefinition"])
    cp = fd["containerProperties"]
    assert fd["platformCapabilities"] == ["FARGATE"]
    assert cp["resourceRequirements"] == [{"type": "VCPU", "value": "0.25"}, {"type": "MEMORY", "value": "1024"}]
    assert cp["executionRoleArn"].startswith("arn:aws:iam::") and ":role/" in cp["executionRoleArn"]
    assert cp["networkConfiguration"] == {"assignPublicIp": "ENABLED"}
    assert cp["fargatePlatformConfiguration"] == {"platformVersion": "LATEST"}
    assert cp["ephemeralStorage"] == {"sizeInGiB": 50}
    assert cp["volumes"] == [] and cp["mountPoints"] == []  # no EFS asked for
    rules = fd["retryStrategy"]["evaluateOnExit"]
    assert rules[0]["onStatusReason"] == "Your Spot Task was interrupted*"
    assert not any("Host EC2" in str(r) for r in rules) and fd["retryStrategy"]["attempts"] == 1 + 2 + 2
    rd = _definition(clients, report["jobDefinition"])
    assert rd["platformCapabilities"] == ["FARGATE"] and "ephemeralStorage" not in rd["containerProperties"]
    assert rd["containerProperties"]["resourceRequirements"] == [{"type": "VCPU", "value": "1"},
                                                                 {"type": "MEMORY", "value": "3072"}]
    sd = _definition(clients, sort["jobDefinition"])
    assert sd["platformCapabilities"] == ["EC2"]
    assert sd["containerProperties"]["resourceRequirements"] == [{"type": "VCPU", "value": "32"},
                                                                 {"type": "MEMORY", "value": "65536"}]
    assert "networkConfiguration" not in sd["containerProperties"]
    assert sd["retryStrategy"]["evaluateOnExit"][0]["onStatusReason"] == "Host EC2*"

    # A second run has its own job role (issue 13), so its own content-named definitions; still
    # one revision each.
    rec2 = api.run(wf, backend="aws", options=RunOptions(wait=False))
    fetch2 = _jobs_by_queue(clients, fq)[f"corral-{rec2.run_id}-fetch-r0-c0"]
    fd2 = _definition(clients, fetch2["jobDefinition"])
    assert fd2["containerProperties"]["jobRoleArn"] != fd["containerProperties"]["jobRoleArn"]
    assert [d["revision"] for d in clients.batch.describe_job_definitions(
        jobDefinitionName=fd["jobDefinitionName"])["jobDefinitions"]] == [1]

    # doctor judges the Fargate queue and does not hold the Fargate stages against EC2 types
    findings = aws_checks(clients, wf.aws, plan=make_plan(wf), run=rec)
    assert not [f for f in findings if f.level == "error"], findings
    assert any(f.subject == fq.rsplit("/", 1)[-1] and f.level == "ok" for f in findings)


def test_workflow_without_fargate_keeps_everything_on_ec2(aws: str) -> None:
    """Routing follows the workflow: a Fargate queue set up by `corral aws setup --fargate` alone
    is not used by a run whose aws.instance_types leaves `fargate` out."""
    import corral.api as api
    from corral.backends.aws_batch.provision import Needs
    from corral.spec import AwsSettings

    clients = AwsClients()
    setup = ensure_environment(clients, AwsSettings(), Needs(fargate=True))  # `corral aws setup --fargate`
    assert setup.fargate_job_queue
    wf = loads_workflow(MIXED.replace("[optimal, fargate]", "[optimal]"))
    rec = api.run(wf, backend="aws", options=RunOptions(wait=False))
    assert not rec.options["aws_batch"]["fargate_job_queue"]
    assert clients.batch.list_jobs(jobQueue=setup.fargate_job_queue)["jobSummaryList"] == []
    defs = clients.batch.describe_job_definitions(status="ACTIVE")["jobDefinitions"]
    assert defs and all(d["platformCapabilities"] == ["EC2"] for d in defs)


def test_disk_of_fargate_stages_sizes_no_ec2_root_volume() -> None:
    """fetch's 50 GiB come from Fargate's ephemeral storage: the EC2 side keeps its default root
    volume (no launch template) when only Fargate stages ask for disk."""
    assert needs_for(make_plan(loads_workflow(MIXED))).max_disk_gib is None
    assert needs_for(make_plan(loads_workflow(MIXED.replace("[optimal, fargate]", "[optimal]")))).max_disk_gib == 50


def test_fargate_only_refuses_a_stage_that_does_not_fit(aws: str, tmp_path: Path) -> None:
    text = MIXED.replace("[optimal, fargate]", "[fargate]")
    res = run_cli("run", "--backend", "aws", str(write_workflow(tmp_path, text)))
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr
    assert "stage 'sort'" in errors[0] and "resources.vcpus: 32" in errors[0] and "16 vCPUs" in errors[0]
    assert "workflow.yaml:" in errors[0]  # names the file and line
    assert "hint:" in res.stderr and "[optimal, fargate]" in res.stderr
    # nothing submitted, registered or provisioned
    batch = AwsClients().batch
    assert batch.describe_job_queues()["jobQueues"] == []
    assert batch.describe_job_definitions(status="ACTIVE")["jobDefinitions"] == []
    assert moto_parent_jobs() == []


@pytest.mark.parametrize(("resources", "field", "words"), [
    ("{gpus: 1}", "gpus", "Fargate has no GPUs"),
    ("{disk: 300GiB}", "disk", "at most 200 GiB"),
    ("{vcpus: 16, memory: 121GiB}", "memory", "at most 122880 MiB"),
])
def test_fargate_only_names_the_field(resources: str, field: str, words: str) -> None:
    wf = loads_workflow(f"name: w\naws: {{instance_types: [fargate]}}\nitems: [{{a: 1}}]\n"
                        f"stages: [{{name: big, image: x, command: 'true', resources: {resources}}}]\n")
    with pytest.raises(PlanError) as info:
        check_fits(make_plan(wf), ["fargate"])
    assert f"resources.{field}" in info.value.message and words in info.value.message
    # with EC2 types beside fargate the same stage is fine (it goes to EC2 or GPU instances)
    if field != "disk":
        check_fits(make_plan(wf), ["optimal", "fargate"])


def test_fargate_job_definitions_are_rounded_and_content_named() -> None:
    ctx = pl.JobContext(region="us-east-2", account_id="123456789012",
                        execution_role_arn="arn:aws:iam::123456789012:role/exec", efs_id="fs-1",
                        efs_access_point="fsap-1")

    def stage(res: str) -> Stage:
        wf = loads_workflow(f"name: w\nstages: [{{name: s, image: x, command: 'true', resources: {res}}}]\n")
        return wf.stages[0]

    small = pl.job_definition(stage("{vcpus: 0.3, memory: 600MiB}"), ctx, fargate=True)
    cp = small.kwargs["containerProperties"]
    assert cp["resourceRequirements"] == [{"type": "VCPU", "value": "0.5"}, {"type": "MEMORY", "value": "1024"}]
    assert "ephemeralStorage" not in cp and "GPU" not in str(cp["resourceRequirements"])
    # EFS as on EC2: transit encryption and the access point with IAM
    assert cp["volumes"][0]["efsVolumeConfiguration"] == {
        "fileSystemId": "fs-1", "transitEncryption": "ENABLED",
        "authorizationConfig": {"accessPointId": "fsap-1", "iam": "ENABLED"}}
    assert pl.job_definition(stage("{vcpus: 0.3, memory: 600MiB}"), ctx, fargate=True) == small
    ec2 = pl.job_definition(stage("{vcpus: 0.3, memory: 600MiB}"), ctx)
    assert ec2.name != small.name and ec2.kwargs["platformCapabilities"] == ["EC2"]
    big = pl.job_definition(stage("{vcpus: 4, memory: 31000MiB, disk: 20GiB}"), ctx, fargate=True)
    assert big.kwargs["containerProperties"]["resourceRequirements"][0]["value"] == "8"
    assert "ephemeralStorage" not in big.kwargs["containerProperties"]  # 20 GiB come free
    private = pl.job_definition(stage("{vcpus: 1}"), pl.JobContext(**{**ctx.__dict__, "assign_public_ip": False}),
                                fargate=True)
    assert private.kwargs["containerProperties"]["networkConfiguration"] == {"assignPublicIp": "DISABLED"}
    assert private.name != pl.job_definition(stage("{vcpus: 1}"), ctx, fargate=True).name
    barrier = pl.barrier_definition("x", ctx, fargate=True).kwargs
    assert barrier["platformCapabilities"] == ["FARGATE"]
    assert barrier["containerProperties"]["resourceRequirements"][0] == {"type": "VCPU", "value": "0.25"}
    with pytest.raises(PlanError, match="execution role"):
        pl.job_definition(stage("{vcpus: 1}"), pl.JobContext(region="r", account_id="1"), fargate=True)


def test_resume_and_cancel_reach_fargate_jobs(aws: str, tmp_path: Path) -> None:
    wf = loads_workflow(MIXED)
    plan = make_plan(wf)
    clients = AwsClients()
    env = ensure_environment(clients, wf.aws, needs_for(plan))
    assert env.fargate_job_queue
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan)

    class Crash(Exception):
        pass

    def crash_after_fetch(name: str, job_id: str) -> None:
        if "-fetch-" in name:
            raise Crash  # submitted to the Fargate queue, not recorded
    with pytest.raises(Crash):
        AwsBatchBackend(clients, wf.aws, environment=env, sleep=lambda s: None,
                        after_submit=crash_after_fetch).start(plan, run, store, RunOptions(wait=False))
    assert store.get_run(run.run_id).options["aws_batch"]["fargate_job_queue"] == env.fargate_job_queue

    # Another machine resumes from the store: it finds the fetch job in the Fargate queue (adopts
    # it, no second submission) and submits the rest.
    other = AwsClients()
    AwsBatchBackend(other, wf.aws, environment=env, sleep=lambda s: None).resume(
        plan, store.get_run(run.run_id), store, RunOptions(wait=False))
    names = collections.Counter(j["jobName"] for j in moto_parent_jobs())
    assert names == {f"corral-{run.run_id}-{s}": 1 for s in ("fetch-r0-c0", "sort-r1-c0", "report-r1")}
    tasks = {(t.stage, t.item_index): t for t in store.get_tasks(run.run_id)}
    fetch0 = _jobs_by_queue(clients, env.fargate_job_queue)[f"corral-{run.run_id}-fetch-r0-c0"]
    assert {tasks[("fetch", i)].external_id for i in range(3)} == {f"{fetch0['jobId']}:{i}" for i in range(3)}
    assert all(t.state in (TaskState.SUBMITTED, TaskState.SUCCEEDED) for t in tasks.values())

    # A Fargate Spot interruption fails a child; resume resubmits it on Fargate, its sort on EC2.
    run = record_run(store, plan, run_id="run-2")
    AwsBatchBackend(clients, wf.aws, environment=env, sleep=lambda s: None).start(
        plan, run, store, RunOptions(wait=False))
    tasks = {(t.stage, t.item_index): t for t in store.get_tasks(run.run_id)}
    for t in tasks.values():
        _steer(t.external_id.split(":")[0], "RUNNING")
    _steer(tasks[("fetch", 1)].external_id, "FAILED", "Your Spot Task was interrupted.", 137)
    _steer(tasks[("sort", 1)].external_id, "FAILED", "Dependent Job failed")
    _steer(tasks[("report", None)].external_id, "FAILED", "Dependent Job failed")
    be = AwsBatchBackend(other, wf.aws, environment=env, sleep=lambda s: None)
    refreshed = {(t.stage, t.item_index): t for t in be.refresh(store.get_run(run.run_id), store)}
    assert refreshed[("fetch", 1)].state == TaskState.FAILED
    assert "Spot Task was interrupted" in refreshed[("fetch", 1)].reason
    be.resume(plan, store.get_run(run.run_id), store, RunOptions(wait=False))
    on_fargate = _jobs_by_queue(clients, env.fargate_job_queue)
    on_ec2 = _jobs_by_queue(clients, env.job_queue)
    fetch1, sort1 = on_fargate[f"corral-{run.run_id}-fetch-r1-c0"], on_ec2[f"corral-{run.run_id}-sort-r1-c0"]
    report1 = on_fargate[f"corral-{run.run_id}-report-r1"]
    assert _definition(clients, fetch1["jobDefinition"])["platformCapabilities"] == ["FARGATE"]
    assert fetch1["jobDefinition"] == on_fargate[f"corral-{run.run_id}-fetch-r0-c0"]["jobDefinition"]
    assert sort1["dependsOn"] == [{"jobId": fetch1["jobId"]}]  # one item: plain jobs, no N_TO_N
    assert "arrayProperties" not in fetch1 or not fetch1["arrayProperties"].get("size")
    assert {d["jobId"] for d in report1["dependsOn"]} == {sort1["jobId"]}

    # Cancel from yet another machine terminates the Fargate jobs too.
    for j in (fetch1, sort1, report1):
        _steer(j["jobId"], "RUNNING")
    counter = CallCounter(other)
    AwsBatchBackend(other, wf.aws, sleep=lambda s: None).cancel(store.get_run(run.run_id), store)
    assert counter.count("batch", "TerminateJob") == 3
    assert moto_batch_backend()._jobs[fetch1["jobId"]].job_stopped_reason == CANCEL_REASON
    assert store.get_run(run.run_id).state == RunState.CANCELLED


def test_cost_prices_fargate_stages_per_vcpu_and_gb_hour() -> None:
    from corral.cost import estimate_plan

    plan = make_plan(loads_workflow(MIXED))
    est = {s.stage: s for s in estimate_plan(plan, durations={"fetch": 3600, "sort": 3600, "report": 1800}).stages}
    # 0.25 vCPU × $0.04048 + 1 GB × $0.004445 + 30 GiB of disk over 20 × $0.000111, per hour
    assert est["fetch"].instance_type == "fargate-0.25cpu-1gb"
    assert est["fetch"].usd_per_task_hour == pytest.approx(0.25 * 0.04048 + 0.004445 + 30 * 0.000111)
    assert est["fetch"].usd == pytest.approx(3 * est["fetch"].usd_per_task_hour)
    assert est["report"].usd == pytest.approx((0.04048 + 3 * 0.004445) / 2)
    assert est["sort"].instance_type and not est["sort"].instance_type.startswith("fargate")
    spot = {s.stage: s for s in estimate_plan(plan, spot=True, durations={"fetch": 3600}).stages}
    assert spot["report"].usd_per_task_hour == pytest.approx(0.3 * (0.04048 + 3 * 0.004445))
    notes = " ".join(estimate_plan(plan).assumptions)
    assert "Fargate" in notes and "us-east-1" in notes


def test_fargate_only_makes_no_ec2_environment_and_everything_runs_on_fargate(aws: str, tmp_path: Path) -> None:
    """`instance_types: [fargate]`: no EC2 compute environment or queue is made; every job (and the
    job `teardown --run` sends to remove the run's EFS data) is a FARGATE job in the Fargate queue."""
    from corral import api
    from corral.backends.aws_batch.run_data import remove_run_data
    from corral.spec import load_workflow

    text = (
        "name: fgonly\ncleanup: true\naws: {instance_types: [fargate]}\ndefaults: {image: busybox}\n"
        "items: [{s: a}, {s: b}]\nstages:\n  - {name: w, command: 'echo {s} > {workdir}/{s}', resources: {vcpus: 0.5}}\n"
    )
    rec = api.run(load_workflow(write_workflow(tmp_path, text)), backend="aws", options=RunOptions(wait=False))
    clients = AwsClients()
    batch = clients.batch
    ces = batch.describe_compute_environments()["computeEnvironments"]
    assert ces and all(c["computeResources"]["type"].startswith("FARGATE") for c in ces)
    queues = batch.describe_job_queues()["jobQueues"]
    assert [q["jobQueueName"] for q in queues] == ["corral-fargate"]
    opts = rec.options["aws_batch"]
    assert opts["job_queue"] == opts["fargate_job_queue"] == queues[0]["jobQueueArn"]
    jobs = [j for j in moto_batch_backend()._jobs.values() if ":" not in j.job_id]
    assert len(jobs) == 2  # the array of `w`, the cleanup
    assert all(j.job_queue.arn == opts["fargate_job_queue"] for j in jobs)
    assert all(j.job_definition.platform_capabilities == ["FARGATE"] for j in jobs)

    out = remove_run_data(clients, rec.run_id, sleep=lambda s: None)
    assert out.status == "removed", out.message
    (data_job,) = [j for j in moto_batch_backend()._jobs.values() if j.job_name.endswith("-teardown-data")]
    assert data_job.job_queue.arn == opts["fargate_job_queue"]
    assert data_job.job_definition.platform_capabilities == ["FARGATE"]
