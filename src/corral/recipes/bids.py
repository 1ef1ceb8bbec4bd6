"""BIDS datasets as item sources: one item per subject × session (a "scan").

    items:
      bids: s3://openneuro.org/ds000114     # or a local folder (relative to the workflow file)
      subjects: ["01", "02"]                # optional filters; "sub-" prefix optional
      sessions: [test]                      # "ses-" prefix optional
      datatypes: [dwi, anat]                # keep only these datatypes' files; drop scans with none
      require: [dwi, anat]                  # drop scans that lack any of these datatypes
      require_session: true                 # drop subjects without ses-* folders
      anonymous: true                       # s3: unsigned requests (public buckets such as OpenNeuro)

Subjects without ``ses-*`` folders give one item with an empty ``session``. Item fields:

==============  ===============================================================================
``subject``     the label without ``sub-`` (``01``)
``session``     the label without ``ses-``, or empty when the subject has no sessions
``path``        ``sub-01/ses-test`` (or ``sub-01``), relative to the dataset root
``uri``         the dataset root as written, joined with ``path`` (for ``from:``/``to:``)
``datatypes``   the datatypes present, space-separated and sorted (``anat dwi``)
``files``       the scan's files (relative to ``path``), space-separated; past 100 files, the
                first 100 and then ``...+N`` (item fields become environment variables, which
                have a size limit)
``n_files``     how many files the scan has (all of them)
``counts``      files per datatype (``anat:2 dwi:4``)
==============  ===============================================================================

S3 listing is paginated (ListObjectsV2, 1,000 keys a page); with a ``subjects`` filter only those
subjects' prefixes are listed. boto3 is imported only when an ``s3://`` dataset is read.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import did_you_mean
from corral.sources import Item, SourceContext, _check_unknown, _filter, register_source

# The datatype folders of the BIDS specification (raw data).
DATATYPES = (
    "anat", "func", "dwi", "fmap", "perf", "eeg", "meg", "ieeg", "beh", "pet", "micr", "nirs", "motion", "mrs",
)
MAX_FILES_LISTED = 100
KEYS = {"bids", "subjects", "sessions", "datatypes", "require", "require_session", "anonymous", "where"}


@dataclass
class Scan:
    subject: str
    session: str
    files: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # datatype -> entries


# -- listing --------------------------------------------------------------------------------------
def _add(scans: dict[tuple[str, str], Scan], rel: str) -> None:
    """Record one path (relative to the dataset root, '/'-separated) into the scans it belongs to."""
    parts = [p for p in rel.split("/") if p]
    if len(parts) < 2 or not parts[0].startswith("sub-") or any(p.startswith(".") for p in parts):
        return
    subject = parts[0][4:]
    session = ""
    rest = parts[1:]
    if rest[0].startswith("ses-"):
        session = rest[0][4:]
        rest = rest[1:]
    if len(rest) < 2 or rest[0] not in DATATYPES:
        return  # sub-01/sub-01_sessions.tsv, ses-1/sub-01_ses-1_scans.tsv, unknown folders
    scan = scans.setdefault((subject, session), Scan(subject, session))
    # A file, or a folder that is one recording (e.g. a CTF .ds folder): its first part counts once.
    scan.files[rest[0]].add(rest[1])


def list_local(root: Path, subjects: list[str] | None) -> dict[tuple[str, str], Scan]:
    scans: dict[tuple[str, str], Scan] = {}
    tops = [root / f"sub-{s}" for s in subjects] if subjects else [
        e for e in root.iterdir() if e.name.startswith("sub-") and e.is_dir()
    ]
    for top in tops:
        if not top.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for name in filenames:
                _add(scans, f"{rel_dir}/{name}")
    return scans


def s3_client(anonymous: bool = False) -> Any:
    """An S3 client (boto3 imported here only). Honours AWS_ENDPOINT_URL / AWS_PROFILE / region as boto3 does."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(retries={"mode": "adaptive", "max_attempts": 10})
    if anonymous:
        config = config.merge(Config(signature_version=UNSIGNED))
    return boto3.client("s3", config=config)


def list_s3(client: Any, bucket: str, prefix: str, subjects: list[str] | None) -> tuple[dict[tuple[str, str], Scan], int]:
    """All scans under s3://bucket/prefix, listing page by page; returns the scans and the key count."""
    scans: dict[tuple[str, str], Scan] = {}
    base = f"{prefix}/" if prefix else ""
    prefixes = [f"{base}sub-{s}/" for s in subjects] if subjects else [f"{base}sub-"]
    paginator = client.get_paginator("list_objects_v2")
    n = 0
    for pre in prefixes:
        for page in paginator.paginate(Bucket=bucket, Prefix=pre, PaginationConfig={"PageSize": 1000}):
            for obj in page.get("Contents", []):
                n += 1
                key = obj["Key"]
                if not key.endswith("/"):
                    _add(scans, key[len(base) :])
    return scans, n


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


# -- the source -----------------------------------------------------------------------------------
def _labels(value: Any, prefix: str, ctx: SourceContext, key: str) -> list[str] | None:
    """Filter labels as text. YAML reads 01 as the number 1, so numbers also match zero-padded labels."""
    if value is None:
        return None
    if not isinstance(value, list):
        value = [value]
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ctx.error(f"`{key}` takes labels such as \"01\"", f"e.g. {key}: [\"01\", \"02\"]", key)
        s = str(v)
        out.append(s[len(prefix) :] if s.startswith(prefix) else s)
    return out


def _matches(label: str, wanted: list[str]) -> bool:
    return any(label == w or (w.isdigit() and label.isdigit() and int(label) == int(w)) for w in wanted)


def _datatype_list(value: Any, ctx: SourceContext, key: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ctx.error(f"`{key}` takes a list of datatypes", f"e.g. {key}: [anat, dwi]", key)
    for v in value:
        if v not in DATATYPES:
            hint = did_you_mean(v, DATATYPES, otherwise="BIDS datatypes are", show=len(DATATYPES))
            raise ctx.error(f"{v!r} is not a BIDS datatype", hint, key)
    return value


@register_source("bids")
def bids_source(spec: dict[str, Any], ctx: SourceContext) -> list[Item]:
    """One item per subject × session of a BIDS dataset, local or on S3 (see the module doc)."""
    _check_unknown(spec, KEYS, ctx)
    root = spec["bids"]
    if not isinstance(root, str) or not root.strip():
        raise ctx.error("`bids` takes a dataset folder or an s3:// URI", "e.g. items: {bids: s3://bucket/ds000114}", "bids")
    root = root.rstrip("/")
    subjects = _labels(spec.get("subjects"), "sub-", ctx, "subjects")
    sessions = _labels(spec.get("sessions"), "ses-", ctx, "sessions")
    datatypes = _datatype_list(spec.get("datatypes"), ctx, "datatypes")
    require = _datatype_list(spec.get("require"), ctx, "require")
    anonymous = spec.get("anonymous", False)
    if not isinstance(anonymous, bool):
        raise ctx.error("`anonymous` is true or false", "anonymous: true reads public buckets without credentials", "anonymous")
    require_session = spec.get("require_session", False)
    if not isinstance(require_session, bool):
        raise ctx.error("`require_session` is true or false", "require_session: true drops subjects without sessions",
                        "require_session")

    if root.startswith("s3://"):
        bucket, prefix = split_s3(root)
        if not bucket:
            raise ctx.error(f"{root!r} names no bucket", "write s3://bucket/prefix", "bids")
        # With a subjects filter written as text, list only those subjects' prefixes (a number such
        # as 1 may stand for sub-01, so then everything is listed and matched below).
        raw = spec.get("subjects")
        exact = subjects is not None and all(isinstance(v, str) for v in (raw if isinstance(raw, list) else [raw]))
        scans = _list_s3_or_error(ctx, bucket, prefix, subjects if exact else None, anonymous, root)
    elif "://" in root:
        raise ctx.error(f"cannot read a BIDS dataset from {root!r}", "use a local folder or an s3:// URI", "bids")
    else:
        if anonymous:
            raise ctx.error("`anonymous` applies to s3:// datasets only", "remove it", "anonymous")
        path = ctx.resolve(root)
        if not path.is_dir():
            raise ctx.error(f"no such BIDS dataset folder: {path}", "check the path (relative to the workflow file)", "bids")
        scans = list_local(path, None)
    known_subjects = sorted({s.subject for s in scans.values()})
    if not scans and subjects is None:
        raise ctx.error(
            f"no scans found in {root}: no sub-*/[ses-*/]<datatype>/ files",
            "point `bids` at the dataset's root folder (the one holding dataset_description.json)", "bids",
        )
    if subjects is not None:
        for w in subjects:
            if not any(_matches(k, [w]) for k in known_subjects):
                hint = did_you_mean(w, known_subjects, quote=repr, otherwise="subjects are")
                raise ctx.error(f"no subject {w!r} with scans in {root}", hint, "subjects")
    if sessions is not None:
        known_sessions = sorted({s.session for s in scans.values() if s.session})
        for w in sessions:
            if not any(_matches(k, [w]) for k in known_sessions):
                hint = did_you_mean(w, known_sessions, quote=repr, otherwise="sessions are")
                raise ctx.error(f"no session {w!r} in {root}", hint, "sessions")

    items: list[Item] = []
    for (subject, session), scan in sorted(scans.items()):
        if subjects is not None and not _matches(subject, subjects):
            continue
        if sessions is not None and not _matches(session, sessions):
            continue
        if require_session and not session:
            continue
        if require and not all(scan.files.get(d) for d in require):
            continue
        kept = {d: entries for d, entries in scan.files.items() if entries and (datatypes is None or d in datatypes)}
        if not kept:
            continue
        rel = f"sub-{subject}/ses-{session}" if session else f"sub-{subject}"
        files = [f"{d}/{name}" for d in sorted(kept) for name in sorted(kept[d])]
        listed = files[:MAX_FILES_LISTED]
        if len(files) > MAX_FILES_LISTED:
            listed.append(f"...+{len(files) - MAX_FILES_LISTED}")
        items.append({
            "subject": subject,
            "session": session,
            "path": rel,
            "uri": f"{root}/{rel}",
            "datatypes": " ".join(sorted(kept)),
            "files": " ".join(listed),
            "n_files": len(files),
            "counts": " ".join(f"{d}:{len(kept[d])}" for d in sorted(kept)),
        })
    return _filter(items, spec.get("where"), ctx)


def _list_s3_or_error(
    ctx: SourceContext, bucket: str, prefix: str, subjects: list[str] | None, anonymous: bool, root: str
) -> dict[tuple[str, str], Scan]:
    try:
        client = s3_client(anonymous)
    except ImportError:
        raise ctx.error("reading s3:// BIDS datasets needs boto3", "pip install 'corral[aws]'", "bids") from None
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        scans, _ = list_s3(client, bucket, prefix, subjects)
    except NoCredentialsError:
        raise ctx.error(
            f"no AWS credentials to list {root}",
            "configure credentials (aws configure / AWS_PROFILE), or add `anonymous: true` for a public bucket",
            "bids",
        ) from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise ctx.error(f"bucket {bucket!r} does not exist", "check the s3:// URI", "bids") from None
        if code in ("AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise ctx.error(
                f"not allowed to list {root} ({code})",
                "check your AWS credentials, or add `anonymous: true` for a public bucket such as OpenNeuro's",
                "bids",
            ) from None
        raise ctx.error(f"cannot list {root}: {code or exc}", "check the URI and your AWS settings", "bids") from None
    except BotoCoreError as exc:
        raise ctx.error(f"cannot list {root}: {exc}", "check the network and your AWS settings", "bids") from None
    return scans
