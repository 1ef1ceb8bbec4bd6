"""One harness per backend for the backend contract suite (tests/contract/test_backend_contract.py).

A harness runs a workflow file the way a user would through :mod:`corral.api`, to its end, and
gives the suite the same handles on every backend: ``run``, ``resume``, ``kill_then_resume``
(the process driving the run dies as with ``kill -9``), ``cancel_midway``, and the store.
To add a backend (Slurm), write a harness class and add it to :data:`HARNESSES`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corral import api
from corral.backends.base import RunOptions
from corral.model import RunRecord, TaskRecord
from corral.state.sqlite import SqliteStore

HERE = Path(__file__).resolve().parent


class Harness:
    name = ""

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.tmp = tmp_path
        self.store = SqliteStore(tmp_path / f"{self.name}-state.db")

    # what every harness gives the suite
    def run(self, wf: Path, **options: Any) -> RunRecord:
        raise NotImplementedError

    def resume(self, run_id: str, **options: Any) -> RunRecord:
        raise NotImplementedError

    def kill_then_resume(self, wf: Path, killed: Callable[[], bool], before_resume: Callable[[], None]
                         ) -> tuple[str, RunRecord]:
        """Start ``wf``, kill the process driving it (kill -9) once ``killed()`` holds or at the
        backend's own point of no return; call ``before_resume()``, then ``resume``. Returns
        (run id, resumed run)."""
        raise NotImplementedError

    def cancel_midway(self, wf: Path, ready: Callable[[], bool]) -> RunRecord:
        """Start ``wf``, cancel it once its first stage has ended and ``ready()`` holds."""
        raise NotImplementedError

    def workspace(self, run: RunRecord) -> Path:
        raise NotImplementedError

    def backend(self) -> Any:
        raise NotImplementedError

    # shared by the harnesses whose run is driven by a process of its own (local, Slurm)
    def _spawn_run(self, wf: Path, options: str = "runtime='process'") -> subprocess.Popen[str]:
        """``api.run(wf)`` on this backend in a child process, with the harness's store (the CLI's
        store is $CORRAL_HOME/state.db: the harness points it at its own file)."""
        code = ("import sys; from corral import api; from corral.backends.base import RunOptions; "
                "from corral.state.sqlite import SqliteStore; "
                f"api.run(sys.argv[1], {self.name!r}, store=SqliteStore(sys.argv[2]), options=RunOptions({options}))")
        return subprocess.Popen([sys.executable, "-c", code, str(wf), str(self.tmp / f"{self.name}-state.db")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

    def _latest(self) -> str:
        from helpers import wait_for

        return wait_for(lambda: [r.run_id for r in self.store.list_runs(limit=1)], 20, "the run's record")[0]

    def _kill_spawned_then_resume(self, proc: subprocess.Popen[str], killed: Callable[[], bool],
                                  before_resume: Callable[[], None], within: float) -> tuple[str, RunRecord]:
        """kill -9 the process driving the run once ``killed()`` holds (polled for ``within`` s),
        then ``before_resume()`` and ``resume``."""
        from helpers import wait_for

        try:
            wait_for(killed, within, "the moment to kill the process driving the run")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        run_id = self._latest()
        before_resume()
        return run_id, self.resume(run_id)

    def tasks(self, run_id: str) -> dict[str, TaskRecord]:
        return {t.label: t for t in self.store.get_tasks(run_id)}

    def memory_is_enforced(self) -> bool:
        """A task that allocates past its memory is killed by a real kernel memory cgroup (local: the
        task's own; aws: the simulated Batch's container cgroup). False: the scenario's command
        plays the kernel's OOM kill at the seam the wrapper reads (:meth:`inject_oom_seam`)."""
        from corral.backends import memory_limit

        return memory_limit.detect().hard

    def inject_oom_seam(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Where no kernel enforces memory: point the wrapper's OOM counter (``CORRAL_OOM_EVENTS``)
        at a file the scenario's command bumps before it kills itself with SIGKILL."""
        events = self.tmp / "oom_events"
        events.write_text("oom_kill 0\n")
        monkeypatch.setenv("CORRAL_OOM_EVENTS", str(events))

    def close(self) -> None:
        self.store.close()


class LocalHarness(Harness):
    name = "local"

    def backend(self) -> Any:
        from corral.backends.local import LocalBackend

        return LocalBackend(api.corral_home(), log=lambda msg: None)

    def _opts(self, **options: Any) -> RunOptions:
        return RunOptions(runtime="process", **options)

    def run(self, wf: Path, **options: Any) -> RunRecord:
        return api.run(wf, "local", store=self.store, options=self._opts(**options), backend_impl=self.backend())

    def resume(self, run_id: str, **options: Any) -> RunRecord:
        return api.resume(run_id, store=self.store, options=self._opts(**options), backend_impl=self.backend())

    def kill_then_resume(self, wf: Path, killed: Callable[[], bool], before_resume: Callable[[], None]
                         ) -> tuple[str, RunRecord]:
        return self._kill_spawned_then_resume(self._spawn_run(wf), killed, before_resume, within=30)

    def cancel_midway(self, wf: Path, ready: Callable[[], bool]) -> RunRecord:
        from helpers import wait_for

        proc = self._spawn_run(wf)
        try:
            wait_for(ready, 30, "the run to be midway")
            run_id = self._latest()
            api.cancel(run_id, store=self.store)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        return self.store.get_run(run_id)

    def workspace(self, run: RunRecord) -> Path:
        return Path(self.backend().workspace(run))


class AwsHarness(Harness):
    """AWS Batch: requests to moto's server on 127.0.0.1, job states played by SimulatedBatch."""

    name = "aws"

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        super().__init__(tmp_path, request)
        request.getfixturevalue("aws")
        sys.path.insert(0, str(HERE.parent / "aws"))
        from test_backend_support import make_environment  # tests/aws helpers

        from contract.batch_sim import SimulatedBatch
        from corral.backends.aws_batch.client import AwsClients

        self.clients = AwsClients()
        self.env = make_environment(self.clients)
        self.sim = SimulatedBatch(self.clients.batch, workdir=tmp_path / "aws-container",
                                  consumables=request.getfixturevalue("strict_aws").consumables,
                                  logs=self.clients.logs)
        self.said: list[str] = []
        self.runs: list[str] = []

    def backend(self) -> Any:
        from corral.backends.aws_batch.backend import AwsBatchBackend

        return AwsBatchBackend(self.clients, environment=self.env, sleep=self.sim.step, api=self.sim,
                               settle_polls=0, say=self.said.append)

    def _opts(self, **options: Any) -> RunOptions:
        return RunOptions(**{"wait": True, **options})

    def run(self, wf: Path, **options: Any) -> RunRecord:
        rec = api.run(wf, "aws", store=self.store, options=self._opts(**options), backend_impl=self.backend())
        self.runs.append(rec.run_id)
        return rec

    def resume(self, run_id: str, **options: Any) -> RunRecord:
        return api.resume(run_id, store=self.store, options=self._opts(**options), backend_impl=self.backend())

    def kill_then_resume(self, wf: Path, killed: Callable[[], bool], before_resume: Callable[[], None]
                         ) -> tuple[str, RunRecord]:
        from contract.batch_sim import KilledSubmitter

        self.sim.crash_after_submits = 1  # the submitter dies right after its first SubmitJob
        with pytest.raises(KilledSubmitter):
            api.run(wf, "aws", store=self.store, options=self._opts(), backend_impl=self.backend())
        (run,) = self.store.list_runs(limit=1)
        self.runs.append(run.run_id)
        before_resume()
        return run.run_id, self.resume(run.run_id)

    def cancel_midway(self, wf: Path, ready: Callable[[], bool]) -> RunRecord:
        rec = api.run(wf, "aws", store=self.store, options=self._opts(wait=False), backend_impl=self.backend())
        self.runs.append(rec.run_id)
        be = self.backend()
        be.refresh(rec, self.store)
        self.sim.step()  # Batch runs the first stage (the second waits for it)
        be.refresh(self.store.get_run(rec.run_id), self.store)
        assert ready()
        be.cancel(self.store.get_run(rec.run_id), self.store)
        be.refresh(self.store.get_run(rec.run_id), self.store)
        return self.store.get_run(rec.run_id)

    def workspace(self, run: RunRecord) -> Path:
        from corral.backends.aws_batch import payloads as pl

        return Path(pl.workdir_for(run.run_id, pl.JobContext.from_environment(self.env)))

    def close(self) -> None:
        super().close()
        for run_id in self.runs:
            shutil.rmtree(f"/tmp/corral/{run_id}", ignore_errors=True)


HARNESSES: dict[str, type[Harness]] = {"local": LocalHarness, "aws": AwsHarness}

from slurm.contract_harness import SlurmHarness  # noqa: E402  (tests/slurm: a real Slurm on 127.0.0.1)

HARNESSES["slurm"] = SlurmHarness
