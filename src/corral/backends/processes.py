"""Is a process (or the local scheduler that recorded a run) still running? Read from ``/proc``.

Below both the local backend (which records its scheduler's pid and start time) and doctor (which
finds local runs whose scheduler is gone), so neither imports the other for it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from corral.model import RunRecord


def process_alive(pid: int | None) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError, IndexError):
        return True


def process_start_time(pid: int) -> str:
    """The kernel's start time of a process (clock ticks since boot): with the pid, an identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return ""


def scheduler_alive(run: RunRecord) -> bool:
    """Is the scheduler that recorded this run still running (same host, same process)?"""
    if not run.pid or run.host != socket.gethostname() or not process_alive(run.pid):
        return False
    started = run.options.get("scheduler_start", "")
    return bool(started) and process_start_time(run.pid) == started
