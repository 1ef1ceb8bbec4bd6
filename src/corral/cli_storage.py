"""``corral push`` / ``corral pull``: move data to and from S3 or an rclone remote.

    corral push results/ s3://lab-bucket/project/results     # a folder's files, multipart, in parallel
    corral pull s3://lab-bucket/project/results ./results
    corral pull gdrive:raw/session1 ./raw                      # any rclone remote (uses rclone)
    corral pull --run RUN [DEST]                               # a run's outputs, by stage and item
    corral push --run RUN s3://lab-bucket/project/RUN          # a local run's local outputs, to S3

S3 goes through boto3's transfer manager (multipart, concurrent, with a progress bar on stderr);
rclone remotes go through the rclone binary with a private copy of the used remotes' config.
stdout gets one line per destination written (for scripts); everything else goes to stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from corral.backends import NAMES as BACKEND_NAMES
from corral.errors import StorageError, UsageError

if TYPE_CHECKING:
    from corral.storage.uri import Location


def parse(*args: Any, **kwargs: Any) -> Location:
    """corral.storage.uri.parse, imported on first use (`corral --help` does not load storage)."""
    from corral.storage.uri import parse as parse_uri

    return parse_uri(*args, **kwargs)


class RichProgress:
    """A rich progress bar (stderr) fed by the S3 transfer manager's callbacks (from its threads)."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=Console(stderr=True), transient=False, disable=not enabled,
        )
        self._task = self._progress.add_task(label, total=0)

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def add_total(self, nbytes: int) -> None:
        with self._lock:
            total = (self._progress.tasks[0].total or 0) + nbytes
            self._progress.update(self._task, total=total)

    def advance(self, nbytes: int) -> None:
        self._progress.advance(self._task, nbytes)


def _concurrency_options(f: Any) -> Any:
    f = click.option("--concurrency", type=click.IntRange(1, 64), default=8, show_default=True,
                     help="Parallel S3 part transfers.")(f)
    f = click.option("--chunk-size", default="8MiB", show_default=True,
                     help="S3 multipart threshold and part size.")(f)
    f = click.option("--rclone-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="rclone.conf to take remotes from (default: rclone's own).")(f)
    return f


def _chunk(text: str) -> int:
    from corral.units import parse_size

    try:
        n = parse_size(text, default_unit="MiB")
    except Exception as exc:
        raise UsageError(f"--chunk-size {text!r} is not a size", "write e.g. 8MiB or 64MiB") from exc
    if n < 5 * 2**20:
        raise UsageError(f"--chunk-size {text} is below S3's 5 MiB minimum part size", "use 5MiB or more")
    return n


def _rclone_copy(src: Location, dst: Location, rclone_config: Path | None, exact: bool = False,
                 extra: list[str] | None = None) -> None:
    from corral.storage import rclone

    names = {loc.remote for loc in (src, dst) if loc.kind == "remote" and loc.remote}
    config = rclone_config or rclone.default_config_path()
    if names:
        rclone.config_subset(rclone.read_config(config), names, source=config)
    args = rclone.command("copy", src, dst, [])
    if exact:  # a file to exactly that name, a folder to exactly that folder
        args[0] = "copyto"
    argv = rclone.wrapper_argv([*args[:3], *(extra or []), "--progress" if sys.stderr.isatty() else "-v"], names,
                               config_path=config)
    r = subprocess.run(argv, stdout=sys.stderr)
    if r.returncode != 0:
        raise StorageError(f"rclone could not copy {src.uri} to {dst.uri} (exit {r.returncode})",
                           "see rclone's messages above")


def _rclone_push_tree(files: list[tuple[str, str]], dest: str, rclone_config: Path | None) -> None:
    """Copy every (local path, relative target) to ``dest`` with ONE rclone process: the targets are
    laid out as symlinks in a temporary folder, which rclone copies following the links (``-L``).
    One process per file would pay rclone's start-up and remote set-up for every output."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="corral-push-") as tmp:
        for path, rel in files:
            link = Path(tmp) / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(path).resolve())
        _rclone_copy(parse(tmp), parse(dest), rclone_config, extra=["--copy-links"])


def copy_any(source: str, dest: str, *, concurrency: int = 8, chunk: int = 8 * 2**20,
             rclone_config: Path | None = None, progress: bool = True, base_dir: Path | None = None,
             exact: bool = False) -> str:
    """Copy ``source`` to ``dest`` (local ↔ S3 with boto3; anything else with rclone).

    A file goes into ``dest`` when it is a folder (or ends with /); with ``exact`` it becomes ``dest``.
    """
    from corral.storage import s3 as s3mod

    base = base_dir or Path.cwd()
    src = parse(source, base_dir=base)
    dst = parse(dest, base_dir=base)
    cfg = None
    if "s3" in (src.kind, dst.kind) and "remote" not in (src.kind, dst.kind) and src.kind != dst.kind:
        cfg = s3mod.transfer_config(threshold=chunk, chunksize=chunk, concurrency=concurrency)
        client = s3mod.s3_client()
        with RichProgress(f"{Path(src.path).name or src.uri} → {dst.uri}", enabled=progress) as bar:
            if dst.kind == "s3":
                s3mod.upload(client, Path(src.path), dst.bucket, dst.path, config=cfg, progress=bar)
            else:
                s3mod.download(client, src.bucket, src.path, Path(dst.path), config=cfg, progress=bar)
        return dst.uri if dst.kind == "s3" else dst.path
    _rclone_copy(src, dst, rclone_config, exact)
    return dst.uri if dst.kind != "local" else dst.path


# -- a run's outputs ----------------------------------------------------------------------------
def run_outputs(run_id: str, backend: str | None) -> list[tuple[str, str, Location]]:
    """(stage, item key, output location) of every succeeded or skipped task of the run."""
    from corral import api
    from corral.model import TaskState

    store = api.open_store(backend or api.backends.DEFAULT)
    try:
        rec = store.get_run(run_id)
        plan = api.load_plan(store, run_id)
        done = {t.task_id for t in store.get_tasks(run_id, [TaskState.SUCCEEDED, TaskState.SKIPPED, TaskState.REUSED])}
    finally:
        store.close()
    workdir = api.get_backend(rec.backend, run=rec).workspace(rec) or ""
    out: list[tuple[str, str, Location]] = []
    for t in plan.tasks:
        if t.id not in done:
            continue
        for uri in t.paths("outputs", run_id, workdir or "/unreachable-workspace"):
            if uri.startswith("workspace://") and not workdir:
                click.echo(f"skip {uri}: the run's workspace is not on this machine ({rec.backend})", err=True)
                continue
            out.append((t.stage.name, t.key, parse(uri, workdir=workdir, base_dir=plan.workflow.base_dir)))
    return out


def _leaf(uri: str) -> str:
    return Path(uri.rstrip("/").split(":", 1)[-1]).name or "output"


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("source", required=False)
    @click.argument("dest", required=False)
    @click.option("--run", "run_id", help="Pull the outputs of this run (DEST defaults to ./RUN).")
    @click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None, help="Where the run is recorded.")
    @click.option("--no-progress", is_flag=True, help="No progress bar.")
    @_concurrency_options
    def pull(source: str | None, dest: str | None, run_id: str | None, backend: str | None, no_progress: bool,
             concurrency: int, chunk_size: str, rclone_config: Path | None) -> None:
        """Download SOURCE (s3://… or remote:path) to DEST, or a run's outputs with --run."""
        chunk = _chunk(chunk_size)
        show = not no_progress and sys.stderr.isatty()
        if run_id:
            if dest is not None:
                raise UsageError("with --run, give at most one argument (DEST)", "corral pull --run RUN [DEST]")
            root = Path(source or run_id)
            outputs = run_outputs(run_id, backend)
            if not outputs:
                raise UsageError(f"run {run_id} has no outputs to pull", "stages list theirs under `outputs:`")
            for stage, key, loc in outputs:
                target = root / stage / key / _leaf(loc.uri)
                target.parent.mkdir(parents=True, exist_ok=True)
                if loc.kind == "local":
                    _local_copy(Path(loc.path), target)
                else:
                    copy_any(loc.uri, str(target), concurrency=concurrency, chunk=chunk, rclone_config=rclone_config,
                             progress=show, exact=True)
                click.echo(str(target))
            return
        if not source:
            raise UsageError("pull needs SOURCE (or --run RUN)", "corral pull s3://bucket/prefix [DEST]")
        if parse(source).kind == "local":
            raise UsageError(f"{source} is a local path", "pull copies from s3://… or remote:path; see `corral push`")
        click.echo(copy_any(source, dest or ".", concurrency=concurrency, chunk=chunk, rclone_config=rclone_config,
                            progress=show))

    @cli.command()
    @click.argument("source", required=False)
    @click.argument("dest", required=False)
    @click.option("--run", "run_id", help="Push the local outputs of this run under DEST (the only argument).")
    @click.option("--no-progress", is_flag=True, help="No progress bar.")
    @_concurrency_options
    def push(source: str | None, dest: str | None, run_id: str | None, no_progress: bool, concurrency: int,
             chunk_size: str, rclone_config: Path | None) -> None:
        """Upload SOURCE (a local file or folder) to DEST (s3://… or remote:path)."""
        chunk = _chunk(chunk_size)
        show = not no_progress and sys.stderr.isatty()
        if run_id:
            if dest is not None or not source:
                raise UsageError("with --run, give exactly one argument (DEST)", "corral push --run RUN s3://bucket/prefix")
            base = source.rstrip("/")
            todo = [(loc.path, f"{stage}/{key}/{_leaf(loc.uri)}") for stage, key, loc in run_outputs(run_id, None)
                    if loc.kind == "local" and os.path.exists(loc.path)]
            if not todo:
                raise UsageError(f"run {run_id} has no local outputs to push", "stages list theirs under `outputs:`")
            if parse(base).kind == "remote":
                _rclone_push_tree(todo, base, rclone_config)  # one rclone for the whole run
            else:
                for path, rel in todo:
                    copy_any(path, f"{base}/{rel}", concurrency=concurrency, chunk=chunk,
                             rclone_config=rclone_config, progress=show, exact=True)
            for _, rel in todo:
                click.echo(f"{base}/{rel}")
            return
        if not source or not dest:
            raise UsageError("push needs SOURCE and DEST", "corral push results/ s3://bucket/prefix")
        if parse(dest).kind == "local":
            raise UsageError(f"{dest} is a local path", "push copies to s3://… or remote:path; see `corral pull`")
        click.echo(copy_any(source, dest, concurrency=concurrency, chunk=chunk, rclone_config=rclone_config,
                            progress=show))


def _local_copy(src: Path, dst: Path) -> None:
    import shutil

    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    elif src.exists():
        shutil.copy2(src, dst)
    else:
        raise StorageError(f"{src}: output is missing", "the workspace may have been cleaned up already")
