"""The files a run's plan was made from, fingerprinted when the run is recorded.

A run records (in ``RunRecord.options["inputs"]``) the workflow file and every local file its
items come from (CSV/TSV tables, through ``product`` too): path, size, mtime_ns and the SHA-256 of
the bytes, with the corral version that planned it and the number of tasks. While those files hold
the same bytes, planning the workflow again gives the plan the run recorded, so `corral resume` of a
finished run can answer without loading the workflow models or planning (issue #18).

Items from anything that cannot be fingerprinted cheaply (a glob's matches, a BIDS tree on disk or
on S3, a NeuroConv specification and the data it names, a plugin's source) make no fingerprint:
such a run always takes the full path. The mtime is recorded for the record (and a future check
that skips hashing big files); the bytes decide.

No pydantic here: the check runs on `corral resume`'s fast path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.model import RunRecord
    from corral.spec import Workflow

KEY = "inputs"  # RunRecord.options[KEY]
VERSION = 1


def _version() -> str:
    import corral

    return corral.__version__


def _entry(path: Path, data: bytes | None = None) -> dict[str, Any]:
    st = path.stat()
    if data is None:
        data = path.read_bytes()
    return {"path": str(path), "size": len(data), "mtime_ns": st.st_mtime_ns,
            "sha256": hashlib.sha256(data).hexdigest()}


def _item_files(spec: Any, base_dir: Path) -> list[Path] | None:
    """The local files ``items:`` reads, or None when it reads something not fingerprinted."""
    if spec is None or isinstance(spec, list):  # none, or inline (in the workflow file)
        return []
    if not isinstance(spec, dict):
        return None
    if set(spec) <= {"table", "delimiter", "where"} and "table" in spec:
        p = Path(os.path.expanduser(str(spec["table"])))
        return [p if p.is_absolute() else base_dir / p]  # as the table source reads it (symlinks too)
    if set(spec) == {"product"} and isinstance(spec["product"], list):
        files: list[Path] = []
        for part in spec["product"]:
            got = _item_files(part, base_dir)
            if got is None:
                return None
            files += got
        return files
    return None  # glob, bids, neuroconv, a plugin's source: not fingerprinted


def fingerprint(wf: Workflow) -> dict[str, Any] | None:
    """What ``options["inputs"]`` records for a run of ``wf`` (the caller adds ``tasks``: how many
    the plan made), or None when the workflow is not a file or its items come from something not fingerprinted. The
    workflow's hash is of the text that was planned (not of the file read again)."""
    located = getattr(wf, "_located", None)
    if located is None or not located.source or located.source.startswith("<"):
        return None
    files = _item_files(wf.items, wf.base_dir)
    if files is None:
        return None
    try:
        entries = [_entry(Path(os.path.abspath(located.source)), located.text.encode("utf-8", "surrogatepass"))]
        entries += [_entry(f) for f in files]
    except OSError:
        return None
    return {"version": VERSION, "corral": _version(), "files": entries}


def unchanged(run: RunRecord, n_tasks: int) -> bool:
    """Whether every file the run's fingerprint names holds the bytes it held when the run was
    recorded, the workflow path the run names (as `corral resume` reads it) is the file
    fingerprinted and still has the folder the run planned against, this corral is the one that
    planned it and the store holds the ``n_tasks`` it planned. False for anything absent or
    malformed (a run recorded before fingerprints: the full path decides)."""
    recorded = run.options.get(KEY)
    try:
        if (not isinstance(recorded, dict) or recorded.get("version") != VERSION
                or recorded.get("corral") != _version() or recorded.get("tasks") != n_tasks):
            return False
        files = recorded["files"]
        wf = Path(run.workflow_path)
        if not files or os.path.abspath(wf) != files[0]["path"] or str(wf.resolve().parent) != run.base_dir:
            return False
        for f in files:
            p = Path(f["path"])
            if p.stat().st_size != f["size"]:
                return False
            if hashlib.sha256(p.read_bytes()).hexdigest() != f["sha256"]:
                return False
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return True
