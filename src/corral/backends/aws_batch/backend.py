"""``AwsBatchBackend``: the Backend protocol on AWS Batch (submit, refresh, cancel, logs, resume).

``start`` provisions what the plan needs (``provision.ensure_environment``), records where the run
lives in ``run.options["aws_batch"]`` (region, queues, log group, round layout) so any machine that
can read the state table can follow it, then submits array jobs (see ``submit``) and returns (or
waits, with bounded polling, when ``options.wait``).

``refresh`` costs, for a run of arrays: one DescribeJobs per 100 parents that still have a task in
flight (their ``statusSummary``), and ListJobs (pages of 1,000) only for a status whose count in
the summary differs from what the store already records for that array (see ``_children``):
polling with nothing new costs the DescribeJobs alone; only the tasks that changed are written
back (batched by the store).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.logs import LogReader, log_group_of, stream_of
from corral.backends.aws_batch.submit import (
    INTENT,
    OPTIONS_KEY,
    BatchApi,
    Queues,
    Submitter,
    TokenBucket,
    find_run_jobs,
    is_job_id,
    job_name,
    parent_of,
    reconcile,
)
from corral.backends.base import RunOptions
from corral.errors import BackendError, CorralError, CredentialsError, PlanError, UsageError
from corral.model import RunRecord, RunState, TaskRecord, TaskState, now
from corral.plan import CLEANUP_STAGE, Plan
from corral.spec import AwsSettings
from corral.state.base import StateStore

CANCEL_REASON = "cancelled by corral"
# The Batch status behind each recorded task state (what a child in that state shows in a summary).
_BATCH_STATUS = {
    TaskState.SUCCEEDED: "SUCCEEDED", TaskState.FAILED: "FAILED", TaskState.UPSTREAM_FAILED: "FAILED",
    TaskState.CANCELLED: "FAILED", TaskState.RUNNING: "RUNNING",
}
_WAITING_ORDER = ["STARTING", "RUNNABLE", "PENDING", "SUBMITTED"]
RESERVED_ENV_PREFIXES = ("AWS_BATCH_", "ECS_")
# A workspace cleanup resubmitted without dependencies after a failed run is named
# ``<the cleanup's job name>-f<claim time>``; a claim with no job after CLAIM_LEASE seconds is taken over.
FINAL_SUFFIX = re.compile(r"-f(\d+)$")
CLAIM_LEASE = 300.0


def task_state_of(status: str, reason: str) -> TaskState:
    if status == "SUCCEEDED":
        return TaskState.SUCCEEDED
    if status == "RUNNING":
        return TaskState.RUNNING
    if status == "FAILED":
        low = reason.lower()
        if low.startswith(CANCEL_REASON):
            return TaskState.CANCELLED
        if "dependent job" in low or "dependency" in low:
            return TaskState.UPSTREAM_FAILED
        return TaskState.FAILED
    return TaskState.SUBMITTED


def _seconds(ms: Any) -> float | None:
    return None if ms in (None, 0) else float(ms) / 1000.0


class _StderrProgress:
    """Bytes to send and sent while staging local sources (the transfer manager calls ``advance``
    from its threads); a line on stderr at most every 64 MiB."""

    STEP = 64 * 2**20

    def __init__(self) -> None:
        import threading

        self.total = 0
        self.done = 0
        self._next = self.STEP
        self._lock = threading.Lock()

    def add_total(self, nbytes: int) -> None:
        self.total += nbytes

    def advance(self, nbytes: int) -> None:
        import sys

        with self._lock:
            self.done += nbytes
            if self.done >= self._next:
                self._next = self.done + self.STEP
                print(f"corral: staging {self.done / 2**20:.0f} / {self.total / 2**20:.0f} MiB", file=sys.stderr)


class AwsBatchBackend:
    name = "aws"

    def __init__(
        self,
        clients: AwsClients,
        settings: AwsSettings | None = None,
        *,
        environment: Any = None,
        ensure_environment: Callable[..., Any] | None = None,
        bucket: TokenBucket | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        settle_polls: int = 2,
        after_submit: Callable[[str, str], None] | None = None,
        say: Callable[[str], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.clients = clients
        self.say = say or (lambda msg: print(msg, file=sys.stderr))  # one line for people, on stderr
        self.wall_clock = wall_clock  # claim times of the failure-path cleanup (shared across machines)
        self.settings = settings or AwsSettings()
        self._settings_given = settings is not None
        self._environment = environment
        self._ensure = ensure_environment
        self.sleep = sleep
        self.clock = clock
        self.settle_polls = settle_polls
        self.after_submit = after_submit
        self._bucket = bucket or TokenBucket(clock=clock, sleep=sleep)
        self._api: BatchApi | None = None
        self._secrets: dict[str, str] = {}
        # On resume only the tasks to resubmit need their local sources (checked when staging them).
        self._resuming = False

    @property
    def api(self) -> BatchApi:
        if self._api is None:
            self._api = BatchApi(self.clients.batch, self._bucket)
        return self._api

    # -- environment --------------------------------------------------------------------------
    def environment(self, plan: Plan, run_id: str | None = None) -> Any:
        if self._environment is None:
            from corral.backends.aws_batch import provision

            needs = provision.needs_for(plan)
            needs.run_id = run_id
            if self._reads_local_paths(plan):
                needs.bucket = True  # local sources are staged in the run's bucket
            if run_id:
                from corral.storage.aws import workflow_remotes

                ref = self._rclone_secret_ref(run_id)  # only the run's execution role reads it
                if workflow_remotes(plan.workflow) and ref not in needs.run_secrets:
                    needs.run_secrets.append(ref)
            if self._ensure is not None:
                self._environment = self._ensure(self.clients, self.settings, needs)
            else:
                report = provision.ProvisionReport()
                self._environment = provision.ensure_environment(self.clients, self.settings, needs, report)
                self._say_provisioned(report)
        return self._environment

    def _say_provisioned(self, report: Any) -> None:
        """What the run made or changed in the account (nothing when all was there), on stderr."""
        made = [("created", x) for x in report.created] + [("updated", x) for x in report.updated]
        if not made:
            return
        self.say(f"corral: provisioned what the workflow needs in {self.clients.region} "
                 f"({len(report.created)} created, {len(report.updated)} updated):")
        for verb, what in made:
            self.say(f"  {verb:8} {what}")

    @staticmethod
    def _reads_local_paths(plan: Plan) -> bool:
        """Whether some transfer stage's ``from:`` is a path on this machine (staged to S3)."""
        from corral.errors import StorageError
        from corral.storage.uri import WORKSPACE, parse

        for s in plan.workflow.stages:
            if s.kind == "transfer" and s.source and not s.source.startswith(WORKSPACE):
                try:
                    if parse(s.source, base_dir=plan.workflow.base_dir).kind == "local":
                        return True
                except StorageError:
                    continue
        return False


    def _aws(self, plan: Plan) -> AwsSettings:
        """The AWS settings that route this plan: the backend's own when it was given some (the
        CLI gives the workflow's), else the workflow's ``aws:`` section."""
        return self.settings if self._settings_given else plan.workflow.aws

    def _context(self, env: Any, plan: Plan | None = None) -> pl.JobContext:
        ctx = pl.JobContext.from_environment(env, partition=self.clients.partition())
        if plan is not None:
            ctx = dataclasses.replace(ctx, assign_public_ip=self._aws(plan).assign_public_ip)
        return ctx

    def _queues(self, run: RunRecord) -> Queues:
        opts = run.options.get(OPTIONS_KEY, {})
        if not opts.get("job_queue"):
            raise BackendError(
                f"run {run.run_id} has no AWS Batch queue recorded (it was never submitted)",
                f"`corral resume {run.run_id}` submits it",
            )
        return Queues(opts["job_queue"], opts.get("gpu_job_queue"), opts.get("fargate_job_queue"))

    # -- Backend protocol ---------------------------------------------------------------------
    def check(self, plan: Plan) -> None:
        wf = plan.workflow
        for s in wf.stages:
            if s.kind == "transfer":
                self._check_transfer(plan, s, sources=not self._resuming)
            elif not s.image and not (s.kind == "cleanup" and s.command is None):
                raise PlanError(
                    f"stage {s.name!r} has no image; AWS Batch runs every task in a container",
                    "set `image:` on the stage or in `defaults:` (any image with /bin/sh)",
                    where=wf.stage_where(s.name),
                )
            for name in [*s.env, *s.secrets]:
                if name.startswith(RESERVED_ENV_PREFIXES):
                    raise PlanError(
                        f"stage {s.name!r} sets {name}, a name AWS Batch reserves",
                        "rename the variable",
                        where=wf.stage_where(s.name, "env" if name in s.env else "secrets", name),
                    )
            for name, ref in s.secrets.items():
                if ref.startswith("env:"):
                    raise PlanError(
                        f"stage {s.name!r} takes secret {name} from a local environment variable ({ref})",
                        "on AWS give a Secrets Manager secret name or ARN, e.g. `aws:my-secret`",
                        where=wf.stage_where(s.name, "secrets", name),
                    )
        try:
            from corral.instances import check_fits
        except ImportError:  # pragma: no cover - provisioning's module
            return
        check_fits(plan, list(self._aws(plan).instance_types))

    @staticmethod
    def _check_transfer(plan: Plan, s: Any, *, sources: bool = True) -> None:
        """A transfer job reaches s3://, workspace:// and rclone remotes, not this machine's paths:
        a local ``from:`` is staged to S3 before submission (:meth:`_stage_local_sources`); a local
        ``to:`` is refused."""
        from corral.errors import StorageError
        from corral.plan import template_fields
        from corral.storage.uri import WORKSPACE, parse

        wf = plan.workflow
        uri = s.dest
        if uri and not uri.startswith(WORKSPACE):
            try:
                local = parse(uri, workdir="/", base_dir=Path("/nonexistent")).kind == "local"
            except StorageError:
                local = False  # placeholders not filled in yet: refused (if at all) at submission
            if local:
                raise PlanError(
                    f"stage {s.name!r} is a transfer stage whose `to:` ({uri}) is a path on this machine, "
                    "which an AWS Batch job cannot write",
                    "write to s3://bucket/key or workspace://path on AWS, then `corral pull` the results here",
                    where=wf.stage_where(s.name),
                )
        if sources and s.source and not {"run", "workdir", "task"} & set(template_fields(s.source)):
            # Missing local sources are reported before the run is recorded (see _local_sources).
            AwsBatchBackend._local_sources(plan, "", "/nonexistent", stage=s.name)

    @staticmethod
    def _local_sources(
        plan: Plan, run_id: str, workdir: str, *, to_submit: set[str] | None = None, stage: str | None = None,
    ) -> dict[str, str]:
        """Local ``from:`` paths of transfer tasks (placeholders filled per item) → the first task
        label using each. A path that does not exist: a one-line PlanError naming stage, item, path."""
        from corral.plan import render
        from corral.storage.uri import WORKSPACE, parse

        wf = plan.workflow
        out: dict[str, str] = {}
        for t in plan.tasks:
            if t.stage.kind != "transfer" or not t.stage.source or (stage and t.stage.name != stage):
                continue
            if to_submit is not None and t.id not in to_submit:
                continue
            source = render(t.stage.source, t.values(run_id, workdir))
            if source.startswith(WORKSPACE):
                continue
            loc = parse(source, base_dir=wf.base_dir)
            if loc.kind != "local":
                continue
            if not Path(loc.path).exists():
                raise PlanError(
                    f"stage {t.stage.name!r}, item {t.key}: the transfer's local source {loc.path} does not exist",
                    "fix the `from:` path (or the item's values); local sources are uploaded to S3 for AWS jobs",
                    where=wf.stage_where(t.stage.name, "from"),
                )
            out.setdefault(loc.path, t.label)
        return out

    def _stage_local_sources(self, plan: Plan, run: RunRecord, env: Any, to_submit: set[str]) -> dict[str, str]:
        """Upload the local ``from:`` paths of the tasks about to be submitted to the run's bucket
        (``<prefix>/staged/<run>/``); local path → staged s3:// URI. Unchanged files already
        staged (same size and mtime) are not sent again, so a resume uploads only what changed."""
        import sys

        from corral.storage.aws import stage_local_source, staged_root

        workdir = pl.workdir_for(run.run_id, self._context(env))
        paths = self._local_sources(plan, run.run_id, workdir, to_submit=to_submit)
        if not paths:
            return {}
        bucket = getattr(env, "bucket", None)
        if not bucket:
            raise PlanError(
                "transfers read local paths but the AWS environment has no bucket to stage them in",
                "set `aws: bucket:` in the workflow (or let corral make its default bucket)",
            )
        prefix = getattr(env, "prefix", "corral")
        progress = _StderrProgress()
        staged: dict[str, str] = {}
        for path, label in sorted(paths.items()):
            before = progress.total
            staged[path] = stage_local_source(
                self.clients.s3, path, bucket=bucket, prefix=prefix, run_id=run.run_id, progress=progress,
            )
            sent = progress.total - before
            print(f"corral: staged {path} ({label}) → {staged[path]}"
                  f" ({'unchanged, not sent again' if sent == 0 else f'{sent} bytes sent'})", file=sys.stderr)
        opts = run.options.setdefault(OPTIONS_KEY, {})
        opts["staged"] = staged_root(bucket=bucket, prefix=prefix, run_id=run.run_id)
        return staged

    def _rclone_secret_ref(self, run_id: str) -> str:
        """What the execution role is given for the run's rclone config: the Secrets Manager name
        ``corral/<run>/rclone``, or (``aws: secrets: ssm``) the ARN of ``/corral/<run>/rclone``."""
        from corral.storage.secrets import parameter_arn, parameter_name, secret_name

        if self.settings.secrets == "ssm":
            return parameter_arn(parameter_name(run_id), region=self.clients.region,
                                 account_id=self.clients.account_id(), partition=self.clients.partition())
        return secret_name(run_id, "rclone")

    def _rclone_secrets(self, plan: Plan, run: RunRecord) -> dict[str, str]:
        """Make (or update) the run's rclone-config secret when its transfers use rclone remotes:
        ``{CORRAL_RCLONE_CONFIG: ARN}`` (Secrets Manager, or an SSM SecureString)."""
        from corral.storage.aws import CONFIG_ENV, prepare_rclone_secret, rclone_config_text, workflow_remotes
        from corral.storage.secrets import create_parameter

        names = workflow_remotes(plan.workflow)
        if not names:
            return {}
        tags = dict(self.settings.tags or {})
        if self.settings.secrets == "ssm":
            arn = create_parameter(
                self.clients.ssm, run_id=run.run_id, value=rclone_config_text(names), tags=tags,
                account_id=self.clients.account_id(), partition=self.clients.partition(),
            )
            return {CONFIG_ENV: arn}
        return prepare_rclone_secret(self.clients.secretsmanager, plan.workflow, run.run_id, tags=tags)

    def start(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions) -> None:
        self.check(plan)
        env = self.environment(plan, run.run_id)
        self._secrets = self._rclone_secrets(plan, run)
        run.options[OPTIONS_KEY] = {
            "region": env.region,
            "job_queue": env.job_queue,
            "gpu_job_queue": getattr(env, "gpu_job_queue", None),
            # Fargate's queue, when the workflow asks for Fargate: resume/cancel look for jobs there too
            "fargate_job_queue": getattr(env, "fargate_job_queue", None),
            "log_group": getattr(env, "log_group", "") or "",
            "table": getattr(env, "table_name", "") or "",
            **_run_facts(plan, env),
        }
        records = {t.task_id: t for t in store.get_tasks(run.run_id)}
        to_submit = {tid for tid, t in records.items() if t.state == TaskState.PENDING}
        staged = self._stage_local_sources(plan, run, env, to_submit)
        self._submitter(env, store, plan, staged).submit_round(plan, run, records, to_submit, 0)
        if options.wait:
            self.wait(run, store, options)

    def resume(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions) -> None:
        self._resuming = True
        try:
            self.check(plan)
        finally:
            self._resuming = False
        env = self.environment(plan, run.run_id)
        self._secrets = self._rclone_secrets(plan, run)
        opts = run.options.setdefault(OPTIONS_KEY, {})
        opts.setdefault("region", env.region)
        opts["job_queue"] = opts.get("job_queue") or env.job_queue
        opts["gpu_job_queue"] = opts.get("gpu_job_queue") or getattr(env, "gpu_job_queue", None)
        opts["fargate_job_queue"] = opts.get("fargate_job_queue") or getattr(env, "fargate_job_queue", None)
        opts.setdefault("log_group", getattr(env, "log_group", "") or "")
        for k, v in _run_facts(plan, env).items():
            opts.setdefault(k, v)
        queues = self._queues(run)
        tasks = self._refresh(run, store, final_cleanup=False)
        tasks, adopted = reconcile(
            self.api, run, store, tasks, queues.all(), settle_polls=self.settle_polls, sleep=self.sleep,
        )
        if adopted:
            tasks = self._refresh(run, store, final_cleanup=False)  # adopted jobs may have ended
        records = {t.task_id: t for t in tasks}
        to_submit = {
            t.task_id for t in tasks
            if t.state in (TaskState.PENDING, TaskState.FAILED, TaskState.UPSTREAM_FAILED, TaskState.CANCELLED)
        }
        cleanups = _cleanup_stages(run)
        if any(t.stage not in cleanups and t.task_id in to_submit for t in tasks):
            live = [t for t in tasks if t.stage in cleanups and not t.state.terminal and t.task_id not in to_submit]
            working = any(
                t.stage not in cleanups and not t.state.terminal and t.task_id not in to_submit for t in tasks
            )
            if live and not working:  # the cleanup submitted after the failures is running
                raise BackendError(
                    f"run {run.run_id}'s workspace cleanup ({live[0].external_id}) is still running",
                    f"resume once it has ended (`corral status {run.run_id} --backend aws`)",
                )
            # The tasks resubmitted write to the workspace again: its cleanup runs after them
            # (also when a cleanup already ran after the failures).
            to_submit |= {t.task_id for t in tasks if t.stage in cleanups and t.state.terminal}
        round_ = int(opts.get("round", -1)) + 1 if "round" in opts else 0
        staged = self._stage_local_sources(plan, run, env, to_submit)
        if run.state != RunState.RUNNING and to_submit:
            run.state = RunState.RUNNING
        self._submitter(env, store, plan, staged).submit_round(plan, run, records, to_submit, round_)
        if to_submit:
            store.save_run(run)
        if options.wait:
            self.wait(run, store, options)

    def refresh(self, run: RunRecord, store: StateStore) -> list[TaskRecord]:
        """Read the jobs' states into the store; after a failed run, also see that its workspace
        cleanup runs (:meth:`_cleanup_after_failure`)."""
        return self._refresh(run, store, final_cleanup=True)

    def _refresh(self, run: RunRecord, store: StateStore, *, final_cleanup: bool) -> list[TaskRecord]:
        tasks = store.get_tasks(run.run_id)
        by_parent: dict[str, list[TaskRecord]] = {}  # every task recorded in a job, live or ended
        for t in tasks:
            if is_job_id(t.external_id):
                by_parent.setdefault(parent_of(t.external_id), []).append(t)
        moving = [p for p, members in by_parent.items() if any(not t.state.terminal for t in members)]
        changed: dict[str, TaskRecord] = {}
        if moving:
            jobs = self.api.describe_jobs(moving)
            for parent in moving:
                job = jobs.get(parent)
                if job is None:
                    continue  # not visible yet (DescribeJobs is eventually consistent after SubmitJob)
                members = by_parent[parent]
                live = [t for t in members if not t.state.terminal]
                if "size" in job.get("arrayProperties", {}) and any(":" in t.external_id for t in members):
                    summaries = self._children(parent, job, members)
                    for t in live:
                        s = summaries.get(t.external_id)
                        if s is not None:
                            self._apply(t, s, changed)
                else:
                    for t in live:
                        self._apply(t, job, changed)
        if changed:
            store.save_tasks(list(changed.values()))
            tasks = [changed.get(t.task_id, t) for t in tasks]
        self._update_run_state(run, store, tasks)
        if final_cleanup:
            try:
                tasks = self._cleanup_after_failure(run, store, tasks)
            except CredentialsError:
                raise
            except CorralError as exc:  # the run's state is read; the cleanup is tried again next time
                self.say(f"run {run.run_id}: its workspace cleanup could not be submitted ({exc.one_line()}); "
                         "a later refresh tries again")
                tasks = store.get_tasks(run.run_id)
        return tasks

    def cancel(self, run: RunRecord, store: StateStore) -> None:
        tasks = store.get_tasks(run.run_id)
        if OPTIONS_KEY in run.options and run.options[OPTIONS_KEY].get("job_queue"):
            queues = self._queues(run)
            tasks, _ = reconcile(
                self.api, run, store, tasks, queues.all(), settle_polls=0, sleep=self.sleep,
            )
        parents = list(dict.fromkeys(
            parent_of(t.external_id) for t in tasks if not t.state.terminal and is_job_id(t.external_id)
        ))
        for p in parents:
            # TerminateJob also cancels jobs not started yet; on an array parent it reaches every child.
            self.api.call("terminate_job", f"cancel job {p}", jobId=p, reason=CANCEL_REASON)
        t_now = now()
        cancelled = [
            t.replace(state=TaskState.CANCELLED, reason=CANCEL_REASON, ended_at=t_now)
            for t in tasks if not t.state.terminal
        ]
        store.save_tasks(cancelled)
        if cancelled:  # a run that had already ended keeps its state
            store.save_run(store.get_run(run.run_id).replace(state=RunState.CANCELLED))

    def logs(
        self, run: RunRecord, store: StateStore, task: TaskRecord, attempt: int | None, follow: bool
    ) -> Iterator[str]:
        if not is_job_id(task.external_id):
            yield f"(task {task.label} has not been submitted yet: {task.state.value})"
            return
        job_id = task.external_id
        default_group = run.options.get(OPTIONS_KEY, {}).get("log_group", "")
        job = self.api.describe_jobs([job_id]).get(job_id)
        if job is None:
            raise UsageError(
                f"AWS Batch has no job {job_id} for task {task.label}",
                "Batch forgets jobs about 7 days after they end; the task's output is gone from it",
            )
        n_attempts = len(job.get("attempts") or [])
        if attempt is not None and not 1 <= attempt <= max(1, n_attempts + (0 if job["status"] in ("SUCCEEDED", "FAILED") else 1)):
            raise UsageError(
                f"task {task.label} has {n_attempts} attempt(s), not {attempt}", "leave out --attempt for the last one"
            )
        group = log_group_of(job, default_group)
        reader = LogReader(self.clients.logs, sleep=self.sleep)
        if not follow:
            stream = stream_of(job, attempt)
            if not stream:
                yield f"(task {task.label} has no output yet: {job['status']})"
                return
            lines, _ = reader.read(group, stream)
            if not lines:
                yield f"(task {task.label} has written no output: log stream {group}/{stream} is empty or gone)"
            yield from lines
            return

        state = {"first": True}

        def current() -> tuple[str, bool]:
            j = job if state.pop("first", False) else self.api.describe_jobs([job_id]).get(job_id, job)
            return stream_of(j, attempt), j["status"] in ("SUCCEEDED", "FAILED")

        yield from reader.follow(group, current)

    # -- the workspace cleanup after a failed run ---------------------------------------------
    def _cleanup_after_failure(self, run: RunRecord, store: StateStore, tasks: list[TaskRecord]) -> list[TaskRecord]:
        """Batch fails a job whose dependency failed, so after a failure the run's cleanup job never
        runs. Once every other task has ended and the run FAILED (not cancelled: as locally, a
        cancelled run keeps its workspace for ``resume``), submit each cleanup task that ended
        UPSTREAM_FAILED again, without dependencies — exactly once across machines and crashes:

        1. claim: a compare-and-set of the task record (still the UPSTREAM_FAILED one) to PENDING
           with the intent ``intent:<name>:0:1``, where ``<name>`` is the cleanup's job name
           plus ``-f<claim time>``; of processes refreshing at once, one wins;
        2. SubmitJob with that name (a copy of the failed cleanup job's submission, no dependsOn);
        3. record the job id. A crash between 1 and 3 leaves the intent: a later refresh adopts
           the job found by that name (ListJobs) or, once the claim is ``CLAIM_LEASE`` seconds old
           and still no job has that name, claims it again (compare-and-set) and submits."""
        cleanups = _cleanup_stages(run)
        mine = [t for t in tasks if t.stage in cleanups]
        if (
            run.state != RunState.FAILED or not mine
            or any(not t.state.terminal for t in tasks if t.stage not in cleanups)
            or not any(t.state == TaskState.UPSTREAM_FAILED or _claim_of(t) for t in mine)
        ):
            return tasks
        fresh = store.get_run(run.run_id)
        if fresh.state != RunState.FAILED or not fresh.options.get(OPTIONS_KEY, {}).get("job_queue"):
            return tasks
        changed: dict[str, TaskRecord] = {}
        found: dict[str, list[dict[str, Any]]] | None = None
        for t in mine:
            new: TaskRecord | None = None
            if t.state == TaskState.UPSTREAM_FAILED and is_job_id(t.external_id):
                new = self._claim_and_submit(fresh, store, t, t.external_id)
            elif (claim := _claim_of(t)) is not None:
                name, claimed_at = claim
                if found is None:
                    queues = self._queues(fresh)
                    found = find_run_jobs(self.api, queues.all(), run.run_id)
                if name in found:  # submitted, then the submitter stopped before recording it
                    job_id = found[name][0]["jobId"]
                    new = t.replace(state=TaskState.SUBMITTED, external_id=job_id, reason="")
                    if store.swap_task(t, new):
                        self.say(f"run {run.run_id} ended with failures; its workspace cleanup runs (job {job_id})")
                    else:
                        new = None
                elif self.wall_clock() - claimed_at > CLAIM_LEASE:
                    base = FINAL_SUFFIX.sub("", name)
                    original = (found.get(base) or [{}])[0].get("jobId")
                    if original:
                        new = self._claim_and_submit(fresh, store, t, original)
            if new is not None:
                changed[t.task_id] = new
        return [changed.get(t.task_id, t) for t in tasks] if changed else tasks

    def _claim_and_submit(self, run: RunRecord, store: StateStore, t: TaskRecord, original: str) -> TaskRecord | None:
        job = self.api.describe_jobs([original]).get(original)
        if job is None:
            gone = t.replace(
                state=TaskState.FAILED, external_id="",
                reason="not run after the run's failures: AWS Batch no longer knows its job; "
                       f"`corral aws teardown --run {run.run_id}` removes the run's workspace",
            )
            if store.swap_task(t, gone):
                self.say(f"run {run.run_id} ended with failures; its workspace cleanup could not be submitted "
                         f"(AWS Batch no longer knows job {original}): `corral aws teardown --run {run.run_id}` "
                         "removes the workspace")
                return gone
            return None
        round_ = int(run.options.get(OPTIONS_KEY, {}).get("round", 0))
        name = f"{job_name(run.run_id, t.stage, round_, None)}-f{int(self.wall_clock())}"
        claim = t.replace(
            state=TaskState.PENDING, external_id=f"{INTENT}{name}:0:1", exit_code=None, ended_at=None,
            reason="workspace cleanup after the run's failures",
        )
        if not store.swap_task(t, claim):
            return None  # another process claimed it (or the task changed): it is not ours to submit
        kwargs = _resubmission(job, name)
        job_id: str = self.api.call("submit_job", f"submit job {name}", **kwargs)["jobId"]
        if self.after_submit is not None:
            self.after_submit(name, job_id)
        done = claim.replace(state=TaskState.SUBMITTED, external_id=job_id, reason="")
        store.save_tasks([done])
        self.say(f"run {run.run_id} ended with failures; submitted its workspace cleanup (job {job_id})")
        return done

    # -- helpers ------------------------------------------------------------------------------
    def _submitter(self, env: Any, store: StateStore, plan: Plan, staged: dict[str, str] | None = None) -> Submitter:
        queues = Queues(env.job_queue, getattr(env, "gpu_job_queue", None), getattr(env, "fargate_job_queue", None))
        return Submitter(
            self.api, store, self._context(env, plan), queues,
            tags=dict(self.settings.tags or {}), after_submit=self.after_submit,
            rclone_secrets=self._secrets, s3_endpoint=self._s3_endpoint(),
            instance_types=list(self._aws(plan).instance_types),
            staged=staged, base_dir=plan.workflow.base_dir,
        )

    def _s3_endpoint(self) -> str | None:
        """The S3 endpoint transfer jobs use: only set for S3-compatible stores (and tests)."""
        import os

        return (
            self.clients.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )

    def _children(self, parent: str, job: dict[str, Any], members: list[TaskRecord]) -> dict[str, dict[str, Any]]:
        """Child job id → summary for the children whose state may have changed, with as few
        ListJobs calls as the parent's status summary and what is already recorded allow.

        ``members`` are the tasks recorded in this array (ended ones included). A child's terminal
        status never changes, so a status ``S`` is not listed when the summary's count for ``S``
        equals the members recorded in it (SUCCEEDED; FAILED for FAILED, UPSTREAM_FAILED and
        CANCELLED); RUNNING is not listed when its count equals the members recorded RUNNING and no
        terminal count moved (those are still the running ones: a child retried and another started
        in between show as soon as a count moves). Of the rest, either the SUCCEEDED children or the
        waiting ones (SUBMITTED…STARTING, all "submitted" to corral) are listed — whichever takes
        fewer pages — and the other kind is inferred. What was listed is checked against the
        summary's counts: children that moved between DescribeJobs and ListJobs make it list the
        rest rather than guess. A child absent from the result keeps its recorded state."""
        size = int(job["arrayProperties"]["size"])
        summary = job["arrayProperties"].get("statusSummary") or {}
        times = {"startedAt": job.get("startedAt"), "stoppedAt": job.get("stoppedAt")}
        succeeded = {"status": "SUCCEEDED", **times}
        waiting_summary = {"status": "SUBMITTED"}
        if job.get("status") == "SUCCEEDED" or summary.get("SUCCEEDED", 0) == size:
            return {f"{parent}:{i}": succeeded for i in range(size)}
        known = collections.Counter(_BATCH_STATUS.get(t.state, "") for t in members)
        n = {s: summary.get(s, 0) for s in ("SUCCEEDED", "FAILED", "RUNNING", *_WAITING_ORDER)}
        moved = {s: n[s] != known[s] for s in ("SUCCEEDED", "FAILED", "RUNNING")}
        out: dict[str, dict[str, Any]] = {}
        listed: list[str] = []

        def list_status(status: str) -> None:
            listed.append(status)
            for s in self.api.list_jobs(f"list {status} children of {parent}", arrayJobId=parent, jobStatus=status):
                out.setdefault(s["jobId"], s)

        if n["FAILED"] and moved["FAILED"]:
            list_status("FAILED")
        running_known = not any(moved.values())  # the members recorded RUNNING are the running ones
        if n["RUNNING"] and not running_known:
            list_status("RUNNING")
        waiting = [s for s in _WAITING_ORDER if n[s] > 0]
        pages = lambda k: -(-k // 1000)  # noqa: E731
        if n["SUCCEEDED"] and moved["SUCCEEDED"]:
            # Some live members may have succeeded: list SUCCEEDED or the waiting ones, infer the other.
            if waiting and pages(n["SUCCEEDED"]) < sum(pages(n[s]) for s in waiting):
                list_status("SUCCEEDED")
                inferred = waiting_summary
            else:
                for s in waiting:
                    list_status(s)
                inferred = succeeded
        else:
            inferred = waiting_summary  # no live member is SUCCEEDED (nor FAILED, if not listed)
        if len(out) != sum(n[s] for s in listed):
            # Children moved between DescribeJobs and ListJobs: list the rest rather than guess (a
            # child still missing then moved during the listing: it keeps its state until next time).
            for status in ["FAILED", "RUNNING", "SUCCEEDED", *_WAITING_ORDER]:
                if status not in listed:
                    list_status(status)
            return out
        for t in members:
            if t.external_id in out or t.state.terminal:
                continue
            if running_known and t.state == TaskState.RUNNING:
                continue  # still running: nothing to change
            out[t.external_id] = inferred
        return out

    @staticmethod
    def _apply(t: TaskRecord, s: dict[str, Any], changed: dict[str, TaskRecord]) -> None:
        status = s.get("status", "")
        reason = s.get("statusReason", "") or ""
        container = s.get("container") or {}
        if container.get("reason"):
            reason = f"{reason}: {container['reason']}" if reason else container["reason"]
        state = task_state_of(status, reason)
        exit_code = container.get("exitCode")
        if s.get("attempts"):
            attempts = len(s["attempts"])
        elif state in (TaskState.RUNNING, TaskState.SUCCEEDED, TaskState.FAILED):
            attempts = max(t.attempts, 1)
        else:
            attempts = t.attempts
        new = t.replace(
            state=state,
            reason=reason if state not in (TaskState.SUCCEEDED, TaskState.SUBMITTED, TaskState.RUNNING) else "",
            exit_code=exit_code if exit_code is not None else t.exit_code,
            started_at=_seconds(s.get("startedAt")) or t.started_at,
            ended_at=_seconds(s.get("stoppedAt")) if state.terminal else None,
            attempts=attempts,
        )
        if new != t:
            changed[t.task_id] = new

    @staticmethod
    def _update_run_state(run: RunRecord, store: StateStore, tasks: list[TaskRecord]) -> None:
        if not tasks or run.state != RunState.RUNNING or not all(t.state.terminal for t in tasks):
            return
        state = RunState.SUCCEEDED if all(t.state.ok for t in tasks) else RunState.FAILED
        if any(t.state == TaskState.CANCELLED for t in tasks):
            state = RunState.CANCELLED
        run.state = state
        # Re-read before writing: another machine may have changed the run's options (a resume).
        fresh = store.get_run(run.run_id)
        if fresh.state == RunState.RUNNING:
            store.save_run(fresh.replace(state=state))

    def wait(self, run: RunRecord, store: StateStore, options: RunOptions, max_delay: float = 30.0) -> None:
        """Poll until every task is terminal, with backoff (2 s → ``max_delay``)."""
        delay = 2.0
        last: list[tuple[str, str]] | None = None
        while True:
            tasks = self.refresh(run, store)
            snapshot = [(t.task_id, t.state.value) for t in tasks]
            if snapshot != last:
                if options.progress is not None:
                    options.progress(tasks)
                last = snapshot
                delay = 2.0
            if all(t.state.terminal for t in tasks):
                return
            self.sleep(delay)
            delay = min(max_delay, delay * 1.5)


def _cleanup_stages(run: RunRecord) -> set[str]:
    """The run's cleanup stages (recorded at submission; older runs: the ``cleanup: true`` stage)."""
    return set(run.options.get(OPTIONS_KEY, {}).get("cleanup_stages", [CLEANUP_STAGE]))


def _claim_of(t: TaskRecord) -> tuple[str, float] | None:
    """(job name, claim time) when ``t`` is claimed for a cleanup after failure but not yet recorded."""
    if t.state != TaskState.PENDING or not t.external_id.startswith(INTENT):
        return None
    name = t.external_id[len(INTENT):].rsplit(":", 2)[0]
    m = FINAL_SUFFIX.search(name)
    return (name, float(m.group(1))) if m else None


def _resubmission(job: dict[str, Any], name: str) -> dict[str, Any]:
    """SubmitJob kwargs repeating a (plain) job's submission under ``name``, without dependencies."""
    container = job.get("container") or {}
    env = [
        {"name": e["name"], "value": e.get("value", "")}
        for e in container.get("environment") or []
        if not e["name"].startswith(RESERVED_ENV_PREFIXES)
    ]
    kwargs: dict[str, Any] = {
        "jobName": name,
        "jobQueue": job["jobQueue"],
        "jobDefinition": job["jobDefinition"],
        "containerOverrides": {"environment": env},
    }
    tags = {k: v for k, v in (job.get("tags") or {}).items() if not k.startswith("aws:")}
    if tags:
        kwargs["tags"] = tags
        kwargs["propagateTags"] = True
    return kwargs


def _run_facts(plan: Plan, env: Any) -> dict[str, Any]:
    """What the run records beyond its queues: its cleanup stages (for the cleanup after a failure)
    and its EFS workspace with the roles that mount it (for ``corral aws teardown --run``)."""
    return {
        "cleanup_stages": [s.name for s in plan.workflow.stages if s.kind == "cleanup"],
        "efs_id": getattr(env, "efs_id", "") or "",
        "efs_access_point": getattr(env, "efs_access_point", "") or "",
        "job_role_arn": getattr(env, "job_role_arn", "") or "",
        "execution_role_arn": getattr(env, "execution_role_arn", "") or "",
    }
