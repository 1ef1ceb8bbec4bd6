"""What AWS Batch says of a task: the state a job's status and reason map to, and the fewest
ListJobs calls that tell which children of an array moved since the store last looked.

``children`` is the core of ``AwsBatchBackend.refresh``: a child's terminal status never changes,
so a status whose count in the parent's ``statusSummary`` equals what the store already records
for that array is not listed again.
"""

from __future__ import annotations

import collections
from typing import Any

from corral.backends.aws_batch.submit import BatchApi
from corral.model import TaskRecord, TaskState

CANCEL_REASON = "cancelled by corral"
# The Batch status behind each recorded task state (what a child in that state shows in a summary).
_BATCH_STATUS = {
    TaskState.SUCCEEDED: "SUCCEEDED", TaskState.FAILED: "FAILED", TaskState.UPSTREAM_FAILED: "FAILED",
    TaskState.CANCELLED: "FAILED", TaskState.RUNNING: "RUNNING",
}
_WAITING_ORDER = ["STARTING", "RUNNABLE", "PENDING", "SUBMITTED"]


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


def children(
    api: BatchApi, parent: str, job: dict[str, Any], members: list[TaskRecord],
) -> dict[str, dict[str, Any]]:
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
    succeeded: dict[str, Any] = {"status": "SUCCEEDED", **times}
    waiting_summary: dict[str, Any] = {"status": "SUBMITTED"}
    if job.get("status") == "SUCCEEDED" or summary.get("SUCCEEDED", 0) == size:
        return {f"{parent}:{i}": succeeded for i in range(size)}
    known = collections.Counter(_BATCH_STATUS.get(t.state, "") for t in members)
    n = {s: summary.get(s, 0) for s in ("SUCCEEDED", "FAILED", "RUNNING", *_WAITING_ORDER)}
    moved = {s: n[s] != known[s] for s in ("SUCCEEDED", "FAILED", "RUNNING")}
    out: dict[str, dict[str, Any]] = {}
    listed: list[str] = []

    def list_status(status: str) -> None:
        listed.append(status)
        for s in api.list_jobs(f"list {status} children of {parent}", arrayJobId=parent, jobStatus=status):
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


def apply_summary(t: TaskRecord, s: dict[str, Any], changed: dict[str, TaskRecord]) -> None:
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
    fields = {
        "state": state,
        "reason": reason if state not in (TaskState.SUCCEEDED, TaskState.SUBMITTED, TaskState.RUNNING) else "",
        "exit_code": exit_code if exit_code is not None else t.exit_code,
        "started_at": _seconds(s.get("startedAt")) or t.started_at,
        "ended_at": _seconds(s.get("stoppedAt")) if state.terminal else None,
        "attempts": attempts,
    }
    # (a refresh applies a summary to every live task of 10,000: copy only those that change)
    if any(getattr(t, k) != v for k, v in fields.items()):
        changed[t.task_id] = t.replace(**fields)
