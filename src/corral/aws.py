"""Drop-in for NeuroConv's ``submit_aws_batch_job``: one container job on AWS Batch, tracked in DynamoDB.

    from corral.aws import submit_job
    info = submit_job(job_name="convert-s1", docker_image="ghcr.io/catalystneuro/neuroconv:latest",
                      commands=["neuroconv", "spec.yml"], minimum_worker_ram_in_gib=8)
    info["job_submission_info"]["jobId"]; info["table_submission_info"]["id"]

The arguments mean what they mean there; the differences are in how it is done:

- the environment (network, roles, compute environment, queue, table, EFS) comes from corral's
  idempotent provisioning: the region's default VPC or the ``settings``' subnets (no hard-coded
  ids), narrow IAM roles (no broad AWS-managed access policy), and bounded polling instead of fixed sleeps;
- it is provisioned once per process and configuration: a second call submits with two API calls
  (SubmitJob, PutItem), plus RegisterJobDefinition for a new image/size;
- the job definition is named by a hash of its content, registered only when no ACTIVE one has
  that name (tagged ``corral:managed``), with the EFS volume mounted at ``/mnt/efs`` with transit
  encryption, and logs in corral's log group;
- environment variables are passed as Batch expects (``name``/``value`` pairs);
- the tracking row goes to corral's state table (keys ``pk``/``sk``) unless
  ``status_tracker_table_name`` names another (made, if missing, with corral's key schema).
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timezone
from typing import Any

from corral.backends.aws_batch.client import AwsClients, aws_errors
from corral.backends.aws_batch.common import NAME, Ctx, content_hash
from corral.backends.aws_batch.ecr import resolve_image
from corral.backends.aws_batch.provision import Environment, Needs, ProvisionReport, ensure_environment
from corral.errors import UsageError

EFS_MOUNT_PATH = "/mnt/efs"
DEFAULT_ATTEMPT_SECONDS = 24 * 3600
DROPIN_PK = "dropin#"

_lock = threading.Lock()
_environments: dict[tuple[Any, ...], Environment] = {}
_definitions: dict[tuple[str, str], str] = {}


def _settings(region: str | None, settings: Any) -> Any:
    from corral.spec import AwsSettings

    if settings is None:
        settings = AwsSettings(region=region)
    elif region and settings.region != region:
        settings = settings.model_copy(update={"region": region})
    return settings


def _environment(clients: AwsClients, settings: Any, needs: Needs) -> Environment:
    key = (clients.region, clients.profile, clients.endpoint_url, settings.model_dump_json(),
           needs.gpu, needs.efs, needs.efs_name, needs.max_vcpus_per_task, needs.max_memory_mib,
           tuple(needs.ecr_repositories), needs.scratch_per_instance)
    with _lock:
        env = _environments.get(key)
    if env is None:
        env = ensure_environment(clients, settings, needs, ProvisionReport())
        with _lock:
            _environments[key] = env
    return env


def forget_cached_environments() -> None:
    """Drop what this process remembers about provisioned environments (after a teardown)."""
    with _lock:
        _environments.clear()
        _definitions.clear()


def job_definition_body(*, image: str, vcpus: float, memory_mib: int, env: Environment, efs: bool,
                        attempt_seconds: int = DEFAULT_ATTEMPT_SECONDS) -> dict[str, Any]:
    container: dict[str, Any] = {
        "image": image,
        "resourceRequirements": [
            {"type": "VCPU", "value": f"{vcpus:g}"},
            {"type": "MEMORY", "value": str(int(memory_mib))},
        ],
        "jobRoleArn": env.job_role_arn,
        "executionRoleArn": env.execution_role_arn,
        "logConfiguration": {
            "logDriver": "awslogs",
            "options": {"awslogs-group": env.log_group, "awslogs-region": env.region,
                        "awslogs-stream-prefix": NAME},
        },
    }
    if efs and env.efs_id:
        volume: dict[str, Any] = {"fileSystemId": env.efs_id, "transitEncryption": "ENABLED"}
        if env.efs_access_point:
            volume["authorizationConfig"] = {"accessPointId": env.efs_access_point, "iam": "ENABLED"}
        container["volumes"] = [{"name": "efs", "efsVolumeConfiguration": volume}]
        container["mountPoints"] = [{"sourceVolume": "efs", "containerPath": EFS_MOUNT_PATH, "readOnly": False}]
    return {
        "type": "container",
        "containerProperties": container,
        "timeout": {"attemptDurationSeconds": attempt_seconds},
        "platformCapabilities": ["EC2"],
    }


def _ensure_definition(clients: AwsClients, body: dict[str, Any], tags: dict[str, str],
                       name: str | None = None) -> str:
    name = name or f"{NAME}-dropin-{content_hash(body, 16)}"
    key = (clients.region, name)
    with _lock:
        if key in _definitions:
            return _definitions[key]
    batch = clients.batch
    with aws_errors(f"register job definition {name}"):
        found = batch.describe_job_definitions(jobDefinitionName=name, status="ACTIVE")["jobDefinitions"]
        found = [d for d in found if d.get("status") == "ACTIVE"]
        if found:
            arn = max(found, key=lambda d: d["revision"])["jobDefinitionArn"]
        else:
            arn = batch.register_job_definition(jobDefinitionName=name, tags=tags, propagateTags=True,
                                                **body)["jobDefinitionArn"]
    with _lock:
        _definitions[key] = arn
    return arn


def _ensure_tracker_table(clients: AwsClients, name: str, tags: dict[str, str]) -> None:
    from corral.backends.aws_batch.storage import ensure_table

    ensure_table(Ctx(clients=clients, report=ProvisionReport(), tags=tags), name)


def submit_job(
    *,
    job_name: str,
    docker_image: str,
    commands: list[str] | None = None,
    environment_variables: dict[str, str] | None = None,
    efs_volume_name: str | None = None,
    job_dependencies: list[dict[str, str]] | None = None,
    status_tracker_table_name: str | None = None,
    job_definition_name: str | None = None,
    minimum_worker_ram_in_gib: float = 4,
    minimum_worker_cpus: float = 4,
    submission_id: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    settings: Any = None,
    clients: AwsClients | None = None,
) -> dict[str, Any]:
    """Submit one job to AWS Batch and record it in DynamoDB.

    Returns ``{"job_submission_info": <SubmitJob response>, "table_submission_info": <row>}``
    (and ``"efs_volume"``: ``{"FileSystemId": ...}`` when ``efs_volume_name`` is given).
    ``job_dependencies`` are ``[{"jobId": ..., "type": "N_TO_N" | "SEQUENTIAL"}]`` (type optional).
    """
    if not job_name or len(job_name) > 128:
        raise UsageError("job_name must be 1-128 characters", "letters, digits, - and _")
    if minimum_worker_cpus <= 0 or minimum_worker_ram_in_gib <= 0:
        raise UsageError("minimum_worker_cpus and minimum_worker_ram_in_gib must be positive",
                         "e.g. minimum_worker_cpus=4, minimum_worker_ram_in_gib=8")
    settings = _settings(region, settings)
    clients = clients or AwsClients(region=settings.region, profile=profile or settings.profile)
    image = resolve_image(docker_image, clients)
    from corral.backends.aws_batch.provision import ecr_repository_of

    repo = ecr_repository_of(docker_image)
    memory_mib = int(round(minimum_worker_ram_in_gib * 1024))
    needs = Needs(
        efs=efs_volume_name is not None, efs_name=efs_volume_name, max_vcpus_per_task=minimum_worker_cpus,
        max_memory_mib=memory_mib, ecr_repositories=[repo] if repo else [],
    )
    env = _environment(clients, settings, needs)
    body = job_definition_body(image=image, vcpus=minimum_worker_cpus, memory_mib=memory_mib, env=env,
                               efs=needs.efs)
    definition = _ensure_definition(clients, body, env.tags, job_definition_name)

    overrides: dict[str, Any] = {}
    if environment_variables:
        overrides["environment"] = [{"name": str(k), "value": str(v)} for k, v in environment_variables.items()]
    if commands is not None:
        overrides["command"] = [str(c) for c in commands]
    depends = [{"jobId": d["jobId"], **({"type": d["type"]} if d.get("type") else {})}
               for d in (job_dependencies or [])]
    with aws_errors(f"submit job {job_name}"):
        job = clients.batch.submit_job(
            jobName=job_name, jobQueue=env.job_queue, jobDefinition=definition, dependsOn=depends,
            containerOverrides=overrides, tags=dict(env.tags), propagateTags=True,
        )
    job.pop("ResponseMetadata", None)

    table = status_tracker_table_name or env.table_name
    if status_tracker_table_name and status_tracker_table_name != env.table_name:
        _ensure_tracker_table(clients, table, env.tags)
    submission_id = submission_id or str(uuid.uuid4())
    row = {
        "pk": f"{DROPIN_PK}{submission_id}",
        "sk": "job",
        "id": submission_id,
        "job_id": job["jobId"],
        "job_name": job_name,
        "submitted_on": datetime.now(timezone.utc).isoformat(),
        "status": "Job submitted...",
    }
    with aws_errors(f"record job {job_name} in DynamoDB table {table}"):
        clients.dynamodb.put_item(TableName=table, Item={k: {"S": str(v)} for k, v in row.items()})
    info: dict[str, Any] = {"job_submission_info": job, "table_submission_info": row}
    if efs_volume_name is not None:
        info["efs_volume"] = {"FileSystemId": env.efs_id, "Name": efs_volume_name}
    return info


submit_aws_batch_job = submit_job  # the seed's name

__all__ = ["forget_cached_environments", "job_definition_body", "submit_aws_batch_job", "submit_job"]
