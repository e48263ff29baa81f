"""The format's facts (evscrypt/format.py) against values written out by
hand from docs/FORMAT.md and dm-crypt's plain64, not computed by the code
under test.  The XTS vector suites check the tweak end to end through every
implementation; this checks the rules themselves."""

from __future__ import annotations

import pytest

from evscrypt import format as fmt


def test_the_numbers_are_those_of_the_specification():
    assert fmt.SECTOR_SIZE == 4096
    assert fmt.IV_UNIT == 512 and fmt.IV_PER_SECTOR == 8
    assert fmt.SLOT_SIZE == 65536 and fmt.COPIES == 2 and fmt.HEADER_AREA == 131072
    assert fmt.DEFAULT_DATA_OFFSET == 1048576
    assert fmt.CIPHER_NAME == "aes-xts-plain64" and fmt.KEY_SIZE == 64
    assert fmt.ZERO_SECTOR == b"\0" * 4096


@pytest.mark.parametrize("sector,want", [
    (0, "00000000000000000000000000000000"),
    (1, "08000000000000000000000000000000"),
    (0x20, "00010000000000000000000000000000"),
    (0x1FFFFFFFFFFFFFFF, "f8ffffffffffffff0000000000000000"),
    (0x2000000000000000, "00000000000000000100000000000000"),  # 8n passes 2**64: the 128-bit form
    ((1 << 125) - 1, "f8ffffffffffffffffffffffffffffff"),  # the last sector whose tweak fits
])
def test_tweak_is_plain64_in_512_byte_units_little_endian(sector, want):
    assert fmt.tweak(sector).hex() == want


def test_tweak_past_128_bits_is_refused():
    with pytest.raises(OverflowError):
        fmt.tweak(1 << 125)


def test_tweak_takes_the_iv_units_per_sector():
    assert fmt.tweak(3, 1).hex() == "03" + "00" * 15


def test_sector_n_is_stored_at_data_offset_plus_n_sectors():
    assert fmt.sector_to_backing(1048576, 0) == 1048576
    assert fmt.sector_to_backing(1048576, 3) == 1048576 + 12288
    assert fmt.sector_to_backing(131072, 10) == 172032


def test_holes_read_as_zeros_on_plaintext_always_on_encrypted_only_with_zero_unwritten():
    assert fmt.holes_read_as_zeros(encrypted=False, zero_unwritten=False)
    assert fmt.holes_read_as_zeros(encrypted=False, zero_unwritten=True)
    assert fmt.holes_read_as_zeros(encrypted=True, zero_unwritten=True)
    assert not fmt.holes_read_as_zeros(encrypted=True, zero_unwritten=False)


def _stored(pattern: str) -> bytes:
    """Sectors from a pattern: '0' an all-zero sector, 'x' one with data
    (a single nonzero byte at its end, the place a sloppy check misses)."""
    return b"".join(bytes(4096) if c == "0" else bytes(4095) + b"\x01" for c in pattern)


@pytest.mark.parametrize("pattern,runs", [
    ("", []),
    ("0000", []),
    ("xxxx", [(0, 4)]),
    ("0xx00x0", [(1, 3), (5, 6)]),
    ("x0x", [(0, 1), (2, 3)]),
])
def test_with_zero_unwritten_only_nonzero_sectors_hold_data(pattern, runs):
    assert list(fmt.written_runs(_stored(pattern), zero_unwritten=True)) == runs


@pytest.mark.parametrize("pattern", ["0000", "0xx00x0", "x"])
def test_without_zero_unwritten_every_sector_holds_data(pattern):
    assert list(fmt.written_runs(_stored(pattern), zero_unwritten=False)) == [(0, len(pattern))]


def test_nonzero_runs_of_other_block_sizes():
    buf = bytes(512) + b"\x01" + bytes(511) + bytes(512)
    assert list(fmt.nonzero_runs(buf, 512)) == [(1, 2)]
