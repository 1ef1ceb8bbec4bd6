"""The ``corral`` command. Ids and ``--json`` go to stdout; everything for people goes to stderr."""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from corral import backends
from corral.errors import CorralError
from corral.jsonout import write_json
from corral.lazy import LazyModule, lazy_console
from corral.units import format_duration, format_size_mib

if TYPE_CHECKING:
    from corral.model import RunRecord, TaskRecord

# What a command needs is imported when it runs (`corral --help` stays fast): the API, the models
# (pydantic) and the backends load on first use through these two module proxies.
# mypy sees the modules themselves, so calls through the proxies stay type-checked.
if TYPE_CHECKING:
    from corral import api, model, runstate
else:
    api = LazyModule("corral.api")
    runstate = LazyModule("corral.runstate")
    model = LazyModule("corral.model")

EXTENSIONS = ["corral.cli_aws", "corral.cli_aws_jobs", "corral.cli_storage", "corral.cli_ops", "corral.cli_recipes"]

# Off a terminal rich would cut every line at 80 columns (run ids, stage names): give it room.
err = lazy_console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 250)
out = lazy_console(highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

STATE_STYLE = {
    "PENDING": "dim", "SUBMITTED": "cyan", "RUNNING": "blue", "SUCCEEDED": "green", "SKIPPED": "green", "REUSED": "green",
    "FAILED": "red", "UPSTREAM_FAILED": "yellow", "CANCELLED": "magenta",
}


def backend_option(f: F) -> F:
    return click.option(
        "--backend", type=click.Choice(backends.NAMES), default=None,
        help="Where the run lives: local (default), aws (reads the DynamoDB state table) or slurm.",
    )(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--home", type=click.Path(file_okay=False), help="State folder (default: $CORRAL_HOME or the user data dir).")
@click.version_option(package_name="corral")
@click.pass_context
def cli(ctx: click.Context, debug: bool, home: str | None) -> None:
    """Run one declarative workflow over many items, locally or on AWS Batch."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if home:
        os.environ["CORRAL_HOME"] = str(Path(home).resolve())


# -- helpers ------------------------------------------------------------------------------------
def _stage_table(summary: model.RunSummary, title: str | None = None) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False)
    table.add_column("stage")
    seen = {s for per in summary.stages.values() for s, n in per.items() if n}
    states = [s.value for s in model.TaskState if s.value in seen]
    for s in states:
        table.add_column(s.lower().replace("_", " "), justify="right", style=STATE_STYLE.get(s, ""))
    table.add_column("total", justify="right")
    table.add_column("time (median / max)", justify="right")
    for stage, per in summary.stages.items():
        t = summary.times.get(stage)
        table.add_row(stage, *[str(per.get(s, 0) or "") for s in states], str(sum(per.values())),
                      f"{format_duration(t[0])} / {format_duration(t[1])}" if t else "-")
    if title is None:
        return table
    # The title on a line of its own: as a table title rich would wrap it to the table's width.
    return Group(Text(title, no_wrap=True, overflow="ignore"), table)


def _failures(summary: model.RunSummary, limit: int = 10) -> list[str]:
    lines = []
    for t in summary.failures[:limit]:
        lines.append(f"  {t.state.value.lower():<15} {t.label}  {t.task_id[:12]}  {t.reason}")
    if summary.failed_total > limit:
        lines.append(f"  … and {summary.failed_total - limit} more (`corral status RUN --tasks` lists them all)")
    return lines


def _print_task_list(tasks: list[TaskRecord]) -> None:
    """One line per task on stderr, in aligned columns. Plain text, not a rich table: labels such as
    ``fetch[mouse1-day1]`` are user text (never markup), and 30,000 rows print in well under a second."""
    rows = [(t.label, t.task_id[:12], t.state.value.lower(), str(t.attempts), format_duration(t.duration),
             " ".join((t.reason or "").split())) for t in tasks]
    header = ("task", "id", "state", "attempts", "time", "reason")
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(5)]
    colour = err.is_terminal and not err.no_color

    def line(cells: tuple[str, ...], state: str | None = None) -> str:
        parts = [c.ljust(w) for c, w in zip(cells[:5], widths, strict=False)]
        if colour and state:
            parts[2] = click.style(parts[2], fg=_STATE_COLOUR.get(state))
        return "  ".join(parts + [cells[5]]).rstrip()

    write = sys.stderr.write
    write(line(header) + "\n")
    for t, r in zip(tasks, rows, strict=True):
        write(line(r, t.state.value) + "\n")
    sys.stderr.flush()


_STATE_COLOUR = {"SUBMITTED": "cyan", "RUNNING": "blue", "SUCCEEDED": "green", "SKIPPED": "green",
                 "FAILED": "red", "UPSTREAM_FAILED": "yellow", "CANCELLED": "magenta"}


def _run_json(run: RunRecord, tasks: list[TaskRecord]) -> dict[str, Any]:
    return {
        "run_id": run.run_id, "workflow": run.workflow_name, "backend": run.backend, "state": run.state.value,
        "created_at": run.created_at, "counts": api.counts(tasks),
        "stages": model.summarize(tasks),
        "tasks": (  # a generator: streamed by write_json, one task per line
            {
                "task_id": t.task_id, "stage": t.stage, "item": t.item_key, "index": t.item_index,
                "state": t.state.value, "attempts": t.attempts, "exit_code": t.exit_code, "reason": t.reason,
                "started_at": t.started_at, "ended_at": t.ended_at, "external_id": t.external_id,
            }
            for t in tasks
        ),
    }


class LiveProgress:
    """Per-stage progress bars on stderr while a run goes on (only on a terminal)."""

    def __init__(self, stages: list[str]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.enabled = err.is_terminal
        self.progress = Progress(
            TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"), TimeRemainingColumn(), console=getattr(err, "real", err), transient=False,
        )
        self.ids = {s: self.progress.add_task(s, total=None, detail="") for s in stages}

    def __enter__(self) -> LiveProgress:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, tasks: list[TaskRecord]) -> None:
        if not self.enabled:
            return
        for stage, per in model.summarize(tasks).items():
            total = sum(per.values())
            done = model.finished_count(per)  # a cancelled run's bars do not read full
            bits = [f"{per[s]} {s.lower()}"
                    for s in ("RUNNING", "FAILED", "UPSTREAM_FAILED", "SKIPPED", "REUSED", "CANCELLED")
                    if per.get(s)]
            self.progress.update(self.ids[stage], total=total, completed=done, detail=", ".join(bits))


def _report_end(run: RunRecord, summary: model.RunSummary) -> int:
    err.print(_stage_table(summary, title=f"run {run.run_id}: {run.state.value.lower()}"))
    for line in _failures(summary):
        err.print(line, markup=False)
    failed = summary.failed_total > 0
    if failed:
        flag = "" if run.backend == api.backends.DEFAULT else f" --backend {run.backend}"  # as the run was started
        err.print(f"hint: `corral logs {run.run_id} <task>{flag}` shows a task's output; "
                  f"`corral resume {run.run_id}{flag}` runs what did not succeed", markup=False)
    return 1 if failed or run.state.value in ("FAILED", "CANCELLED", "INTERRUPTED") else 0


def _resume_plan(store: Any, rec: RunRecord) -> Any:
    """The plan `corral resume` runs: the run's as recorded, built once. When the workflow file
    still plans to exactly what the run recorded (the same manifest), that plan is the run's;
    otherwise the recorded one is rebuilt from the manifest and a note says the file has changed."""
    from corral.plan import Plan

    manifest = store.load_manifest(rec.run_id)
    path = Path(rec.workflow_path) if rec.workflow_path else None
    now_plan = None
    if path is not None and path.is_file():
        try:
            now_plan = api.plan(api.load_workflow(path))
        except CorralError:
            err.print(f"note: {path} has changed since run {rec.run_id} started (it no longer loads); resume runs "
                      "the run as recorded", markup=False)
        else:
            if now_plan.records(manifest):
                return now_plan
    plan = Plan.from_manifest(manifest)
    if now_plan is not None:
        before = {t.id for t in plan.tasks}
        changed = [n for n in now_plan.stage_order if {t.id for t in now_plan.stage_tasks(n)} - before]
        if changed:
            err.print(f"note: {path} has changed since run {rec.run_id} started (stages {', '.join(changed)}); "
                      f"resume runs the run as recorded. To run the edit: `corral run {path}` (tasks that "
                      "succeeded before and did not change are reused)", markup=False, soft_wrap=True)
    return plan


def _finished_unchanged(store: Any, rec: RunRecord) -> model.RunSummary | None:
    """The run's summary when `corral resume` has nothing to do and nothing to say: the run ended
    SUCCEEDED, every task it planned is recorded and done (SUCCEEDED, SKIPPED or REUSED), and the
    workflow file and the tables its items come from hold the bytes they held when it was recorded
    (:mod:`corral.inputs`). None otherwise: the full path then plans, notes a changed workflow and
    runs what is left."""
    from corral import inputs

    if rec.state != model.RunState.SUCCEEDED or inputs.KEY not in rec.options:
        return None
    summary = api.summary(store, rec.run_id)
    if not all(model.TaskState(state).ok for state, n in summary.counts.items() if n):
        return None
    return summary if inputs.unchanged(rec, summary.total) else None


def _note_unused_flags(be: Any, given: dict[str, bool]) -> None:
    """One note per flag given that this backend does not honour (e.g. --wait locally)."""
    for flag, used in given.items():
        if used and flag not in be.flags:
            name = "--" + flag.replace("_", "-")
            extra = " (it always waits)" if flag == "wait" and be.always_waits else ""
            err.print(f"note: {name} does not apply to the {be.name} backend{extra}", markup=False)


# -- commands -----------------------------------------------------------------------------------
@cli.command()
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(backends.NAMES), default=backends.DEFAULT, show_default=True)
@click.option("--max-parallel", type=click.IntRange(min=1), help="Local: at most N tasks at once (default: CPUs).")
@click.option("--runtime", type=click.Choice(["auto", "process", "container"]), default="auto", show_default=True,
              help="Local: run stages with an image in a container (auto: when an engine answers).")
@click.option("--force", is_flag=True, help="Run every task: even when its outputs exist or it succeeded before.")
@click.option("--force-stage", "force_stages", multiple=True, metavar="STAGE",
              help="Run STAGE and every stage that needs it, even where done before (repeatable).")
@click.option("--no-reuse", is_flag=True, help="Do not reuse tasks that succeeded in earlier runs of the workflow.")
@click.option("--wait/--no-wait", default=None, help="AWS, Slurm: wait for the run to end (default: return after submitting).")
@click.option("--json", "as_json", is_flag=True, help="Print the run's final state as JSON on stdout.")
def run(workflow: str, backend: str, max_parallel: int | None, runtime: str, force: bool,
        force_stages: tuple[str, ...], no_reuse: bool, wait: bool | None, as_json: bool) -> None:
    """Plan WORKFLOW and run it (local) or submit it (aws). Prints the run id."""
    wf = api.load_workflow(workflow)
    p = api.plan(wf)
    err.print(f"corral: {wf.name}: {len(p.items)} items × {len(wf.stages)} stages = {len(p.tasks)} tasks "
              f"on {backend}", markup=False)
    be = api.get_backend(backend, wf)
    given = {"force": force, "max_parallel": max_parallel is not None, "runtime": runtime != "auto",
             "wait": wait is not None}
    _note_unused_flags(be, given)
    live = LiveProgress(p.stage_order)
    waits = be.always_waits or bool(wait)
    opts = api.RunOptions(force=force, max_parallel=max_parallel, runtime=runtime,  # type: ignore[arg-type]
                      wait=waits, progress=live.update, force_stages=force_stages, reuse=not no_reuse)
    store = be.open_store(workflow=wf)
    with live:
        rec = api.run(wf, backend, store=store, options=opts, backend_impl=be, plan=p)
    tasks = store.get_tasks(rec.run_id) if as_json else None  # else the store's summary: no second copy
    summary = api.summary(store, rec.run_id, tasks)
    n_reused = summary.counts[model.TaskState.REUSED.value]
    if n_reused:
        err.print(f"corral: {n_reused} task(s) reused: they succeeded in earlier runs of {wf.name} "
                  "(`--force-stage STAGE` or `--force` runs them again)", markup=False)
    if tasks is not None:
        write_json(_run_json(rec, tasks))
    else:
        out.print(rec.run_id, markup=False)
    if not waits:
        err.print(f"submitted; follow it with `corral status {rec.run_id} --backend {backend} --watch`",
                  markup=False)
        if any(s.kind == "cleanup" for s in p.workflow.stages):
            err.print("note: Batch runs the workspace cleanup when everything succeeded; after a failure it is "
                      "submitted by the first `corral status` (or --watch) that sees the run end",
                      markup=False, soft_wrap=True)
        return
    sys.exit(_report_end(rec, summary))


@cli.command()
@click.argument("run_id")
@backend_option
@click.option("--max-parallel", type=click.IntRange(min=1))
@click.option("--runtime", type=click.Choice(["auto", "process", "container"]), default="auto")
@click.option("--force", is_flag=True, help="Run tasks even when their outputs exist.")
def resume(run_id: str, backend: str | None, max_parallel: int | None, runtime: str, force: bool) -> None:
    """Go on with RUN_ID: run only what has not succeeded (after a crash, failure or cancel)."""
    store = api.open_run_store(backend, run_id)
    rec = store.get_run(run_id)
    done = None if force else _finished_unchanged(store, rec)
    if done is not None:  # nothing to run, and the file plans to what the run recorded: no plan needed
        err.print(f"corral: nothing to resume: every task of {run_id} is done, and {rec.workflow_path} (with "
                  "the tables its items come from) has not changed since the run", markup=False)
        out.print(rec.run_id, markup=False)
        sys.exit(_report_end(rec, done))
    plan = _resume_plan(store, rec)  # planned once; api.resume reads the task rows once, under the lease
    live = LiveProgress(plan.stage_order)
    opts = api.RunOptions(force=force, max_parallel=max_parallel, runtime=runtime, progress=live.update)  # type: ignore[arg-type]
    counts = api.summary(store, run_id).counts
    todo = sum(n for state, n in counts.items() if not model.TaskState(state).ok)
    err.print(f"corral: resuming {run_id}: {todo} task(s) not done", markup=False)
    with live:
        rec = api.resume(run_id, store=store, options=opts, plan=plan)
    out.print(rec.run_id, markup=False)
    sys.exit(_report_end(rec, api.summary(store, run_id)))


@cli.command()
@click.argument("run_id", required=False)
@backend_option
@click.option("--all", "all_runs", is_flag=True, help="List recent runs instead.")
@click.option("--tasks", "show_tasks", is_flag=True, help="List every task.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("--watch", is_flag=True, help="Refresh until the run ends.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True, help="Seconds between refreshes with --watch.")
def status(run_id: str | None, backend: str | None, all_runs: bool, show_tasks: bool, as_json: bool,
           watch: bool, interval: float) -> None:
    """Where RUN_ID stands (default: the latest run): stages × states, durations, failures."""
    store = api.open_run_store(backend, run_id)
    if all_runs:
        runs = store.list_runs(limit=50)
        if as_json:
            write_json([{"run_id": r.run_id, "workflow": r.workflow_name, "backend": r.backend,
                         "state": r.state.value, "created_at": r.created_at} for r in runs])
            return
        from rich.table import Table

        table = Table(show_edge=False, pad_edge=False)
        for c in ("run", "workflow", "backend", "state", "started"):
            table.add_column(c)
        for r in runs:
            table.add_row(r.run_id, r.workflow_name, r.backend, r.state.value.lower(),
                          time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at)))
        err.print(table)
        return
    rec = api.resolve_run(store, run_id)
    be = api.get_backend(rec.backend, run=rec)
    if watch:
        from corral.cli_ops import watch_run

        watch_run(be, rec, store, console=getattr(err, "real", err), interval=interval,
                  show_cost=be.cost_basis == "actual")  # a local run has no AWS bill to show
        if not as_json:
            return
    # A backend whose store is the truth (local) syncs without reading every task: the summary is
    # aggregated by the store (a 100,000-item run answers in well under a second).
    sync = getattr(be, "sync", None)
    tasks: list[TaskRecord] | None = None
    if sync is not None and not as_json and not show_tasks and be.cost_basis != "actual":
        sync(rec, store)
    else:
        tasks = be.refresh(rec, store)
    rec = store.get_run(rec.run_id)
    if as_json:
        assert tasks is not None
        write_json(_run_json(rec, tasks))
        return
    summary = api.summary(store, rec.run_id, tasks)
    err.print(_stage_table(summary, title=f"run {rec.run_id} ({rec.workflow_name}, {rec.backend}): {rec.state.value.lower()}"))
    if be.cost_basis == "actual":
        from corral.cost import status_cost_line

        assert tasks is not None
        line = status_cost_line(store, rec.run_id, tasks)
        if line:
            err.print(line, markup=False)
    if show_tasks:
        assert tasks is not None
        _print_task_list(tasks)
    else:
        for line in _failures(summary):
            err.print(line, markup=False)


@cli.command()
@click.argument("run_id")
@click.argument("task")
@backend_option
@click.option("--attempt", type=click.IntRange(min=1), help="Which attempt (default: the last).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the task ends.")
def logs(run_id: str, task: str, backend: str | None, attempt: int | None, follow: bool) -> None:
    """Output of one TASK of RUN_ID (id, id prefix, or stage[item])."""
    store = api.open_run_store(backend, run_id)
    for line in api.logs(run_id, task, attempt=attempt, follow=follow, store=store):
        click.echo(line)


@cli.command()
@click.argument("run_id")
@backend_option
def cancel(run_id: str, backend: str | None) -> None:
    """Stop RUN_ID: kill (local) or cancel (aws) what runs; nothing more starts."""
    store = api.open_run_store(backend, run_id)
    before = store.get_run(run_id)
    rec = api.cancel(run_id, store=store)
    if before.state in runstate.ENDED:
        err.print(f"run {run_id} had already ended ({rec.state.value.lower()}): nothing to cancel", markup=False)
    else:
        tasks = store.get_tasks(run_id)
        n = sum(1 for t in tasks if t.state == model.TaskState.CANCELLED)
        err.print(f"cancelled {run_id}: {n} task(s) cancelled", markup=False)
    out.print(run_id, markup=False)


@cli.command()
@click.argument("workflow", type=click.Path(dir_okay=False))
def validate(workflow: str) -> None:
    """Check WORKFLOW (syntax, fields, items, placeholders, dependencies) without running anything."""
    from corral.plan import check_local_secrets

    wf = api.load_workflow(workflow)
    p = api.plan(wf)
    check_local_secrets(wf)
    err.print(f"ok: {workflow}: {len(wf.stages)} stages, {len(p.items)} items, {len(p.tasks)} tasks", markup=False)


@cli.command()
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--tasks", "show_tasks", is_flag=True, help="List every task with its command.")
@click.option("--json", "as_json", is_flag=True, help="The plan as JSON on stdout.")
@click.option("--cost", "with_cost", is_flag=True, help="Estimate what it would cost on AWS Batch (no network).")
@click.option("--spot/--on-demand", default=None, help="With --cost: price on spot or on-demand (default: aws.spot).")
@click.option("--duration", "durations", multiple=True, metavar="STAGE=30m",
              help="With --cost: how long one task of STAGE takes (default: earlier runs, else a stated default).")
def plan(workflow: str, show_tasks: bool, as_json: bool, with_cost: bool, spot: bool | None,
         durations: tuple[str, ...]) -> None:
    """Show what WORKFLOW would run: stages, items, tasks, dependencies. Nothing runs."""
    wf = api.load_workflow(workflow)
    p = api.plan(wf)
    estimate = None
    if with_cost:
        from corral.cost import estimate_plan, parse_durations

        estimate = estimate_plan(
            p, spot=spot, durations=parse_durations(durations, p.stage_order),
            store=api.open_store(),
        )
    if as_json:
        data = {
            "workflow": wf.name, "items": len(p.items),
            "stages": [
                {"name": s.name, "per": s.per, "needs": s.needs, "kind": s.kind, "image": s.image,
                 "tasks": len(p.stage_tasks(s.name)), "vcpus": s.resources.vcpus,
                 "memory_mib": s.resources.memory, "gpus": s.resources.gpus, "disk_gib": s.resources.disk,
                 "retry_memory": s.resources.model_dump(mode="json")["retry_memory"],
                 "retries": s.retries, "timeout_s": s.timeout}
                for s in (p.workflow.stage(n) for n in p.stage_order)
            ],
            "tasks": (  # streamed by write_json
                {"task_id": t.id, "stage": t.stage.name, "item": t.key, "needs": list(t.needs),
                 "command": t.command("<run>", "<workdir>")}
                for t in p.tasks
            ),
        }
        if estimate is not None:
            import dataclasses

            data["cost"] = dataclasses.asdict(estimate)
        write_json(data)
        return
    from rich.table import Table

    table = Table(title=f"{wf.name}: {len(p.items)} items, {len(p.tasks)} tasks", title_justify="left",
                  show_edge=False, pad_edge=False)
    table.add_column("stage", no_wrap=True, min_width=max(len(n) for n in p.stage_order))  # names stay whole
    for c in ("per", "needs", "tasks", "vcpus", "memory", "gpus", "retries", "timeout", "image"):
        table.add_column(c)
    for name in p.stage_order:
        s = p.workflow.stage(name)
        table.add_row(name, s.per, ", ".join(s.needs) or "-", str(len(p.stage_tasks(name))),
                      f"{s.resources.vcpus:g}", _memory_cell(s.resources), str(s.resources.gpus),
                      str(s.retries), format_duration(s.timeout), s.image or "-")
    err.print(table)
    if estimate is not None:
        from corral.cli_ops import estimate_table

        err.print(estimate_table(estimate))
        for a in estimate.assumptions:
            err.print(f"  {a}", markup=False)
    if show_tasks:
        for t in p.tasks:
            cmd = t.command("<run>", "<workdir>")
            shown = cmd[2] if cmd[:2] == ["/bin/sh", "-c"] else " ".join(cmd)
            needs = f"  needs {', '.join(n[:8] for n in t.needs)}" if t.needs else ""
            out.print(f"{t.id}  {t.label}{needs}\n    {shown}", markup=False)


def _load_extensions() -> None:
    for name in EXTENSIONS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        mod.register(cli)


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        _load_extensions()
        cli.main(args=argv, prog_name="corral", standalone_mode=False)
    except CorralError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: {exc.one_line()}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted: what had started is recorded as cancelled; `corral status` shows it and "
              "`corral resume RUN` goes on", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except BrokenPipeError:
        sys.exit(0)


def _memory_cell(r: Any) -> str:
    """``2GiB``, and how retries after an out-of-memory kill grow it (``2GiB (x2 on OOM)``)."""
    grow = r.retry_memory
    if grow is None:
        return format_size_mib(r.memory)
    if isinstance(grow, float):
        return f"{format_size_mib(r.memory)} (x{grow:g} on OOM)"
    return f"{format_size_mib(r.memory)} (then {', '.join(format_size_mib(m) for m in grow)} on OOM)"
