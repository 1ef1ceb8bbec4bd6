"""One wait-and-forward-signals function (corral.jobshell.RUN_FORWARDING) serves both scripts corral
runs in AWS containers: the item wrapper's retry loop and the transfer script."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from corral.backends.aws_batch import payloads as pl
from corral.jobshell import RUN_FORWARDING
from corral.storage.aws import TRANSFER_SCRIPT


def test_both_scripts_use_the_one_function_and_wait_nowhere_else() -> None:
    for script in (pl.WRAPPER, TRANSFER_SCRIPT):
        assert script.count(RUN_FORWARDING) == 1
        assert script.replace(RUN_FORWARDING, "").count("wait ") == 0


def test_sigterm_during_a_retried_command_stops_it_and_is_not_retried(tmp_path: Path) -> None:
    """Batch's SIGTERM to the wrapper reaches the command, the wrapper exits 143 and does not
    re-run it although `retries` would allow more tries."""
    pidfile = tmp_path / "pid"
    cmd = f'echo $$ > "{pidfile}"; exec sleep 60'
    env = {"PATH": os.environ["PATH"], "CORRAL_TABLE": pl.encode_table(["x"]), "CORRAL_COLUMNS": "X",
           "CORRAL_FIELDS": "", "CORRAL_ARGV": " ".join(pl.sh_quote(a) for a in ["/bin/sh", "-c", cmd]),
           "CORRAL_WRAPPER": pl.WRAPPER, "CORRAL_RETRIES": "2"}
    proc = subprocess.Popen(pl.BOOT_COMMAND, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)  # bounded poll on a file the command writes
    child = int(pidfile.read_text())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "retry" not in err
    try:
        os.kill(child, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
