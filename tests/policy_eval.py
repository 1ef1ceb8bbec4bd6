"""A small IAM policy evaluator for the subset of the policy language corral writes.

moto stores IAM, bucket, secret and file-system policies but does not evaluate them the way AWS
does, so the AWS tests ask this evaluator instead: "may this principal do this action on this
resource with this request context?". It follows the IAM user guide's evaluation logic for one
account ("Policy evaluation logic"; "Determining whether a request is allowed or denied within an
account"): an explicit Deny in any policy wins; otherwise an Allow in an identity-based policy or
in the resource's policy allows; otherwise the request is implicitly denied.

Supported, and refused loudly when a policy uses anything else (so a test cannot pass by
accident on a construct this evaluator ignores):
- ``Effect`` Allow/Deny, ``Action`` (no ``NotAction``), ``Resource`` (no ``NotResource``), with
  ``*`` and ``?`` wildcards (IAM: ``*`` matches any run of characters, ``/`` included);
- ``Principal`` in resource policies: ``"*"``, ``{"AWS": "*"}``, ``{"AWS": [ARN, ...]}``,
  ``{"Service": ...}`` (matched against ``Request.principal``);
- conditions ``StringEquals``/``StringNotEquals``/``StringLike``/``StringNotLike``,
  ``ArnEquals``/``ArnNotEquals``/``ArnLike``/``ArnNotLike``, ``Bool``, ``Null``: keys within an
  operator and operators within a block AND together, values of one key OR together, a missing
  key makes a positive operator false and a negated one true (IAM user guide, "Condition
  operators"; "...IfExists" and multi-valued set operators are not used by corral).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

ALLOW, DENY, IMPLICIT_DENY = "Allow", "Deny", "ImplicitDeny"

_KNOWN_STATEMENT_KEYS = {"Sid", "Effect", "Action", "Resource", "Condition", "Principal"}
_OPERATORS = {
    "StringEquals", "StringNotEquals", "StringLike", "StringNotLike",
    "ArnEquals", "ArnNotEquals", "ArnLike", "ArnNotLike", "Bool", "Null",
}


@dataclass
class Request:
    action: str
    resource: str
    principal: str | None = None  # the role ARN (None: anonymous)
    context: Mapping[str, Any] = field(default_factory=dict)  # condition keys → value


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _wildcard(pattern: str, value: str, *, case: bool = True) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, 0 if case else re.IGNORECASE) is not None


def _arn_like(pattern: str, value: str) -> bool:
    # ArnLike compares the six colon-separated parts, each with wildcards (IAM "ARN condition operators").
    p, v = pattern.split(":", 5), value.split(":", 5)
    return len(p) == len(v) == 6 and all(_wildcard(a, b) for a, b in zip(p, v, strict=True))


def _condition_holds(op: str, key: str, expected: Any, context: Mapping[str, Any]) -> bool:
    values = [str(x) for x in _as_list(expected)]
    if op == "Null":
        (want,) = values
        return (key not in context) == (want.lower() == "true")
    if key not in context:
        return op in ("StringNotEquals", "StringNotLike", "ArnNotEquals", "ArnNotLike")
    actual = context[key]
    if op == "Bool":
        return any(str(actual).lower() == v.lower() for v in values)
    actual_s = str(actual)
    match = {
        "StringEquals": lambda v: actual_s == v,
        "StringNotEquals": lambda v: actual_s == v,
        "StringLike": lambda v: _wildcard(v, actual_s),
        "StringNotLike": lambda v: _wildcard(v, actual_s),
        "ArnEquals": lambda v: actual_s == v,
        "ArnNotEquals": lambda v: actual_s == v,
        "ArnLike": lambda v: _arn_like(v, actual_s),
        "ArnNotLike": lambda v: _arn_like(v, actual_s),
    }[op]
    hit = any(match(v) for v in values)
    return not hit if "Not" in op else hit


def _conditions_hold(block: Mapping[str, Mapping[str, Any]], context: Mapping[str, Any]) -> bool:
    for op, keys in block.items():
        if op not in _OPERATORS:
            raise ValueError(f"policy_eval does not know the condition operator {op!r}")
        for key, expected in keys.items():
            if not _condition_holds(op, key, expected, context):
                return False
    return True


def _principal_matches(principal: Any, who: str | None) -> bool:
    if principal == "*":
        return True
    if not isinstance(principal, Mapping):
        raise ValueError(f"policy_eval does not know the principal {principal!r}")
    for kind, values in principal.items():
        if kind not in ("AWS", "Service"):
            raise ValueError(f"policy_eval does not know the principal kind {kind!r}")
        for v in _as_list(values):
            if v == "*" and kind == "AWS" and who is not None:
                return True
            if who is not None and v == who:
                return True
    return False


def _statement_applies(stmt: Mapping[str, Any], req: Request, *, resource_policy: bool) -> bool:
    unknown = set(stmt) - _KNOWN_STATEMENT_KEYS
    if unknown:
        raise ValueError(f"policy_eval does not know statement keys {sorted(unknown)}")
    if stmt["Effect"] not in (ALLOW, DENY):
        raise ValueError(f"bad Effect {stmt['Effect']!r}")
    if resource_policy:
        # "Principal": "*" in a Deny also covers anonymous requests.
        if not (stmt.get("Principal") == "*" or _principal_matches(stmt["Principal"], req.principal)):
            return False
    elif "Principal" in stmt:
        raise ValueError("an identity-based policy has no Principal")
    if not any(_wildcard(a, req.action, case=False) for a in _as_list(stmt["Action"])):
        return False
    if not any(_wildcard(r, req.resource) for r in _as_list(stmt["Resource"])):
        return False
    return _conditions_hold(stmt.get("Condition", {}), req.context)


def _docs(policies: Iterable[Mapping[str, Any] | str]) -> list[Mapping[str, Any]]:
    out = []
    for p in policies:
        doc = json.loads(p) if isinstance(p, str) else p
        if doc.get("Version") != "2012-10-17":
            raise ValueError("policies must say Version 2012-10-17 (the older version has no ${} variables)")
        out.append(doc)
    return out


def decide(
    req: Request,
    identity: Iterable[Mapping[str, Any] | str] = (),
    resource: Iterable[Mapping[str, Any] | str] = (),
) -> str:
    """ALLOW, DENY (an explicit Deny applied) or IMPLICIT_DENY, for a request within one account."""
    allowed = False
    if req.principal is not None:  # AWS puts the principal's ARN in every request's context
        req = Request(req.action, req.resource, req.principal, {"aws:PrincipalArn": req.principal, **req.context})
    for docs, is_resource in ((_docs(identity), False), (_docs(resource), True)):
        for doc in docs:
            for stmt in _as_list(doc["Statement"]):
                if _statement_applies(stmt, req, resource_policy=is_resource):
                    if stmt["Effect"] == DENY:
                        return DENY
                    allowed = True
    return ALLOW if allowed else IMPLICIT_DENY


def allowed(req: Request, identity: Iterable[Any] = (), resource: Iterable[Any] = ()) -> bool:
    return decide(req, identity, resource) == ALLOW
