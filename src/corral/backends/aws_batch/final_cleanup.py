"""The workspace cleanup of a failed AWS run.

Batch fails a job whose dependency failed, so after any failure a run's cleanup job (a dependent
job) never runs, and Batch has no "after any outcome" dependency. Once a refresh (``status``,
``--watch``, ``--wait``) sees every other task ended and the run FAILED, :class:`FinalCleanup`
submits the cleanup again without dependencies — exactly once across machines and crashes (a
compare-and-set claim in the store, an intent, a deterministic job name, adoption by name).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from corral.backends.aws_batch.payloads import RESERVED_ENV_PREFIXES
from corral.backends.aws_batch.run_facts import OPTIONS_KEY as OPTIONS_KEY  # (the old name, kept)
from corral.backends.aws_batch.run_facts import RunFacts
from corral.backends.aws_batch.submit import (
    INTENT,
    BatchApi,
    Queues,
    find_run_jobs,
    is_job_id,
    job_name,
)
from corral.model import RunRecord, RunState, TaskRecord, TaskState
from corral.plan import CLEANUP_STAGE
from corral.state.base import StateStore

# A workspace cleanup resubmitted without dependencies after a failed run is named
# ``<the cleanup's job name>-f<claim time>``; a claim with no job after CLAIM_LEASE seconds is taken over.
FINAL_SUFFIX = re.compile(r"-f(\d+)$")
CLAIM_LEASE = 300.0


class FinalCleanup:
    """Submits a failed run's cleanup tasks once more, without dependencies (see the module)."""

    def __init__(
        self, api: BatchApi, queues_of: Callable[[RunRecord], Queues], *, say: Callable[[str], None],
        wall_clock: Callable[[], float], after_submit: Callable[[str, str], None] | None = None,
    ) -> None:
        self.api = api
        self.queues_of = queues_of
        self.say = say
        self.wall_clock = wall_clock
        self.after_submit = after_submit

    def after_failure(self, run: RunRecord, store: StateStore, tasks: list[TaskRecord]) -> list[TaskRecord]:
        """Batch fails a job whose dependency failed, so after a failure the run's cleanup job never
        runs. Once every other task has ended and the run FAILED (not cancelled: as locally, a
        cancelled run keeps its workspace for ``resume``), submit each cleanup task that ended
        UPSTREAM_FAILED again, without dependencies — exactly once across machines and crashes:

        1. claim: a compare-and-set of the task record (still the UPSTREAM_FAILED one) to PENDING
           with the intent ``intent:<name>:0:1``, where ``<name>`` is the cleanup's job name
           plus ``-f<claim time>``; of processes refreshing at once, one wins;
        2. SubmitJob with that name (a copy of the failed cleanup job's submission, no dependsOn);
        3. record the job id. A crash between 1 and 3 leaves the intent: a later refresh adopts
           the job found by that name (ListJobs) or, once the claim is ``CLAIM_LEASE`` seconds old
           and still no job has that name, claims it again (compare-and-set) and submits."""
        cleanups = cleanup_stages(run)
        mine = [t for t in tasks if t.stage in cleanups]
        if (
            run.state != RunState.FAILED or not mine
            or any(not t.state.terminal for t in tasks if t.stage not in cleanups)
            or not any(t.state == TaskState.UPSTREAM_FAILED or claim_of(t) for t in mine)
        ):
            return tasks
        fresh = store.get_run(run.run_id)
        if fresh.state != RunState.FAILED or not RunFacts.of(fresh).submitted:
            return tasks
        changed: dict[str, TaskRecord] = {}
        found: dict[str, list[dict[str, Any]]] | None = None
        for t in mine:
            new: TaskRecord | None = None
            if t.state == TaskState.UPSTREAM_FAILED and is_job_id(t.external_id):
                new = self._claim_and_submit(fresh, store, t, t.external_id)
            elif (claim := claim_of(t)) is not None:
                name, claimed_at = claim
                if found is None:
                    queues = self.queues_of(fresh)
                    found = find_run_jobs(self.api, queues.all(), run.run_id)
                if name in found:  # submitted, then the submitter stopped before recording it
                    job_id = found[name][0]["jobId"]
                    new = t.replace(state=TaskState.SUBMITTED, external_id=job_id, reason="")
                    if store.swap_task(t, new):
                        self.say(f"run {run.run_id} ended with failures; its workspace cleanup runs (job {job_id})")
                    else:
                        new = None
                elif self.wall_clock() - claimed_at > CLAIM_LEASE:
                    base = FINAL_SUFFIX.sub("", name)
                    original = (found.get(base) or [{}])[0].get("jobId")
                    if original:
                        new = self._claim_and_submit(fresh, store, t, original)
            if new is not None:
                changed[t.task_id] = new
        return [changed.get(t.task_id, t) for t in tasks] if changed else tasks

    def _claim_and_submit(self, run: RunRecord, store: StateStore, t: TaskRecord, original: str) -> TaskRecord | None:
        job = self.api.describe_jobs([original]).get(original)
        if job is None:
            gone = t.replace(
                state=TaskState.FAILED, external_id="",
                reason="not run after the run's failures: AWS Batch no longer knows its job; "
                       f"`corral aws teardown --run {run.run_id}` removes the run's workspace",
            )
            if store.swap_task(t, gone):
                self.say(f"run {run.run_id} ended with failures; its workspace cleanup could not be submitted "
                         f"(AWS Batch no longer knows job {original}): `corral aws teardown --run {run.run_id}` "
                         "removes the workspace")
                return gone
            return None
        round_ = RunFacts.of(run).round or 0
        name = f"{job_name(run.run_id, t.stage, round_, None)}-f{int(self.wall_clock())}"
        claim = t.replace(
            state=TaskState.PENDING, external_id=f"{INTENT}{name}:0:1", exit_code=None, ended_at=None,
            reason="workspace cleanup after the run's failures",
        )
        if not store.swap_task(t, claim):
            return None  # another process claimed it (or the task changed): it is not ours to submit
        kwargs = resubmission(job, name)
        job_id = self.api.submit_job(kwargs)  # never re-sent blindly (a lost response: looked up by name)
        if self.after_submit is not None:
            self.after_submit(name, job_id)
        done = claim.replace(state=TaskState.SUBMITTED, external_id=job_id, reason="")
        store.save_tasks([done])
        self.say(f"run {run.run_id} ended with failures; submitted its workspace cleanup (job {job_id})")
        return done


def cleanup_stages(run: RunRecord) -> set[str]:
    """The run's cleanup stages (recorded at submission; older runs: the ``cleanup: true`` stage)."""
    recorded = RunFacts.of(run).cleanup_stages
    return set(recorded if recorded is not None else [CLEANUP_STAGE])


def claim_of(t: TaskRecord) -> tuple[str, float] | None:
    """(job name, claim time) when ``t`` is claimed for a cleanup after failure but not yet recorded."""
    if t.state != TaskState.PENDING or not t.external_id.startswith(INTENT):
        return None
    name = t.external_id[len(INTENT):].rsplit(":", 2)[0]
    m = FINAL_SUFFIX.search(name)
    return (name, float(m.group(1))) if m else None


def resubmission(job: dict[str, Any], name: str) -> dict[str, Any]:
    """SubmitJob kwargs repeating a (plain) job's submission under ``name``, without dependencies."""
    container = job.get("container") or {}
    env = [
        {"name": e["name"], "value": e.get("value", "")}
        for e in container.get("environment") or []
        if not e["name"].startswith(RESERVED_ENV_PREFIXES)
    ]
    kwargs: dict[str, Any] = {
        "jobName": name,
        "jobQueue": job["jobQueue"],
        "jobDefinition": job["jobDefinition"],
        "containerOverrides": {"environment": env},
    }
    tags = {k: v for k, v in (job.get("tags") or {}).items() if not k.startswith("aws:")}
    if tags:
        kwargs["tags"] = tags
        kwargs["propagateTags"] = True
    return kwargs
