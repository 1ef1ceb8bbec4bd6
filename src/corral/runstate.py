"""A run's state and every change to it, in one place.

::

    RUNNING ──► SUCCEEDED | FAILED | CANCELLED      the run ended (its backend saw every task end)
    RUNNING ──► INTERRUPTED                         the process driving it died (local scheduler)
    INTERRUPTED ──► CANCELLED                       `corral cancel` closes it
    any state ──► RUNNING                           only `start` and `resume` (:func:`reopen`)

An ended run (SUCCEEDED, FAILED, CANCELLED) changes only through ``resume``: ``status``,
``--watch``, ``cancel`` and ``doctor`` never turn it into something else. Every writer reads the
stored record just before it writes (never a copy it holds), so a reader with a stale record —
``status --watch`` that read RUNNING a moment before the scheduler recorded SUCCEEDED — cannot
write over the newer state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corral.model import RunRecord, RunState, TaskRecord, TaskState
from corral.state.base import StateStore

ENDED = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})

# Allowed moves other than reopen(): from -> to.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.RUNNING: frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.INTERRUPTED}),
    RunState.INTERRUPTED: frozenset({RunState.CANCELLED}),
    RunState.SUCCEEDED: frozenset(),
    RunState.FAILED: frozenset(),
    RunState.CANCELLED: frozenset(),
}


def allowed(current: RunState, to: RunState) -> bool:
    return to == current or to in TRANSITIONS[current]


def settle(store: StateStore, run_id: str, to: RunState, **changes: Any) -> RunRecord:
    """Move the stored run to ``to`` when its *current* stored state allows it; return the stored
    record (changed or not). ``changes`` are other fields written with the move (e.g. ``pid``)."""
    fresh = store.get_run(run_id)
    if not allowed(fresh.state, to):
        return fresh
    new = fresh.replace(state=to, **changes)
    if new != fresh:
        store.save_run(new)
    return new


def reopen(store: StateStore, run: RunRecord, **changes: Any) -> RunRecord:
    """``start``/``resume``: the run goes (back) to RUNNING, with ``changes`` (pid, options...)."""
    fresh = store.get_run(run.run_id)
    new = fresh.replace(state=RunState.RUNNING, **changes)
    store.save_run(new)
    return new


def interrupt_if_dead(store: StateStore, run: RunRecord, alive: Callable[[RunRecord], bool]) -> RunRecord:
    """Record INTERRUPTED for a RUNNING run whose driving process is gone.

    Order matters: the driver records the run's end *before* it exits, so once ``alive`` says it
    is gone, a fresh read shows its last word. Only if that read still says RUNNING, by the same
    driver (a resume may have started another), is the run interrupted."""
    fresh = store.get_run(run.run_id)
    if fresh.state != RunState.RUNNING or alive(fresh):
        return fresh
    after = store.get_run(run.run_id)  # read again now that the driver is known to be gone
    if after.state != RunState.RUNNING or (after.pid, after.options.get("scheduler_start")) != (
        fresh.pid, fresh.options.get("scheduler_start")
    ):
        return after
    return settle(store, run.run_id, RunState.INTERRUPTED, pid=None)


def outcome(tasks: list[TaskRecord], *, cancelled: bool = False) -> RunState | None:
    """The state a run ends in once all its tasks have ended (None while some have not)."""
    if not tasks or not all(t.state.terminal for t in tasks):
        return None if tasks else RunState.SUCCEEDED
    if cancelled or any(t.state == TaskState.CANCELLED for t in tasks):
        return RunState.CANCELLED
    return RunState.SUCCEEDED if all(t.state.ok for t in tasks) else RunState.FAILED


def end(store: StateStore, run_id: str, tasks: list[TaskRecord], *, cancelled: bool = False,
        **changes: Any) -> RunRecord:
    """Record the run's end from its tasks' states (when all have ended and the run may end)."""
    state = outcome(tasks, cancelled=cancelled)
    if state is None:
        return store.get_run(run_id)
    return settle(store, run_id, state, **changes)
