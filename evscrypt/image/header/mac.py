"""The header MAC: HMAC-SHA256 of the header under a key derived from the DK
with HKDF, so a wrong key or a tampered header is caught at attach, before
any data is served.

The one place that knows the derivation, the MAC and its comparison
(docs/FORMAT.md, "Header MAC"); the model says which bytes it covers
(``Header.mac_input``).  An attached volume keeps the derived key, so the
daemon can reseal a changed header (resize) without the KMS.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ...errors import IntegrityError
from ...secret import Secret
from .model import Header

#: HKDF's info: binds the derived key to this one use.
INFO = b"evscrypt/v1 header-mac"


def mac_key(dk: Secret) -> Secret:
    """The header-MAC key, derived from the DK.  HKDF-SHA256 writes straight
    into the locked buffer (``derive_into``): no ``bytes`` copy of the key."""
    key = Secret(32)
    try:
        HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INFO).derive_into(dk.view(), key.buffer)
    except BaseException:
        key.wipe()
        raise
    return key


def compute(header: Header, key: Secret) -> str:
    """The MAC of ``header`` under the header-MAC key, in lowercase hex."""
    return hmac.new(key.buffer, header.mac_input(), hashlib.sha256).hexdigest()


def _compute_from_dk(header: Header, dk: Secret) -> str:
    with mac_key(dk) as key:
        return compute(header, key)


def seal(header: Header, dk: Secret) -> None:
    """Set the header's MAC, from the DK."""
    header.mac = _compute_from_dk(header, dk)


def seal_with(header: Header, key: Secret) -> None:
    """Set the header's MAC, from the header-MAC key."""
    header.mac = compute(header, key)


def verify(header: Header, dk: Secret) -> None:
    """IntegrityError unless the header's MAC is right for the DK."""
    # compare_digest refuses non-ASCII str with TypeError: a forged mac
    # field must be an IntegrityError like any other wrong MAC
    if not header.mac or not header.mac.isascii() or not hmac.compare_digest(_compute_from_dk(header, dk),
                                                                             header.mac):
        raise IntegrityError(f"header MAC of volume {header.name!r} does not verify: wrong key or tampered header")
