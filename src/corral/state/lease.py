"""One writer per run: the lease every command that changes a run takes first.

``run``, ``resume``, ``cancel`` and every refresh that writes hold the run's lease while they
write. A second one waits a little (``wait`` seconds, polled with a bound) and then says, in one
line, who holds it. Leases are re-entrant within a process (a ``run`` that refreshes holds it once).

- SQLite (local): ``flock`` on ``<CORRAL_HOME>/locks/<run_id>.lock``; the kernel releases it when
  the process ends, ``kill -9`` included, so a crashed command never blocks the next one.
- DynamoDB: a conditional item (``pk = RUN#<run_id>``, ``sk = LEASE``) with an owner and an expiry
  (``LEASE_TTL_S``), renewed by a thread while held; a crashed holder blocks others until it expires.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.errors import StateError

LEASE_WAIT_S = 2.0  # how long a second command waits for the holder before saying who it is


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: float
    purpose: str

    @classmethod
    def me(cls, purpose: str) -> Holder:
        return cls(socket.gethostname(), os.getpid(), time.time(), purpose)

    def as_json(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "since": self.since, "purpose": self.purpose})

    @classmethod
    def from_json(cls, text: str) -> Holder | None:
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), float(d["since"]), str(d["purpose"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"`corral {self.purpose}` (pid {self.pid} on {self.host}, since {since})"


class LeaseHeld(StateError):
    """Another command holds the run's lease."""

    def __init__(self, run_id: str, holder: Holder | None, extra: str = "") -> None:
        who = holder.describe() if holder else "another corral command"
        super().__init__(
            f"run {run_id} is in use by {who}{extra}",
            "wait for it to end and try again (a command that died releases it"
            + (" when its lease expires)" if extra else ")"),
        )
        self.holder = holder


# -- SQLite: an OS lock ---------------------------------------------------------------------------
_held_files: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth), this process
_files_lock = threading.Lock()


@contextlib.contextmanager
def file_lease(folder: Path, run_id: str, purpose: str, wait: float = LEASE_WAIT_S) -> Iterator[None]:
    path = str(folder / f"{run_id}.lock")
    with _files_lock:
        if path in _held_files:
            fd, depth = _held_files[path]
            _held_files[path] = (fd, depth + 1)
            acquired = False
        else:
            acquired = True
    if acquired:
        fd = _flock(folder, path, run_id, purpose, wait)
        with _files_lock:
            _held_files[path] = (fd, 1)
    try:
        yield
    finally:
        with _files_lock:
            fd, depth = _held_files[path]
            if depth > 1:
                _held_files[path] = (fd, depth - 1)
            else:
                del _held_files[path]
                os.close(fd)  # releases the flock


def _flock(folder: Path, path: str, run_id: str, purpose: str, wait: float) -> int:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateError(f"cannot open the lock file {path}: {exc.strerror}",
                         "check that CORRAL_HOME is a writable folder with free space") from None
    deadline = time.monotonic() + max(0.0, wait)
    delay = 0.02
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = Holder.from_json(Path(path).read_text(errors="replace"))
                os.close(fd)
                raise LeaseHeld(run_id, holder) from None
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.25)
    with contextlib.suppress(OSError):  # who holds it, for the next one's message (best effort)
        os.ftruncate(fd, 0)
        os.pwrite(fd, Holder.me(purpose).as_json().encode(), 0)
    return fd
