"""``ensure_environment``'s body: the order in which things are found or made.

1. refuse what no allowed instance can hold (before any API call),
2. account and network (default VPC or the settings' subnets/security groups), and the network
   preflight (a way out for every subnet, egress allowed): refused before anything is made,
3. log group, state table, bucket (when needed), EFS (when needed),
4. IAM: instance role/profile, job role and execution role for exactly these needs,
5. launch template (when a stage needs more disk than the default root volume),
6. compute environments (spot first when enabled; GPU ones when needed; Fargate ones when asked
   for and some stage fits Fargate), then the queues.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corral import routes
from corral.backends.aws_batch import compute, iam, network, storage
from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.common import MANAGED_TAG, NAME, Ctx, content_hash
from corral.backends.aws_batch.provisioned import Environment
from corral.errors import ProvisionError
from corral.instances import expand, is_fargate_entry, split_allowed

if TYPE_CHECKING:  # pragma: no cover
    from corral.backends.aws_batch.provisioned import Needs, ProvisionReport
    from corral.spec import AwsSettings

DEFAULT_TABLE = f"{NAME}-state"
DEFAULT_LOG_GROUP = f"/aws/batch/{NAME}"
DEFAULT_QUEUE = NAME
GPU_QUEUE = f"{NAME}-gpu"
FARGATE_QUEUE = f"{NAME}-fargate"


def base_tags(settings: AwsSettings) -> dict[str, str]:
    tags = {str(k): str(v) for k, v in (settings.tags or {}).items()}
    tags[MANAGED_TAG] = "true"
    return tags


def check_needs_fit(settings: AwsSettings, needs: Needs) -> None:
    """Refuse needs that no allowed instance type (or the vCPU cap) can ever satisfy. Needs made
    by hand (``setup --vcpus``, the drop-in ``submit_job``) name only the largest vCPUs, memory and
    GPUs of any task, maybe of different tasks, so each is judged alone — with the routes' one fit
    rule (:func:`corral.routes.holds`); a plan's stages are judged whole by ``routes.check_fits``."""
    cpu_entries, gpu_entries = split_allowed(list(settings.instance_types))
    cpu_types = expand(cpu_entries)
    if cpu_types and not needs.gpu:
        if not routes.holds(cpu_entries, needs.max_vcpus_per_task, 0)[0]:
            top = max(cpu_types, key=lambda t: t.vcpus)
            raise ProvisionError(
                f"a task asks for {needs.max_vcpus_per_task:g} vCPUs; the largest allowed instance "
                f"({', '.join(cpu_entries)}) is {top.describe()}",
                "lower resources.vcpus or allow larger instance types in aws.instance_types",
            )
        if not routes.holds(cpu_entries, 0, needs.max_memory_mib)[0]:
            top = max(cpu_types, key=lambda t: t.memory_mib)
            raise ProvisionError(
                f"a task asks for {needs.max_memory_mib} MiB of memory; the largest allowed instance "
                f"({', '.join(cpu_entries)}) is {top.describe()}",
                "lower resources.memory or allow larger instance types in aws.instance_types",
            )
    if needs.gpu:
        gpu_types = expand(gpu_entries)
        want = max(1, needs.max_gpus_per_task)
        if gpu_types and not routes.holds(gpu_entries, 0, 0, want)[0]:
            top = max(gpu_types, key=lambda t: t.gpus)
            raise ProvisionError(
                f"a task asks for {want} GPUs; the allowed GPU instances ({', '.join(gpu_entries)}) have at "
                f"most {top.gpus} ({top.describe()})",
                "ask for fewer GPUs, or allow larger GPU families in aws.instance_types (e.g. p4d, p5)",
            )
    if needs.max_vcpus_per_task > settings.max_vcpus:
        raise ProvisionError(
            f"a task asks for {needs.max_vcpus_per_task:g} vCPUs but aws.max_vcpus is {settings.max_vcpus}",
            "raise aws.max_vcpus (or --max-vcpus), or lower the stage's resources.vcpus",
        )
    too_much = routes.too_much_scratch(needs.disk_needs)
    if too_much:
        raise ProvisionError(too_much, "allow only smaller instance types in aws.instance_types (e.g. m6i.4xlarge "
                             "instead of m6i), ask more vcpus/memory per task so fewer share an instance, or lower "
                             "resources.disk and stream data from S3/EFS")
    compute.root_volume_gib(needs.scratch_per_instance)  # raises for a disk no root volume can hold


def queue_names(settings: AwsSettings, needs: Needs) -> dict[str, str]:
    """The queue names a configuration uses: ``cpu``, ``gpu`` and ``fargate``.

    A queue sends its jobs to its compute environments, so two configurations must not share
    one: a run needing 200 GiB of disk would otherwise land on small-disk instances when another
    setup re-pointed the queue. The plain configuration (on-demand, ``optimal``, default disk)
    keeps the plain names ``corral`` / ``corral-gpu`` / ``corral-fargate``; any other gets the
    name plus a hash of what sets it apart. ``aws.queue`` names the CPU queue explicitly.
    """
    from corral.instances import DEFAULT_GPU_FAMILIES

    root = compute.root_volume_gib(needs.scratch_per_instance)
    cpu_entries, gpu_entries = split_allowed(list(settings.instance_types))

    def name(base: str, config: dict[str, Any], plain: dict[str, Any]) -> str:
        return base if config == plain else f"{base}-{content_hash(config, 8)}"

    return {
        "cpu": settings.queue or name(DEFAULT_QUEUE, {"spot": settings.spot, "types": cpu_entries, "root": root},
                                      {"spot": False, "types": ["optimal"], "root": None}),
        "gpu": name(GPU_QUEUE, {"spot": settings.spot, "types": gpu_entries, "root": root},
                    {"spot": False, "types": list(DEFAULT_GPU_FAMILIES), "root": None}),
        "fargate": name(FARGATE_QUEUE, {"spot": settings.spot}, {"spot": False}),
    }


def build_environment(clients: AwsClients, settings: AwsSettings, needs: Needs,
                      report: ProvisionReport) -> Environment:
    check_needs_fit(settings, needs)
    ctx = Ctx(clients=clients, report=report, tags=base_tags(settings))
    account = ctx.account
    net = network.discover(ctx, list(settings.subnets), list(settings.security_groups))
    # `instance_types: [fargate]` alone: every job runs on Fargate, so no EC2 environment is made and
    # the Fargate queue is the run's default queue too.
    fargate_only = (needs.fargate and not needs.gpu and not settings.queue
                    and all(is_fargate_entry(e) for e in settings.instance_types))
    # before anything is made: a network jobs cannot work in is refused (network.check_network)
    network.preflight(ctx, net, efs=needs.efs,
                      public_ip_from_job=fargate_only and getattr(settings, "assign_public_ip", True))

    log_group = getattr(settings, "log_group", None) or DEFAULT_LOG_GROUP
    table = getattr(settings, "table", None) or DEFAULT_TABLE
    storage.ensure_log_group(ctx, log_group, getattr(settings, "log_retention_days", None))
    storage.ensure_table(ctx, table)
    bucket = storage.ensure_bucket(ctx, settings.bucket) if (needs.bucket or settings.bucket) else None
    efs_id = access_point = None
    if needs.efs:
        efs_id, access_point = storage.ensure_efs(ctx, net, name=needs.efs_name or storage.EFS_WORKSPACE,
                                                  run_id=needs.run_id)

    policy_inputs = iam.JobPolicyInputs(
        table=table, log_group=log_group, bucket=bucket, prefix=settings.prefix,
        s3_read=tuple(needs.s3_read), s3_write=tuple(needs.s3_write), secrets=tuple(needs.secrets),
        ecr_repositories=tuple(needs.ecr_repositories), efs_id=efs_id,
        run_secrets=tuple(needs.run_secrets), run_id=needs.run_id, efs_access_point=access_point,
    )
    profile_arn = iam.ensure_instance_profile(ctx)
    job_role, exec_role = iam.ensure_job_roles(ctx, policy_inputs)

    size = compute.root_volume_gib(needs.scratch_per_instance)
    template = compute.ensure_launch_template(ctx, size) if size else None

    cpu_entries, gpu_entries = split_allowed(list(settings.instance_types))
    names = queue_names(settings, needs)
    queue_name = names["cpu"]
    queue_arn = compute.existing_foreign_queue(ctx, queue_name) if settings.queue else None
    cpu_ces: list[str] = []
    if queue_arn is None and not fargate_only:
        cpu_ces = _environments(ctx, "", cpu_entries, net, profile_arn, settings, template, None)
        queue_arn = compute.ensure_queue(ctx, queue_name, cpu_ces)
    gpu_queue_arn = None
    gpu_ces: list[str] = []
    if needs.gpu:
        gpu_ces = _environments(ctx, "gpu-", gpu_entries, net, profile_arn, settings, template,
                                compute.GPU_IMAGE_TYPE)
        gpu_queue_arn = compute.ensure_queue(ctx, names["gpu"], gpu_ces)
    fargate_queue_arn = None
    fargate_ces: list[str] = []
    if needs.fargate:
        fargate_ces = _environments(ctx, "fargate", [], net, profile_arn, settings, None, None)
        fargate_queue_arn = compute.ensure_queue(ctx, names["fargate"], fargate_ces)
    if fargate_only:
        queue_arn = fargate_queue_arn
    if queue_arn is None:  # cannot happen: fargate_only implies needs.fargate, else a CPU queue was found or made
        raise ProvisionError("no default job queue was found or made for this run",
                             "report this as a corral bug")

    return Environment(
        region=clients.region, account_id=account, job_queue=queue_arn, gpu_job_queue=gpu_queue_arn,
        job_role_arn=job_role, execution_role_arn=exec_role, log_group=log_group, table_name=table,
        bucket=bucket, efs_id=efs_id, efs_access_point=access_point, subnets=list(net.subnets),
        security_groups=list(net.security_groups), instance_types=cpu_entries, tags=dict(ctx.tags),
        gpu_instance_types=gpu_entries if needs.gpu else [], compute_environments=cpu_ces,
        gpu_compute_environments=gpu_ces,
        launch_template=f"{template['launchTemplateName']}:{template['version']}" if template else None,
        root_volume_gib=size, prefix=settings.prefix,
        fargate_job_queue=fargate_queue_arn, fargate_compute_environments=fargate_ces,
    )


def _environments(ctx: Ctx, kind_prefix: str, entries: list[str], net: network.Network, profile_arn: str,
                  settings: AwsSettings, template: dict[str, str] | None, image_type: str | None) -> list[str]:
    """Spot (when enabled) then on-demand environments over ``entries``; ARNs in queue order."""
    if kind_prefix == "fargate":
        kinds = ["fargate-spot", "fargate"] if settings.spot else ["fargate"]
    else:
        kinds = [f"{kind_prefix}{k}" for k in (["spot", "ec2"] if settings.spot else ["ec2"])]
    arns = []
    for kind in kinds:
        spec = compute.ComputeSpec(
            kind=kind, instance_types=entries, network=net, instance_profile=profile_arn,
            max_vcpus=settings.max_vcpus, launch_template=template, image_type=image_type, tags=ctx.tags,
        )
        arns.append(compute.ensure_compute_environment(ctx, spec))
    return arns
