"""What provisioning is asked for and what it gives back, as plain records (no AWS calls):
:class:`Needs` (what a workflow asks of the environment), :class:`Environment` (every resource the
submission code uses), :class:`ProvisionReport` (what was created, found, updated, deleted, kept).

They sit below every provisioning module (``ecr``, ``environment``, ``teardown``, ``provision``), so
none of those imports another only for a record; :mod:`~corral.backends.aws_batch.provision`
re-exports them under their old names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.routes import DiskNeed, scratch_per_instance_gib


@dataclass
class Needs:
    """What a workflow asks of the AWS environment (see :func:`needs_for`)."""

    gpu: bool = False
    max_disk_gib: int | None = None
    efs: bool = False
    bucket: bool = False
    secrets: list[str] = field(default_factory=list)
    max_vcpus_per_task: float = 1
    max_memory_mib: int = 2048
    # beyond the minimum: used for the job role's policy and for fit checks
    max_gpus_per_task: int = 0
    s3_read: list[str] = field(default_factory=list)  # "bucket/prefix" the jobs read
    s3_write: list[str] = field(default_factory=list)  # "bucket/prefix" the jobs write
    ecr_repositories: list[str] = field(default_factory=list)  # repositories the jobs pull from
    run_id: str | None = None  # when set, run-scoped things (EFS access point) carry corral:run
    efs_name: str | None = None  # the EFS CreationToken/Name; None: corral's shared workspace
    fargate: bool = False  # also Fargate environments + queue, for stages that fit Fargate
    run_secrets: list[str] = field(default_factory=list)  # the run's own secrets: execution role only
    # the EC2 stages' scratch (corral.routes): the root volume holds every task that can share an
    # instance. Empty (Needs made by hand, `setup --disk`): one task of max_disk_gib per instance.
    disk_needs: list[DiskNeed] = field(default_factory=list)

    @property
    def scratch_per_instance(self) -> int | None:
        """GiB of scratch one instance must hold (what sizes the root volume)."""
        if self.disk_needs:
            return max(scratch_per_instance_gib(self.disk_needs) or 0, self.max_disk_gib or 0) or None
        return self.max_disk_gib


@dataclass
class Environment:
    region: str
    account_id: str
    job_queue: str  # ARN
    gpu_job_queue: str | None
    job_role_arn: str
    execution_role_arn: str
    log_group: str
    table_name: str
    bucket: str | None
    efs_id: str | None
    # A run's access point is rooted at /runs/<run_id> on the file system: a job that mounts it
    # sees its run's own directory as the mount's root (and no other run's files).
    efs_access_point: str | None
    subnets: list[str]
    security_groups: list[str]
    instance_types: list[str]
    tags: dict[str, str]
    gpu_instance_types: list[str] = field(default_factory=list)
    compute_environments: list[str] = field(default_factory=list)  # ARNs, queue order
    gpu_compute_environments: list[str] = field(default_factory=list)
    launch_template: str | None = None  # "name:version" sizing the root volume, when one is used
    fargate_job_queue: str | None = None  # ARN, when needs.fargate (jobs need platformCapabilities FARGATE)
    fargate_compute_environments: list[str] = field(default_factory=list)
    root_volume_gib: int | None = None
    prefix: str = "corral"


@dataclass
class ProvisionReport:
    created: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # e.g. a non-empty bucket teardown left alone
    updated: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "created": list(self.created), "found": list(self.found), "updated": list(self.updated),
            "deleted": list(self.deleted), "kept": list(self.kept),
        }
