"""Checks shared by the tests of the fast XTS paths (EVP and VAES)."""

from __future__ import annotations

import os
import threading

import pytest

from evscrypt.crypto.xts import SectorCipher, reference_crypt
from evscrypt.format import SECTOR_SIZE
from evscrypt.secret import Secret


def threads_share_one_key(first: int, sectors: int, rounds: int, threads: int = 4) -> None:
    """Several threads encrypt with one SectorCipher at once, and every
    result equals the reference (``cryptography``, per sector): they share
    the read-only key and nothing else.  The cipher refuses work once closed."""
    key = Secret.random(64)
    c = SectorCipher(key)
    data = os.urandom(sectors * SECTOR_SIZE)
    expect = reference_crypt(bytes(key.buffer), first, data, True)
    bad = []

    def work():
        for _ in range(rounds):
            if bytes(c.encrypt(first, data)) != expect:
                bad.append(1)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad
    c.close()
    try:
        c.encrypt(0, data)
    except ValueError:
        return
    raise AssertionError("a closed cipher encrypted")


def pinned_xts(path: str):
    """A module-wide autouse fixture that forces implementation ``path``
    (EVSCRYPT_XTS): a module testing one path must not run on another."""

    @pytest.fixture(scope="module", autouse=True)
    def _pin():
        with pytest.MonkeyPatch.context() as m:
            m.setenv("EVSCRYPT_XTS", path)
            yield

    return _pin
