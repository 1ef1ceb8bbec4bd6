"""What the CLI prints for people and for scripts: labels as written, JSON streamed and complete."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from helpers import run_cli

from corral.jsonout import write_json

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart"


def _quickstart(tmp_path: Path) -> Path:
    dst = tmp_path / "quickstart"
    shutil.copytree(QUICKSTART, dst, ignore=shutil.ignore_patterns("out"))
    res = run_cli("run", str(dst / "workflow.yaml"))
    assert res.returncode == 0, res.stderr
    return dst


def test_status_tasks_shows_stage_and_item_as_written(tmp_path: Path) -> None:
    _quickstart(tmp_path)
    res = run_cli("status", "--tasks")
    assert res.returncode == 0, res.stderr
    labels = [line.split()[0] for line in res.stderr.splitlines() if "[" in line.split(" ")[0]]
    assert "fetch[mouse1-day1]" in labels  # rich would have read [mouse1-day1] as markup and dropped it
    assert "summarize[run]" in labels
    assert len(labels) == 9


def test_output_off_a_terminal_is_not_cut_at_80_columns(tmp_path: Path) -> None:
    _quickstart(tmp_path)
    res = run_cli("status", "--all")
    run_id = json.loads(run_cli("status", "--json").stdout)["run_id"]
    assert run_id in res.stderr  # whole, on one line, for copying
    title = [line for line in run_cli("status").stderr.splitlines() if line.startswith("run ")]
    assert title and title[0].endswith("succeeded")  # the title is not wrapped onto a second line


def test_status_json_lists_every_task_once(tmp_path: Path) -> None:
    _quickstart(tmp_path)
    data = json.loads(run_cli("status", "--json").stdout)
    assert data["state"] == "SUCCEEDED"
    assert len(data["tasks"]) == 9 == len({t["task_id"] for t in data["tasks"]})
    assert {t["stage"] for t in data["tasks"]} == {"fetch", "process", "summarize"}


def test_write_json_streams_iterators_and_matches_json_dumps() -> None:
    value = {
        "a": [], "b": iter([]), "c": {}, "d": [1, {"x": iter([1, 2])}, "é"],
        "tasks": ({"i": i, "s": f"t{i}", "n": None} for i in range(3)), "t": (True, 1.5),
    }
    buf = io.StringIO()
    write_json(value, buf)
    expected = {"a": [], "b": [], "c": {}, "d": [1, {"x": [1, 2]}, "é"],
                "tasks": [{"i": i, "s": f"t{i}", "n": None} for i in range(3)], "t": [True, 1.5]}
    assert json.loads(buf.getvalue()) == expected
    lines = buf.getvalue().splitlines()
    assert '    {"i": 0, "s": "t0", "n": null},' in lines  # one task per line


def test_write_json_does_not_hold_a_streamed_list(tmp_path: Path) -> None:
    produced: list[int] = []

    def rows():  # type: ignore[no-untyped-def]
        for i in range(1000):
            produced.append(i)
            yield {"i": i}

    class Probe(io.StringIO):
        max_ahead = 0

        def write(self, s: str) -> int:
            if s.startswith('{"i": '):
                written = int(s[6:-1])
                self.max_ahead = max(self.max_ahead, len(produced) - 1 - written)
            return super().write(s)

    buf = Probe()
    write_json({"rows": rows()}, buf)
    assert buf.max_ahead == 0  # each row is written before the next one is made
    assert len(json.loads(buf.getvalue())["rows"]) == 1000


def test_a_resumed_task_s_time_is_its_new_attempt_not_the_gap(tmp_path: Path) -> None:
    import time

    from corral import api

    flag = tmp_path / "ok"
    wf = tmp_path / "wf.yaml"
    wf.write_text(f"name: gap\nitems: [{{i: 1}}]\nstages:\n  - {{name: a, command: 'test -e {flag}'}}\n")
    res = run_cli("run", str(wf))
    assert res.returncode == 1
    run_id = json.loads(run_cli("status", "--json").stdout)["run_id"]
    assert f"corral resume {run_id}`" in res.stderr  # local: no --backend flag to add
    flag.write_text("")
    before = time.time()
    assert run_cli("resume", run_id).returncode == 0
    store = api.open_store("local")
    (task,) = store.get_tasks(run_id)
    assert task.started_at is not None and task.started_at >= before
    assert task.attempts == 2


def test_install_commands_in_the_docs_name_no_package_index_release() -> None:
    """corral is installed from its checkout (`pip install -e`); no index has a `corral[...]` release."""
    root = Path(__file__).parents[2]
    docs = [root / "README.md", *root.glob("examples/*/README.md")]
    for doc in docs:
        for line in doc.read_text().splitlines():
            if "pip install" in line and "corral[" in line:
                raise AssertionError(f"{doc.relative_to(root)}: {line.strip()}")


def test_corral_run_resolves_the_items_once(tmp_path: Path) -> None:
    """`corral run` plans once: an item source is read one time (a BIDS listing on S3 costs money)."""
    import subprocess
    import sys

    counter = tmp_path / "reads"
    script = (
        "import sys, importlib\n"
        "p = importlib.import_module('corral.plan')  # corral.plan is also the API function\n"
        "orig = p.resolve_items\n"
        "def counted(*a, **k):\n"
        f"    open({str(counter)!r}, 'a').write('x')\n"
        "    return orig(*a, **k)\n"
        "p.resolve_items = counted\n"
        "from corral.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    wf = tmp_path / "wf.yaml"
    wf.write_text("name: once\nitems: [{i: 1}, {i: 2}]\nstages:\n  - {name: a, command: 'true'}\n")
    res = subprocess.run([sys.executable, "-c", script, "run", str(wf)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert counter.read_text() == "x"


def test_logs_follow_shows_both_streams_and_goes_on_into_the_retry(tmp_path: Path) -> None:
    import subprocess

    from helpers import corral_cmd, wait_for

    go = tmp_path / "go"
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        "name: follow\nitems: [{i: x}]\nstages:\n  - name: a\n    retries: 1\n    command: >-\n"
        f"      if [ -e {tmp_path}/tried ]; then echo out-2; echo err-2 >&2; exit 0; fi;\n"
        f"      touch {tmp_path}/tried; echo out-1; echo err-1 >&2;\n"
        f"      i=0; while [ ! -e {go} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; exit 1\n"
    )
    run = subprocess.Popen(corral_cmd("run", str(wf)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "tried").exists(), 30, "the first attempt to start")
        run_id = wait_for(lambda: json.loads(run_cli("status", "--json").stdout or "null") and
                          json.loads(run_cli("status", "--json").stdout)["run_id"], 30, "the run's record")
        follow = subprocess.Popen(corral_cmd("logs", run_id, "a[x]", "-f"), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert follow.stdout is not None
        seen = []
        for line in follow.stdout:  # attempt 1 is still running: its output so far, then go on
            seen.append(line.rstrip("\n"))
            if seen[-1] == "err-1":
                break
        go.touch()
        rest, err = follow.communicate(timeout=60)
        out = "\n".join(seen) + "\n" + rest
        assert follow.returncode == 0, err
        assert run.wait(timeout=60) == 0
    finally:
        for p in (run,):
            if p.poll() is None:
                p.kill()
    lines = out.splitlines()
    assert "out-1" in lines and "err-1" in lines  # stderr is shown (and followed), not only stdout
    i = lines.index("err-1")
    assert any(line.startswith("==> stderr of a[x], attempt 1") for line in lines[:i])
    # it went on into the retry, with a header naming it, and stopped by itself when the task ended
    j = next(k for k, line in enumerate(lines) if "attempt 2" in line and line.startswith("==> "))
    assert j > i and "out-2" in lines[j:] and "err-2" in lines[j:]


def test_watching_a_local_run_prints_no_aws_cost(tmp_path: Path) -> None:
    _quickstart(tmp_path)
    res = run_cli("status", "--watch", "--interval", "0.2")
    assert res.returncode == 0, res.stderr
    assert "succeeded" in res.stderr
    assert "cost:" not in res.stderr  # a local run has no AWS bill (`corral cost` estimates one)
