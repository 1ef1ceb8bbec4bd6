"""CORRAL_HOME and what corral writes in it are the user's alone: the folder 0700, the state
database with its WAL/SHM files and every log file 0600 (issue 13: they were 0755/0644)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import corral.api as api
from corral.backends.base import RunOptions
from corral.model import RunState
from corral.spec import loads_workflow

WF = """
name: perms
items: [{s: a}, {s: b}]
stages:
  - {name: say, command: "echo out-{s} && echo err-{s} >&2"}
  - {name: broken, needs: [say], command: "/nonexistent/binary-{s}", retries: 0}
"""


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_corral_home_and_its_files_are_private_after_a_run(_isolated_home: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)  # the common default: what made everything 0755/0644 before
    try:
        wf = loads_workflow(WF)
        rec = api.run(wf, backend="local", options=RunOptions(wait=True))
    finally:
        os.umask(old)
    store = api.open_store("local")
    assert store.get_run(rec.run_id).state == RunState.FAILED  # a failing command's logs too
    home = _isolated_home
    assert _mode(home) == 0o700
    db = home / "state.db"
    files = [db] + [p for p in (home / "state.db-wal", home / "state.db-shm") if p.exists()]
    assert (home / "state.db-wal").exists()  # WAL mode: the -wal file exists while a connection is open
    logs = [p for p in home.rglob("*") if p.is_file() and p.suffix in (".out", ".err")]
    assert len(logs) >= 8  # 2 items x 2 stages x (out, err)
    bad = {str(p.relative_to(home)): oct(_mode(p)) for p in files + logs if _mode(p) & 0o077}
    assert bad == {}
    # Nothing anywhere under the home is readable by others (folders included).
    exposed = {str(p.relative_to(home)): oct(_mode(p)) for p in home.rglob("*")
               if p.is_file() and _mode(p) & 0o077 and ("logs" in p.parts or p.name.startswith("state.db"))}
    assert exposed == {}
    assert any("err-a" in p.read_text() for p in logs)


def test_an_existing_world_readable_state_db_is_tightened(_isolated_home: Path) -> None:
    from corral.state.sqlite import SqliteStore

    _isolated_home.mkdir(parents=True)
    db = _isolated_home / "state.db"
    SqliteStore(db)._db.close()
    os.chmod(db, 0o644)  # as an older corral left it
    SqliteStore(db)
    assert _mode(db) == 0o600
