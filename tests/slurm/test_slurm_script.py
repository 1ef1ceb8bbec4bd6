"""Pure parts of the Slurm backend: sbatch options, arrays, rows, the slurm: section, sacct parsing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from corral.backends.slurm import script
from corral.backends.slurm.client import parse_sacct
from corral.backends.slurm.doctor import pending_findings
from corral.errors import SpecError
from corral.model import TaskRecord, TaskState
from corral.plan import make_plan
from corral.spec import SlurmSettings, load_workflow, loads_workflow


def wf(text: str):  # type: ignore[no-untyped-def]
    return loads_workflow(text, source="w.yaml")


def test_resources_become_sbatch_options() -> None:
    w = wf("""
name: r
slurm:
  partition: cpu
  account: lab
  extra: ["--constraint=avx2"]
  stages:
    sort: {partition: gpu, qos: high, extra: ["#SBATCH --exclusive"]}
items: [{n: 1}]
stages:
  - name: sort
    resources: {vcpus: 3.5, memory: 6GiB, gpus: 2, disk: 40GiB}
    timeout: 90m
    retries: 1
    command: "true"
""")
    opts = script.sbatch_options(w.stages[0], w.slurm, job_name="j", array="0-9%4", log_dir="/l", chdir="/w")
    assert "--cpus-per-task=4" in opts and "--mem=6144M" in opts and "--gres=gpu:2" in opts
    assert "--tmp=40G" in opts and "--array=0-9%4" in opts
    assert "--time=0-03:01:00" in opts  # (90 min + 10 s) × 2 tries, rounded up to minutes
    assert "--partition=gpu" in opts and "--account=lab" in opts and "--qos=high" in opts
    assert opts[-2:] == ["--constraint=avx2", "--exclusive"]
    assert "--output=/l/%A_%a.out" in opts and "--kill-on-invalid-dep=yes" in opts


def test_array_spec_ranges_and_max_parallel() -> None:
    assert script.array_spec([0, 1, 2, 5, 7, 8], None) == "0-2,5,7-8"
    assert script.array_spec([3], 2) == "3%2"
    assert script.chunk_of(2500, 1001) == (2, 498)


def test_bad_slurm_section_names_file_and_line() -> None:
    with pytest.raises(SpecError) as exc:
        wf("name: x\nslurm:\n  extra: ['exclusive']\nstages: [{name: s, command: 'true'}]\n")
    assert "w.yaml:3" in str(exc.value.where) and "--name=value" in exc.value.message
    with pytest.raises(SpecError) as exc:
        wf("name: x\nslurm:\n  partiton: a\nstages: [{name: s, command: 'true'}]\n")
    assert "partition" in (exc.value.hint or "")


def test_rows_round_trip_through_sh(tmp_path: Path) -> None:
    """The wrapper's eval of a row gives back exactly the env values and argv it was built from."""
    w = wf("""
name: q
items: [{v: "it's \\"odd\\" $HOME `x`\\nline2"}]
stages: [{name: s, command: "printf '%s' {v}"}]
""")
    plan = make_plan(w)
    t = plan.tasks[0]
    env = t.env("R", "/w")
    argv = t.command("R", "/w")
    row = script.row(t, env, argv, attempts_before=0, tries=1)
    assert "\n" not in row
    sh = f"NL='\n'\n{row}\nprintf '%s\\0' \"$v\" \"$@\""
    out = subprocess.run(["/bin/sh", "-c", sh], capture_output=True, check=True).stdout.decode().split("\0")
    assert out[0] == t.item["v"] and out[1:-1] == argv


def test_sacct_rows_parsed() -> None:
    text = "12_0|corral.a|COMPLETED|0:0|None\n12_1|corral.a|FAILED|3:0|None\n" \
           "12_[2-4%2]|corral.a|PENDING|0:0|JobArrayTaskLimit\n13|corral.b|CANCELLED by 0|0:0|Dependency\n"
    rows = parse_sacct(text)
    assert [(r.array_job, r.index, r.state) for r in rows] == [
        ("12", 0, "COMPLETED"), ("12", 1, "FAILED"), ("12", 2, "PENDING"), ("12", 3, "PENDING"),
        ("12", 4, "PENDING"), ("13", None, "CANCELLED")]


def test_pending_reasons_explained() -> None:
    tasks = [TaskRecord("r", f"t{i}", "sort", str(i), i, state=TaskState.SUBMITTED,
                        reason="pending: QOSMaxJobsPerUserLimit") for i in range(3)]
    [f] = pending_findings(tasks)
    assert "3 task(s) of stage 'sort'" in f.message and "QOS" in f.fix and f.level == "warn"


def test_quickstart_has_a_slurm_section_default() -> None:
    w = load_workflow(Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "workflow.yaml")
    assert w.slurm == SlurmSettings()


def test_sinfo_fields_parsed() -> None:
    from corral.backends.slurm.backend import _gpus, _minutes

    assert _minutes("1-02:03:04") == 1440 + 123 + 1 and _minutes("30:00") == 30 and _minutes("infinite") is None
    assert _gpus("gpu:a100:4(S:0-1)") == 4 and _gpus("(null)") == 0 and _gpus("gpu:2,shard:8") == 2
    assert script.slurm_time(61) == "0-00:02:00" and script.slurm_time(3 * 86400) == "3-00:00:00"
