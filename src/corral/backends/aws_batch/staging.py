"""Local ``from:`` paths of transfer stages on AWS: checked before anything is made, then uploaded
to the run's bucket (``<prefix>/staged/<run>/``) with boto3's transfer manager; the jobs read the
staged copy. Unchanged files already staged (same size and mtime) are not sent again on resume."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from corral.backends.aws_batch.run_facts import RunFacts
from corral.errors import PlanError
from corral.model import RunRecord
from corral.plan import Plan


class StderrProgress:
    """Bytes to send and sent while staging local sources (the transfer manager calls ``advance``
    from its threads); a line on stderr at most every 64 MiB."""

    STEP = 64 * 2**20

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self._next = self.STEP
        self._lock = threading.Lock()

    def add_total(self, nbytes: int) -> None:
        self.total += nbytes

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if self.done >= self._next:
                self._next = self.done + self.STEP
                print(f"corral: staging {self.done / 2**20:.0f} / {self.total / 2**20:.0f} MiB", file=sys.stderr)


def reads_local_paths(plan: Plan) -> bool:
    """Whether some transfer stage's ``from:`` is a path on this machine (staged to S3)."""
    from corral.errors import StorageError
    from corral.storage.uri import WORKSPACE, parse

    for s in plan.workflow.stages:
        if s.kind == "transfer" and s.source and not s.source.startswith(WORKSPACE):
            try:
                if parse(s.source, base_dir=plan.workflow.base_dir).kind == "local":
                    return True
            except StorageError:
                continue
    return False


def local_sources(
    plan: Plan, run_id: str, workdir: str, *, to_submit: set[str] | None = None, stage: str | None = None,
) -> dict[str, str]:
    """Local ``from:`` paths of transfer tasks (placeholders filled per item) → the first task
    label using each. A path that does not exist: a one-line PlanError naming stage, item, path."""
    from corral.plan import render
    from corral.storage.uri import WORKSPACE, parse

    wf = plan.workflow
    out: dict[str, str] = {}
    for t in plan.tasks:
        if t.stage.kind != "transfer" or not t.stage.source or (stage and t.stage.name != stage):
            continue
        if to_submit is not None and t.id not in to_submit:
            continue
        source = render(t.stage.source, t.values(run_id, workdir))
        if source.startswith(WORKSPACE):
            continue
        loc = parse(source, base_dir=wf.base_dir)
        if loc.kind != "local":
            continue
        if not Path(loc.path).exists():
            raise PlanError(
                f"stage {t.stage.name!r}, item {t.key}: the transfer's local source {loc.path} does not exist",
                "fix the `from:` path (or the item's values); local sources are uploaded to S3 for AWS jobs",
                where=wf.stage_where(t.stage.name, "from"),
            )
        out.setdefault(loc.path, t.label)
    return out


def stage_local_sources(
    s3: Any, plan: Plan, run: RunRecord, env: Any, to_submit: set[str], workdir: str,
) -> dict[str, str]:
    """Upload the local ``from:`` paths of the tasks about to be submitted to the run's bucket
    (``<prefix>/staged/<run>/``); local path → staged s3:// URI. Unchanged files already
    staged (same size and mtime) are not sent again, so a resume uploads only what changed."""
    from corral.storage.aws import stage_local_source, staged_root

    paths = local_sources(plan, run.run_id, workdir, to_submit=to_submit)
    if not paths:
        return {}
    bucket = getattr(env, "bucket", None)
    if not bucket:
        raise PlanError(
            "transfers read local paths but the AWS environment has no bucket to stage them in",
            "set `aws: bucket:` in the workflow (or let corral make its default bucket)",
        )
    prefix = getattr(env, "prefix", "corral")
    progress = StderrProgress()
    staged: dict[str, str] = {}
    for path, label in sorted(paths.items()):
        before = progress.total
        staged[path] = stage_local_source(
            s3, path, bucket=bucket, prefix=prefix, run_id=run.run_id, progress=progress,
        )
        sent = progress.total - before
        print(f"corral: staged {path} ({label}) → {staged[path]}"
              f" ({'unchanged, not sent again' if sent == 0 else f'{sent} bytes sent'})", file=sys.stderr)
    RunFacts.of(run).replace(staged=staged_root(bucket=bucket, prefix=prefix, run_id=run.run_id)).save_to(run)
    return staged
