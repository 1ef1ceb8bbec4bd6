"""The Python API: load a workflow, plan it, run it, look at it.

    import corral
    wf = corral.load_workflow("examples/quickstart/workflow.yaml")
    plan = corral.plan(wf)
    run = corral.run(wf)                  # local backend, state in $CORRAL_HOME/state.db
    corral.status(run.run_id)             # task records
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral import backends, runstate
from corral.backends.base import Backend, RunOptions
from corral.errors import CorralError, UsageError
from corral.home import corral_home
from corral.model import RunRecord, RunState, RunSummary, TaskRecord, TaskState, now
from corral.state.base import StateStore

# The workflow models (pydantic) and the planner load when a call needs them: `corral status` and
# `corral logs` never do (0.2 s of start-up less).
if TYPE_CHECKING:
    from corral.plan import Plan
    from corral.spec import Workflow

BACKENDS = backends.NAMES

__all__ = ["BACKENDS", "corral_home"]


def open_store(backend: str = backends.DEFAULT, workflow: Workflow | None = None, **settings: Any) -> StateStore:
    """The state store a backend records into (SQLite locally, DynamoDB for AWS runs)."""
    return backends.open_store(backend, workflow, **settings)


def get_backend(backend: str, workflow: Workflow | None = None, run: RunRecord | None = None,
                **settings: Any) -> Backend:
    return backends.get_backend(backend, workflow=workflow, run=run, **settings)


def load_workflow(path: str | Path) -> Workflow:
    """Read and validate a workflow file (:func:`corral.spec.load_workflow`)."""
    from corral.spec import load_workflow as load

    return load(path)


def plan(workflow: Workflow | str | Path) -> Plan:
    from corral.plan import make_plan
    from corral.spec import Workflow

    wf = workflow if isinstance(workflow, Workflow) else load_workflow(workflow)
    return make_plan(wf)


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def run(
    workflow: Workflow | str | Path,
    backend: str = backends.DEFAULT,
    *,
    store: StateStore | None = None,
    options: RunOptions | None = None,
    backend_impl: Backend | None = None,
    plan: Plan | None = None,
) -> RunRecord:
    """Plan the workflow, record the run and all its tasks, then run (local) or submit (aws).
    ``plan``: the workflow's plan when the caller has made it already (items are resolved once:
    a BIDS listing on S3 or a NeuroConv spec is read one time per run)."""
    from corral import inputs, reuse
    from corral.plan import make_plan
    from corral.spec import Workflow

    wf = workflow if isinstance(workflow, Workflow) else load_workflow(workflow)
    # the files the plan reads, fingerprinted before it reads them when it is made here
    fingerprint = inputs.fingerprint(wf) if plan is None else None
    p = plan if plan is not None else make_plan(wf)
    if plan is not None:
        fingerprint = inputs.fingerprint(wf)
    if fingerprint is not None:
        fingerprint["tasks"] = len(p.tasks)
    be = backend_impl or get_backend(backend, wf)
    be.check(p)
    store = store or be.open_store(workflow=wf)
    options = options or RunOptions()
    rec = RunRecord(
        run_id=new_run_id(wf.name), workflow_name=wf.name, backend=be.name, created_at=now(),
        state=RunState.RUNNING, workflow_path=wf.source, base_dir=str(wf.base_dir), host=socket.gethostname(),
        options={**be.run_options(wf), **({inputs.KEY: fingerprint} if fingerprint else {})},
    )
    reused = {} if options.force or not options.reuse else reuse.reusable(
        p, store, backend=be.name, force_stages=options.force_stages)
    if not reused:
        reuse.forced_stages(p, options.force_stages)  # (checks the names)
    t_now = now()
    tasks = [
        TaskRecord(run_id=rec.run_id, task_id=t.id, stage=t.stage.name, item_key=t.key, item_index=t.index)
        if t.id not in reused else
        TaskRecord(run_id=rec.run_id, task_id=t.id, stage=t.stage.name, item_key=t.key, item_index=t.index,
                   state=TaskState.REUSED, reason=reuse.REUSED_FROM + reused[t.id], ended_at=t_now)
        for t in p.tasks
    ]
    with store.lease(rec.run_id, "run"):  # one writer per run, from before it is visible
        store.create_run(rec, p.manifest(), tasks)
        del tasks  # the backend reads the records it needs: not two copies of 300,000 in memory
        try:
            be.start(p, rec, store, _no_wait(be, options))
        except BaseException:
            if be.driven_from_host:  # nobody drives it any more: `corral resume` goes on
                with contextlib.suppress(CorralError):  # a store that fails again: the first error is the one
                    runstate.settle(store, rec.run_id, RunState.INTERRUPTED, pid=None)
            raise
    _wait(be, rec, store, options)
    return store.get_run(rec.run_id)


def _no_wait(be: Backend, options: RunOptions) -> RunOptions:
    """A backend that can wait apart (AWS) submits under the lease and waits after it, so that a
    `corral cancel` or another machine's refresh is not shut out for the hours a run lasts."""
    return dataclasses.replace(options, wait=False) if hasattr(be, "wait") else options


def _wait(be: Backend, rec: RunRecord, store: StateStore, options: RunOptions) -> None:
    wait = getattr(be, "wait", None)
    if wait is not None and options.wait:
        wait(store.get_run(rec.run_id), store, options)


def load_plan(store: StateStore, run_id: str, tasks: list[TaskRecord] | None = None) -> Plan:
    """The run's plan, rebuilt from its manifest, with the item keys its tasks were recorded with
    (``tasks``: the run's task records when the caller has read them already)."""
    from corral.plan import Plan

    plan = Plan.from_manifest(store.load_manifest(run_id))
    return plan.with_keys({t.task_id: t.item_key for t in (store.get_tasks(run_id) if tasks is None else tasks)})


def resume(
    run_id: str,
    *,
    store: StateStore | None = None,
    options: RunOptions | None = None,
    backend_impl: Backend | None = None,
    plan: Plan | None = None,
) -> RunRecord:
    """Go on with RUN_ID; ``plan`` is the run's stored plan when the caller has loaded it already.
    The run's task records are read once, under the lease, and handed on (to the plan's item keys,
    to :func:`restore_tasks` and to the backend): a finished 30,000-task run resumes in well under
    a second, and the plan is built at most once."""
    from corral.plan import Plan

    store = store or open_store()
    options = options or RunOptions()
    with store.lease(run_id, "resume"):
        rec = store.get_run(run_id)
        tasks = store.get_tasks(run_id)
        p = (plan if plan is not None else Plan.from_manifest(store.load_manifest(run_id))).with_keys(
            {t.task_id: t.item_key for t in tasks})
        be = backend_impl or get_backend(rec.backend, run=rec)
        if restore_tasks(store, rec, p, tasks):
            tasks = store.get_tasks(run_id)  # rows were missing (rare): read them again, with the new ones
        be.resume(p, store.get_run(run_id), store, _no_wait(be, options), tasks=tasks)
    _wait(be, rec, store, options)
    return store.get_run(run_id)


def restore_tasks(store: StateStore, rec: RunRecord, p: Plan, tasks: list[TaskRecord] | None = None) -> int:
    """Record, as PENDING, every task of the manifest the store does not hold (a run recorded
    before records were atomic, or rows lost): resume then runs them like any other. ``tasks``:
    the run's records when the caller has them. Returns how many were added."""
    known = {t.task_id for t in (store.get_tasks(rec.run_id) if tasks is None else tasks)}
    missing = [
        TaskRecord(run_id=rec.run_id, task_id=t.id, stage=t.stage.name, item_key=t.key, item_index=t.index)
        for t in p.tasks if t.id not in known
    ]
    return store.restore_tasks(rec.run_id, missing) if missing else 0


def open_run_store(backend: str | None, run_id: str | None = None) -> StateStore:
    """The store of ``backend`` (default local), checked to hold ``run_id`` when one is given."""
    store = open_store(backend or backends.DEFAULT)
    if run_id:
        try:
            store.get_run(run_id)
        except CorralError as exc:
            others = [n for n in backends.NAMES if n != backends.DEFAULT]
            hint = (f"for a run elsewhere add --backend {'|'.join(others)}; `corral status --all` lists local runs"
                    if backend is None else f"`corral status --all --backend {backend}` lists its runs")
            where = (f"local state ({corral_home()})" if (backend or backends.DEFAULT) == backends.DEFAULT
                     else f"{backend} state")
            raise UsageError(f"no run {run_id!r} in the {where}", hint) from exc
    return store


def resolve_run(store: StateStore, run_id: str | None) -> RunRecord:
    if run_id:
        return store.get_run(run_id)
    runs = store.list_runs(limit=1)
    if not runs:
        raise UsageError("no runs recorded yet", "start one with `corral run workflow.yaml`")
    return runs[0]


def status(run_id: str | None = None, *, store: StateStore | None = None, refresh: bool = True) -> list[TaskRecord]:
    store = store or open_store()
    rec = resolve_run(store, run_id)
    if refresh:
        return get_backend(rec.backend, run=rec).refresh(rec, store)
    return store.get_tasks(rec.run_id)


def find_task(store: StateStore, run_id: str, ref: str) -> TaskRecord:
    """A task by id, unique id prefix, ``stage[item]`` label, or ``stage/item``."""
    tasks = store.get_tasks(run_id)
    for t in tasks:
        if t.task_id == ref:
            return t
    label = ref.replace("/", "[", 1) + "]" if "/" in ref and "[" not in ref else ref
    matches = [t for t in tasks if t.label == label or t.task_id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(
            f"run {run_id} has no task {ref!r}",
            "give a task id (or a unique prefix) or stage[item], as `corral status` shows them",
        )
    raise UsageError(
        f"{len(matches)} tasks of run {run_id} match {ref!r}", "give more characters of the task id"
    )


def logs(
    run_id: str, task: str, *, attempt: int | None = None, follow: bool = False, store: StateStore | None = None
) -> Iterator[str]:
    store = store or open_store()
    rec = store.get_run(run_id)
    t = find_task(store, run_id, task)
    return get_backend(rec.backend, run=rec).logs(rec, store, t, attempt, follow)


def cancel(run_id: str, *, store: StateStore | None = None) -> RunRecord:
    """Stop the run; an ended run keeps its state. Returns the run as recorded afterwards."""
    store = store or open_store()
    rec = store.get_run(run_id)
    if rec.state not in runstate.ENDED:
        get_backend(rec.backend, run=rec).cancel(rec, store)
    return store.get_run(run_id)


def summary(store: StateStore, run_id: str, tasks: list[TaskRecord] | None = None) -> RunSummary:
    """Counts per stage and state, stage times and the first failures of a run: aggregated by the
    store where it can (SQLite), else from ``tasks`` (read when not given)."""
    if tasks is None:
        aggregate = getattr(store, "summarize_run", None)
        if aggregate is not None:
            return aggregate(run_id)
        tasks = store.get_tasks(run_id)
    return RunSummary.of(tasks)


def counts(tasks: list[TaskRecord]) -> dict[str, int]:
    out = {s.value: 0 for s in TaskState}
    for t in tasks:
        out[t.state.value] += 1
    return out
