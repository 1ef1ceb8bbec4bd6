"""The backend contract suite's harness for Slurm (tests/contract/backends.py adds it to HARNESSES).

Kept here, beside the Slurm tests, so the suite needs one line to run on Slurm:
``from slurm.contract_harness import SlurmHarness; HARNESSES["slurm"] = SlurmHarness``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from contract.backends import Harness

from corral import api
from corral.backends.base import RunOptions
from corral.model import RunRecord

HERE = Path(__file__).resolve().parent


class SlurmHarness(Harness):
    """Slurm: a real slurmctld/slurmd on 127.0.0.1 (tests/slurm_cluster.py), shared by the session."""

    name = "slurm"

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        super().__init__(tmp_path, request)
        sys.path.insert(0, str(HERE.parent))  # tests/, where slurm_cluster.py is
        from slurm_cluster import ClusterUnavailable, shared_cluster

        try:
            cluster = shared_cluster()
        except ClusterUnavailable as exc:
            pytest.skip(f"no Slurm cluster here: {exc}")
        request.getfixturevalue("monkeypatch").setenv("SLURM_CONF", str(cluster.conf))

    def backend(self) -> Any:
        from corral.backends.slurm import SlurmBackend

        return SlurmBackend(api.corral_home(), log=lambda msg: None)

    def _opts(self, **options: Any) -> RunOptions:
        return RunOptions(**{"runtime": "process", "wait": True, **options})

    def run(self, wf: Path, **options: Any) -> RunRecord:
        return api.run(wf, "slurm", store=self.store, options=self._opts(**options), backend_impl=self.backend())

    def resume(self, run_id: str, **options: Any) -> RunRecord:
        return api.resume(run_id, store=self.store, options=self._opts(**options), backend_impl=self.backend())

    def kill_then_resume(self, wf: Path, killed: Callable[[], bool], before_resume: Callable[[], None]
                         ) -> tuple[str, RunRecord]:
        """The submitting `corral` (waiting on the run) dies; Slurm goes on; resume follows it."""
        proc = self._spawn_run(wf, "runtime='process', wait=True")
        return self._kill_spawned_then_resume(proc, killed, before_resume, within=60)

    def cancel_midway(self, wf: Path, ready: Callable[[], bool]) -> RunRecord:
        from helpers import wait_for

        rec = api.run(wf, "slurm", store=self.store, options=self._opts(wait=False), backend_impl=self.backend())
        wait_for(ready, 60, "the run to be midway")
        api.cancel(rec.run_id, store=self.store)
        return self.store.get_run(rec.run_id)

    def workspace(self, run: RunRecord) -> Path:
        return Path(self.backend().workspace(run))

    def memory_is_enforced(self) -> bool:
        return False  # the test cluster runs task/none: Slurm limits no memory here (tests/slurm_cluster.py)
