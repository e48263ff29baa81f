"""cryptsetup itself as an oracle for 4 KiB-sector aes-xts-plain64 (LUKS2).

Everything here is offline userspace work on regular files: no device-mapper,
no loop devices.  The data file holds ciphertext only (detached LUKS2 header,
data segment at offset 0), exactly the layout our engine reads and writes.

* decrypt direction: we encrypt, ``cryptsetup reencrypt --decrypt`` decrypts
  in place, and the file must come back to our plaintext;
* encrypt direction: ``cryptsetup reencrypt --encrypt`` (new detached header,
  volume key supplied with ``--volume-key-file``) encrypts our plaintext in
  place, and the file must equal our ciphertext.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from evscrypt.crypto.xts import SectorCipher
from evscrypt.format import SECTOR_SIZE
from evscrypt.secret import Secret

CRYPTSETUP = shutil.which("cryptsetup")

pytestmark = pytest.mark.skipif(CRYPTSETUP is None, reason="cryptsetup is not on PATH")

NSECTORS = 64
PASSPHRASE = b"evscrypt interop test passphrase"

# Common LUKS2 parameters: aes-xts-plain64, 512-bit key (XTS-AES-256), 4 KiB
# sectors, and a cheap PBKDF so the test stays fast.
LUKS2_PARAMS = [
    "--type", "luks2",
    "--cipher", "aes-xts-plain64",
    "--key-size", "512",
    "--sector-size", "4096",
    "--pbkdf", "pbkdf2",
    "--pbkdf-force-iterations", "1000",
]


def _run(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [CRYPTSETUP, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert p.returncode == 0, (
        f"cryptsetup {' '.join(args)} failed with {p.returncode}:\n"
        f"stdout: {p.stdout.decode(errors='replace')}\nstderr: {p.stderr.decode(errors='replace')}"
    )
    return p


def _segment0(header) -> dict:
    out = _run("luksDump", "--dump-json-metadata", str(header)).stdout
    return json.loads(out)["segments"]["0"]


def _large_iv_ciphertext(key: bytes, data: bytes) -> bytes:
    """The wrong convention (tweak = sector number in 4 KiB units), for a negative control."""
    out = bytearray()
    for n in range(len(data) // SECTOR_SIZE):
        e = Cipher(algorithms.AES(key), modes.XTS(n.to_bytes(16, "little"))).encryptor()
        out += e.update(data[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE]) + e.finalize()
    return bytes(out)


@pytest.fixture
def material(tmp_path):
    dk = os.urandom(64)
    while dk[:32] == dk[32:]:  # pragma: no cover
        dk = os.urandom(64)
    dk_file = tmp_path / "dk.bin"
    dk_file.write_bytes(dk)
    pass_file = tmp_path / "pass.bin"
    pass_file.write_bytes(PASSPHRASE)
    plaintext = os.urandom(NSECTORS * SECTOR_SIZE)
    sc = SectorCipher(Secret.from_buffer(dk))
    try:
        ciphertext = bytes(sc.encrypt(0, plaintext))
    finally:
        sc.close()
    assert ciphertext != plaintext
    return dk, dk_file, pass_file, plaintext, ciphertext


def test_cryptsetup_decrypts_our_ciphertext(tmp_path, material):
    dk, dk_file, pass_file, plaintext, ciphertext = material
    data = tmp_path / "volume.img"
    data.write_bytes(ciphertext)
    header = tmp_path / "volume.luks2"  # luksFormat creates the header file itself

    _run(
        "luksFormat", "--batch-mode", *LUKS2_PARAMS,
        "--header", str(header),
        "--volume-key-file", str(dk_file),
        "--key-file", str(pass_file),
        str(data),
    )
    # luksFormat with a detached header must leave the data area alone
    assert data.read_bytes() == ciphertext
    seg = _segment0(header)
    assert seg["type"] == "crypt"
    assert seg["offset"] == "0"
    assert seg["encryption"] == "aes-xts-plain64"
    assert seg["sector_size"] == 4096
    assert seg["iv_tweak"] == "0"

    _run(
        "reencrypt", "--decrypt", "--force-offline-reencrypt", "--batch-mode",
        "--header", str(header),
        "--key-file", str(pass_file),
        str(data),
    )
    got = data.read_bytes()
    assert len(got) == len(plaintext)
    bad = [n for n in range(NSECTORS)
           if got[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE] != plaintext[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE]]
    assert not bad, f"sectors cryptsetup decrypted differently: {bad[:10]}"
    # the header now describes a plain (linear) device
    assert _segment0(header)["type"] == "linear"


def test_cryptsetup_encrypts_like_us(tmp_path, material):
    dk, dk_file, pass_file, plaintext, ciphertext = material
    data = tmp_path / "volume.img"
    data.write_bytes(plaintext)
    header = tmp_path / "volume.luks2"

    _run(
        "reencrypt", "--encrypt", "--force-offline-reencrypt", "--batch-mode", *LUKS2_PARAMS,
        "--header", str(header),
        "--volume-key-file", str(dk_file),
        "--key-file", str(pass_file),
        str(data),
    )
    seg = _segment0(header)
    assert (seg["type"], seg["offset"], seg["encryption"], seg["sector_size"]) == (
        "crypt", "0", "aes-xts-plain64", 4096)

    # cryptsetup really used our DK as the volume key
    vk_out = tmp_path / "vk.out"
    _run(
        "luksDump", "--dump-volume-key", "--batch-mode",
        "--key-file", str(pass_file),
        "--volume-key-file", str(vk_out),
        str(header),
    )
    assert vk_out.read_bytes() == dk

    got = data.read_bytes()
    assert len(got) == len(ciphertext)
    bad = [n for n in range(NSECTORS)
           if got[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE] != ciphertext[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE]]
    assert not bad, f"sectors cryptsetup encrypted differently: {bad[:10]}"

    # Negative control: with tweak = sector (iv_large_sectors) every sector
    # but sector 0 (where both conventions give tweak 0) would differ.
    wrong = _large_iv_ciphertext(dk, plaintext)
    assert wrong[:SECTOR_SIZE] == got[:SECTOR_SIZE]
    assert all(wrong[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE] != got[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE]
               for n in range(1, NSECTORS))
