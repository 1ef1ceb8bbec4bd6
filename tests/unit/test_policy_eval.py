"""The test-side IAM evaluator (tests/policy_eval.py) gets AWS's rules right for what corral uses."""

from __future__ import annotations

import pytest
from policy_eval import ALLOW, DENY, IMPLICIT_DENY, Request, decide

V = "2012-10-17"


def _p(*statements: dict) -> dict:
    return {"Version": V, "Statement": list(statements)}


def test_allow_deny_and_implicit_deny() -> None:
    allow = _p({"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "arn:aws:s3:::b/runs/r1/*"})
    assert decide(Request("s3:GetObject", "arn:aws:s3:::b/runs/r1/x/y"), [allow]) == ALLOW
    assert decide(Request("s3:getobject", "arn:aws:s3:::b/runs/r1/x"), [allow]) == ALLOW  # actions: any case
    assert decide(Request("s3:GetObject", "arn:aws:s3:::b/runs/r2/x"), [allow]) == IMPLICIT_DENY
    assert decide(Request("s3:PutObject", "arn:aws:s3:::b/runs/r1/x"), [allow]) == IMPLICIT_DENY
    deny = _p({"Effect": "Deny", "Principal": "*", "Action": "s3:*", "Resource": "*",
               "Condition": {"Bool": {"aws:SecureTransport": "false"}}})
    req = Request("s3:GetObject", "arn:aws:s3:::b/runs/r1/x", "arn:aws:iam::1:role/x", {"aws:SecureTransport": "false"})
    assert decide(req, [allow], [deny]) == DENY  # an explicit Deny wins
    req = Request("s3:GetObject", "arn:aws:s3:::b/runs/r1/x", "arn:aws:iam::1:role/x", {"aws:SecureTransport": "true"})
    assert decide(req, [allow], [deny]) == ALLOW
    assert decide(Request("s3:GetObject", "arn:aws:s3:::b/runs/r1/x"), [allow], [deny]) == ALLOW  # key absent: no Deny


def test_wildcards_and_conditions() -> None:
    secret = _p({"Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"],
                 "Resource": "arn:aws:secretsmanager:r:1:secret:lab/db-??????"})
    assert decide(Request("secretsmanager:GetSecretValue", "arn:aws:secretsmanager:r:1:secret:lab/db-AbCdEf"),
                  [secret]) == ALLOW
    assert decide(Request("secretsmanager:GetSecretValue", "arn:aws:secretsmanager:r:1:secret:lab/db-AbCdEfG"),
                  [secret]) == IMPLICIT_DENY  # ? is exactly one character
    listing = _p({"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": "arn:aws:s3:::b",
                  "Condition": {"StringLike": {"s3:prefix": ["runs/r1/*"]}}})
    assert decide(Request("s3:ListBucket", "arn:aws:s3:::b", context={"s3:prefix": "runs/r1/a"}), [listing]) == ALLOW
    assert decide(Request("s3:ListBucket", "arn:aws:s3:::b", context={"s3:prefix": "runs/r2/"}), [listing]) != ALLOW
    assert decide(Request("s3:ListBucket", "arn:aws:s3:::b"), [listing]) != ALLOW  # no prefix sent (HeadBucket)
    only = _p({"Effect": "Deny", "Principal": {"AWS": "*"}, "Action": "x:Y", "Resource": "*",
               "Condition": {"ArnNotLike": {"aws:PrincipalArn": ["arn:aws:iam::1:role/corral/*"]}}})
    anything = _p({"Effect": "Allow", "Action": "x:*", "Resource": "*"})
    assert decide(Request("x:Y", "r", "arn:aws:iam::1:role/corral/job"), [anything], [only]) == ALLOW
    assert decide(Request("x:Y", "r", "arn:aws:iam::1:role/other"), [anything], [only]) == DENY
    null = _p({"Effect": "Deny", "Principal": "*", "Action": "x:Y", "Resource": "*",
               "Condition": {"Null": {"k": "true"}}})
    assert decide(Request("x:Y", "r", context={}), [anything], [null]) == DENY
    assert decide(Request("x:Y", "r", context={"k": "v"}), [anything], [null]) == ALLOW


def test_unknown_constructs_are_refused_not_ignored() -> None:
    with pytest.raises(ValueError):
        decide(Request("a:B", "r"), [_p({"Effect": "Allow", "NotAction": "a:C", "Resource": "*"})])
    with pytest.raises(ValueError):
        decide(Request("a:B", "r"), [_p({"Effect": "Allow", "Action": "a:B", "Resource": "*",
                                         "Condition": {"NumericLessThan": {"k": "1"}}})])
