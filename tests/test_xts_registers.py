"""The VAES code leaves no key material in the vector registers.

A test-only entry point of _xtsvaes runs the real sector loop (or the key
expansion) and then, in the same C function, stores zmm0-31, so nothing
runs in between.  The round keys are computed independently
(tests/aes_schedule.py).  Two control runs show the test can fail: without
clearing, and with only what the code did before (VZEROALL, which leaves
zmm16-31), the round keys are found.
"""

from __future__ import annotations

import os

import pytest

from evscrypt.crypto import vaes

from aes_schedule import expand_256, xts_round_key_blocks

pytestmark = pytest.mark.skipif(not vaes.available(), reason="this CPU has no VAES/AVX-512")

_x = vaes._xtsvaes
CLEAR_NONE, CLEAR_ZEROALL, CLEAR_FULL = 0, 1, 2
SECTOR = 4096


def registers_holding(regs: bytes, blocks: set[bytes]) -> list[int]:
    """Numbers of the zmm registers (64 bytes each) holding any of the blocks in a 16-byte lane."""
    assert len(regs) == 32 * 64
    return sorted({i // 64 for i in range(0, len(regs), 16) if regs[i:i + 16] in blocks})


def _schedule(key: bytes) -> bytearray:
    sched = bytearray(_x.SCHED_SIZE)
    _x.expand(key, sched)
    return sched


def test_the_oracle_matches_the_vaes_schedule():
    key = os.urandom(64)
    sched = _schedule(key)
    assert bytes(sched[:15 * 16]) == b"".join(expand_256(key[:32]))
    assert bytes(sched[-15 * 16:]) == b"".join(expand_256(key[32:]))


@pytest.mark.parametrize("encrypt", [True, False], ids=["encrypt", "decrypt"])
@pytest.mark.parametrize("sectors", [1, 3])
def test_no_round_key_in_any_register_after_crypt(encrypt, sectors):
    key = os.urandom(64)
    blocks = xts_round_key_blocks(key)
    sched = _schedule(key)
    src, dst = os.urandom(sectors * SECTOR), bytearray(sectors * SECTOR)
    regs = _x._registers_after_crypt(sched, src, dst, SECTOR, int(encrypt), CLEAR_FULL)
    assert registers_holding(regs, blocks) == []
    assert regs == bytes(len(regs)), "every vector register is zero after a call"
    # the call did its work
    out = bytearray(len(src))
    _x.crypt_sectors(sched, 0, 0, 1, src, out, SECTOR, int(encrypt))
    assert dst == out


@pytest.mark.parametrize("encrypt", [True, False], ids=["encrypt", "decrypt"])
def test_control_without_full_clearing_finds_round_keys(encrypt):
    """The same reading finds round keys when the clearing is skipped, and in
    zmm16-31 when only VZEROALL runs (the code before this test)."""
    key = os.urandom(64)
    blocks = xts_round_key_blocks(key)
    sched = _schedule(key)
    src, dst = os.urandom(SECTOR), bytearray(SECTOR)
    assert registers_holding(_x._registers_after_crypt(sched, src, dst, SECTOR, int(encrypt), CLEAR_NONE), blocks)
    held = registers_holding(_x._registers_after_crypt(sched, src, dst, SECTOR, int(encrypt), CLEAR_ZEROALL), blocks)
    assert held and all(r >= 16 for r in held), held


def test_no_key_material_in_registers_after_expand():
    key = os.urandom(64)
    blocks = xts_round_key_blocks(key)
    regs = _x._registers_after_expand(key, bytearray(_x.SCHED_SIZE), CLEAR_FULL)
    assert regs == bytes(len(regs))
    assert registers_holding(_x._registers_after_expand(key, bytearray(_x.SCHED_SIZE), CLEAR_NONE), blocks)
