"""Fixtures for the storage tests: a test rclone.conf with a canary secret, an S3 bucket on moto."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from storage_helpers import CANARY, RCLONE  # noqa: E402


@dataclass
class RcloneSetup:
    conf: Path  # the user's rclone.conf
    data: Path  # folder behind the `data:` alias remote
    canary: str
    obscured: str  # the canary as rclone stores it (obscured) in the used `vault:` remote


@pytest.fixture
def rclone_setup(tmp_path: Path) -> RcloneSetup:
    """`data:` (alias of a folder), `vault:` (crypt over data:, password = canary), `unused:` (S3 with
    the canary as its secret key, never used by a workflow)."""
    assert RCLONE is not None
    obscured = subprocess.run(
        [RCLONE, "obscure", CANARY], capture_output=True, text=True, check=True
    ).stdout.strip()
    data = tmp_path / "remote-data"
    data.mkdir()
    conf = tmp_path / "user-rclone.conf"
    conf.write_text(
        f"[data]\ntype = alias\nremote = {data}\n\n"
        f"[vault]\ntype = crypt\nremote = data:vault\npassword = {obscured}\n\n"
        f"[unused]\ntype = s3\nprovider = AWS\naccess_key_id = AKIAUNUSED\nsecret_access_key = {CANARY}\n"
    )
    conf.chmod(0o600)
    return RcloneSetup(conf=conf, data=data, canary=CANARY, obscured=obscured)


@pytest.fixture
def aws_light(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Like the `aws` fixture (boto3 → the moto server, dummy credentials) without resetting the
    whole server afterwards (~2 s each): tests using it remove what they made."""
    from moto_server import REGION

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION, "AWS_ENDPOINT_URL": moto_url,
    }.items():
        monkeypatch.setenv(k, v)
    yield moto_url


@pytest.fixture
def bucket(aws_light: str) -> Iterator[tuple[Any, str]]:
    """An S3 client on the moto server and an empty bucket of the test's own (removed afterwards)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=aws_light)
    name = f"corral-test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": os.environ["AWS_REGION"]})
    yield s3, name
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=name, Delete={"Objects": keys})
    for up in s3.list_multipart_uploads(Bucket=name).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
    s3.delete_bucket(Bucket=name)
