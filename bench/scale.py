"""How corral's costs grow with the number of items: 1,000, 10,000 and 100,000 items x 3 stages.

    python bench/scale.py [--sizes 1000,10000,100000] [--run-sizes 1000,10000] [--dir DIR]

Every measure runs in a child process of its own (wall seconds, and peak memory as the child's
max RSS), side by side for every size, so the growth is read across a row:

- planning (``corral.plan()``) from an inline list in the workflow file and from a CSV table;
- ``corral plan --json > /dev/null`` (CSV);
- on a finished local run (every task SUCCEEDED, recorded through the state store as the
  scheduler records it): ``corral status``, ``status --json``, ``status --tasks``, a ``corral
  resume`` with nothing left to do, and reloading the stored plan (``Plan.from_manifest``);
- for ``--run-sizes``: a real ``corral run`` of no-op tasks on 2 workers, with its peak memory.

Targets (issue #18): plan 100,000 x 3 in <= 3 s and <= 1 GiB from a list as from a table;
``plan --json``/``status --json`` <= 1 GiB at 100,000 x 3; ``status --tasks`` and ``--json`` on
30,000 tasks <= 2 s; plan reload <= 1.5 s at 60,000 tasks; ``resume`` of a finished 30,000-task run
<= 1 s; ``corral status`` of a 100,000-item run <= 1 s. Seconds on a shared machine are loose; the
ratio between sizes is not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = """stages:
  - {name: fetch, command: "true"}
  - {name: convert, command: "echo {session} {path}", needs: [fetch]}
  - {name: upload, command: "true", needs: [convert]}
"""


def session(i: int) -> str:
    return f"m{i % 97:02d}-2024{1 + i % 12:02d}{1 + i % 28:02d}-{i * 2654435761 % 2**32:08x}"


def make_inputs(folder: Path, n: int) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(session(i), f"raw/{session(i)}/recording.bin") for i in range(n)]
    (folder / "items.csv").write_text("session,path\n" + "".join(f"{s},{p}\n" for s, p in rows))
    table = folder / "table.yaml"
    table.write_text(f"name: scale\nitems: {{table: items.csv}}\n{STAGES}")
    inline = folder / "inline.yaml"
    with inline.open("w") as f:
        f.write("name: scale\nitems:\n")
        for s, p in rows:
            f.write(f"  - {{session: {s}, path: {p}}}\n")
        f.write(STAGES)
    return inline, table


MEASURE = r"""
import resource, sys, time, json
what, arg = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if what == "plan":
    import corral
    p = corral.plan(arg)
    n = len(p.tasks)
elif what == "reload":
    from corral import api
    store = api.open_run_store(None, arg)
    p = api.load_plan(store, arg)
    n = len(p.tasks)
elif what == "finish":
    # A finished run, recorded through the store as the local scheduler records one.
    from corral import api
    from corral.model import RunRecord, RunState, TaskRecord, TaskState
    import socket
    wf = api.load_workflow(arg)
    p = api.plan(wf)
    store = api.open_store("local")
    now = time.time()
    try:  # the fingerprint `corral run` records (corral.inputs), where this corral has one
        from corral import inputs
        fp = inputs.fingerprint(wf)
        opts = {inputs.KEY: {**fp, "tasks": len(p.tasks)}} if fp else {}
    except ImportError:
        opts = {}
    rec = RunRecord(run_id="bench-" + str(len(p.tasks)), workflow_name=wf.name, backend="local", created_at=now,
                    state=RunState.RUNNING, workflow_path=wf.source, base_dir=str(wf.base_dir),
                    host=socket.gethostname(), options=opts)
    tasks = [TaskRecord(run_id=rec.run_id, task_id=x.id, stage=x.stage.name, item_key=x.key, item_index=x.index)
             for x in p.tasks]
    store.create_run(rec, p.manifest(), tasks)
    store.save_tasks([t.replace(state=TaskState.SUCCEEDED, attempts=1, exit_code=0, started_at=now,
                                ended_at=now + 1 + (i % 7) / 10) for i, t in enumerate(tasks)])
    store.save_run(store.get_run(rec.run_id).replace(state=RunState.SUCCEEDED))
    print(rec.run_id, file=sys.stderr)
    n = len(tasks)
else:
    raise SystemExit(what)
print(json.dumps({"s": time.perf_counter() - t, "n": n,
                  "mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


ONE_STAGE = 'stages:\n  - {name: noop, command: "true"}\n'


def measure(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    import json

    res = subprocess.run([sys.executable, "-c", MEASURE, *args], env=env, cwd=cwd, capture_output=True,
                         text=True, check=True)
    data = json.loads(res.stdout.strip().splitlines()[-1])
    return data["s"], data["mib"]


def timed_cli(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak MiB of one `corral` command (output thrown away), via /usr/bin/time's
    ru_maxrss of the child (os.wait4)."""
    import time

    t = time.perf_counter()
    with open(os.devnull, "w") as null:
        proc = subprocess.Popen([sys.executable, "-m", "corral", *argv], env=env, cwd=cwd, stdout=null, stderr=null)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"corral {' '.join(argv)} exited {code}")
    return wall, usage.ru_maxrss / 1024


def _median(vs: list[tuple[float, float]]) -> tuple[float, float]:
    import statistics

    return statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs)


def cell(v: tuple[float, float] | None) -> str:
    return "-" if v is None else f"{v[0]:.2f} s, {v[1]:.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--run-sizes", default="1000", help="sizes to also run for real (no-op tasks, 2 workers)")
    ap.add_argument("--run-stages", type=int, choices=(1, 3), default=3,
                    help="stages of the real run: 3 (the workflow above) or 1 (one no-op stage)")
    ap.add_argument("--compare", metavar="SRC", default=None,
                    help="also measure with PYTHONPATH=SRC (e.g. /work/main/src) and print this/SRC ratios")
    ap.add_argument("--repeat", type=int, default=1, help="rounds per measure (the median is shown)")
    ap.add_argument("--only", default="", help="comma-separated substrings: measure only rows whose name has one")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    load_before = os.getloadavg()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    run_sizes = {int(s) for s in args.run_sizes.split(",") if s}
    rows: dict[str, dict[int, tuple[float, float] | None]] = {}
    base_rows: dict[str, dict[int, tuple[float, float] | None]] = {}
    only = [w for w in args.only.split(",") if w]
    here = str(Path(__file__).resolve().parent.parent / "src")

    def put(name: str, n: int, v: tuple[float, float] | None) -> None:
        rows.setdefault(name, {})[n] = v

    def wanted(name: str) -> bool:
        return not only or any(w in name for w in only)

    def both(name: str, n: int, fn: object, *a: object, env: dict[str, str]) -> None:
        """Measure with this source (and with --compare's, right after: side by side)."""
        if not wanted(name):
            return
        mine: list[tuple[float, float]] = []
        base: list[tuple[float, float]] = []
        for _ in range(args.repeat):  # alternating, so that both see the same machine
            mine.append(fn(*a, {**env, "PYTHONPATH": here}))  # type: ignore[operator]
            if args.compare:
                base.append(fn(*a, {**env, "PYTHONPATH": args.compare}))  # type: ignore[operator]
        put(name, n, _median(mine))
        if base:
            base_rows.setdefault(name, {})[n] = _median(base)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in sizes:
            folder = Path(tmp) / str(n)
            inline, table = make_inputs(folder, n)
            env = {**os.environ, "CORRAL_HOME": str(folder / "home")}

            def cli(argv: list[str], e: dict[str, str], cwd: Path = folder) -> tuple[float, float]:
                return timed_cli(argv, e, cwd)

            def child(argv: list[str], e: dict[str, str], cwd: Path = folder) -> tuple[float, float]:
                return measure(argv, e, cwd)

            both("corral.plan(), inline list", n, child, ["plan", str(inline)], env=env)
            both("corral.plan(), CSV table", n, child, ["plan", str(table)], env=env)
            both("corral plan --json > /dev/null (CSV)", n, cli, ["plan", str(table), "--json"], env=env)
            res = subprocess.run([sys.executable, "-c", MEASURE, "finish", str(table)],
                                 env={**env, "PYTHONPATH": here}, cwd=folder, capture_output=True, text=True,
                                 check=True)
            run_id = res.stderr.strip().splitlines()[-1]
            # the same stored run is read by both sources (the schema is the same; this one adds
            # two indexes the first time it opens the database: done here, before any timing)
            subprocess.run([sys.executable, "-m", "corral", "status", run_id], env={**env, "PYTHONPATH": here},
                           cwd=folder, capture_output=True, check=True)
            both("finished run: corral status", n, cli, ["status", run_id], env=env)
            both("finished run: status --json", n, cli, ["status", run_id, "--json"], env=env)
            both("finished run: status --tasks", n, cli, ["status", run_id, "--tasks"], env=env)
            both("finished run: corral resume (nothing to do)", n, cli, ["resume", run_id], env=env)
            both("finished run: plan reload (from_manifest)", n, child, ["reload", run_id], env=env)
            if n in run_sizes:
                wf = table
                if args.run_stages == 1:
                    wf = folder / "one.yaml"
                    wf.write_text(f"name: one\nitems: {{table: items.csv}}\n{ONE_STAGE}")
                for which, src in (("", here), (" base", args.compare)):
                    if src is None or not wanted("corral run"):
                        continue
                    e = {**env, "CORRAL_HOME": str(folder / f"home-run{which.strip()}"), "PYTHONPATH": src}
                    v = timed_cli(["run", str(wf), "--max-parallel", "2"], e, folder)
                    name = f"corral run, no-op tasks ({args.run_stages} stage{'s' * (args.run_stages > 1)}), 2 workers"
                    (base_rows if which else rows).setdefault(name, {})[n] = v
    load_after = os.getloadavg()
    width = max(len(k) for k in rows)
    head = "".join(f"{f'{n:,} x 3':>24}" for n in sizes)
    print(f"\nload average (1/5/15 min) before {' / '.join(f'{x:.1f}' for x in load_before)}, "
          f"after {' / '.join(f'{x:.1f}' for x in load_after)} (2 cores)")
    print(f"\n{'measure':<{width}}{head}")
    for name, per in rows.items():
        print(f"{name:<{width}}" + "".join(f"{cell(per.get(n)):>24}" for n in sizes))
    if args.compare:
        print(f"\nthe same with PYTHONPATH={args.compare}, measured right after each of the above")
        print(f"{'measure':<{width}}{head}")
        for name, per in base_rows.items():
            print(f"{name:<{width}}" + "".join(f"{cell(per.get(n)):>24}" for n in sizes))
        print(f"\nthis source / {args.compare}: seconds (and peak memory) ratio, side by side")
        print(f"{'measure':<{width}}{head}")
        for name, per in rows.items():
            cells = []
            for n in sizes:
                a, b = per.get(n), base_rows.get(name, {}).get(n)
                cells.append("-" if not a or not b else f"{a[0] / max(b[0], 1e-3):.2f}x, {a[1] / max(b[1], 1e-3):.2f}x mem")
            print(f"{name:<{width}}" + "".join(f"{c:>24}" for c in cells))
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        print(f"\ngrowth {lo:,} -> {hi:,} items ({hi // lo}x the items): seconds ratio per measure")
        for name, per in rows.items():
            a, b = per.get(lo), per.get(hi)
            if a and b:
                print(f"{name:<{width}}{b[0] / max(a[0], 1e-3):>10.1f}x")


if __name__ == "__main__":
    main()
