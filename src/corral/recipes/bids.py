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
``files``       the scan's files (relative to ``path``) as a JSON list, at most the first 100
                (item fields become environment variables, which have a size limit)
``n_files``     how many files the scan has (all of them)
``counts``      files per datatype (``anat:2 dwi:4``)
``inherited``   a JSON list of the files above the scan (the dataset root, and ``sub-<label>/``
                for a session) that apply to it by the BIDS inheritance principle:
                ``dwi.bval``, ``task-rest_bold.json``, ``sub-01/sub-01_T1w.json``
``inherit_filter``  an rclone filter pattern matching exactly ``inherited`` from the root
==============  ===============================================================================

Datatypes, the ``sub``/``ses`` entities and what inherits come from the BIDS schema as the BIDS
project packages it (``bidsschematools.schema.load_schema()``), so a new datatype (``emg``, BIDS
1.11) needs a newer bidsschematools, not a new corral. Symlinked folders are followed (each real
folder once), as pybids does. A derivative dataset without per-subject folders is named as such.

S3 listing is paginated (ListObjectsV2, 1,000 keys a page); with a ``subjects`` filter only those
subjects' prefixes are listed. boto3 is imported only when an ``s3://`` dataset is read.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from corral.errors import CorralError, SpecError, did_you_mean
from corral.sources import Item, SourceContext, _check_unknown, _filter, register_source

MAX_FILES_LISTED = 100
KEYS = {"bids", "subjects", "sessions", "datatypes", "require", "require_session", "anonymous", "where"}


# -- the BIDS schema, as the BIDS project packages it ------------------------------------------------
@dataclass(frozen=True)
class BidsRules:
    """What the BIDS schema (``bidsschematools.schema.load_schema()``) says that corral uses."""

    version: str
    datatypes: tuple[str, ...]  # folder names: anat, func, dwi, ..., emg
    entities: dict[str, str]  # long name -> file-name key (subject -> sub)
    inheritable: frozenset[tuple[str | None, str]]  # (suffix or None: the data file's own, extension)
    dataset_files: tuple[tuple[str, tuple[str, ...]], ...]  # top-level files: (stem or path, extensions)

    @property
    def sub(self) -> str:
        return self.entities["subject"]

    @property
    def ses(self) -> str:
        return self.entities["session"]


@cache
def bids_rules() -> BidsRules:
    try:
        from bidsschematools import schema as bids_schema
    except ImportError:
        raise SpecError(
            "reading BIDS datasets needs the BIDS schema (bidsschematools)",
            "pip install 'corral[bids]' (the BIDS project's own package of its schema)",
        ) from None
    s = bids_schema.load_schema()
    entities = {name: str(e["name"]) for name, e in s.objects.entities.items()}
    inheritable: set[tuple[str | None, str]] = {(None, str(s.objects.extensions["json"]["value"]))}  # sidecars
    for assoc in s.meta.associations.values():
        if assoc.get("inherit"):
            target = assoc["target"]
            inheritable.add((target.get("suffix"), str(target["extension"])))
    dataset_files: list[tuple[str, tuple[str, ...]]] = []
    for group in ("core", "tables"):
        for rule in s.rules.files.common[group].values():
            if "entities" in rule:
                continue  # sub-<label>_sessions.tsv and the like live below the top level
            if "path" in rule:
                dataset_files.append((str(rule["path"]), ("",)))
            elif "stem" in rule:
                dataset_files.append((str(rule["stem"]), tuple(str(x) for x in rule.get("extensions", [""]))))
    return BidsRules(
        version=str(s["bids_version"]), datatypes=tuple(str(d) for d in s.objects.datatypes),
        entities=entities, inheritable=frozenset(inheritable), dataset_files=tuple(dataset_files),
    )


def split_name(name: str) -> tuple[dict[str, str], str, str]:
    """``sub-01_task-rest_bold.nii.gz`` -> ({sub: 01, task: rest}, "bold", ".nii.gz")."""
    stem, dot, ext = name.partition(".")
    parts = stem.split("_")
    entities = dict(p.split("-", 1) for p in parts[:-1] if "-" in p)
    last = parts[-1]
    if "-" in last:  # no suffix
        k, v = last.split("-", 1)
        entities[k] = v
        last = ""
    return entities, last, (dot + ext) if dot else ""


@dataclass
class Scan:
    subject: str
    session: str
    files: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # datatype -> entries


# -- listing --------------------------------------------------------------------------------------
@dataclass
class Listing:
    """A dataset's scans, plus the files above them that apply by inheritance."""

    scans: dict[tuple[str, str], Scan] = field(default_factory=dict)
    top: list[str] = field(default_factory=list)  # files at the dataset root
    subject_level: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # in sub-<label>/


def _add(listing: Listing, rel: str, rules: BidsRules) -> None:
    """Record one file (relative to the dataset root, '/'-separated) where it belongs."""
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p.startswith(".") for p in parts):
        return
    if len(parts) == 1:
        listing.top.append(parts[0])
        return
    sub, ses = f"{rules.sub}-", f"{rules.ses}-"
    if not parts[0].startswith(sub):
        return
    subject = parts[0][len(sub):]
    if len(parts) == 2:
        listing.subject_level[subject].append(parts[1])  # sub-01_sessions.tsv, inherited sidecars
        return
    session = ""
    rest = parts[1:]
    if rest[0].startswith(ses):
        session = rest[0][len(ses):]
        rest = rest[1:]
    if len(rest) < 2 or rest[0] not in rules.datatypes:
        return  # ses-1/sub-01_ses-1_scans.tsv, unknown folders
    scan = listing.scans.setdefault((subject, session), Scan(subject, session))
    # A file, or a folder that is one recording (e.g. a CTF .ds folder): its first part counts once.
    scan.files[rest[0]].add(rest[1])


def list_local(root: Path, subjects: list[str] | None, rules: BidsRules | None = None) -> Listing:
    """Walk the dataset, following symlinked folders as pybids does (DataLad datasets are made of
    symlinks), each real folder once."""
    rules = rules or bids_rules()
    listing = Listing()
    sub = f"{rules.sub}-"
    for e in sorted(root.iterdir()):
        if e.is_file() and not e.name.startswith("."):
            listing.top.append(e.name)
    tops = [root / f"{sub}{s}" for s in subjects] if subjects else [
        e for e in sorted(root.iterdir()) if e.name.startswith(sub) and e.is_dir()
    ]
    seen: set[str] = set()
    for top in tops:
        if not top.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:  # a symlink loop, or a folder linked twice
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for name in filenames:
                _add(listing, f"{rel_dir}/{name}", rules)
    return listing


def read_description_local(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def s3_client(anonymous: bool = False) -> Any:
    """An S3 client (boto3 imported then only). Honours AWS_ENDPOINT_URL / AWS_PROFILE / region as boto3 does."""
    from corral.aws_api import default_client

    return default_client("s3", anonymous=anonymous, needed_for="reading s3:// BIDS datasets")


def list_s3(client: Any, bucket: str, prefix: str, subjects: list[str] | None,
            rules: BidsRules | None = None) -> tuple[Listing, int]:
    """All scans under s3://bucket/prefix, listing page by page; returns the listing and the key count."""
    rules = rules or bids_rules()
    listing = Listing()
    base = f"{prefix}/" if prefix else ""
    prefixes = [f"{base}{rules.sub}-{s}/" for s in subjects] if subjects else [f"{base}{rules.sub}-"]
    paginator = client.get_paginator("list_objects_v2")
    n = 0
    for page in paginator.paginate(Bucket=bucket, Prefix=base, Delimiter="/", PaginationConfig={"PageSize": 1000}):
        for obj in page.get("Contents", []):  # the dataset's top-level files
            n += 1
            _add(listing, obj["Key"][len(base):], rules)
    for pre in prefixes:
        for page in paginator.paginate(Bucket=bucket, Prefix=pre, PaginationConfig={"PageSize": 1000}):
            for obj in page.get("Contents", []):
                n += 1
                key = obj["Key"]
                if not key.endswith("/"):
                    _add(listing, key[len(base) :], rules)
    return listing, n


def read_description_s3(client: Any, bucket: str, prefix: str) -> dict[str, Any] | None:
    key = f"{prefix}/dataset_description.json" if prefix else "dataset_description.json"
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        data = json.loads(body)
    except Exception:  # noqa: BLE001 - no description is not an error here
        return None
    return data if isinstance(data, dict) else None


# -- inheritance -----------------------------------------------------------------------------------
def inherited_files(listing: Listing, scan: Scan, kept: dict[str, set[str]], rules: BidsRules) -> list[str]:
    """Files above the scan's folder (the dataset root; ``sub-<label>/`` when the scan is a
    session) that apply to one of its data files by the BIDS inheritance principle: entities a
    subset of the data file's, and a sidecar of the same suffix (``.json``, or an associated
    file the schema marks ``inherit``: ``dwi.bval``, ``dwi.bvec``) or an inherited association
    of its own suffix (``task-rest_events.tsv``). Paths relative to the dataset root."""
    data = [split_name(name) for entries in kept.values() for name in entries]
    sub, ses = rules.sub, rules.ses
    candidates = [(n, n) for n in listing.top]
    if scan.session:
        candidates += [(n, f"{sub}-{scan.subject}/{n}") for n in listing.subject_level.get(scan.subject, [])]
    out: list[str] = []
    for name, rel in candidates:
        ents, suffix, ext = split_name(name)
        if ents.get(sub, scan.subject) != scan.subject or ents.get(ses, scan.session) != scan.session:
            continue
        own = {k: v for k, v in ents.items() if k not in (sub, ses)}
        for d_ents, d_suffix, _ in data:
            if any(d_ents.get(k) != v for k, v in own.items()):
                continue
            if (suffix == d_suffix and (None, ext) in rules.inheritable) or (
                    suffix != d_suffix and (suffix, ext) in rules.inheritable):
                out.append(rel)
                break
    return sorted(out)


def rclone_filter(paths: list[str]) -> str:
    """One rclone filter pattern matching exactly these paths (from the transfer's root)."""
    if not paths:
        return "/dataset_description.json"  # pulled anyway: a rule that adds nothing
    return "/{{(" + "|".join(re.escape(p) for p in paths) + ")}}"


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


def _datatype_list(value: Any, ctx: SourceContext, key: str, rules: BidsRules) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ctx.error(f"`{key}` takes a list of datatypes", f"e.g. {key}: [anat, dwi]", key)
    for v in value:
        if v not in rules.datatypes:
            hint = did_you_mean(v, rules.datatypes, otherwise=f"BIDS {rules.version} datatypes are",
                                show=len(rules.datatypes))
            raise ctx.error(f"{v!r} is not a BIDS datatype", hint, key)
    return value


@register_source("bids")
def bids_source(spec: dict[str, Any], ctx: SourceContext) -> list[Item]:
    """One item per subject × session of a BIDS dataset, local or on S3 (see the module doc)."""
    _check_unknown(spec, KEYS, ctx)
    root = spec["bids"]
    if not isinstance(root, str) or not root.strip():
        raise ctx.error("`bids` takes a dataset folder or an s3:// URI", "e.g. items: {bids: s3://bucket/ds000114}", "bids")
    try:
        rules = bids_rules()
    except SpecError as exc:
        raise ctx.error(exc.message, exc.hint or "", "bids") from None
    if "://" in root:  # s3:// stays s3:// (and is refused below as naming no bucket)
        scheme, _, rest = root.partition("://")
        root = f"{scheme}://{rest.rstrip('/')}"
    else:
        root = root.rstrip("/") or "/"
    subjects = _labels(spec.get("subjects"), f"{rules.sub}-", ctx, "subjects")
    sessions = _labels(spec.get("sessions"), f"{rules.ses}-", ctx, "sessions")
    datatypes = _datatype_list(spec.get("datatypes"), ctx, "datatypes", rules)
    require = _datatype_list(spec.get("require"), ctx, "require", rules)
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
            raise ctx.error(f"{root!r} names no bucket", "write s3://bucket/prefix (e.g. s3://openneuro.org/ds000114)",
                            "bids")
        # With a subjects filter written as text, list only those subjects' prefixes (a number such
        # as 1 may stand for sub-01, so then everything is listed and matched below).
        raw = spec.get("subjects")
        exact = subjects is not None and all(isinstance(v, str) for v in (raw if isinstance(raw, list) else [raw]))
        listing, description = _list_s3_or_error(ctx, bucket, prefix, subjects if exact else None, anonymous, root,
                                                 rules)
    elif "://" in root:
        raise ctx.error(f"cannot read a BIDS dataset from {root!r}", "use a local folder or an s3:// URI", "bids")
    else:
        if anonymous:
            raise ctx.error("`anonymous` applies to s3:// datasets only", "remove it", "anonymous")
        path = ctx.resolve(root)
        if not path.is_dir():
            raise ctx.error(f"no such BIDS dataset folder: {path}", "check the path (relative to the workflow file)", "bids")
        listing = list_local(path, None, rules)
        description = read_description_local(path)
    scans = listing.scans
    known_subjects = sorted({s.subject for s in scans.values()})
    if not scans and subjects is None:
        if (description or {}).get("DatasetType") == "derivative":
            raise ctx.error(
                f"{root} is a derivative dataset (dataset_description.json: DatasetType: derivative) with no "
                f"per-subject scans ({rules.sub}-*/[{rules.ses}-*/]<datatype>/)",
                "point `bids` at a raw dataset (or a derivative with per-subject folders); a dataset such as an "
                "atlas has no scans to run an app on", "bids",
            )
        hint = ("point `bids` at the dataset's root folder (the one holding dataset_description.json)"
                if description is None else
                f"its subject folders hold none of BIDS {rules.version}'s datatypes: {', '.join(rules.datatypes)}")
        raise ctx.error(f"no scans found in {root}: no {rules.sub}-*/[{rules.ses}-*/]<datatype>/ files", hint, "bids")
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
        rel = f"{rules.sub}-{subject}/{rules.ses}-{session}" if session else f"{rules.sub}-{subject}"
        files = [f"{d}/{name}" for d in sorted(kept) for name in sorted(kept[d])]
        inherited = inherited_files(listing, scan, kept, rules)
        items.append({
            "subject": subject,
            "session": session,
            "path": rel,
            "uri": f"{root}/{rel}",
            "datatypes": " ".join(sorted(kept)),
            "files": json.dumps(files[:MAX_FILES_LISTED], ensure_ascii=False),
            "n_files": len(files),
            "counts": " ".join(f"{d}:{len(kept[d])}" for d in sorted(kept)),
            "inherited": json.dumps(inherited, ensure_ascii=False),
            "inherit_filter": rclone_filter(inherited),
        })
    return _filter(items, spec.get("where"), ctx)


def _list_s3_or_error(
    ctx: SourceContext, bucket: str, prefix: str, subjects: list[str] | None, anonymous: bool, root: str,
    rules: BidsRules,
) -> tuple[Listing, dict[str, Any] | None]:
    try:
        client = s3_client(anonymous)
    except CorralError as exc:  # no boto3
        raise ctx.error(exc.message, exc.hint or "pip install 'corral[aws]'", "bids") from None
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    from corral.aws_api import error_code

    try:
        listing, _ = list_s3(client, bucket, prefix, subjects, rules)
    except NoCredentialsError:
        raise ctx.error(
            f"no AWS credentials to list {root}",
            "configure credentials (aws configure / AWS_PROFILE), or add `anonymous: true` for a public bucket",
            "bids",
        ) from None
    except ClientError as exc:
        code = error_code(exc)
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
    description = read_description_s3(client, bucket, prefix) if not listing.scans else None
    return listing, description
