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

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from corral.model import RunRecord, TaskRecord
from corral.plan import Plan
from corral.state.base import StateStore

ProgressFn = Callable[[list[TaskRecord]], None]


@dataclass
class RunOptions:
    force: bool = False  # run tasks even when their outputs exist
    max_parallel: int | None = None  # local: cap on concurrent tasks
    runtime: Literal["auto", "process", "container"] = "auto"  # local
    wait: bool = True  # aws: wait until the run ends (local always waits)
    progress: ProgressFn | None = None  # called with the run's tasks whenever some change


@runtime_checkable
class Backend(Protocol):
    name: str

    def check(self, plan: Plan) -> None:
        """Refuse, with a PlanError naming the stage, what this backend can never run."""
        ...

    def start(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions) -> None:
        """Run (local) or submit (aws) every PENDING task of the run."""
        ...

    def resume(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions) -> None:
        """Go on with a run: reconcile, then run or submit exactly what has not succeeded."""
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
