"""A hard memory limit for one local task, where the kernel offers one; the RSS sampler where not.

Which mechanism a machine gets (:func:`detect`), in this order:

1. **cgroup v2** ``memory.max`` (and ``memory.swap.max`` 0): when the cgroup corral runs in (or
   ``$CORRAL_CGROUP``, a folder corral may create cgroups in) has ``memory`` in its
   ``cgroup.subtree_control`` and is writable — a delegated subtree.
2. **cgroup v1** ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` where swap
   accounting exists): a child of corral's own memory cgroup (or of ``$CORRAL_CGROUP``) when it is
   writable (root, or a delegated folder).
3. Otherwise the **RSS sampler**: the scheduler sums the resident memory of the task's process
   group every :data:`SAMPLE_S` seconds and kills the group past the limit. It is soft: a burst that
   allocates and touches more than the limit between two samples gets through.

With a cgroup the kernel enforces the limit on the task and all its descendants (also those that
leave its session): an allocation past it is the kernel's OOM kill of the task's process
(``SIGKILL``, exit 137), counted in ``memory.events``/``memory.oom_control`` as ``oom_kill``, which
is how the kill is recognised. The task's process joins its cgroup before it executes the command
(a ``/bin/sh`` one-liner writes its own pid to ``cgroup.procs``, then ``exec``\\s), so nothing runs
unlimited. Each cgroup is named ``corral-<run id>-<task id>-<attempt>`` and listed in
``$CORRAL_HOME/cgroups/<run id>/``: it is removed when the attempt ends (its remaining processes killed
first), and :func:`sweep` — run by ``resume`` and ``doctor`` — removes those a killed scheduler left.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SAMPLE_S = 0.2  # the RSS sampler's period (where no cgroup can be made)
_JOIN = 'echo $$ > "$0" || { echo "corral: cannot join the memory cgroup $0" >&2; exit 125; }; exec "$@"'


@dataclass(frozen=True)
class Limiter:
    """How this machine limits a task's memory: ``cgroup2``, ``cgroup1`` or ``sampler``."""

    kind: str
    parent: Path | None = None  # where task cgroups are made
    memsw: bool = False  # cgroup v1 with swap accounting (memory.memsw.*)

    @property
    def hard(self) -> bool:
        return self.kind != "sampler"

    def describe(self) -> str:
        if self.kind == "cgroup2":
            return f"cgroup v2 memory.max under {self.parent}"
        if self.kind == "cgroup1":
            return f"cgroup v1 memory.limit_in_bytes under {self.parent}"
        return f"no cgroup corral may create here: resident memory sampled every {SAMPLE_S:g}s (a faster burst gets through)"


@dataclass
class TaskCgroup:
    """One attempt's cgroup."""

    path: Path
    kind: str
    limit_mib: int
    marker: Path | None = None  # its entry in $CORRAL_HOME/cgroups

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv``, started so that its process joins the cgroup before the command runs."""
        return ["/bin/sh", "-c", _JOIN, str(self.path / "cgroup.procs"), *argv]

    def oom_killed(self) -> bool:
        """The kernel killed a process of this cgroup for memory."""
        return _oom_kills(self.path, self.kind) > 0

    def peak_mib(self) -> int | None:
        name = "memory.peak" if self.kind == "cgroup2" else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text().split()[0]) // 2**20
        except (OSError, ValueError, IndexError):
            return None

    def remove(self) -> bool:
        """Kill what is left in the cgroup and remove it (and its marker); True when gone."""
        gone = remove_cgroup(self.path)
        if gone and self.marker is not None:
            with contextlib.suppress(OSError):
                self.marker.unlink()
        return gone


def _oom_kills(path: Path, kind: str) -> int:
    name = "memory.events" if kind == "cgroup2" else "memory.oom_control"
    try:
        for line in (path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    if kind == "cgroup1":  # kernels before 4.13 have no oom_kill line: the limit was hit
        with contextlib.suppress(OSError, ValueError):
            return int((path / "memory.failcnt").read_text())
    return 0


def _mounts() -> dict[str, Path]:
    """cgroup mount points: ``"2"`` -> the cgroup2 mount, ``"memory"`` -> the v1 memory mount."""
    out: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        fstype, options = rfields[0], rfields[2].split(",")
        if fstype == "cgroup2":
            out.setdefault("2", Path(fields[4]))
        elif fstype == "cgroup" and "memory" in options:
            out.setdefault("memory", Path(fields[4]))
    return out


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup paths: ``"2"`` -> its v2 path, ``"memory"`` -> its v1 memory path."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            out["2"] = path
        elif "memory" in controllers.split(","):
            out["memory"] = path
    return out


def _writable_dir(p: Path) -> bool:
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def _v2_usable(p: Path) -> bool:
    try:
        return "memory" in (p / "cgroup.subtree_control").read_text().split() and _writable_dir(p)
    except OSError:
        return False


def detect(env: Mapping[str, str] | None = None) -> Limiter:
    """The best mechanism this machine offers corral (see the module docstring)."""
    mounts, own = _mounts(), _own_cgroups()
    chosen = (os.environ if env is None else env).get("CORRAL_CGROUP", "").strip()
    if chosen:
        p = Path(chosen)
        if (p / "cgroup.subtree_control").exists():
            return Limiter("cgroup2", p) if _v2_usable(p) else Limiter("sampler")
        if (p / "memory.limit_in_bytes").exists() and _writable_dir(p):
            return Limiter("cgroup1", p, memsw=(p / "memory.memsw.limit_in_bytes").exists())
        return Limiter("sampler")
    if "2" in mounts and "2" in own:
        p = mounts["2"] / own["2"].lstrip("/")
        if _v2_usable(p):
            return Limiter("cgroup2", p)
    if "memory" in mounts and "memory" in own:
        p = mounts["memory"] / own["memory"].lstrip("/")
        if (p / "memory.limit_in_bytes").exists() and _writable_dir(p):
            return Limiter("cgroup1", p, memsw=(p / "memory.memsw.limit_in_bytes").exists())
    return Limiter("sampler")


def cgroup_name(run_id: str, task_id: str, attempt: int) -> str:
    return f"corral-{run_id}-{task_id}-{attempt}"


def create(limiter: Limiter, name: str, limit_mib: int, listed_in: Path | None) -> TaskCgroup | None:
    """Make the cgroup ``name`` limited to ``limit_mib`` (no swap beyond it); None when it cannot be
    made (the caller falls back to the sampler for this task). ``listed_in``: the folder where its
    marker goes (:func:`registry`) so a later :func:`sweep` finds it."""
    if not limiter.hard or limiter.parent is None:
        return None
    path = limiter.parent / name
    limit = str(limit_mib * 2**20)
    marker = None
    try:
        if listed_in is not None:
            listed_in.mkdir(parents=True, exist_ok=True, mode=0o700)
            marker = listed_in / name
            marker.write_text(f"{path}\n")
        if path.exists():  # a stale one of the same attempt (a scheduler killed before it removed it)
            remove_cgroup(path)
        path.mkdir()
        if limiter.kind == "cgroup2":
            (path / "memory.max").write_text(limit)
            with contextlib.suppress(OSError):  # no swap beyond the limit (absent without swap accounting)
                (path / "memory.swap.max").write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(limit)
            if limiter.memsw:
                with contextlib.suppress(OSError):
                    (path / "memory.memsw.limit_in_bytes").write_text(limit)
    except OSError:
        with contextlib.suppress(OSError):
            path.rmdir()
        if marker is not None:
            with contextlib.suppress(OSError):
                marker.unlink()
        return None
    return TaskCgroup(path, limiter.kind, limit_mib, marker)


def _procs(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def remove_cgroup(path: Path, tries: int = 50) -> bool:
    """Kill every process in the cgroup, then remove it; True when it is gone. Bounded: a process
    the kernel is still tearing down is waited for at most ``tries`` short rounds."""
    import time

    if not path.exists():
        return True
    for _ in range(tries):
        kill = path / "cgroup.kill"  # cgroup v2 (Linux 5.14+)
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        for pid in _procs(path):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            time.sleep(0.02)
    return False


def registry(home: Path, run_id: str) -> Path:
    """Where a run's cgroups are listed (one file each, holding its path)."""
    return home / "cgroups" / run_id


def stale_runs(home: Path) -> list[str]:
    """Runs that have cgroups listed (for ``doctor``: those whose scheduler is gone are swept)."""
    folder = home / "cgroups"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def sweep(home: Path, run_id: str) -> list[str]:
    """Remove the cgroups a killed scheduler of ``run_id`` left (their processes are killed
    first). Only call it when no scheduler of that run is alive. Returns the paths removed."""
    removed: list[str] = []
    folder = registry(home, run_id)
    if not folder.is_dir():
        return removed
    prefix = f"corral-{run_id}-"
    for marker in sorted(folder.iterdir()):
        if not marker.name.startswith(prefix):
            continue
        try:
            path = Path(marker.read_text().strip())
        except OSError:
            continue
        if path.name != marker.name:  # not one of ours: never touch it
            continue
        if remove_cgroup(path):
            removed.append(str(path))
            with contextlib.suppress(OSError):
                marker.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
    return removed
