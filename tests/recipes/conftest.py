from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _tools_of_this_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks run `python`, `neuroconv`, `dandi` through the shell: use the ones installed with the
    interpreter running the tests (a virtualenv's bin/ may not be first on PATH)."""
    bindir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ.get("PATH", ""))
