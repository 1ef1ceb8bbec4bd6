"""Workflow → Plan: items × stages become tasks with content-hashed ids and a dependency DAG.

Dependencies between stages map to tasks like this (``needs``):

==================  ===================  =====================================
stage ``per``        needed stage ``per``  task dependency
==================  ===================  =====================================
item                 item                 item *i* needs item *i* (N-to-N)
item                 run                  every item needs the one run task
run                  item                 the run task needs every item task
run                  run                  one to one
==================  ===================  =====================================

Placeholders ``{field}`` in commands, env values, inputs, outputs and transfer URIs come from
the item's fields and from ``{run}``, ``{stage}``, ``{workdir}``, ``{task}``, ``{item}``,
``{index}``. ``{{`` and ``}}`` are literal braces; ``${VAR}`` is left to the shell.
"""

from __future__ import annotations

import graphlib
import hashlib
import json
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import PlanError, SpecError, did_you_mean
from corral.sources import Item, SourceContext, item_keys, normalise_items, resolve_items
from corral.spec import Stage, Workflow, from_located
from corral.yamlpos import Located

BUILTINS = ("run", "stage", "workdir", "task", "item", "index")
RUN_KEY = "run"


# -- placeholder templates ----------------------------------------------------------------------
def parse_template(text: str) -> list[tuple[str, str]]:
    """Split into ('text', s) and ('field', name) parts."""
    parts: list[tuple[str, str]] = []
    buf = ""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("{{", i):
            buf += "{"
            i += 2
        elif text.startswith("}}", i):
            buf += "}"
            i += 2
        elif text.startswith("${", i):
            end = text.find("}", i)
            end = n - 1 if end < 0 else end
            buf += text[i : end + 1]
            i = end + 1
        elif c == "{":
            end = text.find("}", i)
            name = text[i + 1 : end] if end > 0 else ""
            if end > 0 and name.isidentifier():
                if buf:
                    parts.append(("text", buf))
                    buf = ""
                parts.append(("field", name))
                i = end + 1
            else:
                buf += c
                i += 1
        else:
            buf += c
            i += 1
    if buf:
        parts.append(("text", buf))
    return parts


def template_fields(text: str) -> list[str]:
    return [v for k, v in parse_template(text) if k == "field"]


def render(text: str, values: Mapping[str, Any], *, quote: bool = False) -> str:
    """Placeholders replaced by their values as text (``quote``: a shell command, see :func:`render_shell`)."""
    if quote:
        return render_shell(text, values)
    out = []
    for kind, v in parse_template(text):
        if kind == "text":
            out.append(v)
        else:
            out.append(str(values[v]))
    return "".join(out)


_FILTER_FIELD = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


# -- placeholders in shell commands ---------------------------------------------------------------
# A value must come out of the shell as written and never run as code, wherever the placeholder
# stands. The command is scanned once (as POSIX sh reads it) to learn each placeholder's quoting
# context, and each value is encoded for its context:
#   outside quotes       {x}       -> 'value'            (single-quoted word; '' when empty)
#   in double quotes     "{x}"     -> value with \ " $ ` backslash-escaped
#   in single quotes     '{x}'     -> value with ' written '\''
#   in a heredoc body    <<EOF     -> value with \ $ ` backslash-escaped (<<'EOF': as is), and the
#                                     rendered script is scanned again to prove no value ended it
#   in a # comment                 -> value with newlines as spaces
#   in $((...))                    -> whole numbers only (checked for every item when planned)
# A placeholder inside backticks, $'...' or right after a backslash has no safe
# encoding: the command is refused at validate time, with a hint.
class ShellTemplateError(ValueError):
    """A placeholder stands where no quoting keeps its value from being read as code."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class _Field:
    name: str


_HEREDOC = "hd"


def _scan(tokens: list[Any], *, render_values: Mapping[str, Any] | None = None
          ) -> tuple[list[tuple[str, int]], list[str], str]:
    """Walk a shell command (chars and :class:`_Field`). Returns each field's context (and the
    heredoc it is in), the heredoc bodies, and (with ``render_values``) the rendered command."""
    contexts: list[tuple[str, int]] = []
    bodies: list[str] = []
    out: list[str] = []
    stack: list[list[Any]] = [["cmd", 0, False]]  # [mode, paren depth, opened by $(]
    pending: list[tuple[str, bool, bool]] = []  # heredocs waiting for the end of the line
    heredoc: tuple[str, bool, bool] | None = None
    line: list[str] = []
    line_has_field = False
    word_start = True
    n = len(tokens)
    i = 0

    def emit(x: str) -> None:
        if render_values is not None:
            out.append(x)

    def open_dollar_paren(at: int) -> int:
        """``tokens[at:at+2]`` is ``$(``: push ``$((`` arithmetic or a ``$(`` command; return the
        index of the last token consumed."""
        emit("(")
        at += 1
        if tokens[at + 1: at + 2] == ["("]:
            emit("(")
            stack.append(["arith", 0, False])
            return at + 1
        stack.append(["cmd", 0, True])
        return at

    while i < n:
        tok = tokens[i]
        mode = stack[-1][0]
        if isinstance(tok, _Field):
            prev = tokens[i - 1] if i else None
            if prev == "\\" and mode in ("cmd", "dq", _HEREDOC):
                raise ShellTemplateError(f"placeholder {{{tok.name}}} right after a backslash",
                                         "remove the backslash before the placeholder")
            if mode in ("bt", "dsq"):
                where = {"bt": "inside backticks", "dsq": "inside $'...'"}[mode]
                hint = {"bt": "use $(...) instead of backticks",
                        "dsq": "use '...' or \"...\" quotes around the placeholder"}[mode]
                raise ShellTemplateError(f"placeholder {{{tok.name}}} stands {where}, where no quoting keeps "
                                         "its value from running as code", hint)
            ctx = mode if mode in ("dq", "sq", "comment", _HEREDOC, "arith") else "bare"
            if ctx == _HEREDOC and heredoc is not None and heredoc[1]:
                ctx = "hdq"
            contexts.append((ctx, len(bodies)))
            if render_values is not None:
                value = _encode(str(render_values[tok.name]), ctx)
                out.append(value)
                if ctx in (_HEREDOC, "hdq") and heredoc is not None:
                    # a value's own lines may not end the heredoc early
                    pieces = value.split("\n")
                    for piece in pieces[:-1]:
                        line.append(piece)
                        done = "".join(line)
                        if (done.lstrip("\t") if heredoc[2] else done) == heredoc[0]:
                            raise ShellTemplateError(
                                f"the value of {{{tok.name}}} would end the heredoc <<{heredoc[0]} early",
                                "choose a heredoc delimiter that no value contains")
                        bodies[-1] += done + "\n"
                        line = []
                    line.append(pieces[-1])
                elif mode == _HEREDOC:
                    line.append(value)
            line_has_field = True
            word_start = False
            i += 1
            continue
        c = tok
        nxt = tokens[i + 1] if i + 1 < n else None
        if mode == _HEREDOC:
            assert heredoc is not None
            if c == "\n":
                done = "".join(line)
                if not line_has_field and (done.lstrip("\t") if heredoc[2] else done) == heredoc[0]:
                    emit(c)
                    stack.pop()
                    heredoc = None
                    if pending:
                        heredoc = pending.pop(0)
                        bodies.append("")
                        stack.append([_HEREDOC, 0, False])
                else:
                    bodies[-1] += done + "\n"
                    emit(c)
                line, line_has_field = [], False
                i += 1
                continue
            line.append(c)
            emit(c)
            if not heredoc[1]:
                if c == "\\" and nxt is not None and not isinstance(nxt, _Field):
                    line.append(nxt)
                    emit(nxt)
                    i += 2
                    continue
                if c == "$" and nxt == "(" and tokens[i + 2: i + 3] != ["("]:
                    stack.append(["cmd", 0, True])
                elif c == "`":
                    stack.append(["bt", 0, False])
            i += 1
            continue
        emit(c)
        if mode == "sq":
            if c == "'":
                stack.pop()
        elif mode == "dsq":
            if c == "\\" and nxt is not None and not isinstance(nxt, _Field):
                emit(nxt)
                i += 1
            elif c == "'":
                stack.pop()
        elif mode == "bt":
            if c == "\\" and nxt is not None and not isinstance(nxt, _Field):
                emit(nxt)
                i += 1
            elif c == "`":
                stack.pop()
        elif mode == "comment":
            if c == "\n":
                stack.pop()
                out.pop() if render_values is not None else None
                continue  # the newline ends the comment; read it again as a command newline
        elif mode == "arith":
            frame = stack[-1]
            if c == "(":
                frame[1] += 1
            elif c == ")":
                if frame[1] > 0:
                    frame[1] -= 1
                elif nxt == ")":
                    emit(nxt)
                    i += 1
                    stack.pop()
        elif mode == "dq":
            if c == "\\" and nxt is not None and not isinstance(nxt, _Field):
                emit(nxt)
                i += 1
            elif c == '"':
                stack.pop()
            elif c == "`":
                stack.append(["bt", 0, False])
            elif c == "$" and nxt == "(":
                i = open_dollar_paren(i)
        else:  # cmd
            frame = stack[-1]
            if c == "\\" and nxt is not None and not isinstance(nxt, _Field):
                emit(nxt)
                i += 2
                word_start = False
                continue
            if c == "'":
                stack.append(["sq", 0, False])
            elif c == '"':
                stack.append(["dq", 0, False])
            elif c == "`":
                stack.append(["bt", 0, False])
            elif c == "$" and nxt == "'":
                emit(nxt)
                i += 1
                stack.append(["dsq", 0, False])
            elif c == "$" and nxt == '"':
                emit(nxt)
                i += 1
                stack.append(["dq", 0, False])
            elif c == "$" and nxt == "(":
                i = open_dollar_paren(i)
                word_start = True
                i += 1
                continue
            elif c == "(":
                frame[1] += 1
            elif c == ")":
                if frame[1] > 0:
                    frame[1] -= 1
                elif frame[2]:
                    stack.pop()
            elif c == "#" and word_start:
                stack.append(["comment", 0, False])
            elif c == "<" and nxt == "<" and tokens[i + 2: i + 3] != ["<"]:
                i = _heredoc_word(tokens, i + 2, pending, emit)
                word_start = True
                continue
            elif c == "\n" and pending:
                heredoc = pending.pop(0)
                bodies.append("")
                stack.append([_HEREDOC, 0, False])
                line, line_has_field = [], False
            word_start = c in " \t\n;&|()<>"
        i += 1
    if stack[-1][0] in ("sq", "dq", "dsq", "bt"):
        what = {"sq": "a single quote (')", "dq": 'a double quote (")', "dsq": "a $' quote", "bt": "a backtick"}
        raise ShellTemplateError(f"{what[stack[-1][0]]} in the command is never closed",
                                 "close the quote (write a literal quote as \\' outside quotes, or \\\" inside \"...\")")
    if heredoc is not None and line:
        bodies[-1] += "".join(line)
    return contexts, bodies, "".join(out)


def _heredoc_word(tokens: list[Any], i: int, pending: list[tuple[str, bool, bool]], emit: Any) -> int:
    """Read the delimiter after ``<<`` (``-`` strips tabs; any quoting means a literal body)."""
    emit("<")
    strip = False
    if i < len(tokens) and tokens[i] == "-":
        strip = True
        emit("-")
        i += 1
    while i < len(tokens) and tokens[i] in (" ", "\t"):
        emit(tokens[i])
        i += 1
    word: list[str] = []
    quoted = False
    quote: str | None = None
    while i < len(tokens):
        t = tokens[i]
        if isinstance(t, _Field):
            raise ShellTemplateError(f"placeholder {{{t.name}}} in a heredoc delimiter",
                                     "write the delimiter (e.g. EOF) as plain text")
        if quote is None and (t in " \t\n;&|<>()"):
            break
        emit(t)
        if quote is not None:
            if t == quote:
                quote = None
            else:
                word.append(t)
        elif t in "'\"":
            quote, quoted = t, True
        elif t == "\\" and i + 1 < len(tokens) and isinstance(tokens[i + 1], str):
            quoted = True
            i += 1
            emit(tokens[i])
            word.append(tokens[i])
        else:
            word.append(t)
        i += 1
    if word:
        pending.append(("".join(word), quoted, strip))
    return i


_WHOLE = re.compile(r"-?[0-9]+")


def _encode(value: str, ctx: str) -> str:
    if ctx == "arith":
        if not _WHOLE.fullmatch(value):
            raise ShellTemplateError(f"the value {value[:40]!r} stands inside $((...)), where only a whole number "
                                     "is safe", "give that field whole numbers, or move the arithmetic into a program")
        return value
    if ctx == "bare":
        return shlex.quote(value)
    if ctx == "dq":
        return "".join("\\" + c if c in '\\"$`' else c for c in value)
    if ctx == "sq":
        return value.replace("'", "'\\''")
    if ctx == _HEREDOC:
        return "".join("\\" + c if c in "\\$`" else c for c in value)
    if ctx == "comment":
        return value.replace("\n", " ").replace("\r", " ")
    return value  # hdq: a quoted heredoc's body is literal


def _tokens(text: str) -> list[Any]:
    tokens: list[Any] = []
    for kind, v in parse_template(text):
        if kind == "text":
            tokens.extend(v)
        else:
            tokens.append(_Field(v))
    return tokens


_SHELL_PLANS: dict[str, tuple[list[tuple[str, str]], list[str], bool]] = {}


def shell_contexts(text: str) -> list[str]:
    """Each placeholder's quoting context in a shell command (raises :class:`ShellTemplateError`)."""
    contexts, _, _ = _scan(_tokens(text))
    return [c for c, _ in contexts]


def render_shell(text: str, values: Mapping[str, Any]) -> str:
    """A shell command with each placeholder encoded for where it stands (see above): the shell
    reads each value back exactly as written, and never as code."""
    plan = _SHELL_PLANS.get(text)
    if plan is None:
        contexts, _, _ = _scan(_tokens(text))
        parts = parse_template(text)
        kinds = [c for c, _ in contexts]
        plan = (parts, kinds, any(k in (_HEREDOC, "hdq") for k in kinds))
        if len(_SHELL_PLANS) < 1024:
            _SHELL_PLANS[text] = plan
    parts, kinds, heredoc = plan
    if heredoc:
        _, bodies, rendered = _scan(_tokens(text), render_values=values)
        _, again, _ = _scan(list(rendered))  # the shell's reading of the result: same heredoc bodies
        if again != bodies:
            raise ShellTemplateError("an item value would end a heredoc early",
                                     "choose a heredoc delimiter that no value contains")
        return rendered
    out = []
    k = 0
    for kind, v in parts:
        if kind == "text":
            out.append(v)
        else:
            out.append(_encode(str(values[v]), kinds[k]))
            k += 1
    return "".join(out)


_SHELLS = frozenset({"sh", "bash", "dash", "ash", "ksh", "mksh", "zsh", "busybox"})
_INTERPRETERS = {"python": "-c", "python3": "-c", "python2": "-c", "perl": "-e", "ruby": "-e", "node": "-e",
                 "Rscript": "-e", "R": "-e"}


def shell_script_index(argv: list[str]) -> int | None:
    """In a list command, the index of the script that ``sh -c`` (or bash, dash, ``env sh -c`` …)
    runs, or None when the command does not hand a script to a shell."""
    j = 0
    if argv and Path(argv[0]).name == "env":
        j = 1
        while j < len(argv) and (argv[j].startswith("-") or "=" in argv[j]):
            j += 1
    if j >= len(argv) or Path(argv[j]).name not in _SHELLS:
        return None
    j += 1
    if Path(argv[j - 1]).name == "busybox":
        if j >= len(argv) or argv[j] not in ("sh", "ash"):
            return None
        j += 1
    has_c = False
    while j < len(argv):
        a = argv[j]
        if a == "--":
            j += 1
            break
        if a in ("-o", "+o", "-O", "+O"):
            j += 2
            continue
        if len(a) > 1 and a[0] in "-+" and a[1:].isalpha():
            has_c = has_c or (a[0] == "-" and "c" in a[1:])
            j += 1
            continue
        break
    return j if has_c and j < len(argv) else None


def _interpreter_code(argv: list[str]) -> int | None:
    """Index of the code that ``python -c`` (perl/ruby/node/R -e) would run, if any."""
    if not argv:
        return None
    flag = _INTERPRETERS.get(Path(argv[0]).name)
    if flag is None:
        return None
    for j, a in enumerate(argv[1:], start=1):
        if a == flag:
            return j + 1 if j + 1 < len(argv) else None
    return None


# -- plan model ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Task:
    """One stage applied to one item (or once per run): the unit that runs and is tracked."""

    id: str
    stage: Stage
    index: int | None  # item index; None for per-run tasks
    key: str  # item key, or "run"
    item: dict[str, Any]
    needs: tuple[str, ...]
    always: bool = False  # runs once its needs have ended, whatever their outcome (cleanup)

    @property
    def label(self) -> str:
        return f"{self.stage.name}[{self.key}]"

    def values(self, run_id: str, workdir: str) -> dict[str, Any]:
        return {
            **self.item,
            "run": run_id,
            "stage": self.stage.name,
            "workdir": workdir,
            "task": self.id,
            "item": self.key,
            "index": "" if self.index is None else self.index,
        }

    def command(self, run_id: str, workdir: str) -> list[str]:
        """argv to run: a string command runs under ``/bin/sh -c`` with placeholders shell-quoted."""
        vals = self.values(run_id, workdir)
        cmd = self.stage.command
        if cmd is None:
            return []
        if isinstance(cmd, str):
            return ["/bin/sh", "-c", render_shell(cmd, vals)]
        script = shell_script_index(cmd)
        return [render_shell(a, vals) if j == script else render(a, vals) for j, a in enumerate(cmd)]

    def env(self, run_id: str, workdir: str) -> dict[str, str]:
        vals = self.values(run_id, workdir)
        env = {f"CORRAL_ITEM_{k}": str(v) for k, v in self.item.items()}
        env.update({k: str(v) for k, v in self.item.items() if not protected_env(k)})
        env.update(
            CORRAL_RUN_ID=run_id,
            CORRAL_STAGE=self.stage.name,
            CORRAL_TASK_ID=self.id,
            CORRAL_ITEM_KEY=self.key,
            CORRAL_ITEM_INDEX="" if self.index is None else str(self.index),
            CORRAL_WORKDIR=workdir,
        )
        env.update({k: render(v, vals) for k, v in self.stage.env.items()})
        return env

    def filter_rules(self, run_id: str, workdir: str) -> list[str]:
        """A transfer's rclone filters with ``{field}`` placeholders filled in; everything else is
        kept as written (rclone's own ``{{regexp}}`` and ``{a,b}`` syntax)."""
        vals = self.values(run_id, workdir)
        return [_FILTER_FIELD.sub(lambda m: str(vals[m.group(1)]) if m.group(1) in vals else m.group(0), f)
                for f in self.stage.filters]

    def paths(self, which: str, run_id: str, workdir: str) -> list[str]:
        vals = self.values(run_id, workdir)
        return [render(p, vals) for p in getattr(self.stage, which)]


@dataclass
class Plan:
    workflow: Workflow
    items: list[Item]
    keys: list[str]
    tasks: list[Task]  # in a topological order
    by_id: dict[str, Task] = field(default_factory=dict)
    stage_order: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_id = {t.id: t for t in self.tasks}

    def stage_tasks(self, stage: str) -> list[Task]:
        return [t for t in self.tasks if t.stage.name == stage]

    def dependents(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {t.id: [] for t in self.tasks}
        for t in self.tasks:
            for d in t.needs:
                out[d].append(t.id)
        return out

    def find(self, ref: str) -> Task:
        """A task by id (or unique id prefix) or label ``stage[item]``."""
        if ref in self.by_id:
            return self.by_id[ref]
        matches = [t for t in self.tasks if t.label == ref or t.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        raise PlanError(
            f"no single task matches {ref!r}" + (f" ({len(matches)} do)" if matches else ""),
            "give a task id (or a unique prefix) or stage[item] as shown by `corral status`",
        )

    # -- manifest: everything needed to rebuild this plan without reading any file again ---
    def manifest(self) -> bytes:
        """JSON with the keys in their order: an item's key comes from its *first* field, so
        sorting the keys here would change item keys (and ``{item}``) on resume."""
        data = {
            "version": 2,
            "source": self.workflow.source,
            "base_dir": str(self.workflow.base_dir),
            "workflow": self.workflow.model_dump(mode="json", by_alias=True, exclude={"items"}),
            "items": self.items,
            # which resources each stage set (the dump writes every field): locally an explicit
            # memory is a limit, a default one is not, and a resumed run must mean the same
            "resources_set": {s.name: sorted(s.resources.model_fields_set) for s in self.workflow.stages},
        }
        return json.dumps(data, separators=(",", ":")).encode()

    def records(self, stored: bytes) -> bool:
        """Whether ``stored`` (a run's manifest) is this plan's: the same bytes, or those a corral
        wrote before manifests recorded ``resources_set`` (its last key)."""
        mine = self.manifest()
        if mine == stored:
            return True
        cut = mine.rfind(b',"resources_set":')
        return cut > 0 and b'"resources_set"' not in stored and mine[:cut] + b"}" == stored

    def with_keys(self, recorded: Mapping[str, str]) -> Plan:
        """The plan with the item keys a run recorded for its tasks (task id → key): a manifest
        written before version 2 sorted item fields, which changed the keys made from them."""
        changed = {t.id: recorded[t.id] for t in self.tasks if t.index is not None and recorded.get(t.id, t.key) != t.key}
        if not changed:
            return self
        import dataclasses

        tasks = [dataclasses.replace(t, key=changed[t.id]) if t.id in changed else t for t in self.tasks]
        keys = list(self.keys)
        for t in tasks:
            if t.index is not None:
                keys[t.index] = t.key
        return Plan(workflow=self.workflow, items=self.items, keys=keys, tasks=tasks, stage_order=self.stage_order)

    @staticmethod
    def from_manifest(blob: bytes) -> Plan:
        data = json.loads(blob)
        wf_raw = dict(data["workflow"])
        wf_raw["items"] = data["items"]
        # The manifest is JSON that corral wrote from a validated workflow: validate the data as it
        # is, without re-parsing it through the YAML loader that records positions (7 s for 60,000
        # tasks that way, for positions no error from this data would ever need).
        wf = from_located(Located(data=wf_raw, source=data["source"]), base_dir=Path(data["base_dir"]))
        resources_set = data.get("resources_set")  # None: a manifest from before it was recorded
        if resources_set is not None:
            for st in wf.stages:
                if st.name in resources_set:
                    st.resources.__pydantic_fields_set__ = set(resources_set[st.name])
        return make_plan(wf)


_HASH_JSON = json.JSONEncoder(sort_keys=True, default=str)  # = json.dumps(obj, sort_keys=True, default=str)


def _hash(obj: Any) -> str:
    return hashlib.sha256(_HASH_JSON.encode(obj).encode()).hexdigest()


def _task_id(fingerprint: str, item_hash: str) -> str:
    """``_hash([fingerprint, item_hash])[:16]`` without the JSON encoder (both are hex digits or
    "run", which JSON writes as they are): the same ids, at a fraction of the cost."""
    return hashlib.sha256(f'["{fingerprint}", "{item_hash}"]'.encode()).hexdigest()[:16]


def stage_fingerprint(stage: Stage) -> str:
    """What a stage runs (not how much it asks for): changes here change its tasks' ids."""
    return _hash(
        {
            "name": stage.name, "kind": stage.kind, "command": stage.command, "image": stage.image,
            "env": stage.env, "from": stage.source, "to": stage.dest, "mode": stage.mode,
            "filters": stage.filters, "outputs": stage.outputs,
        }
    )


def stage_order(wf: Workflow) -> list[str]:
    names = [s.name for s in wf.stages]
    graph: dict[str, set[str]] = {}
    for i, s in enumerate(wf.stages):
        for j, need in enumerate(s.needs):
            if need not in names:
                raise SpecError(
                    f"stage {s.name!r} needs {need!r}, which is not a stage",
                    did_you_mean(need, names, otherwise="stages are", show=len(names)),
                    where=wf.where("stages", i, "needs", j),
                )
            if need == s.name:
                raise SpecError(
                    f"stage {s.name!r} needs itself", "remove it from its own `needs`",
                    where=wf.where("stages", i, "needs", j),
                )
        graph[s.name] = set(s.needs)
    ts = graphlib.TopologicalSorter(graph)
    try:
        order = list(ts.static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        first = cycle[0]
        raise SpecError(
            f"stages depend on each other in a cycle: {' -> '.join(reversed(cycle))}",
            "remove one of these `needs` so the stages form a chain",
            where=wf.stage_where(first, "needs"),
        ) from None
    # Keep the file's order among independent stages.
    pos = {n: i for i, n in enumerate(names)}
    result: list[str] = []
    done: set[str] = set()
    while len(result) < len(names):
        ready = [n for n in names if n not in done and graph[n] <= done]
        nxt = min(ready, key=pos.__getitem__)
        result.append(nxt)
        done.add(nxt)
    assert set(result) == set(order)
    return result


def _check_placeholders(wf: Workflow, items: list[Item]) -> None:
    common: set[str] = set(items[0]) if items else set()
    for it in items[1:]:
        common &= set(it)
    every = set().union(*items) if items else set()
    for i, s in enumerate(wf.stages):
        texts: list[tuple[tuple[str | int, ...], str]] = []
        if isinstance(s.command, str):
            texts.append((("command",), s.command))
        elif isinstance(s.command, list):
            texts += [(("command", j), a) for j, a in enumerate(s.command)]
        texts += [(("env", k), v) for k, v in s.env.items()]
        texts += [(("inputs", j), p) for j, p in enumerate(s.inputs)]
        texts += [(("outputs", j), p) for j, p in enumerate(s.outputs)]
        texts += [(("filters", j), " ".join(f"{{{n}}}" for n in _FILTER_FIELD.findall(f)))
                  for j, f in enumerate(s.filters)]
        if s.source:
            texts.append((("from",), s.source))
        if s.dest:
            texts.append((("to",), s.dest))
        _check_shell(wf, i, s)
        available = set(BUILTINS) | (common if s.per == "item" else set())
        for path, text in texts:
            for name in template_fields(text):
                if name in available:
                    continue
                where = wf.where("stages", i, *path)
                if s.per == "run" and name in every:
                    raise SpecError(
                        f"stage {s.name!r} runs once per run, so item field {{{name}}} has no single value",
                        "use it in a `per: item` stage, or use {run} / {workdir}",
                        where=where,
                    )
                if name in every:
                    missing = sum(1 for it in items if name not in it)
                    raise SpecError(
                        f"placeholder {{{name}}} in stage {s.name!r}: {missing} item(s) have no field {name!r}",
                        "give every item that field, or remove the placeholder",
                        where=where,
                    )
                choices = sorted(available | every)
                hint = did_you_mean(
                    name, choices, quote="{{{}}}".format, otherwise="item fields and built-ins are", show=len(choices)
                )
                raise SpecError(
                    f"placeholder {{{name}}} in stage {s.name!r} is not an item field nor a built-in",
                    hint + " (write {{ and }} for literal braces)",
                    where=where,
                )


def _check_shell(wf: Workflow, i: int, s: Stage) -> None:
    """Placeholders in shell code must stand where a value can be quoted (see :func:`render_shell`)."""
    cmd = s.command
    scripts: list[tuple[tuple[str | int, ...], str]] = []
    if isinstance(cmd, str):
        scripts.append((("command",), cmd))
    elif isinstance(cmd, list):
        j = shell_script_index(cmd)
        if j is not None:
            scripts.append((("command", j), cmd[j]))
        code = _interpreter_code(cmd)
        if code is not None and template_fields(cmd[code]):
            raise SpecError(
                f"stage {s.name!r}: a placeholder in the code given to {Path(cmd[0]).name} "
                f"{cmd[code - 1]} would run item data as code",
                f"pass the value as an argument instead, e.g. [{cmd[0]}, {cmd[code - 1]}, "
                "'import sys; print(sys.argv[1])', '{x}']",
                where=wf.where("stages", i, "command", code),
            )
    for path, text in scripts:
        try:
            _scan(_tokens(text))
        except ShellTemplateError as exc:
            raise SpecError(f"stage {s.name!r}: {exc}", exc.hint, where=wf.where("stages", i, *path)) from None


# Environment names an item field never sets (the task still sees the value as CORRAL_ITEM_<name>
# and as {<name>}): what the shell, the dynamic loader and corral itself read.
PROTECTED_ENV = frozenset({"PATH", "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "PS4", "HOME", "SHELL",
                           "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PERL5OPT", "NODE_OPTIONS"})
PROTECTED_PREFIXES = ("LD_", "DYLD_", "CORRAL_", "AWS_", "BASH_FUNC_")


def protected_env(name: str) -> bool:
    """True for an environment name that an item field may not replace."""
    return name in PROTECTED_ENV or name.startswith(PROTECTED_PREFIXES)


def _path_templates(s: Stage) -> list[tuple[tuple[str | int, ...], str, set[str]]]:
    """(where, template, fields used as path segments) for the stage's paths: every placeholder
    in inputs, outputs, from and to; in a command, those written next to a ``/``."""
    out: list[tuple[tuple[str | int, ...], str, set[str]]] = []
    texts: list[tuple[tuple[str | int, ...], str]] = [(("inputs", j), p) for j, p in enumerate(s.inputs)]
    texts += [(("outputs", j), p) for j, p in enumerate(s.outputs)]
    texts += [(("from",), s.source)] if s.source else []
    texts += [(("to",), s.dest)] if s.dest else []
    for path, text in texts:
        names = {n for n in template_fields(text) if n not in BUILTINS}
        if names:
            out.append((path, text, names))
    cmd = s.command
    args: list[tuple[tuple[str | int, ...], str]] = (
        [(("command",), cmd)] if isinstance(cmd, str) else [(("command", j), a) for j, a in enumerate(cmd or [])])
    for path, text in args:
        parts = parse_template(text)
        names = set()
        for k, (kind, v) in enumerate(parts):
            if kind != "field" or v in BUILTINS:
                continue
            before = parts[k - 1][1] if k and parts[k - 1][0] == "text" else ""
            after = parts[k + 1][1] if k + 1 < len(parts) and parts[k + 1][0] == "text" else ""
            if before.endswith("/") or after.startswith("/") or k and parts[k - 1] == ("field", "workdir"):
                names.add(v)
        if names:
            out.append((path, text, names))
    return out


def _short(value: Any) -> str:
    """A value for a one-line message: its repr, at most 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _leaves(value: str) -> bool:
    """True when a value, put in a path, climbs out of the folder it is put in (a ``..`` segment)."""
    return ".." in value and ".." in value.replace("\\", "/").split("/")


def _check_items(wf: Workflow, items: list[Item], item_hashes: list[str], ctx: SourceContext) -> None:
    """Two items with the same fields would be one task twice; a value must stay inside its folder."""
    if len(set(item_hashes)) != len(item_hashes):
        first: dict[str, int] = {}
        for j, h in enumerate(item_hashes):
            if h in first:
                i = first[h]
                shown = ", ".join(f"{k}={_short(v)}" for k, v in list(items[j].items())[:3])
                raise SpecError(
                    f"items {i + 1} and {j + 1} are identical ({shown}), so their tasks would be one; "
                    f"the first is at {ctx.where_item(i)}",
                    "remove the repeated item (or add a field that tells them apart)",
                    where=ctx.where_item(j),
                )
            first[h] = j
    for si, s in enumerate(wf.stages):
        if s.per != "item":
            continue
        for path, _text, names in _path_templates(s):
            for name in names:
                for j, it in enumerate(items):
                    v = it.get(name)
                    if isinstance(v, str) and _leaves(v):
                        raise SpecError(
                            f"item {j + 1}: {name}={_short(v)} climbs out of the folder it is put in "
                            f"(stage {s.name!r}, {'.'.join(map(str, path))}: {wf.where('stages', si, *path)})",
                            "item values used in paths may not hold `..` segments; fix the item",
                            where=ctx.where_item(j),
                        )


_VALUE_CHECKED = frozenset({"hd", "hdq", "arith"})


def _check_heredoc_values(wf: Workflow, tasks: list[Task]) -> None:
    """Values in heredoc bodies and $((...)) are checked when planned (not when the task starts)."""
    risky = {s.name for s in wf.stages
             if isinstance(s.command, str) and _VALUE_CHECKED & set(shell_contexts(s.command))
             or isinstance(s.command, list) and (j := shell_script_index(s.command)) is not None
             and _VALUE_CHECKED & set(shell_contexts(s.command[j]))}
    if not risky:
        return
    for t in tasks:
        if t.stage.name in risky:
            try:
                t.command("run", "/workdir")
            except ShellTemplateError as exc:
                raise SpecError(f"stage {t.stage.name!r}, item {t.key!r}: {exc}", exc.hint,
                                where=wf.stage_where(t.stage.name, "command")) from None


def check_local_secrets(wf: Workflow) -> None:
    """Every ``env:NAME`` secret is set and every ``file:path`` secret is a readable file, before
    anything runs (``corral validate`` and a local run check this; values are never read here)."""
    for s in wf.stages:
        for name, ref in s.secrets.items():
            source, _, key = ref.partition(":")
            where = wf.stage_where(s.name, "secrets", name)
            if source == "env" and key and key not in os.environ:
                raise SpecError(f"stage {s.name!r}: secret {name} comes from environment variable {key}, which is not set",
                                f"export {key}=... before running", where=where)
            if source == "file" and key:
                f = Path(key).expanduser()
                if not f.is_file() or not os.access(f, os.R_OK):
                    raise SpecError(f"stage {s.name!r}: secret {name} comes from {key}, which is not a readable file",
                                    "check the file named in `secrets:`", where=where)


CLEANUP_STAGE = "corral-cleanup"


def _with_cleanup(wf: Workflow) -> Workflow:
    """``cleanup: true`` adds a final stage that removes the run's workspace; a ``kind: cleanup``
    stage without ``needs`` waits for every other stage. Cleanup runs whatever the outcome."""
    names = [s.name for s in wf.stages]
    stages = []
    changed = False
    for s in wf.stages:
        if s.kind == "cleanup" and (s.per != "run" or not s.needs):
            s = s.model_copy(update={"per": "run", "needs": s.needs or [n for n in names if n != s.name]})
            changed = True
        stages.append(s)
    if wf.cleanup and not any(s.kind == "cleanup" for s in stages):
        stages.append(Stage(name=CLEANUP_STAGE, kind="cleanup", per="run", needs=names))
        changed = True
    if not changed:
        return wf
    new = wf.model_copy(update={"stages": stages})
    new._located, new._base_dir = wf._located, wf._base_dir
    return new


def make_plan(wf: Workflow, items: list[Item] | None = None) -> Plan:
    """Build the plan; every problem is raised before anything runs."""
    wf = _with_cleanup(wf)
    ctx = SourceContext(base_dir=wf.base_dir, where=wf.where)
    if items is None:
        items = resolve_items(wf.items, ctx)
    else:
        items = normalise_items([dict(it) for it in items], ctx)
    order = stage_order(wf)
    if any(s.per == "item" for s in wf.stages) and not items:
        raise PlanError(
            "the workflow has per-item stages but its item source gave no items",
            "check `items:` (the table's rows, the glob pattern, the filters)",
            where=wf.where("items"),
        )
    _check_placeholders(wf, items)
    keys = item_keys(items)
    stages = {s.name: s for s in wf.stages}
    fingerprints = {n: stage_fingerprint(s) for n, s in stages.items()}
    item_hashes = [_hash(it) for it in items]
    _check_items(wf, items, item_hashes, ctx)
    ids: dict[str, list[str]] = {}  # stage -> its task ids (one per item, or the run task's)
    tasks: list[Task] = []
    for name in order:
        s = stages[name]
        always = s.kind == "cleanup"
        fp = fingerprints[name]
        if s.per == "item":
            # in `needs` order: an item stage's task of the same item, or the run stage's one task
            needed = [(stages[need].per == "item", ids[need]) for need in s.needs]
            own: list[str] = []
            for idx, ih in enumerate(item_hashes):
                tid = _task_id(fp, ih)
                own.append(tid)
                needs = tuple([got[idx] if per_item else got[0] for per_item, got in needed]) if needed else ()
                tasks.append(Task(tid, s, idx, keys[idx], items[idx], needs, always))
            ids[name] = own
        else:
            tid = _task_id(fp, "run")
            needs_list: list[str] = []
            for need in s.needs:
                needs_list.extend(ids[need])
            ids[name] = [tid]
            tasks.append(Task(tid, s, None, RUN_KEY, {}, tuple(needs_list), always))
    _check_heredoc_values(wf, tasks)
    return Plan(workflow=wf, items=items, keys=keys, tasks=tasks, stage_order=order)


def iter_edges(plan: Plan) -> Iterator[tuple[str, str]]:
    for t in plan.tasks:
        for d in t.needs:
            yield d, t.id
