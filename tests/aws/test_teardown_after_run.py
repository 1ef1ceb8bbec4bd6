"""Issue 7, item 7: after a real run (EFS workspace, an rclone secret, queues, job definitions) and
a second one (its rclone config in SSM, a local folder staged to corral's bucket), `corral aws
teardown --all` leaves nothing tagged corral:managed and nothing named corral-*."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_cli
from provision_helpers import managed_census

from corral.backends.aws_batch.client import AwsClients
from corral.backends.base import RunOptions
from corral.spec import loads_workflow

pytestmark = pytest.mark.aws


def test_teardown_all_after_a_run_leaves_nothing(aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import corral.api as api

    data = tmp_path / "vault-data" / "s1"
    data.mkdir(parents=True)
    (data / "a.txt").write_text("A")
    conf = tmp_path / "rclone.conf"
    conf.write_text(f"[vault]\ntype = alias\nremote = {tmp_path / 'vault-data'}\n")
    monkeypatch.setenv("RCLONE_CONFIG", str(conf))
    clients = AwsClients()
    clients.s3.create_bucket(Bucket="corral-td-out", CreateBucketConfiguration={"LocationConstraint": clients.region})
    wf = loads_workflow("""
name: td
items: [{s: s1}, {s: s2}]
stages:
  - {name: fetch, from: 'vault:{s}', to: 's3://corral-td-out/raw/{s}'}
  - {name: work, needs: [fetch], image: 'public.ecr.aws/docker/library/alpine:3.20', command: "ls {workdir} {s}"}
""")
    rec = api.run(wf, backend="aws", options=RunOptions(wait=False))
    # a second run keeps its rclone config in SSM and stages a local folder in corral's bucket
    (tmp_path / "local" / "s1").mkdir(parents=True)
    (tmp_path / "local" / "s1" / "l.txt").write_text("L")
    wf2 = loads_workflow("""
name: td2
items: [{s: s1}]
aws: {secrets: ssm}
stages:
  - {name: fetch, from: 'vault:{s}', to: 's3://corral-td-out/v/{s}'}
  - {name: put, from: 'local/{s}', to: 's3://corral-td-out/l/{s}'}
""", base_dir=tmp_path)
    rec2 = api.run(wf2, backend="aws", options=RunOptions(wait=False))
    assert clients.ssm.describe_parameters()["Parameters"][0]["Name"] == f"/corral/{rec2.run_id}/rclone"
    assert rec2.options["aws_batch"]["staged"]
    census = managed_census(clients)
    assert census["file-systems"] and census["job-queues"] and census["compute-environments"]
    sm = clients.secretsmanager
    assert sm.describe_secret(SecretId=f"corral/{rec.run_id}/rclone")
    active = [d["jobDefinitionName"] for d in clients.batch.describe_job_definitions(status="ACTIVE")["jobDefinitions"]]
    assert any(n.startswith("corral-") for n in active)

    res = run_cli("aws", "teardown", "--all", "--yes", "--purge")
    assert res.returncode == 0, res.stderr

    assert {k: v for k, v in managed_census(clients).items() if v} == {}
    left = [s["Name"] for s in sm.list_secrets()["SecretList"]
            if any(t["Key"] == "corral:managed" for t in s.get("Tags", []))]
    assert left == []
    assert clients.ssm.describe_parameters()["Parameters"] == []
    active = [d["jobDefinitionName"] for d in clients.batch.describe_job_definitions(status="ACTIVE")["jobDefinitions"]]
    assert not any(n.startswith("corral-") for n in active)
    assert clients.s3.head_bucket(Bucket="corral-td-out")  # the user's bucket is not corral's to remove
