"""Data movement: URIs, skip-if-done checks, transfers and the run workspace.

(Stub written by the core; the storage work replaces the bodies and keeps the signatures.)
"""

from __future__ import annotations

import shutil
from pathlib import Path


def resolve_uri(uri: str, *, run_id: str, workdir: str, base_dir: Path) -> str:
    if uri.startswith("workspace://"):
        return str(Path(workdir) / uri[len("workspace://") :])
    if "://" in uri:
        return uri
    p = Path(uri).expanduser()
    return str(p if p.is_absolute() else base_dir / p)


def outputs_exist(outputs: list[str], inputs: list[str], *, run_id: str, workdir: str, base_dir: Path) -> bool:
    if not outputs:
        return False
    paths = [Path(resolve_uri(o, run_id=run_id, workdir=workdir, base_dir=base_dir)) for o in outputs]
    return all(p.exists() for p in paths)


def transfer_argv(
    source: str, dest: str, *, mode: str, filters: list[str], run_id: str, workdir: str, base_dir: Path
) -> tuple[list[str], dict[str, str]]:
    src = resolve_uri(source, run_id=run_id, workdir=workdir, base_dir=base_dir)
    dst = resolve_uri(dest, run_id=run_id, workdir=workdir, base_dir=base_dir)
    argv = ["rclone", mode, src, dst]
    for f in filters:
        argv += ["--filter", f]
    return argv, {}


def cleanup_workspace(workdir: str) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
