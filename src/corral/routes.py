"""Where a stage runs on AWS Batch, decided once (pure: no boto3): :func:`route` gives each stage's
:class:`Route` — its platform and queue, the ``resourceRequirements`` Batch gets, the instance types
its environment may launch, whether a task fits and why not, and how many of its tasks one
instance holds. Provisioning (which environments, the root volume), payloads (the job
definition's requirements), submission (the queue), cost (placement, the volume's price) and
doctor (fit findings) all read it, so they agree; :func:`holds` is the one fit rule, which doctor
also applies to the instance types a compute environment really has.

AWS Batch packs tasks onto an instance by the vCPU, memory and GPU *requirements* it is given
(whole vCPUs on EC2: the job definition's VCPU is rounded up), never by disk. ``resources.disk``
is per task, but the root volume is per instance, so corral sizes the volume to hold every task
that can share the *largest* instance the environment may launch
(:func:`scratch_per_instance_gib`) — it does not limit the instance sizes. A stage whose tasks
could overflow even the largest gp3 volume (16 TiB) is refused with the fix (allow only smaller
instance types, or lower ``disk``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, cast

from corral.errors import PlanError
from corral.instances import (
    DEFAULT_ROOT_VOLUME_GIB,
    MAX_ROOT_VOLUME_GIB,
    InstanceType,
    _fargate_field,
    _fargate_misfit,
    allowed_for,
    ecs_reserved_mib,
    expand,
    fargate_only,
    fargate_size,
    on_fargate,
)

if TYPE_CHECKING:  # pragma: no cover
    from corral.plan import Plan
    from corral.spec import Resources

IMAGE_ROOM_GIB = 30  # room on the root volume for the OS, Docker and images, beside the scratch
DISK_STEP_GIB = 50  # root volumes are rounded up to this, so similar workflows share a template version

Platform = Literal["ec2", "gpu", "fargate"]


def tasks_per_instance(it: InstanceType, vcpus: float, memory_mib: int, gpus: int = 0) -> int:
    """How many tasks of this size AWS Batch can place side by side on ``it`` (0: none fits)."""
    if not it.holds(vcpus, memory_mib, gpus):
        return 0
    fits = [math.floor(it.vcpus / vcpus + 1e-9), it.usable_memory_mib // max(1, memory_mib)]
    if gpus:
        fits.append(it.gpus // gpus)
    return max(1, min(fits))


def ec2_vcpus(vcpus: float) -> float:
    """The VCPU requirement corral gives a task on EC2: whole vCPUs, at least 1 (Batch API
    reference, ResourceRequirement: "at least one vCPU" on EC2; fractional values are Fargate's
    sizes, and the job definition's legacy ``vcpus`` is an integer). Batch packs tasks by what
    they ask for, so placement, cost and disk sizing count this, not ``resources.vcpus``."""
    return float(max(1, math.ceil(vcpus)))


def holds(entries: Sequence[str], vcpus: float, memory_mib: int, gpus: int = 0) -> tuple[bool, bool]:
    """The fit rule: (some instance type ``entries`` may launch holds one task of this size, corral's
    table knows any of them). Unknown names are AWS's to judge: not held, not known."""
    types = expand(list(entries))
    return any(t.holds(vcpus, memory_mib, gpus) for t in types), bool(types)


@dataclass(frozen=True)
class Route:
    """One stage's place on AWS Batch (see the module docstring)."""

    platform: Platform
    entries: tuple[str, ...]  # the instanceTypes entries of its environments (() on Fargate)
    per_largest: int  # tasks of it one instance can hold at most (over the allowed types; 1 when unknown)
    largest: str  # the instance type that holds the most of them ("" on Fargate or when unknown)
    # what Batch is asked for (resourceRequirements): Fargate's rounded-up pair, whole vCPUs on EC2
    vcpus: float = 1
    memory_mib: int = 2048
    gpus: int = 0
    fits: bool = True  # some allowed instance type (or Fargate) holds a task; also True when unknown
    known: bool = True  # corral's table knows the entries (else AWS judges the fit)

    @property
    def queue(self) -> Literal["default", "gpu", "fargate"]:
        """Which of the run's queues its jobs go to (``submit.Queues.for_route``)."""
        return "fargate" if self.platform == "fargate" else "gpu" if self.platform == "gpu" else "default"

    @property
    def fargate(self) -> bool:
        return self.platform == "fargate"

    def requirements(self) -> list[dict[str, str]]:
        """The job definition's ``resourceRequirements``."""
        return _requirements(self.vcpus, self.memory_mib, self.gpus)


def _requirements(vcpus: float, memory_mib: int, gpus: int) -> list[dict[str, str]]:
    out = [{"type": "VCPU", "value": f"{vcpus:g}"}, {"type": "MEMORY", "value": str(memory_mib)}]
    if gpus:
        out.append({"type": "GPU", "value": str(gpus)})
    return out


def asked(resources: Resources, *, fargate: bool) -> tuple[float, int, int] | None:
    """(vCPUs, MiB, GPUs) Batch is asked for: on Fargate the smallest valid pair that holds the task
    (None: Fargate cannot run it), on EC2 whole vCPUs (:func:`ec2_vcpus`)."""
    if fargate:
        size = fargate_size(resources)
        return None if size is None else (size[0], size[1], 0)
    return ec2_vcpus(resources.vcpus), int(resources.memory), int(resources.gpus)


def requirements_for(resources: Resources, *, fargate: bool) -> list[dict[str, str]] | None:
    """The ``resourceRequirements`` of a job definition on Fargate or EC2 (None: not on Fargate)."""
    size = asked(resources, fargate=fargate)
    return None if size is None else _requirements(*size)


def route(resources: Resources, allowed: Sequence[str]) -> Route:
    """The route of a task of ``resources`` when ``aws.instance_types`` is ``allowed`` (computed once
    per size and list: every caller gets the same object)."""
    return _route(resources.vcpus, int(resources.memory), resources.gpus, resources.disk, tuple(allowed))


@dataclass(frozen=True)
class _Size:
    """The fields of ``spec.Resources`` a route depends on (routes stays below spec)."""

    vcpus: float
    memory: int
    gpus: int
    disk: Any


@lru_cache(maxsize=4096)
def _route(vcpus: float, memory: int, gpus: int, disk: Any, allowed: tuple[str, ...]) -> Route:
    resources = cast("Resources", _Size(vcpus, memory, gpus, disk))
    if on_fargate(resources, list(allowed)):
        size = asked(resources, fargate=True)
        assert size is not None  # on_fargate: it fits
        return Route("fargate", (), 1, "", vcpus=size[0], memory_mib=size[1])
    entries = tuple(allowed_for(resources, list(allowed)))
    v, mib, g = asked(resources, fargate=False) or (ec2_vcpus(vcpus), memory, gpus)
    best, best_n = "", 0
    for it in expand(list(entries)):
        n = tasks_per_instance(it, v, mib, g)
        if n > best_n:
            best, best_n = it.name, n
    held, known = holds(entries, v, mib, g)
    return Route("gpu" if g > 0 else "ec2", entries, max(1, best_n), best, vcpus=v, memory_mib=mib, gpus=g,
                 fits=held or not known, known=known)


def _largest(types: list[InstanceType]) -> str:
    if not types:
        return "none known"
    by_cpu = max(types, key=lambda t: (t.vcpus, t.memory_mib))
    by_mem = max(types, key=lambda t: (t.memory_mib, t.vcpus))
    by_gpu = max(types, key=lambda t: (t.gpus, t.memory_mib))
    parts = [by_cpu.describe()]
    if by_mem.name != by_cpu.name:
        parts.append(by_mem.describe())
    if by_gpu.gpus and by_gpu.name not in (by_cpu.name, by_mem.name):
        parts.append(by_gpu.describe())
    return "; ".join(parts)


def check_fits(plan: Plan, allowed: list[str]) -> None:
    """Refuse, before anything is submitted, a stage whose route does not fit.

    GPU stages are checked against the GPU entries of ``allowed`` (or the default GPU families),
    others against its CPU entries (or ``optimal``), as the AWS backend routes them. The error
    names the stage, the file:line of its resources, and the largest instance allowed. With
    ``fargate`` in ``allowed``, a stage that fits Fargate runs there (nothing more to check); when
    ``allowed`` is only ``fargate``, a stage that does not fit Fargate is refused.
    """
    wf = plan.workflow
    seen: set[str] = set()
    only_fargate = fargate_only(allowed)
    for stage in wf.stages:
        if stage.name in seen:
            continue
        seen.add(stage.name)
        r = stage.resources
        rt = route(r, allowed)
        if rt.fargate:
            continue
        if only_fargate:
            raise PlanError(f"stage {stage.name!r} {_fargate_misfit(r)}; aws.instance_types is only `fargate`",
                            "lower the stage's resources to fit Fargate, or add EC2 instance types to "
                            "aws.instance_types (e.g. [optimal, fargate]) so it runs on EC2",
                            where=wf.stage_where(stage.name, "resources", _fargate_field(r)))
        if r.disk is not None and r.disk > MAX_ROOT_VOLUME_GIB:
            raise PlanError(
                f"stage {stage.name!r} asks for {r.disk} GiB of disk; the largest root volume (gp3) is "
                f"{MAX_ROOT_VOLUME_GIB} GiB",
                "lower resources.disk, or stream data from S3/EFS instead of staging it on local disk",
                where=wf.stage_where(stage.name, "resources"),
            )
        if rt.fits:
            continue  # (also when only names the snapshot does not know: AWS will judge them)
        types = expand(list(rt.entries))
        ask = f"{r.vcpus:g} vCPUs, {r.memory} MiB" + (f", {r.gpus} GPUs" if r.gpus else "")
        pool = "GPU instance type" if r.gpus else "instance type"
        if r.gpus and not any(t.gpus >= r.gpus for t in types):
            hint = (f"ask for at most {max(t.gpus for t in types)} GPUs, or allow larger GPU families "
                    "in aws.instance_types (e.g. p4d, p5)")
        else:
            hint = ("lower resources (vcpus/memory), or allow larger instance types in aws.instance_types; "
                    f"ECS keeps {ecs_reserved_mib(max(t.memory_mib for t in types))} MiB or more of each "
                    "instance's memory for itself")
        raise PlanError(
            f"stage {stage.name!r} asks for {ask}, more than any allowed {pool} can hold "
            f"({', '.join(rt.entries)}); the largest: {_largest(types)}",
            hint,
            where=wf.stage_where(stage.name, "resources"),
        )


@dataclass(frozen=True)
class DiskNeed:
    """One EC2 stage's scratch: ``disk`` GiB per task, ``tasks`` tasks, ``per_largest`` per instance."""

    stage: str
    platform: Platform
    disk_gib: int
    tasks: int
    per_largest: int
    largest: str


def disk_needs(stages: Iterable[tuple[str, Resources, int]], allowed: Sequence[str]) -> list[DiskNeed]:
    """(name, resources, number of tasks) of stages → the scratch of those that run on instances."""
    out = []
    for name, r, n in stages:
        if not r.disk:
            continue
        rt = route(r, allowed)
        if rt.platform == "fargate":
            continue  # Fargate's ephemeral storage is per task
        out.append(DiskNeed(name, rt.platform, int(r.disk), n, rt.per_largest, rt.largest))
    return out


def scratch_per_instance_gib(needs: Sequence[DiskNeed]) -> int | None:
    """The scratch one instance must hold so that no mix of tasks Batch may put on it overflows.

    Per platform (CPU and GPU stages never share an instance): a stage contributes at most
    ``disk × min(per_largest, tasks)``, and any mix fills at most one instance, so the need is
    ``min(Σ disk·min(per_largest, tasks), max disk·per_largest)``; the volume is the larger
    platform's need. None: no stage asks for disk.
    """
    best = 0
    for platform in ("ec2", "gpu"):
        mine = [d for d in needs if d.platform == platform]
        if not mine:
            continue
        summed = sum(d.disk_gib * min(d.per_largest, max(1, d.tasks)) for d in mine)
        single = max(d.disk_gib * d.per_largest for d in mine)
        best = max(best, min(summed, single))
    return best or None


def root_volume_gib(scratch_gib: int | None) -> int | None:
    """The root volume (GiB) for this much scratch per instance, or None when the default one is enough.
    Raises ``ValueError`` when no gp3 volume is that large."""
    if not scratch_gib or scratch_gib + IMAGE_ROOM_GIB <= DEFAULT_ROOT_VOLUME_GIB:
        return None
    if scratch_gib + IMAGE_ROOM_GIB > MAX_ROOT_VOLUME_GIB:
        raise ValueError(scratch_gib)
    return min(int(math.ceil((scratch_gib + IMAGE_ROOM_GIB) / DISK_STEP_GIB) * DISK_STEP_GIB), MAX_ROOT_VOLUME_GIB)


def too_much_scratch(needs: Sequence[DiskNeed]) -> str | None:
    """Why no root volume can hold the scratch (the worst stage named), or None when one can."""
    scratch = scratch_per_instance_gib(needs)
    if not scratch or scratch + IMAGE_ROOM_GIB <= MAX_ROOT_VOLUME_GIB:
        return None
    worst = max(needs, key=lambda d: d.disk_gib * d.per_largest)
    return (f"stage {worst.stage!r} asks for {worst.disk_gib} GiB of disk per task and up to {worst.per_largest} "
            f"of its tasks can share one {worst.largest or 'instance'}: {scratch} GiB of scratch per instance, more "
            f"than a root volume's {MAX_ROOT_VOLUME_GIB} GiB (with {IMAGE_ROOM_GIB} GiB kept for images)")
