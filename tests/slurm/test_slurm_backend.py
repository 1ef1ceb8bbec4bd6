"""The Slurm backend against a real slurmctld/slurmd on 127.0.0.1 (see conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral import api
from corral.backends.base import RunOptions
from corral.backends.slurm import SlurmBackend, SlurmClient
from corral.model import RunState, TaskState

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slurm


def write(tmp: Path, text: str, name: str = "workflow.yaml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def wait_run(run_id: str, timeout: float = 90.0) -> list:
    """Poll `status` (a refresh) with a bound until the run has ended."""
    store = api.open_store("slurm")
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        tasks = api.status(run_id, store=store)
        if store.get_run(run_id).state != RunState.RUNNING:
            return tasks
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still running after {timeout}s: "
                                 f"{[(t.label, t.state.value, t.reason) for t in tasks]}")
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


def states(tasks: list) -> dict[str, str]:
    return {t.label: t.state.value for t in tasks}


def corral(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True, text=True, env=full,
                          timeout=timeout)


def test_quickstart_end_to_end(slurm, tmp_path: Path) -> None:
    wf_dir = tmp_path / "quickstart"
    shutil.copytree(REPO / "examples" / "quickstart", wf_dir, ignore=shutil.ignore_patterns("out"))
    res = corral("run", str(wf_dir / "workflow.yaml"), "--backend", "slurm", "--wait")
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.strip().splitlines()[-1]
    status = corral("status", run_id, "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["state"] == "SUCCEEDED" and data["backend"] == "slurm"
    lines = (wf_dir / "out" / "summary.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["session"] for x in lines) == ["mouse1-day1", "mouse1-day2", "mouse2-day1",
                                                                "mouse2-day2"]
    # the output files are Slurm's own %A_%a files, one pair per array task
    logs = corral("logs", run_id, "process[mouse1-day2]")
    assert logs.returncode == 0 and "attempt 1 of process[mouse1-day2]" in logs.stdout
    assert "_1.err" in logs.stdout
    watch = corral("status", run_id, "--watch", "--interval", "0.2")
    assert watch.returncode == 0 and "succeeded" in watch.stderr
    report = corral("report", run_id, "-o", str(tmp_path / "report.html"))
    assert report.returncode == 0, report.stderr
    assert "summarize" in (tmp_path / "report.html").read_text()


ENV_WF = """
name: envcheck
items:
  - {session: s1, note: "two words"}
  - {session: "s'2", note: "line1\\nline2"}
stages:
  - name: dump
    command: env | grep -E '^(CORRAL_|session=|note=)' | sort > {workdir}/env-{index}.txt
    env: {GREETING: "hi {session}"}
"""


def _env_of(workdir: Path, run_id: str, run_dir: str) -> dict[str, list[str]]:
    out = {}
    for f in sorted(workdir.glob("env-*.txt")):
        out[f.name] = [ln.replace(run_id, "RUN").replace(run_dir, "HOME") for ln in f.read_text().splitlines()]
    return out


def test_item_fields_and_corral_variables_as_locally(slurm, tmp_path: Path) -> None:
    wf = write(tmp_path, ENV_WF)
    home = api.corral_home()
    local = api.run(wf, "local")
    remote = api.run(wf, "slurm", options=RunOptions(wait=True))
    assert remote.state == RunState.SUCCEEDED
    got_local = _env_of(home / "runs" / local.run_id / "workspace", local.run_id, str(home))
    got_slurm = _env_of(home / "runs" / remote.run_id / "workspace", remote.run_id, str(home))
    assert got_slurm == got_local
    assert "CORRAL_ITEM_note=two words" in got_slurm["env-0.txt"]
    assert "session=s'2" in got_slurm["env-1.txt"]


def test_retries_in_the_wrapper_and_cleanup_after_failure_without_a_client(any_slurm, tmp_path: Path) -> None:
    marker = tmp_path / "cleaned"
    wf = write(tmp_path, f"""
name: fails
items: [{{n: 1}}, {{n: 2}}]
stages:
  - name: flaky
    retries: 1
    command: test -e {{workdir}}/tried-{{n}} || {{ touch {{workdir}}/tried-{{n}}; exit 3; }}
  - name: broken
    needs: [flaky]
    retries: 1
    command: if [ {{n}} = 2 ]; then exit 4; fi
  - name: after
    needs: [broken]
    command: "true"
  - name: tidy
    kind: cleanup
    command: touch {marker}
""")
    run = api.run(wf, "slurm", options=RunOptions(wait=False))
    # Nobody refreshes: Slurm alone runs the cleanup once everything else ended (afterany).
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline, "the cleanup stage did not run"
        time.sleep(0.2)
    tasks = wait_run(run.run_id)
    got = states(tasks)
    assert got == {
        "flaky[1]": "SUCCEEDED", "flaky[2]": "SUCCEEDED", "broken[1]": "SUCCEEDED", "broken[2]": "FAILED",
        "after[1]": "SUCCEEDED", "after[2]": "UPSTREAM_FAILED", "tidy[run]": "SUCCEEDED",
    }
    by = {t.label: t for t in tasks}
    assert by["flaky[1]"].attempts == 2 and by["broken[2]"].attempts == 2
    assert by["broken[2]"].exit_code == 4 and by["broken[2]"].reason == "exit code 4"
    store = api.open_store("slurm")
    attempts = store.get_attempts(run.run_id, by["broken[2]"].task_id)
    assert [(a.attempt, a.state.value, a.exit_code) for a in attempts] == [(1, "FAILED", 4), (2, "FAILED", 4)]
    assert store.get_run(run.run_id).state == RunState.FAILED

    # resume resubmits exactly what has not succeeded: broken[2], after[2] (and nothing else)
    client = SlurmClient()
    be = SlurmBackend(api.corral_home(), client=client)
    api.resume(run.run_id, store=store, options=RunOptions(wait=True), backend_impl=be)
    again = {t.label: t for t in store.get_tasks(run.run_id)}
    assert again["broken[2]"].attempts == 4 and again["broken[2]"].state == TaskState.FAILED
    assert again["after[1]"].attempts == 1 and again["flaky[1]"].attempts == 2
    assert client.calls["sbatch"] == 2  # broken (the chunk of item 2) and after; tidy succeeded already


def test_refresh_is_one_call_to_slurm(any_slurm, tmp_path: Path) -> None:
    wf = write(tmp_path, """
name: many
items: [{n: 1}, {n: 2}, {n: 3}]
stages:
  - {name: a, command: "sleep 0.2"}
  - {name: b, needs: [a], command: "true"}
  - {name: c, per: run, needs: [b], command: "true"}
""")
    client = SlurmClient()
    be = SlurmBackend(api.corral_home(), client=client)
    run = api.run(wf, "slurm", options=RunOptions(wait=False), backend_impl=be)
    assert client.calls["sbatch"] == 3
    before = sum(client.calls.values())
    be.refresh(run, api.open_store("slurm"))
    assert sum(client.calls.values()) - before == 1
    assert client.calls["sacct" if any_slurm.accounting else "squeue"] == 1
    wait_run(run.run_id)


def test_cancel_scancels_and_records(slurm, tmp_path: Path) -> None:
    wf = write(tmp_path, """
name: slow
items: [{n: 1}, {n: 2}, {n: 3}]
stages:
  - {name: nap, command: "sleep 300"}
  - {name: next, needs: [nap], command: "true"}
""")
    run = api.run(wf, "slurm", options=RunOptions(wait=False))
    store = api.open_store("slurm")
    deadline = time.monotonic() + 30
    while not any(t.state == TaskState.RUNNING for t in api.status(run.run_id, store=store)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    res = corral("cancel", run.run_id)
    assert res.returncode == 0, res.stderr
    assert {t.state for t in store.get_tasks(run.run_id)} == {TaskState.CANCELLED}
    assert store.get_run(run.run_id).state == RunState.CANCELLED
    deadline = time.monotonic() + 30
    while SlurmClient().squeue(jobs=[t.external_id.split("_")[0] for t in store.get_tasks(run.run_id)]) and \
            any(r.state in ("RUNNING", "PENDING") for r in SlurmClient().squeue(
                jobs=[t.external_id.split("_")[0] for t in store.get_tasks(run.run_id)])):
        assert time.monotonic() < deadline, "jobs still in Slurm after cancel"
        time.sleep(0.2)


def _killing_sbatch(bin_dir: Path, after: int, before_submitting: bool = False) -> None:
    """A stand-in sbatch that kills the corral calling it on call ``after``: right after the real
    sbatch returned (the job exists, corral has not read its id), or before it ran."""
    real = shutil.which("sbatch")
    bin_dir.mkdir()
    p = bin_dir / "sbatch"
    early = f'if [ "$n" -eq {after} ]; then kill -9 $PPID; exit 1; fi' if before_submitting else ""
    p.write_text(f"""#!/bin/sh
n=$(cat {bin_dir}/count 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {bin_dir}/count
{early}
out=$({real} "$@"); rc=$?
if [ "$n" -eq {after} ]; then kill -9 $PPID; fi
echo "$out"
exit $rc
""")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize(("call", "before_submitting"), [(2, False), (2, True), (1, True)],
                         ids=["after-2nd-sbatch", "before-2nd-sbatch", "before-1st-sbatch"])
def test_kill_mid_submission_then_resume_runs_every_task_once(any_slurm, tmp_path: Path, call: int,
                                                              before_submitting: bool) -> None:
    wf = write(tmp_path, """
name: crash
items: [{n: 1}, {n: 2}, {n: 3}, {n: 4}]
stages:
  - {name: a, command: "echo x >> {workdir}/a-{n}"}
  - {name: b, needs: [a], command: "echo x >> {workdir}/b-{n}"}
  - {name: c, per: run, needs: [b], command: "echo x >> {workdir}/c"}
""")
    bin_dir = tmp_path / "bin"
    _killing_sbatch(bin_dir, after=call, before_submitting=before_submitting)
    res = corral("run", str(wf), "--backend", "slurm", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert res.returncode == -9, (res.returncode, res.stderr)
    store = api.open_store("slurm")
    run = store.list_runs(limit=1)[0]
    arrays = run.options["slurm"]["arrays"]
    assert [a["stage"] for a in arrays] == ["a", "b"][:call] and arrays[-1]["job"] is None  # killed around sbatch
    res = corral("resume", run.run_id)
    assert res.returncode == 0, res.stderr
    tasks = wait_run(run.run_id)
    assert {t.state for t in tasks} == {TaskState.SUCCEEDED}
    work = api.corral_home() / "runs" / run.run_id / "workspace"
    for name in [f"a-{i}" for i in range(1, 5)] + [f"b-{i}" for i in range(1, 5)] + ["c"]:
        assert (work / name).read_text() == "x\n", name
    names = [a["name"] for a in store.get_run(run.run_id).options["slurm"]["arrays"]]
    assert len(names) == len(set(names)) == 3


def test_apptainer_stand_in_records_argv(slurm, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apptainer-argv"
    fake = bin_dir / "apptainer"
    fake.write_text(f"""#!/bin/sh
if [ "$1" = "--version" ]; then echo "apptainer version 1.3.0 (stand-in)"; exit 0; fi
printf '%s\\n' "$@" >> {log}
while [ $# -gt 0 ]; do case "$1" in docker://*) shift; break;; *) shift;; esac; done
exec "$@"
""")
    fake.chmod(0o755)
    wf = write(tmp_path, """
name: boxed
items: [{n: 1}]
stages:
  - {name: inbox, image: "python:3.12-slim", command: "echo in-box {n} > {workdir}/boxed"}
""")
    env_path = f"{bin_dir}:{os.environ['PATH']}"
    old = os.environ["PATH"]
    os.environ["PATH"] = env_path
    try:
        run = api.run(wf, "slurm", options=RunOptions(wait=True))
    finally:
        os.environ["PATH"] = old
    assert run.state == RunState.SUCCEEDED
    argv = log.read_text().splitlines()
    work = str(api.corral_home() / "runs" / run.run_id / "workspace")
    assert argv[:5] == ["exec", "--bind", f"{work},{tmp_path}", "--pwd", str(tmp_path)]
    assert argv[5] == "docker://python:3.12-slim" and argv[6:8] == ["/bin/sh", "-c"]
    assert (Path(work) / "boxed").read_text() == "in-box 1\n"


def test_no_apptainer_runs_on_the_host_with_one_note(slurm, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wf = write(tmp_path, """
name: hosted
items: [{n: 1}, {n: 2}]
stages:
  - {name: s, image: "python:3.12-slim", command: "true"}
""")
    notes: list[str] = []
    be = SlurmBackend(api.corral_home(), log=notes.append, detect=lambda: (None, "apptainer: not installed"))
    run = api.run(wf, "slurm", options=RunOptions(wait=True), backend_impl=be)
    assert run.state == RunState.SUCCEEDED
    assert notes == ["note: neither Apptainer nor Singularity answered (apptainer: not installed): "
                     "stages with an image run on the host"]


def test_skip_if_outputs_exist(slurm, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "1.txt").write_text("done")
    wf = write(tmp_path, """
name: skipper
items: [{n: 1}, {n: 2}]
stages:
  - {name: make, outputs: ["out/{n}.txt"], command: "echo made > out/{n}.txt"}
  - {name: use, needs: [make], command: "cat out/{n}.txt"}
""")
    run = api.run(wf, "slurm", options=RunOptions(wait=True))
    got = states(api.open_store("slurm").get_tasks(run.run_id))
    assert got == {"make[1]": "SKIPPED", "make[2]": "SUCCEEDED", "use[1]": "SUCCEEDED", "use[2]": "SUCCEEDED"}
    assert (tmp_path / "out" / "1.txt").read_text() == "done"


def test_stage_no_partition_can_hold_is_refused_before_submitting(slurm, tmp_path: Path) -> None:
    wf = write(tmp_path, """
name: huge
items: [{n: 1}]
stages:
  - name: big
    resources: {vcpus: 64}
    command: "true"
""")
    client = SlurmClient()
    res = corral("run", str(wf), "--backend", "slurm")
    assert res.returncode != 0
    assert "workflow.yaml:6" in res.stderr and "64 vCPUs" in res.stderr and "Traceback" not in res.stderr
    assert client.squeue(names=["corral.huge"]) == []
    gpu = write(tmp_path, """
name: gpu
items: [{n: 1}]
stages:
  - {name: train, resources: {gpus: 1}, command: "true"}
""", "gpu.yaml")
    res = corral("run", str(gpu), "--backend", "slurm")
    assert res.returncode != 0 and "gpu.yaml:5" in res.stderr and "1 GPU(s)" in res.stderr
    bad = write(tmp_path, """
name: nopart
slurm: {partition: gpu}
items: [{n: 1}]
stages: [{name: s, command: "true"}]
""", "bad.yaml")
    res = corral("run", str(bad), "--backend", "slurm")
    assert res.returncode != 0 and "bad.yaml:3" in res.stderr and "no partition 'gpu'" in res.stderr


def test_doctor_backend_slurm(slurm, tmp_path: Path) -> None:
    res = corral("doctor", "--backend", "slurm", "--json")
    data = json.loads(res.stdout)
    checks = {f["check"]: f for f in data["findings"]}
    assert checks["slurm-controller"]["level"] == "ok"
    assert "no accounting" in checks["slurm-accounting"]["message"]
    assert checks["slurm-shared-fs"]["level"] in ("ok", "info")


def test_logs_follow_waits_for_the_task_and_reads_to_its_end(slurm, tmp_path: Path) -> None:
    wf = write(tmp_path, """
name: chatty
items: [{n: 1}]
stages:
  - {name: talk, command: "for i in 1 2 3; do echo line$i; sleep 0.3; done"}
""")
    run = api.run(wf, "slurm", options=RunOptions(wait=False))
    lines = list(api.logs(run.run_id, "talk[1]", follow=True, store=api.open_store("slurm")))
    body = [ln for ln in lines if ln.startswith("line")]
    assert body == ["line1", "line2", "line3"]
    assert api.open_store("slurm").get_tasks(run.run_id)[0].state == TaskState.SUCCEEDED


def test_resume_pads_arrays_so_aftercorr_finds_every_index(slurm, tmp_path: Path) -> None:
    """a fails for item 1, b for item 2; resume runs a[1], b[1], b[2] only: a's new array holds
    index 1 as a padding row (b[2] waits on it with aftercorr) that runs nothing."""
    wf = write(tmp_path, """
name: pad
items: [{n: 1}, {n: 2}, {n: 3}]
stages:
  - {name: a, command: "if [ {n} = 1 ] && [ ! -e {workdir}/ok ]; then exit 5; fi; echo x >> {workdir}/a-{n}"}
  - {name: b, needs: [a], command: "if [ {n} = 2 ] && [ ! -e {workdir}/ok ]; then exit 6; fi; echo x >> {workdir}/b-{n}"}
""")
    run = api.run(wf, "slurm", options=RunOptions(wait=True))
    store = api.open_store("slurm")
    assert states(store.get_tasks(run.run_id)) == {
        "a[1]": "FAILED", "a[2]": "SUCCEEDED", "a[3]": "SUCCEEDED",
        "b[1]": "UPSTREAM_FAILED", "b[2]": "FAILED", "b[3]": "SUCCEEDED"}
    work = api.corral_home() / "runs" / run.run_id / "workspace"
    (work / "ok").touch()
    rec = api.resume(run.run_id, store=store, options=RunOptions(wait=True))
    assert rec.state == RunState.SUCCEEDED
    for name in ("a-1", "a-2", "a-3", "b-1", "b-2", "b-3"):
        assert (work / name).read_text() == "x\n", name
    arrays = store.get_run(run.run_id).options["slurm"]["arrays"]
    second = [a for a in arrays if a["round"] == 2]
    assert [(a["stage"], sorted(a["tasks"].values())) for a in second] == [("a", [0]), ("b", [0, 1])]
    table = api.corral_home() / "runs" / run.run_id / "slurm" / "tables" / f"{second[0]['name']}.tab"
    assert table.read_text().splitlines()[1] == "-"


def test_exit_zero_without_a_declared_output_fails_and_is_retried(slurm, tmp_path: Path) -> None:
    wf = write(tmp_path, """
name: outs
items: [{n: 1}, {n: 2}]
stages:
  - name: make
    retries: 1
    outputs: ["out/{n}.txt", "{workdir}/done-{n}"]
    command: "mkdir -p out && echo hi > out/{n}.txt && if [ {n} = 1 ]; then touch {workdir}/done-{n}; fi"
""")
    run = api.run(wf, "slurm", options=RunOptions(wait=True))
    store = api.open_store("slurm")
    by = {t.label: t for t in store.get_tasks(run.run_id)}
    assert by["make[1]"].state == TaskState.SUCCEEDED
    work = api.corral_home() / "runs" / run.run_id / "workspace"
    assert by["make[2]"].state == TaskState.FAILED and by["make[2]"].attempts == 2
    assert by["make[2]"].reason == f"declared output missing: {work}/done-2"
    assert [a.exit_code for a in store.get_attempts(run.run_id, by["make[2]"].task_id)] == [0, 0]


def test_secrets_are_read_on_the_node_and_never_written(slurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = "s3cr3t-canary-7f1c"
    monkeypatch.setenv("LAB_TOKEN", canary)
    (tmp_path / "key.txt").write_text("file-canary-93ab\n")
    wf = write(tmp_path, f"""
name: secret
items: [{{n: 1}}]
stages:
  - name: use
    secrets: {{TOKEN: "env:LAB_TOKEN", KEY: "file:{tmp_path}/key.txt"}}
    command: printf '%s %s' "$TOKEN" "$KEY" > {{workdir}}/seen
""")
    run = api.run(wf, "slurm", options=RunOptions(wait=True))
    folder = api.corral_home() / "runs" / run.run_id
    assert (folder / "workspace" / "seen").read_text() == f"{canary} file-canary-93ab"
    for f in folder.rglob("*"):
        if f.is_file() and f.name != "seen":
            text = f.read_text(errors="replace")
            assert canary not in text and "file-canary" not in text, f
    assert canary.encode() not in (api.corral_home() / "state.db").read_bytes()


def test_max_parallel_caps_the_array_and_doctor_explains_the_wait(slurm, tmp_path: Path) -> None:
    wf = write(tmp_path, """
name: capped
items: [{n: 1}, {n: 2}, {n: 3}]
stages:
  - {name: nap, command: "sleep 3"}
""")
    res = corral("run", str(wf), "--backend", "slurm", "--max-parallel", "1")
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.strip().splitlines()[-1]
    folder = api.corral_home() / "runs" / run_id / "slurm" / "scripts"
    [script_file] = folder.iterdir()
    assert "#SBATCH --array=0-2%1" in script_file.read_text()
    deadline = time.monotonic() + 30
    while True:
        doc = corral("doctor", run_id, "--json")
        found = [f for f in json.loads(doc.stdout)["findings"] if f["check"] == "slurm-pending"]
        if found:
            break
        assert time.monotonic() < deadline, doc.stdout
        time.sleep(0.3)
    assert "JobArrayTaskLimit" in found[0]["message"] and "max_parallel" in found[0]["message"]
    corral("cancel", run_id)


class SmallArrays(SlurmClient):
    """The cluster as if its MaxArraySize were 3 (the arrays really are cut at 3 and submitted)."""

    @property
    def max_array_size(self) -> int:
        return 3


def test_arrays_cut_at_max_array_size_keep_per_item_chains(slurm, tmp_path: Path) -> None:
    wf = write(tmp_path, """
name: chunks
items: [{n: 0}, {n: 1}, {n: 2}, {n: 3}, {n: 4}, {n: 5}, {n: 6}]
stages:
  - {name: a, command: "test {n} != 4 && echo {index} > {workdir}/a-{n}"}
  - {name: b, needs: [a], command: "test $(cat {workdir}/a-{n}) = {n} && echo ok > {workdir}/b-{n}"}
""")
    client = SmallArrays()
    be = SlurmBackend(api.corral_home(), client=client)
    run = api.run(wf, "slurm", options=RunOptions(wait=True), backend_impl=be)
    assert client.calls["sbatch"] == 6  # 3 chunks (3 + 3 + 1 items) × 2 stages
    got = states(api.open_store("slurm").get_tasks(run.run_id))
    assert got == {**{f"a[{i}]": "SUCCEEDED" for i in range(7) if i != 4}, "a[4]": "FAILED",
                   **{f"b[{i}]": "SUCCEEDED" for i in range(7) if i != 4}, "b[4]": "UPSTREAM_FAILED"}
    arrays = api.open_store("slurm").get_run(run.run_id).options["slurm"]["arrays"]
    assert [(a["stage"], a["chunk"], sorted(a["tasks"].values())) for a in arrays] == [
        ("a", 0, [0, 1, 2]), ("a", 1, [0, 1, 2]), ("a", 2, [0]),
        ("b", 0, [0, 1, 2]), ("b", 1, [0, 1, 2]), ("b", 2, [0])]


def test_an_sbatch_refusal_names_the_stage_and_keeps_what_was_submitted(slurm, tmp_path: Path) -> None:
    wf = write(tmp_path, """
name: refused
slurm:
  stages: {b: {extra: ["--constraint=no-such-feature"]}}
items: [{n: 1}]
stages:
  - {name: a, command: "true"}
  - {name: b, needs: [a], command: "true"}
""")
    res = corral("run", str(wf), "--backend", "slurm")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "stage 'b': sbatch --parsable failed" in res.stderr and "corral cancel" in res.stderr
    store = api.open_store("slurm")
    run = store.list_runs(limit=1)[0]
    tasks = {t.label: t for t in wait_until(lambda: _settled_a(store, run.run_id))}
    assert tasks["a[1]"].state == TaskState.SUCCEEDED and tasks["b[1]"].state == TaskState.PENDING
    assert [a["stage"] for a in store.get_run(run.run_id).options["slurm"]["arrays"]] == ["a", "b"]
    assert corral("cancel", run.run_id).returncode == 0
    assert store.get_run(run.run_id).state == RunState.CANCELLED


def _settled_a(store, run_id: str) -> list | None:  # type: ignore[no-untyped-def]
    tasks = api.status(run_id, store=store)
    return tasks if any(t.label == "a[1]" and t.state.terminal for t in tasks) else None


def wait_until(predicate, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (got := predicate()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return got


def test_a_timeout_stops_the_try_with_the_local_reason(slurm, tmp_path: Path) -> None:
    wf = write(tmp_path, """
name: slowpoke
items: [{n: 1}]
stages:
  - {name: s, timeout: 2s, command: "sleep 60"}
""")
    t0 = time.monotonic()
    run = api.run(wf, "slurm", options=RunOptions(wait=True))
    assert time.monotonic() - t0 < 40
    [t] = api.open_store("slurm").get_tasks(run.run_id)
    assert (t.state, t.reason, t.exit_code) == (TaskState.FAILED, "timed out after 2s", 124)
