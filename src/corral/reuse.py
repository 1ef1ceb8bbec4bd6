"""Incremental re-runs: which tasks of a new run already succeeded in an earlier run.

A task's id is a hash of what it runs (its stage's command, image, env, outputs ... and its
item), so a task whose id succeeded in an earlier run of the same workflow, recorded in the same
state store, is the same work. ``corral run`` records such a task REUSED (reason: the run it
succeeded in) instead of running it again — on every backend, since this happens before the
backend sees the run — unless:

- ``--force`` (nothing is reused, nothing skipped), or the stage is named by ``--force-stage``
  or needs (directly or not) a stage that is;
- any task it needs is not reused (new items, an edited upstream stage): a ``per: run`` summary
  runs again when items were added;
- its stage declares outputs and they are gone (or older than its inputs);
- it uses the run's workspace (``{workdir}``, ``workspace://``, ``CORRAL_WORKDIR``): each run
  has its own workspace, so what it left there is not in the new run's; cleanup stages likewise.
"""

from __future__ import annotations

from collections.abc import Iterable

from corral import storage
from corral.errors import StateError, StorageError, UsageError, did_you_mean
from corral.model import TaskState
from corral.plan import Plan, Task
from corral.spec import Stage
from corral.state.base import StateStore

HISTORY_RUNS = 20  # earlier runs of the workflow looked at (newest first)
LIST_LIMIT = 500
REUSED_FROM = "reused: succeeded in run "


def forced_stages(plan: Plan, names: Iterable[str]) -> set[str]:
    """The stages named, and every stage that needs one of them (directly or not)."""
    names = list(names)
    known = plan.stage_order
    for n in names:
        if n not in known:
            raise UsageError(f"--force-stage {n}: the workflow has no stage {n!r}",
                             did_you_mean(n, known, otherwise="stages are", show=len(known)))
    forced = set(names)
    for name in known:  # topological order: a stage's needs come first
        if forced & set(plan.workflow.stage(name).needs):
            forced.add(name)
    return forced


def uses_workspace(stage: Stage) -> bool:
    cmd = stage.command
    texts = [cmd] if isinstance(cmd, str) else list(cmd or [])
    texts += list(stage.env.values()) + stage.outputs + stage.inputs
    texts += [u for u in (stage.source, stage.dest) if u]
    return stage.kind == "cleanup" or any(
        "{workdir}" in t or "workspace://" in t or "CORRAL_WORKDIR" in t for t in texts)


def succeeded_before(store: StateStore, workflow: str, backend: str) -> dict[str, str]:
    """Task id → the run it succeeded in, over the newest earlier runs of ``workflow``."""
    done: dict[str, str] = {}
    seen = 0
    for run in store.list_runs(limit=LIST_LIMIT):
        if run.workflow_name != workflow or run.backend != backend:
            continue
        seen += 1
        for t in store.get_tasks(run.run_id, [TaskState.SUCCEEDED, TaskState.REUSED]):
            origin = t.reason[len(REUSED_FROM):] if t.state == TaskState.REUSED and \
                t.reason.startswith(REUSED_FROM) else run.run_id
            done.setdefault(t.task_id, origin)
        if seen >= HISTORY_RUNS:
            break
    return done


def reusable(plan: Plan, store: StateStore, *, backend: str, force_stages: Iterable[str] = ()) -> dict[str, str]:
    """Task id → the earlier run whose success the new run reuses (see the module docstring)."""
    forced = forced_stages(plan, force_stages)
    try:
        done = succeeded_before(store, plan.workflow.name, backend)
    except StateError:
        return {}  # no store yet (the first run makes it): nothing to reuse
    if not done:
        return {}
    out: dict[str, str] = {}
    for task in plan.tasks:  # topological order
        if task.id not in done or task.stage.name in forced or uses_workspace(task.stage):
            continue
        if not all(n in out for n in task.needs):
            continue
        if task.stage.outputs and not _outputs_still_there(plan, task):
            continue
        out[task.id] = done[task.id]
    return out


def _outputs_still_there(plan: Plan, task: Task) -> bool:
    try:
        return storage.outputs_exist(
            task.paths("outputs", "", ""), task.paths("inputs", "", ""),
            run_id="", workdir="/nonexistent-workspace", base_dir=plan.workflow.base_dir,
        )
    except StorageError:
        return False
