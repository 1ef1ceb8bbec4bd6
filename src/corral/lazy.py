"""A module imported on first attribute access: keeps the command line's start-up small."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """``LazyModule("corral.api").run(...)`` imports ``corral.api`` at that first call."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        value = getattr(self._module, attr)
        setattr(self, attr, value)  # found on the instance from now on: a plain attribute read
        return value
