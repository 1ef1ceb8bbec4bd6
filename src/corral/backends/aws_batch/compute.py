"""Compute environments, their launch template, and the job queues in front of them.

- One managed EC2 on-demand environment (BEST_FIT_PROGRESSIVE, minvCpus 0: nothing runs, nothing
  is paid, while the queue is empty); with ``spot`` also a SPOT one (SPOT_PRICE_CAPACITY_OPTIMIZED)
  that the queue tries first. Every EC2 environment names its AMI type: ``ECS_AL2023`` for CPU,
  ``ECS_AL2023_NVIDIA`` (the ECS GPU-optimized AMI) for GPU stages, which get the same pair over
  GPU families behind a queue of their own. Never Amazon Linux 2 (see ``CPU_IMAGE_TYPE``).
- Scratch disk: ``resources.disk`` is per task, the root volume per instance. When the scratch
  one instance may need (``corral.routes.scratch_per_instance_gib``: every task that can share
  the largest allowed instance) exceeds the default root volume (30 GiB), the environments get a
  launch template whose root volume (gp3) holds it plus room for images. There is one template, ``corral-batch``; each distinct content is one of its
  versions, found again by a hash kept in the version's description, and environments point at
  an exact version number (so a later version never changes a running environment).
- Environment names end in a hash of everything that cannot be changed in place (type, strategy,
  instance types, subnets, security groups, instance profile, launch template version, AMI type),
  so a changed configuration gets a new environment and an unchanged one is found again.
  ``maxvCpus`` is not in the hash: a different value updates the environment in place.
- Queues: ``corral`` (or ``aws.queue``) and ``corral-gpu`` for the plain configuration, the same
  names plus a hash for any other (see ``environment.queue_names``: two configurations never
  share a queue), ordered spot → on-demand, with ``jobStateTimeLimitActions`` that cancel a job
  stuck RUNNABLE because no environment can ever hold it (instead of it waiting for ever).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from corral import routes
from corral.backends.aws_batch.client import aws_errors, error_code, is_not_found
from corral.backends.aws_batch.common import NAME, Ctx, content_hash, is_managed, tag_list
from corral.backends.aws_batch.network import Network
from corral.errors import ProvisionError
from corral.instances import MAX_ROOT_VOLUME_GIB

LAUNCH_TEMPLATE = f"{NAME}-batch"
ROOT_DEVICE = "/dev/xvda"  # root device of the ECS-optimized Amazon Linux AMIs (CPU and NVIDIA)
IMAGE_ROOM_GIB = routes.IMAGE_ROOM_GIB
DISK_STEP_GIB = routes.DISK_STEP_GIB
STUCK_RUNNABLE_SECONDS = 4 * 3600
# Batch-provided Amazon Linux 2 AMIs (ECS_AL2, ECS_AL2_NVIDIA) are retired: from 2026-06-30 Batch
# refuses new compute environments on them. AWS Batch User Guide, "How to migrate from ECS AL2 to
# ECS AL2023" (https://docs.aws.amazon.com/batch/latest/userguide/ecs-migration-2023.html) and the
# Ec2Configuration API reference (imageType: ECS_AL2023, ECS_AL2023_NVIDIA).
CPU_IMAGE_TYPE = "ECS_AL2023"
GPU_IMAGE_TYPE = "ECS_AL2023_NVIDIA"
# SPOT_PRICE_CAPACITY_OPTIMIZED: the strategy the ComputeResource API reference marks recommended
# for spot (lowest interruption chance at a low price); SPOT_CAPACITY_OPTIMIZED ignores the price.
# https://docs.aws.amazon.com/batch/latest/APIReference/API_ComputeResource.html
SPOT_STRATEGY = "SPOT_PRICE_CAPACITY_OPTIMIZED"
ON_DEMAND_STRATEGY = "BEST_FIT_PROGRESSIVE"


@dataclass
class ComputeSpec:
    """One compute environment, as corral wants it."""

    kind: str  # "ec2" | "spot" | "gpu-ec2" | "gpu-spot" | "fargate" | "fargate-spot"
    instance_types: list[str]
    network: Network
    instance_profile: str
    max_vcpus: int
    launch_template: dict[str, str] | None = None  # {"launchTemplateName", "version"}
    image_type: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def spot(self) -> bool:
        return self.kind.endswith("spot")

    @property
    def fargate(self) -> bool:
        return self.kind.startswith("fargate")

    def resources(self) -> dict[str, Any]:
        if self.fargate:
            # Fargate: no instances, AMIs, launch templates or instance tags to choose.
            return {
                "type": "FARGATE_SPOT" if self.spot else "FARGATE",
                "maxvCpus": self.max_vcpus,
                "subnets": list(self.network.subnets),
                "securityGroupIds": list(self.network.security_groups),
            }
        r: dict[str, Any] = {
            "type": "SPOT" if self.spot else "EC2",
            "allocationStrategy": SPOT_STRATEGY if self.spot else ON_DEMAND_STRATEGY,
            "minvCpus": 0,
            "maxvCpus": self.max_vcpus,
            "instanceTypes": list(self.instance_types),
            "subnets": list(self.network.subnets),
            "securityGroupIds": list(self.network.security_groups),
            "instanceRole": self.instance_profile,
            # tags for the EC2 instances Batch launches, so they can be told apart in the console
            "tags": {**self.tags, "Name": f"{NAME}-{self.kind}"},
        }
        if self.launch_template:
            r["launchTemplate"] = dict(self.launch_template)
        r["ec2Configuration"] = [{"imageType": self.image_type or CPU_IMAGE_TYPE}]
        return r

    @property
    def name(self) -> str:
        fixed = {k: v for k, v in self.resources().items() if k != "maxvCpus"}
        return f"{NAME}-{self.kind}-{content_hash(fixed, 8)}"


def root_volume_gib(scratch_gib: int | None) -> int | None:
    """The root volume for ``scratch_gib`` of scratch per instance (``Needs.scratch_per_instance``),
    or None when the default one is enough (``corral.routes.root_volume_gib``)."""
    try:
        return routes.root_volume_gib(scratch_gib)
    except ValueError:
        raise ProvisionError(
            f"{scratch_gib} GiB of scratch per instance is more than a root volume holds "
            f"({MAX_ROOT_VOLUME_GIB} GiB, with {IMAGE_ROOM_GIB} GiB kept for images)",
            "lower resources.disk, or stream the data from S3/EFS",
        ) from None


def ensure_launch_template(ctx: Ctx, size_gib: int) -> dict[str, str]:
    """The ``corral-batch`` launch template version whose root volume is ``size_gib`` (gp3)."""
    ec2 = ctx.clients.ec2
    data = {
        "BlockDeviceMappings": [{
            "DeviceName": ROOT_DEVICE,
            "Ebs": {"VolumeSize": size_gib, "VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True},
        }],
    }
    marker = f"corral:{content_hash(data, 12)} root {size_gib}GiB"
    with aws_errors(f"set up launch template {LAUNCH_TEMPLATE}"):
        try:
            ec2.describe_launch_templates(LaunchTemplateNames=[LAUNCH_TEMPLATE])
            exists = True
        except Exception as exc:
            if not (is_not_found(exc) or "NotFound" in error_code(exc)):
                raise
            exists = False
        if not exists:
            lt = ec2.create_launch_template(
                LaunchTemplateName=LAUNCH_TEMPLATE, VersionDescription=marker, LaunchTemplateData=data,
                TagSpecifications=[{"ResourceType": "launch-template", "Tags": tag_list(ctx.tags)}],
            )["LaunchTemplate"]
            ctx.created("launch-template", f"{LAUNCH_TEMPLATE}:1 ({size_gib} GiB gp3 root)")
            return {"launchTemplateName": LAUNCH_TEMPLATE, "version": str(lt["LatestVersionNumber"])}
        for page in ec2.get_paginator("describe_launch_template_versions").paginate(
            LaunchTemplateName=LAUNCH_TEMPLATE
        ):
            for v in page["LaunchTemplateVersions"]:
                if v.get("VersionDescription") == marker:
                    ctx.found("launch-template", f"{LAUNCH_TEMPLATE}:{v['VersionNumber']} ({size_gib} GiB gp3 root)")
                    return {"launchTemplateName": LAUNCH_TEMPLATE, "version": str(v["VersionNumber"])}
        v = ec2.create_launch_template_version(
            LaunchTemplateName=LAUNCH_TEMPLATE, VersionDescription=marker, LaunchTemplateData=data
        )["LaunchTemplateVersion"]
        ctx.created("launch-template", f"{LAUNCH_TEMPLATE}:{v['VersionNumber']} ({size_gib} GiB gp3 root)")
        return {"launchTemplateName": LAUNCH_TEMPLATE, "version": str(v["VersionNumber"])}


def _describe_ce(ctx: Ctx, name: str) -> dict[str, Any] | None:
    ces = ctx.clients.batch.describe_compute_environments(computeEnvironments=[name])["computeEnvironments"]
    return ces[0] if ces else None


def _retryable_iam(exc: Exception) -> bool:
    """A fresh instance profile or role that Batch cannot see yet (IAM is eventually consistent)."""
    text = str(exc).lower()
    return error_code(exc) in ("ClientException", "InvalidParameterValueException") and any(
        w in text for w in ("instance profile", "instanceprofile", "instancerole")
    )


class InvalidEnvironment(ProvisionError):
    """A compute environment Batch marked INVALID (``reason`` is Batch's statusReason)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(
            f"compute environment {name} is INVALID: {reason or 'no reason given'}",
            "fix the cause (often subnets without internet access, or IAM), then "
            "`corral aws teardown --all` and set up again",
        )
        self.reason = reason


# Batch validates the instance profile asynchronously; a profile made seconds before can be
# reported missing ("Invalid IamInstanceProfile") although it exists: IAM is eventually consistent.
_IAM_NOT_VISIBLE = ("iaminstanceprofile", "instance profile", "instanceprofile", "instancerole")
MAX_RECREATIONS = 3


def _iam_not_visible(reason: str) -> bool:
    text = reason.lower()
    return any(w in text for w in _IAM_NOT_VISIBLE)


def ensure_compute_environment(ctx: Ctx, spec: ComputeSpec, *, timeout: float = 900) -> str:
    """Find or create one compute environment; wait until VALID; return its ARN.

    An environment Batch marks INVALID because it could not yet see a new instance profile is
    deleted and made again (a bounded number of times); any other INVALID reason is an error.
    """
    batch = ctx.clients.batch
    name = spec.name
    with aws_errors(f"set up compute environment {name}"):
        ce = _describe_ce(ctx, name)
        if ce is not None and ce.get("status") == "DELETING":
            _wait_deleted(ctx, name, timeout)
            ce = None
        if ce is not None and ce.get("status") == "DELETED":
            ce = None
        changes: dict[str, Any] = {}
        if ce is None:
            _create_ce(ctx, spec, timeout=timeout)
            ctx.created("compute-environment", name)
        else:
            ctx.found("compute-environment", name)
            cr = ce.get("computeResources", {})
            if int(cr.get("maxvCpus", spec.max_vcpus)) != spec.max_vcpus:
                changes["computeResources"] = {"maxvCpus": spec.max_vcpus}
            if ce.get("state") != "ENABLED":
                changes["state"] = "ENABLED"
            if changes and ce.get("status") != "INVALID":
                batch.update_compute_environment(computeEnvironment=name, **changes)
                ctx.updated("compute-environment", f"{name} ({', '.join(sorted(changes))})")
        for recreation in range(MAX_RECREATIONS + 1):
            try:
                if ce is not None and ce.get("status") == "VALID" and not changes:
                    break  # found ready: no need to ask again
                ce = ctx.poller.poll(lambda: _ready_ce(ctx, name), what=f"compute environment {name} to become VALID",
                                     timeout=timeout)
                break
            except InvalidEnvironment as exc:
                if recreation == MAX_RECREATIONS or not _iam_not_visible(exc.reason):
                    raise
                _delete_ce(ctx, name, timeout)
                _create_ce(ctx, spec, timeout=timeout)
                ctx.updated("compute-environment", f"{name} (made again: {exc.reason})")
    return ce["computeEnvironmentArn"]


def _wait_deleted(ctx: Ctx, name: str, timeout: float) -> None:
    def gone() -> bool:
        cur = _describe_ce(ctx, name)
        return cur is None or cur.get("status") == "DELETED"

    ctx.poller.poll(gone, what=f"compute environment {name} to finish deleting", timeout=timeout)


def _delete_ce(ctx: Ctx, name: str, timeout: float) -> None:
    batch = ctx.clients.batch
    cur = _describe_ce(ctx, name)
    if cur is not None and cur.get("state") != "DISABLED":
        batch.update_compute_environment(computeEnvironment=name, state="DISABLED")
        ctx.poller.poll(lambda: (_describe_ce(ctx, name) or {}).get("status") != "UPDATING",
                        what=f"compute environment {name} to be disabled", timeout=timeout)
    batch.delete_compute_environment(computeEnvironment=name)
    _wait_deleted(ctx, name, timeout)


def _create_ce(ctx: Ctx, spec: ComputeSpec, *, timeout: float) -> None:
    from corral.backends.aws_batch.iam import service_linked_role_arn

    batch = ctx.clients.batch
    kwargs: dict[str, Any] = {
        "computeEnvironmentName": spec.name, "type": "MANAGED", "state": "ENABLED",
        "computeResources": spec.resources(), "tags": dict(ctx.tags),
    }
    if "service_role" in ctx.memo:  # this endpoint insisted on one before (see below)
        kwargs["serviceRole"] = ctx.memo["service_role"]

    def attempt() -> bool:
        try:
            batch.create_compute_environment(**kwargs)
            return True
        except Exception as exc:
            text = str(exc)
            if "ServiceRole is required" in text and "serviceRole" not in kwargs:
                # AWS uses the Batch service-linked role when serviceRole is omitted; an endpoint
                # that insists on one (moto) gets that same service-linked role's ARN.
                if "service_role" not in ctx.memo:
                    ctx.memo["service_role"] = service_linked_role_arn(ctx)
                kwargs["serviceRole"] = ctx.memo["service_role"]
                return attempt()
            if _retryable_iam(exc):
                return False
            raise

    ctx.poller.poll(attempt, what=f"AWS Batch to accept compute environment {spec.name}",
                    timeout=min(timeout, 120),
                    hint="a new instance profile can take a minute to be visible to Batch: run setup again")


def _ready_ce(ctx: Ctx, name: str) -> dict[str, Any] | None:
    ce = _describe_ce(ctx, name)
    if ce is None:
        return None
    if ce.get("status") == "INVALID":
        raise InvalidEnvironment(name, ce.get("statusReason", ""))
    return ce if ce.get("status") == "VALID" else None


def _time_limit_actions() -> list[dict[str, Any]]:
    return [
        {"reason": reason, "state": "RUNNABLE", "maxTimeSeconds": STUCK_RUNNABLE_SECONDS, "action": "CANCEL"}
        for reason in ("MISCONFIGURATION:COMPUTE_ENVIRONMENT_MAX_RESOURCE",
                       "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT")
    ]


def _describe_queue(ctx: Ctx, name: str) -> dict[str, Any] | None:
    qs = ctx.clients.batch.describe_job_queues(jobQueues=[name])["jobQueues"]
    return qs[0] if qs else None


def existing_foreign_queue(ctx: Ctx, name: str) -> str | None:
    """The ARN of a queue of this name that corral does not manage (the user's own), if any."""
    with aws_errors(f"look up job queue {name}"):
        q = _describe_queue(ctx, name)
    if q is not None and q.get("status") != "DELETED" and not is_managed(q.get("tags")):
        ctx.found("job-queue", f"{name} (yours: used as it is)")
        return q["jobQueueArn"]
    return None


def ensure_queue(ctx: Ctx, name: str, compute_environments: list[str], *, timeout: float = 600) -> str:
    """Find or create a queue over these environments (in this order); return its ARN."""
    batch = ctx.clients.batch
    order = [{"order": i + 1, "computeEnvironment": arn} for i, arn in enumerate(compute_environments)]
    with aws_errors(f"set up job queue {name}"):
        q = _describe_queue(ctx, name)
        if q is not None and q.get("status") == "DELETING":
            ctx.poller.poll(lambda: (_describe_queue(ctx, name) or {}).get("status") in (None, "DELETED"),
                            what=f"job queue {name} to finish deleting", timeout=timeout)
            q = None
        if q is not None and q.get("status") == "DELETED":
            q = None
        if q is None:
            batch.create_job_queue(
                jobQueueName=name, state="ENABLED", priority=1, computeEnvironmentOrder=order,
                jobStateTimeLimitActions=_time_limit_actions(), tags=dict(ctx.tags),
            )
            ctx.created("job-queue", name)
        else:
            ctx.found("job-queue", name)
            have = [(o["order"], o["computeEnvironment"]) for o in q.get("computeEnvironmentOrder", [])]
            want = [(o["order"], o["computeEnvironment"]) for o in order]
            if sorted(have) != sorted(want) or q.get("state") != "ENABLED":
                batch.update_job_queue(jobQueue=name, state="ENABLED", computeEnvironmentOrder=order,
                                       jobStateTimeLimitActions=_time_limit_actions())
                ctx.updated("job-queue", name)
            elif q.get("status") == "VALID":
                return q["jobQueueArn"]  # found ready and as wanted

        def ready() -> dict[str, Any] | None:
            cur = _describe_queue(ctx, name)
            if cur and cur.get("status") == "INVALID":
                raise ProvisionError(f"job queue {name} is INVALID: {cur.get('statusReason', '')}",
                                     "`corral aws teardown --all`, then set up again")
            return cur if cur and cur.get("status") == "VALID" else None

        q = ctx.poller.poll(ready, what=f"job queue {name} to become VALID", timeout=timeout)
    return q["jobQueueArn"]
