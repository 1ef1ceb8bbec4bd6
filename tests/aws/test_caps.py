"""max_parallel on AWS (issue 14): a Batch consumable resource per capped stage of a run.

Requests go to moto under the strict-AWS layer, which answers the consumable-resource API moto
lacks (tests/batch_consumables.py). That Batch then holds the cap is shown by the contract suite
(test_max_parallel_caps_one_stage[aws]: the simulated Batch runs a wave's children at once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from strict_aws import StrictAws
from test_backend_support import make_environment, record_run

from corral.backends.aws_batch import caps
from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch.backend import AwsBatchBackend
from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.provision import (
    teardown as remove,  # (not the submodule: it would shadow the package's teardown)
)
from corral.backends.base import RunOptions
from corral.plan import make_plan
from corral.spec import loads_workflow
from corral.state.sqlite import SqliteStore

pytestmark = pytest.mark.aws

WF = """
name: capped
defaults: {image: busybox}
items: [{s: a}, {s: b}, {s: c}, {s: d}]
stages:
  - {name: upload, max_parallel: 2, command: "upload {s}"}
  - {name: convert, needs: [upload], command: "convert {s}"}
  - {name: sort, max_parallel: 8, command: "sort {s}"}
  - {name: summary, per: run, max_parallel: 1, needs: [convert], command: "summary"}
"""


def _definitions(strict: StrictAws, clients: AwsClients, run_id: str) -> dict[str, dict[str, Any]]:
    """Stage -> the RegisterJobDefinition parameters of the job it was submitted with (as sent:
    moto keeps no consumableResourceProperties)."""
    out = {}
    for page in clients.batch.get_paginator("list_jobs").paginate(
        jobQueue="test-queue", filters=[{"name": "JOB_NAME", "values": [f"corral-{run_id}-*"]}]
    ):
        for j in page["jobSummaryList"]:
            job = clients.batch.describe_jobs(jobs=[j["jobId"]])["jobs"][0]
            stage = next(e["value"] for e in job["container"]["environment"] if e["name"] == "CORRAL_STAGE")
            out[stage] = strict._job_defs[job["jobDefinition"]]
    return out


def test_a_capped_stage_holds_a_consumable_resource_of_its_cap(aws: str, strict_aws: StrictAws, tmp_path: Path) -> None:
    clients = AwsClients()
    env = make_environment(clients)
    plan = make_plan(loads_workflow(WF))
    store = SqliteStore(tmp_path / "s.db")
    run = record_run(store, plan, "cap-1")
    said: list[str] = []
    be = AwsBatchBackend(clients, environment=env, sleep=lambda s: None, say=said.append)
    be.start(plan, run, store, RunOptions(wait=False))

    name = caps.resource_name("cap-1", "upload")
    res = strict_aws.consumables.resources
    # only where the cap binds: `sort` (8 > 4 tasks) and the per-run `summary` need none
    assert sorted(res) == [name]
    assert (res[name].total, res[name].kind) == (2, "REPLENISHABLE")
    assert res[name].tags["corral:managed"] == "true" and res[name].tags["corral:run"] == "cap-1"
    assert any("at most 2 at once" in line for line in said)
    defs = _definitions(strict_aws, clients, "cap-1")
    assert defs["upload"]["consumableResourceProperties"] == {
        "consumableResourceList": [{"consumableResource": name, "quantity": 1}]}
    assert all("consumableResourceProperties" not in defs[s] for s in ("convert", "sort", "summary"))
    # one run's cap is its own: the definition (content-named) differs from another run's
    other = pl.job_definition(plan.workflow.stage("upload"), pl.JobContext(region="r", account_id="1"),
                              consumable=caps.requirement(caps.resource_name("cap-2", "upload")))
    assert other.name != defs["upload"]["jobDefinitionName"]

    # resume (and a second start) make nothing new; a total changed behind corral's back is set back
    res[name].total = 5
    strict_aws.consumables.calls.clear()
    assert caps.ensure(clients.batch, plan, "cap-1") == {"upload": name}
    assert strict_aws.consumables.calls == ["ListConsumableResources", "UpdateConsumableResource"]
    assert res[name].total == 2
    strict_aws.consumables.calls.clear()
    caps.ensure(clients.batch, plan, "cap-1")
    assert strict_aws.consumables.calls == ["ListConsumableResources"]


def test_teardown_removes_a_runs_caps_but_not_while_jobs_hold_them(aws: str, strict_aws: StrictAws) -> None:
    clients = AwsClients()
    plan = make_plan(loads_workflow(WF))
    for run_id in ("run-a", "run-b", "run-c"):
        caps.ensure(clients.batch, plan, run_id)
    clients.batch.create_consumable_resource(consumableResourceName="corral-cap-theirs", totalQuantity=3)  # not corral's
    res = strict_aws.consumables.resources
    held = caps.resource_name("run-c", "upload")
    assert strict_aws.consumables.take(held, 1)

    report = remove(clients, run_id="run-a")
    assert f"consumable-resource {caps.resource_name('run-a', 'upload')}" in report.deleted
    assert sorted(res) == sorted([caps.resource_name("run-b", "upload"), held, "corral-cap-theirs"])
    report = remove(clients, run_id="run-c")
    assert held in res and any(held in k and "still hold it" in k for k in report.kept)

    strict_aws.consumables.give_back(held, 1)
    remove(clients, everything=True, force=True)
    assert sorted(res) == ["corral-cap-theirs"]  # untagged: not corral's


def test_names_are_safe_bounded_and_distinct() -> None:
    long_a, long_b = "u" * 62 + "a", "u" * 62 + "b"  # stage names: [A-Za-z][A-Za-z0-9_-]{0,62}
    a, b = caps.resource_name("wf-20261202-abcdef", long_a), caps.resource_name("wf-20261202-abcdef", long_b)
    assert a != b and max(len(a), len(b)) <= caps.NAME_LIMIT and a.startswith("corral-cap-wf-20261202-abcdef-")
    assert all(ch.isalnum() or ch in "-_" for ch in a)


def test_attempts_are_described_only_where_they_can_differ() -> None:
    """The refresh describes children that just failed, and those that succeeded in a stage with
    retries (retryStrategy.attempts > 1 + INFRA_RETRIES); a stage without retries costs nothing more."""
    from corral.model import TaskRecord, TaskState

    class Api:
        def __init__(self) -> None:
            self.asked: list[list[str]] = []

        def describe_jobs(self, ids: list[str]) -> dict[str, dict[str, Any]]:
            self.asked.append(list(ids))
            return {i: {"attempts": [{}] * 3} for i in ids}

    def rec(tid: str, ext: str, state: TaskState) -> TaskRecord:
        return TaskRecord(run_id="r", task_id=tid, stage="s", item_key=tid, item_index=0, state=state,
                          external_id=ext, attempts=1)

    api = Api()
    be = AwsBatchBackend(AwsClients(region="us-east-2"), api=api)  # type: ignore[arg-type]
    plain = {"attempts": 1 + pl.INFRA_RETRIES}
    retried = {"attempts": 1 + 2 + pl.INFRA_RETRIES}
    changed = {"a": rec("a", "P:0", TaskState.SUCCEEDED), "b": rec("b", "P:1", TaskState.FAILED),
               "c": rec("c", "Q:0", TaskState.SUCCEEDED), "d": rec("d", "Q:1", TaskState.RUNNING)}
    be._count_attempts(changed, {"P": {"retryStrategy": plain}, "Q": {"retryStrategy": retried}})
    assert api.asked == [["P:1", "Q:0"]]
    assert (changed["a"].attempts, changed["b"].attempts, changed["c"].attempts, changed["d"].attempts) == (1, 3, 3, 1)
