"""corral-managed Secrets Manager secrets (the rclone config of a run), made and removed by corral.

Every function takes a ``secretsmanager`` client (from ``AwsClients``), so nothing here makes one.
A run's secret is named ``corral/<run_id>/<purpose>`` and tagged ``corral:managed=true`` and
``corral:run=<run_id>``; :func:`delete_run_secrets` / :func:`delete_managed_secrets` find them by
those tags. The value never leaves these calls: not in a return value, an error message or a log.

On AWS Batch a secret reaches a container through the job definition's ``secrets`` list
(``{"name": ENV, "valueFrom": ARN}``): the ECS agent reads it with the job's *execution role*,
which therefore needs ``secretsmanager:GetSecretValue`` on exactly these ARNs
(:func:`read_statement`). :func:`restrict_readers` (called by the AWS backend right after it
makes the run's secret) adds a resource policy (PutResourcePolicy) that denies
``GetSecretValue`` to every principal but the run's execution role — also to the account's
administrators; corral itself never reads the value back.

With ``aws: secrets: ssm`` the same value is an SSM Parameter Store **SecureString**
``/<prefix>/<run_id>/<purpose>`` (encrypted with the account's ``aws/ssm`` key, same tags), made by
:func:`create_parameter` and removed by :func:`delete_parameters`; the execution role reads it with
``ssm:GetParameters`` on its ARN and ``kms:Decrypt`` only via SSM (:func:`parameter_statements`).
Parameter Store has no resource policies: there, who may read the parameter rests on identity
policies alone (corral's roles grant it only to the run's execution role; an account identity with
``ssm:GetParameter*`` on ``*`` and ``kms:Decrypt`` on the ``aws/ssm`` key can read it too).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from corral.aws_api import error_code
from corral.errors import ProvisionError

MANAGED_TAG = "corral:managed"
RUN_TAG = "corral:run"
PREFIX = "corral"


def secret_name(run_id: str, purpose: str = "rclone", *, prefix: str = PREFIX) -> str:
    return f"{prefix}/{run_id}/{purpose}"


def _fail(action: str, name: str, exc: BaseException, *, ssm: bool = False) -> ProvisionError:
    """A one-line error for a failed Secrets Manager (or, ``ssm``, Parameter Store) call."""
    code = error_code(exc) or type(exc).__name__
    what, service, actions = (
        ("SSM parameter", "SSM Parameter Store",
         "ssm:PutParameter/AddTagsToResource/DeleteParameter(s)/DescribeParameters") if ssm
        else ("secret", "Secrets Manager", "secretsmanager:CreateSecret/PutSecretValue/TagResource/DeleteSecret")
    )
    hint = (
        f"your AWS identity needs {actions}" if code in ("AccessDeniedException", "AccessDenied")
        else f"check {service} in this account and region"
    )
    return ProvisionError(f"cannot {action} {what} {name}: {code}", hint)


def create_secret(
    sm: Any, *, run_id: str, value: str, purpose: str = "rclone", prefix: str = PREFIX,
    tags: Mapping[str, str] | None = None, kms_key_id: str | None = None,
) -> str:
    """Create (or update, when it exists from an earlier attempt) the run's secret; return its ARN."""
    name = secret_name(run_id, purpose, prefix=prefix)
    all_tags = {**(tags or {}), MANAGED_TAG: "true", RUN_TAG: run_id}
    tag_list = [{"Key": k, "Value": v} for k, v in sorted(all_tags.items())]
    kwargs: dict[str, Any] = {
        "Name": name, "SecretString": value, "Tags": tag_list,
        "Description": f"corral: {purpose} for run {run_id} (deleted with the run)",
    }
    if kms_key_id:
        kwargs["KmsKeyId"] = kms_key_id
    try:
        return str(sm.create_secret(**kwargs)["ARN"])
    except Exception as exc:
        if error_code(exc) != "ResourceExistsException":
            raise _fail("create", name, exc) from None
    try:
        desc = sm.describe_secret(SecretId=name)
        have = {t["Key"]: t["Value"] for t in desc.get("Tags", [])}
        if have.get(MANAGED_TAG) != "true" or have.get(RUN_TAG) != run_id:
            raise ProvisionError(
                f"secret {name} exists but was not made by corral for run {run_id}",
                "delete or rename that secret, or use another corral prefix",
            )
        sm.put_secret_value(SecretId=desc["ARN"], SecretString=value)
        return str(desc["ARN"])
    except ProvisionError:
        raise
    except Exception as exc:
        raise _fail("update", name, exc) from None


def _managed(tags: Iterable[Mapping[str, str]] | None, run_id: str | None) -> bool:
    d = {t["Key"]: t["Value"] for t in tags or []}
    return d.get(MANAGED_TAG) == "true" and (run_id is None or d.get(RUN_TAG) == run_id)


def _delete_where(sm: Any, run_id: str | None) -> list[str]:
    key = RUN_TAG if run_id else MANAGED_TAG
    deleted: list[str] = []
    try:
        pages = sm.get_paginator("list_secrets").paginate(Filters=[{"Key": "tag-key", "Values": [key]}])
        for page in pages:
            for s in page.get("SecretList", []):
                if _managed(s.get("Tags"), run_id):
                    try:
                        sm.delete_secret(SecretId=s["ARN"], ForceDeleteWithoutRecovery=True)
                    except Exception as exc:
                        if error_code(exc) != "ResourceNotFoundException":
                            raise
                    deleted.append(str(s["Name"]))
    except ProvisionError:
        raise
    except Exception as exc:
        raise _fail("delete", f"(corral secrets of run {run_id})" if run_id else "(corral secrets)", exc) from None
    return deleted


def delete_run_secrets(sm: Any, run_id: str) -> list[str]:
    """Delete (without the recovery window) every corral-managed secret of the run; their names."""
    return _delete_where(sm, run_id)


def delete_managed_secrets(sm: Any) -> list[str]:
    """Delete every corral-managed secret (``corral aws teardown``)."""
    return _delete_where(sm, None)


def read_statement(arns: Iterable[str]) -> dict[str, Any]:
    """The IAM statement the execution role needs to hand these secrets to containers."""
    return {"Sid": "CorralRunSecrets", "Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"],
            "Resource": sorted(arns)}


def _with_and_without_path(role_arn: str) -> list[str]:
    """A role ARN with its path (``role/corral/x``) and without (``role/x``): ``aws:PrincipalArn``
    is documented as the role's ARN; both forms are listed so the role is never locked out."""
    head, sep, rest = role_arn.partition(":role/")
    if not sep or "/" not in rest:
        return [role_arn]
    return [role_arn, f"{head}:role/{rest.rsplit('/', 1)[1]}"]


def reader_policy(reader_role_arns: Iterable[str]) -> str:
    """A resource policy: nobody but these roles may read the secret's value."""
    roles = sorted({a for arn in reader_role_arns for a in _with_and_without_path(arn)})
    if not roles or not all(r.startswith("arn:") for r in roles):
        raise ValueError(f"reader_policy needs role ARNs, not {roles!r}")
    return json.dumps({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "OnlyCorralJobsRead",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "secretsmanager:GetSecretValue",
            "Resource": "*",
            "Condition": {"StringNotEquals": {"aws:PrincipalArn": roles}},
        }],
    }, sort_keys=True)


def restrict_readers(sm: Any, secret_arn: str, reader_role_arns: Iterable[str]) -> None:
    try:
        sm.put_resource_policy(SecretId=secret_arn, ResourcePolicy=reader_policy(reader_role_arns))
    except Exception as exc:
        raise _fail("restrict", secret_arn, exc) from None


# -- SSM Parameter Store (``aws: secrets: ssm``) -------------------------------------------------
def parameter_name(run_id: str, purpose: str = "rclone", *, prefix: str = PREFIX) -> str:
    return f"/{prefix}/{run_id}/{purpose}"


def parameter_arn(name: str, *, region: str, account_id: str, partition: str = "aws") -> str:
    return f"arn:{partition}:ssm:{region}:{account_id}:parameter/{name.lstrip('/')}"


def _param_tags(ssm: Any, name: str) -> dict[str, str]:
    tags = ssm.list_tags_for_resource(ResourceType="Parameter", ResourceId=name).get("TagList", [])
    return {t["Key"]: t["Value"] for t in tags}


def create_parameter(
    ssm: Any, *, run_id: str, value: str, account_id: str, partition: str = "aws", purpose: str = "rclone",
    prefix: str = PREFIX, tags: Mapping[str, str] | None = None,
) -> str:
    """Create (or overwrite, when an earlier attempt made it) the run's SecureString; its ARN.

    The value is only ever sent in PutParameter; nothing here reads it back."""
    name = parameter_name(run_id, purpose, prefix=prefix)
    all_tags = {**(tags or {}), MANAGED_TAG: "true", RUN_TAG: run_id}
    common: dict[str, Any] = {
        "Name": name, "Value": value, "Type": "SecureString", "Tier": "Advanced" if len(value) > 4096 else "Standard",
        "Description": f"corral: {purpose} for run {run_id} (deleted with the run)",
    }
    try:
        ssm.put_parameter(**common, Tags=[{"Key": k, "Value": v} for k, v in sorted(all_tags.items())])
    except Exception as exc:
        if error_code(exc) != "ParameterAlreadyExists":
            raise _fail("create", name, exc, ssm=True) from None
        try:
            have = _param_tags(ssm, name)
            if have.get(MANAGED_TAG) != "true" or have.get(RUN_TAG) != run_id:
                raise ProvisionError(
                    f"SSM parameter {name} exists but was not made by corral for run {run_id}",
                    "delete or rename that parameter, or use another corral prefix",
                ) from None
            ssm.put_parameter(**common, Overwrite=True)
        except ProvisionError:
            raise
        except Exception as exc2:
            raise _fail("update", name, exc2, ssm=True) from None
    region = ssm.meta.region_name
    return parameter_arn(name, region=region, account_id=account_id, partition=partition)


def delete_parameters(ssm: Any, run_id: str | None, *, prefix: str = PREFIX) -> list[str]:
    """Delete the run's corral-managed parameters under ``/<prefix>/<run_id>/`` (every
    corral-managed one under ``/<prefix>/`` when ``run_id`` is None); their names."""
    path = f"/{prefix}/{run_id}/" if run_id else f"/{prefix}/"
    deleted: list[str] = []
    try:
        pages = ssm.get_paginator("describe_parameters").paginate(
            ParameterFilters=[{"Key": "Name", "Option": "BeginsWith", "Values": [path]}]
        )
        for page in pages:
            for p in page.get("Parameters", []):
                name = str(p["Name"])
                if not _managed([{"Key": k, "Value": v} for k, v in _param_tags(ssm, name).items()], run_id):
                    continue
                try:
                    ssm.delete_parameter(Name=name)
                except Exception as exc:
                    if error_code(exc) != "ParameterNotFound":
                        raise
                deleted.append(name)
    except Exception as exc:
        raise _fail("delete", f"(corral parameters under {path})", exc, ssm=True) from None
    return deleted


def parameter_statements(arns: Iterable[str], *, region: str, account_id: str, partition: str = "aws") -> list[dict[str, Any]]:
    """What an execution role needs to hand these SecureStrings to containers: ``ssm:GetParameters``
    on exactly them, and ``kms:Decrypt`` only through SSM in this region for these parameters."""
    arns = sorted(arns)
    if not arns:
        return []
    return [
        {"Sid": "RunParameters", "Effect": "Allow", "Action": ["ssm:GetParameters"], "Resource": arns},
        {"Sid": "RunParametersDecrypt", "Effect": "Allow", "Action": ["kms:Decrypt"],
         "Resource": f"arn:{partition}:kms:{region}:{account_id}:key/*",
         "Condition": {"StringEquals": {"kms:ViaService": f"ssm.{region}.amazonaws.com",
                                        "kms:EncryptionContext:PARAMETER_ARN": arns}}},
    ]
