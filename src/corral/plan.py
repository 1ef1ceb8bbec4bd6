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
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import PlanError, SpecError, did_you_mean
from corral.sources import Item, SourceContext, item_keys, resolve_items
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
    out = []
    for kind, v in parse_template(text):
        if kind == "text":
            out.append(v)
        else:
            s = str(values[v])
            out.append(shlex.quote(s) if quote else s)
    return "".join(out)


_FILTER_FIELD = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


# -- plan model ---------------------------------------------------------------------------------
@dataclass(frozen=True)
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
            return ["/bin/sh", "-c", render(cmd, vals, quote=True)]
        return [render(a, vals) for a in cmd]

    def env(self, run_id: str, workdir: str) -> dict[str, str]:
        vals = self.values(run_id, workdir)
        env = {f"CORRAL_ITEM_{k}": str(v) for k, v in self.item.items()}
        env.update({k: str(v) for k, v in self.item.items()})
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
        data = {
            "version": 1,
            "source": self.workflow.source,
            "base_dir": str(self.workflow.base_dir),
            "workflow": self.workflow.model_dump(mode="json", by_alias=True, exclude={"items"}),
            "items": self.items,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @staticmethod
    def from_manifest(blob: bytes) -> Plan:
        data = json.loads(blob)
        wf_raw = dict(data["workflow"])
        wf_raw["items"] = data["items"]
        # The manifest is JSON that corral wrote from a validated workflow: validate the data as it
        # is, without re-parsing it through the YAML loader that records positions (7 s for 60,000
        # tasks that way, for positions no error from this data would ever need).
        wf = from_located(Located(data=wf_raw, source=data["source"]), base_dir=Path(data["base_dir"]))
        return make_plan(wf)


_HASH_JSON = json.JSONEncoder(sort_keys=True, default=str)  # = json.dumps(obj, sort_keys=True, default=str)


def _hash(obj: Any) -> str:
    return hashlib.sha256(_HASH_JSON.encode(obj).encode()).hexdigest()


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
    if items is None:
        ctx = SourceContext(base_dir=wf.base_dir, where=wf.where)
        items = resolve_items(wf.items, ctx)
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
    ids: dict[tuple[str, int | None], str] = {}
    tasks: list[Task] = []
    for name in order:
        s = stages[name]
        always = s.kind == "cleanup"
        idxs: list[int | None] = list(range(len(items))) if s.per == "item" else [None]
        for idx in idxs:
            tid = _hash([fingerprints[name], item_hashes[idx] if idx is not None else "run"])[:16]
            needs: list[str] = []
            for need in s.needs:
                ns = stages[need]
                if ns.per == "item" and s.per == "item":
                    needs.append(ids[(need, idx)])
                elif ns.per == "item":
                    needs.extend(ids[(need, j)] for j in range(len(items)))
                else:
                    needs.append(ids[(need, None)])
            ids[(name, idx)] = tid
            tasks.append(
                Task(
                    id=tid, stage=s, index=idx, key=keys[idx] if idx is not None else RUN_KEY,
                    item=dict(items[idx]) if idx is not None else {}, needs=tuple(needs), always=always,
                )
            )
    return Plan(workflow=wf, items=items, keys=keys, tasks=tasks, stage_order=order)


def iter_edges(plan: Plan) -> Iterator[tuple[str, str]]:
    for t in plan.tasks:
        for d in t.needs:
            yield d, t.id
