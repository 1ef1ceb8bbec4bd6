"""``corral report RUN -o report.html``: one self-contained HTML file about a run.

Summary, per-stage table, a timeline (Gantt, pure SVG: one bar per attempt, coloured by its
state), failures with their reasons and the tail of their logs, and the run's cost. Nothing is
fetched when the file is opened: no script, no external style, font or image, and a
Content-Security-Policy that forbids them anyway. Everything that comes from a run (item keys,
reasons, log lines, stage names) is HTML-escaped: log text is untrusted.
"""

from __future__ import annotations

import collections
import contextlib
import html
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.cost import RunCost, actual_cost, attempts_of, reads_attempts, usd
from corral.errors import CorralError
from corral.model import AttemptRecord, RunRecord, TaskRecord, TaskState, now, summarize
from corral.units import format_duration

if TYPE_CHECKING:  # pragma: no cover
    from corral.backends.base import Backend
    from corral.plan import Plan
    from corral.state.base import StateStore

LOG_LINES = 40  # lines of each failed task's log shown
LOG_LINE_CHARS = 400
MAX_FAILURES = 50  # failed tasks shown with logs (the table lists the rest without)
TASK_ROWS_UP_TO = 150  # up to this many tasks the timeline has one labelled row per task; beyond, packed lanes

COLOURS = {
    "SUCCEEDED": "#2e9e44",
    "SKIPPED": "#9ccc9c",
    "REUSED": "#b5d9b5",
    "FAILED": "#d62728",
    "RUNNING": "#1f77b4",
    "SUBMITTED": "#17becf",
    "PENDING": "#bbbbbb",
    "CANCELLED": "#9467bd",
    "UPSTREAM_FAILED": "#e6a817",
}

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666}.cards{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:110px}
.card b{display:block;font-size:18px}.card span{color:#666;font-size:12px}
table{border-collapse:collapse;font-size:13px}th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.legend span{display:inline-block;margin-right:14px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
.timeline{overflow-x:auto;border:1px solid #eee}svg text{font:11px system-ui,sans-serif;fill:#444}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:8px;overflow-x:auto;font-size:12px;max-height:420px;white-space:pre-wrap;word-break:break-all}
.fail{margin-bottom:18px}.fail h3{font-size:14px;margin:0 0 4px}.reason{color:#b00}.note{color:#666;font-size:12px}
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclass
class ReportData:
    """Everything the page shows; built from the store (and the backend, for logs)."""

    run: RunRecord
    tasks: list[TaskRecord]
    attempts: dict[str, list[AttemptRecord]]
    cost: RunCost | None
    logs: dict[str, list[str]] = field(default_factory=dict)  # task id → last lines of its output
    log_errors: dict[str, str] = field(default_factory=dict)  # task id → why its logs could not be read
    generated_at: float = field(default_factory=now)

    @property
    def hypothetical_cost(self) -> bool:
        """The run's backend prices it as what the same attempts would cost on AWS Batch."""
        from corral.backends import backend_class

        try:
            return backend_class(self.run.backend).cost_basis == "hypothetical"
        except CorralError:
            return True


def bars(data: ReportData) -> list[tuple[TaskRecord, AttemptRecord]]:
    """The timeline's bars: every attempt that started, in the order the page draws them."""
    out = []
    for t in data.tasks:
        for a in data.attempts.get(t.task_id, []):
            if a.started_at is not None:
                out.append((t, a))
    out.sort(key=lambda ta: (ta[1].started_at or 0.0, ta[0].task_id, ta[1].attempt))
    return out


# -- sections ---------------------------------------------------------------------------------
def _summary(data: ReportData) -> str:
    run, tasks = data.run, data.tasks
    counts = collections.Counter(t.state.value for t in tasks)
    starts = [a.started_at for ats in data.attempts.values() for a in ats if a.started_at is not None]
    ends = [a.ended_at or data.generated_at for ats in data.attempts.values() for a in ats if a.started_at is not None]
    wall = (max(ends) - min(starts)) if starts else None
    n_attempts = sum(1 for ats in data.attempts.values() for a in ats if a.started_at is not None)
    cards = [
        ("state", run.state.value.lower()), ("tasks", str(len(tasks))), ("attempts", str(n_attempts)),
        ("succeeded", str(counts.get("SUCCEEDED", 0) + counts.get("SKIPPED", 0))),
        ("reused", str(counts.get("REUSED", 0))),
        ("failed", str(counts.get("FAILED", 0))), ("upstream failed", str(counts.get("UPSTREAM_FAILED", 0))),
        ("wall time", format_duration(wall)),
    ]
    if data.cost is not None:
        cards.append(("cost" + (" (est.)" if data.cost.estimated_attempts else ""), usd(data.cost.total_usd)))
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(run.created_at))
    head = (f"<h1>run {esc(run.run_id)}</h1><div class=sub>workflow <b>{esc(run.workflow_name)}</b> · "
            f"backend {esc(run.backend)} · started {esc(created)} · report made "
            f"{esc(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(data.generated_at)))}</div>")
    body = "".join(f"<div class=card data-card=\"{esc(k)}\"><b>{esc(v)}</b><span>{esc(k)}</span></div>"
                   for k, v in cards)
    return f"{head}<div class=cards>{body}</div>"


def _stage_table(data: ReportData) -> str:
    per = summarize(data.tasks)
    states = [s.value for s in TaskState if any(t.state == s for t in data.tasks)]
    head = "".join(f"<th class=n>{esc(s.lower().replace('_', ' '))}</th>" for s in states)
    cost_head = "<th class=n>cost</th>" if data.cost is not None else ""
    rows = []
    for stage, counts in per.items():
        durs = sorted(t.ended_at - t.started_at for t in data.tasks
                      if t.stage == stage and t.started_at is not None and t.ended_at is not None)
        med = format_duration(statistics.median(durs)) if durs else "-"
        mx = format_duration(durs[-1]) if durs else "-"
        cells = "".join(f"<td class=n>{counts.get(s, 0) or ''}</td>" for s in states)
        cost = f"<td class=n>{esc(usd(data.cost.per_stage.get(stage, 0.0)))}</td>" if data.cost is not None else ""
        rows.append(f"<tr><td>{esc(stage)}</td>{cells}<td class=n>{sum(counts.values())}</td>"
                    f"<td class=n>{esc(med)}</td><td class=n>{esc(mx)}</td>{cost}</tr>")
    return (f"<h2>Stages</h2><table id=stages><tr><th>stage</th>{head}<th class=n>total</th>"
            f"<th class=n>median time</th><th class=n>max time</th>{cost_head}</tr>{''.join(rows)}</table>")


def _ticks(span: float) -> float:
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if span / step <= 10:
            return float(step)
    return 86400.0 * max(1, round(span / 86400 / 10))


def task_rows(drawn: Sequence[tuple[TaskRecord, AttemptRecord]]) -> dict[tuple[str, int], int]:
    """One row per task, in order of first start: (task id, 0) → row."""
    out: dict[tuple[str, int], int] = {}
    for t, _ in drawn:
        out.setdefault((t.task_id, 0), len(out))
    return out


def lanes(drawn: Sequence[tuple[TaskRecord, AttemptRecord]], until: float) -> dict[tuple[str, int], int]:
    """(task id, attempt) → lane: each attempt goes to the lowest lane free when it starts, so the
    chart is as tall as the run was wide (its most concurrent moment), not as tall as it was long."""
    import heapq

    free: list[int] = []  # lanes free now (a heap)
    busy: list[tuple[float, int]] = []  # (end, lane) of attempts in flight
    out: dict[tuple[str, int], int] = {}
    n = 0
    for t, a in sorted(drawn, key=lambda ta: (ta[1].started_at or 0.0, ta[0].task_id, ta[1].attempt)):
        start = a.started_at or 0.0
        while busy and busy[0][0] <= start:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            lane = heapq.heappop(free)
        else:
            lane, n = n, n + 1
        out[(t.task_id, a.attempt)] = lane
        heapq.heappush(busy, (a.ended_at or until, lane))
    return out


def _says_more(attempt: Any) -> bool:
    """Whether an attempt's reason adds to its exit code (not "exit code 3 — exit code 3")."""
    return bool(attempt.reason) and attempt.reason != f"exit code {attempt.exit_code}"


def _timeline(data: ReportData) -> str:
    drawn = bars(data)
    if not drawn:
        return "<h2>Timeline</h2><p class=note>No attempt has started yet.</p>"
    t0 = min(a.started_at for _, a in drawn if a.started_at is not None)
    t1 = max((a.ended_at or data.generated_at) for _, a in drawn)
    span = max(t1 - t0, 1.0)
    n_tasks = len({t.task_id for t, _ in drawn})
    per_task = n_tasks <= TASK_ROWS_UP_TO
    row_of = task_rows(drawn) if per_task else lanes(drawn, data.generated_at)
    n_rows = max(row_of.values()) + 1
    label_w = 220 if per_task else 60
    width, top = 900, 22
    # A labelled row per task keeps the 16 px its 11 px label needs (labels never overlap); packed
    # lanes carry no labels and shrink as they grow.
    row_h = 16 if per_task or n_rows <= 60 else (8 if n_rows <= 150 else (4 if n_rows <= 400 else 2))
    height = top + row_h * n_rows + 6
    scale = width / span
    parts: list[str] = []
    step = _ticks(span)
    k = 0.0
    while k <= span + 1e-9:
        x = label_w + k * scale
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height}" stroke="#eee"/>'
                     f'<text x="{x + 2:.1f}" y="12">+{esc(format_duration(k) if k else "0s")}</text>')
        k += step
    if per_task:
        labels: dict[int, str] = {}
        for t, _ in drawn:
            labels.setdefault(row_of[(t.task_id, 0)], t.label)
        for i, text in labels.items():
            y = top + i * row_h + row_h - 4
            text = text if len(text) <= 34 else text[:33] + "…"
            parts.append(f'<text x="4" y="{y}">{esc(text)}</text>')
    elif not per_task:
        parts.append(f'<text x="4" y="{top + 10}">{n_rows} lanes</text>')
    for t, a in drawn:
        assert a.started_at is not None
        end = a.ended_at or data.generated_at
        x = label_w + (a.started_at - t0) * scale
        w = max((end - a.started_at) * scale, 1.5)
        w = w - 0.8 if w > 2.5 else w  # a hairline between attempts that follow each other
        y = top + row_of[(t.task_id, 0) if per_task else (t.task_id, a.attempt)] * row_h + 1
        h = max(row_h - 2, 2)
        state = a.state.value
        tip = (f"{t.label} attempt {a.attempt}: {state.lower()}, {format_duration(end - a.started_at)}"
               + (f", exit {a.exit_code}" if a.exit_code is not None else "")
               + (f" — {a.reason}" if _says_more(a) else ""))
        parts.append(
            f'<rect class="bar" data-state="{esc(state)}" data-task="{esc(t.task_id)}" data-attempt="{a.attempt}" '
            f'x="{x:.2f}" y="{y}" width="{w:.2f}" height="{h}" fill="{COLOURS.get(state, "#888")}">'
            f"<title>{esc(tip)}</title></rect>"
        )
    legend = "".join(
        f'<span><i style="background:{c}"></i>{esc(s.lower().replace("_", " "))}</span>'
        for s, c in COLOURS.items() if any(a.state.value == s for _, a in drawn)
    )
    note = ("" if per_task else f"<p class=note>{n_tasks} tasks: attempts are packed into lanes (a lane holds "
            "attempts that do not overlap in time); hover a bar for its task.</p>")
    svg = (f'<svg id=timeline xmlns="http://www.w3.org/2000/svg" width="{label_w + width + 10}" height="{height}" '
           f'role="img" aria-label="timeline of {len(drawn)} attempts">{"".join(parts)}</svg>')
    return f"<h2>Timeline</h2><div class=legend>{legend}</div><div class=timeline>{svg}</div>{note}"


def _failures(data: ReportData) -> str:
    bad = [t for t in data.tasks if t.state in (TaskState.FAILED, TaskState.UPSTREAM_FAILED)]
    if not bad:
        return "<h2>Failures</h2><p class=note>None.</p>"
    failed = [t for t in bad if t.state == TaskState.FAILED]
    upstream = [t for t in bad if t.state == TaskState.UPSTREAM_FAILED]
    out = [f"<h2>Failures</h2><p>{len(failed)} task(s) failed; {len(upstream)} did not run because a task "
           "they need failed.</p>"]
    for t in failed[:MAX_FAILURES]:
        ats = data.attempts.get(t.task_id, [])
        tries = "".join(
            f"<li>attempt {a.attempt}: {esc(a.state.value.lower())}"
            + (f", exit code {esc(a.exit_code)}" if a.exit_code is not None else "")
            + (f" — <span class=reason>{esc(a.reason)}</span>" if _says_more(a) else "") + "</li>"
            for a in ats
        )
        if t.task_id in data.logs:
            lines = [ln if len(ln) <= LOG_LINE_CHARS else ln[:LOG_LINE_CHARS] + " …" for ln in data.logs[t.task_id]]
            log = f"<pre>{esc(chr(10).join(lines))}</pre>" if lines else "<p class=note>(no output)</p>"
        elif t.task_id in data.log_errors:
            log = f"<p class=note>logs unavailable: {esc(data.log_errors[t.task_id])}</p>"
        else:
            log = ""
        out.append(
            f'<div class=fail data-task="{esc(t.task_id)}"><h3>{esc(t.label)} <span class=note>{esc(t.task_id)}'
            f"</span></h3><div class=reason>{esc(t.reason or 'failed')}</div><ul>{tries}</ul>{log}</div>"
        )
    if len(failed) > MAX_FAILURES:
        out.append(f"<p class=note>… and {len(failed) - MAX_FAILURES} more failed task(s): "
                   f"<code>corral status {esc(data.run.run_id)} --tasks</code> lists them.</p>")
    if upstream:
        shown = ", ".join(esc(t.label) for t in upstream[:30])
        more = f" … and {len(upstream) - 30} more" if len(upstream) > 30 else ""
        out.append(f"<p class=note>not run (upstream failed): {shown}{more}</p>")
    return "".join(out)


def _cost(data: ReportData) -> str:
    c = data.cost
    if c is None:
        return ""
    pricing = "spot (indicative)" if c.spot else "on-demand"
    rows = "".join(f"<tr><td>{esc(s)}</td><td class=n>{esc(usd(v))}</td></tr>" for s, v in c.per_stage.items())
    items = sorted(((k, v) for k, v in c.per_item.items()), key=lambda kv: -kv[1])[:20]
    item_rows = "".join(f"<tr><td>{esc(k)}</td><td class=n>{esc(usd(v))}</td></tr>" for k, v in items)
    notes = []
    if c.estimated_attempts:
        notes.append(f"{c.estimated_attempts} attempt(s) had no instance type recorded and are priced on the "
                     "instance type the estimate chooses (marked estimated)")
    if c.unpriced_attempts:
        notes.append(f"{c.unpriced_attempts} attempt(s) ran on instance types without a price in the table")
    if c.running_attempts:
        notes.append(f"{c.running_attempts} attempt(s) still running, counted up to the report's time")
    if data.hypothetical_cost:
        notes.append(f"a {data.run.backend} run: the figures are what the same attempts would cost on AWS Batch")
    mean = c.per_item_mean
    return (
        f"<h2>Cost</h2><p id=cost-total>Total <b>{esc(usd(c.total_usd))}</b>"
        + (f" · {esc(usd(mean))} per item on average" if mean is not None else "")
        + f" · {esc(pricing)} prices for {esc(c.region)} of {esc(c.prices_date)}</p>"
        + "".join(f"<p class=note>{esc(n)}</p>" for n in notes)
        + f"<table><tr><th>stage</th><th class=n>cost</th></tr>{rows}</table>"
        + (f"<h3>Most expensive items</h3><table><tr><th>item</th><th class=n>cost</th></tr>{item_rows}</table>"
           if item_rows else "")
    )


def render(data: ReportData) -> str:
    """The whole page as one string (pure: no I/O)."""
    title = f"corral run {data.run.run_id}"
    csp = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<meta name=viewport content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body>"
        + _summary(data) + _stage_table(data) + _timeline(data) + _failures(data) + _cost(data)
        + "</body></html>\n"
    )


# -- gathering --------------------------------------------------------------------------------
def _ms(v: Any) -> float | None:
    return None if v in (None, 0) else float(v) / 1000.0


def ecs_instance_types(ecs: Any, container_instance_arns: Iterable[str],
                       clusters: Sequence[str] = ()) -> dict[str, str]:
    """Container instance ARN → EC2 instance type (the ``ecs.instance-type`` attribute), in calls of
    100 per cluster. ARNs of the new format name their cluster; others are tried against
    ``clusters`` (the compute environments' ``ecsClusterArn``). Anything unreadable is left out."""
    by_cluster: dict[str, list[str]] = {}
    for arn in dict.fromkeys(a for a in container_instance_arns if a.startswith("arn:") and ":container-instance/" in a):
        parts = arn.split(":container-instance/", 1)[1].split("/")
        for cluster in ([parts[0]] if len(parts) == 2 else list(clusters)):
            by_cluster.setdefault(cluster, []).append(arn)
    out: dict[str, str] = {}
    for cluster, arns in by_cluster.items():
        todo = [a for a in arns if a not in out]
        for i in range(0, len(todo), 100):
            try:
                resp = ecs.describe_container_instances(cluster=cluster, containerInstances=todo[i:i + 100])
            except Exception:  # noqa: BLE001 - an instance type is a nicety: the cost falls back to the estimate
                continue
            for ci in resp.get("containerInstances", []):
                for attr in ci.get("attributes", []):
                    if attr.get("name") == "ecs.instance-type" and attr.get("value"):
                        out[ci["containerInstanceArn"]] = attr["value"]
    return out


def batch_attempts(
    run_id: str,
    tasks: Sequence[TaskRecord],
    describe_jobs: Callable[[list[str]], Mapping[str, dict[str, Any]]],
    ecs: Any = None,
    clusters: Sequence[str] = (),
) -> dict[str, list[AttemptRecord]]:
    """Every attempt of every started task of an AWS run, from DescribeJobs (chunks of 100 in
    ``describe_jobs``) — Batch keeps each attempt's start, stop, exit code, reason and log stream —
    with the instance type of each attempt from ECS where it can be read."""
    started = [t for t in tasks if t.external_id and t.started_at is not None]
    jobs = describe_jobs([t.external_id for t in started]) if started else {}
    arns = [(a.get("container") or {}).get("containerInstanceArn", "")
            for j in jobs.values() for a in j.get("attempts") or []]
    arns += [(j.get("container") or {}).get("containerInstanceArn", "") for j in jobs.values()]
    types = ecs_instance_types(ecs, [a for a in arns if a], clusters) if ecs is not None else {}
    out: dict[str, list[AttemptRecord]] = {}
    for t in started:
        job = jobs.get(t.external_id)
        if job is None:
            continue
        recs: list[AttemptRecord] = []
        tries = job.get("attempts") or []
        for i, a in enumerate(tries):
            c = a.get("container") or {}
            last = i == len(tries) - 1
            state = t.state if (last and t.state.terminal and job.get("status") in ("SUCCEEDED", "FAILED")) \
                else TaskState.FAILED
            reason = a.get("statusReason", "") or ""
            if c.get("reason"):
                reason = f"{reason}: {c['reason']}" if reason else c["reason"]
            recs.append(AttemptRecord(
                run_id=run_id, task_id=t.task_id, attempt=i + 1, state=state, exit_code=c.get("exitCode"),
                reason=reason, started_at=_ms(a.get("startedAt")), ended_at=_ms(a.get("stoppedAt")),
                stdout=c.get("logStreamName", "") or "", external_id=t.external_id,
                instance_type=types.get(c.get("containerInstanceArn", ""), ""),
            ))
        if job.get("status") in ("RUNNING", "STARTING") and job.get("startedAt"):
            c = job.get("container") or {}
            recs.append(AttemptRecord(
                run_id=run_id, task_id=t.task_id, attempt=len(recs) + 1, state=TaskState.RUNNING,
                started_at=_ms(job.get("startedAt")), stdout=c.get("logStreamName", "") or "",
                external_id=t.external_id, instance_type=types.get(c.get("containerInstanceArn", ""), ""),
            ))
        if recs:
            out[t.task_id] = recs
    return out


def tail_logs(lines: Iterable[str], n: int = LOG_LINES) -> list[str]:
    return list(collections.deque(lines, maxlen=n))


def collect(
    store: StateStore,
    run_id: str,
    *,
    backend: Backend | None = None,
    plan: Plan | None = None,
    log_lines: int = LOG_LINES,
    max_failures: int = MAX_FAILURES,
    refresh: bool = True,
) -> ReportData:
    """Read the run from the store (refreshed through ``backend`` when given), its attempts, the
    tail of each failed task's log, and its cost."""
    from corral.plan import Plan as PlanCls

    run = store.get_run(run_id)
    tasks = backend.refresh(run, store) if (backend is not None and refresh) else store.get_tasks(run_id)
    run = store.get_run(run_id)
    attempts = attempts_of(store, run_id, tasks, per_task_reads=reads_attempts(run))
    if backend is not None and not backend.records_attempts:
        # (Batch forgets jobs ~7 days after they end: then the task records' times remain.)
        with contextlib.suppress(CorralError):
            attempts.update(backend.attempt_history(run, tasks))
    cost: RunCost | None = None
    try:
        plan = plan or PlanCls.from_manifest(store.load_manifest(run_id))
        spot = bool(run.options.get("aws", {}).get("spot", plan.workflow.aws.spot))
        cost = actual_cost(plan, tasks, attempts, run_id=run_id, spot=spot)
    except (CorralError, ValueError, KeyError, TypeError):
        cost = None  # a manifest that no longer loads: the report goes on without cost
    data = ReportData(run=run, tasks=tasks, attempts=attempts, cost=cost)
    if backend is not None:
        for t in [t for t in tasks if t.state == TaskState.FAILED][:max_failures]:
            try:
                data.logs[t.task_id] = tail_logs(backend.logs(run, store, t, None, False), log_lines)
            except CorralError as exc:
                data.log_errors[t.task_id] = exc.one_line()
    return data


def write_report(
    store: StateStore,
    run_id: str,
    path: str | Path,
    *,
    backend: Backend | None = None,
    collect_fn: Callable[..., ReportData] = collect,
) -> ReportData:
    """Write the report of ``run_id`` to ``path``; returns what it shows."""
    data = collect_fn(store, run_id, backend=backend)
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(data), encoding="utf-8")
    except OSError as exc:
        from corral.errors import UsageError

        raise UsageError(f"cannot write the report to {target}: {exc.strerror}",
                         "give -o a path in a folder you can write") from None
    return data


def counts_by_state(data: ReportData) -> Mapping[str, int]:
    return collections.Counter(a.state.value for _, a in bars(data))


__all__ = ["COLOURS", "ReportData", "bars", "collect", "render", "write_report"]
