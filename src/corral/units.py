"""Parsing of sizes (``4GiB``) and durations (``90m``) written by people in workflow files."""

from __future__ import annotations

import math
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)
_FACTORS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|d|h|m|s)", re.IGNORECASE)  # ms before m


def parse_size(value: object, *, default_unit: str) -> int:
    """A size in bytes. Bare numbers are in ``default_unit`` ("MiB" for memory, "GiB" for disk)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 4GiB, not a boolean")
    if isinstance(value, (int, float)):
        number, unit = float(value), default_unit.upper()
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"cannot read size {value!r}: write a number and a unit, e.g. 512MiB, 4GiB, 2TB")
        number = float(m.group(1))
        unit = (m.group(2) or default_unit).upper()
        if unit in ("K", "M", "G", "T", "P"):
            unit += "IB"  # a bare K/M/G means binary units, like docker and kubectl
        elif unit in ("KI", "MI", "GI", "TI", "PI"):
            unit += "B"
    else:
        raise ValueError(f"expected a size such as 4GiB, got {type(value).__name__}")
    if unit not in _FACTORS:
        raise ValueError(f"unknown size unit in {value!r}: use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"size {value!r} must be a positive number")
    return int(math.ceil(number * _FACTORS[unit]))


def parse_duration(value: object) -> float:
    """A duration in seconds, from ``90``, ``"90s"``, ``"90m"``, ``"6h"``, ``"1h30m"``, ``"2d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90m, not a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        else:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts).lower() != text.lower():
                raise ValueError(f"cannot read duration {value!r}: write e.g. 500ms, 45s, 90m, 6h or 1h30m")
            scale = {"d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
            seconds = sum(float(n) * scale[u.lower()] for n, u in parts)
    else:
        raise ValueError(f"expected a duration such as 90m, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration {value!r} must be positive")
    return seconds


def format_size_mib(mib: int) -> str:
    return f"{mib / 1024:g}GiB" if mib % 1024 == 0 else f"{mib}MiB"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
