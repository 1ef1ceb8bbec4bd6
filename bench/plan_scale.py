"""Planning at scale: ``corral.plan()`` of N items × 3 stages, from an inline list and from a table.

    python bench/plan_scale.py [--sizes 1000,10000,100000] [--rounds 3]

Each measurement runs in a fresh child process (so peak memory is that plan's own): the wall time
of ``corral.plan(path)`` (reading the YAML or CSV included) and the child's peak RSS. The columns
show inline and table side by side, and their ratio, in one run; the target (issue #18) is
100,000 × 3 in ≤ 3 s and ≤ 1 GiB from either source.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = """stages:
  - name: fetch
    command: "cp {raw}/{session}.bin {workdir}/{session}.bin"
  - name: convert
    needs: [fetch]
    command: [convert, "{workdir}/{session}.bin", "--subject", "{subject}"]
    outputs: ["out/{session}.nwb"]
  - name: upload
    needs: [convert]
    command: "echo uploading '{session}'"
"""


def make(folder: Path, n: int) -> tuple[Path, Path]:
    inline = folder / f"inline-{n}.yaml"
    rows = "".join(f"  - {{session: s{i:06d}, subject: m{i % 97:03d}, raw: /data/raw}}\n" for i in range(n))
    inline.write_text(f"name: scale\nitems:\n{rows}{STAGES}")
    table = folder / f"table-{n}.yaml"
    (folder / f"items-{n}.csv").write_text(
        "session,subject,raw\n" + "".join(f"s{i:06d},m{i % 97:03d},/data/raw\n" for i in range(n)))
    table.write_text(f"name: scale\nitems: {{table: items-{n}.csv}}\n{STAGES}")
    return inline, table


CHILD = """
import json, resource, sys, time
t = time.perf_counter()
import corral
p = corral.plan(sys.argv[1])
dt = time.perf_counter() - t
assert len(p.tasks) == 3 * int(sys.argv[2]), len(p.tasks)
print(json.dumps([dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))
"""


def measure(path: Path, n: int, rounds: int) -> tuple[float, float]:
    times, peaks = [], []
    for _ in range(rounds):
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(n)], check=True, capture_output=True,
                             text=True).stdout
        dt, peak = json.loads(out)
        times.append(dt)
        peaks.append(peak)
    return statistics.median(times), max(peaks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    print("| items × 3 stages | inline list: s | peak MiB | CSV table: s | peak MiB | inline / table |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for n in sizes:
            inline, table = make(Path(d), n)
            ti, mi = measure(inline, n, args.rounds)
            tt, mt = measure(table, n, args.rounds)
            print(f"| {n:,} | {ti:.2f} | {mi:.0f} | {tt:.2f} | {mt:.0f} | {ti / tt:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
