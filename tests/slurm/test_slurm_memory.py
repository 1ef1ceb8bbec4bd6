"""Out-of-memory kills on Slurm, against the real slurmctld/slurmd on 127.0.0.1.

The test cluster runs ``task/none`` with ``jobacct_gather/none`` (tests/slurm_cluster.py): Slurm
enforces no memory there, so no honest out-of-memory kill can happen. The kill is injected at the
one seam the wrapper reads: the job's memory cgroup ``oom_kill`` counter (``$CORRAL_OOM_EVENTS``,
which names the file), which the command bumps before it kills itself with SIGKILL, as the kernel
would. What is real: the wrapper's reading of it, the records, the refresh that resubmits the task
with a new ``sbatch --mem`` (Slurm's own ``SLURM_MEM_PER_NODE`` in the job proves it), the
dependents Slurm cancelled running again, and nothing running twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from corral import api
from corral.model import RunState, TaskState

pytestmark = pytest.mark.slurm

# the kernel's OOM kill, at the counter the wrapper reads: bump oom_kill, then SIGKILL ourselves
OOM = ('n=$(sed -n "s/^oom_kill //p" "$CORRAL_OOM_EVENTS"); '
       'echo "oom_kill $((${n:-0} + 1))" > "$CORRAL_OOM_EVENTS.$$"; mv -f "$CORRAL_OOM_EVENTS.$$" "$CORRAL_OOM_EVENTS"; '
       'kill -9 $$')


def test_an_oom_kill_is_resubmitted_with_more_memory_and_its_dependents_run_after(
        slurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = tmp_path / "memory.events"
    events.write_text("oom_kill 0\n")
    monkeypatch.setenv("CORRAL_OOM_EVENTS", str(events))  # sbatch --export=ALL passes it on
    out = tmp_path / "out"
    out.mkdir()
    wf = tmp_path / "workflow.yaml"
    wf.write_text(f"""
name: slurm-oom
items: [{{s: big}}, {{s: small}}]
stages:
  - name: eat
    retries: 3
    resources: {{memory: 100MiB, retry_memory: 3x}}
    command: >-
      echo "$SLURM_MEM_PER_NODE" >> {out}/{{s}}.mem;
      if [ {{s}} = big ] && [ "$SLURM_MEM_PER_NODE" -lt 500 ]; then {OOM}; fi
  - name: after
    needs: [eat]
    command: echo {{s}} >> {out}/after.txt
""")
    run = api.run(wf, backend="slurm")
    store = api.open_store("slurm")
    run = store.get_run(run.run_id)
    tasks = {t.label: t for t in api.status(run.run_id, store=store)}
    assert run.state == RunState.SUCCEEDED, {k: (t.state, t.reason) for k, t in tasks.items()}
    big = tasks["eat[big]"]
    assert (big.state, big.attempts) == (TaskState.SUCCEEDED, 3)
    attempts = [(a.attempt, a.state.value, a.exit_code, a.reason) for a in store.get_attempts(run.run_id, big.task_id)]
    assert attempts == [
        (1, "FAILED", 137, "out of memory (limit 100MiB): killed by the kernel (exit 137)"),
        (2, "FAILED", 137, "out of memory (limit 300MiB): killed by the kernel (exit 137)"),
        (3, "SUCCEEDED", 0, "")]
    # each try had the --mem of its own sbatch: 100, then 300, then 900 MiB
    assert (out / "big.mem").read_text().split() == ["100", "300", "900"]
    assert (out / "small.mem").read_text().split() == ["100"]
    assert sorted((out / "after.txt").read_text().split()) == ["big", "small"]  # each once
    assert tasks["eat[small]"].attempts == 1


def test_without_retry_memory_an_oom_kill_is_retried_in_the_job_like_any_failure(
        slurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = tmp_path / "memory.events"
    events.write_text("oom_kill 0\n")
    monkeypatch.setenv("CORRAL_OOM_EVENTS", str(events))
    wf = tmp_path / "workflow.yaml"
    wf.write_text(f"""
name: slurm-oom-same
items: [{{s: a}}]
stages:
  - name: eat
    retries: 1
    resources: {{memory: 100MiB}}
    command: '{OOM}'
""")
    run = api.run(wf, backend="slurm")
    store = api.open_store("slurm")
    (t,) = api.status(run.run_id, store=store)
    assert (t.state, t.attempts, t.exit_code) == (TaskState.FAILED, 2, 137)
    assert t.reason == "out of memory (limit 100MiB): killed by the kernel (exit 137)"
    assert [a.reason for a in store.get_attempts(run.run_id, t.task_id)] == [t.reason] * 2


def test_a_step_slurm_kills_for_memory_is_resubmitted_with_more(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A real kill: a cluster whose slurmstepd samples each step's memory every second and kills it
    past --mem (JobAcctGatherParams=OverMemoryKill). The wrapper dies with the step, so the refresh
    reads slurmstepd's own line in the job's stderr; the retry is a new sbatch with more --mem."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from slurm_cluster import ClusterUnavailable, memory_kill_cluster

    try:
        cluster = memory_kill_cluster()
    except ClusterUnavailable as exc:
        pytest.skip(f"no Slurm cluster here: {exc}")
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    out = tmp_path / "out"
    out.mkdir()
    wf = tmp_path / "workflow.yaml"
    wf.write_text(f"""
name: slurm-overmemory
items: [{{s: a}}]
stages:
  - name: eat
    retries: 2
    resources: {{memory: 100MiB, retry_memory: [1GiB]}}
    command: >-
      echo "$SLURM_MEM_PER_NODE" >> {out}/mem;
      python3 -c "import time; b = bytearray(500 * 2**20); time.sleep(4)"
""")
    run = api.run(wf, backend="slurm")
    store = api.open_store("slurm")
    (t,) = api.status(run.run_id, store=store)
    assert store.get_run(run.run_id).state == RunState.SUCCEEDED, t.reason
    assert (t.state, t.attempts) == (TaskState.SUCCEEDED, 2)
    (first, second) = store.get_attempts(run.run_id, t.task_id)
    assert first.state == TaskState.FAILED and first.reason.startswith("out of memory (limit 100MiB): "), first.reason
    assert "memory limit" in first.reason  # slurmstepd's words
    assert (out / "mem").read_text().split() == ["100", "1024"]
