"""`corral aws setup/teardown/image` and the one-line credential errors."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ParamValidationError

from corral.backends.aws_batch import AwsClients, Needs, ensure_environment
from corral.backends.aws_batch.client import aws_errors, translate
from corral.cli import main
from corral.errors import CredentialsError, ProvisionError
from corral.spec import AwsSettings

pytestmark = pytest.mark.aws


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)


def test_missing_credentials_is_one_line_with_a_hint(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_credentials(monkeypatch)
    with pytest.raises(CredentialsError) as exc:
        AwsClients().account_id()
    assert "\n" not in str(exc.value) and "no AWS credentials" in exc.value.message
    assert "aws configure" in exc.value.hint and "--profile" in exc.value.hint
    with pytest.raises(CredentialsError):
        ensure_environment(AwsClients(), AwsSettings(), Needs())


def test_missing_credentials_on_the_command_line(aws: str, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _no_credentials(monkeypatch)
    code, out, err = run(["aws", "setup"], capsys)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines[-2].startswith("error: no AWS credentials found") and lines[-1].startswith("hint: ")
    assert "Traceback" not in err


def test_missing_region_and_unknown_profile(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(CredentialsError, match="no AWS region"):
        AwsClients()
    assert AwsClients(region="eu-west-1").region == "eu-west-1"
    with pytest.raises(CredentialsError, match="profile 'nope'"):
        AwsClients(profile="nope")


def test_denied_and_other_client_errors_are_translated() -> None:
    denied = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "User x is not authorized"}},
                         "CreateComputeEnvironment")
    err = translate(denied, "set up compute environment corral-ec2")
    assert isinstance(err, CredentialsError)
    assert "CreateComputeEnvironment was denied" in err.message and "permission" in err.hint
    bad_key = ClientError({"Error": {"Code": "InvalidClientTokenId", "Message": "bad"}}, "GetCallerIdentity")
    assert isinstance(translate(bad_key, "x"), CredentialsError)
    other = ClientError({"Error": {"Code": "LimitExceededException", "Message": "too many"}}, "CreateJobQueue")
    err = translate(other, "set up job queue corral")
    assert isinstance(err, ProvisionError) and "LimitExceededException" in err.message
    assert isinstance(translate(NoCredentialsError(), "x"), CredentialsError)
    assert isinstance(translate(EndpointConnectionError(endpoint_url="http://x"), "x"), ProvisionError)
    assert translate(ValueError("mine"), "x") is None
    assert translate(ParamValidationError(report="bad"), "x") is None  # our bug: keep the traceback
    with pytest.raises(ValueError), aws_errors("x"):
        raise ValueError("not botocore's: left alone")


def test_setup_json_then_again_then_teardown(aws: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["aws", "setup", "--spot", "--max-vcpus", "64", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert "job-queue/corral-" in data["environment"]["job_queue"]  # spot: not the plain queue
    assert data["report"]["created"] and "created" in err and "job queue:" in err
    code, out, err = run(["aws", "setup", "--spot", "--max-vcpus", "64", "--json"], capsys)
    assert code == 0 and json.loads(out)["report"]["created"] == []
    code, out, err = run(["aws", "teardown", "--all"], capsys)  # no tty: refuses without --yes
    assert code == 2 and "--yes" in err
    code, out, err = run(["aws", "teardown", "--all", "--yes", "--json"], capsys)
    assert code == 0, err
    assert any(d.startswith("job-queue corral-") for d in json.loads(out)["deleted"])
    code, out, err = run(["aws", "teardown", "--yes"], capsys)
    assert code == 2 and "--all or --run" in err


def test_setup_from_a_workflow_file(aws: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text("""
name: sort
aws: {spot: true}
items: [{s: a}]
stages:
  - name: sort
    command: sort {s}
    resources: {gpus: 1, disk: 100GiB}
""")
    code, out, err = run(["aws", "setup", "-w", str(wf), "--json"], capsys)
    assert code == 0, err
    env = json.loads(out)["environment"]
    assert env["gpu_job_queue"] and env["launch_template"] == "corral-batch:1" and env["root_volume_gib"] == 150
    wf.write_text(wf.read_text().replace("gpus: 1", "gpus: 12"))
    code, out, err = run(["aws", "setup", "-w", str(wf)], capsys)
    assert code != 0 and "12" in err and "wf.yaml:" in err


def test_image_commands(aws: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run(["aws", "image", "list"], capsys)
    assert code == 0 and "no repositories" in err
    monkeypatch.setenv("PATH", "/nonexistent")  # no engine at all
    code, out, err = run(["aws", "image", "push", "my-sorter:1.2"], capsys)
    assert code == 1 and "no container engine is running" in err and out == ""


def test_run_says_what_it_provisioned_once(aws: str, tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    """`corral run --backend aws` on an empty account lists what it made (stderr); the next run,
    finding everything, says only that it made its own job role."""
    from pathlib import Path

    wf = Path(str(tmp_path)) / "wf.yaml"
    wf.write_text("name: say\nitems: [{s: a}]\ndefaults: {image: busybox}\nstages:\n  - {name: w, command: 'echo {s}'}\n")
    code, out, err = run(["run", str(wf), "--backend", "aws"], capsys)
    assert code == 0, err
    assert "corral: provisioned what the workflow needs in" in err
    created = [line for line in err.splitlines() if line.startswith("  created  ")]
    assert any("job-queue corral" in line for line in created) and any("role corral-job-" in line for line in created)
    assert out.strip().startswith("say-")  # stdout: the run id alone
    from helpers import run_cli

    again = run_cli("run", str(wf), "--backend", "aws")  # another process: nothing cached
    assert again.returncode == 0, again.stderr
    # Only the run's own job role is new (one per run, issue 13); everything else is found.
    made = [line for line in again.stderr.splitlines() if line.startswith("  created  ")]
    assert len(made) == 1 and made[0].startswith("  created  role corral-job-"), again.stderr


def test_run_without_wait_says_when_a_failed_runs_cleanup_happens(aws: str, tmp_path: object) -> None:
    from pathlib import Path

    from helpers import run_cli

    base = "items: [{s: a}]\ndefaults: {image: busybox}\nstages:\n  - {name: w, command: 'echo {s}'}\n"
    plain, cleaned = Path(str(tmp_path)) / "plain.yaml", Path(str(tmp_path)) / "cleaned.yaml"
    plain.write_text("name: plain\n" + base)
    cleaned.write_text("name: cleaned\ncleanup: true\n" + base)
    res = run_cli("run", str(plain), "--backend", "aws")
    assert res.returncode == 0, res.stderr
    assert "workspace cleanup" not in res.stderr
    res = run_cli("run", str(cleaned), "--backend", "aws")
    assert res.returncode == 0, res.stderr
    note = [line for line in res.stderr.splitlines() if line.startswith("note: ")]
    assert len(note) == 1 and "after a failure" in note[0] and "corral status" in note[0]
