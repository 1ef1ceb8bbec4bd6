"""corral's rclone image on AWS: the pinned official image copied into (moto's) ECR with its
entrypoint cleared, from a registry on 127.0.0.1 that stands in for Docker Hub; transfer job
definitions that name it by digest and install nothing; the strict layer's ECR rules."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from fake_registry import TAG, FakeRegistry

from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.provision import needs_for
from corral.backends.aws_batch.rclone_image import SOURCE_LABEL, ensure_rclone_image, parse_reference
from corral.errors import ProvisionError
from corral.plan import make_plan
from corral.spec import loads_workflow
from corral.storage import aws as saws

pytestmark = pytest.mark.aws

REPO = saws.RCLONE_REPOSITORY
PINNED = re.compile(r"^\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com/corral/rclone@sha256:[0-9a-f]{64}$")
INSTALLERS = ("apk ", "apk\n", "apt-get", "apt ", "pip ", "pip3", "curl", "wget", "dnf ", "yum ")


def _manifest(ecr: Any, tag: str) -> dict[str, Any]:
    image = ecr.batch_get_image(repositoryName=REPO, imageIds=[{"imageTag": tag}])["images"][0]
    out: dict[str, Any] = json.loads(image["imageManifest"])
    return out


def test_the_copy_is_the_pinned_image_without_its_entrypoint(
    aws: str, rclone_registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from corral.backends.aws_batch import rclone_image as ri

    sent: dict[str, bytes] = {}  # every blob corral uploads to ECR, by digest
    upload = ri._Ecr.upload

    def spy(self: Any, digest: str, source: Any, size: int) -> None:
        source.seek(0)
        sent[digest] = source.read()
        upload(self, digest, source, size)

    monkeypatch.setattr(ri._Ecr, "upload", spy)
    clients = AwsClients()
    before = len(rclone_registry.requests)
    uri = ensure_rclone_image(clients)
    assert PINNED.match(uri), uri
    assert len(rclone_registry.requests) > before  # it was read from the (fake) source registry
    ecr = clients.ecr
    repo = ecr.describe_repositories(repositoryNames=[REPO])["repositories"][0]
    assert repo["imageTagMutability"] == "IMMUTABLE"
    tag = saws.rclone_target_tag(TAG, rclone_registry.index_digest)
    assert saws.rclone_image() == f"ecr://{REPO}:{tag}"
    index = _manifest(ecr, tag)
    assert uri.endswith("@" + ecr.describe_images(repositoryName=REPO, imageIds=[{"imageTag": tag}])
                        ["imageDetails"][0]["imageDigest"])
    assert sorted(m["platform"]["architecture"] for m in index["manifests"]) == ["amd64", "arm64"]  # no attestation
    for entry in index["manifests"]:
        arch = entry["platform"]["architecture"]
        mine = _manifest(ecr, f"{tag}-{arch}")
        assert entry["digest"] == "sha256:" + hashlib.sha256(json.dumps(mine, separators=(",", ":"),
                                                                        sort_keys=True).encode()).hexdigest()
        upstream = next(json.loads(b) for b, _ in rclone_registry.manifests.values()
                        if json.loads(b).get("config", {}).get("digest") ==
                        "sha256:" + hashlib.sha256(json.dumps(rclone_registry.configs[arch]).encode()).hexdigest())
        assert mine["layers"] == upstream["layers"]  # the upstream layers, byte for byte
        layers = ecr.batch_check_layer_availability(repositoryName=REPO, layerDigests=[x["digest"] for x in mine["layers"]])
        assert all(x["layerAvailability"] == "AVAILABLE" for x in layers["layers"])
        assert mine["config"]["digest"] != upstream["config"]["digest"]
        # the new config (as it was uploaded: its digest is the manifest's) has no entrypoint
        config = json.loads(sent[mine["config"]["digest"]])
        assert "Entrypoint" not in config["config"] and "Cmd" not in config["config"]
        assert config["config"]["Labels"][SOURCE_LABEL] == rclone_registry.reference
        assert config["config"]["WorkingDir"] == "/data" and config["architecture"] == arch

    # Found next time: one DescribeImages, nothing read from the source registry.
    before = len(rclone_registry.requests)
    assert ensure_rclone_image(clients) == uri
    assert len(rclone_registry.requests) == before


def test_a_layer_over_one_part_is_sent_in_parts_of_5_to_10_mib(
    aws: str, monkeypatch: pytest.MonkeyPatch, strict_aws: Any,
) -> None:
    big = FakeRegistry(big_layer_bytes=9 * 1024 * 1024).start()
    try:
        monkeypatch.setenv("CORRAL_RCLONE_SOURCE", big.reference)
        uri = ensure_rclone_image(AwsClients())
        assert PINNED.match(uri)
        assert not strict_aws.violations
        layer = next(d for d, b in big.blobs.items() if len(b) == 9 * 1024 * 1024)
        found = boto3.client("ecr").batch_check_layer_availability(repositoryName=REPO, layerDigests=[layer])
        assert found["layers"][0]["layerSize"] == 9 * 1024 * 1024
    finally:
        big.stop()


def test_a_source_that_does_not_match_its_digest_is_refused_and_nothing_is_tagged(
    aws: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = FakeRegistry(tamper=True).start()
    try:
        monkeypatch.setenv("CORRAL_RCLONE_SOURCE", bad.reference)
        with pytest.raises(ProvisionError) as info:
            ensure_rclone_image(AwsClients())
        assert "has digest" in str(info.value) and "no image was tagged" in (info.value.hint or "")
        tag = saws.rclone_target_tag(TAG, bad.index_digest)
        with pytest.raises(ClientError):
            boto3.client("ecr").describe_images(repositoryName=REPO, imageIds=[{"imageTag": tag}])
    finally:
        bad.stop()


def test_an_unreachable_source_or_an_unpinned_one_is_one_clear_error(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = FakeRegistry().start()
    ref = gone.reference
    gone.stop()  # nothing listens there now
    monkeypatch.setenv("CORRAL_RCLONE_SOURCE", ref)
    with pytest.raises(ProvisionError) as info:
        ensure_rclone_image(AwsClients())
    assert "cannot read" in str(info.value) and "CORRAL_RCLONE_IMAGE" in (info.value.hint or "")
    monkeypatch.setenv("CORRAL_RCLONE_SOURCE", "rclone/rclone:1.74.4")
    with pytest.raises(ProvisionError, match="not pinned by digest"):
        ensure_rclone_image(AwsClients())


def test_references() -> None:
    r = parse_reference(saws.RCLONE_SOURCE)
    assert (r.registry, r.name, r.tag) == ("docker.io", "rclone/rclone", saws.RCLONE_VERSION)
    assert r.digest == "sha256:c61954aaa32328a5486715dd063a81c7879f5195ad3505cd362deddd509dc4a1"
    assert parse_reference("alpine:3.20@sha256:" + "0" * 64).name == "library/alpine"
    g = parse_reference("ghcr.io/rclone/rclone:1.74.4@sha256:" + "a" * 64)
    assert (g.registry, g.name, g.tag) == ("ghcr.io", "rclone/rclone", "1.74.4")


def test_the_transfer_job_definition_installs_nothing_and_names_a_pinned_image(aws: str) -> None:
    """Through the backend (api.run): the transfer stage's job definition names corral's copy by
    digest, in the account's ECR, and nothing in it installs or downloads anything."""
    import corral.api as api
    from corral.backends.base import RunOptions

    clients = AwsClients()
    clients.s3.create_bucket(Bucket="lab-in", CreateBucketConfiguration={"LocationConstraint": clients.region})
    wf = loads_workflow("""
name: pin
items: [{s: a}, {s: b}]
stages:
  - {name: fetch, from: 's3://lab-in/{s}', to: 's3://lab-in/out/{s}'}
""")
    api.run(wf, backend="aws", options=RunOptions(wait=False))
    (jd,) = [d for d in clients.batch.describe_job_definitions(status="ACTIVE")["jobDefinitions"]
             if "/corral/rclone@" in d["containerProperties"]["image"]]
    props = jd["containerProperties"]
    assert PINNED.match(props["image"])
    text = json.dumps({"command": props["command"], "env": props.get("environment", [])})
    assert not [w for w in INSTALLERS if w in text], text
    env = {e["name"]: e["value"] for e in props.get("environment", [])}
    assert env["CORRAL_PROGRAM"] == saws.TRANSFER_SCRIPT and props["command"] == pl.BOOT_COMMAND
    # the execution role may pull it (and only from corral's repositories)
    role = props["executionRoleArn"].rsplit("/", 1)[-1]
    iam = clients.iam
    docs = [iam.get_role_policy(RoleName=role, PolicyName=n)["PolicyDocument"]
            for n in iam.list_role_policies(RoleName=role)["PolicyNames"]]
    pulls = [r for d in docs for st in d["Statement"] if "ecr:BatchGetImage" in st["Action"] for r in st["Resource"]]
    assert pulls == [f"arn:aws:ecr:{clients.region}:{clients.account_id()}:repository/{REPO}"]


def test_corral_rclone_image_overrides_and_nothing_is_copied(
    aws: str, monkeypatch: pytest.MonkeyPatch, rclone_registry: FakeRegistry,
) -> None:
    monkeypatch.setenv("CORRAL_RCLONE_IMAGE", "ecr://lab/rclone-sh:1.74.4")
    wf = loads_workflow("name: o\nitems: [{s: a}]\nstages:\n  - {name: f, from: 's3://lab-bkt/{s}', to: 's3://lab-bkt/o/{s}'}\n")
    assert saws.rclone_image() == "ecr://lab/rclone-sh:1.74.4" and not saws.uses_default_rclone_image()
    assert needs_for(make_plan(wf)).ecr_repositories == ["lab/rclone-sh"]  # its pull permission
    stage = saws.job_stage(wf.stage("f"))
    ctx = pl.JobContext(region="us-east-2", account_id="123456789012")
    assert pl.job_definition(stage, ctx).kwargs["containerProperties"]["image"] == (
        "123456789012.dkr.ecr.us-east-2.amazonaws.com/lab/rclone-sh:1.74.4")


def test_the_transfer_script_installs_nothing_when_rclone_is_missing(tmp_path: Path) -> None:
    """Run as the container would, with installers on PATH that record being called: it stops at
    once (127) saying rclone is missing, and calls none of them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apk", "apt-get", "curl", "wget", "pip"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} >> {tmp_path}/called\n")
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": str(bin_dir), "CORRAL_RCLONE_CONFIG": "[x]\ntype = local\n"}
    r = subprocess.run(["/bin/sh", "-c", saws.TRANSFER_SCRIPT, "corral-transfer", "version"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 127
    assert "rclone is not in this image" in r.stderr and "installs nothing" in r.stderr
    assert not (tmp_path / "called").exists()
    assert os.environ.get("CORRAL_RCLONE_CONFIG") is None  # (nothing leaked into this process)


# -- the strict layer's ECR rules ---------------------------------------------------------------
@pytest.fixture
def ecr(aws: str) -> Any:
    client = boto3.client("ecr")
    client.create_repository(repositoryName="strict/r")
    return client


def _upload(ecr: Any, parts: list[bytes]) -> Any:
    uid = ecr.initiate_layer_upload(repositoryName="strict/r")["uploadId"]
    first = 0
    for p in parts:
        ecr.upload_layer_part(repositoryName="strict/r", uploadId=uid, partFirstByte=first,
                              partLastByte=first + len(p) - 1, layerPartBlob=p)
        first += len(p)
    digest = "sha256:" + hashlib.sha256(b"".join(parts)).hexdigest()
    return ecr.complete_layer_upload(repositoryName="strict/r", uploadId=uid, layerDigests=[digest])


def _code(call: Any) -> str:
    with pytest.raises(ClientError) as info:
        call()
    return str(info.value.response["Error"]["Code"])


def test_strict_ecr_part_sizes(ecr: Any) -> None:
    assert _code(lambda: _upload(ecr, [b"x" * 1024, b"y" * 10])) == "LayerPartTooSmallException"
    uid = ecr.initiate_layer_upload(repositoryName="strict/r")["uploadId"]
    assert _code(lambda: ecr.upload_layer_part(repositoryName="strict/r", uploadId=uid, partFirstByte=0,
                                               partLastByte=10 * 1024 * 1024, layerPartBlob=b"z" * (10 * 1024 * 1024 + 1))
                 ) == "InvalidLayerPartException"
    assert _code(lambda: ecr.upload_layer_part(repositoryName="strict/r", uploadId=uid, partFirstByte=0,
                                               partLastByte=99, layerPartBlob=b"z" * 10)) == "InvalidLayerPartException"
    _upload(ecr, [b"one small last part is fine"])
    assert _code(lambda: _upload(ecr, [b"one small last part is fine"])) == "LayerAlreadyExistsException"


def test_strict_ecr_put_image(ecr: Any) -> None:
    layer = b"layer bytes"
    _upload(ecr, [layer])
    d = "sha256:" + hashlib.sha256(layer).hexdigest()
    missing = "sha256:" + "0" * 64
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d, "size": len(layer)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": missing, "size": 1}]}
    body = json.dumps(manifest)
    digest = "sha256:" + hashlib.sha256(body.encode()).hexdigest()
    assert _code(lambda: ecr.put_image(repositoryName="strict/r", imageManifest=body, imageTag="t",
                                       imageDigest=digest)) == "LayersNotFoundException"
    manifest["layers"][0]["digest"] = d
    body = json.dumps(manifest)
    assert _code(lambda: ecr.put_image(repositoryName="strict/r", imageManifest=body, imageTag="t",
                                       imageDigest=digest)) == "ImageDigestDoesNotMatchException"
    good = "sha256:" + hashlib.sha256(body.encode()).hexdigest()
    ecr.put_image(repositoryName="strict/r", imageManifest=body, imageTag="t", imageDigest=good)
    assert _code(lambda: ecr.put_image(repositoryName="strict/r", imageManifest=body, imageTag="x" * 301)
                 ) == "InvalidParameterException"
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": manifest["mediaType"], "digest": missing, "size": 1}]}
    assert _code(lambda: ecr.put_image(repositoryName="strict/r", imageManifest=json.dumps(index), imageTag="i")
                 ) == "ReferencedImagesNotFoundException"
    index["manifests"][0]["digest"] = good
    ecr.put_image(repositoryName="strict/r", imageManifest=json.dumps(index), imageTag="i")


def test_aws_setup_copies_the_image_once_for_a_workflow_with_transfers(
    aws: str, tmp_path: Path, rclone_registry: FakeRegistry,
) -> None:
    """`corral aws setup -w` (a subprocess) copies the image for a workflow that moves data, and
    says where it is; run again, it reads nothing from the source registry."""
    from helpers import run_cli

    wf = tmp_path / "wf.yaml"
    wf.write_text("name: s\nitems: [{s: a}]\nstages:\n  - {name: f, from: 's3://lab-bkt/{s}', to: 's3://lab-bkt/o/{s}'}\n")
    first = run_cli("aws", "setup", "--workflow", str(wf), timeout=300)
    assert first.returncode == 0, first.stderr
    line = next(x for x in first.stderr.splitlines() if x.startswith("rclone image: "))
    assert PINNED.match(line.split(": ", 1)[1])
    before = len(rclone_registry.requests)
    again = run_cli("aws", "setup", "--workflow", str(wf), timeout=300)
    assert again.returncode == 0, again.stderr
    assert line in again.stderr.splitlines() and len(rclone_registry.requests) == before


def test_corral_run_when_the_source_cannot_be_read_is_one_line_and_submits_nothing(
    aws: str, tmp_path: Path,
) -> None:
    """`corral run --backend aws` from a machine that cannot reach the source: one clear line (no
    traceback) naming the fix, no job submitted, no rclone secret made."""
    from helpers import run_cli

    gone = FakeRegistry().start()
    ref = gone.reference
    gone.stop()
    wf = tmp_path / "wf.yaml"
    wf.write_text("name: nr\nitems: [{s: a}, {s: b}]\nstages:\n  - {name: f, from: 's3://lab-bkt/{s}', to: 's3://lab-bkt/o/{s}'}\n")
    r = run_cli("run", str(wf), "--backend", "aws", env={"CORRAL_RCLONE_SOURCE": ref}, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert f"cannot read {ref}" in r.stderr and "CORRAL_RCLONE_IMAGE" in r.stderr, r.stderr
    batch = boto3.client("batch")
    queues = [q["jobQueueName"] for q in batch.describe_job_queues()["jobQueues"]]
    for q in queues:
        for status in ("SUBMITTED", "PENDING", "RUNNABLE", "RUNNING", "SUCCEEDED", "FAILED"):
            assert not batch.list_jobs(jobQueue=q, jobStatus=status)["jobSummaryList"]
    assert not boto3.client("secretsmanager").list_secrets()["SecretList"]


def test_only_the_platforms_the_source_has_are_copied(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    one = FakeRegistry(arches=("amd64",)).start()
    none = FakeRegistry(arches=("s390x",)).start()
    try:
        monkeypatch.setenv("CORRAL_RCLONE_SOURCE", one.reference)
        ensure_rclone_image(AwsClients())
        index = _manifest(boto3.client("ecr"), saws.rclone_target_tag(TAG, one.index_digest))
        assert [m["platform"] for m in index["manifests"]] == [{"os": "linux", "architecture": "amd64"}]
        monkeypatch.setenv("CORRAL_RCLONE_SOURCE", none.reference)
        with pytest.raises(ProvisionError, match="none of the platforms"):
            ensure_rclone_image(AwsClients())
    finally:
        one.stop()
        none.stop()
