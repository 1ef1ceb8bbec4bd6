"""The rclone binary: finding it, the user's config (only the remotes a workflow uses), argv.

Transfers run the real ``rclone`` with the same command line locally and on AWS::

    rclone copy|sync SRC DST [--filter RULE ...] --stats 30s --stats-one-line -v

Locally, a transfer is a child process of the scheduler running this module as a small
wrapper (``python -m corral.storage.rclone ...``): it writes the needed remotes of the user's
rclone.conf to a private temp file (mode 0600), points ``RCLONE_CONFIG`` at it, runs rclone,
and deletes the file when rclone ends, is killed by a signal, or (after ``kill -9``) the next
time a wrapper starts. No config value ever appears in an argv, an environment given to a task,
a log or the state store.

``s3://bucket/key`` is handed to rclone as an on-the-fly S3 remote with ``env_auth`` (the usual
AWS credential chain: environment, profile, instance or job role), so it needs no rclone.conf.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from corral.errors import StorageError
from corral.storage.uri import Location

INSTALL_HINT = (
    "install rclone: `sudo apt-get install rclone` (Debian/Ubuntu), `brew install rclone` (macOS), "
    "or see https://rclone.org/install/"
)
STATS_FLAGS = ["--stats", "30s", "--stats-one-line", "-v"]
ENCRYPTED_MARK = "RCLONE_ENCRYPT_V0:"
_REF_RE = re.compile(r"(?:^|[\s,])([A-Za-z0-9_][A-Za-z0-9_.+@-]*):")

Config = dict[str, dict[str, str]]


# -- the binary ---------------------------------------------------------------------------------
def find_rclone() -> str:
    """Path of the rclone binary (``CORRAL_RCLONE`` overrides the PATH lookup)."""
    explicit = os.environ.get("CORRAL_RCLONE")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise StorageError(f"CORRAL_RCLONE={explicit} is not an executable file", INSTALL_HINT)
        return explicit
    found = shutil.which("rclone")
    if not found:
        raise StorageError("rclone is not installed (transfer stages and remote URIs need it)", INSTALL_HINT)
    return found


# -- the user's configuration -------------------------------------------------------------------
def default_config_path() -> Path:
    """The file rclone itself would read: ``$RCLONE_CONFIG``, else the XDG default."""
    env = os.environ.get("RCLONE_CONFIG")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    path = Path(xdg) / "rclone" / "rclone.conf"
    legacy = Path.home() / ".rclone.conf"
    if not path.exists() and legacy.exists():
        return legacy
    return path


def read_config(path: Path) -> Config:
    """Sections of an rclone.conf (missing file: no sections)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageError(f"{path}: cannot read the rclone config ({exc})", "check the file and its permissions") from None
    if ENCRYPTED_MARK in text:
        raise StorageError(
            f"{path}: the rclone config is encrypted, so corral cannot pick the remotes a workflow uses",
            "give corral a plain config holding only the needed remotes (RCLONE_CONFIG=/path/to/it), "
            "or define them with RCLONE_CONFIG_<NAME>_<OPTION> environment variables",
        )
    parser = configparser.RawConfigParser(strict=False, interpolation=None, default_section="\0")
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        line = getattr(exc, "lineno", None)
        where = f"{path}:{line}" if line else str(path)
        raise StorageError(f"{where}: not a valid rclone config ({type(exc).__name__})", "fix it with `rclone config`") from None
    return {s: dict(parser.items(s)) for s in parser.sections()}


def env_remote_defined(name: str, environ: dict[str, str] | None = None) -> bool:
    """True when ``RCLONE_CONFIG_<NAME>_TYPE`` defines the remote in the environment."""
    env = os.environ if environ is None else environ
    return f"RCLONE_CONFIG_{name.upper().replace('-', '_').replace('.', '_')}_TYPE" in env


def config_subset(config: Config, names: Iterable[str], *, source: Path | str = "rclone.conf") -> Config:
    """The named remotes and every remote they refer to (crypt, alias, union, chunker…)."""
    wanted = sorted(set(names))
    out: Config = {}
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        section = config.get(name)
        if section is None:
            if env_remote_defined(name):
                continue
            raise StorageError(
                f"rclone remote {name!r} is not configured in {source}",
                f"add it with `rclone config` (or set RCLONE_CONFIG to the file that has it); "
                f"configured remotes: {', '.join(sorted(config)) or '(none)'}",
            )
        out[name] = section
        for value in section.values():
            for ref in _REF_RE.findall(value):
                if ref in config and ref not in out:
                    todo.append(ref)
    return out


def render_config(config: Config) -> str:
    buf = io.StringIO()
    for name in sorted(config):
        buf.write(f"[{name}]\n")
        for k, v in config[name].items():
            buf.write(f"{k} = {v}\n")
        buf.write("\n")
    return buf.getvalue()


def _private_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"corral-rclone-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        os.chmod(d, 0o700)
    return d


def _sweep_stale(d: Path) -> None:
    """Remove config copies left behind by wrappers that were killed with SIGKILL."""
    for f in d.glob("*.conf"):
        pid_s = f.name.split("-", 1)[0]
        if not pid_s.isdigit():
            continue
        try:
            os.kill(int(pid_s), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                f.unlink()
        except PermissionError:
            pass


@contextlib.contextmanager
def temp_config(names: Iterable[str], *, config_path: Path | None = None) -> Iterator[Path]:
    """A private (0600) copy of only the named remotes, deleted on exit."""
    wanted = sorted(set(names))
    src = config_path or default_config_path()
    text = render_config(config_subset(read_config(src), wanted, source=src)) if wanted else ""
    d = _private_dir()
    _sweep_stale(d)
    fd, name = tempfile.mkstemp(prefix=f"{os.getpid()}-", suffix=".conf", dir=d)
    path = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(text)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- how each location is written for rclone ----------------------------------------------------
def _quote_opt(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def s3_connection(region: str | None = None, endpoint: str | None = None) -> str:
    """rclone's on-the-fly S3 remote using the standard AWS credential chain."""
    # rclone (1.60) always uses virtual-host addressing for provider=AWS; a custom endpoint (an
    # S3-compatible store, a test server) gets provider=Other with path-style addressing.
    # no_check_bucket: never HEAD or create the bucket before an upload. Without it rclone checks
    # the bucket and may try CreateBucket, which a job role (no s3:CreateBucket, ListBucket only
    # under its prefixes) is denied (rclone/rclone#4703, #5119; rclone docs, s3 `no_check_bucket`).
    opts = ["s3", "provider=Other" if endpoint else "provider=AWS", "env_auth=true", "no_check_bucket=true"]
    if region:
        opts.append(f"region={region}")
    if endpoint:
        opts += [f"endpoint={_quote_opt(endpoint)}", "force_path_style=true"]
    return ":" + ",".join(opts) + ":"


def local_s3_settings() -> tuple[str | None, str | None]:
    """Region and endpoint for S3 locally, as boto3 would pick them from the environment."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return region, endpoint


def target(loc: Location, *, s3: str | None = None) -> str:
    """How rclone takes this location."""
    if loc.kind == "local":
        return loc.path
    if loc.kind == "s3":
        conn = s3 if s3 is not None else s3_connection(*local_s3_settings())
        return f"{conn}{loc.bucket}/{loc.path}" if loc.path else f"{conn}{loc.bucket}"
    return loc.uri


def check_filters(filters: list[str]) -> None:
    for f in filters:
        if not isinstance(f, str) or len(f) < 3 or f[:2] not in ("+ ", "- "):
            raise StorageError(
                f"filter {f!r} is not an rclone filter rule",
                "write `+ PATTERN` to include or `- PATTERN` to exclude (e.g. '+ *.nwb', '- *')",
            )


def _check_sync_dest(loc: Location, base_dir: Path | None) -> None:
    if loc.kind != "local":
        return
    p = Path(loc.path).resolve()
    danger = {Path("/"), Path.home().resolve()}
    if base_dir is not None:
        danger.add(base_dir.resolve())
    if p in danger or any(d.is_relative_to(p) for d in danger if d != Path("/")):
        raise StorageError(
            f"refusing to sync into {loc.path}: sync deletes every file there that the source lacks",
            "sync into a dedicated folder (or use mode: copy)",
        )


def command(
    mode: str, src: Location, dst: Location, filters: list[str], *, s3: str | None = None,
    base_dir: Path | None = None,
) -> list[str]:
    """rclone's arguments (without the binary): the same locally and in the AWS job."""
    if mode not in ("copy", "sync"):
        raise StorageError(f"transfer mode {mode!r} is not copy or sync", "write `mode: copy` or `mode: sync`")
    check_filters(filters)
    if mode == "sync":
        _check_sync_dest(dst, base_dir)
    args = [mode, target(src, s3=s3), target(dst, s3=s3)]
    for f in filters:
        args += ["--filter", f]
    return args + STATS_FLAGS


def wrapper_argv(rclone_args: list[str], remotes: Iterable[str], *, config_path: Path | None = None) -> list[str]:
    """argv of a local transfer: this module as a wrapper around the rclone binary."""
    names = sorted(set(remotes))
    argv = [sys.executable, "-c", "import sys; from corral.storage.rclone import main; sys.exit(main(sys.argv[1:]))"]
    if names:
        argv += ["--config-from", str(config_path or default_config_path()), "--remotes", ",".join(names)]
    return [*argv, "--", find_rclone(), *rclone_args]


# -- listing (skip-if-done checks on remotes) ---------------------------------------------------
def _parse_time(s: str) -> float | None:
    try:
        return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", s.replace("Z", "+00:00"))).timestamp()
    except (ValueError, TypeError):
        return None


def remote_times(loc: Location, *, config_path: Path | None = None) -> tuple[bool, float | None, float | None]:
    """(exists, oldest file time, newest file time) of a file or folder on an rclone remote."""
    names = [loc.remote] if loc.remote else []
    with temp_config(names, config_path=config_path) as conf:
        env = _child_env(dict(os.environ), conf)
        rc = find_rclone()
        tgt = target(loc)
        r = subprocess.run([rc, "lsjson", "--stat", tgt], capture_output=True, text=True, env=env, timeout=300)
        if r.returncode != 0:
            if "not found" in r.stderr:
                return False, None, None
            raise StorageError(f"{loc.uri}: rclone cannot list it: {_last_line(r.stderr)}", "check the remote with `rclone lsf`")
        stat = json.loads(r.stdout or "{}")
        if not stat.get("IsDir"):
            t = _parse_time(stat.get("ModTime", ""))
            return True, t, t
        r = subprocess.run(
            [rc, "lsjson", "-R", "--files-only", "--no-mimetype", tgt], capture_output=True, text=True, env=env,
            timeout=600,
        )
        if r.returncode != 0:
            raise StorageError(f"{loc.uri}: rclone cannot list it: {_last_line(r.stderr)}", "check the remote with `rclone lsf`")
        times = [_parse_time(e.get("ModTime", "")) for e in json.loads(r.stdout or "[]")]
        if not times:
            return False, None, None
        known = [t for t in times if t is not None]
        return True, min(known, default=None), max(known, default=None)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no message)"


# -- the wrapper process ------------------------------------------------------------------------
def _child_env(env: dict[str, str], conf: Path | None) -> dict[str, str]:
    env["RCLONE_CONFIG"] = str(conf) if conf else os.devnull
    # rclone's AWS SDK cannot load a custom CA bundle through its own HTTP transport; hand the
    # bundle to rclone's --ca-cert instead (see _ca_flags).
    env.pop("AWS_CA_BUNDLE", None)
    return env


def _ca_flags(args: list[str]) -> list[str]:
    bundle = os.environ.get("AWS_CA_BUNDLE")
    if bundle and "--ca-cert" not in args and any(a.startswith(":s3") for a in args):
        return ["--ca-cert", bundle]
    return []


def _aws_credentials_env(args: list[str], env: dict[str, str]) -> None:
    """Resolve AWS credentials (SSO, profiles…) the way boto3 does, for rclone's child only."""
    if "AWS_ACCESS_KEY_ID" in env or not any(a.startswith(":s3") for a in args):
        return
    from corral.aws_api import frozen_credentials

    frozen = frozen_credentials()
    if frozen is None:
        return
    env["AWS_ACCESS_KEY_ID"] = frozen.access_key
    env["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
    if frozen.token:
        env["AWS_SESSION_TOKEN"] = frozen.token


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signum)


def run_wrapped(argv: list[str]) -> int:
    """``[--config-from PATH --remotes a,b] -- rclone ARGS...``: run rclone with a private config."""
    config_from: Path | None = None
    remotes: list[str] = []
    if "--" not in argv:
        print("usage: python -m corral.storage.rclone [--config-from F --remotes a,b] -- rclone ARGS", file=sys.stderr)
        return 2
    sep = argv.index("--")
    opts, cmd = argv[:sep], argv[sep + 1 :]
    i = 0
    while i < len(opts):
        if opts[i] == "--config-from":
            config_from = Path(opts[i + 1])
        elif opts[i] == "--remotes":
            remotes = [r for r in opts[i + 1].split(",") if r]
        i += 2
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise_stop)
    proc: subprocess.Popen[bytes] | None = None
    try:
        ctx = temp_config(remotes, config_path=config_from) if remotes else contextlib.nullcontext(None)
        with ctx as conf:
            env = _child_env(dict(os.environ), conf)
            _aws_credentials_env(cmd, env)
            proc = subprocess.Popen([*cmd, *_ca_flags(cmd)], env=env)
            return proc.wait()
    except _Stop as stop:
        if proc is not None and proc.poll() is None:
            proc.send_signal(stop.signum)
            with contextlib.suppress(_Stop, subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
        return 128 + stop.signum
    except StorageError as exc:
        print(f"corral: error: {exc.one_line()}", file=sys.stderr)
        if exc.hint:
            print(f"corral: hint: {exc.hint}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"corral: error: cannot run {cmd[0] if cmd else 'rclone'}: {exc.strerror}", file=sys.stderr)
        print(f"corral: hint: {INSTALL_HINT}", file=sys.stderr)
        return 127


main = run_wrapped

if __name__ == "__main__":
    sys.exit(run_wrapped(sys.argv[1:]))
