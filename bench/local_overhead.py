"""Local backend overhead: N no-op tasks through corral vs ``xargs -P2`` running the same commands.

    python bench/local_overhead.py [--tasks 1000] [--rounds 5] [--dir DIR]

Both sides run ``/bin/sh -c true`` once per task on 2 workers; corral also records every
transition in SQLite. The ratio is corral's median wall time over xargs's (target ≤ 1.5×), for
the whole CLI (``corral run``, interpreter start-up included) and for the API call alone.
Then the peak memory of planning 10,000 tasks (a child process's max RSS).

corral writes two log files per task attempt under ``CORRAL_HOME`` (xargs writes nothing), so the
file system of ``--dir`` (default: the system's temp folder) matters; the table says how long one
file creation takes there, measured before the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_workflow(folder: Path, n: int) -> Path:
    (folder / "items.csv").write_text("i\n" + "\n".join(str(i) for i in range(n)) + "\n")
    wf = folder / "workflow.yaml"
    wf.write_text("name: bench\nitems: {table: items.csv}\nstages:\n  - {name: noop, command: \"true\"}\n")
    return wf


def timed(argv: list[str], env: dict[str, str], cwd: Path, stdin: str | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, input=stdin, text=True, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


API_SNIPPET = """
import sys, time
import corral
from corral.backends.base import RunOptions
t = time.perf_counter()
run = corral.run(sys.argv[1], options=RunOptions(max_parallel=2))
assert run.state.value == "SUCCEEDED", run.state
print(time.perf_counter() - t)
"""

PLAN_SNIPPET = """
import resource, sys
import corral
p = corral.plan(sys.argv[1])
assert len(p.tasks) == int(sys.argv[2]), len(p.tasks)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

BASELINE_SNIPPET = "import resource, yaml, pydantic; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"

# The floor under corral's launcher: a bare Python loop that keeps 2 children of `true` running,
# started as corral starts them (posix_spawn, log files, a new session) or as xargs does (fork,
# no session). The difference between the two is what the kernel charges for each part.
SPAWN_SNIPPET = """
import os, sys, time
n, mode, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
env = dict(os.environ)
devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
running, started, t = set(), 0, time.perf_counter()
while started < n or running:
    while len(running) < 2 and started < n:
        fa = []
        if "logs" in mode:
            fo = os.open(f"{folder}/{started}.out", flags, 0o600)
            fe = os.open(f"{folder}/{started}.err", flags, 0o600)
            fa = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, fo, 1), (os.POSIX_SPAWN_DUP2, fe, 2)]
        running.add(os.posix_spawnp("true", ["true"], env, setsid="setsid" in mode, file_actions=fa))
        if fa:
            os.close(fo)
            os.close(fe)
        started += 1
    pid, _ = os.waitpid(-1, 0)
    running.discard(pid)
print(time.perf_counter() - t)
"""


def file_create_us(folder: Path, n: int = 2000) -> float:
    """Microseconds to create (and close) one empty file in ``folder``, over ``n`` files."""
    probe = folder / "probe"
    probe.mkdir()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    t = time.perf_counter()
    for i in range(n):
        os.close(os.open(probe / f"f{i}", flags, 0o644))
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where CORRAL_HOME and the workflow live (default: the temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        create_us = file_create_us(folder)
        wf = make_workflow(folder, args.tasks)
        xs, cli, api, helps = [], [], [], []
        loops: dict[str, list[float]] = {"bare": [], "logs": [], "logs+setsid": []}
        for r in range(args.rounds):
            helps.append(timed([sys.executable, "-m", "corral", "--help"], os.environ.copy(), folder))
            for mode, got in loops.items():
                d = folder / f"loop-{mode}-{r}"
                d.mkdir()
                out = subprocess.run([sys.executable, "-c", SPAWN_SNIPPET, str(args.tasks), mode, str(d)],
                                     capture_output=True, text=True, check=True)
                got.append(float(out.stdout.strip()))
            env = {**os.environ, "CORRAL_HOME": str(folder / f"home{r}")}
            xs.append(timed(["xargs", "-P2", "-I{}", "/bin/sh", "-c", "true"], env, folder,
                            stdin="\n".join(map(str, range(args.tasks))) + "\n"))
            cli.append(timed([sys.executable, "-m", "corral", "run", str(wf), "--max-parallel", "2"], env, folder))
            env["CORRAL_HOME"] = str(folder / f"api{r}")
            out = subprocess.run([sys.executable, "-c", API_SNIPPET, str(wf)], env=env, cwd=folder,
                                 capture_output=True, text=True, check=True)
            api.append(float(out.stdout.strip()))
        base = statistics.median(xs)
        start_up = statistics.median(helps)
        cli_s = statistics.median(cli)
        rows = [
            ("xargs -P2 (baseline)", base, 1.0),
            ("corral run (CLI, whole process)", cli_s, cli_s / base),
            ("corral run (CLI) less start-up", cli_s - start_up, (cli_s - start_up) / base),
            ("corral.run() (API, in process)", statistics.median(api), statistics.median(api) / base),
            ("python loop: posix_spawn, no logs", statistics.median(loops["bare"]),
             statistics.median(loops["bare"]) / base),
            ("python loop: + 2 log files a task", statistics.median(loops["logs"]),
             statistics.median(loops["logs"]) / base),
            ("python loop: + logs + setsid", statistics.median(loops["logs+setsid"]),
             statistics.median(loops["logs+setsid"]) / base),
        ]
        load = os.getloadavg()
        print(f"\n{args.tasks} no-op tasks on 2 workers, median of {args.rounds} rounds (target: ≤ 1.5× xargs)")
        print(f"(in {folder.parent}: creating a file takes {create_us:.1f} µs; corral creates 2 per task; "
              f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f})")
        print(f"{'runner':<36} {'seconds':>9} {'ratio':>7}")
        for name, sec, ratio in rows:
            print(f"{name:<36} {sec:>9.3f} {ratio:>6.2f}×")
        print(f"{'corral --help (start-up)':<36} {start_up:>9.3f}    (target ≤ 0.2 s)")
        print("(the python loops are the floor of a launcher that keeps corral's guarantees: each task's "
              "own log files and session)")
        big = folder / "big"
        big.mkdir()
        wf10k = make_workflow(big, 10_000)
        peak = subprocess.run([sys.executable, "-c", PLAN_SNIPPET, str(wf10k), "10000"], capture_output=True,
                              text=True, check=True, cwd=big)
        floor = subprocess.run([sys.executable, "-c", BASELINE_SNIPPET], capture_output=True, text=True, check=True)
        print("\npeak memory (max RSS) of planning 10,000 tasks")
        print(f"{'process':<36} {'MiB':>9}")
        print(f"{'python + yaml + pydantic imported':<36} {int(floor.stdout) / 1024:>9.1f}")
        print(f"{'corral.plan() of 10,000 tasks':<36} {int(peak.stdout) / 1024:>9.1f}")


if __name__ == "__main__":
    main()
