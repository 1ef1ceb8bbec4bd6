from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_registry import FakeRegistry  # noqa: E402
from moto_server import REGION, default_vpc_as_on_aws, moto_server, reset  # noqa: E402
from strict_aws import StrictAws  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own CORRAL_HOME; no test sees the user's real state or AWS config."""
    home = tmp_path / "corral-home"
    monkeypatch.setenv("CORRAL_HOME", str(home))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """One moto server for the session, on 127.0.0.1 with a free port (batch without Docker)."""
    with moto_server() as url:
        yield url


@pytest.fixture(scope="session", autouse=True)
def rclone_registry() -> Iterator[FakeRegistry]:
    """A registry on 127.0.0.1 with a stand-in for the official rclone image: what corral copies
    into (moto's) ECR for transfer jobs instead of Docker Hub (tests/fake_registry.py). Set for the
    whole session (module fixtures and subprocesses included), so no test reaches docker.io."""
    import os

    registry = FakeRegistry().start()
    old = os.environ.get("CORRAL_RCLONE_SOURCE")
    os.environ["CORRAL_RCLONE_SOURCE"] = registry.reference
    yield registry
    if old is None:
        os.environ.pop("CORRAL_RCLONE_SOURCE", None)
    else:
        os.environ["CORRAL_RCLONE_SOURCE"] = old
    registry.stop()


@pytest.fixture
def strict_aws(moto_url: str) -> Iterator[StrictAws]:
    """The strict-AWS layer (tests/strict_aws.py): every botocore client made while it is active
    refuses what AWS would refuse. On for every test that uses ``aws``."""
    layer = StrictAws(endpoint_url=moto_url, region=REGION)
    with layer.active():
        yield layer


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch, strict_aws: StrictAws,
        rclone_registry: FakeRegistry) -> Iterator[str]:
    """Point boto3 at the moto server with dummy credentials, under the strict-AWS layer, and
    corral's rclone image source at the fake registry; the server is reset after the test."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("CORRAL_RCLONE_SOURCE", rclone_registry.reference)
    monkeypatch.delenv("CORRAL_RCLONE_IMAGE", raising=False)
    # Before the test, not on its first EC2 call: tests that run `corral` in a subprocess use
    # clients the in-process layer never sees.
    default_vpc_as_on_aws(moto_url)
    yield moto_url
    reset(moto_url)
