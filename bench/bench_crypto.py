#!/usr/bin/env python3
"""Throughput of the XTS sector engine next to ``openssl speed``.

Run from the project root:  .venv/bin/python bench/bench_crypto.py

Measures SectorCipher (encrypt_into / decrypt_into, preallocated output) on
each fast path this machine has (vaes, evp) in batches of 1 and of 64 4-KiB
sectors (64 is below the size at which a request is split across cores), the
per-sector ``reference_crypt``
path, and ``openssl speed -evp aes-256-xts`` with 4096-byte buffers, all on
one core.  MB/s are decimal (10**6 bytes/s), as openssl reports them.
Not a test: it asserts nothing about speed.  Takes about 20 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evscrypt.crypto.xts import SECTOR_SIZE, SectorCipher, reference_crypt  # noqa: E402
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


def main() -> int:
    key = Secret.random(64)
    while key.view(0, 32) == key.view(32, 64):  # XTS rejects equal halves
        key = Secret.random(64)
    raw_key = bytes(key.buffer)  # reference_crypt takes a plain buffer; benchmark only
    rows: list[tuple[str, float | None, str]] = []  # (label, MB/s, direction)

    default_path = SectorCipher(key).path
    for path in ("vaes", "evp"):
        os.environ["EVSCRYPT_XTS"] = path
        sc = SectorCipher(key)
        if sc.path != path:  # not on this machine
            continue
        for n in (1, 64):
            src = os.urandom(n * SECTOR_SIZE)
            dst = bytearray(len(src))
            first = 123456
            rows.append((f"{path:4} encrypt_into  {n:3d} sector{'s' if n > 1 else ' '}",
                         measure(lambda: sc.encrypt_into(first, src, dst), len(src)), "enc"))
            rows.append((f"{path:4} decrypt_into  {n:3d} sector{'s' if n > 1 else ' '}",
                         measure(lambda: sc.decrypt_into(first, src, dst), len(src)), "dec"))
        sc.close()
    del os.environ["EVSCRYPT_XTS"]
    src = os.urandom(256 * SECTOR_SIZE)
    rows.append(("reference_crypt encrypt    256 sectors",
                 measure(lambda: reference_crypt(raw_key, 0, src, True), len(src)), "enc"))
    rows.append(("reference_crypt decrypt    256 sectors",
                 measure(lambda: reference_crypt(raw_key, 0, src, False), len(src)), "dec"))
    key.wipe()

    ossl_enc, note_enc = openssl_speed(decrypt=False)
    ossl_dec, note_dec = openssl_speed(decrypt=True)
    ossl = {"enc": ossl_enc, "dec": ossl_dec}
    rows.append(("openssl speed aes-256-xts encrypt  4096 B", ossl_enc, "enc"))
    rows.append(("openssl speed aes-256-xts decrypt  4096 B", ossl_dec, "dec"))

    width = max(len(r[0]) for r in rows)
    print(f"SectorCipher default path: {default_path}")
    print(f"XTS-AES-256, 4 KiB sectors, one thread  (python {sys.version.split()[0]})")
    print(f"{'path':<{width}}  {'MB/s':>10}  {'vs openssl':>10}")
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
