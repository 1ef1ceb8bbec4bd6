"""One exception root for everything corral reports to a user.

Every user-facing error carries a one-line ``message`` (what is wrong, and where) and a
``hint`` (what to do). The CLI prints ``error: <message>`` and ``hint: <hint>`` and exits
with ``exit_code``; anything that is not a :class:`CorralError` is an internal bug and is
shown with its traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class CorralError(Exception):
    """Base of all errors corral reports to users."""

    exit_code: int = 1
    headline: str = "corral error"

    def __init__(self, message: str, hint: str | None = None, *, where: str | None = None) -> None:
        self.message = message
        self.hint = hint
        self.where = where
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class SpecError(CorralError):
    """The workflow file is wrong (syntax, types, unknown keys, cycles…)."""

    exit_code = 2
    headline = "invalid workflow"


class PlanError(CorralError):
    """The workflow is valid but cannot be turned into runnable tasks."""

    exit_code = 2
    headline = "cannot plan workflow"


class UsageError(CorralError):
    """The command line is wrong (unknown run, task, option combination)."""

    exit_code = 2
    headline = "usage error"


class BackendError(CorralError):
    """A backend could not do what was asked (submit, cancel, read logs)."""

    headline = "backend error"


class ProvisionError(BackendError):
    """Cloud resources could not be created, found or removed."""

    headline = "provisioning error"


class CredentialsError(BackendError):
    """Missing or insufficient cloud credentials or permissions."""

    headline = "credentials error"


class StateError(CorralError):
    """The state store cannot be read or written."""

    headline = "state store error"


class StorageError(CorralError):
    """A data transfer failed."""

    headline = "storage error"


def did_you_mean(
    word: object, choices: Sequence[str], *, otherwise: str, quote: Callable[[str], str] = "`{}`".format,
    show: int = 20,
) -> str:
    """The hint for an unknown name: the closest choice ("did you mean `fetch`?"), else the list
    of choices under ``otherwise`` (at most ``show`` of them; "(none)" when there are none)."""
    import difflib

    close = difflib.get_close_matches(str(word), list(choices), n=1)
    if close:
        return f"did you mean {quote(close[0])}?"
    return f"{otherwise}: {', '.join(list(choices)[:show]) or '(none)'}"
