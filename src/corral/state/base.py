"""The protocol every state store implements; ``tests/contract/test_state_contract.py`` checks it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from corral.model import AttemptRecord, RunRecord, TaskRecord, TaskState


@runtime_checkable
class StateStore(Protocol):
    """Runs, their tasks and the attempts of each task.

    A store must be safe to read while another process writes (a ``status`` while a run goes on).
    ``create_run`` raises :class:`corral.errors.StateError` if the run id exists already, so a
    run is never recorded twice.
    """

    def create_run(self, run: RunRecord, manifest: bytes, tasks: Sequence[TaskRecord]) -> None:
        """Record the run, its manifest and its tasks atomically: until every part is written,
        no reader (``get_run``, ``list_runs``, ``resume``, another machine) sees the run."""
        ...

    def get_run(self, run_id: str) -> RunRecord:
        """The run, or StateError naming the run id and how to list runs."""
        ...

    def list_runs(self, limit: int = 20) -> list[RunRecord]:
        """Newest first."""
        ...

    def save_run(self, run: RunRecord) -> None: ...

    def load_manifest(self, run_id: str) -> bytes: ...

    def get_tasks(self, run_id: str, states: Iterable[TaskState] | None = None) -> list[TaskRecord]: ...

    def save_tasks(self, tasks: Sequence[TaskRecord]) -> None:
        """Upsert whole task records, in as few writes as the store allows."""
        ...

    def swap_task(self, old: TaskRecord, new: TaskRecord) -> bool:
        """Write ``new`` only if the stored task is still exactly ``old`` (compare-and-set); True if
        written. Of several processes swapping the same ``old``, exactly one wins."""
        ...

    def update_tasks(self, pairs: Sequence[tuple[TaskRecord, TaskRecord]]) -> list[TaskRecord]:
        """For each (old, new), ``swap_task`` in as few writes as the store allows; the records written.
        Refreshes write with this, so a claim another process made is never overwritten."""
        ...

    def restore_tasks(self, run_id: str, tasks: Sequence[TaskRecord]) -> int:
        """Record those of ``tasks`` the run does not hold (``resume`` rebuilds from the manifest);
        existing records stay as they are. Returns how many were added."""
        ...

    def lease(self, run_id: str, purpose: str, wait: float = ...) -> AbstractContextManager[None]:
        """Hold the run's one-writer lease (re-entrant in a process); if another process holds it
        after ``wait`` seconds, :class:`corral.state.lease.LeaseHeld` says who (host, pid, since)."""
        ...

    def save_attempt(self, attempt: AttemptRecord) -> None:
        """Insert or replace the attempt (run_id, task_id, attempt)."""
        ...

    def get_attempts(self, run_id: str, task_id: str) -> list[AttemptRecord]:
        """Oldest first."""
        ...

    def close(self) -> None: ...
