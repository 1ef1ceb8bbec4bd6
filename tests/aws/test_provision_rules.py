"""What AWS does and moto does not check, for provisioning: transfer permissions, log retention,
and a whole teardown that waits for in-flight jobs and keeps the runs' record and data."""

from __future__ import annotations

import json

import pytest
from provision_helpers import managed_census
from test_backend import _steer

from corral.backends.aws_batch import AwsClients, Needs, ProvisionReport, ensure_environment, iam, teardown
from corral.backends.aws_batch.common import Ctx
from corral.errors import SpecError, UsageError
from corral.spec import AwsSettings, loads_workflow
from corral.storage import aws as saws
from corral.storage.rclone import s3_connection

pytestmark = pytest.mark.aws


@pytest.fixture
def clients(aws: str) -> AwsClients:
    return AwsClients()


def test_rclone_s3_remotes_never_check_or_create_the_bucket() -> None:
    # rclone/rclone#4703, #5119: without no_check_bucket rclone HEADs the bucket and may CreateBucket
    assert "no_check_bucket=true" in s3_connection("us-east-2").split(":")[1].split(",")
    assert "no_check_bucket=true" in s3_connection(None, "http://127.0.0.1:9").split(":")[1].split(",")
    argv = saws.transfer_container_argv("s3://lab/raw/s1", "workspace://s1", mode="copy", filters=[],
                                        workdir="/mnt/corral/runs/r", region="us-east-2")
    assert any(a.startswith(":s3,") and "no_check_bucket=true" in a for a in argv)


def test_job_role_holds_exactly_what_transfers_need(clients: AwsClients) -> None:
    ctx = Ctx(clients=clients, report=ProvisionReport(), tags={})
    doc = iam.job_policy(ctx, iam.JobPolicyInputs(
        table="corral-state", log_group="/aws/batch/corral", s3_read=("lab/raw/",), s3_write=("lab/out/",)))
    s3 = [st for st in doc["Statement"] if any(a.startswith("s3:") for a in st["Action"])]
    by_sid = {st["Sid"]: st for st in s3}
    assert set(by_sid["WriteObjects"]["Action"]) == {
        "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"}
    assert by_sid["WriteObjects"]["Resource"] == ["arn:aws:s3:::lab/out/*"]
    assert by_sid["ReadObjects"]["Action"] == ["s3:GetObject"]
    assert by_sid["ReadObjects"]["Resource"] == ["arn:aws:s3:::lab/raw/*"]
    # listing only on the bucket, only under the prefixes used (rclone's listings send prefix=dir/)
    (lst,) = [st for st in s3 if "s3:ListBucket" in st["Action"]]
    assert lst["Resource"] == "arn:aws:s3:::lab" and lst["Condition"] == {
        "StringLike": {"s3:prefix": ["out/*", "raw/*"]}}
    actions = {a for st in s3 for a in st["Action"]}
    assert actions == {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                       "s3:ListMultipartUploadParts", "s3:ListBucket", "s3:GetBucketLocation"}
    assert not any("Tagging" in a or a == "s3:CreateBucket" for a in actions)
    iam.check_policy_is_narrow(doc)


def test_log_group_keeps_logs_for_the_retention_set(clients: AwsClients) -> None:
    ensure_environment(clients, AwsSettings(), Needs())
    (group,) = clients.logs.describe_log_groups(logGroupNamePrefix="/aws/batch/corral")["logGroups"]
    assert group["retentionInDays"] == 30  # the stated default
    report = ProvisionReport()
    ensure_environment(clients, AwsSettings(log_retention_days=90), Needs(), report)
    assert "log-group /aws/batch/corral (keeps logs 90 days)" in report.updated
    (group,) = clients.logs.describe_log_groups(logGroupNamePrefix="/aws/batch/corral")["logGroups"]
    assert group["retentionInDays"] == 90
    with pytest.raises(SpecError, match="log_retention_days 31 is not one CloudWatch Logs accepts"):
        loads_workflow("name: w\naws: {log_retention_days: 31}\nstages: [{name: a, command: 'true'}]")


def test_teardown_all_refuses_while_jobs_are_in_flight_and_keeps_the_record_and_data(clients: AwsClients) -> None:
    env = ensure_environment(clients, AwsSettings(), Needs(efs=True, run_id="r1"))
    clients.batch.register_job_definition(
        jobDefinitionName="corral-probe", type="container",
        containerProperties={"image": "busybox", "command": ["true"], "resourceRequirements": [
            {"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "512"}]},
        tags={"corral:managed": "true"})
    job = clients.batch.submit_job(jobName="corral-r1-a", jobQueue=env.job_queue, jobDefinition="corral-probe")
    _steer(job["jobId"], "RUNNING")
    with pytest.raises(UsageError, match="jobs in flight \\(1 RUNNING in corral\\)") as err:
        teardown(clients, everything=True)
    assert "--force" in err.value.hint and "corral cancel" in err.value.hint
    assert managed_census(clients)["job-queues"]  # nothing removed

    report = teardown(clients, everything=True, force=True)
    census = managed_census(clients)
    assert set(census) == {"tables", "file-systems", "access-points"}  # the runs' record and data stay
    assert any(k.startswith("dynamodb-table corral-state") and "--purge" in k for k in report.kept)
    assert any(k.startswith(f"efs {'corral-workspace'} ({env.efs_id})") for k in report.kept)
    report = teardown(clients, everything=True, purge=True)
    assert "dynamodb-table corral-state" in report.deleted
    assert any(d.startswith("security-group corral-efs") for d in report.deleted)
    assert managed_census(clients) == {}
    assert not clients.ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["corral-efs"]}])[
        "SecurityGroups"]


def test_cli_teardown_all_refuses_in_flight_jobs(clients: AwsClients, capsys: pytest.CaptureFixture[str]) -> None:
    from test_provision_cli import run

    env = ensure_environment(clients, AwsSettings(), Needs())
    clients.batch.register_job_definition(
        jobDefinitionName="corral-probe", type="container",
        containerProperties={"image": "busybox", "command": ["true"], "resourceRequirements": [
            {"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "512"}]})
    job = clients.batch.submit_job(jobName="corral-r1-a", jobQueue=env.job_queue, jobDefinition="corral-probe")
    _steer(job["jobId"], "RUNNABLE")
    code, out, err = run(["aws", "teardown", "--all", "--yes"], capsys)
    assert code == 2 and "1 RUNNABLE in corral" in err and "--force" in err and "Traceback" not in err
    code, out, err = run(["aws", "teardown", "--all", "--yes", "--force", "--json"], capsys)
    assert code == 0, err
    kept = json.loads(out)["kept"]
    assert any(k.startswith("dynamodb-table corral-state") for k in kept)


def test_the_root_volume_holds_every_task_that_can_share_an_instance(clients: AwsClients) -> None:
    from corral.backends.aws_batch.provision import needs_for
    from corral.errors import ProvisionError
    from corral.plan import make_plan

    def plan(n: int, disk: str = "300GiB", types: str = "[m5]") -> object:
        items = ", ".join(f"{{k: {i}}}" for i in range(n))
        return make_plan(loads_workflow(f"""
name: disky
items: [{items}]
aws: {{instance_types: {types}}}
stages:
  - {{name: sort, resources: {{vcpus: 1, memory: 2GiB, disk: {disk}}}, command: "true"}}
"""))

    env = ensure_environment(clients, AwsSettings(instance_types=["m5"]), needs_for(plan(15)))
    assert env.root_volume_gib == 4550  # 15 tasks × 300 GiB + 30 GiB for images (was 350: one task's worth)
    (v,) = clients.ec2.describe_launch_template_versions(LaunchTemplateName="corral-batch")["LaunchTemplateVersions"]
    assert v["LaunchTemplateData"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 4550
    # 100 such tasks could share an m5.24xlarge (96 of them): 28,800 GiB, more than any gp3 volume
    with pytest.raises(ProvisionError) as err:
        ensure_environment(clients, AwsSettings(instance_types=["m5"]), needs_for(plan(100)))
    assert "up to 96 of its tasks can share one m5.24xlarge" in err.value.one_line()
    assert "smaller instance types" in err.value.hint
    # limiting the sizes is the fix: m5.2xlarge holds 8 of them (2,400 GiB)
    small = ensure_environment(clients, AwsSettings(instance_types=["m5.2xlarge"]), needs_for(plan(100, types="[m5.2xlarge]")))
    assert small.root_volume_gib == 2450
