"""URIs, skip-if-outputs-exist (local files and folders) and workspace cleanup."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from storage_helpers import make_tree, tree

from corral import storage
from corral.errors import StorageError
from corral.storage.uri import parse, remote_names

# -- URIs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "kind", "path", "extra"),
    [
        ("workspace://s1/raw", "local", "/w/run/s1/raw", {}),
        ("workspace://", "local", "/w/run", {}),
        ("rel/x.nwb", "local", "/base/rel/x.nwb", {}),
        ("./odd:name", "local", "/base/odd:name", {}),
        ("/abs/y", "local", "/abs/y", {}),
        ("file:///abs/z", "local", "/abs/z", {}),
        ("s3://my-bucket/a/b", "s3", "a/b", {"bucket": "my-bucket"}),
        ("s3://my-bucket", "s3", "", {"bucket": "my-bucket"}),
        ("gdrive:raw/s1", "remote", "raw/s1", {"remote": "gdrive"}),
        ("gd,shared_with_me=true:x", "remote", "x", {"remote": "gd"}),
        (":s3,endpoint='http://127.0.0.1:9':b/k", "remote", "b/k", {"remote": ""}),
    ],
)
def test_parse(uri: str, kind: str, path: str, extra: dict[str, str]) -> None:
    loc = parse(uri, workdir="/w/run", base_dir=Path("/base"))
    assert (loc.kind, loc.path) == (kind, path)
    for k, v in extra.items():
        assert getattr(loc, k) == v


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("workspace://../other-run/x", "inside the run's workspace"),
        ("workspace:///etc", "inside the run's workspace"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket"),
        ("https://example.org/x", "not supported"),
        ("file://relative", "absolute path"),
        ("", "empty"),
    ],
)
def test_parse_errors_name_the_uri(uri: str, words: str) -> None:
    with pytest.raises(StorageError) as ei:
        parse(uri, workdir="/w/run", base_dir=Path("/base"))
    assert words in ei.value.message
    assert ei.value.hint
    assert "\n" not in ei.value.message


def test_resolve_uri_contract() -> None:
    kw = {"run_id": "r1", "workdir": "/w/r1", "base_dir": Path("/base")}
    assert storage.resolve_uri("workspace://a/b", **kw) == "/w/r1/a/b"
    assert storage.resolve_uri("out/x", **kw) == "/base/out/x"
    assert storage.resolve_uri("s3://bkt-1/k", **kw) == "s3://bkt-1/k"
    assert storage.resolve_uri("gdrive:raw", **kw) == "gdrive:raw"


def test_remote_names() -> None:
    uris = ["gdrive:raw/a", "s3://b1-x/c", "workspace://x", "rel/p", "dbx:", ":s3:b/k", "/abs"]
    assert remote_names(uris) == {"gdrive", "dbx"}


# -- skip-if-outputs-exist ----------------------------------------------------------------------
def _age(p: Path, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    os.utime(p, (t, t))


def _exists(tmp_path: Path, outputs: list[str], inputs: list[str]) -> bool:
    return storage.outputs_exist(outputs, inputs, run_id="r", workdir=str(tmp_path / "ws"), base_dir=tmp_path)


def test_no_outputs_never_skips(tmp_path: Path) -> None:
    assert _exists(tmp_path, [], []) is False


def test_missing_output(tmp_path: Path) -> None:
    make_tree(tmp_path, {"in.txt": "x", "a.out": "1"})
    assert _exists(tmp_path, ["a.out", "b.out"], ["in.txt"]) is False


def test_existing_newer_outputs_skip(tmp_path: Path) -> None:
    make_tree(tmp_path, {"in.txt": "x", "a.out": "1", "ws/s1/res.txt": "2"})
    _age(tmp_path / "in.txt", 100)
    assert _exists(tmp_path, ["a.out", "workspace://s1/res.txt"], ["in.txt"]) is True


def test_output_older_than_input_reruns(tmp_path: Path) -> None:
    make_tree(tmp_path, {"in.txt": "x", "a.out": "1"})
    _age(tmp_path / "a.out", 100)
    assert _exists(tmp_path, ["a.out"], ["in.txt"]) is False


def test_missing_input_does_not_prevent_skip(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a.out": "1"})
    assert _exists(tmp_path, ["a.out"], ["gone.txt"]) is True


def test_folders_compare_oldest_output_part_with_newest_input_part(tmp_path: Path) -> None:
    make_tree(tmp_path, {"in/a": "1", "in/b": "2", "out/x": "3", "out/y": "4"})
    for p, age in (("in/a", 300), ("in/b", 200), ("out/x", 100), ("out/y", 50)):
        _age(tmp_path / p, age)
    assert _exists(tmp_path, ["out"], ["in"]) is True
    _age(tmp_path / "out/x", 250)  # one output part is older than an input part
    assert _exists(tmp_path, ["out"], ["in"]) is False


def test_empty_output_folder_is_not_an_output(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    assert _exists(tmp_path, ["out"], []) is False
    (tmp_path / "out" / "f").write_text("x")
    assert _exists(tmp_path, ["out"], []) is True


# -- cleanup ------------------------------------------------------------------------------------
def _runs(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    home = tmp_path / "home"
    ws = home / "runs" / "r1" / "workspace"
    other_ws = home / "runs" / "r2" / "workspace"
    outside = tmp_path / "precious"
    make_tree(ws, {"s1/raw/a.bin": "a", "s2/deep/er/b.bin": "b"})
    make_tree(other_ws, {"s1/raw/a.bin": "other run"})
    make_tree(home / "runs" / "r1" / "logs", {"t.out": "log"})
    make_tree(outside, {"keep.txt": "keep"})
    (ws / "link-to-outside").symlink_to(outside, target_is_directory=True)
    (ws / "s1" / "ro").mkdir()
    (ws / "s1" / "ro" / "f").write_text("x")
    (ws / "s1" / "ro").chmod(0o500)
    storage.prepare_workspace(ws)
    return home, ws, other_ws, outside


def test_cleanup_removes_exactly_the_run_workspace(tmp_path: Path) -> None:
    home, ws, other_ws, outside = _runs(tmp_path)
    before_other = tree(other_ws)
    storage.cleanup_workspace(str(ws))
    assert not ws.exists()
    assert tree(other_ws) == before_other
    assert tree(home / "runs" / "r1") == {"logs/t.out": "log"}
    assert tree(outside) == {"keep.txt": "keep"}  # the symlink was removed, not followed
    storage.cleanup_workspace(str(ws))  # a second time: nothing to do, no error


def test_cleanup_argv_runs_as_a_child(tmp_path: Path) -> None:
    _home, ws, other_ws, outside = _runs(tmp_path)
    r = subprocess.run(storage.cleanup_argv(str(ws)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not ws.exists() and other_ws.exists() and (outside / "keep.txt").exists()


@pytest.mark.parametrize(
    "which", ["root", "home", "corral_home", "corral_runs", "parent_of_cwd", "relative", "empty", "parent_of_workspaces"]
)
def test_cleanup_refuses_paths_that_are_not_a_run_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    storage.prepare_workspace(tmp_path / "elsewhere" / "r1" / "workspace")
    target = {
        "corral_runs": str(Path(os.environ["CORRAL_HOME"]) / "runs"),
        "parent_of_workspaces": str(tmp_path / "elsewhere"),
        "root": "/",
        "home": str(Path.home()),
        "corral_home": os.environ["CORRAL_HOME"],
        "parent_of_cwd": str(tmp_path.parent),
        "relative": "sub",
        "empty": "",
    }[which]
    with pytest.raises(StorageError) as ei:
        storage.cleanup_workspace(target)
    assert ei.value.hint
    assert (tmp_path / "sub").exists() and (tmp_path / "elsewhere" / "r1" / "workspace").exists()


def test_cleanup_refuses_a_symlinked_workspace(tmp_path: Path) -> None:
    real = make_tree(tmp_path / "real", {"f": "x"})
    link = tmp_path / "runs" / "r1" / "workspace"
    link.parent.mkdir(parents=True)
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(StorageError, match="symbolic link"):
        storage.cleanup_workspace(str(link))
    assert (real / "f").exists()
