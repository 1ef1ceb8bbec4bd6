"""How the local backend starts a task: a host process, or a container when an engine answers."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

from corral.errors import BackendError


@dataclass(frozen=True)
class Engine:
    name: str  # "docker" or "podman"
    path: str


@lru_cache(maxsize=1)
def detect_engine() -> tuple[Engine | None, str]:
    """The first container engine that answers, and why none did otherwise."""
    reasons = []
    for name in ("docker", "podman"):
        path = shutil.which(name)
        if not path:
            reasons.append(f"{name}: not installed")
            continue
        try:
            res = subprocess.run(
                [path, "info", "--format", "{{json .ServerVersion}}"],
                capture_output=True, text=True, timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            reasons.append(f"{name}: {exc}")
            continue
        if res.returncode == 0:
            return Engine(name, path), ""
        first = (res.stderr or res.stdout).strip().splitlines()
        reasons.append(f"{name}: {first[-1] if first else 'no answer'}")
    return None, "; ".join(reasons)


def container_argv(
    engine: Engine,
    *,
    name: str,
    image: str,
    argv: list[str],
    env_names: list[str],
    mounts: list[str],
    cwd: str,
    vcpus: float,
    memory_mib: int | None,
    gpus: int,
    shm_mib: int | None = None,
) -> list[str]:
    """``docker run`` (or podman) for one attempt; env values are passed by name, never on argv.
    ``shm_mib``: the size of ``/dev/shm`` (``resources.shm``; a process runs with the host's)."""
    cmd = [engine.path, "run", "--rm", "--name", name, "--init", "-w", cwd, f"--cpus={vcpus:g}"]
    if memory_mib:
        cmd.append(f"--memory={memory_mib}m")
    if shm_mib:
        cmd.append(f"--shm-size={shm_mib}m")
    for m in dict.fromkeys(mounts):
        cmd += ["-v", f"{m}:{m}"]
    for n in env_names:
        cmd += ["-e", n]
    if gpus:
        if engine.name == "docker":
            cmd += ["--gpus", str(gpus)]
        else:
            cmd += ["--device", "nvidia.com/gpu=all"]
    return cmd + [image, *argv]


def require_engine() -> Engine:
    engine, why = detect_engine()
    if engine is None:
        raise BackendError(
            f"--runtime container was asked for, but no container engine answered ({why})",
            "start Docker or Podman, or use --runtime process to run stages on the host",
        )
    return engine
