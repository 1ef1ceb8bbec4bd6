"""A NeuroConv conversion specification checked with NeuroConv's own schemas, before anything runs.

When NeuroConv is importable on the machine that plans the run, corral checks, as
``neuroconv.tools.yaml_conversion_specification.run_conversion_from_yaml`` does first:

- the whole file against NeuroConv's ``yaml_conversion_specification_schema.json`` (with its
  ``metadata_schema.json`` in the registry, as NeuroConv builds it): unknown keys in
  ``NWBFile``, ``sex`` outside M/F/U/O, numbers where text is wanted, a metadata block without
  ``NWBFile``;
- each interface class named in ``data_interfaces`` exists in ``neuroconv.datainterfaces``, and
  each session's ``source_data`` for it validates against the class's ``get_source_schema()``;
- each session's merged metadata against NeuroConv's ``base_metadata_schema.json`` (what
  ``NWBConverter.validate_metadata`` starts from), with ``NWBFile``'s required keys left to the
  conversion, as the interfaces may read them (``session_start_time``) from the data.

What needs the data itself (the interfaces' own metadata schemas, conversion options) is checked
by NeuroConv when the convert task runs. Errors name ``file:line:col`` in the user's file.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import re
from functools import cache
from pathlib import Path
from typing import Any

from corral.errors import SpecError
from corral.yamlpos import Located

FLOOR = (0, 10, 2)  # corral.recipes.neuroconv.NEUROCONV_FLOOR
NOT_CHECKED = (
    "NeuroConv is not installed here, so {n} session(s) of {file} were checked for shape only: their metadata "
    "(NWBFile, Subject) and source_data were not checked against NeuroConv's schemas, and will be when each "
    "convert task runs (pip install 'corral[neuroconv]' to check them before anything runs)"
)


def neuroconv_version() -> tuple[int, ...] | None:
    """The installed NeuroConv's version as numbers (None: not installed)."""
    try:
        text = importlib.metadata.version("neuroconv")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts: list[int] = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _importable() -> bool:
    if neuroconv_version() is None:
        return False
    try:
        importlib.import_module("neuroconv")
    except ImportError:
        return False
    return True


@cache
def _schemas() -> tuple[Any, Any, dict[str, Any]]:
    """(spec validator, base metadata validator, base schema): NeuroConv's files, loaded by NeuroConv."""
    import neuroconv
    from jsonschema import Draft7Validator
    from neuroconv.utils import load_dict_from_file
    from referencing import Registry, Resource

    folder = Path(neuroconv.__file__).parent / "schemas"
    spec_schema = load_dict_from_file(folder / "yaml_conversion_specification_schema.json")
    metadata_schema = load_dict_from_file(folder / "metadata_schema.json")
    registry = Registry().with_resource("metadata_schema.json", Resource.from_contents(metadata_schema))
    base = load_dict_from_file(folder / "base_metadata_schema.json")
    base["properties"]["NWBFile"].pop("required", None)  # as NeuroConv does when the data may fill them
    return Draft7Validator(spec_schema, registry=registry), Draft7Validator(base), base


def check(located: Located, sessions: list[dict[str, Any]]) -> str | None:
    """Raise SpecError on the first problem (in file order); a note when NeuroConv is not here."""
    if not _importable():
        return NOT_CHECKED.format(n=len(sessions), file=Path(located.source).name)
    version = neuroconv_version() or ()
    note = None
    if version < FLOOR:
        note = (f"NeuroConv {'.'.join(map(str, version))} is installed here, older than "
                f"{'.'.join(map(str, FLOOR))}: {Path(located.source).name} was checked with its schemas, but the "
                "starter's convert stage refuses it (pip install -U 'corral[neuroconv]')")
    spec_validator, metadata_validator, _ = _schemas()
    errors = sorted(spec_validator.iter_errors(located.data),
                    key=lambda e: (_line(located, tuple(e.absolute_path)), _specific_first(e)))
    if errors:
        raise _error(located, errors[0], tuple(errors[0].absolute_path), len(errors))
    _check_interfaces(located, sessions)
    for s in sessions:
        found = list(metadata_validator.iter_errors(_as_json(s["metadata"])))
        if found:
            err = found[0]
            raise _error(located, err, _metadata_origin(located, s, tuple(err.absolute_path)), len(found),
                         merged=True)
    return note


def _as_json(obj: Any) -> Any:
    import json

    try:  # as NeuroConv's validate_metadata sees it (its encoder is private: other versions may lack it)
        from neuroconv.utils.json_schema import _NWBMetaDataEncoder
    except ImportError:
        return json.loads(json.dumps(obj, default=str))
    return json.loads(_NWBMetaDataEncoder().encode(obj))


def _check_interfaces(located: Located, sessions: list[dict[str, Any]]) -> None:
    from jsonschema import Draft7Validator

    module = importlib.import_module("neuroconv.datainterfaces")
    known = sorted(n for n in dir(module) if n.endswith("Interface"))
    classes: dict[str, Any] = {}
    for name, cls_name in located.data["data_interfaces"].items():
        try:
            cls = getattr(module, cls_name, None)
        except ImportError as exc:  # a lazily imported interface whose dependencies are missing here
            from corral.notes import say_once

            say_once(f"could not import NeuroConv's {cls_name} here ({exc}); its source_data is checked when "
                     "the task runs")
            continue
        if cls is None:
            close = difflib.get_close_matches(cls_name, known, n=1)
            raise SpecError(
                f"NeuroConv has no data interface {cls_name!r}",
                f"did you mean {close[0]}?" if close else "see neuroconv.datainterfaces for the class names",
                where=located.where(("data_interfaces", name)),
            )
        classes[name] = cls
    validators: dict[str, Any] = {}
    for s in sessions:
        base = ("experiments", s["experiment"], "sessions", s["index"], "source_data")
        for name, args in located.data["experiments"][s["experiment"]]["sessions"][s["index"]]["source_data"].items():
            if name not in classes:
                continue
            if name not in validators:
                try:
                    validators[name] = Draft7Validator(classes[name].get_source_schema())
                except Exception as exc:  # noqa: BLE001 - an interface whose optional dependencies are missing
                    from corral.notes import say_once

                    say_once(f"could not read the source schema of {classes[name].__name__} here "
                             f"({type(exc).__name__}: {exc}); its source_data is checked when the task runs")
                    validators[name] = None
            if validators[name] is None:
                continue
            found = sorted(validators[name].iter_errors(_as_json(args)), key=_specific_first)
            if found:
                err = found[0]
                raise _error(located, err, (*base, name, *err.absolute_path), len(found),
                             what=f"source_data of {name!r} ({located.data['data_interfaces'][name]})")


def _specific_first(err: Any) -> tuple[Any, ...]:
    """An unknown key before the missing key it was probably meant to be (file_pth / file_path)."""
    return (list(map(str, err.absolute_path)), 0 if err.validator == "additionalProperties" else 1)


def _metadata_origin(located: Located, s: dict[str, Any], path: tuple[Any, ...]) -> tuple[Any, ...]:
    """Where in the file a merged-metadata value was written: the session's block, else the
    experiment's, else the top level's (the most specific one that has it wins the merge)."""
    exp = ("experiments", s["experiment"])
    for block in ((*exp, "sessions", s["index"], "metadata"), (*exp, "metadata"), ("metadata",)):
        node: Any = located.data
        ok = True
        for part in (*block, *path):
            if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) \
                    and part < len(node):
                node = node[part]
            else:
                ok = False
                break
        if ok:
            return (*block, *path)
    return (*exp, "sessions", s["index"])


def _line(located: Located, path: tuple[Any, ...]) -> tuple[int, int]:
    where = located.where(path)
    parts = where.rsplit(":", 2)
    try:
        return int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        return 0, 0


def _raw_text(located: Located, path: tuple[Any, ...]) -> str | None:
    """The value as written in the file (``007``), for a hint."""
    try:
        line, col = _line(located, path)
        text = Path(located.source).read_text(encoding="utf-8").splitlines()[line - 1][col - 1:]
    except (OSError, IndexError, UnicodeDecodeError):
        return None
    m = re.match(r"[^\s,}\]#]+", text)  # a number or true/false as written: up to a separator
    return m.group(0) if m else None


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _error(located: Located, err: Any, path: tuple[Any, ...], count: int, *, what: str = "",
           merged: bool = False) -> SpecError:
    more = f" (and {count - 1} more problem(s) NeuroConv's schema finds)" if count > 1 else ""
    field = str(path[-1]) if path else ""
    validator = err.validator
    label = what or _dotted(path[-2:] if len(path) >= 2 else path)
    if validator == "additionalProperties":
        allowed = list(err.schema.get("properties") or {})
        extra = [k for k in err.instance if k not in allowed] if isinstance(err.instance, dict) else []
        key = extra[0] if extra else "?"
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"NeuroConv's schema allows: {', '.join(allowed)}"
        owner = what or (str(path[-1]) if path else "the specification's top level")
        return SpecError(f"unknown key {key!r} in {owner}{more}", hint,
                         where=located.where((*path, key), key=True))
    if validator == "required":
        missing = [r for r in err.validator_value if not isinstance(err.instance, dict) or r not in err.instance]
        key = missing[0] if missing else "?"
        hint = (f"add `{key}:` here (it may be empty, `{key}: {{}}`): NeuroConv's schema wants it in every "
                "metadata block" if key == "NWBFile" else f"add `{key}:`")
        return SpecError(f"{what or _dotted(path)} has no {key!r}{more}", hint, where=located.where(path))
    where = located.where(path)
    if validator == "type":
        wanted = err.validator_value
        raw = _raw_text(located, path)
        if "string" in (wanted if isinstance(wanted, list) else [wanted]) and not isinstance(err.instance, str):
            shown = raw if raw is not None else str(err.instance)
            kind = {"int": "an integer", "float": "a number", "bool": "true/false"}.get(
                type(err.instance).__name__, f"a {type(err.instance).__name__}")
            return SpecError(
                f"{label} is {shown!r}, which YAML reads as {kind}; NeuroConv wants text{more}",
                f'quote it: {field}: "{shown}"', where=where)
        return SpecError(f"{label} must be of type {wanted}, got {type(err.instance).__name__}{more}",
                         "see NeuroConv's metadata schema", where=where)
    if validator == "enum":
        choices = ", ".join(map(str, err.validator_value))
        close = [c for c in err.validator_value if isinstance(c, str) and isinstance(err.instance, str)
                 and err.instance[:1].upper() == c]
        hint = f"write one of {choices}" + (f" ({err.instance} -> {close[0]})" if close else "")
        return SpecError(f"{label} is {err.instance!r}, which NWB does not allow{more}", hint, where=where)
    if validator == "pattern":
        example = {"age": "ISO 8601 durations such as P90D or P2W", "species": "a Latin binomial such as Mus musculus"}
        hint = f"write {example[field]}" if field in example else f"match the pattern {err.validator_value}"
        return SpecError(f"{label} is {err.instance!r}, which NeuroConv's schema refuses{more}", hint, where=where)
    scope = " (in the session's merged metadata)" if merged else ""
    return SpecError(f"{label}: {err.message}{scope}{more}", "see NeuroConv's schema for this key", where=where)
