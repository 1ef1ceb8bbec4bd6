"""Cost arithmetic against hand-computed figures (prices from corral's bundled table, us-east-1)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from corral.cost import (
    DEFAULT_DURATION_S,
    actual_cost,
    cost_line,
    estimate_plan,
    parse_durations,
    place,
    run_cost,
    tasks_per_instance,
)
from corral.errors import UsageError
from corral.instances import load_instance_types
from corral.model import AttemptRecord, RunRecord, RunState, TaskRecord, TaskState
from corral.plan import make_plan
from corral.spec import Resources, loads_workflow
from corral.state.sqlite import SqliteStore


def plan_of(text: str, tmp: Path | None = None):  # type: ignore[no-untyped-def]
    return make_plan(loads_workflow(text, source="wf.yaml", base_dir=tmp or Path.cwd()))


M2G = """
name: m2g
items: [{scan: sub-01}, {scan: sub-02}, {scan: sub-03}]
aws: {spot: true, instance_types: [r5.large]}
stages:
  - name: m2g
    image: neurodata/m2g:latest
    resources: {vcpus: 2, memory: 15200MiB}
    command: m2g {scan}
"""

SORT = """
name: si-cloud
items: [{recording: np-78min}]
aws: {instance_types: [g4dn]}
stages:
  - name: sort
    image: spikeinterface/kilosort2-compiled-base
    resources: {vcpus: 8, memory: 28GiB, gpus: 1}
    command: sort {recording}
"""


def test_m2g_worked_example_is_five_cents_a_scan() -> None:
    # m2g's docs: one r5.large per scan, "a little over an hour, at roughly $.05/scan".
    # r5.large spot in the table: $0.0441/h; 68 minutes: 0.0441 * 68 / 60 = 0.04998.
    est = estimate_plan(plan_of(M2G), durations={"m2g": 68 * 60})
    (s,) = est.stages
    assert (s.instance_type, s.tasks_per_instance, s.usd_per_instance_hour) == ("r5.large", 1, 0.0441)
    assert s.usd_per_task == pytest.approx(0.04998, abs=1e-9)
    assert s.usd == pytest.approx(3 * 0.04998, abs=1e-9)
    assert est.compute_usd == pytest.approx(0.14994, abs=1e-9)
    # plus each instance's 30 GiB gp3 root volume: 30 * 0.08 / 730 $/h for 68 minutes, three times
    vol = 30 * 0.08 / 730 * 68 / 60
    assert s.root_volume_gib == 30 and s.usd_root_volume == pytest.approx(3 * vol)
    assert est.efs_usd == 0.0 and est.total_usd == pytest.approx(0.14994 + 3 * vol)
    assert est.per_item_usd == pytest.approx(0.04998 + vol, abs=1e-9)
    assert est.spot and s.duration_source == "given"
    # On-demand the same scan costs 0.126 * 68 / 60 = 0.1428.
    od = estimate_plan(plan_of(M2G), spot=False, durations={"m2g": 68 * 60})
    assert od.stages[0].usd_per_task == pytest.approx(0.1428, abs=1e-9)


def test_spikeinterface_cloud_worked_example_is_1_44_per_sort() -> None:
    # spikeinterface_cloud: g4dn.2xlarge at $0.752/h on-demand; ~1.44 USD for a task that downloads,
    # preprocesses and sorts 78 minutes of Neuropixels data: 115 min of instance time.
    est = estimate_plan(plan_of(SORT), durations={"sort": 115 * 60})
    (s,) = est.stages
    assert s.instance_type == "g4dn.2xlarge"  # 8 vCPUs, 32 GiB (30,801 MiB usable), 1 T4
    assert s.usd_per_task == pytest.approx(0.752 * 115 / 60, abs=1e-12)
    assert round(s.usd_per_task, 2) == 1.44
    # 32 GiB does not fit a g4dn.2xlarge once ECS has its share: the next is the 4xlarge at $1.204/h.
    big = estimate_plan(plan_of(SORT.replace("28GiB", "32GiB")), durations={"sort": 115 * 60})
    assert big.stages[0].instance_type == "g4dn.4xlarge"
    assert big.stages[0].usd_per_task == pytest.approx(1.204 * 115 / 60, abs=1e-12)


def test_small_tasks_share_an_instance() -> None:
    # 1 vCPU / 1 GiB on c5: a c5.large (2 vCPUs, 3,840 MiB usable, $0.085/h) holds 2 -> $0.0425/h a task;
    # a c5.xlarge holds 4 at $0.17/h: the same price per task; the smaller one wins the tie.
    r = Resources(vcpus=1, memory=1024)
    p = place(r, ["c5"], spot=False)
    assert p is not None and p.instance.name == "c5.large" and p.per_instance == 2
    assert p.usd_hour == pytest.approx(0.0425)
    # ...but an instance is never shared by more tasks than there are: one task pays a whole c5.large.
    one = place(r, ["c5"], spot=False, tasks=1)
    assert one is not None and one.usd_hour == pytest.approx(0.085)
    table = load_instance_types()
    assert tasks_per_instance(table["c5.large"], 3, 1024) == 0
    assert tasks_per_instance(table["c5.4xlarge"], 4, 4096) == 4  # 16 vCPUs / 4; 30,801 MiB / 4,096 = 7
    assert tasks_per_instance(table["g4dn.12xlarge"], 8, 16384, 1) == 4  # 4 GPUs


def test_gpu_stages_go_to_gpu_families_and_unfit_stages_are_flagged() -> None:
    text = """
name: mix
items: [{k: 1}]
aws: {instance_types: [c5.large]}
stages:
  - {name: gpu, resources: {vcpus: 4, memory: 8GiB, gpus: 1}, command: "true"}
  - {name: wide, resources: {vcpus: 4, memory: 2GiB}, command: "true"}
"""
    est = estimate_plan(plan_of(text), durations={"gpu": 3600, "wide": 3600})
    gpu, wide = est.stages
    assert gpu.instance_type == "g4dn.xlarge" and gpu.usd == pytest.approx(0.526)  # default GPU families
    assert wide.instance_type is None and wide.usd == 0.0 and "c5.large" in wide.note
    assert est.compute_usd == pytest.approx(0.526)
    assert est.total_usd == pytest.approx(0.526 + 30 * 0.08 / 730)  # + the g4dn's root volume for an hour


def test_durations_given_from_history_or_default(tmp_path: Path) -> None:
    text = """
name: hist
items: [{k: a}, {k: b}, {k: c}]
aws: {instance_types: [c5.large]}
stages:
  - {name: one, resources: {vcpus: 2, memory: 2GiB}, command: "true"}
  - {name: two, resources: {vcpus: 2, memory: 2GiB}, command: "true", needs: [one]}
  - {name: three, resources: {vcpus: 2, memory: 2GiB}, command: "true", needs: [two]}
"""
    plan = plan_of(text)
    store = SqliteStore(tmp_path / "state.db")
    for n, minutes in enumerate([(10, 20, 30), (40, 50, 60)]):
        run = RunRecord(run_id=f"r{n}", workflow_name="hist", backend="local", created_at=1000.0 + n,
                        state=RunState.SUCCEEDED, host=socket.gethostname())
        tasks = [TaskRecord(run_id=run.run_id, task_id=f"{n}-{i}", stage="one", item_key=k, item_index=i,
                            state=TaskState.SUCCEEDED, started_at=0.0, ended_at=m * 60.0)
                 for i, (k, m) in enumerate(zip("abc", minutes, strict=True))]
        tasks.append(TaskRecord(run_id=run.run_id, task_id=f"{n}-f", stage="two", item_key="a", item_index=0,
                                state=TaskState.FAILED, started_at=0.0, ended_at=9999.0))  # failed: not a sample
        store.create_run(run, b"{}", tasks)
    other = RunRecord(run_id="x", workflow_name="other", backend="local", created_at=5.0)
    store.create_run(other, b"{}", [TaskRecord(run_id="x", task_id="x1", stage="one", item_key="a", item_index=0,
                                               state=TaskState.SUCCEEDED, started_at=0.0, ended_at=1.0)])
    est = estimate_plan(plan, store=store, durations={"three": 90})
    one, two, three = est.stages
    # median of 10, 20, 30, 40, 50, 60 minutes = 35 minutes; the other workflow's run is not used.
    assert one.duration_s == 35 * 60 and one.duration_source == "history (median of 6 tasks)"
    assert one.usd_per_task == pytest.approx(0.085 * 35 / 60)
    assert two.duration_s == DEFAULT_DURATION_S and two.duration_source == "default"
    assert three.duration_s == 90 and three.duration_source == "given"
    assert any("60 min" in a for a in est.assumptions)
    store.close()


def test_parse_durations() -> None:
    assert parse_durations(["sort=1h30m", " fetch=45s"], ["sort", "fetch"]) == {
        "sort": 5400.0, "fetch": 45.0}
    with pytest.raises(UsageError, match="does not have"):
        parse_durations(["sortt=5m"], ["sort"])
    with pytest.raises(UsageError, match="cannot read --duration '5m'") as info:
        parse_durations(["5m"], ["sort"])
    assert "STAGE=DURATION" in (info.value.hint or "")
    with pytest.raises(UsageError, match="cannot read duration"):
        parse_durations(["sort=soon"], ["sort"])


def test_user_price_table_from_corral_prices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = {
        "region": "eu-west-1", "date": "2026-01-15", "currency": "USD",
        "instances": {"x9.large": {"vcpus": 4, "memory_mib": 16384, "on_demand_usd_hour": 0.5,
                                   "spot_usd_hour": 0.2}},
    }
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("CORRAL_PRICES", str(path))
    est = estimate_plan(plan_of("""
name: own
items: [{k: 1}]
aws: {instance_types: [x9]}
stages: [{name: s, resources: {vcpus: 2, memory: 4GiB}, command: "true"}]
"""), durations={"s": 1800})
    assert (est.region, est.prices_date) == ("eu-west-1", "2026-01-15")
    # x9.large holds 2 such tasks, but the stage has one: the whole $0.50/h for half an hour.
    assert est.stages[0].instance_type == "x9.large" and est.compute_usd == pytest.approx(0.25)


def test_actual_cost_per_attempt_item_stage_and_run() -> None:
    plan = plan_of(M2G.replace("spot: true", "spot: false"))
    ids = {t.key: t.id for t in plan.tasks}
    rid = "run-1"
    tasks = [
        TaskRecord(run_id=rid, task_id=ids["sub-01"], stage="m2g", item_key="sub-01", item_index=0,
                   state=TaskState.SUCCEEDED, attempts=2),
        TaskRecord(run_id=rid, task_id=ids["sub-02"], stage="m2g", item_key="sub-02", item_index=1,
                   state=TaskState.RUNNING, attempts=1),
        TaskRecord(run_id=rid, task_id=ids["sub-03"], stage="m2g", item_key="sub-03", item_index=2,
                   state=TaskState.PENDING),
    ]
    attempts = {
        ids["sub-01"]: [
            # 30 min on an r5.xlarge Batch reported ($0.252/h, holds one 15,200 MiB task... and a second
            # one: 30,801 MiB usable / 15,200 = 2, 4 vCPUs / 2 = 2): 0.252 / 2 * 0.5 = 0.063
            AttemptRecord(run_id=rid, task_id=ids["sub-01"], attempt=1, state=TaskState.FAILED,
                          started_at=0.0, ended_at=1800.0, instance_type="r5.xlarge"),
            # 60 min, type not reported -> the estimate's r5.large at $0.126/h: 0.126, estimated
            AttemptRecord(run_id=rid, task_id=ids["sub-01"], attempt=2, state=TaskState.SUCCEEDED,
                          started_at=2000.0, ended_at=5600.0),
        ],
        # still running since t=3600, priced up to at=7200: one hour of r5.large = 0.126
        ids["sub-02"]: [AttemptRecord(run_id=rid, task_id=ids["sub-02"], attempt=1, state=TaskState.RUNNING,
                                      started_at=3600.0)],
    }
    c = actual_cost(plan, tasks, attempts, run_id=rid, at=7200.0)
    assert [a.usd for a in c.attempts] == pytest.approx([0.063, 0.126, 0.126])
    assert [a.estimated for a in c.attempts] == [False, True, True]
    assert c.per_item == pytest.approx({"sub-01": 0.189, "sub-02": 0.126})
    assert c.per_stage == pytest.approx({"m2g": 0.315})
    assert c.total_usd == pytest.approx(0.315)
    assert (c.estimated_attempts, c.running_attempts, c.unpriced_attempts) == (2, 1, 0)
    assert c.per_item_mean == pytest.approx(0.1575)
    line = cost_line(c)
    assert line.startswith("cost: $0.3150, $0.1575 per item (on-demand") and "1 attempt(s) still running" in line
    # An instance type the table does not know is reported, not guessed.
    attempts[ids["sub-01"]][0].instance_type = "zz9.huge"
    c2 = actual_cost(plan, tasks, attempts, run_id=rid, at=7200.0)
    assert c2.unpriced_attempts == 1 and c2.total_usd == pytest.approx(0.252)


def test_run_cost_uses_task_times_when_no_attempt_was_recorded(tmp_path: Path) -> None:
    # The AWS backend records a task's start/end (and instance type where known), not attempts.
    plan = plan_of(M2G)
    store = SqliteStore(tmp_path / "state.db")
    run = RunRecord(run_id="aws-run", workflow_name="m2g", backend="aws", created_at=1.0,
                    options={"aws": {"spot": True}})
    tasks = [TaskRecord(run_id="aws-run", task_id=t.id, stage="m2g", item_key=t.key, item_index=t.index,
                        state=TaskState.SUCCEEDED, attempts=1, started_at=0.0, ended_at=68 * 60.0,
                        instance_type="r5.large" if t.index == 0 else "")
             for t in plan.tasks]
    store.create_run(run, plan.manifest(), tasks)
    store.save_tasks(tasks)
    c = run_cost(store, "aws-run")
    assert c.spot and c.total_usd == pytest.approx(3 * 0.04998)
    assert c.estimated_attempts == 2  # the two tasks without a reported instance type
    store.close()


def test_cli_cost_table_and_json(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from helpers import run_cli

    wf = tmp_path / "m2g.yaml"
    wf.write_text(M2G)
    env = {"CORRAL_HOME": str(tmp_path / "home")}
    res = run_cli("cost", str(wf), "--duration", "m2g=68m", env=env)
    assert res.returncode == 0, res.stderr
    assert "r5.large (1)" in res.stderr and "total $0.1611, $0.0537 per item (instances $0.1499, root volumes" \
        in res.stderr
    res = run_cli("cost", str(wf), "--duration", "m2g=68m", "--on-demand", "--json", env=env)
    doc = json.loads(res.stdout)
    assert doc["spot"] is False and doc["stages"][0]["usd_per_task"] == pytest.approx(0.1428)
    res = run_cli("cost", str(wf), "--duration", "nope=5m", env=env)
    assert res.returncode == 2 and "error: --duration names stage 'nope'" in res.stderr and "hint: stages are: m2g" in res.stderr


def test_status_cost_line_never_fails(tmp_path: Path) -> None:
    from corral.cost import status_cost_line

    store = SqliteStore(tmp_path / "state.db")
    store.create_run(RunRecord(run_id="broken", workflow_name="w", backend="local", created_at=1.0), b"not json", [])
    assert status_cost_line(store, "broken") is None
    plan = plan_of(M2G)
    store.create_run(RunRecord(run_id="ok", workflow_name="m2g", backend="local", created_at=2.0), plan.manifest(), [])
    assert status_cost_line(store, "ok") == "cost: $0.0000 (spot, us-east-1 prices of 2025-07-01)"
    store.close()


DISKY = """
name: disky
items: [%s]
aws: {instance_types: [m5]}
stages:
  - {name: sort, resources: {vcpus: 1, memory: 2GiB, disk: 300GiB}, command: "true"}
"""


def test_root_volumes_hold_every_task_that_can_share_the_largest_instance() -> None:
    """resources.disk is per task: 15 tasks of a 300 GiB stage on one instance need 15 × 300 GiB.
    m5.24xlarge (96 vCPUs, 384 GiB) could hold 96 one-vCPU, 2 GiB tasks; the stage has 15, so at most
    15 share one instance; provisioning and cost size the volume alike."""
    from corral.backends.aws_batch.provision import needs_for
    from corral.routes import route

    plan = plan_of(DISKY % ", ".join(f"{{k: {i}}}" for i in range(15)))
    r = route(plan.workflow.stage("sort").resources, ["m5"])
    assert r.largest == "m5.24xlarge" and r.per_largest == 96
    needs = needs_for(plan)
    assert needs.max_disk_gib == 300 and needs.scratch_per_instance == 15 * 300
    est = estimate_plan(plan, durations={"sort": 3600})
    (s,) = est.stages
    assert s.root_volume_gib == 4550  # 4,500 GiB of scratch + 30 for images, rounded up to 50
    p = s.tasks_per_instance
    assert s.usd_root_volume == pytest.approx(4550 * 0.08 / 730 / p * 15)
    assert any("4550 GiB gp3 per instance" in a for a in est.assumptions)


def test_efs_is_priced_when_the_workspace_is_used() -> None:
    text = """
name: ws
items: [{k: 1}, {k: 2}]
stages:
  - {name: a, command: "echo > {workdir}/x"}
  - {name: b, needs: [a], command: "cat {workdir}/x"}
"""
    est = estimate_plan(plan_of(text), durations={"a": 1800, "b": 1800})
    # 2 items × 1 GiB: written once ($0.06/GB), read once ($0.03/GB), stored 1 h at $0.30/GB-month
    assert est.efs_usd == pytest.approx(2 * (0.30 / 730 + 0.06 + 0.03))
    assert est.total_usd == pytest.approx(est.compute_usd + est.root_volumes_usd + est.efs_usd)
    assert any(a.startswith("EFS workspace: 1 GiB per item") for a in est.assumptions)
    assert estimate_plan(plan_of(M2G), durations={"m2g": 60}).efs_usd == 0.0
