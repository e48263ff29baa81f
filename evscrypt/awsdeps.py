"""boto3: the optional dependency of AWS KMS and S3 backups.

``pip install evscrypt`` does not pull it in (with botocore it is most of
an install's size); ``pip install 'evscrypt[aws]'`` and ``make install`` do.
It is imported only where an AWS service is used, so everything else runs
without it, and a missing boto3 is one clear error, not an ImportError.
"""

from __future__ import annotations

from .errors import UnsupportedFeature

EXTRA = "pip install 'evscrypt[aws]'"


def require(what: str):
    """``(boto3, botocore.config.Config)``, or UnsupportedFeature naming ``what`` needs them."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        raise UnsupportedFeature(f"{what} needs boto3, which is not installed ({e.name or e}): {EXTRA}") from None
    return boto3, Config
