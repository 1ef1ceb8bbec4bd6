"""Submission against moto: few calls, aligned chunks, fan-in, exactly once across crashes, throttling."""

from __future__ import annotations

import collections
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from test_backend_support import CallCounter, make_environment, moto_parent_jobs, record_run, workflow_text

from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch.backend import AwsBatchBackend
from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.submit import TokenBucket, child_tasks, job_name
from corral.backends.base import RunOptions
from corral.model import TaskState
from corral.plan import Plan, make_plan
from corral.spec import loads_workflow
from corral.state.dynamodb import DynamoStore
from corral.state.sqlite import SqliteStore

pytestmark = pytest.mark.aws


def _backend(clients: AwsClients, env: Any, **kw: Any) -> AwsBatchBackend:
    return AwsBatchBackend(clients, environment=env, sleep=lambda s: None, **kw)


_PLANS: dict[int, Plan] = {}


def _plan(n: int) -> Plan:
    """Plans are immutable; parse each size once per session (YAML of 1,000 items takes a while)."""
    if n not in _PLANS:
        _PLANS[n] = make_plan(loads_workflow(workflow_text(n)))
    return _PLANS[n]


def _parents(clients: AwsClients, queue: str) -> list[dict[str, Any]]:
    """Every parent / plain job in the queue, described (moto lists children too: drop them)."""
    ids = [j["jobId"] for j in clients.batch.list_jobs(jobQueue=queue)["jobSummaryList"] if ":" not in j["jobId"]]
    out: list[dict[str, Any]] = []
    for i in range(0, len(ids), 100):
        out += clients.batch.describe_jobs(jobs=ids[i : i + 100])["jobs"]
    return out


def _runs_per_task(jobs: list[dict[str, Any]], plan: Plan, run_id: str) -> collections.Counter[str]:
    """How many Batch children would run each task, from the layout of every submitted job (job
    name → stage, child index → item; rows carry no task id unless the stage uses ``{task}``)."""
    count: collections.Counter[str] = collections.Counter()
    for job in jobs:
        env = {e["name"]: e["value"] for e in job["container"].get("environment", [])}
        children = child_tasks(plan, run_id, job)
        rows = pl.decode_table(env[pl.TABLE_VAR]) if children else []
        for task, row in zip(children, rows, strict=True):
            if task is None:
                continue
            count[task.id] += 1
            # The child's row is that task's item (what the wrapper exports is the task's own env).
            want = task.env(run_id, env["CORRAL_WORKDIR"])
            got = pl.row_values(env["CORRAL_COLUMNS"].split(), row) or {}
            assert {c: v for c, v in got.items() if c != "CORRAL_ARGV"} == {
                c: want[c] for c in got if c != "CORRAL_ARGV"}
    return count


def test_thousand_items_three_stages_in_few_calls(aws: str, tmp_path: Path) -> None:
    clients = AwsClients()
    env = make_environment(clients)
    plan = _plan(1000)
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan)
    counter = CallCounter(clients)
    _backend(clients, env).start(plan, run, store, RunOptions(wait=False))
    batch_calls = counter.count("batch")
    assert batch_calls <= 12, counter.calls
    # one per stage: runtime (convert is bigger) and the stage's argv template, in its environment
    assert counter.count("batch", "RegisterJobDefinition") == 3
    tasks = store.get_tasks(run.run_id)
    assert all(t.state == TaskState.SUBMITTED for t in tasks)
    assert len({t.external_id for t in tasks}) == 3000
    jobs = _parents(clients, env.job_queue)
    assert _runs_per_task(jobs, plan, run.run_id) == collections.Counter({t.task_id: 1 for t in tasks})
    by_name = {j["jobName"]: j for j in jobs}
    for c in range(len(run.options["aws_batch"]["round0_chunks"])):
        fetch, convert, upload = (by_name[job_name(run.run_id, s, 0, c)] for s in ("fetch", "convert", "upload"))
        assert convert["dependsOn"] == [{"jobId": fetch["jobId"], "type": "N_TO_N"}]
        assert upload["dependsOn"] == [{"jobId": convert["jobId"], "type": "N_TO_N"}]
        assert fetch["arrayProperties"]["size"] == convert["arrayProperties"]["size"]

    # A second run of the same workflow reuses the ACTIVE job definitions: no new registration.
    counter.reset()
    run2 = record_run(store, plan, "run-2")
    _backend(clients, env).start(plan, run2, store, RunOptions(wait=False))
    assert counter.count("batch", "RegisterJobDefinition") == 0
    assert counter.count("batch", "DescribeJobDefinitions") == 3


def test_big_items_split_into_aligned_chunks_under_30k(aws: str, tmp_path: Path) -> None:
    clients = AwsClients()
    env = make_environment(clients)
    rng = random.Random(3)
    items = [{"session": f"s{i}", "blob": "".join(rng.choice("abcdef0123456789") for _ in range(300))}
             for i in range(600)]
    wf = loads_workflow(
        "name: big\ndefaults: {image: busybox}\nitems: " + json.dumps(items) + """
stages:
  - {name: a, command: "echo {blob} > {session}"}
  - {name: b, needs: [a], command: "cat {session} && echo {blob}"}
  - {name: c, needs: [b], per: run, command: "echo all"}
"""
    )
    plan = make_plan(wf)
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan)
    bodies: list[int] = []
    clients.register_hook(
        "before-send.batch.SubmitJob", lambda request, **kw: bodies.append(len(request.body or b""))
    )
    _backend(clients, env).start(plan, run, store, RunOptions(wait=False))
    sizes = run.options["aws_batch"]["round0_chunks"]
    assert len(sizes) >= 3 and sum(sizes) == 600
    assert bodies and max(bodies) < 30 * 1024
    by_name = {j["jobName"]: j for j in _parents(clients, env.job_queue)}
    start = 0
    for c, n in enumerate(sizes):
        a, b = by_name[job_name(run.run_id, "a", 0, c)], by_name[job_name(run.run_id, "b", 0, c)]
        assert a["arrayProperties"]["size"] == b["arrayProperties"]["size"] == n
        rows_a = pl.decode_table({e["name"]: e["value"] for e in a["container"]["environment"]}[pl.TABLE_VAR])
        rows_b = pl.decode_table({e["name"]: e["value"] for e in b["container"]["environment"]}[pl.TABLE_VAR])
        for k in (0, n - 1):  # child k of both arrays is the same item
            assert rows_a[k].split()[0] == rows_b[k].split()[0] == f"s{start + k}"
        start += n
    final = by_name[job_name(run.run_id, "c", 0, None)]
    # (chunks are small under the 8,192-character override budget: past 20 the dependencies go
    # through no-op barrier jobs, each depending on at most 20)
    by_id = {j["jobId"]: j for j in by_name.values()}

    def upstream(job: dict[str, Any]) -> set[str]:
        out: set[str] = set()
        for d in job.get("dependsOn", []):
            dep = by_id[d["jobId"]]
            out |= upstream(dep) if "-b0-" in dep["jobName"] else {d["jobId"]}
        return out

    assert len(final["dependsOn"]) <= 20
    assert upstream(final) == {by_name[job_name(run.run_id, "b", 0, c)]["jobId"] for c in range(len(sizes))}


def test_more_than_twenty_dependencies_go_through_barriers(aws: str, tmp_path: Path) -> None:
    clients = AwsClients()
    env = make_environment(clients)
    stages = "\n".join(f"  - {{name: s{i}, command: 'echo {i} {{x}}'}}" for i in range(25))
    wf = loads_workflow(
        "name: fan\ndefaults: {image: busybox}\nitems: [{x: 1}, {x: 2}]\nstages:\n" + stages
        + "\n  - {name: last, per: run, needs: [" + ", ".join(f"s{i}" for i in range(25)) + "], command: 'echo end'}\n"
        + "  - {name: each, needs: [" + ", ".join(f"s{i}" for i in range(25)) + "], command: 'echo {x}'}\n"
    )
    plan = make_plan(wf)
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan)
    _backend(clients, env).start(plan, run, store, RunOptions(wait=False))
    jobs = _parents(clients, env.job_queue)
    by_id = {j["jobId"]: j for j in jobs}
    assert all(len(j.get("dependsOn", [])) <= 20 for j in jobs)

    def upstream(job: dict[str, Any]) -> set[str]:
        """The real stages a job waits for, through barriers."""
        out: set[str] = set()
        for d in job.get("dependsOn", []):
            up = by_id[d["jobId"]]
            if "-b" in up["jobName"].rsplit("-r0", 1)[-1]:
                assert up.get("arrayProperties", {}).get("size", 1) == job.get("arrayProperties", {}).get("size", 1)
                out |= upstream(up)
            else:
                out.add(up["jobName"])
        return out

    by_name = {j["jobName"]: j for j in jobs}
    want = {job_name(run.run_id, f"s{i}", 0, 0) for i in range(25)}
    assert upstream(by_name[job_name(run.run_id, "last", 0, None)]) == want
    each = by_name[job_name(run.run_id, "each", 0, 0)]
    assert all(d.get("type") == "N_TO_N" for d in each["dependsOn"])
    assert upstream(each) == want


class _Crash(BaseException):
    """Stands for kill -9: nothing after it runs (BaseException passes every except Exception)."""


class _CrashingStore(SqliteStore):
    """Dies on its k-th write; a task write may be half done (as with DynamoDB's 25-item batches)."""

    def __init__(self, path: Path, k: int, rng: random.Random) -> None:
        super().__init__(path)
        self.k = k
        self.rng = rng
        self.writes = 0

    def _tick(self) -> bool:
        self.writes += 1
        return self.writes == self.k

    def save_run(self, run: Any) -> None:
        if self._tick():
            raise _Crash()
        super().save_run(run)

    def save_tasks(self, tasks: Any) -> None:
        if self._tick():
            super().save_tasks(list(tasks)[: self.rng.randrange(0, len(tasks) + 1)])
            raise _Crash()
        super().save_tasks(tasks)


@pytest.mark.parametrize("seed", range(10))
def test_crash_anywhere_then_resume_submits_every_task_exactly_once(aws: str, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    clients = AwsClients()
    env = make_environment(clients)
    plan = _plan(1000)
    # Crash at a random Batch call (before it is sent, or after AWS acted on it but before the
    # answer is used) or at a random store write (half of a task batch written).
    where = ["before-call", "after-call", "store"][seed % 3]
    crash_at = rng.randrange(1, 8 if where != "store" else 5)
    store: SqliteStore = _CrashingStore(tmp_path / "s.db", crash_at if where == "store" else 0, rng)
    run = record_run(store, plan)
    calls = {"n": 0}

    def crash(**kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise _Crash()

    crasher = AwsClients()
    if where != "store":
        crasher.register_hook(f"{where}.batch.*", crash)
    with pytest.raises(_Crash):
        _backend(crasher, env).start(plan, run, store, RunOptions(wait=False))

    # Another process resumes from the store alone.
    store = SqliteStore(tmp_path / "s.db")
    run = store.get_run(run.run_id)
    resumed = _plan(1000)  # (the CLI rebuilds it from the stored manifest: same tasks, same rows)
    _backend(AwsClients(), env).resume(resumed, run, store, RunOptions(wait=False))
    tasks = store.get_tasks(run.run_id)
    assert all(t.state in (TaskState.SUBMITTED, TaskState.SUCCEEDED) for t in tasks), collections.Counter(
        t.state for t in tasks
    )
    runs = _runs_per_task(moto_parent_jobs(), resumed, run.run_id)
    assert runs == collections.Counter({t.task_id: 1 for t in tasks}), f"crash {where} #{crash_at}"
    # A further resume finds nothing to do.
    counter = CallCounter(clients)
    _backend(clients, env).resume(resumed, store.get_run(run.run_id), store, RunOptions(wait=False))
    assert counter.count("batch", "SubmitJob") == 0


def _throttle_hook(rate: float, seed: int) -> Any:
    from botocore.awsrequest import AWSResponse

    rng = random.Random(seed)
    stats = {"throttled": 0}

    class _Raw:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def stream(self, **kw: Any) -> Any:
            yield self.body

    def hook(request: Any, **kw: Any) -> Any:
        if rng.random() >= rate:
            return None
        stats["throttled"] += 1
        if "dynamodb" in request.url or "DynamoDB" in request.headers.get("X-Amz-Target", b"").decode():
            body = b'{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"Rate exceeded"}'
            return AWSResponse(request.url, 400, {"Content-Type": "application/x-amz-json-1.0"}, _Raw(body))
        body = b'{"message":"Too Many Requests"}'
        return AWSResponse(request.url, 429, {"x-amzn-ErrorType": "TooManyRequestsException",
                                              "Content-Type": "application/json"}, _Raw(body))

    return hook, stats


def test_throttling_thirty_percent_of_calls_still_exactly_once(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from botocore.retries.standard import ExponentialBackoff

    from corral.backends.aws_batch import client as client_mod

    # Faults here are random, not load: botocore's adaptive limiter would (rightly, for real
    # throttling) slow every later call to its 0.5 TPS floor. Use the same retry decisions in
    # "standard" mode, with botocore's backoff (real time, up to 20 s) scaled down 10x; corral's
    # own token bucket still paces the Batch calls.
    monkeypatch.setattr(client_mod, "RETRY_CONFIG", {"mode": "standard", "max_attempts": 10})
    real_delay = ExponentialBackoff.delay_amount
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, ctx: real_delay(self, ctx) / 10)

    clients = AwsClients()
    env = make_environment(clients)
    plan = _plan(100)
    hook, stats = _throttle_hook(0.3, seed=11)
    faulty = AwsClients()
    faulty.register_hook("before-send.batch.*", hook)
    faulty.register_hook("before-send.dynamodb.*", hook)
    store = DynamoStore("corral-throttle", faulty.dynamodb, sleep=lambda s: None)
    store.create_table_if_missing()
    run = record_run(store, plan)
    t0 = time.monotonic()
    _backend(faulty, env).start(plan, run, store, RunOptions(wait=False))
    tasks = _backend(faulty, env).refresh(store.get_run(run.run_id), store)
    elapsed = time.monotonic() - t0
    assert stats["throttled"] >= 5
    assert all(t.state == TaskState.SUCCEEDED for t in tasks)
    runs = _runs_per_task(moto_parent_jobs(), plan, run.run_id)
    assert runs == collections.Counter({t.task_id: 1 for t in tasks})
    assert elapsed < 45


def test_token_bucket_keeps_under_the_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(rate=40, burst=10, clock=lambda: now[0], sleep=sleep)
    for _ in range(210):
        bucket.acquire()
    # 10 free, then 200 at 40/s: 5 s of (fake) waiting, never a burst above the rate.
    assert now[0] == pytest.approx(5.0, abs=1e-6)
    assert max(slept) <= 1 / 40 + 1e-9


def test_plan_fixture_roundtrip(tmp_path: Path) -> None:
    # The resumed plan (from the manifest) gives the same rows, hence the same deterministic chunks.
    plan = make_plan(loads_workflow(workflow_text(50)))
    again = Plan.from_manifest(plan.manifest())
    ctx = pl.JobContext(region="r", account_id="1")
    wd = pl.workdir_for("run", ctx)
    for s in ("fetch", "convert"):
        ta, tb = pl.StageTable(plan.stage_tasks(s), "run", wd), pl.StageTable(again.stage_tasks(s), "run", wd)
        assert [ta.row(t) for t in plan.stage_tasks(s)] == [tb.row(t) for t in again.stage_tasks(s)]
        assert ta.env == tb.env
    assert os.environ.get("AWS_ENDPOINT_URL") is None or "127.0.0.1" in os.environ["AWS_ENDPOINT_URL"]


_CHILD = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from test_backend_support import FakeEnvironment, record_run
from corral.backends.aws_batch.backend import AwsBatchBackend
from corral.backends.aws_batch.client import AwsClients
from corral.backends.base import RunOptions
from corral.plan import make_plan
from corral.spec import loads_workflow
from corral.state.sqlite import SqliteStore

env = FakeEnvironment(**json.loads(sys.argv[2]))
kill_at, db = int(sys.argv[3]), sys.argv[4]
plan = make_plan(loads_workflow(sys.argv[5]), items=[{"session": f"s{i:05d}", "subject": f"sub{i % 7}"} for i in range(1000)])
store = SqliteStore(db)
run = record_run(store, plan)
clients = AwsClients()
n = {"calls": 0}
def hook(**kw):
    n["calls"] += 1
    if n["calls"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
clients.register_hook("after-call.batch.*", hook)
AwsBatchBackend(clients, environment=env).start(plan, run, store, RunOptions(wait=False))
"""


@pytest.mark.parametrize("kill_at", [3, 6])  # after the first and the second SubmitJob
def test_kill_minus_nine_after_a_submit_then_resume(aws: str, tmp_path: Path, kill_at: int) -> None:
    """A real kill -9 of the submitting process right after AWS accepted a SubmitJob."""
    import dataclasses
    import signal
    import subprocess
    import sys

    from test_backend_support import FakeEnvironment

    clients = AwsClients()
    env: FakeEnvironment = make_environment(clients)
    text = workflow_text(0).replace("items:\n", "")
    db = tmp_path / "s.db"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(Path(__file__).parent), json.dumps(dataclasses.asdict(env)),
         str(kill_at), str(db), text],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = SqliteStore(db)
    run = store.get_run("run-1")
    plan = make_plan(loads_workflow(text), items=[{"session": f"s{i:05d}", "subject": f"sub{i % 7}"}
                                                  for i in range(1000)])
    assert [t.id for t in plan.tasks] == [t.task_id for t in store.get_tasks("run-1")]
    before = len(moto_parent_jobs())
    assert before >= 1
    _backend(AwsClients(), env).resume(plan, run, store, RunOptions(wait=False))
    tasks = store.get_tasks("run-1")
    runs = _runs_per_task(moto_parent_jobs(), plan, "run-1")
    assert runs == collections.Counter({t.task_id: 1 for t in tasks})


LOSSY = """
name: lossy
defaults: {image: busybox}
stages:
  - {name: fetch, command: "fetch {session}"}
  - {name: convert, needs: [fetch], command: "convert {session}"}
  - {name: report, per: run, needs: [convert], command: "report"}
"""


def _random_plan(n: int) -> Plan:
    """Items with incompressible ids: several array chunks per stage."""
    rng = random.Random(n)
    return make_plan(loads_workflow(LOSSY), items=[{"session": f"{rng.getrandbits(48):012x}"} for _ in range(n)])


def _lose_responses_hook(rate: float, seed: int, kinds: tuple[str, ...]) -> Any:
    """A ``before-send`` hook on SubmitJob that sends the request to moto itself (so Batch acts),
    then loses the response: a closed connection, a read timeout or an HTTP 500 in its place."""
    from botocore.awsrequest import AWSResponse
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError
    from botocore.httpsession import URLLib3Session

    rng = random.Random(seed)
    http = URLLib3Session()
    stats = collections.Counter[str]()

    class _Raw:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def stream(self, **kw: Any) -> Any:
            yield self.body

    sent = [0]

    def hook(request: Any, **kw: Any) -> Any:
        sent[0] += 1
        if rng.random() >= rate and sent[0] % 2 == 0:
            return None
        acted = http.send(request)
        assert acted.status_code == 200, acted.content  # the server made the job
        kind = kinds[sum(stats.values()) % len(kinds)]
        stats[kind] += 1
        if kind == "closed":
            raise ConnectionClosedError(endpoint_url=request.url)
        if kind == "timeout":
            raise ReadTimeoutError(endpoint_url=request.url)
        body = b'{"message":"Internal server error"}'
        return AWSResponse(request.url, 500, {"x-amzn-ErrorType": "ServerException",
                                              "Content-Type": "application/json"}, _Raw(body))

    return hook, stats


@pytest.mark.parametrize("kinds", [("closed", "timeout", "500")])
def test_lost_submit_responses_give_each_task_exactly_one_job(aws: str, tmp_path: Path, kinds: tuple[str, ...]) -> None:
    """#13: 30% of SubmitJob responses lost after moto made the job (connection closed, read
    timeout, HTTP 500): botocore must not re-send SubmitJob; corral finds the job by its name."""
    clients = AwsClients()
    env = make_environment(clients)
    plan = _random_plan(2000)
    hook, stats = _lose_responses_hook(0.5, seed=5, kinds=kinds)
    faulty = AwsClients()
    faulty.register_hook("before-send.batch.SubmitJob", hook)
    counter = CallCounter(faulty)
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan)
    _backend(faulty, env).start(plan, run, store, RunOptions(wait=False))
    assert sum(stats.values()) >= 3 and len(stats) == 3, stats
    jobs = moto_parent_jobs()
    names = collections.Counter(j["jobName"] for j in jobs)
    assert all(n == 1 for n in names.values()), [k for k, n in names.items() if n > 1]
    runs = _runs_per_task(jobs, plan, run.run_id)
    tasks = store.get_tasks(run.run_id)
    assert runs == collections.Counter({t.task_id: 1 for t in tasks})
    # every task recorded against the job that exists
    ids = {j["jobId"] for j in jobs}
    assert all(t.external_id.split(":")[0] in ids for t in tasks)
    # no SubmitJob was re-sent after a lost response: one per job name
    assert counter.count("batch", "SubmitJob") == len(names)


def test_throttled_submit_job_is_retried_by_corral(aws: str, tmp_path: Path) -> None:
    """Throttling is answered before Batch acts: SubmitJob is sent again (by corral, not botocore)."""
    clients = AwsClients()
    env = make_environment(clients)
    plan = _random_plan(2000)
    hook, stats = _throttle_hook(0.5, seed=3)
    faulty = AwsClients()
    faulty.register_hook("before-send.batch.SubmitJob", hook)
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan)
    _backend(faulty, env).start(plan, run, store, RunOptions(wait=False))
    assert stats["throttled"] >= 1
    names = collections.Counter(j["jobName"] for j in moto_parent_jobs())
    assert names and all(n == 1 for n in names.values())
    assert len(store.get_tasks(run.run_id)) == len(plan.tasks)
