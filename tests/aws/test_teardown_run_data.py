"""`corral aws teardown --run R` removes the run's data on EFS first: a job running the cleanup
command on the run's folder (run here with /bin/sh on a temp folder standing in for the EFS mount),
waited for with bounded polling; the access point goes only when that job succeeded."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli
from test_backend import _steer
from test_backend_support import make_environment, moto_batch_backend, record_run

from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch.backend import AwsBatchBackend
from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.rclone_image import ensure_rclone_image
from corral.backends.aws_batch.removal import remove
from corral.backends.aws_batch.run_data import remove_run_data
from corral.backends.base import RunOptions
from corral.plan import make_plan
from corral.spec import loads_workflow
from corral.state.sqlite import SqliteStore
from corral.storage.aws import cleanup_container_argv

pytestmark = pytest.mark.aws

RUN = "run-td"
WF = """
name: td
defaults: {image: busybox}
stages:
  - {name: work, command: "make {workdir}/{s}"}
"""


def _efs_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_id: str = RUN) -> tuple[AwsClients, str]:
    """A run submitted with an EFS workspace (file system and access point tagged as corral makes
    them), recorded in this machine's state store; returns (clients, access point id)."""
    monkeypatch.setattr(pl, "EFS_MOUNT", str(tmp_path / "efs"))
    clients = AwsClients()
    env = make_environment(clients)
    efs = clients.efs
    fs = efs.create_file_system(CreationToken="corral-workspace", Tags=[{"Key": "corral:managed", "Value": "true"}])
    ap = efs.create_access_point(
        FileSystemId=fs["FileSystemId"], RootDirectory={"Path": f"/runs/{run_id}"},
        Tags=[{"Key": "corral:managed", "Value": "true"}, {"Key": "corral:run", "Value": run_id}],
    )["AccessPointId"]
    env.efs_id, env.efs_access_point = fs["FileSystemId"], ap
    plan = make_plan(loads_workflow(WF), items=[{"s": "a"}, {"s": "b"}])
    from corral.api import corral_home

    store = SqliteStore(corral_home() / "state.db")
    run = record_run(store, plan, run_id)
    AwsBatchBackend(clients, environment=env, sleep=lambda s: None).start(plan, run, store, RunOptions(wait=False))
    store.close()
    return clients, ap


def _aps(clients: AwsClients) -> list[str]:
    return [a["AccessPointId"] for a in clients.efs.describe_access_points()["AccessPoints"]]


def _data_jobs() -> list[Any]:
    return [j for j in moto_batch_backend()._jobs.values() if j.job_name.endswith("-teardown-data")]


class _Time:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def test_run_data_job_removes_exactly_the_run_folder_then_the_access_point_goes(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clients, ap = _efs_run(tmp_path, monkeypatch)
    mine, other = tmp_path / "efs" / "runs" / RUN, tmp_path / "efs" / "runs" / "run-other"
    for d in (mine / "a", other):
        d.mkdir(parents=True)
        (d / "f.nwb").write_bytes(b"data")
    out = remove_run_data(clients, RUN)
    assert out.status == "removed" and out.access_point == ap and out.job_id
    (job,) = _data_jobs()
    assert not job.depends_on
    argv = job.container_overrides["command"]
    assert argv == cleanup_container_argv(str(mine), root=str(tmp_path / "efs" / "runs"))
    props = job.job_definition.container_properties
    assert props["image"] == ensure_rclone_image(clients)  # corral's pinned rclone image, by digest
    (volume,) = props["volumes"]
    assert volume["efsVolumeConfiguration"]["authorizationConfig"]["accessPointId"] == ap
    assert props["jobRoleArn"].endswith(":role/job")  # the run's roles, as recorded

    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not mine.exists() and (other / "f.nwb").read_bytes() == b"data"

    report = remove(clients, run_id=RUN)
    assert ap not in _aps(clients) and any(ap in d for d in report.deleted)


def test_a_data_job_that_does_not_end_times_out_with_backoff(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clients, ap = _efs_run(tmp_path, monkeypatch)

    def stuck(http_response: Any, parsed: dict[str, Any], **kw: Any) -> None:
        _steer(parsed["jobId"], "RUNNABLE")  # no instance ever starts it

    clients.register_hook("after-call.batch.SubmitJob", stuck)
    t = _Time()
    out = remove_run_data(clients, RUN, timeout=120, sleep=t.sleep, clock=t.clock)
    assert out.failed and "did not end within 120s" in out.message and str(out.job_id) in out.message
    grow = t.sleeps[:-1]  # (the last sleep is cut at the deadline)
    assert 3 <= len(t.sleeps) <= 10 and grow == sorted(grow) and grow[-1] > 2 * grow[0] and t.t == 120
    assert ap in _aps(clients)


def test_no_record_or_no_efs_is_skipped_with_a_note(aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clients = AwsClients()
    out = remove_run_data(clients, "never-ran")
    assert out.status == "skipped" and "no record of run never-ran" in out.message
    env = make_environment(clients)
    plan = make_plan(loads_workflow(WF), items=[{"s": "a"}])
    from corral.api import corral_home

    store = SqliteStore(corral_home() / "state.db")
    run = record_run(store, plan, "no-efs")
    AwsBatchBackend(clients, environment=env, sleep=lambda s: None).start(plan, run, store, RunOptions(wait=False))
    out = remove_run_data(clients, "no-efs")
    assert out.status == "skipped" and "no EFS workspace" in out.message
    assert _data_jobs() == []


def test_cli_teardown_run_removes_data_then_access_point(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clients, ap = _efs_run(tmp_path, monkeypatch)
    res = run_cli("aws", "teardown", "--run", RUN, "--yes")
    assert res.returncode == 0, res.stderr
    assert f"removed  run {RUN}'s EFS data" in res.stderr
    assert ap not in _aps(clients)
    (job,) = _data_jobs()
    assert job.container_overrides["command"] == cleanup_container_argv(
        f"/mnt/corral/runs/{RUN}", root="/mnt/corral/runs"  # (the CLI process has the real mount path)
    )


def test_cli_teardown_keeps_the_access_point_when_the_data_job_fails(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clients, ap = _efs_run(tmp_path, monkeypatch)
    monkeypatch.setenv("MOTO_SIMPLE_BATCH_FAIL_AFTER", "0")  # moto (in this process) fails new jobs
    res = run_cli("aws", "teardown", "--run", RUN, "--yes")
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"run {RUN}'s data on EFS was not removed" in errors[0]
    assert "access point is kept" in errors[0]
    assert any(line.startswith("hint:") and "--keep-data" in line for line in res.stderr.splitlines())
    assert "Traceback" not in res.stderr
    assert "kept     efs-access-point" in res.stderr
    assert ap in _aps(clients)

    monkeypatch.delenv("MOTO_SIMPLE_BATCH_FAIL_AFTER")
    res = run_cli("aws", "teardown", "--run", RUN, "--yes", "--keep-data")
    assert res.returncode == 0, res.stderr
    assert ap not in _aps(clients)
    assert len(_data_jobs()) == 1  # --keep-data submitted no data job


def test_cli_teardown_refuses_a_run_with_jobs_in_flight_unless_forced(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clients, ap = _efs_run(tmp_path, monkeypatch)
    for job_id, job in list(moto_batch_backend()._jobs.items()):
        if job.job_name.startswith("corral-"):
            _steer(job_id, "RUNNING")  # the run's jobs are still at work
    res = run_cli("aws", "teardown", "--run", RUN, "--yes")
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"run {RUN} still has jobs in flight" in errors[0]
    assert "--force" in res.stderr and f"corral cancel {RUN}" in res.stderr and "Traceback" not in res.stderr
    assert ap in _aps(clients) and _data_jobs() == []  # nothing removed, no data job

    res = run_cli("aws", "teardown", "--run", RUN, "--yes", "--force")
    assert res.returncode == 0, res.stderr
    assert ap not in _aps(clients) and len(_data_jobs()) == 1


def test_cli_teardown_goes_on_once_the_run_has_ended(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record still says RUNNING (nobody refreshed it), but Batch says every job ended."""
    clients, ap = _efs_run(tmp_path, monkeypatch)
    from corral.api import corral_home

    store = SqliteStore(corral_home() / "state.db")
    assert store.get_run(RUN).state.value == "RUNNING"
    store.close()
    res = run_cli("aws", "teardown", "--run", RUN, "--yes")
    assert res.returncode == 0, res.stderr
    assert ap not in _aps(clients)
