"""IAM for Batch: the instance role/profile, a job role per run and an execution role per need.

Every role lives under the path ``/corral/`` and carries ``corral:managed=true``.

- **ECS instance role** ``corral-ecs-instance`` (+ instance profile of the same name), trusted by
  EC2. It gets one AWS-managed policy, ``service-role/AmazonEC2ContainerServiceforEC2Role``: the
  narrow standard policy that lets the ECS agent register the instance, pull images and write
  container logs (it is what the Batch console itself attaches). Nothing else.
- **Job role** (the credentials the job's own code gets), one per run: ``corral-job-<hash>`` where
  the hash covers the run id and the policy, tagged ``corral:run=<run>`` and removed by
  ``corral aws teardown --run``. :func:`job_policy` builds it from the run's facts
  (:class:`JobPolicyInputs`): object reads of the run's own staged sources
  (``<prefix>/staged/<run>/``) and of the S3 scopes its stages read, writes under the scopes its
  stages write (``{run}`` in a URI is filled in, so ``s3://b/out/{run}/...`` is this run's only),
  and EFS ``ClientMount``/``ClientWrite`` only through the run's access point
  (``elasticfilesystem:AccessPointArn``). No DynamoDB (no job reads or writes the state table;
  ``table_access`` exists for a stage that would), no logs (the awslogs driver writes with the
  instance or execution role), no secrets (ECS hands a stage's ``secrets`` to the container with
  the execution role). Why a role per run rather than one role scoped by session tags: ECS assumes
  a job's role itself, and neither Batch nor ECS lets the caller attach session tags to that
  session, so a tag-scoped shared role has nothing per run to match.
- **Execution role** ``corral-exec-<hash>`` (used by the ECS agent, never by the job's code):
  pull from exactly the workflow's ECR repositories, write to its log group, read exactly the
  secrets the run's stages name. When it reads a run's own rclone-config secret (a Secrets
  Manager secret, whose resource policy then admits only this role, or an SSM SecureString with
  ``kms:Decrypt`` allowed only via SSM for that parameter) it is that run's role: tagged
  ``corral:run`` and removed by ``corral aws teardown --run``. ``ecr:GetAuthorizationToken`` has
  no resource-level permissions in IAM, so that single action is granted on ``"*"`` (the only
  wildcard resource besides ``kms:Decrypt`` on the account's keys, which holds only via SSM for
  the run's own parameter; no statement has a wildcard action).

Quota: an account holds 1,000 IAM roles by default (IAM quotas page; raisable to 5,000); every
run not torn down keeps its job role (and its execution role when it has an rclone secret). A
refused CreateRole says so in one line. New roles are eventually consistent: after creating one,
corral polls (bounded) until GetRole and GetRolePolicy return it, never a fixed sleep.

The Batch **service role**: AWS Batch uses its service-linked role ``AWSServiceRoleForBatch``
when ``serviceRole`` is left out, and corral leaves it out. :func:`service_linked_role_arn` is
only called when an endpoint refuses that (moto does: "ServiceRole is required"); it finds or
creates the same service-linked role and returns its ARN, so no corral-made service role with a
policy of its own ever exists. Service-linked roles belong to the account; teardown leaves them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from corral.backends.aws_batch.client import aws_errors, error_code, is_not_found
from corral.backends.aws_batch.common import IAM_PATH, NAME, Ctx, content_hash, tag_list
from corral.errors import ProvisionError

INSTANCE_ROLE = f"{NAME}-ecs-instance"
INLINE_POLICY = NAME
ECS_INSTANCE_POLICY = "service-role/AmazonEC2ContainerServiceforEC2Role"
BATCH_SERVICE = "batch.amazonaws.com"

# What the job role may do with objects under a scope it reads / writes: exactly what rclone's
# copy/sync does (and boto3's transfer manager). PutObject covers Create/UploadPart/Complete of a
# multipart upload; Abort and ListParts are their own actions; DeleteObject is sync's. No tagging:
# rclone keeps its metadata (mtime) in the object's headers. Amazon S3 User Guide, "Actions,
# resources, and condition keys for Amazon S3" and "Multipart upload API and permissions".
S3_READ_ACTIONS = ["s3:GetObject"]
S3_WRITE_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                    "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
DYNAMODB_ACTIONS = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:Query",
                    "dynamodb:BatchGetItem", "dynamodb:BatchWriteItem", "dynamodb:ConditionCheckItem"]
LOG_ACTIONS = ["logs:CreateLogStream", "logs:PutLogEvents"]
ECR_PULL_ACTIONS = ["ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"]


@dataclass
class JobPolicyInputs:
    """Everything the job and execution roles' policies are computed from."""

    table: str
    log_group: str
    bucket: str | None = None
    prefix: str = NAME
    s3_read: tuple[str, ...] = ()
    s3_write: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()
    ecr_repositories: tuple[str, ...] = ()
    efs_id: str | None = None
    # Secrets made for one run (its rclone config: a Secrets Manager name or an SSM parameter ARN):
    # only the execution role may read them, and that role is then the run's (tagged corral:run).
    run_secrets: tuple[str, ...] = ()
    run_id: str | None = None
    # The run's EFS access point id: the job role mounts the file system only through it.
    efs_access_point: str | None = None
    # Whether some stage's code reads or writes the state table itself (none does today).
    table_access: bool = False


def staged_scope(bucket: str, prefix: str, run_id: str) -> str:
    """``bucket/<prefix>/staged/<run>/``: the run's staged local sources (see ``storage.aws.staged_root``)."""
    return f"{bucket}/" + "/".join(x for x in (prefix.strip("/"), "staged", run_id) if x) + "/"


def _doc(statements: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": statements}


def ec2_trust() -> dict[str, Any]:
    return _doc([{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}])


def ecs_tasks_trust(ctx: Ctx) -> dict[str, Any]:
    # The conditions stop another account's ECS tasks from assuming the role (confused deputy).
    return _doc([{
        "Effect": "Allow",
        "Principal": {"Service": "ecs-tasks.amazonaws.com"},
        "Action": "sts:AssumeRole",
        "Condition": {
            "StringEquals": {"aws:SourceAccount": ctx.account},
            "ArnLike": {"aws:SourceArn": ctx.arn("ecs", "*")},
        },
    }])


def secret_arn(ctx: Ctx, name: str) -> str:
    """A secret's ARN pattern: Secrets Manager appends ``-`` and 6 random characters to the name."""
    if name.startswith("arn:"):
        return name
    return ctx.arn("secretsmanager", f"secret:{name}-??????")


def _secret_statements(ctx: Ctx, secrets: tuple[str, ...], *, run: bool = False) -> list[dict[str, Any]]:
    """Read exactly these secrets: Secrets Manager names/ARNs, and SSM parameter ARNs. A run's own
    SecureStrings (``run``) also get ``kms:Decrypt`` only via SSM for exactly those parameters."""
    from corral.storage.secrets import parameter_statements

    params = [s for s in secrets if s.startswith("arn:") and ":ssm:" in s]
    names = [s for s in secrets if s not in params]
    out: list[dict[str, Any]] = []
    if names:
        out.append({"Sid": "RunSecrets" if run else "Secrets", "Effect": "Allow",
                    "Action": ["secretsmanager:GetSecretValue"], "Resource": [secret_arn(ctx, s) for s in names]})
    if params and run:
        out += parameter_statements(params, region=ctx.region, account_id=ctx.account, partition=ctx.partition)
    elif params:
        out.append({"Sid": "Parameters", "Effect": "Allow", "Action": ["ssm:GetParameters"], "Resource": params})
    return out


def _split_scope(scope: str) -> tuple[str, str]:
    bucket, _, prefix = scope.partition("/")
    return bucket, prefix


def _s3_statements(ctx: Ctx, read: list[str], write: list[str]) -> list[dict[str, Any]]:
    p = ctx.partition
    out: list[dict[str, Any]] = []
    if write:
        out.append({"Sid": "WriteObjects", "Effect": "Allow", "Action": S3_WRITE_ACTIONS,
                    "Resource": [f"arn:{p}:s3:::{b}/{pre}*" for b, pre in map(_split_scope, write)]})
    if read:
        out.append({"Sid": "ReadObjects", "Effect": "Allow", "Action": S3_READ_ACTIONS,
                    "Resource": [f"arn:{p}:s3:::{b}/{pre}*" for b, pre in map(_split_scope, read)]})
    # Listing is granted per bucket, limited to the prefixes used: rclone lists a directory with
    # ListObjectsV2 `prefix=<dir>/` (so the request carries s3:prefix), and with no_check_bucket
    # (corral.storage.rclone.s3_connection) it never sends HeadBucket, which has no s3:prefix.
    by_bucket: dict[str, list[str]] = {}
    for scope in [*write, *read]:
        b, pre = _split_scope(scope)
        if f"{pre}*" not in by_bucket.setdefault(b, []):
            by_bucket[b].append(f"{pre}*")
    for i, (b, prefixes) in enumerate(sorted(by_bucket.items())):
        stmt: dict[str, Any] = {"Sid": f"List{i}", "Effect": "Allow", "Action": ["s3:ListBucket"],
                                "Resource": f"arn:{p}:s3:::{b}"}
        if "*" not in prefixes:
            stmt["Condition"] = {"StringLike": {"s3:prefix": sorted(prefixes)}}
        out.append(stmt)
        out.append({"Sid": f"Locate{i}", "Effect": "Allow", "Action": ["s3:GetBucketLocation"],
                    "Resource": f"arn:{p}:s3:::{b}"})
    return out


def job_policy(ctx: Ctx, inp: JobPolicyInputs) -> dict[str, Any]:
    """The job role's policy: what the run's own code may reach, and nothing of another run."""
    statements: list[dict[str, Any]] = []
    if inp.table_access:
        statements.append({"Sid": "State", "Effect": "Allow", "Action": DYNAMODB_ACTIONS,
                           "Resource": ctx.arn("dynamodb", f"table/{inp.table}")})
    read = list(inp.s3_read)
    write = list(inp.s3_write)
    if inp.bucket and inp.run_id:
        staged = staged_scope(inp.bucket, inp.prefix, inp.run_id)  # jobs only read their staged copies
        if staged not in read:
            read.insert(0, staged)
    read = [r for r in read if r not in write]
    statements += _s3_statements(ctx, read, write)
    if inp.efs_id and inp.efs_access_point:
        statements.append({
            "Sid": "Workspace", "Effect": "Allow",
            "Action": ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"],
            "Resource": ctx.arn("elasticfilesystem", f"file-system/{inp.efs_id}"),
            "Condition": {"StringEquals": {
                "elasticfilesystem:AccessPointArn": ctx.arn("elasticfilesystem", f"access-point/{inp.efs_access_point}"),
            }},
        })
    return _doc(statements)


def execution_policy(ctx: Ctx, inp: JobPolicyInputs) -> dict[str, Any]:
    log_group_arn = ctx.arn("logs", f"log-group:{inp.log_group}")
    statements: list[dict[str, Any]] = [
        {"Sid": "Logs", "Effect": "Allow", "Action": LOG_ACTIONS,
         "Resource": [f"{log_group_arn}:*", f"{log_group_arn}:log-stream:*"]},
    ]
    if inp.ecr_repositories:
        statements.append({"Sid": "RegistryLogin", "Effect": "Allow", "Action": ["ecr:GetAuthorizationToken"],
                           "Resource": "*"})  # this action has no resource-level permissions
        statements.append({"Sid": "PullImages", "Effect": "Allow", "Action": ECR_PULL_ACTIONS,
                           "Resource": [ctx.arn("ecr", f"repository/{r}") for r in inp.ecr_repositories]})
    statements += _secret_statements(ctx, inp.secrets)
    statements += _secret_statements(ctx, inp.run_secrets, run=True)
    return _doc(statements)


def _get_role(ctx: Ctx, name: str) -> dict[str, Any] | None:
    try:
        return ctx.clients.iam.get_role(RoleName=name)["Role"]
    except Exception as exc:
        if is_not_found(exc):
            return None
        raise


def ensure_role(
    ctx: Ctx,
    name: str,
    trust: dict[str, Any],
    *,
    description: str,
    inline: dict[str, Any] | None = None,
    managed: list[str] | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Find or create a role (path /corral/) with this trust, inline policy and managed policies.

    A found role is checked for its inline and managed policies (a run that stopped half-way
    is completed); nothing is written when all is in place.
    """
    iam = ctx.clients.iam
    managed_arns = [f"arn:{ctx.partition}:iam::aws:policy/{m}" for m in (managed or [])]
    with aws_errors(f"set up IAM role {name}"):
        role = _get_role(ctx, name)
        if role is None:
            try:
                role = iam.create_role(
                    Path=IAM_PATH, RoleName=name, AssumeRolePolicyDocument=json.dumps(trust),
                    Description=description[:1000], Tags=tag_list(ctx.tags if tags is None else tags),
                    MaxSessionDuration=3600,
                )["Role"]
            except Exception as exc:
                if error_code(exc) == "LimitExceeded":
                    raise ProvisionError(
                        f"cannot create IAM role {name}: the account's role quota is reached",
                        "remove finished runs' roles with `corral aws teardown --run RUN_ID`, or ask AWS to raise "
                        "the IAM 'Roles per account' quota (1,000 by default)",
                    ) from None
                raise
            ctx.created("role", name)
            made = True
            have_inline: set[str] = set()
            have_managed: set[str] = set()
        else:
            made = False
            ctx.found("role", name)
            have_inline = set(iam.list_role_policies(RoleName=name)["PolicyNames"]) if inline else set()
            have_managed = {
                p["PolicyArn"] for p in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]
            } if managed_arns else set()
        if inline is not None and INLINE_POLICY not in have_inline:
            iam.put_role_policy(RoleName=name, PolicyName=INLINE_POLICY, PolicyDocument=json.dumps(inline))
        for arn in managed_arns:
            if arn not in have_managed:
                iam.attach_role_policy(RoleName=name, PolicyArn=arn)
        if made:
            wait_until_visible(ctx, name, inline=inline is not None)
    return role["Arn"]


ROLE_VISIBLE_TIMEOUT = 120.0  # s; IAM changes usually show within seconds (IAM user guide, "eventual consistency")


def wait_until_visible(ctx: Ctx, name: str, *, inline: bool) -> None:
    """Bounded polling until IAM answers GetRole (and GetRolePolicy for the inline policy) for a new
    role, so Batch is not handed a role IAM does not know yet. This is what the caller can observe;
    STS/ECS may still lag a little (AWS documents no bound), which the jobs' launch retries absorb."""
    iam = ctx.clients.iam

    def visible() -> bool:
        try:
            iam.get_role(RoleName=name)
            if inline:
                iam.get_role_policy(RoleName=name, PolicyName=INLINE_POLICY)
        except Exception as exc:
            if is_not_found(exc):
                return False
            raise
        return True

    ctx.poller.poll(visible, what=f"IAM role {name} to become visible", timeout=ROLE_VISIBLE_TIMEOUT)


def ensure_instance_profile(ctx: Ctx) -> str:
    """The ECS instance role and its instance profile; returns the profile's ARN."""
    iam = ctx.clients.iam
    ensure_role(ctx, INSTANCE_ROLE, ec2_trust(), description="corral: ECS container instances of AWS Batch",
                managed=[ECS_INSTANCE_POLICY])
    with aws_errors(f"set up instance profile {INSTANCE_ROLE}"):
        try:
            profile = iam.get_instance_profile(InstanceProfileName=INSTANCE_ROLE)["InstanceProfile"]
            ctx.found("instance-profile", INSTANCE_ROLE)
        except Exception as exc:
            if not is_not_found(exc):
                raise
            profile = iam.create_instance_profile(
                InstanceProfileName=INSTANCE_ROLE, Path=IAM_PATH, Tags=tag_list(ctx.tags)
            )["InstanceProfile"]
            ctx.created("instance-profile", INSTANCE_ROLE)
        if not any(r["RoleName"] == INSTANCE_ROLE for r in profile.get("Roles", [])):
            iam.add_role_to_instance_profile(InstanceProfileName=INSTANCE_ROLE, RoleName=INSTANCE_ROLE)
    return profile["Arn"]


def job_role_name(ctx: Ctx, inp: JobPolicyInputs) -> str:
    """``corral-job-<hash>``: the hash covers the run id (one role per run) and the trust and policy
    (a found role never needs its policy rewritten)."""
    return f"{NAME}-job-{content_hash([inp.run_id, ecs_tasks_trust(ctx), job_policy(ctx, inp)])}"


def ensure_job_roles(ctx: Ctx, inp: JobPolicyInputs) -> tuple[str, str]:
    """(job role ARN, execution role ARN). The job role is the run's (tagged ``corral:run``, removed
    by ``corral aws teardown --run``) whenever a run id is given."""
    trust = ecs_tasks_trust(ctx)
    jp = job_policy(ctx, inp)
    ep = execution_policy(ctx, inp)
    check_policy_is_narrow(jp)
    check_policy_is_narrow(ep)
    job_tags = ctx.with_run(inp.run_id) if inp.run_id else None
    what = f"run {inp.run_id}'s" if inp.run_id else "the workflow's"
    # A run that reaches nothing (no S3, no workspace) gets a role without a policy: IAM refuses an
    # empty Statement list.
    job = ensure_role(ctx, job_role_name(ctx, inp), trust, inline=jp if jp["Statement"] else None, tags=job_tags,
                      description=f"corral: what {what} jobs may reach (its staged data, outputs, workspace)")
    # An execution role that reads a run's own secret is that run's: tagged corral:run, removed by
    # `corral aws teardown --run` (its name hashes the run's secret ARN, so no other run shares it).
    run_tags = ctx.with_run(inp.run_id) if inp.run_secrets and inp.run_id else None
    exe = ensure_role(ctx, f"{NAME}-exec-{content_hash([trust, ep])}", trust, inline=ep, tags=run_tags,
                      description="corral: pull the workflow's images, write its logs, read its secrets")
    return job, exe


def service_linked_role_arn(ctx: Ctx) -> str:
    """The Batch service-linked role's ARN, creating that AWS-defined role if the account lacks it."""
    iam = ctx.clients.iam
    prefix = f"/aws-service-role/{BATCH_SERVICE}/"
    with aws_errors("find the AWS Batch service-linked role"):
        for page in iam.get_paginator("list_roles").paginate(PathPrefix=prefix):
            for role in page["Roles"]:
                ctx.found("service-linked-role", role["RoleName"])
                return role["Arn"]
        role = iam.create_service_linked_role(AWSServiceName=BATCH_SERVICE)["Role"]
        ctx.created("service-linked-role", role["RoleName"])
        return role["Arn"]


def check_policy_is_narrow(doc: dict[str, Any]) -> None:
    """Refuse a policy with a wildcard action (used by tests and as a guard before writing)."""
    for stmt in doc.get("Statement", []):
        actions = stmt.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        for a in actions:
            if a == "*" or a.endswith(":*"):
                raise ProvisionError(f"policy statement {stmt.get('Sid', '?')} grants {a!r}",
                                     "this is a bug in corral: please report it")
