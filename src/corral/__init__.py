"""corral: run one declarative workflow over thousands of items, locally or on AWS Batch."""

from corral.api import cancel, logs, plan, resume, run, status
from corral.errors import CorralError
from corral.spec import load_workflow

__all__ = ["CorralError", "cancel", "load_workflow", "logs", "plan", "resume", "run", "status"]
__version__ = "0.1.0"
