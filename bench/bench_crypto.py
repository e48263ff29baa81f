#!/usr/bin/env python3
"""Throughput of each XTS backend at 4 KiB and 1 MiB, next to ``openssl speed``.

Run with ``make bench-crypto``, or from the project root:
``.venv/bin/python bench/bench_crypto.py``

For each implementation this machine has (vaes, evp, reference: see
evscrypt/crypto/backend.py, which picks the default), encryption and
decryption of one 4 KiB sector and of a 1 MiB run of 256 sectors, on one
thread (the run is not split across the cores here, as the engine may do).
Then ``openssl speed -evp aes-256-xts`` with 4096-byte buffers (the system
libcrypto, as the evp backend uses it), and the OpenSSL that ``cryptography``
bundles (one 1 MiB XTS unit: its raw AES-XTS speed; where it is 3.5 or
later it has the VAES code that makes evp the default on such a libcrypto).
MB/s are decimal (10**6 bytes/s), as openssl reports them.  Not a test: it
asserts nothing about speed.  Takes about 30 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evscrypt.crypto import backend  # noqa: E402
from evscrypt.crypto.xts import SectorCipher, reference_crypt  # noqa: E402
from evscrypt.errors import EvscryptError  # noqa: E402
from evscrypt.format import SECTOR_SIZE  # noqa: E402
from evscrypt.secret import Secret  # noqa: E402

SECONDS_PER_ROW = 1.5
OPENSSL_SECONDS = 2


def measure(fn, nbytes: int, seconds: float = SECONDS_PER_ROW) -> float:
    """Call ``fn`` repeatedly for about ``seconds``; return MB/s."""
    for _ in range(3):  # warm up
        fn()
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(8):
            fn()
        calls += 8
        now = time.perf_counter()
        if now >= deadline:
            break
    return calls * nbytes / (now - start) / 1e6


def openssl_speed(decrypt: bool) -> tuple[float | None, str]:
    """MB/s of ``openssl speed -evp aes-256-xts`` for 4096-byte buffers.

    Falls back to the default block sizes (4096, else 16384 column) if this
    openssl lacks ``-bytes``.  Returns (MB/s or None, a note).
    """
    exe = shutil.which("openssl")
    if exe is None:
        return None, "openssl not found"
    base = [exe, "speed", "-seconds", str(OPENSSL_SECONDS)]
    if decrypt:
        base.append("-decrypt")
    base += ["-evp", "aes-256-xts"]
    for extra, wanted in ((["-bytes", str(SECTOR_SIZE)], (4096,)), ([], (4096, 16384))):
        try:
            p = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"openssl failed: {e}"
        if p.returncode != 0:
            continue
        mbps, col = _parse_speed(p.stdout, wanted)
        if mbps is not None:
            cmd = " ".join(["openssl", *(base + extra)[1:]])
            return mbps, f"{cmd}  [{col}-byte column]"
    return None, "could not parse openssl speed output"


def _parse_speed(out: str, wanted: tuple[int, ...]) -> tuple[float | None, int | None]:
    # type           4096 bytes
    # AES-256-XTS    5102364.56k        (1000s of bytes per second)
    lines = out.splitlines()
    sizes: list[int] | None = None
    for line in lines:
        if line.startswith("type"):
            sizes = [int(x) for x in re.findall(r"(\d+) bytes", line)]
        elif sizes and line.lower().startswith("aes-256-xts"):
            values = re.findall(r"([\d.]+)k", line)
            if len(values) != len(sizes):
                continue
            for size in wanted:
                if size in sizes:
                    return float(values[sizes.index(size)]) * 1000 / 1e6, size
    return None, None


def bundled_openssl(raw_key: bytes, nbytes: int) -> tuple[float, float, str]:
    """MB/s (encrypt, decrypt) of the OpenSSL inside ``cryptography`` on one
    XTS unit of ``nbytes`` (one context per call: no per-sector re-keying)."""
    from cryptography.hazmat.backends.openssl import backend as ossl
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    c = Cipher(algorithms.AES(raw_key), modes.XTS(bytes(16)))
    src = os.urandom(nbytes)
    enc = measure(lambda: c.encryptor().update(src), nbytes)
    dec = measure(lambda: c.decryptor().update(src), nbytes)
    return enc, dec, ossl.openssl_version_text()


def main() -> int:
    key = Secret.random(64)
    while key.view(0, 32) == key.view(32, 64):  # XTS rejects equal halves
        key = Secret.random(64)
    raw_key = bytes(key.buffer)  # reference_crypt takes a plain buffer; benchmark only
    rows: list[tuple[str, float | None, str]] = []  # (label, MB/s, direction)

    saved = os.environ.pop(backend.ENV, None)
    default = backend.default()
    for name in backend.NAMES:
        os.environ[backend.ENV] = name
        try:
            sc = SectorCipher(key)
        except EvscryptError as e:  # not on this machine
            rows.append((f"{backend.describe(name)}: {e.message}", None, "enc"))
            continue
        # one thread: the implementation itself (SectorCipher may split a run across the cores)
        fast = sc._fast
        for n in (1, 256):
            src = os.urandom(n * SECTOR_SIZE)
            dst = bytearray(len(src))
            size = "4 KiB" if n == 1 else "1 MiB"
            tag = f"{backend.describe(name)}{' (default)' if name == default else ''}"
            if fast is not None:
                enc = measure(lambda: fast.crypt_into(123456, src, dst, True), len(src))
                dec = measure(lambda: fast.crypt_into(123456, src, dst, False), len(src))
            else:
                enc = measure(lambda: reference_crypt(raw_key, 123456, src, True), len(src))
                dec = measure(lambda: reference_crypt(raw_key, 123456, src, False), len(src))
            rows.append((f"{tag:<24} encrypt {size:>6}", enc, "enc"))
            rows.append((f"{tag:<24} decrypt {size:>6}", dec, "dec"))
        sc.close()
    os.environ.pop(backend.ENV, None)
    if saved is not None:
        os.environ[backend.ENV] = saved

    ossl_enc, note_enc = openssl_speed(decrypt=False)
    ossl_dec, note_dec = openssl_speed(decrypt=True)
    ossl = {"enc": ossl_enc, "dec": ossl_dec}
    rows.append(("openssl speed aes-256-xts encrypt  4096 B", ossl_enc, "enc"))
    rows.append(("openssl speed aes-256-xts decrypt  4096 B", ossl_dec, "dec"))
    b_enc, b_dec, b_ver = bundled_openssl(raw_key, 1 << 20)
    rows.append((f"{b_ver} (in cryptography) encrypt 1 MiB unit", b_enc, "enc"))
    rows.append((f"{b_ver} (in cryptography) decrypt 1 MiB unit", b_dec, "dec"))
    key.wipe()

    width = max(len(r[0]) for r in rows)
    print(f"default XTS backend here: {backend.describe(default)}"
          f" (libcrypto has its own VAES XTS: {'yes' if backend.libcrypto_has_vaes_xts() else 'no'})")
    print(f"XTS-AES-256, 4 KiB sectors, one thread  (python {sys.version.split()[0]})")
    print(f"{'backend':<{width}}  {'MB/s':>10}  {'vs openssl':>10}")
    print(f"{'-' * width}  {'-' * 10}  {'-' * 10}")
    for label, mbps, direction in rows:
        ref = ossl[direction]
        speed = f"{mbps:10.1f}" if mbps is not None else f"{'n/a':>10}"
        ratio = f"{mbps / ref:10.3f}" if (mbps is not None and ref) else f"{'n/a':>10}"
        print(f"{label:<{width}}  {speed}  {ratio}")
    print()
    print(f"openssl: {note_enc}")
    print(f"openssl: {note_dec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
