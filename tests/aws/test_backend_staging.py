"""Local transfer sources on AWS, and the rclone config as an SSM SecureString, end to end against
moto: a local `from:` is uploaded to the run's bucket before submission (multipart included, not
again on resume), the submitted child copies the staged data with the real rclone under /bin/sh,
a missing local path stops the run before anything is submitted, and `corral aws teardown --run`
removes the run's staged objects, SSM parameter and execution role — and nothing of another run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli, write_workflow
from test_backend_support import item_text

from corral.backends.aws_batch.backend import AwsBatchBackend
from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.rclone_image import ensure_rclone_image
from corral.backends.base import RunOptions
from corral.model import TaskState
from corral.spec import load_workflow
from corral.storage.aws import CONFIG_ENV

pytestmark = pytest.mark.aws

CANARY = "canary-4a91e0-ssm-must-not-leak"
OUT = "corral-stage-out"
RCLONE = shutil.which("rclone")
needs_rclone = pytest.mark.skipif(RCLONE is None, reason="rclone is not installed")
BIG = 9 * 2**20 + 123  # over boto3's 8 MiB multipart threshold




def _out_bucket(clients: AwsClients) -> None:
    clients.s3.create_bucket(Bucket=OUT, CreateBucketConfiguration={"LocationConstraint": clients.region})


def _objects(clients: AwsClients, bucket: str, prefix: str = "") -> dict[str, bytes]:
    import boto3
    from botocore.config import Config

    # moto keeps a multipart source's checksum on a server-side copy (rclone's s3→s3 copy), which
    # the body then fails; compare the bytes themselves instead of botocore's checksum.
    s3 = boto3.client("s3", config=Config(response_checksum_validation="when_required"))
    out: dict[str, bytes] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def _jobs(clients: AwsClients, store: Any, run_id: str) -> list[dict[str, Any]]:
    parents = sorted({t.external_id.split(":")[0] for t in store.get_tasks(run_id)})
    return clients.batch.describe_jobs(jobs=parents)["jobs"]


def _run_children(clients: AwsClients, job: dict[str, Any], n: int, tmp_path: Path,
                  config: str | None = None) -> None:
    """Run each array child of ``job`` as its container would: the job definition's command under
    /bin/sh with the overrides, the array index and (as Batch would fill it) the rclone config."""
    jd = clients.batch.describe_job_definitions(jobDefinitions=[job["jobDefinition"]])["jobDefinitions"][0]
    command = jd["containerProperties"]["command"]
    overrides = {e["name"]: e["value"] for e in job["container"]["environment"]}
    assert CONFIG_ENV not in overrides
    for index in range(n):
        env = {
            **overrides, "PATH": os.environ["PATH"], "HOME": str(tmp_path), "AWS_BATCH_JOB_ARRAY_INDEX": str(index),
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": clients.region,
        }
        if config is not None:
            env[CONFIG_ENV] = config
        r = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert CANARY not in r.stdout + r.stderr


class _Uploads:
    """Counts the S3 calls that send object data."""

    def __init__(self, clients: AwsClients) -> None:
        self.calls: dict[str, int] = {}
        clients.register_hook("before-call.s3.PutObject", self._count)
        clients.register_hook("before-call.s3.UploadPart", self._count)
        clients.register_hook("before-call.s3.CreateMultipartUpload", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.calls[model.name] = self.calls.get(model.name, 0) + 1

    def total(self) -> int:
        n = sum(self.calls.values())
        self.calls.clear()
        return n


@needs_rclone
def test_local_sources_are_staged_copied_by_the_job_and_not_sent_again_on_resume(
    aws: str, tmp_path: Path
) -> None:
    import corral.api as api

    data = tmp_path / "local"
    (data / "s1" / "sub").mkdir(parents=True)
    (data / "s2").mkdir(parents=True)
    big = bytes(range(256)) * (BIG // 256) + b"x" * (BIG % 256)
    (data / "s1" / "big.bin").write_bytes(big)
    (data / "s1" / "sub" / "a.txt").write_text("A s1")
    (data / "s2" / "a.txt").write_text("A s2")
    clients = AwsClients()
    _out_bucket(clients)
    wf = load_workflow(write_workflow(tmp_path, f"""
name: stg
items: [{{s: s1}}, {{s: s2}}]
stages:
  - {{name: fetch, from: 'local/{{s}}', to: 's3://{OUT}/raw/{{s}}'}}
"""))
    uploads = _Uploads(clients)
    be = AwsBatchBackend(clients, wf.aws)
    rec = api.run(wf, backend="aws", options=RunOptions(wait=False), backend_impl=be)
    run_id = rec.run_id
    root = rec.options["aws_batch"]["staged"]
    bucket = root.split("/")[2]
    assert root == f"s3://{bucket}/corral/staged/{run_id}/"
    assert uploads.calls.get("UploadPart", 0) >= 2  # the big file went multipart
    uploads.calls.clear()

    # Staged: every local file under the run's staging prefix, byte for byte.
    staged = _objects(clients, bucket, f"corral/staged/{run_id}/")
    by_name = {k.split("/", 4)[4]: v for k, v in staged.items()}  # drop corral/staged/<run>/<hash>/
    assert by_name == {"s1/big.bin": big, "s1/sub/a.txt": b"A s1", "s2/a.txt": b"A s2"}

    # The job reads the staged copy (its argv is in the item table), the workflow is unchanged.
    store = api.open_store("aws", wf)
    assert api.load_plan(store, run_id).workflow.stage("fetch").source == "local/{s}"
    jobs = _jobs(clients, store, run_id)
    assert len(jobs) == 1
    assert str(tmp_path) not in json.dumps(jobs, default=str)  # no path of this machine reaches the job
    jd = clients.batch.describe_job_definitions(jobDefinitions=[jobs[0]["jobDefinition"]])["jobDefinitions"][0]
    assert jd["containerProperties"]["image"] == ensure_rclone_image(clients)
    _run_children(clients, jobs[0], 2, tmp_path)
    assert _objects(clients, OUT) == {"raw/s1/big.bin": big, "raw/s1/sub/a.txt": b"A s1", "raw/s2/a.txt": b"A s2"}

    # The job role may read the run's own staging prefix (and no other run's).
    role = jd["containerProperties"]["jobRoleArn"].rsplit("/", 1)[-1]
    doc = clients.iam.get_role_policy(RoleName=role, PolicyName="corral")["PolicyDocument"]
    readable = [r for st in doc["Statement"] if "s3:GetObject" in st["Action"] for r in st["Resource"]]
    assert f"arn:aws:s3:::{bucket}/corral/staged/{run_id}/*" in readable
    assert f"arn:aws:s3:::{bucket}/corral/*" not in readable

    # Resume after a failure: the same files are not sent again; a changed one is.
    def fail_all() -> None:
        store.save_tasks([t.replace(state=TaskState.FAILED, reason="test") for t in store.get_tasks(run_id)])

    fail_all()
    api.resume(run_id, store=store, backend_impl=AwsBatchBackend(clients, wf.aws))
    assert uploads.total() == 0
    assert {t.state for t in store.get_tasks(run_id)} != {TaskState.FAILED}  # resubmitted
    (data / "s2" / "a.txt").write_text("A s2, changed")
    fail_all()
    api.resume(run_id, store=store, backend_impl=AwsBatchBackend(clients, wf.aws))
    assert uploads.calls == {"PutObject": 1}
    uploads.calls.clear()
    now = _objects(clients, bucket, f"corral/staged/{run_id}/")
    assert [v for k, v in now.items() if k.endswith("/s2/a.txt")] == [b"A s2, changed"]

    # A local source needed only by tasks that succeeded may be gone; one needed again may not.
    from corral.errors import PlanError

    shutil.rmtree(data / "s1")
    store.save_tasks([t.replace(state=TaskState.FAILED) for t in store.get_tasks(run_id) if t.item_key == "s2"])
    api.resume(run_id, store=store, backend_impl=AwsBatchBackend(clients, wf.aws))
    assert uploads.total() == 0
    fail_all()
    with pytest.raises(PlanError, match=r"stage 'fetch', item s1: .*local/s1 does not exist"):
        api.resume(run_id, store=store, backend_impl=AwsBatchBackend(clients, wf.aws))


def test_missing_local_source_is_one_line_and_nothing_is_submitted(aws: str, tmp_path: Path) -> None:
    (tmp_path / "local" / "s1").mkdir(parents=True)
    path = write_workflow(tmp_path, f"""
name: miss
items: [{{s: s1}}, {{s: s2}}]
stages:
  - {{name: fetch, from: 'local/{{s}}', to: 's3://{OUT}/raw/{{s}}'}}
""")
    res = run_cli("run", str(path), "--backend", "aws")
    assert res.returncode == 2, res.stderr
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert "Traceback" not in res.stderr
    first = next(line for line in err if "error" in line)
    assert "stage 'fetch', item s2" in first and str(tmp_path / "local" / "s2") in first
    clients = AwsClients()  # refused before provisioning: no queue, no job, no bucket, no staged data
    assert clients.batch.describe_job_queues()["jobQueues"] == []
    assert clients.s3.list_buckets()["Buckets"] == []


@needs_rclone
def test_ssm_secret_end_to_end_and_teardown_of_one_run(aws: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`aws: secrets: ssm`: the rclone config is a SecureString referenced by ARN, readable by the
    run's execution role only (with kms:Decrypt via SSM), never in a job definition, an override, a
    state row or corral's output; teardown --run removes that run's parameter, role and staged
    objects and leaves another run's (here a Secrets Manager run) alone."""
    import corral.api as api

    vault = tmp_path / "vault-data" / "s1"
    vault.mkdir(parents=True)
    (vault / "v.txt").write_text("V s1")
    conf = tmp_path / "rclone.conf"
    conf.write_text(f"[vault]\ntype = alias\nremote = {tmp_path / 'vault-data'}\ndescription = {CANARY}\n")
    monkeypatch.setenv("RCLONE_CONFIG", str(conf))
    (tmp_path / "local" / "s1").mkdir(parents=True)
    (tmp_path / "local" / "s1" / "l.txt").write_text("L s1")
    clients = AwsClients()
    _out_bucket(clients)
    text = """
name: {name}
items: [{{s: s1}}]
aws: {{secrets: {secrets}}}
stages:
  - {{name: get, from: 'vault:{{s}}', to: 's3://{out}/{name}/v/{{s}}'}}
  - {{name: put, from: 'local/{{s}}', to: 's3://{out}/{name}/l/{{s}}'}}
"""
    ssm_wf = write_workflow(tmp_path, text.format(name="viassm", secrets="ssm", out=OUT), "ssm.yaml")
    sm_wf = write_workflow(tmp_path, text.format(name="viasm", secrets="secretsmanager", out=OUT), "sm.yaml")
    res = run_cli("run", str(ssm_wf), "--backend", "aws", "--json")
    assert res.returncode == 0, res.stderr
    assert CANARY not in res.stdout + res.stderr
    # The first run says what it made in the account (stderr; stdout stays the JSON).
    assert "corral: provisioned what the workflow needs in" in res.stderr
    assert "  created  job-queue corral" in res.stderr and "  created  role corral-job-" in res.stderr
    run_a = json.loads(res.stdout)["run_id"]
    rec_b = api.run(load_workflow(sm_wf), backend="aws", options=RunOptions(wait=False))
    run_b = rec_b.run_id
    account, region = clients.account_id(), clients.region

    # The parameter: a tagged SecureString holding only the used remote; no Secrets Manager secret.
    ssm = clients.ssm
    name = f"/corral/{run_a}/rclone"
    param = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]
    assert param["Type"] == "SecureString" and CANARY in param["Value"] and "[vault]" in param["Value"]
    tags = {t["Key"]: t["Value"] for t in ssm.list_tags_for_resource(ResourceType="Parameter", ResourceId=name)["TagList"]}
    assert tags == {"corral:managed": "true", "corral:run": run_a}
    arn = f"arn:aws:ssm:{region}:{account}:parameter/corral/{run_a}/rclone"
    secret_names = [s["Name"] for s in clients.secretsmanager.list_secrets()["SecretList"]]
    assert secret_names == [f"corral/{run_b}/rclone"]

    # Job definition: the parameter by ARN; the execution role reads exactly it (+ kms via SSM).
    store = api.open_store("aws", load_workflow(ssm_wf))
    jobs_a = _jobs(clients, store, run_a)
    defs = clients.batch.describe_job_definitions(status="ACTIVE")["jobDefinitions"]
    get_def = next(d for d in defs if d["jobDefinitionArn"] == next(
        j["jobDefinition"] for j in jobs_a if "get" in j["jobName"]))
    assert get_def["containerProperties"]["secrets"] == [{"name": CONFIG_ENV, "valueFrom": arn}]
    exec_role = get_def["containerProperties"]["executionRoleArn"].rsplit("/", 1)[-1]
    role_tags = {t["Key"]: t["Value"] for t in clients.iam.list_role_tags(RoleName=exec_role)["Tags"]}
    assert role_tags["corral:run"] == run_a and role_tags["corral:managed"] == "true"
    doc = clients.iam.get_role_policy(RoleName=exec_role, PolicyName="corral")["PolicyDocument"]
    by_sid = {st["Sid"]: st for st in doc["Statement"]}
    assert by_sid["RunParameters"]["Action"] == ["ssm:GetParameters"] and by_sid["RunParameters"]["Resource"] == [arn]
    kms = by_sid["RunParametersDecrypt"]
    assert kms["Action"] == ["kms:Decrypt"]
    assert kms["Condition"]["StringEquals"] == {"kms:ViaService": f"ssm.{region}.amazonaws.com",
                                               "kms:EncryptionContext:PARAMETER_ARN": [arn]}
    job_role = get_def["containerProperties"]["jobRoleArn"].rsplit("/", 1)[-1]
    job_doc = json.dumps(clients.iam.get_role_policy(RoleName=job_role, PolicyName="corral")["PolicyDocument"])
    assert arn not in job_doc and "ssm:" not in job_doc  # the container itself cannot read it

    # The canary is in no job definition, no submitted job and no state row.
    items = clients.dynamodb.scan(TableName="corral-state")["Items"]
    assert any(run_a in item_text(i) for i in items)
    for blob in (json.dumps(defs, default=str), json.dumps(jobs_a, default=str), item_text(items)):
        assert CANARY not in blob and "[vault]" not in blob

    # The children copy for real: the remote with the config ECS would fill in, the staged local folder.
    for job in jobs_a:
        _run_children(clients, job, 1, tmp_path, config=param["Value"] if "get" in job["jobName"] else None)
    assert _objects(clients, OUT, "viassm/") == {"viassm/v/s1/v.txt": b"V s1", "viassm/l/s1/l.txt": b"L s1"}

    # teardown --run A: A's parameter, execution role, staged objects and job definitions; not B's.
    staged_bucket = store.get_run(run_a).options["aws_batch"]["staged"].split("/")[2]
    b_role = next(
        d["containerProperties"]["executionRoleArn"].rsplit("/", 1)[-1] for d in defs
        if d["jobDefinitionArn"] in {j["jobDefinition"] for j in _jobs(clients, store, run_b)}
        and d["containerProperties"].get("secrets")
    )
    assert b_role != exec_role
    td = run_cli("aws", "teardown", "--run", run_a, "--yes", "--json")
    assert td.returncode == 0, td.stderr
    deleted = json.loads(td.stdout)["deleted"]
    assert f"ssm-parameter {name}" in deleted and f"role {exec_role}" in deleted
    assert any(d.startswith(f"s3-objects s3://{staged_bucket}/corral/staged/{run_a}/") for d in deleted)
    assert not any(run_b in d or b_role in d for d in deleted)
    assert ssm.describe_parameters()["Parameters"] == []
    roles = {r["RoleName"] for r in clients.iam.list_roles(PathPrefix="/corral/")["Roles"]}
    # Run A's job role is A's own now (issue 13): removed with it; B's roles stay.
    assert exec_role not in roles and b_role in roles and job_role not in roles and f"role {job_role}" in deleted
    assert _objects(clients, staged_bucket, f"corral/staged/{run_a}/") == {}
    assert _objects(clients, staged_bucket, f"corral/staged/{run_b}/")
    assert clients.secretsmanager.list_secrets()["SecretList"]  # B's secret is still there

    # teardown --run B: its Secrets Manager secret, its execution role, its staged objects.
    td = run_cli("aws", "teardown", "--run", run_b, "--yes", "--json")
    assert td.returncode == 0, td.stderr
    deleted = json.loads(td.stdout)["deleted"]
    assert f"secret corral/{run_b}/rclone" in deleted and f"role {b_role}" in deleted
    assert _objects(clients, staged_bucket, "corral/staged/") == {}
    assert clients.secretsmanager.list_secrets()["SecretList"] == []
    # Each run's job role went with its run: only the shared instance role is left.
    assert {r["RoleName"] for r in clients.iam.list_roles(PathPrefix="/corral/")["Roles"]} == {"corral-ecs-instance"}
