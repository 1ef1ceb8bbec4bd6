"""Where corral keeps its state on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def corral_home() -> Path:
    """State directory: ``$CORRAL_HOME``, else the user's data dir (e.g. ~/.local/share/corral)."""
    env = os.environ.get("CORRAL_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("corral", appauthor=False))
