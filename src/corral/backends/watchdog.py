"""The local scheduler's watchdog: stops a dead scheduler's tasks at their deadlines.

The scheduler starts one per run (only when a stage has a ``timeout``) in a session of its own
and writes to its stdin, one line per event::

    start <pid> <deadline: time.monotonic()> <run_id> <task_id>
    end <pid>
    bye

``CLOCK_MONOTONIC`` is one clock for every process of the machine, so the deadlines mean the same
here. When stdin reaches its end without ``bye`` (the scheduler died, ``kill -9`` included), the
watchdog waits for each task still running until its deadline and then kills its whole session
and every process carrying its marker (see :func:`corral.backends.local.kill_task`), then exits.
It writes nothing to the state store: ``corral status``/``resume`` record what happened.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    from corral.backends.local import kill_task, task_marker

    live: dict[int, tuple[float, str, str]] = {}
    buf = b""
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            parts = raw.decode(errors="replace").split()
            if not parts:
                continue
            if parts[0] == "bye":
                return 0
            if parts[0] == "start" and len(parts) == 5:
                live[int(parts[1])] = (float(parts[2]), parts[3], parts[4])
            elif parts[0] == "end" and len(parts) == 2:
                live.pop(int(parts[1]), None)
    # The scheduler is gone: enforce the deadlines it can no longer enforce.
    for pid, (deadline, run_id, task_id) in sorted(live.items(), key=lambda kv: kv[1][0]):
        time.sleep(max(0.0, deadline - time.monotonic()))
        kill_task(pid, task_marker(run_id, task_id), ours=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
