"""Operating commands: ``corral doctor``, ``corral report``, ``corral cost``.

Loaded by ``corral.cli`` (its ``EXTENSIONS``); ``register(cli)`` adds the commands.
Ids, paths and ``--json`` go to stdout; everything for people goes to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from corral import backends
from corral.errors import CorralError, UsageError
from corral.jsonout import write_json
from corral.lazy import LazyModule, lazy_console

if TYPE_CHECKING:  # mypy sees the module, so calls through the proxy stay type-checked
    from rich.console import Console
    from rich.table import Table

    from corral import api
else:
    api = LazyModule("corral.api")  # imported when a command runs, not for `corral --help`

err = lazy_console(stderr=True, highlight=False)
out = lazy_console(highlight=False, soft_wrap=True)

LEVEL_STYLE = {"ok": "green", "info": "cyan", "warn": "yellow", "error": "red"}


def _backend_option(f: Any) -> Any:
    return click.option("--backend", type=click.Choice(backends.NAMES), default=None,
                        help="Where the run lives: local (default), aws (DynamoDB state table) or slurm.")(f)


def print_findings(findings: list[Any]) -> None:
    """One line per finding on stderr (``level  check  message``), its fix indented below."""
    for f in findings:
        tag = click.style(f"{f.level:<5}", fg=LEVEL_STYLE.get(f.level), bold=f.level == "error")
        click.echo(f"{tag} {f.check:<13} {f.message}", err=True)
        if f.fix and f.level != "ok":
            click.echo(f"{'':<19} fix: {f.fix}", err=True)


def estimate_table(est: Any) -> Table:
    from rich.table import Table

    from corral.cost import usd
    from corral.units import format_duration

    pricing = "spot" if est.spot else "on-demand"
    table = Table(title=f"{est.workflow}: estimated AWS Batch cost ({pricing}, {est.region} prices of "
                        f"{est.prices_date})", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("stage")
    table.add_column("tasks", justify="right")
    table.add_column("instance (tasks on it)")
    table.add_column("time per task")
    table.add_column("per task", justify="right")
    table.add_column("stage total", justify="right")
    for s in est.stages:
        inst = f"{s.instance_type} ({s.tasks_per_instance})" if s.instance_type else "[red]none fits[/]"
        src = s.duration_source.split(" ", 1)[0]
        table.add_row(s.stage, str(s.tasks), inst, f"{format_duration(s.duration_s)} ({src})", usd(s.usd_per_task),
                      usd(s.usd))
    per_item = f", {usd(est.per_item_usd)} per item" if est.per_item_usd is not None else ""
    parts = [f"instances {usd(est.compute_usd)}", f"root volumes {usd(est.root_volumes_usd)}"]
    if est.efs_usd:
        parts.append(f"EFS {usd(est.efs_usd)}")
    table.caption = f"total {usd(est.total_usd)}{per_item} ({', '.join(parts)})"
    table.caption_justify = "left"
    return table


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_id", required=False)
    @_backend_option
    @click.option("-w", "--workflow", type=click.Path(dir_okay=False),
                  help="AWS: also check that this workflow's stages fit the environments.")
    @click.option("--region", help="AWS region (default: the run's, the workflow's, or AWS_REGION).")
    @click.option("--profile", help="AWS profile.")
    @click.option("--runnable-after", default="30m", show_default=True,
                  help="AWS: report jobs RUNNABLE for longer than this.")
    @click.option("--json", "as_json", is_flag=True, help="Findings as JSON on stdout.")
    def doctor(run_id: str | None, backend: str | None, workflow: str | None, region: str | None,
               profile: str | None, runnable_after: str, as_json: bool) -> None:
        """Check this machine (and AWS with --backend aws) and explain what is wrong, each with a fix.

        With RUN_ID, also why its tasks failed or wait (memory, image pulls, timeouts, stuck jobs)."""
        from corral import doctor as dr
        from corral.units import parse_duration

        try:
            after_s = parse_duration(runnable_after)
        except ValueError as exc:
            raise UsageError(f"--runnable-after {runnable_after!r}: {exc}", "write e.g. 30m or 2h") from None
        findings = dr.local_checks(api.corral_home())
        store = run = plan = tasks = None
        if run_id:
            store = api.open_run_store(backend, run_id)
            run = store.get_run(run_id)
            try:
                plan = api.load_plan(store, run_id)
            except CorralError:
                plan = None
        if workflow:
            wf = api.load_workflow(workflow)
            plan = api.plan(wf)
        from corral.backends import DEFAULT

        name = run.backend if run is not None else (backend or DEFAULT)
        try:
            be = api.get_backend(name, plan.workflow if plan is not None else None, run, region=region,
                                 profile=profile)
        except CorralError as exc:
            findings.append(dr.Finding(f"{name}-credentials", "error", exc.one_line(), exc.hint or ""))
            be = None
        if be is not None:
            if run is not None:
                assert store is not None
                tasks = be.refresh(run, store)  # bring reasons and states up to date (as `status` does)
                run = store.get_run(run.run_id)
            try:
                findings += be.diagnose(run, store, plan, tasks, runnable_after_s=after_s)
            except CorralError as exc:
                findings.append(dr.Finding(f"{name}-credentials", "error", exc.one_line(), exc.hint or ""))
        if as_json:
            write_json({"worst": dr.worst(findings), "findings": [f.to_dict() for f in findings]})
        else:
            print_findings(findings)
        sys.exit(1 if dr.worst(findings) == "error" else 0)

    @cli.command()
    @click.argument("run_id")
    @click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None,
                  help="Where to write the HTML file (default: report-<run>.html).")
    @_backend_option
    @click.option("--no-logs", is_flag=True, help="Leave out failed tasks' log excerpts (no log reads).")
    def report(run_id: str, output: str | None, backend: str | None, no_logs: bool) -> None:
        """Write one self-contained HTML file about RUN_ID: summary, stages, timeline, failures, cost."""
        from corral.report import write_report

        store = api.open_run_store(backend, run_id)
        rec = store.get_run(run_id)
        be = None if no_logs else api.get_backend(rec.backend, run=rec)
        path = Path(output or f"report-{run_id}.html")
        data = write_report(store, run_id, path, backend=be)
        from corral.report import bars

        err.print(f"report of {run_id}: {len(data.tasks)} tasks, {len(bars(data))} attempts → {path}", markup=False)
        out.print(str(path), markup=False)

    @cli.command()
    @click.argument("workflow", type=click.Path(dir_okay=False))
    @click.option("--spot/--on-demand", default=None, help="Price on spot or on-demand (default: aws.spot).")
    @click.option("--duration", "durations", multiple=True, metavar="STAGE=TIME",
                  help="How long one task of STAGE takes, e.g. --duration sort=90m (repeatable).")
    @click.option("--default-duration", default="1h", show_default=True,
                  help="For stages with no --duration and no earlier run.")
    @click.option("--backend", type=click.Choice(backends.NAMES), default=backends.DEFAULT, show_default=True,
                  help="Which state store to read earlier runs' durations from.")
    @click.option("--json", "as_json", is_flag=True, help="The estimate as JSON on stdout.")
    def cost(workflow: str, spot: bool | None, durations: tuple[str, ...], default_duration: str, backend: str,
             as_json: bool) -> None:
        """Estimate what WORKFLOW costs on AWS Batch: per stage and in total, from resources, prices and durations."""
        from corral.cost import estimate_plan, parse_durations
        from corral.units import parse_duration

        wf = api.load_workflow(workflow)
        p = api.plan(wf)
        given = parse_durations(durations, p.stage_order)
        try:
            default_s = parse_duration(default_duration)
        except ValueError as exc:
            raise UsageError(f"--default-duration {default_duration!r}: {exc}", "write e.g. 30m or 2h") from None
        store = None
        try:
            from corral.backends import backend_class

            store = api.open_store(backend, wf) if backend_class(backend).store_exists() else None
        except CorralError as exc:
            err.print(f"note: earlier durations not read ({exc.one_line()})", markup=False)
        est = estimate_plan(p, spot=spot, durations=given, store=store, default_duration_s=default_s)
        if as_json:
            write_json(est.to_dict())
            return
        err.print(estimate_table(est))
        for a in est.assumptions:
            err.print(f"  note: {a}", markup=False)
        for s in est.stages:
            if s.note:
                err.print(f"  [yellow]warning[/]: stage {s.stage}: ", end="")
                err.print(s.note, markup=False)


# -- live status (for `corral status --watch`) ------------------------------------------------------
WAITING = ("PENDING", "SUBMITTED")


def stage_time(tasks: list[Any], stage: str) -> str:
    """The "median / max" duration of a stage's ended tasks, or "-" when none has ended."""
    import statistics

    from corral.units import format_duration

    durs = sorted(t.ended_at - t.started_at for t in tasks
                  if t.stage == stage and t.started_at is not None and t.ended_at is not None)
    return f"{format_duration(statistics.median(durs))} / {format_duration(durs[-1])}" if durs else "-"


def status_view(run: Any, tasks: list[Any], *, cost: Any = None, max_failures: int = 5) -> Any:
    """A rich renderable: one row per stage with a progress bar and counts, then the first failures
    with their reasons, then the cost so far (``cost``: a :class:`corral.cost.RunCost`)."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    from corral.cost import cost_line
    from corral.model import TaskState, finished_count, summarize

    title = Text(f"run {run.run_id} ({run.workflow_name}, {run.backend}): {run.state.value.lower()}",
                 no_wrap=True, overflow="ignore")
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("stage")
    table.add_column("progress", width=24)
    table.add_column("done", justify="right")
    table.add_column("running", justify="right", style="blue")
    table.add_column("waiting", justify="right", style="cyan")
    table.add_column("failed", justify="right", style="red")
    table.add_column("upstream", justify="right", style="yellow")
    table.add_column("time (median / max)", justify="right")
    for stage, per in summarize(tasks).items():
        total = sum(per.values())
        done = finished_count(per)  # cancelled tasks did not finish: the bar does not fill for them
        dur = stage_time(tasks, stage)
        bad = per.get("FAILED", 0) + per.get("CANCELLED", 0)
        bar = ProgressBar(total=max(total, 1), completed=done, width=24,
                          complete_style="red" if bad else "green", finished_style="red" if bad else "green")
        table.add_row(stage, bar, f"{done}/{total}", str(per.get("RUNNING", 0) or ""),
                      str(sum(per.get(s, 0) for s in WAITING) or ""), str(per.get("FAILED", 0) or ""),
                      str(per.get("UPSTREAM_FAILED", 0) or ""), dur)
    parts: list[Any] = [title, table]
    failed = [t for t in tasks if t.state == TaskState.FAILED]
    for t in failed[:max_failures]:
        parts.append(Text(f"  failed  {t.label}  {t.task_id[:12]}  {t.reason}", style="red"))
    if len(failed) > max_failures:
        parts.append(Text(f"  … and {len(failed) - max_failures} more failed", style="red"))
    if cost is not None:
        parts.append(Text("  " + cost_line(cost), style="dim"))
    return Group(*parts)


def watch_run(backend: Any, run: Any, store: Any, *, console: Console | None = None, interval: float = 2.0,
              max_interval: float | None = None, show_cost: bool = True, sleep: Any = None) -> tuple[Any, list[Any]]:
    """Refresh and redraw ``status_view`` until the run ends; returns the last (run, tasks).

    One ``backend.refresh`` per turn (on AWS: a DescribeJobs per 100 array parents, ListJobs only
    for arrays still moving). While nothing changes the wait between turns grows by half up to
    ``max_interval`` (default 10 × ``interval``, at most 60 s); any change brings it back to
    ``interval``. The cost is recomputed only when something changed.
    """
    import time

    from rich.live import Live

    from corral.cost import run_cost

    console = console or getattr(err, "real", err)
    pause = sleep or time.sleep
    ceiling = max_interval if max_interval is not None else min(60.0, 10 * interval)
    delay = interval
    last: list[tuple[str, str, int]] | None = None
    cost = None
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            tasks = backend.refresh(run, store)
            run = store.get_run(run.run_id)
            snapshot = [(t.task_id, t.state.value, t.attempts) for t in tasks]
            changed = snapshot != last
            if changed:
                delay = interval
                if show_cost:
                    try:
                        cost = run_cost(store, run.run_id, tasks=tasks)
                    except CorralError:
                        cost = None
            last = snapshot
            live.update(status_view(run, tasks, cost=cost), refresh=True)
            if run.state.value != "RUNNING" or all(t.state.terminal for t in tasks):
                return run, tasks
            if not changed:
                delay = min(ceiling, delay * 1.5)
            pause(delay)  # the refresh cadence, backing off while nothing moves
