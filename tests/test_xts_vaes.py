"""The VAES/AVX-512 XTS path against independent oracles.

The oracles are the NIST CAVP XTSGenAES256 files and the IEEE 1619 Annex B
vectors (through the raw one-unit entry point, with their own tweaks), the
``cryptography`` XTS primitive with random tweaks and lengths (which covers
the 16-block vector loop, its tail and the tweak update across loop turns),
and the per-sector ``reference_crypt``.  Skipped where the CPU lacks VAES.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from evscrypt.crypto import backend, vaes
from evscrypt.crypto.xts import SectorCipher, reference_crypt
from evscrypt.format import IV_PER_SECTOR, SECTOR_SIZE, tweak
from evscrypt.secret import Secret

from cipher_checks import pinned_xts, threads_share_one_key
from test_xts_vectors import IEEE_KEY, IEEE_PT, IEEE_VECTORS, _dusn_set, _hexstr_set, primitive_xts

pytestmark = pytest.mark.skipif(not vaes.available(), reason="this CPU has no VAES/AVX-512")

_x = vaes._xtsvaes


def _sched(key: bytes) -> bytearray:
    s = bytearray(_x.SCHED_SIZE)
    _x.expand(key, s)
    return s


def _unit(key: bytes, tw: bytes, data: bytes, encrypt: bool) -> bytes:
    out = bytearray(len(data))
    _x.crypt_unit(_sched(key), tw, data, out, 1 if encrypt else 0)
    return bytes(out)


_pin_vaes = pinned_xts("vaes")  # where libcrypto has its own VAES XTS the default is EVP


def test_default_path_is_vaes_unless_libcrypto_has_its_own(monkeypatch):
    monkeypatch.delenv("EVSCRYPT_XTS", raising=False)
    c = SectorCipher(Secret.random(64))
    assert c.path == ("evp" if backend.libcrypto_has_vaes_xts() else "vaes")
    c.close()


@pytest.mark.parametrize("vectors", [_hexstr_set, _dusn_set], ids=["tweak-128hexstr", "tweak-dataunitseqno"])
def test_nist_vectors(vectors):
    """The NIST whole-block units are 32 and 48 bytes long: they check the
    key schedule, the tweak encryption and the one-block tail loop; the IEEE
    vectors and the tests below cover the 16-block loop."""
    s = vectors()
    whole = [v for v in s.usable if len(v["pt"]) % 16 == 0]  # no ciphertext stealing here
    for v in whole:
        src, want = (v["pt"], v["ct"]) if v["encrypt"] else (v["ct"], v["pt"])
        assert _unit(v["key"], v["tweak"], src, v["encrypt"]) == want, f"COUNT={v['count']}"
    assert len(whole) >= 600


@pytest.mark.parametrize("number, dusn, ct_hex", IEEE_VECTORS, ids=[f"vector{v[0]}" for v in IEEE_VECTORS])
def test_ieee1619_annex_b(number, dusn, ct_hex):
    """512-byte units: two turns of the 16-block loop."""
    ct = bytes.fromhex(ct_hex)
    tw = dusn.to_bytes(16, "little")
    assert _unit(IEEE_KEY, tw, IEEE_PT, True) == ct
    assert _unit(IEEE_KEY, tw, ct, False) == IEEE_PT


@settings(max_examples=150, deadline=None)
@given(key=st.binary(min_size=64, max_size=64).filter(lambda k: k[:32] != k[32:]),
       tw=st.binary(min_size=16, max_size=16), blocks=st.integers(1, 300), seed=st.binary(min_size=16, max_size=16))
@example(key=bytes(range(64)), tw=b"\xff" * 16, blocks=16, seed=bytes(16))
@example(key=bytes(range(64)), tw=b"\xff" * 16, blocks=17, seed=bytes(16))
@example(key=bytes(range(64)), tw=b"\x00" * 15 + b"\x80", blocks=256, seed=bytes(16))
def test_units_match_the_primitive(key, tw, blocks, seed):
    """Any whole-block length and any tweak (all-ones and top-bit tweaks
    exercise the GF(2^128) reduction in the four-lane update)."""
    data = (seed * blocks)[: blocks * 16]
    data = bytes(b ^ (i * 37 & 0xFF) for i, b in enumerate(data))
    ct = _unit(key, tw, data, True)
    assert ct == primitive_xts(key, tw, data, True)
    assert _unit(key, tw, ct, False) == data


@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=64, max_size=64).filter(lambda k: k[:32] != k[32:]),
       first=st.one_of(st.integers(0, 2**20), st.integers(2**64 - 30, 2**64 + 30), st.integers(0, 2**125 - 64)),
       n=st.integers(1, 12), seed=st.binary(min_size=16, max_size=16))
def test_sector_cipher_equals_reference(key, first, n, seed):
    """Through SectorCipher, sector numbers below, across and above 2**64
    (the 64-bit halves of the first sector number)."""
    data = bytes(b ^ (i & 0xFF) for i, b in enumerate(seed * 16)) + seed * (n * SECTOR_SIZE // 16 - 16)
    c = SectorCipher(Secret.from_buffer(key))
    assert c.path == "vaes"
    try:
        ct = c.encrypt(first, data)
        assert bytes(ct) == reference_crypt(key, first, data, True)
        assert bytes(c.decrypt(first, ct)) == data
    finally:
        c.close()


def test_large_request_split_across_cores_equals_reference():
    key = Secret.random(64)
    data = os.urandom(256 * SECTOR_SIZE)  # 1 MiB: split between threads
    c = SectorCipher(key)
    ct = c.encrypt(77, data)
    assert bytes(ct) == reference_crypt(bytes(key.buffer), 77, data, True)
    assert bytes(c.decrypt(77, ct)) == data
    c.close()


def test_threads_share_one_schedule():
    threads_share_one_key(first=5, sectors=8, rounds=200)


def test_schedule_is_locked_key_material_and_close_wipes_it():
    key = Secret.random(64)
    x = vaes.VaesXts(key.view(), SECTOR_SIZE, IV_PER_SECTOR)
    sched = x._sched.buffer
    # AES-256 round keys 0 and 1 are the key itself: the schedule is secret
    assert bytes(sched[:32]) == bytes(key.buffer[:32])
    assert x._sched._locked
    assert "Vaes" in repr(x) and bytes(key.buffer[:8]).hex() not in repr(x)
    x.close()
    assert sched == bytearray(len(sched))
    with pytest.raises(ValueError, match="closed"):
        x.crypt_into(0, bytes(SECTOR_SIZE), bytearray(SECTOR_SIZE), True)


def test_tweak_out_of_range_is_refused_like_the_reference():
    key = Secret.random(64)  # kept alive: a dropped Secret wipes itself to zeros
    x = vaes.VaesXts(key.view(), SECTOR_SIZE, IV_PER_SECTOR)
    last = (1 << 128) // IV_PER_SECTOR - 1  # the last sector whose tweak fits
    tweak(last)
    x.crypt_into(last - 1, bytes(SECTOR_SIZE), bytearray(SECTOR_SIZE), True)
    with pytest.raises(OverflowError):
        tweak(last + 1)
    with pytest.raises(OverflowError):
        x.crypt_into(last, bytes(2 * SECTOR_SIZE), bytearray(2 * SECTOR_SIZE), True)


def test_bad_arguments_are_refused():
    s = _sched(os.urandom(64))
    with pytest.raises(ValueError, match="schedule"):
        _x.crypt_sectors(bytearray(10), 0, 0, 8, bytes(4096), bytearray(4096), 4096, 1)
    with pytest.raises(ValueError, match="whole sectors"):
        _x.crypt_sectors(s, 0, 0, 8, bytes(4000), bytearray(4000), 4096, 1)
    with pytest.raises(ValueError, match="whole sectors"):
        _x.crypt_sectors(s, 0, 0, 8, bytes(4096), bytearray(100), 4096, 1)
    with pytest.raises(ValueError, match="whole sectors"):
        _x.crypt_sectors(s, 0, 0, 8, bytes(40), bytearray(40), 40, 1)
    with pytest.raises(ValueError, match="64-byte"):
        _x.expand(bytes(32), bytearray(_x.SCHED_SIZE))
    with pytest.raises(ValueError, match="tweak"):
        _x.crypt_unit(s, bytes(8), bytes(16), bytearray(16), 1)
    with pytest.raises(TypeError):
        _x.crypt_sectors(s, 0, 0, 8, bytes(4096), bytes(4096), 4096, 1)  # read-only output
