"""Write the tiny raw data this example converts: NeuroScope recordings (.dat + .xml) and trial
tables (.csv), one folder per session. Run it again to regenerate raw/ (it is deterministic).

    python make_raw.py [raw-folder]
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

XML = """<?xml version='1.0'?>
<parameters>
 <acquisitionSystem>
  <nBits>16</nBits><nChannels>{channels}</nChannels><samplingRate>{rate}</samplingRate>
  <voltageRange>20</voltageRange><amplification>1000</amplification><offset>0</offset>
 </acquisitionSystem>
 <anatomicalDescription><channelGroups><group>{group}</group></channelGroups></anatomicalDescription>
</parameters>
"""

SESSIONS = {  # folder -> (samples, trials)
    "m01/2024-03-01": (1000, 3),
    "m01/2024-03-02": (1200, 4),
    "m02/2024-03-01": (800, 2),
}


def write_session(folder: Path, samples: int, trials: int, channels: int = 4, rate: int = 1000) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = folder.name
    values = [((i * 37 + c * 11) % 401) - 200 for i in range(samples) for c in range(channels)]
    (folder / f"{name}.dat").write_bytes(struct.pack(f"<{len(values)}h", *values))
    group = "".join(f"<channel>{c}</channel>" for c in range(channels))
    (folder / f"{name}.xml").write_text(XML.format(channels=channels, rate=rate, group=group))
    rows = ["start_time,stop_time,condition"]
    rows += [f"{t * 0.25:.2f},{t * 0.25 + 0.2:.2f},{'left' if t % 2 else 'right'}" for t in range(trials)]
    (folder / "trials.csv").write_text("\n".join(rows) + "\n")


def main(root: Path) -> None:
    for rel, (samples, trials) in SESSIONS.items():
        write_session(root / rel, samples, trials)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "raw")
