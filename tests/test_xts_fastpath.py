"""The EVP (OpenSSL) fast path is byte-identical to the per-sector reference.

Where the CPU has VAES, SectorCipher picks the VAES path by default
(tests/test_xts_vaes.py); this module pins the EVP path with
EVSCRYPT_XTS=evp so that it stays tested on such machines too.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evscrypt.crypto import backend, evp, vaes
from evscrypt.crypto.xts import SectorCipher, reference_crypt
from evscrypt.format import SECTOR_SIZE
from evscrypt.secret import Secret

from cipher_checks import pinned_xts, threads_share_one_key

pytestmark = pytest.mark.skipif(not evp.available(), reason="libcrypto is not loadable")


_pin_evp = pinned_xts("evp")


def test_fast_path_is_used_by_default_and_can_be_turned_off(monkeypatch):
    monkeypatch.delenv("EVSCRYPT_XTS")
    assert SectorCipher(Secret.random(64)).path == backend.default()
    monkeypatch.setenv("EVSCRYPT_XTS", "evp")
    assert SectorCipher(Secret.random(64)).path == "evp"
    monkeypatch.setenv("EVSCRYPT_XTS", "reference")
    assert SectorCipher(Secret.random(64)).path == "reference"


@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=64, max_size=64).filter(lambda k: k[:32] != k[32:]),
       first=st.integers(0, 2**61 - 300), n=st.integers(1, 20), seed=st.binary(min_size=16, max_size=16))
def test_evp_equals_reference(key, first, n, seed):
    data = (seed * (n * SECTOR_SIZE // 16 + 1))[: n * SECTOR_SIZE]
    data = bytes(b ^ (i * 131 & 0xFF) for i, b in enumerate(data[:SECTOR_SIZE])) + data[SECTOR_SIZE:]
    c = SectorCipher(Secret.from_buffer(key))
    assert c.path == "evp"
    ct = c.encrypt(first, data)
    assert bytes(ct) == reference_crypt(key, first, data, True)
    assert bytes(c.decrypt(first, ct)) == data
    assert bytes(c.decrypt(first, ct)) == reference_crypt(key, first, bytes(ct), False)
    c.close()


def test_evp_threads_share_a_key_without_interference():
    threads_share_one_key(first=1000, sectors=16, rounds=50)


def test_c_loop_is_built_and_matches_the_ctypes_loop(monkeypatch):
    """make install builds the C sector loop; both loops equal the reference,
    including sector numbers near and past 2**64 (the C loop's limit)."""
    assert evp.loop_impl() == "c"
    key = Secret.random(64)
    raw = bytes(key.buffer)
    data = os.urandom(3 * SECTOR_SIZE)
    for first in (0, 1, 2**32 - 1, 2**61, 2**64 - 2, 2**64 + 5):
        expect = reference_crypt(raw, first, data, True)
        c_out = SectorCipher(key).encrypt(first, data)
        with monkeypatch.context() as m:
            m.setattr(evp, "_xtsloop", None)
            ctypes_out = SectorCipher(key).encrypt(first, data)
        assert bytes(c_out) == expect == bytes(ctypes_out), first


@pytest.mark.parametrize("impl", ["vaes", "c", "ctypes", "reference"])
@pytest.mark.parametrize("n,in_place", [(1, True), (7, False), (7, True), (300, True), (300, False)])
def test_skip_zero_leaves_zero_sectors_and_decrypts_the_rest(monkeypatch, impl, n, in_place):
    """decrypt_into(skip_zero=True), the engine's read path: all-zero sectors
    (never written) come out as zeros, every other sector as the reference
    decrypts it; on every implementation, in place or not, and across the
    split between cores (300 sectors)."""
    if impl == "ctypes":
        monkeypatch.setattr(evp, "_xtsloop", None)
    if impl == "vaes":
        if not vaes.available():
            pytest.skip("this CPU has no VAES/AVX-512")
        monkeypatch.setenv("EVSCRYPT_XTS", "vaes")
    if impl == "reference":
        monkeypatch.setenv("EVSCRYPT_XTS", "reference")
    key = Secret.random(64)
    raw = bytes(key.buffer)
    rnd = __import__("random").Random(n * 2 + in_place)
    zero = {i for i in range(n) if rnd.random() < 0.4}
    first = 12345
    src = bytearray(os.urandom(n * SECTOR_SIZE))
    for i in zero:
        src[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE] = bytes(SECTOR_SIZE)
    expect = bytearray()
    for i in range(n):
        sector = bytes(src[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE])
        expect += sector if i in zero else reference_crypt(raw, first + i, sector, False)
    c = SectorCipher(key)
    assert c.path == {"reference": "reference", "vaes": "vaes"}.get(impl, "evp")
    if in_place:
        out = src
    else:
        out = bytearray(os.urandom(len(src)))  # garbage: zero sectors must be written as zeros
    c.decrypt_into(first, src, out, skip_zero=True)
    assert out == expect
    # without skip_zero, a zero sector is decrypted like any other
    plain = c.decrypt(first, bytes(SECTOR_SIZE))
    assert bytes(plain) == reference_crypt(raw, first, bytes(SECTOR_SIZE), False) != bytes(SECTOR_SIZE)
    c.close()
