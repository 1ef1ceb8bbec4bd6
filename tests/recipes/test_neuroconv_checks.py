"""Issue 16, NeuroConv side: names that never depend on a session's position, DANDI uploads that
cannot collide, fetches of exactly a session's files, NeuroConv's own validation before anything
runs (located in the user's conversion.yml), a NeuroConv version floor, and everything NeuroConv's
schema accepts accepted. Every input here is written by the test."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import tomllib
from helpers import run_cli

import corral
from corral.errors import SpecError
from corral.model import RunState, TaskState
from corral.plan import make_plan
from corral.recipes import neuroconv as nc
from corral.spec import load_workflow

ROOT = Path(__file__).resolve().parents[2]


def conversion(sessions: str, *, top: str = "", exp: str = "") -> str:
    """A NeuroConv 0.10.2 specification: one experiment `e` with the given sessions (YAML list items)."""
    return (
        top
        + "metadata:\n  NWBFile: {lab: L, session_start_time: '2024-01-01T00:00:00+00:00'}\n"
        + "  Subject: {species: Mus musculus, sex: F}\n"
        + "data_interfaces:\n  Rec: NeuroScopeRecordingInterface\n  Trials: CsvTimeIntervalsInterface\n"
        + "experiments:\n  e:\n"
        + textwrap.indent(exp, "    ")
        + "    sessions:\n"
        + textwrap.indent(textwrap.dedent(sessions), "      ")
    )


def session(rec: str, sid: str | None = None, subject: str | None = "m01", extra: str = "") -> str:
    nwb = f"NWBFile: {{session_id: {json.dumps(sid)}}}" if sid is not None else "NWBFile: {}"
    subj = f", Subject: {{subject_id: {json.dumps(subject)}}}" if subject is not None else ""
    return f"- source_data: {{Rec: {{file_path: {json.dumps(rec)}}}}}\n  metadata: {{{nwb}{subj}}}\n{extra}"


def write(tmp: Path, conv: str, items: str = "neuroconv: conversion.yml",
          stages: str = "  - name: convert\n    command: echo {nwbfile_name}\n") -> Path:
    (tmp / "conversion.yml").write_text(conv)
    wf = tmp / "workflow.yaml"
    wf.write_text(f"name: nc\nitems:\n{textwrap.indent(items, '  ')}\nstages:\n{stages}")
    return wf


def plan_of(wf: Path) -> Any:
    return make_plan(load_workflow(wf))


def line_at(where: str | None) -> str:
    """The text of conversion.yml at a file:line:col."""
    assert where, "the error names no place"
    file, line, _ = where.rsplit(":", 2)
    return Path(file).read_text().splitlines()[int(line) - 1]


# -- 2. names by content, never by position -------------------------------------------------------
def test_inserting_a_session_at_the_top_changes_no_other_sessions_name_or_task(tmp_path: Path) -> None:
    """Sessions without session_id or nwbfile_name: before, they were named e-1, e-2 by place."""
    two = session("a/s1.dat", subject=None) + session("b/s2.dat", subject=None)
    wf = write(tmp_path, conversion(two))
    before = plan_of(wf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conversion.yml", "workflow.yaml"]  # plan wrote nothing
    write(tmp_path, conversion(session("new/s0.dat", subject=None) + two))
    after = plan_of(wf)
    names = {i["nwbfile_name"] for i in before.items}
    assert len(names) == 2 and names <= {i["nwbfile_name"] for i in after.items}
    assert {t.id for t in before.tasks} <= {t.id for t in after.tasks}  # the old tasks keep their ids
    assert len(after.tasks) == 3
    assert not any(re.fullmatch(r"e-\d+\.nwb", n) for n in names)
    # a subject without a session id: sub-<subject>_ first (NeuroConv's files are named by subject)
    (one,) = plan_of(write(tmp_path, conversion(session("a/s1.dat")))).items
    assert one["nwbfile_name"].startswith("sub-m01_e-")


def test_corral_plan_writes_nothing(tmp_path: Path) -> None:
    wf = write(tmp_path, conversion(session("a/s1.dat", "s1")))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = run_cli("plan", str(wf), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_unnamed_sessions_follow_neuroconvs_rule(tmp_path: Path) -> None:
    (item,) = plan_of(write(tmp_path, conversion(session("a/s1.dat", "day 1")))).items
    assert item["nwbfile_name"] == "sub-m01_ses-day-1.nwb"  # NeuroConv: sub-<subject>_ses-<session>


# -- 1. DANDI uploads that cannot collide ----------------------------------------------------------
def test_upload_plan_refuses_sessions_without_session_id(tmp_path: Path) -> None:
    conv = conversion(session("a/s1.dat", "s1") + session("a/s2.dat"), top='upload_to_dandiset: "000123"\n')
    with pytest.raises(SpecError) as exc:
        plan_of(write(tmp_path, conv))
    assert "session 1 of 'e'" in exc.value.message and "no NWBFile.session_id" in exc.value.message
    assert "a/s2.dat" in line_at(exc.value.where)


def test_upload_plan_refuses_two_sessions_that_dandi_would_name_alike(tmp_path: Path) -> None:
    # distinct NWB files (s_1 and s-1) but one DANDI name: dandi turns _ into -
    conv = conversion(session("a/s1.dat", "s_1") + session("a/s2.dat", "s-1"))
    items = plan_of(write(tmp_path, conv)).items  # without an upload, nothing collides
    assert len({i["nwbfile_name"] for i in items}) == 2
    wf = write(tmp_path, conv, 'neuroconv: conversion.yml\ndandiset: "000123"')
    with pytest.raises(SpecError) as exc:
        plan_of(wf)
    msg = exc.value.message
    assert "session 0 of 'e' (sub-m01_ses-s_1.nwb)" in msg and "session 1 of 'e' (sub-m01_ses-s-1.nwb)" in msg
    assert "sub-m01/sub-m01_ses-s-1.nwb" in msg and "conversion.yml:" in msg  # both sessions' places
    assert "a/s2.dat" in line_at(exc.value.where)
    # and nothing ran or was recorded: `corral run` refuses it the same way
    r = run_cli("run", str(wf), cwd=tmp_path)
    assert r.returncode == 2 and "would both be uploaded to DANDI" in r.stderr and "Traceback" not in r.stderr


def test_dandi_paths_are_what_dandi_accepts_and_split_files_stay_apart(tmp_path: Path) -> None:
    organize = pytest.importorskip("dandi.organize", reason="compares with dandi's own layout rules")
    conv = conversion(
        session("a/s1.dat", "s1", extra="  nwbfile_name: sub-m01_ses-s1_ecephys.nwb\n")
        + session("a/s1.csv", "s1", extra="  nwbfile_name: sub-m01_ses-s1_behavior.nwb\n")
        + session("b/x.dat", "2024-03-01 a.m.", subject="m_02")
        + session("c/y.dat", "y", extra="  nwbfile_name: my run\n"),
        top='upload_to_dandiset: "000123"\n')
    items = plan_of(write(tmp_path, conv)).items
    assert [i["dandi_path"] for i in items] == [
        "sub-m01/sub-m01_ses-s1_ecephys.nwb",  # already DANDI-named: kept (the usual _ecephys/_behavior split)
        "sub-m01/sub-m01_ses-s1_behavior.nwb",
        "sub-m-02/sub-m-02_ses-2024-03-01-a-m-.nwb",
        "sub-m01/sub-m01_ses-y_desc-my-run.nwb",
    ]
    for i in items:
        assert organize.validate_organized_path(i["dandi_path"], Path(i["dandi_path"]), tmp_path) == []
    for raw in ("m_02", "2024-03-01 a.m.", "a/b:c;d,e"):
        assert nc.dandi_label(raw) == organize._sanitize_value(raw, "session_id")


# -- 3. exactly a session's files -----------------------------------------------------------------
def _touch(root: Path, *names: str) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_text(n)


def test_fetch_copies_exactly_the_sessions_own_files_wherever_they_sit(tmp_path: Path) -> None:
    if shutil.which("rclone") is None:
        pytest.skip("the fetch stage needs rclone")
    raw = tmp_path / "raw"
    # modality-first layout, names with spaces, commas and braces; other sessions' files beside
    _touch(raw, "ecephys/s1 run.dat", "ecephys/s1 run.xml", "ecephys/s2 run.dat", "ecephys/s2 run.xml",
           "behavior/s1,{a}.csv", "behavior/s2.csv", "video/s1/cam.avi", "video/s1/sub/cam.json",
           "video/s2/cam.avi")
    conv = conversion(
        "- source_data: {Rec: {file_path: 'ecephys/s1 run.dat'}, Trials: {file_path: 'behavior/s1,{a}.csv'}}\n"
        "  metadata: {NWBFile: {session_id: s1}, Subject: {subject_id: m01}}\n"
        "- source_data: {Rec: {file_path: 'ecephys/s2 run.dat'}, Trials: {file_path: behavior/s2.csv}}\n"
        "  metadata: {NWBFile: {session_id: s2}, Subject: {subject_id: m01}}\n")
    conv = conv.replace("  Trials: CsvTimeIntervalsInterface\n", "  Trials: CsvTimeIntervalsInterface\n"
                        "  Video: ExternalVideoInterface\n")
    conv = conv.replace("Trials: {file_path: 'behavior/s1,{a}.csv'}}",
                        "Trials: {file_path: 'behavior/s1,{a}.csv'}, Video: {file_paths: [video/s1/cam.avi]}}")
    stages = ("  - name: fetch\n    from: raw/{source_dir}\n    to: data/{session_id}/{source_dir}\n"
              '    filters: ["+ {source_filter}", "- *"]\n')
    wf = write(tmp_path, conv, stages=stages)
    items = plan_of(wf).items
    assert json.loads(items[0]["source_paths"]) == ["ecephys/s1 run.dat", "behavior/s1,{a}.csv", "video/s1/cam.avi"]
    assert items[0]["source_dir"] == "."
    run = corral.run(wf)
    assert run.state == RunState.SUCCEEDED, [(t.label, t.state, t.reason) for t in corral.status(run.run_id)]
    got = sorted(p.relative_to(tmp_path / "data" / "s1").as_posix() for p in (tmp_path / "data" / "s1").rglob("*")
                 if p.is_file())
    # the .xml is the NeuroScope recording's sidecar (same stem); nothing of s2, nothing else of video/s1
    assert got == ["behavior/s1,{a}.csv", "ecephys/s1 run.dat", "ecephys/s1 run.xml", "video/s1/cam.avi"]
    got2 = sorted(p.name for p in (tmp_path / "data" / "s2").rglob("*") if p.is_file())
    assert got2 == ["s2 run.dat", "s2 run.xml", "s2.csv"]
    # sidecars: false -> exactly the named files
    exact = plan_of(write(tmp_path, conv, "neuroconv: conversion.yml\nsidecars: false", stages)).items[0]
    assert "xml" not in exact["source_filter"] and r"\.[^/]*" not in exact["source_filter"]


def test_source_filter_of_a_folder_and_a_common_folder() -> None:
    sd = {"r": {"folder_path": "s1/oe"}, "t": {"file_path": "s1/t.csv"}}
    assert nc.common_dir(sd) == "s1"
    assert nc.source_filter(sd, "s1") == r"/{{(oe/.*|t(\.[^/]*)?)}}"


# -- 4. NeuroConv's validation, before anything runs, located in conversion.yml ---------------------
def _needs_neuroconv() -> None:
    pytest.importorskip("neuroconv", reason="these checks are NeuroConv's own schemas")


BAD = [
    ("session_desciption", "  metadata: {NWBFile: {session_id: s1, session_desciption: x}, Subject: {subject_id: m01}}\n",
     "unknown key 'session_desciption' in NWBFile", "session_description"),
    ("sex", "  metadata: {NWBFile: {session_id: s1}, Subject: {subject_id: m01, sex: female}}\n",
     "'female', which NWB does not allow", "M, F, U, O"),
    # corral reads YAML 1.2 strictly (#17): `007` stays the text "007"; a plain `7` is an integer
    ("7", "  metadata: {NWBFile: {session_id: s1}, Subject: {subject_id: 7}}\n",
     "YAML reads as an integer", 'quote it: subject_id: "7"'),
    ("Subject", "  metadata: {Subject: {subject_id: m01}}\n", "has no 'NWBFile'", "NWBFile: {}"),
    ("file_pth", "", "unknown key 'file_pth'", "file_path"),
]


@pytest.mark.parametrize(("token", "metadata", "message", "hint"), BAD, ids=[b[0] for b in BAD])
def test_neuroconv_refuses_before_anything_runs(tmp_path: Path, token: str, metadata: str, message: str,
                                                hint: str) -> None:
    _needs_neuroconv()
    rec = "file_pth: a/s1.dat" if token == "file_pth" else "file_path: a/s1.dat"
    bad = f"- source_data: {{Rec: {{{rec}}}}}\n" + (metadata or "  metadata: {NWBFile: {session_id: s1}}\n")
    conv = conversion(session("a/s0.dat", "s0") + bad)
    with pytest.raises(SpecError) as exc:
        plan_of(write(tmp_path, conv))
    assert message in exc.value.message
    assert hint in (exc.value.hint or "")
    assert token in line_at(exc.value.where)  # the line of the user's conversion.yml that has it
    r = run_cli("validate", "workflow.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "conversion.yml:" in r.stderr and "Traceback" not in r.stderr


def test_merged_metadata_is_checked_where_it_was_written(tmp_path: Path) -> None:
    """The top-level block says sex: female: every session inherits it; the error points at the top."""
    _needs_neuroconv()
    conv = conversion(session("a/s1.dat", "s1")).replace("sex: F", "sex: female")
    with pytest.raises(SpecError) as exc:
        plan_of(write(tmp_path, conv))
    assert "sex: female" in line_at(exc.value.where) and ":3:" in (exc.value.where or "")


def test_no_metadata_at_all_is_refused(tmp_path: Path) -> None:
    _needs_neuroconv()
    conv = ("data_interfaces: {Rec: NeuroScopeRecordingInterface}\n"
            "experiments:\n  e:\n    sessions:\n      - source_data: {Rec: {file_path: a.dat}}\n")
    with pytest.raises(SpecError, match="has no 'NWBFile'") as exc:
        plan_of(write(tmp_path, conv))
    assert "source_data" in line_at(exc.value.where)


def test_unknown_interface_class(tmp_path: Path) -> None:
    _needs_neuroconv()
    conv = conversion(session("a/s1.dat", "s1")).replace("Rec: NeuroScopeRecordingInterface",
                                                         "Rec: NeuroscopeRecordingInterface")
    with pytest.raises(SpecError, match="no data interface 'NeuroscopeRecordingInterface'") as exc:
        plan_of(write(tmp_path, conv))
    assert "NeuroScopeRecordingInterface" in (exc.value.hint or "")
    assert "Rec:" in line_at(exc.value.where)


def test_without_neuroconv_it_says_once_what_was_not_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from corral.recipes import neuroconv_check

    monkeypatch.setattr(neuroconv_check, "neuroconv_version", lambda: None)
    from corral import notes

    monkeypatch.setattr(notes, "_SAID", set())
    conv = conversion(session("a/s1.dat", "s1") + session("a/s2.dat", "s2")).replace("sex: F", "sex: female")
    wf = write(tmp_path, conv)
    assert len(plan_of(wf).items) == 2  # not checked here: NeuroConv will refuse it when the task runs
    plan_of(wf)
    err = capsys.readouterr().err
    assert err.count("corral: note: NeuroConv is not installed here") == 1
    assert "2 session(s) of conversion.yml" in err and "metadata (NWBFile, Subject) and source_data" in err


# -- 5. NeuroConv versions ---------------------------------------------------------------------------
def test_the_neuroconv_extra_has_the_floor_corral_matches() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["neuroconv"]
    assert any(re.search(r"neuroconv\[.*\]>=0\.10\.2\b", e) for e in extra)
    assert nc.NEUROCONV_FLOOR == (0, 10, 2)
    assert nc.VERSION_GUARD in (ROOT / "examples" / "neuroconv" / "workflow.yaml").read_text()


@pytest.mark.parametrize(("version", "ok"), [("0.10.1", False), ("0.9.9", False), ("0.10.2", True), ("0.11.0rc1", True)])
def test_the_convert_command_refuses_an_older_neuroconv(tmp_path: Path, version: str, ok: bool) -> None:
    """The guard the starter's convert stage runs first, against a NeuroConv of a given version."""
    dist = tmp_path / f"neuroconv-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: neuroconv\nVersion: {version}\n")
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run(["/bin/sh", "-c", nc.VERSION_GUARD.replace("python ", f"{sys.executable} ", 1)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert (r.returncode == 0) is ok, r.stderr
    if not ok:
        assert f"NeuroConv {version} reads this spec differently; use NeuroConv >= 0.10.2" in r.stderr


def test_a_convert_that_writes_no_nwb_file_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The starter's convert stage declares its output and fails when neuroconv wrote none."""
    pytest.importorskip("neuroconv", reason="the starter's version guard reads the installed NeuroConv")
    if shutil.which("rclone") is None:
        pytest.skip("the fetch stage needs rclone")
    _touch(tmp_path / "raw", "a/s1.dat", "a/s1.xml")
    (tmp_path / "conversion.yml").write_text(conversion(session("a/s1.dat", "s1")))
    r = run_cli("recipe", "neuroconv", "conversion.yml", "-o", "workflow.yaml", "--raw", str(tmp_path / "raw"),
                "--no-upload", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "workflow.yaml").read_text().replace("vcpus: 2, memory: 8GiB, disk: 100GiB", "vcpus: 1, memory: 1GiB")
    (tmp_path / "workflow.yaml").write_text(text)
    wf = load_workflow(tmp_path / "workflow.yaml")
    assert wf.stage("convert").outputs == ["workspace://nwb/{stem}/{nwbfile_name}"]
    assert nc.VERSION_GUARD in str(wf.stage("convert").command)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "neuroconv").write_text("#!/bin/sh\necho fake neuroconv: converts nothing\n")
    (fake / "neuroconv").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    run = corral.run(tmp_path / "workflow.yaml")
    states = {t.stage: t.state for t in corral.status(run.run_id)}
    assert run.state == RunState.FAILED and states["fetch"] == TaskState.SUCCEEDED
    assert states["convert"] == TaskState.FAILED


# -- 7. what NeuroConv accepts, accepted ---------------------------------------------------------------
def test_everything_neuroconvs_schema_accepts_is_accepted(tmp_path: Path) -> None:
    conv = conversion(
        session("a/s1.dat", "s1", extra="  nwbfile_name: sub-m01_ses-s1_ecephys.nwb\n  notes_for_lab: kept\n")
        + session("a/s1.csv", "s1", extra="  nwbfile_name: sub-m01_ses-s1_behavior.nwb\n"),
        exp="description: the experiment's own key\nconversion_options: {stub_test: true}\n",
        top="conversion_options: {stub_test: false}\n")
    items = plan_of(write(tmp_path, conv)).items
    assert [i["session_id"] for i in items] == ["s1", "s1"]  # one session_id, two files
    assert [i["nwbfile_name"] for i in items] == ["sub-m01_ses-s1_ecephys.nwb", "sub-m01_ses-s1_behavior.nwb"]
    one = json.loads(items[0]["spec_json"])
    exp = one["experiments"]["e"]
    assert exp["description"] == "the experiment's own key" and exp["conversion_options"] == {"stub_test": True}
    assert exp["sessions"][0]["notes_for_lab"] == "kept"
    assert exp["sessions"][0]["conversion_options"] == {"Rec": {"stub_test": False}}  # as NeuroConv 0.10.2 resolves
    from corral.recipes import neuroconv_check

    if neuroconv_check.neuroconv_version() is not None:  # and NeuroConv's schema takes corral's single spec
        validator, _, _ = neuroconv_check._schemas()
        assert list(validator.iter_errors(one)) == []
    with pytest.raises(SpecError, match="unknown key 'conversion_option'"):  # the top level is closed
        plan_of(write(tmp_path, "conversion_option: {}\n" + conv))


# -- filters take placeholders, on every backend ---------------------------------------------------
def test_transfer_filters_take_item_fields_and_keep_rclones_own_braces(tmp_path: Path) -> None:
    from corral.storage.aws import task_argv

    stages = ("  - name: fetch\n    from: s3://lab/raw/{source_dir}\n    to: workspace://data/{stem}\n"
              '    filters: ["+ {source_filter}", "+ /{{keep-as-is}}", "+ *.{json,tsv}", "- *"]\n')
    plan = plan_of(write(tmp_path, conversion(session("a b/s1.dat", "s1")), stages=stages))
    (task,) = plan.tasks
    rules = task.filter_rules("r", "/w")
    assert rules == [r"+ /{{(s1(\.[^/]*)?)}}", "+ /{{keep-as-is}}", "+ *.{json,tsv}", "- *"]
    argv = task_argv(task, run_id="r", workdir="/w", region="us-east-1", workspace_root="/w")
    assert r"/{{(s1(\.[^/]*)?)}}" in " ".join(argv)  # the AWS job gets the same rules as a local run
    with pytest.raises(SpecError, match=r"placeholder \{source_filer\}") as exc:
        plan_of(write(tmp_path, conversion(session("a/s1.dat", "s1")),
                      stages=stages.replace("{source_filter}", "{source_filer}")))
    assert "did you mean `{source_filter}`?" in (exc.value.hint or "") or "source_filter" in (exc.value.hint or "")
