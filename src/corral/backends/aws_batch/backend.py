"""``AwsBatchBackend``: the Backend protocol on AWS Batch (submit, refresh, cancel, logs, resume).

``start`` provisions what the plan needs (``provision.ensure_environment``), records where the run
lives in ``run.options["aws_batch"]`` (region, queues, log group, round layout) so any machine that
can read the state table can follow it, then submits array jobs (see ``submit``) and returns (or
waits, with bounded polling, when ``options.wait``).

``refresh`` costs, for a run of arrays: one DescribeJobs per 100 parents (their ``statusSummary``),
and only for arrays not all succeeded, one ListJobs (pages of 1,000) per status that has children;
only the tasks that changed are written back (batched by the store).
"""

from __future__ import annotations

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
        self._environment = environment
        self._ensure = ensure_environment
        self.sleep = sleep
        self.clock = clock
        self.settle_polls = settle_polls
        self.after_submit = after_submit
        self._bucket = bucket or TokenBucket(clock=clock, sleep=sleep)
        self._api: BatchApi | None = None
        self._secrets: dict[str, str] = {}

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
            if run_id:
                from corral.storage.aws import workflow_remotes
                from corral.storage.secrets import secret_name

                name = secret_name(run_id, "rclone")  # the execution role reads corral/<run>/rclone-*
                if workflow_remotes(plan.workflow) and name not in needs.secrets:
                    needs.secrets.append(name)
            ensure = self._ensure or provision.ensure_environment
            self._environment = ensure(self.clients, self.settings, needs)
        return self._environment

    def _context(self, env: Any) -> pl.JobContext:
        return pl.JobContext.from_environment(env, partition=self.clients.partition())

    def _queues(self, run: RunRecord) -> Queues:
        opts = run.options.get(OPTIONS_KEY, {})
        if not opts.get("job_queue"):
            raise BackendError(
                f"run {run.run_id} has no AWS Batch queue recorded (it was never submitted)",
                f"`corral resume {run.run_id}` submits it",
            )
        return Queues(opts["job_queue"], opts.get("gpu_job_queue"))

    # -- Backend protocol ---------------------------------------------------------------------
    def check(self, plan: Plan) -> None:
        wf = plan.workflow
        for s in wf.stages:
            if s.kind == "transfer":
                self._check_transfer(plan, s)
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
        check_fits(plan, list(self.settings.instance_types))

    @staticmethod
    def _check_transfer(plan: Plan, s: Any) -> None:
        """A transfer job reaches s3://, workspace:// and rclone remotes, not this machine's paths."""
        from corral.errors import StorageError
        from corral.storage.uri import WORKSPACE, parse

        wf = plan.workflow
        for key, uri in (("from", s.source), ("to", s.dest)):
            if not uri or uri.startswith(WORKSPACE):
                continue
            try:
                local = parse(uri, workdir="/", base_dir=Path("/nonexistent")).kind == "local"
            except StorageError:
                local = False  # placeholders not filled in yet: refused (if at all) at submission
            if local:
                raise PlanError(
                    f"stage {s.name!r} is a transfer stage whose `{key}:` ({uri}) is a path on this machine, "
                    "which an AWS Batch job cannot reach",
                    "use s3://bucket/key, workspace://path or an rclone remote (name:path) in transfers on AWS",
                    where=wf.stage_where(s.name),
                )

    def _rclone_secrets(self, plan: Plan, run: RunRecord) -> dict[str, str]:
        """Make (or update) the run's rclone-config secret when its transfers use rclone remotes."""
        from corral.storage.aws import prepare_rclone_secret, workflow_remotes

        if not workflow_remotes(plan.workflow):
            return {}
        return prepare_rclone_secret(
            self.clients.secretsmanager, plan.workflow, run.run_id, tags=dict(self.settings.tags or {})
        )

    def start(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions) -> None:
        self.check(plan)
        env = self.environment(plan, run.run_id)
        self._secrets = self._rclone_secrets(plan, run)
        run.options[OPTIONS_KEY] = {
            "region": env.region,
            "job_queue": env.job_queue,
            "gpu_job_queue": getattr(env, "gpu_job_queue", None),
            "log_group": getattr(env, "log_group", "") or "",
            "table": getattr(env, "table_name", "") or "",
            **_run_facts(plan, env),
        }
        records = {t.task_id: t for t in store.get_tasks(run.run_id)}
        to_submit = {tid for tid, t in records.items() if t.state == TaskState.PENDING}
        self._submitter(env, store).submit_round(plan, run, records, to_submit, 0)
        if options.wait:
            self.wait(run, store, options)

    def resume(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions) -> None:
        self.check(plan)
        env = self.environment(plan, run.run_id)
        self._secrets = self._rclone_secrets(plan, run)
        opts = run.options.setdefault(OPTIONS_KEY, {})
        opts.setdefault("region", env.region)
        opts["job_queue"] = opts.get("job_queue") or env.job_queue
        opts["gpu_job_queue"] = opts.get("gpu_job_queue") or getattr(env, "gpu_job_queue", None)
        opts.setdefault("log_group", getattr(env, "log_group", "") or "")
        for k, v in _run_facts(plan, env).items():
            opts.setdefault(k, v)
        queues = self._queues(run)
        tasks = self._refresh(run, store, final_cleanup=False)
        tasks, adopted = reconcile(
            self.api, run, store, tasks, [queues.default, queues.gpu or ""],
            settle_polls=self.settle_polls, sleep=self.sleep,
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
        if run.state != RunState.RUNNING and to_submit:
            run.state = RunState.RUNNING
        self._submitter(env, store).submit_round(plan, run, records, to_submit, round_)
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
        live = [t for t in tasks if not t.state.terminal and is_job_id(t.external_id)]
        by_parent: dict[str, list[TaskRecord]] = {}
        for t in live:
            by_parent.setdefault(parent_of(t.external_id), []).append(t)
        changed: dict[str, TaskRecord] = {}
        if by_parent:
            jobs = self.api.describe_jobs(list(by_parent))
            for parent, members in by_parent.items():
                job = jobs.get(parent)
                if job is None:
                    continue  # not visible yet (DescribeJobs is eventually consistent after SubmitJob)
                if "size" in job.get("arrayProperties", {}) and any(":" in t.external_id for t in members):
                    summaries = self._children(parent, job)
                    for t in members:
                        s = summaries.get(t.external_id)
                        if s is not None:
                            self._apply(t, s, changed)
                else:
                    for t in members:
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
                self.api, run, store, tasks, [queues.default, queues.gpu or ""],
                settle_polls=0, sleep=self.sleep,
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
                    found = find_run_jobs(self.api, [queues.default, queues.gpu or ""], run.run_id)
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
    def _submitter(self, env: Any, store: StateStore) -> Submitter:
        return Submitter(
            self.api, store, self._context(env), Queues(env.job_queue, getattr(env, "gpu_job_queue", None)),
            tags=dict(self.settings.tags or {}), after_submit=self.after_submit,
            rclone_secrets=self._secrets, s3_endpoint=self._s3_endpoint(),
        )

    def _s3_endpoint(self) -> str | None:
        """The S3 endpoint transfer jobs use: only set for S3-compatible stores (and tests)."""
        import os

        return (
            self.clients.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )

    def _children(self, parent: str, job: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Child job id → summary, with as few ListJobs calls as the status summary allows.

        FAILED and RUNNING children are listed (their tasks change state); of the rest, either
        the SUCCEEDED ones or the waiting ones (SUBMITTED…STARTING, all "submitted" to corral)
        are listed — whichever takes fewer pages — and the other kind is inferred, checked
        against the summary's counts (listed again if children moved meanwhile)."""
        size = int(job["arrayProperties"]["size"])
        summary = job["arrayProperties"].get("statusSummary") or {}
        times = {"startedAt": job.get("startedAt"), "stoppedAt": job.get("stoppedAt")}
        succeeded = {"status": "SUCCEEDED", **times}
        waiting_summary = {"status": "SUBMITTED"}
        if job.get("status") == "SUCCEEDED" or summary.get("SUCCEEDED", 0) == size:
            return {f"{parent}:{i}": succeeded for i in range(size)}
        out: dict[str, dict[str, Any]] = {}

        def list_status(status: str) -> None:
            for s in self.api.list_jobs(f"list {status} children of {parent}", arrayJobId=parent, jobStatus=status):
                out.setdefault(s["jobId"], s)

        for status in ("FAILED", "RUNNING"):
            if summary.get(status, 0) > 0:
                list_status(status)
        waiting = [s for s in _WAITING_ORDER if summary.get(s, 0) > 0]
        n_succ = summary.get("SUCCEEDED", 0)
        pages = lambda n: -(-n // 1000)  # noqa: E731
        if waiting and n_succ and pages(n_succ) < sum(pages(summary[s]) for s in waiting):
            listed, inferred, expect = ["SUCCEEDED"], waiting_summary, sum(summary[s] for s in waiting)
        elif n_succ:
            listed, inferred, expect = waiting, succeeded, n_succ
        else:
            listed, inferred, expect = [], waiting_summary, sum(summary.get(s, 0) for s in waiting)
        for status in listed:
            list_status(status)
        unlisted = size - len(out)
        if unlisted and unlisted != expect:
            # Children moved between DescribeJobs and ListJobs: list the rest rather than guess.
            for status in ["SUCCEEDED", *_WAITING_ORDER]:
                if status not in listed:
                    list_status(status)
            unlisted = size - len(out)
        if unlisted:
            for i in range(size):
                out.setdefault(f"{parent}:{i}", inferred)
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
