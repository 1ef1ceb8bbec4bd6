"""The image corral's own jobs run in (transfers, workspace cleanup): the official rclone image,
pinned, copied into the account's ECR with its ENTRYPOINT cleared — without a container engine.

Why a copy. The official ``rclone/rclone`` image has ``ENTRYPOINT ["rclone"]`` and AWS Batch cannot
override an entrypoint (Batch API reference: neither ``ContainerProperties`` nor
``TaskContainerProperties`` has an ``entryPoint`` member; nextflow-io/nextflow#5340 hit it), so
corral's wrapper (``/bin/sh -c …``) cannot run in it as published. The copy differs from the
upstream image only in its config blob (``Entrypoint`` removed, a ``org.corral.source`` label); the
layers are the upstream layers, byte for byte. It lives in the account's own registry, so:

- nothing is installed or downloaded when a job runs (no ``apk add``): the job pulls one image
  from ECR, which private subnets reach through VPC endpoints without any route to the internet;
- the 10,000 children of an array do not pull from Docker Hub (Docker Hub usage and limits:
  unauthenticated pulls are limited per IPv4 address — 10 an hour at the time of writing);
- job definitions name the copy by digest (``…/corral/rclone@sha256:…``); the repository's tags
  are immutable.

How. :func:`ensure_rclone_image` looks for the copy's tag in ECR (one DescribeImages). When it is
missing, :func:`copy_image` reads the source through the registry HTTP API (OCI distribution spec:
``GET /v2/<name>/manifests/<digest>``, ``GET /v2/<name>/blobs/<digest>``, anonymous bearer tokens),
checks every manifest and blob against its digest — the index against the pinned digest — and
writes the layers, the new config and the manifests with ECR's own API (InitiateLayerUpload,
UploadLayerPart in 5–10 MiB parts, CompleteLayerUpload, PutImage with ``imageDigest``).
``linux/amd64`` and ``linux/arm64`` (Graviton instance types) are copied — those the source has —
under one index.

Overrides. ``CORRAL_RCLONE_SOURCE`` (``registry/name:tag@sha256:…``; a digest is required) names
another source, e.g. a mirror holding the same image (``ghcr.io/rclone/rclone:1.74.4@sha256:…``).
``CORRAL_RCLONE_IMAGE`` skips all of this: the image named there is used as it is (it must have
``/bin/sh`` and ``rclone`` and no ENTRYPOINT; see :mod:`corral.storage.aws`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from corral.backends.aws_batch.client import AwsClients, aws_errors, error_code
from corral.errors import ProvisionError
from corral.storage.aws import RCLONE_REPOSITORY, RCLONE_SOURCE, SOURCE_ENV, rclone_target_tag

PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))
# Amazon ECR service quotas: "Minimum layer part size 5 MiB", "Maximum layer part size 10 MiB"
# (the last part of a layer may be smaller).
PART_SIZE = 8 * 1024 * 1024
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
SOURCE_LABEL = "org.corral.source"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
HINT = (
    "run it from a machine that reaches the source registry (corral copies the image once per "
    f"account and region), set {SOURCE_ENV} to a mirror holding the same image (with its digest), "
    "or set CORRAL_RCLONE_IMAGE to an image with /bin/sh and rclone and no ENTRYPOINT"
)


@dataclass(frozen=True)
class Reference:
    """``registry/name:tag@sha256:…`` (``docker.io`` is read at ``registry-1.docker.io``)."""

    registry: str
    name: str
    tag: str
    digest: str

    @property
    def text(self) -> str:
        return f"{self.registry}/{self.name}:{self.tag}@{self.digest}"


def parse_reference(text: str) -> Reference:
    """A pinned image reference; refused (one line, naming the variable) without a sha256 digest."""
    rest, _, digest = text.partition("@")
    if not _DIGEST.match(digest):
        raise ProvisionError(f"{SOURCE_ENV}={text!r} is not pinned by digest",
                             "write registry/name:tag@sha256:<64 hex>, e.g. " + RCLONE_SOURCE)
    first, _, path = rest.partition("/")
    if not path or not ("." in first or ":" in first or first == "localhost"):
        first, path = "docker.io", rest
    name, _, tag = path.rpartition(":") if ":" in path.rsplit("/", 1)[-1] else (path, "", "latest")
    if first == "docker.io" and "/" not in name:
        name = f"library/{name}"
    return Reference(first, name, tag, digest)


def source_reference() -> Reference:
    return parse_reference(os.environ.get(SOURCE_ENV) or RCLONE_SOURCE)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


# -- the source registry (OCI distribution spec) ---------------------------------------------------
Opener = Callable[..., Any]  # urllib.request.urlopen-like: opener(request, timeout=...) -> response


class Registry:
    """Anonymous reads from a registry's HTTP API: manifests and blobs, each checked against its digest."""

    def __init__(self, ref: Reference, opener: Opener | None = None, timeout: float = 60.0) -> None:
        self.ref = ref
        host = "registry-1.docker.io" if ref.registry == "docker.io" else ref.registry
        loopback = host.split(":")[0] in ("127.0.0.1", "localhost")  # (tests' fake registry)
        self.base = f"{'http' if loopback else 'https'}://{host}/v2/{ref.name}"
        self.opener = opener or urllib.request.urlopen
        self.timeout = timeout
        self._token: str | None = None

    def _open(self, path: str, accept: str | None = None) -> Any:
        for _ in range(2):
            req = urllib.request.Request(self.base + path)
            if accept:
                req.add_header("Accept", accept)
            if self._token:  # not sent on to where a blob redirects (a CDN or a presigned URL)
                req.add_unredirected_header("Authorization", f"Bearer {self._token}")
            try:
                return self.opener(req, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                if exc.code != 401 or self._token is not None:
                    raise
                self._token = self._anonymous_token(exc.headers.get("WWW-Authenticate", ""))
        raise AssertionError("unreachable")

    def _anonymous_token(self, challenge: str) -> str:
        """The bearer token an anonymous pull gets (Docker registry token authentication)."""
        if not challenge.lower().startswith("bearer "):
            raise ProvisionError(f"{self.ref.registry} asks for credentials corral does not have ({challenge or 'no challenge'})",
                                 HINT)
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        query = {k: v for k, v in fields.items() if k in ("service", "scope")}
        url = fields.get("realm", "") + ("?" + urllib.parse.urlencode(query) if query else "")
        if not url.startswith(("https://", "http://127.0.0.1", "http://localhost")):
            raise ProvisionError(f"{self.ref.registry} sent an unusable token endpoint {url!r}", HINT)
        with self.opener(urllib.request.Request(url), timeout=self.timeout) as resp:
            body = json.loads(resp.read())
        token = body.get("token") or body.get("access_token")
        if not token:
            raise ProvisionError(f"{self.ref.registry} gave no anonymous token", HINT)
        return str(token)

    def manifest(self, digest: str) -> tuple[bytes, str]:
        with self._open(f"/manifests/{digest}", ACCEPT) as resp:
            data = resp.read()
            media = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        self._check(digest, data, "manifest")
        return data, json.loads(data).get("mediaType") or media

    def blob(self, digest: str) -> bytes:
        with self._open(f"/blobs/{digest}") as resp:
            data = resp.read()
        self._check(digest, data, "blob")
        return bytes(data)

    def blob_to(self, digest: str, out: IO[bytes]) -> int:
        h = hashlib.sha256()
        size = 0
        with self._open(f"/blobs/{digest}") as resp:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
        self._check(digest, None, "layer", got="sha256:" + h.hexdigest())
        return size

    def _check(self, digest: str, data: bytes | None, what: str, got: str | None = None) -> None:
        got = got or _sha256(data or b"")
        if got != digest:
            raise ProvisionError(
                f"{self.ref.registry}/{self.ref.name}: the {what} served for {digest} has digest {got}",
                "the source registry did not serve the pinned image; no image was tagged. " + HINT,
            )


# -- the copy ---------------------------------------------------------------------------------------
def without_entrypoint(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The image config with ``Entrypoint`` (and ``Cmd``) removed and the source labelled."""
    out = json.loads(json.dumps(config))
    inner = out.setdefault("config", {})
    inner.pop("Entrypoint", None)
    inner.pop("Cmd", None)
    inner["Labels"] = {**(inner.get("Labels") or {}), SOURCE_LABEL: source}
    return out


class _Ecr:
    """The ECR half: blobs and manifests into one repository, each only when missing."""

    def __init__(self, ecr: Any, repository: str) -> None:
        self.ecr = ecr
        self.repo = repository

    def has_blob(self, digest: str) -> bool:
        r = self.ecr.batch_check_layer_availability(repositoryName=self.repo, layerDigests=[digest])
        return any(x.get("layerAvailability") == "AVAILABLE" for x in r.get("layers", []))

    def upload(self, digest: str, source: IO[bytes], size: int) -> None:
        upload_id = self.ecr.initiate_layer_upload(repositoryName=self.repo)["uploadId"]
        first = 0
        source.seek(0)
        while first < size:
            part = source.read(PART_SIZE)
            if not part:
                raise ProvisionError(f"layer {digest} ended after {first} of {size} bytes", "run the command again")
            self.ecr.upload_layer_part(repositoryName=self.repo, uploadId=upload_id, partFirstByte=first,
                                       partLastByte=first + len(part) - 1, layerPartBlob=part)
            first += len(part)
        try:
            got = self.ecr.complete_layer_upload(repositoryName=self.repo, uploadId=upload_id,
                                                 layerDigests=[digest])["layerDigest"]
        except Exception as exc:  # another corral copied the same layer meanwhile
            if error_code(exc) != "LayerAlreadyExistsException":
                raise
            return
        if got != digest:
            raise ProvisionError(f"ECR computed {got} for layer {digest} of {self.repo}", "run the command again")

    def put(self, manifest: bytes, media_type: str, tag: str) -> str:
        digest = _sha256(manifest)
        try:
            self.ecr.put_image(repositoryName=self.repo, imageManifest=manifest.decode(),
                               imageManifestMediaType=media_type, imageTag=tag, imageDigest=digest)
        except Exception as exc:  # an earlier, interrupted copy pushed the same manifest and tag
            if error_code(exc) not in ("ImageAlreadyExistsException", "ImageTagAlreadyExistsException"):
                raise
            if self.digest_of(tag) != digest:
                raise ProvisionError(
                    f"ECR repository {self.repo} already has tag {tag} for another image",
                    f"delete the image tagged {tag} from {self.repo} (`corral aws teardown --all --purge` removes "
                    "the repository), then run again",
                ) from exc
        return digest

    def digest_of(self, tag: str) -> str | None:
        try:
            details = self.ecr.describe_images(repositoryName=self.repo, imageIds=[{"imageTag": tag}])["imageDetails"]
        except Exception as exc:
            if error_code(exc) in ("ImageNotFoundException", "RepositoryNotFoundException"):
                return None
            raise
        return str(details[0]["imageDigest"]) if details else None


def copy_image(ecr: Any, registry: Registry, *, repository: str, tag: str,
               platforms: Sequence[tuple[str, str]] = PLATFORMS, log: Callable[[str], None] | None = None) -> str:
    """Copy the pinned source into ``repository`` as ``tag`` (an index of ``platforms``, each
    without entrypoint); return the index's digest. Blobs already in the repository are not sent."""
    ref = registry.ref
    source = ref.text
    dest = _Ecr(ecr, repository)
    data, media = registry.manifest(ref.digest)
    if media in INDEX_TYPES:
        index = json.loads(data)
        wanted = []
        for os_name, arch in platforms:
            found = [m for m in index.get("manifests", [])
                     if (m.get("platform") or {}).get("os") == os_name and (m.get("platform") or {}).get("architecture") == arch
                     and not (m.get("platform") or {}).get("variant", "").startswith("unknown")]
            if found:  # (a platform the source lacks is left out; Batch then cannot run it there)
                wanted.append(found[0])
        if not wanted:
            raise ProvisionError(f"{source} has none of the platforms corral copies "
                                 f"({', '.join('/'.join(p) for p in platforms)})", HINT)
        index_type = media
    else:  # a single-platform source
        wanted = [{"digest": ref.digest, "mediaType": media, "platform": None}]
        index_type = OCI_INDEX if media == OCI_MANIFEST else DOCKER_LIST
    entries = []
    for desc in wanted:
        mdata, mtype = registry.manifest(desc["digest"]) if desc["digest"] != ref.digest else (data, media)
        manifest = json.loads(mdata)
        config = json.loads(registry.blob(manifest["config"]["digest"]))
        platform = desc.get("platform") or {"os": config.get("os", "linux"), "architecture": config.get("architecture", "amd64")}
        new_config = _canonical(without_entrypoint(config, source))
        with tempfile.TemporaryDirectory(prefix="corral-rclone-") as tmp:
            for layer in manifest.get("layers", []):
                if dest.has_blob(layer["digest"]):
                    continue
                if log:
                    log(f"copying layer {layer['digest'][:19]} ({layer.get('size', 0) / 1e6:.1f} MB) of {source}")
                path = Path(tmp) / layer["digest"].replace(":", "-")
                with path.open("w+b") as f:
                    size = registry.blob_to(layer["digest"], f)
                    dest.upload(layer["digest"], f, size)
                path.unlink()
        config_digest = _sha256(new_config)
        if not dest.has_blob(config_digest):
            import io

            dest.upload(config_digest, io.BytesIO(new_config), len(new_config))
        manifest["config"] = {**manifest["config"], "digest": config_digest, "size": len(new_config)}
        body = _canonical(manifest)
        digest = dest.put(body, mtype, f"{tag}-{platform['architecture']}")
        entries.append({"mediaType": mtype, "digest": digest, "size": len(body),
                        "platform": {"os": platform["os"], "architecture": platform["architecture"]}})
    index_body = _canonical({"schemaVersion": 2, "mediaType": index_type, "manifests": entries})
    return dest.put(index_body, index_type, tag)


def ensure_rclone_image(clients: AwsClients, *, opener: Opener | None = None, report: Any = None,
                        log: Callable[[str], None] | None = None) -> str:
    """The URI, by digest, of corral's copy of the pinned rclone image in this account and region:
    found with one DescribeImages, else copied (:func:`copy_image`) into a tag-immutable repository."""
    from corral.backends.aws_batch import ecr as ecrmod

    ref = source_reference()
    tag = rclone_target_tag(ref.tag, ref.digest)
    base = f"{ecrmod.registry(clients.account_id(), clients.region)}/{RCLONE_REPOSITORY}"
    dest = _Ecr(clients.ecr, RCLONE_REPOSITORY)
    with aws_errors(f"look up corral's rclone image in ECR ({RCLONE_REPOSITORY}:{tag})"):
        digest = dest.digest_of(tag)
    if digest:
        return f"{base}@{digest}"
    ecrmod.ensure_repository(clients, RCLONE_REPOSITORY, immutable=True, report=report)
    if log:
        log(f"copying {ref.text} into ECR as {RCLONE_REPOSITORY}:{tag}, without its entrypoint "
            "(once per account and region)")
    try:
        with aws_errors(f"copy {ref.text} into ECR ({RCLONE_REPOSITORY}:{tag})"):
            digest = copy_image(clients.ecr, Registry(ref, opener), repository=RCLONE_REPOSITORY, tag=tag, log=log)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise ProvisionError(f"cannot read {ref.text} to copy it into ECR: {exc}", HINT) from exc
    return f"{base}@{digest}"
