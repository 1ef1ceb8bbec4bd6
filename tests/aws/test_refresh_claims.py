"""Two watchers refresh a failed AWS run: the slower one's task-state write comes after the
faster one has claimed and submitted the workspace cleanup. The write is conditional, so the
claim stands and the cleanup is submitted once (a blind write put the old state back and the
slower watcher submitted the cleanup a second time)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_cleanup_after_failure import CLEANUP_STAGE, RUN, _backend, _jobs, _start_and_fail

from corral.model import TaskRecord
from corral.state.sqlite import SqliteStore

pytestmark = pytest.mark.aws


class _SlowWatcher(SqliteStore):
    """Its first task-state write waits until the other watcher has done everything."""

    def __init__(self, path: Path, reached: threading.Event, go: threading.Event) -> None:
        super().__init__(path)
        self.reached, self.go, self.first = reached, go, True

    def _gate(self) -> None:
        if self.first:
            self.first = False
            self.reached.set()
            assert self.go.wait(timeout=60)

    def save_tasks(self, tasks: Sequence[TaskRecord]) -> None:
        self._gate()
        super().save_tasks(tasks)

    def update_tasks(self, pairs: Sequence[tuple[TaskRecord, TaskRecord]]) -> list[TaskRecord]:
        self._gate()
        return super().update_tasks(pairs)


def test_a_slow_watcher_does_not_overwrite_the_cleanup_claim(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, _plan, store, _ext = _start_and_fail(tmp_path, monkeypatch)
    reached, go = threading.Event(), threading.Event()
    said: list[str] = []
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            s = _SlowWatcher(tmp_path / "s.db", reached, go)
            _backend(env, said).refresh(s.get_run(RUN), s)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=slow)
    t.start()
    assert reached.wait(timeout=60)
    fast = SqliteStore(tmp_path / "s.db")
    _backend(env, said).refresh(fast.get_run(RUN), fast)  # claims and submits the cleanup
    assert len(_jobs()) == 2
    go.set()
    t.join(timeout=60)
    assert not errors, errors
    assert len(_jobs()) == 2 and len(said) == 1  # the original and exactly one resubmission
    (cleanup,) = [t for t in store.get_tasks(RUN) if t.stage == CLEANUP_STAGE]
    assert cleanup.external_id == _jobs()[1].job_id
