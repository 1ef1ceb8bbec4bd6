"""Benchmark: corral's array-job submission vs a per-job loop, against a local moto server.

    python bench/aws_submit.py [--rounds 3] [--items 1000] [--refresh-items 10000]

Starts its own moto server on 127.0.0.1 (Batch without Docker), never touches AWS. For each round:

1. corral: 1,000 items × 3 stages (fetch → convert → upload, N-to-N) submitted by
   ``AwsBatchBackend.start`` (state in SQLite; the DynamoDB store is timed as an extra row);
2. baseline: the per-job loop — one SubmitJob per task with dependsOn per task (job definition
   registered once, which is generous to the baseline; the seed also re-described resources and
   wrote a tracking row per job);
3. status refresh of a 10,000-item stage (arrays of ≤ 10,000 children each, cut by the 30 KiB
   payload limit) in these situations: all succeeded; after the run with 1% failed children
   spread over every array; mid-run as it usually is (the first arrays done with 1% failed, one
   array active, the rest waiting); mid-run at its worst (failed and running children in every
   array), each from a store that knows nothing yet; then the same refresh again with nothing
   changed (steady polling: ``run --wait``, ``status --watch``) — against the per-job way
   (DescribeJobs of every job id in chunks of 100).

4. a realistic workflow under the strict-AWS layer (``tests/strict_aws.py``: what AWS refuses or
   fails at launch, ECS's 8,192-character container overrides included): 10,000 and 1,000 items
   with ids like ``m07-20240312-9f3a1c2b`` and a path beside each × 3 stages (an S3 → workspace
   transfer, a conversion, an upload), counting SubmitJob calls, strict-layer violations and the
   largest override of any job (every array child gets its job's overrides).

API calls are counted with botocore ``before-call`` hooks; wall time is the median of the rounds.
Targets (issues 3, 12): ≤ 12 Batch calls for the 3,000 tasks; ≥ 20× faster than the per-job loop;
status refresh of 10,000 children with one DescribeJobs per 100 arrays plus ListJobs only for the
statuses that moved; realistic 10,000 × 3 with 0 violations in ≤ 150 SubmitJob calls, 1,000 × 3 in
≤ 12. The table is printed whether targets are met or not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGION = "us-east-2"
ACCOUNT = "123456789012"


# -- moto server ----------------------------------------------------------------------------------
def start_moto() -> tuple[Any, str]:
    os.environ.setdefault("MOTO_IAM_LOAD_MANAGED_POLICIES", "false")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    url = f"http://127.0.0.1:{port}"
    _post(f"{url}/moto-api/config", {"batch": {"use_docker": False}})
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION=REGION,
        AWS_DEFAULT_REGION=REGION, AWS_ENDPOINT_URL=url, AWS_EC2_METADATA_DISABLED="true",
    )
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(var, None)
    return server, url


def _post(url: str, body: dict[str, Any] | None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()


def reset(url: str) -> None:
    _post(f"{url}/moto-api/reset", None)
    # moto's default VPC has no internet gateway route (AWS's does); corral's network preflight needs one
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from moto_server import default_vpc_as_on_aws

    default_vpc_as_on_aws(url, REGION)


# -- helpers ----------------------------------------------------------------------------------------
@dataclass
class Env:
    region: str
    account_id: str
    job_queue: str
    gpu_job_queue: str | None = None
    job_role_arn: str = f"arn:aws:iam::{ACCOUNT}:role/job"
    execution_role_arn: str = f"arn:aws:iam::{ACCOUNT}:role/exec"
    log_group: str = "/aws/batch/corral-bench"
    table_name: str = "corral-bench"
    efs_id: str | None = None
    efs_access_point: str | None = None
    tags: dict[str, str] = field(default_factory=lambda: {"corral:managed": "true"})


def make_env(clients: Any) -> Env:
    trust = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "batch.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
    role = clients.iam.create_role(RoleName="bench-batch", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    ce = clients.batch.create_compute_environment(
        computeEnvironmentName="bench-ce", type="UNMANAGED", state="ENABLED", serviceRole=role
    )["computeEnvironmentArn"]
    queue = clients.batch.create_job_queue(
        jobQueueName="bench-queue", state="ENABLED", priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}],
    )["jobQueueArn"]
    return Env(region=REGION, account_id=ACCOUNT, job_queue=queue)


class Counter:
    def __init__(self, clients: Any) -> None:
        self.calls: list[tuple[str, str]] = []
        clients.register_hook("before-call.*.*", lambda model, **kw: self.calls.append(
            (model.service_model.service_name, model.name)))

    def count(self, service: str | None = None) -> int:
        return sum(1 for s, _ in self.calls if service is None or s == service)


WORKFLOW = """
name: bench
defaults:
  image: public.ecr.aws/docker/library/busybox:latest
  retries: 2
  timeout: 30m
stages:
  - name: fetch
    command: fetch --session {session} --out {workdir}/raw/{session}
  - name: convert
    needs: [fetch]
    command: convert {workdir}/raw/{session} {workdir}/nwb/{subject}_{session}.nwb
    resources: {vcpus: 2, memory: 4GiB}
  - name: upload
    needs: [convert]
    command: upload {workdir}/nwb/{subject}_{session}.nwb
"""
REALISTIC = """
name: sessions
defaults:
  image: public.ecr.aws/docker/library/busybox:1.36
  retries: 2
  timeout: 2h
stages:
  - name: fetch
    kind: transfer
    from: s3://lab-raw/{path}
    to: workspace://{session}/raw
  - name: convert
    needs: [fetch]
    command: convert {workdir}/{session}/raw {workdir}/{session}/{session}.nwb
    resources: {vcpus: 2, memory: 8GiB}
  - name: upload
    needs: [convert]
    command: upload {workdir}/{session}/{session}.nwb --dandiset 000123
"""


def realistic_items(n: int) -> list[dict[str, str]]:
    """Ids like ``m07-20240312-9f3a1c2b`` (mouse, date, 8 random hex) with their raw data's path."""
    import random

    rng = random.Random(n)
    items = []
    start = datetime.date(2023, 1, 1)
    for _ in range(n):
        mouse = f"m{rng.randrange(1, 60):02d}"
        day = (start + datetime.timedelta(days=rng.randrange(700))).strftime("%Y%m%d")
        session = f"{mouse}-{day}-{rng.getrandbits(32):08x}"
        items.append({"session": session, "path": f"ephys/{mouse}/{day}/{session}/recording.dat"})
    return items


def realistic_submit(n: int, tmp: Path) -> dict[str, float]:
    """The realistic workflow under the strict-AWS layer."""
    from strict_aws import StrictAws

    from corral.backends.aws_batch.backend import AwsBatchBackend
    from corral.backends.aws_batch.client import AwsClients
    from corral.backends.base import RunOptions
    from corral.plan import make_plan
    from corral.spec import loads_workflow
    from corral.state.sqlite import SqliteStore

    layer = StrictAws(endpoint_url=os.environ["AWS_ENDPOINT_URL"], region=REGION)
    plan = make_plan(loads_workflow(REALISTIC), items=realistic_items(n))
    with layer.active():
        env = make_env(AwsClients())
        clients = AwsClients()
        counter = Counter(clients)
        store = SqliteStore(tmp / f"real-{n}-{time.monotonic_ns()}.db")
        run = record(store, plan, f"real-{n}")
        backend = AwsBatchBackend(clients, environment=env)
        violations = 0
        wall = 0.0
        try:
            wall, _ = timed(lambda: backend.start(plan, run, store, RunOptions(wait=False)))
        except Exception as exc:  # noqa: BLE001 - a refusal is what is measured
            print(f"realistic {n}: {exc}", file=sys.stderr)
        violations = len(layer.violations)
    submits = sum(1 for s, o in counter.calls if s == "batch" and o == "SubmitJob")
    return {"wall": wall, "submit": submits, "batch": counter.count("batch"), "violations": violations,
            "overrides": layer.largest_overrides, "payload": layer.largest_submit, "tasks": len(plan.tasks)}


ONE_STAGE = "name: wide\ndefaults: {image: busybox}\nstages:\n  - {name: work, command: 'work {session}'}\n"


def make_plan_for(text: str, n: int) -> Any:
    from corral.plan import make_plan
    from corral.spec import loads_workflow

    items = [{"session": f"ses-{i:05d}", "subject": f"sub-{i % 97:03d}"} for i in range(n)]
    return make_plan(loads_workflow(text), items=items)


def record(store: Any, plan: Any, run_id: str) -> Any:
    from corral.model import RunRecord, TaskRecord

    run = RunRecord(run_id=run_id, workflow_name=plan.workflow.name, backend="aws", created_at=time.time())
    store.create_run(run, plan.manifest(), [
        TaskRecord(run_id=run_id, task_id=t.id, stage=t.stage.name, item_key=t.key, item_index=t.index)
        for t in plan.tasks
    ])
    return run


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# -- the measured things ------------------------------------------------------------------------------
def corral_submit(plan: Any, store_kind: str, tmp: Path) -> dict[str, float]:
    from corral.backends.aws_batch.backend import AwsBatchBackend
    from corral.backends.aws_batch.client import AwsClients
    from corral.backends.base import RunOptions

    setup = AwsClients()
    env = make_env(setup)
    from corral.backends.aws_batch.rclone_image import ensure_rclone_image

    ensure_rclone_image(setup)  # once per account, as `corral aws setup -w` does: not timed (start finds it)
    clients = AwsClients()
    counter = Counter(clients)
    if store_kind == "sqlite":
        from corral.state.sqlite import SqliteStore

        store: Any = SqliteStore(tmp / f"state-{time.monotonic_ns()}.db")
    else:
        from corral.state.dynamodb import DynamoStore

        store = DynamoStore(env.table_name, clients.dynamodb)
        store.create_table_if_missing()
    clients.batch  # noqa: B018 - make the client before timing, as the loop does
    counter.calls.clear()
    recorded, run = timed(lambda: record(store, plan, f"bench-{store_kind}"))  # create_run: what `corral run` does first
    record_calls = counter.count("dynamodb")
    counter.calls.clear()
    backend = AwsBatchBackend(clients, environment=env)
    wall, _ = timed(lambda: backend.start(plan, run, store, RunOptions(wait=False)))
    return {"wall": wall, "batch": counter.count("batch"), "dynamodb": counter.count("dynamodb"),
            "jobs": len(run.options["aws_batch"]["round0_chunks"]) * 3, "with_record": wall + recorded,
            "record_dynamodb": record_calls}


def per_job_loop(plan: Any) -> dict[str, float]:
    from corral.backends.aws_batch import payloads as pl
    from corral.backends.aws_batch.client import AwsClients

    setup = AwsClients()
    env = make_env(setup)
    clients = AwsClients()
    counter = Counter(clients)
    batch = clients.batch
    ctx = pl.JobContext(region=REGION, account_id=ACCOUNT)

    def loop() -> None:
        defs: dict[str, str] = {}
        job_of: dict[str, str] = {}
        for t in plan.tasks:
            spec = pl.job_definition(t.stage, ctx)
            if spec.name not in defs:
                defs[spec.name] = batch.register_job_definition(**spec.kwargs)["jobDefinitionArn"]
            env_vars = t.env("run", "/tmp/w")
            resp = batch.submit_job(
                jobName=f"{t.stage.name}-{t.key}", jobQueue=env.job_queue, jobDefinition=defs[spec.name],
                containerOverrides={"command": t.command("run", "/tmp/w"),
                                    "environment": [{"name": k, "value": v} for k, v in env_vars.items()]},
                dependsOn=[{"jobId": job_of[d]} for d in t.needs],
            )
            job_of[t.id] = resp["jobId"]

    counter.calls.clear()
    wall, _ = timed(loop)
    return {"wall": wall, "batch": counter.count("batch")}


def refresh_scenarios(n: int) -> dict[str, dict[str, float]]:
    from moto.batch.models import batch_backends

    from corral.backends.aws_batch.backend import AwsBatchBackend
    from corral.backends.aws_batch.client import AwsClients
    from corral.backends.base import RunOptions
    from corral.model import TaskState
    from corral.state.sqlite import SqliteStore

    plan = make_plan_for(ONE_STAGE, n)
    clients = AwsClients()
    env = make_env(clients)
    with tempfile.TemporaryDirectory() as d:
        store = SqliteStore(Path(d) / "s.db")
        run = record(store, plan, "bench-refresh")
        backend = AwsBatchBackend(clients, environment=env)
        backend.start(plan, run, store, RunOptions(wait=False))
        tasks = store.get_tasks(run.run_id)
        parents = sorted({t.external_id.split(":")[0] for t in tasks})
        jobs = batch_backends[ACCOUNT][REGION]._jobs
        counter = Counter(clients)
        out: dict[str, dict[str, float]] = {}

        def steer(job_id: str, status: str, reason: str | None = None, code: int | None = None) -> None:
            j = jobs[job_id]
            j.status = status
            j.job_stopped = status in ("SUCCEEDED", "FAILED")
            j.job_stopped_at = datetime.datetime.now()
            j.job_stopped_reason = reason
            j.exit_code = code

        def measure(label: str, known: bool = False) -> None:
            if not known:  # every task "in flight" in the store: nothing known from an earlier refresh
                saved = store.get_tasks(run.run_id)
                reset_tasks = [t.replace(state=TaskState.SUBMITTED) for t in saved]
                store.save_tasks(reset_tasks)
            counter.calls.clear()
            wall, _ = timed(lambda: backend.refresh(store.get_run(run.run_id), store))
            out[label] = {"wall": wall, "batch": counter.count("batch"), "arrays": len(parents),
                          "describe": sum(1 for c in counter.calls if c == ("batch", "DescribeJobs")),
                          "list": sum(1 for c in counter.calls if c == ("batch", "ListJobs"))}

        measure("all succeeded")
        for p in parents:
            jobs[p].status = "FAILED"
            for i, child in enumerate(jobs[p]._child_jobs):
                if i % 100 == 7:
                    steer(child.job_id, "FAILED", "Essential container in task exited", 1)
        measure("after run, 1% failed")
        third = max(1, len(parents) // 3)
        for a, p in enumerate(parents):  # typical mid-run: early arrays done, one active, rest waiting
            jobs[p].status = "SUCCEEDED" if a < third else ("RUNNING" if a == third else "RUNNABLE")
            for i, child in enumerate(jobs[p]._child_jobs):
                if a < third:
                    steer(child.job_id, "FAILED" if i % 100 == 7 else "SUCCEEDED",
                          "Essential container in task exited" if i % 100 == 7 else None, 1 if i % 100 == 7 else 0)
                    if i % 100 == 7:
                        jobs[p].status = "FAILED"
                elif a == third:
                    status = "SUCCEEDED" if i < 400 else "RUNNING" if i < 600 else "RUNNABLE"
                    steer(child.job_id, "FAILED" if i == 5 else status, None, 1 if i == 5 else None)
                else:
                    steer(child.job_id, "RUNNABLE")
        measure("mid-run, typical (done/active/waiting)")
        for p in parents:
            jobs[p].status = "RUNNING"
            for i, child in enumerate(jobs[p]._child_jobs):
                if i % 10 == 0:
                    steer(child.job_id, "FAILED", "Essential container in task exited", 1)
                elif i % 20 == 1:
                    steer(child.job_id, "RUNNING")
                else:
                    steer(child.job_id, "SUCCEEDED", None, 0)
        measure("mid-run, failed+running in every array")
        measure("same again, nothing changed", known=True)  # steady polling: run --wait, status --watch
        # the per-job way: DescribeJobs of every job id, 100 at a time
        ids = [t.external_id for t in tasks]
        counter.calls.clear()

        def describe_all() -> None:
            for i in range(0, len(ids), 100):
                clients.batch.describe_jobs(jobs=ids[i : i + 100])

        wall, _ = timed(describe_all)
        out["per-job describe"] = {"wall": wall, "batch": counter.count("batch"), "arrays": len(parents),
                                   "describe": counter.count("batch"), "list": 0}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--refresh-items", type=int, default=10_000)
    ap.add_argument("--realistic", type=int, nargs="*", default=[10_000, 1_000])
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the strict-AWS layer

    server, url = start_moto()
    # corral copies its rclone image into (moto's) ECR on a run's first transfer: from a registry
    # on 127.0.0.1 standing in for Docker Hub (tests/fake_registry.py), never from the internet
    from fake_registry import FakeRegistry

    registry = FakeRegistry().start()
    os.environ["CORRAL_RCLONE_SOURCE"] = registry.reference
    os.environ.pop("CORRAL_RCLONE_IMAGE", None)
    try:
        plan = make_plan_for(WORKFLOW, args.items)
        rows: dict[str, list[dict[str, float]]] = {"corral": [], "corral+dynamodb": [], "loop": []}
        refresh: list[dict[str, dict[str, float]]] = []
        real: dict[int, dict[str, float]] = {}
        with tempfile.TemporaryDirectory() as d:
            for n in args.realistic:
                reset(url)
                real[n] = realistic_submit(n, Path(d))
            for r in range(args.rounds):
                reset(url)
                rows["corral"].append(corral_submit(plan, "sqlite", Path(d)))
                reset(url)
                rows["corral+dynamodb"].append(corral_submit(plan, "dynamodb", Path(d)))
                reset(url)
                rows["loop"].append(per_job_loop(plan))
                reset(url)
                refresh.append(refresh_scenarios(args.refresh_items))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        registry.stop()
        server.stop()

    def med(kind: str, key: str) -> float:
        return statistics.median(x[key] for x in rows[kind])

    n_tasks = len(plan.tasks)
    c_wall, l_wall, d_wall = med("corral", "wall"), med("loop", "wall"), med("corral+dynamodb", "wall")
    c_calls, l_calls = med("corral", "batch"), med("loop", "batch")
    speedup = l_wall / c_wall
    print(f"\nSubmission of {args.items} items × 3 stages = {n_tasks} tasks "
          f"(median of {args.rounds} rounds, moto server on 127.0.0.1)\n")
    print(f"{'':34} {'Batch calls':>12} {'wall (s)':>10} {'vs loop':>9}")
    print(f"{'per-job loop (baseline)':34} {l_calls:>12.0f} {l_wall:>10.3f} {'1.0x':>9}")
    print(f"{'corral, SQLite state':34} {c_calls:>12.0f} {c_wall:>10.3f} {speedup:>8.1f}x")
    print(f"{'corral, DynamoDB state':34} {med('corral+dynamodb', 'batch'):>12.0f} {d_wall:>10.3f} "
          f"{l_wall / d_wall:>8.1f}x   (+{med('corral+dynamodb', 'dynamodb'):.0f} DynamoDB calls)")
    r_wall = med("corral+dynamodb", "with_record")
    print(f"{'corral, DynamoDB, + create_run':34} {med('corral+dynamodb', 'batch'):>12.0f} {r_wall:>10.3f} "
          f"{l_wall / r_wall:>8.1f}x   (+{med('corral+dynamodb', 'dynamodb') + med('corral+dynamodb', 'record_dynamodb'):.0f}"
          " DynamoDB calls)")
    print(f"{'call ratio loop/corral':34} {l_calls / c_calls:>11.0f}x")

    labels = list(refresh[0])
    print(f"\nStatus refresh of {args.refresh_items} array children "
          f"({int(refresh[0][labels[0]]['arrays'])} arrays; median of {args.rounds})\n")
    print(f"{'':40} {'Batch calls':>12} {'DescribeJobs':>13} {'ListJobs':>9} {'wall (s)':>10}")
    for label in labels:
        calls = statistics.median(x[label]["batch"] for x in refresh)
        wall = statistics.median(x[label]["wall"] for x in refresh)
        desc = statistics.median(x[label]["describe"] for x in refresh)
        lst = statistics.median(x[label]["list"] for x in refresh)
        print(f"{label:40} {calls:>12.0f} {desc:>13.0f} {lst:>9.0f} {wall:>10.3f}")
    arrays = int(refresh[0][labels[0]]["arrays"])
    per_100 = -(-arrays // 100)
    describe_ok = all(x[label]["describe"] <= per_100 for x in refresh for label in labels[:-1])
    steady = statistics.median(x["same again, nothing changed"]["batch"] for x in refresh)

    if real:
        print("\nRealistic workflow under the strict-AWS layer (ids like m07-20240312-9f3a1c2b + a path; "
              "fetch is an S3 → workspace transfer)\n")
        print(f"{'items × 3 stages':>18} {'tasks':>7} {'SubmitJob':>10} {'Batch calls':>12} {'violations':>11} "
              f"{'largest override':>17} {'largest SubmitJob':>18} {'wall (s)':>9}")
        for n, r in real.items():
            print(f"{n:>18} {r['tasks']:>7.0f} {r['submit']:>10.0f} {r['batch']:>12.0f} {r['violations']:>11.0f} "
                  f"{r['overrides']:>12.0f}/8192 {r['payload']:>12.0f} bytes {r['wall']:>9.2f}")

    targets = [
        (f"≤ 12 Batch calls for the {n_tasks} tasks", c_calls <= 12, f"{c_calls:.0f}"),
        ("≥ 20× faster than the per-job loop", speedup >= 20, f"{speedup:.1f}×"),
        (f"refresh of {args.refresh_items} children: ≤ 1 DescribeJobs per 100 arrays ({arrays} arrays)",
         describe_ok, f"{per_100} allowed"),
        ("refresh with nothing changed: DescribeJobs only", steady <= per_100, f"{steady:.0f}"),
        ("≥ 20× with DynamoDB state (issue 18)", l_wall / d_wall >= 20, f"{l_wall / d_wall:.1f}×"),
    ]
    for n, r in real.items():
        limit = 150 if n >= 10_000 else 12
        targets.append((f"realistic {n} × 3: 0 strict-layer violations", r["violations"] == 0,
                        f"{r['violations']:.0f}"))
        targets.append((f"realistic {n} × 3: ≤ {limit} SubmitJob calls", r["submit"] <= limit and r["violations"] == 0,
                        f"{r['submit']:.0f}"))
    print("\nTargets")
    for text, ok, got in targets:
        print(f"  [{'met' if ok else 'MISSED'}] {text}: {got}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
