"""retry_memory in the spec, the growth rule every backend shares, and the AWS wrapper's and
refresh's share of out-of-memory kills (the wrapper run for real with /bin/sh)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from corral.backends import oom
from corral.backends.aws_batch import memory as aws_memory
from corral.backends.aws_batch import payloads as pl
from corral.errors import SpecError
from corral.model import TaskRecord, TaskState
from corral.spec import Resources, Workflow, loads_workflow


def _wf(resources: str, retries: int = 2) -> Workflow:
    return loads_workflow(f"""name: w
stages:
  - name: s
    command: echo
    retries: {retries}
    resources: {resources}
""", source="w.yaml")


@pytest.mark.parametrize("value, want", [("2x", 2.0), ("1.5X", 1.5), ("[3GiB, 8GiB]", [3072, 8192]),
                                         ("[3000, 4GiB]", [3000, 4096])])
def test_retry_memory_is_a_factor_or_growing_sizes(value: str, want: object) -> None:
    assert _wf(f"{{memory: 2GiB, retry_memory: {value}}}").stages[0].resources.retry_memory == want


@pytest.mark.parametrize("value, says", [
    ("2", "neither a factor (write `2x`) nor a list of sizes"),
    ("1x", "must be more than 1x and at most 16x"),
    ("17x", "must be more than 1x and at most 16x"),
    ("[1GiB]", "sizes must grow: 1024MiB is not more than memory (2048MiB)"),
    ("[3GiB, 3GiB]", "sizes must grow: 3072MiB is not more than the size before it (3072MiB)"),
    ("[true]", "neither a factor"),
])
def test_bad_retry_memory_is_one_line_naming_file_and_line(value: str, says: str) -> None:
    with pytest.raises(SpecError) as err:
        _wf(f"{{memory: 2GiB, retry_memory: {value}}}")
    line = err.value.one_line()
    assert line.startswith("w.yaml:6:") and "resources.retry_memory" in line and says in line, line
    assert "\n" not in line and "Traceback" not in line


def test_retry_memory_needs_retries() -> None:
    with pytest.raises(SpecError) as err:
        _wf("{memory: 2GiB, retry_memory: 2x}", retries=0)
    assert "has retries: 0: add `retries: N`" in err.value.one_line()


def test_a_factor_reads_back_from_the_manifest_as_written() -> None:
    wf = _wf("{memory: 2GiB, retry_memory: 1.5x}")
    dumped = wf.model_dump(mode="json")
    assert dumped["stages"][0]["resources"]["retry_memory"] == "1.5x"
    assert Workflow.model_validate(dumped).stages[0].resources.retry_memory == 1.5


def test_next_memory_grows_and_stops_at_the_bound() -> None:
    r = Resources(memory=100, retry_memory="3x")
    assert oom.next_memory(r, 100, None) == 300
    assert oom.next_memory(r, 300, 500) == 500  # the bound caps it
    assert oom.next_memory(r, 500, 500) is None  # at the bound: no more to give
    sizes = Resources(memory=100, retry_memory=["200MiB", "1GiB"])
    assert [oom.next_memory(sizes, m, None) for m in (100, 200, 1024)] == [200, 1024, None]
    assert oom.next_memory(Resources(memory=100), 100, None) is None  # no retry_memory: same memory
    assert oom.final_reason(sizes, 1024, None, "x").endswith("the last size of retry_memory")
    assert oom.final_reason(r, 500, 500, "this machine").endswith("the most this machine gives one task")


def test_reasons_name_the_limit_and_read_back() -> None:
    assert oom.reason(100) == "out of memory (limit 100MiB)"
    assert oom.reason(2048, "exit 137") == "out of memory (limit 2GiB): exit 137"
    assert oom.limit_of("retrying after: out of memory (limit 2GiB): x") == 2048
    assert oom.limit_of("out of memory (limit 300MiB)") == 300 and oom.limit_of("exit code 1") is None


def _oom_env(tmp_path: Path, retries: int) -> dict[str, str]:
    events = tmp_path / "memory.events"
    events.write_text("oom_kill 0\n")
    counter = tmp_path / "count"
    counter.write_text("0")
    cmd = (f"n=$(cat {counter}); echo $((n + 1)) > {counter}; "
           f"k=$(sed -n 's/^oom_kill //p' {events}); echo \"oom_kill $((k + 1))\" > {events}; kill -9 $$")
    return {"PATH": os.environ["PATH"], "CORRAL_TABLE": pl.encode_table(["x"]), "CORRAL_COLUMNS": "X",
            "CORRAL_FIELDS": "", "CORRAL_ARGV": " ".join(pl.sh_quote(a) for a in ["/bin/sh", "-c", cmd]),
            "CORRAL_WRAPPER": pl.WRAPPER, "CORRAL_RETRIES": str(retries), "CORRAL_OOM_EVENTS": str(events)}


def test_the_aws_wrapper_never_reruns_a_command_killed_for_memory(tmp_path: Path) -> None:
    out = subprocess.run(pl.BOOT_COMMAND, env=_oom_env(tmp_path, 3), capture_output=True, text=True, timeout=60)
    assert out.returncode == 137, out.stderr
    assert (tmp_path / "count").read_text().strip() == "1"  # ran once, not 1 + 3 times at the same memory
    assert "killed for memory (exit 137): not re-run with the same memory" in out.stderr


def test_the_aws_wrapper_still_reruns_a_sigkill_that_was_not_for_memory(tmp_path: Path) -> None:
    env = _oom_env(tmp_path, 2)
    env["CORRAL_OOM_EVENTS"] = str(tmp_path / "elsewhere")  # the counter never grows
    (tmp_path / "elsewhere").write_text("oom_kill 0\n")
    env["AWS_BATCH_JOB_ATTEMPT"] = "1"
    out = subprocess.run(pl.BOOT_COMMAND, env=env, capture_output=True, text=True, timeout=60)
    # each try is one Batch attempt: a kill that was not for memory asks Batch for the next one
    assert out.returncode == pl.RETRY_EXIT and (tmp_path / "count").read_text().strip() == "1", out.stderr
    env["AWS_BATCH_JOB_ATTEMPT"] = "3"  # the last try ends the job with the command's own code
    out = subprocess.run(pl.BOOT_COMMAND, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 137 and (tmp_path / "count").read_text().strip() == "2", out.stderr


def test_batch_oom_reasons_become_every_backends_reason() -> None:
    t = TaskRecord(run_id="r", task_id="t1", stage="s", item_key="a", item_index=0, state=TaskState.FAILED,
                   exit_code=137, reason="Essential container in task exited: OutOfMemoryError: Container killed "
                                         "due to memory usage")
    changed = {"t1": t}
    aws_memory.name_oom({"memory": {"t1": {"mib": 300}}}, None, changed)
    assert changed["t1"].reason == ("out of memory (limit 300MiB): Essential container in task exited: "
                                    "OutOfMemoryError: Container killed due to memory usage")


def test_the_aws_bound_is_the_largest_allowed_instance_that_holds_the_task() -> None:
    r = Resources(vcpus=2, memory=1024)
    small = aws_memory.bound_mib(r, ["m6i.large"])
    assert small is not None and 7000 < small < 8192  # 8 GiB less what ECS keeps
    # Fargate: up to 120 GiB, the override raising the vCPUs to a valid pair
    assert aws_memory.bound_mib(r, ["fargate"]) == 122880
    assert aws_memory.bound_mib(r, ["fargate", "r6i"]) == 122880  # routed to Fargate: stays there
    assert aws_memory.overrides(r, 20000, fargate=True) == [{"type": "VCPU", "value": "4"},
                                                            {"type": "MEMORY", "value": "20480"}]
    assert aws_memory.overrides(r, 3000, fargate=True) == [{"type": "VCPU", "value": "2"},
                                                           {"type": "MEMORY", "value": "4096"}]
    assert aws_memory.overrides(r, 3000, fargate=False) == [{"type": "MEMORY", "value": "3000"}]


def test_an_exit_137_with_another_cause_is_not_an_oom_kill() -> None:
    def t(reason: str) -> TaskRecord:
        return TaskRecord(run_id="r", task_id="t", stage="s", item_key="a", item_index=0, state=TaskState.FAILED,
                          exit_code=137, reason=reason)

    assert aws_memory.is_batch_oom(t("Essential container in task exited"))
    assert not aws_memory.is_batch_oom(t("Your Spot Task was interrupted."))
    assert not aws_memory.is_batch_oom(t("Host EC2 (instance i-0abc) terminated."))


def test_plan_shows_how_memory_grows(tmp_path: Path) -> None:
    import json
    import sys

    wf = tmp_path / "w.yaml"
    wf.write_text("name: w\nitems: [{s: a}]\nstages:\n  - name: s\n    command: echo\n    retries: 2\n"
                  "    resources: {memory: 1GiB, retry_memory: [2GiB, 4GiB]}\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "corral", "plan", str(wf), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    assert json.loads(run("--json").stdout)["stages"][0]["retry_memory"] == [2048, 4096]
    assert "1GiB (then 2GiB, 4GiB on OOM)" in run().stderr
