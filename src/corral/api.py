"""The Python API: load a workflow, plan it, run it, look at it.

    import corral
    wf = corral.load_workflow("examples/quickstart/workflow.yaml")
    plan = corral.plan(wf)
    run = corral.run(wf)                  # local backend, state in $CORRAL_HOME/state.db
    corral.status(run.run_id)             # task records
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import platformdirs

from corral.backends.base import Backend, RunOptions
from corral.errors import CorralError, UsageError
from corral.model import RunRecord, RunState, TaskRecord, TaskState, now
from corral.plan import Plan, make_plan
from corral.spec import Workflow, load_workflow
from corral.state.base import StateStore

BACKENDS = ("local", "aws")


def corral_home() -> Path:
    """State directory: ``$CORRAL_HOME``, else the user's data dir (e.g. ~/.local/share/corral)."""
    env = os.environ.get("CORRAL_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("corral", appauthor=False))


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}", f"use one of: {', '.join(BACKENDS)}")


def open_store(backend: str = "local", workflow: Workflow | None = None, **aws: Any) -> StateStore:
    """The state store a backend records into: SQLite locally, DynamoDB for AWS runs."""
    _check_backend(backend)
    if backend == "local":
        from corral.state.sqlite import SqliteStore

        return SqliteStore(corral_home() / "state.db")
    from corral.backends.aws_batch.client import AwsClients
    from corral.spec import AwsSettings
    from corral.state.dynamodb import DynamoStore

    settings = workflow.aws if workflow is not None else AwsSettings(**{k: v for k, v in aws.items() if v is not None})
    clients = AwsClients(region=settings.region, profile=settings.profile)
    table = getattr(settings, "table", None) or "corral-state"
    return DynamoStore(table, clients.dynamodb)


def get_backend(backend: str, workflow: Workflow | None = None, run: RunRecord | None = None) -> Backend:
    _check_backend(backend)
    if backend == "local":
        from corral.backends.local import LocalBackend

        return LocalBackend(corral_home())
    from corral.backends.aws_batch.backend import AwsBatchBackend
    from corral.backends.aws_batch.client import AwsClients
    from corral.spec import AwsSettings

    if workflow is not None:
        settings = workflow.aws
    else:
        settings = AwsSettings(**(run.options.get("aws", {}) if run else {}))
    return AwsBatchBackend(AwsClients(region=settings.region, profile=settings.profile), settings)


def plan(workflow: Workflow | str | Path) -> Plan:
    wf = workflow if isinstance(workflow, Workflow) else load_workflow(workflow)
    return make_plan(wf)


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def run(
    workflow: Workflow | str | Path,
    backend: str = "local",
    *,
    store: StateStore | None = None,
    options: RunOptions | None = None,
    backend_impl: Backend | None = None,
    plan: Plan | None = None,
) -> RunRecord:
    """Plan the workflow, record the run and all its tasks, then run (local) or submit (aws).
    ``plan``: the workflow's plan when the caller has made it already (items are resolved once:
    a BIDS listing on S3 or a NeuroConv spec is read one time per run)."""
    wf = workflow if isinstance(workflow, Workflow) else load_workflow(workflow)
    p = plan if plan is not None else make_plan(wf)
    be = backend_impl or get_backend(backend, wf)
    be.check(p)
    store = store or open_store(backend, wf)
    options = options or RunOptions()
    rec = RunRecord(
        run_id=new_run_id(wf.name), workflow_name=wf.name, backend=backend, created_at=now(),
        state=RunState.RUNNING, workflow_path=wf.source, base_dir=str(wf.base_dir), host=socket.gethostname(),
        options={"aws": wf.aws.model_dump(mode="json")} if backend == "aws" else {},
    )
    tasks = [
        TaskRecord(run_id=rec.run_id, task_id=t.id, stage=t.stage.name, item_key=t.key, item_index=t.index)
        for t in p.tasks
    ]
    store.create_run(rec, p.manifest(), tasks)
    try:
        be.start(p, rec, store, options)
    except BaseException:
        now_rec = store.get_run(rec.run_id)
        if backend == "local" and now_rec.state == RunState.RUNNING:
            store.save_run(now_rec.replace(state=RunState.INTERRUPTED, pid=None))
        raise
    return store.get_run(rec.run_id)


def load_plan(store: StateStore, run_id: str) -> Plan:
    return Plan.from_manifest(store.load_manifest(run_id))


def resume(
    run_id: str,
    *,
    store: StateStore | None = None,
    options: RunOptions | None = None,
    backend_impl: Backend | None = None,
    plan: Plan | None = None,
) -> RunRecord:
    """Go on with RUN_ID; ``plan`` is the run's stored plan when the caller has loaded it already."""
    store = store or open_store("local")
    rec = store.get_run(run_id)
    p = plan if plan is not None else load_plan(store, run_id)
    be = backend_impl or get_backend(rec.backend, p.workflow, rec)
    be.resume(p, rec, store, options or RunOptions())
    return store.get_run(run_id)


def open_run_store(backend: str | None, run_id: str | None = None) -> StateStore:
    """The store of ``backend`` (default local), checked to hold ``run_id`` when one is given."""
    store = open_store(backend or "local")
    if run_id:
        try:
            store.get_run(run_id)
        except CorralError as exc:
            hint = ("for a run on AWS add --backend aws; `corral status --all` lists local runs"
                    if backend is None else f"`corral status --all --backend {backend}` lists its runs")
            where = f"local state ({corral_home()})" if backend in (None, "local") else f"{backend} state"
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
    store = store or open_store("local")
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
    store = store or open_store("local")
    rec = store.get_run(run_id)
    t = find_task(store, run_id, task)
    return get_backend(rec.backend, run=rec).logs(rec, store, t, attempt, follow)


def cancel(run_id: str, *, store: StateStore | None = None) -> None:
    store = store or open_store("local")
    rec = store.get_run(run_id)
    get_backend(rec.backend, run=rec).cancel(rec, store)


def counts(tasks: list[TaskRecord]) -> dict[str, int]:
    out = {s.value: 0 for s in TaskState}
    for t in tasks:
        out[t.state.value] += 1
    return out
