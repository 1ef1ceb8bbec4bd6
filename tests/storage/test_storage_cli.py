"""Through the `corral` command: local runs with transfer stages (skip-if-done, secrets canary in
state, logs and --debug output) and `corral push` / `corral pull` against moto S3."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from conftest import RcloneSetup
from storage_helpers import RCLONE, make_tree, needs_rclone, tree

MiB = 2**20


def _corral(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["corral", *args], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=120)


WORKFLOW = """\
name: move
items: [{session: s1}, {session: s2}]
stages:
  - name: fetch
    from: "vault:raw/{session}"
    to: "workspace://{session}/raw"
    filters: ["+ *.nwb", "- *"]
    outputs: ["workspace://{session}/raw"]
  - name: count
    needs: [fetch]
    command: "ls $CORRAL_WORKDIR/{session}/raw > $CORRAL_WORKDIR/{session}/files.txt"
  - name: publish
    needs: [count]
    from: "workspace://{session}"
    to: "results/{session}"
    outputs: ["results/{session}/files.txt"]
  - name: tidy
    kind: cleanup
    per: run
    needs: [publish]
"""


@needs_rclone
def test_local_run_moves_data_skips_done_work_and_leaks_no_secret(
    rclone_setup: RcloneSetup, tmp_path: Path, monkeypatch: Any
) -> None:
    # put the raw data behind the crypt remote (encrypted at rest in data:vault)
    src = make_tree(tmp_path / "seed", {"s1/a.nwb": "A", "s1/notes.txt": "n", "s2/b.nwb": "B"})
    env = {"RCLONE_CONFIG": str(rclone_setup.conf)}
    monkeypatch.setenv("RCLONE_CONFIG", str(rclone_setup.conf))
    r = subprocess.run(["rclone", "copy", str(src), "vault:raw"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wfdir = tmp_path / "wf"
    wfdir.mkdir()
    (wfdir / "workflow.yaml").write_text(WORKFLOW)

    first = _corral(["--debug", "run", "workflow.yaml"], wfdir, env)
    assert first.returncode == 0, first.stderr
    assert tree(wfdir / "results") == {
        "s1/files.txt": "a.nwb\n", "s1/raw/a.nwb": "A", "s2/files.txt": "b.nwb\n", "s2/raw/b.nwb": "B",
    }
    home = Path(os.environ["CORRAL_HOME"])
    run_id = first.stdout.strip().splitlines()[-1]
    assert not (home / "runs" / run_id / "workspace").exists()  # the cleanup stage removed it

    second = _corral(["--debug", "run", "workflow.yaml", "--json"], wfdir, env)
    assert second.returncode == 0, second.stderr
    status = _corral(["status", "--json"], wfdir, env)
    assert '"SKIPPED"' in status.stdout  # publish's outputs exist and are newer than its inputs

    # the canary (and rclone's obscured form of it) is nowhere corral wrote or printed
    written = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name == "state.db" for p in written) and any(p.suffix == ".err" for p in written)
    for secret in (rclone_setup.canary, rclone_setup.obscured):
        for p in written:
            assert secret.encode() not in p.read_bytes(), p
        for out in (first, second, status):
            assert secret not in out.stdout and secret not in out.stderr


def test_push_and_pull_s3_multipart(bucket: tuple[Any, str], tmp_path: Path) -> None:
    client, name = bucket
    make_tree(tmp_path / "results", {"s1/a.txt": "A", "s2/b.txt": "B"})
    (tmp_path / "results" / "big.bin").write_bytes(os.urandom(6 * MiB))
    r = _corral(["push", "results", f"s3://{name}/proj/results", "--chunk-size", "5MiB"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"s3://{name}/proj/results"
    head = client.head_object(Bucket=name, Key="proj/results/big.bin")
    assert head["ETag"].strip('"').endswith("-2")
    r = _corral(["pull", f"s3://{name}/proj/results", "back"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "back" / "s1") == {"a.txt": "A"}
    assert (tmp_path / "back" / "big.bin").read_bytes() == (tmp_path / "results" / "big.bin").read_bytes()


def test_push_pull_errors_are_one_line_with_a_hint(aws_light: str, tmp_path: Path) -> None:
    r = _corral(["pull", "s3://no-such-bucket-x/k", "x"], tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and "s3://no-such-bucket-x/k" in r.stderr and "\nhint: " in r.stderr
    r = _corral(["push", "missing-folder", "s3://bkt-1/x"], tmp_path)
    assert r.returncode == 1 and "missing-folder" in r.stderr
    r = _corral(["push", "a", "b"], tmp_path)
    assert r.returncode == 2 and "local path" in r.stderr
    r = _corral(["push", "a", "s3://bkt-1/x", "--chunk-size", "1MiB"], tmp_path)
    assert r.returncode == 2 and "5 MiB" in r.stderr


@needs_rclone
def test_pull_from_an_rclone_remote_and_a_runs_outputs(rclone_setup: RcloneSetup, tmp_path: Path) -> None:
    make_tree(rclone_setup.data, {"raw/s1/a.nwb": "A"})
    env = {"RCLONE_CONFIG": str(rclone_setup.conf)}
    r = _corral(["pull", "data:raw/s1", "got"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "got") == {"a.nwb": "A"}

    wfdir = tmp_path / "wf"
    make_tree(wfdir, {"in/s1.txt": "one", "in/s2.txt": "two"})
    (wfdir / "workflow.yaml").write_text(
        "name: w\nitems: [{s: s1}, {s: s2}]\nstages:\n"
        "  - name: up\n    command: 'tr a-z A-Z < in/{s}.txt > $CORRAL_WORKDIR/{s}.out'\n"
        "    outputs: ['workspace://{s}.out']\n"
    )
    run = _corral(["run", "workflow.yaml"], wfdir, env)
    assert run.returncode == 0, run.stderr
    run_id = run.stdout.strip().splitlines()[-1]
    r = _corral(["pull", "--run", run_id, "pulled"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "pulled") == {"up/s1/s1.out": "ONE", "up/s2/s2.out": "TWO"}
    calls = tmp_path / "rclone-calls"
    counting = tmp_path / "rclone-counting"
    counting.write_text(f"#!/bin/sh\necho \"$1\" >> {calls}\nexec {RCLONE} \"$@\"\n")
    counting.chmod(0o755)
    r = _corral(["push", "--run", run_id, "data:pushed"], tmp_path, {**env, "CORRAL_RCLONE": str(counting)})
    assert r.returncode == 0, r.stderr
    assert tree(rclone_setup.data / "pushed") == {"up/s1/s1.out": "ONE", "up/s2/s2.out": "TWO"}
    assert calls.read_text().split() == ["copy"]  # one rclone for the whole run, not one per file
    assert r.stdout.split() == ["data:pushed/up/s1/s1.out", "data:pushed/up/s2/s2.out"]
