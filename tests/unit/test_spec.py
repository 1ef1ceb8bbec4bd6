from __future__ import annotations

from pathlib import Path

import pytest

from corral.errors import SpecError
from corral.plan import make_plan
from corral.spec import load_workflow, loads_workflow
from corral.units import parse_duration, parse_size


def err(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        make_plan(loads_workflow(text, "wf.yaml"))
    return info.value


def test_unknown_key_names_line_column_and_suggests() -> None:
    e = err("name: x\nitems: [{a: 1}]\nstages:\n  - name: s\n    comand: echo\n")
    assert e.where == "wf.yaml:5:5"
    assert "unknown key 'comand'" in e.message
    assert e.hint == "did you mean `command`?"


def test_unknown_top_level_key() -> None:
    e = err("name: x\nitem: []\nstages: [{name: s, command: echo}]\n")
    assert e.where == "wf.yaml:2:1" and e.hint == "did you mean `items`?"


def test_bad_memory_unit_points_at_value() -> None:
    e = err("name: x\nitems: [{a: 1}]\nstages:\n  - name: s\n    command: echo\n    resources: {memory: lots}\n")
    assert e.where == "wf.yaml:6:25"
    assert "resources.memory" in e.message and "lots" in e.message


def test_defaults_errors_point_at_defaults() -> None:
    e = err("name: x\ndefaults:\n  retries: many\nitems: [{a: 1}]\nstages: [{name: s, command: echo}]\n")
    assert e.where == "wf.yaml:3:12" and "defaults.retries" in e.message


def test_yaml_syntax_error_has_position() -> None:
    e = err("name: x\nstages:\n  - name: s\n   command: [\n")
    assert e.where and e.where.startswith("wf.yaml:") and "YAML syntax error" in e.message


def test_duplicate_key_is_an_error() -> None:
    e = err("name: x\nname: y\nstages: [{name: s, command: echo}]\n")
    assert e.where == "wf.yaml:2:1" and "duplicate key" in e.message


def test_unknown_needs_with_suggestion() -> None:
    e = err("name: x\nitems: [{a: 1}]\nstages:\n  - {name: fetch, command: x}\n  - {name: conv, command: x, needs: [fetc]}\n")
    assert "needs 'fetc'" in e.message and e.hint == "did you mean `fetch`?"
    assert e.where == "wf.yaml:5:38"


def test_cycle_is_reported() -> None:
    e = err("name: x\nitems: [{a: 1}]\nstages:\n  - {name: a, command: x, needs: [c]}\n"
            "  - {name: b, command: x, needs: [a]}\n  - {name: c, command: x, needs: [b]}\n")
    assert "cycle" in e.message and "a" in e.message


def test_placeholder_not_provided_by_items() -> None:
    e = err("name: x\nitems: [{session: s1}]\nstages:\n  - name: a\n    command: echo {sesion}\n")
    assert "{sesion}" in e.message and "did you mean {session}" in (e.hint or "")
    assert e.where == "wf.yaml:5:14"


def test_placeholder_missing_from_some_items() -> None:
    e = err("name: x\nitems: [{session: s1, n: 1}, {session: s2}]\nstages:\n  - name: a\n    command: echo {n}\n")
    assert "1 item(s) have no field 'n'" in e.message


def test_item_field_in_per_run_stage_is_refused() -> None:
    e = err("name: x\nitems: [{session: s1}]\nstages:\n  - name: a\n    per: run\n    command: echo {session}\n")
    assert "once per run" in e.message


def test_resources_no_machine_has_are_refused() -> None:
    e = err("name: x\nitems: [{a: 1}]\nstages: [{name: a, command: x, resources: {vcpus: 100000}}]\n")
    assert "vcpus" in e.message
    e = err("name: x\nitems: [{a: 1}]\nstages: [{name: a, command: x, resources: {memory: 90TiB}}]\n")
    assert "memory" in e.message
    e = err("name: x\nitems: [{a: 1}]\nstages: [{name: a, command: x, resources: {gpus: 64}}]\n")
    assert "gpus" in e.message


def test_empty_and_binary_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SpecError, match="empty"):
        load_workflow(empty)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x00\x01\x02name: x")
    with pytest.raises(SpecError, match="binary"):
        load_workflow(binary)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="UTF-8"):
        load_workflow(latin)


def test_defaults_merge_into_stages() -> None:
    wf = loads_workflow(
        "name: x\ndefaults: {env: {A: 1, B: 2}, resources: {vcpus: 2}, retries: 3, timeout: 90m}\n"
        "items: [{a: 1}]\nstages:\n  - {name: s, command: x, env: {B: 3}, resources: {memory: 4GiB}, retries: 0}\n"
    )
    s = wf.stages[0]
    assert s.env == {"A": "1", "B": "3"}
    assert s.resources.vcpus == 2 and s.resources.memory == 4096
    assert s.retries == 0 and s.timeout == 5400


@pytest.mark.parametrize(
    ("text", "mib"), [("512MiB", 512), ("4GiB", 4096), ("4G", 4096), ("1.5GiB", 1536), (300, 300), ("2GB", 1908)]
)
def test_sizes(text: object, mib: int) -> None:
    assert -(-parse_size(text, default_unit="MiB") // 2**20) == mib


@pytest.mark.parametrize(("text", "s"), [("90m", 5400), ("6h", 21600), ("1h30m", 5400), (45, 45), ("2d", 172800)])
def test_durations(text: object, s: float) -> None:
    assert parse_duration(text) == s


@pytest.mark.parametrize("bad", ["soon", "-5m", "5 parsecs", True])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)
