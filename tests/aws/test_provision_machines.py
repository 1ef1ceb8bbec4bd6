"""Big machines (issue 8): GPU compute environments, root volumes by launch template, refusals."""

from __future__ import annotations

import json

import pytest
from provision_helpers import CallLog

from corral.backends.aws_batch import AwsClients, Needs, ProvisionReport, ensure_environment
from corral.backends.aws_batch.compute import root_volume_gib
from corral.backends.aws_batch.iam import check_policy_is_narrow
from corral.errors import PlanError, ProvisionError, SpecError
from corral.plan import make_plan
from corral.routes import check_fits
from corral.spec import AwsSettings, loads_workflow

pytestmark = pytest.mark.aws


@pytest.fixture
def clients(aws: str) -> AwsClients:
    return AwsClients()


def _ce(clients: AwsClients, arn: str) -> dict:
    return clients.batch.describe_compute_environments(computeEnvironments=[arn])["computeEnvironments"][0]


def test_gpu_environment_uses_gpu_families_and_the_nvidia_ami(clients: AwsClients) -> None:
    env = ensure_environment(clients, AwsSettings(spot=True), Needs(gpu=True, max_gpus_per_task=1))
    assert env.gpu_job_queue and len(env.gpu_compute_environments) == 2
    spot, od = (_ce(clients, a)["computeResources"] for a in env.gpu_compute_environments)
    for cr in (spot, od):
        assert cr["instanceTypes"] == ["g4dn", "g5", "g6"]
        assert cr["ec2Configuration"] == [{"imageType": "ECS_AL2023_NVIDIA"}]
        assert cr["minvCpus"] == 0
    assert spot["type"] == "SPOT" and od["type"] == "EC2"
    q = clients.batch.describe_job_queues(jobQueues=[env.gpu_job_queue])["jobQueues"][0]
    assert [o["computeEnvironment"] for o in sorted(q["computeEnvironmentOrder"], key=lambda o: o["order"])] == \
        env.gpu_compute_environments
    # the CPU queue has no GPU environment in it
    cpu = _ce(clients, env.compute_environments[0])["computeResources"]
    assert cpu["ec2Configuration"] == [{"imageType": "ECS_AL2023"}] and cpu["instanceTypes"] == ["optimal"]


def test_gpu_families_from_the_settings(clients: AwsClients) -> None:
    env = ensure_environment(clients, AwsSettings(instance_types=["m5", "g5"]), Needs(gpu=True))
    assert env.instance_types == ["m5"] and env.gpu_instance_types == ["g5"]
    assert _ce(clients, env.gpu_compute_environments[0])["computeResources"]["instanceTypes"] == ["g5"]
    assert _ce(clients, env.compute_environments[0])["computeResources"]["instanceTypes"] == ["m5"]


def test_disk_gets_a_launch_template_reused_by_content(clients: AwsClients) -> None:
    env = ensure_environment(clients, AwsSettings(), Needs(max_disk_gib=200))
    assert env.launch_template == "corral-batch:1" and env.root_volume_gib == 250
    cr = _ce(clients, env.compute_environments[0])["computeResources"]
    assert cr["launchTemplate"] == {"launchTemplateName": "corral-batch", "version": "1"}
    v = clients.ec2.describe_launch_template_versions(LaunchTemplateName="corral-batch")["LaunchTemplateVersions"][0]
    ebs = v["LaunchTemplateData"]["BlockDeviceMappings"][0]["Ebs"]
    assert ebs["VolumeSize"] == 250 and ebs["VolumeType"] == "gp3"

    # the same needs (and a disk that rounds to the same volume) reuse version 1 and the same environment
    log = CallLog(clients)
    env_again = ensure_environment(clients, AwsSettings(), Needs(max_disk_gib=190))
    assert log.mutating() == []
    assert env_again.launch_template == "corral-batch:1"
    assert env_again.compute_environments == env.compute_environments

    # a bigger disk: a new version of the same template, and an environment pointing at it
    report = ProvisionReport()
    env_big = ensure_environment(clients, AwsSettings(), Needs(max_disk_gib=1000), report)
    assert env_big.launch_template == "corral-batch:2" and env_big.root_volume_gib == 1050
    assert env_big.compute_environments != env.compute_environments
    assert any(c.startswith("launch-template corral-batch:2") for c in report.created)
    # and back to 200 GiB: version 1 again, nothing made
    log.clear()
    assert ensure_environment(clients, AwsSettings(), Needs(max_disk_gib=200)).launch_template == "corral-batch:1"
    assert log.creates() == []


def test_gpu_and_disk_together_reused_on_a_second_run(clients: AwsClients) -> None:
    needs = dict(gpu=True, max_gpus_per_task=4, max_disk_gib=500)
    env = ensure_environment(clients, AwsSettings(), Needs(**needs))
    cr = _ce(clients, env.gpu_compute_environments[0])["computeResources"]
    assert cr["launchTemplate"]["launchTemplateName"] == "corral-batch"
    assert cr["ec2Configuration"] == [{"imageType": "ECS_AL2023_NVIDIA"}]
    log = CallLog(clients)
    env2 = ensure_environment(clients, AwsSettings(), Needs(**needs))
    assert log.mutating() == [] and env2 == env


def test_default_disk_needs_no_template(clients: AwsClients) -> None:
    assert root_volume_gib(None) is None
    env = ensure_environment(clients, AwsSettings(), Needs())
    assert env.launch_template is None
    assert "launchTemplate" not in _ce(clients, env.compute_environments[0])["computeResources"]
    assert clients.ec2.describe_launch_templates()["LaunchTemplates"] == []


def test_impossible_requests_are_refused_before_any_call(clients: AwsClients) -> None:
    log = CallLog(clients)
    with pytest.raises(ProvisionError, match="GPUs"):
        ensure_environment(clients, AwsSettings(), Needs(gpu=True, max_gpus_per_task=12))
    with pytest.raises(ProvisionError, match="vCPUs"):
        ensure_environment(clients, AwsSettings(instance_types=["c5"]), Needs(max_vcpus_per_task=200))
    with pytest.raises(ProvisionError, match="memory"):
        ensure_environment(clients, AwsSettings(instance_types=["c5.large"]), Needs(max_memory_mib=8192))
    with pytest.raises(ProvisionError, match="max_vcpus"):
        ensure_environment(clients, AwsSettings(max_vcpus=4), Needs(max_vcpus_per_task=8))
    with pytest.raises(ProvisionError, match="root volume"):
        ensure_environment(clients, AwsSettings(), Needs(max_disk_gib=16 * 1024))
    assert log.calls == []


WORKFLOW = """
name: sorting
items: [{s: a}]
stages:
  - name: fetch
    command: echo fetch {s}
  - name: sort
    command: sort {s}
    needs: [fetch]
    resources:
      gpus: {gpus}
      vcpus: {vcpus}
      memory: {memory}
      disk: {disk}
"""


def _plan(gpus: int = 0, vcpus: int = 2, memory: str = "4GiB", disk: str = "100GiB"):
    text = WORKFLOW.replace("{gpus}", str(gpus)).replace("{vcpus}", str(vcpus)).replace(
        "{memory}", memory).replace("{disk}", disk)
    return make_plan(loads_workflow(text, source="sorting.yaml"))


def test_check_fits_names_the_stage_its_line_and_the_largest_instance() -> None:
    check_fits(_plan(gpus=1), ["optimal"])
    with pytest.raises(PlanError) as exc:
        check_fits(_plan(gpus=9), ["optimal"])
    err = exc.value
    assert "'sort'" in err.message and "9 GPUs" in err.message and "g5.48xlarge" in err.message
    assert err.where and err.where.startswith("sorting.yaml:11:")
    with pytest.raises(PlanError, match=r"the largest: g4dn.2xlarge \(8 vCPUs"):
        check_fits(_plan(gpus=2), ["g4dn.xlarge", "g4dn.2xlarge"])
    with pytest.raises(PlanError, match="vCPUs"):
        check_fits(_plan(vcpus=300), ["optimal"])
    with pytest.raises(PlanError) as exc:
        check_fits(_plan(memory="2TiB"), ["optimal"])
    assert "r6i.32xlarge" in exc.value.message
    # p4d/p5 allowed explicitly: 8 GPUs fit
    check_fits(_plan(gpus=8), ["optimal", "p4d"])


def test_a_disk_no_volume_can_hold_is_refused_when_the_file_is_read() -> None:
    with pytest.raises(SpecError, match="disk"):
        _plan(disk="20TiB")


def test_iam_policies_are_narrow(clients: AwsClients) -> None:
    needs = Needs(gpu=True, efs=True, bucket=True, secrets=["lab/db", "arn:aws:secretsmanager:us-east-2:"
                  "123456789012:secret:other-AbCdEf"], ecr_repositories=["my-sorter", "lab/tools"],
                  s3_read=["raw-data/sessions/"], s3_write=["results/sorted/"], run_id="r1")
    env = ensure_environment(clients, AwsSettings(bucket="lab-bucket", prefix="runs"), needs)
    iam = clients.iam
    roles = [r for r in iam.list_roles(PathPrefix="/corral/")["Roles"]]
    assert len(roles) == 3
    for role in roles:
        name = role["RoleName"]
        for p in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
            assert "FullAccess" not in p["PolicyName"]
            assert p["PolicyArn"] == "arn:aws:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role"
        for pname in iam.list_role_policies(RoleName=name)["PolicyNames"]:
            doc = iam.get_role_policy(RoleName=name, PolicyName=pname)["PolicyDocument"]
            doc = json.loads(doc) if isinstance(doc, str) else doc
            check_policy_is_narrow(doc)
            for stmt in doc["Statement"]:
                actions = [stmt["Action"]] if isinstance(stmt["Action"], str) else stmt["Action"]
                assert all(a != "*" and not a.endswith(":*") for a in actions)
                if stmt["Resource"] == "*" or "*" in stmt["Resource"]:
                    assert actions == ["ecr:GetAuthorizationToken"]

    def policy(arn: str) -> dict:
        name = arn.rsplit("/", 1)[1]
        doc = iam.get_role_policy(RoleName=name, PolicyName="corral")["PolicyDocument"]
        return json.loads(doc) if isinstance(doc, str) else doc

    job = {s["Sid"]: s for s in policy(env.job_role_arn)["Statement"]}
    # No state table, no logs, no secrets for the job's own code (tests/aws/test_least_privilege.py).
    assert "State" not in job and "Logs" not in job and "Secrets" not in job
    assert job["WriteObjects"]["Resource"] == ["arn:aws:s3:::results/sorted/*"]
    assert job["ReadObjects"]["Resource"] == ["arn:aws:s3:::lab-bucket/runs/staged/r1/*",
                                              "arn:aws:s3:::raw-data/sessions/*"]
    exe_doc = policy(env.execution_role_arn)
    assert [s["Resource"] for s in exe_doc["Statement"] if s["Sid"] == "Secrets"] == [[
        "arn:aws:secretsmanager:us-east-2:123456789012:secret:lab/db-??????",
        "arn:aws:secretsmanager:us-east-2:123456789012:secret:other-AbCdEf",
    ]]
    assert job["Workspace"]["Resource"].endswith(f":file-system/{env.efs_id}")
    lists = [s for sid, s in job.items() if sid.startswith("List")]
    assert {s["Resource"] for s in lists} == {"arn:aws:s3:::lab-bucket", "arn:aws:s3:::raw-data",
                                              "arn:aws:s3:::results"}
    exe = {s["Sid"]: s for s in policy(env.execution_role_arn)["Statement"]}
    assert exe["PullImages"]["Resource"] == ["arn:aws:ecr:us-east-2:123456789012:repository/my-sorter",
                                             "arn:aws:ecr:us-east-2:123456789012:repository/lab/tools"]
    assert "State" not in exe and "WriteObjects" not in exe
    trust = iam.get_role(RoleName=env.job_role_arn.rsplit("/", 1)[1])["Role"]["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
    assert trust["Statement"][0]["Condition"]["StringEquals"] == {"aws:SourceAccount": "123456789012"}


def test_other_needs_get_their_own_roles(clients: AwsClients) -> None:
    a = ensure_environment(clients, AwsSettings(), Needs(secrets=["a"]))
    b = ensure_environment(clients, AwsSettings(), Needs(secrets=["b"]))
    # The secrets are the execution role's (ECS reads them); the job role, per run, holds none.
    assert a.execution_role_arn != b.execution_role_arn and a.job_role_arn == b.job_role_arn
    c = ensure_environment(clients, AwsSettings(), Needs(secrets=["a"], run_id="r-other"))
    assert c.job_role_arn != a.job_role_arn  # another run: a role of its own
    assert a.compute_environments == b.compute_environments  # compute is shared


def test_fargate_environments_and_queue_when_asked(clients: AwsClients) -> None:
    env = ensure_environment(clients, AwsSettings(spot=True, instance_types=["fargate"]), Needs(fargate=True))
    assert env.fargate_job_queue and "job-queue/corral-fargate-" in env.fargate_job_queue
    spot, od = (_ce(clients, a)["computeResources"] for a in env.fargate_compute_environments)
    assert spot["type"] == "FARGATE_SPOT" and od["type"] == "FARGATE"
    assert "instanceTypes" not in od and "instanceRole" not in od and od["subnets"] == env.subnets
    # Fargate only: no EC2 side; the Fargate queue is the default queue too
    assert env.compute_environments == [] and env.job_queue == env.fargate_job_queue
    log = CallLog(clients)
    assert ensure_environment(clients, AwsSettings(spot=True, instance_types=["fargate"]),
                              Needs(fargate=True)) == env
    assert log.mutating() == []
    # with EC2 types beside the keyword, the EC2 side is there too (for what does not fit Fargate)
    both = ensure_environment(clients, AwsSettings(spot=True, instance_types=["optimal", "fargate"]), Needs(fargate=True))
    assert _ce(clients, both.compute_environments[0])["computeResources"]["instanceTypes"] == ["optimal"]
    assert both.job_queue != both.fargate_job_queue


def test_needs_for_asks_fargate_only_when_allowed_and_fitting() -> None:
    from corral.backends.aws_batch.provision import needs_for

    def needs(types: str, resources: str) -> Needs:
        return needs_for(make_plan(loads_workflow(f"""
name: f
aws: {{instance_types: {types}}}
items: [{{s: a}}]
stages:
  - name: one
    command: echo {{s}}
    resources: {resources}
""")))

    assert needs("[fargate]", "{vcpus: 2, memory: 4GiB}").fargate
    assert not needs("[optimal]", "{vcpus: 2, memory: 4GiB}").fargate
    assert not needs("[fargate]", "{gpus: 1}").fargate
    assert not needs("[fargate]", "{vcpus: 32}").fargate
