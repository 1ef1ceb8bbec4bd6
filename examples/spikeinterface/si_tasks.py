"""The commands the spike-sorting sweep runs (needs `pip install -e '.[spikeinterface]'`).

    python si_tasks.py generate OUT --seed 1 --duration 10 --units 5     # ground-truth recording
    python si_tasks.py sort RECORDING SORTER OUT [--params JSON]         # one recording × one sorter
    python si_tasks.py report RESULTS GROUND_TRUTH -o report.csv         # accuracy of every sort

In a container, copy this file into the image (or fetch it in the stage) next to spikeinterface.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any


def _load(folder: Path) -> Any:
    import spikeinterface.core as sc

    loader = getattr(sc, "load", None) or sc.load_extractor
    return loader(folder)


def generate(out: Path, seed: int, duration: float, units: int, channels: int) -> None:
    import spikeinterface.core as sc

    rec, gt = sc.generate_ground_truth_recording(
        durations=[duration], num_channels=channels, num_units=units, seed=seed
    )
    rec.save(folder=out / "recording", overwrite=True, n_jobs=1)
    gt.save(folder=out / "ground_truth", overwrite=True)
    print(f"generated {out}: {channels} channels, {units} units, {duration:g}s")


def sort(recording: Path, sorter: str, out: Path, params: dict[str, Any]) -> None:
    import spikeinterface.sorters as ss

    rec = _load(recording)
    t0 = time.monotonic()
    sorting = ss.run_sorter(sorter, rec, folder=out / "sorter_output", remove_existing_folder=True,
                            verbose=False, **params)
    elapsed = time.monotonic() - t0
    sorting.save(folder=out / "sorting", overwrite=True)
    summary = {
        "recording": str(recording), "sorter": sorter, "params": params, "seconds": round(elapsed, 3),
        "units": int(sorting.get_num_units()),
        "spikes": int(sum(len(sorting.get_unit_spike_train(u)) for u in sorting.unit_ids)),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


def report(results: Path, ground_truth: Path, output: Path) -> None:
    import spikeinterface.comparison as sco

    rows = []
    for summary_file in sorted(results.glob("*/*/summary.json")):
        recording, label = summary_file.parent.parent.name, summary_file.parent.name
        summary = json.loads(summary_file.read_text())
        gt = _load(ground_truth / recording / "ground_truth")
        cmp = sco.compare_sorter_to_ground_truth(gt, _load(summary_file.parent / "sorting"), exhaustive_gt=True)
        perf = cmp.get_performance()
        rows.append({
            "recording": recording, "sorter": label, "units": summary["units"], "gt_units": len(gt.unit_ids),
            "mean_accuracy": round(float(perf["accuracy"].mean()), 4),
            "well_detected": len(cmp.get_well_detected_units(well_detected_score=0.8)),
            "seconds": summary["seconds"],
        })
    if not rows:
        sys.exit(f"no */*/summary.json under {results}")
    with output.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {output}: {len(rows)} sorts")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("out", type=Path)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--duration", type=float, default=10.0)
    g.add_argument("--units", type=int, default=5)
    g.add_argument("--channels", type=int, default=8)
    s = sub.add_parser("sort")
    s.add_argument("recording", type=Path)
    s.add_argument("sorter")
    s.add_argument("out", type=Path)
    s.add_argument("--params", default="{}", help="sorter parameters as a JSON object")
    r = sub.add_parser("report")
    r.add_argument("results", type=Path)
    r.add_argument("ground_truth", type=Path)
    r.add_argument("-o", "--output", type=Path, default=Path("report.csv"))
    a = p.parse_args(argv)
    if a.cmd == "generate":
        generate(a.out, a.seed, a.duration, a.units, a.channels)
    elif a.cmd == "sort":
        try:
            params = json.loads(a.params)
        except json.JSONDecodeError as exc:
            sys.exit(f"--params is not JSON: {exc}")
        if not isinstance(params, dict):
            sys.exit("--params must be a JSON object")
        sort(a.recording, a.sorter, a.out, params)
    else:
        report(a.results, a.ground_truth, a.output)


if __name__ == "__main__":
    main()
