"""The paths that must stay small at 100,000 items (issue #18), checked for what they answer:

- the status summary SQLite aggregates (counts, median/max times, first failures) is exactly the
  one made from every task record;
- `resume` reads the run's task rows once (under the lease) and builds the plan once;
- a finished run resumes to its end state without a scheduler, an interrupted one whose tasks all
  succeeded ends SUCCEEDED;
- a simple command runs without `/bin/sh` in between and sees what it would under the shell.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from helpers import run_cli, write_workflow

from corral import api, cli
from corral.backends import local
from corral.model import RunRecord, RunState, RunSummary, TaskRecord, TaskState
from corral.plan import Plan
from corral.state.sqlite import SqliteStore


def _store() -> SqliteStore:
    return SqliteStore(api.corral_home() / "state.db")


def _records(run_id: str, n: int, seed: int) -> list[TaskRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        stage = ["fetch", "convert", "upload"][i % 3] if seed % 2 else rng.choice(["b", "a", "c"])
        state = rng.choice(list(TaskState))
        started = rng.choice([None, 1000.0 + rng.random() * 10])
        ended = None if started is None or rng.random() < 0.2 else started + rng.choice([0.5, 1.0, 2.25, rng.random()])
        out.append(TaskRecord(run_id=run_id, task_id=f"t{i:05d}", stage=stage, item_key=f"k{i}", item_index=i,
                              state=state, attempts=rng.randint(0, 3), reason=f"why {i}", started_at=started,
                              ended_at=ended))
    return out


@pytest.mark.parametrize("n,seed", [(0, 0), (1, 1), (2, 2), (7, 3), (60, 4), (501, 5), (1000, 6)])
def test_the_sql_summary_is_the_summary_of_every_record(n: int, seed: int) -> None:
    store = _store()
    run = RunRecord(run_id=f"r{seed}", workflow_name="w", backend="local", created_at=1.0)
    tasks = _records(run.run_id, n, seed)
    store.create_run(run, b"{}", tasks)
    other = RunRecord(run_id="other", workflow_name="w", backend="local", created_at=1.0)
    if seed == 3:  # another run's rows never count
        store.create_run(other, b"{}", _records("other", 50, 99))
    got = store.summarize_run(run.run_id)
    assert store.get_tasks(run.run_id) == tasks  # every field back as written, in plan order
    want = RunSummary.of(store.get_tasks(run.run_id))
    assert list(got.stages) == list(want.stages)  # stages in plan order
    assert got.stages == want.stages
    assert got.times == want.times  # the same doubles: SQLite subtracts as Python does
    assert [t.task_id for t in got.failures] == [t.task_id for t in want.failures]
    assert got.failures == want.failures
    assert got.failed_total == want.failed_total
    assert got.counts == api.counts(tasks)


def _text(renderable: object) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def test_status_of_a_failed_run_from_the_store_matches_the_task_list(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: sums
items: [{n: 1}, {n: 2}, {n: 3}, {n: 4}, {n: 5}, {n: 6}, {n: 7}, {n: 8}, {n: 9}, {n: 10}, {n: 11}, {n: 12}]
stages:
  - {name: first, command: "test {n} -le 4"}
  - {name: second, command: "true", needs: [first]}
""")
    res = run_cli("run", str(wf))
    assert res.returncode == 1
    run_id = res.stdout.strip()
    store = _store()
    tasks = store.get_tasks(run_id)
    from_rows, from_sql = RunSummary.of(tasks), store.summarize_run(run_id)
    assert _text(cli._stage_table(from_sql)) == _text(cli._stage_table(from_rows))
    assert cli._failures(from_sql) == cli._failures(from_rows)
    assert from_sql.failed_total == 16 and len(cli._failures(from_sql)) == 11  # ten, then "… and 6 more"
    res = run_cli("status", run_id)
    assert res.returncode == 0
    for line in cli._failures(from_rows):
        assert line in res.stderr
    assert "first[5]" in cli._failures(from_sql)[0]


def test_resume_reads_the_rows_once_and_plans_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wf = write_workflow(tmp_path, """
name: once
items: [{n: 1}, {n: 2}, {n: 3}]
stages:
  - {name: a, command: "test {n} -ne 2"}
  - {name: b, command: "true", needs: [a]}
""")
    run = api.run(str(wf))
    assert run.state == RunState.FAILED
    full_reads: list[str] = []
    plans: list[str] = []
    real_get, real_make, real_from = SqliteStore.get_tasks, api_make_plan(), Plan.from_manifest

    def get_tasks(self: SqliteStore, run_id: str, states: object = None) -> list[TaskRecord]:
        if states is None:
            full_reads.append(run_id)
        return real_get(self, run_id, states)  # type: ignore[arg-type]

    monkeypatch.setattr(SqliteStore, "get_tasks", get_tasks)
    import corral.plan as plan_mod

    monkeypatch.setattr(plan_mod, "make_plan", lambda *a, **k: plans.append("make") or real_make(*a, **k))
    monkeypatch.setattr(Plan, "from_manifest", staticmethod(lambda b: plans.append("manifest") or real_from(b)))
    store = api.open_run_store(None, run.run_id)
    plan = cli._resume_plan(store, store.get_run(run.run_id))
    assert plans == ["make"]  # the file's plan, compared with the manifest: no second plan
    rec = api.resume(run.run_id, store=store, plan=plan)
    assert full_reads == [run.run_id]
    assert plans == ["make"]
    assert rec.state == RunState.FAILED  # item 2 still fails, and only it ran again
    tasks = {t.label: t for t in store.get_tasks(run.run_id)}
    assert tasks["a[2]"].attempts == 2 and tasks["a[1]"].attempts == 1
    assert tasks["b[2]"].state == TaskState.UPSTREAM_FAILED and tasks["b[3]"].state == TaskState.SUCCEEDED


def api_make_plan():  # noqa: ANN201 - the real make_plan, before a test replaces it
    from corral.plan import make_plan

    return make_plan


def test_resume_plans_from_the_manifest_when_the_workflow_changed(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    wf = write_workflow(tmp_path, "name: ch\nitems: [{n: 1}]\nstages:\n  - {name: a, command: \"true\"}\n")
    run = api.run(str(wf))
    wf.write_text("name: ch\nitems: [{n: 1}]\nstages:\n  - {name: a, command: \"true x\"}\n")
    store = api.open_run_store(None, run.run_id)
    plan = cli._resume_plan(store, store.get_run(run.run_id))
    assert plan.workflow.stages[0].command == "true"  # the run as recorded
    assert "has changed since" in capsys.readouterr().err


def test_a_finished_run_resumes_to_its_end_without_a_scheduler(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    wf = write_workflow(tmp_path, "name: done\nitems: [{n: 1}, {n: 2}]\nstages:\n  - {name: a, command: \"true\"}\n")
    run = api.run(str(wf))
    assert run.state == RunState.SUCCEEDED
    store = _store()
    # the scheduler was killed after the last task's end was committed, before the run's
    store.save_run(store.get_run(run.run_id).replace(state=RunState.INTERRUPTED, pid=None))
    monkeypatch.setattr(local.Scheduler, "run", lambda self: pytest.fail("no scheduler for a finished run"))
    seen: list[int] = []
    rec = api.resume(run.run_id, options=api.RunOptions(progress=lambda ts: seen.append(len(ts))))
    assert rec.state == RunState.SUCCEEDED and rec.pid is None
    assert seen == [2]
    assert [t.attempts for t in store.get_tasks(run.run_id)] == [1, 1]


def test_resume_reaps_orphans_then_runs_them_from_the_rows_it_read(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, "name: orph\nitems: [{n: 1}, {n: 2}]\nstages:\n  - {name: a, command: \"true\"}\n")
    run = api.run(str(wf))
    store = _store()
    t = store.get_tasks(run.run_id)[1]
    # as a kill -9 leaves it: the task RUNNING, its attempt RUNNING with a pid that is gone
    store.save_tasks([t.replace(state=TaskState.RUNNING, ended_at=None)])
    attempt = store.get_attempts(run.run_id, t.task_id)[0]
    store.save_attempt(attempt.replace(state=TaskState.RUNNING, ended_at=None, pid=2**22 + 7))
    store.save_run(store.get_run(run.run_id).replace(state=RunState.INTERRUPTED, pid=None))
    rec = api.resume(run.run_id)
    assert rec.state == RunState.SUCCEEDED
    after = store.get_tasks(run.run_id)[1]
    assert after.state == TaskState.SUCCEEDED and after.attempts == 2
    assert [a.state for a in store.get_attempts(run.run_id, t.task_id)] == [TaskState.FAILED, TaskState.SUCCEEDED]


@pytest.mark.parametrize("script,direct", [
    ("true", True), ("sleep 0", True), ("printenv PWD", True), ("ls -la /tmp", True),
    ("true x", False), ("echo hi", False), ("kill -0 1", False), ("ls *.txt", False), ("a=1 ls", False),
    ("ls > x", False), ("ls $HOME", False), ("ls 'a b'", False), ("./run.sh", False), ("/bin/ls", False),
    ("no-such-program-here", False), ("ls\nls", False), ("cd /tmp", False), ("ls ~", False), ("ls #x", False),
])
def test_which_scripts_run_without_a_shell(script: str, direct: bool) -> None:
    env = dict(os.environ)
    argv = local._direct_argv(["/bin/sh", "-c", script], env)
    assert (argv != ["/bin/sh", "-c", script]) == direct
    if direct:
        assert argv == script.split()


def test_a_direct_command_sees_what_it_would_under_the_shell(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: same
items: [{n: 1}]
stages:
  - {name: direct, command: "printenv PWD CORRAL_STAGE n"}
  - {name: shell, command: "printenv PWD CORRAL_STAGE n; true"}
  - {name: missing, command: "no-such-program-here {n}"}
""")
    other = tmp_path / "elsewhere"
    other.mkdir()
    res = run_cli("run", str(wf), cwd=other, env={"PWD": str(other)})
    run_id = res.stdout.strip()
    logs = {}
    for t in _store().get_tasks(run_id):
        a = _store().get_attempts(run_id, t.task_id)[-1]
        logs[t.stage] = (t.state, Path(a.stdout).read_text(), Path(a.stderr).read_text())
    assert logs["direct"][0] == TaskState.SUCCEEDED
    assert logs["direct"][1] == f"{tmp_path}\ndirect\n1\n"
    assert logs["shell"][1] == f"{tmp_path}\nshell\n1\n"
    # a program that is not there: the shell's own message and exit code, as before
    assert logs["missing"][0] == TaskState.FAILED and "not found" in logs["missing"][2]
    assert _store().get_tasks(run_id)[2].exit_code == 127


def test_a_resumed_plan_limits_memory_only_where_the_workflow_set_it(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: mem
items: [{n: 1}]
stages:
  - {name: free, command: "true"}
  - {name: capped, command: "true", resources: {memory: 300MiB}}
""")
    p = api.plan(str(wf))
    again = Plan.from_manifest(p.manifest())
    for before, after in zip(p.tasks, again.tasks, strict=True):
        assert local._explicit_memory(after) == local._explicit_memory(before)
    assert [local._explicit_memory(t) for t in again.tasks] == [False, True]


def test_a_manifest_from_before_resources_set_is_still_the_plans_own(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, "name: old\nitems: [{n: 1}]\nstages:\n  - {name: a, command: \"true\"}\n")
    p = api.plan(str(wf))
    mine = p.manifest()
    older = mine[:mine.rindex(b',"resources_set":')] + b"}"
    assert p.records(mine) and p.records(older)
    assert not p.records(older.replace(b'"true"', b'"false"'))
    assert not p.records(mine.replace(b'"true"', b'"false"'))


def test_help_and_status_load_only_what_they_need(tmp_path: Path) -> None:
    import subprocess
    import sys

    probe = ("import sys; from corral import cli; cli._load_extensions(); "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'pydantic', 'yaml'}), "
             "'corral.storage' in sys.modules, 'corral.spec' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["[]", "False", "False"]  # `corral --help`: none of them
    status = ("import sys; from corral import api; from corral.backends import local; "
              "from corral.state import sqlite; print('pydantic' in sys.modules, 'corral.spec' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", status], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]  # `corral status`: no workflow models
