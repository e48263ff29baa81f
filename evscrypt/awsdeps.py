"""boto3: the optional dependency of AWS KMS and S3 backups.

``pip install evscrypt`` does not pull it in (with botocore it is most of
an install's size); ``pip install 'evscrypt[aws]'`` and ``make install`` do.
It is imported only where an AWS service is used, so everything else runs
without it, and a missing boto3 is one clear error, not an ImportError.

What the two services share is here: how a client is made, what the
service's refusal says (:func:`refusal`), and what a failed call short of
an answer from the service is (:func:`failure`).  Each
plugin turns those into its own errors (evscrypt.kms.aws, evscrypt.backup.s3store).
"""

from __future__ import annotations

from typing import Callable

from .errors import UnsupportedFeature

EXTRA = "pip install 'evscrypt[aws]'"

#: The kinds of :func:`failure`.
CREDENTIALS, REGION, UNREACHABLE, BOTOCORE = "credentials", "region", "unreachable", "botocore"
#: The message of a CREDENTIALS failure, S3 or KMS alike.
NO_CREDENTIALS = ("no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                  "AWS_PROFILE or an instance role")


def require(what: str):
    """``(boto3, botocore.config.Config)``, or UnsupportedFeature naming ``what`` needs them."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        raise UnsupportedFeature(f"{what} needs boto3, which is not installed ({e.name or e}): {EXTRA}") from None
    return boto3, Config


def client(service: str, what: str, convert: Callable[[Exception], Exception], *,
           connect_timeout: float, read_timeout: float, max_attempts: int):
    """A boto3 client of ``service`` for ``what`` (which names the feature if
    boto3 is missing) whose every call has bounded timeouts and a bounded
    number of attempts; botocore retries throttling and transient errors
    itself ("standard" mode).  ``convert`` turns boto3's own errors (a bad
    region, a bad endpoint) into the caller's."""
    boto3, Config = require(what)
    try:
        return boto3.client(service, config=Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                                                   retries={"max_attempts": max_attempts, "mode": "standard"}))
    except Exception as e:
        raise convert(e)


def refusal(e: Exception) -> tuple[str, str] | None:
    """(error code, first line of the message) of the service's refusal
    ``e`` (a botocore ClientError); None for any other exception."""
    from botocore.exceptions import ClientError

    if not isinstance(e, ClientError):
        return None
    err = e.response.get("Error", {})
    code = str(err.get("Code", ""))
    text = err.get("Message") or code
    return code, text.splitlines()[0] if text else code


def failure(e: Exception) -> str | None:
    """What kind of failure botocore exception ``e`` is, when no answer came
    from the service: CREDENTIALS (none found), REGION (none configured),
    UNREACHABLE (the endpoint did not answer in time) or BOTOCORE (any other
    botocore error); None for anything else, including a ClientError, which
    is the service's answer and whose code the caller reads."""
    from botocore import exceptions as bx

    if isinstance(e, bx.NoCredentialsError):
        return CREDENTIALS
    if isinstance(e, bx.NoRegionError):
        return REGION
    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                      bx.ConnectionClosedError)):
        return UNREACHABLE
    if isinstance(e, bx.BotoCoreError):
        return BOTOCORE
    return None
