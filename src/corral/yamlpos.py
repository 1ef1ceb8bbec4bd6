"""YAML loading that remembers where every key and value came from (line and column)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from corral.errors import SpecError

Path_ = tuple[str | int, ...]


@dataclass
class Located:
    """A YAML document as plain Python data, plus the position of each path in it."""

    data: Any
    source: str
    positions: dict[Path_, tuple[int, int]] = field(default_factory=dict)  # where each value starts
    key_positions: dict[Path_, tuple[int, int]] = field(default_factory=dict)  # where each key is written

    def where(self, path: Path_, *, key: bool = False) -> str:
        """``file:line:col`` (1-based) of the value at ``path`` (or of its key), else the closest parent."""
        p = tuple(path)
        if key and p in self.key_positions:
            line, col = self.key_positions[p]
            return f"{self.source}:{line}:{col}"
        while p and p not in self.positions:
            p = p[:-1]
        line, col = self.positions.get(p, (1, 1))
        return f"{self.source}:{line}:{col}"


def load_text(text: str, source: str) -> Located:
    """Parse one YAML document; syntax errors become SpecError naming file:line:col."""
    if "\x00" in text:
        raise SpecError("the file is binary, not YAML", "give the path of a workflow YAML file", where=source)
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            raise SpecError(
                "the file is empty", "a workflow needs at least `name`, `items` and `stages`", where=source
            )
        located = Located(data=None, source=source)
        located.data = _build(loader, node, (), located, source)
        return located
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = exc.problem or exc.context or "invalid YAML"
        raise SpecError(
            f"YAML syntax error: {problem}", "check indentation, colons and quotes near that place", where=where
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise SpecError(
            f"character {exc.character!r} is not allowed in YAML",
            "remove control characters from the file (tabs and newlines are fine)",
            where=f"{source}:{line}:{col}",
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"YAML error: {exc}".splitlines()[0], "check the file's syntax", where=source) from None
    except RecursionError:
        raise SpecError("the YAML nests too deeply", "simplify the file", where=source) from None
    finally:
        if loader is not None:
            loader.dispose()


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


def _build(loader: yaml.SafeLoader, node: yaml.Node, path: Path_, located: Located | None, source: str) -> Any:
    if located is not None:
        located.positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolve `<<: *anchor` merges
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _build(loader, key_node, path, None, source)
            if isinstance(key, (dict, list)):
                raise SpecError(
                    "a mapping key must be a plain value",
                    "write keys as plain words",
                    where=f"{source}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}",
                )
            if key in out:
                raise SpecError(
                    f"duplicate key {key!r}",
                    "each key may appear once in a mapping; remove or merge the repeats",
                    where=f"{source}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}",
                )
            child = path + (key if isinstance(key, (str, int)) else str(key),)
            out[key] = _build(loader, value_node, child, located, source)
            if located is not None:
                located.key_positions[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, child, path + (i,), located, source) for i, child in enumerate(node.value)]
    return loader.construct_object(node, deep=True)
