"""Submit a 1,000 items × 3 stages workflow to a real one-node Slurm and count the calls to Slurm.

    python bench/slurm_submit.py [--items 1000] [--wait]

Starts its own cluster (tests/slurm_cluster.py: munged, slurmctld, slurmd on 127.0.0.1), runs
``corral run --backend slurm`` through the Python API with a counting client, then one ``status``
refresh, and prints a table beside the naive baseline of one sbatch per task. With ``--wait`` it
also waits for the run to end and reports how long Slurm took to run the 3,000 tasks.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from slurm_cluster import SlurmCluster  # noqa: E402

from corral import api  # noqa: E402
from corral.backends.base import RunOptions  # noqa: E402
from corral.backends.slurm import SlurmBackend, SlurmClient  # noqa: E402
from corral.model import RunState  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--wait", action="store_true", help="also wait for every task to end")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on `timeout` too
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-slurm-"))
    os.environ["CORRAL_HOME"] = str(tmp / "home")
    wf_path = tmp / "workflow.yaml"
    wf_path.write_text(
        "name: bench\nitems:\n  table: items.csv\nstages:\n"
        "  - {name: fetch, command: 'true'}\n"
        "  - {name: convert, needs: [fetch], command: 'true'}\n"
        "  - {name: upload, needs: [convert], command: 'true'}\n"
    )
    (tmp / "items.csv").write_text("session\n" + "".join(f"s{i:05d}\n" for i in range(args.items)))
    with SlurmCluster(tmp / "cluster") as cluster:
        os.environ["SLURM_CONF"] = str(cluster.conf)
        client = SlurmClient()
        be = SlurmBackend(api.corral_home(), client=client, log=lambda m: None)
        wf = api.load_workflow(wf_path)
        t0 = time.perf_counter()
        run = api.run(wf, "slurm", options=RunOptions(wait=False), backend_impl=be)
        submit_s = time.perf_counter() - t0
        tasks = len(api.open_store("slurm").get_tasks(run.run_id))
        sbatch = client.calls["sbatch"]
        before = sum(client.calls.values())
        store = api.open_store("slurm")
        t0 = time.perf_counter()
        be.refresh(store.get_run(run.run_id), store)
        refresh_s = time.perf_counter() - t0
        refresh_calls = sum(client.calls.values()) - before
        rows = [
            ("tasks", f"{tasks}", "", ""),
            ("sbatch calls", f"{sbatch}", f"{tasks} (one per task)", f"{tasks / max(sbatch, 1):.0f}× fewer"),
            ("submission time", f"{submit_s:.2f} s", "", f"{submit_s / tasks * 1000:.2f} ms/task"),
            ("Slurm calls per refresh", f"{refresh_calls}", f"{tasks} (scontrol per task)",
             f"{tasks / max(refresh_calls, 1):.0f}× fewer"),
            ("refresh time", f"{refresh_s:.2f} s", "", ""),
        ]
        if args.wait:
            t0 = time.perf_counter()
            delay = 1.0
            while store.get_run(run.run_id).state == RunState.RUNNING:
                time.sleep(delay)
                be.refresh(store.get_run(run.run_id), store)
            rows.append(("run to the end (2 CPUs)", f"{time.perf_counter() - t0:.1f} s",
                         "", store.get_run(run.run_id).state.value))
        else:
            client.scancel(sorted({a["job"] for a in store.get_run(run.run_id).options["slurm"]["arrays"]}))
    width = [max(len(r[i]) for r in rows + [("metric", "corral", "baseline", "ratio")]) for i in range(4)]
    for r in [("metric", "corral", "baseline", "ratio"), tuple("-" * w for w in width), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)))
    ok = sbatch <= 6 and refresh_calls == 1
    print(f"\ntargets: ≤ 6 sbatch calls, 1 call per refresh: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
