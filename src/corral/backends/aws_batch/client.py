"""Re-export of :mod:`corral.aws_api` (the one place where boto3 clients are made and AWS errors are
mapped), under the name the AWS backend has always imported it by."""

from corral.aws_api import (
    NO_RETRY_CONFIG,
    RETRY_CONFIG,
    THROTTLING_CODES,
    AwsClients,
    aws_errors,
    error_code,
    http_status,
    is_not_found,
    is_throttling,
    translate,
)

__all__ = [
    "NO_RETRY_CONFIG",
    "RETRY_CONFIG",
    "THROTTLING_CODES",
    "AwsClients",
    "aws_errors",
    "error_code",
    "http_status",
    "is_not_found",
    "is_throttling",
    "translate",
]
