"""The local soft-HSM: the default, zero set-up KMS backend.

CMKs live in ``keys.json`` under the state directory, each encrypted with
AES-256-GCM under a root key.  The root key is a 0600 file, optionally sealed
with a passphrase through scrypt.  Data keys are wrapped with AES-256-GCM under
the CMK, with the encryption context as authenticated data, so a wrapped DK
copied into another volume's header does not unwrap there.

Every change happens under an exclusive ``flock`` on ``.lock`` and is written
to a temporary file that replaces ``keys.json`` atomically; a crash keeps
either the old or the new keystore, never a torn one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import stat
import struct
import uuid as uuidlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import (
    AlreadyExists, InvalidArgument, InvalidCiphertext, KeyNotFound, KeyProtected,
    KeyStateError, KMSError, KMSUnavailable, NotFound, PermissionDenied,
)
from ..fsutil import locked_file, write_atomic
from ..names import DEFAULT_ALIAS, RESERVED_ALIAS_PREFIX, check_alias
from ..secret import Secret, b64_decode, b64_encode
from .base import Access, KeyInfo, KeyState, KMSBackend

# Wrapped-DK blob: magic, format version, CMK id (16 bytes), GCM nonce, then
# ciphertext+tag.  The blob names its CMK, so unwrap needs no lookup table.
WRAP_MAGIC = b"EVSW"
WRAP_VERSION = 1
_WRAP_HEAD = struct.Struct(">4sB16s12s")

MIN_DELETION_DAYS, MAX_DELETION_DAYS, DEFAULT_DELETION_DAYS = 7, 1096, 30
# scrypt cost of new seals: N=2^17, r=8 (128 MiB), as OWASP and cryptsetup's
# defaults suggest for an interactive-scale KDF; see docs/SECURITY.md for
# the unseal time.  It runs whenever the root key is loaded.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
# What seals that do not record their parameters were made with.
LEGACY_SCRYPT = {"n": 2**15, "r": 8, "p": 1}
# A root.key may ask for at most this much scrypt memory (128 * n * r * p).
SCRYPT_MAX_MEMORY = 1 << 30
PASSPHRASE_MAX = 64 << 10
_ROOT_NONE_HEAD = b'{"version": 1, "kdf": "none", "key": "'
_ROOT_NONE_TAIL = b'"}'
_ROOT_KEY_FIELD = re.compile(rb'"key"\s*:\s*"([^"]*)"')
PASSPHRASE_CREDENTIAL = "evscrypt-passphrase"
ARN_PREFIX = "arn:evscrypt:kms:local:key/"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _parse_iso(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _context_aad(head: bytes, context: dict[str, str]) -> bytes:
    return head + json.dumps(context, sort_keys=True, separators=(",", ":")).encode()


def passphrase_source() -> Path | None:
    """Where the root-key passphrase comes from: a file named by
    EVSCRYPT_PASSPHRASE_FILE, or the systemd credential evscrypt-passphrase."""
    env = os.environ.get("EVSCRYPT_PASSPHRASE_FILE")
    if env:
        return Path(env)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / PASSPHRASE_CREDENTIAL).exists():
        return Path(creds) / PASSPHRASE_CREDENTIAL
    return None


def _read_secret_file(path: Path, limit: int) -> Secret:
    """A whole small file read straight into a locked buffer (``readinto``):
    no ``bytes`` or ``str`` copy.  At most ``limit`` bytes; a pipe or a
    character device is read up to the limit."""
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        size = st.st_size if stat.S_ISREG(st.st_mode) else limit
        if size > limit:
            raise InvalidArgument(f"{path} is larger than {limit} bytes")
        with Secret(size) as buf:
            got = 0
            while got < size:
                n = f.readinto(buf.view(got))
                if not n:
                    break
                got += n
            return Secret.from_buffer(buf.view(0, got))


def _read_passphrase(path: Path) -> Secret:
    try:
        data = _read_secret_file(path, PASSPHRASE_MAX)
    except OSError as e:
        raise KMSUnavailable(f"the local keystore is sealed and its passphrase file {path} "
                             f"cannot be read: {e.strerror}")
    with data:
        end = len(data)
        while end and data.buffer[end - 1] in (10, 13):  # trailing newlines are not part of it
            end -= 1
        if not end:
            raise InvalidArgument(f"passphrase file {path} is empty")
        return Secret.from_buffer(data.view(0, end))


def _open_sealed(key: Secret, nonce: bytes, ct: bytes, aad: bytes) -> Secret:
    """AES-256-GCM decrypt straight into a Secret, so no immutable ``bytes``
    copy of the plaintext key is left for the garbage collector."""
    out = Secret(len(ct) - 16)
    try:
        AESGCM(key.view()).decrypt_into(nonce, ct, aad, out.buffer)
    except BaseException:
        out.wipe()
        raise
    return out


def _scrypt_params(doc: dict) -> tuple[int, int, int]:
    """The scrypt parameters a sealed root.key records (older seals record
    none: LEGACY_SCRYPT), checked so a damaged file cannot ask for absurd
    work or memory."""
    try:
        n, r, p = (doc.get(k, LEGACY_SCRYPT[k]) for k in ("n", "r", "p"))
        ok = all(type(v) is int and v > 0 for v in (n, r, p)) and n > 1 and n & (n - 1) == 0
    except AttributeError:
        ok = False
    if not ok or 128 * n * r * p > SCRYPT_MAX_MEMORY:
        raise KMSError("the sealed root key file has invalid scrypt parameters")
    return n, r, p


def _scrypt(passphrase: Secret, salt: bytes, n: int, r: int, p: int) -> Secret:
    """The key-encryption key, derived straight into a locked buffer."""
    kek = Secret(32)
    try:
        Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive_into(passphrase.view(), kek.buffer)
    except BaseException:
        kek.wipe()
        raise
    return kek


def _root_doc_none(root: Secret) -> Secret:
    """The unsealed root.key file, built in a locked buffer: the base64 of the
    key never exists as an immutable ``bytes`` or ``str``."""
    with b64_encode(root) as text:
        head, tail = len(_ROOT_NONE_HEAD), len(_ROOT_NONE_TAIL)
        doc = Secret(head + len(text) + tail)
        doc.buffer[:head] = _ROOT_NONE_HEAD
        doc.buffer[head:head + len(text)] = text.buffer
        doc.buffer[head + len(text):] = _ROOT_NONE_TAIL
        return doc


def _take_root_key(raw: Secret) -> Secret | None:
    """Decode the unsealed root key from the root.key text in ``raw``, and
    blank its base64 in ``raw`` so that the text can go to the JSON parser
    (which makes ``str`` copies) without it.  None if there is no key field."""
    m = _ROOT_KEY_FIELD.search(raw.buffer)
    if m is None:
        return None
    start, end = m.span(1)
    try:
        return b64_decode(raw.view(start, end))
    finally:
        raw.buffer[start:end] = b"-" * (end - start)


class LocalKMS(KMSBackend):
    """A file-backed soft-HSM under ``directory``."""

    name = "local"

    def __init__(self, directory: Path, clock: Callable[[], datetime] | None = None):
        self.dir = Path(directory)
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.keys_path = self.dir / "keys.json"
        self.root_path = self.dir / "root.key"

    def __repr__(self) -> str:
        return f"<LocalKMS {self.dir}>"

    # -- files and locking -------------------------------------------------
    def _ensure_dir(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def _locked(self) -> contextlib.AbstractContextManager:
        """Exclusive lock on the keystore: guards keys.json and root.key
        against concurrent read-modify-write by other processes."""
        try:
            self._ensure_dir()
        except OSError as e:
            raise self._unusable(e)
        return locked_file(self.dir / ".lock", self._unusable)

    def _unusable(self, e: OSError) -> KMSUnavailable:
        return KMSUnavailable(f"the local keystore {self.dir} is unusable: {e.strerror or e}")

    def _root_key(self) -> Secret:
        """Load (creating on first use) the root key that encrypts CMKs."""
        if not self.root_path.exists():
            if self.keys_path.exists():
                # never mint a new root key under existing CMKs: they would be lost
                raise KMSError(f"root key {self.root_path} is missing; restore it from backup")
            root = Secret.random(32)
            with _root_doc_none(root) as doc:
                write_atomic(self.root_path, doc.view())
            return root
        key = None
        try:
            with _read_secret_file(self.root_path, PASSPHRASE_MAX) as raw:
                key = _take_root_key(raw)
                doc = json.loads(raw.buffer)
            kdf = doc["kdf"]
        except (OSError, ValueError, KeyError, TypeError):
            if key is not None:
                key.wipe()
            raise KMSError(f"root key file {self.root_path} is unreadable or damaged")
        if kdf == "none":
            if key is None or len(key) != 32:
                if key is not None:
                    key.wipe()
                raise KMSError(f"root key file {self.root_path} is unreadable or damaged")
            return key
        if key is not None:
            key.wipe()
        if kdf == "scrypt":
            return self._unseal(doc)
        raise KMSError(f"root key file uses unknown kdf {kdf!r}")

    def _unseal(self, doc: dict) -> Secret:
        """The root key of a sealed root.key, with the scrypt parameters it records."""
        n, r, p = _scrypt_params(doc)
        src = passphrase_source()
        if src is None:
            raise KMSUnavailable("the local keystore is sealed: set EVSCRYPT_PASSPHRASE_FILE or the "
                                 f"systemd credential {PASSPHRASE_CREDENTIAL}")
        try:
            salt, nonce, ct = _unb64(doc["salt"]), _unb64(doc["nonce"]), _unb64(doc["ct"])
        except (KeyError, TypeError, ValueError):
            raise KMSError(f"root key file {self.root_path} is unreadable or damaged")
        with _read_passphrase(src) as pw:
            kek = _scrypt(pw, salt, n, r, p)
        with kek:
            try:
                return _open_sealed(kek, nonce, ct, b"evscrypt/v1 root")
            except InvalidTag:
                raise KMSError("wrong passphrase for the sealed root key")

    def seal_root(self, passphrase_file: Path | None) -> None:
        """Re-store the root key sealed with a passphrase (or unsealed if None)."""
        with self._locked():
            self._load()  # creates the keystore and default key if needed
            with self._root_key() as root:
                if passphrase_file is None:
                    with _root_doc_none(root) as doc:
                        write_atomic(self.root_path, doc.view())
                    return
                salt, nonce = os.urandom(16), os.urandom(12)
                with _read_passphrase(Path(passphrase_file)) as pw:
                    kek = _scrypt(pw, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
                with kek:
                    ct = AESGCM(kek.view()).encrypt(nonce, root.view(), b"evscrypt/v1 root")
                doc = {"version": 1, "kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
                       "salt": _b64(salt), "nonce": _b64(nonce), "ct": _b64(ct)}
                write_atomic(self.root_path, json.dumps(doc).encode())

    def _read(self) -> dict:
        try:
            doc = json.loads(self.keys_path.read_text())
        except FileNotFoundError:
            return {"version": 1, "keys": []}
        except (OSError, ValueError) as e:
            raise KMSError(f"keystore {self.keys_path} is damaged: {e}")
        if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("keys"), list):
            raise KMSError(f"keystore {self.keys_path} has an unknown format")
        return doc

    def _write(self, doc: dict) -> None:
        write_atomic(self.keys_path, json.dumps(doc, indent=1, sort_keys=True).encode())

    def _load(self) -> dict:
        """Read the keystore, create evs/default on first use and destroy
        keys whose deletion date has passed.  Call with the lock held."""
        doc = self._read()
        changed = False
        if not any(k["alias"] == DEFAULT_ALIAS for k in doc["keys"]):
            doc["keys"].append(self._new_record(DEFAULT_ALIAS, "Default key for evscrypt volumes", None))
            changed = True
        changed |= bool(self._purge(doc))
        if changed:
            self._write(doc)
        return doc

    def _purge(self, doc: dict) -> list[dict]:
        now = self.clock()
        purged = []
        for rec in doc["keys"]:
            if rec["state"] == KeyState.PENDING_DELETION.value and _parse_iso(rec["deletion_date"]) <= now:
                rec["state"] = KeyState.DELETED.value
                rec["material"] = None  # the CMK is gone for good
                purged.append(rec)
        return purged

    def _new_record(self, alias: str, description: str, owner: int | None) -> dict:
        key_id = str(uuidlib.uuid4())
        with self._root_key() as root, Secret.random(32) as cmk:
            nonce = os.urandom(12)
            ct = AESGCM(root.view()).encrypt(nonce, cmk.view(), b"evscrypt/v1 cmk:" + key_id.encode())
        return {"key_id": key_id, "alias": alias, "description": description,
                "state": KeyState.ENABLED.value, "created": _iso(self.clock()),
                "deletion_date": None, "owner": owner,
                "material": {"nonce": _b64(nonce), "ct": _b64(ct)}}

    def _cmk(self, rec: dict) -> Secret:
        m = rec["material"]
        if m is None:
            raise KeyStateError(f"key {rec['alias'] or rec['key_id']} is Deleted; volumes under it are lost")
        with self._root_key() as root:
            try:
                return _open_sealed(root, _unb64(m["nonce"]), _unb64(m["ct"]),
                                    b"evscrypt/v1 cmk:" + rec["key_id"].encode())
            except InvalidTag:
                raise KMSError("keystore entry does not decrypt under the root key")

    # -- lookups ---------------------------------------------------------
    @staticmethod
    def _find(doc: dict, key: str) -> dict:
        k = key
        if k.startswith(ARN_PREFIX):
            k = k[len(ARN_PREFIX):]
        alias = k[6:] if k.startswith("alias/") else k
        for rec in doc["keys"]:
            if rec["key_id"] == k or rec["alias"] == alias:
                return rec
        raise KeyNotFound(f"key {key!r} not found")

    @staticmethod
    def _info(rec: dict) -> KeyInfo:
        return KeyInfo(key_id=rec["key_id"], arn=ARN_PREFIX + rec["key_id"], alias=rec["alias"],
                       state=KeyState(rec["state"]), description=rec["description"],
                       created=rec["created"], deletion_date=rec["deletion_date"],
                       backend="local", owner=rec.get("owner"))

    # -- data keys ---------------------------------------------------------
    def default_key(self) -> str:
        return DEFAULT_ALIAS

    def generate_data_key(self, key, context, nbytes=64):
        dk = Secret.random(nbytes)
        try:
            wrapped, key_id = self.wrap_data_key(key, dk, context)
        except BaseException:
            dk.wipe()
            raise
        return dk, wrapped, key_id

    def wrap_data_key(self, key, dk, context):
        with self._locked():
            rec = self._find(self._load(), key)
        self._info(rec).require_usable()
        head = _WRAP_HEAD.pack(WRAP_MAGIC, WRAP_VERSION, uuidlib.UUID(rec["key_id"]).bytes, os.urandom(12))
        with self._cmk(rec) as cmk:
            ct = AESGCM(cmk.view()).encrypt(head[-12:], dk.view(), _context_aad(head, context))
        return head + ct, rec["key_id"]

    def decrypt(self, wrapped, context, key=None):
        if len(wrapped) < _WRAP_HEAD.size + 16:
            raise InvalidCiphertext("wrapped data key is truncated")
        magic, version, kid, nonce = _WRAP_HEAD.unpack_from(wrapped)
        if magic != WRAP_MAGIC or version != WRAP_VERSION:
            raise InvalidCiphertext("wrapped data key is not a local KMS blob of a known version")
        key_id = str(uuidlib.UUID(bytes=kid))
        with self._locked():
            doc = self._load()
        if key is not None and self._find(doc, key)["key_id"] != key_id:
            raise InvalidCiphertext(f"wrapped data key was not made under key {key}")
        rec = self._find(doc, key_id)
        self._info(rec).require_usable()
        head = bytes(wrapped[:_WRAP_HEAD.size])
        with self._cmk(rec) as cmk:
            try:
                return _open_sealed(cmk, nonce, bytes(wrapped[_WRAP_HEAD.size:]), _context_aad(head, context))
            except InvalidTag:
                raise InvalidCiphertext("wrapped data key does not decrypt: wrong key or encryption context")

    # -- metadata ------------------------------------------------------------
    def describe(self, key):
        with self._locked():
            return self._info(self._find(self._load(), key))

    def check_usable(self, key):
        info = self.describe(key)
        with self._root_key():  # a sealed keystore without its passphrase cannot unwrap
            pass
        return info

    def list_keys(self):
        with self._locked():
            return [self._info(r) for r in self._load()["keys"]]

    def purge_due(self):
        with self._locked():
            doc = self._read()
            purged = self._purge(doc)
            if purged:
                self._write(doc)
        return [self._info(r) for r in purged]

    # -- lifecycle -----------------------------------------------------------
    def create_key(self, alias, description="", owner=None):
        alias = check_alias(alias)
        if alias.startswith(RESERVED_ALIAS_PREFIX):
            raise InvalidArgument(f"aliases under {RESERVED_ALIAS_PREFIX!r} are reserved")
        with self._locked():
            doc = self._load()
            if any(r["alias"] == alias for r in doc["keys"]):
                raise AlreadyExists(f"key alias {alias!r} already exists")
            rec = self._new_record(alias, description, owner)
            doc["keys"].append(rec)
            self._write(doc)
        return self._info(rec)

    def _change(self, key: str, fn) -> KeyInfo:
        with self._locked():
            doc = self._load()
            rec = self._find(doc, key)
            fn(rec)
            self._write(doc)
            return self._info(rec)

    @staticmethod
    def _protect(rec: dict, verb: str) -> None:
        if rec["alias"] == DEFAULT_ALIAS:
            raise KeyProtected(f"the default key {DEFAULT_ALIAS} cannot be {verb}")

    @staticmethod
    def _require(rec: dict, *states: KeyState, verb: str) -> None:
        if KeyState(rec["state"]) not in states:
            raise KeyStateError(f"cannot {verb} key {rec['alias'] or rec['key_id']}: it is {rec['state']}")

    def enable(self, key):
        def fn(rec):
            self._require(rec, KeyState.ENABLED, KeyState.DISABLED, verb="enable")
            rec["state"] = KeyState.ENABLED.value
        return self._change(key, fn)

    def disable(self, key):
        def fn(rec):
            self._protect(rec, "disabled")
            self._require(rec, KeyState.ENABLED, KeyState.DISABLED, verb="disable")
            rec["state"] = KeyState.DISABLED.value
        return self._change(key, fn)

    def schedule_deletion(self, key, days=DEFAULT_DELETION_DAYS):
        if not MIN_DELETION_DAYS <= days <= MAX_DELETION_DAYS:
            raise InvalidArgument(f"the deletion window must be {MIN_DELETION_DAYS} to {MAX_DELETION_DAYS} days")

        def fn(rec):
            self._protect(rec, "scheduled for deletion")
            self._require(rec, KeyState.ENABLED, KeyState.DISABLED, verb="schedule deletion of")
            rec["state"] = KeyState.PENDING_DELETION.value
            rec["deletion_date"] = _iso(self.clock() + timedelta(days=days))
        return self._change(key, fn)

    def cancel_deletion(self, key):
        def fn(rec):
            self._require(rec, KeyState.PENDING_DELETION, verb="cancel deletion of")
            rec["state"] = KeyState.DISABLED.value  # as AWS does
            rec["deletion_date"] = None
        return self._change(key, fn)

    # -- access for non-root callers (the cloud's cross-account grants) ----------
    @staticmethod
    def _access(rec: dict, uid: int) -> Access:
        """evs/default is the service's default key: everyone may use it.
        Otherwise its owner and those it was granted to; a revoked grant is
        remembered, so the refusal can say what to ask for."""
        if uid == 0 or rec["alias"] == DEFAULT_ALIAS or rec.get("owner") == uid or uid in rec.get("grants", []):
            return Access.ALLOWED
        if any(r.get("uid") == uid for r in rec.get("revoked", [])):
            return Access.GRANT_REVOKED
        return Access.NOT_ALLOWED

    def access(self, key: str, uid: int) -> Access:
        with self._locked():
            return self._access(self._find(self._load(), key), uid)

    def check_access(self, key: str, uid: int) -> KeyInfo:
        """Refuse a non-root caller the use of a CMK they neither own nor were granted."""
        with self._locked():
            rec = self._find(self._load(), key)
        info = self._info(rec)
        how = self._access(rec, uid)
        if how is Access.ALLOWED:
            return info
        if how is Access.GRANT_REVOKED:
            raise PermissionDenied(f"the grant of key {info.alias or info.key_id} to you was revoked")
        raise PermissionDenied(f"key {info.alias or info.key_id} is not yours and was not granted to you")

    def grant(self, key: str, uid: int) -> KeyInfo:
        def fn(rec):
            if rec["alias"] == DEFAULT_ALIAS:
                raise InvalidArgument(f"{DEFAULT_ALIAS} is everyone's key: it takes no grants")
            grants = rec.setdefault("grants", [])
            if uid not in grants:
                grants.append(uid)
            rec["revoked"] = [r for r in rec.get("revoked", []) if r.get("uid") != uid]
        return self._change(key, fn)

    def revoke(self, key: str, uid: int) -> KeyInfo:
        def fn(rec):
            grants = rec.setdefault("grants", [])
            if uid not in grants:
                raise NotFound(f"key {rec['alias'] or rec['key_id']} has no grant for uid {uid}")
            grants.remove(uid)
            revoked = [r for r in rec.get("revoked", []) if r.get("uid") != uid]
            rec["revoked"] = revoked + [{"uid": uid, "date": _iso(self.clock())}]
        return self._change(key, fn)

    def list_grants(self, key: str) -> list[int]:
        with self._locked():
            return list(self._find(self._load(), key).get("grants", []))
