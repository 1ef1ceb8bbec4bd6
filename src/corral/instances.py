"""EC2 instance types: what each can hold, what it costs, and whether a stage fits any allowed one.

Pure data and arithmetic, no boto3: the table is ``data/ec2_instances.json``, a dated snapshot
(``region``, ``date`` in its header) of vCPUs, memory, GPUs and hourly prices. Prices move; point
``CORRAL_PRICES`` at a file of the same shape to use your own.

``allowed`` lists are what a Batch compute environment's ``instanceTypes`` accept: exact names
(``c5.2xlarge``), family names (``m5``), or ``optimal`` / ``default_x86_64`` / ``default_arm64``,
which AWS Batch expands to instance families itself. Since November 2025 ``optimal`` means the
same as ``default_x86_64`` (m6i, c6i, r6i, c7i); before that it meant c4/m4/r4/c5/m5/r5.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources as importlib_resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.errors import PlanError

if TYPE_CHECKING:  # pragma: no cover
    from corral.spec import Resources

# What AWS Batch launches for its keyword instance types (see the module docstring).
BUNDLES: dict[str, tuple[str, ...]] = {
    "optimal": ("m6i", "c6i", "r6i", "c7i"),
    "default_x86_64": ("m6i", "c6i", "r6i", "c7i"),
    "default_arm64": ("m6g", "c6g", "r6g", "c7g"),
}
# NVIDIA GPU families that the ECS GPU-optimized AMI (ECS_AL2023_NVIDIA) supports, widely available;
# used for GPU compute environments when the settings name no GPU family themselves.
DEFAULT_GPU_FAMILIES: tuple[str, ...] = ("g4dn", "g5", "g6")

# The root volume of a Batch-launched ECS instance when no launch template sizes it (GiB).
DEFAULT_ROOT_VOLUME_GIB = 30
# gp3's largest volume: the most scratch a single root volume can give.
MAX_ROOT_VOLUME_GIB = 16 * 1024


def ecs_reserved_mib(memory_mib: int) -> int:
    """Memory the OS, Docker and the ECS agent keep for themselves, which jobs cannot have.

    ECS registers less memory than the instance type's nominal size; AWS Batch's own guidance
    is to ask a few hundred MiB below it. corral keeps 6% or 256 MiB, whichever is larger.
    """
    return max(256, math.ceil(memory_mib * 0.06))


@dataclass(frozen=True)
class InstanceType:
    name: str
    vcpus: float  # whole for EC2 types; Fargate sizes (fargate_instance) may be 0.25 or 0.5
    memory_mib: int
    gpus: int
    gpu_model: str
    on_demand_usd_hour: float
    spot_usd_hour: float
    family: str
    arch: str = "x86_64"

    @property
    def usable_memory_mib(self) -> int:
        return self.memory_mib - ecs_reserved_mib(self.memory_mib)

    def holds(self, vcpus: float, memory_mib: int, gpus: int = 0) -> bool:
        return vcpus <= self.vcpus and memory_mib <= self.usable_memory_mib and gpus <= self.gpus

    def describe(self) -> str:
        gpu = f", {self.gpus}× {self.gpu_model or 'GPU'}" if self.gpus else ""
        return f"{self.name} ({self.vcpus} vCPUs, {self.usable_memory_mib} MiB usable{gpu})"


def _prices_path() -> str:
    return os.environ.get("CORRAL_PRICES", "")


def load_instance_types() -> dict[str, InstanceType]:
    """The instance table: the bundled snapshot, or the file named by ``CORRAL_PRICES``."""
    return dict(_load(_prices_path()))


def table_info() -> dict[str, Any]:
    """The table's header (region, date, currency, source)."""
    doc = _read(_prices_path())
    return {k: v for k, v in doc.items() if k != "instances"}


def _read(path: str) -> dict[str, Any]:
    try:
        if path:
            text = Path(path).read_text()
        else:
            text = importlib_resources.files("corral").joinpath("data/ec2_instances.json").read_text()
        doc = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(
            f"cannot read the instance price table {path + ' (CORRAL_PRICES)' if path else 'data/ec2_instances.json'}:"
            f" {exc.__class__.__name__}: {exc}",
            "fix or unset CORRAL_PRICES (a JSON file shaped like corral's data/ec2_instances.json)",
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), dict):
        raise PlanError(
            f"the instance table {path or 'data/ec2_instances.json'} has no `instances` mapping",
            "fix or unset CORRAL_PRICES",
        )
    return doc


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[tuple[str, InstanceType], ...]:
    doc = _read(path)
    fields = doc.get("fields") or [
        "vcpus", "memory_mib", "gpus", "gpu_model", "on_demand_usd_hour", "spot_usd_hour", "arch",
    ]
    out: list[tuple[str, InstanceType]] = []
    for name, row in doc["instances"].items():
        rec: dict[str, Any] = dict(zip(fields, row, strict=False)) if isinstance(row, list) else dict(row)
        try:
            it = InstanceType(
                name=name,
                vcpus=int(rec["vcpus"]),
                memory_mib=int(rec["memory_mib"]),
                gpus=int(rec.get("gpus", 0)),
                gpu_model=str(rec.get("gpu_model", "")),
                on_demand_usd_hour=float(rec.get("on_demand_usd_hour", 0.0)),
                spot_usd_hour=float(rec.get("spot_usd_hour", rec.get("on_demand_usd_hour", 0.0))),
                family=name.split(".", 1)[0],
                arch=str(rec.get("arch", "x86_64")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(
                f"instance table entry {name!r} is malformed ({exc})", "fix or unset CORRAL_PRICES"
            ) from None
        out.append((name, it))
    return tuple(out)


def is_gpu_entry(entry: str, table: dict[str, InstanceType] | None = None) -> bool:
    """Does an ``instanceTypes`` entry (name, family or keyword) launch GPU instances?"""
    table = table if table is not None else load_instance_types()
    if entry in BUNDLES:
        return False
    return any(t.gpus > 0 for t in _expand_one(entry, table))


def _expand_one(entry: str, table: dict[str, InstanceType]) -> list[InstanceType]:
    if entry in table:
        return [table[entry]]
    families = BUNDLES.get(entry, (entry,))
    return [t for t in table.values() if t.family in families]


def expand(allowed: list[str]) -> list[InstanceType]:
    """The instance types an ``instanceTypes`` list may launch, smallest first.

    Unknown names expand to nothing (the table is a snapshot; AWS may know newer types).
    """
    table = load_instance_types()
    seen: dict[str, InstanceType] = {}
    for entry in allowed or ["optimal"]:
        for t in _expand_one(entry.strip(), table):
            seen[t.name] = t
    return sorted(seen.values(), key=lambda t: (t.vcpus, t.memory_mib, t.gpus, t.name))


def fitting(resources: Resources, allowed: list[str]) -> list[InstanceType]:
    """Allowed instance types that can hold one task of ``resources``, cheapest first."""
    return sorted(
        (t for t in expand(allowed) if t.holds(resources.vcpus, resources.memory, resources.gpus)),
        key=lambda t: (t.on_demand_usd_hour, t.vcpus, t.name),
    )


def split_allowed(allowed: list[str]) -> tuple[list[str], list[str]]:
    """(CPU entries, GPU entries) of an ``instanceTypes`` list; defaults fill an empty side.

    ``fargate`` is not an instance type (it asks for Fargate environments besides EC2 ones) and
    is left out of both."""
    table = load_instance_types()
    entries = [e for e in allowed if not is_fargate_entry(e)]
    cpu = [e for e in entries if not is_gpu_entry(e, table)]
    gpu = [e for e in entries if is_gpu_entry(e, table)]
    return (cpu or ["optimal"]), (gpu or list(DEFAULT_GPU_FAMILIES))


# -- Fargate --------------------------------------------------------------------------------------
# The vCPU/memory pairs AWS Batch on Fargate accepts: vCPUs → (lowest MiB, highest MiB, step MiB).
FARGATE_SIZES: dict[float, tuple[int, int, int]] = {
    0.25: (512, 2048, 512),  # 512, 1024 and 2048 only
    0.5: (1024, 4096, 1024),
    1: (2048, 8192, 1024),
    2: (4096, 16384, 1024),
    4: (8192, 30720, 1024),
    8: (16384, 61440, 4096),
    16: (32768, 122880, 8192),
}
FARGATE_MAX_EPHEMERAL_GIB = 200  # Fargate's ephemeral storage (job definition ephemeralStorage)


def is_fargate_entry(entry: str) -> bool:
    return entry.strip().lower() == "fargate"


def wants_fargate(allowed: list[str]) -> bool:
    """``aws.instance_types`` asks for Fargate (the ``fargate`` keyword) beside EC2."""
    return any(is_fargate_entry(e) for e in allowed)


def _fargate_memories(vcpus: float) -> list[int]:
    low, high, step = FARGATE_SIZES[vcpus]
    if vcpus == 0.25:
        return [512, 1024, 2048]
    return list(range(low, high + 1, step))


def fargate_size(resources: Resources) -> tuple[float, int] | None:
    """The smallest Fargate (vCPUs, MiB) pair that holds a task, or None when Fargate cannot
    run it (GPUs, more than 16 vCPUs / 120 GiB, or more disk than Fargate's ephemeral storage)."""
    if resources.gpus:
        return None
    if resources.disk is not None and resources.disk > FARGATE_MAX_EPHEMERAL_GIB:
        return None
    for vcpus in sorted(FARGATE_SIZES):
        if vcpus < resources.vcpus:
            continue
        for mib in _fargate_memories(vcpus):
            if mib >= resources.memory:
                return vcpus, mib
    return None


def fargate_only(allowed: list[str]) -> bool:
    """``aws.instance_types`` is only ``fargate``: every stage must fit Fargate."""
    return wants_fargate(allowed) and all(is_fargate_entry(e) for e in allowed)


def on_fargate(resources: Resources, allowed: list[str]) -> bool:
    """Is a task of these resources routed to the Fargate queue? Yes when the workflow asks for
    Fargate (``fargate`` in ``aws.instance_types``) and the task fits it (:func:`fargate_size`)."""
    return wants_fargate(allowed) and fargate_size(resources) is not None


# Fargate prices (Linux/x86, us-east-1, on-demand), per second with a one-minute minimum; the
# source is https://aws.amazon.com/fargate/pricing/ (figures of 2024-2026, unchanged since 2019's
# cut). Other regions cost up to ~30% more; corral uses these everywhere (stated in estimates).
FARGATE_USD_VCPU_HOUR = 0.04048
FARGATE_USD_GB_HOUR = 0.004445
FARGATE_USD_EPHEMERAL_GB_HOUR = 0.000111  # storage beyond the 20 GiB every task gets free
FARGATE_FREE_EPHEMERAL_GIB = 20
# Fargate Spot's price moves with spare capacity (AWS: "up to 70% off"); corral assumes 30% of
# the on-demand rate for vCPU and memory (indicative, like the EC2 spot prices).
FARGATE_SPOT_FACTOR = 0.30


def fargate_usd_hour(resources: Resources, *, spot: bool = False) -> float | None:
    """The hourly price of one task of ``resources`` on Fargate (its rounded-up size), or None
    when Fargate cannot run it."""
    size = fargate_size(resources)
    if size is None:
        return None
    vcpus, mib = size
    compute = vcpus * FARGATE_USD_VCPU_HOUR + mib / 1024 * FARGATE_USD_GB_HOUR
    if spot:
        compute *= FARGATE_SPOT_FACTOR
    extra_disk = max(0, (resources.disk or 0) - FARGATE_FREE_EPHEMERAL_GIB)
    return compute + extra_disk * FARGATE_USD_EPHEMERAL_GB_HOUR


def fargate_instance(resources: Resources) -> InstanceType | None:
    """A Fargate task size as a pseudo instance type (for cost placements): ``fargate-<v>cpu-<GB>gb``
    holding exactly one task, priced per vCPU- and GB-hour (:func:`fargate_usd_hour`)."""
    size = fargate_size(resources)
    if size is None:
        return None
    vcpus, mib = size
    return InstanceType(
        name=f"fargate-{vcpus:g}cpu-{mib / 1024:g}gb", vcpus=vcpus, memory_mib=mib, gpus=0, gpu_model="",
        on_demand_usd_hour=fargate_usd_hour(resources) or 0.0,
        spot_usd_hour=fargate_usd_hour(resources, spot=True) or 0.0, family="fargate",
    )


def _fargate_field(r: Resources) -> str:
    """The resources field that keeps a task off Fargate (for error locations)."""
    if r.gpus:
        return "gpus"
    if r.disk is not None and r.disk > FARGATE_MAX_EPHEMERAL_GIB:
        return "disk"
    return "vcpus" if r.vcpus > max(FARGATE_SIZES) else "memory"


def _fargate_misfit(r: Resources) -> str:
    """Why a task does not fit Fargate, as ``asks for …, which Fargate …``."""
    field = _fargate_field(r)
    if field == "gpus":
        return f"asks for resources.gpus: {r.gpus}; Fargate has no GPUs"
    if field == "disk":
        return f"asks for resources.disk: {r.disk} GiB; Fargate gives at most {FARGATE_MAX_EPHEMERAL_GIB} GiB"
    if field == "vcpus":
        return f"asks for resources.vcpus: {r.vcpus:g}; Fargate gives at most {max(FARGATE_SIZES):g} vCPUs"
    top = FARGATE_SIZES[max(FARGATE_SIZES)][1]
    return (f"asks for resources.memory: {r.memory} MiB with {r.vcpus:g} vCPUs; Fargate gives at most "
            f"{top} MiB ({top // 1024} GiB)")


def allowed_for(resources: Resources, allowed: list[str]) -> list[str]:
    """The entries of ``allowed`` a task of these resources is routed to (GPU or CPU environment)."""
    cpu, gpu = split_allowed(allowed)
    return gpu if resources.gpus > 0 else cpu
