"""Transfers with the real rclone binary: local → local, remotes from a test rclone.conf, the
private config copy (0600, only the used remotes, deleted afterwards), and the canary secret."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import RcloneSetup
from storage_helpers import make_tree, needs_rclone, tree

from corral import storage
from corral.errors import StorageError
from corral.storage import rclone

pytestmark = needs_rclone


def _run(argv: list[str], extra: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env={**os.environ, **extra}, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload,no-any-return]


def _argv(tmp_path: Path, src: str, dst: str, *, mode: str = "copy", filters: list[str] | None = None,
          conf: Path | None = None) -> tuple[list[str], dict[str, str]]:
    return storage.transfer_argv(
        src, dst, mode=mode, filters=filters or [], run_id="r1", workdir=str(tmp_path / "ws"), base_dir=tmp_path,
        rclone_config=conf,
    )


def test_local_to_workspace_copy_with_filters(tmp_path: Path) -> None:
    make_tree(tmp_path / "raw" / "s1", {"a.nwb": "A", "b.txt": "B", "sub/c.nwb": "C"})
    argv, extra = _argv(tmp_path, "raw/s1", "workspace://s1/raw", filters=["+ *.nwb", "- *"])
    r = _run(argv, extra)
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "ws" / "s1" / "raw") == {"a.nwb": "A", "sub/c.nwb": "C"}


def test_sync_deletes_what_the_source_lacks_and_copy_does_not(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"a": "1"})
    make_tree(tmp_path / "dst", {"a": "old", "stale": "x"})
    r = _run(*_argv(tmp_path, "src", "dst", mode="copy"))
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "dst") == {"a": "1", "stale": "x"}
    r = _run(*_argv(tmp_path, "src", "dst", mode="sync"))
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "dst") == {"a": "1"}


@pytest.mark.parametrize("dest", [".", "..", "/"])
def test_sync_refuses_to_wipe_the_workflow_folder_or_above(tmp_path: Path, dest: str) -> None:
    make_tree(tmp_path / "src", {"a": "1"})
    with pytest.raises(StorageError, match="refusing to sync"):
        _argv(tmp_path, "src", dest, mode="sync")


def test_failed_transfer_exits_non_zero(tmp_path: Path) -> None:
    r = _run(*_argv(tmp_path, "does-not-exist", "workspace://x"))
    assert r.returncode != 0


def test_bad_filter_is_refused_before_running(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as ei:
        _argv(tmp_path, "a", "b", filters=["*.nwb"])
    assert "'*.nwb'" in ei.value.message and "+ PATTERN" in (ei.value.hint or "")


def test_missing_rclone_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StorageError) as ei:
        _argv(tmp_path, "a", "b")
    assert "rclone is not installed" in ei.value.message
    assert "apt-get install rclone" in (ei.value.hint or "")


def test_unknown_remote_is_named(rclone_setup: RcloneSetup, tmp_path: Path) -> None:
    with pytest.raises(StorageError) as ei:
        _argv(tmp_path, "gdrive:raw", "workspace://x", conf=rclone_setup.conf)
    assert "'gdrive'" in ei.value.message and str(rclone_setup.conf) in ei.value.message
    assert "data" in (ei.value.hint or "")


def test_config_subset_follows_references_and_leaves_the_rest(rclone_setup: RcloneSetup) -> None:
    cfg = rclone.read_config(rclone_setup.conf)
    assert sorted(rclone.config_subset(cfg, ["vault"])) == ["data", "vault"]
    assert sorted(rclone.config_subset(cfg, ["data"])) == ["data"]
    text = rclone.render_config(rclone.config_subset(cfg, ["vault"]))
    assert rclone_setup.canary not in text and "AKIAUNUSED" not in text


def test_encrypted_config_is_refused_with_a_hint(tmp_path: Path) -> None:
    conf = tmp_path / "enc.conf"
    conf.write_text("# Encrypted rclone configuration File\n\nRCLONE_ENCRYPT_V0:\nabcdef\n")
    with pytest.raises(StorageError, match="encrypted") as ei:
        _argv(tmp_path, "data:x", "workspace://x", conf=conf)
    assert "RCLONE_CONFIG_" in (ei.value.hint or "")


def test_transfer_through_a_remote_leaks_no_secret(rclone_setup: RcloneSetup, tmp_path: Path) -> None:
    """Copy local → vault: (crypt over data:) → workspace and back; the canary (and its obscured
    form) appears in no argv, extra env or output, and no config copy is left behind."""
    make_tree(tmp_path / "raw", {"a.bin": "secret payload", "sub/b.bin": "more"})
    leftovers_before = set(rclone._private_dir().glob("*.conf"))
    argv, extra = _argv(tmp_path, "raw", "vault:s1", conf=rclone_setup.conf)
    up = _run(argv, extra)
    assert up.returncode == 0, up.stderr
    stored = [p for p in rclone_setup.data.rglob("*") if p.is_file()]
    assert len(stored) == 2 and all(p.relative_to(rclone_setup.data).parts[0] == "vault" for p in stored)
    assert all(b"secret payload" not in p.read_bytes() for p in stored)  # encrypted by crypt
    argv2, extra2 = _argv(tmp_path, "vault:s1", "workspace://s1", conf=rclone_setup.conf)
    down = _run(argv2, extra2)
    assert down.returncode == 0, down.stderr
    assert tree(tmp_path / "ws" / "s1") == {"a.bin": "secret payload", "sub/b.bin": "more"}
    for secret in (rclone_setup.canary, rclone_setup.obscured):
        for blob in (argv, extra, argv2, extra2, up.stdout, up.stderr, down.stdout, down.stderr):
            assert secret not in str(blob)
    assert set(rclone._private_dir().glob("*.conf")) == leftovers_before


def _fake_rclone(tmp_path: Path, *, sleep: bool = False) -> tuple[Path, Path]:
    """A stand-in for rclone that records its config file's path, mode and content."""
    record = tmp_path / "record"
    fake = tmp_path / "fake-rclone"
    fake.write_text(
        "#!/bin/sh\n"
        f'stat -c %a "$RCLONE_CONFIG" > "{record}.mode"\n'
        f'cat "$RCLONE_CONFIG" > "{record}.conf"\n'
        f'echo "$RCLONE_CONFIG" > "{record}.tmp"\n'
        f'printf %s "$AWS_CA_BUNDLE" > "{record}.ca"\n'
        + ("exec sleep 60\n" if sleep else "exit 3\n")
    )
    fake.chmod(0o755)
    return fake, record


def test_private_config_is_0600_holds_only_used_remotes_and_is_deleted(
    rclone_setup: RcloneSetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, record = _fake_rclone(tmp_path)
    monkeypatch.setenv("CORRAL_RCLONE", str(fake))
    argv, extra = _argv(tmp_path, "vault:x", "workspace://x", conf=rclone_setup.conf)
    r = _run(argv, extra)
    assert r.returncode == 3  # rclone's exit code is the task's
    assert Path(f"{record}.mode").read_text().strip() == "600"
    copied = Path(f"{record}.conf").read_text()
    assert "[vault]" in copied and "[data]" in copied and "[unused]" not in copied
    assert rclone_setup.obscured in copied and rclone_setup.canary not in copied
    tmp_conf = Path(Path(f"{record}.tmp").read_text().strip())
    assert tmp_conf != rclone_setup.conf and not tmp_conf.exists()
    d = tmp_conf.parent
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert Path(f"{record}.ca").read_text() == ""  # never handed to rclone's AWS SDK


def test_private_config_is_deleted_when_the_task_is_terminated(
    rclone_setup: RcloneSetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, record = _fake_rclone(tmp_path, sleep=True)
    monkeypatch.setenv("CORRAL_RCLONE", str(fake))
    argv, extra = _argv(tmp_path, "vault:x", "workspace://x", conf=rclone_setup.conf)
    proc = subprocess.Popen(argv, env={**os.environ, **extra}, start_new_session=True)
    tmp_marker = Path(f"{record}.tmp")
    deadline = time.monotonic() + 30
    while not (tmp_marker.exists() and tmp_marker.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)  # polling a file the child writes, bounded
    tmp_conf = Path(tmp_marker.read_text().strip())
    assert tmp_conf.exists()
    os.killpg(proc.pid, signal.SIGTERM)  # what the local scheduler does on cancel/timeout
    assert proc.wait(timeout=30) != 0
    assert not tmp_conf.exists()


def test_stale_config_copy_of_a_killed_wrapper_is_swept(rclone_setup: RcloneSetup) -> None:
    d = rclone._private_dir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = d / f"{dead.pid}-zzz.conf"
    stale.write_text("[x]\ntype = alias\n")
    with rclone.temp_config(["data"], config_path=rclone_setup.conf) as p:
        assert p.exists()
    assert not stale.exists() and not p.exists()


def test_outputs_exist_on_an_rclone_remote(rclone_setup: RcloneSetup, tmp_path: Path) -> None:
    make_tree(rclone_setup.data, {"out/s1/r.txt": "x"})
    make_tree(tmp_path, {"in.txt": "i"})
    t = time.time() - 100
    os.utime(tmp_path / "in.txt", (t, t))
    kw = {"run_id": "r", "workdir": str(tmp_path / "ws"), "base_dir": tmp_path, "rclone_config": rclone_setup.conf}
    assert storage.outputs_exist(["data:out/s1"], ["in.txt"], **kw) is True  # type: ignore[arg-type]
    assert storage.outputs_exist(["data:out/s1/r.txt"], [], **kw) is True  # type: ignore[arg-type]
    assert storage.outputs_exist(["data:out/s2"], [], **kw) is False  # type: ignore[arg-type]
    os.utime(tmp_path / "in.txt")  # input now newer than the output
    t = time.time() - 50
    os.utime(rclone_setup.data / "out/s1/r.txt", (t, t))
    assert storage.outputs_exist(["data:out/s1"], ["in.txt"], **kw) is False  # type: ignore[arg-type]


def test_check_stage_refuses_unknown_remote_before_running(rclone_setup: RcloneSetup) -> None:
    from corral.spec import Stage

    ok = Stage.model_validate({"name": "fetch", "from": "data:raw/{session}", "to": "workspace://{session}"})
    storage.check_stage(ok, rclone_config=rclone_setup.conf)
    bad = Stage.model_validate({"name": "fetch", "from": "gdrive:raw/{session}", "to": "s3://{bucket}/x"})
    with pytest.raises(StorageError) as ei:
        storage.check_stage(bad, rclone_config=rclone_setup.conf)
    assert ei.value.message.startswith("stage 'fetch': rclone remote 'gdrive'")


def test_check_workflow_checks_inputs_and_outputs_of_every_stage(rclone_setup: RcloneSetup) -> None:
    from corral.spec import loads_workflow

    wf = loads_workflow(
        "name: w\nitems: [{s: a}]\nstages:\n"
        "  - {name: ok, command: 'true', outputs: ['data:out/{s}', 's3://{s}-bucket/x', 'workspace://{s}']}\n"
        "  - {name: bad, command: 'true', inputs: ['https://example.org/{s}']}\n"
    )
    storage.check_stage(wf.stages[0], rclone_config=rclone_setup.conf)
    with pytest.raises(StorageError) as ei:
        storage.check_workflow(wf, rclone_config=rclone_setup.conf)
    assert ei.value.message.startswith("stage 'bad': https://")
