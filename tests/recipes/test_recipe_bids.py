"""BIDS datasets as items: an irregular tree locally and on S3 (moto, paginated), filters,
errors, the m2g example (planned against S3, run offline), and `corral recipe bids`."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli

import corral
from corral.errors import SpecError
from corral.model import RunState
from corral.plan import make_plan
from corral.spec import load_workflow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "bids-m2g"
DATASET = EXAMPLE / "dataset"
EXTRA_RUNS = 1200  # func runs added on S3, so that listing needs more than one page of 1,000 keys


def items_from(tmp: Path, source: str) -> list[dict[str, Any]]:
    wf = tmp / "workflow.yaml"
    wf.write_text(f"name: b\nitems:\n{source}\nstages:\n  - name: s\n    command: echo {{subject}}\n")
    return make_plan(load_workflow(wf)).items


def local(tmp: Path, extra: str = "") -> list[dict[str, Any]]:
    shutil.copytree(DATASET, tmp / "ds", dirs_exist_ok=True)
    return items_from(tmp, f"  bids: ds\n{extra}")


def scans(items: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(i["subject"], i["session"], i["datatypes"]) for i in items]


def test_irregular_tree_gives_one_item_per_subject_and_session(tmp_path: Path) -> None:
    items = local(tmp_path)
    assert scans(items) == [
        ("0025864", "1", "anat dwi"),
        ("0025864", "2", "anat dwi func"),
        ("0025865", "1", "anat"),  # dwi missing
        ("0025866", "", "anat dwi"),  # a subject without sessions
        ("0025867", "1", "dwi"),  # anat missing
    ]
    by = {(i["subject"], i["session"]): i for i in items}
    nosess = by[("0025866", "")]
    assert nosess["path"] == "sub-0025866" and nosess["uri"] == "ds/sub-0025866"
    assert by[("0025864", "2")]["path"] == "sub-0025864/ses-2"
    assert by[("0025864", "2")]["n_files"] == 8
    assert json.loads(by[("0025864", "1")]["files"]) == [
        "anat/sub-0025864_ses-1_T1w.json", "anat/sub-0025864_ses-1_T1w.nii.gz",
        "dwi/sub-0025864_ses-1_dwi.bval", "dwi/sub-0025864_ses-1_dwi.bvec",
        "dwi/sub-0025864_ses-1_dwi.json", "dwi/sub-0025864_ses-1_dwi.nii.gz",
    ]
    # derivatives/, sessions.tsv and scans.tsv are not scans' files
    assert all("derivatives" not in i["uri"] and "scans.tsv" not in i["files"] for i in items)
    assert by[("0025864", "2")]["counts"] == "anat:2 dwi:4 func:2"
    assert set(items[0]) == {"subject", "session", "path", "uri", "datatypes", "files", "n_files", "counts", "inherited",
                             "inherit_filter"}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("  subjects: ['0025864']\n", [("0025864", "1", "anat dwi"), ("0025864", "2", "anat dwi func")]),
        ("  subjects: [sub-0025866, 25867]\n", [("0025866", "", "anat dwi"), ("0025867", "1", "dwi")]),
        ("  sessions: [2]\n", [("0025864", "2", "anat dwi func")]),
        ("  datatypes: [func]\n", [("0025864", "2", "func")]),
        ("  require: [anat, dwi]\n  datatypes: [dwi]\n",
         [("0025864", "1", "dwi"), ("0025864", "2", "dwi"), ("0025866", "", "dwi")]),
        ("  datatypes: anat\n  where: {session: ''}\n", [("0025866", "", "anat")]),
        ("  require_session: true\n  subjects: [25866, 25867]\n", [("0025867", "1", "dwi")]),
    ],
)
def test_filters(tmp_path: Path, extra: str, expected: list[tuple[str, str, str]]) -> None:
    assert scans(local(tmp_path, extra)) == expected


@pytest.mark.parametrize(
    ("source", "message", "hint"),
    [
        ("  bids: ds\n  subjects: ['0025868']\n", "no subject '0025868'", "did you mean '0025867'?"),
        ("  bids: ds\n  sessions: [3]\n", "no session '3'", "sessions are: 1, 2"),
        ("  bids: ds\n  datatypes: [dwl]\n", "'dwl' is not a BIDS datatype", "did you mean `dwi`?"),
        ("  bids: ds\n  subject: ['01']\n", "unknown key 'subject'", "did you mean `subjects`?"),
        ("  bids: nowhere\n", "no such BIDS dataset folder", "check the path"),
        ("  bids: ds/sub-0025864\n", "no scans found", "dataset_description.json"),
        ("  bids: ds\n  anonymous: true\n", "`anonymous` applies to s3:// datasets only", "remove it"),
        ("  bids: gs://bucket/ds\n", "cannot read a BIDS dataset from", "s3://"),
    ],
)
def test_errors(tmp_path: Path, source: str, message: str, hint: str) -> None:
    shutil.copytree(DATASET, tmp_path / "ds")
    with pytest.raises(SpecError) as exc:
        items_from(tmp_path, source)
    assert message in exc.value.message
    assert hint in (exc.value.hint or "")
    assert str(tmp_path / "workflow.yaml") + ":" in (exc.value.where or "")


# -- S3 ------------------------------------------------------------------------------------------
def make_bucket(bucket: str) -> Any:
    import boto3

    s3 = boto3.client("s3")
    region = s3.meta.region_name
    config = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    s3.create_bucket(Bucket=bucket, **config)
    return s3


def upload_dataset(bucket: str, prefix: str, extra_runs: int = EXTRA_RUNS) -> int:
    s3 = make_bucket(bucket)
    keys = {f"{prefix}/{p.relative_to(DATASET).as_posix()}": p.read_bytes() for p in DATASET.rglob("*") if p.is_file()}
    for n in range(extra_runs):
        keys[f"{prefix}/sub-0025864/ses-2/func/sub-0025864_ses-2_task-rest_run-{n:04d}_bold.nii.gz"] = b""
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), keys.items()))
    return len(keys)


@pytest.mark.aws
def test_s3_dataset_is_listed_page_by_page(tmp_path: Path, aws: str) -> None:
    total = upload_dataset("bids-data", "studies/HNU1")
    assert total > 1000
    items = items_from(tmp_path, "  bids: s3://bids-data/studies/HNU1/\n")
    # Same scans as the local copy, plus the 1,200 runs past the first page.
    assert scans(items) == scans(local(tmp_path))
    by = {(i["subject"], i["session"]): i for i in items}
    assert by[("0025864", "2")]["n_files"] == 8 + EXTRA_RUNS
    assert by[("0025864", "2")]["counts"] == f"anat:2 dwi:4 func:{2 + EXTRA_RUNS}"
    listed = json.loads(by[("0025864", "2")]["files"])  # bounded: item fields become environment variables
    assert len(listed) == 100 and by[("0025864", "2")]["n_files"] == 8 + EXTRA_RUNS
    assert by[("0025866", "")]["uri"] == "s3://bids-data/studies/HNU1/sub-0025866"
    assert by[("0025864", "1")]["files"] == local(tmp_path)[0]["files"]
    # A text subjects filter lists only that subject's prefix; numbers match zero-padded labels.
    only = items_from(tmp_path, "  bids: s3://bids-data/studies/HNU1\n  subjects: ['0025866']\n")
    assert scans(only) == [("0025866", "", "anat dwi")]
    padded = items_from(tmp_path, "  bids: s3://bids-data/studies/HNU1\n  subjects: [25867]\n")
    assert scans(padded) == [("0025867", "1", "dwi")]
    with pytest.raises(SpecError, match="no subject '0025899'"):
        items_from(tmp_path, "  bids: s3://bids-data/studies/HNU1\n  subjects: ['0025899']\n")
    # unsigned requests, as for public buckets (OpenNeuro)
    anon = items_from(tmp_path, "  bids: s3://bids-data/studies/HNU1\n  subjects: ['0025866']\n  anonymous: true\n")
    assert anon == only


@pytest.mark.aws
def test_s3_errors_are_one_line_with_a_hint(tmp_path: Path, aws: str) -> None:
    with pytest.raises(SpecError) as exc:
        items_from(tmp_path, "  bids: s3://no-such-bucket/ds\n")
    assert "bucket 'no-such-bucket' does not exist" in exc.value.message
    make_bucket("empty")
    with pytest.raises(SpecError, match="no scans found in s3://empty/ds"):
        items_from(tmp_path, "  bids: s3://empty/ds\n")


@pytest.mark.aws
def test_m2g_example_plans_against_s3(aws: str) -> None:
    upload_dataset("corral-example-bids", "HNU1", extra_runs=0)
    wf = load_workflow(EXAMPLE / "workflow.yaml")
    plan = make_plan(wf)
    assert plan.keys == ["0025864_1", "0025864_2", "0025866_"]  # scans with both anat and dwi
    m2g = plan.stage_tasks("m2g")
    assert {t.stage.resources.vcpus for t in m2g} == {4}
    assert m2g[0].stage.image == "ghcr.io/my-lab/m2g:corral"
    cmd = m2g[2].command("r", "/w")[2]
    assert cmd.startswith("m2g --participant_label 0025866 ${session:+--session_label \"$session\"}")
    assert m2g[2].env("r", "/w")["session"] == ""  # no session: the shell leaves --session_label out
    pull = plan.stage_tasks("pull")[0]
    assert pull.paths("inputs", "r", "/w") == []
    assert pull.stage.source == "{uri}" and pull.item["uri"] == "s3://corral-example-bids/HNU1/sub-0025864/ses-1"
    assert plan.stage_tasks("push")[0].stage.dest == "s3://corral-example-bids/derivatives/m2g"


def test_m2g_offline_example_runs(tmp_path: Path) -> None:
    if shutil.which("rclone") is None:
        pytest.skip("the pull/push stages need rclone")
    work = tmp_path / "m2g"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("results", ".corral"))
    run = corral.run(work / "workflow.offline.yaml")
    assert run.state == RunState.SUCCEEDED, [(t.label, t.state, t.reason) for t in corral.status(run.run_id)]
    got = sorted(p.relative_to(work / "results").as_posix() for p in (work / "results").rglob("*.csv"))
    assert got == [
        "sub-0025864/ses-1/connectomes/AAL_space-MNI152NLin6_res-2x2x2/sub-0025864_ses-1_dwi_AAL_connectome.csv",
        "sub-0025864/ses-2/connectomes/AAL_space-MNI152NLin6_res-2x2x2/sub-0025864_ses-2_dwi_AAL_connectome.csv",
        "sub-0025866/connectomes/AAL_space-MNI152NLin6_res-2x2x2/sub-0025866_dwi_AAL_connectome.csv",
    ]
    # the stand-in counted the files pulled for its scan: anat (2) + dwi (4) + scans.tsv (1); no func
    assert (work / "results" / got[1]).read_text().splitlines()[1] == "1,2,7"


def test_recipe_bids_writes_a_bids_app_starter(tmp_path: Path) -> None:
    shutil.copytree(DATASET, tmp_path / "ds")
    r = run_cli("recipe", "bids", "ds", "-o", "wf.yaml", "--image", "bids/mriqc:24.0.2", "--require", "anat",
                "--datatype", "anat", "--gpus", "1", "--results", "s3://out/mriqc", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "4 scans × 5 stages = 20 tasks" in r.stderr
    wf = load_workflow(tmp_path / "wf.yaml")
    assert [s.name for s in wf.stages] == ["pull-top", "pull", "app", "push", "cleanup"]
    assert wf.stage("app").resources.gpus == 1 and wf.stage("pull").resources.gpus == 0
    plan = make_plan(wf)
    cmd = plan.stage_tasks("app")[0].command("r", "/w")[2]
    assert cmd == "mriqc /w/scans/0025864_1 /w/out/0025864_1 participant --participant_label 0025864"
    assert plan.stage_tasks("push")[0].stage.dest == "s3://out/mriqc"
    r = run_cli("recipe", "bids", "ds", "--image", "ghcr.io/lab/qc:1", "--app", "qc-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "command: qc-run {workdir}/scans/{item} {workdir}/out/{item} participant --participant_label {subject}" in r.stdout
    assert run_cli("recipe", "bids", "ds", "--image", "x/app", "--datatype", "dwl", cwd=tmp_path).returncode == 2
    anon = run_cli("recipe", "bids", "ds", "--image", "x/app", "--anonymous", cwd=tmp_path)
    assert anon.returncode == 2 and "`anonymous` applies to s3:// datasets only" in anon.stderr


@pytest.mark.aws
def test_m2g_example_pulls_from_and_pushes_to_s3(tmp_path: Path, aws: str) -> None:
    """workflow.yaml for real against S3 on loopback (moto), with the stand-in in place of m2g's image."""
    if shutil.which("rclone") is None:
        pytest.skip("the pull/push stages need rclone")
    import boto3
    import yaml

    upload_dataset("corral-example-bids", "HNU1", extra_runs=0)
    raw = yaml.safe_load((EXAMPLE / "workflow.yaml").read_text())
    m2g = next(s for s in raw["stages"] if s["name"] == "m2g")
    del m2g["image"]
    m2g["resources"] = {"vcpus": 1, "memory": "256MiB"}
    assert m2g["command"].startswith("m2g ")
    m2g["command"] = "sh fake_m2g.sh " + m2g["command"][len("m2g "):]  # the stand-in, same arguments
    (tmp_path / "workflow.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(EXAMPLE / "fake_m2g.sh", tmp_path)
    run = corral.run(tmp_path / "workflow.yaml")
    assert run.state == RunState.SUCCEEDED, [(t.label, t.state, t.reason) for t in corral.status(run.run_id)]
    listed = boto3.client("s3").list_objects_v2(Bucket="corral-example-bids", Prefix="derivatives/m2g/")
    keys = sorted(o["Key"] for o in listed.get("Contents", []))
    assert keys == [
        "derivatives/m2g/sub-0025864/ses-1/connectomes/AAL_space-MNI152NLin6_res-2x2x2/sub-0025864_ses-1_dwi_AAL_connectome.csv",
        "derivatives/m2g/sub-0025864/ses-2/connectomes/AAL_space-MNI152NLin6_res-2x2x2/sub-0025864_ses-2_dwi_AAL_connectome.csv",
        "derivatives/m2g/sub-0025866/connectomes/AAL_space-MNI152NLin6_res-2x2x2/sub-0025866_dwi_AAL_connectome.csv",
    ]
    body = boto3.client("s3").get_object(Bucket="corral-example-bids", Key=keys[1])["Body"].read().decode()
    assert body.splitlines()[1] == "1,2,7"  # anat (2) + dwi (4) + scans.tsv pulled from S3; func left there
