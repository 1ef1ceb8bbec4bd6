"""AWS Batch backend: provisioning (``provision``), clients (``client``), ECR images (``ecr``).

The only place boto3 clients are made is :class:`corral.aws_api.AwsClients` (re-exported by ``client``).
"""

from corral.backends.aws_batch.client import AwsClients, aws_errors
from corral.backends.aws_batch.provision import (
    Environment,
    Needs,
    ProvisionReport,
    ensure_environment,
    needs_for,
    teardown,
)

__all__ = [
    "AwsClients",
    "Environment",
    "Needs",
    "ProvisionReport",
    "aws_errors",
    "ensure_environment",
    "needs_for",
    "teardown",
]
