"""Backends run a plan's tasks somewhere: ``local`` (default), ``aws`` (AWS Batch), ``slurm``.

This is the one place that knows which backends exist. Everything else asks the backend itself
(its class attributes and methods, see :mod:`corral.backends.base`) instead of comparing names.
A new backend implements :class:`~corral.backends.base.Backend` and adds one line to
:data:`REGISTRY`; its module is imported only when a run uses it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from corral.errors import UsageError

if TYPE_CHECKING:
    from corral.backends.base import Backend
    from corral.model import RunRecord
    from corral.spec import Workflow
    from corral.state.base import StateStore

# name -> (module, class). The module is imported on first use.
REGISTRY: dict[str, tuple[str, str]] = {
    "local": ("corral.backends.local", "LocalBackend"),
    "aws": ("corral.backends.aws_batch.backend", "AwsBatchBackend"),
    "slurm": ("corral.backends.slurm", "SlurmBackend"),
}
NAMES: tuple[str, ...] = tuple(REGISTRY)
DEFAULT = "local"

_EXTRAS = {"aws": "pip install 'corral[aws]'"}


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name`` (imported now); a one-line UsageError for an unknown name or
    a backend whose module (or its dependencies) is not installed."""
    if name not in REGISTRY:
        raise UsageError(f"unknown backend {name!r}", f"use one of: {', '.join(NAMES)}")
    module, cls = REGISTRY[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise UsageError(
            f"the {name} backend is not available in this installation ({exc.name} is missing)",
            _EXTRAS.get(name, f"install corral with the {name} backend"),
        ) from None
    found: type[Backend] = getattr(mod, cls)
    return found


def get_backend(
    name: str, *, workflow: Workflow | None = None, run: RunRecord | None = None, **settings: Any
) -> Backend:
    """A backend ready to run ``workflow`` or to follow ``run`` (whose record says how to reach it)."""
    return backend_class(name).create(workflow=workflow, run=run, **settings)


def open_store(name: str, workflow: Workflow | None = None, **settings: Any) -> StateStore:
    """The state store backend ``name`` records its runs in (SQLite locally, DynamoDB for AWS)."""
    return backend_class(name).open_store(workflow=workflow, **settings)
