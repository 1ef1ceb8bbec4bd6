"""Transfer stages and ecr:// images on the AWS backend, end to end through ``corral.api.run`` against
moto: the rclone config reaches jobs only as a Secrets Manager reference (never a value in a job
definition, an override or the state table), the execution role may read the run's secret, the
submitted child really copies with rclone under /bin/sh, and ``ecr://name:tag`` is resolved."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_backend_support import item_text

from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.rclone_image import ensure_rclone_image
from corral.backends.base import RunOptions
from corral.spec import loads_workflow
from corral.storage.aws import CONFIG_ENV

pytestmark = pytest.mark.aws

CANARY = "canary-7d3b21-must-not-leak"
OUT_BUCKET = "corral-xfer-out"
RCLONE = shutil.which("rclone")


def _conf(tmp_path: Path) -> tuple[Path, Path]:
    """A user rclone.conf: ``vault`` (used: an alias of a local folder, holding the canary) and
    ``unused``; returns (config file, the folder behind ``vault:``)."""
    src = tmp_path / "vault-data"
    for s in ("s1", "s2"):
        (src / s / "sub").mkdir(parents=True)
        (src / s / "a.txt").write_text(f"A {s}")
        (src / s / "sub" / "b.txt").write_text(f"B {s}")
    conf = tmp_path / "rclone.conf"
    conf.write_text(
        f"[vault]\ntype = alias\nremote = {src}\ndescription = {CANARY}\n\n"
        "[unused]\ntype = local\n"
    )
    return conf, src




def _all_jobs(batch: Any, job_ids: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(0, len(job_ids), 100):
        out += batch.describe_jobs(jobs=job_ids[i : i + 100])["jobs"]
    return out


def test_transfer_stage_and_ecr_image_through_the_api(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import corral.api as api

    conf, _ = _conf(tmp_path)
    monkeypatch.setenv("RCLONE_CONFIG", str(conf))
    clients = AwsClients()
    clients.s3.create_bucket(
        Bucket=OUT_BUCKET, CreateBucketConfiguration={"LocationConstraint": clients.region}
    ) if clients.region != "us-east-1" else clients.s3.create_bucket(Bucket=OUT_BUCKET)
    wf = loads_workflow(
        f"""
name: xfer
items: [{{s: s1}}, {{s: s2}}]
stages:
  - {{name: fetch, from: 'vault:{{s}}', to: 's3://{OUT_BUCKET}/raw/{{s}}'}}
  - {{name: sort, needs: [fetch], image: 'ecr://my-sorter:1.2', command: "sort {{s}}"}}
"""
    )
    rec = api.run(wf, backend="aws", options=RunOptions(wait=False))
    run_id = rec.run_id
    account, region = clients.account_id(), clients.region

    # The run's secret: made, tagged with the run, holding the used remote (and so the canary).
    sm = clients.secretsmanager
    desc = sm.describe_secret(SecretId=f"corral/{run_id}/rclone")
    tags = {t["Key"]: t["Value"] for t in desc["Tags"]}
    assert tags["corral:run"] == run_id and tags["corral:managed"] == "true"
    value = sm.get_secret_value(SecretId=desc["ARN"])["SecretString"]
    assert CANARY in value and "[vault]" in value and "[unused]" not in value

    # Job definitions: the transfer's has the secret as a reference; ecr:// is resolved.
    batch = clients.batch
    defs = batch.describe_job_definitions(status="ACTIVE")["jobDefinitions"]
    by_image = {d["containerProperties"]["image"]: d for d in defs}
    image = ensure_rclone_image(clients)  # (found: the run copied it; one DescribeImages)
    assert image.startswith(f"{account}.dkr.ecr.{region}.amazonaws.com/corral/rclone@sha256:")
    transfer_def = by_image[image]
    assert transfer_def["containerProperties"]["secrets"] == [{"name": CONFIG_ENV, "valueFrom": desc["ARN"]}]
    assert f"{account}.dkr.ecr.{region}.amazonaws.com/my-sorter:1.2" in by_image
    assert not any(i.startswith("ecr://") for i in by_image)

    # The execution role may read exactly the run's rclone secret (corral/<run>/rclone-??????).
    role = transfer_def["containerProperties"]["executionRoleArn"].rsplit("/", 1)[-1]
    iam = clients.iam
    policies = [
        iam.get_role_policy(RoleName=role, PolicyName=n)["PolicyDocument"]
        for n in iam.list_role_policies(RoleName=role)["PolicyNames"]
    ]
    resources = [
        r for doc in policies for st in doc["Statement"]
        if "secretsmanager:GetSecretValue" in st["Action"] for r in st["Resource"]
    ]
    assert f"arn:aws:secretsmanager:{region}:{account}:secret:corral/{run_id}/rclone-??????" in resources

    # The canary is in no job definition, no submitted job (its overrides) and no state item.
    store = api.open_store("aws", wf)
    tasks = store.get_tasks(run_id)
    parents = sorted({t.external_id.split(":")[0] for t in tasks})
    jobs = _all_jobs(batch, parents)
    assert len(jobs) == len(parents) == 2
    table = rec.options["aws_batch"]["table"]
    items = clients.dynamodb.scan(TableName=table)["Items"]
    assert any(run_id in item_text(i) for i in items)
    assert any("fetch" in item_text(i) for i in items)
    for blob in (json.dumps(defs, default=str), json.dumps(jobs, default=str), item_text(items)):
        assert CANARY not in blob
        assert "[vault]" not in blob

    if RCLONE is None:  # pragma: no cover - rclone is in the dev environment
        return
    # Run each submitted fetch child's command as the container would (Batch fills the secret).
    fetch = next(j for j in jobs if "fetch" in j["jobName"])
    command = transfer_def["containerProperties"]["command"]
    assert command == pl.BOOT_COMMAND  # the wrapper and the transfer script are in the definition's env
    overrides = {e["name"]: e["value"] for e in transfer_def["containerProperties"].get("environment", [])}
    overrides.update({e["name"]: e["value"] for e in fetch["container"]["environment"]})
    assert CONFIG_ENV not in overrides
    for index in range(2):
        env = {
            **overrides, CONFIG_ENV: value, "PATH": os.environ["PATH"], "HOME": str(tmp_path),
            "AWS_BATCH_JOB_ARRAY_INDEX": str(index), "CORRAL_WORKDIR": str(tmp_path / "work"),
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": region,
        }
        r = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert CANARY not in r.stdout + r.stderr
    got = {
        o["Key"]: clients.s3.get_object(Bucket=OUT_BUCKET, Key=o["Key"])["Body"].read().decode()
        for o in clients.s3.list_objects_v2(Bucket=OUT_BUCKET).get("Contents", [])
    }
    assert got == {
        "raw/s1/a.txt": "A s1", "raw/s1/sub/b.txt": "B s1", "raw/s2/a.txt": "A s2", "raw/s2/sub/b.txt": "B s2",
    }
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("corral-rclone.*"))  # config file removed


def test_check_takes_remote_transfers_and_refuses_local_paths(aws: str) -> None:
    from corral.backends.aws_batch.backend import AwsBatchBackend
    from corral.errors import PlanError
    from corral.plan import make_plan
    from corral.spec import AwsSettings

    be = AwsBatchBackend(AwsClients(), AwsSettings(instance_types=["m5.large"]))
    ok = loads_workflow(
        "name: w\nitems: [{a: 1}]\nstages:\n"
        "  - {name: t, from: 'vault:x/{a}', to: 's3://bkt-1/{a}'}\n"
        "  - {name: u, per: run, needs: [t], from: 'workspace://x', to: 's3://bkt-1/x'}\n"
    )
    be.check(make_plan(ok))  # no image needed: transfers run in the rclone image
    bad = loads_workflow("name: w\nitems: [{a: 1}]\nstages:\n  - {name: t, from: 's3://bkt-1/x', to: '/data/{a}'}\n")
    with pytest.raises(PlanError) as info:
        be.check(make_plan(bad))
    assert "path on this machine" in info.value.message and "corral pull" in (info.value.hint or "")
    # a local `from:` is staged to S3; one that does not exist is named with its stage and item
    missing = loads_workflow("name: w\nitems: [{a: 1}]\nstages:\n  - {name: t, from: '/data/{a}', to: 's3://bkt-1/x'}\n")
    with pytest.raises(PlanError) as info:
        be.check(make_plan(missing))
    assert info.value.message == "stage 't', item 1: the transfer's local source /data/1 does not exist"
