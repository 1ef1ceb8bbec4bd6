"""RunFacts: the typed record of a run's AWS facts reads and writes the stored form unchanged, so
runs recorded before it (and keys written by a newer corral) survive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corral.backends.aws_batch.final_cleanup import cleanup_stages
from corral.backends.aws_batch.run_facts import OPTIONS_KEY, RunFacts
from corral.backends.aws_batch.submit import OPTIONS_KEY as SUBMIT_OPTIONS_KEY
from corral.model import RunRecord
from corral.plan import CLEANUP_STAGE
from corral.state.sqlite import SqliteStore

# What corral recorded for an AWS run before RunFacts existed (keys as _record_where, the
# submitter and staging wrote them; None for a queue the run did not have).
STORED: dict[str, Any] = {
    "job_queue": "arn:aws:batch:us-east-2:123456789012:job-queue/corral",
    "gpu_job_queue": None,
    "fargate_job_queue": "arn:aws:batch:us-east-2:123456789012:job-queue/corral-fargate",
    "region": "us-east-2", "log_group": "/aws/batch/corral", "table": "corral-state",
    "cleanup_stages": ["_cleanup"], "efs_id": "fs-1", "efs_access_point": "fsap-1",
    "job_role_arn": "arn:aws:iam::123456789012:role/job", "execution_role_arn": "",
    "assign_public_ip": False, "round": 2, "round0_chunks": [700, 700, 600],
    "staged": "s3://b/corral/staged/run-1/",
}


def test_the_stored_form_reads_back_typed_and_writes_back_the_same() -> None:
    facts = RunFacts.from_dict(STORED)
    assert facts.round0_chunks == (700, 700, 600) and facts.round == 2
    assert facts.cleanup_stages == ("_cleanup",) and facts.assign_public_ip is False
    assert facts.execution_role_arn == "" and facts.gpu_job_queue is None
    assert facts.queues() == (STORED["job_queue"], None, STORED["fargate_job_queue"])
    assert facts.queue_names() == ["corral", "corral-fargate"]
    assert facts.to_dict() == STORED  # a recorded null (no GPU queue) stays a null
    assert RunFacts().to_dict() == {} and RunFacts().replace(gpu_job_queue=None).to_dict() == {"gpu_job_queue": None}
    assert OPTIONS_KEY == SUBMIT_OPTIONS_KEY == "aws_batch"  # the old import path still works


def test_runs_recorded_by_older_and_newer_corral() -> None:
    old = RunRecord(run_id="r", workflow_name="w", backend="aws", created_at=1.0,
                    options={OPTIONS_KEY: {"job_queue": "q"}})  # before cleanup_stages was recorded
    facts = RunFacts.of(old)
    assert facts.submitted and facts.cleanup_stages is None and facts.round is None
    assert cleanup_stages(old) == {CLEANUP_STAGE}
    assert not RunFacts.of(RunRecord(run_id="r", workflow_name="w", backend="aws", created_at=1.0)).submitted
    newer = {**STORED, "max_parallel": 8, "attempts_recorded": True}
    facts = RunFacts.from_dict(newer)
    assert dict(facts.other) == {"max_parallel": 8, "attempts_recorded": True}
    assert facts.to_dict() == newer
    # a feature's own fact, without a field yet: by name, stored under its name
    more = facts.replace(skip_in_job=["fetch"], round=3)
    assert more.get("skip_in_job") == ["fetch"] and more.get("max_parallel") == 8 and more.get("round") == 3
    assert more.get("nothing", "x") == "x" and RunFacts().get("log_group", "") == ""
    assert more.to_dict() == {**newer, "round": 3, "skip_in_job": ["fetch"]}


def test_save_to_writes_in_place_and_keeps_what_it_does_not_know(tmp_path: Path) -> None:
    run = RunRecord(run_id="run-1", workflow_name="w", backend="aws", created_at=1.0,
                    options={OPTIONS_KEY: {"job_queue": "q", "max_parallel": 8}, "other": 1})
    held = run.options[OPTIONS_KEY]  # code that holds the dict sees the change
    RunFacts.of(run).replace(round=0, round0_chunks=(3, 2)).save_to(run)
    assert held == {"job_queue": "q", "max_parallel": 8, "round": 0, "round0_chunks": [3, 2]}
    assert run.options["other"] == 1
    # first answers stay (a resume does not overwrite what the run recorded)
    again = RunFacts.of(run).with_defaults(job_queue="other", region="eu-west-1")
    assert again.job_queue == "q" and again.region == "eu-west-1"
    live = RunFacts.stored(run)
    assert live is held
    live.setdefault("memory_retries", {})["s:1"] = 4096  # a feature's own, updated in place
    assert RunFacts.of(run).get("memory_retries") == {"s:1": 4096}
    # and the stored form survives a store
    store = SqliteStore(tmp_path / "s.db")
    store.create_run(run, b"{}", [])
    assert RunFacts.of(store.get_run("run-1")) == RunFacts.of(run)
