"""Item sources: where a workflow's items come from.

``items:`` in a workflow is either an inline list of mappings, or a mapping with one source key:

    items: [{session: s1}, {session: s2}]          # inline list
    items: {table: sessions.csv}                    # CSV or TSV (by extension, or `delimiter:`)
    items: {glob: "data/sub-{subject}/ses-{session}"}   # fields from the matched path
    items: {product: [<source>, <source>]}          # cross product (recordings × sorters)
    items: {bids: path-or-s3-uri, ...}              # corral.recipes.bids
    items: {neuroconv: conversion.yml}              # corral.recipes.neuroconv

A source is a function ``(spec: dict, ctx: SourceContext) -> list[dict]`` registered with
:func:`register_source` under its key. Sources never import boto3 themselves at module level.
"""

from __future__ import annotations

import csv
import glob as globlib
import importlib
import itertools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import SpecError, did_you_mean

Item = dict[str, Any]
SourceFn = Callable[[dict[str, Any], "SourceContext"], list[Item]]

SOURCES: dict[str, SourceFn] = {}
_PLUGIN_MODULES = ("corral.recipes.bids", "corral.recipes.neuroconv")
FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class SourceContext:
    base_dir: Path
    where: Callable[..., str]  # where(*path) -> "file:line:col", path relative to the workflow root
    path: tuple[str | int, ...] = ("items",)

    def error(self, message: str, hint: str, *sub: str | int) -> SpecError:
        return SpecError(f"items: {message}", hint, where=self.where(*self.path, *sub))

    def resolve(self, p: str) -> Path:
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else self.base_dir / q

    def child(self, *sub: str | int) -> SourceContext:
        return SourceContext(self.base_dir, self.where, self.path + sub)


def register_source(key: str) -> Callable[[SourceFn], SourceFn]:
    def deco(fn: SourceFn) -> SourceFn:
        SOURCES[key] = fn
        return fn

    return deco


def _load_plugins() -> None:
    for mod in _PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # a recipe module that is not there yet
            if exc.name != mod:
                raise


def resolve_items(spec: Any, ctx: SourceContext) -> list[Item]:
    """Turn the ``items:`` value into a list of item mappings (field name -> scalar)."""
    if spec is None:
        return []
    if isinstance(spec, list):
        return _inline(spec, ctx)
    if not isinstance(spec, dict):
        raise ctx.error(
            f"expected a list of mappings or a source mapping, got {type(spec).__name__}",
            "write `items: [{session: s1}, ...]` or `items: {table: items.csv}`",
        )
    _load_plugins()
    keys = [k for k in spec if k in SOURCES]
    if len(keys) != 1:
        known = ", ".join(sorted(SOURCES))
        unknown = [k for k in spec if k not in SOURCES]
        hint = f"use exactly one of: {known}"
        if unknown and not keys:
            hint = did_you_mean(unknown[0], sorted(SOURCES), otherwise="use exactly one of")
            raise ctx.error(f"unknown item source {unknown[0]!r}", hint, unknown[0])
        raise ctx.error("an item source mapping needs exactly one source key", hint)
    items = SOURCES[keys[0]](spec, ctx)
    for i, it in enumerate(items):
        for k in it:
            if not isinstance(k, str) or not FIELD_RE.match(k):
                raise ctx.error(
                    f"item {i} has field {k!r}, which is not a valid name",
                    "field names are letters, digits and _ (they become {placeholders} and env vars)",
                )
    return items


def _inline(spec: list[Any], ctx: SourceContext) -> list[Item]:
    out: list[Item] = []
    for i, it in enumerate(spec):
        if isinstance(it, (str, int, float)) and not isinstance(it, bool):
            out.append({"item": it})
            continue
        if not isinstance(it, dict) or not it:
            raise ctx.error(f"item {i} must be a mapping of fields", "write e.g. `- {session: s1, n: 3}`", i)
        for k, v in it.items():
            if not isinstance(k, str) or not FIELD_RE.match(k):
                raise ctx.error(
                    f"field name {k!r} is not valid", "use letters, digits and _ (e.g. session_id)", i, k
                )
            if isinstance(v, (dict, list)):
                raise ctx.error(
                    f"field {k!r} of item {i} is a {type(v).__name__}; fields are plain values",
                    "flatten it into several fields",
                    i,
                    k,
                )
        out.append(dict(it))
    return out


def _check_unknown(spec: dict[str, Any], allowed: set[str], ctx: SourceContext) -> None:
    for k in spec:
        if k not in allowed:
            hint = did_you_mean(k, sorted(allowed), otherwise="allowed keys", show=len(allowed))
            raise ctx.error(f"unknown key {k!r}", hint, k)


@register_source("table")
def table_source(spec: dict[str, Any], ctx: SourceContext) -> list[Item]:
    """Rows of a CSV/TSV file with a header line; empty cells are kept as empty strings."""
    _check_unknown(spec, {"table", "delimiter", "where"}, ctx)
    path = ctx.resolve(str(spec["table"]))
    delimiter = spec.get("delimiter") or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            if not reader.fieldnames:
                raise ctx.error(f"{path} has no header line", "put the field names on the first line", "table")
            rows = []
            for lineno, row in enumerate(reader, start=2):
                if None in row:
                    raise SpecError(
                        f"line has more cells than the header has names ({len(reader.fieldnames)})",
                        "check the delimiter and quoting of that line",
                        where=f"{path}:{lineno}",
                    )
                if not any((v or "").strip() for v in row.values()):
                    continue
                rows.append({k.strip(): (v if v is not None else "") for k, v in row.items()})
    except FileNotFoundError:
        raise ctx.error(f"no such table file: {path}", "check the path (relative to the workflow file)", "table") from None
    except UnicodeDecodeError:
        raise ctx.error(f"{path} is not UTF-8 text", "save the table as UTF-8 CSV/TSV", "table") from None
    return _filter(rows, spec.get("where"), ctx)


def _filter(rows: list[Item], where: Any, ctx: SourceContext) -> list[Item]:
    """``where: {field: value | [values]}`` keeps matching rows."""
    if not where:
        return rows
    if not isinstance(where, dict):
        raise ctx.error("`where` must map field names to a value or a list of values", "e.g. where: {subject: [01, 02]}", "where")
    def keep(row: Item) -> bool:
        for k, v in where.items():
            wanted = [str(x) for x in (v if isinstance(v, list) else [v])]
            if str(row.get(k, "")) not in wanted:
                return False
        return True
    return [r for r in rows if keep(r)]


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@register_source("glob")
def glob_source(spec: dict[str, Any], ctx: SourceContext) -> list[Item]:
    """Paths matching a pattern; ``{field}`` parts match one path segment piece and become fields."""
    _check_unknown(spec, {"glob", "type", "where"}, ctx)
    pattern = str(spec["glob"])
    kind = spec.get("type", "any")
    if kind not in ("any", "file", "dir"):
        raise ctx.error(f"type {kind!r} is not one of any, file, dir", "use type: file or type: dir", "type")
    fields = _PLACEHOLDER.findall(pattern)
    if len(set(fields)) != len(fields):
        raise ctx.error("a field appears twice in the glob pattern", "name each field once", "glob")
    root = str(ctx.base_dir)
    abs_pattern = pattern if os.path.isabs(pattern) else os.path.join(root, pattern)
    as_glob = _PLACEHOLDER.sub("*", abs_pattern)
    regex_parts = []
    last = 0
    for m in _PLACEHOLDER.finditer(abs_pattern):
        regex_parts.append(_glob_to_regex(abs_pattern[last : m.start()]))
        regex_parts.append(f"(?P<{m.group(1)}>[^/]+?)")
        last = m.end()
    regex_parts.append(_glob_to_regex(abs_pattern[last:]))
    regex = re.compile("^" + "".join(regex_parts) + "$")
    out: list[Item] = []
    for p in sorted(globlib.glob(as_glob, recursive=True)):
        if kind == "file" and not os.path.isfile(p) or kind == "dir" and not os.path.isdir(p):
            continue
        m = regex.match(p)
        if not m:
            continue
        rel = os.path.relpath(p, root) if not os.path.isabs(pattern) else p
        out.append({**m.groupdict(), "path": rel})
    return _filter(out, spec.get("where"), ctx)


def _glob_to_regex(text: str) -> str:
    out = ""
    i = 0
    while i < len(text):
        c = text[i]
        if text.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        else:
            out += re.escape(c)
        i += 1
    return out


@register_source("product")
def product_source(spec: dict[str, Any], ctx: SourceContext) -> list[Item]:
    """Cross product of several sources; field names must not clash."""
    _check_unknown(spec, {"product"}, ctx)
    parts = spec["product"]
    if not isinstance(parts, list) or len(parts) < 2:
        raise ctx.error("`product` takes a list of two or more sources", "e.g. product: [{table: recs.csv}, [{sorter: ks4}]]", "product")
    lists = [resolve_items(p, ctx.child("product", i)) for i, p in enumerate(parts)]
    out: list[Item] = []
    for combo in itertools.product(*lists):
        merged: Item = {}
        for part in combo:
            clash = set(merged) & set(part)
            if clash:
                raise ctx.error(
                    f"field {sorted(clash)[0]!r} comes from two sources of the product",
                    "rename the field in one of them",
                    "product",
                )
            merged.update(part)
        out.append(merged)
    return out


def item_keys(items: list[Item]) -> list[str]:
    """A short, unique, path-safe label for each item (its first field, more fields if needed)."""
    if not items:
        return []
    def label(it: Item, n: int) -> str:
        vals = [str(v) for v in list(it.values())[:n]]
        return re.sub(r"[^A-Za-z0-9._=-]+", "-", "_".join(vals)).strip("-")[:80] or "item"
    max_fields = max(len(it) for it in items)
    for n in range(1, max_fields + 1):
        keys = [label(it, n) for it in items]
        if len(set(keys)) == len(keys):
            return keys
    return [f"{label(it, max_fields)}-{i}" for i, it in enumerate(items)]
