"""Provisioning for the AWS Batch backend: what a workflow needs, made idempotently.

``needs_for(plan)`` says what a workflow needs (GPUs, scratch disk, EFS, a bucket, secrets…);
``ensure_environment(clients, settings, needs)`` finds or makes all of it and returns an
:class:`Environment` naming every resource the submission code uses; ``teardown`` removes what
carries corral's tag. Every create is preceded by a describe, so a second call with the same
needs makes no create, put, tag, attach or update call at all.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.common import MANAGED_TAG, RUN_TAG
from corral.backends.aws_batch.environment import (
    DEFAULT_LOG_GROUP,
    DEFAULT_QUEUE,
    DEFAULT_TABLE,
    FARGATE_QUEUE,
    GPU_QUEUE,
    queue_names,
)
from corral.backends.aws_batch.provisioned import Environment, Needs, ProvisionReport
from corral.routes import disk_needs, route

if TYPE_CHECKING:  # pragma: no cover
    from corral.plan import Plan
    from corral.spec import AwsSettings

__all__ = [
    "DEFAULT_LOG_GROUP", "DEFAULT_QUEUE", "DEFAULT_TABLE", "FARGATE_QUEUE", "GPU_QUEUE", "MANAGED_TAG", "RUN_TAG",
    "Environment", "Needs", "ProvisionReport", "ensure_environment", "needs_for", "queue_names", "teardown",
]


_S3_URI = re.compile(r"^s3://([^/{}]+)/?([^{}]*)")


def _s3_scope(uri: str, run_id: str | None = None) -> str | None:
    """``s3://bucket/a/b/{x}/c`` → ``bucket/a/b/`` (the fixed part: what a policy may grant).
    With ``run_id``, ``{run}`` is part of the fixed part: ``s3://b/out/{run}/{x}`` → ``b/out/<run>/``."""
    from corral.plan import parse_template

    fixed, whole = "", True
    for kind, value in parse_template(uri):
        if kind == "text":
            fixed += value
        elif value == "run" and run_id:
            fixed += run_id
        else:
            whole = False
            break
    m = _S3_URI.match(fixed)
    if not m or (not whole and "/" not in fixed[len("s3://"):]):
        return None  # not s3://, or the bucket name itself is a placeholder
    return f"{m.group(1)}/{m.group(2)}"


def ecr_repository_of(image: str | None) -> str | None:
    """The ECR repository name an image refers to (``ecr://name:tag`` or an ECR registry URI)."""
    if not image:
        return None
    if image.startswith("ecr://"):
        rest = image[len("ecr://"):]
    else:
        m = re.match(r"^\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(?:\.cn)?/(.+)$", image)
        if not m:
            return None
        rest = m.group(1)
    rest = rest.split("@", 1)[0]
    if ":" in rest.rsplit("/", 1)[-1]:
        rest = rest.rsplit(":", 1)[0]
    return rest or None


def needs_for(plan: Plan, run_id: str | None = None) -> Needs:
    """What the plan's stages ask of AWS: GPUs, the largest disk, EFS, a bucket, secrets… With
    ``run_id``, the S3 scopes have ``{run}`` filled in (the run's job role reaches only its own)."""
    from corral.plan import template_fields

    wf = plan.workflow
    settings = wf.aws
    stages = wf.stages
    needs = Needs(run_id=run_id)
    needs.gpu = any(s.resources.gpus > 0 for s in stages)
    disks = [s.resources.disk for s in stages if s.resources.disk]
    needs.max_disk_gib = max(disks) if disks else None
    needs.efs = bool(settings.efs)  # or {workdir} used (below)
    needs.max_vcpus_per_task = max((s.resources.vcpus for s in stages), default=1)
    needs.max_memory_mib = max((s.resources.memory for s in stages), default=2048)
    needs.max_gpus_per_task = max((s.resources.gpus for s in stages), default=0)
    secrets: list[str] = []
    for s in stages:
        for ref in s.secrets.values():
            name = ref[len("aws:"):] if ref.startswith("aws:") else ref
            if not name.startswith("env:") and name not in secrets:
                secrets.append(name)
    needs.secrets = secrets
    uses_workdir = False
    read: list[str] = []
    write: list[str] = []
    repos: list[str] = []
    for s in stages:
        texts = [s.command] if isinstance(s.command, str) else list(s.command or [])
        texts += list(s.env.values()) + s.inputs + s.outputs + [s.source or "", s.dest or ""]
        if any("workdir" in template_fields(t) for t in texts if t):
            uses_workdir = True
        for uri in [*s.inputs, s.source or ""]:
            scope = _s3_scope(uri, run_id)
            if scope and scope not in read:
                read.append(scope)
        for uri in [*s.outputs, s.dest or ""]:
            scope = _s3_scope(uri, run_id)
            if scope and scope not in write:
                write.append(scope)
        repo = ecr_repository_of(s.image)
        if repo and repo not in repos:
            repos.append(repo)
    needs.s3_read, needs.s3_write, needs.ecr_repositories = read, write, repos
    # Fargate only when asked for (`fargate` in aws.instance_types) and some stage fits it; the
    # stages that run there get their disk from Fargate's ephemeral storage, not a root volume.
    allowed = list(settings.instance_types)
    needs.fargate = any(route(s.resources, allowed).fargate for s in stages)
    ec2_disks = [s.resources.disk for s in stages if s.resources.disk and not route(s.resources, allowed).fargate]
    needs.max_disk_gib = max(ec2_disks) if ec2_disks else None
    needs.disk_needs = disk_needs(((s.name, s.resources, len(plan.stage_tasks(s.name))) for s in stages), allowed)
    # {workdir} is the run's shared workspace: on AWS it lives on EFS, so using it needs EFS.
    needs.efs = needs.efs or uses_workdir
    needs.bucket = bool(settings.bucket)
    return needs


def ensure_environment(
    clients: AwsClients, settings: AwsSettings, needs: Needs, report: ProvisionReport | None = None
) -> Environment:
    """Find or make everything ``needs`` asks for; idempotent (a second call creates nothing)."""
    from corral.backends.aws_batch.environment import build_environment

    return build_environment(clients, settings, needs, report if report is not None else ProvisionReport())


def teardown(
    clients: AwsClients, *, run_id: str | None = None, everything: bool = False, purge: bool = False,
    keep_access_point: str | None = None, force: bool = False,
) -> ProvisionReport:
    """Remove what corral made: a run's things (``run_id``) or everything tagged (``everything``).

    Only resources tagged ``corral:managed=true`` are touched (and, for a run, ``corral:run=<id>``).
    A bucket or ECR repository that still holds data, the state table and the EFS file system are
    kept (and reported) unless ``purge``; ``everything`` refuses while jobs are in flight unless ``force``.
    """
    from corral.backends.aws_batch.teardown import remove

    return remove(clients, run_id=run_id, everything=everything, purge=purge, keep_access_point=keep_access_point,
                  force=force)
