"""Data movement: URIs, skip-if-done checks, transfers and the run workspace.

What backends call:

- :func:`resolve_uri` — ``workspace://x`` → ``<workdir>/x``; relative path → ``<base_dir>/x``.
- :func:`outputs_exist` — a task is skipped when all its outputs exist and none is older than
  any of its inputs (where times are known: local mtimes, S3 LastModified, rclone ModTime).
- :func:`transfer_argv` — the child process that performs one transfer locally (the real rclone,
  wrapped so the user's rclone.conf is handed over as a private temp copy of the used remotes).
- :func:`cleanup_workspace` / :func:`cleanup_argv` — remove exactly the run's workspace.
- :func:`check_stage` — refuse, before anything runs, a transfer that can never work (no rclone,
  unknown remote, bad filter, dangerous sync).

The AWS side (the rclone job's command, the config as a Secrets Manager secret) is in
:mod:`corral.storage.aws` and :mod:`corral.storage.secrets`. Heavy modules (boto3) are imported
only when used.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from corral.errors import StorageError
from corral.storage.local import cleanup_argv, cleanup_workspace, path_times, prepare_workspace
from corral.storage.uri import Location, parse, remote_names

__all__ = [
    "Location", "check_stage", "check_workflow", "cleanup_argv", "cleanup_workspace", "outputs_exist", "parse",
    "prepare_workspace", "remote_names", "resolve_uri", "transfer_argv", "uri_times",
]

_clients: dict[tuple[str | None, str | None], Any] = {}
_clients_lock = threading.Lock()


def _default_s3() -> Any:
    from corral.storage.rclone import local_s3_settings
    from corral.storage.s3 import s3_client

    region, endpoint = local_s3_settings()
    key = (region, endpoint)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = s3_client(region=region, endpoint_url=endpoint)
        return _clients[key]


def resolve_uri(uri: str, *, run_id: str, workdir: str, base_dir: Path) -> str:
    """``workspace://x`` → ``<workdir>/x``; a relative path → ``<base_dir>/x``; others unchanged."""
    loc = parse(uri, workdir=workdir, base_dir=base_dir)
    return loc.path if loc.kind == "local" else uri


def uri_times(
    loc: Location, *, s3: Any = None, rclone_config: Path | None = None,
) -> tuple[bool, float | None, float | None]:
    """(exists, oldest, newest) file time at a location (a folder: over the files in it)."""
    if loc.kind == "local":
        return path_times(Path(loc.path))
    if loc.kind == "s3":
        from corral.storage.s3 import object_times

        return object_times(s3 if s3 is not None else _default_s3(), loc.bucket, loc.path)
    from corral.storage.rclone import remote_times

    return remote_times(loc, config_path=rclone_config)


# S3 LastModified and many rclone remotes keep whole seconds: an output written in the same second
# as its input would otherwise look older than it (rsync's --modify-window, for the same reason).
MODIFY_WINDOW_S = 1.0


def outputs_exist(
    outputs: list[str], inputs: list[str], *, run_id: str, workdir: str, base_dir: Path,
    s3: Any = None, rclone_config: Path | None = None,
) -> bool:
    """True when every output exists and, where times are known, none is older than any input.

    No outputs: False (nothing says the task is done). A missing input does not prevent a skip.
    """
    if not outputs:
        return False
    oldest_out: float | None = None
    for uri in outputs:
        exists, oldest, _ = uri_times(parse(uri, workdir=workdir, base_dir=base_dir), s3=s3, rclone_config=rclone_config)
        if not exists:
            return False
        if oldest is not None:
            oldest_out = oldest if oldest_out is None else min(oldest_out, oldest)
    if oldest_out is None:
        return True
    for uri in inputs:
        _, _, newest = uri_times(parse(uri, workdir=workdir, base_dir=base_dir), s3=s3, rclone_config=rclone_config)
        if newest is not None and newest > oldest_out + MODIFY_WINDOW_S:
            return False
    return True


def transfer_argv(
    source: str, dest: str, *, mode: str, filters: list[str], run_id: str, workdir: str, base_dir: Path,
    rclone_config: Path | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv (and extra environment) of one transfer run as a local child process.

    ``source``/``dest`` are rendered URIs. The argv holds the path of the user's rclone.conf and
    the names of the remotes used, never a config value; the extra environment holds none either.
    """
    from corral.storage import rclone

    src = parse(source, workdir=workdir, base_dir=base_dir)
    dst = parse(dest, workdir=workdir, base_dir=base_dir)
    args = rclone.command(mode, src, dst, filters, base_dir=base_dir)
    if dst.kind == "local":
        Path(dst.path).parent.mkdir(parents=True, exist_ok=True)
    names = {loc.remote for loc in (src, dst) if loc.kind == "remote" and loc.remote}
    config = rclone_config or rclone.default_config_path()
    if names:
        # Fail here, with the remote's name, rather than in the child's log.
        rclone.config_subset(rclone.read_config(config), names, source=config)
    return rclone.wrapper_argv(args, names, config_path=config), {}


class _Dummy(dict[str, str]):
    """Stands in for item values when checking a URI's shape before items are known."""

    def __missing__(self, key: str) -> str:
        return "p0000"


def check_stage(stage: Any, *, rclone_config: Path | None = None) -> None:
    """Refuse, before anything starts, a stage whose data locations can never work here.

    Checks every stage's ``inputs``/``outputs`` and a transfer's ``from``/``to``: the URI's shape,
    the rclone binary (transfers, remote URIs), the remotes in rclone.conf, the filters. Raises
    :class:`StorageError` naming the stage. ``stage`` is a :class:`corral.spec.Stage`.
    """
    from corral.plan import render
    from corral.storage import rclone

    uris = list(stage.inputs) + list(stage.outputs)
    if stage.kind == "transfer":
        uris += [u for u in (stage.source, stage.dest) if u]
    try:
        rendered = [render(u, _Dummy()) for u in uris]
        for u in rendered:
            parse(u, workdir="/", base_dir=Path("/"))
        names = remote_names(rendered)
        if stage.kind == "transfer":
            rclone.check_filters(list(stage.filters))
        if stage.kind == "transfer" or names:
            rclone.find_rclone()
        if names:
            config = rclone_config or rclone.default_config_path()
            rclone.config_subset(rclone.read_config(config), names, source=config)
    except StorageError as exc:
        raise StorageError(f"stage {stage.name!r}: {exc.message}", exc.hint, where=exc.where) from None


def check_workflow(workflow: Any, *, rclone_config: Path | None = None) -> None:
    """:func:`check_stage` for every stage of a :class:`corral.spec.Workflow`."""
    for stage in workflow.stages:
        check_stage(stage, rclone_config=rclone_config)
