"""Transfers and cleanup as AWS Batch jobs: pure functions the AWS backend builds its payloads from.

A transfer task runs the same rclone command line as locally (:func:`corral.storage.rclone.command`)
inside a container, as the argv :func:`transfer_container_argv` returns::

    /bin/sh -c TRANSFER_SCRIPT corral-transfer copy SRC DST [--filter R ...] --stats 30s ...

The script writes the rclone config from the environment variable ``CORRAL_RCLONE_CONFIG`` to a
0600 temp file, unsets the variable and runs ``rclone "$@"`` (forwarding SIGTERM). That variable is
filled by ECS from a Secrets Manager secret listed in the job definition's ``secrets``
(:func:`secret_env`), so the config is never in a job definition, the overrides, a log or the
state table. The secret (only the remotes the workflow's transfers use) is made by
:func:`prepare_rclone_secret` and removed with the run (:mod:`corral.storage.secrets`).

``s3://`` URIs become rclone's on-the-fly S3 remote with ``env_auth`` (the job role's credentials);
``workspace://x`` becomes ``<workdir>/x`` on the run's EFS workspace. Paths on the submitting
machine cannot be reached from a job: a local ``from:`` is uploaded first
(:func:`stage_local_source`, under :func:`staged_root`) and the job reads that copy; a local
``to:`` is refused. With ``aws: secrets: ssm`` the config secret is an SSM SecureString instead
(:func:`corral.storage.secrets.create_parameter`).

The image: by default corral's copy, in the account's ECR, of the official rclone image pinned by
version and digest (:data:`RCLONE_SOURCE`), with its ``ENTRYPOINT ["rclone"]`` removed (Batch cannot
override an entrypoint); :mod:`corral.backends.aws_batch.rclone_image` makes the copy without a
container engine and job definitions name it by digest. Nothing is installed when a job runs: the
script only checks that ``rclone`` is there. ``CORRAL_RCLONE_IMAGE`` names another image instead
(it must have ``/bin/sh``, ``base64``, ``gzip``, ``sed`` and ``rclone``, and no ENTRYPOINT).
"""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path
from typing import Any

from corral.errors import StorageError
from corral.jobshell import RUN_FORWARDING
from corral.storage import rclone
from corral.storage.secrets import create_secret
from corral.storage.uri import WORKSPACE, Location, parse, remote_names

CONFIG_ENV = "CORRAL_RCLONE_CONFIG"
IMAGE_ENV = "CORRAL_RCLONE_IMAGE"
SOURCE_ENV = "CORRAL_RCLONE_SOURCE"
# The official image (Docker Hub rclone/rclone, also ghcr.io/rclone/rclone), pinned by version AND by
# the digest of its multi-platform index. The digest could not be checked against the registry here
# (no network): it is the one independent public repositories pin for tag 1.74.4 (README, "Transfers
# on AWS"). corral checks every manifest and blob it copies against it, so a wrong digest fails the
# copy with one line; it can never run another image.
RCLONE_VERSION = "1.74.4"
RCLONE_SOURCE = (
    f"docker.io/rclone/rclone:{RCLONE_VERSION}"
    "@sha256:c61954aaa32328a5486715dd063a81c7879f5195ad3505cd362deddd509dc4a1"
)
RCLONE_REPOSITORY = "corral/rclone"  # in the account's ECR (tag-immutable)


def rclone_target_tag(tag: str, digest: str) -> str:
    """The tag of corral's copy of a source image: its tag and the first 12 hex of its digest."""
    return f"{tag}-{digest.split(':', 1)[-1][:12]}"


def default_rclone_image() -> str:
    """``ecr://corral/rclone:<version>-<digest12>`` (of ``CORRAL_RCLONE_SOURCE`` when set)."""
    source = os.environ.get(SOURCE_ENV) or RCLONE_SOURCE
    rest, _, digest = source.partition("@")
    last = rest.rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[1] if ":" in last else "latest"
    return f"ecr://{RCLONE_REPOSITORY}:{rclone_target_tag(tag, digest)}"


# Run as CORRAL_PROGRAM by the job's wrapper, with rclone's arguments. Installs nothing: an image
# without rclone fails at once (127) saying so.
TRANSFER_SCRIPT = """set -eu
""" + RUN_FORWARDING + """if ! command -v rclone >/dev/null 2>&1; then
  echo "corral: error: rclone is not in this image (corral installs nothing at run time)" >&2
  echo "corral: hint: unset CORRAL_RCLONE_IMAGE to use corral's pinned rclone image, or name one with rclone" >&2
  exit 127
fi
umask 077
conf=$(mktemp "${TMPDIR:-/tmp}/corral-rclone.XXXXXX")
trap 'rm -f "$conf"' EXIT
printf '%s\\n' "${CORRAL_RCLONE_CONFIG:-}" > "$conf"
unset CORRAL_RCLONE_CONFIG
export RCLONE_CONFIG="$conf"
run_forwarding rclone "$@"
exit "$rc"
"""

CLEANUP_SCRIPT = """set -eu
d=$1
root=$2
case "$d" in "$root"/?*) ;; *) echo "corral: refusing to remove $d: not under $root" >&2; exit 2 ;; esac
case "$d/" in */../*|*/./*) echo "corral: refusing to remove $d: not a plain path" >&2; exit 2 ;; esac
rm -rf -- "$d"
echo "corral: removed workspace $d" >&2
"""


def rclone_image(override: str | None = None) -> str:
    """The image transfer jobs run in: ``override``, else ``CORRAL_RCLONE_IMAGE``, else corral's
    pinned copy (:func:`default_rclone_image`, an ``ecr://`` name the AWS backend resolves to the
    copy's digest, see :func:`corral.backends.aws_batch.rclone_image.ensure_rclone_image`)."""
    return override or os.environ.get(IMAGE_ENV) or default_rclone_image()


def uses_default_rclone_image() -> bool:
    """True when transfer jobs run in corral's pinned copy (``CORRAL_RCLONE_IMAGE`` is not set)."""
    return not os.environ.get(IMAGE_ENV)


def _job_location(uri: str, workdir: str) -> Location:
    loc = parse(uri, workdir=workdir, base_dir=Path("/nonexistent"))
    if loc.kind == "local" and not uri.startswith(WORKSPACE):
        raise StorageError(
            f"{uri} is a path on this machine, which an AWS Batch job cannot reach",
            "use s3://bucket/key, workspace://path or an rclone remote (name:path) in transfers on AWS",
        )
    return loc


def transfer_container_argv(
    source: str, dest: str, *, mode: str, filters: list[str], workdir: str, region: str | None,
    endpoint: str | None = None,
) -> list[str]:
    """argv of one transfer task in its container (``source``/``dest`` rendered for the task).

    ``workdir`` is the run's workspace inside the container (the EFS mount); ``region`` is the
    region of the run's S3 buckets; ``endpoint`` is only for S3-compatible stores and tests.
    """
    src = _job_location(source, workdir)
    dst = _job_location(dest, workdir)
    args = rclone.command(mode, src, dst, filters, s3=rclone.s3_connection(region, endpoint))
    return ["/bin/sh", "-c", TRANSFER_SCRIPT, "corral-transfer", *args]


def transfer_container_command(
    source: str, dest: str, *, mode: str, filters: list[str], workdir: str, region: str | None,
    endpoint: str | None = None,
) -> str:
    """The same as :func:`transfer_container_argv`, as one shell command line."""
    return shlex.join(
        transfer_container_argv(source, dest, mode=mode, filters=filters, workdir=workdir, region=region,
                                endpoint=endpoint)
    )


def cleanup_container_argv(workdir: str, *, root: str) -> list[str]:
    """argv of the run's final cleanup job: ``rm -rf`` of ``workdir``, which must be under ``root``
    (e.g. ``/mnt/corral/runs``); the script refuses anything else."""
    root = root.rstrip("/")
    if not root.startswith("/") or not workdir.startswith(root + "/") or ".." in workdir.split("/"):
        raise StorageError(
            f"refusing to clean up {workdir}: it is not a run folder under {root}",
            "a run's workspace is <root>/<run id> on the EFS mount",
        )
    return ["/bin/sh", "-c", CLEANUP_SCRIPT, "corral-cleanup", workdir, root]


# -- whole tasks and stages (what the AWS backend's payload builder needs) --------------------------
def job_stage(stage: Any, *, secrets: dict[str, str] | None = None, image: str | None = None) -> Any:
    """A copy of a transfer stage (or a cleanup stage without a command) as its job definition
    should be built: in the rclone image (:func:`rclone_image`: ``image``, else ``CORRAL_RCLONE_IMAGE``,
    else the default — a ``defaults: image:`` meant for command stages is not used), with the
    rclone-config secret (``{CONFIG_ENV: ARN}`` from :func:`prepare_rclone_secret`) added to its
    ``secrets``. Other stages are returned unchanged."""
    if stage.kind not in ("transfer", "cleanup") or (stage.kind == "cleanup" and stage.command is not None):
        return stage
    extra = dict(secrets or {}) if stage.kind == "transfer" else {}
    return stage.model_copy(update={"image": rclone_image(image), "secrets": {**stage.secrets, **extra}})


def task_argv(
    task: Any, *, run_id: str, workdir: str, region: str | None, workspace_root: str,
    endpoint: str | None = None, stage_local: Any = None, base_dir: Path | None = None,
) -> list[str]:
    """argv of a transfer task, or of a cleanup task without a command, in its AWS job.

    ``stage_local(path) -> s3 URI`` (e.g. a partial of :func:`stage_local_source`) is called for a
    transfer whose ``from:`` is a path on this machine (relative paths are read against
    ``base_dir``, the workflow's folder); without it such a transfer is refused.
    Any other task: ``task.command(run_id, workdir)``.
    """
    from corral.plan import render

    stage = task.stage
    if stage.kind == "cleanup" and stage.command is None:
        return cleanup_container_argv(workdir, root=workspace_root)
    if stage.kind != "transfer":
        return list(task.command(run_id, workdir))
    values = task.values(run_id, workdir)
    source = render(stage.source or "", values)
    dest = render(stage.dest or "", values)
    if stage_local is not None and not source.startswith(WORKSPACE):
        loc = parse(source, base_dir=base_dir or Path.cwd())
        if loc.kind == "local":
            source = stage_local(loc.path)
    return transfer_container_argv(source, dest, mode=stage.mode, filters=task.filter_rules(run_id, workdir), workdir=workdir,
                                   region=region, endpoint=endpoint)


# -- local sources, staged to S3 ------------------------------------------------------------------
def staged_uri(local_path: str | Path, *, bucket: str, prefix: str, run_id: str) -> str:
    """Where a local file or folder is staged for a run's jobs (the same path gives the same URI)."""
    p = Path(local_path).resolve()
    digest = hashlib.sha256(str(p).encode()).hexdigest()[:12]
    return f"s3://{bucket}/{'/'.join(x for x in (prefix.strip('/'), 'staged', run_id, digest) if x)}/{p.name}"


def stage_local_source(
    s3: Any, local_path: str | Path, *, bucket: str, prefix: str, run_id: str, progress: Any = None,
) -> str:
    """Upload a local transfer source (file or folder) for the run's jobs; return its s3:// URI.

    Resumable: files already staged unchanged (same size and mtime) are not sent again. A folder
    becomes a prefix, a file an object, so ``rclone copy`` from the URI does what it did locally.
    """
    from corral.storage import s3 as s3mod

    p = Path(local_path)
    if not p.exists():
        raise StorageError(f"{p}: no such file or folder to stage for AWS", "check the transfer's `from:` path")
    uri = staged_uri(p, bucket=bucket, prefix=prefix, run_id=run_id)
    loc = parse(uri)
    s3mod.upload(s3, p, loc.bucket, loc.path, progress=progress, skip_unchanged=True)
    return uri


def staged_root(*, bucket: str, prefix: str, run_id: str) -> str:
    """``s3://bucket/<prefix>/staged/<run>/``: where every local source of the run is staged."""
    return f"s3://{bucket}/" + "/".join(x for x in (prefix.strip("/"), "staged", run_id) if x) + "/"


def delete_staged(s3: Any, *, bucket: str, prefix: str, run_id: str) -> int:
    """Remove what :func:`stage_local_source` uploaded for the run; the number of objects removed."""
    from corral.storage import s3 as s3mod

    root = parse(staged_root(bucket=bucket, prefix=prefix, run_id=run_id)).path
    keys = [o["Key"] for o in s3mod.list_objects(s3, bucket, root)]
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})
    return len(keys)


# -- the rclone config secret --------------------------------------------------------------------
def workflow_remotes(workflow: Any) -> set[str]:
    """rclone.conf remotes named by the workflow's transfer stages (``from``/``to``)."""
    uris = [u for s in workflow.stages if s.kind == "transfer" for u in (s.source, s.dest) if u]
    return remote_names(uris)


def rclone_config_text(names: set[str], *, config_path: Path | None = None) -> str:
    """The rclone.conf holding only ``names`` (and the remotes they refer to)."""
    src = config_path or rclone.default_config_path()
    return rclone.render_config(rclone.config_subset(rclone.read_config(src), names, source=src))


def prepare_rclone_secret(
    sm: Any, workflow: Any, run_id: str, *, config_path: Path | None = None, tags: dict[str, str] | None = None,
    prefix: str = "corral",
) -> dict[str, str]:
    """Store the workflow's rclone remotes as the run's secret.

    Returns ``{CONFIG_ENV: secret ARN}`` to add to transfer stages' job-definition ``secrets``
    (empty when the transfers use no rclone.conf remote: s3:// and workspace:// need none).
    """
    names = workflow_remotes(workflow)
    if not names:
        return {}
    arn = create_secret(sm, run_id=run_id, value=rclone_config_text(names, config_path=config_path),
                        purpose="rclone", prefix=prefix, tags=tags)
    return {CONFIG_ENV: arn}


def secret_env(secrets: dict[str, str]) -> list[dict[str, str]]:
    """Job-definition ``secrets`` entries: ``[{"name": ENV, "valueFrom": ARN}]``."""
    return [{"name": k, "valueFrom": v} for k, v in sorted(secrets.items())]
