"""The strict-AWS layer refuses, with AWS's error, each request AWS would refuse (and moto accepts)."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from strict_aws import StrictAws

pytestmark = pytest.mark.aws

SH = ["/bin/sh", "-c", "echo hi"]


@pytest.fixture
def batch(aws: str) -> Any:
    return boto3.client("batch")


@pytest.fixture
def queue(batch: Any) -> str:
    iam = boto3.client("iam")
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "batch.amazonaws.com"},
                                                      "Action": "sts:AssumeRole"}]}
    role = iam.create_role(RoleName="svc", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    ce = batch.create_compute_environment(
        computeEnvironmentName="strict-ce", type="UNMANAGED", state="ENABLED", serviceRole=role
    )["computeEnvironmentArn"]
    arn: str = batch.create_job_queue(
        jobQueueName="strict-q", state="ENABLED", priority=1, computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}]
    )["jobQueueArn"]
    return arn


def _definition(batch: Any, **extra: Any) -> str:
    kwargs: dict[str, Any] = {
        "jobDefinitionName": "jd", "type": "container",
        "containerProperties": {
            "image": "busybox", "command": SH,
            "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "512"}],
        },
    }
    kwargs.update(extra)
    arn: str = batch.register_job_definition(**kwargs)["jobDefinitionArn"]
    return arn


def _refused(call: Any, code: str, text: str) -> None:
    with pytest.raises(ClientError) as info:
        call()
    assert info.value.response["Error"]["Code"] == code
    assert text in info.value.response["Error"]["Message"]


def _env(total_chars: int) -> list[dict[str, str]]:
    return [{"name": "BIG", "value": "x" * total_chars}]


def test_overrides_over_the_ecs_limit_are_refused_and_just_under_accepted(
    batch: Any, queue: str, strict_aws: StrictAws
) -> None:
    jd = _definition(batch)
    ok = batch.submit_job(jobName="ok", jobQueue=queue, jobDefinition=jd,
                          containerOverrides={"environment": _env(6500)})
    assert ok["jobId"]
    _refused(lambda: batch.submit_job(jobName="big", jobQueue=queue, jobDefinition=jd,
                                      containerOverrides={"environment": _env(7400)}),
             "ClientException", "Container Overrides length must be at most 8192")
    # every child of an array gets the same overrides: the same budget holds for arrays
    _refused(lambda: batch.submit_job(jobName="big-array", jobQueue=queue, jobDefinition=jd,
                                      arrayProperties={"size": 10}, containerOverrides={"environment": _env(7400)}),
             "ClientException", "at most 8192")
    assert [v.operation for v in strict_aws.violations] == ["SubmitJob", "SubmitJob"]


def test_the_job_definitions_command_counts_when_the_override_has_none(batch: Any, queue: str) -> None:
    long_command = ["/bin/sh", "-c", "echo " + "y" * 3000]
    jd = _definition(batch, containerProperties={
        "image": "busybox", "command": long_command,
        "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "512"}]})
    _refused(lambda: batch.submit_job(jobName="j", jobQueue=queue, jobDefinition=jd,
                                      containerOverrides={"environment": _env(4500)}),
             "ClientException", "at most 8192")
    # the same environment with the short command of another definition fits
    short = _definition(batch, jobDefinitionName="short")
    batch.submit_job(jobName="j2", jobQueue=queue, jobDefinition=short, containerOverrides={"environment": _env(4500)})


def test_submit_job_over_30_kib_is_refused(batch: Any, queue: str) -> None:
    jd = _definition(batch)
    tags = {f"k{i}": "v" * 250 for i in range(40)}
    env = [{"name": f"V{i}", "value": "z" * 10} for i in range(10)]
    _refused(lambda: batch.submit_job(jobName="j", jobQueue=queue, jobDefinition=jd, tags=tags,
                                      parameters={"p": "q" * 21000}, containerOverrides={"environment": env}),
             "ClientException", "30 KiB")


def test_job_definition_over_24_kib_is_refused(batch: Any) -> None:
    _refused(lambda: _definition(batch, parameters={"p": "q" * 25000}), "ClientException", "24 KiB")


@pytest.mark.parametrize("size", [1, 10_001])
def test_array_size_outside_2_to_10000_is_refused(batch: Any, queue: str, size: int) -> None:
    jd = _definition(batch)
    _refused(lambda: batch.submit_job(jobName="j", jobQueue=queue, jobDefinition=jd, arrayProperties={"size": size}),
             "ClientException", "between 2 and 10000")


def test_more_than_20_dependencies_are_refused(batch: Any, queue: str) -> None:
    jd = _definition(batch)
    ids = [batch.submit_job(jobName=f"p{i}", jobQueue=queue, jobDefinition=jd)["jobId"] for i in range(21)]
    batch.submit_job(jobName="ok", jobQueue=queue, jobDefinition=jd, dependsOn=[{"jobId": i} for i in ids[:20]])
    _refused(lambda: batch.submit_job(jobName="j", jobQueue=queue, jobDefinition=jd,
                                      dependsOn=[{"jobId": i} for i in ids]), "ClientException", "at most 20")


def test_n_to_n_only_between_arrays_of_the_same_size(batch: Any, queue: str) -> None:
    jd = _definition(batch)
    a10 = batch.submit_job(jobName="a", jobQueue=queue, jobDefinition=jd, arrayProperties={"size": 10})["jobId"]
    plain = batch.submit_job(jobName="p", jobQueue=queue, jobDefinition=jd)["jobId"]
    batch.submit_job(jobName="ok", jobQueue=queue, jobDefinition=jd, arrayProperties={"size": 10},
                     dependsOn=[{"jobId": a10, "type": "N_TO_N"}])
    for size, dep in [(9, a10), (10, plain)]:
        _refused(lambda s=size, d=dep: batch.submit_job(
            jobName="j", jobQueue=queue, jobDefinition=jd, arrayProperties={"size": s},
            dependsOn=[{"jobId": d, "type": "N_TO_N"}]), "ClientException", "same size")
    _refused(lambda: batch.submit_job(jobName="j", jobQueue=queue, jobDefinition=jd,
                                      dependsOn=[{"jobId": a10, "type": "N_TO_N"}]), "ClientException", "same size")


@pytest.mark.parametrize("retry, text", [
    ({"attempts": 0}, "between 1 and 10"),
    ({"attempts": 11}, "between 1 and 10"),
    ({"attempts": 3, "evaluateOnExit": [{"onExitCode": str(i), "action": "RETRY"} for i in range(6)]}, "at most 5"),
])
def test_retry_strategy_limits(batch: Any, queue: str, retry: dict[str, Any], text: str) -> None:
    _refused(lambda: _definition(batch, retryStrategy=retry), "ClientException", text)
    jd = _definition(batch, jobDefinitionName="fine")
    _refused(lambda: batch.submit_job(jobName="j", jobQueue=queue, jobDefinition=jd, retryStrategy=retry),
             "ClientException", text)


def test_timeout_under_60_seconds_is_refused(batch: Any, queue: str) -> None:
    _refused(lambda: _definition(batch, timeout={"attemptDurationSeconds": 59}), "ClientException", "at least 60")
    _definition(batch, timeout={"attemptDurationSeconds": 60})


def test_more_than_50_tags_are_refused(batch: Any, queue: str) -> None:
    jd = _definition(batch)
    _refused(lambda: batch.submit_job(jobName="j", jobQueue=queue, jobDefinition=jd,
                                      tags={f"k{i}": "v" for i in range(51)}), "ClientException", "at most 50")
    _refused(lambda: _definition(batch, tags={f"k{i}": "v" for i in range(51)}), "ClientException", "at most 50")


@pytest.mark.parametrize("op", ["create", "update"])
@pytest.mark.parametrize("image_type", ["ECS_AL2", "ECS_AL2_NVIDIA"])
def test_amazon_linux_2_image_types_are_refused(batch: Any, op: str, image_type: str) -> None:
    resources = {"ec2Configuration": [{"imageType": image_type}]}
    if op == "create":
        call = lambda: batch.create_compute_environment(  # noqa: E731
            computeEnvironmentName="strict-ce2", type="MANAGED",
            computeResources={"type": "EC2", "maxvCpus": 4, "subnets": ["s"], "instanceRole": "r",
                              "instanceTypes": ["optimal"], **resources})
    else:
        call = lambda: batch.update_compute_environment(  # noqa: E731
            computeEnvironment="strict-ce2", computeResources=resources)
    _refused(call, "ClientException", "ECS_AL2023")


@pytest.mark.parametrize("vcpu, memory", [("0.25", "4096"), ("1", "1024"), ("16", "30720"), ("3", "8192")])
def test_fargate_vcpu_memory_pairs(batch: Any, vcpu: str, memory: str) -> None:
    props = {"image": "busybox", "command": SH, "executionRoleArn": "arn:aws:iam::123456789012:role/x",
             "resourceRequirements": [{"type": "VCPU", "value": vcpu}, {"type": "MEMORY", "value": memory}]}
    _refused(lambda: _definition(batch, platformCapabilities=["FARGATE"], containerProperties=props),
             "ClientException", "not a supported combination")


@pytest.mark.parametrize("gib, ok", [(20, False), (21, True), (200, True), (201, False)])
def test_fargate_ephemeral_storage(batch: Any, gib: int, ok: bool) -> None:
    props = {"image": "busybox", "command": SH, "executionRoleArn": "arn:aws:iam::123456789012:role/x",
             "ephemeralStorage": {"sizeInGiB": gib},
             "resourceRequirements": [{"type": "VCPU", "value": "0.5"}, {"type": "MEMORY", "value": "2048"}]}
    call = lambda: _definition(batch, platformCapabilities=["FARGATE"], containerProperties=props)  # noqa: E731
    if ok:
        call()
    else:
        _refused(call, "ClientException", "between 21 and 200")


def test_share_identifier_required_on_fair_share_queue_refused_elsewhere(batch: Any, queue: str) -> None:
    jd = _definition(batch)
    policy = batch.create_scheduling_policy(name="fair", fairsharePolicy={"shareDecaySeconds": 3600})["arn"]
    ce = batch.describe_job_queues(jobQueues=[queue])["jobQueues"][0]["computeEnvironmentOrder"][0]["computeEnvironment"]
    fair = batch.create_job_queue(
        jobQueueName="fair-q", state="ENABLED", priority=1, schedulingPolicyArn=policy,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}])["jobQueueArn"]
    _refused(lambda: batch.submit_job(jobName="j", jobQueue=fair, jobDefinition=jd), "ClientException",
             "shareIdentifier")
    batch.submit_job(jobName="j", jobQueue="fair-q", jobDefinition=jd, shareIdentifier="lab")
    _refused(lambda: batch.submit_job(jobName="j", jobQueue=queue, jobDefinition=jd, shareIdentifier="lab"),
             "ClientException", "must not be specified")


def test_a_queue_made_before_the_layer_saw_it_is_looked_up(aws: str, queue: str) -> None:
    """A client made outside the layer's memory (a fresh layer) still finds the queue's policy."""
    fresh = StrictAws(endpoint_url=aws)
    assert fresh._queue_fair_share(queue) is False


def test_get_log_events_with_a_forward_token_needs_start_from_head(aws: str) -> None:
    logs = boto3.client("logs")
    logs.create_log_group(logGroupName="g")
    logs.create_log_stream(logGroupName="g", logStreamName="s")
    logs.put_log_events(logGroupName="g", logStreamName="s",
                        logEvents=[{"timestamp": 1000 + i, "message": f"m{i}"} for i in range(5)])
    first = logs.get_log_events(logGroupName="g", logStreamName="s", startFromHead=True, limit=2)
    token = first["nextForwardToken"]
    _refused(lambda: logs.get_log_events(logGroupName="g", logStreamName="s", nextToken=token),
             "InvalidParameterException", "startFromHead=true")
    logs.get_log_events(logGroupName="g", logStreamName="s", nextToken=token, startFromHead=True)


def test_clients_made_by_corral_are_covered(aws: str, queue: str) -> None:
    from corral.backends.aws_batch.client import AwsClients

    batch = AwsClients().batch
    jd = _definition(batch)
    _refused(lambda: batch.submit_job(jobName="j", jobQueue=queue, jobDefinition=jd, arrayProperties={"size": 1}),
             "ClientException", "between 2 and 10000")


# -- consumable resources (max_parallel): answered by the layer, moto has none ----------------------
def test_consumable_resources_as_the_batch_api_reference_describes(batch: Any, queue: str) -> None:
    arn = batch.create_consumable_resource(consumableResourceName="cap", totalQuantity=2)["consumableResourceArn"]
    assert arn.endswith(":consumable-resource/cap")
    _refused(lambda: batch.create_consumable_resource(consumableResourceName="cap", totalQuantity=2),
             "ClientException", "already exists")  # unique at the account level
    _refused(lambda: batch.create_consumable_resource(consumableResourceName="neg", totalQuantity=-1),
             "ClientException", "non-negative")
    _refused(lambda: batch.create_consumable_resource(consumableResourceName="odd", resourceType="SOMETIMES"),
             "ClientException", "resourceType")
    _refused(lambda: batch.update_consumable_resource(consumableResource="cap", operation="DOUBLE", quantity=1),
             "ClientException", "SET, ADD or REMOVE")
    assert batch.update_consumable_resource(consumableResource="cap", operation="ADD", quantity=3)["totalQuantity"] == 5
    d = batch.describe_consumable_resource(consumableResource=arn)
    assert (d["totalQuantity"], d["inUseQuantity"], d["resourceType"]) == (5, 0, "REPLENISHABLE")
    listed = batch.list_consumable_resources(filters=[{"name": "CONSUMABLE_RESOURCE_NAME", "values": ["CA*"]}])
    assert [r["consumableResourceName"] for r in listed["consumableResources"]] == ["cap"]  # case-insensitive prefix

    # a job definition (or a SubmitJob override) may name only resources that exist, 1 or more of each
    _refused(lambda: _definition(batch, consumableResourceProperties={
        "consumableResourceList": [{"consumableResource": "nope", "quantity": 1}]}), "ClientException", "does not exist")
    _refused(lambda: _definition(batch, consumableResourceProperties={
        "consumableResourceList": [{"consumableResource": "cap", "quantity": 0}]}), "ClientException", "at least 1")
    jd = _definition(batch, consumableResourceProperties={
        "consumableResourceList": [{"consumableResource": "cap", "quantity": 1}]})
    _refused(lambda: batch.submit_job(jobName="j", jobQueue=queue, jobDefinition=jd,
                                      consumableResourcePropertiesOverride={"consumableResourceList": [
                                          {"consumableResource": "gone", "quantity": 1}]}),
             "ClientException", "does not exist")
    batch.delete_consumable_resource(consumableResource="cap")
    _refused(lambda: batch.delete_consumable_resource(consumableResource="cap"), "ClientException", "not found")
