"""JSON for scripts, written to stdout as it is produced.

``--json`` output of a 100,000-item plan or run is hundreds of megabytes of text; building it as
one string (and worse, pretty-printing it through rich) costs seconds per thousand tasks and
gigabytes of memory. :func:`write_json` takes ordinary JSON values plus *iterators*, and writes
an iterator's elements one at a time, so a list of tasks given as a generator is never held in
memory as a whole, and the cost grows linearly with the output. The elements of a list are
written one per line (a task per line: easy to grep, and one C-encoder call each).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from typing import IO, Any

_leaf = json.JSONEncoder(ensure_ascii=False, default=str)


def write_json(value: Any, stream: IO[str] | None = None, indent: int = 2) -> None:
    """Write ``value`` as indented JSON (one trailing newline); iterators become lists, streamed."""
    out = stream if stream is not None else sys.stdout
    write = out.write
    for chunk in _chunks(value, 0, indent):
        write(chunk)
    write("\n")
    out.flush()


def _chunks(value: Any, level: int, indent: int) -> Iterator[str]:
    if isinstance(value, Mapping):
        if not value:
            yield "{}"
            return
        inner = "\n" + " " * (indent * (level + 1))
        sep = "{" + inner
        for key, item in value.items():
            yield sep + _leaf.encode(str(key)) + ": "
            yield from _chunks(item, level + 1, indent)
            sep = "," + inner
        yield "\n" + " " * (indent * level) + "}"
    elif isinstance(value, (list, tuple, Iterator)):
        inner = "\n" + " " * (indent * (level + 1))
        sep = "[" + inner
        for item in value:
            yield sep
            if _flat(item):  # one line per element, by the C encoder: fast for 100,000 task rows
                yield _leaf.encode(item)
            else:
                yield from _chunks(item, level + 1, indent)
            sep = "," + inner
        if sep.startswith("["):  # nothing was written: an empty list
            yield "[]"
        else:
            yield "\n" + " " * (indent * level) + "]"
    else:
        yield _leaf.encode(value)


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _flat(value: Any) -> bool:
    """A value with no iterator one level down: written on one line in one encoder call."""
    if type(value) is dict and all(type(v) in _SCALARS for v in value.values()):
        return True  # a task row: no ABC checks per field (0.25 s of 30,000 rows)
    if isinstance(value, Mapping):
        return not any(isinstance(v, Iterator) for v in value.values())
    if isinstance(value, (list, tuple)):
        return not any(isinstance(v, Iterator) for v in value)
    return not isinstance(value, Iterator)
