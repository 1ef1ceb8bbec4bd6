"""Where a stage runs on AWS Batch, decided once: platform, the instance types its environment may
launch, whether a task fits, and how many of its tasks one instance can hold (pure: no boto3).

Provisioning (the root volume), cost (placement and the volume's price) and doctor read it, so
they agree. AWS Batch packs tasks onto an instance by vCPU, memory and GPUs only; it never looks
at disk. ``resources.disk`` is per task, but the root volume is per instance, so corral sizes the
volume to hold every task that can share the *largest* instance the environment may launch
(:func:`scratch_per_instance_gib`) — it does not limit the instance sizes. A stage whose tasks
could overflow even the largest gp3 volume (16 TiB) is refused with the fix (allow only smaller
instance types, or lower ``disk``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from corral.instances import (
    DEFAULT_ROOT_VOLUME_GIB,
    MAX_ROOT_VOLUME_GIB,
    InstanceType,
    allowed_for,
    expand,
    on_fargate,
)

if TYPE_CHECKING:  # pragma: no cover
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


@dataclass(frozen=True)
class Route:
    """One stage's place on AWS Batch."""

    platform: Platform
    entries: tuple[str, ...]  # the instanceTypes entries of its environments (() on Fargate)
    per_largest: int  # tasks of it one instance can hold at most (over the allowed types; 1 when unknown)
    largest: str  # the instance type that holds the most of them ("" on Fargate or when unknown)


def route(resources: Resources, allowed: Sequence[str]) -> Route:
    if on_fargate(resources, list(allowed)):
        return Route("fargate", (), 1, "")
    entries = tuple(allowed_for(resources, list(allowed)))
    best, best_n = "", 0
    for it in expand(list(entries)):
        n = tasks_per_instance(it, resources.vcpus, resources.memory, resources.gpus)
        if n > best_n:
            best, best_n = it.name, n
    return Route("gpu" if resources.gpus > 0 else "ec2", entries, max(1, best_n), best)


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
