"""The HTML run report: built from a real local run, checked in real headless Chromium."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from corral import api
from corral.backends.base import RunOptions
from corral.model import AttemptRecord, RunRecord, RunState, TaskRecord, TaskState
from corral.report import COLOURS, ReportData, bars, collect, render, write_report

sys.path.insert(0, str(Path(__file__).parent.parent))
from helpers import run_cli  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
EVIL = ('</pre></div><script>document.title="pwned"</script><svg><rect class="bar" width="900" height="900"/>'
        '</svg><img src="http://127.0.0.1:9/beacon.png"> & "quotes" \'single\'')
WINDOW = (1200, 800)

WORKFLOW = """
name: rep
items: [{k: a}, {k: b}, {k: c}]
stages:
  - name: work
    retries: 1
    command: >-
      if [ "$k" = b ] && [ ! -e "$CORRAL_WORKDIR/b.once" ]; then
      touch "$CORRAL_WORKDIR/b.once"; echo "first try fails" >&2; exit 3; fi; echo "work $k"
  - name: check
    needs: [work]
    command: >-
      if [ "$k" = c ]; then echo "checking c"; cat evil.txt >&2; exit 5; fi
  - name: after
    needs: [check]
    command: "true"
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One real local run: 9 attempts (a retried failure, a failure with hostile stderr, one upstream-failed)."""
    home = tmp_path_factory.mktemp("home")
    base = tmp_path_factory.mktemp("wf")
    (base / "evil.txt").write_text(EVIL + "\n")
    (base / "workflow.yaml").write_text(WORKFLOW)
    mp = pytest.MonkeyPatch()
    mp.setenv("CORRAL_HOME", str(home))
    try:
        rec = api.run(base / "workflow.yaml", "local", options=RunOptions(runtime="process", max_parallel=2))
    finally:
        mp.undo()
    assert rec.state == RunState.FAILED
    return home, rec.run_id


def _store(home: Path):  # type: ignore[no-untyped-def]
    from corral.state.sqlite import SqliteStore

    return SqliteStore(home / "state.db")


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    profile = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    height = ctype = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    bpp = 4 if ctype == 6 else 3
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif f == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 0xFF
        elif f == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif f == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def _count_colour(rows: list[bytes], bpp: int, rgb: tuple[int, int, int], tol: int = 6) -> int:
    n = 0
    for r in rows:
        for i in range(0, len(r), bpp):
            if abs(r[i] - rgb[0]) <= tol and abs(r[i + 1] - rgb[1]) <= tol and abs(r[i + 2] - rgb[2]) <= tol:
                n += 1
    return n


def _hex(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


# -- the page, without a browser -------------------------------------------------------------------
def test_report_content_from_a_real_run(finished_run: tuple[Path, str], tmp_path: Path) -> None:
    home, run_id = finished_run
    store = _store(home)
    rec = store.get_run(run_id)
    from corral.backends.local import LocalBackend

    data = collect(store, run_id, backend=LocalBackend(home))
    attempts = [a for ats in data.attempts.values() for a in ats]
    assert len(attempts) == 9 and len(bars(data)) == 9
    assert sorted(a.state.value for a in attempts).count("FAILED") == 2  # work[b] try 1, check[c]
    check_c = next(t for t in data.tasks if t.label == "check[c]")
    assert data.logs[check_c.task_id][-1].startswith("</pre></div><script>")  # the tail of its output, raw
    page = render(data)
    assert "<script" not in page and "&lt;script&gt;" in page  # escaped, never markup
    assert 'src="http' not in page and "<img" not in page
    assert page.count('<rect class="bar"') == 9
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert "after[c]" in page  # listed as not run (upstream failed)
    assert data.cost is not None and data.cost.total_usd > 0
    assert data.cost.estimated_attempts == 9  # a local run: priced on the estimate's instance type
    assert rec.state == RunState.FAILED
    store.close()


def test_render_escapes_every_field_and_draws_running_attempts() -> None:
    run = RunRecord(run_id="r<1>", workflow_name="w&<b>", backend="aws", created_at=1000.0)
    tasks = [
        TaskRecord(run_id=run.run_id, task_id="t1", stage="s<x>", item_key='i"><svg onload=alert(1)>', item_index=0,
                   state=TaskState.FAILED, attempts=1, reason="<b>bold</b>", started_at=1000.0, ended_at=1060.0),
        TaskRecord(run_id=run.run_id, task_id="t2", stage="s<x>", item_key="ok", item_index=1,
                   state=TaskState.RUNNING, attempts=1, started_at=1010.0),
        TaskRecord(run_id=run.run_id, task_id="t3", stage="s<x>", item_key="later", item_index=2),
    ]
    attempts = {
        "t1": [AttemptRecord(run_id=run.run_id, task_id="t1", attempt=1, state=TaskState.FAILED,
                             reason="CannotPullContainerError: <evil>", started_at=1000.0, ended_at=1060.0)],
        "t2": [AttemptRecord(run_id=run.run_id, task_id="t2", attempt=1, state=TaskState.RUNNING, started_at=1010.0)],
        "t3": [],
    }
    data = ReportData(run=run, tasks=tasks, attempts=attempts, cost=None, logs={"t1": ["<iframe src=x>"]},
                      generated_at=1100.0)
    page = render(data)
    assert page.count('<rect class="bar"') == 2
    assert 'data-state="RUNNING"' in page and 'data-state="FAILED"' in page
    for raw in ("<svg onload", "<b>bold", "<evil>", "<iframe", "r<1>", "w&<b>", "s<x>"):
        assert raw not in page, raw
    assert "&lt;iframe src=x&gt;" in page and "CannotPullContainerError: &lt;evil&gt;" in page


# -- the page in Chromium ------------------------------------------------------------------------------
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt install chromium)")
def test_report_renders_one_bar_per_attempt_in_chromium(finished_run: tuple[Path, str], tmp_path: Path) -> None:
    home, run_id = finished_run
    out = tmp_path / "report.html"
    res = run_cli("report", run_id, "-o", str(out), env={"CORRAL_HOME": str(home)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out) and "9 attempts" in res.stderr
    store = _store(home)
    n_attempts = sum(len(store.get_attempts(run_id, t.task_id)) for t in store.get_tasks(run_id))
    store.close()
    assert n_attempts == 9

    # 1. The file as shipped (CSP on, no script): the DOM Chromium builds from it.
    dom = _chromium(["--dump-dom", out.as_uri()], tmp_path).stdout
    found = re.findall(r'<rect class="bar" data-state="([A-Z_]+)"', dom)
    assert len(found) == n_attempts
    assert sorted(found) == sorted(["SUCCEEDED"] * 7 + ["FAILED"] * 2)
    assert "<script" not in dom and "&lt;script&gt;" in dom  # the hostile log is text
    assert not re.search(r"<(img|iframe|link|object|embed)\b", dom)
    assert "<title>corral run " in dom

    # 2. Laid out: the same page with a probe script (and no CSP) counts bars with a real box and their colour.
    probe = tmp_path / "probe.html"
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", out.read_text())
    red = "rgb({}, {}, {})".format(*_hex(COLOURS["FAILED"]))
    script = (
        "<script>const b=[...document.querySelectorAll('#timeline rect.bar')];"
        "const shown=b.filter(r=>{const x=r.getBoundingClientRect();return x.width>=1&&x.height>=1;});"
        f"const red=b.filter(r=>getComputedStyle(r).fill==='{red}');"
        "const svg=document.getElementById('timeline').getBoundingClientRect();"
        "const inside=shown.filter(r=>{const x=r.getBoundingClientRect();"
        "return x.left>=svg.left-0.5&&x.right<=svg.right+0.5&&x.top>=svg.top-0.5&&x.bottom<=svg.bottom+0.5;});"
        "document.body.setAttribute('data-probe',[b.length,shown.length,inside.length,red.length].join(','));"
        "</script>"
    )
    probe.write_text(text.replace("</body>", script + "</body>"))
    dom2 = _chromium(["--dump-dom", probe.as_uri()], tmp_path).stdout
    m = re.search(r'data-probe="(\d+),(\d+),(\d+),(\d+)"', dom2)
    assert m, "the probe script did not run"
    assert tuple(int(x) for x in m.groups()) == (9, 9, 9, 2)

    # 3. A screenshot: a PNG of the window's size, with the timeline's colours in it.
    shot = tmp_path / "report.png"
    _chromium([f"--screenshot={shot}", out.as_uri()], tmp_path)
    data = shot.read_bytes()
    assert len(data) > 5000
    width, height, rows = _png_pixels(data)
    assert (width, height) == WINDOW
    bpp = len(rows[0]) // width
    # Seven green bars (and the legend's swatch), two red. Only exact-colour pixels count, and a short
    # attempt's bar is 1.5 px wide, anti-aliased at its edges: count what even the thinnest ones show.
    assert _count_colour(rows, bpp, _hex(COLOURS["SUCCEEDED"])) > 7 * 8
    assert _count_colour(rows, bpp, _hex(COLOURS["FAILED"])) > 2 * 8


def test_write_report_refuses_an_unwritable_path(finished_run: tuple[Path, str], tmp_path: Path) -> None:
    from corral.errors import UsageError

    home, run_id = finished_run
    store = _store(home)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="cannot write the report"):
        write_report(store, run_id, blocker / "sub" / "r.html")
    store.close()


def test_big_runs_pack_attempts_into_lanes_without_overlap() -> None:
    import time as _time

    run = RunRecord(run_id="big", workflow_name="w", backend="aws", created_at=0.0)
    tasks, attempts = [], {}
    for i in range(3000):  # 60 waves of 50 at once, 100 s each; every 7th task was retried once
        start = (i // 50) * 100.0
        tid = f"t{i:05d}"
        tasks.append(TaskRecord(run_id="big", task_id=tid, stage="s", item_key=str(i), item_index=i,
                                state=TaskState.SUCCEEDED, attempts=1, started_at=start, ended_at=start + 100))
        ats = [AttemptRecord(run_id="big", task_id=tid, attempt=1, state=TaskState.SUCCEEDED,
                             started_at=start, ended_at=start + 100)]
        if i % 7 == 0:
            ats = [AttemptRecord(run_id="big", task_id=tid, attempt=1, state=TaskState.FAILED,
                                 started_at=start, ended_at=start + 40),
                   AttemptRecord(run_id="big", task_id=tid, attempt=2, state=TaskState.SUCCEEDED,
                                 started_at=start + 40, ended_at=start + 100)]
        attempts[tid] = ats
    data = ReportData(run=run, tasks=tasks, attempts=attempts, cost=None, generated_at=6000.0)
    t = _time.perf_counter()
    page = render(data)
    assert _time.perf_counter() - t < 5
    n = sum(len(a) for a in attempts.values())
    rects = re.findall(r'<rect class="bar"[^>]* x="([\d.]+)" y="(\d+)" width="([\d.]+)"', page)
    assert len(rects) == n == 3000 + 429
    assert ">50 lanes<" in page  # as tall as the run was wide
    by_lane: dict[str, list[tuple[float, float]]] = {}
    for x, y, w in rects:
        by_lane.setdefault(y, []).append((float(x), float(x) + float(w)))
    assert len(by_lane) == 50
    for spans in by_lane.values():
        spans.sort()
        assert all(a[1] <= b[0] + 0.01 for a, b in zip(spans, spans[1:], strict=False))


def test_timeline_labels_of_150_tasks_never_overlap_and_reasons_are_not_repeated() -> None:
    run = RunRecord(run_id="r", workflow_name="w", backend="local", created_at=0.0)
    tasks, attempts = [], {}
    for i in range(150):
        tid = f"t{i:03d}"
        tasks.append(TaskRecord(run_id="r", task_id=tid, stage="convert", item_key=f"ses-{i:03d}", item_index=i,
                                state=TaskState.FAILED, attempts=1, exit_code=3, reason="exit code 3",
                                started_at=float(i), ended_at=i + 10.0))
        attempts[tid] = [AttemptRecord(run_id="r", task_id=tid, attempt=1, state=TaskState.FAILED, exit_code=3,
                                       reason="exit code 3", started_at=float(i), ended_at=i + 10.0)]
    page = render(ReportData(run=run, tasks=tasks, attempts=attempts, cost=None, generated_at=200.0))
    ys = [int(y) for y in re.findall(r'<text x="4" y="(\d+)">convert\[ses-', page)]
    assert len(ys) == 150  # every task keeps its label
    assert min(b - a for a, b in zip(ys, ys[1:], strict=False)) >= 12  # 11 px text needs that much room
    assert "exit code 3 — exit code 3" not in page and "exit 3 — exit code 3" not in page
    assert "exit code 3" in page
