"""The local backend for real: processes, files, signals, the SQLite store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import corral_cmd, run_cli, wait_for, write_workflow

import corral
from corral import api
from corral.backends.base import RunOptions
from corral.model import RunState, TaskState
from corral.state.sqlite import SqliteStore


def states(run_id: str) -> dict[str, str]:
    return {t.label: t.state.value for t in corral.status(run_id)}


def test_dependencies_run_in_order_and_pass_data(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: chain
items: [{s: a, n: 3}, {s: b, n: 5}, {s: c, n: 1}]
stages:
  - name: make
    command: seq {n} > {s}.txt
  - name: count
    needs: [make]
    command: wc -l < {s}.txt | tr -d ' ' > {s}.count
  - name: total
    per: run
    needs: [count]
    command: cat a.count b.count c.count | paste -sd+ | bc > total.txt || awk '{{s+=$1}} END {{print s}}' a.count b.count c.count > total.txt
""")
    run = corral.run(wf, options=RunOptions(max_parallel=2))
    assert run.state == RunState.SUCCEEDED
    assert (tmp_path / "b.count").read_text().strip() == "5"
    assert (tmp_path / "total.txt").read_text().strip() == "9"
    recs = corral.status(run.run_id)
    by = {t.label: t for t in recs}
    for s in "abc":  # N-to-N: count[i] started after make[i] ended
        assert by[f"count[{s}]"].started_at >= by[f"make[{s}]"].ended_at
    assert by["total[run]"].started_at >= max(by[f"count[{s}]"].ended_at for s in "abc")


def test_item_fields_and_corral_env_reach_the_task(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: envy
items: [{session: "s 1", n: 2}]
stages:
  - name: show
    env: {GREETING: "hi {session}"}
    command: env | grep -E '^(session|CORRAL_ITEM_session|CORRAL_STAGE|CORRAL_RUN_ID|GREETING)=' | sort > env.txt
""")
    run = corral.run(wf)
    text = (tmp_path / "env.txt").read_text()
    assert "session=s 1\n" in text and "CORRAL_ITEM_session=s 1" in text
    assert "CORRAL_STAGE=show" in text and f"CORRAL_RUN_ID={run.run_id}" in text
    assert "GREETING=hi s 1" in text


def test_failure_fails_only_what_depends_on_it(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: fails
items: [{s: ok1}, {s: bad}, {s: ok2}]
stages:
  - name: a
    command: test {s} != bad
  - name: b
    needs: [a]
    command: touch {s}.b
  - name: c
    per: run
    needs: [b]
    command: touch all.c
""")
    run = corral.run(wf)
    assert run.state == RunState.FAILED
    st = states(run.run_id)
    assert st["a[bad]"] == "FAILED" and st["b[bad]"] == "UPSTREAM_FAILED"
    assert st["b[ok1]"] == st["b[ok2]"] == "SUCCEEDED"
    assert st["c[run]"] == "UPSTREAM_FAILED"
    assert (tmp_path / "ok1.b").exists() and not (tmp_path / "bad.b").exists() and not (tmp_path / "all.c").exists()
    bad = next(t for t in corral.status(run.run_id) if t.label == "a[bad]")
    assert bad.reason == "exit code 1" and bad.exit_code == 1


def test_retries_until_success_and_attempts_are_recorded(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: flaky
items: [{s: x}]
stages:
  - name: a
    retries: 3
    command: echo try >> tries.txt; echo "attempt $(wc -l < tries.txt)"; test $(wc -l < tries.txt) -ge 3
""")
    run = corral.run(wf)
    assert run.state == RunState.SUCCEEDED
    (t,) = corral.status(run.run_id)
    assert t.attempts == 3
    store = SqliteStore(api.corral_home() / "state.db")
    attempts = store.get_attempts(run.run_id, t.task_id)
    assert [a.state for a in attempts] == [TaskState.FAILED, TaskState.FAILED, TaskState.SUCCEEDED]
    assert Path(attempts[1].stdout).read_text().strip() == "attempt 2"
    first = "\n".join(corral.logs(run.run_id, "a[x]", attempt=1))
    assert "attempt 1" in first


def test_retries_exhausted(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, "name: r\nitems: [{s: x}]\nstages:\n  - {name: a, retries: 2, command: exit 7}\n")
    run = corral.run(wf)
    (t,) = corral.status(run.run_id)
    assert (t.state, t.attempts, t.exit_code, t.reason) == (TaskState.FAILED, 3, 7, "exit code 7")


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: slow
items: [{s: x}]
stages:
  - name: a
    timeout: 1s
    command: sleep 60 & echo $! > child.pid; wait
""")
    run = corral.run(wf)
    (t,) = corral.status(run.run_id)
    assert t.state == TaskState.FAILED and t.reason.startswith("timed out after 1s")
    child = int((tmp_path / "child.pid").read_text())
    wait_for(lambda: not _alive(child), 10, "the task's child to be gone")


def test_memory_limit_stops_the_task_not_the_machine(tmp_path: Path) -> None:
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
    assert t.state == TaskState.FAILED and t.reason.startswith("out of memory (limit 64MiB)"), t.reason


def test_outputs_that_exist_are_skipped_unless_forced(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: skip
items: [{s: a}, {s: b}]
stages:
  - name: make
    outputs: ["out/{s}.txt"]
    command: mkdir -p out && echo made >> runs.log && echo {s} > out/{s}.txt
""")
    corral.run(wf)
    assert (tmp_path / "runs.log").read_text().count("made") == 2
    (tmp_path / "out" / "a.txt").unlink()
    run = corral.run(wf)  # b succeeded before and its output is there: reused
    assert states(run.run_id) == {"make[a]": "SUCCEEDED", "make[b]": "REUSED"}
    assert (tmp_path / "runs.log").read_text().count("made") == 3
    run = corral.run(wf, options=RunOptions(reuse=False))  # without reuse: skipped, outputs exist
    assert states(run.run_id) == {"make[a]": "SKIPPED", "make[b]": "SKIPPED"}
    corral.run(wf, options=RunOptions(force=True))
    assert (tmp_path / "runs.log").read_text().count("made") == 5


def test_concurrency_respects_vcpus_and_max_parallel(tmp_path: Path) -> None:
    # Each task records start/end; with max_parallel=2 no more than 2 overlap.
    wf = write_workflow(tmp_path, """
name: par
items: [{i: 1}, {i: 2}, {i: 3}, {i: 4}, {i: 5}, {i: 6}]
stages:
  - name: a
    command: python3 -c "import time,sys; print(time.time()); time.sleep(0.3); print(time.time())" > t{i}.txt
""")
    corral.run(wf, options=RunOptions(max_parallel=2))
    spans = [tuple(map(float, (tmp_path / f"t{i}.txt").read_text().split())) for i in range(1, 7)]
    for s, _ in spans:
        overlapping = sum(1 for a, b in spans if a <= s < b)
        assert overlapping <= 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists": look at its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _spawn_run(wf: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(corral_cmd("run", str(wf), *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _latest_run_tasks() -> list:
    store = SqliteStore(api.corral_home() / "state.db")
    try:
        runs = store.list_runs(1)
        return store.get_tasks(runs[0].run_id) if runs else []
    finally:
        store.close()


def test_cancel_kills_running_tasks_and_records_states(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: cancelme
items: [{i: 1}, {i: 2}, {i: 3}, {i: 4}]
stages:
  - name: a
    command: echo $$ > pid{i}; sleep 60
  - name: b
    needs: [a]
    command: "true"
""")
    proc = _spawn_run(wf, "--max-parallel", "2")
    wait_for(lambda: sum(t.state == TaskState.RUNNING for t in _latest_run_tasks()) == 2, 30, "2 running tasks")
    wait_for(lambda: len(list(tmp_path.glob("pid*"))) == 2, 10, "pid files")
    run_id = SqliteStore(api.corral_home() / "state.db").list_runs(1)[0].run_id
    res = run_cli("cancel", run_id)
    assert res.returncode == 0, res.stderr
    assert proc.wait(timeout=30) != 0
    st = states(run_id)
    assert set(st.values()) == {"CANCELLED"}
    assert corral.status(run_id) and SqliteStore(api.corral_home() / "state.db").get_run(run_id).state == RunState.CANCELLED
    for p in tmp_path.glob("pid*"):
        wait_for(lambda p=p: not _alive(int(p.read_text())), 10, "cancelled task processes to die")


def test_ctrl_c_cancels_cleanly(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, "name: ctrlc\nitems: [{i: 1}]\nstages:\n  - {name: a, command: echo $$ > pid; sleep 60}\n")
    proc = _spawn_run(wf)
    wait_for(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text().strip(), 30, "task start")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130  # the README's exit code for an interrupt
    assert {t.state for t in _latest_run_tasks()} == {TaskState.CANCELLED}
    wait_for(lambda: not _alive(int((tmp_path / "pid").read_text())), 10, "task process to die")


def test_kill_9_then_resume_finishes_without_rerunning_successes(tmp_path: Path) -> None:
    n = 100  # 100 items × 2 stages = 200 tasks
    items = ", ".join(f"{{i: {i}}}" for i in range(n))
    wf = write_workflow(tmp_path, f"""
name: crashy
items: [{items}]
stages:
  - name: a
    command: echo ran >> ran_{{i}}.log; sleep 0.0$(( {{i}} % 6 ))
  - name: b
    needs: [a]
    command: echo ran >> b_{{i}}.log
""")
    proc = _spawn_run(wf, "--max-parallel", "2")
    wait_for(lambda: sum(t.state == TaskState.SUCCEEDED for t in _latest_run_tasks()) >= 60, 60, "60 tasks done")
    os.killpg(proc.pid, signal.SIGKILL)  # the scheduler and whatever it was running
    proc.wait(timeout=10)
    before = {t.task_id: t for t in _latest_run_tasks()}
    done_before = [t for t in before.values() if t.state == TaskState.SUCCEEDED]
    assert 60 <= len(done_before) < 2 * n
    run_id = SqliteStore(api.corral_home() / "state.db").list_runs(1)[0].run_id
    status = run_cli("status", run_id, "--json")
    assert '"state": "INTERRUPTED"' in status.stdout
    res = run_cli("resume", run_id)
    assert res.returncode == 0, res.stderr
    after = corral.status(run_id)
    assert all(t.state == TaskState.SUCCEEDED for t in after)
    for t in done_before:  # finished before the crash: never ran again
        assert after[[a.task_id for a in after].index(t.task_id)].attempts == t.attempts
        log = tmp_path / (f"ran_{t.item_index}.log" if t.stage == "a" else f"b_{t.item_index}.log")
        assert log.read_text().count("ran") == 1
    store = SqliteStore(api.corral_home() / "state.db")
    assert store.integrity_ok()


def test_resume_after_failure_reruns_only_failed(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: fixme
items: [{s: a}, {s: b}]
stages:
  - name: a
    command: echo {s} >> ran.log; test -e fixed || test {s} = a
  - name: b
    needs: [a]
    command: echo {s} >> b.log
""")
    run = corral.run(wf)
    assert run.state == RunState.FAILED
    (tmp_path / "fixed").touch()
    res = run_cli("resume", run.run_id)
    assert res.returncode == 0, res.stderr
    assert set(states(run.run_id).values()) == {"SUCCEEDED"}
    assert sorted((tmp_path / "ran.log").read_text().split()) == ["a", "b", "b"]
    assert sorted((tmp_path / "b.log").read_text().split()) == ["a", "b"]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, "name: x\nitems: [{a: 1}]\nstages:\n  - name: s\n    comand: echo\n")
    res = run_cli("run", str(wf))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: {wf}:5:5: stages[0] (s): unknown key 'comand'", "hint: did you mean `command`?"]
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not (api.corral_home() / "state.db").exists() or not SqliteStore(api.corral_home() / "state.db").list_runs()


def test_quickstart_via_cli(tmp_path: Path) -> None:
    src = Path(__file__).parents[2] / "examples" / "quickstart" / "workflow.yaml"
    wf = tmp_path / "workflow.yaml"
    wf.write_text(src.read_text())
    res = run_cli("run", str(wf))
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.strip()
    lines = (tmp_path / "out" / "summary.jsonl").read_text().splitlines()
    assert len(lines) == 4 and '"sum": 465' in lines[1]
    st = run_cli("status", "--json")
    assert run_id in st.stdout and '"SUCCEEDED": 9' in st.stdout.replace("\n", "").replace("  ", "")
    logs = run_cli("logs", run_id, "summarize[run]")
    assert logs.returncode == 0 and "\n4\n" in logs.stdout
    plan = run_cli("plan", str(wf), "--json")
    assert plan.returncode == 0 and '"tasks": 4' in plan.stdout.replace("\n", "").replace("  ", "") or '"tasks"' in plan.stdout


@pytest.mark.skipif(os.environ.get("CORRAL_TEST_CONTAINERS") != "1" and not Path("/var/run/docker.sock").exists(),
                    reason="no container engine on this machine (docker client only): container runtime not tested")
def test_container_runtime(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, "name: c\nitems: [{s: a}]\nstages:\n  - {name: a, image: 'alpine:3', command: echo hi > hi.txt}\n")
    run = corral.run(wf, options=RunOptions(runtime="container"))
    assert run.state == RunState.SUCCEEDED and (tmp_path / "hi.txt").read_text().strip() == "hi"


def test_cleanup_removes_the_workspace_whatever_the_outcome(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: tidy
cleanup: true
items: [{s: a}, {s: b}]
stages:
  - name: stage-in
    command: mkdir -p {workdir}/{s} && echo data > {workdir}/{s}/raw && echo {workdir} > where
  - name: use
    needs: [stage-in]
    command: test {s} = a && cp {workdir}/{s}/raw out-{s}
""")
    run = corral.run(wf)
    st = states(run.run_id)
    assert st["use[b]"] == "FAILED" and st["corral-cleanup[run]"] == "SUCCEEDED"
    workdir = Path((tmp_path / "where").read_text().strip())
    assert workdir.name == "workspace" and run.run_id in str(workdir)
    assert not workdir.exists() and workdir.parent.exists()  # only the workspace went
    assert (tmp_path / "out-a").read_text() == "data\n"


def test_a_program_that_does_not_exist_fails_with_its_reason(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: missing
items: [{s: a}]
stages:
  - name: a
    retries: 1
    command: [no-such-program-xyz, "{s}"]
  - name: b
    needs: [a]
    command: "true"
""")
    run = corral.run(wf)
    by = {t.label: t for t in corral.status(run.run_id)}
    assert by["a[a]"].state == TaskState.FAILED and by["a[a]"].attempts == 2
    assert by["a[a]"].reason == "cannot start 'no-such-program-xyz': No such file or directory"
    assert by["b[a]"].state == TaskState.UPSTREAM_FAILED


def test_plan_shows_the_cleanup_stage_that_cleanup_true_adds(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: withcleanup
items: [{s: a}, {s: b}]
cleanup: true
stages:
  - {name: work, command: "echo {s}"}
""")
    for args in (("plan", str(wf)), ("plan", str(wf), "--cost"), ("plan", str(wf), "--json")):
        res = run_cli(*args)
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr
        assert "corral-cleanup" in res.stdout + res.stderr
    data = json.loads(run_cli("plan", str(wf), "--json").stdout)
    assert [s["name"] for s in data["stages"]] == ["work", "corral-cleanup"]
    assert data["stages"][1]["needs"] == ["work"] and data["stages"][1]["tasks"] == 1
