"""Out-of-memory kills on AWS Batch: recognised in the refresh, retried as a NEW job with more memory.

Recognised (:func:`name_oom`): a FAILED child whose reason carries ECS's
``OutOfMemoryError: Container killed due to memory usage`` (Batch copies it into the container's
``reason``; https://docs.aws.amazon.com/AmazonECS/latest/developerguide/out-of-memory.html), or that
exited 137 with no other cause given (SIGKILL: the kernel's OOM killer, or the wrapper stopping after
it saw the container cgroup's ``oom_kill`` count grow — it never re-runs a command killed for memory
at the same memory; a Spot interruption or a cancel that also ends in 137 says so in its reason).
Its reason becomes ``out of memory (limit X): <Batch's reason>``.

Retried (:func:`retry_with_more_memory`): a job's memory is fixed when it is submitted (the job
definition's MEMORY, or the SubmitJob ``containerOverrides.resourceRequirements``), so the attempt
with more memory is a new SubmitJob. The trigger is the refresh that first sees the failure —
``corral run``'s wait, ``corral status`` (also ``--watch``), or ``resume`` — under the run's lease,
re-reading the records, so it happens once. The task (and whatever needs it, which Batch failed with
``Dependent Job failed``) go in a new round, the task's job overriding MEMORY (and, on Fargate, VCPU
to a valid pair) with the larger size. With no corral looking, nothing resubmits: Batch cannot grow
a job by itself. Bounded by the largest allowed instance type's usable memory holding the stage's
vCPUs and GPUs (Fargate: 120 GiB). Without ``retry_memory`` an out-of-memory kill is retried with the
same memory, the same way, while ``retries`` allow.
"""

from __future__ import annotations

from typing import Any

from corral.backends import oom
from corral.model import TaskRecord, TaskState
from corral.plan import Plan
from corral.spec import Resources

OOM_STATUS = "OutOfMemoryError"
KEY = "memory"  # run.options["aws"]["memory"]: task id -> {"mib", "base"}


def memory_of(opts: dict[str, Any], plan: Plan | None, task_id: str) -> int | None:
    """The memory (MiB) the task's current job asked for."""
    grown = opts.get(KEY, {}).get(task_id, {}).get("mib")
    if grown:
        return int(grown)
    task = plan.by_id.get(task_id) if plan is not None else None
    return task.stage.resources.memory if task is not None else None


# An exit 137 counts as an out-of-memory kill only when Batch gives no other cause (a Spot
# interruption, an instance that went away and a cancel also end in SIGKILL).
_PLAIN_EXIT = ("", "Essential container in task exited")


def is_batch_oom(t: TaskRecord) -> bool:
    return t.state == TaskState.FAILED and (
        OOM_STATUS in t.reason or (t.exit_code == oom.EXIT_KILLED and t.reason.strip() in _PLAIN_EXIT))


def name_oom(opts: dict[str, Any], plan: Plan | None, changed: dict[str, TaskRecord]) -> None:
    """Rewrite the reason of children killed for memory as every backend says it."""
    for tid, t in list(changed.items()):
        if not is_batch_oom(t) or oom.is_oom(t.reason):
            continue
        mib = memory_of(opts, plan, tid)
        if mib:
            changed[tid] = t.replace(reason=oom.reason(mib, t.reason or "exit 137"))


def count_attempts(opts: dict[str, Any], changed: dict[str, TaskRecord]) -> None:
    """A task resubmitted after an out-of-memory kill: its attempts are those of its earlier jobs
    (``base``) plus this job's Batch attempts (each try one attempt; the refresh describes the
    children of resubmitted tasks, see :func:`resubmitted`)."""
    grown = opts.get(KEY, {})
    for tid, t in list(changed.items()):
        entry = grown.get(tid)
        if entry and t.state != TaskState.SUBMITTED:
            changed[tid] = t.replace(attempts=int(entry.get("base", 0)) + max(int(t.attempts), 1))


def resubmitted(opts: dict[str, Any]) -> set[str]:
    """Task ids resubmitted for memory: the refresh describes their children when they end, so
    :func:`count_attempts` adds this job's own attempts, not a count carried from the last job."""
    return set(opts.get(KEY, {}))


def on_resume(plan: Plan, opts: dict[str, Any], tasks: list[TaskRecord], instance_types: list[str]) -> dict[str, int]:
    """``resume``: a task last killed for memory goes on with more (retry_memory) and a fresh budget
    of ``retries``; one resubmitted for memory before keeps its memory. Returns task id -> MiB."""
    grown: dict[str, Any] = dict(opts.get(KEY, {}))
    out: dict[str, int] = {}
    for t in tasks:
        task = plan.by_id.get(t.task_id)
        if task is None:
            continue
        res = task.stage.resources
        if oom.is_oom(t.reason) and oom.grows(res):
            killed_at = oom.limit_of(t.reason) or res.memory
            mib = oom.next_memory(res, killed_at, bound_mib(res, instance_types)) or killed_at
        elif t.task_id in grown:
            mib = int(grown[t.task_id]["mib"])
        else:
            continue
        grown[t.task_id] = {"mib": mib, "base": t.attempts, "from": t.attempts, "jobs": 1}
        out[t.task_id] = mib
    if out:
        opts[KEY] = grown
    return out


def bound_mib(resources: Resources, instance_types: list[str]) -> int | None:
    """The most memory one task of these vCPUs/GPUs can get from the allowed instance types."""
    from corral.instances import (
        FARGATE_SIZES,
        _fargate_memories,
        expand,
        is_fargate_entry,
    )
    from corral.routes import route

    if route(resources, instance_types).fargate:  # its jobs stay on the Fargate queue: Fargate's largest
        return max(max(_fargate_memories(v)) for v in FARGATE_SIZES if v >= resources.vcpus)
    ec2 = [e for e in instance_types if not is_fargate_entry(e)]
    best = 0
    try:
        types = expand(ec2) if ec2 else []
    except Exception:  # noqa: BLE001 - an unknown entry is refused elsewhere; no bound from it
        types = []
    for it in types:
        if it.vcpus >= resources.vcpus and it.gpus >= resources.gpus:
            best = max(best, it.usable_memory_mib)
    return best or None


def overrides(resources: Resources, mib: int, fargate: bool) -> list[dict[str, str]]:
    """SubmitJob ``containerOverrides.resourceRequirements`` giving a job ``mib`` of memory."""
    if fargate:
        from corral.instances import fargate_size

        size = fargate_size(resources.model_copy(update={"memory": mib, "retry_memory": None}))
        if size is not None:
            return [{"type": "VCPU", "value": f"{size[0]:g}"}, {"type": "MEMORY", "value": str(size[1])}]
    return [{"type": "MEMORY", "value": str(int(mib))}]


def plan_retries(plan: Plan, opts: dict[str, Any], tasks: list[TaskRecord],
                 instance_types: list[str]) -> tuple[set[str], dict[str, Any], list[TaskRecord]]:
    """(tasks to submit again: the killed ones and what needs them, the new memory map, killed
    tasks whose memory cannot grow with their final reason)."""
    grown: dict[str, Any] = dict(opts.get(KEY, {}))
    by_id = {t.task_id: t for t in tasks}
    redo: set[str] = set()
    finals: list[TaskRecord] = []
    for t in tasks:
        task = plan.by_id.get(t.task_id)
        if task is None or t.state != TaskState.FAILED or not oom.is_oom(t.reason) or "not retried" in t.reason:
            continue
        res = task.stage.resources
        entry = dict(grown.get(t.task_id, {}))
        # each try is one Batch attempt, so t.attempts counts every try so far (count_attempts adds
        # the earlier jobs'); the budget is the stage's retries, as on every backend
        if int(t.attempts) - int(entry.get("from", 0)) >= task.stage.retries + 1:  # `from`: a resume's fresh budget
            continue
        killed_at = oom.limit_of(t.reason) or res.memory
        if oom.grows(res):
            bound = bound_mib(res, instance_types)
            more = oom.next_memory(res, killed_at, bound)
            if more is None:
                finals.append(t.replace(reason=oom.final_reason(res, killed_at, bound, "an allowed instance type")))
                continue
        else:
            more = killed_at  # retried like any failure: the same memory, in a new job
        grown[t.task_id] = {**entry, "mib": more, "base": int(t.attempts), "jobs": int(entry.get("jobs", 1)) + 1}
        redo.add(t.task_id)
    if not redo:
        return set(), grown, finals
    dependents = plan.dependents()
    stack, again = list(redo), set(redo)
    while stack:
        for d in dependents[stack.pop()]:
            if d not in again and d in by_id and not by_id[d].state.ok:
                again.add(d)
                stack.append(d)
    return again, grown, finals
