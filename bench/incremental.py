"""Benchmark: add 300 items to a finished 3,000-item run — how many tasks the second run runs.

On each backend (local: real processes; aws: real requests to a moto server this script starts
on 127.0.0.1, with Batch played by tests/contract/batch_sim.py without running the children) a
workflow of two per-item stages and a per-run summary runs over 3,000 items, then over the same
3,000 plus 300 new ones. Prints, per backend, the tasks of the second run that ran, were reused,
and the time of each run. Expected: 2 × 300 + 1 (the summary) ran, 6,000 reused.

    python bench/incremental.py [--items 3000] [--added 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "tests" / "aws"), str(ROOT / "bench")]

WORKFLOW = """name: incremental
defaults: {image: busybox}
items: {table: sessions.csv}
stages:
  - {name: fetch, command: "true"}
  - {name: convert, needs: [fetch], command: "true"}
  - {name: summary, per: run, needs: [convert], command: "true"}
"""


def measure(name: str, folder: Path, n: int, added: int) -> dict[str, float]:
    import os

    from corral import api
    from corral.backends.base import RunOptions
    from corral.model import TaskState
    from corral.state.sqlite import SqliteStore

    os.environ["CORRAL_HOME"] = str(folder / "home")
    table = folder / "sessions.csv"
    table.write_text("session\n" + "".join(f"s{i:05d}\n" for i in range(n)))
    wf = folder / "workflow.yaml"
    wf.write_text(WORKFLOW)
    store = SqliteStore(folder / "state.db")
    if name == "local":
        from corral.backends.local import LocalBackend

        def go() -> str:
            return api.run(wf, "local", store=store, options=RunOptions(runtime="process"),
                           backend_impl=LocalBackend(folder / "home", log=lambda m: None)).run_id
    else:
        from aws_submit import start_moto
        from contract.batch_sim import SimulatedBatch
        from test_backend_support import make_environment

        from corral.backends.aws_batch.backend import AwsBatchBackend
        from corral.backends.aws_batch.client import AwsClients

        start_moto()
        clients = AwsClients()
        env = make_environment(clients)
        sim = SimulatedBatch(clients.batch, workdir=folder / "c", execute=False)

        def go() -> str:
            be = AwsBatchBackend(clients, environment=env, sleep=sim.step, api=sim, settle_polls=0,
                                 say=lambda m: None)
            return api.run(wf, "aws", store=store, options=RunOptions(wait=True), backend_impl=be).run_id

    t0 = time.perf_counter()
    go()
    t1 = time.perf_counter()
    table.write_text(table.read_text() + "".join(f"s{i:05d}\n" for i in range(n, n + added)))
    second = go()
    t2 = time.perf_counter()
    tasks = store.get_tasks(second)
    return {"ran": sum(t.state == TaskState.SUCCEEDED for t in tasks),
            "reused": sum(t.state == TaskState.REUSED for t in tasks), "total": len(tasks),
            "first_s": t1 - t0, "second_s": t2 - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--added", type=int, default=300)
    ap.add_argument("--backends", default="local,aws")
    args = ap.parse_args()
    print(f"{args.items} items, then {args.added} added (2 per-item stages + 1 per-run summary)")
    print(f"{'backend':8} {'2nd run: ran':>13} {'reused':>8} {'of':>7} {'1st run s':>10} {'2nd run s':>10}")
    for name in args.backends.split(","):
        with tempfile.TemporaryDirectory() as d:
            r = measure(name, Path(d), args.items, args.added)
        print(f"{name:8} {r['ran']:>13.0f} {r['reused']:>8.0f} {r['total']:>7.0f} {r['first_s']:>10.1f} {r['second_s']:>10.1f}")


if __name__ == "__main__":
    main()
