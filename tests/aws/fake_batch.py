"""An in-memory AWS Batch behind the seam corral owns (:class:`~corral.backends.aws_batch.submit.BatchApi`).

Every Batch call corral's backend makes goes through ``BatchApi.call`` / ``BatchApi.submit_job``;
:class:`FakeBatch` answers them itself — no moto, no HTTP, no private internals of an emulator —
so tests can put 10,000 array children in any mix of states in microseconds and count exactly what
a refresh asks. Job states are the ones of :class:`contract.batch_sim.SimulatedBatch` (a parent's
status and ``statusSummary`` follow its children, DescribeJobs of a parent carries its
definition's ``retryStrategy`` as AWS's does); this class adds what that simulation sends to moto:
job definitions, queues and SubmitJob, held in memory and checked against AWS's documented limits:

- SubmitJob ≤ 30 KiB of JSON; array size 2–10,000; ≤ 20 ``dependsOn``; N_TO_N only between arrays
  of equal size (Batch service quotas; API reference, SubmitJob / ArrayProperties);
- each job's container overrides within ECS's 8,192 characters, with Batch's own variables
  (ECS RunTask, ``overrides``; the rule of ``tests/strict_aws.py``, whose arithmetic is reused);
- DescribeJobs ≤ 100 ids; ListJobs ``maxResults`` 1–1,000 and paged with ``nextToken``
  (API reference, DescribeJobs / ListJobs).

A request over a limit raises the ``ClientError`` AWS gives. ``calls`` records every operation
with its parameters, which is what call-count budgets are asserted on. Tests steer a child with
:meth:`steer` (status, reason, exit code), the way Batch would move it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from contract.batch_sim import ENDED, Child, SimulatedBatch, _ms
from strict_aws import (
    ARRAY_MAX,
    ARRAY_MIN,
    ECS_OVERRIDES_LIMIT,
    ECS_OVERRIDES_MESSAGE,
    MAX_DEPENDS_ON,
    SUBMIT_JOB_LIMIT,
    batch_variables_reserve,
    overrides_length,
)

REGION = "us-east-2"
ACCOUNT = "123456789012"
DESCRIBE_MAX = 100  # DescribeJobs: "A list of up to 100 job IDs"
LIST_MAX = 1000  # ListJobs maxResults: 1-1000 (100 when not given)


def _refuse(op: str, message: str, code: str = "ClientException") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": 400}}, op)


class FakeBatch(SimulatedBatch):
    """AWS Batch in memory, at the ``BatchApi`` seam (see the module docstring)."""

    def __init__(self, *, region: str = REGION, account: str = ACCOUNT) -> None:
        super().__init__(None, workdir=Path("/nonexistent"), execute=False)
        self.region, self.account = region, account
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._by_name: dict[str, list[dict[str, Any]]] = {}
        self._seam_lock = threading.RLock()  # two watchers (threads) may share one Batch

    # -- what tests read ------------------------------------------------------------------------
    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]

    def count(self, op: str) -> int:
        return sum(1 for o, _ in self.calls if o == op)

    def reset_calls(self) -> None:
        self.calls.clear()

    def parents(self, prefix: str = "") -> list[Any]:
        """Submitted jobs whose name starts with ``prefix``, in submission order."""
        return [j for j in self.jobs.values() if j.name.startswith(prefix)]

    def queue_arn(self, name: str) -> str:
        return f"arn:aws:batch:{self.region}:{self.account}:job-queue/{name}"

    @staticmethod
    def steer(child: Child, status: str, reason: str | None = None, exit_code: int | None = None) -> None:
        """Move a child as Batch would: an ended child has a stop time, a reason and an exit code."""
        child.status = status
        ended = status in ENDED
        child.status_reason = (reason or "") if ended else ""
        child.exit_code = exit_code if ended else None
        if status in ("RUNNING", *ENDED) and not child.started_at:
            child.started_at = _ms()
        child.stopped_at = _ms() if ended else None

    # -- the seam ---------------------------------------------------------------------------------
    def submit_job(self, kwargs: Any) -> str:
        return str(self.call("submit_job", f"submit job {kwargs['jobName']}", **kwargs)["jobId"])

    def call(self, op: str, action: str, **kwargs: Any) -> dict[str, Any]:
        with self._seam_lock:
            return self._call(op, action, **kwargs)

    def _call(self, op: str, action: str, **kwargs: Any) -> dict[str, Any]:
        self.calls.append((op, kwargs))
        if op == "describe_jobs" and len(kwargs["jobs"]) > DESCRIBE_MAX:
            raise _refuse("DescribeJobs", f"at most {DESCRIBE_MAX} job ids per call, got {len(kwargs['jobs'])}")
        if op == "list_jobs":
            return self._page(**kwargs)
        if op in ("describe_jobs", "terminate_job", "cancel_job"):
            return super().call(op, action, **kwargs)
        handler = getattr(self, f"_{op}", None)
        if handler is None:
            raise AssertionError(f"FakeBatch does not play {op} (called to {action})")
        result: dict[str, Any] = handler(**kwargs)
        return result

    # -- job definitions and queues -----------------------------------------------------------
    def _register_job_definition(self, **kw: Any) -> dict[str, Any]:
        name = kw["jobDefinitionName"]
        revision = len(self._by_name.get(name, [])) + 1
        arn = f"arn:aws:batch:{self.region}:{self.account}:job-definition/{name}:{revision}"
        body = {**kw, "jobDefinitionArn": arn, "revision": revision, "status": "ACTIVE"}
        self._by_name.setdefault(name, []).append(body)
        self.definitions[arn] = body
        return {"jobDefinitionName": name, "jobDefinitionArn": arn, "revision": revision}

    def _describe_job_definitions(self, **kw: Any) -> dict[str, Any]:
        if "jobDefinitions" in kw:
            found = [self._definition(a) for a in kw["jobDefinitions"]]
        else:
            found = list(self._by_name.get(kw.get("jobDefinitionName", ""), []))
        if kw.get("status"):
            found = [d for d in found if d["status"] == kw["status"]]
        return {"jobDefinitions": found}

    def _describe_job_queues(self, **kw: Any) -> dict[str, Any]:
        return {"jobQueues": [{"jobQueueArn": q, "jobQueueName": q.rsplit("/", 1)[-1], "state": "ENABLED",
                               "status": "VALID"} for q in kw.get("jobQueues", [])]}

    def _definition(self, arn: str) -> dict[str, Any]:
        if arn in self.definitions:
            return self.definitions[arn]
        name, _, rev = arn.rsplit("/", 1)[-1].partition(":")
        versions = self._by_name.get(name) or []
        if not versions:
            raise _refuse("DescribeJobDefinitions", f"no job definition {arn}")
        return versions[int(rev) - 1] if rev else versions[-1]

    # -- jobs ---------------------------------------------------------------------------------
    def _submit_job(self, **kw: Any) -> dict[str, Any]:
        self._check_submit(kw)
        job_id = f"{len(self.jobs):08d}-fake-{abs(hash(kw['jobName'])) % 10**12:012d}"
        self._record(kw, job_id)
        return {"jobId": job_id, "jobName": kw["jobName"],
                "jobArn": f"arn:aws:batch:{self.region}:{self.account}:job/{job_id}"}

    def _check_submit(self, kw: dict[str, Any]) -> None:
        body = len(json.dumps(kw, separators=(",", ":")))
        if body > SUBMIT_JOB_LIMIT:
            raise _refuse("SubmitJob", f"SubmitJob request of {body} bytes is over the 30 KiB limit")
        size = int((kw.get("arrayProperties") or {}).get("size", 0) or 0)
        if size and not ARRAY_MIN <= size <= ARRAY_MAX:
            raise _refuse("SubmitJob", f"array size {size} is not between {ARRAY_MIN} and {ARRAY_MAX}")
        depends = kw.get("dependsOn") or []
        if len(depends) > MAX_DEPENDS_ON:
            raise _refuse("SubmitJob", f"{len(depends)} dependencies: at most {MAX_DEPENDS_ON}")
        for d in depends:
            other = self.jobs.get(d["jobId"])
            if other is None:
                raise _refuse("SubmitJob", f"dependency {d['jobId']} does not exist")
            if d.get("type") == "N_TO_N" and (other.size != size or size < ARRAY_MIN):
                raise _refuse("SubmitJob", f"N_TO_N dependency between arrays of size {size} and {other.size}")
        definition = self._definition(kw["jobDefinition"])
        overrides = kw.get("containerOverrides") or {}
        container = definition.get("containerProperties") or {}
        length = overrides_length(
            overrides.get("command") or container.get("command") or [],
            overrides.get("environment") or [],
            overrides.get("resourceRequirements") or container.get("resourceRequirements") or [],
        ) + batch_variables_reserve(kw["jobQueue"], bool(size))
        if length > ECS_OVERRIDES_LIMIT:
            raise _refuse("SubmitJob", f"{ECS_OVERRIDES_MESSAGE} (this job's: {length})")

    def _page(self, **kw: Any) -> dict[str, Any]:
        """ListJobs, paged as AWS pages it: ``maxResults`` (1-1,000, default 100) and ``nextToken``."""
        limit = int(kw.pop("maxResults", 100))
        if not 1 <= limit <= LIST_MAX:
            raise _refuse("ListJobs", f"maxResults {limit} is not between 1 and {LIST_MAX}")
        start = int(kw.pop("nextToken", "0") or 0)
        everything = self._list(**kw)["jobSummaryList"]
        page: dict[str, Any] = {"jobSummaryList": everything[start : start + limit]}
        if start + limit < len(everything):
            page["nextToken"] = str(start + limit)
        return page
