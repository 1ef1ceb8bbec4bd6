"""NeuroConv conversion specifications as item sources: one item per session.

    items:
      neuroconv: conversion.yml        # a NeuroConv YAML conversion specification
      experiments: [ymaze]             # optional filters
      sessions: [sess-01]
      dandiset: "000123"               # optional: the sessions will be uploaded there (default:
                                       # the file's upload_to_dandiset); checks DANDI names
      sidecars: true                   # fetch a named file's siblings of the same stem (x.meta
                                       # beside x.bin); false: exactly the named files

NeuroConv's file has a global ``metadata`` and ``conversion_options``, ``data_interfaces`` (name ->
interface class), and ``experiments``, each with its own ``metadata`` and a list of ``sessions``
(``source_data``, ``metadata``, ``conversion_options``, ``nwbfile_name``). For every session corral
makes a specification of its own, with one experiment and that one session, in which

- ``metadata`` is merged the way NeuroConv merges it (global -> experiment -> session, with
  NeuroConv's deep update: nested mappings merge, lists append, list entries with the same
  ``name`` merge);
- ``conversion_options`` are resolved the way NeuroConv 0.10.2 resolves them (the global block
  applies to every interface of the session, the session's per-interface block wins), so the
  single spec has no global block whose precedence older NeuroConv versions read otherwise;
- ``nwbfile_name`` is always set, so the output file's name is known before the conversion runs:
  the session's own, else NeuroConv's ``sub-<subject>_ses-<session>`` rule, else a name made from
  the session's source files (never from its position in the list);
- keys NeuroConv's schema lets through at experiment and session level are kept as written;
- ``upload_to_dandiset`` is left out: uploading is a stage of its own.

Nothing is written when the plan is made: each item carries its spec as JSON (``spec_json``), and
the convert command writes it to the file named by ``spec`` (``printf '%s' "$spec_json" > ...``).
An unchanged session keeps its task ids; a changed one is converted again.

Before anything runs, the whole file is checked with NeuroConv's own JSON schemas (the
specification schema, each interface's source schema, the base metadata schema on each session's
merged metadata) when NeuroConv is installed; else only its shape is checked, and corral says so
once. Errors name ``conversion.yml:line:col`` of the offending key or value.

Item fields: ``session_id``, ``experiment``, ``nwbfile_name``, ``stem`` (the file name without
``.nwb``: unique, for folder names), ``spec`` (a file name for the single-session spec),
``spec_json``, ``subject_id`` (or empty), ``source_paths`` (a JSON list of the session's
``file_path``/``folder_path``/``file_paths`` values), ``source_dir`` (their common folder, ``.``
when none), ``source_filter`` (an rclone filter pattern, relative to ``source_dir``, matching the
session's files: ``filters: ["+ {source_filter}", "- *"]``), and with a dandiset ``dandiset`` and
``dandi_path`` (``sub-<subject>/sub-<subject>_ses-<session>[_desc-<name>].nwb``, as
``dandi organize`` lays files out).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from corral.errors import SpecError, did_you_mean
from corral.notes import say_once
from corral.sources import Item, SourceContext, _check_unknown, _filter, register_source
from corral.yamlpos import Located, load_text

TOP_KEYS = ("upload_to_dandiset", "metadata", "conversion_options", "data_interfaces", "experiments")
EXPERIMENT_KEYS = ("metadata", "sessions")
SESSION_KEYS = ("metadata", "nwbfile_name", "source_data", "conversion_options")
PATH_KEYS = ("file_path", "folder_path")
NEUROCONV_FLOOR = (0, 10, 2)  # the NeuroConv whose reading of a single-session spec corral matches


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
    names: dict[type, str] = {dict: "mapping", list: "list", str: "string"}
    return names.get(kind, kind.__name__)


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
        # NeuroConv's schema lets other keys through at experiment and session level (and ignores
        # them): so does corral, which keeps them in the single-session spec as written.
        if "metadata" in exp:
            _expect(located, (*ep, "metadata"), exp["metadata"], dict, f"experiment {ename!r}'s metadata",
                    "write a mapping such as `NWBFile: {session_description: ...}`")
        if "sessions" not in exp:
            close = [k for k in exp if difflib.get_close_matches(str(k), ["sessions"], n=1)]
            hint = (f"`{close[0]}` is not `sessions`: rename it" if close
                    else "add `sessions:` with one entry per session")
            raise SpecError(f"experiment {ename!r} has no `sessions`", hint,
                            where=located.where((*ep, close[0]) if close else ep, key=bool(close)))
        _expect(located, (*ep, "sessions"), exp["sessions"], list, f"experiment {ename!r}'s sessions",
                "write one `- source_data: ...` entry per session")
        for i, sess in enumerate(exp["sessions"]):
            sp = (*ep, "sessions", i)
            _expect(located, sp, sess, dict, f"session {i} of experiment {ename!r}", "give it at least `source_data:`")
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


# -- what a session fetches --------------------------------------------------------------------
def source_filter(source_data: Mapping[str, Any], base: str = ".", *, sidecars: bool = True) -> str:
    """One rclone filter pattern (a ``{{regexp}}``, relative to ``base``) matching exactly the
    session's files: each ``folder_path`` whole, each named file (with ``sidecars``, also its
    siblings of the same stem: ``x.meta`` beside ``x.bin``, ``x.xml`` beside ``x.dat``). Paths with
    spaces, commas or braces are matched literally. Empty when the session names no paths."""
    prefix = "" if base in (".", "") else base.rstrip("/") + "/"
    alternatives: list[str] = []
    for p, is_folder in _paths(source_data):
        q = posixpath.normpath(p.replace("\\", "/"))
        if prefix and q.startswith(prefix):
            q = q[len(prefix):]
        if is_folder:
            alternatives.append(re.escape(q.rstrip("/")) + "/.*")
            continue
        folder, name = posixpath.split(q)
        stem = name.rsplit(".", 1)[0] if sidecars else ""
        lead = re.escape(folder + "/") if folder else ""
        if sidecars and stem:
            alternatives.append(lead + re.escape(stem) + r"(\.[^/]*)?")
        else:
            alternatives.append(lead + re.escape(name))
    if not alternatives:
        return ""
    unique = list(dict.fromkeys(alternatives))
    return "/{{(" + "|".join(unique) + ")}}"


# -- sessions ------------------------------------------------------------------------------------
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(text: str) -> str:
    return _SAFE.sub("-", text).strip("-.") or "session"


def _digest(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def session_stem(nwbfile_name: Any, session_id: str, subject_id: str, experiment: str,
                 source_data: Mapping[str, Any]) -> str:
    """The output file's name without ``.nwb``, never from the session's place in the list:

    - the session's ``nwbfile_name`` (NeuroConv 0.10.2 removes one trailing ``.nwb``);
    - else NeuroConv's rule for unnamed sessions (its files are renamed as ``dandi organize``
      names them): ``sub-<subject>_ses-<session>``, or the session id alone without a subject;
    - else, with no ``session_id``, the experiment and a digest of the session's ``source_data``
      (``sub-<subject>_`` first when there is a subject): the same session keeps its name when
      others are added, removed or reordered.
    """
    if nwbfile_name:
        return str(nwbfile_name).removesuffix(".nwb")
    if session_id and subject_id:
        return f"sub-{_safe(subject_id)}_ses-{_safe(session_id)}"
    if session_id:
        return _safe(session_id)
    tail = f"{_safe(experiment)}-{_digest(source_data)}"
    return f"sub-{_safe(subject_id)}_{tail}" if subject_id else tail


def session_specs(spec: dict[str, Any], *, sidecars: bool = True) -> list[dict[str, Any]]:
    """One record per session: experiment, index, session_id, nwbfile_name, subject_id, the merged
    metadata, and the single-session specification (a plain dict NeuroConv accepts)."""
    global_md = spec.get("metadata") or {}
    global_opts = spec.get("conversion_options") or {}
    interfaces = spec["data_interfaces"]
    out: list[dict[str, Any]] = []
    for ename, exp in spec["experiments"].items():
        exp_md = exp.get("metadata") or {}
        exp_extra = {k: copy.deepcopy(v) for k, v in exp.items() if k not in EXPERIMENT_KEYS}
        for i, sess in enumerate(exp["sessions"]):
            metadata = deep_update(deep_update(global_md, exp_md), sess.get("metadata") or {})
            nwbfile = metadata.get("NWBFile") or {}
            subject = metadata.get("Subject") or {}
            sid = "" if nwbfile.get("session_id") is None else str(nwbfile["session_id"])
            subject_id = "" if subject.get("subject_id") is None else str(subject["subject_id"])
            stem = session_stem(sess.get("nwbfile_name"), sid, subject_id, str(ename), sess["source_data"])
            one: dict[str, Any] = {"nwbfile_name": f"{stem}.nwb", "source_data": copy.deepcopy(sess["source_data"])}
            if metadata:
                one["metadata"] = metadata
            opts = resolve_conversion_options(global_opts, sess)
            if opts:
                one["conversion_options"] = opts
            one.update({k: copy.deepcopy(v) for k, v in sess.items() if k not in SESSION_KEYS})
            used = {k: interfaces[k] for k in sess["source_data"]}
            single = {"data_interfaces": used, "experiments": {str(ename): {**exp_extra, "sessions": [one]}}}
            base = common_dir(sess["source_data"])
            out.append({
                "experiment": str(ename), "index": i, "session_id": sid or stem, "has_session_id": bool(sid),
                "named": bool(sess.get("nwbfile_name")),
                "nwbfile_name": f"{stem}.nwb", "stem": stem, "subject_id": subject_id, "metadata": metadata,
                "source_paths": source_paths(sess["source_data"]), "source_dir": base,
                "source_filter": source_filter(sess["source_data"], base, sidecars=sidecars), "spec": single,
            })
    return out


# The convert command's first step: refuse a NeuroConv that reads the single-session spec otherwise
# (before 0.10.2: global conversion_options won over the session's, and `.strip(".nwb")` cut
# letters off file names: brain_run -> rain_ru.nwb).
VERSION_GUARD = (
    "python -c \"import importlib.metadata as m, re, sys; v = m.version('neuroconv'); "
    "sys.exit(None if tuple(map(int, re.findall(r'\\d+', v)[:3])) >= (0, 10, 2) else "
    "'corral: NeuroConv ' + v + ' reads this spec differently; use NeuroConv >= 0.10.2')\""
)


def render_spec(single: dict[str, Any], origin: str) -> str:
    """The single-session spec as YAML (for people reading it; the items carry it as JSON)."""
    header = f"# Written by corral from {origin}: one session of it, merged as NeuroConv merges. Do not edit.\n"
    return header + yaml.safe_dump(single, sort_keys=False, default_flow_style=False, allow_unicode=True)


# -- DANDI names -----------------------------------------------------------------------------------
_DANDI_UNSAFE = re.compile(r"[_*\\/<>:|\"'?%@;,\s.]")  # dandi organize's _sanitize_value, with "."


def dandi_label(value: str) -> str:
    """A label as ``dandi organize`` writes it in a file name (its rule: these characters become ``-``)."""
    return _DANDI_UNSAFE.sub("-", value)


_LABEL = r"[^_*\\/<>:|\"'?%@;.]+"
_ORGANIZED = re.compile(  # dandi's ORGANIZED_FILENAME_REGEX (dandi/organize.py), without .nwb
    rf"sub-(?P<sub>{_LABEL})(_ses-(?P<ses>{_LABEL}))?(_(tis|slice|cell|desc|probe|obj)-{_LABEL})*(_[a-z]+(\+[a-z]+)*)?"
)


def dandi_path(s: dict[str, Any]) -> str:
    """Where a session's file goes in the dandiset, as ``dandi organize`` lays files out, from the
    session alone (no other session changes it):

    - an ``nwbfile_name`` already named the DANDI way for this subject and session is kept
      (``sub-m01_ses-1_ecephys.nwb``: the usual split into ``_ecephys`` and ``_behavior`` files);
    - else ``sub-<subject>/sub-<subject>_ses-<session>.nwb``, with ``_desc-<nwbfile_name>`` when the
      session names its file (so two files of one session stay apart).
    """
    sub, ses = dandi_label(s["subject_id"]), dandi_label(s["session_id"])
    m = _ORGANIZED.fullmatch(s["stem"]) if s.get("named") else None
    if m and m.group("sub") == sub and m.group("ses") in (None, ses):
        return f"sub-{sub}/{s['stem']}.nwb"
    name = f"sub-{sub}_ses-{ses}"
    if s.get("named"):
        name += f"_desc-{dandi_label(s['stem'])}"
    return f"sub-{sub}/{name}.nwb"


def _session_where(located: Located, s: dict[str, Any]) -> str:
    return located.where(("experiments", s["experiment"], "sessions", s["index"]))


def _session_name(s: dict[str, Any]) -> str:
    return f"session {s['index']} of {s['experiment']!r} ({s['nwbfile_name']})"


def check_uploads(located: Located, sessions: list[dict[str, Any]]) -> list[str]:
    """Refuse, before anything runs, what DANDI would refuse or overwrite; the dandi paths."""
    for s in sessions:
        if not s["has_session_id"]:
            raise SpecError(
                f"{_session_name(s)} has no NWBFile.session_id, and its file is to be uploaded to DANDI",
                "give it `metadata: {NWBFile: {session_id: ...}}` (NeuroConv refuses uploads without one)",
                where=_session_where(located, s),
            )
        if not s["subject_id"]:
            raise SpecError(
                f"{_session_name(s)} has no Subject.subject_id, and DANDI files are named by subject",
                "give it `metadata: {Subject: {subject_id: ...}}` (or at experiment or top level)",
                where=_session_where(located, s),
            )
    paths = [dandi_path(s) for s in sessions]
    seen: dict[str, dict[str, Any]] = {}
    for s, path in zip(sessions, paths, strict=True):
        if path in seen:
            other = seen[path]
            raise SpecError(
                f"{_session_name(other)} ({_session_where(located, other)}) and {_session_name(s)} would both be "
                f"uploaded to DANDI as {path}",
                "give them distinct NWBFile.session_id (or Subject.subject_id) values, or nwbfile_name values that "
                "differ in more than punctuation",
                where=_session_where(located, s),
            )
        seen[path] = s
    return paths




@register_source("neuroconv")
def neuroconv_source(spec: dict[str, Any], ctx: SourceContext) -> list[Item]:
    """One item per session of a NeuroConv YAML conversion specification (see the module doc)."""
    _check_unknown(spec, {"neuroconv", "experiments", "sessions", "dandiset", "sidecars", "embed", "spec_dir",
                          "where"}, ctx)
    raw = spec["neuroconv"]
    if not isinstance(raw, str) or not raw.strip():
        raise ctx.error("`neuroconv` takes the path of a NeuroConv conversion specification",
                        "e.g. items: {neuroconv: conversion.yml}", "neuroconv")
    if "spec_dir" in spec:
        raise ctx.error("`spec_dir` is gone: planning writes no files",
                        "remove it; each item carries its spec as JSON (spec_json): write it in the command, "
                        "e.g. printf '%s' \"$spec_json\" > specs/{spec}", "spec_dir")
    sidecars = spec.get("sidecars", True)
    if not isinstance(sidecars, bool):
        raise ctx.error("`sidecars` is true or false", "false fetches exactly the files the session names", "sidecars")
    wanted_dandiset = spec.get("dandiset")
    if wanted_dandiset is not None and not re.fullmatch(r"\d{6}", str(wanted_dandiset)):
        raise ctx.error(f"dandiset {wanted_dandiset!r} is not a six-digit dandiset id", 'quote it: dandiset: "000123"',
                        "dandiset")
    path = ctx.resolve(raw).resolve()
    try:
        located = load_conversion_spec(path)
    except SpecError as exc:
        if exc.where is None:  # missing file: point at the workflow
            raise ctx.error(exc.message, exc.hint or "", "neuroconv") from None
        raise
    validate_conversion_spec(located)
    sessions = session_specs(located.data, sidecars=sidecars)

    from corral.recipes import neuroconv_check

    note = neuroconv_check.check(located, sessions)
    if note:
        say_once(note)

    seen: dict[str, dict[str, Any]] = {}
    for s in sessions:  # NeuroConv writes every file of a specification into one output folder
        if s["nwbfile_name"] in seen:
            other = seen[s["nwbfile_name"]]
            raise SpecError(
                f"{_session_name(other)} ({_session_where(located, other)}) and session {s['index']} of "
                f"{s['experiment']!r} both write {s['nwbfile_name']}",
                "give each session its own nwbfile_name (or NWBFile.session_id)",
                where=_session_where(located, s),
            )
        seen[s["nwbfile_name"]] = s

    dandiset = wanted_dandiset if wanted_dandiset is not None else located.data.get("upload_to_dandiset")
    if dandiset is not None:  # every session of the file: a filter changes no name
        for s, dpath in zip(sessions, check_uploads(located, sessions), strict=True):
            s["dandi_path"] = dpath

    wanted_exp = _names(spec.get("experiments"), ctx, "experiments")
    if wanted_exp is not None:
        known = list(located.data["experiments"])
        _unknown_filter(wanted_exp, known, "experiment", ctx, "experiments")
        sessions = [s for s in sessions if s["experiment"] in wanted_exp]
    wanted_ses = _names(spec.get("sessions"), ctx, "sessions")
    if wanted_ses is not None:
        _unknown_filter(wanted_ses, [s["session_id"] for s in sessions], "session", ctx, "sessions")
        sessions = [s for s in sessions if s["session_id"] in wanted_ses]

    items: list[Item] = []
    for s in sessions:
        item: Item = {
            "session_id": s["session_id"],
            "experiment": s["experiment"],
            "nwbfile_name": s["nwbfile_name"],
            "stem": s["stem"],
            "spec": f"{_safe(s['stem'])}-{_digest([s['experiment'], s['stem']], 6)}.json",
            "subject_id": s["subject_id"],
            "source_paths": json.dumps(s["source_paths"], ensure_ascii=False),
            "source_dir": s["source_dir"],
            "source_filter": s["source_filter"],
            "spec_json": json.dumps(s["spec"], separators=(",", ":"), sort_keys=True, ensure_ascii=False),
        }
        if dandiset is not None:
            item["dandiset"] = str(dandiset)
            item["dandi_path"] = s["dandi_path"]
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
