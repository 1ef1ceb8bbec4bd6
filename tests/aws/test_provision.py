"""Provisioning against the moto server: from nothing, again with no writes, tags, teardown, network."""

from __future__ import annotations

import json

import pytest
from provision_helpers import CallLog, managed_census

from corral.backends.aws_batch import AwsClients, Needs, ProvisionReport, ensure_environment, teardown
from corral.backends.aws_batch.provision import needs_for, queue_names
from corral.errors import ProvisionError, UsageError
from corral.plan import make_plan
from corral.spec import AwsSettings, loads_workflow

pytestmark = pytest.mark.aws

FULL = dict(gpu=True, max_disk_gib=200, efs=True, bucket=True, secrets=["lab/db-password"],
            ecr_repositories=["my-sorter"], run_id="run-1", max_vcpus_per_task=4, max_memory_mib=8192)


@pytest.fixture
def clients(aws: str) -> AwsClients:
    return AwsClients()


def test_from_nothing_then_a_second_setup_writes_nothing(clients: AwsClients) -> None:
    log = CallLog(clients)
    settings = AwsSettings(spot=True)
    report = ProvisionReport()
    env = ensure_environment(clients, settings, Needs(**FULL), report)
    kinds = {c.split()[0] for c in report.created}
    assert {"compute-environment", "job-queue", "role", "instance-profile", "dynamodb-table", "log-group",
            "s3-bucket", "efs", "efs-mount-target", "efs-access-point", "launch-template"} <= kinds
    assert log.creates()
    names = queue_names(settings, Needs(**FULL))
    assert names["cpu"].startswith("corral-") and names["gpu"].startswith("corral-gpu-")  # not the plain setup
    assert env.job_queue.endswith(f":job-queue/{names['cpu']}")
    assert env.gpu_job_queue.endswith(f":job-queue/{names['gpu']}")
    assert len(env.compute_environments) == 2 and "-spot-" in env.compute_environments[0]
    assert env.table_name == "corral-state" and env.log_group == "/aws/batch/corral"
    assert env.efs_id and env.efs_access_point and env.bucket
    assert env.account_id == "123456789012" and env.region == "us-east-2"

    log.clear()
    again = ProvisionReport()
    env2 = ensure_environment(clients, settings, Needs(**FULL), again)
    assert log.creates() == [] and log.mutating() == []
    # one look at each thing, ready things not polled again (+1: the EFS file-system policy; + the network
    # preflight's route tables, the corral-efs group and each mount target's groups)
    assert len(log.calls) <= 31, log.names()
    assert again.created == [] and again.updated == []
    assert env2 == env
    assert len(again.found) >= len(report.created) - 3  # mount targets/profile may be reported per item


def test_only_reads_before_each_create(clients: AwsClients) -> None:
    """Every create is preceded by a describe of the same kind of thing."""
    log = CallLog(clients)
    ensure_environment(clients, AwsSettings(), Needs(bucket=True), ProvisionReport())
    seen_reads: set[str] = set()
    for service, name, _ in log.calls:
        if name.startswith(("Describe", "List", "Get", "Head")):
            seen_reads.add(service)
        elif name.startswith("Create") and name != "CreateServiceLinkedRole":
            assert service in seen_reads, f"{service}.{name} without a describe first"


def test_every_resource_is_tagged(clients: AwsClients) -> None:
    settings = AwsSettings(spot=True, tags={"project": "lab"})
    env = ensure_environment(clients, settings, Needs(**FULL))
    census = managed_census(clients)
    assert set(census) >= {"compute-environments", "job-queues", "roles", "instance-profiles", "tables",
                           "log-groups", "buckets", "file-systems", "access-points", "launch-templates"}
    assert len(census["compute-environments"]) == 4 and len(census["job-queues"]) == 2
    # user tags travel along
    ce = clients.batch.describe_compute_environments(computeEnvironments=[env.compute_environments[0]])
    assert ce["computeEnvironments"][0]["tags"]["project"] == "lab"
    aps = clients.efs.describe_access_points(FileSystemId=env.efs_id)["AccessPoints"]
    assert {t["Key"]: t["Value"] for t in aps[0]["Tags"]}["corral:run"] == "run-1"


def test_teardown_all_leaves_no_managed_resource_and_spares_others(clients: AwsClients) -> None:
    ensure_environment(clients, AwsSettings(spot=True), Needs(**FULL))
    # things corral did not make must survive
    clients.iam.create_role(RoleName="someone-elses", AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": []}))
    clients.dynamodb.create_table(TableName="their-table", BillingMode="PAY_PER_REQUEST",
                                  AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                                  KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}])
    clients.s3.create_bucket(Bucket="their-bucket", CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
    clients.logs.create_log_group(logGroupName="/aws/batch/corral-theirs")
    assert managed_census(clients)

    report = teardown(clients, everything=True, purge=True)
    assert managed_census(clients) == {}
    assert any(d.startswith("compute-environment") for d in report.deleted)
    assert clients.iam.get_role(RoleName="someone-elses")
    assert "their-table" in clients.dynamodb.list_tables()["TableNames"]
    assert clients.s3.head_bucket(Bucket="their-bucket")
    assert clients.logs.describe_log_groups(logGroupNamePrefix="/aws/batch/corral-theirs")["logGroups"]
    # and the tagging API (where moto covers the service) agrees
    # (moto's tagging API fails over the untagged ECS clusters Batch makes, so ask per resource type)
    tagged = clients.tagging.get_resources(
        TagFilters=[{"Key": "corral:managed", "Values": ["true"]}],
        ResourceTypeFilters=["dynamodb:table", "logs:log-group", "s3", "elasticfilesystem", "ec2", "batch"],
    )
    assert tagged["ResourceTagMappingList"] == []
    # a teardown of nothing is fine, and a new setup works after it
    assert teardown(clients, everything=True).deleted == []
    ensure_environment(clients, AwsSettings(), Needs())


def test_teardown_keeps_a_bucket_with_data_unless_purged(clients: AwsClients) -> None:
    env = ensure_environment(clients, AwsSettings(), Needs(bucket=True))
    clients.s3.put_object(Bucket=env.bucket, Key="corral/run-1/out.txt", Body=b"x")
    report = teardown(clients, everything=True)
    assert any(k.startswith(f"s3-bucket {env.bucket}") for k in report.kept)
    assert clients.s3.head_bucket(Bucket=env.bucket)
    report = teardown(clients, everything=True, purge=True)
    assert f"s3-bucket {env.bucket}" in report.deleted
    assert managed_census(clients) == {}


def test_teardown_of_a_run_removes_only_that_runs_things(clients: AwsClients) -> None:
    env1 = ensure_environment(clients, AwsSettings(), Needs(efs=True, run_id="run-1"))
    env2 = ensure_environment(clients, AwsSettings(), Needs(efs=True, run_id="run-2"))
    assert env1.efs_id == env2.efs_id and env1.efs_access_point != env2.efs_access_point
    for run in ("run-1", "run-2"):
        clients.batch.register_job_definition(
            jobDefinitionName=f"corral-{run}-fetch", type="container",
            containerProperties={"image": "busybox", "resourceRequirements": [
                {"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "512"}]},
            tags={"corral:managed": "true", "corral:run": run})
    report = teardown(clients, run_id="run-1")
    assert any("run-1" in d for d in report.deleted)
    assert not any("run-2" in d for d in report.deleted)
    left = {a["AccessPointId"] for a in clients.efs.describe_access_points(FileSystemId=env1.efs_id)["AccessPoints"]}
    assert left == {env2.efs_access_point}
    names = {d["jobDefinitionName"] for d in clients.batch.describe_job_definitions(status="ACTIVE")["jobDefinitions"]
             if d["status"] == "ACTIVE"}
    assert names == {"corral-run-2-fetch"}
    assert clients.batch.describe_job_queues(jobQueues=["corral"])["jobQueues"]  # shared things stay


def test_teardown_needs_a_scope(clients: AwsClients) -> None:
    with pytest.raises(UsageError):
        teardown(clients)


def test_network_comes_from_the_default_vpc(clients: AwsClients) -> None:
    ec2 = clients.ec2
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnets = {s["SubnetId"] for s in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
               if s.get("DefaultForAz")}
    sg = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                               {"Name": "group-name", "Values": ["default"]}])["SecurityGroups"][0]
    env = ensure_environment(clients, AwsSettings(), Needs())
    assert set(env.subnets) == subnets and len(subnets) == 3
    assert env.security_groups == [sg["GroupId"]]
    ce = clients.batch.describe_compute_environments(computeEnvironments=env.compute_environments)
    cr = ce["computeEnvironments"][0]["computeResources"]
    assert set(cr["subnets"]) == subnets and cr["securityGroupIds"] == [sg["GroupId"]]
    assert cr["minvCpus"] == 0 and cr["maxvCpus"] == 256 and cr["allocationStrategy"] == "BEST_FIT_PROGRESSIVE"
    assert cr["instanceTypes"] == ["optimal"] and cr["type"] == "EC2"


def test_subnets_from_settings_are_used_as_given(clients: AwsClients) -> None:
    ec2 = clients.ec2
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    a = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.1.0/24", AvailabilityZone="us-east-2b")["Subnet"]["SubnetId"]
    b = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.2.0/24", AvailabilityZone="us-east-2a")["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName="lab-batch", Description="lab", VpcId=vpc)["GroupId"]
    nat = ec2.create_nat_gateway(SubnetId=a)["NatGateway"]["NatGatewayId"]  # a way out (network preflight)
    main = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["RouteTables"][0]["RouteTableId"]
    ec2.create_route(RouteTableId=main, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nat)
    settings = AwsSettings(subnets=[a, b], security_groups=[sg], max_vcpus=64)
    env = ensure_environment(clients, settings, Needs(efs=True))
    assert env.subnets == [a, b] and env.security_groups == [sg]
    cr = clients.batch.describe_compute_environments(computeEnvironments=env.compute_environments)[
        "computeEnvironments"][0]["computeResources"]
    assert cr["subnets"] == [a, b] and cr["securityGroupIds"] == [sg] and cr["maxvCpus"] == 64
    targets = clients.efs.describe_mount_targets(FileSystemId=env.efs_id)["MountTargets"]
    assert sorted(t["SubnetId"] for t in targets) == sorted([a, b])


def test_unknown_subnet_or_group_is_refused_with_a_hint(clients: AwsClients) -> None:
    with pytest.raises(ProvisionError) as exc:
        ensure_environment(clients, AwsSettings(subnets=["subnet-0123456789abcdef0"]), Needs())
    assert "subnet-0123456789abcdef0" in exc.value.message and "aws.subnets" in exc.value.hint
    with pytest.raises(ProvisionError) as exc:
        ensure_environment(clients, AwsSettings(security_groups=["sg-0123456789abcdef0"]), Needs())
    assert "sg-0123456789abcdef0" in exc.value.message


def test_max_vcpus_change_updates_in_place(clients: AwsClients) -> None:
    env = ensure_environment(clients, AwsSettings(max_vcpus=32), Needs())
    log = CallLog(clients)
    report = ProvisionReport()
    env2 = ensure_environment(clients, AwsSettings(max_vcpus=128), Needs(), report)
    assert env2.compute_environments == env.compute_environments
    assert [c for c in log.mutating()] == ["batch.UpdateComputeEnvironment"]
    assert report.updated and not report.created
    # (moto accepts the update but keeps the old maxvCpus, so check what was sent)
    (params,) = [p for s, n, p in log.calls if n == "UpdateComputeEnvironment"]
    assert params["computeResources"] == {"maxvCpus": 128}


def test_queue_order_is_spot_then_on_demand(clients: AwsClients) -> None:
    env = ensure_environment(clients, AwsSettings(spot=True), Needs())
    q = clients.batch.describe_job_queues(jobQueues=[env.job_queue])["jobQueues"][0]
    order = sorted(q["computeEnvironmentOrder"], key=lambda o: o["order"])
    assert [o["computeEnvironment"] for o in order] == env.compute_environments
    spot = clients.batch.describe_compute_environments(computeEnvironments=[env.compute_environments[0]])[
        "computeEnvironments"][0]["computeResources"]
    assert spot["type"] == "SPOT" and spot["allocationStrategy"] == "SPOT_PRICE_CAPACITY_OPTIMIZED"


def test_configurations_never_share_a_queue(clients: AwsClients) -> None:
    """Two setups with different needs (as two concurrent runs may have) keep their own queues:
    the second does not re-point the first's queue at environments that cannot hold its jobs."""
    plain = ensure_environment(clients, AwsSettings(), Needs())
    assert plain.job_queue.endswith(":job-queue/corral")
    big = ensure_environment(clients, AwsSettings(), Needs(max_disk_gib=500))
    spot = ensure_environment(clients, AwsSettings(spot=True), Needs())
    assert len({plain.job_queue, big.job_queue, spot.job_queue}) == 3
    for env in (plain, big, spot):
        q = clients.batch.describe_job_queues(jobQueues=[env.job_queue])["jobQueues"][0]
        assert [o["computeEnvironment"] for o in sorted(q["computeEnvironmentOrder"], key=lambda o: o["order"])] \
            == env.compute_environments
    # and a queue named in the settings that corral made is re-pointed when its configuration changes
    first = ensure_environment(clients, AwsSettings(queue="lab"), Needs())
    second = ensure_environment(clients, AwsSettings(queue="lab", spot=True), Needs())
    assert first.job_queue == second.job_queue
    q = clients.batch.describe_job_queues(jobQueues=["lab"])["jobQueues"][0]
    assert [o["computeEnvironment"] for o in sorted(q["computeEnvironmentOrder"], key=lambda o: o["order"])] \
        == second.compute_environments


def test_job_state_time_limits_are_sent(clients: AwsClients) -> None:
    log = CallLog(clients)
    ensure_environment(clients, AwsSettings(), Needs())
    (params,) = [p for s, n, p in log.calls if n == "CreateJobQueue"]
    reasons = {a["reason"] for a in params["jobStateTimeLimitActions"]}
    assert reasons == {"MISCONFIGURATION:COMPUTE_ENVIRONMENT_MAX_RESOURCE", "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT"}
    assert all(a["action"] == "CANCEL" and a["state"] == "RUNNABLE" for a in params["jobStateTimeLimitActions"])


def test_an_existing_queue_of_the_users_is_used_as_it_is(clients: AwsClients) -> None:
    env = ensure_environment(clients, AwsSettings(), Needs())
    clients.batch.create_job_queue(
        jobQueueName="lab-queue", state="ENABLED", priority=5,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": env.compute_environments[0]}])
    log = CallLog(clients)
    env2 = ensure_environment(clients, AwsSettings(queue="lab-queue"), Needs())
    assert env2.job_queue.endswith("job-queue/lab-queue") and log.mutating() == []


def test_state_table_schema_and_billing(clients: AwsClients) -> None:
    ensure_environment(clients, AwsSettings(), Needs())
    t = clients.dynamodb.describe_table(TableName="corral-state")["Table"]
    assert [(k["AttributeName"], k["KeyType"]) for k in t["KeySchema"]] == [("pk", "HASH"), ("sk", "RANGE")]
    assert t["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"


def test_a_foreign_table_with_another_schema_is_refused(clients: AwsClients) -> None:
    clients.dynamodb.create_table(TableName="corral-state", BillingMode="PAY_PER_REQUEST",
                                  AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                                  KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}])
    with pytest.raises(ProvisionError, match="pk HASH, sk RANGE"):
        ensure_environment(clients, AwsSettings(), Needs())


def test_bucket_is_encrypted_and_private(clients: AwsClients) -> None:
    env = ensure_environment(clients, AwsSettings(), Needs(bucket=True))
    s3 = clients.s3
    assert env.bucket == "corral-123456789012-us-east-2"
    pab = s3.get_public_access_block(Bucket=env.bucket)["PublicAccessBlockConfiguration"]
    assert all(pab.values())
    rules = s3.get_bucket_encryption(Bucket=env.bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"


def test_a_users_own_bucket_is_not_reconfigured(clients: AwsClients) -> None:
    clients.s3.create_bucket(Bucket="lab-data", CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
    log = CallLog(clients)
    env = ensure_environment(clients, AwsSettings(bucket="lab-data"), Needs())
    assert env.bucket == "lab-data"
    assert not [c for c in log.mutating() if c.startswith("s3.")]


def test_efs_is_encrypted_with_a_mount_target_per_zone(clients: AwsClients) -> None:
    env = ensure_environment(clients, AwsSettings(), Needs(efs=True))
    fs = clients.efs.describe_file_systems(FileSystemId=env.efs_id)["FileSystems"][0]
    assert fs["Encrypted"] is True and fs["CreationToken"] == "corral-workspace"
    targets = clients.efs.describe_mount_targets(FileSystemId=env.efs_id)["MountTargets"]
    assert sorted(t["SubnetId"] for t in targets) == sorted(env.subnets)
    assert env.efs_access_point is None  # no run: the file system's root


def test_needs_for_reads_the_workflow() -> None:
    wf = loads_workflow("""
name: sort
aws: {bucket: lab-bucket, prefix: runs}
items: [{s: a}, {s: b}]
stages:
  - name: fetch
    from: s3://raw-data/sessions/{s}/
    to: "{workdir}/{s}/"
  - name: sort
    image: ecr://my-sorter:1.2
    command: sort {workdir}/{s}
    needs: [fetch]
    resources: {gpus: 1, disk: 200GiB, memory: 30GiB, vcpus: 8}
    secrets: {TOKEN: lab/api-token}
  - name: publish
    from: "{workdir}/{s}/out"
    to: s3://results/sorted/{s}/
    needs: [sort]
""")
    needs = needs_for(make_plan(wf))
    assert needs.gpu and needs.max_disk_gib == 200 and needs.max_gpus_per_task == 1
    assert needs.max_vcpus_per_task == 8 and needs.max_memory_mib == 30 * 1024
    assert needs.bucket and needs.efs  # lab-bucket given; {workdir} is on EFS
    assert needs.secrets == ["lab/api-token"]
    assert needs.s3_read == ["raw-data/sessions/"] and needs.s3_write == ["results/sorted/"]
    assert needs.ecr_repositories == ["my-sorter", "corral/rclone"]  # corral's rclone image: EFS cleanup jobs


def test_needs_for_a_workflow_without_workspace_or_bucket() -> None:
    wf = loads_workflow("""
name: small
items: [{s: a}]
stages:
  - name: one
    image: python:3.12-slim
    command: echo {s}
""")
    needs = needs_for(make_plan(wf))
    assert not (needs.efs or needs.bucket or needs.gpu or needs.secrets or needs.ecr_repositories)
    assert needs.max_disk_gib is None and needs.max_vcpus_per_task == 1 and needs.max_memory_mib == 2048
