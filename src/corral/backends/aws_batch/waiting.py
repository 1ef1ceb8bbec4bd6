"""Bounded polling with exponential backoff: how corral waits for AWS (never a fixed sleep).

``poll(check, what=..., timeout=...)`` calls ``check()`` until it returns something truthy,
sleeping 1 s, 1.6 s, 2.6 s… (capped) between calls, and raises :class:`ProvisionError` naming
``what`` when ``timeout`` seconds pass. ``sleep`` and ``clock`` are injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from corral.errors import ProvisionError

T = TypeVar("T")

Sleep = Callable[[float], None]
Clock = Callable[[], float]


class Poller:
    def __init__(
        self,
        *,
        first: float = 1.0,
        factor: float = 1.6,
        cap: float = 15.0,
        sleep: Sleep = time.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        self.first, self.factor, self.cap = first, factor, cap
        self.sleep, self.clock = sleep, clock

    def poll(self, check: Callable[[], T | None], *, what: str, timeout: float = 600.0, hint: str = "") -> T:
        deadline = self.clock() + timeout
        delay = self.first
        while True:
            result = check()
            if result:
                return result
            now = self.clock()
            if now >= deadline:
                raise ProvisionError(
                    f"timed out after {timeout:g}s waiting for {what}",
                    hint or "check the resource in the AWS console, then run the command again (it resumes)",
                )
            self.sleep(min(delay, max(0.0, deadline - now)))
            delay = min(delay * self.factor, self.cap)


DEFAULT = Poller()


def poll(check: Callable[[], T | None], *, what: str, timeout: float = 600.0, hint: str = "") -> T:
    return DEFAULT.poll(check, what=what, timeout=timeout, hint=hint)
