"""Local memory limits for real: a cgroup's hard limit against a 500 MiB burst, out-of-memory kills
recognised, ``retry_memory`` growing the next attempt up to the machine, no cgroup left behind."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import corral_cmd, wait_for, write_workflow

import corral
from corral import api
from corral.backends import memory_limit
from corral.backends.local import LocalBackend
from corral.home import corral_home
from corral.model import RunState, TaskState
from corral.state.sqlite import SqliteStore

LIMITER = memory_limit.detect()
hard = pytest.mark.skipif(not LIMITER.hard, reason=f"no cgroup corral may create here ({LIMITER.describe()})")

# allocates and touches 500 MiB at once: faster than any sampler
BURST = "python3 -c 'b = bytearray(500 * 2**20); print(\"got through\")'"


def _attempts(run_id: str, task_id: str) -> list[tuple[str, int | None, str]]:
    store = SqliteStore(corral_home() / "state.db")
    return [(a.state.value, a.exit_code, a.reason) for a in store.get_attempts(run_id, task_id)]


def _leftover_cgroups(run_id: str) -> list[str]:
    assert LIMITER.parent is not None
    return [p.name for p in LIMITER.parent.iterdir() if p.name.startswith(f"corral-{run_id}-")]


def _kill_9_once_started(tmp_path: Path, wf: Path, while_running: Callable[[str], None] = lambda run_id: None) -> str:
    """`corral run wf` in a child process, killed with -9 once its task touched ``started``
    (``while_running(run_id)`` first); returns the run id."""
    proc = subprocess.Popen(corral_cmd("run", str(wf)), cwd=tmp_path, env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (tmp_path / "started").exists(), 30, "the task to start")
        (run,) = SqliteStore(corral_home() / "state.db").list_runs()
        while_running(run.run_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    return run.run_id


@hard
def test_a_500_mib_burst_under_100_mib_is_killed_on_every_attempt(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, f"""
name: burst
items: [{{s: a}}]
stages:
  - name: eat
    retries: 2
    resources: {{memory: 100MiB}}
    command: {BURST}
""")
    run = corral.run(wf)
    (t,) = corral.status(run.run_id)
    assert (t.state, t.attempts, t.exit_code) == (TaskState.FAILED, 3, 137)
    assert t.reason == "out of memory (limit 100MiB): killed by the kernel (exit 137)"
    # every attempt, not only the first: each ran in its own cgroup with the same hard limit
    assert _attempts(run.run_id, t.task_id) == [
        ("FAILED", 137, "out of memory (limit 100MiB): killed by the kernel (exit 137)")] * 3
    logs = "\n".join(corral.logs(run.run_id, t.task_id, attempt=2))
    assert "got through" not in logs
    assert _leftover_cgroups(run.run_id) == []
    assert not memory_limit.registry(corral_home(), run.run_id).exists()


@hard
def test_retry_memory_grows_each_attempt_after_an_oom_kill(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, f"""
name: grow
items: [{{s: factor}}]
stages:
  - name: eat
    retries: 3
    resources: {{memory: 100MiB, retry_memory: 3x}}
    command: {BURST}
  - name: sizes
    retries: 3
    resources: {{memory: 100MiB, retry_memory: [200MiB, 1GiB]}}
    command: {BURST}
""")
    run = corral.run(wf)
    assert run.state == RunState.SUCCEEDED
    tasks = {t.stage: t for t in corral.status(run.run_id)}
    assert _attempts(run.run_id, tasks["eat"].task_id) == [
        ("FAILED", 137, "out of memory (limit 100MiB): killed by the kernel (exit 137)"),
        ("FAILED", 137, "out of memory (limit 300MiB): killed by the kernel (exit 137)"),
        ("SUCCEEDED", 0, "")]
    assert _attempts(run.run_id, tasks["sizes"].task_id) == [
        ("FAILED", 137, "out of memory (limit 100MiB): killed by the kernel (exit 137)"),
        ("FAILED", 137, "out of memory (limit 200MiB): killed by the kernel (exit 137)"),
        ("SUCCEEDED", 0, "")]
    assert _leftover_cgroups(run.run_id) == []


@hard
def test_retry_memory_stops_at_what_the_machine_holds(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, f"""
name: bound
items: [{{s: a}}]
stages:
  - name: eat
    retries: 5
    resources: {{memory: 100MiB, retry_memory: 2x}}
    command: {BURST}
""")
    # a machine of 300 MiB: 100 -> 200 -> 300 (the bound) -> not retried again
    run = api.run(wf, backend_impl=LocalBackend(corral_home(), memory_mib=300))
    (t,) = corral.status(run.run_id)
    assert (t.state, t.attempts) == (TaskState.FAILED, 3)
    assert [r for _, _, r in _attempts(run.run_id, t.task_id)] == [
        "out of memory (limit 100MiB): killed by the kernel (exit 137)",
        "out of memory (limit 200MiB): killed by the kernel (exit 137)",
        "out of memory (limit 300MiB): not retried: it already had the most this machine gives one task"]
    assert t.reason == "out of memory (limit 300MiB): not retried: it already had the most this machine gives one task"


@hard
def test_kill_9_of_the_scheduler_leaves_no_cgroup_after_resume(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: stale
items: [{s: a}]
stages:
  - name: hold
    resources: {memory: 64MiB}
    command: "if [ -e again ]; then exit 0; fi; touch started; sleep 60"
""")
    def one_cgroup(run_id: str) -> None:
        assert len(_leftover_cgroups(run_id)) == 1  # the task runs in its cgroup

    run_id = _kill_9_once_started(tmp_path, wf, one_cgroup)
    assert len(_leftover_cgroups(run_id)) == 1  # kill -9: nobody removed it
    (tmp_path / "again").touch()
    run = api.resume(run_id)
    assert run.state == RunState.SUCCEEDED
    assert _leftover_cgroups(run.run_id) == []


def test_without_a_cgroup_the_sampler_stops_a_slow_hog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_CGROUP", str(tmp_path / "no-such-cgroup"))  # no cgroup corral may use
    assert not memory_limit.detect().hard
    wf = write_workflow(tmp_path, """
name: hog
items: [{s: x}]
stages:
  - name: a
    resources: {memory: 64MiB}
    timeout: 60s
    command: python3 -c "import time; b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(60)"
""")
    run = corral.run(wf)
    (t,) = corral.status(run.run_id)
    assert t.state == TaskState.FAILED and t.reason.startswith("out of memory (limit 64MiB): resident memory reached")
    assert t.reason.endswith("(sampled)")


@hard
def test_doctor_removes_the_cgroups_of_a_killed_scheduler(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: stale2
items: [{s: a}]
stages:
  - name: hold
    resources: {memory: 64MiB}
    command: "touch started; sleep 60"
""")
    run_id = _kill_9_once_started(tmp_path, wf)
    assert len(_leftover_cgroups(run_id)) == 1
    doctor = subprocess.run(corral_cmd("doctor", "--json"), cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert "removed 1 memory cgroup(s)" in doctor.stdout, doctor.stdout + doctor.stderr
    assert _leftover_cgroups(run_id) == []  # and the task it held is gone with it
