"""What a workflow will cost on AWS Batch before it runs, and what a run did cost after.

Both use corral's instance table (``corral.instances``: ``data/ec2_instances.json``, a dated
snapshot for one region; point ``CORRAL_PRICES`` at your own file of the same shape). No
network call is made.

The model, stated once so the figures can be checked by hand:

- **Placement.** A task of ``vcpus``/``memory``/``gpus`` lands on the allowed instance type
  (``aws.instance_types``; GPU stages on GPU families, as the AWS backend routes them) that
  gives the lowest price per task: ``price / per_instance``, where ``per_instance`` is how many
  such tasks fit side by side on one instance (AWS Batch packs jobs onto instances; ECS keeps
  part of each instance's memory for itself, see ``InstanceType.usable_memory_mib``), and never
  more than the stage has tasks.
- **Price.** On-demand or spot (``aws.spot``, or ``--spot``) hourly list price from the table.
  Spot prices there are indicative, not quotes.
- **Fargate.** A stage that runs on Fargate (``fargate`` in ``aws.instance_types`` and the
  stage fits it) pays for its size rounded up to a valid Fargate pair: vCPUs × $0.04048/h +
  GB × $0.004445/h, plus $0.000111/GB-h of disk over 20 GiB (us-east-1 Linux/x86 list prices,
  ``instances.FARGATE_*``, used for every region: others cost up to ~30% more); Fargate Spot
  is assumed at 30% of that.
- **Duration** of one task of a stage: given (``--duration stage=30m``), else the median of
  the stage's succeeded tasks in earlier runs of the same workflow found in the state store,
  else ``DEFAULT_DURATION_S`` (one hour), and the source is always shown.
- **Cost of a task** = ``price / per_instance × hours``. Each task is counted once (retries
  are not predicted); EC2's per-second billing is assumed, without instance boot time, S3 or
  data transfer.
- **Root volumes.** Every instance carries the gp3 root volume provisioning gives it
  (:func:`plan_root_volume_gib`, from ``corral.routes`` as ``corral aws setup`` sizes it; 30 GiB
  when no stage asks for disk), at ``GP3_USD_GB_MONTH`` per GiB-month prorated over 730 hours;
  a task pays ``volume price / per_instance`` for its hours, as for the instance. Estimates only:
  a run's actual cost counts instance time.
- **EFS** (when the run uses the workspace): ``EFS_GIB_PER_ITEM`` GiB per item, written once and
  read once at Elastic throughput prices, stored for the stages' durations end to end at the
  Standard price (us-east-1 list prices; stated in the estimate's assumptions).
- **Actual cost** of a run: for every attempt, ``(end - start)`` × the hourly price of the
  instance type Batch reported for it (``AttemptRecord/TaskRecord.instance_type``) divided by
  how many such tasks fit on it; where no type was recorded (local runs, or Batch did not say),
  the estimate's placement is used and the figure is marked *estimated*. A local run's cost is
  therefore what the same attempts would have cost on AWS.

Worked examples (tests/ops/test_cost.py asserts them):

- m2g: one scan per ``r5.large`` (2 vCPUs, 15,200 MiB, spot at $0.0441/h), about 68 minutes:
  0.0441 × 68/60 = **$0.0500 per scan** — m2g's own "roughly $.05/scan".
- spikeinterface_cloud: one sort on a ``g4dn.2xlarge`` (8 vCPUs, 1 T4, $0.752/h on-demand); a
  78-minute Neuropixels recording took about 115 minutes to download, preprocess and sort:
  0.752 × 115/60 = **$1.4413** — their "~1.44 USD".
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from corral.errors import UsageError
from corral.instances import (
    DEFAULT_ROOT_VOLUME_GIB,
    FARGATE_SPOT_FACTOR,
    FARGATE_USD_EPHEMERAL_GB_HOUR,
    FARGATE_USD_GB_HOUR,
    FARGATE_USD_VCPU_HOUR,
    MAX_ROOT_VOLUME_GIB,
    InstanceType,
    expand,
    fargate_instance,
    load_instance_types,
    table_info,
)
from corral.model import AttemptRecord, RunRecord, TaskRecord, TaskState, now
from corral.routes import (
    disk_needs,
    ec2_vcpus,
    root_volume_gib,
    route,
    scratch_per_instance_gib,
    tasks_per_instance,
)
from corral.units import parse_duration

if TYPE_CHECKING:  # pragma: no cover
    from corral.plan import Plan
    from corral.spec import Resources, Stage
    from corral.state.base import StateStore

DEFAULT_DURATION_S = 3600.0
HISTORY_RUNS = 20  # how many recent runs of the store are searched for earlier durations
HOURS_PER_MONTH = 730.0  # AWS prorates monthly storage prices by the hour over 730 hours
# us-east-1 list prices (aws.amazon.com/ebs/pricing, aws.amazon.com/efs/pricing; used for every region):
GP3_USD_GB_MONTH = 0.08  # gp3 storage; its 3,000 IOPS and 125 MB/s baseline are free
EFS_USD_GB_MONTH = 0.30  # EFS Standard storage
EFS_USD_READ_GB = 0.03  # Elastic throughput, per GB read
EFS_USD_WRITE_GB = 0.06  # Elastic throughput, per GB written
EFS_GIB_PER_ITEM = 1.0  # assumed workspace data per item (written once, read back once)


# -- placement --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Where one task lands, and its share of the instance's price."""

    instance: InstanceType
    per_instance: int  # tasks of this size that fit on one instance at once
    spot: bool

    @property
    def instance_usd_hour(self) -> float:
        return self.instance.spot_usd_hour if self.spot else self.instance.on_demand_usd_hour

    @property
    def usd_hour(self) -> float:
        """The hourly price of one task: the instance's price shared by the tasks it holds."""
        return self.instance_usd_hour / self.per_instance




def place(resources: Resources, allowed: Sequence[str], *, spot: bool, tasks: int | None = None
          ) -> Placement | None:
    """The allowed instance type where a task of ``resources`` costs least, or None if none fits.

    ``tasks``: how many such tasks there are; an instance is shared by at most that many (a
    48-vCPU instance is no bargain for 3 one-vCPU tasks).

    A stage the AWS backend sends to Fargate (``fargate`` allowed and the task fits it) is priced
    as one Fargate task of its rounded-up size (``instances.fargate_usd_hour``).
    """
    rt = route(resources, allowed)
    if rt.fargate:
        it = fargate_instance(resources)
        if it is not None:
            return Placement(it, 1, spot)
    best: Placement | None = None
    best_key: tuple[float, float, str] | None = None
    for it in expand(list(rt.entries)):
        n = tasks_per_instance(it, rt.vcpus, rt.memory_mib, rt.gpus)  # what Batch packs by
        if n == 0:
            continue
        if tasks is not None:
            n = max(1, min(n, tasks))
        p = Placement(it, n, spot)
        key = (p.usd_hour, it.vcpus, it.name)
        if best_key is None or key < best_key:
            best, best_key = p, key
    return best


def placement_on(instance_type: str, resources: Resources, *, spot: bool) -> Placement | None:
    """The task's share of a named instance type (as Batch reported it), or None if unknown."""
    it = load_instance_types().get(instance_type)
    if it is None:
        return None
    vcpus = ec2_vcpus(resources.vcpus)  # what Batch packed it by
    return Placement(it, max(1, tasks_per_instance(it, vcpus, resources.memory, resources.gpus)), spot)


# -- durations --------------------------------------------------------------------------------
def parse_durations(pairs: Iterable[str], stages: Sequence[str] | None = None) -> dict[str, float]:
    """``["sort=115m", "fetch=2m"]`` → seconds per stage; unknown stages are refused."""
    out: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"cannot read --duration {pair!r}", "write STAGE=DURATION, e.g. --duration sort=90m")
        if stages is not None and name not in stages:
            raise UsageError(f"--duration names stage {name!r}, which the workflow does not have",
                             f"stages are: {', '.join(stages)}")
        try:
            out[name] = parse_duration(value)
        except ValueError as exc:
            raise UsageError(f"--duration {pair!r}: {exc}", "write e.g. 45s, 90m, 6h or 1h30m") from None
    return out


def history_durations(store: StateStore, workflow_name: str, *, exclude_run: str | None = None,
                      runs: int = HISTORY_RUNS) -> dict[str, tuple[float, int]]:
    """Stage → (median seconds, number of tasks) over succeeded tasks of earlier runs of the workflow."""
    samples: dict[str, list[float]] = {}
    for run in store.list_runs(limit=runs):
        if run.workflow_name != workflow_name or run.run_id == exclude_run:
            continue
        for t in store.get_tasks(run.run_id, [TaskState.SUCCEEDED]):
            if t.started_at is not None and t.ended_at is not None and t.ended_at >= t.started_at:
                samples.setdefault(t.stage, []).append(t.ended_at - t.started_at)
    return {s: (statistics.median(v), len(v)) for s, v in samples.items() if v}


# -- estimate ---------------------------------------------------------------------------------
@dataclass
class StageEstimate:
    stage: str
    tasks: int
    vcpus: float
    memory_mib: int
    gpus: int
    instance_type: str | None  # None: no allowed instance type holds the stage
    tasks_per_instance: int
    usd_per_instance_hour: float
    usd_per_task_hour: float
    duration_s: float
    duration_source: str  # "given" | "history (N tasks)" | "default"
    usd_per_task: float
    usd: float  # instance time (what usd_per_task sums to)
    note: str = ""
    root_volume_gib: int = 0  # the root volume of each instance it runs on (0: on Fargate)
    usd_root_volume: float = 0.0  # this stage's share of those volumes, for its task-hours


@dataclass
class CostEstimate:
    workflow: str
    items: int
    spot: bool
    region: str
    prices_date: str
    currency: str
    stages: list[StageEstimate]
    total_usd: float  # instance time + root volumes + EFS
    per_item_usd: float | None  # total / items (None without items)
    assumptions: list[str] = field(default_factory=list)
    compute_usd: float = 0.0  # instance (and Fargate) time
    root_volumes_usd: float = 0.0  # gp3 root volumes, prorated to the tasks' instance-hours
    efs_usd: float = 0.0  # EFS storage for the run's length and Elastic throughput (see assumptions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stage_estimate(stage: Stage, n_tasks: int, allowed: Sequence[str], spot: bool, duration: tuple[float, str],
                    volume_gib: int = DEFAULT_ROOT_VOLUME_GIB) -> StageEstimate:
    r = stage.resources
    p = place(r, allowed, spot=spot, tasks=n_tasks)
    secs, source = duration
    if p is None:
        entries = route(r, allowed).entries
        return StageEstimate(
            stage=stage.name, tasks=n_tasks, vcpus=r.vcpus, memory_mib=r.memory, gpus=r.gpus, instance_type=None,
            tasks_per_instance=0, usd_per_instance_hour=0.0, usd_per_task_hour=0.0, duration_s=secs,
            duration_source=source, usd_per_task=0.0, usd=0.0,
            note=f"no instance type in the price table among {', '.join(entries)} holds it (not counted)",
        )
    per_task = p.usd_hour * secs / 3600.0
    on_instances = not p.instance.name.startswith("fargate-")
    vol = volume_gib if on_instances else 0
    # each instance carries one root volume; a task pays its share, like the instance's price
    vol_usd = vol * GP3_USD_GB_MONTH / HOURS_PER_MONTH / p.per_instance * secs / 3600.0 * n_tasks
    return StageEstimate(
        stage=stage.name, tasks=n_tasks, vcpus=r.vcpus, memory_mib=r.memory, gpus=r.gpus,
        instance_type=p.instance.name, tasks_per_instance=p.per_instance, usd_per_instance_hour=p.instance_usd_hour,
        usd_per_task_hour=p.usd_hour, duration_s=secs, duration_source=source, usd_per_task=per_task,
        usd=per_task * n_tasks, root_volume_gib=vol, usd_root_volume=vol_usd,
    )


def plan_root_volume_gib(plan: Plan, allowed: Sequence[str]) -> int:
    """The root volume of the instances a plan's EC2 stages run on: what provisioning makes
    (``corral.routes``: every task that can share the largest allowed instance has its disk)."""
    wf = plan.workflow
    scratch = scratch_per_instance_gib(disk_needs(
        ((s.name, s.resources, len(plan.stage_tasks(s.name))) for s in wf.stages), allowed))
    try:
        return root_volume_gib(scratch) or DEFAULT_ROOT_VOLUME_GIB
    except ValueError:  # provisioning refuses it; price the largest volume meanwhile
        return MAX_ROOT_VOLUME_GIB


def uses_efs(plan: Plan) -> bool:
    """Whether the run gets the EFS workspace (``aws.efs`` or a stage using ``{workdir}``), as provisioning says."""
    from corral.backends.aws_batch.provision import needs_for

    return needs_for(plan).efs


def estimate_plan(
    plan: Plan,
    *,
    spot: bool | None = None,
    durations: Mapping[str, float] | None = None,
    store: StateStore | None = None,
    instance_types: Sequence[str] | None = None,
    default_duration_s: float = DEFAULT_DURATION_S,
) -> CostEstimate:
    """What running ``plan`` on AWS Batch would cost, per stage and in total.

    ``spot``: price on spot (default: the workflow's ``aws.spot``). ``durations``: seconds per
    stage name (given by the user); stages not given take the median of earlier runs found in
    ``store``, else ``default_duration_s``. ``instance_types``: the allowed list (default: the
    workflow's ``aws.instance_types``).
    """
    wf = plan.workflow
    use_spot = wf.aws.spot if spot is None else spot
    allowed = list(instance_types if instance_types is not None else wf.aws.instance_types)
    given = dict(durations or {})
    history = history_durations(store, wf.name) if store is not None else {}
    volume = plan_root_volume_gib(plan, allowed)
    stages: list[StageEstimate] = []
    for name in plan.stage_order:
        stage = wf.stage(name)
        if name in given:
            dur = (given[name], "given")
        elif name in history:
            med, n = history[name]
            dur = (med, f"history (median of {n} task{'s' if n != 1 else ''})")
        else:
            dur = (default_duration_s, "default")
        stages.append(_stage_estimate(stage, len(plan.stage_tasks(name)), allowed, use_spot, dur, volume))
    compute = sum(s.usd for s in stages)
    volumes = sum(s.usd_root_volume for s in stages)
    efs_usd = 0.0
    info = table_info()
    assumptions = [
        f"prices: {info.get('region', '?')} list prices of {info.get('date', '?')} "
        f"({'spot, indicative' if use_spot else 'on-demand'}); set CORRAL_PRICES to use your own table",
        "each task runs once (no retries), billed per second; no boot time, S3 or transfer costs",
        "a task pays its share of the instance it lands on (instances hold several tasks when they fit)",
    ]
    if any(s.root_volume_gib for s in stages):
        assumptions.append(
            f"root volumes: {volume} GiB gp3 per instance (what `corral aws setup` makes for this workflow) at "
            f"${GP3_USD_GB_MONTH}/GiB-month prorated over {HOURS_PER_MONTH:g} h, shared like the instance")
    if uses_efs(plan):
        run_hours = sum(s.duration_s for s in stages) / 3600.0  # stages one after another, items side by side
        gib = EFS_GIB_PER_ITEM * max(1, len(plan.items))
        efs_usd = gib * (EFS_USD_GB_MONTH * run_hours / HOURS_PER_MONTH + EFS_USD_WRITE_GB + EFS_USD_READ_GB)
        assumptions.append(
            f"EFS workspace: {EFS_GIB_PER_ITEM:g} GiB per item ({gib:g} GiB), written once and read once (Elastic "
            f"throughput ${EFS_USD_WRITE_GB}/GB written, ${EFS_USD_READ_GB}/GB read) and kept {run_hours:.1f} h "
            f"(the stages' durations end to end) at ${EFS_USD_GB_MONTH}/GB-month Standard: {usd(efs_usd)}")
    total = compute + volumes + efs_usd
    if any((s.instance_type or "").startswith("fargate-") for s in stages):
        assumptions.append(
            f"Fargate stages: their size rounded up to Fargate's, at ${FARGATE_USD_VCPU_HOUR}/vCPU-h + "
            f"${FARGATE_USD_GB_HOUR}/GB-h (+ ${FARGATE_USD_EPHEMERAL_GB_HOUR}/GB-h of disk over 20 GiB), us-east-1 "
            f"Linux/x86 prices used for every region"
            + (f"; Fargate Spot at {FARGATE_SPOT_FACTOR:.0%} of that (indicative)" if use_spot else "")
        )
    if any(s.duration_source == "default" for s in stages):
        assumptions.append(
            f"stages without a given or earlier duration are assumed to take {default_duration_s / 60:g} min "
            "(--duration STAGE=30m to say)"
        )
    return CostEstimate(
        workflow=wf.name, items=len(plan.items), spot=use_spot, region=str(info.get("region", "")),
        prices_date=str(info.get("date", "")), currency=str(info.get("currency", "USD")), stages=stages,
        total_usd=total, per_item_usd=(total / len(plan.items)) if plan.items else None, assumptions=assumptions,
        compute_usd=compute, root_volumes_usd=volumes, efs_usd=efs_usd,
    )


# -- actual cost ------------------------------------------------------------------------------
@dataclass
class AttemptCost:
    task_id: str
    label: str
    stage: str
    item: str
    attempt: int
    state: str
    seconds: float
    instance_type: str | None
    estimated: bool  # the instance type is the estimate's, not one the backend reported
    running: bool  # still going: counted up to now
    usd: float | None  # None: no price known for the instance type


@dataclass
class RunCost:
    run_id: str
    spot: bool
    region: str
    prices_date: str
    attempts: list[AttemptCost]
    per_task: dict[str, float]
    per_item: dict[str, float]
    per_stage: dict[str, float]
    total_usd: float
    estimated_attempts: int  # attempts priced on the estimate's instance type
    unpriced_attempts: int  # attempts whose instance type has no price in the table
    running_attempts: int

    @property
    def per_item_mean(self) -> float | None:
        items = [k for k in self.per_item if k != "run"]
        return sum(self.per_item[k] for k in items) / len(items) if items else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_item_mean"] = self.per_item_mean
        return d


def attempts_of(store: StateStore, run_id: str, tasks: Sequence[TaskRecord], *, per_task_reads: bool = True
                ) -> dict[str, list[AttemptRecord]]:
    """Each task's recorded attempts; a task that ran without attempt records (the AWS backend
    keeps only the task's start/end) gets one attempt made from its task record.

    A store with ``get_run_attempts(run_id)`` is read once; otherwise one ``get_attempts`` per
    task that started, unless ``per_task_reads`` is False (a remote store and a run whose backend
    records no attempts: thousands of queries for nothing).
    """
    bulk = getattr(store, "get_run_attempts", None)
    recorded: dict[str, list[AttemptRecord]] = {}
    if callable(bulk):
        for a in bulk(run_id):
            recorded.setdefault(a.task_id, []).append(a)
    out: dict[str, list[AttemptRecord]] = {}
    for t in tasks:
        if callable(bulk):
            got = sorted(recorded.get(t.task_id, []), key=lambda a: a.attempt)
        elif per_task_reads and (t.attempts or t.started_at):
            got = store.get_attempts(run_id, t.task_id)
        else:
            got = []
        if not got and t.started_at is not None:
            got = [AttemptRecord(
                run_id=run_id, task_id=t.task_id, attempt=max(1, t.attempts),
                state=t.state if t.state != TaskState.SUBMITTED else TaskState.RUNNING,
                exit_code=t.exit_code, reason=t.reason, started_at=t.started_at, ended_at=t.ended_at,
                external_id=t.external_id, instance_type=t.instance_type,
            )]
        out[t.task_id] = got
    return out


def actual_cost(
    plan: Plan,
    tasks: Sequence[TaskRecord],
    attempts: Mapping[str, Sequence[AttemptRecord]],
    *,
    run_id: str = "",
    spot: bool | None = None,
    at: float | None = None,
) -> RunCost:
    """The cost of a run's attempts so far (see the module docstring for the model)."""
    wf = plan.workflow
    use_spot = wf.aws.spot if spot is None else spot
    allowed = list(wf.aws.instance_types)
    t_now = now() if at is None else at
    estimates: dict[str, Placement | None] = {}
    rows: list[AttemptCost] = []
    per_task: dict[str, float] = {}
    per_item: dict[str, float] = {}
    per_stage: dict[str, float] = {s: 0.0 for s in plan.stage_order}
    total = 0.0
    n_est = n_unpriced = n_running = 0
    for t in tasks:
        try:
            stage = wf.stage(t.stage)
        except KeyError:  # a stage renamed since: nothing to price it with
            continue
        for a in attempts.get(t.task_id, []):
            if a.started_at is None:
                continue
            running = a.ended_at is None
            end = t_now if running else a.ended_at
            secs = max(0.0, float(end) - a.started_at)  # type: ignore[arg-type]
            reported = a.instance_type or t.instance_type
            p: Placement | None
            if reported:
                p = placement_on(reported, stage.resources, spot=use_spot)
                estimated = False
            else:
                if t.stage not in estimates:
                    n_stage = sum(1 for x in tasks if x.stage == t.stage)
                    estimates[t.stage] = place(stage.resources, allowed, spot=use_spot, tasks=n_stage)
                p = estimates[t.stage]
                estimated = True
            usd = p.usd_hour * secs / 3600.0 if p is not None else None
            rows.append(AttemptCost(
                task_id=t.task_id, label=t.label, stage=t.stage, item=t.item_key, attempt=a.attempt,
                state=a.state.value, seconds=secs, instance_type=(p.instance.name if p else reported or None),
                estimated=estimated, running=running, usd=usd,
            ))
            n_running += running
            if usd is None:
                n_unpriced += 1
                continue
            n_est += estimated
            per_task[t.task_id] = per_task.get(t.task_id, 0.0) + usd
            per_item[t.item_key] = per_item.get(t.item_key, 0.0) + usd
            per_stage[t.stage] = per_stage.get(t.stage, 0.0) + usd
            total += usd
    info = table_info()
    return RunCost(
        run_id=run_id, spot=use_spot, region=str(info.get("region", "")), prices_date=str(info.get("date", "")),
        attempts=rows, per_task=per_task, per_item=per_item, per_stage=per_stage, total_usd=total,
        estimated_attempts=n_est, unpriced_attempts=n_unpriced, running_attempts=n_running,
    )


def run_cost(store: StateStore, run_id: str, *, spot: bool | None = None, tasks: Sequence[TaskRecord] | None = None
             ) -> RunCost:
    """The actual cost of a recorded run, from the state store alone (no backend call)."""
    from corral.plan import Plan

    run = store.get_run(run_id)
    plan = Plan.from_manifest(store.load_manifest(run_id))
    tasks = list(tasks) if tasks is not None else store.get_tasks(run_id)
    if spot is None:
        spot = bool(run.options.get("aws", {}).get("spot", plan.workflow.aws.spot))
    attempts = attempts_of(store, run_id, tasks, per_task_reads=reads_attempts(run))
    return actual_cost(plan, tasks, attempts, run_id=run_id, spot=spot)


def reads_attempts(run: RunRecord) -> bool:
    """Whether reading attempts task by task is worth it: only where the backend records every
    attempt in the store (others record a task's start/end and external id)."""
    from corral.backends import backend_class
    from corral.errors import UsageError

    try:
        return backend_class(run.backend).records_attempts
    except UsageError:
        return False


def status_cost_line(store: StateStore, run_id: str, tasks: Sequence[TaskRecord] | None = None) -> str | None:
    """``cost_line(run_cost(...))`` for `corral status`, or None when the run cannot be priced
    (its manifest no longer loads, the price table is broken): status must never fail on cost."""
    from corral.errors import CorralError

    try:
        return cost_line(run_cost(store, run_id, tasks=tasks))
    except (CorralError, ValueError, KeyError, TypeError):  # a manifest from another version, say
        return None


# -- text -------------------------------------------------------------------------------------
def usd(value: float | None) -> str:
    """$ amounts: four decimals below a dollar (cents of cents matter per task), two above."""
    if value is None:
        return "-"
    if 0 < abs(value) < 0.00005:
        return "<$0.0001"
    return f"${value:,.4f}" if abs(value) < 1 else f"${value:,.2f}"


def cost_line(cost: RunCost) -> str:
    """One line for `corral status`: the run's cost so far, and how sure it is."""
    bits = [f"cost: {usd(cost.total_usd)}"]
    mean = cost.per_item_mean
    if mean is not None:
        bits.append(f"{usd(mean)} per item")
    notes = []
    if cost.running_attempts:
        notes.append(f"{cost.running_attempts} attempt(s) still running, counted to now")
    if cost.estimated_attempts:
        notes.append(f"{cost.estimated_attempts} attempt(s) priced on the estimated instance type")
    if cost.unpriced_attempts:
        notes.append(f"{cost.unpriced_attempts} attempt(s) on instance types without a price")
    pricing = "spot" if cost.spot else "on-demand"
    return ", ".join(bits) + f" ({pricing}, {cost.region} prices of {cost.prices_date}" + (
        "; " + "; ".join(notes) if notes else "") + ")"
