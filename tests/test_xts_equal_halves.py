"""Equal XTS key halves are refused at every layer that takes a key, not only
by SectorCipher: IEEE 1619 and FIPS forbid them (XTS degenerates), and a
caller that bypasses SectorCipher must not get a working cipher either."""

from __future__ import annotations

import os

import pytest

from evscrypt.crypto import evp, vaes
from evscrypt.crypto.xts import SectorCipher
from evscrypt.format import IV_PER_SECTOR, SECTOR_SIZE
from evscrypt.secret import Secret

HALF = os.urandom(32)
EQUAL = HALF + HALF
# differ only in the last byte: the check compares all 32 bytes
ALMOST = HALF + HALF[:31] + bytes([HALF[31] ^ 1])


def test_sector_cipher_refuses_equal_halves():
    with Secret.from_buffer(EQUAL) as k, pytest.raises(ValueError, match="halves must differ"):
        SectorCipher(k)


@pytest.mark.skipif(not vaes.available(), reason="this CPU has no VAES/AVX-512")
def test_vaes_expand_refuses_equal_halves():
    with pytest.raises(ValueError, match="halves must differ"):
        vaes._xtsvaes.expand(EQUAL, bytearray(vaes._xtsvaes.SCHED_SIZE))
    with pytest.raises(ValueError, match="halves must differ"):
        vaes.VaesXts(memoryview(bytearray(EQUAL)), SECTOR_SIZE, IV_PER_SECTOR)
    vaes._xtsvaes.expand(ALMOST, bytearray(vaes._xtsvaes.SCHED_SIZE))


@pytest.mark.skipif(not evp.available(), reason="libcrypto has no XTS")
def test_evp_refuses_equal_halves_for_both_directions():
    """OpenSSL 3.0 itself refuses them only when encrypting."""
    with pytest.raises(ValueError, match="halves must differ"):
        evp.EvpXts(memoryview(bytearray(EQUAL)), SECTOR_SIZE, IV_PER_SECTOR)
    x = evp.EvpXts(memoryview(bytearray(ALMOST)), SECTOR_SIZE, IV_PER_SECTOR)
    out = bytearray(SECTOR_SIZE)
    x.crypt_into(0, bytes(SECTOR_SIZE), out, False)
    x.close()
