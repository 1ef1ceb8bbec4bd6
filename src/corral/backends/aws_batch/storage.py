"""The run-data side of provisioning: log group, DynamoDB state table, S3 bucket, EFS workspace."""

from __future__ import annotations

from typing import Any

from corral.backends.aws_batch.client import aws_errors, error_code, is_not_found
from corral.backends.aws_batch.common import NAME, RUN_TAG, Ctx, is_managed, tag_list
from corral.backends.aws_batch.network import Network, ensure_efs_group
from corral.errors import ProvisionError

TABLE_KEYS = (("pk", "HASH"), ("sk", "RANGE"))  # what corral's DynamoDB store reads and writes
EFS_WORKSPACE = f"{NAME}-workspace"


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
    return name


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
        access_point = ensure_access_point(ctx, fs_id, run_id) if run_id else None
    return fs_id, access_point


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
            "CreationInfo": {"OwnerUid": 0, "OwnerGid": 0, "Permissions": "0777"},
        },
        Tags=tag_list({**ctx.tags, RUN_TAG: run_id, "Name": f"{NAME}-{run_id}"}),
    )
    ctx.created("efs-access-point", f"{ap['AccessPointId']} (run {run_id})")
    return ap["AccessPointId"]
