"""`corral doctor`: local checks, failure causes, stuck-job reasons, and AWS environments broken on purpose."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest

from corral import doctor as dr
from corral.model import RunRecord, RunState, TaskRecord, TaskState
from corral.plan import make_plan
from corral.spec import AwsSettings, loads_workflow
from corral.state.sqlite import SqliteStore

sys.path.insert(0, str(Path(__file__).parent.parent))
from helpers import run_cli  # noqa: E402

Usage = namedtuple("Usage", "total used free")
GiB = 2**30


def by_check(findings: list[dr.Finding], check: str) -> list[dr.Finding]:
    return [f for f in findings if f.check == check]


# -- local ----------------------------------------------------------------------------------------
def test_engine_disk_and_rclone_findings_carry_fixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_RCLONE", raising=False)
    none = dr.check_engine(lambda: (None, "docker: not installed; podman: not installed"))
    assert none.level == "info" and "host processes" in none.message and "Docker or Podman" in none.fix
    Engine = namedtuple("Engine", "name path")
    assert dr.check_engine(lambda: (Engine("podman", "/usr/bin/podman"), "")).level == "ok"

    home = tmp_path / "not-yet" / "home"  # measured on the nearest folder that exists
    seen: list[str] = []

    def usage(free_gib: float):  # type: ignore[no-untyped-def]
        def f(path: str) -> Usage:
            seen.append(path)
            return Usage(100 * GiB, int((100 - free_gib) * GiB), int(free_gib * GiB))
        return f

    assert dr.check_disk(home, disk_usage=usage(50)).level == "ok"
    assert seen[-1] == str(tmp_path)
    low = dr.check_disk(home, disk_usage=usage(3))
    assert low.level == "warn" and "3.0 GiB free" in low.message and "CORRAL_HOME" in low.fix
    assert dr.check_disk(home, disk_usage=usage(0.2)).level == "error"

    missing = dr.check_rclone(which=lambda name: None)
    assert missing.level == "warn" and "install" in missing.fix
    assert dr.check_rclone(which=lambda name: "/opt/rclone").message == "rclone found (/opt/rclone)"
    monkeypatch.setenv("CORRAL_RCLONE", str(tmp_path / "nope"))
    assert dr.check_rclone().level == "error"


def test_state_db_integrity(tmp_path: Path) -> None:
    assert dr.check_state_db(tmp_path).level == "ok"  # none yet
    SqliteStore(tmp_path / "state.db").close()
    assert dr.check_state_db(tmp_path).level == "ok"
    (tmp_path / "state.db").write_bytes(b"this is not a database" * 200)
    bad = dr.check_state_db(tmp_path)
    assert bad.level == "error" and "mv " in bad.fix and str(tmp_path / "state.db") in bad.message


def test_interrupted_runs_get_the_resume_command(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    runs = [
        RunRecord(run_id="died", workflow_name="w", backend="local", created_at=1.0, host=host, pid=dead.pid,
                  options={"scheduler_start": "1"}),
        RunRecord(run_id="marked", workflow_name="w", backend="local", created_at=2.0, host=host,
                  state=RunState.INTERRUPTED),
        RunRecord(run_id="alive", workflow_name="w", backend="local", created_at=3.0, host=host, pid=os.getpid(),
                  options={"scheduler_start": __import__("corral.backends.local", fromlist=["x"])
                           .process_start_time(os.getpid())}),
        RunRecord(run_id="elsewhere", workflow_name="w", backend="local", created_at=4.0, host="other-host", pid=1),
        RunRecord(run_id="done", workflow_name="w", backend="local", created_at=5.0, host=host,
                  state=RunState.SUCCEEDED),
    ]
    for r in runs:
        store.create_run(r, b"{}", [])
    found = {f.subject: f for f in dr.check_interrupted(store)}
    assert set(found) == {"died", "marked", "elsewhere"}
    assert found["died"].level == "warn" and "`corral resume died`" in found["died"].fix
    assert "`corral resume marked`" in found["marked"].fix
    assert found["elsewhere"].level == "info" and "other-host" in found["elsewhere"].fix
    assert store.get_run("died").state == RunState.RUNNING  # doctor only reads
    store.close()
    findings = dr.local_checks(tmp_path, detect=lambda: (None, "none"), which=lambda n: "/bin/rclone",
                               disk_usage=lambda p: Usage(100 * GiB, 0, 100 * GiB))
    assert [f.check for f in findings] == ["engine", "disk", "rclone", "prices", "state-db", "interrupted",
                                           "interrupted", "interrupted"]


def test_price_table_age_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime

    day = datetime.datetime(2025, 8, 1, 12).timestamp()
    fresh = dr.check_prices(day)
    assert fresh.level == "ok" and "us-east-1 prices of 2025-07-01" in fresh.message
    old = dr.check_prices(day + 365 * 86400)
    assert old.level == "info" and "396 days old" in old.message and "CORRAL_PRICES" in old.fix
    bad = tmp_path / "prices.json"
    bad.write_text("{not json")
    monkeypatch.setenv("CORRAL_PRICES", str(bad))
    broken = dr.check_prices(day)
    assert broken.level == "error" and "cannot read the instance price table" in broken.message


# -- failed tasks ---------------------------------------------------------------------------------
WF = """
name: doc
items: [{k: a}, {k: b}, {k: c}, {k: d}]
aws: {instance_types: [c5]}
stages:
  - {name: small, image: "alpine:3", resources: {vcpus: 1, memory: 1GiB}, command: "true"}
  - {name: wide, image: "alpine:3", resources: {vcpus: 4, memory: 4GiB}, command: "true", timeout: 10m}
  - {name: huge, image: "my/private:1", resources: {vcpus: 2, memory: 300GiB}, command: "true"}
"""


def test_oom_image_pull_timeout_and_spot_are_told_apart() -> None:
    plan = make_plan(loads_workflow(WF, source="wf.yaml", base_dir=Path.cwd()))

    def task(stage: str, key: str, reason: str, code: int | None = None) -> TaskRecord:
        return TaskRecord(run_id="r", task_id=f"{stage}-{key}", stage=stage, item_key=key, item_index=0,
                          state=TaskState.FAILED, exit_code=code, reason=reason)

    tasks = [
        task("small", "a", "Essential container in task exited", 137),
        task("small", "b", "OutOfMemoryError: Container killed due to memory usage"),
        task("small", "c", "memory limit exceeded (1200 MiB > 1024 MiB)"),
        task("huge", "a", "CannotPullContainerError: pull access denied for my/private, repository does not exist"),
        task("wide", "a", "Job attempt duration exceeded timeout"),
        task("wide", "b", "Host EC2 (instance i-0abc) terminated."),
        task("wide", "c", "exit code 1", 1),
    ]
    findings = dr.failure_checks(plan, tasks, "r")
    oom = by_check(findings, "oom")
    assert len(oom) == 1 and oom[0].subject == "small" and "3 task(s)" in oom[0].message
    assert "now 1024 MiB; try 2048 MiB" in oom[0].fix and "corral resume r" in oom[0].fix
    (pull,) = by_check(findings, "image-pull")
    assert pull.subject == "huge" and "my/private:1" in pull.message
    (timeout,) = by_check(findings, "timeout")
    assert "(600s)" in timeout.message
    assert by_check(findings, "spot")[0].level == "warn"
    assert dr.classify_failure(tasks[-1]) is None


# -- stuck jobs -----------------------------------------------------------------------------------
def ce(name: str, *, state: str = "ENABLED", status: str = "VALID", types: list[str] | None = None,
       maxv: int = 64, desired: int = 0, kind: str = "EC2", reason: str = "") -> dict[str, Any]:
    return {"computeEnvironmentName": name, "computeEnvironmentArn": f"arn:{name}", "state": state,
            "status": status, "statusReason": reason,
            "computeResources": {"type": kind, "maxvCpus": maxv, "desiredvCpus": desired,
                                 "instanceTypes": types or ["c5"], "subnets": []}}


def job(vcpus: int = 4, memory: int = 4096, gpus: int = 0) -> dict[str, Any]:
    reqs = [{"type": "VCPU", "value": str(vcpus)}, {"type": "MEMORY", "value": str(memory)}]
    if gpus:
        reqs.append({"type": "GPU", "value": str(gpus)})
    return {"jobId": "j-1", "jobName": "corral-doc-wide", "status": "RUNNABLE", "createdAt": 0,
            "container": {"resourceRequirements": reqs}}


def test_runnable_reasons() -> None:
    why, fix = dr.runnable_reason(job(), [ce("a", status="INVALID", reason="CLIENT_ERROR - role not found")])
    assert "INVALID: CLIENT_ERROR - role not found" in why
    why, fix = dr.runnable_reason(job(), [ce("a", state="DISABLED")])
    assert "DISABLED" in why and "--state ENABLED" in fix
    why, fix = dr.runnable_reason(job(vcpus=8), [ce("a", maxv=4)])
    assert "more than maxvCpus 4" in why and "aws.max_vcpus to at least 8" in fix
    why, fix = dr.runnable_reason(job(memory=400_000), [ce("a")])
    assert "no instance type" in why and "holds 4 vCPUs, 400000 MiB" in why
    why, fix = dr.runnable_reason(job(gpus=1), [ce("a", types=["c5"])])
    assert "no instance type" in why
    why, fix = dr.runnable_reason(job(), [ce("a", maxv=64, desired=62)])
    assert "vCPU limit is reached: 62 of maxvCpus 64" in why
    why, fix = dr.runnable_reason(job(), [ce("a", kind="SPOT")])
    assert why.startswith("spot capacity")
    why, fix = dr.runnable_reason(job(), [ce("a")])
    assert "quota" in why and "Service Quotas" in fix
    why, fix = dr.runnable_reason(job(), [])
    assert "no compute environment" in why


class _FakeBatch:
    """Just the calls _runnable makes, answering a RUNNABLE array parent."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs = {j["jobId"]: j for j in jobs}
        self.calls: list[list[str]] = []

    def describe_jobs(self, jobs: list[str]) -> dict[str, Any]:
        self.calls.append(list(jobs))
        return {"jobs": [self.jobs[j] for j in jobs if j in self.jobs]}


def test_stuck_jobs_of_a_run_are_found_with_one_describe_per_100_parents() -> None:
    now = 1_000_000.0
    parent = {**job(vcpus=8), "jobId": "p-1", "jobQueue": "arn:aws:batch:us-east-2:1:job-queue/corral",
              "createdAt": int((now - 3 * 3600) * 1000), "arrayProperties": {"size": 3, "statusSummary": {
                  "RUNNABLE": 3}}}
    fresh = {**job(), "jobId": "p-2", "jobQueue": "arn:aws:batch:us-east-2:1:job-queue/corral",
             "createdAt": int((now - 60) * 1000)}
    fake = _FakeBatch([parent, fresh])
    clients = type("C", (), {"batch": fake})()
    run = RunRecord(run_id="r", workflow_name="doc", backend="aws", created_at=1.0)
    tasks = [TaskRecord(run_id="r", task_id=f"t{i}", stage="wide", item_key=str(i), item_index=i,
                        state=TaskState.SUBMITTED, external_id=f"p-1:{i}") for i in range(3)]
    tasks.append(TaskRecord(run_id="r", task_id="t9", stage="small", item_key="9", item_index=9,
                            state=TaskState.SUBMITTED, external_id="p-2"))
    found = dr._runnable(clients, {"corral": [ce("c", maxv=4)]}, run, tasks, 1800, lambda: now)  # type: ignore[arg-type]
    assert fake.calls == [["p-1", "p-2"]]
    (f,) = found
    assert f.subject == "p-1" and "3 task(s) still RUNNABLE, submitted 180 min ago" in f.message
    assert "more than maxvCpus 4" in f.message and "aws.max_vcpus" in f.fix


def test_compute_environment_findings() -> None:
    plan = make_plan(loads_workflow(WF.replace("  - {name: huge", "  - {name: gpu, resources: {vcpus: 16, gpus: 1}, "
                                               'image: "x", command: "true"}\n  - {name: huge'),
                                    source="wf.yaml", base_dir=Path.cwd()))
    stages = plan.workflow.stages
    bad = dr.compute_environment_findings(ce("c", status="INVALID", reason="CLIENT_ERROR - subnet gone"), stages,
                                          gpu=False)
    assert [f.level for f in bad if f.check == "ce"] == ["error"]
    assert "INVALID: CLIENT_ERROR - subnet gone" in bad[0].message
    # CPU environments are judged on CPU stages only: the 16-vCPU GPU stage does not count against maxvCpus 8.
    ok = dr.compute_environment_findings(ce("c", maxv=8), stages, gpu=False)
    assert [(f.check, f.level, f.subject) for f in ok] == [("ce", "ok", "c"), ("fit", "error", "huge")]
    gpu = dr.compute_environment_findings(ce("g", maxv=8, types=["g4dn"]), stages, gpu=True)
    assert [(f.check, f.level) for f in gpu] == [("ce", "error")] and "stage 'gpu'" in gpu[0].message


def test_runnable_children_of_pending_array_parents_are_found_without_a_run() -> None:
    now = 1_000_000.0
    old = int((now - 7200) * 1000)

    class Pages:
        def __init__(self, answers: dict[str, list[dict[str, Any]]]) -> None:
            self.answers = answers

        def paginate(self, jobQueue: str, jobStatus: str):  # type: ignore[no-untyped-def]  # noqa: N803
            yield {"jobSummaryList": self.answers.get(jobStatus, [])}

    class Batch(_FakeBatch):
        def get_paginator(self, name: str) -> Pages:
            assert name == "list_jobs"
            return Pages({
                "PENDING": [{"jobId": "arr", "createdAt": old, "arrayProperties": {"size": 5}},
                            {"jobId": "waits-on-deps", "createdAt": old}],
                "RUNNABLE": [{"jobId": "single", "createdAt": old}, {"jobId": "new", "createdAt": int(now * 1000)}],
            })

    fake = Batch([
        {**job(), "jobId": "arr", "status": "PENDING", "createdAt": old,
         "arrayProperties": {"size": 5, "statusSummary": {"RUNNABLE": 5}}},
        {**job(), "jobId": "single", "status": "RUNNABLE", "createdAt": old},
    ])
    clients = type("C", (), {"batch": fake})()
    found = dr._runnable(clients, {"corral": [ce("c", kind="SPOT")]}, None, None, 1800, lambda: now)  # type: ignore[arg-type]
    assert fake.calls == [["single", "arr"]]  # the plain PENDING job (dependencies) and the new one are not asked
    assert [(f.subject, f.message.split(": ")[1]) for f in found] == [
        ("single", "1 task(s) still RUNNABLE, submitted 120 min ago"),
        ("arr", "5 task(s) still RUNNABLE, submitted 120 min ago")]
    assert all("spot capacity" in f.message for f in found)


def test_children_waiting_for_their_turn_under_max_parallel_are_not_stuck() -> None:
    now = 1_000_000.0
    old = int((now - 7200) * 1000)
    cap = {"consumableResourceList": [{"consumableResource": "corral-cap-r-upload", "quantity": 1}]}
    fake = _FakeBatch([{**job(), "jobId": "arr", "status": "RUNNING", "createdAt": old,
                        "arrayProperties": {"size": 500, "statusSummary": {"RUNNING": 20, "RUNNABLE": 480}},
                        "consumableResourceProperties": cap}])
    clients = type("C", (), {"batch": fake})()
    run = RunRecord(run_id="r", workflow_name="doc", backend="aws", created_at=1.0)
    tasks = [TaskRecord(run_id="r", task_id="t0", stage="upload", item_key="0", item_index=0,
                        state=TaskState.SUBMITTED, external_id="arr:0")]
    found = dr._runnable(clients, {"corral": [ce("c")]}, run, tasks, 1800, lambda: now)  # type: ignore[arg-type]
    assert [(f.check, f.level) for f in found] == [("runnable", "info")]
    assert "max_parallel" in found[0].message and "corral-cap-r-upload" in found[0].message


# -- AWS, against moto ----------------------------------------------------------------------------
@pytest.mark.aws
def test_doctor_finds_what_was_broken_on_purpose(aws: str, tmp_path: Path) -> None:
    from corral.backends.aws_batch import AwsClients, Needs, ensure_environment

    clients = AwsClients()
    settings = AwsSettings(instance_types=["c5"], max_vcpus=2)
    env = ensure_environment(clients, settings, Needs(efs=True))
    healthy_plan = make_plan(loads_workflow(WF.split("  - {name: wide")[0], source="ok.yaml", base_dir=tmp_path))
    healthy = dr.aws_checks(clients, settings, plan=healthy_plan)
    assert dr.worst(healthy) == "ok", [f for f in healthy if f.level != "ok"]
    assert {f.check for f in healthy} == {"aws-credentials", "queue", "ce", "network", "efs"}

    # Break it: a workflow that wants more than the environment gives, a disabled queue, a lost mount target.
    plan = make_plan(loads_workflow(WF, source="wf.yaml", base_dir=tmp_path))
    clients.batch.update_job_queue(jobQueue=env.job_queue, state="DISABLED")
    target = clients.efs.describe_mount_targets(FileSystemId=env.efs_id)["MountTargets"][0]
    clients.efs.delete_mount_target(MountTargetId=target["MountTargetId"])
    findings = dr.aws_checks(clients, settings, plan=plan)
    errors = {(f.check, f.subject): f for f in findings if f.level == "error"}
    ce_name = env.compute_environments[0].rsplit("/", 1)[-1]
    queue = env.job_queue.rsplit("/", 1)[-1]  # this configuration's queue (c5, not the plain `corral`)
    assert set(errors) == {("queue", queue), ("ce", ce_name), ("fit", "huge"), ("efs", env.efs_id)}
    assert "DISABLED" in errors[("queue", queue)].message
    assert "--state ENABLED" in errors[("queue", queue)].fix
    assert "maxvCpus 2, less than the 4 vCPUs stage 'wide'" in errors[("ce", ce_name)].message
    assert "aws.max_vcpus to at least 4" in errors[("ce", ce_name)].fix
    assert "c5.24xlarge" in errors[("fit", "huge")].message  # the largest c5 it could have had
    assert target["AvailabilityZoneName"] in errors[("efs", env.efs_id)].message  # by zone, not subnet
    assert target["SubnetId"] in errors[("efs", env.efs_id)].fix and "corral-efs" in errors[("efs", env.efs_id)].fix

    # A disabled compute environment, through the CLI, as JSON.
    clients.batch.update_compute_environment(computeEnvironment=ce_name, state="DISABLED")
    wf = tmp_path / "wf.yaml"
    wf.write_text(WF.replace("instance_types: [c5]", "instance_types: [c5], max_vcpus: 2"))
    res = run_cli("doctor", "--backend", "aws", "-w", str(wf), "--json", env={"CORRAL_HOME": str(tmp_path / "h")})
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert doc["worst"] == "error"
    got = {(f["check"], f["subject"]) for f in doc["findings"] if f["level"] == "error"}
    assert ("ce", ce_name) in got and ("queue", queue) in got and ("fit", "huge") in got
    assert any("is DISABLED: it launches no instance" in f["message"] for f in doc["findings"])


@pytest.mark.aws
def test_doctor_reports_missing_queue_and_bad_credentials(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.backends.aws_batch import AwsClients

    plan = make_plan(loads_workflow(WF, source="wf.yaml", base_dir=Path.cwd()))
    findings = dr.aws_checks(AwsClients(), AwsSettings(instance_types=["c5"]), plan=plan)
    (missing,) = by_check(findings, "queue")
    assert missing.level == "error" and "does not exist" in missing.message and "corral aws setup" in missing.fix
    # Without environments, stages are judged against the workflow's allowed types.
    assert [f.subject for f in by_check(findings, "fit")] == ["huge"]
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    (creds,) = dr.aws_checks(AwsClients(), AwsSettings())
    assert creds.check == "aws-credentials" and creds.level == "error" and "aws configure" in creds.fix


def test_cli_doctor_local_and_for_a_run(tmp_path: Path) -> None:
    home = tmp_path / "home"
    base = tmp_path / "wf"
    base.mkdir()
    (base / "workflow.yaml").write_text("""
name: oom
items: [{k: a}]
stages:
  - {name: eat, resources: {vcpus: 1, memory: 64MiB}, command: "exit 137"}
""")
    env = {"CORRAL_HOME": str(home)}
    res = run_cli("run", str(base / "workflow.yaml"), env=env)
    run_id = res.stdout.strip()
    assert res.returncode == 1 and run_id
    res = run_cli("doctor", run_id, "--json", env=env)
    doc = json.loads(res.stdout)
    assert res.returncode == 1 and doc["worst"] == "error"
    (oom,) = [f for f in doc["findings"] if f["check"] == "oom"]
    assert oom["subject"] == "eat" and "try 128 MiB" in oom["fix"]
    assert {"engine", "disk", "rclone", "state-db"} <= {f["check"] for f in doc["findings"]}
    res = run_cli("doctor", env=env)  # no run: the machine only (nothing is an error here)
    assert res.returncode == 0 and "state-db" in res.stderr and "passes the integrity check" in res.stderr
    res = run_cli("doctor", "no-such-run", env=env)
    assert res.returncode == 2 and "no run 'no-such-run'" in res.stderr
