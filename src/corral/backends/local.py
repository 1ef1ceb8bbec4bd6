"""The embedded default backend: a scheduler over host processes (or containers) on this machine.

One scheduler process per run. It starts ready tasks while their ``vcpus``/``memory`` fit the
machine (and ``--max-parallel``), waits on child exits with pidfds (no polling), records every
transition in the state store, retries failures, enforces timeouts and explicit memory limits by
killing the task's whole process group, and fails only what depends on a failed task.

Crash safety: each attempt's pid is recorded when it starts. If the scheduler is killed
(``kill -9``), ``resume`` kills any orphaned attempt still running, then runs exactly the tasks
that have not succeeded. Ctrl-C / SIGTERM cancel cleanly: children are killed, states recorded.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import heapq
import os
import re
import selectors
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral import runstate, storage
from corral.backends import memory_limit, oom
from corral.backends.base import OUTPUT_MISSING, RunOptions, chosen_attempt
from corral.backends.processes import process_alive, process_start_time, scheduler_alive
from corral.backends.runtime import container_argv, detect_engine, require_engine
from corral.errors import BackendError, CorralError, StorageError, UsageError
from corral.model import AttemptRecord, RunRecord, RunState, TaskRecord, TaskState, now
from corral.state.base import StateStore
from corral.state.lease import LeaseHeld

if TYPE_CHECKING:  # the planner (pydantic) loads when a plan is made, not for `corral status`
    from corral.plan import Plan, Task

KILL_GRACE_S = 5.0
LOG_TAIL_LINES = 2000  # `corral logs` shows at most the last lines of each stream...
LOG_TAIL_BYTES = 1 << 20  # ... and at most the last MiB, read from the end of the file
LOG_CHUNK = 1 << 16  # `logs --follow` reads this much at a time; longer lines come out in pieces
PROGRESS_EVERY_S = 0.1


def machine_vcpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_memory_mib() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8192


def run_dir(home: Path, run_id: str) -> Path:
    return home / "runs" / run_id


def workspace_dir(home: Path, run_id: str) -> Path:
    return run_dir(home, run_id) / "workspace"


def _proc_has_env(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def task_marker(run_id: str, task_id: str) -> tuple[bytes, bytes]:
    """The environment entries every process of a task inherits (its own and its descendants')."""
    return f"CORRAL_RUN_ID={run_id}".encode(), f"CORRAL_TASK_ID={task_id}".encode()


def marked_processes(marker: tuple[bytes, bytes]) -> list[int]:
    """Processes whose environment carries ``marker``: a task's descendants, also those that left
    its session with ``setsid`` (daemons). Limit: a process that clears its environment (or was
    started by a service manager) is not found; this machine has no cgroup v2 corral may use."""
    out = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = Path(entry.path, "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker[0] in env and marker[1] in env:
            out.append(int(entry.name))
    return out


def kill_task(pid: int, marker: tuple[bytes, bytes], sig: int = signal.SIGKILL, *, ours: bool = True) -> None:
    """Signal a task's whole session (its process group) and every process carrying its marker.
    ``ours``: ``pid`` is our child (it cannot have been reused); else its group is signalled only
    while ``pid`` still carries the marker."""
    if ours or _proc_has_env(pid, marker[1]):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
    for p in marked_processes(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def group_rss_mib(pgid: int) -> int:
    """Resident memory of every process in a process group (Linux /proc)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid:  # field 5 (pgrp), 0-based after the comm
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24: rss in pages
        except (OSError, ValueError, IndexError):
            continue
    return total // 2**20


@dataclass
class _Running:
    task: Task
    attempt: AttemptRecord
    pid: int
    pidfd: int | None
    deadline: float | None  # time.monotonic() at which the stage's timeout kills it
    memory_limit_mib: int | None  # the RSS sampler's limit (where no cgroup holds the task)
    vcpus: float
    memory_mib: int
    container_name: str | None = None
    cgroup: memory_limit.TaskCgroup | None = None  # the kernel's hard limit (corral.backends.memory_limit)
    limit_mib: int | None = None  # the memory limit this attempt ran under, whatever enforced it
    kill_reason: str = ""
    kill_at: float | None = None  # when (monotonic) to escalate SIGTERM -> SIGKILL
    started_mono: float = 0.0  # time.monotonic() at start: durations never go negative on a clock jump


class LocalBackend:
    """Runs a plan on this machine; see the module docstring."""

    name = "local"
    always_waits = True
    records_attempts = True
    driven_from_host = True
    cost_basis = "hypothetical"  # what the same attempts would cost on AWS Batch
    flags = frozenset({"force", "max_parallel", "runtime", "force_stages", "reuse"})

    @classmethod
    def create(cls, *, workflow: object = None, run: RunRecord | None = None, **settings: object) -> LocalBackend:
        from corral.home import corral_home

        return cls(corral_home())

    @classmethod
    def open_store(cls, *, workflow: object = None, **settings: object) -> StateStore:
        from corral.home import corral_home
        from corral.state.sqlite import SqliteStore

        return SqliteStore(corral_home() / "state.db")

    @classmethod
    def store_exists(cls) -> bool:
        from corral.home import corral_home

        return (corral_home() / "state.db").exists()

    def run_options(self, workflow: object) -> dict[str, object]:
        return {}

    def workspace(self, run: RunRecord) -> str | None:
        return str(workspace_dir(self.home, run.run_id))

    def attempt_history(self, run: RunRecord, tasks: object) -> dict[str, list[AttemptRecord]]:
        return {}  # every attempt is in the store

    def diagnose(self, run: RunRecord | None, store: StateStore | None, plan: Plan | None,
                 tasks: list[TaskRecord] | None, *, runnable_after_s: float) -> list[Any]:
        from corral.doctor import run_checks

        out: list[Any] = list(run_checks(store, run, plan)) if run is not None and store is not None else []
        out += self._sweep_cgroups(store)
        return out

    def _sweep_cgroups(self, store: StateStore | None) -> list[Any]:
        """Remove the memory cgroups of runs whose scheduler is gone (killed with ``kill -9``)."""
        from corral.doctor import Finding

        found: list[Any] = []
        stale = memory_limit.stale_runs(self.home)
        if not stale:
            return found
        if store is None:
            from corral.state.sqlite import SqliteStore

            store = SqliteStore(self.home / "state.db")
        for run_id in stale:
            try:
                run = store.get_run(run_id)
            except CorralError:
                continue  # not a run this store knows: leave it
            if scheduler_alive(run):
                continue
            removed = memory_limit.sweep(self.home, run_id)
            if removed:
                found.append(Finding("cgroups", "info", f"removed {len(removed)} memory cgroup(s) that run "
                                     f"{run_id}'s scheduler left when it was killed", subject=run_id))
        return found

    def __init__(
        self,
        home: Path,
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.home = Path(home).absolute()
        self.vcpus = vcpus or machine_vcpus()
        self.memory_mib = memory_mib or machine_memory_mib()
        self._say: Callable[[str], None] = log or (lambda msg: print(msg, file=sys.stderr))
        self._said: set[str] = set()

    # -- Backend protocol ---------------------------------------------------------------------
    def check(self, plan: Plan) -> None:
        storage.check_workflow(plan.workflow)  # transfers that can never work: no rclone, unknown remote
        from corral.plan import check_local_secrets

        check_local_secrets(plan.workflow)  # env:/file: secrets exist before any task starts
        for s in plan.workflow.stages:
            r = s.resources
            if r.vcpus > self.vcpus:
                self._note(
                    f"stage {s.name!r} asks for {r.vcpus:g} vCPUs; this machine has {self.vcpus}: "
                    "it will run with all of them"
                )
            if r.memory > self.memory_mib:
                self._note(
                    f"stage {s.name!r} asks for {r.memory} MiB; this machine has {self.memory_mib} MiB: "
                    "it will run when the machine is otherwise idle"
                )
            if r.gpus:
                self._note(f"stage {s.name!r} asks for {r.gpus} GPU(s): the local backend does not reserve GPUs")

    def start(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions) -> None:
        self._execute(plan, run, store, options)

    def resume(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions,
               tasks: list[TaskRecord] | None = None) -> None:
        if run.pid != os.getpid() and scheduler_alive(run):
            if run.state == RunState.RUNNING:
                raise UsageError(
                    f"run {run.run_id} is still running (scheduler pid {run.pid})",
                    f"wait for it, or stop it with `corral cancel {run.run_id}`",
                )
        reaped = self._reap_orphans(run, store)
        memory_limit.sweep(self.home, run.run_id)  # cgroups a killed scheduler left
        records = {t.task_id: t for t in (store.get_tasks(run.run_id) if tasks is None else tasks)}
        records.update((t.task_id, t) for t in reaped)
        first_attempts = {tid: t.attempts for tid, t in records.items()}
        reset = []
        for t in records.values():
            if not t.state.ok:
                # started_at too: a resumed task's time is its new attempts', not the gap since the run
                reset.append(t.replace(state=TaskState.PENDING, reason="", exit_code=None, started_at=None,
                                       ended_at=None))
        store.save_tasks(reset)
        records.update((t.task_id, t) for t in reset)
        if not reset:  # every task is done: record the run's end, as a scheduler with nothing to run would
            runstate.reopen(store, run, pid=None)
            runstate.end(store, run.run_id, list(records.values()), pid=None)
            if options.progress is not None:
                options.progress(list(records.values()))
            return
        self._execute(plan, run, store, options, first_attempts=first_attempts, records=records)

    def refresh(self, run: RunRecord, store: StateStore) -> list[TaskRecord]:
        """The store is the truth locally: :meth:`sync`, then the run's tasks as stored."""
        self.sync(run, store)
        return store.get_tasks(run.run_id)

    def sync(self, run: RunRecord, store: StateStore) -> None:
        """Bring the store up to date without reading every task (`corral status` then aggregates
        in the store). A run whose scheduler died is marked INTERRUPTED (read from the store, never
        from the caller's possibly stale ``run``) and those of its tasks still running past their
        timeout are stopped (:meth:`stop_overdue`); both under the run's lease, skipped while
        another command holds it."""
        live = run.state in (RunState.RUNNING, RunState.INTERRUPTED)
        if live and run.host == socket.gethostname() and not scheduler_alive(run):
            with contextlib.suppress(LeaseHeld), store.lease(run.run_id, "status", wait=0):
                fresh = runstate.interrupt_if_dead(store, run, scheduler_alive)
                if fresh.state in (RunState.RUNNING, RunState.INTERRUPTED) and not scheduler_alive(fresh):
                    self.stop_overdue(fresh, store)

    def stop_overdue(self, run: RunRecord, store: StateStore) -> int:
        """The reaper for a dead scheduler's tasks: kill (whole session and marked descendants)
        every attempt still running past its stage's timeout and record it FAILED; the number
        stopped. Runs from `corral status`; the deadline is on the wall clock here (the scheduler
        that knew the monotonic one is gone)."""
        stopped = 0
        plan: Plan | None = None
        for t in store.get_tasks(run.run_id, [TaskState.RUNNING]):
            for a in store.get_attempts(run.run_id, t.task_id):
                marker = task_marker(run.run_id, t.task_id)
                if a.state != TaskState.RUNNING or not a.pid or not _proc_has_env(a.pid, marker[1]):
                    continue
                if plan is None:
                    from corral.plan import Plan

                    plan = Plan.from_manifest(store.load_manifest(run.run_id))
                task = plan.by_id.get(t.task_id)
                timeout = task.stage.timeout if task is not None else None
                started = a.started_at or now()
                if not timeout or now() < started + timeout:
                    continue
                kill_task(a.pid, marker, ours=False)
                why = f"timed out after {timeout:g}s (stopped by `corral status`: its scheduler had stopped)"
                end = started + timeout
                store.save_attempt(a.replace(state=TaskState.FAILED, reason=why, ended_at=end))
                store.save_tasks([t.replace(state=TaskState.FAILED, reason=why, ended_at=end)])
                stopped += 1
        return stopped

    def cancel(self, run: RunRecord, store: StateStore) -> None:
        run = store.get_run(run.run_id)
        if run.state in runstate.ENDED:
            return  # an ended run keeps its state (only `resume` changes it)
        if run.state == RunState.RUNNING and scheduler_alive(run):
            assert run.pid is not None
            os.kill(run.pid, signal.SIGTERM)  # the scheduler kills its children and records the states
            deadline = time.monotonic() + 3 * KILL_GRACE_S
            while process_alive(run.pid) and time.monotonic() < deadline:
                _wait_exit(run.pid, 0.5)
            if not process_alive(run.pid):
                return
        # No live scheduler: record the cancellation ourselves, as the run's one writer.
        with store.lease(run.run_id, "cancel"):
            self._reap_orphans(run, store)
            memory_limit.sweep(self.home, run.run_id)
            changed = [
                t.replace(state=TaskState.CANCELLED, reason="cancelled", ended_at=t.ended_at or now())
                for t in store.get_tasks(run.run_id)
                if not t.state.terminal
            ]
            store.save_tasks(changed)
            runstate.settle(store, run.run_id, RunState.CANCELLED, pid=None)

    def logs(
        self, run: RunRecord, store: StateStore, task: TaskRecord, attempt: int | None, follow: bool
    ) -> Iterator[str]:
        attempts = store.get_attempts(run.run_id, task.task_id)
        if not attempts:
            yield f"(task {task.label} has not started yet: {task.state.value})"
            return
        chosen = chosen_attempt(task, attempts, attempt)
        ends: dict[str, int] = {}
        for stream, path in (("stdout", chosen.stdout), ("stderr", chosen.stderr)):
            yield f"==> {stream} of {task.label}, attempt {chosen.attempt} ({path}) <=="
            try:
                yield from tail_lines(path, ends)
            except OSError:
                yield "(no output file)"
        if follow:
            yield from self._follow(run, store, task, chosen, ends)

    def _follow(
        self, run: RunRecord, store: StateStore, task: TaskRecord, attempt: AttemptRecord, ends: dict[str, int]
    ) -> Iterator[str]:
        """Follow the attempt's stdout and stderr from where the dump ended (``ends``: path ->
        offset), then each retry's, until the task ends. A header says which stream (and attempt)
        the lines that follow come from whenever that changes, as ``tail -f`` does with two files.
        Bounded backoff between reads; at most LOG_CHUNK bytes in memory per stream, a longer line
        comes out in pieces."""
        delay = 0.1
        current = attempt
        offsets = {current.stdout: ends.get(current.stdout, 0), current.stderr: ends.get(current.stderr, 0)}
        pending: dict[str, bytes] = {}
        shown = "stderr"  # the dump ended with the stderr section

        def drain(stream: str, path: str, final: bool) -> Iterator[str]:
            nonlocal shown, delay

            def emit(text: str) -> Iterator[str]:  # the header goes before the first new line
                nonlocal shown
                if shown != stream:
                    yield f"==> {stream} of {task.label}, attempt {current.attempt} <=="
                    shown = stream
                yield text

            with contextlib.suppress(OSError), open(path, "rb") as fh:
                fh.seek(offsets.get(path, 0))
                while chunk := fh.read(LOG_CHUNK):
                    offsets[path] = offsets.get(path, 0) + len(chunk)
                    delay = 0.1
                    *lines, rest = (pending.get(path, b"") + chunk).split(b"\n")
                    for line in lines:
                        yield from emit(line.decode(errors="replace"))
                    while len(rest) >= LOG_CHUNK:
                        yield from emit(rest[:LOG_CHUNK].decode(errors="replace"))
                        rest = rest[LOG_CHUNK:]
                    pending[path] = rest
            if final and pending.get(path):
                yield from emit(pending.pop(path).decode(errors="replace"))

        while True:
            rec = next((t for t in store.get_tasks(run.run_id) if t.task_id == task.task_id), None)
            retried = rec is not None and rec.attempts > current.attempt
            final = rec is None or rec.state.terminal or retried  # this attempt writes no more
            for stream, path in (("stdout", current.stdout), ("stderr", current.stderr)):
                yield from drain(stream, path, final=final)
            if retried:
                later = [a for a in store.get_attempts(run.run_id, task.task_id) if a.attempt > current.attempt]
                if later:  # a retry started: follow it from its beginning
                    current = later[0]
                    offsets = {current.stdout: 0, current.stderr: 0}
                    pending = {}
                    shown = ""
                    continue
            if rec is None or rec.state.terminal:
                return
            if current.pid:
                _wait_exit(current.pid, delay)
            delay = min(delay * 2, 2.0)

    # -- internals ----------------------------------------------------------------------------
    def _note(self, msg: str) -> None:
        if msg not in self._said:
            self._said.add(msg)
            self._say(f"note: {msg}")

    def _reap_orphans(self, run: RunRecord, store: StateStore) -> list[TaskRecord]:
        """Kill attempts left running by a dead scheduler and record them as interrupted; the task
        records it rewrote (PENDING)."""
        changed = []
        for t in store.get_tasks(run.run_id, [TaskState.RUNNING, TaskState.SUBMITTED]):
            for a in store.get_attempts(run.run_id, t.task_id):
                if a.state != TaskState.RUNNING:
                    continue
                if a.pid:
                    kill_task(a.pid, task_marker(run.run_id, t.task_id), ours=False)
                store.save_attempt(
                    a.replace(state=TaskState.FAILED, reason="interrupted: the scheduler stopped", ended_at=now())
                )
            changed.append(t.replace(state=TaskState.PENDING, reason="interrupted"))
            store.save_tasks([changed[-1]])
        return changed

    def _execute(
        self,
        plan: Plan,
        run: RunRecord,
        store: StateStore,
        options: RunOptions,
        first_attempts: dict[str, int] | None = None,
        records: dict[str, TaskRecord] | None = None,
    ) -> None:
        Scheduler(self, plan, run, store, options, first_attempts or {}, records).run()


def _wait_exit(pid: int, timeout: float) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        time.sleep(min(timeout, 0.05))  # bounded poll where pidfds are unavailable
        return
    try:
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        sel.select(timeout)
        sel.close()
    finally:
        os.close(fd)


class Scheduler:
    """One run's event loop; see LocalBackend.

    Tasks become ready when everything they need has succeeded (a count per task, so each
    event costs O(dependents)); ready tasks start in plan order while vCPUs, memory and
    ``max_parallel`` allow. State changes are buffered and written in one transaction per loop
    turn, always before the loop blocks.
    """

    def __init__(
        self,
        backend: LocalBackend,
        plan: Plan,
        run: RunRecord,
        store: StateStore,
        options: RunOptions,
        first_attempts: dict[str, int],
        records: dict[str, TaskRecord] | None = None,
    ) -> None:
        self.b = backend
        self.plan = plan
        self.run_rec = run
        self.store = store
        self.options = options
        self.workdir = workspace_dir(backend.home, run.run_id)
        self.logdir = run_dir(backend.home, run.run_id) / "logs"
        # the run's records as stored (``records``: as the caller read and wrote them, under the lease)
        self.records = records if records is not None else {t.task_id: t for t in store.get_tasks(run.run_id)}
        self.attempts_before = first_attempts  # attempts made before this (re)start
        self.order = {t.id: i for i, t in enumerate(plan.tasks)}
        self.dependents = plan.dependents()
        self.running: dict[int, _Running] = {}  # by pid
        self.ready: list[tuple[int, str]] = []  # heap of (plan order, task id)
        self.unmet: dict[str, int] = {}  # task id -> needs not yet resolved
        self.sel = selectors.DefaultSelector()
        self.cancelled = False
        self.stopped_by: int | None = None  # the signal (SIGINT or SIGTERM) that stopped the run
        self.free_vcpus = float(backend.vcpus)
        self.free_mem = backend.memory_mib
        self.max_parallel = options.max_parallel or backend.vcpus
        self.memory_now: dict[str, int] = {}  # task id -> memory of its next attempt, after an OOM kill
        self._resume_memory()
        self.limiter = memory_limit.detect() if any(
            "memory" in s.resources.model_fields_set for s in plan.workflow.stages) else memory_limit.Limiter("sampler")
        from corral.reuse import forced_stages

        self.forced = forced_stages(plan, options.force_stages)  # --force-stage and what needs them
        self.last_progress = 0.0
        self.progress_every = PROGRESS_EVERY_S
        self.dirty_tasks: dict[str, TaskRecord] = {}
        self.dirty_attempts: list[AttemptRecord] = []
        self.made_dirs: set[Path] = set()
        self.watchdog: tuple[int, int] | None = None  # (pid, write end of its stdin)
        self.host = socket.gethostname()
        self.base_env = dict(os.environ)  # read once: copying os.environ per task is measurable
        self.use_engine = None
        if options.runtime == "container":
            self.use_engine = require_engine()
        elif options.runtime == "auto" and any(s.image for s in plan.workflow.stages):
            engine, why = detect_engine()
            self.use_engine = engine
            if engine is None:
                backend._note(f"no container engine answered ({why}): stages with an image run on the host")

    def _resume_memory(self) -> None:
        """On resume, a task last killed for memory goes on growing from there (not from
        ``resources.memory``), as on the other backends."""
        for tid, before in self.attempts_before.items():
            task = self.plan.by_id.get(tid)
            rec = self.records.get(tid)
            if not before or task is None or rec is None or rec.state.terminal or not oom.grows(task.stage.resources):
                continue
            attempts = self.store.get_attempts(self.run_rec.run_id, tid)
            if not attempts or not oom.is_oom(attempts[-1].reason):
                continue
            killed_at = oom.limit_of(attempts[-1].reason) or task.stage.resources.memory
            more = oom.next_memory(task.stage.resources, killed_at, self.b.memory_mib)
            self.memory_now[tid] = more or killed_at

    # -- main loop ----------------------------------------------------------------------------
    def run(self) -> None:
        storage.prepare_workspace(str(self.workdir))
        self.logdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        me = os.getpid()
        runstate.reopen(self.store, self.run_rec, pid=me, host=self.host,
                        options={**self.run_rec.options, "scheduler_start": process_start_time(me)})
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        self.sel.register(rfd, selectors.EVENT_READ, "signal")
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        old_cwd = os.getcwd()
        os.chdir(self.plan.workflow.base_dir)  # every task runs in the workflow's folder
        if any(s.timeout for s in self.plan.workflow.stages):
            self._start_watchdog()
        crashed = True
        # What exists now (the plan, the records) lives as long as the run: the cyclic collector
        # need not walk it again and again (a full collection over 300,000 tasks' objects).
        gc.freeze()
        try:
            self._loop(rfd)
            crashed = False
        finally:
            gc.unfreeze()
            os.chdir(old_cwd)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            for fd in (rfd, wfd, self.devnull):
                os.close(fd)
            self.sel.close()
            if crashed:
                self._abandon()
                # Leave a state that `corral resume` completes, as far as the store still takes
                # writes (a full disk): the error that stopped the loop is the one reported.
                with contextlib.suppress(CorralError):
                    self._flush()
                with contextlib.suppress(CorralError):
                    runstate.settle(self.store, self.run_rec.run_id, RunState.INTERRUPTED, pid=None)
            else:
                self._flush()
            self._stop_watchdog()
            memory_limit.sweep(self.b.home, self.run_rec.run_id)  # the run's cgroup list (empty by now)
        runstate.end(self.store, self.run_rec.run_id, list(self.records.values()), cancelled=self.cancelled, pid=None)
        self._progress(force=True)
        # Everything is recorded (CANCELLED): now let Ctrl-C mean what it means to the caller, so
        # `corral run` ends with 130 and a Python caller gets its KeyboardInterrupt. (SIGTERM is how
        # `corral cancel` stops a scheduler: a cancelled run, which returns as such.)
        if self.stopped_by == signal.SIGINT:
            raise KeyboardInterrupt

    # -- the watchdog (corral.backends.watchdog) ---------------------------------------------------
    def _start_watchdog(self) -> None:
        """A process in its own session that enforces the timeouts if this scheduler dies."""
        r, w = os.pipe()  # both ends close-on-exec: tasks never hold the write end
        out = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            pid = os.posix_spawn(
                sys.executable, [sys.executable, "-m", "corral.backends.watchdog"], self.base_env, setsid=True,
                file_actions=[(os.POSIX_SPAWN_DUP2, r, 0), (os.POSIX_SPAWN_DUP2, out, 1),
                              (os.POSIX_SPAWN_DUP2, out, 2)],
            )
        except OSError:
            os.close(w)
            self.b._note("no watchdog could start: if the scheduler dies, its tasks run past their timeouts "
                         "until `corral status` or `resume`")
            return
        finally:
            os.close(r)
            os.close(out)
        self.watchdog = (pid, w)

    def _tell_watchdog(self, line: str) -> None:
        if self.watchdog is None:
            return
        try:
            os.write(self.watchdog[1], line.encode() + b"\n")
        except OSError:  # it died: the scheduler goes on without it
            os.close(self.watchdog[1])
            self.watchdog = None

    def _stop_watchdog(self) -> None:
        if self.watchdog is None:
            return
        pid, _ = self.watchdog
        self._tell_watchdog("bye")
        if self.watchdog is not None:
            os.close(self.watchdog[1])
            self.watchdog = None
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.cancelled = True
        self.stopped_by = signum

    def _loop(self, rfd: int) -> None:
        self._seed()
        while True:
            if self.cancelled:
                self._cancel_all()
            else:
                self._launch_ready()
            self._flush()
            if not self.running:
                if self.ready and not self.cancelled:
                    continue  # tasks became ready while launching (skips, failed starts)
                break
            self._progress()
            exited = []
            for key, _ in self.sel.select(self._next_timeout()):
                if key.data == "signal":
                    with contextlib.suppress(BlockingIOError):
                        os.read(rfd, 4096)
                    continue
                if self._reap(key.data):
                    exited.append(key.data)
            if not _HAS_PIDFD:
                exited += [pid for pid in list(self.running) if self._reap(pid)]
            if exited:
                # Commit the exits before anything else (no task starts, nothing is killed
                # first): a finished task is recorded once the scheduler has seen it end.
                self._flush()
                _release(exited)
            self._enforce_limits()
        left = [tid for tid, r in self.records.items() if not r.state.terminal]
        if left and not self.cancelled:
            raise BackendError(
                f"{len(left)} task(s) could not be scheduled (first: {self.plan.by_id[left[0]].label})",
                "this is a bug in corral's local scheduler; `corral resume` retries them",
            )

    def _seed(self) -> None:
        for t in self.plan.tasks:
            rec = self.records[t.id]
            if rec.state.terminal:
                continue
            unmet = 0
            for d in t.needs:
                st = self.records[d].state
                if t.always:
                    unmet += not st.terminal
                elif st.terminal and not st.ok:
                    unmet = -1
                    break
                else:
                    unmet += not st.ok
            if unmet < 0:
                self._set(rec.replace(state=TaskState.UPSTREAM_FAILED, reason="a task it needs did not succeed",
                                      ended_at=now()))
                self._resolved(t.id)
            else:
                self.unmet[t.id] = unmet
                if unmet == 0:
                    heapq.heappush(self.ready, (self.order[t.id], t.id))

    def _set(self, rec: TaskRecord) -> None:
        self.records[rec.task_id] = rec
        self.dirty_tasks[rec.task_id] = rec

    def _resolved(self, tid: str) -> None:
        """A task reached a terminal state: release or fail what depends on it."""
        ok = self.records[tid].state.ok
        stack = [(tid, ok)]
        while stack:
            cur, cur_ok = stack.pop()
            for dep in self.dependents[cur]:
                rec = self.records[dep]
                if rec.state.terminal or dep not in self.unmet:
                    continue
                if cur_ok or self.plan.by_id[dep].always:
                    self.unmet[dep] -= 1
                    if self.unmet[dep] == 0:
                        heapq.heappush(self.ready, (self.order[dep], dep))
                else:
                    del self.unmet[dep]
                    self._set(rec.replace(state=TaskState.UPSTREAM_FAILED,
                                          reason="a task it needs did not succeed", ended_at=now()))
                    stack.append((dep, False))

    def _next_timeout(self) -> float:
        t = time.monotonic()
        candidates = [memory_limit.SAMPLE_S if any(r.memory_limit_mib for r in self.running.values()) else 30.0]
        for r in self.running.values():
            if r.kill_at is not None:
                candidates.append(r.kill_at - t)
            elif r.deadline is not None:
                candidates.append(r.deadline - t)
        if not _HAS_PIDFD:
            candidates.append(0.05)
        return max(0.0, min(candidates))

    # -- launching ----------------------------------------------------------------------------
    def _launch_ready(self) -> None:
        deferred: list[tuple[int, str]] = []
        while self.ready and len(self.running) < self.max_parallel:
            entry = heapq.heappop(self.ready)
            tid = entry[1]
            task = self.plan.by_id[tid]
            rec = self.records[tid]
            self.unmet.pop(tid, None)
            try:
                skip = rec.attempts == self.attempts_before.get(tid, 0) and self._outputs_exist(task)
            except StorageError as exc:
                self._set(rec.replace(state=TaskState.FAILED, reason=f"cannot check outputs: {exc.one_line()}",
                                      ended_at=now()))
                self._resolved(tid)
                continue
            if skip:
                self._set(rec.replace(state=TaskState.SKIPPED, reason="outputs exist", ended_at=now()))
                self._resolved(tid)
                continue
            vcpus = min(task.stage.resources.vcpus, float(self.b.vcpus))
            mem = min(self.memory_now.get(tid, task.stage.resources.memory), self.b.memory_mib)
            if self._stage_full(task):
                deferred.append(entry)  # the stage's max_parallel is reached; other stages may start
                self.unmet[tid] = 0
                continue
            if self.running and not (self.free_vcpus >= vcpus - 1e-9 and self.free_mem >= mem):
                deferred.append(entry)  # does not fit now; smaller tasks behind it may
                self.unmet[tid] = 0
                continue
            self._spawn(task, vcpus, mem)
        for entry in deferred:
            heapq.heappush(self.ready, entry)

    def _stage_full(self, task: Task) -> bool:
        """The stage's ``max_parallel`` tasks are running (the cap of that stage alone)."""
        cap = task.stage.max_parallel
        return cap is not None and sum(1 for r in self.running.values() if r.task.stage.name == task.stage.name) >= cap

    def _outputs_exist(self, task: Task) -> bool:
        if not task.stage.outputs or self.options.force or task.stage.name in self.forced:
            return False
        run_id, workdir = self.run_rec.run_id, str(self.workdir)
        return storage.outputs_exist(
            task.paths("outputs", run_id, workdir), task.paths("inputs", run_id, workdir),
            run_id=run_id, workdir=workdir, base_dir=self.plan.workflow.base_dir,
        )

    def _missing_output(self, task: Task) -> str:
        """After exit 0: "" when every declared output exists, else the reason naming the first
        missing one (a task that exits 0 without its outputs has failed, on every backend)."""
        if not task.stage.outputs:
            return ""
        run_id, workdir = self.run_rec.run_id, str(self.workdir)
        for uri in task.paths("outputs", run_id, workdir):
            try:
                exists = storage.uri_times(storage.parse(uri, workdir=workdir, base_dir=self.plan.workflow.base_dir))[0]
            except StorageError as exc:
                return f"cannot check output {uri}: {exc.one_line()}"
            if not exists:
                return f"{OUTPUT_MISSING}: {uri}"
        return ""

    def _argv(self, task: Task, workdir: str) -> tuple[list[str], dict[str, str]]:
        run_id = self.run_rec.run_id
        if task.stage.kind == "transfer":
            return storage.transfer_argv(
                _render(task, task.stage.source or "", run_id, workdir),
                _render(task, task.stage.dest or "", run_id, workdir),
                mode=task.stage.mode, filters=task.filter_rules(run_id, workdir), run_id=run_id, workdir=workdir,
                base_dir=self.plan.workflow.base_dir,
            )
        if task.stage.kind == "cleanup" and task.stage.command is None:
            return storage.cleanup_argv(workdir), {}
        return task.command(run_id, workdir), {}

    def _spawn(self, task: Task, vcpus: float, mem: int) -> None:
        """Start one attempt: log files, environment, argv (a container's when an engine runs it)."""
        run_id = self.run_rec.run_id
        rec = self.records[task.id]
        number = rec.attempts + 1
        folder = self.logdir / task.stage.name
        if folder not in self.made_dirs:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.made_dirs.add(folder)
        base = f"{folder}/{task.key}.{task.id[:8]}.{number}"
        out_path, err_path = f"{base}.out", f"{base}.err"
        workdir = str(self.workdir)
        started = now()
        mono = time.monotonic()
        container_name = None
        argv: list[str] = []
        try:
            env = dict(self.base_env)
            task_env = task.env(run_id, workdir)
            secret_env = self._secrets(task)
            env.update(task_env)
            env.update(secret_env)
            argv, extra = self._argv(task, workdir)
            env.update(extra)
            if self.use_engine is not None and task.stage.image and task.stage.kind == "command":
                container_name = f"corral-{task.id}-{number}"
                argv = container_argv(
                    self.use_engine, name=container_name, image=task.stage.image, argv=argv,
                    env_names=sorted({*task_env, *secret_env}),
                    mounts=[workdir, str(self.plan.workflow.base_dir)], cwd=str(self.plan.workflow.base_dir),
                    vcpus=vcpus, memory_mib=mem if _explicit_memory(task) else None,
                    gpus=task.stage.resources.gpus, shm_mib=task.stage.resources.shm,
                )
            else:
                argv = _direct_argv(argv, env)  # `sh -c "prog arg"` without shell syntax: prog itself
        except (BackendError, StorageError) as exc:
            self._failed_start(task, number, started, out_path, err_path, exc.one_line(), retryable=False)
            return
        attempt = AttemptRecord(
            run_id=run_id, task_id=task.id, attempt=number, state=TaskState.RUNNING, started_at=started,
            stdout=out_path, stderr=err_path, host=self.host,
        )
        self._set(rec.replace(state=TaskState.RUNNING, attempts=number, started_at=rec.started_at or started,
                              reason="", exit_code=None, ended_at=None))
        self.free_vcpus -= vcpus
        self.free_mem -= mem
        limited = _explicit_memory(task) and container_name is None  # a container's engine limits it
        cgroup = None
        if limited and self.limiter.hard:
            cgroup = memory_limit.create(self.limiter, memory_limit.cgroup_name(run_id, task.id, number), mem,
                                         memory_limit.registry(self.b.home, run_id))
            if cgroup is not None:
                argv = cgroup.wrap(argv)
        try:
            pid = _start_process(argv, env, out_path, err_path, self.devnull)
        except OSError as exc:
            if cgroup is not None:
                cgroup.remove()
            self.free_vcpus += vcpus
            self.free_mem += mem
            what = exc.filename or "the command"
            self._failed_start(task, attempt.attempt, attempt.started_at or now(), attempt.stdout, attempt.stderr,
                               f"cannot start {what!r}: {exc.strerror}", retryable=True)
            return
        pidfd = None
        if _HAS_PIDFD:
            try:
                pidfd = os.pidfd_open(pid)
                self.sel.register(pidfd, selectors.EVENT_READ, pid)
            except OSError:
                pidfd = None
        attempt = attempt.replace(pid=pid)
        self.dirty_attempts.append(attempt)
        if task.stage.timeout:
            self._tell_watchdog(f"start {pid} {mono + task.stage.timeout!r} {run_id} {task.id}")
        self.running[pid] = _Running(
            task=task, attempt=attempt, pid=pid, pidfd=pidfd,
            deadline=mono + task.stage.timeout if task.stage.timeout else None, started_mono=mono,
            memory_limit_mib=mem if limited and cgroup is None else None, vcpus=vcpus, memory_mib=mem,
            container_name=container_name, cgroup=cgroup, limit_mib=mem if _explicit_memory(task) else None,
        )

    def _failed_start(
        self, task: Task, number: int, started: float, out_path: str, err_path: str, why: str, *, retryable: bool
    ) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"corral: {why}\n")
        attempt = AttemptRecord(
            run_id=self.run_rec.run_id, task_id=task.id, attempt=number, state=TaskState.FAILED, exit_code=127,
            reason=why, started_at=started, ended_at=now(), stdout=out_path, stderr=err_path, host=self.host,
        )
        self.dirty_attempts.append(attempt)
        rec = self.records[task.id]
        self._set(rec.replace(attempts=number, started_at=rec.started_at or started))
        self._finish(task, attempt, retryable=retryable)

    def _secrets(self, task: Task) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, ref in task.stage.secrets.items():
            source, _, key = ref.partition(":")
            if source == "env" and key:
                if key not in os.environ:
                    raise BackendError(
                        f"stage {task.stage.name!r}: secret {name} comes from environment variable {key}, "
                        "which is not set",
                        f"export {key}=... before running",
                    )
                out[name] = os.environ[key]
            elif source == "file" and key:
                try:
                    out[name] = Path(key).expanduser().read_text().strip()
                except OSError as exc:
                    raise BackendError(
                        f"stage {task.stage.name!r}: cannot read secret {name} from {key}: {exc.strerror}",
                        "check the file named in `secrets:`",
                    ) from None
            else:
                raise BackendError(
                    f"stage {task.stage.name!r}: secret {name} = {ref!r} cannot be read locally",
                    "locally, write `env:VARIABLE` or `file:path`; AWS secret names work with --backend aws",
                )
        return out

    # -- completion ---------------------------------------------------------------------------
    def _reap(self, pid: int) -> bool:
        """Record the attempt's end if ``pid`` has exited; True if so. The exit is read with
        WNOWAIT: the process stays a zombie (its pid and group cannot be reused) until the caller
        has committed the record and releases it with :func:`_release`."""
        r = self.running.get(pid)
        if r is None:
            return False
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            code = 255
        else:
            if info is None or info.si_pid == 0:
                return False
            code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        del self.running[pid]
        if r.deadline is not None:
            self._tell_watchdog(f"end {pid}")
        if r.pidfd is not None:
            self.sel.unregister(r.pidfd)
            os.close(r.pidfd)
        self.free_vcpus += r.vcpus
        self.free_mem += r.memory_mib
        # The group may hold children the task left behind: they go with it (after a timeout or
        # cancel, also the daemons it started in sessions of their own).
        if r.kill_reason:
            kill_task(pid, task_marker(self.run_rec.run_id, r.task.id))
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        oom_killed = False
        if r.cgroup is not None:
            oom_killed = code != 0 and r.cgroup.oom_killed()
            r.cgroup.remove()  # what the task left in it goes too
        if r.kill_reason:
            state = TaskState.CANCELLED if r.kill_reason == "cancelled" else TaskState.FAILED
            reason = r.kill_reason
        elif oom_killed and r.limit_mib:
            state, reason = TaskState.FAILED, oom.reason(r.limit_mib, f"killed by the kernel (exit {_shell_code(code)})")
        elif r.container_name and code == oom.EXIT_KILLED and r.limit_mib:
            # the engine's --memory: its OOM kill is exit 137 (the engine alone knows for sure)
            state, reason = TaskState.FAILED, oom.reason(r.limit_mib, "exit 137 under the engine's --memory")
        elif code == 0:
            state, reason = TaskState.SUCCEEDED, ""
            missing = self._missing_output(r.task)
            if missing:
                state, reason = TaskState.FAILED, missing
        elif code < 0:
            state, reason = TaskState.FAILED, f"killed by signal {signal.Signals(-code).name}"
        else:
            state, reason = TaskState.FAILED, f"exit code {code}"
        attempt = r.attempt.replace(state=state, exit_code=code, reason=reason, ended_at=_ended(r))
        self.dirty_attempts.append(attempt)
        self._finish(r.task, attempt)
        return True

    def _finish(self, task: Task, attempt: AttemptRecord, retryable: bool = True) -> None:
        rec = self.records[task.id]
        made_here = rec.attempts - self.attempts_before.get(task.id, 0)
        retry = (
            retryable and attempt.state == TaskState.FAILED and made_here <= task.stage.retries and not self.cancelled
        )
        if attempt.state == TaskState.FAILED and oom.is_oom(attempt.reason) and oom.grows(task.stage.resources):
            killed_at = oom.limit_of(attempt.reason) or task.stage.resources.memory
            more = oom.next_memory(task.stage.resources, killed_at, self.b.memory_mib)
            if more is None:
                retry = False  # the same memory would fail the same way
                attempt = attempt.replace(reason=oom.final_reason(task.stage.resources, killed_at,
                                                                  self.b.memory_mib, "this machine"))
                self.dirty_attempts = [a if a.attempt != attempt.attempt or a.task_id != task.id else attempt
                                       for a in self.dirty_attempts]
            elif retry:
                self.memory_now[task.id] = more
        self._set(rec.replace(
            state=TaskState.PENDING if retry else attempt.state,
            exit_code=attempt.exit_code,
            reason=(f"retrying after: {attempt.reason}" if retry else attempt.reason),
            ended_at=None if retry else attempt.ended_at,
        ))
        if retry:
            self.unmet[task.id] = 0
            heapq.heappush(self.ready, (self.order[task.id], task.id))
        else:
            self._resolved(task.id)

    def _enforce_limits(self) -> None:
        t = time.monotonic()
        for r in list(self.running.values()):
            if r.kill_at is not None:
                if t >= r.kill_at:
                    self._signal(r, signal.SIGKILL)
                    r.kill_at = t + 3600
                continue
            if r.deadline is not None and t >= r.deadline:
                self._kill(r, f"timed out after {r.task.stage.timeout:g}s")
            elif r.memory_limit_mib:
                rss = group_rss_mib(r.pid)
                if rss > r.memory_limit_mib:
                    self._kill(r, oom.reason(r.memory_limit_mib, f"resident memory reached {rss}MiB (sampled)"))

    def _kill(self, r: _Running, reason: str) -> None:
        r.kill_reason = reason
        r.kill_at = time.monotonic() + KILL_GRACE_S
        if r.container_name and self.use_engine is not None:
            import subprocess

            subprocess.run([self.use_engine.path, "kill", r.container_name], capture_output=True, timeout=30)
        self._signal(r, signal.SIGKILL if oom.is_oom(reason) else signal.SIGTERM)

    def _signal(self, r: _Running, sig: signal.Signals) -> None:
        """Timeout, cancel, memory: the task's whole session and its marked descendants."""
        kill_task(r.pid, task_marker(self.run_rec.run_id, r.task.id), sig)

    def _cancel_all(self) -> None:
        for r in self.running.values():
            if not r.kill_reason:
                self._kill(r, "cancelled")
        for rec in list(self.records.values()):
            if not rec.state.terminal and rec.state != TaskState.RUNNING:
                self._set(rec.replace(state=TaskState.CANCELLED, reason="cancelled", ended_at=now()))
        self.ready.clear()
        self.unmet.clear()

    def _abandon(self) -> None:
        """The loop failed: kill what runs and record it as interrupted (resume runs it again)."""
        for r in list(self.running.values()):
            self._signal(r, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(r.pid, 0)
            if r.cgroup is not None:
                r.cgroup.remove()
            if r.pidfd is not None:
                os.close(r.pidfd)
            self.dirty_attempts.append(r.attempt.replace(
                state=TaskState.FAILED, reason="interrupted: the scheduler stopped", ended_at=_ended(r)))
            self._set(self.records[r.task.id].replace(state=TaskState.PENDING, reason="interrupted"))
        self.running.clear()

    def _flush(self) -> None:
        if not self.dirty_tasks and not self.dirty_attempts:
            return
        tasks, attempts = list(self.dirty_tasks.values()), self.dirty_attempts
        self.dirty_tasks, self.dirty_attempts = {}, []
        save_batch = getattr(self.store, "save_batch", None)
        if save_batch is not None:
            save_batch(tasks, attempts)
        else:
            for a in attempts:
                self.store.save_attempt(a)
            self.store.save_tasks(tasks)

    def _progress(self, force: bool = False) -> None:
        cb = self.options.progress
        if cb is None:
            return
        t = time.monotonic()
        if force or t - self.last_progress >= self.progress_every:
            cb(list(self.records.values()))
            self.last_progress = done = time.monotonic()
            # A callback that takes long (a summary of 300,000 records) is called less often: at
            # most a tenth of the scheduler's time goes to it.
            self.progress_every = max(PROGRESS_EVERY_S, 10 * (done - t))


def tail_lines(
    path: str, ends: dict[str, int] | None = None, max_lines: int = LOG_TAIL_LINES, max_bytes: int = LOG_TAIL_BYTES
) -> Iterator[str]:
    """The last ``max_lines`` lines of a file, reading at most ``max_bytes`` backwards from its end
    (a 2 GB log or a 512 MB line costs one MiB); a first line says what was left out. The size
    read up to goes into ``ends[path]`` (where ``--follow`` goes on)."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        start = max(0, size - max_bytes)
        pos, blocks, newlines = size, [], 0
        while pos > start and newlines <= max_lines:
            n = min(LOG_CHUNK, pos - start)
            pos -= n
            fh.seek(pos)
            block = fh.read(n)
            blocks.append(block)
            newlines += block.count(b"\n")
    if ends is not None:
        ends[path] = size
    data = b"".join(reversed(blocks))
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    cut = pos > 0
    if len(lines) > max_lines:
        lines, cut = lines[-max_lines:], True
    if cut:
        shown = sum(len(x) + 1 for x in lines)
        yield f"(... {max(0, size - shown)} earlier bytes not shown; the whole file is {path})"
    for line in lines:
        yield line.decode(errors="replace")


def _release(pids: list[int]) -> None:
    """Reap zombies whose exits are recorded."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _ended(r: _Running) -> float:
    """Wall-clock end of an attempt measured on the monotonic clock from its start (a clock jump
    neither shortens nor lengthens it, and never makes it negative)."""
    return (r.attempt.started_at or now()) + max(0.0, time.monotonic() - r.started_mono)


def _shell_code(code: int) -> int:
    """An exit status as a shell reports it (a signal N is 128 + N)."""
    return 128 - code if code < 0 else code


def _explicit_memory(task: Task) -> bool:
    """Memory limits are enforced locally only where the workflow set them."""
    return "memory" in task.stage.resources.model_fields_set


def _start_process(argv: list[str], env: dict[str, str], out_path: str, err_path: str, devnull: int) -> int:
    """Create the attempt's log files and start it in a new session (posix_spawn); returns the pid."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    fd_out = os.open(out_path, flags, 0o600)  # logs are the user's alone (CORRAL_HOME is 0700)
    try:
        fd_err = os.open(err_path, flags, 0o600)
        try:
            return os.posix_spawnp(
                argv[0], argv, env, setsid=True,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, devnull, 0),
                    (os.POSIX_SPAWN_DUP2, fd_out, 1),
                    (os.POSIX_SPAWN_DUP2, fd_err, 2),
                ],
            )
        except OSError as exc:
            if exc.filename is None:
                exc.filename = argv[0]
            raise
        finally:
            os.close(fd_err)
    finally:
        os.close(fd_out)


# A `sh -c` script that is one simple command: words of these characters only (no quotes, no $,
# globs, redirections, operators, ~, # or newlines), so the shell would only split it on blanks.
_SIMPLE_SCRIPT = re.compile(r"[A-Za-z0-9_./:@%+,=-]+(?:[ \t]+[A-Za-z0-9_./:@%+,=-]+)*")
# dash's reserved words and builtins (a builtin and the program of that name differ: echo, kill,
# printf, test...); `true`/`false` without arguments are the same either way.
_SHELL_WORDS = frozenset((
    "if", "then", "else", "elif", "fi", "case", "esac", "for", "while", "until", "do", "done", "in", "alias",
    "bg", "cd", "command", "echo", "eval", "exec", "exit", "export", "fc", "fg", "getopts", "hash", "jobs",
    "kill", "local", "printf", "pwd", "read", "readonly", "return", "set", "shift", "test", "times", "trap",
    "type", "ulimit", "umask", "unalias", "unset", "wait", "true", "false",
))


def _direct_argv(argv: list[str], env: dict[str, str]) -> list[str]:
    """``["/bin/sh", "-c", "prog a b"]`` -> ``["prog", "a", "b"]`` when the script is one
    simple command the shell would only split on blanks and ``prog`` is a program found on the
    task's PATH (an ELF binary or a ``#!`` script): one exec per task instead of two (dash execs
    the last command of ``-c`` itself, so exit codes, signals and the process group are the same).
    Anything else — shell syntax, a builtin, a program not found — still runs under ``/bin/sh -c``
    (and a missing program gets the shell's "not found", exit 127)."""
    if len(argv) != 3 or argv[0] != "/bin/sh" or argv[1] != "-c":
        return argv
    script = argv[2].strip(" \t")
    if not _SIMPLE_SCRIPT.fullmatch(script):
        return argv
    words = script.split()
    prog = words[0]
    if prog in ("true", "false") and len(words) == 1:
        pass
    elif prog in _SHELL_WORDS or "=" in prog or "/" in prog:
        return argv
    search = env.get("PATH", os.defpath)
    # posix_spawnp searches this process's PATH: the task's must be the same (else the shell looks)
    if search != os.environ.get("PATH", os.defpath) or not _is_program(prog, search):
        return argv
    if "PWD" in env:  # the shell would have set it to the working directory (and exported it)
        env["PWD"] = os.getcwd()
    return words  # argv[0] as the shell passes it: the name as written


@functools.lru_cache(maxsize=256)
def _is_program(name: str, search: str) -> bool:
    """``name`` is found on the PATH ``search`` (in an absolute folder) as an ELF binary or a
    ``#!`` script (anything else the shell would run as a script itself)."""
    found = shutil.which(name, path=search)
    if found is None or not os.path.isabs(found):
        return False
    try:
        with open(found, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head == b"\x7fELF" or head[:2] == b"#!"


def _render(task: Task, text: str, run_id: str, workdir: str) -> str:
    from corral.plan import render

    return render(text, task.values(run_id, workdir))


_HAS_PIDFD = hasattr(os, "pidfd_open")
