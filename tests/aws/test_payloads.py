"""Payloads: the item table and its sh wrapper, job definitions, chunking — and, against moto,
each submitted array child decoded by the real wrapper under /bin/sh does exactly its item's work."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_backend_support import make_environment, record_run

from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch.backend import AwsBatchBackend
from corral.backends.aws_batch.client import AwsClients
from corral.backends.base import RunOptions
from corral.errors import PlanError
from corral.plan import make_plan
from corral.spec import loads_workflow
from corral.state.sqlite import SqliteStore

AWKWARD = [
    "plain",
    "with space",
    "it's quoted \"twice\"",
    "$HOME and `uname` and $(id)",
    "ünïcødé ✓ 日本",
    "new\nline\nand\ttab",
    "back\\slash '\"'",
    "-n",
    "*",
    "",
]

WORKFLOW = """
name: awkward
defaults:
  image: busybox
items: ITEMS
stages:
  - name: first
    command: printf '%s|%s|%s' {label} "$CORRAL_ITEM_KEY" "$GREETING" > "$OUT/first-{n}"
    env: {GREETING: "hi {label}", CONST: same}
  - name: second
    needs: [first]
    command: ["/bin/sh", "-c", "printf '%s' \\"$1\\" > \\"$OUT/second-$CORRAL_ITEM_INDEX\\"", "sh", "{label}"]
  - name: total
    per: run
    needs: [second]
    command: echo done > $OUT/total-{run}
  - name: dump
    needs: [first]
    command: ["env", "-0"]
    env: {LABEL_TOO: "{label}!"}
  - name: tagged
    needs: [first]
    command: ["env", "-0"]
    env: {MARK: "task-{task}"}
"""


def _workflow(labels: list[str]) -> Any:
    import json

    items = json.dumps([{"label": v, "n": i} for i, v in enumerate(labels)])
    return loads_workflow(WORKFLOW.replace("ITEMS", items))


_DEFS: dict[str, dict[str, Any]] = {}


def _definition_of(job: dict[str, Any]) -> dict[str, Any]:
    """The job definition a described job runs with (as ECS starts its task: definition + overrides)."""
    arn = job["jobDefinition"]
    if arn not in _DEFS:
        _DEFS[arn] = AwsClients().batch.describe_job_definitions(jobDefinitions=[arn])["jobDefinitions"][0]
    return _DEFS[arn]


def _job_env(job: dict[str, Any]) -> dict[str, str]:
    """The environment a task of the job starts with: the job definition's, then the overrides'."""
    props = _definition_of(job)["containerProperties"]
    env = {e["name"]: e["value"] for e in props.get("environment", [])}
    env.update({e["name"]: e["value"] for e in job["container"]["environment"]})
    return env


def _run_child(job: dict[str, Any], command: list[str], index: int | None, out: Path) -> subprocess.CompletedProcess:
    command = _definition_of(job)["containerProperties"]["command"]
    env = _job_env(job)
    env.update(PATH=os.environ["PATH"], OUT=str(out))
    if index is not None:
        env["AWS_BATCH_JOB_ARRAY_INDEX"] = str(index)
    env["CORRAL_WORKDIR"] = str(out / "work")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.aws
def test_each_child_runs_exactly_its_item(aws: str, tmp_path: Path) -> None:
    clients = AwsClients()
    env = make_environment(clients)
    plan = make_plan(_workflow(AWKWARD))
    store = SqliteStore(tmp_path / "state.db")
    run = record_run(store, plan, "run-awk")
    sent: list[dict[str, Any]] = []
    clients.register_hook("before-parameter-build.batch.SubmitJob", lambda params, **kw: sent.append(dict(params)))
    backend = AwsBatchBackend(clients, environment=env)
    backend.start(plan, run, store, RunOptions(wait=False))

    tasks = store.get_tasks("run-awk")
    parents = sorted({t.external_id.split(":")[0] for t in tasks})
    assert len(parents) == 5  # four arrays and one plain job
    jobs = clients.batch.describe_jobs(jobs=parents)["jobs"]
    by_name = {j["jobName"]: j for j in jobs}
    first = by_name["corral-run-awk-first-r0-c0"]
    second = by_name["corral-run-awk-second-r0-c0"]
    total = by_name["corral-run-awk-total-r0"]
    assert first["arrayProperties"]["size"] == len(AWKWARD) == second["arrayProperties"]["size"]
    assert second["dependsOn"] == [{"jobId": first["jobId"], "type": "N_TO_N"}]
    assert total["dependsOn"] == [{"jobId": second["jobId"]}]
    assert "arrayProperties" not in total or "size" not in total.get("arrayProperties", {})

    # The command and the stage-wide values come from the job definition (one per stage's runtime and
    # argv template, not per job): the command boots the wrapper from the definition's environment.
    defs = clients.batch.describe_job_definitions(status="ACTIVE")["jobDefinitions"]
    assert len(defs) == len({j["jobDefinition"] for j in jobs}) <= 5
    command = defs[0]["containerProperties"]["command"]
    assert command == pl.BOOT_COMMAND
    assert all("AWS_BATCH_JOB_ARRAY_INDEX" in _job_env(j)[pl.WRAPPER_VAR] for j in jobs)

    for k, label in enumerate(AWKWARD):
        r1 = _run_child(first, command, k, tmp_path)
        assert r1.returncode == 0, r1.stderr
        r2 = _run_child(second, command, k, tmp_path)
        assert r2.returncode == 0, r2.stderr
        task = plan.stage_tasks("first")[k]
        assert (tmp_path / f"first-{k}").read_text() == f"{label}|{task.key}|hi {label}"
        assert (tmp_path / f"second-{k}").read_text() == label  # child k of both arrays is item k
        # The child's environment is exactly Task.env (plus the container's own), nothing of ours left.
        dump = _run_child(by_name["corral-run-awk-dump-r0-c0"], command, k, tmp_path)
        assert dump.returncode == 0, dump.stderr
        seen = dict(kv.split("=", 1) for kv in dump.stdout.split("\0") if kv)
        want = plan.stage_tasks("dump")[k].env("run-awk", seen["CORRAL_WORKDIR"])
        # ... but CORRAL_TASK_ID, which the stage does not use ({task}): the rows stay small.
        assert "CORRAL_TASK_ID" not in seen
        del want["CORRAL_TASK_ID"]
        assert {key: seen.get(key) for key in want} == want
        # A stage that uses {task} gets its own task's id, in CORRAL_TASK_ID and in what it renders.
        tagged = _run_child(by_name["corral-run-awk-tagged-r0-c0"], command, k, tmp_path)
        assert tagged.returncode == 0, tagged.stderr
        seen = dict(kv.split("=", 1) for kv in tagged.stdout.split("\0") if kv)
        task = plan.stage_tasks("tagged")[k]
        want = task.env("run-awk", seen["CORRAL_WORKDIR"])
        assert {key: seen.get(key) for key in want} == want
        assert seen["CORRAL_TASK_ID"] == task.id and seen["MARK"] == f"task-{task.id}"
        assert not [key for key in seen if key in ("CORRAL_TABLE", "CORRAL_COLUMNS", "CORRAL_FIELDS", "CORRAL_ARGV")]
    r3 = _run_child(total, command, None, tmp_path)
    assert r3.returncode == 0, r3.stderr
    assert (tmp_path / "total-run-awk").read_text() == "done\n"
    # Nothing else was written: each child did exactly one item's work.
    assert len(list(tmp_path.glob("first-*"))) == len(AWKWARD)
    # Constant values travel in the job definition; per-item ones only in the table.
    first_env = _job_env(first)
    assert first_env["CONST"] == "same" and first_env["CORRAL_STAGE"] == "first"
    assert "GREETING" not in first_env and "label" not in first_env
    assert len(sent) == 5
    for params in sent:  # what SubmitJob sent: the table and a few names only
        overrides = {e["name"] for e in params["containerOverrides"]["environment"]}
        assert overrides <= {pl.TABLE_VAR, *pl.OVERRIDE_KEYS}, overrides
    # Task ids travel in the rows of the stage using {task} only.
    ids = {t.id for t in plan.tasks}
    for name, has_ids in [("first", False), ("second", False), ("dump", False), ("tagged", True)]:
        job_env = _job_env(by_name[f"corral-run-awk-{name}-r0-c0"])
        assert ("CORRAL_TASK_ID" in job_env["CORRAL_COLUMNS"].split()) == has_ids, name
        table = pl.decode_table(job_env[pl.TABLE_VAR])
        assert any(tid in row for row in table for tid in ids) == has_ids, name
    # A placeholder inside quotes ("$OUT/first-{n}"): the argv is rendered per task, as locally.
    assert "CORRAL_ARGV" in first_env["CORRAL_COLUMNS"].split()
    # Otherwise the command is rendered once, with references (a list, and a string command).
    second_env = _job_env(second)
    assert "${CORRAL_ITEM_label}" in second_env["CORRAL_ARGV"]
    total_env = _job_env(total)
    assert "${CORRAL_RUN_ID}" in total_env["CORRAL_ARGV"]


def test_wrapper_rejects_missing_row_and_skips_padding(tmp_path: Path) -> None:
    table = pl.encode_table([pl.PADDING_ROW, "'3'"])
    env = {"PATH": os.environ["PATH"], "CORRAL_TABLE": table, "CORRAL_COLUMNS": "X", "CORRAL_FIELDS": "",
           "CORRAL_ARGV": "'/bin/sh' '-c' 'exit $X'"}
    run = lambda i: subprocess.run(  # noqa: E731
        ["/bin/sh", "-c", pl.WRAPPER], env={**env, "AWS_BATCH_JOB_ARRAY_INDEX": str(i)}, capture_output=True, text=True
    )
    assert run(0).returncode == 0
    assert run(1).returncode == 3
    missing = run(5)
    assert missing.returncode == 97 and "no row 5" in missing.stderr


def test_sh_quote_round_trips_awkward_values(tmp_path: Path) -> None:
    for value in AWKWARD:
        line = f"{pl.sh_quote(value)} {pl.sh_quote(value + '2')}"
        assert "\n" not in line
        assert pl.row_values(["V", "CORRAL_TASK_ID"], line) == {"V": value, "CORRAL_TASK_ID": value + "2"}
        out = subprocess.run(
            ["/bin/sh", "-c", pl.WRAPPER], capture_output=True,
            env={"PATH": os.environ["PATH"], "CORRAL_TABLE": pl.encode_table([line]), "CORRAL_FIELDS": "",
                 "CORRAL_COLUMNS": "V CORRAL_TASK_ID", "CORRAL_ARGV": "/bin/sh -c 'printf %s \"$V\"'"},
        )
        assert out.returncode == 0 and out.stdout.decode() == value
    with pytest.raises(PlanError, match="NUL"):
        pl.sh_quote("a\x00b")


def _ctx() -> pl.JobContext:
    return pl.JobContext(region="eu-west-1", account_id="111122223333", log_group="/lg",
                         job_role_arn="arn:role/job", execution_role_arn="arn:role/exec")


def test_job_definition_content_naming_and_retry_rules() -> None:
    wf = loads_workflow(
        """
name: jd
items: [{a: 1}]
stages:
  - {name: a, image: img:1, command: "true", retries: 3, timeout: 10s,
     resources: {vcpus: 1.5, memory: 3GiB, gpus: 1}, secrets: {TOKEN: aws:dandi-key}}
  - {name: b, image: img:1, command: "false", retries: 3, timeout: 10s,
     resources: {vcpus: 1.5, memory: 3GiB, gpus: 1}, secrets: {TOKEN: aws:dandi-key}}
  - {name: c, image: img:1, command: "true"}
"""
    )
    a, b, c = (pl.job_definition(wf.stage(n), _ctx()) for n in "abc")
    assert a.name == b.name != c.name  # same runtime → one definition; the command is per job
    kw = a.kwargs
    cp = kw["containerProperties"]
    assert cp["resourceRequirements"] == [
        {"type": "VCPU", "value": "2"}, {"type": "MEMORY", "value": "3072"}, {"type": "GPU", "value": "1"}
    ]
    # one try per attempt: Batch's limit is the try's timeout, a little after the wrapper's own
    assert kw["timeout"] == {"attemptDurationSeconds": 60}
    rs = kw["retryStrategy"]
    assert rs["attempts"] == 1 + 3 + pl.INFRA_RETRIES and len(rs["evaluateOnExit"]) <= 5
    assert rs["evaluateOnExit"][0] == {"onStatusReason": "Host EC2*", "action": "RETRY"}
    # Batch retries the command only when the wrapper asks (RETRY_EXIT); its last try's own code ends the job
    codes = [r.get("onExitCode") for r in rs["evaluateOnExit"]]
    assert codes.index(str(pl.RETRY_EXIT)) < codes.index("*")
    assert {"onExitCode": "*", "action": "EXIT"} in rs["evaluateOnExit"]
    assert cp["secrets"] == [
        {"name": "TOKEN", "valueFrom": "arn:aws:secretsmanager:eu-west-1:111122223333:secret:dandi-key"}
    ]
    assert {e["name"]: e["value"] for e in cp["environment"]} == {"CORRAL_RETRIES": "3", "CORRAL_TRY_TIMEOUT": "10"}
    # retries: 0 still retries spot reclaims and image pulls (a separate bound), never the command
    assert c.kwargs["retryStrategy"] == pl.retry_strategy(0) and pl.retry_strategy(0)["attempts"] == 1 + pl.INFRA_RETRIES
    assert pl.retry_strategy(9)["attempts"] == 10  # Batch's most
    assert "environment" not in c.kwargs["containerProperties"]


def _counting_command(tmp_path: Path, fail_times: int) -> str:
    counter = tmp_path / "count"
    counter.write_text("0")
    return (f"n=$(cat {counter}); n=$((n + 1)); echo $n > {counter}; "
            f"if [ $n -le {fail_times} ]; then exit 3; fi; echo ok")


@pytest.mark.parametrize("retries, fail_times, want_rc, want_runs", [
    (0, 1, 3, 1), (2, 2, 0, 3), (2, 5, 3, 3), (1, 0, 0, 1),
])
def test_batch_reruns_a_failed_command_retries_times(
    tmp_path: Path, retries: int, fail_times: int, want_rc: int, want_runs: int
) -> None:
    """`retries: N` on AWS: each try is one Batch attempt. The wrapper asks for another
    (RETRY_EXIT) while AWS_BATCH_JOB_ATTEMPT <= N; the job definition's retry strategy, played
    here as Batch does (first matching rule), retries exactly those: the command runs as many
    times as locally, and the last try's own exit code is the job's."""
    import fnmatch

    cmd = _counting_command(tmp_path, fail_times)
    strategy = pl.retry_strategy(retries)
    codes, stderr = [], ""
    while True:
        env = {"PATH": os.environ["PATH"], "CORRAL_TABLE": pl.encode_table(["x"]), "CORRAL_COLUMNS": "X",
               "CORRAL_FIELDS": "", "CORRAL_ARGV": " ".join(pl.sh_quote(a) for a in ["/bin/sh", "-c", cmd]),
               "CORRAL_WRAPPER": pl.WRAPPER, "AWS_BATCH_JOB_ATTEMPT": str(len(codes) + 1),
               **({"CORRAL_RETRIES": str(retries)} if retries else {})}
        out = subprocess.run(pl.BOOT_COMMAND, env=env, capture_output=True, text=True, timeout=60)
        codes.append(out.returncode)
        stderr += out.stderr
        if out.returncode == 0 or len(codes) >= strategy["attempts"]:
            break
        rule = next(r for r in strategy["evaluateOnExit"]
                    if "onExitCode" in r and fnmatch.fnmatchcase(str(out.returncode), r["onExitCode"]))
        if rule["action"] == "EXIT":
            break
    assert codes[-1] == want_rc, stderr
    assert codes[:-1] == [pl.RETRY_EXIT] * (want_runs - 1)
    assert int((tmp_path / "count").read_text()) == want_runs
    assert stderr.count("corral: the command exited 3; retry") == want_runs - 1


def test_a_command_exiting_corrals_retry_code_on_its_last_try_is_not_retried(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "CORRAL_TABLE": pl.encode_table(["x"]), "CORRAL_COLUMNS": "X",
           "CORRAL_FIELDS": "", "CORRAL_ARGV": f"/bin/sh -c 'exit {pl.RETRY_EXIT}'", "CORRAL_WRAPPER": pl.WRAPPER,
           "AWS_BATCH_JOB_ATTEMPT": "1"}
    out = subprocess.run(pl.BOOT_COMMAND, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "recorded as 1" in out.stderr


def test_wrapper_runs_the_program_of_the_job_definition_with_the_rows_argv(tmp_path: Path) -> None:
    """A transfer's script is the job definition's (CORRAL_PROGRAM), the row holds only its arguments."""
    env = {"PATH": os.environ["PATH"], "CORRAL_TABLE": pl.encode_table(["'a b' c"]), "CORRAL_COLUMNS": "X Y",
           "CORRAL_FIELDS": "", "CORRAL_ARGV": '"$X" "$Y"', "CORRAL_WRAPPER": pl.WRAPPER,
           "CORRAL_PROGRAM": 'printf "%s|" "$@"'}
    out = subprocess.run(pl.BOOT_COMMAND, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "a b|c|", out.stderr


def test_shm_becomes_shared_memory_size_and_is_validated() -> None:
    from corral.errors import SpecError

    wf = loads_workflow(
        "name: shm\nitems: [{a: 1}]\nstages:\n"
        "  - {name: sort, image: img:1, command: 'true', resources: {memory: 8GiB, shm: 2GiB}}\n"
    )
    kw = pl.job_definition(wf.stage("sort"), _ctx()).kwargs
    assert kw["containerProperties"]["linuxParameters"] == {"sharedMemorySize": 2048}
    with pytest.raises(PlanError, match="Fargate"):
        pl.job_definition(wf.stage("sort"), pl.JobContext(region="r", account_id="1", execution_role_arn="x"),
                          fargate=True)
    with pytest.raises(SpecError, match="shm"):
        loads_workflow("name: shm\nitems: [{a: 1}]\nstages:\n"
                       "  - {name: s, command: 'true', resources: {memory: 1GiB, shm: 2GiB}}\n")
    # locally, containers get the same /dev/shm (processes use the host's)
    from corral.backends.runtime import Engine, container_argv

    argv = container_argv(Engine(name="docker", path="/usr/bin/docker"), name="n", image="img:1", argv=["true"],
                          env_names=[], mounts=[], cwd="/", vcpus=1, memory_mib=8192, gpus=0, shm_mib=2048)
    assert "--shm-size=2048m" in argv


def test_chunks_respect_payload_and_array_limits() -> None:
    import random

    rng = random.Random(7)
    # Incompressible rows force several chunks; every chunk's table stays in budget.
    rows = ["export X='" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(120)) + "'"
            for _ in range(2000)]
    budget = 20_000
    sizes = pl.chunk_bounds([rows, rows[::-1]], budget)
    assert sum(sizes) == 2000 and len(sizes) > 3
    start = 0
    for n in sizes:
        assert len(pl.encode_table(rows[start : start + n])) <= budget
        start += n
    # Compressible rows: limited by the 10,000 array size.
    assert pl.chunk_bounds([["set -- true"] * 25_000], budget) == [10_000, 10_000, 5_000]
    with pytest.raises(PlanError, match="too large"):
        pl.chunk_bounds([[os.urandom(4000).hex()]], 1000)


def test_task_id_column_only_where_the_task_id_is_used() -> None:
    wf = loads_workflow(
        """
name: ids
defaults: {image: img}
items: [{s: a}, {s: b}]
stages:
  - {name: plain, command: "work {s} {item} {index} {run}"}
  - {name: in_command, command: "work {s} --tag {task}"}
  - {name: in_list, command: ["work", "--tag=x{task}"]}
  - {name: in_env, command: "work {s}", env: {TAG: "t-{task}"}}
  - {name: in_shell, command: "work {s} --tag \\"$CORRAL_TASK_ID\\""}
  - {name: escaped, command: "echo {{task}} {s}"}
  - {name: copy_out, from: "workspace://out/{s}", to: "s3://bucket/{task}/{s}"}
  - {name: copy_in, from: "s3://bucket/in/{s}", to: "workspace://in/{s}"}
  - {name: tidy, kind: cleanup, per: run, needs: [plain]}
"""
    )
    plan = make_plan(wf)
    uses = {s.name: pl.uses_task_id(s) for s in wf.stages}
    assert uses == {"plain": False, "in_command": True, "in_list": True, "in_env": True, "in_shell": True,
                    "escaped": False, "copy_out": True, "copy_in": False, "tidy": False}
    ids = {t.id for t in plan.tasks}
    for s in wf.stages:
        tasks = plan.stage_tasks(s.name)
        argv_of = (lambda t: ["rclone", "copy", t.id]) if s.name == "copy_out" else None
        table = pl.StageTable(tasks, "r1", "/tmp/corral/r1", argv_of=argv_of)
        assert ("CORRAL_TASK_ID" in table.columns) == uses[s.name], s.name
        rows = [table.row(t) for t in tasks]
        if not uses[s.name]:
            assert not any(tid in row for row in rows for tid in ids), s.name


@pytest.mark.parametrize("attempt, skip, input_newer, ran", [
    ("1", "1", False, False),  # outputs there, none older than an input: skipped, logged for the refresh
    ("1", "1", True, True),  # an input newer than an output: the command runs
    ("1", "", False, True),  # --force (no CORRAL_SKIP_DONE): runs
    ("2", "1", False, True),  # a retry is never skipped (locally neither)
])
def test_wrapper_skips_a_task_whose_workspace_outputs_exist(
    tmp_path: Path, attempt: str, skip: str, input_newer: bool, ran: bool
) -> None:
    wf = loads_workflow("name: w\nitems: [{s: a}]\nstages:\n  - {name: m, image: i, command: 'touch {workdir}/ran',"
                        " inputs: ['workspace://{s}.in'], outputs: ['workspace://{s}.out']}\n")
    stage = wf.stage("m")
    assert pl.in_job_skip(stage)
    (tmp_path / "a.in").write_text("in")
    (tmp_path / "a.out").write_text("out")
    old, new = 1_000_000_000, 1_000_000_100
    os.utime(tmp_path / "a.in", (new, new) if input_newer else (old, old))
    os.utime(tmp_path / "a.out", (old + 50, old + 50))
    env = {"PATH": os.environ["PATH"], "CORRAL_TABLE": pl.encode_table(["a"]), "CORRAL_COLUMNS": "CORRAL_ITEM_s",
           "CORRAL_FIELDS": "", "CORRAL_ARGV": f"/bin/sh -c 'touch {tmp_path}/ran'", "CORRAL_WRAPPER": pl.WRAPPER,
           "CORRAL_WORKDIR": str(tmp_path), "CORRAL_RUN_ID": "r1", "AWS_BATCH_JOB_ID": "job-1:0",
           "AWS_BATCH_JOB_ATTEMPT": attempt, "CORRAL_OUTPUTS": pl.outputs_words(stage),
           "CORRAL_INPUTS": pl.inputs_words(stage), **({"CORRAL_SKIP_DONE": skip} if skip else {})}
    out = subprocess.run(pl.BOOT_COMMAND, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ran").exists() == ran
    assert ("corral-skipped r1 job-1:0 " in out.stderr) == (not ran)
