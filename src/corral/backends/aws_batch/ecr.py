"""Private images in ECR: repositories, registry login, ``ecr://`` resolution, push.

- :func:`ensure_repository` — idempotent: scan on push, AES-256 encryption, optional tag
  immutability, a lifecycle policy expiring untagged images beyond the last N, tagged
  ``corral:managed``.
- :func:`resolve_image` — ``ecr://name:tag`` → ``<account>.dkr.ecr.<region>.amazonaws.com/name:tag``.
- :func:`authorization` — registry credentials from boto3's ``get_authorization_token`` (never the
  removed ``aws ecr get-login``).
- :func:`push` — through the local container engine's CLI (docker or podman): check the engine
  answers and the image exists, ensure the repository, ``login --password-stdin`` (the password
  never appears in an argv), ``tag``, ``push``. The engine is reached through an injectable
  ``runner`` so tests record the argv instead of needing a daemon.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from corral.backends.aws_batch.client import AwsClients, aws_errors, error_code, is_not_found
from corral.backends.aws_batch.common import MANAGED_TAG, Ctx, is_managed, tag_list
from corral.errors import ProvisionError, UsageError

DEFAULT_KEEP_UNTAGGED = 10
ENGINES = ("docker", "podman")
_REPO_RE = re.compile(r"^(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*$")


class Completed(Protocol):
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[..., Completed]  # runner(argv, *, input=None, capture=True) -> Completed


@dataclass
class _Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""


def subprocess_runner(argv: Sequence[str], *, input: str | None = None, capture: bool = True,
                      timeout: float | None = None) -> Completed:
    """Run an engine command. Uncaptured output (push progress) goes to stderr, never stdout."""
    try:
        if capture:
            p = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
            return _Result(p.returncode, p.stdout, p.stderr)
        p = subprocess.run(list(argv), input=input, stdout=sys.stderr, stderr=sys.stderr, text=True,
                           timeout=timeout)
        return _Result(p.returncode)
    except FileNotFoundError:
        return _Result(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return _Result(124, "", f"{argv[0]} did not answer within {timeout:g}s")


# -- names ----------------------------------------------------------------------------------------
def registry(account_id: str, region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account_id}.dkr.ecr.{region}.{suffix}"


def split_image(image: str) -> tuple[str, str, str]:
    """``[registry/]path[:tag][@digest]`` → (registry or "", path, ":tag" or "@digest" or "")."""
    ref = ""
    rest = image
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        ref = "@" + digest
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        ref = f":{tag}{ref}"
    parts = rest.split("/")
    reg = ""
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        reg = parts[0]
        parts = parts[1:]
    return reg, "/".join(parts), ref


def repository_for(image: str) -> str:
    """The ECR repository a local image goes to by default: its path without registry or tag."""
    _, path, _ = split_image(image)
    if path.startswith("library/"):
        path = path[len("library/"):]
    return path.lower()


def resolve_image(image: str, clients: AwsClients | None = None, *, account_id: str | None = None,
                  region: str | None = None) -> str:
    """``ecr://name[:tag|@digest]`` → the account's registry URI (tag ``latest`` when none);
    any other image is returned as it is."""
    if not image.startswith("ecr://"):
        return image
    rest = image[len("ecr://"):]
    _, path, ref = split_image(rest)
    if not path or not _REPO_RE.match(path):
        raise UsageError(f"{image!r} is not a valid ecr:// image", "write ecr://NAME:TAG, e.g. ecr://my-sorter:1.2")
    if clients is not None:
        account_id = account_id or clients.account_id()
        region = region or clients.region
    if not account_id or not region:
        raise UsageError(f"cannot resolve {image}: no AWS account/region", "pass --region and credentials")
    return f"{registry(account_id, region)}/{path}{ref or ':latest'}"


# -- repositories ---------------------------------------------------------------------------------
def lifecycle_policy(keep_untagged: int = DEFAULT_KEEP_UNTAGGED) -> dict[str, Any]:
    return {"rules": [{
        "rulePriority": 1,
        "description": f"corral: keep the last {keep_untagged} untagged images",
        "selection": {"tagStatus": "untagged", "countType": "imageCountMoreThan", "countNumber": keep_untagged},
        "action": {"type": "expire"},
    }]}


def ensure_repository(clients: AwsClients, name: str, *, immutable: bool = False,
                      keep_untagged: int = DEFAULT_KEEP_UNTAGGED, tags: dict[str, str] | None = None,
                      report: Any = None) -> str:
    """Find or create the repository (see module docstring); return its URI."""
    from corral.backends.aws_batch.provisioned import ProvisionReport

    if not _REPO_RE.match(name) or not 2 <= len(name) <= 256:
        raise UsageError(f"{name!r} is not a valid ECR repository name",
                         "use lowercase letters, digits, . _ - and / (2-256 characters)")
    ctx = Ctx(clients=clients, report=report if report is not None else ProvisionReport(),
              tags={**(tags or {}), MANAGED_TAG: "true"})
    ecr = clients.ecr
    policy = lifecycle_policy(keep_untagged)
    with aws_errors(f"set up ECR repository {name}"):
        try:
            repo = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
            ctx.found("ecr-repository", name)
            found = True
        except Exception as exc:
            if not (is_not_found(exc) or error_code(exc) == "RepositoryNotFoundException"):
                raise
            repo = ecr.create_repository(
                repositoryName=name,
                imageTagMutability="IMMUTABLE" if immutable else "MUTABLE",
                imageScanningConfiguration={"scanOnPush": True},
                encryptionConfiguration={"encryptionType": "AES256"},
                tags=tag_list(ctx.tags),
            )["repository"]
            ctx.created("ecr-repository", name)
            found = False
        if found and immutable and repo.get("imageTagMutability") != "IMMUTABLE":
            ecr.put_image_tag_mutability(repositoryName=name, imageTagMutability="IMMUTABLE")
            ctx.updated("ecr-repository", f"{name} (tags immutable)")
        current = None
        if found:
            try:
                current = json.loads(ecr.get_lifecycle_policy(repositoryName=name)["lifecyclePolicyText"])
            except Exception as exc:
                if not (is_not_found(exc) or error_code(exc) == "LifecyclePolicyNotFoundException"):
                    raise
        if current != policy:
            ecr.put_lifecycle_policy(repositoryName=name, lifecyclePolicyText=json.dumps(policy))
            if found:
                ctx.updated("ecr-lifecycle-policy", name)
    return repo["repositoryUri"]


@dataclass
class Authorization:
    username: str
    password: str
    endpoint: str  # https://<account>.dkr.ecr.<region>.amazonaws.com
    expires_at: Any = None

    @property
    def registry(self) -> str:
        return re.sub(r"^https?://", "", self.endpoint).rstrip("/")


def authorization(clients: AwsClients) -> Authorization:
    """Registry credentials for ``docker login`` from ``ecr.get_authorization_token``."""
    with aws_errors("get an ECR login token"):
        data = clients.ecr.get_authorization_token()["authorizationData"][0]
    user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    return Authorization(username=user, password=password, endpoint=data["proxyEndpoint"],
                         expires_at=data.get("expiresAt"))


def list_repositories(clients: AwsClients, *, everything: bool = False) -> list[dict[str, Any]]:
    """corral's repositories (all with ``everything``) and their images, newest first."""
    ecr = clients.ecr
    out = []
    with aws_errors("list ECR repositories"):
        for page in ecr.get_paginator("describe_repositories").paginate():
            for repo in page["repositories"]:
                if not everything:
                    tags = ecr.list_tags_for_resource(resourceArn=repo["repositoryArn"]).get("tags", [])
                    if not is_managed(tags):
                        continue
                images = []
                for ipage in ecr.get_paginator("describe_images").paginate(repositoryName=repo["repositoryName"]):
                    images += ipage["imageDetails"]
                images.sort(key=lambda i: str(i.get("imagePushedAt", "")), reverse=True)
                out.append({
                    "repository": repo["repositoryName"],
                    "uri": repo["repositoryUri"],
                    "images": [{
                        "tags": i.get("imageTags", []),
                        "digest": i.get("imageDigest", ""),
                        "pushed_at": str(i.get("imagePushedAt", "")),
                        "size_bytes": i.get("imageSizeInBytes"),
                    } for i in images],
                })
    return out


# -- push -----------------------------------------------------------------------------------------
def find_engine(runner: Runner = subprocess_runner, engine: str | None = None) -> str:
    """The first container engine whose daemon answers (``CORRAL_CONTAINER_ENGINE`` first)."""
    wanted = engine or os.environ.get("CORRAL_CONTAINER_ENGINE")
    candidates = [wanted] if wanted else list(ENGINES)
    problems = []
    for name in candidates:
        if runner is subprocess_runner and shutil.which(name) is None:
            problems.append(f"{name}: not installed")
            continue
        r = runner([name, "info", "--format", "{{.ServerVersion}}"], capture=True, timeout=30)
        if r.returncode == 0:
            return name
        first = (r.stderr or r.stdout or "").strip().splitlines()
        problems.append(f"{name}: {first[0] if first else 'exit ' + str(r.returncode)}")
    raise ProvisionError(
        "no container engine is running to push the image (" + "; ".join(problems) + ")",
        "start Docker (Docker Desktop or `sudo systemctl start docker`) or install podman, then try again",
    )


def push(image: str, clients: AwsClients, *, repository: str | None = None, runner: Runner = subprocess_runner,
         engine: str | None = None, immutable: bool = False, report: Any = None) -> str:
    """Push a local image to ECR (creating the repository if missing); return its URI."""
    eng = find_engine(runner, engine)
    r = runner([eng, "image", "inspect", "--format", "{{.Id}}", image], capture=True, timeout=60)
    if r.returncode != 0:
        raise ProvisionError(f"image {image} is not in the local {eng} image store",
                             f"build or pull it first (`{eng} build -t {image} .`), or check the name")
    repo = repository or repository_for(image)
    _, _, ref = split_image(image)
    tag = ref[1:].split("@", 1)[0] if ref.startswith(":") else "latest"
    repo_uri = ensure_repository(clients, repo, immutable=immutable, report=report)
    auth = authorization(clients)
    r = runner([eng, "login", "--username", auth.username, "--password-stdin", auth.registry],
               input=auth.password, capture=True, timeout=120)
    if r.returncode != 0:
        raise ProvisionError(f"{eng} login to {auth.registry} failed: {(r.stderr or r.stdout).strip()[:300]}",
                             "check that the engine can reach the registry (proxy, DNS)")
    target = f"{repo_uri}:{tag}"
    r = runner([eng, "tag", image, target], capture=True, timeout=60)
    if r.returncode != 0:
        raise ProvisionError(f"{eng} tag {image} {target} failed: {(r.stderr or r.stdout).strip()[:300]}",
                             "check the image name")
    r = runner([eng, "push", target], capture=False, timeout=None)
    if r.returncode != 0:
        raise ProvisionError(f"{eng} push {target} failed (exit {r.returncode})",
                             "see the engine's output above; an IMMUTABLE repository refuses an existing tag")
    return target
