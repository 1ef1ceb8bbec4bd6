"""YAML loading for everything corral reads: YAML 1.2 meaning, bounded aliases, positions on demand.

One loader for workflow files, NeuroConv ``conversion.yml`` and inline items. What it means:

- **Scalars** follow the YAML 1.2 core schema, stricter where 1.2 would still lose what was
  written: ``true``/``false`` (any case of the three spellings 1.2 lists) are booleans; ``null``,
  ``~`` and an empty value are null; decimal integers without leading zeros (``0``, ``42``,
  ``-7``) are ints; decimal floats (``0.5``, ``1e3``, ``.inf``, ``.nan``) are floats that remember
  their text (:class:`YamlFloat`, so an item value ``1.10`` stays ``1.10``). Everything else is a
  string as written: ``010``, ``01``, ``+5``, ``0x1f``, ``1_000``, ``no``, ``on``, ``yes``,
  ``12:30:00``, ``2024-01-01``. (YAML 1.1, PyYAML's default, reads these as 8, 1, True, 45000, a date.)
- **Tags**: only the core ones (``!!str``, ``!!int``, ``!!float``, ``!!bool``, ``!!null``,
  ``!!map``, ``!!seq``); any other (``!!python/...``, ``!!timestamp``, ``!Ref``) is an error at
  the line it stands on.
- **Aliases** are bounded before anything walks the data: at most :data:`MAX_ALIASES` per
  document and at most :data:`MAX_EXPANSION` nodes added by expanding them, counted while
  parsing, so an alias bomb is refused in milliseconds. An alias is the same Python object as its
  anchor (never copied).
- **Merge keys** (``<<: *defaults``, ``<<: [*a, *b]``) merge as YAML specifies: keys written in
  the mapping win, then the merged mappings in order. A key written twice in one mapping is an
  error naming the line of the second.
- **NUL** in a value (``"\\0"``) is refused where it stands: no process argument or environment
  variable can hold it.

Parsing uses libyaml (PyYAML's C parser) when present and builds plain data straight from its
events, without a node tree and without recording positions. Positions (``file:line:col``) are
recorded only when an error asks for one: :meth:`Located.where` parses the text again once, then
answers from that index.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml import events as ev

from corral.errors import SpecError

Path_ = tuple[str | int, ...]

MAX_ALIASES = 100_000  # alias uses in one document
MAX_EXPANSION = 1_000_000  # nodes that expanding the aliases adds (an alias of a 10-item list adds 11)
MAX_DEPTH = 200  # nested mappings and sequences

_Parser: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it

_CORE = "tag:yaml.org,2002:"
_INT = re.compile(r"-?(?:0|[1-9][0-9]*)\Z")
_FLOAT = re.compile(r"-?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\Z")
_SPECIAL_FLOATS = {".inf": "inf", ".Inf": "inf", ".INF": "inf", "-.inf": "-inf", "-.Inf": "-inf",
                   "-.INF": "-inf", ".nan": "nan", ".NaN": "nan", ".NAN": "nan"}
_CONSTANTS: dict[str, Any] = {"true": True, "True": True, "TRUE": True, "false": False, "False": False,
                              "FALSE": False, "null": None, "Null": None, "NULL": None, "~": None, "": None}
_MAYBE_TYPED = frozenset("0123456789-.~tTfFnN")


class YamlFloat(float):
    """A float read from YAML that keeps its text: ``str()`` gives back what was written."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> YamlFloat:
        self = super().__new__(cls, _SPECIAL_FLOATS.get(text, text))
        self.text = text
        return self

    def __str__(self) -> str:
        return self.text


for _dumper in (yaml.SafeDumper, getattr(yaml, "CSafeDumper", yaml.SafeDumper)):
    # written back as a plain float (what a YAML 1.1 reader such as NeuroConv's also reads as one)
    _dumper.add_representer(YamlFloat, yaml.representer.SafeRepresenter.represent_float)


def resolve_plain(value: str) -> Any:
    """The YAML 1.2 meaning (as described in this module's docstring) of a plain scalar."""
    if not value or value[0] in _MAYBE_TYPED:
        if value in _CONSTANTS:
            return _CONSTANTS[value]
        if _INT.match(value):
            return int(value)
        if value in _SPECIAL_FLOATS or _FLOAT.match(value):
            return YamlFloat(value)
    return value


@dataclass
class Located:
    """A YAML document as plain Python data, plus the position of each path in it (on demand)."""

    data: Any
    source: str
    text: str | None = None  # parsed again, once, the first time a position is asked for
    positions: dict[Path_, tuple[int, int]] = field(default_factory=dict)  # where each value starts
    key_positions: dict[Path_, tuple[int, int]] = field(default_factory=dict)  # where each key is written

    def _index(self) -> None:
        if self.text is not None:
            text, self.text = self.text, None
            with contextlib.suppress(SpecError):  # the text parsed once already
                _Builder(text, self.source, self).run()

    def where(self, path: Path_, *, key: bool = False) -> str:
        """``file:line:col`` (1-based) of the value at ``path`` (or of its key), else the closest parent."""
        self._index()
        p = tuple(path)
        if key and p in self.key_positions:
            line, col = self.key_positions[p]
            return f"{self.source}:{line}:{col}"
        while p and p not in self.positions:
            p = p[:-1]
        line, col = self.positions.get(p, (1, 1))
        return f"{self.source}:{line}:{col}"


_NO_KEY = object()


class _Frame:
    __slots__ = ("container", "key", "key_mark", "merge_key", "merges", "anchor", "start", "path", "mark")

    def __init__(self, container: Any, anchor: str | None, start: int, mark: Any, path: Path_) -> None:
        self.container = container
        self.key: Any = _NO_KEY
        self.key_mark: Any = None
        self.merge_key = False
        self.merges: list[dict[Any, Any]] | None = None
        self.anchor = anchor
        self.start = start
        self.mark = mark
        self.path = path


class _Builder:
    """Plain data straight from parser events. With ``record``, also the position of every path."""

    def __init__(self, text: str, source: str, record: Located | None = None) -> None:
        self.text = text
        self.source = source
        self.record = record
        self.anchors: dict[str, tuple[Any, int]] = {}  # name -> (object, expanded size)
        self.open_anchors: set[str] = set()
        self.nodes = 0  # nodes counted with aliases expanded
        self.aliases = 0
        self.expanded = 0

    def at(self, mark: Any) -> str:
        return f"{self.source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else self.source

    def fail(self, message: str, hint: str, mark: Any) -> SpecError:
        return SpecError(message, hint, where=self.at(mark))

    def scalar(self, e: ev.ScalarEvent) -> Any:
        value = e.value
        if "\x00" in value:
            raise self.fail("a value holds a NUL character (\\0), which no command or environment can carry",
                            "remove the \\0 from the value", e.start_mark)
        tag = e.tag
        if tag is None or tag == "!":
            return resolve_plain(value) if e.implicit[0] and tag is None else value
        if not tag.startswith(_CORE):
            raise self.fail(f"the YAML tag {tag!r} is not supported",
                            "remove the tag (corral reads plain YAML: strings, numbers, true/false, null)",
                            e.start_mark)
        kind = tag[len(_CORE):]
        if kind == "str":
            return value
        if kind not in ("int", "float", "bool", "null"):
            shown = f"!!{kind}" if tag.startswith(_CORE) else tag
            raise self.fail(f"the YAML tag {shown!r} is not supported",
                            "remove the tag (corral reads plain YAML: strings, numbers, true/false, null)",
                            e.start_mark)
        if kind == "int" and re.fullmatch(r"[-+]?[0-9]+", value):
            return int(value)
        resolved = resolve_plain(value)
        wanted = {"int": int, "float": float, "bool": bool, "null": type(None)}.get(kind)
        if wanted is float and isinstance(resolved, int) and not isinstance(resolved, bool):
            return YamlFloat(value)
        if wanted is None or not isinstance(resolved, wanted) or (wanted is int and isinstance(resolved, bool)):
            shown = f"!!{kind}" if kind else tag
            raise self.fail(f"{value!r} cannot be read as {shown}",
                            "remove the tag, or write a value of that type", e.start_mark)
        return resolved

    def run(self) -> Any:  # noqa: C901 - one loop over the event stream, kept in one place for speed
        parser = _Parser(self.text)
        record = self.record
        positions = record.positions if record is not None else None
        key_positions = record.key_positions if record is not None else None
        stack: list[_Frame] = []
        top: _Frame | None = None
        root: Any = _NO_KEY
        documents = 0
        SC, MS, ME, SS, SE, AL = (ev.ScalarEvent, ev.MappingStartEvent, ev.MappingEndEvent,
                                  ev.SequenceStartEvent, ev.SequenceEndEvent, ev.AliasEvent)
        try:
            get = parser.get_event
            while True:
                e = get()
                t = type(e)
                path: Path_ = ()
                if record is not None and top is not None:
                    c = top.container
                    path = top.path + ((len(c),) if type(c) is list else (() if top.key is _NO_KEY else (_pkey(top.key),)))
                if t is SC:
                    self.nodes += 1
                    value = e.value
                    if e.tag is None and e.anchor is None and "\x00" not in value:  # the common case, inline
                        if e.implicit[0] and (not value or value[0] in _MAYBE_TYPED):
                            value = resolve_plain(value)
                    else:
                        value = self.scalar(e)
                        if e.anchor is not None:
                            self.anchors[e.anchor] = (value, 1)
                elif t is MS or t is SS:
                    self.nodes += 1
                    tag = e.tag
                    if tag is not None and tag != "!" and tag != _CORE + ("map" if t is MS else "seq"):
                        raise self.fail(f"the YAML tag {tag!r} is not supported", "remove the tag", e.start_mark)
                    if len(stack) >= MAX_DEPTH:
                        raise self.fail("the YAML nests too deeply", "simplify the file", e.start_mark)
                    if positions is not None:
                        positions[path] = (e.start_mark.line + 1, e.start_mark.column + 1)
                    if e.anchor is not None:
                        self.open_anchors.add(e.anchor)
                    if top is not None:
                        stack.append(top)
                    top = _Frame({} if t is MS else [], e.anchor, self.nodes, e.start_mark, path)
                    continue
                elif t is ME or t is SE:
                    assert top is not None
                    done = top
                    value = done.container
                    if done.merges:
                        merged: dict[Any, Any] = {}
                        for m in reversed(done.merges):
                            merged.update(m)
                        merged.update(value)
                        value = merged
                    if done.anchor is not None:
                        self.open_anchors.discard(done.anchor)
                        self.anchors[done.anchor] = (value, self.nodes - done.start + 1)
                    top = stack.pop() if stack else None
                    path = done.path
                    if positions is not None and done.merges:
                        for k in value:
                            positions.setdefault(done.path + (_pkey(k),), (done.mark.line + 1, done.mark.column + 1))
                    if top is None:
                        root = value
                        continue
                    if top.key is _NO_KEY and type(top.container) is dict:
                        raise self.fail("a mapping key must be a plain value", "write keys as plain words",
                                        done.mark)
                elif t is AL:
                    name = e.anchor
                    if name in self.open_anchors:
                        raise self.fail(f"the alias *{name} refers to its own anchor (a recursive structure)",
                                        "an alias may only repeat a value that is complete", e.start_mark)
                    if name not in self.anchors:
                        raise self.fail(f"the alias *{name} has no anchor &{name} before it",
                                        "define the anchor first", e.start_mark)
                    value, size = self.anchors[name]
                    self.aliases += 1
                    self.expanded += size
                    self.nodes += size
                    if self.aliases > MAX_ALIASES or self.expanded > MAX_EXPANSION:
                        raise self.fail(
                            f"the YAML aliases expand to more than {MAX_EXPANSION:,} values"
                            if self.expanded > MAX_EXPANSION else f"more than {MAX_ALIASES:,} YAML aliases",
                            "write the values out, or repeat fewer and smaller anchors", e.start_mark)
                elif t is ev.DocumentStartEvent:
                    documents += 1
                    if documents > 1:
                        raise self.fail("the file holds more than one YAML document (a second `---`)",
                                        "keep one document per file", e.start_mark)
                    continue
                elif t is ev.StreamEndEvent:
                    break
                else:
                    continue
                # a complete value: put it where it belongs
                if top is None:
                    root = value
                    if positions is not None:
                        positions[()] = (e.start_mark.line + 1, e.start_mark.column + 1)
                    continue
                c = top.container
                if type(c) is list:
                    if positions is not None and (t is SC or t is AL):
                        positions[path] = (e.start_mark.line + 1, e.start_mark.column + 1)
                    c.append(value)
                elif top.key is _NO_KEY:
                    if isinstance(value, (dict, list)):
                        raise self.fail("a mapping key must be a plain value", "write keys as plain words",
                                        e.start_mark)
                    top.merge_key = t is SC and value == "<<" and e.implicit[0] and e.tag is None
                    if not top.merge_key and value in c:
                        raise self.fail(f"duplicate key {value!r}",
                                        "each key may appear once in a mapping; remove or merge the repeats",
                                        e.start_mark)
                    top.key = value
                    top.key_mark = e.start_mark
                else:
                    if top.merge_key:
                        self.merge(top, value, e.start_mark)
                    else:
                        if positions is not None and key_positions is not None:
                            if t is SC or t is AL:
                                positions[path] = (e.start_mark.line + 1, e.start_mark.column + 1)
                            km = top.key_mark
                            key_positions[path] = (km.line + 1, km.column + 1)
                        c[top.key] = value
                    top.key = _NO_KEY
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or exc.context or "invalid YAML"
            raise SpecError(f"YAML syntax error: {problem}", "check indentation, colons and quotes near that place",
                            where=self.at(mark)) from None
        except yaml.reader.ReaderError as exc:
            pos = exc.position
            line = self.text.count("\n", 0, pos) + 1
            col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
            raise SpecError(f"character {exc.character!r} is not allowed in YAML",
                            "remove control characters from the file (tabs and newlines are fine)",
                            where=f"{self.source}:{line}:{col}") from None
        except yaml.YAMLError as exc:
            raise SpecError(f"YAML error: {exc}".splitlines()[0], "check the file's syntax",
                            where=self.source) from None
        finally:
            parser.dispose()
        if root is _NO_KEY:
            raise SpecError("the file is empty", "a workflow needs at least `name`, `items` and `stages`",
                            where=self.source)
        return root

    def merge(self, frame: _Frame, value: Any, mark: Any) -> None:
        parts = value if isinstance(value, list) else [value]
        if not parts or not all(isinstance(p, dict) for p in parts):
            raise self.fail("a merge key `<<` takes a mapping or a list of mappings (`<<: *defaults`)",
                            "point `<<` at an anchored mapping", mark)
        if frame.merges is None:
            frame.merges = []
        frame.merges.extend(parts)


def _pkey(key: Any) -> str | int:
    return key if isinstance(key, (str, int)) else str(key)


def load_text(text: str, source: str) -> Located:
    """Parse one YAML document; every problem becomes a SpecError naming file:line:col."""
    if "\x00" in text:
        raise SpecError("the file is binary, not YAML", "give the path of a workflow YAML file", where=source)
    data = _Builder(text, source).run()
    return Located(data=data, source=source, text=text)


def load_file(path: str | Path) -> Located:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"no such file: {p}", "check the path of the workflow file") from None
    except IsADirectoryError:
        raise SpecError(f"{p} is a folder, not a workflow file", "give the path of a .yaml file") from None
    except OSError as exc:
        raise SpecError(f"cannot read {p}: {exc.strerror}", "check the file's permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(
            "the file is not UTF-8 text", "save the workflow as UTF-8 YAML", where=str(p)
        ) from None
    return load_text(text, str(p))
