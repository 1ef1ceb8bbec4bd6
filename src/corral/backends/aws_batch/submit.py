"""Submission: a plan's tasks → few array jobs with N_TO_N dependencies, exactly once.

Layout of one submission *round* (``start`` is round 0, each ``resume`` the next round):

- ``U``: the item indices having some per-item task to submit. Every per-item stage with work in
  the round becomes one array job per *chunk* of ``U``; all stages share the same cut, so child
  ``k`` of chunk ``c`` is the same item in every stage and ``convert`` depends on ``fetch``
  N_TO_N. A child whose task needs no run (it already succeeded; only on resume) gets a padding
  row that exits 0 at once. Chunks hold ≤ 10,000 items and keep every SubmitJob payload < 30 KiB.
- a per-run stage is one plain job depending on the whole arrays (or jobs) it needs;
- more than 20 dependencies are fanned in through no-op barrier jobs (arrays of the same size for
  array dependents, so N_TO_N alignment is kept).

Exactly once: job names are deterministic (``corral-<run>-<stage>-r<round>[-c<chunk>]``) and the
intent is in the store *before* any SubmitJob: for round 0 the chunk sizes in the run's options
(the names and child indices of every task follow from them); for later rounds each task's
``external_id`` is ``intent:<job name>:<child>:<size>``. Before a round, :func:`reconcile` lists
the run's jobs by name prefix (ListJobs with a JOB_NAME filter sees every status) and adopts any
job that was submitted but not recorded (a crash between SubmitJob and the store write), so it is
never submitted twice.

Every Batch call goes through :class:`BatchApi`: a token bucket keeps under Batch's shared 50 TPS,
and botocore's adaptive retry mode (``AwsClients``) absorbs throttling errors.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.backends.aws_batch import caps
from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch.client import aws_errors, http_status, is_throttling
from corral.backends.aws_batch.fair_share import DEFAULT_SHARE, FairShare
from corral.backends.aws_batch.run_facts import OPTIONS_KEY as OPTIONS_KEY  # (the old name, kept)
from corral.backends.aws_batch.run_facts import RunFacts
from corral.errors import BackendError
from corral.model import RunRecord, TaskRecord, TaskState
from corral.plan import Plan, Task
from corral.routes import Route, route
from corral.spec import Stage
from corral.state.base import StateStore

INTENT = "intent:"
DEFAULT_RATE = 40.0  # calls per second, under Batch's 50 TPS shared by all its APIs
DESCRIBE_CHUNK = 100
LIST_PAGE = 1000


class TokenBucket:
    """At most ``rate`` acquisitions per second on average, bursts up to ``burst``."""

    def __init__(
        self,
        rate: float = DEFAULT_RATE,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate / 4)
        self.tokens = self.capacity
        self.clock = clock
        self.sleep = sleep
        self.last = clock()
        self._lock = threading.Lock()

    def acquire(self, n: float = 1.0) -> float:
        """Take ``n`` tokens, sleeping as long as needed; returns the time slept."""
        waited = 0.0
        with self._lock:
            while True:
                t = self.clock()
                self.tokens = min(self.capacity, self.tokens + (t - self.last) * self.rate)
                self.last = t
                if self.tokens >= n - 1e-9:  # (float refills land a hair under whole tokens)
                    self.tokens = max(0.0, self.tokens - n)
                    return waited
                wait = (n - self.tokens) / self.rate
                self.sleep(wait)
                waited += wait


SUBMIT_ATTEMPTS = 8  # SubmitJob sends (throttled or lost) before giving up
LOOKUP_POLLS = 4  # ListJobs look-ups of a job name after a lost SubmitJob response, before re-sending


class BatchApi:
    """The Batch calls corral makes, each rate-limited and with botocore errors made corral errors.

    ``submit_client`` (a Batch client without automatic retries, ``AwsClients.batch_once``) sends
    SubmitJob: see :meth:`submit_job`. Without it, ``client`` does (and botocore may re-send)."""

    def __init__(self, client: Any, bucket: TokenBucket | None = None, *, submit_client: Any = None) -> None:
        self.client = client
        self.bucket = bucket or TokenBucket()
        self.submit_client = submit_client

    def submit_job(self, kwargs: Mapping[str, Any]) -> str:
        """SubmitJob exactly once per job name, although SubmitJob has no idempotency token.

        The call is sent by a client that never re-sends it. Throttling (which AWS answers without
        acting) is retried with backoff. A lost response — connection closed or timed out after the
        request went out, or a 5xx — may hide a job Batch made: the job is looked up by its
        (deterministic, unique) name with ListJobs, polled with backoff since ListJobs is eventually
        consistent; only when it is still absent is SubmitJob sent again."""
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
        )
        from botocore.exceptions import ReadTimeoutError as BotoReadTimeout

        client = self.submit_client or self.client
        name = str(kwargs["jobName"])
        delay = 0.2
        for attempt in range(1, SUBMIT_ATTEMPTS + 1):
            self.bucket.acquire()
            last = attempt == SUBMIT_ATTEMPTS
            try:
                return str(client.submit_job(**kwargs)["jobId"])
            except (EndpointConnectionError, ConnectTimeoutError) as exc:
                # not connected: the request never reached Batch
                if last:
                    with aws_errors(f"submit job {name}"):
                        raise exc from None
            except (ConnectionClosedError, BotoReadTimeout) as exc:
                found = self._look_up(kwargs, delay)
                if found:
                    return found
                if last:
                    with aws_errors(f"submit job {name}"):
                        raise exc from None
            except ClientError as exc:
                if is_throttling(exc):
                    if last:
                        with aws_errors(f"submit job {name}"):
                            raise
                elif http_status(exc) >= 500:
                    found = self._look_up(kwargs, delay)
                    if found:
                        return found
                    if last:
                        with aws_errors(f"submit job {name}"):
                            raise
                else:
                    with aws_errors(f"submit job {name}"):
                        raise
            self.bucket.sleep(delay)
            delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")  # pragma: no cover

    def _look_up(self, kwargs: Mapping[str, Any], delay: float) -> str | None:
        """The id of the job named ``kwargs['jobName']`` in its queue (the oldest), or None."""
        name = str(kwargs["jobName"])
        for poll in range(LOOKUP_POLLS):
            if poll:
                self.bucket.sleep(delay)
                delay = min(delay * 2, 10.0)
            found = [
                j for j in self.list_jobs(
                    f"look up job {name} after a lost SubmitJob response", jobQueue=kwargs["jobQueue"],
                    filters=[{"name": "JOB_NAME", "values": [name]}],
                )
                if j.get("jobName") == name and ":" not in j["jobId"]
            ]
            if found:
                return str(min(found, key=lambda j: (j.get("createdAt", 0), j["jobId"]))["jobId"])
        return None

    def call(self, op: str, action: str, **kwargs: Any) -> dict[str, Any]:
        self.bucket.acquire()
        with aws_errors(action):
            result: dict[str, Any] = getattr(self.client, op)(**kwargs)
        return result

    def describe_jobs(self, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Jobs by id, in chunks of 100 (DescribeJobs is eventually consistent right after SubmitJob:
        a missing id is simply absent from the result)."""
        out: dict[str, dict[str, Any]] = {}
        ids = list(dict.fromkeys(job_ids))
        for i in range(0, len(ids), DESCRIBE_CHUNK):
            resp = self.call("describe_jobs", "describe Batch jobs", jobs=ids[i : i + DESCRIBE_CHUNK])
            for job in resp.get("jobs", []):
                out[job["jobId"]] = job
        return out

    def list_jobs(self, action: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            page = self.call("list_jobs", action, maxResults=LIST_PAGE, **kwargs, **({"nextToken": token} if token else {}))
            yield from page.get("jobSummaryList", [])
            token = page.get("nextToken")
            if not token:
                return


# -- names --------------------------------------------------------------------------------------
def _safe(text: str, limit: int) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]", "-", text)
    if len(s) <= limit:
        return s
    return s[: limit - 13] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def run_prefix(run_id: str) -> str:
    return f"corral-{_safe(run_id, 60)}-"


def job_name(run_id: str, stage: str, round_: int, chunk: int | None) -> str:
    name = f"{run_prefix(run_id)}{_safe(stage, 40)}-r{round_}"
    return name if chunk is None else f"{name}-c{chunk}"


def parse_job_name(plan: Plan, run_id: str, name: str) -> tuple[str, int, int | None] | None:
    """(stage, round, chunk) of a job corral named with :func:`job_name`; None for barriers and
    names of other runs."""
    m = re.fullmatch(re.escape(run_prefix(run_id)) + r"(.+)-r(\d+)(?:-c(\d+))?", name)
    if m is None:
        return None
    for s in plan.stage_order:
        if _safe(s, 40) == m.group(1):
            return s, int(m.group(2)), None if m.group(3) is None else int(m.group(3))
    return None


def child_tasks(plan: Plan, run_id: str, job: Mapping[str, Any]) -> list[Task | None]:
    """The task each child of a submitted job (as DescribeJobs returns it) runs, from the layout
    alone — never from a task id in its row: the job name gives the stage; child ``k`` runs the
    stage's task of item :func:`payloads.child_item_index` (None: a padding child). Barriers: []."""
    parsed = parse_job_name(plan, run_id, job.get("jobName", ""))
    env = {e["name"]: e["value"] for e in (job.get("container") or {}).get("environment", [])}
    if parsed is None or pl.TABLE_VAR not in env:
        return []
    stage = parsed[0]
    tasks = plan.stage_tasks(stage)
    rows = pl.decode_table(env[pl.TABLE_VAR])
    if plan.workflow.stage(stage).per != "item":
        return [tasks[0] if rows[0] != pl.PADDING_ROW else None]
    by_index = {t.index: t for t in tasks}
    out: list[Task | None] = []
    for k, row in enumerate(rows):
        index = pl.child_item_index(env, k, row)
        out.append(None if index is None else by_index[index])
    return out


def parent_of(external_id: str) -> str:
    return external_id.split(":", 1)[0]


def is_job_id(external_id: str) -> bool:
    return bool(external_id) and not external_id.startswith(INTENT)


def child_id(job_id: str, k: int, size: int) -> str:
    return f"{job_id}:{k}" if size > 1 else job_id


@dataclass(frozen=True)
class Expected:
    """Where a task is (or was about to be) submitted: job name, child index, array size."""

    name: str
    k: int
    size: int


def expected_job(run: RunRecord, task: TaskRecord) -> Expected | None:
    """The job a task that is not recorded as submitted may nonetheless have been submitted in."""
    ext = task.external_id
    if ext.startswith(INTENT):
        name, k, size = ext[len(INTENT) :].rsplit(":", 2)
        return Expected(name, int(k), int(size))
    if ext or task.state != TaskState.PENDING:
        return None
    sizes = RunFacts.of(run).round0_chunks
    if sizes is None:
        return None
    if task.item_index is None:
        return Expected(job_name(run.run_id, task.stage, 0, None), 0, 1)
    start = 0
    for c, n in enumerate(sizes):
        if task.item_index < start + n:
            return Expected(job_name(run.run_id, task.stage, 0, c), task.item_index - start, n)
        start += n
    return None


# -- reconciliation ------------------------------------------------------------------------------
def find_run_jobs(api: BatchApi, queues: Iterable[str], run_id: str) -> dict[str, list[dict[str, Any]]]:
    """The run's jobs (parents and plain jobs, every status) by job name."""
    prefix = run_prefix(run_id)
    out: dict[str, list[dict[str, Any]]] = {}
    for q in dict.fromkeys(q for q in queues if q):
        for job in api.list_jobs(
            "list the run's Batch jobs", jobQueue=q, filters=[{"name": "JOB_NAME", "values": [prefix + "*"]}]
        ):
            if ":" in job["jobId"] or not job["jobName"].startswith(prefix):
                continue  # array children (moto lists them too) and other runs' jobs
            out.setdefault(job["jobName"], []).append(job)
    for jobs in out.values():
        jobs.sort(key=lambda j: (j.get("createdAt", 0), j["jobId"]))
    return out


def reconcile(
    api: BatchApi,
    run: RunRecord,
    store: StateStore,
    tasks: list[TaskRecord],
    queues: Iterable[str],
    *,
    settle_polls: int = 2,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[TaskRecord], int]:
    """Adopt jobs submitted but not recorded: (the tasks with those updates, saved; how many adopted)."""
    expected = {t.task_id: e for t in tasks if (e := expected_job(run, t)) is not None}
    if not expected:
        return tasks, 0
    queues = list(queues)
    wanted = {e.name for e in expected.values()}
    found = find_run_jobs(api, queues, run.run_id)
    delay = 1.0
    for _ in range(settle_polls):
        # ListJobs is eventually consistent: a job submitted just before a crash may show late.
        if wanted <= set(found):
            break
        sleep(delay)
        delay *= 2
        found = find_run_jobs(api, queues, run.run_id)
    adopted: list[TaskRecord] = []
    out: list[TaskRecord] = []
    for t in tasks:
        e = expected.get(t.task_id)
        if e is not None and e.name in found:
            job = found[e.name][0]
            t = t.replace(
                state=TaskState.SUBMITTED, external_id=child_id(job["jobId"], e.k, e.size), reason="",
                exit_code=None, started_at=None, ended_at=None,
            )
            adopted.append(t)
        out.append(t)
    store.save_tasks(adopted)
    return out, len(adopted)


# -- submission ----------------------------------------------------------------------------------
@dataclass
class Queues:
    default: str
    gpu: str | None = None
    fargate: str | None = None  # platformCapabilities FARGATE jobs only

    def for_stage(self, gpus: int, fargate: bool = False) -> str:
        if fargate:
            if not self.fargate:
                raise BackendError(
                    "a stage is routed to Fargate but the run has no Fargate job queue",
                    "run `corral aws setup --fargate` (or `corral resume`, which sets it up), or leave "
                    "`fargate` out of aws.instance_types",
                )
            return self.fargate
        return self.gpu if gpus and self.gpu else self.default

    def for_route(self, route: Route) -> str:
        """The queue of a stage's route (:attr:`corral.routes.Route.queue`)."""
        return self.for_stage(route.gpus, fargate=route.fargate)

    def all(self) -> list[str]:
        """Every queue the run uses (jobs are looked for in each)."""
        return [q for q in (self.default, self.gpu, self.fargate) if q]


@dataclass
class RoundResult:
    submitted: dict[str, str] = field(default_factory=dict)  # job name -> job id
    barriers: list[str] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)


class Submitter:
    """Submits one round of a run's tasks. ``api`` is rate-limited; ``ctx`` shapes job definitions."""

    def __init__(
        self,
        api: BatchApi,
        store: StateStore,
        ctx: pl.JobContext,
        queues: Queues,
        *,
        tags: Mapping[str, str] | None = None,
        after_submit: Callable[[str, str], None] | None = None,
        rclone_secrets: Mapping[str, str] | None = None,
        s3_endpoint: str | None = None,
        instance_types: Sequence[str] = (),
        staged: Mapping[str, str] | None = None,
        base_dir: Path | None = None,
        share_identifier: str = DEFAULT_SHARE,
        user_queues: Sequence[str] = (),
        caps: Mapping[str, str] | None = None,
        skip_in_job: Iterable[str] = (),
    ) -> None:
        self.api = api
        # stages whose jobs check skip-if-done themselves (payloads.in_job_skip; not with --force)
        self.skip_in_job = set(skip_in_job)
        self.caps = dict(caps or {})  # stage -> its consumable resource (max_parallel, caps.py)
        # the workflow's aws.instance_types: with `fargate` there, stages that fit go to Fargate
        self.instance_types = list(instance_types)
        self.store = store
        self.ctx = ctx
        self.queues = queues
        self.tags = dict(tags or {})
        self.after_submit = after_submit  # test hook: called with (job name, job id)
        self._defs: dict[str, str] = {}
        self.contiguous = False
        # {CORRAL_RCLONE_CONFIG: secret ARN} for transfer stages (storage.aws.prepare_rclone_secret)
        self.rclone_secrets = dict(rclone_secrets or {})
        self.s3_endpoint = s3_endpoint  # only for S3-compatible stores and tests
        # local `from:` path -> its staged s3:// URI (staging.stage_local_sources); base_dir:
        # the workflow's folder, which relative local paths are read against
        self.staged = dict(staged or {})
        self.base_dir = base_dir
        # shareIdentifier on fair-share queues (fair_share.py)
        # task id -> MiB its job asks for instead of the stage's (a resubmission after an OOM kill)
        self.memory: dict[str, int] = {}
        self.fair_share = FairShare(lambda **kw: api.call("describe_job_queues", "describe job queue", **kw),
                                    share_identifier, user_queues)

    def route(self, stage: Stage) -> Route:
        """Where the stage runs (queue, platform, requirements): :func:`corral.routes.route`."""
        return route(stage.resources, self.instance_types)

    # -- transfer and cleanup stages ----------------------------------------------------------
    @staticmethod
    def runs_rclone(stage: Stage) -> bool:
        """A stage whose container command is built by corral (a transfer, a cleanup without command)."""
        return stage.kind == "transfer" or (stage.kind == "cleanup" and stage.command is None)

    def job_stage(self, stage: Stage) -> Stage:
        """The stage as its job definition is built: transfers in the rclone image with the secret."""
        from corral.storage.aws import job_stage

        return job_stage(stage, secrets=self.rclone_secrets) if self.runs_rclone(stage) else stage

    @staticmethod
    def program_of(stage: Stage) -> str | None:
        """The script a stage's job definition runs the row's argv with: the transfer script for a
        transfer (once per job definition, not once per row); None (the argv runs as is) otherwise."""
        if stage.kind != "transfer":
            return None
        from corral.storage.aws import TRANSFER_SCRIPT

        return TRANSFER_SCRIPT

    def _argv_of(self, stage: Stage, run_id: str, workdir: str) -> Callable[[Task], Sequence[str]] | None:
        if not self.runs_rclone(stage):
            return None
        from corral.storage.aws import TRANSFER_SCRIPT, task_argv

        root = workdir.rsplit("/", 1)[0]
        prefix = ["/bin/sh", "-c", TRANSFER_SCRIPT, "corral-transfer"]
        program = self.program_of(stage)

        def argv(task: Task) -> Sequence[str]:
            words = task_argv(
                task, run_id=run_id, workdir=workdir, region=self.ctx.region, workspace_root=root,
                endpoint=self.s3_endpoint, stage_local=self._staged_uri, base_dir=self.base_dir,
            )
            if program is not None:
                assert words[:4] == prefix, "a transfer's argv starts with the transfer script"
                return words[4:]  # the script is the job definition's (pl.wrapper(program))
            return words

        return argv

    def definition_spec(self, stage: Stage, table: pl.StageTable) -> pl.JobDefinitionSpec:
        """The job definition a stage's jobs run with (content-hashed name, see payloads): its
        runtime, the wrapper and the stage's job-wide variables."""
        job = self.job_stage(stage)  # (same resources as the stage: it only swaps image and secrets)
        fargate = self.route(stage).fargate
        cap = self.caps.get(stage.name)
        return pl.job_definition(
            job, self.ctx, fargate=fargate, program=self.program_of(stage), env=table.definition_env,
            consumable=caps.requirement(cap) if cap else None,
        )

    def _staged_uri(self, path: str) -> str:
        uri = self.staged.get(path)
        if uri is None:
            from corral.errors import StorageError

            raise StorageError(
                f"{path} is a path on this machine that was not staged to S3 for this run",
                "use s3://bucket/key, workspace://path or an rclone remote (name:path) in transfers on AWS",
            )
        return uri

    # -- job definitions ----------------------------------------------------------------------
    def definition_arn(self, spec: pl.JobDefinitionSpec) -> str:
        """Reuse an ACTIVE definition with this (content-hashed) name, else register it."""
        arn = self._defs.get(spec.name)
        if arn:
            return arn
        found = self.api.call(
            "describe_job_definitions", f"look up job definition {spec.name}",
            jobDefinitionName=spec.name, status="ACTIVE",
        ).get("jobDefinitions", [])
        if found:
            arn = max(found, key=lambda d: d.get("revision", 0))["jobDefinitionArn"]
        else:
            arn = self.api.call(
                "register_job_definition", f"register job definition {spec.name}", **spec.kwargs
            )["jobDefinitionArn"]
        self._defs[spec.name] = arn
        return arn

    # -- one round ----------------------------------------------------------------------------
    def layout(
        self, plan: Plan, run_id: str, to_submit: set[str]
    ) -> tuple[list[int], list[int], dict[str, list[str]], dict[str, pl.StageTable]]:
        """(U, chunk sizes, rows per per-item stage, table encoder per stage) for these tasks."""
        workdir = pl.workdir_for(run_id, self.ctx)
        item_stages = [
            s for s in plan.stage_order
            if plan.workflow.stage(s).per == "item" and any(t.id in to_submit for t in plan.stage_tasks(s))
        ]
        U = sorted({t.index for t in plan.tasks if t.id in to_submit and t.index is not None})
        self.contiguous = bool(U) and U[-1] - U[0] + 1 == len(U)  # then CORRAL_INDEX_BASE replaces a column
        rows: dict[str, list[str]] = {}
        tables: dict[str, pl.StageTable] = {}
        for s in plan.stage_order:
            stage_tasks = plan.stage_tasks(s)
            if not any(t.id in to_submit for t in stage_tasks):
                continue
            stage = plan.workflow.stage(s)
            per_item = stage.per == "item"
            tables[s] = pl.StageTable(
                stage_tasks, run_id, workdir, index_column=not (per_item and self.contiguous),
                argv_of=self._argv_of(stage, run_id, workdir),
            )
            if s not in item_stages:
                continue
            by_index = {t.index: t for t in stage_tasks}
            rows[s] = [
                tables[s].row(by_index[j]) if by_index[j].id in to_submit else pl.PADDING_ROW for j in U
            ]
        # Each stage's table within what its job's ECS override (≤ 8,192 characters, the same for
        # every child) and its SubmitJob request (≤ 30 KiB) leave: see pl.table_budget.
        budgets = [
            pl.table_budget(self.definition_spec(plan.workflow.stage(s), tables[s]), self._chunk_env(tables[s], 0))
            for s in item_stages
        ]
        sizes = pl.chunk_bounds([rows[s] for s in item_stages], budgets)
        return U, sizes, rows, tables

    def submit_round(
        self,
        plan: Plan,
        run: RunRecord,
        records: dict[str, TaskRecord],
        to_submit: set[str],
        round_: int,
    ) -> RoundResult:
        """Submit ``to_submit`` (task ids) of the run as round ``round_`` and record them."""
        result = RoundResult()
        if not to_submit:
            return result
        run_id = run.run_id
        U, sizes, rows, tables = self.layout(plan, run_id, to_submit)
        result.chunks = sizes
        starts = [sum(sizes[:c]) for c in range(len(sizes))]

        # 1. intent, before any SubmitJob
        facts = RunFacts.of(run).replace(round=round_)
        if round_ == 0 and len(to_submit) == len(plan.tasks):
            # Every task, items 0..n-1 in order: the chunk sizes name every task's job and child.
            facts.replace(round0_chunks=tuple(sizes)).save_to(run)
            self.store.save_run(run)
        else:
            facts.save_to(run)
            self.store.save_run(run)
            intents = []
            for t in plan.tasks:
                if t.id not in to_submit:
                    continue
                if t.index is None:
                    e = Expected(job_name(run_id, t.stage.name, round_, None), 0, 1)
                else:
                    pos = _bisect(U, t.index)
                    c = _chunk_of(starts, sizes, pos)
                    e = Expected(job_name(run_id, t.stage.name, round_, c), pos - starts[c], sizes[c])
                intents.append(
                    records[t.id].replace(
                        state=TaskState.PENDING, external_id=f"{INTENT}{e.name}:{e.k}:{e.size}", reason="",
                        exit_code=None, started_at=None, ended_at=None,
                    )
                )
            self.store.save_tasks(intents)

        # 2. submit, stage by stage in dependency order
        jobs: dict[tuple[str, int | None], tuple[str, int]] = {}  # (stage, chunk|None) -> (job id, size)
        tags = {**self.tags, "corral:managed": "true", "corral:run": run_id}
        for s in plan.stage_order:
            stage = plan.workflow.stage(s)
            job = self.job_stage(stage)  # (same resources as the stage: it only swaps image and secrets)
            rt = self.route(stage)
            fargate = rt.fargate
            image = job.image or ""
            queue = self.queues.for_route(rt)
            done: list[TaskRecord] = []
            if s not in tables:
                continue  # nothing of this stage in the round
            spec = self.definition_spec(stage, tables[s])
            if stage.per == "item":
                if s not in rows:
                    continue
                by_index = {t.index: t for t in plan.stage_tasks(s)}
                for c, n in enumerate(sizes):
                    a = starts[c]
                    members = [by_index[j] for j in U[a : a + n]]
                    if not any(t.id in to_submit for t in members):
                        continue
                    deps = self._deps_item(plan, stage, members, c, n, jobs, records, to_submit)
                    name = job_name(run_id, s, round_, c)
                    deps = self._fan_in(deps, n, name, image, queue, tags, fargate=fargate)
                    kwargs = pl.submit_kwargs(
                        job_name=name, job_queue=queue, job_definition=self.definition_arn(spec), size=n,
                        table=pl.encode_table(rows[s][a : a + n]), env=self._chunk_env(tables[s], U[a]),
                        depends_on=deps, tags=tags,
                    )
                    self._with_memory(kwargs, stage, [t.id for t in members if t.id in to_submit], fargate)
                    job_id = self._submit(kwargs, spec)
                    result.submitted[name] = job_id
                    jobs[(s, c)] = (job_id, n)
                    for k, t in enumerate(members):
                        if t.id in to_submit:
                            done.append(_submitted(records[t.id], child_id(job_id, k, n)))
            else:
                (task,) = plan.stage_tasks(s)
                if task.id not in to_submit:
                    continue
                deps = self._deps_run(plan, stage, jobs, records, to_submit)
                name = job_name(run_id, s, round_, None)
                deps = self._fan_in(deps, 1, name, image, queue, tags, fargate=fargate)
                kwargs = pl.submit_kwargs(
                    job_name=name, job_queue=queue, job_definition=self.definition_arn(spec), size=1,
                    table=pl.encode_table([tables[s].row(task)]), env=self._job_env(tables[s]), depends_on=deps,
                    tags=tags,
                )
                self._with_memory(kwargs, stage, [task.id], fargate)
                job_id = self._submit(kwargs, spec)
                result.submitted[name] = job_id
                jobs[(s, None)] = (job_id, 1)
                done.append(_submitted(records[task.id], job_id))
            # 3. record what was submitted (a crash before this is healed by reconcile())
            self.store.save_tasks(done)
            for rec in done:
                records[rec.task_id] = rec
        return result

    def _with_memory(self, kwargs: dict[str, Any], stage: Stage, task_ids: list[str], fargate: bool) -> None:
        """A job's memory is fixed at SubmitJob: a task resubmitted for memory gets it as an override."""
        mib = max((self.memory.get(t, 0) for t in task_ids), default=0)
        if mib:
            from corral.backends.aws_batch.memory import overrides

            kwargs["containerOverrides"]["resourceRequirements"] = overrides(stage.resources, mib, fargate)

    def _chunk_env(self, table: pl.StageTable, first_index: int) -> dict[str, str]:
        """A chunk's override variables (besides its table): the stage's few override names, and
        the index of its first item when the round's items are consecutive."""
        env = self._job_env(table)
        if "CORRAL_ITEM_INDEX" in table.columns or not self.contiguous:
            return env
        return {**env, "CORRAL_INDEX_BASE": str(first_index)}

    def _job_env(self, table: pl.StageTable) -> dict[str, str]:
        """A job's override variables: the stage's few names, and CORRAL_SKIP_DONE where its job
        checks skip-if-done itself."""
        if table.env.get("CORRAL_STAGE") in self.skip_in_job:
            return {**table.override_env, "CORRAL_SKIP_DONE": "1"}
        return table.override_env

    def _submit(self, kwargs: dict[str, Any], spec: pl.JobDefinitionSpec | None = None) -> str:
        kwargs = {**kwargs, **self.fair_share.submit_kwargs(kwargs["jobQueue"])}
        size = pl.payload_size(kwargs)
        if size > pl.PAYLOAD_LIMIT:
            raise BackendError(
                f"the SubmitJob request for {kwargs['jobName']} would be {size} bytes (limit {pl.PAYLOAD_LIMIT})",
                "this is a corral bug: report it with the workflow",
            )
        if spec is not None:
            container = spec.kwargs.get("containerProperties", {})
            env = {e["name"]: e["value"] for e in kwargs.get("containerOverrides", {}).get("environment", [])}
            length = pl.overrides_length(container.get("command", []), env, container.get("resourceRequirements", []))
            if length + pl.BATCH_VARIABLES_RESERVE > pl.ECS_OVERRIDES_LIMIT:
                raise BackendError(
                    f"the container overrides of {kwargs['jobName']} would be {length} characters; with Batch's "
                    f"own variables that is over ECS's {pl.ECS_OVERRIDES_LIMIT} and every task would fail at launch",
                    "this is a corral bug: report it with the workflow",
                )
        job_id = self.api.submit_job(kwargs)
        if self.after_submit is not None:
            self.after_submit(kwargs["jobName"], job_id)
        return job_id

    # -- dependencies -------------------------------------------------------------------------
    def _upstream_live(self, records: dict[str, TaskRecord], task_id: str, to_submit: set[str]) -> str | None:
        """Job id (parent) to wait for when a needed task is not part of this round; None when done."""
        rec = records[task_id]
        if rec.state.ok:
            return None
        if not rec.state.terminal and is_job_id(rec.external_id):
            return parent_of(rec.external_id)
        raise BackendError(
            f"task {rec.label} is needed but neither done, running nor being submitted",
            "run `corral resume` to resubmit it",
        )

    def _deps_item(
        self, plan: Plan, stage: Any, members: list[Task], c: int, n: int,
        jobs: dict[tuple[str, int | None], tuple[str, int]], records: dict[str, TaskRecord], to_submit: set[str],
    ) -> list[dict[str, str]]:
        deps: list[dict[str, str]] = []
        seen: set[str] = set()

        def add(job_id: str, n_to_n: bool) -> None:
            if job_id not in seen:
                seen.add(job_id)
                deps.append({"jobId": job_id, "type": "N_TO_N"} if n_to_n and n > 1 else {"jobId": job_id})

        for need in stage.needs:
            nstage = plan.workflow.stage(need)
            key: tuple[str, int | None] = (need, c) if nstage.per == "item" else (need, None)
            if key in jobs:
                add(jobs[key][0], nstage.per == "item")
                continue
            # Not submitted in this round: wait for whatever of it is still in flight.
            for t in members:
                if t.id not in to_submit:
                    continue
                for up in t.needs:
                    if records[up].stage == need and (live := self._upstream_live(records, up, to_submit)):
                        add(live, False)
        return deps

    def _deps_run(
        self, plan: Plan, stage: Any, jobs: dict[tuple[str, int | None], tuple[str, int]],
        records: dict[str, TaskRecord], to_submit: set[str],
    ) -> list[dict[str, str]]:
        deps: list[dict[str, str]] = []
        seen: set[str] = set()
        for need in stage.needs:
            for (s, _c), (job_id, _n) in jobs.items():
                if s == need and job_id not in seen:
                    seen.add(job_id)
                    deps.append({"jobId": job_id})
            for t in plan.stage_tasks(need):
                if t.id in to_submit:
                    continue
                live = self._upstream_live(records, t.id, to_submit)
                if live and live not in seen:
                    seen.add(live)
                    deps.append({"jobId": live})
        return deps

    def _fan_in(
        self, deps: list[dict[str, str]], size: int, name: str, image: str, queue: str, tags: Mapping[str, str],
        *, fargate: bool = False,
    ) -> list[dict[str, str]]:
        """Collapse more than 20 dependencies through no-op barrier jobs of the same array size
        (in the dependent's queue, so on Fargate with a Fargate barrier definition)."""
        level = 0
        while len(deps) > pl.MAX_DEPENDS_ON:
            spec = pl.barrier_definition(image, self.ctx, fargate=fargate)
            arn = self.definition_arn(spec)
            merged: list[dict[str, str]] = []
            for g in range(0, len(deps), pl.MAX_DEPENDS_ON):
                kwargs = pl.submit_kwargs(
                    job_name=f"{name}-b{level}-{g // pl.MAX_DEPENDS_ON}", job_queue=queue, job_definition=arn,
                    size=size, table=None, env={}, depends_on=deps[g : g + pl.MAX_DEPENDS_ON], tags=tags,
                )
                bid = self._submit(kwargs)
                merged.append({"jobId": bid, "type": "N_TO_N"} if size > 1 else {"jobId": bid})
            deps = merged
            level += 1
        return deps


def _submitted(rec: TaskRecord, external_id: str) -> TaskRecord:
    return rec.replace(
        state=TaskState.SUBMITTED, external_id=external_id, reason="", exit_code=None, started_at=None,
        ended_at=None,
    )


def _bisect(seq: list[int], x: int) -> int:
    import bisect

    i = bisect.bisect_left(seq, x)
    assert seq[i] == x
    return i


def _chunk_of(starts: list[int], sizes: list[int], pos: int) -> int:
    import bisect

    c = bisect.bisect_right(starts, pos) - 1
    assert starts[c] <= pos < starts[c] + sizes[c]
    return c
