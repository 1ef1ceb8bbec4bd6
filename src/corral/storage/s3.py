"""S3 with boto3's transfer manager: multipart, concurrent, with progress callbacks.

Every function takes an S3 client (made by the caller, e.g. ``AwsClients``; :func:`s3_client`
makes a default one), so tests point them at the moto server. boto3 is imported inside
functions: ``import corral`` stays light.

Multipart upload/download, part concurrency, retries of parts and checksums are all boto3's
(``s3transfer.TransferManager``); nothing here splits or retries by hand.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from corral.aws_api import default_client, error_code
from corral.errors import CredentialsError, StorageError

MiB = 2**20
DEFAULT_THRESHOLD = 8 * MiB
DEFAULT_CHUNK = 8 * MiB
DEFAULT_CONCURRENCY = 8
MAX_PARTS = 10_000


class Progress(Protocol):
    """What a progress display implements (see ``corral.cli_storage`` for a rich bar)."""

    def add_total(self, nbytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


@dataclass
class CountingProgress:
    """A Progress that just counts (tests, logs)."""

    total: int = 0
    done: int = 0
    calls: int = 0

    def add_total(self, nbytes: int) -> None:
        self.total += nbytes

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        self.calls += 1


def s3_client(*, region: str | None = None, endpoint_url: str | None = None, profile: str | None = None) -> Any:
    """A default S3 client: the standard credential chain, adaptive retries."""
    return default_client("s3", region=region, endpoint_url=endpoint_url, profile=profile,
                          needed_for="s3:// paths", error=StorageError)


def transfer_config(
    *, threshold: int = DEFAULT_THRESHOLD, chunksize: int = DEFAULT_CHUNK, concurrency: int = DEFAULT_CONCURRENCY,
) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=threshold, multipart_chunksize=chunksize, max_concurrency=concurrency,
        use_threads=concurrency > 1,
    )


def _chunk_for(size: int, chunksize: int) -> int:
    """A part size that keeps a file under S3's 10,000-part limit."""
    need = -(-size // MAX_PARTS)
    return max(chunksize, need)


def _error(exc: BaseException, uri: str, action: str) -> StorageError | CredentialsError:
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return CredentialsError(
            f"cannot {action} {uri}: no AWS credentials", "run `aws configure` (or `aws sso login`), or set AWS_PROFILE"
        )
    client_error = exc if isinstance(exc, ClientError) else exc.__cause__
    code = error_code(client_error) if isinstance(client_error, ClientError) else ""
    hints = {
        "NoSuchBucket": "check the bucket name (and that it is in this account/region)",
        "NoSuchKey": "check the key with `aws s3 ls`",
        "404": "check the key with `aws s3 ls`",
        "AccessDenied": "your AWS identity may not read/write this bucket; check its policy",
        "403": "your AWS identity may not read/write this bucket; check its policy",
    }
    detail = code or type(exc).__name__
    return StorageError(f"cannot {action} {uri}: {detail}", hints.get(code, "check the S3 URI and your AWS access"))


def _uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _join(prefix: str, rel: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{rel}" if prefix else rel


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for f in sorted(files):
            yield Path(dirpath) / f


# -- transfers ----------------------------------------------------------------------------------
MTIME_META = "corral-mtime"


def _unchanged(client: Any, bucket: str, key: str, path: Path) -> bool:
    obj = head(client, bucket, key)
    if obj is None:
        return False
    st = path.stat()
    return int(obj.get("ContentLength", -1)) == st.st_size and obj.get("Metadata", {}).get(MTIME_META) == f"{st.st_mtime:.6f}"


def upload(
    client: Any, local: Path, bucket: str, key: str, *, config: Any = None, progress: Progress | None = None,
    skip_unchanged: bool = False,
) -> list[str]:
    """Upload a file to ``key`` (into ``key/`` when it ends with /), or a folder's files under ``key/``.

    Each object records the file's mtime (metadata ``corral-mtime``); with ``skip_unchanged`` a file
    whose object has the same size and mtime is not sent again (resumed staging). Returns the keys
    written or found unchanged.
    """
    from boto3.s3.transfer import ProgressCallbackInvoker, create_transfer_manager

    config = config or transfer_config()
    local = Path(local)
    if local.is_dir():
        pairs = [(p, _join(key, p.relative_to(local).as_posix())) for p in _walk_files(local)]
    elif local.is_file():
        pairs = [(local, _join(key, local.name) if (not key or key.endswith("/")) else key)]
    else:
        raise StorageError(f"{local}: no such file or folder to upload", "check the path")
    kept: list[str] = []
    if skip_unchanged:
        kept = [k for p, k in pairs if _unchanged(client, bucket, k, p)]
        pairs = [(p, k) for p, k in pairs if k not in set(kept)]
    total = sum(p.stat().st_size for p, _ in pairs)
    if progress:
        progress.add_total(total)
    biggest = max((p.stat().st_size for p, _ in pairs), default=0)
    config.multipart_chunksize = _chunk_for(biggest, config.multipart_chunksize)
    subscribers = [ProgressCallbackInvoker(progress.advance)] if progress else None
    done: list[str] = list(kept)
    with create_transfer_manager(client, config) as tm:
        futures = [
            (k, tm.upload(str(p), bucket, k, extra_args={"Metadata": {MTIME_META: f"{p.stat().st_mtime:.6f}"}},
                          subscribers=subscribers))
            for p, k in pairs
        ]
        for k, fut in futures:
            try:
                fut.result()
            except Exception as exc:  # s3transfer re-raises the worker's error here
                raise _error(exc, _uri(bucket, k), "upload to") from None
            done.append(k)
    return done


def list_objects(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Objects under ``prefix`` (folder markers ending in / left out)."""
    out: list[dict[str, Any]] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    except Exception as exc:
        raise _error(exc, _uri(bucket, prefix), "list") from None
    return out


def head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's metadata, or None when there is no object with exactly this key."""
    from botocore.exceptions import ClientError

    if not key or key.endswith("/"):
        return None
    try:
        return dict(client.head_object(Bucket=bucket, Key=key))
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise _error(exc, _uri(bucket, key), "read") from None
    except Exception as exc:
        raise _error(exc, _uri(bucket, key), "read") from None


def download(
    client: Any, bucket: str, key: str, local: Path, *, config: Any = None, progress: Progress | None = None,
) -> list[Path]:
    """Download one object (to ``local``, or into it when it is a folder) or every object under
    ``key/`` into the folder ``local``, keeping their relative paths. Returns the files written."""
    from boto3.s3.transfer import ProgressCallbackInvoker, create_transfer_manager

    config = config or transfer_config()
    local = Path(local)
    obj = head(client, bucket, key)
    if obj is not None:
        dest = local / PurePosixPath(key).name if local.is_dir() else local
        pairs = [(key, dest, int(obj.get("ContentLength", 0)))]
    else:
        prefix = key.rstrip("/") + "/" if key else ""
        objs = list_objects(client, bucket, prefix)
        if not objs:
            raise StorageError(f"{_uri(bucket, key)}: no such object or prefix", "check it with `aws s3 ls`")
        pairs = []
        root = local.resolve()
        for o in objs:
            rel = o["Key"][len(prefix) :]
            dest = (local / rel).resolve()
            if not dest.is_relative_to(root):
                raise StorageError(f"{_uri(bucket, o['Key'])}: key would be written outside {local}", "rename the key")
            pairs.append((o["Key"], dest, int(o.get("Size", 0))))
    if progress:
        progress.add_total(sum(s for _, _, s in pairs))
    config.multipart_chunksize = _chunk_for(max(s for _, _, s in pairs), config.multipart_chunksize)
    subscribers = [ProgressCallbackInvoker(progress.advance)] if progress else None
    written: list[Path] = []
    with create_transfer_manager(client, config) as tm:
        futures = []
        for k, dest, _size in pairs:
            dest.parent.mkdir(parents=True, exist_ok=True)
            futures.append((k, dest, tm.download(bucket, k, str(dest), subscribers=subscribers)))
        for k, dest, fut in futures:
            try:
                fut.result()
            except Exception as exc:
                raise _error(exc, _uri(bucket, k), "download") from None
            written.append(dest)
    return written


# -- skip-if-done -------------------------------------------------------------------------------
def object_times(client: Any, bucket: str, key: str) -> tuple[bool, float | None, float | None]:
    """(exists, oldest, newest) LastModified of an object, or of every object under ``key/``."""
    obj = head(client, bucket, key)
    if obj is not None:
        t = obj["LastModified"].timestamp()
        return True, t, t
    prefix = key.rstrip("/") + "/" if key else ""
    objs = list_objects(client, bucket, prefix)
    if not objs:
        return False, None, None
    times = [o["LastModified"].timestamp() for o in objs]
    return True, min(times), max(times)


ClientFactory = Callable[[], Any]
