"""Local files: existence and times (skip-if-done), and the run's workspace folder.

A folder counts as existing output when it holds at least one file (an empty folder is what a
task that failed early leaves behind). Its time, as an output, is its oldest file's; as an
input, its newest file's — so a task is skipped only when every part of every output is at
least as new as every part of every input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
from pathlib import Path

from corral.errors import StorageError

MARKER = ".corral-workspace"


def path_times(path: Path) -> tuple[bool, float | None, float | None]:
    """(exists, oldest file mtime, newest file mtime) of a file or folder (symlinks followed)."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False, None, None
    except OSError as exc:
        raise StorageError(f"{path}: cannot read it ({exc.strerror})", "check the path and its permissions") from None
    if not stat.S_ISDIR(st.st_mode):
        return True, st.st_mtime, st.st_mtime
    oldest: float | None = None
    newest: float | None = None
    for root, _dirs, files in os.walk(path, onerror=None):
        for f in files:
            if f == MARKER:
                continue
            try:
                m = os.stat(os.path.join(root, f)).st_mtime
            except OSError:
                continue
            oldest = m if oldest is None else min(oldest, m)
            newest = m if newest is None else max(newest, m)
    if oldest is None:
        return False, None, None
    return True, oldest, newest


def prepare_workspace(workdir: str | Path) -> Path:
    """Create the run's workspace (with a marker that lets :func:`cleanup_workspace` remove it)."""
    p = Path(workdir)
    p.mkdir(parents=True, exist_ok=True)
    marker = p / MARKER
    if not marker.exists():
        marker.write_text("corral run workspace: removed by the run's cleanup\n")
    return p


def _refuse(path: Path, why: str) -> StorageError:
    return StorageError(
        f"refusing to remove {path}: {why}",
        "a run's workspace is a folder of its own (corral creates it); check the workdir setting",
    )


def _corral_home() -> Path:
    env = os.environ.get("CORRAL_HOME")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_data_dir("corral", appauthor=False)).resolve()


def check_removable(workdir: str | Path) -> Path:
    """The workspace path, after checks that it cannot be something else than a run's folder."""
    if not str(workdir).strip():
        raise StorageError("no workspace path was given to remove", "the backend must give the run a workdir")
    p = Path(workdir).expanduser()
    if not p.is_absolute():
        raise _refuse(p, "it is not an absolute path")
    if p.is_symlink():
        raise _refuse(p, "it is a symbolic link")
    resolved = p.resolve()
    protected = [Path("/"), Path.home().resolve()]
    with contextlib.suppress(OSError):
        protected.append(Path.cwd().resolve())
    home = _corral_home()
    protected += [home, home / "runs"]
    for d in protected:
        if resolved == d or d.is_relative_to(resolved):
            raise _refuse(p, f"it is {d} or one of its parents")
    if resolved.is_dir() and (any(resolved.glob(f"*/{MARKER}")) or any(resolved.glob(f"*/*/{MARKER}"))):
        raise _refuse(p, "it holds other run workspaces")
    if len(resolved.parts) < 3:
        raise _refuse(p, "it is a top-level folder")
    return resolved


def cleanup_workspace(workdir: str | Path) -> None:
    """Remove the run's workspace folder and everything in it (a missing folder is fine).

    Symbolic links inside are removed, never followed; nothing outside ``workdir`` is touched.
    """
    p = check_removable(workdir)
    if not p.exists():
        return
    if not p.is_dir():
        raise _refuse(p, "it is not a folder")

    try:
        shutil.rmtree(p)
    except OSError:
        # Read-only folders inside (e.g. made by `chmod -w`): make them writable, then retry.
        for root, dirs, _files in os.walk(p):
            for d in dirs:
                q = os.path.join(root, d)
                if not os.path.islink(q):
                    with contextlib.suppress(OSError):
                        os.chmod(q, stat.S_IRWXU)
        with contextlib.suppress(OSError):
            os.chmod(p, stat.S_IRWXU)
        shutil.rmtree(p, ignore_errors=True)
    if p.exists():
        raise StorageError(f"could not remove all of {p}", "check permissions inside the workspace and remove it by hand")


def cleanup_argv(workdir: str) -> list[str]:
    """argv of a local cleanup task: removes exactly ``workdir`` (see :func:`cleanup_workspace`)."""
    return [sys.executable, "-c", _MAIN.format(module="corral.storage.local"), "cleanup", workdir]


_MAIN = "import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "cleanup":
        print("usage: python -m corral.storage.local cleanup WORKDIR", file=sys.stderr)
        return 2
    try:
        cleanup_workspace(argv[1])
    except StorageError as exc:
        print(f"corral: error: {exc.one_line()}", file=sys.stderr)
        if exc.hint:
            print(f"corral: hint: {exc.hint}", file=sys.stderr)
        return 1
    print(f"corral: removed workspace {argv[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
