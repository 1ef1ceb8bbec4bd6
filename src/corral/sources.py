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
import datetime as dt
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
from corral.yamlpos import YamlFloat

Item = dict[str, Any]
SourceFn = Callable[[dict[str, Any], "SourceContext"], list[Item]]

SOURCES: dict[str, SourceFn] = {}
_PLUGIN_MODULES = ("corral.recipes.bids", "corral.recipes.neuroconv")
FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A CSV/TSV cell may be this long (Python's csv module stops at 128 KiB by default); an item value
# becomes a command argument and an environment variable, which Linux caps at 128 KiB each.
MAX_FIELD_CHARS = 1 << 20
MAX_VALUE_BYTES = 127 * 1024  # MAX_ARG_STRLEN (128 KiB, with the variable's name and a NUL) less a margin


@dataclass
class SourceContext:
    base_dir: Path
    where: Callable[..., str]  # where(*path) -> "file:line:col", path relative to the workflow root
    path: tuple[str | int, ...] = ("items",)
    # where item i was written ("file:line"); set by the source that made the items
    item_where: Callable[[int], str] | None = None

    def where_item(self, i: int) -> str:
        if self.item_where is not None:
            return self.item_where(i)
        return f"{self.where(*self.path)} (item {i + 1})"

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
        return normalise_items(_inline(spec, ctx), ctx)
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
    return normalise_items(items, ctx)


def normalise_value(v: Any) -> Any:
    """An item value as text or a whole number, the same on every machine and in the manifest:
    a YAML float keeps its text (``1.10``), booleans are ``true``/``false``, dates their ISO text.
    Raises ValueError for what cannot be a value (null, NUL, a mapping or list)."""
    if isinstance(v, str):
        if "\x00" in v:
            raise ValueError("holds a NUL character (\\0), which no command or environment can carry")
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return v
    if isinstance(v, YamlFloat):
        return v.text
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (dt.date, dt.time)):  # a date or time from the Python API (YAML 1.2 has none)
        return v.isoformat()
    if v is None:
        raise ValueError("has no value (null)")
    raise ValueError(f"is a {type(v).__name__}; item fields are plain values (text or numbers)")


def normalise_items(items: list[Item], ctx: SourceContext) -> list[Item]:
    """Check each item's field names and values; values as :func:`normalise_value` gives them."""
    valid: set[str] = set()  # field names already checked (most items share theirs)
    for i, it in enumerate(items):
        for k, v in it.items():
            if k in valid:
                pass
            elif isinstance(k, str) and FIELD_RE.match(k):
                valid.add(k)
            else:
                raise SpecError(
                    f"items: item {i + 1} has field {k!r}, which is not a valid name",
                    "field names are letters, digits and _ (they become {placeholders} and env vars)",
                    where=ctx.where_item(i),
                )
            if type(v) is str and "\x00" not in v and len(v) <= 32_768 or type(v) is int:
                continue
            if type(v) is str and "\x00" not in v:
                size = len(v.encode("utf-8", "surrogatepass"))
                if size > MAX_VALUE_BYTES:
                    raise SpecError(
                        f"items: field {k!r} of item {i + 1} is {size // 1024} KiB long; an item value may be at most "
                        f"{MAX_VALUE_BYTES // 1024} KiB (Linux's limit for one argument or environment variable)",
                        "put long values in a file and give its path as the field", where=ctx.where_item(i))
                continue
            try:
                it[k] = normalise_value(v)
            except ValueError as exc:
                hint = ("write '' for an empty value, or give the field a value" if v is None else
                        "remove the NUL byte" if isinstance(v, str) else "write the value as text")
                raise SpecError(f"items: field {k!r} of item {i + 1} {exc}", hint, where=ctx.where_item(i)) from None
    return items


def _inline(spec: list[Any], ctx: SourceContext) -> list[Item]:
    out: list[Item] = []
    valid: set[str] = set()
    for i, it in enumerate(spec):
        if isinstance(it, (str, int, float)) and not isinstance(it, bool):
            out.append({"item": it})
            continue
        if not isinstance(it, dict) or not it:
            raise ctx.error(f"item {i} must be a mapping of fields", "write e.g. `- {session: s1, n: 3}`", i)
        for k, v in it.items():
            if type(v) is str and k in valid:
                continue
            if isinstance(k, str) and FIELD_RE.match(k):
                valid.add(k)
            else:
                raise ctx.error(
                    f"field name {k!r} is not valid", "use letters, digits and _ (e.g. session_id)", i
                )
            if isinstance(v, (dict, list)):
                raise ctx.error(
                    f"field {k!r} of item {i} is a {type(v).__name__}; fields are plain values",
                    "flatten it into several fields",
                    i,
                    k,
                )
            if v is None or type(v) is not str and type(v) is not int:
                try:
                    normalise_value(v)
                except ValueError as exc:
                    hint = "write '' for an empty value, or give the field a value" if v is None else "write it as text"
                    raise ctx.error(f"field {k!r} of item {i} {exc}", hint, i, k) from None
        out.append(dict(it))
    base = ctx.path
    ctx.item_where = lambda i: ctx.where(*base, i)
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
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\"\r\n":
        raise ctx.error(f"delimiter {delimiter!r} is not one character", "write e.g. delimiter: \";\"", "delimiter")
    if path.is_dir():
        raise ctx.error(f"{path} is a folder, not a table", "give the path of a .csv or .tsv file", "table")
    limit = csv.field_size_limit()
    rows: list[Item] = []
    lines: list[int] = []
    lineno = 1
    try:
        csv.field_size_limit(MAX_FIELD_CHARS)
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            if not header:
                raise ctx.error(f"{path} has no header line", "put the field names on the first line", "table")
            names = [h.strip() for h in header]
            seen: dict[str, int] = {}
            for col, name in enumerate(names, start=1):
                if name in seen:
                    raise SpecError(
                        f"the header names column {name!r} twice (columns {seen[name]} and {col})",
                        "give each column its own name", where=f"{path}:1")
                seen[name] = col
            width = len(names)
            for row in reader:
                lineno = reader.line_num
                if len(row) > width:
                    raise SpecError(
                        f"line has more cells than the header has names ({width})",
                        "check the delimiter and quoting of that line",
                        where=f"{path}:{lineno}",
                    )
                if not any(v.strip() for v in row):
                    continue
                if len(row) < width:
                    row += [""] * (width - len(row))
                rows.append(dict(zip(names, row, strict=True)))
                lines.append(lineno)
    except FileNotFoundError:
        raise ctx.error(f"no such table file: {path}", "check the path (relative to the workflow file)", "table") from None
    except UnicodeDecodeError:
        raise ctx.error(f"{path} is not UTF-8 text", "save the table as UTF-8 CSV/TSV", "table") from None
    except csv.Error as exc:
        text = str(exc)
        hint = ("a cell may hold at most 1 MiB" if "field larger" in text else
                "remove NUL bytes from the table" if "NUL" in text else "check the quoting of that line")
        raise SpecError(f"cannot read the table: {text}", hint, where=f"{path}:{lineno + 1}") from None
    except OSError as exc:
        raise ctx.error(f"cannot read {path}: {exc.strerror}", "check the file's permissions", "table") from None
    finally:
        csv.field_size_limit(limit)
    kept = _filter_indices(rows, spec.get("where"), ctx)
    ctx.item_where = lambda i: f"{path}:{lines[kept[i]]}"
    return [rows[i] for i in kept]


def _filter_indices(rows: list[Item], where: Any, ctx: SourceContext) -> list[int]:
    """``where: {field: value | [values]}``: the indices of the rows that match."""
    if not where:
        return list(range(len(rows)))
    if not isinstance(where, dict):
        raise ctx.error("`where` must map field names to a value or a list of values",
                        "e.g. where: {subject: [\"01\", \"02\"]}", "where")
    try:
        wanted = {k: {str(normalise_value(x)) if x is not None else "" for x in (v if isinstance(v, list) else [v])}
                  for k, v in where.items()}
    except ValueError as exc:
        raise ctx.error(f"a `where` value {exc}", "write the values to keep as text or numbers", "where") from None
    return [i for i, r in enumerate(rows) if all(str(r.get(k, "")) in w for k, w in wanted.items())]


def _filter(rows: list[Item], where: Any, ctx: SourceContext) -> list[Item]:
    """``where: {field: value | [values]}`` keeps matching rows."""
    return [rows[i] for i in _filter_indices(rows, where, ctx)]


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
