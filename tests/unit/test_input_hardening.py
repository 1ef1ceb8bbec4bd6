"""Hostile and odd input (issues #17, #16.6, #13 containment): one line, exit 2, nothing recorded."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.errors import SpecError
from corral.plan import Plan, make_plan
from corral.spec import load_workflow, loads_workflow
from corral.yamlpos import load_text

STAGE = "stages:\n  - name: s\n    command: echo {x}\n"


def plan_of(text: str, base: Path | None = None) -> Plan:
    return make_plan(loads_workflow(text, "wf.yaml", base_dir=base))


def refused(text: str, base: Path | None = None) -> SpecError:
    with pytest.raises(SpecError) as info:
        plan_of(text, base)
    e = info.value
    assert "\n" not in e.one_line() and e.hint and "\n" not in e.hint
    return e


# -- YAML: 1.2 meaning, aliases, merge keys, tags --------------------------------------------------
def test_yaml_1_1_scalars_stay_strings() -> None:
    data = load_text("v: [010, 01, no, on, yes, off, y, '12:30:00', 12:30:00, 2024-01-01, 1_000, 0x1f, +5, 007]\n",
                     "f.yaml").data["v"]
    assert data == ["010", "01", "no", "on", "yes", "off", "y", "12:30:00", "12:30:00", "2024-01-01", "1_000",
                    "0x1f", "+5", "007"]


def test_yaml_core_schema_values() -> None:
    d = load_text("a: [true, False, null, ~, 3, -4, 0, 0.5, 1e3, .inf]\nb:\n", "f.yaml").data
    assert d["a"][:7] == [True, False, None, None, 3, -4, 0] and d["b"] is None
    assert d["a"][7] == 0.5 and str(d["a"][7]) == "0.5" and d["a"][8] == 1000.0 and d["a"][9] == float("inf")


def test_item_values_come_out_as_written() -> None:
    p = plan_of("name: x\nitems:\n  - {x: 010, v: 1.10, b: yes, t: 12:30:00, d: 2024-01-01, f: true}\n" + STAGE)
    assert p.items[0] == {"x": "010", "v": "1.10", "b": "yes", "t": "12:30:00", "d": "2024-01-01", "f": "true"}
    assert p.tasks[0].command("r", "/w")[2] == "echo 010"


def test_where_filter_matches_bids_labels(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("subject,x\n01,a\n02,b\n03,c\n")
    p = plan_of("name: x\nitems: {table: t.csv, where: {subject: [01, 02]}}\n" + STAGE, tmp_path)
    assert [it["subject"] for it in p.items] == ["01", "02"]


def test_alias_bomb_is_refused_in_milliseconds() -> None:
    text = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    t = time.perf_counter()
    with pytest.raises(SpecError) as info:
        loads_workflow(text, "bomb.yaml")
    assert time.perf_counter() - t < 0.5
    assert info.value.where and info.value.where.startswith("bomb.yaml:") and "aliases expand" in info.value.message


def test_merge_keys_accepted_and_true_duplicates_refused() -> None:
    wf = loads_workflow("name: x\nitems: [{a: 1}]\ndefaults: {retries: 2, timeout: 10m}\nstages:\n"
                        "  - &s {name: s, command: echo hi, retries: 1}\n  - <<: *s\n    name: t\n    retries: 3\n",
                        "wf.yaml")
    assert [(s.name, s.retries, s.command) for s in wf.stages] == [("s", 1, "echo hi"), ("t", 3, "echo hi")]
    e = refused("name: x\nitems: [{a: 1}]\nstages:\n  - name: s\n    command: a\n    command: b\n")
    assert e.where == "wf.yaml:6:5" and "duplicate key 'command'" in e.message


def test_merge_keys_in_conversion_spec(tmp_path: Path) -> None:
    from corral.recipes.neuroconv import load_conversion_spec

    spec = tmp_path / "conversion.yml"
    spec.write_text("base: &b {session_start_time: 2020-01-01T10:00:00, x: 1}\nmetadata:\n  NWBFile:\n"
                    "    <<: *b\n    x: 2\n  Subject: {subject_id: 007}\n")
    data = load_conversion_spec(spec).data
    assert data["metadata"]["NWBFile"] == {"session_start_time": "2020-01-01T10:00:00", "x": 2}
    assert data["metadata"]["Subject"] == {"subject_id": "007"}  # YAML 1.1 (NeuroConv's reader) says 7


@pytest.mark.parametrize("tag", ["!!python/object:os.system", "!!python/name:os.system", "!Ref", "!!timestamp",
                                 "!!binary"])
def test_unknown_tags_are_reported_where_they_stand(tag: str) -> None:
    e = refused(f"name: x\nitems:\n  - {{x: a}}\n  - {{x: {tag} b}}\n" + STAGE)
    assert e.where == "wf.yaml:4:9" and "tag" in e.message


# -- bad values: one line with the place -----------------------------------------------------------
def test_nul_in_item_command_and_env() -> None:
    assert refused('name: x\nitems: [{x: "a\\0b"}]\n' + STAGE).where == "wf.yaml:2:13"
    assert refused('name: x\nitems: [{x: a}]\nstages: [{name: s, command: "echo \\0"}]\n').where == "wf.yaml:3:29"
    assert refused('name: x\nitems: [{x: a}]\nstages: [{name: s, command: e, env: {A: "\\0"}}]\n').where


def test_nul_from_python_api_items() -> None:
    wf = loads_workflow("name: x\nitems: [{x: a}]\n" + STAGE, "wf.yaml")
    with pytest.raises(SpecError, match="NUL"):
        make_plan(wf, items=[{"x": "a\x00"}])


def test_identical_items_name_both_lines(tmp_path: Path) -> None:
    e = refused("name: x\nitems:\n  - {x: a}\n  - {x: b}\n  - {x: a}\n" + STAGE)
    assert e.where == "wf.yaml:5:5" and "wf.yaml:3:5" in e.message and "identical" in e.message
    (tmp_path / "t.csv").write_text("x,y\na,1\nb,2\na,1\n")
    e = refused("name: x\nitems: {table: t.csv}\n" + STAGE, tmp_path)
    assert e.where == f"{tmp_path / 't.csv'}:4" and f"{tmp_path / 't.csv'}:2" in e.message


def test_yes_no_on_items_no_longer_collide() -> None:
    p = plan_of("name: x\nitems: [{x: yes}, {x: on}, {x: y}, {x: true}]\n" + STAGE)
    assert len({t.id for t in p.tasks}) == 4


def test_null_item_value() -> None:
    e = refused("name: x\nitems:\n  - {x: a}\n  - {x: }\n" + STAGE)
    assert e.where and e.where.startswith("wf.yaml:4:") and "null" in e.message and "''" in (e.hint or "")


def test_dates_from_python_api_are_iso_text() -> None:
    wf = loads_workflow("name: x\nitems: [{x: a}]\n" + STAGE, "wf.yaml")
    p = make_plan(wf, items=[{"x": dt.date(2024, 1, 2)}, {"x": dt.datetime(2024, 1, 2, 3, 4)}])
    assert [it["x"] for it in p.items] == ["2024-01-02", "2024-01-02T03:04:00"]
    p.manifest()  # JSON-serialisable


def test_table_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "t.csv").mkdir()
    e = refused("name: x\nitems: {table: t.csv}\n" + STAGE, tmp_path)
    assert "is a folder" in e.message and e.where == "wf.yaml:2:16"


def test_big_csv_cell(tmp_path: Path) -> None:
    (tmp_path / "ok.csv").write_text("x\n" + "a" * 200_000 + "\n")
    (tmp_path / "big.csv").write_text("x\nb\n" + "a" * 2_000_000 + "\n")
    with pytest.raises(SpecError, match="at most 127 KiB"):
        plan_of("name: x\nitems: {table: ok.csv}\n" + STAGE, tmp_path)  # no longer a csv.Error traceback
    e = refused("name: x\nitems: {table: big.csv}\n" + STAGE, tmp_path)
    assert e.where == f"{tmp_path / 'big.csv'}:3"
    (tmp_path / "fine.csv").write_text("x\n" + "a" * 100_000 + "\n")
    assert len(plan_of("name: x\nitems: {table: fine.csv}\n" + STAGE, tmp_path).items[0]["x"]) == 100_000


def test_duplicate_csv_header(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("x,session,x\n1,a,2\n")
    e = refused("name: x\nitems: {table: t.csv}\n" + STAGE, tmp_path)
    assert "'x' twice" in e.message and e.where == f"{tmp_path / 't.csv'}:1"


def test_units() -> None:
    wf = loads_workflow("name: x\nitems: [{x: a}]\nstages: [{name: s, command: e, timeout: 1ms}]\n")
    assert wf.stages[0].timeout == 0.001
    for field in ("resources: {vcpus: true}", "resources: {gpus: true}", "retries: true"):
        e = refused(f"name: x\nitems: [{{x: a}}]\nstages: [{{name: s, command: e, {field}}}]\n")
        assert "true/false" in e.message


def test_stages_typo_names_the_unknown_key() -> None:
    e = refused("name: x\nitems: [{x: a}]\nstagess:\n  - {name: s, command: e}\n")
    assert e.where == "wf.yaml:3:1" and "unknown key 'stagess'" in e.message and e.hint == "did you mean `stages`?"


def test_duplicate_stage_points_at_second() -> None:
    e = refused("name: x\nitems: [{x: a}]\nstages:\n  - name: s\n    command: a\n  - name: s\n    command: b\n")
    assert e.where == "wf.yaml:6:11" and "wf.yaml:4:11" in e.message


def test_command_with_from_to_refused() -> None:
    e = refused("name: x\nitems: [{x: a}]\nstages:\n  - {name: s, command: e, from: a, to: b}\n")
    assert "not both" in e.message and e.where == "wf.yaml:4:5"


def test_missing_secrets_found_at_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.plan import check_local_secrets

    monkeypatch.delenv("CORRAL_TEST_UNSET", raising=False)
    wf = loads_workflow("name: x\nitems: [{x: a}]\nstages:\n  - name: s\n    command: e\n"
                        "    secrets: {TOKEN: 'env:CORRAL_TEST_UNSET'}\n", "wf.yaml")
    with pytest.raises(SpecError) as info:
        check_local_secrets(wf)
    assert info.value.where == "wf.yaml:6:22" and "not set" in info.value.message
    wf = loads_workflow(f"name: x\nitems: [{{x: a}}]\nstages:\n  - name: s\n    command: e\n"
                        f"    secrets: {{TOKEN: 'file:{tmp_path}/nope'}}\n", "wf.yaml")
    with pytest.raises(SpecError, match="not a readable file"):
        check_local_secrets(wf)


@pytest.mark.parametrize("rule", ["*.nwb", "+ {a", "+ [ab", "x *", "+ "])
def test_bad_rclone_filter_at_validate(rule: str) -> None:
    e = refused(f"name: x\nitems: [{{x: a}}]\nstages:\n  - {{name: s, from: a, to: b, filters: ['{rule}']}}\n")
    assert e.where == "wf.yaml:4:41" and "filter" in e.message


# -- containment -----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["outputs: ['{workdir}/{x}']", "to: 'out/{x}'", "command: cp a {workdir}/{x}",
                                   "inputs: ['{x}/a']"])
def test_item_values_cannot_leave_their_folder(where: str) -> None:
    body = f"  - name: s\n    {where}\n" + ("    command: e\n" if "command" not in where and "to:" not in where
                                             else "    from: a\n" if "to:" in where else "")
    e = refused(f"name: x\nitems:\n  - {{x: ok}}\n  - {{x: ../../../etc/passwd}}\nstages:\n{body}")
    assert e.where == "wf.yaml:4:5" and "climbs out" in e.message


def test_item_fields_never_replace_protected_env() -> None:
    p = plan_of("name: x\nitems: [{PATH: /evil, LD_PRELOAD: /evil.so, BASH_ENV: /evil, CORRAL_RUN_ID: x, "
                "AWS_REGION: mars, session: s1}]\nstages: [{name: s, command: 'echo {PATH}'}]\n")
    env = p.tasks[0].env("r", "/w")
    assert "PATH" not in env and "LD_PRELOAD" not in env and "BASH_ENV" not in env and "AWS_REGION" not in env
    assert env["CORRAL_RUN_ID"] == "r" and env["CORRAL_ITEM_PATH"] == "/evil" and env["session"] == "s1"
    assert p.tasks[0].command("r", "/w")[2] == "echo /evil"


# -- placeholders in every shell context -----------------------------------------------------------
HOSTILE = ["", "a b", "it's", 'say "hi"', "$(touch PWNED)", "`touch PWNED`", "a\nb", ";touch PWNED", "-n",
           "  spaced  ", "back\\slash", "$HOME", "*", "a'b\"c$d`e\\f", "\t", "}{", "'", '"', "\\", "!x", "%s"]
CONTEXTS = {
    "bare": ("printf '%s' {x}", "{v}"),
    "double quotes": ('printf "%s" "{x}"', "{v}"),
    "double quotes, text around": ('printf "%s" "<{x}>"', "<{v}>"),
    "single quotes": ("printf '%s' '{x}'", "{v}"),
    "single quotes, text around": ("printf '%s' '<{x}>'", "<{v}>"),
    "heredoc": ("cat <<EOF\n{x}\nEOF", "{v}\n"),
    "quoted heredoc": ("cat <<'EOF'\n<{x}>\nEOF", "<{v}>\n"),
    "heredoc with tabs": ("cat <<-END\n\t{x}\n\tEND", "{v}\n"),
    "command substitution in quotes": ('printf "%s" "$(printf "%s" {x})"', "{v}"),
    "assignment": ('v={x}; printf "%s" "$v"', "{v}"),
    "comment": ("printf ok # {x}", "ok"),
}


@pytest.mark.parametrize("context", sorted(CONTEXTS))
def test_values_come_out_as_written_never_as_code(tmp_path: Path, context: str) -> None:
    template, expected = CONTEXTS[context]
    wf = loads_workflow(f"name: x\nitems: [{{x: a}}]\nstages:\n  - name: s\n    command: {json.dumps(template)}\n")
    values = [v for v in HOSTILE if not (context == "heredoc with tabs" and v.startswith("\t"))]  # <<- strips tabs
    plan = make_plan(wf, items=[{"x": v} for v in values])
    for value, task in zip(values, plan.tasks, strict=True):
        argv = task.command("r", "/w")
        assert argv[:2] == ["/bin/sh", "-c"]
        script = argv[2]
        res = subprocess.run(["/bin/sh", "-c", script], cwd=tmp_path, capture_output=True, timeout=10)
        want = expected.replace("{v}", value)
        if context == "command substitution in quotes":
            want = want.rstrip("\n")
        assert res.stdout.decode() == want, (context, value, script, res.stderr)
        assert not (tmp_path / "PWNED").exists(), (context, value, script)


def test_empty_value_in_double_quotes_prints_an_empty_line(tmp_path: Path) -> None:
    p = plan_of("name: x\nitems: [{session: ''}]\nstages: [{name: s, command: 'echo \"{session}\"'}]\n")
    res = subprocess.run(p.tasks[0].command("r", str(tmp_path)), capture_output=True, text=True, timeout=10)
    assert res.stdout == "\n"


def test_sh_c_list_commands_are_made_safe(tmp_path: Path) -> None:
    for argv0 in ("sh", "/bin/bash", "env"):
        cmd = ['sh' if argv0 == 'env' else argv0] if argv0 != "env" else ["env", "A=1", "sh"]
        text = f"name: x\nitems: [{{x: ';touch PWNED'}}, {{x: '$(touch PWNED)'}}]\nstages:\n  - name: s\n" \
               f"    command: {cmd + ['-ec', 'printf %s {x}']!r}\n"
        for t in plan_of(text).tasks:
            res = subprocess.run(t.command("r", "/w"), cwd=tmp_path, capture_output=True, text=True, timeout=10)
            assert res.stdout == t.item["x"] and not (tmp_path / "PWNED").exists()


def test_interpreter_code_with_placeholder_is_refused() -> None:
    e = refused("name: x\nitems: [{x: a}]\nstages: [{name: s, command: [python3, -c, 'print(\"{x}\")']}]\n")
    assert "run item data as code" in e.message and "sys.argv" in (e.hint or "")


@pytest.mark.parametrize("cmd", ["echo `echo {x}`", "echo $'{x}'", "echo \\\\{x}", "echo 'unclosed {x}",
                                 "cat <<{x}\\nhi\\n{x}"])
def test_placeholders_where_no_quoting_is_safe_are_refused(cmd: str) -> None:
    e = refused(f'name: x\nitems: [{{x: a}}]\nstages: [{{name: s, command: "{cmd}"}}]\n')
    assert e.where == "wf.yaml:3:29"


def test_value_that_would_end_a_heredoc_is_refused_when_planned() -> None:
    e = refused("name: x\nitems: [{x: ok}, {x: \"a\\nEOF\\ntouch PWNED\"}]\n"
                "stages: [{name: s, command: \"cat <<EOF\\n{x}\\nEOF\"}]\n")
    assert "heredoc" in e.message


def test_arithmetic_takes_whole_numbers_only() -> None:
    p = plan_of("name: x\nitems: [{i: 3}]\nstages: [{name: s, command: 'echo $(( {i} % 2 ))'}]\n")
    assert subprocess.run(p.tasks[0].command("r", "/w"), capture_output=True, text=True).stdout == "1\n"
    e = refused("name: x\nitems: [{i: 3}, {i: 'a[$(touch PWNED)]'}]\nstages: [{name: s, command: 'echo $(( {i} ))'}]\n")
    assert "whole number" in e.message


def test_aws_argv_for_sh_c_lists_is_rendered_per_task() -> None:
    from corral.backends.aws_batch.payloads import argv_template

    wf = loads_workflow("name: x\nitems: [{x: a}]\nstages: [{name: s, command: [sh, -c, 'echo {x}']}]\n")
    assert argv_template(wf.stages[0]) is None  # per task, each value quoted for where it stands


# -- through the CLI -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["bomb", "nul", "dup", "dir"])
def test_validate_exits_2_in_one_line(tmp_path: Path, case: str) -> None:
    texts = {
        "bomb": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)),
        "nul": 'name: x\nitems: [{x: "\\0"}]\n' + STAGE,
        "dup": "name: x\nitems: [{x: a}, {x: a}]\n" + STAGE,
        "dir": "name: x\nitems: {table: d}\n" + STAGE,
    }
    (tmp_path / "d").mkdir()
    wf = tmp_path / "wf.yaml"
    wf.write_text(texts[case])
    env = {**os.environ, "CORRAL_HOME": str(tmp_path / "home"), "PYTHONPATH": os.pathsep.join(sys.path)}
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "corral", "validate", str(wf)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert time.perf_counter() - t < 10
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"error: {wf}") and lines[1].startswith("hint: ")
    assert not (tmp_path / "home").exists()


def test_yaml_workflow_loads_from_file(tmp_path: Path) -> None:
    (tmp_path / "wf.yaml").write_text("name: x\nitems: [{x: 01}]\n" + STAGE)
    assert load_workflow(tmp_path / "wf.yaml").items == [{"x": "01"}]


AWS_CONTEXTS = {
    "bare": "printf '%s' {x}",
    "double quotes": 'printf "%s" "{x}"',
    "single quotes": "printf '%s' '{x}'",
    "heredoc": "cat <<EOF\n{x}\nEOF",
}


@pytest.mark.parametrize("context", sorted(AWS_CONTEXTS) + ["sh -c list"])
def test_aws_array_children_print_values_as_written(tmp_path: Path, context: str) -> None:
    """The AWS wrapper (item table + CORRAL_ARGV, run by /bin/sh as a Batch child) gives the same."""
    from corral.backends.aws_batch import payloads as pl

    if context == "sh -c list":
        command = json.dumps(["sh", "-c", "printf '%s' {x}"])
    else:
        command = json.dumps(AWS_CONTEXTS[context])
    wf = loads_workflow(f"name: x\nitems: [{{x: a}}]\nstages:\n  - name: s\n    command: {command}\n")
    values = HOSTILE + ["PATH"]
    plan = make_plan(wf, items=[{"x": v, "PATH": "/evil"} for v in values])
    tasks = plan.stage_tasks("s")
    table = pl.StageTable(tasks, "r", str(tmp_path / "w"))
    env = {**table.env, pl.TABLE_VAR: pl.encode_table([table.row(t) for t in tasks]), "PATH": os.environ["PATH"]}
    for k, value in enumerate(values):
        res = subprocess.run(["/bin/sh", "-c", pl.WRAPPER], env={**env, "AWS_BATCH_JOB_ARRAY_INDEX": str(k)},
                             cwd=tmp_path, capture_output=True, timeout=10)
        want = value + ("\n" if context == "heredoc" else "")
        assert res.returncode == 0 and res.stdout.decode() == want, (context, value, res.stderr)
        assert not (tmp_path / "PWNED").exists()


def test_planning_a_valid_workflow_records_no_positions() -> None:
    """Positions are indexed only when an error asks for one (so 100,000 inline items plan fast)."""
    wf = loads_workflow("name: x\nitems: [{x: a}, {x: b}]\n" + STAGE, "wf.yaml")
    make_plan(wf)
    assert wf._located is not None and wf._located.positions == {}
    assert wf.where("items", 1) == "wf.yaml:2:17" and wf._located.positions  # indexed on demand


def test_task_ids_are_the_same_as_before_the_fast_path() -> None:
    """Task ids (recorded in every run) are still sha256 of the JSON list [fingerprint, item hash]."""
    from corral.plan import _hash, _task_id, stage_fingerprint

    p = plan_of("name: x\nitems: [{x: a}, {x: b}]\n" + STAGE + "  - {name: r, per: run, needs: [s], command: e}\n")
    fp = stage_fingerprint(p.workflow.stage("s"))
    for t, it in zip(p.stage_tasks("s"), p.items, strict=True):
        assert t.id == _hash([fp, _hash(it)])[:16] == _task_id(fp, _hash(it))
    assert p.stage_tasks("r")[0].id == _hash([stage_fingerprint(p.workflow.stage("r")), "run"])[:16]
