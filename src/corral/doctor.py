"""``corral doctor [RUN]``: checks that explain what is wrong, each finding with a fix.

Locally: container engine, free disk under ``CORRAL_HOME``, rclone, the state database's
integrity, runs whose scheduler died (with the resume command). For a run: failed tasks killed
for memory (exit 137, ``OutOfMemoryError``, corral's memory limit), image pulls that failed,
timeouts and spot reclaims, grouped per stage.

On AWS (``--backend aws``): credentials and region; each compute environment's state, status
(with ``statusReason`` when INVALID) and ``maxvCpus`` against the largest task; whether each
stage fits an instance type its environment may launch; queues DISABLED, INVALID or without
environments; jobs RUNNABLE longer than a threshold with the likely reason; the network (each
subnet has a way out, egress allowed: ``network.check_network``, as ``corral aws setup``); EFS
file systems without a mount target in a zone the environments use, or whose mount targets do
not admit NFS from the environments' security groups.

Checks only read (describe/list/get calls); nothing is changed.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from corral.errors import CorralError
from corral.model import RunRecord, RunState, TaskRecord, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from corral.backends.aws_batch.client import AwsClients
    from corral.plan import Plan
    from corral.spec import AwsSettings, Resources, Stage
    from corral.state.base import StateStore

Level = Literal["ok", "info", "warn", "error"]
LEVELS: tuple[Level, ...] = ("ok", "info", "warn", "error")

MIN_FREE_GIB = 5.0
LOW_FREE_GIB = 1.0
RUNNABLE_AFTER_S = 30 * 60  # a job RUNNABLE longer than this is reported as stuck


@dataclass
class Finding:
    check: str  # short id: engine, disk, rclone, state-db, interrupted, oom, image-pull, ce, queue, fit, runnable, efs…
    level: Level
    message: str
    fix: str = ""
    subject: str = ""  # what it is about: a run id, stage, queue or compute environment name

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def worst(findings: Iterable[Finding]) -> Level:
    return max((f.level for f in findings), key=LEVELS.index, default="ok")


# -- local ------------------------------------------------------------------------------------
def _existing_parent(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_engine(detect: Callable[[], tuple[Any, str]] | None = None) -> Finding:
    if detect is None:
        from corral.backends.runtime import detect_engine

        detect = detect_engine
    engine, why = detect()
    if engine is not None:
        return Finding("engine", "ok", f"container engine {engine.name} answers ({engine.path})")
    return Finding(
        "engine", "info",
        f"no container engine answers ({why}): locally, stages with an image run as host processes",
        "install and start Docker or Podman to run stages in their images (`--runtime container`); "
        "otherwise the commands must exist on this machine",
    )


def check_disk(home: Path, *, disk_usage: Callable[[str], Any] = shutil.disk_usage,
               min_free_gib: float = MIN_FREE_GIB) -> Finding:
    where = _existing_parent(home)
    usage = disk_usage(str(where))
    free_gib = usage.free / 2**30
    pct = 100.0 * usage.free / usage.total if usage.total else 0.0
    msg = f"{free_gib:.1f} GiB free ({pct:.0f}%) on the disk of {home}"
    if free_gib < LOW_FREE_GIB:
        return Finding("disk", "error", msg, "free space there, or point CORRAL_HOME (--home) at a larger disk: "
                       "run workspaces and logs live under it", str(home))
    if free_gib < min_free_gib:
        return Finding("disk", "warn", msg, "free space or move CORRAL_HOME (--home) to a larger disk; "
                       "`corral` keeps each run's workspace and logs under runs/", str(home))
    return Finding("disk", "ok", msg, subject=str(home))


def check_rclone(which: Callable[[str], str | None] = shutil.which) -> Finding:
    explicit = os.environ.get("CORRAL_RCLONE")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return Finding("rclone", "ok", f"rclone from CORRAL_RCLONE ({explicit})")
        return Finding("rclone", "error", f"CORRAL_RCLONE={explicit} is not an executable file",
                       "point CORRAL_RCLONE at the rclone binary, or unset it to use the one on PATH")
    found = which("rclone")
    if found:
        return Finding("rclone", "ok", f"rclone found ({found})")
    return Finding("rclone", "warn", "rclone is not installed: transfer stages and rclone remotes cannot run here",
                   "install it (`sudo apt install rclone`, `brew install rclone`, or https://rclone.org/install/); "
                   "s3:// and local paths need it too for transfer stages")


def check_state_db(home: Path) -> Finding:
    path = home / "state.db"
    if not path.exists():
        return Finding("state-db", "ok", f"no state database yet ({path}); the first run creates it")
    try:
        from corral.state.sqlite import SqliteStore

        store = SqliteStore(path)
        try:
            ok = store.integrity_ok()
        finally:
            store.close()
    except (CorralError, Exception) as exc:  # a file that is not a database at all lands here
        return Finding("state-db", "error", f"the state database {path} cannot be opened: {exc}",
                       f"move it aside (`mv {path} {path}.broken`); corral starts a new one "
                       "(the runs recorded in it are no longer listed)", str(path))
    if not ok:
        return Finding("state-db", "error", f"the state database {path} fails SQLite's integrity check",
                       f"recover it: `sqlite3 {path} .recover | sqlite3 {path}.new` then move "
                       f"{path}.new over it (keep a copy of the old file)", str(path))
    return Finding("state-db", "ok", f"state database {path} passes the integrity check")


def check_interrupted(store: StateStore, *, limit: int = 50) -> list[Finding]:
    """Local runs whose scheduler is gone while they still read RUNNING (or already INTERRUPTED)."""
    from corral.backends.processes import scheduler_alive

    out = []
    host = socket.gethostname()
    from corral.backends import backend_class
    from corral.errors import UsageError

    for run in store.list_runs(limit=limit):
        try:
            if not backend_class(run.backend).driven_from_host:
                continue  # nothing on this machine drives it: it cannot be interrupted here
        except UsageError:
            continue
        if run.state == RunState.INTERRUPTED or (
            run.state == RunState.RUNNING and run.host == host and not scheduler_alive(run)
        ):
            out.append(Finding(
                "interrupted", "warn",
                f"run {run.run_id} ({run.workflow_name}) stopped without finishing: its scheduler is gone",
                f"`corral resume {run.run_id}` goes on with what did not succeed "
                f"(or `corral cancel {run.run_id}` to close it)",
                run.run_id,
            ))
        elif run.state == RunState.RUNNING and run.host != host:
            out.append(Finding("interrupted", "info",
                               f"run {run.run_id} reads RUNNING on host {run.host}; it can only be checked there",
                               f"run `corral doctor` on {run.host}", run.run_id))
    return out


def check_prices(today: float | None = None, *, stale_days: int = 180) -> Finding:
    """The instance price table cost estimates use: readable, and how old."""
    import datetime

    from corral.instances import load_instance_types, table_info

    where = os.environ.get("CORRAL_PRICES") or "corral's bundled table"
    try:
        info = table_info()
        n = len(load_instance_types())
    except CorralError as exc:
        return Finding("prices", "error", exc.one_line(), exc.hint or "")
    date = str(info.get("date", ""))
    msg = f"price table: {where}, {n} instance types, {info.get('region', '?')} prices of {date or '?'}"
    try:
        age = (datetime.date.fromtimestamp(today if today is not None else time.time())
               - datetime.date.fromisoformat(date)).days
    except ValueError:
        return Finding("prices", "warn", msg + " (no readable date)", "give the table a `date: YYYY-MM-DD`")
    if age > stale_days:
        return Finding("prices", "info", f"{msg}: {age} days old, prices may have moved",
                       "set CORRAL_PRICES to a newer JSON table of the same shape (region, date, instances)")
    return Finding("prices", "ok", msg)


def local_checks(home: Path, *, store: StateStore | None = None,
                 detect: Callable[[], tuple[Any, str]] | None = None,
                 which: Callable[[str], str | None] = shutil.which,
                 disk_usage: Callable[[str], Any] = shutil.disk_usage) -> list[Finding]:
    findings = [check_engine(detect), check_disk(home, disk_usage=disk_usage), check_rclone(which), check_prices()]
    db = check_state_db(home)
    findings.append(db)
    if db.level != "error" and (home / "state.db").exists():
        own = store is None
        if store is None:
            from corral.state.sqlite import SqliteStore

            store = SqliteStore(home / "state.db")
        try:
            findings += check_interrupted(store)
        finally:
            if own:
                store.close()
    return findings


# -- failed tasks -----------------------------------------------------------------------------
_OOM = ("outofmemoryerror", "out of memory", "oomkilled", "memory limit exceeded", "container killed due to memory")
_PULL = ("cannotpullcontainer", "pull access denied", "manifest unknown", "manifest for", "imagepull",
         "cannotpullimagemanifest", "repository does not exist", "no basic auth credentials")
_TIMEOUT = ("timed out", "job attempt duration exceeded timeout", "timeout")
_SPOT = ("host ec2", "spot")


def classify_failure(t: TaskRecord) -> str | None:
    """``oom``, ``image-pull``, ``timeout``, ``spot`` or None, from a failed task's reason and exit code."""
    low = (t.reason or "").lower()
    if any(k in low for k in _PULL):
        return "image-pull"
    if t.exit_code == 137 or any(k in low for k in _OOM):
        return "oom"
    if any(k in low for k in _TIMEOUT):
        return "timeout"
    if any(k in low for k in _SPOT):
        return "spot"
    return None


def failure_checks(plan: Plan | None, tasks: Sequence[TaskRecord], run_id: str) -> list[Finding]:
    """Failed tasks grouped by stage and cause, each group with what to change."""
    groups: dict[tuple[str, str], list[TaskRecord]] = {}
    for t in tasks:
        if t.state != TaskState.FAILED:
            continue
        kind = classify_failure(t)
        if kind:
            groups.setdefault((t.stage, kind), []).append(t)
    out = []
    for (stage, kind), members in groups.items():
        res = None
        image = None
        timeout = None
        if plan is not None:
            try:
                s = plan.workflow.stage(stage)
                res, image, timeout = s.resources, s.image, s.timeout
            except KeyError:
                pass
        sample = members[0]
        labels = ", ".join(m.label for m in members[:3]) + (f" and {len(members) - 3} more" if len(members) > 3 else "")
        if kind == "oom":
            have = f"{res.memory} MiB" if res is not None else "its memory"
            out.append(Finding(
                "oom", "error",
                f"{len(members)} task(s) of stage {stage!r} were killed for memory ({labels}): "
                f"{sample.reason or f'exit code {sample.exit_code}'}",
                f"raise resources.memory of stage {stage!r} (now {have}; try "
                f"{(res.memory * 2) if res is not None else 'twice as much'} MiB), or let retries ask for more "
                f"(resources.retry_memory: 2x), then `corral resume {run_id}`",
                stage,
            ))
        elif kind == "image-pull":
            out.append(Finding(
                "image-pull", "error",
                f"{len(members)} task(s) of stage {stage!r} could not pull image {image or '?'}: {sample.reason}",
                "check the image name and tag (`docker pull` it); for ECR images push them with "
                "`corral aws image push` and let corral grant the execution role access; private registries "
                "need repositoryCredentials",
                stage,
            ))
        elif kind == "timeout":
            out.append(Finding(
                "timeout", "warn",
                f"{len(members)} task(s) of stage {stage!r} hit the timeout"
                + (f" ({timeout:g}s)" if timeout else "") + f": {labels}",
                f"raise `timeout:` of stage {stage!r}, then `corral resume {run_id}`",
                stage,
            ))
        else:
            out.append(Finding(
                "spot", "warn",
                f"{len(members)} task(s) of stage {stage!r} lost their spot instance: {sample.reason}",
                "raise `retries:` (spot reclaims are retried), allow more instance types, or set aws.spot: false",
                stage,
            ))
    return out


def run_checks(store: StateStore, run: RunRecord, plan: Plan | None) -> list[Finding]:
    tasks = store.get_tasks(run.run_id)
    out = failure_checks(plan, tasks, run.run_id)
    if run.state == RunState.INTERRUPTED:
        out.append(Finding("interrupted", "warn", f"run {run.run_id} was interrupted (its scheduler stopped)",
                           f"`corral resume {run.run_id}`", run.run_id))
    failed = [t for t in tasks if t.state == TaskState.FAILED]
    explained = {t.task_id for t in failed if classify_failure(t)}
    other = [t for t in failed if t.task_id not in explained]
    if other:
        out.append(Finding(
            "failed", "warn",
            f"{len(other)} task(s) failed for other reasons, e.g. {other[0].label}: {other[0].reason or 'failed'}",
            f"`corral logs {run.run_id} {other[0].task_id[:12]}` shows its output; "
            f"`corral report {run.run_id} -o report.html` gathers all failures",
            run.run_id,
        ))
    if not out:
        out.append(Finding("run", "ok", f"run {run.run_id}: {run.state.value.lower()}, nothing to report",
                           subject=run.run_id))
    return out


# -- AWS --------------------------------------------------------------------------------------
def _task_size(job: dict[str, Any]) -> tuple[float, int, int]:
    """(vcpus, memory MiB, gpus) a described Batch job asks for."""
    c = job.get("container") or {}
    vcpus, mem, gpus = float(c.get("vcpus") or 0), int(c.get("memory") or 0), 0
    for r in c.get("resourceRequirements") or []:
        kind, value = r.get("type"), r.get("value", "0")
        if kind == "VCPU":
            vcpus = float(value)
        elif kind == "MEMORY":
            mem = int(float(value))
        elif kind == "GPU":
            gpus = int(value)
    return vcpus, mem, gpus


def _types_hold(entries: Sequence[str], vcpus: float, mem: int, gpus: int) -> tuple[bool, bool]:
    """(some allowed type holds it, the table knows any of the entries): the routes' fit rule."""
    from corral.routes import holds

    return holds(entries, vcpus, mem, gpus)


def runnable_reason(job: dict[str, Any], ces: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """The likeliest reason a job stays RUNNABLE, and its fix, from the environments behind its queue."""
    vcpus, mem, gpus = _task_size(job)
    ask = f"{vcpus:g} vCPUs, {mem} MiB" + (f", {gpus} GPUs" if gpus else "")
    if not ces:
        return ("its queue has no compute environment", "attach one: `corral aws setup workflow.yaml` makes them")
    usable = [c for c in ces if c.get("state") == "ENABLED" and c.get("status") == "VALID"]
    for c in ces:
        if c.get("status") == "INVALID":
            return (f"compute environment {c.get('computeEnvironmentName')} is INVALID: {c.get('statusReason', '')}",
                    "fix what the reason names (often the service role, instance role or subnets), then "
                    "`corral aws setup` again")
    if not usable:
        return ("every compute environment behind its queue is DISABLED",
                "enable one: `aws batch update-compute-environment --compute-environment NAME --state ENABLED`")
    fits = []
    for c in usable:
        cr = c.get("computeResources") or {}
        held, known = _types_hold(cr.get("instanceTypes") or ["optimal"], vcpus, mem, gpus)
        if (held or not known) and vcpus <= float(cr.get("maxvCpus") or 0):
            fits.append(c)
    if not fits:
        c = usable[0]
        cr = c.get("computeResources") or {}
        if vcpus > float(cr.get("maxvCpus") or 0):
            return (f"it asks for {ask}, more than maxvCpus {cr.get('maxvCpus')} of {c.get('computeEnvironmentName')}",
                    f"raise aws.max_vcpus to at least {vcpus:g} and run `corral aws setup` again")
        return (f"no instance type its compute environments may launch ({', '.join(cr.get('instanceTypes') or [])}) "
                f"holds {ask}",
                "allow larger instance types in aws.instance_types (then `corral aws setup`), or lower the "
                "stage's resources")
    full = [c for c in fits if int((c.get("computeResources") or {}).get("desiredvCpus") or 0)
            + vcpus > int((c.get("computeResources") or {}).get("maxvCpus") or 0)]
    if len(full) == len(fits):
        c = fits[0]
        cr = c.get("computeResources") or {}
        return (f"the vCPU limit is reached: {cr.get('desiredvCpus')} of maxvCpus {cr.get('maxvCpus')} in use "
                f"in {c.get('computeEnvironmentName')}; it waits for others to finish",
                "wait, or raise aws.max_vcpus (and the account's EC2 vCPU quota) and run `corral aws setup`")
    if all((c.get("computeResources") or {}).get("type") in ("SPOT", "FARGATE_SPOT") for c in fits):
        return ("spot capacity: the environments that can hold it are SPOT-only and EC2 has not given instances",
                "allow more instance types, or add on-demand capacity (aws.spot: false keeps an on-demand "
                "environment behind the queue)")
    return ("EC2 has not launched an instance: likely the account's vCPU quota for these instance families, "
            "or no capacity for them in the subnets' zones",
            "check Service Quotas (EC2 'Running On-Demand Standard instances' / 'G and VT instances'), "
            "allow more instance types or subnets in more zones")


def _ce_index(batch: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for page in batch.get_paginator("describe_compute_environments").paginate():
        for c in page.get("computeEnvironments", []):
            out[c["computeEnvironmentArn"]] = c
            out[c["computeEnvironmentName"]] = c
    return out


def _queues(batch: Any) -> list[dict[str, Any]]:
    out = []
    for page in batch.get_paginator("describe_job_queues").paginate():
        out += page.get("jobQueues", [])
    return out


def _managed(tags: Any) -> bool:
    from corral.backends.aws_batch.common import is_managed

    return is_managed(tags)


def aws_checks(
    clients: AwsClients,
    settings: AwsSettings,
    *,
    plan: Plan | None = None,
    run: RunRecord | None = None,
    tasks: Sequence[TaskRecord] | None = None,
    runnable_after_s: float = RUNNABLE_AFTER_S,
    clock: Callable[[], float] = time.time,
) -> list[Finding]:
    """Read-only checks of the AWS side (see the module docstring)."""
    from corral.backends.aws_batch.client import aws_errors
    from corral.backends.aws_batch.environment import queue_names
    from corral.backends.aws_batch.provision import Needs, needs_for
    from corral.errors import CredentialsError

    out: list[Finding] = []
    try:
        account = clients.account_id()
    except CredentialsError as exc:
        return [Finding("aws-credentials", "error", exc.one_line(), exc.hint or "", clients.region)]
    except CorralError as exc:
        return [Finding("aws-credentials", "error", exc.one_line(), exc.hint or "", clients.region)]
    out.append(Finding("aws-credentials", "ok", f"credentials for account {account}, region {clients.region}",
                       subject=clients.region))
    batch = clients.batch
    with aws_errors("describe AWS Batch queues and compute environments"):
        ces = _ce_index(batch)
        queues = _queues(batch)
    from corral.backends.aws_batch.run_facts import RunFacts

    facts = RunFacts.of(run) if run is not None else RunFacts()
    # the queues `corral aws setup` makes for this configuration (provisioning names them)
    needs = needs_for(plan) if plan is not None else Needs()
    names = queue_names(settings, needs)
    wanted = {names["cpu"]}
    gpu_needed = plan is not None and any(s.resources.gpus > 0 for s in plan.workflow.stages)
    if gpu_needed:
        wanted.add(names["gpu"])
    if needs.fargate:
        wanted.add(names["fargate"])
    wanted.update(facts.queue_names())
    by_name = {q["jobQueueName"]: q for q in queues if q.get("status") != "DELETED"}
    considered = [q for n, q in by_name.items() if n in wanted or _managed(q.get("tags"))]

    # -- queues
    for name in sorted(wanted - set(by_name)):
        out.append(Finding("queue", "warn" if plan is None else "error", f"job queue {name} does not exist",
                           "`corral aws setup workflow.yaml` makes it (so does `corral run --backend aws`)", name))
    queue_ces: dict[str, list[dict[str, Any]]] = {}
    for q in considered:
        name = q["jobQueueName"]
        order = sorted(q.get("computeEnvironmentOrder") or [], key=lambda o: o.get("order", 0))
        queue_ces[name] = [ces[o["computeEnvironment"]] for o in order if o.get("computeEnvironment") in ces]
        if q.get("state") == "DISABLED":
            out.append(Finding("queue", "error", f"job queue {name} is DISABLED: jobs submitted to it never start",
                               f"`aws batch update-job-queue --job-queue {name} --state ENABLED`", name))
        elif q.get("status") == "INVALID":
            out.append(Finding("queue", "error", f"job queue {name} is INVALID: {q.get('statusReason', '')}",
                               "fix what the reason names, or run `corral aws setup` again", name))
        elif not order:
            out.append(Finding("queue", "error", f"job queue {name} has no compute environment",
                               "run `corral aws setup` again, or attach one with "
                               f"`aws batch update-job-queue --job-queue {name} --compute-environment-order ...`",
                               name))
        else:
            out.append(Finding("queue", "ok", f"job queue {name} is enabled with {len(order)} compute environment(s)",
                               subject=name))

    # -- compute environments
    seen: set[str] = set()
    stages = list(plan.workflow.stages) if plan is not None else []
    # stages the backend sends to Fargate are not judged against the EC2 environments' types
    from corral.routes import route

    ec2_stages = [s for s in stages if not route(s.resources, list(settings.instance_types)).fargate]
    fargate_queues = {names.get("fargate"), str(facts.fargate_job_queue or "").rsplit("/", 1)[-1]}
    for qname, envs in queue_ces.items():
        for c in envs:
            cname = c["computeEnvironmentName"]
            if cname in seen:
                continue
            seen.add(cname)
            gpu_q = qname == names["gpu"] or (facts.gpu_job_queue or "").endswith("/" + qname)
            fargate_q = qname in fargate_queues
            out += compute_environment_findings(c, [] if fargate_q else ec2_stages, gpu=gpu_q)

    # -- stages with no environment at all: judge them against the workflow's allowed types
    if stages and not queue_ces:
        for s in stages:
            out += _fit(s.name, s.resources, "aws.instance_types",
                        route(s.resources, list(settings.instance_types)).entries)

    # -- stuck jobs
    out += _runnable(clients, queue_ces, run, tasks, runnable_after_s, clock)

    # -- failed tasks (reasons recorded by refresh)
    if run is not None and tasks is not None:
        out += failure_checks(plan, tasks, run.run_id)

    # -- network (routes out, egress) and EFS mount targets
    envs_used = [c for envs in queue_ces.values() for c in envs]
    out += _network(clients, envs_used, efs=bool(settings.efs or needs.efs))
    out += _efs(clients, settings, envs_used)
    return out


def compute_environment_findings(c: dict[str, Any], stages: Sequence[Stage], *, gpu: bool) -> list[Finding]:
    """A described compute environment judged on its own and against the stages routed to it
    (GPU stages to the GPU queue's environments, the others to the default queue's)."""
    out: list[Finding] = []
    cname = c["computeEnvironmentName"]
    cr = c.get("computeResources") or {}
    if c.get("status") == "INVALID":
        out.append(Finding("ce", "error",
                           f"compute environment {cname} is INVALID: {c.get('statusReason') or '(no reason given)'}",
                           "fix what the reason names (service role, instance profile, subnets, launch "
                           "template), then `corral aws setup` again", cname))
    if c.get("state") == "DISABLED":
        out.append(Finding("ce", "error", f"compute environment {cname} is DISABLED: it launches no instance",
                           f"`aws batch update-compute-environment --compute-environment {cname} --state ENABLED`",
                           cname))
    maxv = int(cr.get("maxvCpus") or 0)
    relevant = [s for s in stages if (s.resources.gpus > 0) == gpu]
    need = max((s.resources.vcpus for s in relevant), default=0.0)
    if need and maxv and need > maxv:
        s_name = next(s.name for s in relevant if s.resources.vcpus == need)
        out.append(Finding(
            "ce", "error",
            f"compute environment {cname} has maxvCpus {maxv}, less than the {need:g} vCPUs stage "
            f"{s_name!r} asks for: its jobs stay RUNNABLE",
            f"raise aws.max_vcpus to at least {need:g} and run `corral aws setup`, or "
            f"`aws batch update-compute-environment --compute-environment {cname} "
            f"--compute-resources maxvCpus={max(math.ceil(need), 1)}`",
            cname))
    elif not out:
        out.append(Finding("ce", "ok", f"compute environment {cname}: enabled, valid, maxvCpus {maxv}, "
                           f"{cr.get('type', '?')} {', '.join(cr.get('instanceTypes') or [])}", subject=cname))
    if str(cr.get("type", "")).startswith("FARGATE"):
        return out  # no instance types to judge (corral makes EC2/SPOT environments)
    for s in relevant:
        out += _fit(s.name, s.resources, cname, cr.get("instanceTypes") or ["optimal"])
    return out


def _fit(stage: str, r: Resources, where: str, entries: Sequence[str]) -> list[Finding]:
    held, known = _types_hold(entries, r.vcpus, r.memory, r.gpus)
    ask = f"{r.vcpus:g} vCPUs, {r.memory} MiB" + (f", {r.gpus} GPUs" if r.gpus else "")
    if held:
        return []
    if not known:
        return [Finding("fit", "info", f"stage {stage!r} ({ask}): instance types {', '.join(entries)} of {where} "
                        "are not in corral's table; AWS will judge", "", stage)]
    from corral.instances import expand

    top = max(expand(list(entries)), key=lambda t: (t.vcpus, t.memory_mib))
    return [Finding(
        "fit", "error",
        f"stage {stage!r} asks for {ask}; no instance type {where} may launch holds it "
        f"({', '.join(entries)}; the largest: {top.describe()}): its jobs would stay RUNNABLE",
        "lower the stage's resources, or allow larger instance types in aws.instance_types and run "
        "`corral aws setup` again",
        stage,
    )]


def _runnable(clients: AwsClients, queue_ces: dict[str, list[dict[str, Any]]], run: RunRecord | None,
              tasks: Sequence[TaskRecord] | None, after_s: float, clock: Callable[[], float]) -> list[Finding]:
    from corral.backends.aws_batch.client import aws_errors

    batch = clients.batch
    t_now = clock()
    stuck: list[tuple[dict[str, Any], str, int]] = []  # (job, queue name, how many RUNNABLE)
    with aws_errors("list RUNNABLE jobs"):
        if run is not None and tasks is not None:
            from corral.backends.aws_batch.submit import is_job_id, parent_of

            parents = list(dict.fromkeys(parent_of(t.external_id) for t in tasks
                                         if not t.state.terminal and is_job_id(t.external_id)))
            for i in range(0, len(parents), 100):
                for job in batch.describe_jobs(jobs=parents[i:i + 100]).get("jobs", []):
                    summary = (job.get("arrayProperties") or {}).get("statusSummary") or {}
                    n = int(summary.get("RUNNABLE", 0)) or (1 if job.get("status") == "RUNNABLE" else 0)
                    if n:
                        stuck.append((job, str(job.get("jobQueue", "")).rsplit("/", 1)[-1], n))
        else:
            # ListJobs on a queue lists array parents, not children: a parent whose children wait
            # reads PENDING (or RUNNING) with RUNNABLE counts in its statusSummary.
            for qname in queue_ces:
                ids: list[str] = []
                for status in ("RUNNABLE", "PENDING", "RUNNING"):
                    for page in batch.get_paginator("list_jobs").paginate(jobQueue=qname, jobStatus=status):
                        ids += [s["jobId"] for s in page.get("jobSummaryList", [])
                                if (t_now - (s.get("createdAt") or 0) / 1000.0) > after_s
                                and (status == "RUNNABLE" or "arrayProperties" in s)]
                ids = list(dict.fromkeys(ids))
                for i in range(0, len(ids), 100):
                    for job in batch.describe_jobs(jobs=ids[i:i + 100]).get("jobs", []):
                        summary = (job.get("arrayProperties") or {}).get("statusSummary") or {}
                        n = int(summary.get("RUNNABLE", 0)) or (1 if job.get("status") == "RUNNABLE" else 0)
                        if n:
                            stuck.append((job, qname, n))
    out = []
    for job, qname, n in stuck:
        since = (job.get("createdAt") or 0) / 1000.0
        waited = t_now - since if since else 0.0
        if waited <= after_s:
            continue
        held = [e.get("consumableResource", "") for e in
                (job.get("consumableResourceProperties") or {}).get("consumableResourceList") or []]
        if held:  # a stage's max_parallel: its tasks wait RUNNABLE for their turn, by design
            out.append(Finding(
                "runnable", "info",
                f"job {job.get('jobName', '')} ({job.get('jobId')}) in queue {qname}: {n} task(s) RUNNABLE, "
                f"waiting for their turn under the stage's max_parallel (consumable resource {', '.join(held)})",
                "nothing to fix: raise the stage's max_parallel for more at once", job.get("jobId", ""),
            ))
            continue
        why, fix = runnable_reason(job, queue_ces.get(qname, []))
        out.append(Finding(
            "runnable", "error",
            f"job {job.get('jobName', '')} ({job.get('jobId')}) in queue {qname}: {n} task(s) still RUNNABLE, "
            f"submitted {waited / 60:.0f} min ago: {why}",
            fix, job.get("jobId", ""),
        ))
    return out


def _network(clients: AwsClients, envs: Sequence[dict[str, Any]], *, efs: bool) -> list[Finding]:
    """The network preflight of ``corral aws setup`` (``network.check_network``) over the subnets
    and security groups the compute environments launch into; each problem is an error."""
    from corral.backends.aws_batch.network import check_network

    seen: set[tuple[tuple[str, ...], tuple[str, ...], bool]] = set()
    out: list[Finding] = []
    for c in envs:
        cr = c.get("computeResources") or {}
        fargate = str(cr.get("type", "")).startswith("FARGATE")
        key = (tuple(cr.get("subnets") or []), tuple(cr.get("securityGroupIds") or []), fargate)
        if not key[0] or key in seen:
            continue
        seen.add(key)
        # Fargate jobs get their own public IP (corral's default assignPublicIp), EC2 instances the subnet's
        problems = check_network(clients.ec2, clients.region, key[0], key[1], efs=efs, public_ip_from_job=fargate)
        for p in problems:
            out.append(Finding("network", "error", p.message, p.fix, p.subject))
    if seen and not out:
        out.append(Finding("network", "ok", "every subnet the compute environments use has a way out (internet or "
                           "NAT gateway, or VPC endpoints) and their security groups allow egress"))
    return out


def _efs(clients: AwsClients, settings: AwsSettings, envs: Sequence[dict[str, Any]]) -> list[Finding]:
    """Each corral EFS file system: a mount target in every availability zone the compute
    environments launch into (EFS allows one per zone: two subnets of a zone share it), behind a
    security group that admits NFS (TCP 2049) from the environments' groups."""
    from corral.backends.aws_batch.client import aws_errors
    from corral.backends.aws_batch.network import EFS_GROUP, nfs_sources

    subnets = sorted({s for c in envs for s in (c.get("computeResources") or {}).get("subnets") or []})
    groups = sorted({g for c in envs for g in (c.get("computeResources") or {}).get("securityGroupIds") or []})
    out: list[Finding] = []
    if not subnets:
        return out
    efs = clients.efs
    with aws_errors("describe EFS file systems"):
        systems = [f for page in efs.get_paginator("describe_file_systems").paginate()
                   for f in page.get("FileSystems", []) if _managed(f.get("Tags"))]
        zone_of = {s["SubnetId"]: s["AvailabilityZone"]
                   for s in clients.ec2.describe_subnets(SubnetIds=subnets)["Subnets"]} if systems else {}
        for fs in systems:
            fs_id = fs["FileSystemId"]
            targets = efs.describe_mount_targets(FileSystemId=fs_id).get("MountTargets", [])
            covered = {t.get("AvailabilityZoneName") for t in targets}
            missing: dict[str, str] = {}  # zone → the first subnet of it the environments use
            for sid in subnets:
                zone = zone_of.get(sid, sid)
                if zone not in covered and zone not in missing:
                    missing[zone] = sid
            if missing:
                out.append(Finding(
                    "efs", "error",
                    f"EFS {fs_id} has no mount target in zone(s) {', '.join(sorted(missing))} that the compute "
                    "environments launch into: tasks there cannot mount the workspace",
                    "`corral aws setup workflow.yaml` makes them, or per zone `aws efs create-mount-target "
                    f"--file-system-id {fs_id} --subnet-id {next(iter(missing.values()))} --security-groups "
                    f"<{EFS_GROUP}'s id>` (one per zone: {', '.join(missing[z] for z in sorted(missing))})",
                    fs_id,
                ))
                continue
            shut_out: list[str] = []
            for t in targets:
                sgs = efs.describe_mount_target_security_groups(MountTargetId=t["MountTargetId"])["SecurityGroups"]
                admitted: set[str] = set()
                for g in clients.ec2.describe_security_groups(GroupIds=sgs)["SecurityGroups"] if sgs else []:
                    admitted |= nfs_sources(g)
                if groups and not any(g in admitted for g in groups):
                    shut_out.append(f"{t['MountTargetId']} ({t.get('AvailabilityZoneName', t['SubnetId'])})")
            if shut_out:
                out.append(Finding(
                    "efs", "error",
                    f"EFS {fs_id}: mount target(s) {', '.join(shut_out)} admit no NFS (TCP 2049) from the compute "
                    f"environments' security group(s) {', '.join(groups)}: mounts would hang",
                    f"run `corral aws setup` again (it puts the mount targets behind the `{EFS_GROUP}` group, "
                    f"which allows 2049 from {', '.join(groups)})",
                    fs_id,
                ))
            else:
                out.append(Finding("efs", "ok", f"EFS {fs_id} has a mount target in every zone used, open to NFS "
                                   "from the compute environments", subject=fs_id))
    if settings.efs and not systems:
        out.append(Finding("efs", "warn", "aws.efs is on but no corral EFS file system exists yet",
                           "`corral aws setup workflow.yaml` makes it", ""))
    return out
