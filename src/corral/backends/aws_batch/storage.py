"""The run-data side of provisioning: log group, DynamoDB state table, S3 bucket, EFS workspace.

What protects the data, besides the roles (:mod:`iam`):

- the bucket corral creates: default encryption (SSE-S3), all public access blocked, and a bucket
  policy denying every request not sent over TLS (``aws:SecureTransport`` false → Deny);
- the EFS file system: encrypted at rest, and a file-system policy (PutFileSystemPolicy) that
  denies NFS clients that do not use TLS, that come other than through a mount target, that mount
  without an access point, or that are not one of corral's roles (``role/corral/*``). It only
  denies: what a role may mount is granted by its own identity policy (a run's job role: only
  through its run's access point), because in one account an Allow in either policy suffices and
  a broad Allow here would let one run's role mount another run's access point;
- a run's access point: rooted at ``/runs/<run>``, created ``0755`` and owned by
  :data:`EFS_UID`:`EFS_GID`, and every file operation through it runs as that POSIX user whatever
  user the container runs as (so no job is root on the workspace).
"""

from __future__ import annotations

import json
from typing import Any

from corral.backends.aws_batch.client import aws_errors, error_code, is_not_found
from corral.backends.aws_batch.common import IAM_PATH, NAME, RUN_TAG, Ctx, is_managed, tag_list
from corral.backends.aws_batch.network import Network, ensure_efs_group
from corral.errors import ProvisionError

TABLE_KEYS = (("pk", "HASH"), ("sk", "RANGE"))  # what corral's DynamoDB store reads and writes
EFS_WORKSPACE = f"{NAME}-workspace"
# The POSIX identity of every NFS operation through a run's access point (the first regular user
# on most Linux images; any non-root choice works since the access point enforces it).
EFS_UID = EFS_GID = 1000
EFS_ROOT_PERMISSIONS = "0755"
EFS_CLIENT_ACTIONS = ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite",
                      "elasticfilesystem:ClientRootAccess"]


# -- CloudWatch Logs ------------------------------------------------------------------------------
def ensure_log_group(ctx: Ctx, name: str, retention_days: int | None = None) -> str:
    """The log group, keeping logs ``retention_days`` (PutRetentionPolicy; None: for ever, as
    CloudWatch's default). A found group with another retention is set to this one."""
    logs = ctx.clients.logs
    with aws_errors(f"set up log group {name}"):
        found = None
        for page in logs.get_paginator("describe_log_groups").paginate(logGroupNamePrefix=name):
            found = next((g for g in page["logGroups"] if g["logGroupName"] == name), None) or found
        if found is not None:
            ctx.found("log-group", name)
            if retention_days is not None and found.get("retentionInDays") != retention_days:
                logs.put_retention_policy(logGroupName=name, retentionInDays=retention_days)
                ctx.updated("log-group", f"{name} (keeps logs {retention_days} days)")
            return name
        try:
            logs.create_log_group(logGroupName=name, tags=dict(ctx.tags))
        except Exception as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":  # made meanwhile by another setup
                raise
        ctx.created("log-group", name)
        if retention_days is not None:
            logs.put_retention_policy(logGroupName=name, retentionInDays=retention_days)
    return name


# -- DynamoDB -------------------------------------------------------------------------------------
def ensure_table(ctx: Ctx, name: str) -> str:
    """The state table: on-demand billing, keys ``pk`` (S) + ``sk`` (S), waited for until ACTIVE."""
    ddb = ctx.clients.dynamodb
    with aws_errors(f"set up DynamoDB table {name}"):
        try:
            table = ddb.describe_table(TableName=name)["Table"]
        except Exception as exc:
            if not is_not_found(exc):
                raise
            table = None
        if table is not None:
            keys = tuple((k["AttributeName"], k["KeyType"]) for k in table["KeySchema"])
            if keys != TABLE_KEYS:
                raise ProvisionError(
                    f"DynamoDB table {name} exists with keys {keys}, not corral's (pk HASH, sk RANGE)",
                    "name another table for corral's state, or remove that one",
                )
            ctx.found("dynamodb-table", name)
            if table.get("TableStatus") == "ACTIVE":
                return name
        else:
            ddb.create_table(
                TableName=name,
                AttributeDefinitions=[{"AttributeName": k, "AttributeType": "S"} for k, _ in TABLE_KEYS],
                KeySchema=[{"AttributeName": k, "KeyType": t} for k, t in TABLE_KEYS],
                BillingMode="PAY_PER_REQUEST",
                SSESpecification={"Enabled": True},
                Tags=tag_list(ctx.tags),
            )
            ctx.created("dynamodb-table", name)
        ctx.poller.poll(
            lambda: ddb.describe_table(TableName=name)["Table"].get("TableStatus") == "ACTIVE",
            what=f"DynamoDB table {name} to become ACTIVE", timeout=300,
        )
    return name


# -- S3 -------------------------------------------------------------------------------------------
def default_bucket(ctx: Ctx) -> str:
    return f"{NAME}-{ctx.account}-{ctx.region}"


def ensure_bucket(ctx: Ctx, name: str | None) -> str:
    """The workflow's bucket. An existing bucket is used as it is (a user's bucket is never
    reconfigured); a new one gets default encryption, all public access blocked, and the tags."""
    s3 = ctx.clients.s3
    name = name or default_bucket(ctx)
    with aws_errors(f"set up S3 bucket {name}"):
        try:
            s3.head_bucket(Bucket=name)
            ctx.found("s3-bucket", name)
            _tls_policy_on_found(ctx, name)
            return name
        except Exception as exc:
            code = error_code(exc)
            if code in ("403", "AccessDenied", "Forbidden"):
                raise ProvisionError(
                    f"S3 bucket {name} exists but this account may not use it",
                    "bucket names are global: set aws.bucket to a bucket of yours",
                ) from None
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise
        kwargs: dict[str, Any] = {"Bucket": name}
        if ctx.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": ctx.region}
        s3.create_bucket(**kwargs)
        ctx.created("s3-bucket", name)
        s3.put_public_access_block(
            Bucket=name,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True, "IgnorePublicAcls": True,
                "BlockPublicPolicy": True, "RestrictPublicBuckets": True,
            },
        )
        s3.put_bucket_encryption(
            Bucket=name,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"},
                           "BucketKeyEnabled": True}]
            },
        )
        s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": tag_list(ctx.tags)})
        if speaks_tls(s3):
            s3.put_bucket_policy(Bucket=name, Policy=json.dumps(tls_only_bucket_policy(ctx, name)))
        else:
            ctx.report.kept.append(f"s3-bucket {name} (no TLS-only policy: the S3 endpoint is plain http)")
    return name


def speaks_tls(s3: Any) -> bool:
    """Whether corral reaches S3 over https (always, on AWS). A TLS-only policy on a bucket of a
    plain-http S3-compatible endpoint (or an emulator) would lock every client out of it. (moto
    5.2 also treats a Deny statement whose condition does not hold as a Deny, so on its http
    endpoint the policy would refuse every object request.)"""
    return str(getattr(s3.meta, "endpoint_url", "") or "https://").startswith("https://")


def tls_only_bucket_policy(ctx: Ctx, name: str) -> dict[str, Any]:
    """Deny every request to the bucket and its objects that does not come over TLS (S3 user
    guide, "Enforcing encryption in transit": ``aws:SecureTransport``)."""
    arn = f"arn:{ctx.partition}:s3:::{name}"
    return {"Version": "2012-10-17", "Statement": [{
        "Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": [arn, f"{arn}/*"], "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    }]}


def _tls_policy_on_found(ctx: Ctx, name: str) -> None:
    """A bucket corral made before it set a TLS-only policy gets one; a bucket that is not corral's,
    or that has a policy of any kind, is left as it is."""
    s3 = ctx.clients.s3
    if not speaks_tls(s3):
        return
    try:
        s3.get_bucket_policy(Bucket=name)
        return  # one look when a policy is there (the usual case)
    except Exception as exc:
        if error_code(exc) != "NoSuchBucketPolicy":
            if error_code(exc) in ("AccessDenied", "403"):
                return
            raise
    try:
        tags = s3.get_bucket_tagging(Bucket=name)["TagSet"]
    except Exception as exc:
        if error_code(exc):  # untagged, or not ours to read: not a bucket corral made
            return
        raise
    if not is_managed(tags):
        return
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps(tls_only_bucket_policy(ctx, name)))
    ctx.updated("s3-bucket-policy", f"{name} (TLS only)")


# -- EFS ------------------------------------------------------------------------------------------
def _file_system(ctx: Ctx, token: str) -> dict[str, Any] | None:
    fss = ctx.clients.efs.describe_file_systems(CreationToken=token)["FileSystems"]
    return fss[0] if fss else None


def ensure_efs(ctx: Ctx, network: Network, *, name: str = EFS_WORKSPACE, run_id: str | None = None,
               timeout: float = 600) -> tuple[str, str | None]:
    """An encrypted EFS file system (idempotent by CreationToken = ``name``) with a mount target in
    each zone of the network behind corral's ``corral-efs`` security group (NFS from the compute
    groups only, :func:`network.ensure_efs_group`), waited for until available; and, for a run, an access point rooted
    at ``/runs/<run_id>`` tagged with the run. Returns (file system id, access point id or None)."""
    efs = ctx.clients.efs
    with aws_errors(f"set up EFS file system {name}"):
        fs = _file_system(ctx, name)
        if fs is None:
            fs = efs.create_file_system(
                CreationToken=name, PerformanceMode="generalPurpose", ThroughputMode="elastic",
                Encrypted=True, Backup=False, Tags=tag_list({**ctx.tags, "Name": name}),
            )
            ctx.created("efs", f"{name} ({fs['FileSystemId']})")
        else:
            ctx.found("efs", f"{name} ({fs['FileSystemId']})")
        fs_id = fs["FileSystemId"]
        if fs.get("LifeCycleState") != "available":
            ctx.poller.poll(
                lambda: (_file_system(ctx, name) or {}).get("LifeCycleState") == "available",
                what=f"EFS file system {fs_id} to become available", timeout=timeout,
            )
        group = ensure_efs_group(ctx, network)
        targets = efs.describe_mount_targets(FileSystemId=fs_id)["MountTargets"]
        for t in targets:  # a mount target made before corral had its own group gets it
            have = efs.describe_mount_target_security_groups(MountTargetId=t["MountTargetId"])["SecurityGroups"]
            if group not in have:
                efs.modify_mount_target_security_groups(MountTargetId=t["MountTargetId"],
                                                        SecurityGroups=[group, *have][:5])
                ctx.updated("efs-mount-target", f"{fs_id} {t['SubnetId']} (security group {group})")
        zones_covered = {t.get("AvailabilityZoneName") for t in targets} | {t["SubnetId"] for t in targets}
        made = False
        for subnet in network.one_subnet_per_zone():
            zone = network.zones.get(subnet)
            if subnet in zones_covered or (zone and zone in zones_covered):
                ctx.found("efs-mount-target", f"{fs_id} {subnet}")
                continue
            efs.create_mount_target(FileSystemId=fs_id, SubnetId=subnet, SecurityGroups=[group])
            ctx.created("efs-mount-target", f"{fs_id} {subnet}")
            made = True

        def mount_targets_ready() -> bool:
            ts = efs.describe_mount_targets(FileSystemId=fs_id)["MountTargets"]
            return bool(ts) and all(t.get("LifeCycleState") == "available" for t in ts)

        if made or not all(t.get("LifeCycleState") == "available" for t in targets):
            ctx.poller.poll(mount_targets_ready, what=f"EFS mount targets of {fs_id}", timeout=timeout)
        ensure_file_system_policy(ctx, fs_id)
        access_point = ensure_access_point(ctx, fs_id, run_id) if run_id else None
    return fs_id, access_point


def file_system_policy(ctx: Ctx, fs_id: str) -> dict[str, Any]:
    """Deny NFS clients without TLS, outside a mount target, without an access point, or other than
    corral's roles (EFS user guide, "Using IAM to control file system data access" and its
    condition keys ``aws:SecureTransport``, ``elasticfilesystem:AccessedViaMountTarget``,
    ``elasticfilesystem:AccessPointArn``). Deny only: grants come from each role's own policy."""
    fs_arn = ctx.arn("elasticfilesystem", f"file-system/{fs_id}")
    roles = [f"arn:{ctx.partition}:iam::{ctx.account}:role{IAM_PATH}*",
             f"arn:{ctx.partition}:iam::{ctx.account}:role/{NAME}-*"]

    def deny(sid: str, condition: dict[str, Any]) -> dict[str, Any]:
        return {"Sid": sid, "Effect": "Deny", "Principal": {"AWS": "*"}, "Action": EFS_CLIENT_ACTIONS,
                "Resource": fs_arn, "Condition": condition}

    return {"Version": "2012-10-17", "Id": f"{NAME}-workspace", "Statement": [
        deny("DenyWithoutTls", {"Bool": {"aws:SecureTransport": "false"}}),
        deny("DenyOutsideMountTargets", {"Bool": {"elasticfilesystem:AccessedViaMountTarget": "false"}}),
        deny("DenyWithoutAccessPoint", {"Null": {"elasticfilesystem:AccessPointArn": "true"}}),
        deny("DenyOtherPrincipals", {"ArnNotLike": {"aws:PrincipalArn": roles}}),
    ]}


def ensure_file_system_policy(ctx: Ctx, fs_id: str) -> None:
    """PutFileSystemPolicy with :func:`file_system_policy`, unless that policy is there already."""
    efs = ctx.clients.efs
    want = file_system_policy(ctx, fs_id)
    try:
        have = json.loads(efs.describe_file_system_policy(FileSystemId=fs_id)["Policy"])
    except Exception as exc:
        if error_code(exc) != "PolicyNotFound":
            raise
        have = None
    if have == want:
        ctx.found("efs-file-system-policy", fs_id)
        return
    efs.put_file_system_policy(FileSystemId=fs_id, Policy=json.dumps(want))
    (ctx.created if have is None else ctx.updated)("efs-file-system-policy", fs_id)


def ensure_access_point(ctx: Ctx, fs_id: str, run_id: str) -> str:
    efs = ctx.clients.efs
    for page in efs.get_paginator("describe_access_points").paginate(FileSystemId=fs_id):
        for ap in page["AccessPoints"]:
            if is_managed(ap.get("Tags"), run_id):
                ctx.found("efs-access-point", f"{ap['AccessPointId']} (run {run_id})")
                return ap["AccessPointId"]
    ap = efs.create_access_point(
        ClientToken=f"{NAME}-{run_id}"[:64],
        FileSystemId=fs_id,
        RootDirectory={
            "Path": f"/runs/{run_id}",
            "CreationInfo": {"OwnerUid": EFS_UID, "OwnerGid": EFS_GID, "Permissions": EFS_ROOT_PERMISSIONS},
        },
        PosixUser={"Uid": EFS_UID, "Gid": EFS_GID},
        Tags=tag_list({**ctx.tags, RUN_TAG: run_id, "Name": f"{NAME}-{run_id}"}),
    )
    ctx.created("efs-access-point", f"{ap['AccessPointId']} (run {run_id})")
    return ap["AccessPointId"]
