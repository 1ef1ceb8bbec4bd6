"""Property-based tests of the spec loader: whatever the input, a one-line error naming the place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.errors import CorralError
from corral.plan import make_plan
from corral.spec import load_workflow

VALID = """name: demo
defaults:
  resources: {vcpus: 1, memory: 512MiB}
  retries: 1
items:
  - {session: s1, n: 3}
  - {session: s2, n: 5}
stages:
  - name: fetch
    command: seq {n} > {session}.txt
    timeout: 10m
  - name: convert
    needs: [fetch]
    outputs:
      - out/{session}.nwb
    command: [convert, "{session}.txt"]
  - name: report
    per: run
    needs: [convert]
    command: echo done
"""

FIELDS = ["name", "items", "stages", "defaults", "command", "needs", "per", "resources", "vcpus", "memory",
          "gpus", "disk", "retries", "timeout", "outputs", "inputs", "env", "image", "from", "to", "mode",
          "cleanup", "aws", "table", "glob", "product", "secrets", "kind", "description"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["4GiB", "lots", "90m", "-1", "1e400", "{x}", "{session}", "fetch", "run", "item", "∞", "\u202e"]),
)
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), children, max_size=5),
    ),
    max_leaves=25,
)


def check(path: Path) -> None:
    try:
        make_plan(load_workflow(path))
    except CorralError as exc:
        line = exc.one_line()
        assert "\n" not in line, line
        assert exc.hint and "\n" not in exc.hint
        assert exc.exit_code == 2
        assert exc.where is None or exc.where.startswith(str(path)) or ":" in exc.where
        if exc.where is None:
            assert str(path) in line or "no such file" in line
        return


def _write(tmp: Path, data: bytes) -> Path:
    p = tmp / "workflow.yaml"
    p.write_bytes(data)
    return p


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees)
def test_random_structures(tmp_path: Path, tree: object) -> None:
    try:
        text = yaml.safe_dump(tree, allow_unicode=True)
    except (yaml.YAMLError, ValueError, OverflowError):
        return
    check(_write(tmp_path, text.encode()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mangled_valid_workflow(tmp_path: Path, data: st.DataObject) -> None:
    text = VALID
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["delete", "insert", "dup-line", "swap-type"]))
        if op == "delete":
            j = data.draw(st.integers(i, min(len(text), i + 12)))
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + data.draw(st.text(max_size=6)) + text[i:]
        elif op == "dup-line":
            lines = text.splitlines(keepends=True)
            k = data.draw(st.integers(0, len(lines) - 1))
            lines.insert(k, lines[k])
            text = "".join(lines)
        else:
            field = data.draw(st.sampled_from(["vcpus: 1", "retries: 1", "per: run", "needs: [fetch]", "timeout: 10m"]))
            text = text.replace(field, field.split(":")[0] + ": " + json.dumps(data.draw(scalars), default=str), 1)
    check(_write(tmp_path, text.encode("utf-8", "surrogatepass")))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_binary_and_random_bytes(tmp_path: Path, raw: bytes) -> None:
    check(_write(tmp_path, raw))


def test_huge_and_deep_inputs(tmp_path: Path) -> None:
    check(_write(tmp_path, b"name: x\nstages:\n" + b"  - " * 1 + b"[" * 5000 + b"]" * 5000 + b"\n"))
    check(_write(tmp_path, ("name: x\nitems: [{a: 1}]\nstages:\n  - {name: a, command: x, resources: {vcpus: "
                            + "9" * 400 + "}}\n").encode()))
    check(_write(tmp_path, b"name: x\nitems: [{a: 1}]\nstages: [{name: a, command: x, timeout: 1e400}]\n"))
    check(_write(tmp_path, b"name: !!python/object:os.system x\nstages: []\n"))
    check(_write(tmp_path, b"a: &a [*a]\n"))
    check(_write(tmp_path, "name: caf\u00e9\nstages: [{name: \u00e9t\u00e9, command: x}]\n".encode()))


def test_cli_bad_input_is_exit_2_without_aws_or_files(tmp_path: Path) -> None:
    """Through the CLI, even with --backend aws: exit 2, one error + one hint line, no boto3, no state."""
    bad = _write(tmp_path, b"name: x\nitems: [{a: 1}]\nstages:\n  - name: a\n    command: echo {b}\n")
    home = tmp_path / "home"
    code = (
        "import sys\n"
        "from corral.cli import main\n"
        "try:\n"
        f"    main(['run', {str(bad)!r}, '--backend', 'aws'])\n"
        "finally:\n"
        "    print('boto' + ('core-imported' if 'botocore' in sys.modules else 'core-absent'))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"CORRAL_HOME": str(home), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2, res.stderr
    assert res.stdout.strip() == "botocore-absent"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"error: {bad}:5:14: ") and lines[1].startswith("hint: ")
    assert not home.exists()


# -- hostile item values and YAML features (issue #17): the class stays closed ------------------------
YAML11 = ["no", "on", "yes", "off", "y", "n", "010", "01", "007", "0x1f", "0o17", "+5", "1_000", "12:30:00",
          "2024-01-01", "2024-01-01T10:00:00Z", "~", "null", "true", "True", "1.10", ".nan", "-.inf", "1e400",
          "", "''", '"\\0"', '"a\\0b"', "!!python/object:os.system x", "!!timestamp 2024-01-01", "!Ref x",
          "!!binary aGk=", "*nope", "&a x", '"$(touch PWNED)"', "\"it's\"", "'a\"b'", '"\\n"', "[a]", "{a: b}"]
item_value = st.one_of(st.sampled_from(YAML11), st.from_regex(r"[A-Za-z0-9_.:-]{0,12}", fullmatch=True),
                       st.builds(lambda n: "x" * n, st.sampled_from([1, 1000, 140_000])))


def _validate_in_process(path: Path, tmp: Path) -> None:
    """`corral validate PATH` in this process: exit 0 or 2, at most two lines, no traceback, < 2 s."""
    import contextlib
    import io
    import os
    import time

    from corral.cli import main

    err = io.StringIO()
    old_home = os.environ.get("CORRAL_HOME")
    os.environ["CORRAL_HOME"] = str(tmp / "home")
    t = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["validate", str(path)])
                code = 0
            except SystemExit as exc:
                code = int(exc.code or 0)
    finally:
        if old_home is None:
            os.environ.pop("CORRAL_HOME", None)
        else:
            os.environ["CORRAL_HOME"] = old_home
    took = time.perf_counter() - t
    text = err.getvalue()
    assert took < 2.0, (took, path.read_text()[:300])
    assert code in (0, 2), text
    assert "Traceback" not in text
    if code == 2:
        lines = text.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), text
    assert not (tmp / "home").exists()
    assert not (tmp / "PWNED").exists()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(values=st.lists(st.tuples(item_value, item_value), min_size=1, max_size=5),
       dup=st.booleans(), alias=st.booleans(), command=st.sampled_from(
           ["echo {a}", "echo '{a}' \"{b}\"", "cat <<EOF\n{a}\nEOF", "echo $(( {a} ))", "echo `{a}`"]))
def test_hostile_items_validate_in_one_line_fast(tmp_path: Path, values: list[tuple[str, str]], dup: bool,
                                                 alias: bool, command: str) -> None:
    rows = [f"  - {{a: {a}, b: {b}}}" for a, b in values]
    if dup:
        rows.append(rows[0])
    head = "x-anchor: &base {b: base}\n" if alias else ""
    if alias:
        rows.append("  - {<<: *base, a: merged}")
    text = f"{head}name: fuzz\nitems:\n" + "\n".join(rows) + f"\nstages:\n  - name: s\n    command: {json.dumps(command)}\n"
    _validate_in_process(_write(tmp_path, text.encode()), tmp_path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(2, 12), width=st.integers(2, 12))
def test_alias_bombs_of_any_shape_are_refused_fast(tmp_path: Path, depth: int, width: int) -> None:
    lines = ["name: bomb", f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    _validate_in_process(_write(tmp_path, ("\n".join(lines) + "\n").encode()), tmp_path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(st.sampled_from(["a", "b", "", "x" * 200_000, "\0", '"', "a,b", "\r"]),
                              min_size=1, max_size=3), min_size=1, max_size=4),
       header=st.sampled_from(["a,b", "a,a", "a", "a,b,c", ""]))
def test_hostile_tables_validate_in_one_line_fast(tmp_path: Path, rows: list[list[str]], header: str) -> None:
    (tmp_path / "t.csv").write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n", newline="")
    wf = _write(tmp_path, b"name: t\nitems: {table: t.csv}\nstages:\n  - {name: s, command: 'echo \"{a}\"'}\n")
    _validate_in_process(wf, tmp_path)
