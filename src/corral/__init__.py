"""corral: run one declarative workflow over thousands of items, locally or on AWS Batch.

The API's names are imported on first use (PEP 562), so that ``import corral.cli`` — every
``corral`` command, ``corral --help`` included — does not pay for pydantic and the workflow models
before it knows it needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.api import cancel, logs, plan, resume, run, status
    from corral.errors import CorralError
    from corral.spec import load_workflow

__all__ = ["CorralError", "cancel", "load_workflow", "logs", "plan", "resume", "run", "status"]
__version__ = "0.1.0"

_HOME = {"cancel": "corral.api", "logs": "corral.api", "plan": "corral.api", "resume": "corral.api",
         "run": "corral.api", "status": "corral.api", "CorralError": "corral.errors",
         "load_workflow": "corral.spec"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'corral' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
