"""Fixtures for the storage tests: a test rclone.conf with a canary secret, an S3 bucket on moto."""

from __future__ import annotations

import os
import subprocess
import sys
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
def bucket(aws: str) -> Iterator[tuple[Any, str]]:
    """An S3 client on the moto server and an empty bucket."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=aws)
    name = "corral-test-data"
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": os.environ["AWS_REGION"]})
    yield s3, name
