"""Which XTS implementation runs: the one place that decides, and why.

Three implementations encrypt a sector, all tested against the same vectors:

* ``vaes``: our VAES/AVX-512 loop in C (vaes.py, ``_xtsvaes.c``);
* ``evp``: the system's OpenSSL libcrypto through EVP (evp.py);
* ``reference``: ``cryptography``, one context per sector (slow, obviously right).

The default follows measurement, not habit (``make bench-crypto`` prints
each one's throughput on the machine it runs on).  Our VAES code runs about
twice as fast as OpenSSL 3.0's XTS, which uses 128-bit AES-NI; OpenSSL 3.5
added its own VAES/AVX-512 XTS (``aesni_xts_avx512``), and where the system
libcrypto has it, it is the maintained implementation of the same
instructions, so EVP is the default there and our own AES code is not used.
So: EVP where libcrypto is >= 3.5 and the CPU has what that code needs;
else VAES where the CPU has it; else EVP; else the reference.

``EVSCRYPT_XTS=vaes|evp|reference`` forces one; a forced implementation
that this machine lacks is an error, never a silent fallback.
"""

from __future__ import annotations

import os

from ..errors import InvalidArgument, UnsupportedFeature
from . import evp, vaes

NAMES = ("vaes", "evp", "reference")
ENV = "EVSCRYPT_XTS"
#: OpenSSL_version_num() of the first release with aesni_xts_avx512 (3.5.0).
OPENSSL_VAES_XTS = 0x30500000
#: The CPU features OpenSSL's aesni_xts_avx512_eligible() requires (its
#: capability bits: AVX512F/DQ/BW/VL, VAES, VPCLMULQDQ, VBMI2), as the
#: kernel names them in /proc/cpuinfo (it lists them only where it saves the
#: AVX-512 state too).
OPENSSL_VAES_XTS_CPU = frozenset({"avx512f", "avx512dq", "avx512bw", "avx512vl", "vaes", "vpclmulqdq",
                                  "avx512_vbmi2"})


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where it reports none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def libcrypto_has_vaes_xts() -> bool:
    """Whether the system libcrypto runs XTS on VAES/AVX-512 on this CPU."""
    return evp.version_num() >= OPENSSL_VAES_XTS and OPENSSL_VAES_XTS_CPU <= cpu_flags()


def default() -> str:
    """The implementation this machine runs when nothing is forced."""
    if evp.available() and libcrypto_has_vaes_xts():
        return "evp"
    if vaes.available():
        return "vaes"
    return "evp" if evp.available() else "reference"


def choose() -> str:
    """The implementation to run: ``$EVSCRYPT_XTS`` if set, else :func:`default`.

    Read on every call (each new cipher), so a test or a benchmark may
    change it; the daemon checks it once at start, so a bad value stops it
    there rather than at the first attach."""
    want = os.environ.get(ENV, "").strip() or "auto"
    if want == "auto":
        return default()
    if want not in NAMES:
        raise InvalidArgument(f"{ENV}={want!r}: choose one of {', '.join(NAMES)} (or leave it unset)")
    if want == "vaes" and not vaes.available():
        raise UnsupportedFeature(f"{ENV}=vaes: {vaes.unavailable_reason()}")
    if want == "evp" and not evp.available():
        raise UnsupportedFeature(f"{ENV}=evp: the system libcrypto cannot be loaded or has no AES-XTS")
    return want


def describe(name: str) -> str:
    """The implementation as status and --version name it: 'vaes',
    'evp openssl 3.0.19', 'reference'."""
    if name == "evp":
        return f"evp openssl {evp.version() or 'unknown'}"
    return name
