"""Runtime records shared by backends and state stores: runs, tasks and attempts."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class TaskState(str, Enum):
    """Where a task stands. The string values are what the stores and ``--json`` carry."""

    PENDING = "PENDING"  # planned, not handed to the backend yet
    SUBMITTED = "SUBMITTED"  # handed to the backend, waiting for resources or dependencies
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"  # outputs already existed
    REUSED = "REUSED"  # succeeded in an earlier run of the workflow (same task id): not run again
    CANCELLED = "CANCELLED"
    UPSTREAM_FAILED = "UPSTREAM_FAILED"  # a task it needs did not succeed

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def ok(self) -> bool:
        """Done, and whatever depends on it may run."""
        return self in (TaskState.SUCCEEDED, TaskState.SKIPPED, TaskState.REUSED)


TERMINAL_STATES = frozenset(
    {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.SKIPPED, TaskState.REUSED, TaskState.CANCELLED,
     TaskState.UPSTREAM_FAILED}
)


class RunState(str, Enum):
    RUNNING = "RUNNING"  # a scheduler (local) or the cloud (aws) is working on it
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    INTERRUPTED = "INTERRUPTED"  # the local scheduler died; `corral resume` goes on


def now() -> float:
    return time.time()


@dataclass
class RunRecord:
    run_id: str
    workflow_name: str
    backend: str
    created_at: float
    state: RunState = RunState.RUNNING
    workflow_path: str = ""
    base_dir: str = ""
    host: str = ""
    pid: int | None = None  # pid of the local scheduler while it runs
    updated_at: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # backend settings needed to resume/cancel

    def replace(self, **changes: Any) -> RunRecord:
        return dataclasses.replace(self, **changes)


@dataclass(slots=True)  # slots: a 100,000-item run holds 300,000 of these
class TaskRecord:
    run_id: str
    task_id: str
    stage: str
    item_key: str
    item_index: int | None  # None for tasks that run once per run
    state: TaskState = TaskState.PENDING
    attempts: int = 0
    exit_code: int | None = None
    reason: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    external_id: str = ""  # e.g. the Batch job id of this task (array child ids are "<parent>:<index>")
    instance_type: str = ""

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.item_key}]"

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or now()) - self.started_at

    def replace(self, **changes: Any) -> TaskRecord:
        return dataclasses.replace(self, **changes)


@dataclass(slots=True)  # slots: a 100,000-item run holds 300,000 of these
class AttemptRecord:
    run_id: str
    task_id: str
    attempt: int  # 1-based
    state: TaskState = TaskState.RUNNING
    exit_code: int | None = None
    reason: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    stdout: str = ""  # a file path (local) or a log stream name (aws)
    stderr: str = ""
    external_id: str = ""
    host: str = ""
    pid: int | None = None
    instance_type: str = ""

    def replace(self, **changes: Any) -> AttemptRecord:
        return dataclasses.replace(self, **changes)


def finished_count(per_state: dict[str, int]) -> int:
    """How many of a stage's tasks finished (succeeded, skipped, failed, or failed upstream): what a
    progress bar fills for. Cancelled tasks are terminal but did not finish."""
    return sum(n for s, n in per_state.items() if TaskState(s).terminal and s != TaskState.CANCELLED.value)


def summarize(tasks: list[TaskRecord]) -> dict[str, dict[str, int]]:
    """Counts per stage and state, stages in first-seen order."""
    out: dict[str, dict[str, int]] = {}
    for t in tasks:
        per = out.setdefault(t.stage, {})
        per[t.state.value] = per.get(t.state.value, 0) + 1
    return out


FAILED_STATES = (TaskState.FAILED, TaskState.UPSTREAM_FAILED)


@dataclass
class RunSummary:
    """What `corral status` and the end of `run`/`resume` print, without every task in memory:
    counts per stage and state (stages in plan order), the median and longest duration of each
    stage's ended tasks, and the first failures. A store that can aggregate (SQLite: GROUP BY over
    an index) makes one directly; :meth:`of` makes the same from task records."""

    stages: dict[str, dict[str, int]]  # stage -> state value -> count, stages in first-seen order
    times: dict[str, tuple[float, float]]  # stage -> (median, max) seconds of its ended tasks
    failures: list[TaskRecord]  # the first FAILED/UPSTREAM_FAILED tasks, in plan order
    failed_total: int  # how many tasks are FAILED or UPSTREAM_FAILED

    @property
    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in TaskState}
        for per in self.stages.values():
            for state, n in per.items():
                out[state] += n
        return out

    @property
    def total(self) -> int:
        return sum(sum(per.values()) for per in self.stages.values())

    @classmethod
    def of(cls, tasks: list[TaskRecord], max_failures: int = 10) -> RunSummary:
        import statistics

        durs: dict[str, list[float]] = {}
        failures: list[TaskRecord] = []
        failed_total = 0
        for t in tasks:
            if t.started_at is not None and t.ended_at is not None:
                durs.setdefault(t.stage, []).append(t.ended_at - t.started_at)
            if t.state in FAILED_STATES:
                failed_total += 1
                if len(failures) < max_failures:
                    failures.append(t)
        times = {s: (statistics.median(d), max(d)) for s, d in durs.items()}
        return cls(stages=summarize(tasks), times=times, failures=failures, failed_total=failed_total)
