"""Data locations a workflow names, and how each kind is reached.

=============================  ===========  ===============================================
written in the workflow         kind         reached with
=============================  ===========  ===============================================
``workspace://{session}/raw``   local        ``<workdir>/{session}/raw`` (the run's workspace)
``/abs/path``, ``rel/path``     local        relative paths are read against the workflow's folder
``file:///abs/path``            local
``s3://bucket/prefix``          s3           boto3 (checks, push/pull); rclone's S3 backend (transfers)
``gdrive:raw/{session}``        remote       rclone, with the remote from the user's rclone.conf
``:s3,provider=AWS:bucket/x``   remote       rclone's on-the-fly (connection string) remotes
=============================  ===========  ===============================================

As with rclone, a relative local path whose first part holds a colon must be written
``./name:x`` (else ``name`` is read as a remote).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from corral.errors import StorageError

WORKSPACE = "workspace://"
REMOTE_RE = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.+@-]*)((?:,[^:/]*)?):(.*)$", re.DOTALL)
SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

Kind = Literal["local", "s3", "remote"]


@dataclass(frozen=True)
class Location:
    """One parsed URI. ``path`` is an absolute local path, an S3 key, or the path on a remote."""

    uri: str
    kind: Kind
    path: str
    bucket: str = ""  # s3
    remote: str = ""  # rclone remote name; "" for on-the-fly ``:backend,...:`` remotes
    connection: str = ""  # remote: the part before the path, as rclone takes it (``gdrive:``)

    @property
    def local_path(self) -> Path:
        if self.kind != "local":
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.path)

    def __str__(self) -> str:
        return self.uri


def _workspace_path(uri: str, workdir: str) -> str:
    rest = uri[len(WORKSPACE) :]
    if rest.startswith("/") or ".." in rest.split("/"):
        raise StorageError(
            f"{uri}: a workspace path must stay inside the run's workspace",
            "write workspace://<relative/path> without `..` or a leading /",
        )
    if not workdir:
        raise StorageError(f"{uri}: this run has no workspace", "the backend must give the run a workdir")
    norm = posixpath.normpath(rest) if rest else "."
    return str(Path(workdir)) if norm == "." else str(Path(workdir) / norm)


def parse(uri: str, *, workdir: str = "", base_dir: Path | None = None) -> Location:
    """Parse a rendered URI (placeholders already filled in)."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError("an empty path or URI was given", "write a path, s3://bucket/key or remote:path")
    if uri.startswith(WORKSPACE):
        return Location(uri, "local", _workspace_path(uri, workdir))
    if uri.startswith("s3://"):
        rest = uri[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if not BUCKET_RE.match(bucket):
            raise StorageError(
                f"{uri}: {bucket!r} is not a valid S3 bucket name",
                "write s3://<bucket>/<key>; bucket names are 3-63 lower-case letters, digits, . and -",
            )
        return Location(uri, "s3", key, bucket=bucket)
    if uri.startswith("file://"):
        file_path = uri[len("file://") :]
        if not file_path.startswith("/"):
            raise StorageError(f"{uri}: a file:// URI needs an absolute path", "write file:///abs/path")
        return Location(uri, "local", str(Path(file_path)))
    m = SCHEME_RE.match(uri)
    if m:
        raise StorageError(
            f"{uri}: {m.group(1)}:// URIs are not supported",
            "use s3://, workspace://, a local path, or an rclone remote (`name:path`, see `rclone config`)",
        )
    if uri.startswith(":"):
        # rclone connection string: ":backend[,opt=val...]:path"; the path follows the last
        # colon outside quotes.
        end = _connection_end(uri)
        if end < 0:
            raise StorageError(f"{uri}: an on-the-fly rclone remote needs `:backend:path`", "see rclone.org/docs/#connection-strings")
        return Location(uri, "remote", uri[end + 1 :], connection=uri[: end + 1])
    m = REMOTE_RE.match(uri)
    if m:
        return Location(uri, "remote", m.group(3), remote=m.group(1), connection=m.group(1) + m.group(2) + ":")
    p = Path(uri).expanduser()
    if not p.is_absolute():
        p = (base_dir or Path.cwd()) / p
    return Location(uri, "local", str(p))


def _connection_end(uri: str) -> int:
    quote = ""
    for i, c in enumerate(uri):
        if i == 0:
            continue
        if quote:
            if c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == ":":
            return i
    return -1


def resolve(uri: str, *, workdir: str = "", base_dir: Path | None = None) -> str:
    """``workspace://x`` → ``<workdir>/x``; relative path → ``<base_dir>/x``; others unchanged."""
    loc = parse(uri, workdir=workdir, base_dir=base_dir)
    return loc.path if loc.kind == "local" else uri


def remote_names(uris: list[str]) -> set[str]:
    """Names of the rclone remotes (from rclone.conf) these URIs use."""
    out: set[str] = set()
    for u in uris:
        if not u or u.startswith((WORKSPACE, "s3://", "file://", ":")) or SCHEME_RE.match(u):
            continue
        m = REMOTE_RE.match(u)
        if m:
            out.add(m.group(1))
    return out
