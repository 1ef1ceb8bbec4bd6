"""corral-managed Secrets Manager secrets (the rclone config of a run), made and removed by corral.

Every function takes a ``secretsmanager`` client (from ``AwsClients``), so nothing here makes one.
A run's secret is named ``corral/<run_id>/<purpose>`` and tagged ``corral:managed=true`` and
``corral:run=<run_id>``; :func:`delete_run_secrets` / :func:`delete_managed_secrets` find them by
those tags. The value never leaves these calls: not in a return value, an error message or a log.

On AWS Batch a secret reaches a container through the job definition's ``secrets`` list
(``{"name": ENV, "valueFrom": ARN}``): the ECS agent reads it with the job's *execution role*,
which therefore needs ``secretsmanager:GetSecretValue`` on exactly these ARNs
(:func:`read_statement`). :func:`restrict_readers` adds a resource policy that denies
``GetSecretValue`` to every other principal of the account.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from corral.errors import ProvisionError

MANAGED_TAG = "corral:managed"
RUN_TAG = "corral:run"
PREFIX = "corral"


def secret_name(run_id: str, purpose: str = "rclone", *, prefix: str = PREFIX) -> str:
    return f"{prefix}/{run_id}/{purpose}"


def _code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None)
    return str(resp.get("Error", {}).get("Code", "")) if isinstance(resp, dict) else ""


def _fail(action: str, name: str, exc: BaseException) -> ProvisionError:
    code = _code(exc) or type(exc).__name__
    hint = (
        "your AWS identity needs secretsmanager:CreateSecret/PutSecretValue/TagResource/DeleteSecret"
        if code in ("AccessDeniedException", "AccessDenied")
        else "check Secrets Manager in this account and region"
    )
    return ProvisionError(f"cannot {action} secret {name}: {code}", hint)


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
        if _code(exc) != "ResourceExistsException":
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
                        if _code(exc) != "ResourceNotFoundException":
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


def reader_policy(reader_role_arns: Iterable[str]) -> str:
    """A resource policy: nobody but these roles may read the secret's value."""
    roles = sorted(reader_role_arns)
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
