"""A task's output from CloudWatch Logs: the stream Batch names in ``container.logStreamName``.

``read`` pages through ``GetLogEvents`` forward: every call has ``startFromHead=true`` — the
GetLogEvents reference requires it when ``nextToken`` is a ``nextForwardToken`` (without it the
call pages backwards and logs past one page come back incomplete) — until the forward token comes
back unchanged (the end of the stream repeats the token it was given);
``follow`` keeps polling with a bounded backoff (reset whenever lines arrive) until the job is
terminal, then drains what is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from corral.backends.aws_batch.client import aws_errors, is_not_found

DEFAULT_LOG_GROUP = "/aws/batch/job"  # where Batch writes when a job definition names no group
TERMINAL = ("SUCCEEDED", "FAILED")


def stream_of(job: dict[str, Any], attempt: int | None) -> str:
    """The log stream of attempt ``attempt`` (1-based) of a described job, or of its last one."""
    attempts = job.get("attempts") or []
    if attempt is not None:
        if 1 <= attempt <= len(attempts):
            return str(attempts[attempt - 1].get("container", {}).get("logStreamName", ""))
        if attempt != len(attempts) + 1:
            return ""
    return str(job.get("container", {}).get("logStreamName", "") or "")


def skip_marks(logs_client: Any, group: str, run_id: str, *, since_s: float | None = None) -> set[str]:
    """Job ids whose wrapper logged that it found its outputs and ran nothing (payloads.SKIP_MARK),
    for one run: FilterLogEvents over the group with the run's phrase, every page."""
    from corral.backends.aws_batch.payloads import SKIP_MARK

    phrase = f"{SKIP_MARK} {run_id} "
    kwargs: dict[str, Any] = {"logGroupName": group, "filterPattern": f'"{phrase.strip()}"'}
    if since_s:
        kwargs["startTime"] = int(since_s * 1000)
    out: set[str] = set()
    with aws_errors(f"read which tasks of run {run_id} found their outputs (CloudWatch Logs {group})"):
        while True:
            try:
                page = logs_client.filter_log_events(**kwargs)
            except Exception as exc:
                if is_not_found(exc):
                    return out  # no log group yet: nothing logged
                raise
            for e in page.get("events", []):
                msg = str(e.get("message", ""))
                at = msg.find(phrase)
                if at >= 0:
                    words = msg[at + len(phrase):].split()
                    if words:
                        out.add(words[0])
            token = page.get("nextToken")
            if not token or token == kwargs.get("nextToken"):
                return out
            kwargs["nextToken"] = token


def log_group_of(job: dict[str, Any], default: str) -> str:
    options = job.get("container", {}).get("logConfiguration", {}).get("options", {}) or {}
    return str(options.get("awslogs-group") or default or DEFAULT_LOG_GROUP)


class LogReader:
    def __init__(
        self,
        logs_client: Any,
        *,
        sleep: Callable[[float], None] = time.sleep,
        min_delay: float = 0.5,
        max_delay: float = 5.0,
        page_limit: int | None = None,
    ) -> None:
        self.client = logs_client
        self.page_limit = page_limit
        self.sleep = sleep
        self.min_delay = min_delay
        self.max_delay = max_delay

    def read(self, group: str, stream: str, token: str | None = None) -> tuple[list[str], str | None]:
        """Every event after ``token`` (from the head if None): (lines, next token)."""
        lines: list[str] = []
        while True:
            kwargs: dict[str, Any] = {"logGroupName": group, "logStreamName": stream, "startFromHead": True}
            if self.page_limit:
                kwargs["limit"] = self.page_limit
            if token:
                kwargs["nextToken"] = token
            try:
                with aws_errors(f"read log stream {stream}"):
                    resp = self.client.get_log_events(**kwargs)
            except Exception as exc:
                if is_not_found(exc.__cause__ or exc):
                    return lines, token  # the stream does not exist yet
                raise
            lines += [e.get("message", "") for e in resp.get("events", [])]
            nxt = resp.get("nextForwardToken")
            if not nxt or nxt == token:
                return lines, nxt or token
            token = nxt

    def follow(
        self, group: str, stream_fn: Callable[[], tuple[str, bool]], deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Iterator[str]:
        """Lines as they come. ``stream_fn()`` → (stream name, job is terminal)."""
        token: str | None = None
        stream = ""
        delay = self.min_delay
        while True:
            new_stream, terminal = stream_fn()
            if new_stream and new_stream != stream:  # a new attempt writes a new stream
                stream, token = new_stream, None
            got: list[str] = []
            if stream:
                got, token = self.read(group, stream, token)
                yield from got
            if terminal:
                if stream:
                    rest, token = self.read(group, stream, token)
                    yield from rest
                return
            if deadline is not None and clock() >= deadline:
                return
            delay = self.min_delay if got else min(self.max_delay, delay * 2)
            self.sleep(delay)
