"""`corral.aws.submit_job`: the drop-in for NeuroConv's `submit_aws_batch_job`."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from provision_helpers import CallLog

from corral import aws as dropin
from corral.backends.aws_batch import AwsClients

pytestmark = pytest.mark.aws


@pytest.fixture
def clients(aws: str) -> Iterator[AwsClients]:
    dropin.forget_cached_environments()
    yield AwsClients()
    dropin.forget_cached_environments()


def _job(clients: AwsClients, job_id: str) -> dict:
    return clients.batch.describe_jobs(jobs=[job_id])["jobs"][0]


def test_submit_job_provisions_submits_and_tracks(clients: AwsClients) -> None:
    info = dropin.submit_job(
        job_name="convert-s1", docker_image="ubuntu:latest", commands=["echo", "hello"],
        environment_variables={"SESSION": "s1", "N": 3}, minimum_worker_ram_in_gib=8, minimum_worker_cpus=2,
        clients=clients,
    )
    job_id = info["job_submission_info"]["jobId"]
    row = info["table_submission_info"]
    assert row["job_id"] == job_id and row["job_name"] == "convert-s1" and row["status"] == "Job submitted..."
    assert row["id"] and row["submitted_on"]
    job = _job(clients, job_id)
    assert job["jobQueue"].endswith("job-queue/corral")
    c = job["container"]
    assert c["command"] == ["echo", "hello"]
    env = {e["name"]: e["value"] for e in c["environment"]}
    assert env["SESSION"] == "s1" and env["N"] == "3"
    jd = clients.batch.describe_job_definitions(jobDefinitions=[job["jobDefinition"]])["jobDefinitions"][0]
    req = {r["type"]: r["value"] for r in jd["containerProperties"]["resourceRequirements"]}
    assert req == {"VCPU": "2", "MEMORY": "8192"}
    assert jd["containerProperties"]["jobRoleArn"].startswith("arn:aws:iam::123456789012:role/corral/corral-job-")
    assert jd["containerProperties"]["logConfiguration"]["options"]["awslogs-group"] == "/aws/batch/corral"
    assert jd["tags"]["corral:managed"] == "true"
    stored = clients.dynamodb.get_item(TableName="corral-state",
                                       Key={"pk": {"S": f"dropin#{row['id']}"}, "sk": {"S": "job"}})["Item"]
    assert stored["job_id"]["S"] == job_id


def test_second_submit_is_two_calls_and_no_sleep(clients: AwsClients) -> None:
    dropin.submit_job(job_name="a", docker_image="ubuntu:latest", clients=clients)
    log = CallLog(clients)
    t0 = time.monotonic()
    info = dropin.submit_job(job_name="b", docker_image="ubuntu:latest", submission_id="fixed-id",
                             job_dependencies=[{"jobId": "abc"}], clients=clients)
    assert time.monotonic() - t0 < 5
    assert log.names() == ["batch.SubmitJob", "dynamodb.PutItem"]
    assert info["table_submission_info"]["id"] == "fixed-id"
    (params,) = [p for s, n, p in log.calls if n == "SubmitJob"]
    assert params["dependsOn"] == [{"jobId": "abc"}]


def test_a_fresh_process_reuses_the_environment_and_the_job_definition(clients: AwsClients) -> None:
    first = dropin.submit_job(job_name="a", docker_image="ubuntu:latest", clients=clients)
    dropin.forget_cached_environments()  # as if the script ran again
    log = CallLog(clients)
    second = dropin.submit_job(job_name="a2", docker_image="ubuntu:latest", clients=clients)
    assert [c for c in log.mutating()] == ["batch.SubmitJob", "dynamodb.PutItem"]
    assert _job(clients, first["job_submission_info"]["jobId"])["jobDefinition"] == \
        _job(clients, second["job_submission_info"]["jobId"])["jobDefinition"]


def test_dependencies_and_efs(clients: AwsClients) -> None:
    first = dropin.submit_job(job_name="fetch", docker_image="rclone/rclone:1.66", efs_volume_name="lab-efs",
                              clients=clients)
    assert first["efs_volume"]["FileSystemId"].startswith("fs-")
    fs = clients.efs.describe_file_systems(CreationToken="lab-efs")["FileSystems"][0]
    assert fs["Encrypted"] and fs["FileSystemId"] == first["efs_volume"]["FileSystemId"]
    second = dropin.submit_job(
        job_name="convert", docker_image="ubuntu:latest", efs_volume_name="lab-efs",
        job_dependencies=[{"jobId": first["job_submission_info"]["jobId"], "type": "SEQUENTIAL"}], clients=clients,
    )
    job = _job(clients, second["job_submission_info"]["jobId"])
    assert job["dependsOn"] == [{"jobId": first["job_submission_info"]["jobId"], "type": "SEQUENTIAL"}]
    jd = clients.batch.describe_job_definitions(jobDefinitions=[job["jobDefinition"]])["jobDefinitions"][0]
    (vol,) = jd["containerProperties"]["volumes"]
    assert vol["efsVolumeConfiguration"] == {"fileSystemId": fs["FileSystemId"], "transitEncryption": "ENABLED"}
    assert jd["containerProperties"]["mountPoints"][0]["containerPath"] == "/mnt/efs"


def test_ecr_image_is_resolved_and_pullable(clients: AwsClients) -> None:
    info = dropin.submit_job(job_name="sort", docker_image="ecr://my-sorter:1.2", clients=clients)
    job = _job(clients, info["job_submission_info"]["jobId"])
    jd = clients.batch.describe_job_definitions(jobDefinitions=[job["jobDefinition"]])["jobDefinitions"][0]
    assert jd["containerProperties"]["image"] == "123456789012.dkr.ecr.us-east-2.amazonaws.com/my-sorter:1.2"


def test_a_named_tracking_table(clients: AwsClients) -> None:
    info = dropin.submit_job(job_name="a", docker_image="ubuntu:latest",
                             status_tracker_table_name="lab_batch_status", clients=clients)
    item = clients.dynamodb.get_item(TableName="lab_batch_status", Key={
        "pk": {"S": f"dropin#{info['table_submission_info']['id']}"}, "sk": {"S": "job"}})["Item"]
    assert item["job_name"]["S"] == "a"


def test_seed_name_is_an_alias() -> None:
    assert dropin.submit_aws_batch_job is dropin.submit_job
