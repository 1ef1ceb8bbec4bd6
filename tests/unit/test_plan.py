from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from corral.errors import PlanError, SpecError
from corral.plan import Plan, make_plan, parse_template, render
from corral.sources import item_keys
from corral.spec import load_workflow, loads_workflow

WF = """
name: demo
items:
  - {session: s1, n: 2}
  - {session: s2, n: 3}
  - {session: s3, n: 4}
stages:
  - name: fetch
    command: echo {session} {n}
  - name: convert
    needs: [fetch]
    command: [convert, "--in={session}", "{workdir}/x"]
  - name: report
    per: run
    needs: [convert]
    command: echo done {run}
  - name: upload
    needs: [convert, report]
    command: echo up {session}
"""


def test_fan_out_and_dependencies() -> None:
    p = make_plan(loads_workflow(WF))
    assert [t.label for t in p.tasks][:3] == ["fetch[s1]", "fetch[s2]", "fetch[s3]"]
    assert len(p.tasks) == 3 + 3 + 1 + 3
    fetch = p.stage_tasks("fetch")
    convert = p.stage_tasks("convert")
    (report,) = p.stage_tasks("report")
    upload = p.stage_tasks("upload")
    for i in range(3):  # N-to-N: item i needs item i
        assert convert[i].needs == (fetch[i].id,)
        assert upload[i].needs == (convert[i].id, report.id)
    assert set(report.needs) == {c.id for c in convert}  # all-to-one
    # topological order: every task comes after what it needs
    seen: set[str] = set()
    for t in p.tasks:
        assert set(t.needs) <= seen
        seen.add(t.id)


def test_ids_are_stable_and_content_derived() -> None:
    a = make_plan(loads_workflow(WF))
    b = make_plan(loads_workflow(WF))
    assert [t.id for t in a.tasks] == [t.id for t in b.tasks]
    assert len({t.id for t in a.tasks}) == len(a.tasks)
    changed = make_plan(loads_workflow(WF.replace("echo up {session}", "echo UP {session}")))
    same = {t.id for t in a.tasks} & {t.id for t in changed.tasks}
    assert len(same) == len(a.tasks) - 3  # only upload's ids changed
    more_cpu = make_plan(loads_workflow(WF.replace("per: run", "per: run\n    resources: {vcpus: 4}")))
    assert [t.id for t in more_cpu.tasks] == [t.id for t in a.tasks]  # resources are not "what it runs"


def test_manifest_round_trip_rebuilds_same_plan() -> None:
    p = make_plan(loads_workflow(WF))
    q = Plan.from_manifest(p.manifest())
    assert [(t.id, t.needs, t.key) for t in q.tasks] == [(t.id, t.needs, t.key) for t in p.tasks]
    assert [list(i.items()) for i in q.items] == [list(i.items()) for i in p.items]  # field order too


def test_manifest_keeps_field_order_so_item_keys_survive() -> None:
    """The item key comes from the first field as written (`session`, not the sorted-first `n`)."""
    wf = loads_workflow("name: k\nitems: [{session: ses03, n: 3}, {session: ses04, n: 4}]\n"
                        "stages: [{name: a, command: 'echo {item}'}]\n")
    p = make_plan(wf)
    assert p.keys == ["ses03", "ses04"]
    q = Plan.from_manifest(p.manifest())
    assert q.keys == ["ses03", "ses04"] and [t.key for t in q.tasks] == ["ses03", "ses04"]
    assert [list(i) for i in q.items] == [["session", "n"]] * 2


def test_commands_quote_values_for_the_shell(tmp_path: Path) -> None:
    wf = loads_workflow(
        'name: q\nitems:\n  - {name: "it\'s $HOME; rm -rf x"}\nstages:\n  - name: a\n    command: printf %s {name} > out.txt\n'
    )
    (t,) = make_plan(wf).tasks
    argv = t.command("r", str(tmp_path))
    subprocess.run(argv, cwd=tmp_path, check=True)
    assert (tmp_path / "out.txt").read_text() == "it's $HOME; rm -rf x"


def test_template_escapes_and_shell_vars() -> None:
    assert render("awk '{{print $1}}' ${HOME} {x}", {"x": "v"}) == "awk '{print $1}' ${HOME} v"
    assert [k for k, _ in parse_template("a {b} c")] == ["text", "field", "text"]
    assert render("{ not a field }", {}) == "{ not a field }"


def test_no_items_for_per_item_stage_is_a_plan_error(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("session\n")
    wf = tmp_path / "w.yaml"
    wf.write_text("name: x\nitems: {table: t.csv}\nstages: [{name: a, command: echo}]\n")
    with pytest.raises(PlanError, match="no items"):
        make_plan(load_workflow(wf))


def test_table_glob_and_product_sources(tmp_path: Path) -> None:
    (tmp_path / "recs.tsv").write_text("rec\tprobe\nr1\tA\nr2\tB\n")
    for sub, ses in [("01", "1"), ("01", "2"), ("02", "1")]:
        (tmp_path / "data" / f"sub-{sub}" / f"ses-{ses}").mkdir(parents=True)
    (tmp_path / "w.yaml").write_text(
        "name: x\nitems:\n  glob: data/sub-{subject}/ses-{session}\n  type: dir\n"
        "stages:\n  - name: a\n    command: echo {subject} {session} {path}\n"
    )
    p = make_plan(load_workflow(tmp_path / "w.yaml"))
    assert [(i["subject"], i["session"]) for i in p.items] == [("01", "1"), ("01", "2"), ("02", "1")]
    assert p.items[0]["path"] == "data/sub-01/ses-1"
    (tmp_path / "p.yaml").write_text(
        "name: x\nitems:\n  product:\n    - {table: recs.tsv}\n    - [{sorter: ks4}, {sorter: mountainsort5}]\n"
        "stages:\n  - name: sort\n    command: echo {rec} {sorter}\n"
    )
    p = make_plan(load_workflow(tmp_path / "p.yaml"))
    assert len(p.tasks) == 4
    assert {(i["rec"], i["sorter"]) for i in p.items} == {
        ("r1", "ks4"), ("r1", "mountainsort5"), ("r2", "ks4"), ("r2", "mountainsort5")
    }
    assert len(set(p.keys)) == 4


def test_source_errors_name_the_place(tmp_path: Path) -> None:
    (tmp_path / "w.yaml").write_text("name: x\nitems: {tabel: t.csv}\nstages: [{name: a, command: echo}]\n")
    with pytest.raises(SpecError) as e:
        make_plan(load_workflow(tmp_path / "w.yaml"))
    assert "unknown item source 'tabel'" in e.value.message and e.value.hint == "did you mean `table`?"
    (tmp_path / "w.yaml").write_text("name: x\nitems: {table: missing.csv}\nstages: [{name: a, command: echo}]\n")
    with pytest.raises(SpecError, match="no such table"):
        make_plan(load_workflow(tmp_path / "w.yaml"))
    (tmp_path / "bad.csv").write_text("a,b\n1,2,3\n")
    (tmp_path / "w.yaml").write_text("name: x\nitems: {table: bad.csv}\nstages: [{name: a, command: echo}]\n")
    with pytest.raises(SpecError) as e:
        make_plan(load_workflow(tmp_path / "w.yaml"))
    assert e.value.where == f"{tmp_path / 'bad.csv'}:2"


def test_item_keys_are_unique_and_path_safe() -> None:
    items = [{"s": "a/b", "r": 1}, {"s": "a/b", "r": 2}, {"s": "c d", "r": 1}]
    keys = item_keys(items)
    assert len(set(keys)) == 3
    assert all("/" not in k and " " not in k for k in keys)
