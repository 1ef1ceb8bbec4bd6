"""ECR (issue 8): repositories, lifecycle policy, login token, ecr:// resolution, push through an engine."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

import pytest
from provision_helpers import CallLog

from corral.backends.aws_batch import AwsClients, ecr
from corral.errors import ProvisionError, UsageError

pytestmark = pytest.mark.aws


@pytest.fixture
def clients(aws: str) -> AwsClients:
    return AwsClients()


def test_repository_is_created_once_with_scanning_lifecycle_and_tags(clients: AwsClients) -> None:
    uri = ecr.ensure_repository(clients, "my-sorter", keep_untagged=5)
    assert uri == "123456789012.dkr.ecr.us-east-2.amazonaws.com/my-sorter"
    repo = clients.ecr.describe_repositories(repositoryNames=["my-sorter"])["repositories"][0]
    assert repo["imageScanningConfiguration"]["scanOnPush"] is True
    assert repo["imageTagMutability"] == "MUTABLE"
    policy = json.loads(clients.ecr.get_lifecycle_policy(repositoryName="my-sorter")["lifecyclePolicyText"])
    (rule,) = policy["rules"]
    assert rule["selection"] == {"tagStatus": "untagged", "countType": "imageCountMoreThan", "countNumber": 5}
    assert rule["action"] == {"type": "expire"}
    tags = clients.ecr.list_tags_for_resource(resourceArn=repo["repositoryArn"])["tags"]
    assert {"Key": "corral:managed", "Value": "true"} in tags

    log = CallLog(clients)
    assert ecr.ensure_repository(clients, "my-sorter", keep_untagged=5) == uri
    assert log.mutating() == []
    # a different retention updates the policy in place
    ecr.ensure_repository(clients, "my-sorter", keep_untagged=3)
    assert log.mutating() == ["ecr.PutLifecyclePolicy"]


def test_immutable_tags_on_request(clients: AwsClients) -> None:
    ecr.ensure_repository(clients, "lab/tools", immutable=True)
    repo = clients.ecr.describe_repositories(repositoryNames=["lab/tools"])["repositories"][0]
    assert repo["imageTagMutability"] == "IMMUTABLE"


def test_bad_repository_name_is_refused(clients: AwsClients) -> None:
    with pytest.raises(UsageError):
        ecr.ensure_repository(clients, "My Sorter")


def test_authorization_token_decodes_to_a_login(clients: AwsClients) -> None:
    auth = ecr.authorization(clients)
    assert auth.username == "AWS" and auth.password
    assert auth.registry == "123456789012.dkr.ecr.us-east-2.amazonaws.com"


def test_resolve_image(clients: AwsClients) -> None:
    reg = "123456789012.dkr.ecr.us-east-2.amazonaws.com"
    assert ecr.resolve_image("ecr://my-sorter:1.2", clients) == f"{reg}/my-sorter:1.2"
    assert ecr.resolve_image("ecr://lab/tools", clients) == f"{reg}/lab/tools:latest"
    digest = "sha256:" + "a" * 64
    assert ecr.resolve_image(f"ecr://my-sorter@{digest}", clients) == f"{reg}/my-sorter@{digest}"
    assert ecr.resolve_image("python:3.12-slim", clients) == "python:3.12-slim"
    assert ecr.resolve_image("ecr://x:1", account_id="210987654321", region="cn-north-1") == \
        "210987654321.dkr.ecr.cn-north-1.amazonaws.com.cn/x:1"
    with pytest.raises(UsageError):
        ecr.resolve_image("ecr://:1.2", clients)


def test_split_and_default_repository() -> None:
    assert ecr.split_image("ghcr.io/lab/sorter:1.0") == ("ghcr.io", "lab/sorter", ":1.0")
    assert ecr.split_image("localhost:5000/x") == ("localhost:5000", "x", "")
    assert ecr.repository_for("My-Sorter:1.2") == "my-sorter"
    assert ecr.repository_for("docker.io/library/python:3.12") == "python"


@dataclass
class FakeEngine:
    """A container engine boundary: records each argv (and stdin) and answers as told."""

    running: bool = True
    images: set[str] = field(default_factory=lambda: {"my-sorter:1.2"})
    calls: list[tuple[list[str], str | None]] = field(default_factory=list)

    def __call__(self, argv: list[str], *, input: str | None = None, capture: bool = True,
                 timeout: float | None = None) -> Any:
        self.calls.append((list(argv), input))
        verb = argv[1]
        if verb == "info":
            return _R(0, "27.0.1\n") if self.running else _R(1, "", "Cannot connect to the Docker daemon")
        if verb == "image":
            return _R(0, "sha256:abc\n") if argv[-1] in self.images else _R(1, "", "No such image")
        return _R(0)


@dataclass
class _R:
    returncode: int
    stdout: str = ""
    stderr: str = ""


def test_push_logs_in_with_stdin_tags_and_pushes(clients: AwsClients) -> None:
    engine = FakeEngine()
    uri = ecr.push("my-sorter:1.2", clients, runner=engine, engine="docker")
    reg = "123456789012.dkr.ecr.us-east-2.amazonaws.com"
    assert uri == f"{reg}/my-sorter:1.2"
    argvs = [a for a, _ in engine.calls]
    assert argvs[0][:2] == ["docker", "info"]
    assert argvs[1][:3] == ["docker", "image", "inspect"]
    login, stdin = engine.calls[2]
    assert login == ["docker", "login", "--username", "AWS", "--password-stdin", reg]
    password = ecr.authorization(clients).password
    assert stdin == password and all(password not in a for a in argvs)
    assert argvs[3] == ["docker", "tag", "my-sorter:1.2", uri]
    assert argvs[4] == ["docker", "push", uri]
    assert clients.ecr.describe_repositories(repositoryNames=["my-sorter"])["repositories"]


def test_push_to_a_named_repository(clients: AwsClients) -> None:
    engine = FakeEngine(images={"sorter"})
    uri = ecr.push("sorter", clients, repository="lab/sorter", runner=engine, engine="podman")
    assert uri.endswith("/lab/sorter:latest")
    assert engine.calls[-1][0] == ["podman", "push", uri]


def test_push_without_a_running_engine_says_so(clients: AwsClients) -> None:
    with pytest.raises(ProvisionError) as exc:
        ecr.push("my-sorter:1.2", clients, runner=FakeEngine(running=False))
    assert "no container engine is running" in exc.value.message
    assert "Cannot connect" in exc.value.message and "start Docker" in exc.value.hint


def test_push_of_a_missing_image_says_so(clients: AwsClients) -> None:
    with pytest.raises(ProvisionError, match="not in the local docker image store"):
        ecr.push("nope:1", clients, runner=FakeEngine(), engine="docker")
    assert clients.ecr.describe_repositories()["repositories"] == []  # nothing made for nothing


def test_list_repositories_lists_corrals_only(clients: AwsClients) -> None:
    ecr.ensure_repository(clients, "my-sorter")
    clients.ecr.create_repository(repositoryName="not-corrals")
    # (ECR refuses a manifest whose config was not uploaded: LayersNotFoundException, strict layer)
    config = b"{}"
    upload = clients.ecr.initiate_layer_upload(repositoryName="my-sorter")["uploadId"]
    clients.ecr.upload_layer_part(repositoryName="my-sorter", uploadId=upload, partFirstByte=0, partLastByte=1,
                                  layerPartBlob=config)
    digest = clients.ecr.complete_layer_upload(repositoryName="my-sorter", uploadId=upload,
                                               layerDigests=["sha256:" + hashlib.sha256(config).hexdigest()])["layerDigest"]
    clients.ecr.put_image(repositoryName="my-sorter", imageTag="1.2", imageManifest=json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
         "config": {"digest": digest, "size": 2, "mediaType": "application/vnd.docker.container.image.v1+json"},
         "layers": []}))
    repos = ecr.list_repositories(clients)
    assert [r["repository"] for r in repos] == ["my-sorter"]
    assert repos[0]["images"][0]["tags"] == ["1.2"]
    assert {r["repository"] for r in ecr.list_repositories(clients, everything=True)} == {"my-sorter", "not-corrals"}


def _engine_answers() -> str | None:
    for name in ecr.ENGINES:
        if shutil.which(name):
            try:
                p = subprocess.run([name, "info"], capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if p.returncode == 0:
                return name
    return None


def test_real_engine_boundary(clients: AwsClients) -> None:
    """With a real engine the default runner finds it; where none answers we say why and skip."""
    engine = _engine_answers()
    if engine is None:
        reason = "no container engine answers here (docker/podman daemon not running): real push not tried"
        print(reason)
        with pytest.raises(ProvisionError, match="no container engine is running"):
            ecr.find_engine()
        pytest.skip(reason)
    assert ecr.find_engine() == engine
