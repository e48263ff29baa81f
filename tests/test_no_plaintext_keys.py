"""No data key and no CMK is ever stored in plaintext under the state
directory: not whole, not either XTS half of a DK, not in hex, not in base64
(at any byte alignment).  The only file allowed to hold a DK is the explicit
output of dump-key, which the scan excludes, after proving that the scanner
does find the key there."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from evscrypt.format import SECTOR_SIZE
from evscrypt.kms.local import _WRAP_HEAD, _context_aad


def encodings(secret: bytes) -> dict[str, bytes]:
    """Byte patterns under which ``secret`` could appear in a file."""
    out = {
        "raw": secret,
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
    }
    for name, enc in (("b64", base64.b64encode), ("b64url", base64.urlsafe_b64encode)):
        for shift in range(3):
            # inside a longer base64 text the key may start at any byte offset
            # modulo 3; keep only the characters determined by the key alone
            text = enc(bytes(shift) + secret)
            core = text[4 if shift else 0:-4]
            out[f"{name}+{shift}"] = core
    return out


def scan(root: Path, secrets: dict[str, bytes], exclude: set[Path] = frozenset()) -> list[str]:
    """Every (file, secret, encoding) hit under ``root``."""
    needles = [(label, enc, pat) for label, s in secrets.items() for enc, pat in encodings(s).items()]
    hits = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p in exclude:
                continue
            data = p.read_bytes()
            for label, enc, pat in needles:
                if pat in data:
                    hits.append(f"{p.relative_to(root)}: {label} ({enc})")
    return hits


def cmk_material(kms_dir: Path) -> dict[str, bytes]:
    """Decrypt every CMK in keys.json with the root key, independently of evscrypt."""
    root = base64.b64decode(json.loads((kms_dir / "root.key").read_text())["key"])
    out = {}
    for r in json.loads((kms_dir / "keys.json").read_text())["keys"]:
        m = r["material"]
        cmk = AESGCM(root).decrypt(base64.b64decode(m["nonce"]), base64.b64decode(m["ct"]),
                                   b"evscrypt/v1 cmk:" + r["key_id"].encode())
        assert len(cmk) == 32
        out[r["key_id"]] = cmk
    return out


def test_scanner_finds_planted_keys(tmp_path):
    key = os.urandom(64)
    for i, (enc, pat) in enumerate(encodings(key).items()):
        d = tmp_path / f"c{i}"
        d.mkdir()
        (d / "control").write_bytes(os.urandom(5000) + b"prefix:" + pat + b":suffix" + os.urandom(5000))
        assert scan(d, {"k": key}), enc
        assert scan(d, {"half": key[32:]}), enc  # a half is found inside the whole
    # base64 of the key embedded at each offset in a longer base64 document
    for pad in range(3):
        d = tmp_path / f"b{pad}"
        d.mkdir()
        (d / "doc.json").write_text(json.dumps({"blob": base64.b64encode(os.urandom(pad) + key + b"tail").decode()}))
        assert scan(d, {"k": key}), pad
    # and no false positive
    d = tmp_path / "clean"
    d.mkdir()
    (d / "f").write_bytes(os.urandom(1 << 16))
    assert scan(d, {"k": key}) == []


def test_no_plaintext_key_material_under_home(store, kms):
    kms.create_key("team-a")
    kms.create_key("team-b", "second CMK")
    specs = [("v-default", None), ("v-a", "team-a"), ("v-b", "team-b"), ("v-b2", "team-b")]
    for name, key in specs:
        store.create(name, 64 * SECTOR_SIZE, key=key)
    store.create("v-pre", 16 * SECTOR_SIZE, key="team-a", preallocate=True)
    store.create("v-plain", 16 * SECTOR_SIZE, encrypted=False)
    names = [n for n, _ in specs] + ["v-pre"]
    # put some ciphertext in the images too
    for n in names:
        with store.engine(n) as (eng, _):
            eng.write(1234, os.urandom(3 * SECTOR_SIZE))
            eng.write(40 * SECTOR_SIZE if eng.size > 40 * SECTOR_SIZE else 0, bytes(SECTOR_SIZE))
    # a disabled key and a key pending deletion keep their material encrypted too
    kms.create_key("retired")
    kms.disable("retired")
    kms.create_key("doomed")
    kms.schedule_deletion("doomed", days=7)

    kms_dir = store.home / "kms" / "local"
    assert kms_dir == kms.dir
    cmks = cmk_material(kms_dir)
    assert len(cmks) == 5  # evs/default, team-a, team-b, retired, doomed

    secrets: dict[str, bytes] = {f"cmk {kid}": m for kid, m in cmks.items()}
    dks = {}
    for n in names:
        h = store.header(n)
        with store.data_key(n) as dk:
            d = bytes(dk.buffer)
        assert len(d) == 64 and d[:32] != d[32:]
        # our decrypted CMK is really the one that wraps this DK (so the scan checks the right bytes)
        head = h.wrapped_dk[:_WRAP_HEAD.size]
        ours = AESGCM(cmks[h.key_id]).decrypt(head[-12:], h.wrapped_dk[_WRAP_HEAD.size:],
                                              _context_aad(head, h.encryption_context))
        assert ours == d
        dks[n] = d
        secrets[f"dk {n}"] = d
        secrets[f"dk {n} [0:32]"] = d[:32]
        secrets[f"dk {n} [32:64]"] = d[32:]
    assert len(set(dks.values())) == len(dks)

    # dump-key output inside home: the scanner must find the DK there, then it is excluded
    dumped = store.home / "recovery.key"
    store.dump_key("v-a", dumped)
    assert dumped.read_bytes() == dks["v-a"]
    assert any("dk v-a" in hit for hit in scan(store.home, secrets))

    files = [Path(dp) / f for dp, _, fs in os.walk(store.home) for f in fs]
    rel = {str(p.relative_to(store.home)) for p in files}
    assert {"kms/local/keys.json", "kms/local/root.key", "volumes/v-a.img", "volumes/v-plain.img"} <= rel

    hits = scan(store.home, secrets, exclude={dumped})
    assert hits == [], "plaintext key material found:\n" + "\n".join(hits)
