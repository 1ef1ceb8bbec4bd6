"""``--backend slurm``: each stage an sbatch job array on the cluster's own scheduler; no client stays up.

Submission (:meth:`SlurmBackend.start`): one ``sbatch --parsable`` per stage and chunk of
``MaxArraySize`` items, in stage order. Per-item chains use ``--dependency=aftercorr:`` (array task
``k`` waits for task ``k`` of the stage it needs), a stage that runs once per run ``afterok:`` every
array it needs, a cleanup stage ``afterany:`` so it runs after a failure with nobody watching.
``--kill-on-invalid-dep=yes`` makes Slurm cancel (``DependencyNeverSatisfied``) what waits on a
failed task: those tasks end UPSTREAM_FAILED, as on the other backends.

Retries run inside the job: the wrapper tries the command up to ``retries + 1`` times (each try
under ``timeout`` when the stage has one), writing one record file per attempt. No requeue: a requeued
job would lose its output files and the per-attempt records would need Slurm's restart count.

State: compute nodes write no SQLite. Each attempt leaves ``slurm/records/<task>.<n>.json``; the
submitting side refreshes the store (SQLite, as locally) from those files plus ONE Slurm call for all
of the run's arrays still moving: ``sacct --parsable2`` where the cluster keeps accounting, else
``squeue -t all`` (which still shows jobs ended within ``MinJobAge``; after that the records decide).

Crash safety: before each sbatch the array's intent (deterministic job name, its tasks and indices)
is saved in the run record; after it, the job id. ``resume`` looks intents without a job id up by
name (one squeue/sacct call), adopts what Slurm has, and submits only what it does not, so a kill
mid-submission followed by ``resume`` runs every task exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral import runstate, storage
from corral.backends.base import RunOptions, chosen_attempt
from corral.backends.slurm import script
from corral.backends.slurm.client import JobRow, SlurmClient
from corral.errors import BackendError, SpecError, StorageError, UsageError
from corral.model import AttemptRecord, RunRecord, RunState, TaskRecord, TaskState, now
from corral.plan import Plan, Task
from corral.spec import SlurmSettings, Workflow
from corral.state.base import StateStore

ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
ENDED_REASONS = {
    "TIMEOUT": "timed out (the job reached its --time limit)",
    "OUT_OF_MEMORY": "out of memory (the job went past --mem)",  # with the limit: _ended_reason
    "NODE_FAIL": "the node running it failed",
    "BOOT_FAIL": "the node could not boot",
    "PREEMPTED": "preempted by a job of higher priority",
    "DEADLINE": "the job reached its deadline",
    "FAILED": "the job failed before its command ran",
}
WAIT_MAX_S = 5.0


@dataclass(frozen=True)
class Engine:
    name: str  # apptainer or singularity
    path: str


def detect_apptainer() -> tuple[Engine | None, str]:
    """Apptainer (or Singularity) answering ``--version`` on this host, and why none did otherwise."""
    reasons = []
    for name in ("apptainer", "singularity"):
        path = shutil.which(name)
        if not path:
            reasons.append(f"{name}: not installed")
            continue
        try:
            res = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            reasons.append(f"{name}: {exc}")
            continue
        if res.returncode == 0:
            return Engine(name, path), ""
        reasons.append(f"{name}: exit code {res.returncode}")
    return None, "; ".join(reasons)


def container_argv(engine: Engine, image: str, argv: list[str], *, binds: list[str], cwd: str, gpus: int) -> list[str]:
    """``apptainer exec`` for one attempt; the environment passes through (Apptainer's default)."""
    ref = image if "://" in image or image.endswith(".sif") else f"docker://{image}"
    cmd = [engine.path, "exec", "--bind", ",".join(dict.fromkeys(binds)), "--pwd", cwd]
    if gpus:
        cmd.append("--nv")
    return [*cmd, ref, *argv]


class SlurmBackend:
    name = "slurm"
    always_waits = False  # `corral run` returns once everything is submitted (unless --wait)
    records_attempts = True  # refresh copies every attempt record into the store
    driven_from_host = False  # Slurm's scheduler drives the run; no client has to stay up
    cost_basis = "hypothetical"  # what the same attempts would cost on AWS Batch
    flags = frozenset({"force", "runtime", "wait", "max_parallel"})  # --max-parallel N: %N on every array

    @classmethod
    def create(cls, *, workflow: Any = None, run: RunRecord | None = None, **settings: Any) -> SlurmBackend:
        from corral.home import corral_home

        return cls(corral_home(), workflow.slurm if workflow is not None else None)

    @classmethod
    def open_store(cls, *, workflow: Any = None, **settings: Any) -> StateStore:
        """Slurm runs are recorded on the submitting side, in the same SQLite file as local runs."""
        from corral.home import corral_home
        from corral.state.sqlite import SqliteStore

        return SqliteStore(corral_home() / "state.db")

    @classmethod
    def store_exists(cls) -> bool:
        from corral.home import corral_home

        return (corral_home() / "state.db").exists()

    def run_options(self, workflow: Any) -> dict[str, Any]:
        return {}  # start() records what following the run needs (folder, accounting, arrays)

    def attempt_history(self, run: RunRecord, tasks: Any) -> dict[str, list[AttemptRecord]]:
        return {}

    def diagnose(self, run: RunRecord | None, store: StateStore | None, plan: Plan | None,
                 tasks: list[TaskRecord] | None, *, runnable_after_s: float = 0) -> list[Any]:
        from corral.backends.slurm.doctor import slurm_checks

        return slurm_checks(self.client, self.home, run=run, tasks=tasks or [])

    def __init__(self, home: Path, settings: SlurmSettings | None = None, *, client: SlurmClient | None = None,
                 log: Callable[[str], None] | None = None,
                 detect: Callable[[], tuple[Engine | None, str]] = detect_apptainer) -> None:
        self.home = Path(home).absolute()
        self.settings = settings or SlurmSettings()
        self.client = client or SlurmClient()
        self._say = log or (lambda msg: print(msg, file=sys.stderr))
        self._said: set[str] = set()
        self._detect = detect

    # -- layout -------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        return self.home / "runs" / run_id

    def workspace(self, run: RunRecord | str) -> str:
        """The run's shared workspace (``CORRAL_WORKDIR``), a path on this machine and on the nodes."""
        return str(self.run_dir(run if isinstance(run, str) else run.run_id) / "workspace")

    def _records_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "slurm" / "records"

    # -- Backend protocol ---------------------------------------------------------------------
    def check(self, plan: Plan) -> None:
        storage.check_workflow(plan.workflow)
        if not self.client.available("sbatch"):
            raise BackendError("sbatch is not installed on this machine",
                               "run corral on a login node of the cluster (where sbatch, squeue and scancel are)")
        wf = plan.workflow
        settings = wf.slurm
        names = {s.name for s in wf.stages}
        for name in settings.stages:
            if name not in names:
                raise SpecError(f"slurm.stages: {name!r} is not a stage of the workflow",
                                f"stages are: {', '.join(sorted(names))}", where=wf.where("slurm", "stages", name,
                                                                                       key=True))
        self.memory_bounds = check_fit(plan, settings, self.client)
        for s in wf.stages:
            script.secret_exports(s)  # refuse secret references that cannot be read on a node
            for ref in s.secrets.values():
                source, _, key = ref.partition(":")
                if source == "env" and key not in os.environ:
                    raise BackendError(
                        f"stage {s.name!r}: a secret comes from environment variable {key}, which is not set",
                        f"export {key}=... before submitting (sbatch passes this environment on to the jobs)")

    def start(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions) -> None:
        self.settings = plan.workflow.slurm
        run = self._prepare(run, store, options)
        self._submit_round(plan, run, store, options)
        if options.wait:
            self._wait(run, store, options)

    def _prepare(self, run: RunRecord, store: StateStore, options: RunOptions) -> RunRecord:
        """The run folder (wrapper, tables, scripts, records, logs, workspace) and what following it needs."""
        folder = self.run_dir(run.run_id)
        for sub in ("slurm/tables", "slurm/scripts", "slurm/records", "logs"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / "slurm" / "wrapper.sh").write_text(script.WRAPPER)
        storage.prepare_workspace(self.workspace(run.run_id))
        state: dict[str, Any] = {
            "dir": str(folder), "accounting": self.client.accounting, "max_array": self.client.max_array_size,
            "round": 0, "arrays": [], "runtime": options.runtime, "force": options.force,
            # stage -> the largest --mem a node of its partition holds (retry_memory's bound)
            "memory_bounds": getattr(self, "memory_bounds", {}),
        }
        run = run.replace(options={**run.options, "slurm": state})
        store.save_run(run)
        return run

    def resume(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions,
               tasks: list[TaskRecord] | None = None) -> None:
        # ``tasks`` (the run's records, read under the lease) is for backends whose store is the
        # truth; this one reconciles with its scheduler first, so it reads them itself.
        self.settings = plan.workflow.slurm
        run = store.get_run(run.run_id)
        if "slurm" not in run.options:  # the submitter died before its first sbatch
            run = self._prepare(run, store, options)
        self._adopt_intents(run, store)
        tasks = self.refresh(store.get_run(run.run_id), store)
        run = store.get_run(run.run_id)
        live, redo = _live_and_redo(tasks)
        if live and any(t.state != TaskState.PENDING for t in redo) and options.wait:
            # Let what Slurm still runs end first: a failed task is resubmitted once nothing waits on it.
            self._wait(run, store, options, until_idle=True)
            live, redo = _live_and_redo(store.get_tasks(run.run_id))
            run = store.get_run(run.run_id)
        if live and any(t.state != TaskState.PENDING for t in redo):
            raise UsageError(
                f"run {run.run_id} still has {len(live)} task(s) queued or running in Slurm",
                f"resume when they have ended (`corral status {run.run_id} --watch`), or `corral cancel` it first")
        if redo:
            run = self._resume_memory(run, store, redo)
        store.save_tasks([t.replace(state=TaskState.PENDING, reason="", exit_code=None, ended_at=None)
                          for t in redo if t.state != TaskState.PENDING])
        if redo:
            run = runstate.reopen(store, run)
            self._submit_round(plan, run, store, options)
        if options.wait:
            self._wait(store.get_run(run.run_id), store, options)

    def refresh(self, run: RunRecord, store: StateStore) -> list[TaskRecord]:
        tasks = store.get_tasks(run.run_id)
        active = [t for t in tasks if not t.state.terminal and t.external_id]
        if not active:
            if run.state == RunState.RUNNING and self._retry_with_more_memory(run, store, tasks):
                return store.get_tasks(run.run_id)
            self._settle(run, store, tasks)
            return store.get_tasks(run.run_id) if run.state == RunState.RUNNING else tasks
        rows = self._query([t.external_id.split("_")[0] for t in active], run)
        slurm = {(r.array_job, r.index): r for r in rows}
        records = read_records(self._records_dir(run.run_id), {t.task_id for t in active})
        by_id = {t.task_id: t for t in tasks}
        changed: list[TaskRecord] = []
        for t in active:
            job, _, k = t.external_id.partition("_")
            new = self._task_state(run, store, t, slurm.get((job, int(k) if k.isdigit() else None)),
                                   records.get(t.task_id, []), by_id)
            if new != t:
                changed.append(new)
                by_id[t.task_id] = new
        if changed:
            store.save_tasks(changed)
        tasks = [by_id[t.task_id] for t in tasks]
        if run.state == RunState.RUNNING and self._retry_with_more_memory(run, store, tasks):
            return store.get_tasks(run.run_id)
        self._settle(run, store, tasks)
        return tasks

    def cancel(self, run: RunRecord, store: StateStore) -> None:
        run = store.get_run(run.run_id)
        if run.state != RunState.RUNNING:
            return  # an ended run keeps its state (only `resume` changes it)
        self.refresh(run, store)  # what ended before the cancel keeps its own state
        run = store.get_run(run.run_id)  # (a refresh may have resubmitted after an OOM kill)
        tasks = store.get_tasks(run.run_id)
        jobs = sorted({a["job"] for a in run.options.get("slurm", {}).get("arrays", []) if a.get("job")})
        self.client.scancel(jobs)
        store.save_tasks([t.replace(state=TaskState.CANCELLED, reason="cancelled", ended_at=t.ended_at or now())
                          for t in tasks if not t.state.terminal])
        runstate.settle(store, run.run_id, RunState.CANCELLED)

    def logs(self, run: RunRecord, store: StateStore, task: TaskRecord, attempt: int | None,
             follow: bool) -> Iterator[str]:
        task = next(t for t in self.refresh(run, store) if t.task_id == task.task_id)
        attempts = store.get_attempts(run.run_id, task.task_id)
        delay = 0.2
        while follow and not attempts and not task.state.terminal:  # -f on a queued task: wait for it to start
            time.sleep(delay)
            delay = min(delay * 1.5, WAIT_MAX_S)
            task = next(t for t in self.refresh(store.get_run(run.run_id), store) if t.task_id == task.task_id)
            attempts = store.get_attempts(run.run_id, task.task_id)
        if not attempts:
            yield f"(task {task.label} has not started yet: {task.state.value})"
            return
        chosen = chosen_attempt(task, attempts, attempt)
        note = " (every try of this Slurm job shares the file)" if len(attempts) > 1 else ""
        for stream, path in (("stdout", chosen.stdout), ("stderr", chosen.stderr)):
            yield f"==> {stream} of {task.label}, attempt {chosen.attempt} ({path}){note} <=="
            try:
                with open(path, errors="replace") as fh:
                    yield from (line.rstrip("\n") for line in fh)
            except OSError:
                yield "(no output file yet)"
        if follow:
            yield from self._follow(run, store, task, chosen)

    # -- submission ---------------------------------------------------------------------------
    def _engine(self, plan: Plan, options: RunOptions) -> Engine | None:
        if options.runtime == "process" or not any(s.image for s in plan.workflow.stages):
            return None
        engine, why = self._detect()
        if engine is None:
            if options.runtime == "container":
                raise BackendError(f"--runtime container was asked for, but neither Apptainer nor Singularity "
                                   f"answered ({why})", "load the apptainer module, or use --runtime process")
            self._note(f"neither Apptainer nor Singularity answered ({why}): stages with an image run on the host")
        return engine

    def _submit_round(self, plan: Plan, run: RunRecord, store: StateStore, options: RunOptions) -> None:
        state = dict(run.options["slurm"])
        state["round"] = round_no = int(state.get("round", 0)) + 1
        size = int(state["max_array"])
        run_id = run.run_id
        workdir = self.workspace(run_id)
        folder = Path(state["dir"])
        engine = self._engine(plan, options)
        records = {t.task_id: t for t in store.get_tasks(run_id)}
        to_run = self._skip_done(plan, run, store, records, options)
        # Padding: task k of an array runs `aftercorr` on task k of each array it needs, so an array
        # also holds (as `-` rows) the indices its per-item dependents run (reverse stage order).
        indices: dict[tuple[str, int], set[int]] = {}
        for t in plan.tasks:
            if t.id in to_run:
                c, k = script.chunk_of(t.index, size)
                indices.setdefault((t.stage.name, c), set()).add(k)
        for name in reversed(plan.stage_order):
            stage = plan.workflow.stage(name)
            if stage.per != "item":
                continue
            for need in stage.needs:
                if plan.workflow.stage(need).per != "item":
                    continue
                for (sname, c), ks in list(indices.items()):
                    if sname == name and (need, c) in indices:
                        indices[(need, c)] |= ks
        job_of: dict[str, str] = {tid: r.external_id.split("_")[0] for tid, r in records.items()
                                  if r.state in (TaskState.SUBMITTED, TaskState.RUNNING) and r.external_id}
        for name in plan.stage_order:
            stage = plan.workflow.stage(name)
            stage_tasks = plan.stage_tasks(name)
            chunks: dict[int, list[Task]] = {}
            for t in stage_tasks:
                chunks.setdefault(script.chunk_of(t.index, size)[0], []).append(t)
            for c, ctasks in sorted(chunks.items()):
                run_here = [t for t in ctasks if t.id in to_run]
                if not run_here:
                    continue
                idx = sorted(indices[(name, c)])
                rows = [script.PADDING_ROW] * (idx[-1] + 1)
                mapping: dict[str, int] = {}
                grown = state.get("memory", {})  # task id -> {mib, tries}: resubmitted after an OOM kill
                mem = max([grown.get(t.id, {}).get("mib", stage.resources.memory) for t in run_here])
                for t in run_here:
                    k = script.chunk_of(t.index, size)[1]
                    rows[k] = self._row(plan, run_id, workdir, t, records[t.id].attempts, engine, mem,
                                        grown.get(t.id, {}).get("tries"))
                    mapping[t.id] = k
                dependency = self._dependency(plan, stage, run_here, job_of, records)
                jname = script.job_name(run_id, name, round_no, c)
                table = folder / "slurm" / "tables" / f"{jname}.tab"
                table.write_text("\n".join(rows) + "\n")
                log_dir = folder / "logs" / name
                log_dir.mkdir(parents=True, exist_ok=True)
                opts = script.sbatch_options(
                    stage, self.settings, job_name=jname,
                    array=script.array_spec(idx, getattr(stage, "max_parallel", None) or options.max_parallel),
                    log_dir=str(log_dir), chdir=str(plan.workflow.base_dir), memory_mib=mem)
                path = folder / "slurm" / "scripts" / f"{jname}.sh"
                path.write_text(script.batch_script(opts, str(folder / "slurm" / "wrapper.sh"), str(table),
                                                    str(self._records_dir(run_id))))
                intent = {"name": jname, "stage": name, "chunk": c, "round": round_no, "job": None,
                          "tasks": mapping}
                state["arrays"] = [*state["arrays"], intent]
                run = run.replace(options={**run.options, "slurm": state})
                store.save_run(run)  # the intent, before Slurm knows anything
                try:
                    job = self.client.sbatch(str(path), dependency)
                except BackendError as exc:
                    done = sum(1 for a in state["arrays"] if a.get("job"))
                    raise BackendError(
                        f"stage {name!r}: {exc.message}",
                        f"{done} array(s) of run {run_id} were submitted and go on: `corral cancel {run_id}` "
                        f"stops them; `corral resume {run_id}` retries the rest (after a passing error); "
                        f"the batch script is {path}") from None
                intent["job"] = job
                store.save_run(run)
                submitted = [records[tid].replace(state=TaskState.SUBMITTED, external_id=f"{job}_{k}", reason="",
                                                  exit_code=None, ended_at=None) for tid, k in mapping.items()]
                store.save_tasks(submitted)
                for r in submitted:
                    records[r.task_id] = r
                    job_of[r.task_id] = job
                if options.progress:
                    options.progress(list(records.values()))

    def _skip_done(self, plan: Plan, run: RunRecord, store: StateStore, records: dict[str, TaskRecord],
                   options: RunOptions) -> set[str]:
        """PENDING tasks to submit; those whose outputs exist (and whose needs are all done) are SKIPPED."""
        workdir = self.workspace(run.run_id)
        skipped: list[TaskRecord] = []
        to_run: set[str] = set()
        for t in plan.tasks:
            rec = records[t.id]
            if rec.state != TaskState.PENDING:
                continue
            needs_done = all(records[d].state.ok for d in t.needs)
            skip = False
            if t.stage.outputs and needs_done and not options.force and rec.attempts == 0:
                try:
                    skip = storage.outputs_exist(
                        t.paths("outputs", run.run_id, workdir), t.paths("inputs", run.run_id, workdir),
                        run_id=run.run_id, workdir=workdir, base_dir=plan.workflow.base_dir)
                except StorageError:
                    skip = False  # the task itself will say what is wrong
            if skip:
                new = rec.replace(state=TaskState.SKIPPED, reason="outputs exist", ended_at=now())
                records[t.id] = new
                skipped.append(new)
            else:
                to_run.add(t.id)
        store.save_tasks(skipped)
        return to_run

    def _row(self, plan: Plan, run_id: str, workdir: str, task: Task, attempts: int, engine: Engine | None,
             memory_mib: int | None = None, tries: int | None = None) -> str:
        env = task.env(run_id, workdir)
        stage = task.stage
        if stage.kind == "transfer":
            vals = task.values(run_id, workdir)
            from corral.plan import render

            argv, extra = storage.transfer_argv(
                render(stage.source or "", vals), render(stage.dest or "", vals), mode=stage.mode,
                filters=stage.filters, run_id=run_id, workdir=workdir, base_dir=plan.workflow.base_dir)
            env.update(extra)
        elif stage.kind == "cleanup" and stage.command is None:
            argv = storage.cleanup_argv(workdir)
        else:
            argv = task.command(run_id, workdir)
            if engine is not None and stage.image:
                argv = container_argv(engine, stage.image, argv, binds=[workdir, str(plan.workflow.base_dir)],
                                      cwd=str(plan.workflow.base_dir), gpus=stage.resources.gpus)
        outputs = []
        for uri in task.paths("outputs", run_id, workdir):
            with contextlib.suppress(StorageError):
                loc = storage.parse(uri, workdir=workdir, base_dir=plan.workflow.base_dir)
                if loc.kind == "local":
                    outputs.append((loc.path, uri))  # remote outputs: checked when the refresh sees success
        return script.row(task, env, argv, attempts_before=attempts, tries=tries or stage.retries + 1,
                          outputs=outputs, memory_mib=memory_mib)

    def _dependency(self, plan: Plan, stage: Any, tasks: list[Task], job_of: dict[str, str],
                    records: dict[str, TaskRecord]) -> str:
        kinds: dict[str, set[str]] = {}
        for t in tasks:
            for d in t.needs:
                if records[d].state.ok or d not in job_of:
                    continue
                need = plan.by_id[d].stage
                if t.always:
                    kind = "afterany"
                elif stage.per == "item" and need.per == "item":
                    kind = "aftercorr"
                else:
                    kind = "afterok"
                kinds.setdefault(kind, set()).add(job_of[d])
        return ",".join(f"{k}:{':'.join(sorted(v, key=int))}" for k, v in sorted(kinds.items()))

    def _adopt_intents(self, run: RunRecord, store: StateStore) -> None:
        """Arrays whose sbatch may have happened before a crash: adopt what Slurm has, forget the rest."""
        state = dict(run.options.get("slurm", {}))
        pending = [a for a in state.get("arrays", []) if not a.get("job")]
        if not pending:
            return
        names = [a["name"] for a in pending]
        # squeue asks slurmctld itself (a job submitted a moment ago may not be in the accounting
        # database yet); sacct, where it exists, also finds jobs that left squeue after MinJobAge.
        rows = self.client.squeue(names=names)
        if state.get("accounting"):
            rows += self.client.sacct(names=names)
        found = {r.name: r.array_job for r in rows}
        for a in pending:
            job = found.get(a["name"]) or _job_from_records(self._records_dir(run.run_id), a["tasks"])
            a["job"] = job or None
        state["arrays"] = [a for a in state["arrays"] if a.get("job")]
        store.save_run(run.replace(options={**run.options, "slurm": state}))
        records = {t.task_id: t for t in store.get_tasks(run.run_id)}
        adopted = []
        for a in pending:
            if a["job"]:
                adopted += [records[tid].replace(state=TaskState.SUBMITTED, external_id=f"{a['job']}_{k}")
                            for tid, k in a["tasks"].items() if records[tid].state == TaskState.PENDING]
        store.save_tasks(adopted)

    # -- state --------------------------------------------------------------------------------
    def _query(self, jobs: list[str], run: RunRecord) -> list[JobRow]:
        unique = sorted(set(jobs), key=int)
        if run.options.get("slurm", {}).get("accounting"):
            return self.client.sacct(jobs=unique)
        return self.client.squeue(jobs=unique)

    def _task_state(self, run: RunRecord, store: StateStore, t: TaskRecord, row: JobRow | None,
                    recs: list[dict[str, Any]], by_id: dict[str, TaskRecord]) -> TaskRecord:
        job, _, k = t.external_id.partition("_")
        base = f"{self.run_dir(run.run_id)}/logs/{t.stage}/{job}_{k}"
        new_attempts: list[AttemptRecord] = []
        for r in recs:
            if r["attempt"] <= t.attempts and r["state"] == "RUNNING":
                continue
            new_attempts.append(AttemptRecord(
                run_id=run.run_id, task_id=t.task_id, attempt=int(r["attempt"]), state=TaskState(r["state"]),
                exit_code=r.get("exit_code"), reason=r.get("reason", ""), started_at=r.get("start"),
                ended_at=r.get("end"), stdout=f"{base}.out", stderr=f"{base}.err", external_id=t.external_id,
                host=r.get("host", "")))
        accounting = bool(run.options.get("slurm", {}).get("accounting"))
        mine = [r for r in recs if r.get("job") == t.external_id]  # this submission's tries, not a past round's
        last = mine[-1] if mine else None
        slurm_state = row.state if row else None
        attempts = max([t.attempts] + [int(r["attempt"]) for r in recs])
        started = t.started_at or (recs[0].get("start") if recs else None)
        if last and last["state"] == "SUCCEEDED":
            missing = _remote_output_missing(store, run, t, self.workspace(run.run_id))
            new = t.replace(state=TaskState.FAILED if missing else TaskState.SUCCEEDED, exit_code=0, reason=missing,
                            ended_at=last.get("end") or now())
            if missing and new_attempts:
                new_attempts[-1] = new_attempts[-1].replace(state=TaskState.FAILED, reason=missing)
        elif slurm_state in ACTIVE or (slurm_state is None and accounting and last and last["state"] == "FAILED"
                                        and last.get("final") is False):
            # (a try failed and the wrapper goes on with the next: Slurm may not list the job yet)
            if slurm_state == "PENDING" and not (last and last["state"] == "RUNNING"):
                why = row.reason if row else ""
                new = t.replace(state=TaskState.SUBMITTED, reason=f"pending: {why}" if why else "")
            else:
                reason = f"retrying after: {last['reason']}" if last and last["state"] == "FAILED" else ""
                new = t.replace(state=TaskState.RUNNING, reason=reason)
        elif last is None:
            if row and slurm_state == "CANCELLED" and "Dependency" in row.reason:
                new = t.replace(state=TaskState.UPSTREAM_FAILED, reason="a task it needs did not succeed",
                                ended_at=now())
            elif slurm_state == "CANCELLED":
                new = t.replace(state=TaskState.CANCELLED, reason="cancelled in Slurm", ended_at=now())
            elif row is None and any(not by_id[d].state.ok and by_id[d].state.terminal
                                     for d in _needs(store, run, t)):
                new = t.replace(state=TaskState.UPSTREAM_FAILED, reason="a task it needs did not succeed",
                                ended_at=now())
            elif row is None:
                return t  # not (or no longer) listed and nothing recorded: decide on a later refresh
            else:
                new = t.replace(state=TaskState.FAILED, reason=self._oom_why(run, store, t) if slurm_state ==
                                "OUT_OF_MEMORY" else ENDED_REASONS.get(slurm_state or "",
                                f"ended in Slurm state {slurm_state} before it ran"), ended_at=now())
        elif last["state"] == "FAILED":
            new = t.replace(state=TaskState.FAILED, exit_code=last.get("exit_code"), reason=last.get("reason", ""),
                            ended_at=last.get("end") or now())
        elif row is None and accounting:
            new = t.replace(state=TaskState.RUNNING)  # not in the accounting database yet: decide later
        else:  # a try started and its job ended without a final record
            said = slurm_memory_kill(f"{base}.err") if slurm_state != "RUNNING" else ""
            if said:  # slurmstepd killed the whole step for memory (OverMemoryKill, or its cgroup)
                new = t.replace(state=TaskState.FAILED, reason=self._oom_why(run, store, t, said), ended_at=now())
            elif slurm_state == "CANCELLED":
                new = t.replace(state=TaskState.CANCELLED, reason="cancelled in Slurm", ended_at=now())
            else:
                why = self._oom_why(run, store, t) if slurm_state == "OUT_OF_MEMORY" else ENDED_REASONS.get(
                    slurm_state or "", f"the job ended ({slurm_state or 'gone from squeue'}) without recording an exit")
                new = t.replace(state=TaskState.FAILED, reason=why, ended_at=now())
            if new_attempts:
                new_attempts[-1] = new_attempts[-1].replace(state=new.state, reason=new.reason, ended_at=now())
            else:  # its RUNNING record was stored by an earlier refresh: it ends here
                stored = store.get_attempts(run.run_id, t.task_id)
                if stored and stored[-1].state == TaskState.RUNNING:
                    new_attempts.append(stored[-1].replace(state=new.state, reason=new.reason, ended_at=now()))
        for a in new_attempts:
            store.save_attempt(a)
        return new.replace(attempts=attempts, started_at=started)

    def _resume_memory(self, run: RunRecord, store: StateStore, redo: list[TaskRecord]) -> RunRecord:
        """A task last killed for memory resumes with more (retry_memory), with its whole ``retries``."""
        from corral.backends import oom

        state = dict(run.options.get("slurm", {}))
        grown: dict[str, Any] = dict(state.get("memory", {}))
        if not grown and not any(oom.is_oom(t.reason) for t in redo):
            return run
        plan = _plan(store, run)
        bounds = state.get("memory_bounds", {})
        for t in redo:
            task = plan.by_id.get(t.task_id) if plan is not None else None
            if task is not None and oom.is_oom(t.reason) and oom.grows(task.stage.resources):
                killed_at = oom.limit_of(t.reason) or task.stage.resources.memory
                more = oom.next_memory(task.stage.resources, killed_at, bounds.get(t.stage))
                grown[t.task_id] = {"mib": more or killed_at}
            elif t.task_id in grown:
                grown[t.task_id] = {"mib": grown[t.task_id]["mib"]}  # a fresh budget of tries
        state["memory"] = grown
        run = run.replace(options={**run.options, "slurm": state})
        store.save_run(run)
        return run

    def _oom_why(self, run: RunRecord, store: StateStore, t: TaskRecord,
                 said: str = "Slurm ended the job OUT_OF_MEMORY") -> str:
        """The reason of a job Slurm ended for memory (OUT_OF_MEMORY; its cgroup's limit, or OverMemoryKill)."""
        from corral.backends import oom

        mib = run.options.get("slurm", {}).get("memory", {}).get(t.task_id, {}).get("mib")
        if mib is None:
            plan = _plan(store, run)
            task = plan.by_id.get(t.task_id) if plan is not None else None
            mib = task.stage.resources.memory if task is not None else None
        return oom.reason(mib, said) if mib else ENDED_REASONS["OUT_OF_MEMORY"]

    def _retry_with_more_memory(self, run: RunRecord, store: StateStore, tasks: list[TaskRecord]) -> bool:
        """Tasks the kernel killed for memory, with ``retry_memory`` and tries left: resubmitted (a new
        sbatch, ``--mem`` grown, bounded by the partition's largest node) with what needs them, which
        Slurm cancelled (``--kill-on-invalid-dep``). Done by whichever corral refreshes the run first
        (``run``'s wait, ``status``, ``resume``), under the run's lease, re-reading the records: once.
        True when something was resubmitted."""
        from corral.backends import oom
        from corral.backends.base import RunOptions as _Options
        from corral.state.lease import LeaseHeld

        if not any(t.state == TaskState.FAILED and oom.is_oom(t.reason) for t in tasks):
            return False
        plan = _plan(store, run)
        if plan is None:
            return False
        try:
            with store.lease(run.run_id, "memory-retry", wait=0):
                return self._regrow(plan, store.get_run(run.run_id), store, _Options)
        except LeaseHeld:
            return False

    def _regrow(self, plan: Plan, run: RunRecord, store: StateStore, options_type: Any) -> bool:
        from corral.backends import oom

        state = dict(run.options.get("slurm", {}))
        grown: dict[str, Any] = dict(state.get("memory", {}))
        bounds = state.get("memory_bounds", {})
        tasks = {t.task_id: t for t in store.get_tasks(run.run_id)}
        recs = read_records(self._records_dir(run.run_id), set(tasks))
        redo: set[str] = set()
        finals: list[TaskRecord] = []
        for t in tasks.values():
            task = plan.by_id.get(t.task_id)
            if task is None or t.state != TaskState.FAILED or not oom.is_oom(t.reason) or not oom.grows(
                    task.stage.resources) or "not retried" in t.reason:
                continue
            res = task.stage.resources
            killed_at = oom.limit_of(t.reason) or grown.get(t.task_id, {}).get("mib") or res.memory
            entry = dict(grown.get(t.task_id, {}))
            if "base" not in entry:  # the attempts before the submission whose try was killed
                entry["base"] = t.attempts - sum(1 for r in recs.get(t.task_id, []) if r.get("job") == t.external_id)
            left = task.stage.retries + 1 - (t.attempts - int(entry["base"]))
            if left <= 0:
                continue
            more = oom.next_memory(res, killed_at, bounds.get(t.stage))
            if more is None:
                why = oom.final_reason(res, killed_at, bounds.get(t.stage), "a node of its partition")
                finals.append(t.replace(reason=why))
                continue
            grown[t.task_id] = {**entry, "mib": more, "tries": left}
            redo.add(t.task_id)
        store.save_tasks(finals)
        if not redo:
            return False
        # what needs them (Slurm cancels it: its dependency can never be satisfied) runs again too
        dependents = plan.dependents()
        stack, again = list(redo), set(redo)
        while stack:
            for d in dependents[stack.pop()]:
                if d not in again and not tasks[d].state.ok:
                    again.add(d)
                    stack.append(d)
        doomed = [tasks[d].external_id for d in again - redo if tasks[d].external_id and not tasks[d].state.terminal]
        if doomed:
            self.client.scancel(doomed)
        store.save_tasks([tasks[d].replace(state=TaskState.PENDING, external_id="", exit_code=None, ended_at=None,
                                           reason=f"retrying after: {tasks[d].reason}" if d in redo else "")
                          for d in sorted(again)])
        state["memory"] = grown
        run = run.replace(options={**run.options, "slurm": state})
        store.save_run(run)
        self.settings = plan.workflow.slurm
        self._submit_round(plan, run, store, options_type(runtime=state.get("runtime", "auto"),
                                                          force=bool(state.get("force"))))
        return True

    def _settle(self, run: RunRecord, store: StateStore, tasks: list[TaskRecord]) -> None:
        runstate.end(store, run.run_id, tasks)  # only a RUNNING run ends; an ended one keeps its state

    def _wait(self, run: RunRecord, store: StateStore, options: RunOptions, *, until_idle: bool = False) -> None:
        """Refresh until the run ends (or, ``until_idle``, until none of its tasks is queued or running)."""
        delay = 0.2
        while True:
            tasks = self.refresh(store.get_run(run.run_id), store)
            if options.progress:
                options.progress(tasks)
            if store.get_run(run.run_id).state != RunState.RUNNING:
                return
            if until_idle and not any(t.state in (TaskState.SUBMITTED, TaskState.RUNNING) for t in tasks):
                return
            time.sleep(delay)  # bounded poll of Slurm: nothing to wait on but the scheduler
            delay = min(delay * 1.5, WAIT_MAX_S)

    def _follow(self, run: RunRecord, store: StateStore, task: TaskRecord, attempt: AttemptRecord) -> Iterator[str]:
        pos = os.path.getsize(attempt.stdout) if os.path.exists(attempt.stdout) else 0
        delay = 0.2
        while True:
            rec = next(t for t in self.refresh(store.get_run(run.run_id), store) if t.task_id == task.task_id)
            with contextlib.suppress(OSError), open(attempt.stdout, errors="replace") as fh:
                fh.seek(pos)
                chunk = fh.read()
                pos = fh.tell()
                if chunk:
                    delay = 0.2
                    yield from chunk.rstrip("\n").split("\n")
            if rec.state.terminal:
                return
            time.sleep(delay)
            delay = min(delay * 2, WAIT_MAX_S)

    def _note(self, msg: str) -> None:
        if msg not in self._said:
            self._said.add(msg)
            self._say(f"note: {msg}")


def _live_and_redo(tasks: list[TaskRecord]) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """Tasks queued or running in Slurm, and those not done that are not (what resume submits)."""
    live = [t for t in tasks if t.state in (TaskState.SUBMITTED, TaskState.RUNNING)]
    redo = [t for t in tasks if not t.state.ok and t.state not in (TaskState.SUBMITTED, TaskState.RUNNING)]
    return live, redo


_PLANS: dict[str, Plan] = {}


def _plan(store: StateStore, run: RunRecord) -> Plan | None:
    plan = _PLANS.get(run.run_id)
    if plan is None:
        try:
            plan = _PLANS[run.run_id] = Plan.from_manifest(store.load_manifest(run.run_id))
        except Exception:  # noqa: BLE001 - a missing manifest only means we cannot tell
            return None
    return plan


def _needs(store: StateStore, run: RunRecord, t: TaskRecord) -> list[str]:
    plan = _plan(store, run)
    task = plan.by_id.get(t.task_id) if plan else None
    return list(task.needs) if task else []


def _remote_output_missing(store: StateStore, run: RunRecord, t: TaskRecord, workdir: str) -> str:
    """After a success: the reason naming the first missing declared output the wrapper could not
    check itself (s3://, rclone remotes), else "". Local paths were checked on the node."""
    plan = _plan(store, run)
    task = plan.by_id.get(t.task_id) if plan else None
    if task is None or not task.stage.outputs:
        return ""
    for uri in task.paths("outputs", run.run_id, workdir):
        try:
            loc = storage.parse(uri, workdir=workdir, base_dir=plan.workflow.base_dir)  # type: ignore[union-attr]
            if loc.kind == "local":
                continue
            exists = storage.uri_times(loc)[0]
        except StorageError as exc:
            return f"cannot check output {uri}: {exc.one_line()}"
        if not exists:
            return f"declared output missing: {uri}"
    return ""


# What slurmstepd writes to a job's stderr when it kills a step for memory: OverMemoryKill's sampler
# ("StepId=1.batch exceeded memory limit (…), being killed", "Exceeded job memory limit") and the
# cgroup task plugin ("Detected 1 oom-kill event(s) in StepId=…").
_SLURM_OOM = ("exceeded job memory limit", "exceeded memory limit", "oom-kill event")


def slurm_memory_kill(err_path: str) -> str:
    """slurmstepd's own line saying it killed the step for memory, from the end of the job's
    stderr, or ""."""
    try:
        with open(err_path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 65536))
            tail = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(tail):
        if line.startswith("slurmstepd") and any(k in line.lower() for k in _SLURM_OOM):
            return line.split("error: ", 1)[-1].strip()[:200]
    return ""


def read_records(folder: Path, task_ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """The attempt records of these tasks (one directory listing), oldest attempt first."""
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return out
    for name in names:
        tid, _, rest = name.partition(".")
        if tid not in task_ids or not rest.endswith(".json"):
            continue
        try:
            rec = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue  # being written (they are renamed into place) or damaged
        out.setdefault(tid, []).append(rec)
    for recs in out.values():
        recs.sort(key=lambda r: int(r.get("attempt", 0)))
    return out


def _job_from_records(folder: Path, tasks: dict[str, int]) -> str:
    recs = read_records(folder, set(tasks))
    for rs in recs.values():
        for r in rs:
            job = str(r.get("job", "")).split("_")[0]
            if job.isdigit():
                return job
    return ""


# -- fit: refuse before submitting what no partition can hold -----------------------------------
def check_fit(plan: Plan, settings: SlurmSettings, client: SlurmClient) -> dict[str, int]:
    """Refuse a stage no node of its partition holds; returns, for stages with ``retry_memory``, the
    largest memory (MiB) a node of their partition has: how far their memory may grow."""
    wf: Workflow = plan.workflow
    bounds: dict[str, int] = {}
    text = client.run(["sinfo", "--noheader", "-o", "%R|%a|%c|%m|%G|%l|%d|%P"])
    parts: dict[str, list[dict[str, Any]]] = {}
    default = ""
    for line in text.splitlines():
        f = line.split("|")
        if len(f) < 8:
            continue
        name = f[0]
        if f[7].endswith("*"):
            default = name
        parts.setdefault(name, []).append({
            "cpus": _int(f[2]), "mem": _int(f[3].rstrip("+")), "gpus": _gpus(f[4]), "time": _minutes(f[5]),
            "tmp": _int(f[6].rstrip("+")),
        })
    for s in wf.stages:
        p = script.placement(s, settings)
        pname = p.partition or default
        override = s.name in settings.stages and settings.stages[s.name].partition
        where_p = wf.where("slurm", "stages", s.name, "partition") if override else wf.where("slurm", "partition")
        if pname not in parts:
            raise SpecError(f"stage {s.name!r}: the cluster has no partition {pname!r}",
                            f"partitions are: {', '.join(sorted(parts)) or '(none)'}", where=where_p)
        groups = parts[pname]
        r = s.resources
        checks = [
            ("vcpus", max(1, -(-int(r.vcpus * 100) // 100)), "cpus", f"{r.vcpus:g} vCPUs", "CPUs"),
            ("memory", r.memory, "mem", f"{r.memory} MiB", "MiB"),
            ("gpus", r.gpus, "gpus", f"{r.gpus} GPU(s)", "GPU(s)"),
            ("disk", (r.disk or 0) * 1024, "tmp", f"{r.disk} GiB of --tmp", "MiB of TmpDisk"),
        ]
        for fieldname, want, key, said, unit in checks:
            if want and not any(g[key] is None or g[key] >= want for g in groups):
                largest = max((g[key] or 0) for g in groups)
                raise SpecError(
                    f"stage {s.name!r} asks for {said}; no node of partition {pname!r} has that "
                    f"(largest: {largest} {unit})",
                    "lower resources." + fieldname + " or choose another partition in slurm.partition",
                    where=wf.stage_where(s.name, "resources", fieldname))
        if r.retry_memory is not None and all(g["mem"] is not None for g in groups):
            bounds[s.name] = max(g["mem"] for g in groups)
        if s.timeout:
            need_min = -(-int((s.timeout + 10) * (s.retries + 1)) // 60)
            if not any(g["time"] is None or g["time"] >= need_min for g in groups):
                longest = max((g["time"] or 0) for g in groups)
                raise SpecError(
                    f"stage {s.name!r}: timeout × tries needs {need_min} min; partition {pname!r} allows "
                    f"{longest} min", "lower timeout or retries, or choose a partition with a longer MaxTime",
                    where=wf.stage_where(s.name, "timeout"))
    return bounds


def _int(text: str) -> int | None:
    return int(text) if text.strip().isdigit() else None


def _gpus(gres: str) -> int:
    total = 0
    for part in gres.split(","):
        bits = part.split("(")[0].split(":")
        if bits[0] == "gpu" and bits[-1].isdigit():
            total = max(total, int(bits[-1]))
    return total


def _minutes(limit: str) -> int | None:
    """sinfo's time limit ([D-]HH:MM:SS, MM:SS, or infinite) in minutes; None for no limit."""
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days = 0
    if "-" in limit:
        d, limit = limit.split("-", 1)
        days = int(d)
    nums = [int(x) for x in limit.split(":") if x.isdigit()]
    while len(nums) < 3:
        nums.insert(0, 0)
    h, m, s = nums[-3:]
    return days * 1440 + h * 60 + m + (1 if s else 0)
