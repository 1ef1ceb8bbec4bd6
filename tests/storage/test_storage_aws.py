"""The AWS side of data movement, run for real where it can be: the transfer job's command under
/bin/sh with the real rclone (against local folders and the moto S3), the cleanup job's command,
and the rclone-config secret in moto's Secrets Manager (tags, idempotence, deletion, canary)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import RcloneSetup
from storage_helpers import make_tree, needs_rclone, tree

from corral.errors import ProvisionError, StorageError
from corral.spec import loads_workflow
from corral.storage import aws as saws
from corral.storage import secrets as ssec


def _job_env(tmp_path: Path, config_text: str | None) -> dict[str, str]:
    """What the container would have: PATH, a TMPDIR, the secret as an env var; no CA bundle."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    (tmp_path / "jobtmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp_path / "jobtmp")
    env.pop("RCLONE_CONFIG", None)
    if config_text is not None:
        env[saws.CONFIG_ENV] = config_text
    return env


@needs_rclone
def test_transfer_job_command_runs_rclone_with_the_secret_config(rclone_setup: RcloneSetup, tmp_path: Path) -> None:
    make_tree(rclone_setup.data, {"raw/s1/a.nwb": "A", "raw/s1/notes.txt": "n"})
    wf = loads_workflow(
        "name: w\nitems: [{session: s1}]\nstages:\n"
        "  - {name: fetch, from: 'vault:x', to: 'workspace://x'}\n"
        "  - {name: get, from: 'data:raw/{session}', to: 'workspace://{session}/raw', filters: ['+ *.nwb', '- *']}\n"
    )
    assert saws.workflow_remotes(wf) == {"vault", "data"}
    text = saws.rclone_config_text({"data"}, config_path=rclone_setup.conf)
    assert "[data]" in text and rclone_setup.canary not in text and "[unused]" not in text
    workdir = tmp_path / "efs" / "runs" / "r1"
    argv = saws.transfer_container_argv(
        "data:raw/s1", "workspace://s1/raw", mode="copy", filters=["+ *.nwb", "- *"], workdir=str(workdir),
        region="us-east-2",
    )
    r = subprocess.run(argv, env=_job_env(tmp_path, text), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert tree(workdir / "s1" / "raw") == {"a.nwb": "A"}
    assert list((tmp_path / "jobtmp").iterdir()) == []  # the config file is gone


@needs_rclone
def test_transfer_job_command_reads_s3_with_env_auth(bucket: tuple[Any, str], tmp_path: Path) -> None:
    client, name = bucket
    client.put_object(Bucket=name, Key="raw/s1/a.bin", Body=b"payload")
    workdir = tmp_path / "efs" / "runs" / "r1"
    argv = saws.transfer_container_argv(
        f"s3://{name}/raw/s1", "workspace://s1", mode="sync", filters=[], workdir=str(workdir),
        region=os.environ["AWS_REGION"], endpoint=os.environ["AWS_ENDPOINT_URL"],
    )
    r = subprocess.run(argv, env=_job_env(tmp_path, None), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (workdir / "s1" / "a.bin").read_bytes() == b"payload"
    # and back up, workspace → S3
    (workdir / "s1" / "result.txt").write_text("r")
    argv = saws.transfer_container_argv(
        "workspace://s1", f"s3://{name}/results/s1", mode="copy", filters=["+ result.txt", "- *"],
        workdir=str(workdir), region=os.environ["AWS_REGION"], endpoint=os.environ["AWS_ENDPOINT_URL"],
    )
    r = subprocess.run(argv, env=_job_env(tmp_path, None), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix="results/")["Contents"]]
    assert keys == ["results/s1/result.txt"]


def test_transfer_job_without_rclone_or_package_manager_says_so(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("mktemp", "rm"):
        found = shutil.which(tool)
        assert found
        (bindir / tool).symlink_to(found)
    argv = saws.transfer_container_argv(
        "s3://bkt-1/x", "workspace://x", mode="copy", filters=[], workdir="/mnt/corral/runs/r1", region="us-east-2"
    )
    r = subprocess.run(argv, env={"PATH": str(bindir)}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 127
    assert "rclone is not in this image" in r.stderr and "CORRAL_RCLONE_IMAGE" in r.stderr


def test_transfer_job_refuses_paths_of_the_submitting_machine() -> None:
    with pytest.raises(StorageError, match="cannot reach") as ei:
        saws.transfer_container_argv("data/raw", "s3://bkt-1/x", mode="copy", filters=[], workdir="/w", region=None)
    assert "workspace://" in (ei.value.hint or "")


def test_cleanup_job_removes_exactly_the_run_folder(tmp_path: Path) -> None:
    root = tmp_path / "efs" / "runs"
    make_tree(root / "r1", {"s1/raw/a": "a", "s2/b": "b"})
    make_tree(root / "r2", {"s1/raw/a": "other"})
    r = subprocess.run(saws.cleanup_container_argv(str(root / "r1"), root=str(root)), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert not (root / "r1").exists() and tree(root / "r2") == {"s1/raw/a": "other"}
    with pytest.raises(StorageError):
        saws.cleanup_container_argv(str(root), root=str(root))
    with pytest.raises(StorageError):
        saws.cleanup_container_argv(str(root / "r2" / ".." / ".."), root=str(root))
    # the script checks again, whatever argv it is given
    evil = ["/bin/sh", "-c", saws.CLEANUP_SCRIPT, "corral-cleanup", str(tmp_path), str(root)]
    r = subprocess.run(evil, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "refusing" in r.stderr and (root / "r2").exists()


# -- the secret ---------------------------------------------------------------------------------
def _sm() -> Any:
    import boto3

    return boto3.client("secretsmanager")


def _tags(sm: Any, arn: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in sm.describe_secret(SecretId=arn).get("Tags", [])}


def test_secret_lifecycle(aws_light: str) -> None:
    sm = _sm()
    arn = ssec.create_secret(sm, run_id="r1", value="[a]\ntype = alias\n")
    assert _tags(sm, arn) == {"corral:managed": "true", "corral:run": "r1"}
    assert sm.describe_secret(SecretId=arn)["Name"] == "corral/r1/rclone"
    # a second attempt (resume) updates the value and returns the same secret
    assert ssec.create_secret(sm, run_id="r1", value="[b]\ntype = alias\n") == arn
    assert sm.get_secret_value(SecretId=arn)["SecretString"] == "[b]\ntype = alias\n"
    arn2 = ssec.create_secret(sm, run_id="r2", value="x")
    sm.create_secret(Name="someone-elses", SecretString="keep")
    assert ssec.delete_run_secrets(sm, "r1") == ["corral/r1/rclone"]
    names = {s["Name"] for s in sm.list_secrets()["SecretList"]}
    assert names == {"corral/r2/rclone", "someone-elses"}
    assert ssec.delete_managed_secrets(sm) == ["corral/r2/rclone"]
    assert {s["Name"] for s in sm.list_secrets()["SecretList"]} == {"someone-elses"}
    sm.delete_secret(SecretId="someone-elses", ForceDeleteWithoutRecovery=True)
    del arn2


def test_secret_name_taken_by_something_else_is_refused(aws_light: str) -> None:
    sm = _sm()
    sm.create_secret(Name="corral/r1/rclone", SecretString="not ours")
    with pytest.raises(ProvisionError, match="not made by corral"):
        ssec.create_secret(sm, run_id="r1", value="x")
    assert sm.get_secret_value(SecretId="corral/r1/rclone")["SecretString"] == "not ours"
    sm.delete_secret(SecretId="corral/r1/rclone", ForceDeleteWithoutRecovery=True)


def test_ssm_parameter_lifecycle(aws_light: str) -> None:
    """`aws: secrets: ssm`: a tagged SecureString per run, updated on resume, a foreign parameter of
    the same name refused, deleted per run and all at once (and nothing else)."""
    import boto3

    ssm = boto3.client("ssm")
    arn = ssec.create_parameter(ssm, run_id="r1", value="[a]\ntype = alias\n", account_id="123456789012")
    assert arn == f"arn:aws:ssm:{os.environ['AWS_REGION']}:123456789012:parameter/corral/r1/rclone"
    p = ssm.get_parameter(Name="/corral/r1/rclone", WithDecryption=True)["Parameter"]
    assert p["Type"] == "SecureString" and p["Value"] == "[a]\ntype = alias\n"
    tags = ssm.list_tags_for_resource(ResourceType="Parameter", ResourceId="/corral/r1/rclone")["TagList"]
    assert {t["Key"]: t["Value"] for t in tags} == {"corral:managed": "true", "corral:run": "r1"}
    assert ssec.create_parameter(ssm, run_id="r1", value="[b]\ntype = alias\n", account_id="123456789012") == arn
    assert ssm.get_parameter(Name="/corral/r1/rclone", WithDecryption=True)["Parameter"]["Value"] == "[b]\ntype = alias\n"
    ssec.create_parameter(ssm, run_id="r2", value="x", account_id="123456789012")
    ssm.put_parameter(Name="/corral/r3/rclone", Value="not ours", Type="SecureString")
    with pytest.raises(ProvisionError, match="not made by corral"):
        ssec.create_parameter(ssm, run_id="r3", value="x", account_id="123456789012")
    assert ssec.delete_parameters(ssm, "r1") == ["/corral/r1/rclone"]
    assert ssec.delete_parameters(ssm, None) == ["/corral/r2/rclone"]
    assert [q["Name"] for q in ssm.describe_parameters()["Parameters"]] == ["/corral/r3/rclone"]
    assert ssm.get_parameter(Name="/corral/r3/rclone", WithDecryption=True)["Parameter"]["Value"] == "not ours"
    ssm.delete_parameter(Name="/corral/r3/rclone")
    stmts = ssec.parameter_statements([arn], region="us-east-2", account_id="123456789012")
    assert stmts[0]["Action"] == ["ssm:GetParameters"] and stmts[0]["Resource"] == [arn]
    assert stmts[1]["Condition"]["StringEquals"]["kms:ViaService"] == "ssm.us-east-2.amazonaws.com"


def test_reader_policy_and_statement() -> None:
    pol = json.loads(ssec.reader_policy(["arn:aws:iam::123456789012:role/corral-exec"]))
    st = pol["Statement"][0]
    assert st["Effect"] == "Deny" and st["Action"] == "secretsmanager:GetSecretValue"
    assert st["Condition"]["StringNotEquals"]["aws:PrincipalArn"] == ["arn:aws:iam::123456789012:role/corral-exec"]
    stmt = ssec.read_statement(["arn:b", "arn:a"])
    assert stmt["Action"] == ["secretsmanager:GetSecretValue"] and stmt["Resource"] == ["arn:a", "arn:b"]


@needs_rclone
def test_canary_reaches_the_job_only_through_the_secret(
    rclone_setup: RcloneSetup, aws_light: str, tmp_path: Path
) -> None:
    """The rclone.conf canary (and its obscured form) is in the Secrets Manager value and nowhere in
    what a job definition or a container override is built from."""
    sm = _sm()
    wf = loads_workflow(
        "name: w\nitems: [{session: s1}]\nstages:\n"
        "  - {name: fetch, from: 'vault:raw/{session}', to: 'workspace://{session}'}\n"
    )
    secrets = saws.prepare_rclone_secret(sm, wf, "r1", config_path=rclone_setup.conf)
    assert list(secrets) == [saws.CONFIG_ENV]
    value = sm.get_secret_value(SecretId=secrets[saws.CONFIG_ENV])["SecretString"]
    assert rclone_setup.obscured in value and "[unused]" not in value and rclone_setup.canary not in value
    job_parts = {
        "image": saws.rclone_image(),
        "secrets": saws.secret_env(secrets),
        "command": saws.transfer_container_argv(
            "vault:raw/s1", "workspace://s1", mode="copy", filters=[], workdir="/mnt/corral/runs/r1",
            region="us-east-2",
        ),
        "cleanup": saws.cleanup_container_argv("/mnt/corral/runs/r1", root="/mnt/corral/runs"),
    }
    blob = json.dumps(job_parts)
    for secret in (rclone_setup.canary, rclone_setup.obscured):
        assert secret not in blob
    assert job_parts["secrets"] == [{"name": "CORRAL_RCLONE_CONFIG", "valueFrom": secrets[saws.CONFIG_ENV]}]
    # the job definition the AWS backend's payload builder makes from the transfer stage
    from corral.backends.aws_batch.payloads import JobContext, job_definition

    ctx = JobContext(region="us-east-2", account_id="123456789012", execution_role_arn="arn:aws:iam::1:role/x")
    jd = job_definition(saws.job_stage(wf.stage("fetch"), secrets=secrets), ctx)
    jd_blob = json.dumps(jd.kwargs)
    assert secrets[saws.CONFIG_ENV] in jd_blob
    for secret in (rclone_setup.canary, rclone_setup.obscured):
        assert secret not in jd_blob
    # a workflow whose transfers need no rclone.conf remote makes no secret
    plain = loads_workflow("name: w\nstages:\n  - {name: up, per: run, from: 'workspace://x', to: 's3://bkt-1/x'}\n")
    assert saws.prepare_rclone_secret(sm, plain, "r2", config_path=rclone_setup.conf) == {}
    assert ssec.delete_run_secrets(sm, "r1") == ["corral/r1/rclone"]


@needs_rclone
def test_local_source_is_staged_to_s3_once_then_transferred_by_the_job(bucket: tuple[Any, str], tmp_path: Path) -> None:
    from corral.storage.s3 import CountingProgress

    client, name = bucket
    raw = make_tree(tmp_path / "raw" / "s1", {"a.nwb": "A" * 100, "sub/b.nwb": "B" * 50})
    first = CountingProgress()
    uri = saws.stage_local_source(client, raw, bucket=name, prefix="corral", run_id="r1", progress=first)
    assert uri == saws.staged_uri(raw, bucket=name, prefix="corral", run_id="r1")
    assert uri.startswith(f"s3://{name}/corral/staged/r1/") and uri.endswith("/s1")
    assert first.total == 150
    again = CountingProgress()
    assert saws.stage_local_source(client, raw, bucket=name, prefix="corral", run_id="r1", progress=again) == uri
    assert again.total == 0  # resumed: nothing sent twice
    (raw / "a.nwb").write_text("changed")
    changed = CountingProgress()
    saws.stage_local_source(client, raw, bucket=name, prefix="corral", run_id="r1", progress=changed)
    assert changed.total == len("changed")

    workdir = tmp_path / "efs" / "runs" / "r1"
    argv = saws.transfer_container_argv(
        uri, "workspace://s1/raw", mode="copy", filters=[], workdir=str(workdir),
        region=os.environ["AWS_REGION"], endpoint=os.environ["AWS_ENDPOINT_URL"],
    )
    r = subprocess.run(argv, env=_job_env(tmp_path, None), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert tree(workdir / "s1" / "raw") == {"a.nwb": "changed", "sub/b.nwb": "B" * 50}
    assert saws.delete_staged(client, bucket=name, prefix="corral", run_id="r1") == 2
    assert client.list_objects_v2(Bucket=name).get("KeyCount", 0) == 0


def test_transfer_job_forwards_sigterm_to_rclone_and_removes_its_config(tmp_path: Path) -> None:
    """Batch stops a job with SIGTERM to the container's first process (the sh script)."""
    import signal
    import time

    bindir = tmp_path / "bin"
    bindir.mkdir()
    started = tmp_path / "started"
    fake = bindir / "rclone"
    fake.write_text(f'#!/bin/sh\ncp "$RCLONE_CONFIG" "{tmp_path}/seen.conf"\necho $$ > "{started}"\nexec sleep 60\n')
    fake.chmod(0o755)
    env = _job_env(tmp_path, "[x]\ntype = alias\nremote = /nowhere\n")
    env["PATH"] = f"{bindir}:{env['PATH']}"
    argv = saws.transfer_container_argv(
        "workspace://a", "workspace://b", mode="copy", filters=[], workdir="/mnt/corral/runs/r1", region=None
    )
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (started.exists() and started.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)  # bounded poll on a file the child writes
    rclone_pid = int(started.read_text())
    assert (tmp_path / "seen.conf").read_text().strip() == "[x]\ntype = alias\nremote = /nowhere"
    assert len(list((tmp_path / "jobtmp").iterdir())) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    try:
        os.kill(rclone_pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
    assert list((tmp_path / "jobtmp").iterdir()) == []


def test_task_argv_and_job_stage_for_the_aws_payloads(tmp_path: Path) -> None:
    from functools import partial

    from corral.plan import make_plan

    wf = loads_workflow(
        "name: w\nitems: [{session: s1}, {session: s2}]\n"
        "defaults: {image: 'python:3.11-slim'}\n"
        "stages:\n"
        "  - {name: fetch, from: 'raw/{session}', to: 'workspace://{session}/raw', filters: ['+ *.nwb', '- *']}\n"
        "  - {name: work, needs: [fetch], command: 'ls {workdir}/{session}'}\n"
        "  - {name: tidy, kind: cleanup, per: run, needs: [work]}\n",
        base_dir=tmp_path,
    )
    plan = make_plan(wf)
    fetch = plan.stage_tasks("fetch")[1]
    staged: list[str] = []

    def fake_stage(path: str, *, bucket: str) -> str:
        staged.append(path)
        return f"s3://{bucket}/staged/{Path(path).name}"

    argv = saws.task_argv(
        fetch, run_id="r1", workdir="/mnt/corral/runs/r1", region="us-east-2", workspace_root="/mnt/corral/runs",
        stage_local=partial(fake_stage, bucket="bkt-1"), base_dir=tmp_path,
    )
    assert staged == [str(tmp_path / "raw" / "s2")]
    assert argv[:4] == ["/bin/sh", "-c", saws.TRANSFER_SCRIPT, "corral-transfer"]
    assert argv[4:9] == ["copy", ":s3,provider=AWS,env_auth=true,no_check_bucket=true,region=us-east-2:bkt-1/staged/s2",
                         "/mnt/corral/runs/r1/s2/raw", "--filter", "+ *.nwb"]
    with pytest.raises(StorageError, match="cannot reach"):
        saws.task_argv(fetch, run_id="r1", workdir="/mnt/corral/runs/r1", region=None,
                       workspace_root="/mnt/corral/runs")
    tidy = plan.stage_tasks("tidy")[0]
    assert saws.task_argv(tidy, run_id="r1", workdir="/mnt/corral/runs/r1", region=None,
                          workspace_root="/mnt/corral/runs")[3:] == ["corral-cleanup", "/mnt/corral/runs/r1",
                                                                     "/mnt/corral/runs"]
    work = plan.stage_tasks("work")[0]
    assert saws.task_argv(work, run_id="r1", workdir="/w", region=None, workspace_root="/") == work.command("r1", "/w")

    arn = "arn:aws:secretsmanager:us-east-2:123456789012:secret:corral/r1/rclone-AbCdEf"
    js = saws.job_stage(wf.stage("fetch"), secrets={saws.CONFIG_ENV: arn})
    assert js.image == saws.rclone_image() and js.secrets == {saws.CONFIG_ENV: arn}
    assert wf.stage("fetch").image == "python:3.11-slim"  # the workflow's stage is not changed
    assert saws.job_stage(wf.stage("tidy")).image == saws.rclone_image()
    assert saws.job_stage(wf.stage("work")) is wf.stage("work")
