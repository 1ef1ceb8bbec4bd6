"""A canary secret given through `secrets:` reaches the task and nothing corral writes or prints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import run_cli, write_workflow

from corral import api

CANARY = "canary-7f3a9c1e-do-not-leak"


def _all_bytes_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_env_secret_reaches_task_but_not_state_logs_or_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAB_TOKEN_SOURCE", CANARY)
    wf = write_workflow(tmp_path, """
name: secretive
items: [{s: a}, {s: b}]
stages:
  - name: use
    secrets: {API_TOKEN: "env:LAB_TOKEN_SOURCE"}
    command: test "$API_TOKEN" = "$(cat expected)" && echo ok-{s} > ok-{s}
  - name: fail
    needs: [use]
    secrets: {API_TOKEN: "env:LAB_TOKEN_SOURCE"}
    command: exit 3
""")
    (tmp_path / "expected").write_text(CANARY)
    res = run_cli("--debug", "run", str(wf))
    assert res.returncode == 1  # `fail` fails on purpose
    assert (tmp_path / "ok-a").exists() and (tmp_path / "ok-b").exists()  # the task saw the secret
    run_id = res.stdout.strip()
    outputs = [res.stdout, res.stderr]
    for args in (("status", run_id, "--json"), ("status", run_id, "--tasks"), ("logs", run_id, "fail[a]"),
                 ("plan", str(wf), "--json", "--tasks"), ("--debug", "resume", run_id)):
        r = run_cli(*args)
        outputs += [r.stdout, r.stderr]
    assert not any(CANARY in o for o in outputs)
    home = api.corral_home()
    assert CANARY.encode() not in _all_bytes_under(home)  # state db (+WAL), logs, workspace
    assert os.environ["LAB_TOKEN_SOURCE"] == CANARY


def test_missing_secret_source_is_refused_before_anything_runs(tmp_path: Path) -> None:
    wf = write_workflow(tmp_path, """
name: nosecret
items: [{s: a}]
stages:
  - name: use
    secrets: {API_TOKEN: "env:CORRAL_TEST_NOT_SET"}
    command: "true"
""")
    for verb in ("validate", "run"):
        res = run_cli(verb, str(wf))
        assert res.returncode == 2, res.stderr
        assert "CORRAL_TEST_NOT_SET, which is not set" in res.stderr and "Traceback" not in res.stderr
        assert res.stdout == ""  # no run id: nothing recorded
