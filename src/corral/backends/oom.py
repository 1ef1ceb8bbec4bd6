"""Out-of-memory kills, one meaning on every backend: how they are named, and how much memory the next attempt gets.

Every backend records a task killed for memory with the reason ``out of memory (limit X)``
(:func:`reason`), whatever told it so: locally the cgroup's ``oom_kill`` count (or the RSS
sampler), on Slurm the job's ``OUT_OF_MEMORY`` state or the kernel's exit 137 under the job's
cgroup, on AWS Batch the ``OutOfMemoryError: Container killed due to memory usage`` status
reason.

``resources.retry_memory`` makes the attempt after such a kill ask for more (:func:`next_memory`):

- ``2x``: the memory of the killed attempt times the factor (rounded up to whole MiB);
- ``[8GiB, 16GiB]``: the first size larger than the killed attempt's;

never more than the ``bound`` the backend can give one task (the machine locally, the partition's
largest node on Slurm, the largest allowed instance type on AWS). An attempt killed *at* the bound
(or past the list's last size) is not retried: the same memory would fail the same way, so the
task ends FAILED with a reason that says why. Without ``retry_memory`` an out-of-memory kill is a
failure like any other, retried with the same memory while ``retries`` allow.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from corral.units import format_size_mib

if TYPE_CHECKING:  # `corral status` imports this module and needs no workflow models
    from corral.spec import Resources

PREFIX = "out of memory"
_LIMIT_RE = re.compile(r"out of memory \(limit (\d+(?:\.\d+)?)(MiB|GiB)")
# The exit code of a process killed with SIGKILL as shells and container runtimes report it (128 + 9).
EXIT_KILLED = 137


def reason(limit_mib: int, detail: str = "") -> str:
    """``out of memory (limit 100MiB)``, with what told so after a colon when given."""
    return f"{PREFIX} (limit {format_size_mib(limit_mib)})" + (f": {detail}" if detail else "")


def is_oom(text: str) -> bool:
    """A task's or attempt's reason says it was killed for memory (also ``retrying after: ...``)."""
    return PREFIX in text


def limit_of(text: str) -> int | None:
    """The limit (MiB) an out-of-memory reason names, or None."""
    m = _LIMIT_RE.search(text)
    if m is None:
        return None
    value = float(m.group(1))
    return int(round(value * 1024 if m.group(2) == "GiB" else value))


def next_memory(resources: Resources, killed_at_mib: int, bound_mib: int | None) -> int | None:
    """The memory (MiB) of the attempt after one killed for memory at ``killed_at_mib``; None when
    there is none to give: ``retry_memory`` is not set (the caller retries with the same memory
    as for any failure — see :func:`grows`), or the attempt already had the bound or the list's
    last size."""
    grow = resources.retry_memory
    if grow is None:
        return None
    if isinstance(grow, float):
        want = math.ceil(killed_at_mib * grow)
    else:
        want = next((size for size in grow if size > killed_at_mib), 0)
        if not want:
            return None
    if bound_mib is not None:
        want = min(want, bound_mib)
    return want if want > killed_at_mib else None


def grows(resources: Resources) -> bool:
    return resources.retry_memory is not None


def final_reason(resources: Resources, killed_at_mib: int, bound_mib: int | None, where: str) -> str:
    """The reason of an out-of-memory kill that is not retried (``retry_memory`` set, no more to give)."""
    grow = resources.retry_memory
    if isinstance(grow, list) and killed_at_mib >= grow[-1]:
        why = "the last size of retry_memory"
    else:
        why = f"the most {where} gives one task" if bound_mib is not None else "the most it can have"
    return reason(killed_at_mib, f"not retried: it already had {why}")


# For the wrappers that run a task's tries inside one job (Slurm, AWS Batch): `_c_ooms` prints
# how many processes the kernel has killed for memory in the job's own memory cgroup (cgroup v1
# memory.oom_control or v2 memory.events, `oom_kill`), 0 when it cannot tell. A try that exits 137
# while that count grew was killed for memory. $CORRAL_OOM_EVENTS names the file where the
# cgroup is mounted elsewhere (and is the seam the tests use on a cluster that enforces no memory).
OOM_COUNTER_SH = r"""_c_of=${CORRAL_OOM_EVENTS:-}
if [ -z "$_c_of" ]; then
  _c_cg=$(sed -n 's/^[0-9]*:[^:]*memory[^:]*:\(.*\)$/\1/p' /proc/self/cgroup 2>/dev/null | head -n 1) || _c_cg=
  _c_c2=$(sed -n 's/^0::\(.*\)$/\1/p' /proc/self/cgroup 2>/dev/null | head -n 1) || _c_c2=
  for _c_f in "/sys/fs/cgroup/memory${_c_cg:-/-}/memory.oom_control" "/sys/fs/cgroup${_c_c2:-/-}/memory.events" \
      /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events; do
    if [ -r "$_c_f" ]; then _c_of=$_c_f; break; fi
  done
fi
_c_ooms() {
  _c_x=
  if [ -n "$_c_of" ]; then _c_x=$(sed -n 's/^oom_kill \([0-9][0-9]*\)$/\1/p' "$_c_of" 2>/dev/null | head -n 1) || _c_x=; fi
  echo "${_c_x:-0}"
}
"""
