"""``AwsBatchBackend``: the Backend protocol on AWS Batch (submit, refresh, cancel, logs, resume).

``start`` provisions what the plan needs (``provision.ensure_environment``), records where the run
lives (region, queues, log group, round layout: :class:`run_facts.RunFacts`, stored under
the run options' ``aws_batch`` key) so any machine that can read the state table can follow it, then
submits array jobs (see ``submit``) and returns (or waits, with bounded polling, when
``options.wait``).

``refresh`` costs, for a run of arrays: one DescribeJobs per 100 parents that still have a task in
flight (their ``statusSummary``), and ListJobs (pages of 1,000) only for a status whose count in
the summary differs from what the store already records for that array (see ``status.children``):
polling with nothing new costs the DescribeJobs alone; only the tasks that changed are written
back (batched by the store). Children that just ended may be described once more, 100 per
call, for their attempt count (``_count_attempts``: ListJobs summaries carry none).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from corral import runstate
from corral.backends.aws_batch import memory as aws_memory
from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch import staging
from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.final_cleanup import CLAIM_LEASE, FinalCleanup, cleanup_stages
from corral.backends.aws_batch.logs import LogReader, log_group_of, stream_of
from corral.backends.aws_batch.payloads import RESERVED_ENV_PREFIXES
from corral.backends.aws_batch.run_facts import OPTIONS_KEY as OPTIONS_KEY  # (the old name, kept)
from corral.backends.aws_batch.run_facts import RunFacts
from corral.backends.aws_batch.status import CANCEL_REASON, apply_summary, children, task_state_of
from corral.backends.aws_batch.submit import (
    BatchApi,
    Queues,
    Submitter,
    TokenBucket,
    is_job_id,
    parent_of,
    reconcile,
)
from corral.backends.base import OUTPUT_MISSING, RunOptions
from corral.errors import BackendError, CorralError, CredentialsError, PlanError, UsageError
from corral.model import RunRecord, RunState, TaskRecord, TaskState, now
from corral.plan import Plan
from corral.spec import AwsSettings
from corral.state.base import StateStore
from corral.state.lease import LeaseHeld

__all__ = ["CANCEL_REASON", "CLAIM_LEASE", "AwsBatchBackend", "task_state_of"]


class AwsBatchBackend:
    name = "aws"
    always_waits = False  # `run` returns once submitted unless RunOptions.wait
    records_attempts = False  # Batch keeps each attempt (attempt_history reads them)
    driven_from_host = False  # Batch runs it: no client needs to stay up
    cost_basis = "actual"
    flags = frozenset({"force", "wait", "force_stages", "reuse"})

    # -- what callers need to know (Backend protocol) ------------------------------------------
    @classmethod
    def create(cls, *, workflow: Any = None, run: RunRecord | None = None, region: str | None = None,
               profile: str | None = None, **settings: Any) -> AwsBatchBackend:
        if workflow is not None:
            aws = workflow.aws
        else:
            aws = AwsSettings(**(run.options.get("aws", {}) if run else {}))
        if region or profile:
            aws = aws.model_copy(update={k: v for k, v in (("region", region), ("profile", profile)) if v})
        return cls(AwsClients(region=aws.region, profile=aws.profile), aws)

    @classmethod
    def open_store(cls, *, workflow: Any = None, **settings: Any) -> StateStore:
        from corral.state.dynamodb import DynamoStore

        aws = workflow.aws if workflow is not None else AwsSettings(
            **{k: v for k, v in settings.items() if v is not None and k in AwsSettings.model_fields})
        clients = AwsClients(region=aws.region, profile=aws.profile)
        return DynamoStore(settings.get("table") or "corral-state", clients.dynamodb)

    @classmethod
    def store_exists(cls) -> bool:
        return True  # a DynamoDB table: asking costs a call; the store says when it is missing

    def run_options(self, workflow: Any) -> dict[str, Any]:
        return {"aws": workflow.aws.model_dump(mode="json")}

    def workspace(self, run: RunRecord) -> str | None:
        return None  # on EFS (or the instance's disk): not a path on this machine

    def attempt_history(self, run: RunRecord, tasks: Any) -> dict[str, list[Any]]:
        """Every attempt Batch still knows (Batch forgets jobs ~7 days after they end)."""
        from corral.report import batch_attempts

        ecs = self.clients.client("ecs")
        clusters: list[str] = []
        try:
            for page in self.clients.batch.get_paginator("describe_compute_environments").paginate():
                clusters += [c["ecsClusterArn"] for c in page.get("computeEnvironments", []) if c.get("ecsClusterArn")]
        except Exception:  # noqa: BLE001 - only used to find old-format container instance ARNs
            clusters = []
        return batch_attempts(run.run_id, list(tasks), self.api.describe_jobs, ecs, clusters)

    def diagnose(self, run: RunRecord | None, store: StateStore | None, plan: Plan | None,
                 tasks: list[TaskRecord] | None, *, runnable_after_s: float) -> list[Any]:
        from corral.doctor import aws_checks

        return aws_checks(self.clients, plan.workflow.aws if plan is not None else self.settings, plan=plan, run=run,
                          tasks=tasks, runnable_after_s=runnable_after_s)

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
        api: BatchApi | None = None,
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
        self._api: BatchApi | None = api  # (tests give a BatchApi that plays Batch: the contract suite)
        self._secrets: dict[str, str] = {}
        self._caps: dict[str, str] = {}  # stage -> its Batch consumable resource (max_parallel, caps.py)
        self._rclone_image: str | None = None
        # On resume only the tasks to resubmit need their local sources (checked when staging them).
        self._resuming = False

    @property
    def api(self) -> BatchApi:
        if self._api is None:
            self._api = BatchApi(self.clients.batch, self._bucket, submit_client=self.clients.batch_once)
        return self._api

    # -- environment --------------------------------------------------------------------------
    def environment(self, plan: Plan, run_id: str | None = None) -> Any:
        if self._environment is None:
            from corral.backends.aws_batch import provision

            needs = provision.needs_for(plan, run_id)  # {run} in S3 URIs: this run's scope only
            if staging.reads_local_paths(plan):
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
        facts = RunFacts.of(run)
        if not facts.submitted:
            raise BackendError(
                f"run {run.run_id} has no AWS Batch queue recorded (it was never submitted)",
                f"`corral resume {run.run_id}` submits it",
            )
        return Queues(*facts.queues())

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
            from corral.routes import check_fits
        except ImportError:  # pragma: no cover - provisioning's module
            return
        check_fits(plan, list(self._aws(plan).instance_types))

    @staticmethod
    def _check_transfer(plan: Plan, s: Any, *, sources: bool = True) -> None:
        """A transfer job reaches s3://, workspace:// and rclone remotes, not this machine's paths:
        a local ``from:`` is staged to S3 before submission (:mod:`staging`); a local
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
            # Missing local sources are reported before the run is recorded (staging.local_sources).
            staging.local_sources(plan, "", "/nonexistent", stage=s.name)

    def _stage(self, plan: Plan, run: RunRecord, env: Any, to_submit: set[str]) -> dict[str, str]:
        workdir = pl.workdir_for(run.run_id, self._context(env))
        return staging.stage_local_sources(self.clients.s3, plan, run, env, to_submit, workdir)

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
        from corral.storage.secrets import create_parameter, restrict_readers

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
        made = prepare_rclone_secret(self.clients.secretsmanager, plan.workflow, run.run_id, tags=tags)
        reader = getattr(self.environment(plan, run.run_id), "execution_role_arn", "")
        if reader:  # the secret's resource policy: nobody but the run's execution role reads it
            restrict_readers(self.clients.secretsmanager, made[CONFIG_ENV], [reader])
        return made

    def _ensure_caps(self, plan: Plan, run: RunRecord) -> dict[str, str]:
        """A stage's ``max_parallel``, held by Batch itself: its consumable resource (:mod:`caps`)."""
        from corral.backends.aws_batch import caps

        if not caps.capped_stages(plan):
            return {}
        return caps.ensure(self.clients.batch, plan, run.run_id, tags=dict(self.settings.tags or {}), say=self.say)
    def _rclone_image_for(self, plan: Plan) -> str | None:
        """corral's pinned rclone image in this account, by digest (copied on first use), when some
        stage runs in it and ``CORRAL_RCLONE_IMAGE`` does not name another; else None."""
        from corral.backends.aws_batch.rclone_image import ensure_rclone_image
        from corral.storage.aws import uses_default_rclone_image

        if not uses_default_rclone_image() or not any(Submitter.runs_rclone(s) for s in plan.workflow.stages):
            return None
        return ensure_rclone_image(self.clients, log=lambda m: print(f"corral: {m}", file=sys.stderr))

    def _prepare_round(self, plan: Plan, run: RunRecord) -> Any:
        """What every round of submission needs, the same for start, resume and a retry with more
        memory: the environment, the rclone image, the rclone secrets and the stages' caps (so a
        resubmitted job has the same definition as its first one)."""
        env = self.environment(plan, run.run_id)
        self._rclone_image = self._rclone_image_for(plan)
        self._secrets = self._rclone_secrets(plan, run)
        self._caps = self._ensure_caps(plan, run)
        return env

    def start(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions) -> None:
        self.check(plan)
        env = self._prepare_round(plan, run)
        _record_where(run, plan, env)
        records = {t.task_id: t for t in store.get_tasks(run.run_id)}
        to_submit = {tid for tid, t in records.items() if t.state == TaskState.PENDING}
        to_submit -= skip_done(plan, run, store, records, to_submit, options)
        staged = self._stage(plan, run, env, to_submit)
        skip = _skip_in_job(plan, run, options)
        self._submitter(env, store, plan, staged, skip).submit_round(plan, run, records, to_submit, 0)
        if not to_submit:  # everything was skipped: the run has ended
            self._update_run_state(run, store, store.get_tasks(run.run_id))
        if options.wait:
            self.wait(run, store, options)

    def resume(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions,
               tasks: list[TaskRecord] | None = None) -> None:
        # ``tasks`` (the run's records, read under the lease) is for backends whose store is the
        # truth; this one reconciles with its scheduler first, so it reads them itself.
        self._resuming = True
        try:
            self.check(plan)
        finally:
            self._resuming = False
        env = self._prepare_round(plan, run)
        opts = _record_where(run, plan, env)
        queues = self._queues(run)
        tasks = self.refresh(run, store, final_cleanup=False)
        tasks, adopted = reconcile(
            self.api, run, store, tasks, queues.all(), settle_polls=self.settle_polls, sleep=self.sleep,
        )
        if adopted:
            tasks = self.refresh(run, store, final_cleanup=False)  # adopted jobs may have ended
        records = {t.task_id: t for t in tasks}
        to_submit = {
            t.task_id for t in tasks
            if t.state in (TaskState.PENDING, TaskState.FAILED, TaskState.UPSTREAM_FAILED, TaskState.CANCELLED)
        }
        cleanups = cleanup_stages(run)
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
        round_ = opts.round + 1 if opts.round is not None else 0  # (opts: the run's RunFacts)
        never_tried = {tid for tid in to_submit if records[tid].attempts == 0}
        to_submit -= skip_done(plan, run, store, records, never_tried, options)
        staged = self._stage(plan, run, env, to_submit)
        if run.state != RunState.RUNNING and to_submit:
            run.state = RunState.RUNNING
        skip = _skip_in_job(plan, run, options)
        submitter = self._submitter(env, store, plan, staged, skip)
        submitter.memory = aws_memory.on_resume(plan, RunFacts.stored(run), [records[t] for t in to_submit],
                                                list(self._aws(plan).instance_types))
        submitter.submit_round(plan, run, records, to_submit, round_)
        if to_submit:
            store.save_run(run)
        if options.wait:
            self.wait(run, store, options)

    def refresh(self, run: RunRecord, store: StateStore, *, final_cleanup: bool = True) -> list[TaskRecord]:
        """Read the jobs' states into the store; after a failed run, also see that its workspace
        cleanup runs (:class:`final_cleanup.FinalCleanup`) unless ``final_cleanup`` is false.
        Holds the run's lease while it writes; while another command holds it, the stored view."""
        try:
            with store.lease(run.run_id, "status"):
                return self._refresh(run, store, final_cleanup=final_cleanup)
        except LeaseHeld:
            return store.get_tasks(run.run_id)

    def _refresh(self, run: RunRecord, store: StateStore, *, final_cleanup: bool) -> list[TaskRecord]:
        tasks = store.get_tasks(run.run_id)
        by_parent: dict[str, list[TaskRecord]] = {}  # every task recorded in a job, live or ended
        for t in tasks:
            if is_job_id(t.external_id):
                by_parent.setdefault(parent_of(t.external_id), []).append(t)
        moving = [p for p, members in by_parent.items() if any(not t.state.terminal for t in members)]
        changed: dict[str, TaskRecord] = {}
        jobs: dict[str, dict[str, Any]] = {}
        if moving:
            jobs = self.api.describe_jobs(moving)
            for parent in moving:
                job = jobs.get(parent)
                if job is None:
                    continue  # not visible yet (DescribeJobs is eventually consistent after SubmitJob)
                members = by_parent[parent]
                live = [t for t in members if not t.state.terminal]
                if "size" in job.get("arrayProperties", {}) and any(":" in t.external_id for t in members):
                    summaries = children(self.api, parent, job, members)
                    for t in live:
                        s = summaries.get(t.external_id)
                        if s is not None:
                            apply_summary(t, s, changed)
                else:
                    for t in live:
                        apply_summary(t, job, changed)
        if changed:
            facts = RunFacts.of(run).to_dict()  # read once: nothing below changes the run's facts
            self._count_attempts(changed, jobs, aws_memory.resubmitted(facts))
            self._name_missing_outputs(run, store, changed)
            self._skipped_in_job(run, tasks, changed)
            aws_memory.count_attempts(facts, changed)
            if any(aws_memory.is_batch_oom(t) for t in changed.values()):
                aws_memory.name_oom(facts, _plan_of(store, run), changed)
            # Conditional: a record another process changed since we read it (a cleanup claim) stands.
            before = {t.task_id: t for t in tasks}
            written = store.update_tasks([(before[tid], new) for tid, new in changed.items()])
            if len(written) == len(changed):
                tasks = [changed.get(t.task_id, t) for t in tasks]
            else:
                tasks = store.get_tasks(run.run_id)
        tasks = self._retry_with_more_memory(run, store, tasks)
        self._update_run_state(run, store, tasks)
        if final_cleanup:
            try:
                tasks = FinalCleanup(
                    self.api, self._queues, say=self.say, wall_clock=self.wall_clock, after_submit=self.after_submit,
                ).after_failure(run, store, tasks)
            except CredentialsError:
                raise
            except CorralError as exc:  # the run's state is read; the cleanup is tried again next time
                self.say(f"run {run.run_id}: its workspace cleanup could not be submitted ({exc.one_line()}); "
                         "a later refresh tries again")
                tasks = store.get_tasks(run.run_id)
        return tasks

    def _retry_with_more_memory(self, run: RunRecord, store: StateStore, tasks: list[TaskRecord]) -> list[TaskRecord]:
        """Tasks killed for memory with tries left go in a new round, their jobs asking for more
        (corral.backends.aws_batch.memory); called by the refresh, under the run's lease."""
        from corral.backends import oom

        if run.state != RunState.RUNNING or not any(
                t.state == TaskState.FAILED and oom.is_oom(t.reason) and "not retried" not in t.reason for t in tasks):
            return tasks
        plan = _plan_of(store, run)
        if plan is None:
            return tasks
        opts = RunFacts.stored(run)  # (memory keeps its own facts here, updated in place)
        again, grown, finals = aws_memory.plan_retries(plan, opts, tasks, list(self._aws(plan).instance_types))
        if finals:
            store.save_tasks(finals)
        if not again:
            return store.get_tasks(run.run_id) if finals else tasks
        env = self._prepare_round(plan, run)
        staged = self._stage(plan, run, env, again)
        opts[aws_memory.KEY] = grown
        records = {t.task_id: t for t in tasks}
        submitter = self._submitter(env, store, plan, staged)
        submitter.memory = {tid: int(grown[tid]["mib"]) for tid in again if tid in grown}
        submitter.submit_round(plan, run, records, again, int(opts.get("round", 0)) + 1)
        store.save_run(run)
        return store.get_tasks(run.run_id)

    def _count_attempts(self, changed: dict[str, TaskRecord], parents: dict[str, dict[str, Any]],
                        always: frozenset[str] | set[str] = frozenset()) -> None:
        """Attempts of array children that just ended: each try of the command is one Batch
        attempt (payloads.retry_strategy), so ``attempts`` means what it means locally.

        ListJobs summaries carry no attempts, so the children that may have needed more than one
        are described (100 per call, once: an ended child never changes): a FAILED child, and a
        SUCCEEDED one of a stage with ``retries`` (its job allows more than ``1 + INFRA_RETRIES``
        attempts: ``retryStrategy.attempts`` in the parent's DescribeJobs, which AWS returns and
        moto does not). A child of a stage without retries that succeeded tried once (an attempt
        lost to a spot reclaim shows in ``corral logs --attempt`` and the report's history)."""
        want: list[str] = []
        for t in changed.values():
            if ":" not in t.external_id or t.state not in (TaskState.SUCCEEDED, TaskState.FAILED):
                continue
            allowed = int(((parents.get(parent_of(t.external_id)) or {}).get("retryStrategy") or {})
                          .get("attempts") or 1)
            if allowed > 1 + pl.INFRA_RETRIES or (allowed > 1 and t.state == TaskState.FAILED) or t.task_id in always:
                want.append(t.external_id)
        if not want:
            return
        described = self.api.describe_jobs(want)
        for t in list(changed.values()):
            job = described.get(t.external_id)
            if job is not None and job.get("attempts"):
                changed[t.task_id] = t.replace(attempts=len(job["attempts"]))

    def _skipped_in_job(self, run: RunRecord, tasks: list[TaskRecord], changed: dict[str, TaskRecord]) -> None:
        """Tasks whose job found their outputs there and ran nothing (payloads.SKIP_MARK): SKIPPED,
        "outputs exist", as locally. One FilterLogEvents (pages of matches) over the run's log group
        when a child of such a stage has just succeeded, or the run is ending; each time it reads
        every mark of the run so far, so a line CloudWatch indexed late is found next time."""
        from corral.backends.aws_batch.logs import DEFAULT_LOG_GROUP, skip_marks

        stages = set(RunFacts.of(run).get("skip_in_job") or [])
        if not stages:
            return
        current = {t.task_id: changed.get(t.task_id, t) for t in tasks}
        done = [t for t in current.values() if t.stage in stages and t.state == TaskState.SUCCEEDED]
        newly = any(t.task_id in changed for t in done)
        ending = all(t.state.terminal for t in current.values())
        if not done or not (newly or ending):
            return
        group = RunFacts.of(run).log_group or DEFAULT_LOG_GROUP
        try:
            marked = skip_marks(self.clients.logs, group, run.run_id, since_s=run.created_at)
        except CorralError as exc:
            self.say(f"run {run.run_id}: could not read which tasks found their outputs ({exc.one_line()}); "
                     "they are recorded SUCCEEDED")
            return
        for t in done:
            if t.external_id in marked:
                changed[t.task_id] = t.replace(state=TaskState.SKIPPED, reason="outputs exist", attempts=0)

    @staticmethod
    def _name_missing_outputs(run: RunRecord, store: StateStore, changed: dict[str, TaskRecord]) -> None:
        """A child whose wrapper found a declared output missing exits OUTPUT_MISSING_BASE + i
        (payloads.outputs_words): its reason names output i, as the local backend's does."""
        base = pl.OUTPUT_MISSING_BASE
        hits = [t for t in changed.values() if t.state == TaskState.FAILED and t.exit_code is not None
                and base <= t.exit_code < base + pl.MAX_CHECKED_OUTPUTS]
        if not hits:
            return
        try:
            plan = Plan.from_manifest(store.load_manifest(run.run_id)).with_keys(
                {t.task_id: t.item_key for t in hits})
        except CorralError:
            return
        for t in hits:
            task = plan.by_id.get(t.task_id)
            i = int(t.exit_code or 0) - base
            if task is None or i >= len(task.stage.outputs):
                continue
            uri = task.paths("outputs", run.run_id, "")[i]
            changed[t.task_id] = changed[t.task_id].replace(reason=f"{OUTPUT_MISSING}: {uri}")

    def cancel(self, run: RunRecord, store: StateStore) -> None:
        with store.lease(run.run_id, "cancel"):
            self._cancel(run, store)

    def _cancel(self, run: RunRecord, store: StateStore) -> None:
        tasks = store.get_tasks(run.run_id)
        if RunFacts.of(run).submitted:
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
            runstate.settle(store, run.run_id, RunState.CANCELLED)

    def logs(
        self, run: RunRecord, store: StateStore, task: TaskRecord, attempt: int | None, follow: bool
    ) -> Iterator[str]:
        if not is_job_id(task.external_id):
            yield f"(task {task.label} has not been submitted yet: {task.state.value})"
            return
        job_id = task.external_id
        default_group = RunFacts.of(run).log_group or ""
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
    # -- helpers ------------------------------------------------------------------------------
    def _submitter(self, env: Any, store: StateStore, plan: Plan, staged: dict[str, str] | None = None,
                   skip_in_job: set[str] | None = None) -> Submitter:
        queues = Queues(env.job_queue, getattr(env, "gpu_job_queue", None), getattr(env, "fargate_job_queue", None))
        return Submitter(
            self.api, store, self._context(env, plan), queues,
            tags=dict(self.settings.tags or {}), after_submit=self.after_submit,
            rclone_secrets=self._secrets, s3_endpoint=self._s3_endpoint(),
            instance_types=list(self._aws(plan).instance_types),
            staged=staged, base_dir=plan.workflow.base_dir,
            share_identifier=getattr(self._aws(plan), "share_identifier", "corral"),
            user_queues=[q for q in [self._aws(plan).queue] if q],
            caps=self._caps, skip_in_job=skip_in_job or (),
            rclone_image=self._rclone_image,
        )

    def _s3_endpoint(self) -> str | None:
        """The S3 endpoint transfer jobs use: only set for S3-compatible stores (and tests)."""
        import os

        return (
            self.clients.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )

    @staticmethod
    def _update_run_state(run: RunRecord, store: StateStore, tasks: list[TaskRecord]) -> None:
        if not tasks or run.state != RunState.RUNNING or not all(t.state.terminal for t in tasks):
            return
        run.state = runstate.end(store, run.run_id, tasks).state  # (from the stored run, not ours)

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


def _plan_of(store: StateStore, run: RunRecord) -> Plan | None:
    try:
        return Plan.from_manifest(store.load_manifest(run.run_id))
    except CorralError:
        return None


def skip_done(plan: Plan, run: RunRecord, store: StateStore, records: dict[str, TaskRecord], candidates: set[str],
              options: RunOptions) -> set[str]:
    """Skip-if-done before submission, as locally: a task whose declared outputs all exist where
    this machine can see them (s3://, rclone remotes, local paths; not workspace://, which only a
    job sees) and are not older than its inputs is recorded SKIPPED ("outputs exist") and not
    submitted — unless ``options.force``. Returns the ids skipped (``records`` updated)."""
    from corral import storage
    from corral.errors import StorageError
    from corral.reuse import forced_stages

    if options.force:
        return set()
    forced = forced_stages(plan, options.force_stages)
    skipped: list[TaskRecord] = []
    for task in plan.tasks:
        if task.id not in candidates or not task.stage.outputs or task.stage.name in forced:
            continue
        if any(o.startswith("workspace://") or "{workdir}" in o for o in task.stage.outputs):
            continue
        try:
            done = storage.outputs_exist(
                task.paths("outputs", run.run_id, ""), task.paths("inputs", run.run_id, ""),
                run_id=run.run_id, workdir="/nonexistent-workspace", base_dir=plan.workflow.base_dir,
            )
        except StorageError:
            continue  # cannot tell from here: the job runs
        if done:
            rec = records[task.id].replace(state=TaskState.SKIPPED, reason="outputs exist", ended_at=now())
            records[task.id] = rec
            skipped.append(rec)
    store.save_tasks(skipped)
    return {t.task_id for t in skipped}


def _skip_in_job(plan: Plan, run: RunRecord, options: RunOptions) -> set[str]:
    """The stages whose jobs check skip-if-done themselves (their outputs are on the workspace,
    which only a job sees: payloads.in_job_skip), unless forced; recorded for the refresh."""
    from corral.reuse import forced_stages

    stages: set[str] = set()
    if not options.force:
        forced = forced_stages(plan, options.force_stages)
        stages = {s.name for s in plan.workflow.stages if pl.in_job_skip(s) and s.name not in forced}
    opts = RunFacts.stored(run)
    opts["skip_in_job"] = sorted(set(opts.get("skip_in_job") or []) | stages)
    return stages


def _record_where(run: RunRecord, plan: Plan, env: Any) -> RunFacts:
    """Record in the run's :class:`RunFacts` where the run lives, so any machine can follow it:
    its queues (a queue missing from the record is filled in from ``env``; resume/cancel look for
    jobs in each), region, log group and state table, its cleanup stages (for the cleanup after a
    failure) and its EFS workspace with the roles that mount it (for ``corral aws teardown --run``).
    What is recorded already stays: a resume keeps the run's first answers."""
    facts = RunFacts.of(run)
    facts = facts.replace(**{key: getattr(facts, key) or getattr(env, key, None)
                             for key in ("job_queue", "gpu_job_queue", "fargate_job_queue")})
    return facts.with_defaults(
        region=env.region,
        log_group=getattr(env, "log_group", "") or "",
        table=getattr(env, "table_name", "") or "",
        cleanup_stages=tuple(s.name for s in plan.workflow.stages if s.kind == "cleanup"),
        efs_id=getattr(env, "efs_id", "") or "",
        efs_access_point=getattr(env, "efs_access_point", "") or "",
        job_role_arn=getattr(env, "job_role_arn", "") or "",
        execution_role_arn=getattr(env, "execution_role_arn", "") or "",
        assign_public_ip=plan.workflow.aws.assign_public_ip,
    ).save_to(run)
