"""Removing what corral made, and nothing else.

A resource is removed only when it carries ``corral:managed=true`` (for a run, also
``corral:run=<id>``). Order matters on AWS: a queue is disabled and deleted before its compute
environments, a compute environment is gone before its instance profile, mount targets before
their file system. Each wait is bounded polling. Data is not destroyed by default: a bucket
with objects, an ECR repository with images, the state table and the EFS file system (with its
mount targets and security group) are kept (and reported) unless ``purge``; ``--all`` refuses
while corral's queues have jobs in flight unless forced. The Batch
service-linked role belongs to the account and is never removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from corral.backends.aws_batch.client import AwsClients, aws_errors, error_code, is_not_found
from corral.backends.aws_batch.common import IAM_PATH, NAME, RUN_TAG, Ctx, is_managed, tag_dict
from corral.errors import UsageError

TIMEOUT = 1200.0


IN_FLIGHT = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING")


def remove(clients: AwsClients, *, run_id: str | None = None, everything: bool = False,
           purge: bool = False, keep_access_point: str | None = None, force: bool = False) -> Any:
    """``keep_access_point`` (why): keep the run's EFS access point, e.g. when its data could not
    be removed (:mod:`corral.backends.aws_batch.run_data`), so removing it can be tried again.

    ``everything`` refuses while any job is in flight in corral's queues (unless ``force``), and
    keeps the state table and the EFS file system (runs' data) unless ``purge``.

    ``run_id`` deregisters the run's job definitions: those tagged with the run, and those whose
    job or execution role is one of the run's own roles (each run has its own job role, so the
    content-named definitions that name it are the run's alone). ``everything`` deregisters all."""
    from corral.backends.aws_batch.provisioned import ProvisionReport

    if not everything and not run_id:
        raise UsageError("nothing to tear down: say which", "use --all, or --run RUN_ID")
    report = ProvisionReport()
    ctx = Ctx(clients=clients, report=report, tags={})
    with aws_errors("tear down corral's AWS resources"):
        if everything and not force:
            busy = jobs_in_flight(ctx)
            if busy:
                what = ", ".join(f"{n} {status} in {queue}" for queue, status, n in busy[:4])
                raise UsageError(
                    f"corral's queues still have jobs in flight ({what}); tearing down now would kill them",
                    "`corral cancel RUN --backend aws` for each run (or wait for them), or add --force",
                )
        if run_id:
            _job_definitions(ctx, run_id, _run_role_arns(ctx, run_id))
            _consumable_resources(ctx, run_id)
            if keep_access_point:
                _kept(ctx, "efs-access-point", f"of run {run_id}", keep_access_point)
            else:
                _efs_access_points(ctx, run_id)
            _secrets(ctx, run_id)
            _parameters(ctx, run_id)
            _staged(ctx, run_id)
            _run_roles(ctx, run_id)
        if everything:
            _queues(ctx)
            _compute_environments(ctx)
            _job_definitions(ctx, None)
            _consumable_resources(ctx, None)
            _launch_templates(ctx)
            if purge:
                _file_systems(ctx)
                _security_groups(ctx)
            else:
                for fs in _managed_file_systems(ctx):
                    _kept(ctx, "efs", f"{fs.get('Name') or fs.get('CreationToken')} ({fs['FileSystemId']})",
                          "holds runs' data; --purge deletes it")
            _secrets(ctx, None)
            _parameters(ctx, None)
            _tables(ctx, purge)
            _log_groups(ctx)
            _buckets(ctx, purge)
            _repositories(ctx, purge)
            _iam(ctx)
    return report


def _deleted(ctx: Ctx, kind: str, name: str) -> None:
    ctx.report.deleted.append(f"{kind} {name}")


def _kept(ctx: Ctx, kind: str, name: str, why: str) -> None:
    ctx.report.kept.append(f"{kind} {name} ({why})")


def _gone(fn: Callable[[], Any]) -> bool:
    try:
        fn()
    except Exception as exc:
        if is_not_found(exc):
            return True
        raise
    return False


# -- Batch ----------------------------------------------------------------------------------------
def _managed_queues(ctx: Ctx) -> list[dict[str, Any]]:
    out = []
    for page in ctx.clients.batch.get_paginator("describe_job_queues").paginate():
        out += [q for q in page["jobQueues"] if q.get("status") != "DELETED" and is_managed(q.get("tags"))]
    return out


def _disable_then_delete(
    ctx: Ctx, items: list[dict[str, Any]], *, param: str, kind: str, label: str,
    describe: Callable[..., Any], update: Callable[..., Any], delete: Callable[..., Any],
) -> None:
    """Batch queues and compute environments go the same way: disable all, wait until each has
    settled, delete it, then wait until each is DELETED. ``param`` is the API's name for one
    (``jobQueue``, ``computeEnvironment``); ``<param>s``, ``<param>Arn``, ``<param>Name`` follow."""

    def current(arn: str) -> list[dict[str, Any]]:
        return describe(**{f"{param}s": [arn]})[f"{param}s"]

    for it in items:
        if it.get("state") != "DISABLED":
            update(**{param: it[f"{param}Arn"]}, state="DISABLED")
    for it in items:
        arn = it[f"{param}Arn"]

        def settled(arn: str = arn) -> bool:
            cur = current(arn)
            return not cur or cur[0].get("status") not in ("UPDATING", "CREATING")

        ctx.poller.poll(settled, what=f"{label} {it[f'{param}Name']} to be disabled", timeout=TIMEOUT)
        delete(**{param: arn})
    for it in items:
        arn = it[f"{param}Arn"]

        def deleted(arn: str = arn) -> bool:
            return all(x.get("status") == "DELETED" for x in current(arn))

        ctx.poller.poll(deleted, what=f"{label} {it[f'{param}Name']} to be deleted", timeout=TIMEOUT)
        _deleted(ctx, kind, it[f"{param}Name"])


def _queues(ctx: Ctx) -> None:
    batch = ctx.clients.batch
    _disable_then_delete(
        ctx, _managed_queues(ctx), param="jobQueue", kind="job-queue", label="job queue",
        describe=batch.describe_job_queues, update=batch.update_job_queue, delete=batch.delete_job_queue,
    )


def _compute_environments(ctx: Ctx) -> None:
    batch = ctx.clients.batch
    ces = []
    for page in batch.get_paginator("describe_compute_environments").paginate():
        ces += [c for c in page["computeEnvironments"]
                if c.get("status") != "DELETED" and is_managed(c.get("tags"))]
    _disable_then_delete(
        ctx, ces, param="computeEnvironment", kind="compute-environment", label="compute environment",
        describe=batch.describe_compute_environments, update=batch.update_compute_environment,
        delete=batch.delete_compute_environment,
    )


def _job_definitions(ctx: Ctx, run_id: str | None, run_roles: frozenset[str] = frozenset()) -> None:
    """Managed ACTIVE definitions: all (``run_id`` None), or the run's (tagged with it, or naming one
    of ``run_roles`` as job or execution role)."""
    batch = ctx.clients.batch
    for page in batch.get_paginator("describe_job_definitions").paginate(status="ACTIVE"):
        for jd in page["jobDefinitions"]:
            if jd.get("status") != "ACTIVE" or not is_managed(jd.get("tags")):
                continue
            props = jd.get("containerProperties") or {}
            roles = {props.get("jobRoleArn"), props.get("executionRoleArn")}
            if is_managed(jd.get("tags"), run_id) or (run_id is not None and roles & run_roles):
                batch.deregister_job_definition(jobDefinition=jd["jobDefinitionArn"])
                _deleted(ctx, "job-definition", f"{jd['jobDefinitionName']}:{jd['revision']}")


def _consumable_resources(ctx: Ctx, run_id: str | None) -> None:
    """The runs' max_parallel caps (caps.py): the run's, or all of corral's; kept while jobs hold one."""
    from corral.backends.aws_batch import caps

    deleted, kept = caps.remove(ctx.clients.batch, run_id)
    for name in deleted:
        _deleted(ctx, "consumable-resource", name)
    for what in kept:
        ctx.report.kept.append(f"consumable-resource {what}")


def _launch_templates(ctx: Ctx) -> None:
    ec2 = ctx.clients.ec2
    for page in ec2.get_paginator("describe_launch_templates").paginate(
        Filters=[{"Name": "tag:corral:managed", "Values": ["true"]}]
    ):
        for lt in page["LaunchTemplates"]:
            if is_managed(lt.get("Tags")):
                ec2.delete_launch_template(LaunchTemplateId=lt["LaunchTemplateId"])
                _deleted(ctx, "launch-template", lt["LaunchTemplateName"])


def jobs_in_flight(ctx: Ctx) -> list[tuple[str, str, int]]:
    """(queue, status, how many) of jobs SUBMITTED..RUNNING in corral's queues (ListJobs per status:
    without ``jobStatus`` AWS lists RUNNING only). Array parents count once each."""
    batch = ctx.clients.batch
    out: list[tuple[str, str, int]] = []
    for q in _managed_queues(ctx):
        for status in IN_FLIGHT:
            n = 0
            for page in batch.get_paginator("list_jobs").paginate(jobQueue=q["jobQueueArn"], jobStatus=status):
                n += sum(1 for j in page.get("jobSummaryList", []) if j.get("status", status) == status)
            if n:
                out.append((q["jobQueueName"], status, n))
    return out


# -- EFS ------------------------------------------------------------------------------------------
def _efs_access_points(ctx: Ctx, run_id: str | None, fs_id: str | None = None) -> None:
    efs = ctx.clients.efs
    fs_ids = [fs_id] if fs_id else [f["FileSystemId"] for f in _managed_file_systems(ctx)]
    for fid in fs_ids:
        for page in efs.get_paginator("describe_access_points").paginate(FileSystemId=fid):
            for ap in page["AccessPoints"]:
                if is_managed(ap.get("Tags"), run_id):
                    efs.delete_access_point(AccessPointId=ap["AccessPointId"])
                    _deleted(ctx, "efs-access-point",
                             f"{ap['AccessPointId']} (run {tag_dict(ap.get('Tags')).get(RUN_TAG, '-')})")


def _managed_file_systems(ctx: Ctx) -> list[dict[str, Any]]:
    out = []
    for page in ctx.clients.efs.get_paginator("describe_file_systems").paginate():
        out += [f for f in page["FileSystems"] if is_managed(f.get("Tags"))
                and f.get("LifeCycleState") not in ("deleting", "deleted")]
    return out


def _file_systems(ctx: Ctx) -> None:
    efs = ctx.clients.efs
    for fs in _managed_file_systems(ctx):
        fid = fs["FileSystemId"]
        _efs_access_points(ctx, None, fid)
        for mt in efs.describe_mount_targets(FileSystemId=fid)["MountTargets"]:
            efs.delete_mount_target(MountTargetId=mt["MountTargetId"])

        def no_mount_targets(fid: str = fid) -> bool:
            return not efs.describe_mount_targets(FileSystemId=fid)["MountTargets"]

        ctx.poller.poll(no_mount_targets, what=f"mount targets of {fid} to be deleted", timeout=TIMEOUT)
        efs.delete_file_system(FileSystemId=fid)
        _deleted(ctx, "efs", f"{fs.get('Name') or fs.get('CreationToken')} ({fid})")


def _security_groups(ctx: Ctx) -> None:
    """corral's own security groups (``corral-efs``), once the mount targets using them are gone;
    a mount target's network interface can take a while to go, so DependencyViolation is waited out."""
    ec2 = ctx.clients.ec2
    for page in ec2.get_paginator("describe_security_groups").paginate(
        Filters=[{"Name": "tag:corral:managed", "Values": ["true"]}]
    ):
        for g in page["SecurityGroups"]:
            if not is_managed(g.get("Tags")):
                continue

            def gone(gid: str = g["GroupId"]) -> bool:
                try:
                    ec2.delete_security_group(GroupId=gid)
                except Exception as exc:
                    if error_code(exc) == "DependencyViolation":
                        return False
                    if not is_not_found(exc) and not error_code(exc).startswith("InvalidGroup"):
                        raise
                return True

            ctx.poller.poll(gone, what=f"security group {g['GroupId']} to be free to delete", timeout=TIMEOUT)
            _deleted(ctx, "security-group", f"{g.get('GroupName', '')} ({g['GroupId']})")


# -- other services -------------------------------------------------------------------------------
def _secrets(ctx: Ctx, run_id: str | None) -> None:
    sm = ctx.clients.secretsmanager
    key = RUN_TAG if run_id else "corral:managed"
    value = run_id or "true"
    for page in sm.get_paginator("list_secrets").paginate(Filters=[{"Key": "tag-key", "Values": [key]}]):
        for s in page["SecretList"]:
            if tag_dict(s.get("Tags")).get(key) == value and is_managed(s.get("Tags")):
                sm.delete_secret(SecretId=s["ARN"], ForceDeleteWithoutRecovery=True)
                _deleted(ctx, "secret", s["Name"])


def _parameters(ctx: Ctx, run_id: str | None) -> None:
    """corral's SSM parameters (the rclone config SecureString of runs: ``/corral/<run>/rclone``)."""
    from corral.storage.secrets import delete_parameters

    for name in delete_parameters(ctx.clients.ssm, run_id):
        _deleted(ctx, "ssm-parameter", name)


def _staged_roots(ctx: Ctx, run_id: str) -> list[tuple[str, str]]:
    """(bucket, key prefix) where the run's local sources may be staged: the one its record in
    the state table names, and ``<p>staged/<run>/`` under the top-level prefixes of corral's
    buckets (when the record is gone)."""
    from corral.backends.aws_batch.environment import DEFAULT_TABLE
    from corral.backends.aws_batch.run_facts import RunFacts
    from corral.errors import CorralError
    from corral.state.dynamodb import DynamoStore
    from corral.storage.uri import parse

    roots: list[tuple[str, str]] = []
    try:
        recorded = RunFacts.of(DynamoStore(DEFAULT_TABLE, ctx.clients.dynamodb).get_run(run_id))
    except CorralError:
        recorded = RunFacts()
    if recorded.staged:
        loc = parse(recorded.staged)
        roots.append((loc.bucket, loc.path))
    s3 = ctx.clients.s3
    for b in s3.list_buckets().get("Buckets", []):
        try:
            tags = s3.get_bucket_tagging(Bucket=b["Name"])["TagSet"]
        except Exception as exc:
            if error_code(exc):  # untagged, not ours to read, in another region…: not corral's bucket here
                continue
            raise
        if not is_managed(tags):
            continue
        tops = [""]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=b["Name"], Delimiter="/"):
            tops += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        for top in tops:
            if (b["Name"], f"{top}staged/{run_id}/") not in roots:
                roots.append((b["Name"], f"{top}staged/{run_id}/"))
    return roots


def _staged(ctx: Ctx, run_id: str) -> None:
    """The run's local sources staged to S3 (``<prefix>/staged/<run>/``)."""
    s3 = ctx.clients.s3
    for bucket, root in _staged_roots(ctx, run_id):
        keys: list[dict[str, str]] = []
        try:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root):
                keys += [{"Key": o["Key"]} for o in page.get("Contents", [])]
        except Exception as exc:
            if is_not_found(exc) or error_code(exc) == "NoSuchBucket":
                continue
            raise
        for chunk in _chunks(keys, 1000):
            s3.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
        if keys:
            _deleted(ctx, "s3-objects", f"s3://{bucket}/{root} ({len(keys)} staged object(s))")


def _delete_role(iam: Any, name: str) -> None:
    for p in iam.list_instance_profiles_for_role(RoleName=name)["InstanceProfiles"]:
        iam.remove_role_from_instance_profile(InstanceProfileName=p["InstanceProfileName"], RoleName=name)
    for p in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
        iam.detach_role_policy(RoleName=name, PolicyArn=p["PolicyArn"])
    for pname in iam.list_role_policies(RoleName=name)["PolicyNames"]:
        iam.delete_role_policy(RoleName=name, PolicyName=pname)
    iam.delete_role(RoleName=name)


def _run_role_arns(ctx: Ctx, run_id: str) -> frozenset[str]:
    """ARNs of the roles made for the run (tagged ``corral:run=<run>``)."""
    iam = ctx.clients.iam
    out = set()
    for page in iam.get_paginator("list_roles").paginate(PathPrefix=IAM_PATH):
        for role in page["Roles"]:
            if is_managed(iam.list_role_tags(RoleName=role["RoleName"]).get("Tags", []), run_id):
                out.add(role["Arn"])
    return frozenset(out)


def _run_roles(ctx: Ctx, run_id: str) -> None:
    """Roles made for one run (the execution role that may read the run's rclone secret), tagged
    ``corral:managed`` and ``corral:run=<run>``."""
    iam = ctx.clients.iam
    for page in iam.get_paginator("list_roles").paginate(PathPrefix=IAM_PATH):
        for role in page["Roles"]:
            name = role["RoleName"]
            if is_managed(iam.list_role_tags(RoleName=name).get("Tags", []), run_id):
                _delete_role(iam, name)
                _deleted(ctx, "role", name)


def _tables(ctx: Ctx, purge: bool) -> None:
    ddb = ctx.clients.dynamodb
    for page in ddb.get_paginator("list_tables").paginate():
        for name in page["TableNames"]:
            arn = ddb.describe_table(TableName=name)["Table"]["TableArn"]
            tags = ddb.list_tags_of_resource(ResourceArn=arn).get("Tags", [])
            if not is_managed(tags):
                continue
            if not purge:
                _kept(ctx, "dynamodb-table", name, "the record of every run; --purge deletes it")
                continue
            ddb.delete_table(TableName=name)
            _deleted(ctx, "dynamodb-table", name)


def _log_groups(ctx: Ctx) -> None:
    logs = ctx.clients.logs
    for page in logs.get_paginator("describe_log_groups").paginate(logGroupNamePrefix=f"/aws/batch/{NAME}"):
        for g in page["logGroups"]:
            tags = logs.list_tags_log_group(logGroupName=g["logGroupName"]).get("tags", {})
            if is_managed(tags):
                logs.delete_log_group(logGroupName=g["logGroupName"])
                _deleted(ctx, "log-group", g["logGroupName"])


def _chunks(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _buckets(ctx: Ctx, purge: bool) -> None:
    s3 = ctx.clients.s3
    for b in s3.list_buckets().get("Buckets", []):
        name = b["Name"]
        try:
            tags = s3.get_bucket_tagging(Bucket=name)["TagSet"]
        except Exception as exc:
            if error_code(exc) in ("NoSuchTagSet", "NoSuchTagSetError", "AccessDenied") or is_not_found(exc):
                continue
            raise
        if not is_managed(tags):
            continue
        keys = []
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=name):
            keys += [{"Key": v["Key"], "VersionId": v["VersionId"]}
                     for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        if keys and not purge:
            _kept(ctx, "s3-bucket", name, f"holds {len(keys)} object(s); --purge deletes them")
            continue
        for chunk in _chunks(keys, 1000):
            s3.delete_objects(Bucket=name, Delete={"Objects": chunk, "Quiet": True})
        s3.delete_bucket(Bucket=name)
        _deleted(ctx, "s3-bucket", name)


def _repositories(ctx: Ctx, purge: bool) -> None:
    ecr = ctx.clients.ecr
    for page in ecr.get_paginator("describe_repositories").paginate():
        for repo in page["repositories"]:
            tags = ecr.list_tags_for_resource(resourceArn=repo["repositoryArn"]).get("tags", [])
            if not is_managed(tags):
                continue
            name = repo["repositoryName"]
            images = ecr.list_images(repositoryName=name, maxResults=1).get("imageIds", [])
            if images and not purge:
                _kept(ctx, "ecr-repository", name, "holds images; --purge deletes them")
                continue
            ecr.delete_repository(repositoryName=name, force=True)
            _deleted(ctx, "ecr-repository", name)


def _profile_managed(iam: Any, prof: dict[str, Any]) -> bool:
    """An instance profile is corral's when tagged so; where the endpoint returns no tags for
    profiles (moto), when it sits under /corral/ and holds only corral-managed roles."""
    tags = iam.get_instance_profile(InstanceProfileName=prof["InstanceProfileName"])["InstanceProfile"].get("Tags")
    if tags:
        return is_managed(tags)
    roles = prof.get("Roles", [])
    return bool(roles) and all(is_managed(iam.list_role_tags(RoleName=r["RoleName"]).get("Tags")) for r in roles)


def _iam(ctx: Ctx) -> None:
    iam = ctx.clients.iam
    for page in iam.get_paginator("list_instance_profiles").paginate(PathPrefix=IAM_PATH):
        for prof in page["InstanceProfiles"]:
            if not _profile_managed(iam, prof):
                continue
            for role in prof.get("Roles", []):
                iam.remove_role_from_instance_profile(InstanceProfileName=prof["InstanceProfileName"],
                                                      RoleName=role["RoleName"])
            iam.delete_instance_profile(InstanceProfileName=prof["InstanceProfileName"])
            _deleted(ctx, "instance-profile", prof["InstanceProfileName"])
    for page in iam.get_paginator("list_roles").paginate(PathPrefix=IAM_PATH):
        for role in page["Roles"]:
            name = role["RoleName"]
            tags = iam.list_role_tags(RoleName=name).get("Tags", [])
            if not is_managed(tags):
                continue
            _delete_role(iam, name)
            _deleted(ctx, "role", name)
