"""Key management backends: the interface and a factory by backend name."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidArgument
from ..paths import kms_dir
from .base import Access, KMSBackend, KeyInfo, KeyState

BACKENDS = ("local", "aws")


def open_backend(name: str, home: Path) -> KMSBackend:
    """The backend called ``name``, for the state directory ``home``."""
    if name == "local":
        from .local import LocalKMS

        return LocalKMS(kms_dir(home, name))
    if name == "aws":
        try:
            from .aws import AwsKMS
        except ImportError:
            raise InvalidArgument("the aws KMS backend is not available in this version")
        return AwsKMS()
    raise InvalidArgument(f"unknown KMS backend {name!r} (choose from {', '.join(BACKENDS)})")


__all__ = ["Access", "BACKENDS", "KMSBackend", "KeyInfo", "KeyState", "open_backend"]
