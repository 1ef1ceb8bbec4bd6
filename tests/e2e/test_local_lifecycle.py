"""The local scheduler's process lifecycle under faults: a crash right after a task ends, clock
jumps, daemons that leave the task's session, a dead scheduler's overdue tasks, huge logs, a
state database that stops accepting writes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import pytest
from helpers import corral_cmd, run_cli, wait_for, write_workflow

import corral
from corral import api
from corral.backends import local
from corral.errors import StateError
from corral.model import AttemptRecord, RunRecord, RunState, TaskRecord, TaskState
from corral.state.sqlite import SqliteStore


def _alive(pid: int) -> bool:
    return local.process_alive(pid)


def _store() -> SqliteStore:
    return SqliteStore(api.corral_home() / "state.db")


# -- kill -9 right after a task ended ---------------------------------------------------------------
_CRASH_AT_SPAWN = textwrap.dedent("""
    import os, sys
    import corral
    from corral.backends import local
    at, calls = int(sys.argv[2]), [0]
    real = local._start_process
    def start(*a, **kw):
        calls[0] += 1
        if calls[0] == at:
            os._exit(9)  # the scheduler dies as with kill -9, just as it starts the next task
        return real(*a, **kw)
    local._start_process = start
    corral.run(sys.argv[1], options=corral.api.RunOptions(max_parallel=1))
""")


@pytest.mark.parametrize("at", [2, 3, 5])
def test_a_task_that_ended_before_the_crash_never_runs_again(tmp_path: Path, at: int) -> None:
    wf = write_workflow(tmp_path, """
name: exact
items: [{i: 0}, {i: 1}, {i: 2}, {i: 3}, {i: 4}, {i: 5}]
stages:
  - {name: a, command: "echo ran >> a_{i}.log"}
""")
    script = tmp_path / "crash.py"
    script.write_text(_CRASH_AT_SPAWN)
    res = subprocess.run([sys.executable, str(script), str(wf), str(at)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert res.returncode == 9, res.stderr
    ran = sorted(p.name for p in tmp_path.glob("a_*.log"))
    assert len(ran) == at - 1  # those started before the crash all ended
    run_id = _store().list_runs(1)[0].run_id
    corral.resume(run_id)
    assert {t.state for t in corral.status(run_id)} == {TaskState.SUCCEEDED}
    for i in range(6):
        assert (tmp_path / f"a_{i}.log").read_text().count("ran") == 1, i


# -- the clock jumps ----------------------------------------------------------------------------------
class _JumpingClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.mark.parametrize(("jump", "timeout", "expect"), [(7200.0, 3600, TaskState.SUCCEEDED),
                                                         (-3600.0, 1, TaskState.FAILED)])
def test_timeouts_and_durations_ignore_clock_jumps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jump: float, timeout: int, expect: TaskState
) -> None:
    clock = _JumpingClock()
    monkeypatch.setattr(local, "now", clock)
    wf = write_workflow(tmp_path, f"""
name: clock
items: [{{i: 1}}]
stages:
  - {{name: a, command: "touch started; sleep 2.5", timeout: {timeout}}}
""")

    def jump_once_started() -> None:
        wait_for(lambda: (tmp_path / "started").exists(), 30, "the task to start")
        clock.offset = jump

    t = threading.Thread(target=jump_once_started)
    t.start()
    rec = corral.run(wf)
    t.join()
    (task,) = corral.status(rec.run_id)
    assert task.state == expect, task.reason
    assert task.duration is not None and 0 <= task.duration < 30
    if expect == TaskState.FAILED:
        assert "timed out after 1s" in task.reason and task.duration < 2.4


# -- the whole session, daemons included --------------------------------------------------------------
_DAEMON = "setsid sh -c 'echo $$ > daemon{i}.pid; exec sleep 300' & echo $$ > task{i}.pid; sleep 300"


def test_timeout_kills_daemons_started_with_setsid(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, f"name: daemons\nitems: [{{i: 1}}]\nstages:\n"
                                  f"  - {{name: a, command: \"{_DAEMON}\", timeout: 2}}\n")
    rec = corral.run(wf)
    (task,) = corral.status(rec.run_id)
    assert task.state == TaskState.FAILED and "timed out" in task.reason
    daemon = int((tmp_path / "daemon1.pid").read_text())
    wait_for(lambda: not _alive(daemon), 10, "the setsid daemon to die")


def test_cancel_kills_daemons_started_with_setsid(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, f"name: daemons2\nitems: [{{i: 1}}]\nstages:\n  - {{name: a, command: \"{_DAEMON}\"}}\n")
    proc = subprocess.Popen(corral_cmd("run", str(wf)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "daemon1.pid").exists() and (tmp_path / "daemon1.pid").read_text().strip(),
                 30, "the daemon to start")
        run_id = _store().list_runs(1)[0].run_id
        assert run_cli("cancel", run_id).returncode == 0
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    daemon = int((tmp_path / "daemon1.pid").read_text())
    wait_for(lambda: not _alive(daemon), 10, "the setsid daemon to die")


# -- a dead scheduler's tasks stop at their deadline ----------------------------------------------------
def test_status_stops_a_dead_schedulers_task_past_its_timeout(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, "name: orphan\nitems: [{i: 1}]\nstages:\n"
                                  "  - {name: a, command: 'echo $$ > pid; exec sleep 300', timeout: 5}\n")
    proc = subprocess.Popen(corral_cmd("run", str(wf)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text().strip(), 30, "task start")
    for dog in _watchdogs_of(proc.pid):  # no watchdog either: status is the reaper here
        os.kill(dog, signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)  # the scheduler only: its task (own session) goes on
    proc.wait(timeout=10)
    pid = int((tmp_path / "pid").read_text())
    run_id = _store().list_runs(1)[0].run_id
    (a,) = _store().get_attempts(run_id, _store().get_tasks(run_id)[0].task_id)
    assert a.started_at is not None
    if time.time() < a.started_at + 3:  # (a loaded machine may be past the deadline already)
        res = run_cli("status", run_id)
        assert res.returncode == 0
        if time.time() < a.started_at + 4.5:
            assert _alive(pid)  # before the deadline: left alone
    wait_for(lambda: time.time() > a.started_at + 5.2, 15, "the deadline to pass")  # type: ignore[operator]
    res = run_cli("status", run_id)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: not _alive(pid), 10, "the overdue task to be killed")
    (task,) = _store().get_tasks(run_id)
    assert task.state == TaskState.FAILED and "timed out after 5s" in task.reason
    assert _store().get_run(run_id).state == RunState.INTERRUPTED


def _watchdogs_of(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmd = Path(entry.path, "cmdline").read_bytes()
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if b"corral.backends.watchdog" in cmd and ppid == pid:
                out.append(int(entry.name))
    return out


def test_the_watchdog_stops_a_dead_schedulers_task_at_its_deadline(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, "name: dog\nitems: [{i: 1}]\nstages:\n"
                                  "  - {name: a, command: 'echo $$ > pid; exec sleep 300', timeout: 3}\n")
    proc = subprocess.Popen(corral_cmd("run", str(wf)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text().strip(), 30, "task start")
    started = time.monotonic()
    wait_for(lambda: _watchdogs_of(proc.pid), 10, "the watchdog")
    os.killpg(proc.pid, signal.SIGKILL)  # the scheduler's whole group; nobody runs `corral status`
    proc.wait(timeout=10)
    pid = int((tmp_path / "pid").read_text())
    wait_for(lambda: not _alive(pid), 30, "the watchdog to kill the overdue task")
    assert time.monotonic() - started >= 2.5  # at its deadline, not before


# -- logs: tails read from the end, follow in bounded pieces -------------------------------------------
def _recorded_attempt(tmp_path: Path, out: Path, state: TaskState = TaskState.SUCCEEDED) -> tuple[SqliteStore, RunRecord, TaskRecord]:
    store = _store()
    run = RunRecord(run_id="logs-1", workflow_name="wf", backend="local", created_at=1.0)
    task = TaskRecord("logs-1", "t1", "a", "k", 0, state=state, attempts=1)
    store.create_run(run, b"{}", [task])
    err = tmp_path / "err"
    err.write_text("")
    store.save_attempt(AttemptRecord("logs-1", "t1", 1, state=state, stdout=str(out), stderr=str(err)))
    return store, run, task


def test_logs_of_a_512_mib_line_read_only_the_tail(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with open(out, "wb") as fh:
        fh.truncate(512 << 20)  # one 512 MiB line (sparse), then a short one
        fh.seek(0, os.SEEK_END)
        fh.write(b"\nthe end\n")
    store, run, task = _recorded_attempt(tmp_path, out)
    be = local.LocalBackend(api.corral_home())
    tracemalloc.start()
    started = time.monotonic()
    lines = list(be.logs(run, store, task, None, False))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.monotonic() - started < 10
    assert peak < 8 << 20, peak  # a few MiB, not the file
    assert lines[-2] == "the end" and "earlier bytes not shown" in lines[1]  # then the stderr header


def test_logs_follow_reads_in_bounded_pieces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with open(out, "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(0, os.SEEK_END)
        fh.write(b"\nlast\n")
    store, run, task = _recorded_attempt(tmp_path, out)
    (attempt,) = store.get_attempts(run.run_id, task.task_id)
    be = local.LocalBackend(api.corral_home())
    tracemalloc.start()
    n, longest, last = 0, 0, ""
    for line in be._follow(run, store, task, attempt, {}):
        n += 1
        longest = max(longest, len(line))
        last = line
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert last == "last" and longest <= local.LOG_CHUNK and n > 1000
    assert peak < 8 << 20, peak


# -- the state database stops accepting writes mid-run ---------------------------------------------
class _DiskFills(SqliteStore):
    """Raises SQLite's full-disk error from the Nth scheduler write on, as ENOSPC would."""

    def __init__(self, path: Path, at: int) -> None:
        super().__init__(path)
        self.at, self.n, self.full = at, 0, False

    def save_batch(self, tasks: Sequence[TaskRecord], attempts: Sequence[AttemptRecord]) -> None:
        self.n += 1
        if self.n >= self.at and self.full is not None:
            self.full = True
            raise local_state_error()
        super().save_batch(tasks, attempts)


def local_state_error() -> StateError:
    from corral.state.sqlite import _state_error

    return _state_error(Path("state.db"), sqlite3.OperationalError("database or disk is full"))


def test_a_full_disk_mid_run_is_one_line_and_resume_finishes(tmp_path: Path) -> None:
    items = ", ".join(f"{{i: {i}}}" for i in range(6))
    wf = write_workflow(tmp_path, f"name: full\nitems: [{items}]\nstages:\n  - {{name: a, command: 'echo ran >> a_{{i}}.log; sleep 0.2'}}\n")
    store = _DiskFills(api.corral_home() / "state.db", at=4)
    with pytest.raises(StateError) as info:
        corral.run(wf, store=store, options=api.RunOptions(max_parallel=2))
    assert "database or disk is full" in info.value.one_line() and "free space" in (info.value.hint or "")
    run_id = store.list_runs(1)[0].run_id
    assert store.get_run(run_id).state == RunState.INTERRUPTED  # recorded consistently once writes work
    assert not [p for p in local.marked_processes((f"CORRAL_RUN_ID={run_id}".encode(), b"CORRAL_STAGE=a"))]
    corral.resume(run_id)
    assert {t.state for t in corral.status(run_id)} == {TaskState.SUCCEEDED}


def test_state_errors_from_the_cli_are_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    res = run_cli("status", "--all", env={"CORRAL_HOME": str(home)})
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "state" in res.stderr.lower() and len([x for x in res.stderr.splitlines() if x.startswith("error")]) == 1
