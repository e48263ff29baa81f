"""AES-256 key schedules in pure Python: an oracle independent of OpenSSL and
of the VAES code, for tests that look for round keys in registers or memory.

FIPS-197 section 5.2 (key expansion) and 5.3.5 (the equivalent inverse
cipher's schedule: InvMixColumns of the middle round keys, which AES-NI's
AESIMC computes and OpenSSL and _xtsvaes.c store for decryption).  Checked
against FIPS-197 Appendix A.3 in test_aes_schedule_matches_fips197.
"""

from __future__ import annotations


def _sbox() -> list[int]:
    sbox = [0] * 256
    p = q = 1
    while True:  # p runs over GF(2^8)* by multiplying by 3, q by dividing
        p = p ^ ((p << 1) & 0xFF) ^ (0x1B if p & 0x80 else 0)
        q ^= q << 1
        q ^= q << 2
        q ^= q << 4
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09
        x = q ^ _rotl8(q, 1) ^ _rotl8(q, 2) ^ _rotl8(q, 3) ^ _rotl8(q, 4)
        sbox[p] = x ^ 0x63
        if p == 1:
            break
    sbox[0] = 0x63
    return sbox


def _rotl8(x: int, n: int) -> int:
    return ((x << n) | (x >> (8 - n))) & 0xFF


SBOX = _sbox()


def _xtime(b: int) -> int:
    return ((b << 1) ^ 0x1B) & 0xFF if b & 0x80 else b << 1


def _mul(a: int, b: int) -> int:
    r = 0
    while b:
        if b & 1:
            r ^= a
        a = _xtime(a)
        b >>= 1
    return r


def expand_256(key: bytes) -> list[bytes]:
    """The 15 round keys (16 bytes each) of AES-256 encryption."""
    assert len(key) == 32
    w = [list(key[4 * i:4 * i + 4]) for i in range(8)]
    rcon = 1
    for i in range(8, 60):
        t = list(w[i - 1])
        if i % 8 == 0:
            t = [SBOX[b] for b in t[1:] + t[:1]]
            t[0] ^= rcon
            rcon = _xtime(rcon)
        elif i % 8 == 4:
            t = [SBOX[b] for b in t]
        w.append([a ^ b for a, b in zip(w[i - 8], t)])
    return [bytes(sum(w[4 * r:4 * r + 4], [])) for r in range(15)]


def inv_mix_columns(block: bytes) -> bytes:
    out = bytearray(16)
    for c in range(4):
        a = block[4 * c:4 * c + 4]
        for r in range(4):
            out[4 * c + r] = (_mul(a[r], 14) ^ _mul(a[(r + 1) % 4], 11) ^ _mul(a[(r + 2) % 4], 13)
                              ^ _mul(a[(r + 3) % 4], 9))
    return bytes(out)


def decrypt_schedule_256(key: bytes) -> list[bytes]:
    """The equivalent inverse cipher's round keys, in the order they are used."""
    ek = expand_256(key)
    return [ek[14]] + [inv_mix_columns(ek[r]) for r in range(13, 0, -1)] + [ek[0]]


def xts_round_key_blocks(key64: bytes) -> set[bytes]:
    """Every 16-byte round key either half of an XTS key expands to, for
    encryption and for decryption."""
    out: set[bytes] = set()
    for half in (key64[:32], key64[32:]):
        out.update(expand_256(half))
        out.update(decrypt_schedule_256(half))
    return out
