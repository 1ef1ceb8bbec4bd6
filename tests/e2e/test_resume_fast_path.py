"""`corral resume` of a finished run whose inputs have not changed answers from the store (#18).

The evidence is time-free: the resume runs in a child process that reports whether the planner
(``corral.plan``), the workflow models (``corral.spec``) or pydantic were ever imported. Every way
the fast path could answer wrongly takes the full path instead, which plans and says so: an edited
workflow, an edited table, a failed task, `--force`, lost task rows, a run recorded without a
fingerprint (before it existed), items from a glob.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import run_cli, write_workflow

from corral import api, inputs
from corral.model import RunState, TaskState
from corral.spec import loads_workflow
from corral.state.sqlite import SqliteStore

DRIVER = """
import json, sys
from corral import cli
try:
    cli.main(["resume", *sys.argv[1:]])
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "planned": "corral.plan" in sys.modules,
                  "models": "corral.spec" in sys.modules, "pydantic": "pydantic" in sys.modules}))
"""

TABLE_WORKFLOW = """name: fast
items: {table: sessions.csv}
stages:
  - {name: fetch, command: "true"}
  - {name: convert, command: "echo {session}", needs: [fetch]}
"""


def _store() -> SqliteStore:
    return SqliteStore(api.corral_home() / "state.db")


def _resume(*args: str, cwd: Path) -> dict[str, Any]:
    res = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=cwd, capture_output=True, text=True,
                         timeout=120, env=os.environ)
    assert res.stdout.strip(), res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["stderr"] = res.stderr
    return out


def _finished_table_run(tmp_path: Path) -> tuple[Path, Path, str]:
    table = tmp_path / "sessions.csv"
    table.write_text("session\ns1\ns2\ns3\n")
    wf = write_workflow(tmp_path, TABLE_WORKFLOW)
    res = run_cli("run", str(wf), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return wf, table, res.stdout.strip()


def test_a_finished_unchanged_run_resumes_without_planning(tmp_path: Path) -> None:
    wf, table, run_id = _finished_table_run(tmp_path)
    recorded = _store().get_run(run_id).options[inputs.KEY]
    assert [f["path"] for f in recorded["files"]] == [str(wf), str(table)] and recorded["tasks"] == 6
    before = _store().get_run(run_id)
    got = _resume(run_id, cwd=tmp_path)
    assert got["code"] == 0
    assert not got["planned"] and not got["models"] and not got["pydantic"], got
    assert "nothing to resume" in got["stderr"]
    assert "succeeded" in got["stderr"] and "convert" in got["stderr"]  # the run's table, as at its end
    assert _store().get_run(run_id) == before  # answered from the store: nothing rewritten
    # the bytes decide, not the mtime: a file touched (or copied back) is the file planned
    os.utime(table, ns=(1, 1))
    got = _resume(run_id, cwd=tmp_path)
    assert got["code"] == 0 and not got["planned"] and "nothing to resume" in got["stderr"]


def test_an_edited_workflow_takes_the_full_path_and_says_so(tmp_path: Path) -> None:
    wf, _, run_id = _finished_table_run(tmp_path)
    wf.write_text(TABLE_WORKFLOW.replace("echo {session}", "echo {session} again"))
    got = _resume(run_id, cwd=tmp_path)
    assert got["code"] == 0 and got["planned"], got
    assert "has changed since run" in got["stderr"] and "stages convert" in got["stderr"]
    assert "nothing to resume" not in got["stderr"]
    # the same size, other bytes: still changed
    wf.write_text(TABLE_WORKFLOW.replace("echo {session}", "echo {sessioN}"))
    assert wf.stat().st_size == len(TABLE_WORKFLOW)
    got = _resume(run_id, cwd=tmp_path)
    assert got["planned"] and "has changed since run" in got["stderr"]


def test_an_edited_table_takes_the_full_path_and_says_so(tmp_path: Path) -> None:
    _, table, run_id = _finished_table_run(tmp_path)
    table.write_text("session\ns1\ns2\ns4\n")  # same size, another item
    got = _resume(run_id, cwd=tmp_path)
    assert got["code"] == 0 and got["planned"], got
    assert "has changed since run" in got["stderr"] and "nothing to resume" not in got["stderr"]
    table.unlink()  # gone: the full path, which says the file no longer loads
    got = _resume(run_id, cwd=tmp_path)
    assert got["planned"] and "no longer loads" in got["stderr"]


def test_a_failed_task_is_resumed(tmp_path: Path) -> None:
    flag = tmp_path / "fixed"
    wf = write_workflow(tmp_path, f"""name: heal
items: [{{n: 1}}, {{n: 2}}]
stages:
  - {{name: a, command: "test {{n}} -ne 2 || test -e {flag}"}}
  - {{name: b, command: "true", needs: [a]}}
""")
    res = run_cli("run", str(wf), cwd=tmp_path)
    assert res.returncode == 1
    run_id = res.stdout.strip()
    assert inputs.KEY in _store().get_run(run_id).options  # unchanged inputs: only the tasks keep it off the fast path
    flag.touch()
    got = _resume(run_id, cwd=tmp_path)
    assert got["code"] == 0 and got["planned"], got
    assert "2 task(s) not done" in got["stderr"]
    tasks = {t.label: t for t in _store().get_tasks(run_id)}
    assert tasks["a[2]"].attempts == 2 and tasks["a[1]"].attempts == 1
    assert all(t.state == TaskState.SUCCEEDED for t in tasks.values())
    assert _store().get_run(run_id).state == RunState.SUCCEEDED
    got = _resume(run_id, cwd=tmp_path)  # now finished: the fast path
    assert got["code"] == 0 and not got["planned"] and "nothing to resume" in got["stderr"]


def test_force_lost_rows_an_unended_run_and_old_runs_take_the_full_path(tmp_path: Path) -> None:
    _, _, run_id = _finished_table_run(tmp_path)
    got = _resume(run_id, "--force", cwd=tmp_path)
    assert got["planned"] and "resuming" in got["stderr"]
    store = _store()
    # a run the scheduler did not see end (killed after the last task): the full path records its end
    store.save_run(store.get_run(run_id).replace(state=RunState.INTERRUPTED, pid=None))
    got = _resume(run_id, cwd=tmp_path)
    assert got["code"] == 0 and got["planned"]
    assert store.get_run(run_id).state == RunState.SUCCEEDED
    # a run recorded before fingerprints existed
    rec = store.get_run(run_id)
    store.save_run(rec.replace(options={k: v for k, v in rec.options.items() if k != inputs.KEY}))
    got = _resume(run_id, cwd=tmp_path)
    assert got["code"] == 0 and got["planned"] and "nothing to resume" not in got["stderr"]
    store.save_run(rec)
    # a task row lost: the full path records it again and runs it
    lost = store.get_tasks(run_id)[-1]
    with sqlite3.connect(api.corral_home() / "state.db") as db:
        db.execute("DELETE FROM tasks WHERE run_id=? AND task_id=?", (run_id, lost.task_id))
    assert len(store.get_tasks(run_id)) == 5
    got = _resume(run_id, cwd=tmp_path)
    assert got["code"] == 0 and got["planned"], got
    after = {t.task_id: t for t in store.get_tasks(run_id)}
    assert len(after) == 6 and after[lost.task_id].state == TaskState.SUCCEEDED


def test_a_glob_s_items_are_not_fingerprinted(tmp_path: Path) -> None:
    (tmp_path / "data" / "s1").mkdir(parents=True)
    wf = write_workflow(tmp_path, 'name: g\nitems: {glob: "data/{session}", type: dir}\n'
                                  'stages:\n  - {name: a, command: "true"}\n')
    res = run_cli("run", str(wf), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.strip()
    assert inputs.KEY not in _store().get_run(run_id).options
    (tmp_path / "data" / "s2").mkdir()  # a new match: only planning sees it
    got = _resume(run_id, cwd=tmp_path)
    assert got["planned"] and "has changed since run" in got["stderr"]


def test_which_item_sources_are_fingerprinted(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x\n1\n")
    (tmp_path / "b.tsv").write_text("y\n2\n")

    def files(items: str) -> list[str] | None:
        src = tmp_path / "wf.yaml"
        text = f"name: w\nitems: {items}\nstages:\n  - {{name: s, command: \"true\"}}\n"
        src.write_text(text)
        wf = loads_workflow(text, str(src), tmp_path)
        fp = inputs.fingerprint(wf)
        return None if fp is None else [Path(f["path"]).name for f in fp["files"]]

    assert files("[{n: 1}]") == ["wf.yaml"]
    assert files("{table: a.csv, where: {x: 1}}") == ["wf.yaml", "a.csv"]
    assert files("{product: [{table: a.csv}, {table: b.tsv}, [{z: 3}]]}") == ["wf.yaml", "a.csv", "b.tsv"]
    assert files("{product: [{table: a.csv}, {glob: '*.tsv'}]}") is None
    assert files("{glob: '*.csv'}") is None
    assert files("{bids: ds}") is None
    assert inputs.fingerprint(loads_workflow(
        "name: w\nitems: [{n: 1}]\nstages:\n  - {name: s, command: \"true\"}\n")) is None  # no file


def test_the_python_api_records_the_fingerprint_too(tmp_path: Path) -> None:
    (tmp_path / "sessions.csv").write_text("session\ns1\ns2\n")
    wf = write_workflow(tmp_path, TABLE_WORKFLOW)
    run = api.run(str(wf))
    recorded = run.options[inputs.KEY]
    assert recorded["tasks"] == 4 and [Path(f["path"]).name for f in recorded["files"]] == ["workflow.yaml",
                                                                                           "sessions.csv"]
    assert inputs.unchanged(run, 4) and not inputs.unchanged(run, 5)
    got = _resume(run.run_id, cwd=tmp_path)
    assert got["code"] == 0 and not got["planned"] and "nothing to resume" in got["stderr"]
