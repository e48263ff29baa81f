"""The header-MAC key: HKDF-SHA256 of the DK (RFC 5869), derived straight
into a locked Secret.  Checked against an HKDF written here with the
standard library's hmac (an oracle independent of cryptography) and
against cryptography's HKDF.derive, which the code used before."""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from evscrypt.image import header as hdr
from evscrypt.secret import Secret

#: HKDF's info, as docs/FORMAT.md states it ("Header MAC").
INFO = b"evscrypt/v1 header-mac"


def rfc5869(ikm: bytes, info: bytes, length: int, salt: bytes = b"") -> bytes:
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, t = b"", b""
    for i in range(1, -(-length // 32) + 1):
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        okm += t
    return okm[:length]


def test_the_oracle_passes_rfc5869_case_3():
    """RFC 5869 A.3: SHA-256, zero-length salt and info."""
    okm = rfc5869(bytes([0x0b] * 22), b"", 42)
    assert okm.hex() == ("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
                         "9d201395faa4b61a96c8")


def test_mac_key_is_hkdf_of_the_dk():
    for _ in range(20):
        raw = os.urandom(64)
        with Secret.from_buffer(raw) as dk, hdr.mac_key(dk) as key:
            assert isinstance(key, Secret) and key.locked
            assert bytes(key.buffer) == rfc5869(raw, INFO, 32)
            assert bytes(key.buffer) == HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                                             info=INFO).derive(raw)
