"""The local root key's file formats: old seals still open, new seals are
stronger, and a seal opens with the scrypt parameters it records.

Golden keystores written by the code before N=2^17 (tests/golden/kms-local)
must give back the very DK they wrapped.  The scrypt oracle for parameters
is hashlib.scrypt (OpenSSL through the standard library), independent of
cryptography's Scrypt that the KMS uses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from evscrypt.errors import KMSError
from evscrypt.kms import local
from evscrypt.kms.local import LocalKMS

GOLDEN = Path(__file__).parent / "golden" / "kms-local"


def golden_copy(kind: str, tmp_path: Path, monkeypatch) -> tuple[LocalKMS, dict]:
    d = tmp_path / kind
    shutil.copytree(GOLDEN / kind, d)
    monkeypatch.setenv("EVSCRYPT_PASSPHRASE_FILE", str(d / "passphrase"))
    return LocalKMS(d), json.loads((d / "expected.json").read_text())


def unwrap(kms: LocalKMS, expected: dict) -> bytes:
    with kms.decrypt(bytes.fromhex(expected["wrapped"]), expected["context"], expected["key_id"]) as dk:
        return bytes(dk.buffer)


@pytest.mark.parametrize("kind", ["none", "scrypt-n15", "scrypt-n15-noparams"])
def test_old_keystores_still_open(kind, tmp_path, monkeypatch):
    kms, expected = golden_copy(kind, tmp_path, monkeypatch)
    before = (kms.root_path).read_bytes()
    assert unwrap(kms, expected) == bytes.fromhex(expected["dk"])
    assert kms.root_path.read_bytes() == before  # opening never rewrites the root key


def test_new_seals_use_n_2_17_and_open(tmp_path, monkeypatch):
    kms, expected = golden_copy("scrypt-n15", tmp_path, monkeypatch)
    kms.seal_root(kms.dir / "passphrase")
    doc = json.loads(kms.root_path.read_text())
    assert (doc["n"], doc["r"], doc["p"]) == (local.SCRYPT_N, local.SCRYPT_R, local.SCRYPT_P)
    assert doc["n"] >= 2**17
    assert unwrap(kms, expected) == bytes.fromhex(expected["dk"])
    # and back to unsealed: the same root key, in the old file format
    kms.seal_root(None)
    doc = json.loads(kms.root_path.read_text())
    assert list(doc) == ["version", "kdf", "key"] and len(base64.b64decode(doc["key"], validate=True)) == 32
    monkeypatch.delenv("EVSCRYPT_PASSPHRASE_FILE")
    assert unwrap(kms, expected) == bytes.fromhex(expected["dk"])


def reseal_with(kms: LocalKMS, n: int, r: int, p: int, passphrase: bytes) -> None:
    """Seal the keystore's root key by hand with the given parameters
    (hashlib.scrypt), writing the parameters into root.key."""
    root = base64.b64decode(json.loads(kms.root_path.read_text())["key"])
    salt, nonce = os.urandom(16), os.urandom(12)
    kek = hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, dklen=32, maxmem=256 << 20)
    ct = AESGCM(kek).encrypt(nonce, root, b"evscrypt/v1 root")
    kms.root_path.write_text(json.dumps({"version": 1, "kdf": "scrypt", "n": n, "r": r, "p": p,
                                         "salt": base64.b64encode(salt).decode(),
                                         "nonce": base64.b64encode(nonce).decode(),
                                         "ct": base64.b64encode(ct).decode()}))


@pytest.mark.parametrize("n, r, p", [(2**14, 8, 1), (2**12, 4, 2)])
def test_a_seal_opens_with_the_parameters_it_records(n, r, p, tmp_path, monkeypatch):
    kms, expected = golden_copy("none", tmp_path, monkeypatch)
    (kms.dir / "passphrase").write_bytes(b"hunter2\n")
    reseal_with(kms, n, r, p, b"hunter2")
    assert unwrap(kms, expected) == bytes.fromhex(expected["dk"])


@pytest.mark.parametrize("params", [{"n": 1000}, {"n": 2**17, "r": 8, "p": 2**10}, {"n": "16384"}, {"r": 0},
                                    {"n": 2**40}])
def test_unusable_scrypt_parameters_are_refused(params, tmp_path, monkeypatch):
    kms, expected = golden_copy("scrypt-n15", tmp_path, monkeypatch)
    doc = json.loads(kms.root_path.read_text())
    doc.update(params)
    kms.root_path.write_text(json.dumps(doc))
    with pytest.raises(KMSError, match="invalid scrypt parameters"):
        unwrap(kms, expected)


def test_damaged_unsealed_root_key_is_refused(tmp_path, monkeypatch):
    kms, expected = golden_copy("none", tmp_path, monkeypatch)
    doc = json.loads(kms.root_path.read_text())
    for bad in (doc["key"][:-4], doc["key"].replace(doc["key"][5], "*"), ""):
        kms.root_path.write_text(json.dumps({**doc, "key": bad}))
        with pytest.raises(KMSError, match="unreadable or damaged"):
            unwrap(kms, expected)
    kms.root_path.write_text('{"version": 1, "kdf": "none"}')
    with pytest.raises(KMSError, match="unreadable or damaged"):
        unwrap(kms, expected)


def test_passphrase_from_a_pipe(tmp_path, monkeypatch):
    """A passphrase need not be a regular file (a systemd credential may be
    anything readable); its trailing newline is not part of it."""
    kms, expected = golden_copy("scrypt-n15", tmp_path, monkeypatch)
    fifo = tmp_path / "pw.fifo"
    os.mkfifo(fifo)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            with open(fifo, "wb") as f:
                f.write((kms.dir / "passphrase").read_bytes())
        finally:
            os._exit(0)
    monkeypatch.setenv("EVSCRYPT_PASSPHRASE_FILE", str(fifo))
    try:
        assert unwrap(kms, expected) == bytes.fromhex(expected["dk"])
    finally:
        os.waitpid(pid, 0)
