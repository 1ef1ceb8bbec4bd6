"""NeuroConv conversion specifications as item sources: one item per session.

    items:
      neuroconv: conversion.yml        # a NeuroConv YAML conversion specification
      experiments: [ymaze]             # optional filters
      sessions: [sess-01]
      spec_dir: .corral/neuroconv      # optional: where the single-session specs are written
      embed: false                     # true: also give each item its spec as JSON (field spec_json)

NeuroConv's file has a global ``metadata`` and ``conversion_options``, ``data_interfaces`` (name ->
interface class), and ``experiments``, each with its own ``metadata`` and a list of ``sessions``
(``source_data``, ``metadata``, ``conversion_options``, ``nwbfile_name``). For every session corral
writes a specification of its own, with one experiment and that one session, in which

- ``metadata`` is merged the way NeuroConv merges it (global -> experiment -> session, with
  NeuroConv's deep update: nested mappings merge, lists append, list entries with the same
  ``name`` merge);
- ``conversion_options`` are resolved the way NeuroConv resolves them (the global block applies to
  every interface of the session, the session's per-interface block wins);
- ``nwbfile_name`` is always set, so the output file's name is known before the conversion runs;
- ``upload_to_dandiset`` is left out: uploading is a stage of its own.

``neuroconv <spec> --data-folder-path DATA --output-folder-path OUT`` converts that session alone.
The file name carries a digest of its content, so an unchanged session keeps its task ids and a
changed one is converted again.

Item fields: ``session_id``, ``experiment``, ``nwbfile_name``, ``spec`` (path of the single-session
spec, relative to the workflow's folder when under it), ``subject_id`` (or empty), ``source_paths``
(the session's ``file_path``/``folder_path``/``file_paths`` values, space-separated), ``source_dir``
(their common folder, ``.`` when none), ``dandiset`` (only when the file has ``upload_to_dandiset``)
and ``spec_json`` (only with ``embed: true``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import posixpath
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from corral.errors import SpecError, did_you_mean
from corral.sources import Item, SourceContext, _check_unknown, _filter, register_source
from corral.yamlpos import Located, load_text

TOP_KEYS = ("upload_to_dandiset", "metadata", "conversion_options", "data_interfaces", "experiments")
EXPERIMENT_KEYS = ("metadata", "sessions")
SESSION_KEYS = ("metadata", "nwbfile_name", "source_data", "conversion_options")
PATH_KEYS = ("file_path", "folder_path")
DEFAULT_SPEC_DIR = ".corral/neuroconv"


# -- reading the conversion specification ------------------------------------------------------
def load_conversion_spec(path: Path) -> Located:
    """The conversion specification as data (YAML 1.2: timestamps and ids kept as text, merge keys) plus
    positions for errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"no such NeuroConv specification: {path}", "check the path (relative to the workflow file)") from None
    except IsADirectoryError:
        raise SpecError(f"{path} is a folder", "give the path of a NeuroConv .yml conversion specification") from None
    except UnicodeDecodeError:
        raise SpecError("the file is not UTF-8 text", "save the specification as UTF-8 YAML", where=str(path)) from None
    return load_text(text, str(path))  # corral's one YAML reader; errors with file:line:col


def _expect(located: Located, path: tuple[str | int, ...], value: Any, kind: type, what: str, hint: str) -> None:
    if not isinstance(value, kind):
        got = "nothing" if value is None else type(value).__name__
        raise SpecError(f"{what} must be a {_kind_name(kind)}, got {got}", hint, where=located.where(path))


def _kind_name(kind: type) -> str:
    return {dict: "mapping", list: "list", str: "string"}.get(kind, kind.__name__)


def _unknown_keys(located: Located, path: tuple[str | int, ...], data: dict[str, Any], allowed: tuple[str, ...], what: str) -> None:
    for key in data:
        if key not in allowed:
            hint = did_you_mean(key, allowed, otherwise=f"{what} keys are", show=len(allowed))
            raise SpecError(f"unknown key {key!r} in {what}", hint, where=located.where((*path, key), key=True))


def validate_conversion_spec(located: Located) -> None:
    """Check the shape NeuroConv's schema asks for, with file:line:col, before anything runs."""
    spec = located.data
    _expect(located, (), spec, dict, "a NeuroConv conversion specification", "it starts with `experiments:`")
    _unknown_keys(located, (), spec, TOP_KEYS, "the specification's top level")
    for key in ("metadata", "conversion_options"):
        if key in spec:
            _expect(located, (key,), spec[key], dict, f"`{key}`", "write a mapping of `key: value` lines")
    interfaces = spec.get("data_interfaces")
    _expect(located, ("data_interfaces",), interfaces, dict, "`data_interfaces`",
            "map each name used in source_data to a NeuroConv interface class, e.g. `Recording: SpikeGLXRecordingInterface`")
    for name, cls in interfaces.items():
        _expect(located, ("data_interfaces", name), cls, str, f"data interface {name!r}",
                "give the interface class name, e.g. `SpikeGLXRecordingInterface`")
    if "upload_to_dandiset" in spec and not re.fullmatch(r"\d{6}", str(spec["upload_to_dandiset"])):
        raise SpecError(f"upload_to_dandiset {spec['upload_to_dandiset']!r} is not a six-digit dandiset id",
                        "quote it: upload_to_dandiset: \"000123\"", where=located.where(("upload_to_dandiset",)))
    experiments = spec.get("experiments")
    _expect(located, ("experiments",), experiments, dict, "`experiments`",
            "map each experiment name to a mapping with `sessions:`")
    if not experiments:
        raise SpecError("the specification has no experiments", "add one under `experiments:`",
                        where=located.where(("experiments",)))
    for ename, exp in experiments.items():
        ep = ("experiments", ename)
        _expect(located, ep, exp, dict, f"experiment {ename!r}", "give it `sessions:` (and optionally `metadata:`)")
        _unknown_keys(located, ep, exp, EXPERIMENT_KEYS, f"experiment {ename!r}")
        if "metadata" in exp:
            _expect(located, (*ep, "metadata"), exp["metadata"], dict, f"experiment {ename!r}'s metadata",
                    "write a mapping such as `NWBFile: {session_description: ...}`")
        if "sessions" not in exp:
            raise SpecError(f"experiment {ename!r} has no `sessions`", "add `sessions:` with one entry per session",
                            where=located.where(ep))
        _expect(located, (*ep, "sessions"), exp["sessions"], list, f"experiment {ename!r}'s sessions",
                "write one `- source_data: ...` entry per session")
        for i, sess in enumerate(exp["sessions"]):
            sp = (*ep, "sessions", i)
            _expect(located, sp, sess, dict, f"session {i} of experiment {ename!r}", "give it at least `source_data:`")
            _unknown_keys(located, sp, sess, SESSION_KEYS, "a session")
            if "source_data" not in sess:
                raise SpecError(f"session {i} of experiment {ename!r} has no `source_data`",
                                "add `source_data:` naming each interface's files", where=located.where(sp))
            for key in ("source_data", "metadata", "conversion_options"):
                if key in sess:
                    _expect(located, (*sp, key), sess[key], dict, f"`{key}` of session {i} in {ename!r}",
                            "write a mapping keyed by interface name" if key != "metadata" else "write a mapping")
            if "nwbfile_name" in sess:
                _expect(located, (*sp, "nwbfile_name"), sess["nwbfile_name"], str, "nwbfile_name", "quote the file name")
            for iname, src in sess["source_data"].items():
                if iname not in interfaces:
                    raise SpecError(
                        f"session {i} of experiment {ename!r} has source_data for {iname!r}, which is not in data_interfaces",
                        f"add `{iname}: <InterfaceClass>` under data_interfaces, or use one of: {', '.join(interfaces)}",
                        where=located.where((*sp, "source_data", iname), key=True),
                    )
                _expect(located, (*sp, "source_data", iname), src, dict, f"source_data of {iname!r}",
                        "write the interface's arguments, e.g. `file_path: session1/recording.bin`")
            for iname, opts in (sess.get("conversion_options") or {}).items():
                _expect(located, (*sp, "conversion_options", iname), opts, dict, f"conversion_options of {iname!r}",
                        "a session's conversion_options are keyed by interface name, e.g. `Recording: {stub_test: true}`")


# -- merging the way NeuroConv merges -------------------------------------------------------------
def deep_update(base: Mapping[str, Any], update: Mapping[str, Any], compare_key: str = "name") -> dict[str, Any]:
    """NeuroConv's ``dict_deep_update`` with its defaults: mappings merge, lists append without
    repeats, and a mapping in a list that has the same ``name`` as one already there merges into it."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping):
            current = out.get(key, {})
            out[key] = deep_update(current, value, compare_key) if isinstance(current, Mapping) else copy.deepcopy(dict(value))
        elif isinstance(value, list):
            current = out.get(key, [])
            for v in value:
                current = _append_replace(current, copy.deepcopy(v), compare_key)
            out[key] = current
        else:
            out[key] = copy.deepcopy(value)
    return out


def _append_replace(ls: Any, value: Any, compare_key: str) -> Any:
    if not isinstance(ls, list):
        return value
    if isinstance(value, Mapping):
        hits = [i for i, x in enumerate(ls) if isinstance(x, Mapping) and x.get(compare_key) == value.get(compare_key)]
        if hits:
            for i in hits:
                ls[i] = deep_update(ls[i], value, compare_key)
        else:
            ls.append(value)
    elif value not in ls:
        ls.append(value)
    return ls


def resolve_conversion_options(global_opts: Mapping[str, Any], session: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per interface of the session: the global options, then the session's own for that interface."""
    per_session = session.get("conversion_options") or {}
    out = {}
    for name in session["source_data"]:
        opts = {**global_opts, **(per_session.get(name) or {})}
        if opts:
            out[name] = opts
    return out


def source_paths(source_data: Mapping[str, Any]) -> list[str]:
    """The paths NeuroConv reads relative to ``--data-folder-path``, in file order."""
    return [p for p, _ in _paths(source_data)]


def _paths(source_data: Mapping[str, Any]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for args in source_data.values():
        for key, value in (args or {}).items():
            if key in PATH_KEYS and isinstance(value, str):
                out.append((value, key == "folder_path"))
            elif key == "file_paths" and isinstance(value, list):
                out.extend((str(v), False) for v in value)
    return out


def common_dir(source_data: Mapping[str, Any]) -> str:
    """The deepest folder holding everything the session reads (``.`` if none, or if a path is
    absolute or leaves the data folder): a ``folder_path`` counts whole, a file by its folder."""
    dirs = []
    for p, is_folder in _paths(source_data):
        q = posixpath.normpath(p.replace("\\", "/"))
        if q.startswith("/") or q == ".." or q.startswith("../"):
            return "."
        dirs.append(q if is_folder else posixpath.dirname(q))
    if not dirs:
        return "."
    parts: list[str] = []
    for segs in zip(*[[s for s in d.split("/") if s and s != "."] for d in dirs], strict=False):
        if len(set(segs)) != 1:
            break
        parts.append(segs[0])
    return "/".join(parts) or "."


# -- sessions ------------------------------------------------------------------------------------
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(text: str) -> str:
    return _SAFE.sub("-", text).strip("-.") or "session"


def session_specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per session: experiment, index, session_id, nwbfile_name, subject_id, and the
    single-session specification (a plain dict NeuroConv accepts)."""
    global_md = spec.get("metadata") or {}
    global_opts = spec.get("conversion_options") or {}
    interfaces = spec["data_interfaces"]
    out: list[dict[str, Any]] = []
    for ename, exp in spec["experiments"].items():
        exp_md = exp.get("metadata") or {}
        for i, sess in enumerate(exp["sessions"]):
            metadata = deep_update(deep_update(global_md, exp_md), sess.get("metadata") or {})
            nwbfile = metadata.get("NWBFile") or {}
            subject = metadata.get("Subject") or {}
            sid = str(nwbfile.get("session_id") or "")
            subject_id = str(subject.get("subject_id") or "")
            name = sess.get("nwbfile_name")
            if name:
                stem = str(name).removesuffix(".nwb")
            elif sid and subject_id:
                stem = f"sub-{_safe(subject_id)}_ses-{_safe(sid)}"
            elif sid:
                stem = _safe(sid)
            else:
                stem = f"{_safe(str(ename))}-{i + 1}"
            session_id = sid or stem
            one: dict[str, Any] = {"nwbfile_name": f"{stem}.nwb", "source_data": copy.deepcopy(sess["source_data"])}
            if metadata:
                one["metadata"] = metadata
            opts = resolve_conversion_options(global_opts, sess)
            if opts:
                one["conversion_options"] = opts
            used = {k: interfaces[k] for k in sess["source_data"]}
            single = {"data_interfaces": used, "experiments": {str(ename): {"sessions": [one]}}}
            out.append({
                "experiment": str(ename), "index": i, "session_id": session_id, "nwbfile_name": f"{stem}.nwb",
                "subject_id": subject_id, "source_paths": source_paths(sess["source_data"]),
                "source_dir": common_dir(sess["source_data"]), "spec": single,
            })
    return out


def render_spec(single: dict[str, Any], origin: str) -> str:
    header = f"# Written by corral from {origin}: one session of it, merged as NeuroConv merges. Do not edit.\n"
    return header + yaml.safe_dump(single, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".yml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shown_path(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


@register_source("neuroconv")
def neuroconv_source(spec: dict[str, Any], ctx: SourceContext) -> list[Item]:
    """One item per session of a NeuroConv YAML conversion specification (see the module doc)."""
    _check_unknown(spec, {"neuroconv", "experiments", "sessions", "spec_dir", "embed", "where"}, ctx)
    raw = spec["neuroconv"]
    if not isinstance(raw, str) or not raw.strip():
        raise ctx.error("`neuroconv` takes the path of a NeuroConv conversion specification",
                        "e.g. items: {neuroconv: conversion.yml}", "neuroconv")
    path = ctx.resolve(raw).resolve()
    try:
        located = load_conversion_spec(path)
    except SpecError as exc:
        if exc.where is None:  # missing file: point at the workflow
            raise ctx.error(exc.message, exc.hint or "", "neuroconv") from None
        raise
    validate_conversion_spec(located)
    sessions = session_specs(located.data)

    wanted_exp = _names(spec.get("experiments"), ctx, "experiments")
    if wanted_exp is not None:
        known = list(located.data["experiments"])
        _unknown_filter(wanted_exp, known, "experiment", ctx, "experiments")
        sessions = [s for s in sessions if s["experiment"] in wanted_exp]
    wanted_ses = _names(spec.get("sessions"), ctx, "sessions")
    if wanted_ses is not None:
        _unknown_filter(wanted_ses, [s["session_id"] for s in sessions], "session", ctx, "sessions")
        sessions = [s for s in sessions if s["session_id"] in wanted_ses]

    for field, what, hint in (
        ("nwbfile_name", "write", "give each session its own nwbfile_name (or session_id)"),
        ("session_id", "have session_id", "give each session its own NWBFile.session_id (tasks and folders are named by it)"),
    ):
        seen: dict[str, dict[str, Any]] = {}
        for s in sessions:
            key = s[field]
            if key in seen:
                other = seen[key]
                raise SpecError(
                    f"sessions {other['index']} of {other['experiment']!r} and {s['index']} of {s['experiment']!r} "
                    f"both {what} {key}",
                    hint,
                    where=located.where(("experiments", s["experiment"], "sessions", s["index"])),
                )
            seen[key] = s

    spec_dir = ctx.resolve(str(spec.get("spec_dir") or DEFAULT_SPEC_DIR)) / _safe(path.stem)
    embed = bool(spec.get("embed", False))
    dandiset = located.data.get("upload_to_dandiset")
    items: list[Item] = []
    for s in sessions:
        text = render_spec(s["spec"], path.name)
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        file = spec_dir / f"{_safe(s['experiment'])}__{_safe(s['nwbfile_name'].removesuffix('.nwb'))}.{digest}.yml"
        _write_if_changed(file, text)
        item: Item = {
            "session_id": s["session_id"],
            "experiment": s["experiment"],
            "nwbfile_name": s["nwbfile_name"],
            "spec": _shown_path(file, ctx.base_dir.resolve()),
            "subject_id": s["subject_id"],
            "source_paths": " ".join(s["source_paths"]),
            "source_dir": s["source_dir"],
        }
        if dandiset is not None:
            item["dandiset"] = str(dandiset)
        if embed:
            item["spec_json"] = json.dumps(s["spec"], separators=(",", ":"), sort_keys=True)
        items.append(item)
    return _filter(items, spec.get("where"), ctx)


def _names(value: Any, ctx: SourceContext, key: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, int)):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
        raise ctx.error(f"`{key}` takes a list of names", f"e.g. {key}: [a, b]", key)
    return [str(v) for v in value]


def _unknown_filter(wanted: list[str], known: list[str], what: str, ctx: SourceContext, key: str) -> None:
    for w in wanted:
        if w not in known:
            hint = did_you_mean(w, known, quote=repr, otherwise=f"{what}s are")
            raise ctx.error(f"no {what} {w!r} in the NeuroConv specification", hint, key)
