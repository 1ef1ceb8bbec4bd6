"""The one place where boto3 clients are made, and where AWS errors become corral's errors.

It sits below ``state/``, ``storage/``, ``recipes/`` and ``backends/aws_batch`` in the import graph
(it imports only :mod:`corral.errors`; boto3 is imported when a client is first made), so every
module that talks to AWS takes its clients and its error mapping from here:

- :class:`AwsClients` (the backend, provisioning, the state store, doctor, cost) resolves the
  region (argument, profile, ``AWS_REGION``/``AWS_DEFAULT_REGION``), honours ``--profile`` and
  ``AWS_ENDPOINT_URL`` (boto3 reads that variable itself; an explicit ``endpoint_url`` wins), and
  gives every client adaptive retries, so throttling (Batch's shared ~50 TPS) is absorbed by
  botocore with client-side rate limiting instead of failing the run;
- :func:`default_client` makes one client from the standard credential chain for code that has no
  ``AwsClients`` (``corral storage``, reading an ``s3://`` BIDS dataset, anonymously if asked);
  :func:`frozen_credentials` resolves credentials for a child process (rclone);
- :func:`error_code`, :func:`is_not_found`, :func:`is_throttling`, :func:`http_status` read a
  botocore error; :func:`translate` / :func:`aws_errors` turn one into a corral error with a
  one-line hint, so the CLI never shows a botocore traceback for missing credentials or permissions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError, CredentialsError, ProvisionError

if TYPE_CHECKING:  # pragma: no cover
    import boto3

RETRY_CONFIG = {"mode": "adaptive", "max_attempts": 10}
# SubmitJob has no idempotency token (Batch API reference, SubmitJob): botocore re-sending it after a
# lost response (connection reset, read timeout, 5xx after Batch acted) makes a second job. Its client
# never retries; corral resolves a lost response by the deterministic job name instead
# (submit.BatchApi.submit_job) and retries only throttling itself.
NO_RETRY_CONFIG = {"mode": "standard", "total_max_attempts": 1}
# Errors AWS returns before acting on a request (the call may be sent again as it is).
THROTTLING_CODES = {
    "ThrottlingException", "TooManyRequestsException", "Throttling", "RequestLimitExceeded",
    "ProvisionedThroughputExceededException", "SlowDown",
}

# Error codes that mean "who you are" or "what you may do" is the problem, not the request.
_CREDENTIAL_CODES = {
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidAccessKeyId",
    "InvalidToken",
    "RequestExpired",
}
_PERMISSION_CODES = {
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "AuthorizationError",
    "Forbidden",
    "NotAuthorized",
}

_NO_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, run `aws configure` (or `aws sso login`), "
    "or pass --profile NAME"
)


def _import_boto3(needed_for: str = "the AWS backend", error: type[CorralError] = CorralError) -> Any:
    try:
        import boto3
    except ImportError:  # pragma: no cover - boto3 is in the [aws] extra
        raise error(f"{needed_for} needs boto3, which is not installed", "pip install 'corral[aws]'") from None
    return boto3


def default_client(
    service: str,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    profile: str | None = None,
    anonymous: bool = False,
    needed_for: str = "the AWS backend",
    error: type[CorralError] = CorralError,
) -> Any:
    """One client from the standard credential chain (``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` and the
    region as boto3 reads them, unless given), with adaptive retries; ``anonymous``: unsigned
    requests (public buckets). For code that has no :class:`AwsClients` (``corral storage``, item
    sources); without boto3, ``error`` names ``needed_for`` and the extra to install."""
    boto3 = _import_boto3(needed_for, error)
    from botocore.config import Config

    config = Config(retries=dict(RETRY_CONFIG))
    if anonymous:
        from botocore import UNSIGNED

        config = config.merge(Config(signature_version=UNSIGNED))
    session = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
    return session.client(service, region_name=region, endpoint_url=endpoint_url or None, config=config)


def frozen_credentials() -> Any | None:
    """The caller's AWS credentials resolved as boto3 does (environment, SSO, profiles, instance
    role), frozen (``access_key``, ``secret_key``, ``token``); None without boto3 or credentials."""
    try:
        import boto3
    except ImportError:
        return None
    creds = boto3.Session().get_credentials()
    return None if creds is None else creds.get_frozen_credentials()


class AwsClients:
    """Cached boto3 clients for one account and region, all with adaptive retries.

    ``hooks`` (event name → handler) are registered on every client made now or later; tests
    and benchmarks use ``before-call.*.*`` hooks to count API calls.
    """

    SERVICES = ("batch", "ec2", "iam", "dynamodb", "s3", "logs", "efs", "ecr", "secretsmanager", "ssm", "sts")

    def __init__(
        self,
        region: str | None = None,
        profile: str | None = None,
        endpoint_url: str | None = None,
        session: boto3.Session | None = None,
    ) -> None:
        boto3 = _import_boto3()
        from botocore.exceptions import ProfileNotFound

        self.profile = profile
        self.endpoint_url = endpoint_url or None
        if session is None:
            try:
                session = boto3.Session(profile_name=profile) if profile else boto3.Session()
            except ProfileNotFound:
                raise CredentialsError(
                    f"AWS profile {profile!r} is not in ~/.aws/config or ~/.aws/credentials",
                    "check the name with `aws configure list-profiles`, or leave out --profile",
                ) from None
        self.session = session
        resolved = (
            region
            or session.region_name
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
        )
        if not resolved:
            raise CredentialsError(
                "no AWS region is set",
                "pass --region (e.g. --region us-east-2), set AWS_REGION, or add `region = ...` to ~/.aws/config",
            )
        self.region: str = resolved
        self._clients: dict[str, Any] = {}
        self._hooks: list[tuple[str, Callable[..., Any]]] = []
        self._account_id: str | None = None

    # -- clients ------------------------------------------------------------------------------
    def client(self, service: str, *, retries: bool = True) -> Any:
        """The cached client of ``service`` (adaptive retries), or with ``retries=False`` one that
        sends each call once (for calls that must not be re-sent blindly: SubmitJob)."""
        key = service if retries else f"{service}#once"
        c = self._clients.get(key)
        if c is None:
            from botocore.config import Config

            kwargs: dict[str, Any] = {
                "region_name": self.region,
                "config": Config(retries=dict(RETRY_CONFIG if retries else NO_RETRY_CONFIG)),
            }
            if self.endpoint_url:
                kwargs["endpoint_url"] = self.endpoint_url
            c = self.session.client(service, **kwargs)
            for event, handler in self._hooks:
                c.meta.events.register(event, handler)
            self._clients[key] = c
        return c

    def register_hook(self, event: str, handler: Callable[..., Any]) -> None:
        """Register a botocore event handler on every client, present and future."""
        self._hooks.append((event, handler))
        for c in self._clients.values():
            c.meta.events.register(event, handler)

    @property
    def batch(self) -> Any:
        return self.client("batch")

    @property
    def batch_once(self) -> Any:
        """A Batch client without automatic retries (SubmitJob: see :data:`NO_RETRY_CONFIG`)."""
        return self.client("batch", retries=False)

    @property
    def ec2(self) -> Any:
        return self.client("ec2")

    @property
    def iam(self) -> Any:
        return self.client("iam")

    @property
    def dynamodb(self) -> Any:
        return self.client("dynamodb")

    @property
    def s3(self) -> Any:
        return self.client("s3")

    @property
    def logs(self) -> Any:
        return self.client("logs")

    @property
    def efs(self) -> Any:
        return self.client("efs")

    @property
    def ecr(self) -> Any:
        return self.client("ecr")

    @property
    def secretsmanager(self) -> Any:
        return self.client("secretsmanager")

    @property
    def ssm(self) -> Any:
        return self.client("ssm")

    @property
    def sts(self) -> Any:
        return self.client("sts")

    @property
    def tagging(self) -> Any:
        return self.client("resourcegroupstaggingapi")

    # -- identity -----------------------------------------------------------------------------
    def account_id(self) -> str:
        """The caller's account id (one STS call, cached). Bad or missing credentials →
        :class:`CredentialsError` with a one-line hint."""
        if self._account_id is None:
            with aws_errors("read the AWS account id"):
                self._account_id = self.sts.get_caller_identity()["Account"]
        return self._account_id

    def partition(self) -> str:
        if self.region.startswith("cn-"):
            return "aws-cn"
        if self.region.startswith("us-gov-"):
            return "aws-us-gov"
        return "aws"

    def __repr__(self) -> str:
        return f"AwsClients(region={self.region!r}, profile={self.profile!r}, endpoint_url={self.endpoint_url!r})"


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def is_throttling(exc: BaseException) -> bool:
    """True for an error AWS returns without acting on the request (throttling)."""
    return error_code(exc) in THROTTLING_CODES


def http_status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


def is_not_found(exc: BaseException) -> bool:
    code = error_code(exc)
    return code in {"NoSuchEntity", "ResourceNotFoundException", "NoSuchBucket", "NotFound", "404",
                    "RepositoryNotFoundException", "FileSystemNotFound", "LifecyclePolicyNotFoundException",
                    "InvalidLaunchTemplateName.NotFoundException", "InvalidLaunchTemplateId.NotFound",
                    "NoSuchLifecycleConfiguration"} or code.endswith("NotFound") or code.endswith(
        "NotFoundException")


def translate(exc: BaseException, action: str) -> CorralError | None:
    """A corral error for a botocore exception, or None when it is not botocore's."""
    try:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            NoRegionError,
            ParamValidationError,
            PartialCredentialsError,
            ProfileNotFound,
            TokenRetrievalError,
        )
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return CredentialsError(f"no AWS credentials found (while trying to {action})", _NO_CREDENTIALS_HINT)
    if isinstance(exc, TokenRetrievalError):
        return CredentialsError(f"the AWS SSO session has expired (while trying to {action})",
                                "run `aws sso login` and try again")
    if isinstance(exc, ProfileNotFound):
        return CredentialsError(str(exc), "check the name with `aws configure list-profiles`")
    if isinstance(exc, NoRegionError):
        return CredentialsError("no AWS region is set", "pass --region or set AWS_REGION")
    if isinstance(exc, EndpointConnectionError):
        return ProvisionError(f"cannot reach AWS (while trying to {action}): {exc}",
                              "check the network, the region name and AWS_ENDPOINT_URL if set")
    if isinstance(exc, ClientError):
        code = error_code(exc)
        msg = exc.response.get("Error", {}).get("Message", "") or str(exc)
        op = getattr(exc, "operation_name", "") or "?"
        if code in _CREDENTIAL_CODES:
            return CredentialsError(
                f"AWS rejected the credentials ({code}) while trying to {action}",
                "the access key is wrong or expired: " + _NO_CREDENTIALS_HINT,
            )
        if code in _PERMISSION_CODES:
            return CredentialsError(
                f"not allowed to {action}: {op} was denied ({code})",
                f"ask your AWS administrator for permission to call {op}, or use a profile that has it",
            )
        return ProvisionError(f"could not {action}: {op} failed with {code}: {msg}",
                              "see the AWS message above; rerun with --debug for the full traceback")
    if isinstance(exc, ParamValidationError):
        return None  # a malformed request is corral's bug: shown with its traceback
    if isinstance(exc, BotoCoreError):
        return ProvisionError(f"could not {action}: {exc}", "rerun with --debug for the full traceback")
    return None


@contextmanager
def aws_errors(action: str) -> Iterator[None]:
    """Turn botocore exceptions raised inside into :class:`CredentialsError`/:class:`ProvisionError`."""
    try:
        yield
    except CorralError:
        raise
    except Exception as exc:
        err = translate(exc, action)
        if err is None:
            raise
        raise err from exc
