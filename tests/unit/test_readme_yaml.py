"""The README's YAML examples parse with corral's loader (commented-out options included)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from corral.yamlpos import load_text

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
OPTION = re.compile(r"^(\s+)# ([a-z_]+:\s.*?)(?:\s{2,}\S.*)?$")  # `    # key: value     what it does`


def uncommented(block: str) -> str:
    """The block with each commented-out option line (`# key: value   explanation`) switched on."""
    return "\n".join(OPTION.sub(r"\1\2", line) for line in block.splitlines()) + "\n"


def test_readme_has_yaml_blocks() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_yaml_block_parses(i: int) -> None:
    load_text(BLOCKS[i], f"README.md yaml block {i + 1}")
    load_text(uncommented(BLOCKS[i]), f"README.md yaml block {i + 1}, options uncommented")
