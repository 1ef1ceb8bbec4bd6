"""``--backend slurm``: sbatch job arrays chained by dependencies on the cluster's own scheduler."""

from corral.backends.slurm.backend import SlurmBackend
from corral.backends.slurm.client import SlurmClient

__all__ = ["SlurmBackend", "SlurmClient"]
