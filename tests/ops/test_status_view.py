"""The live status view and its refresh loop (what `corral status --watch` can call)."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from corral.cli_ops import status_view, watch_run
from corral.model import RunRecord, RunState, TaskRecord, TaskState
from corral.plan import make_plan
from corral.spec import loads_workflow
from corral.state.sqlite import SqliteStore

WF = """
name: live
items: [{k: a}, {k: b}, {k: c}, {k: d}]
aws: {instance_types: [c5.large]}
stages:
  - {name: fetch, resources: {vcpus: 1, memory: 1GiB}, command: "true"}
  - {name: work, needs: [fetch], resources: {vcpus: 2, memory: 2GiB}, command: "true"}
"""


class ScriptedBackend:
    """Each refresh applies the next scripted change (or none) to the store, like a backend would."""

    def __init__(self, steps: list[dict[str, TaskState]]) -> None:
        self.steps = steps
        self.refreshes = 0

    def refresh(self, run: RunRecord, store: SqliteStore) -> list[TaskRecord]:
        tasks = store.get_tasks(run.run_id)
        step = self.steps[self.refreshes] if self.refreshes < len(self.steps) else {}
        self.refreshes += 1
        changed = []
        for t in tasks:
            if t.label in step:
                st = step[t.label]
                changed.append(t.replace(state=st, attempts=max(1, t.attempts), started_at=t.started_at or 100.0,
                                         ended_at=160.0 if st.terminal else None,
                                         reason="exit code 3" if st == TaskState.FAILED else ""))
        store.save_tasks(changed)
        tasks = store.get_tasks(run.run_id)
        if all(t.state.terminal for t in tasks):
            store.save_run(store.get_run(run.run_id).replace(state=RunState.FAILED))
        return tasks


def test_watch_backs_off_while_nothing_moves_and_stops_at_the_end(tmp_path: Path) -> None:
    plan = make_plan(loads_workflow(WF, source="wf.yaml", base_dir=tmp_path))
    store = SqliteStore(tmp_path / "state.db")
    run = RunRecord(run_id="live-1", workflow_name="live", backend="aws", created_at=1.0)
    store.create_run(run, plan.manifest(), [
        TaskRecord(run_id=run.run_id, task_id=t.id, stage=t.stage.name, item_key=t.key, item_index=t.index,
                   state=TaskState.SUBMITTED) for t in plan.tasks])
    S, F, R = TaskState.SUCCEEDED, TaskState.FAILED, TaskState.RUNNING
    steps: list[dict[str, TaskState]] = [
        {"fetch[a]": R, "fetch[b]": R},
        {}, {}, {}, {},  # nothing moves: the wait grows 1.5x a turn, up to the ceiling
        {"fetch[a]": S, "fetch[b]": S, "fetch[c]": S, "fetch[d]": F, "work[a]": R},
        {},
        {"work[a]": S, "work[b]": S, "work[c]": S, "work[d]": TaskState.UPSTREAM_FAILED},
    ]
    be = ScriptedBackend(steps)
    waits: list[float] = []
    buf = io.StringIO()
    console = Console(file=buf, width=140, force_terminal=False, color_system=None)
    run_after, tasks = watch_run(be, run, store, console=console, interval=2.0, max_interval=5.0,
                                 sleep=waits.append)
    assert be.refreshes == 8 and run_after.state == RunState.FAILED
    assert waits == [2.0, 3.0, 4.5, 5.0, 5.0, 2.0, 3.0]
    text = buf.getvalue()
    assert "work[d]" not in text.split("failed  ")[-1] and "fetch[d]" in text and "exit code 3" in text
    # the last frame: both stages done; the cost line priced on the estimate (4 tasks x 60 s)
    last = text[text.rindex("run live-1"):]
    assert "4/4" in last and "cost: $" in last and "estimated instance type" in last
    store.close()


def test_status_view_rows() -> None:
    run = RunRecord(run_id="r", workflow_name="w", backend="local", created_at=1.0)
    tasks = [TaskRecord(run_id="r", task_id=f"t{i}", stage="s", item_key=str(i), item_index=i,
                        state=st, reason="OutOfMemoryError" if st == TaskState.FAILED else "",
                        started_at=0.0 if st.terminal else None, ended_at=30.0 if st.terminal else None)
             for i, st in enumerate([TaskState.SUCCEEDED, TaskState.FAILED, TaskState.RUNNING, TaskState.PENDING])]
    buf = io.StringIO()
    Console(file=buf, width=140, color_system=None).print(status_view(run, tasks))
    out = buf.getvalue()
    row = next(line for line in out.splitlines() if line.startswith("s "))
    assert "2/4" in row and "30s / 30s" in row and row.count("1") >= 3  # running, waiting, failed
    assert "failed  s[1]  t1  OutOfMemoryError" in out


def test_a_cancelled_stage_does_not_read_as_done() -> None:
    run = RunRecord(run_id="r", workflow_name="w", backend="local", created_at=1.0, state=RunState.CANCELLED)
    tasks = [TaskRecord(run_id="r", task_id=f"t{i}", stage="s", item_key=str(i), item_index=i, state=st,
                        started_at=0.0, ended_at=5.0)
             for i, st in enumerate([TaskState.SUCCEEDED, TaskState.CANCELLED, TaskState.CANCELLED])]
    buf = io.StringIO()
    Console(file=buf, width=140, color_system=None).print(status_view(run, tasks))
    row = next(line for line in buf.getvalue().splitlines() if line.startswith("s "))
    assert "1/3" in row  # the bar fills for the one task that finished, not for the cancelled ones
    assert buf.getvalue().splitlines()[0] == "run r (w, local): cancelled"  # the title is not wrapped
