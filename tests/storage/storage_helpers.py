"""Shared helpers for the storage tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CANARY = "canary-5e1f0c-do-not-leak"
RCLONE = shutil.which("rclone")

needs_rclone = pytest.mark.skipif(RCLONE is None, reason="rclone is not installed (apt-get install rclone)")


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): p.read_text()
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".corral-workspace"
    }
