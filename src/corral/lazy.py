"""A module imported on first attribute access: keeps the command line's start-up small."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from rich.console import Console


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


def lazy_console(**settings: Any) -> Console:
    """A ``rich.console.Console(**settings)`` made at its first use: `corral --help` never imports
    rich. (Typed as a Console: the proxy forwards every attribute to the one it makes.)"""
    return cast("Console", _LazyConsole(settings))


class _LazyConsole:
    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._console: Any = None

    @property
    def real(self) -> Any:
        """The Console itself (for rich's own classes that take one)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._settings)
        return self._console

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.real, attr)
