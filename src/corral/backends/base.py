"""The interface every backend implements.

A backend gets a :class:`~corral.plan.Plan` and a :class:`~corral.state.base.StateStore` in
which the run and all its tasks (state PENDING) are already recorded. It moves tasks through
SUBMITTED/RUNNING to a terminal state and records every change in the store.

What a task's command can rely on, on every backend:
- environment: each item field as ``NAME`` and ``CORRAL_ITEM_NAME``; ``CORRAL_RUN_ID``,
  ``CORRAL_STAGE``, ``CORRAL_TASK_ID``, ``CORRAL_ITEM_KEY``, ``CORRAL_ITEM_INDEX``,
  ``CORRAL_WORKDIR`` (the run's shared workspace); the stage's ``env``; its ``secrets``
  resolved at run time (never stored). On AWS ``CORRAL_TASK_ID`` is set only for stages that
  use ``{task}`` (or name ``CORRAL_TASK_ID``) in their command, env or transfer URIs.
- a string command runs under ``/bin/sh -c``; a list runs as argv. Placeholders are substituted
  before it starts (shell-quoted in string commands).
- locally the working directory is the workflow file's folder; on AWS it is the image's.
- exit code 0 is success; anything else is a failure (retried up to ``retries`` times).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from corral.errors import UsageError
from corral.model import AttemptRecord, RunRecord, TaskRecord
from corral.state.base import StateStore

if TYPE_CHECKING:  # the planner (pydantic) loads when a plan is made, not for `corral status`
    from corral.plan import Plan

ProgressFn = Callable[[list[TaskRecord]], None]

# A task that exits 0 but lacks a declared output is FAILED with the reason
# f"{OUTPUT_MISSING}: {the first missing output}", and retried like any failure (every backend).
OUTPUT_MISSING = "declared output missing"


@dataclass
class RunOptions:
    force: bool = False  # run tasks even when their outputs exist (and reuse nothing)
    max_parallel: int | None = None  # cap on concurrent tasks (where the backend's `flags` has it)
    runtime: Literal["auto", "process", "container"] = "auto"  # local
    wait: bool = True  # wait until the run ends (backends that always wait ignore it)
    progress: ProgressFn | None = None  # called with the run's tasks whenever some change
    force_stages: tuple[str, ...] = ()  # run these stages (and what needs them) even when done before
    reuse: bool = True  # reuse tasks that succeeded in earlier runs of the workflow (same task id)


# The RunOptions fields a user sets with a flag; a backend lists those it honours in ``flags``.
RUN_FLAGS = ("force", "max_parallel", "runtime", "wait", "force_stages", "reuse")


@runtime_checkable
class Backend(Protocol):
    """What a backend does, and what callers need to know of it (so none compares names)."""

    name: ClassVar[str]
    # `start` returns only once the run has ended, whatever `RunOptions.wait` says.
    always_waits: ClassVar[bool]
    # Every attempt of every task is in the store (`StateStore.get_attempts`); otherwise
    # `attempt_history` asks the backend.
    records_attempts: ClassVar[bool]
    # A process on the submitting host drives the run: if it dies, the run is INTERRUPTED.
    driven_from_host: ClassVar[bool]
    # How `corral status`/the report price a run: "actual" (what it cost where it ran) or
    # "hypothetical" (what the same attempts would cost on AWS Batch).
    cost_basis: ClassVar[Literal["actual", "hypothetical"]]
    # The RunOptions fields (RUN_FLAGS) this backend honours; others are ignored with a note.
    flags: ClassVar[frozenset[str]]

    @classmethod
    def create(cls, *, workflow: Any = None, run: RunRecord | None = None, **settings: Any) -> Backend:
        """A backend for ``workflow`` (to start a run) or for a recorded ``run`` (to follow it)."""
        ...

    @classmethod
    def open_store(cls, *, workflow: Any = None, **settings: Any) -> StateStore:
        """The state store this backend's runs are recorded in."""
        ...

    @classmethod
    def store_exists(cls) -> bool:
        """Whether that store may hold runs already (without creating it)."""
        ...

    def run_options(self, workflow: Any) -> dict[str, Any]:
        """What a new run's record keeps so any machine can follow it (``RunRecord.options``)."""
        ...

    def workspace(self, run: RunRecord) -> str | None:
        """The run's shared workspace as a path on this machine, or None when it lives elsewhere
        (EFS on AWS)."""
        ...

    def attempt_history(self, run: RunRecord, tasks: Sequence[TaskRecord]) -> dict[str, list[AttemptRecord]]:
        """Attempts the backend knows beyond the store (by task id); {} when ``records_attempts``."""
        ...

    def diagnose(self, run: RunRecord | None, store: StateStore | None, plan: Plan | None,
                 tasks: list[TaskRecord] | None, *, runnable_after_s: float) -> list[Any]:
        """`corral doctor`'s findings about this backend (and the run, when given)."""
        ...

    def check(self, plan: Plan) -> None:
        """Refuse, with a PlanError naming the stage, what this backend can never run."""
        ...

    def start(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions) -> None:
        """Run (local) or submit (aws) every PENDING task of the run."""
        ...

    def resume(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions,
               tasks: list[TaskRecord] | None = None) -> None:
        """Go on with a run: reconcile, then run or submit exactly what has not succeeded.
        ``tasks``: the run's task records as `api.resume` read them under the lease (a backend may
        use them instead of reading every row again); None: read them."""
        ...

    def refresh(self, run: RunRecord, store: StateStore) -> list[TaskRecord]:
        """Bring the store up to date with the backend; return the run's tasks."""
        ...

    def cancel(self, run: RunRecord, store: StateStore) -> None: ...

    def logs(
        self, run: RunRecord, store: StateStore, task: TaskRecord, attempt: int | None, follow: bool
    ) -> Iterator[str]:
        """Lines of the task's output (last attempt unless ``attempt`` is given); ``follow``
        keeps reading until the task reaches a terminal state."""
        ...


def chosen_attempt(task: TaskRecord, attempts: Sequence[AttemptRecord], attempt: int | None) -> AttemptRecord:
    """The attempt `corral logs` shows: ``attempt`` (1-based), else the last; a UsageError naming
    the range when there is no such attempt. ``attempts`` is not empty."""
    chosen = attempts[-1] if attempt is None else next((a for a in attempts if a.attempt == attempt), None)
    if chosen is None:
        raise UsageError(f"task {task.label} has no attempt {attempt}", f"it has attempts 1..{attempts[-1].attempt}")
    return chosen
