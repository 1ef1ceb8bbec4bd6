"""S3 against the moto server on 127.0.0.1: boto3's transfer manager (multipart, progress), rclone's
S3 backend both ways, and skip-if-done on S3 outputs."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from storage_helpers import make_tree, needs_rclone, tree

from corral import storage
from corral.errors import StorageError
from corral.storage import s3 as s3mod

MiB = 2**20


def _big_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def test_multipart_upload_and_download_with_progress(bucket: tuple[Any, str], tmp_path: Path) -> None:
    client, name = bucket
    data = _big_file(tmp_path / "big.bin", 11 * MiB + 123)
    cfg = s3mod.transfer_config(threshold=5 * MiB, chunksize=5 * MiB, concurrency=4)
    up = s3mod.CountingProgress()
    keys = s3mod.upload(client, tmp_path / "big.bin", name, "runs/r1/big.bin", config=cfg, progress=up)
    assert keys == ["runs/r1/big.bin"]
    head = client.head_object(Bucket=name, Key="runs/r1/big.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 1 MiB
    assert up.total == up.done == len(data) and up.calls >= 3

    down = s3mod.CountingProgress()
    out = tmp_path / "back"
    out.mkdir()
    files = s3mod.download(client, name, "runs/r1/big.bin", out, config=cfg, progress=down)
    assert files == [out / "big.bin"]
    assert (out / "big.bin").read_bytes() == data
    assert down.total == down.done == len(data)


def test_folder_upload_and_prefix_download(bucket: tuple[Any, str], tmp_path: Path) -> None:
    client, name = bucket
    make_tree(tmp_path / "res", {"s1/a.nwb": "A", "s2/b.nwb": "B", "summary.csv": "c"})
    keys = s3mod.upload(client, tmp_path / "res", name, "results/")
    assert sorted(keys) == ["results/s1/a.nwb", "results/s2/b.nwb", "results/summary.csv"]
    s3mod.download(client, name, "results", tmp_path / "pulled")
    assert tree(tmp_path / "pulled") == {"s1/a.nwb": "A", "s2/b.nwb": "B", "summary.csv": "c"}


def test_errors_name_the_uri(bucket: tuple[Any, str], tmp_path: Path) -> None:
    client, name = bucket
    with pytest.raises(StorageError) as ei:
        s3mod.download(client, name, "nothing/here", tmp_path / "x")
    assert f"s3://{name}/nothing/here" in ei.value.message and ei.value.hint
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError) as ei:
        s3mod.upload(client, tmp_path / "f", "no-such-bucket-here", "k")
    assert "s3://no-such-bucket-here/k" in ei.value.message and "NoSuchBucket" in ei.value.message


def test_outputs_exist_on_s3(bucket: tuple[Any, str], tmp_path: Path) -> None:
    client, name = bucket
    make_tree(tmp_path, {"in.txt": "i"})
    past = time.time() - 3600
    os.utime(tmp_path / "in.txt", (past, past))
    client.put_object(Bucket=name, Key="out/s1/result.nwb", Body=b"r")
    kw: dict[str, Any] = {"run_id": "r", "workdir": str(tmp_path / "ws"), "base_dir": tmp_path, "s3": client}
    assert storage.outputs_exist([f"s3://{name}/out/s1/result.nwb"], ["in.txt"], **kw) is True
    assert storage.outputs_exist([f"s3://{name}/out/s1"], ["in.txt"], **kw) is True  # a prefix
    assert storage.outputs_exist([f"s3://{name}/out/s2"], ["in.txt"], **kw) is False
    future = time.time() + 3600
    os.utime(tmp_path / "in.txt", (future, future))  # the input changed after the output was made
    assert storage.outputs_exist([f"s3://{name}/out/s1"], ["in.txt"], **kw) is False


def test_outputs_exist_uses_a_default_client_from_the_environment(bucket: tuple[Any, str], tmp_path: Path) -> None:
    client, name = bucket
    client.put_object(Bucket=name, Key="k", Body=b"r")
    kw: dict[str, Any] = {"run_id": "r", "workdir": str(tmp_path / "ws"), "base_dir": tmp_path}
    assert storage.outputs_exist([f"s3://{name}/k"], [], **kw) is True


@needs_rclone
def test_rclone_local_to_s3_and_back(bucket: tuple[Any, str], tmp_path: Path) -> None:
    """The real rclone with its S3 backend pointed at moto (endpoint from AWS_ENDPOINT_URL, credentials
    from the environment through env_auth) — nothing in argv but the endpoint."""
    client, name = bucket
    make_tree(tmp_path / "raw" / "s1", {"a.bin": "A" * 1000, "sub/b.txt": "B"})
    kw: dict[str, Any] = {"run_id": "r", "workdir": str(tmp_path / "ws"), "base_dir": tmp_path}
    argv, extra = storage.transfer_argv("raw/s1", f"s3://{name}/raw/s1", mode="copy", filters=[], **kw)
    assert "testing" not in " ".join(argv)  # credentials come from the environment, not argv
    r = subprocess.run(argv, env={**os.environ, **extra}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    listed = client.list_objects_v2(Bucket=name, Prefix="raw/s1/")
    assert sorted(o["Key"] for o in listed["Contents"]) == ["raw/s1/a.bin", "raw/s1/sub/b.txt"]

    argv, extra = storage.transfer_argv(
        f"s3://{name}/raw/s1", "workspace://s1/raw", mode="sync", filters=["- *.txt"], **kw
    )
    r = subprocess.run(argv, env={**os.environ, **extra}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "ws" / "s1" / "raw") == {"a.bin": "A" * 1000}
    assert storage.outputs_exist([f"s3://{name}/raw/s1"], ["raw/s1"], **kw) is True
