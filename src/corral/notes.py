"""Notes for people on stderr, each said once per process (not errors: the command goes on)."""

from __future__ import annotations

import sys

_SAID: set[str] = set()


def say_once(message: str) -> None:
    """``corral: note: <message>`` on stderr, the first time this process says it."""
    if message not in _SAID:
        _SAID.add(message)
        sys.stderr.write(f"corral: note: {message}\n")
