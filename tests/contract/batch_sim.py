"""AWS Batch played at the seam corral owns (:class:`BatchApi`), for the backend contract suite.

Every request corral makes still goes to moto's server (so moto validates SubmitJob and
RegisterJobDefinition as before), but the *state* of jobs — what DescribeJobs and ListJobs
answer, and what TerminateJob does — comes from this simulator, which runs each array child's
container command (the job definition's ``/bin/sh -c WRAPPER``) here with the job's override
environment and ``AWS_BATCH_JOB_ARRAY_INDEX``, the way Batch would:

- a child starts when its dependencies allow (``N_TO_N``: child *k* of the job it depends on
  succeeded; otherwise the whole job succeeded); a dependency that failed fails it with
  ``Dependent Job failed``;
- a failed attempt is retried while ``retryStrategy.attempts`` remain, unless the first matching
  ``evaluateOnExit`` rule says EXIT (Batch's documented order; no rule matching means RETRY);
- TerminateJob fails every child not yet ended with the given reason (never retried);
- an array parent is SUCCEEDED when all its children are, FAILED when all ended and one failed;
- each attempt runs in a memory cgroup of the job's MEMORY (the job definition's, or SubmitJob's
  ``containerOverrides.resourceRequirements``), as ECS's container runtime does, where this machine
  lets tests make one (corral.backends.memory_limit); ``CORRAL_OOM_EVENTS`` names its counter, the
  file a container sees at ``/sys/fs/cgroup/memory.events``. An attempt the kernel killed there ends
  with the container reason ``OutOfMemoryError: Container killed due to memory usage``, as ECS
  reports it. Without such a cgroup nothing limits memory (``memory_enforced`` is False).
- a job whose definition names consumable resources (``consumableResourceProperties``: a stage's
  ``max_parallel``) starts only when the quantities are free, holds them until it ends and waits
  RUNNABLE meanwhile (Batch user guide, "Specify the resources needed to run a job"); the
  resources are the strict-AWS layer's (``tests/batch_consumables.py``), and the most ever held
  at once is kept in ``peak``.

The children of one wave run at the same time (threads, each its own process), as on a fleet.

Nothing steers moto's private internals. ``step()`` runs one wave (everything runnable now);
the backend's ``sleep`` is pointed at it, so ``--wait`` drives the simulated fleet.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.backends.aws_batch.submit import BatchApi, TokenBucket

ENDED = ("SUCCEEDED", "FAILED")
DEPENDENT_FAILED = "Dependent Job failed"
EXITED = "Essential container in task exited"


@dataclass
class Child:
    job_id: str
    index: int | None  # None: a plain job
    status: str = "SUBMITTED"
    status_reason: str = ""
    exit_code: int | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    started_at: int | None = None
    stopped_at: int | None = None
    container_reason: str = ""

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"jobId": self.job_id, "status": self.status, "createdAt": 0}
        if self.status_reason:
            out["statusReason"] = self.status_reason
        if self.exit_code is not None:
            out["container"] = {"exitCode": self.exit_code}
            if self.container_reason:
                out["container"]["reason"] = self.container_reason
        if self.started_at:
            out["startedAt"] = self.started_at
        if self.stopped_at:
            out["stoppedAt"] = self.stopped_at
        return out


@dataclass
class Job:
    job_id: str
    name: str
    queue: str
    definition: str
    env: dict[str, str]
    depends_on: list[dict[str, str]]
    size: int  # 1: a plain job
    children: list[Child]
    created: int
    memory_mib: int | None = None  # containerOverrides.resourceRequirements MEMORY, if any

    @property
    def status(self) -> str:
        states = [c.status for c in self.children]
        if all(s == "SUCCEEDED" for s in states):
            return "SUCCEEDED"
        if all(s in ENDED for s in states):
            return "FAILED"
        if any(s in ("RUNNING", *ENDED) for s in states):
            return "RUNNING"
        return "PENDING"


class SimulatedBatch(BatchApi):
    """A BatchApi whose job states are simulated (see the module docstring)."""

    def __init__(self, client: Any, *, workdir: Path, timeout: float = 60.0, execute: bool = True,
                 consumables: Any = None, workers: int = 8, logs: Any = None) -> None:
        super().__init__(client, TokenBucket(rate=1e9))
        self.consumables = consumables  # batch_consumables.ConsumableResources (the strict layer's)
        self.registered: dict[str, dict[str, Any]] = {}  # job definition ARN -> RegisterJobDefinition kwargs
        self.peak: dict[str, int] = {}  # consumable resource -> the most held at once
        self.workers = workers
        self.logs = logs  # a CloudWatch Logs client (moto's): each attempt's output is written there
        self._lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.children: dict[str, Child] = {}
        self.definitions: dict[str, dict[str, Any]] = {}
        self.workdir = workdir  # the container's working directory
        self.timeout = timeout
        self.ran: list[tuple[str, int | None]] = []  # (job name, index) of every attempt run
        self.crash_after_submits: int | None = None  # kill -9 of the submitter after N SubmitJobs
        self.execute = execute  # False: every child succeeds at once without running (benchmarks)
        from corral.backends import memory_limit

        self.limiter = memory_limit.detect()
        self.memory_enforced = self.limiter.hard
        self.memory_of_runs: list[tuple[str, int | None, int]] = []  # (job name, index, MiB) of every attempt

    # -- the calls corral makes -----------------------------------------------------------------
    def submit_job(self, kwargs: Any) -> str:
        """SubmitJob reaches the simulation (BatchApi's own sends it with a client of its own)."""
        return str(self.call("submit_job", f"submit job {kwargs['jobName']}", **kwargs)["jobId"])

    def call(self, op: str, action: str, **kwargs: Any) -> dict[str, Any]:
        if op == "describe_jobs":
            return {"jobs": [j for i in kwargs["jobs"] if (j := self._describe(i)) is not None]}
        if op == "list_jobs":
            return self._list(**kwargs)
        if op == "terminate_job" or op == "cancel_job":
            self._terminate(kwargs["jobId"], kwargs.get("reason", ""))
            return {}
        result = super().call(op, action, **kwargs)  # the real request, to moto
        if op == "register_job_definition":  # (moto keeps no consumableResourceProperties)
            self.registered[result["jobDefinitionArn"]] = dict(kwargs)
        if op == "submit_job":
            self._record(kwargs, result["jobId"])
            if self.crash_after_submits is not None:
                self.crash_after_submits -= 1
                if self.crash_after_submits <= 0:
                    self.crash_after_submits = None
                    raise KilledSubmitter()
        return result

    def _record(self, kw: dict[str, Any], job_id: str) -> None:
        size = int((kw.get("arrayProperties") or {}).get("size", 1))
        env = {e["name"]: e["value"] for e in (kw.get("containerOverrides") or {}).get("environment", [])}
        children = [Child(job_id, None)] if size == 1 else [Child(f"{job_id}:{k}", k) for k in range(size)]
        mem = [int(r["value"]) for r in (kw.get("containerOverrides") or {}).get("resourceRequirements", [])
               if r["type"] == "MEMORY"]
        job = Job(job_id, kw["jobName"], kw["jobQueue"], kw["jobDefinition"], env, list(kw.get("dependsOn") or []),
                  size, children, len(self.jobs), mem[0] if mem else None)
        self.jobs[job_id] = job
        for c in children:
            self.children[c.job_id] = c

    def _definition(self, arn: str) -> dict[str, Any]:
        if arn not in self.definitions:
            found = self.client.describe_job_definitions(jobDefinitions=[arn])["jobDefinitions"]
            assert found, f"no job definition {arn}"
            self.definitions[arn] = found[0]
        return self.definitions[arn]

    def _describe(self, job_id: str) -> dict[str, Any] | None:
        parent_id = job_id.split(":", 1)[0]
        job = self.jobs.get(parent_id)
        if job is None:
            return None
        base = {"jobName": job.name, "jobQueue": job.queue, "jobDefinition": job.definition,
                "dependsOn": job.depends_on, "createdAt": job.created,
                "container": {"environment": [{"name": k, "value": v} for k, v in job.env.items()]}}
        if ":" in job_id or job.size == 1:
            c = self.children[job_id]
            out = {**base, **c.summary(), "attempts": list(c.attempts)}
            if c.exit_code is not None:
                out["container"] = {**base["container"], "exitCode": c.exit_code}
                if c.container_reason:
                    out["container"]["reason"] = c.container_reason
            return out
        base["retryStrategy"] = self._definition(job.definition).get("retryStrategy") or {"attempts": 1}
        counts: dict[str, int] = {}
        for c in job.children:
            counts[c.status] = counts.get(c.status, 0) + 1
        return {**base, "jobId": job.job_id, "status": job.status,
                "arrayProperties": {"size": job.size, "statusSummary": counts}}

    def _list(self, **kw: Any) -> dict[str, Any]:
        if "arrayJobId" in kw:
            job = self.jobs[kw["arrayJobId"]]
            return {"jobSummaryList": [c.summary() for c in job.children if c.status == kw.get("jobStatus", c.status)]}
        patterns = [v for f in kw.get("filters", []) if f["name"] == "JOB_NAME" for v in f["values"]]
        out = []
        for job in self.jobs.values():
            if job.queue != kw.get("jobQueue") or not any(fnmatch.fnmatchcase(job.name, p) for p in patterns):
                continue
            out.append({"jobId": job.job_id, "jobName": job.name, "status": job.status, "createdAt": job.created})
        return {"jobSummaryList": out}

    def _terminate(self, job_id: str, reason: str) -> None:
        job = self.jobs.get(job_id.split(":", 1)[0])
        if job is None:
            return
        for c in job.children:
            if c.status not in ENDED and (":" not in job_id or c.job_id == job_id):
                c.status, c.status_reason, c.stopped_at = "FAILED", reason, _ms()

    # -- Batch itself ---------------------------------------------------------------------------
    def pending(self) -> int:
        return sum(1 for c in self.children.values() if c.status not in ENDED)

    def step(self, _delay: float = 0.0) -> None:
        """One wave: start every child whose dependencies allow it now, run it to its end."""
        wave = []
        for job in list(self.jobs.values()):
            for c in job.children:
                if c.status in ENDED:
                    continue
                verdict = self._dependencies(job, c)
                if verdict == "failed":
                    c.status, c.status_reason, c.stopped_at = "FAILED", DEPENDENT_FAILED, _ms()
                elif verdict == "ready":
                    if self._take(job):
                        wave.append((job, c))
                    else:
                        c.status = "RUNNABLE"  # waits for its consumable resources
        if len(wave) <= 1 or not self.execute:
            for job, c in wave:
                self._run_holding(job, c)
            return
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for f in [pool.submit(self._run_holding, job, c) for job, c in wave]:
                f.result()

    def _needs(self, job: Job) -> list[tuple[str, int]]:
        props = self.registered.get(job.definition, {}).get("consumableResourceProperties") or {}
        return [(e["consumableResource"], int(e["quantity"])) for e in props.get("consumableResourceList") or []]

    def _take(self, job: Job) -> bool:
        """Take every consumable resource the job's definition names, or none."""
        needs = self._needs(job)
        if not needs:
            return True
        assert self.consumables is not None, "a job needs consumable resources: give the simulator the layer's"
        taken: list[tuple[str, int]] = []
        for name, q in needs:
            if not self.consumables.take(name, q):
                for n, k in taken:
                    self.consumables.give_back(n, k)
                return False
            taken.append((name, q))
        with self._lock:
            for name, _ in needs:
                r = self.consumables.get(name)
                self.peak[name] = max(self.peak.get(name, 0), r.in_use)
        return True

    def _run_holding(self, job: Job, c: Child) -> None:
        try:
            self._run(job, c)
        finally:
            for name, q in self._needs(job):
                self.consumables.give_back(name, q)

    def drain(self, limit: int = 50) -> None:
        for _ in range(limit):
            if not self.pending():
                return
            self.step()
        raise AssertionError(f"{self.pending()} simulated children never ended")

    def _dependencies(self, job: Job, c: Child) -> str:
        state = "ready"
        for dep in job.depends_on:
            other = self.jobs.get(dep["jobId"])
            if other is None:
                return "failed"
            if dep.get("type") == "N_TO_N" and c.index is not None:
                statuses = [other.children[c.index].status]
            else:
                statuses = [x.status for x in other.children]
            if any(s == "FAILED" for s in statuses):
                return "failed"
            if not all(s == "SUCCEEDED" for s in statuses):
                state = "waiting"
        return state

    def _run(self, job: Job, c: Child) -> None:
        if not self.execute:
            self.ran.append((job.name, c.index))
            c.status, c.status_reason, c.exit_code, c.started_at, c.stopped_at = "SUCCEEDED", EXITED, 0, _ms(), _ms()
            c.attempts.append({"container": {"exitCode": 0}, "startedAt": c.started_at, "stoppedAt": c.stopped_at})
            return
        definition = self._definition(job.definition)
        command = definition["containerProperties"]["command"]
        strategy = definition.get("retryStrategy") or {}
        max_attempts = int(strategy.get("attempts", 1))
        while True:
            defined = {e["name"]: e["value"] for e in definition["containerProperties"].get("environment", [])}
            env = {"PATH": os.environ["PATH"], "HOME": str(self.workdir), **defined, **job.env,  # as Batch merges them
                   "AWS_BATCH_JOB_ID": c.job_id, "AWS_BATCH_JOB_ATTEMPT": str(len(c.attempts) + 1),
                   "AWS_BATCH_JQ_NAME": job.queue}
            if c.index is not None:
                env["AWS_BATCH_JOB_ARRAY_INDEX"] = str(c.index)
            self.workdir.mkdir(parents=True, exist_ok=True)
            started = _ms()
            c.status, c.started_at = "RUNNING", c.started_at or started
            self.ran.append((job.name, c.index))
            memory = job.memory_mib or next(int(r["value"]) for r in definition["containerProperties"][
                "resourceRequirements"] if r["type"] == "MEMORY")
            self.memory_of_runs.append((job.name, c.index, memory))
            cgroup = self._cgroup(c, memory)
            argv = list(command)
            if cgroup is not None:
                argv = cgroup.wrap(argv)
                env["CORRAL_OOM_EVENTS"] = str(cgroup.path / (
                    "memory.events" if cgroup.kind == "cgroup2" else "memory.oom_control"))
            try:
                proc = subprocess.run(argv, env=env, cwd=self.workdir, capture_output=True, text=True,
                                      timeout=self.timeout)
            finally:
                oom_killed = cgroup is not None and cgroup.oom_killed()
                if cgroup is not None:
                    cgroup.remove()
            code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
            c.container_reason = "OutOfMemoryError: Container killed due to memory usage" if oom_killed and code else ""
            stream = f"corral/default/{c.job_id.replace(':', '-')}-{len(c.attempts) + 1}"
            self._log(definition, stream, proc.stdout + proc.stderr)
            c.attempts.append({"container": {"exitCode": code, "logStreamName": stream},
                               "startedAt": started, "stoppedAt": _ms(), "statusReason": EXITED,
                               "stderr": proc.stderr})
            if code == 0:
                c.status, c.status_reason, c.exit_code, c.stopped_at = "SUCCEEDED", EXITED, 0, _ms()
                return
            if len(c.attempts) >= max_attempts or _action(strategy, EXITED, "", code) == "EXIT":
                c.status, c.status_reason, c.exit_code, c.stopped_at = "FAILED", EXITED, code, _ms()
                return


    def _cgroup(self, c: Child, memory: int) -> Any:
        from corral.backends import memory_limit

        if not self.memory_enforced:
            return None
        name = f"corral-sim-{os.getpid()}-{c.job_id.replace(':', '-')}-{len(c.attempts) + 1}"
        return memory_limit.create(self.limiter, name, memory, None)

    def _log(self, definition: dict[str, Any], stream: str, text: str) -> None:
        """An attempt's output in CloudWatch Logs, as the awslogs driver writes it (one event a line)."""
        if self.logs is None or not text:
            return
        options = (definition.get("containerProperties", {}).get("logConfiguration") or {}).get("options") or {}
        group = options.get("awslogs-group") or "/aws/batch/job"
        with self._lock:
            with contextlib.suppress(self.logs.exceptions.ResourceAlreadyExistsException):
                self.logs.create_log_group(logGroupName=group)
            self.logs.create_log_stream(logGroupName=group, logStreamName=stream)
            t = _ms()
            self.logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[
                {"timestamp": t, "message": line} for line in text.splitlines() if line])


class KilledSubmitter(BaseException):
    """The submitting process dies (as with kill -9) right after a SubmitJob returned."""


def _action(strategy: dict[str, Any], status_reason: str, reason: str, exit_code: int) -> str:
    """Batch's evaluateOnExit: the first rule whose given fields all match decides; none: RETRY."""
    for rule in strategy.get("evaluateOnExit") or []:
        checks = [(rule.get("onStatusReason"), status_reason), (rule.get("onReason"), reason),
                  (rule.get("onExitCode"), str(exit_code))]
        if all(pattern is None or fnmatch.fnmatchcase(value, pattern) for pattern, value in checks):
            return str(rule["action"]).upper()
    return "RETRY"


def _ms() -> int:
    return int(time.time() * 1000)
