"""The local soft-HSM: key states, refusals, context binding, the sealed
root key, concurrent writers and file modes."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import stat
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from evscrypt.errors import (
    KMSUnavailable,
    AlreadyExists, InvalidArgument, InvalidCiphertext, IntegrityError, KeyNotFound, KeyProtected,
    KeyStateError, KMSError,
)
from evscrypt.image import header as hdr
from evscrypt.kms.base import KeyState
from evscrypt.kms.local import ARN_PREFIX, PASSPHRASE_CREDENTIAL, LocalKMS

CTX = {"evscrypt:volume-uuid": "11111111-2222-3333-4444-555555555555", "evscrypt:volume-name": "v"}


def records(kms: LocalKMS) -> dict:
    return {r["alias"]: r for r in json.loads(kms.keys_path.read_text())["keys"]}


def state(kms: LocalKMS, alias: str) -> KeyState:
    return kms.describe(alias).state


# -- default key and aliases ------------------------------------------------------

def test_default_key_is_created_on_first_use(kms):
    assert not kms.keys_path.exists()
    keys = kms.list_keys()
    assert [k.alias for k in keys] == ["evs/default"]
    d = keys[0]
    assert d.state is KeyState.ENABLED and d.arn == ARN_PREFIX + d.key_id
    assert kms.keys_path.exists() and kms.root_path.exists()
    assert kms.default_key() == "evs/default"
    # every way of naming it finds the same key
    for ref in ("evs/default", "alias/evs/default", d.key_id, d.arn):
        assert kms.describe(ref).key_id == d.key_id
    assert len(kms.list_keys()) == 1  # not created twice


@pytest.mark.parametrize("op", ["disable", "schedule_deletion"])
@pytest.mark.parametrize("ref", ["evs/default", "alias/evs/default", "id", "arn"])
def test_default_key_is_protected(kms, op, ref):
    d = kms.describe("evs/default")
    ref = {"id": d.key_id, "arn": d.arn}.get(ref, ref)
    with pytest.raises(KeyProtected, match="evs/default") as ei:
        getattr(kms, op)(ref)
    assert ei.value.exit_code == 13
    assert state(kms, "evs/default") is KeyState.ENABLED


@pytest.mark.parametrize("alias", ["evs/mine", "alias/evs/mine", "evs/default"])
def test_reserved_aliases_are_refused(kms, alias):
    with pytest.raises(InvalidArgument, match="reserved"):
        kms.create_key(alias)
    assert [k.alias for k in kms.list_keys()] == ["evs/default"]


@pytest.mark.parametrize("alias", ["", "/x", "a//b", "a/", ".hidden", "a b", "x" * 300, "bad\x00", "alias/"])
def test_malformed_aliases_are_refused(kms, alias):
    with pytest.raises(InvalidArgument):
        kms.create_key(alias)


def test_duplicate_alias_is_refused(kms):
    k = kms.create_key("team/db", "first")
    with pytest.raises(AlreadyExists, match="team/db"):
        kms.create_key("team/db", "second")
    with pytest.raises(AlreadyExists):
        kms.create_key("alias/team/db")
    keys = [x for x in kms.list_keys() if x.alias == "team/db"]
    assert len(keys) == 1 and keys[0].key_id == k.key_id and keys[0].description == "first"


def test_missing_key(kms):
    for ref in ("nope", str(uuid.uuid4()), ARN_PREFIX + str(uuid.uuid4())):
        with pytest.raises(KeyNotFound, match="not found") as ei:
            kms.describe(ref)
        assert ei.value.exit_code == 11
        with pytest.raises(KeyNotFound):
            kms.generate_data_key(ref, CTX)
        with pytest.raises(KeyNotFound):
            kms.disable(ref)


# -- lifecycle ---------------------------------------------------------------------

def test_full_lifecycle(kms, clock):
    k = kms.create_key("life", "a key")
    assert k.state is KeyState.ENABLED and k.deletion_date is None
    dk, wrapped, kid = kms.generate_data_key("life", CTX)
    assert kid == k.key_id and len(dk) == 64

    assert kms.disable("life").state is KeyState.DISABLED
    assert kms.disable("life").state is KeyState.DISABLED  # idempotent
    assert kms.enable("life").state is KeyState.ENABLED
    assert kms.enable("life").state is KeyState.ENABLED

    info = kms.schedule_deletion("life")  # default window: 30 days
    assert info.state is KeyState.PENDING_DELETION
    assert info.deletion_date == "2030-01-31T12:00:00Z"
    info = kms.cancel_deletion("life")
    assert info.state is KeyState.DISABLED and info.deletion_date is None  # as AWS does

    kms.enable("life")
    info = kms.schedule_deletion(k.key_id, days=7)
    assert info.deletion_date == "2030-01-08T12:00:00Z"

    clock.advance(days=6, hours=23)
    assert kms.purge_due() == []
    assert state(kms, "life") is KeyState.PENDING_DELETION
    assert records(kms)["life"]["material"] is not None

    clock.advance(hours=1)
    purged = kms.purge_due()
    assert [p.alias for p in purged] == ["life"] and purged[0].state is KeyState.DELETED
    rec = records(kms)["life"]
    assert rec["state"] == "Deleted" and rec["material"] is None  # gone for good
    assert kms.purge_due() == []

    with pytest.raises(KeyStateError) as ei:
        kms.decrypt(wrapped, CTX)
    assert "life" in ei.value.message and "Deleted" in ei.value.message
    assert ei.value.exit_code == 12
    dk.wipe()


def test_any_operation_purges_due_keys(kms, clock):
    kms.create_key("soon")
    kms.schedule_deletion("soon", days=7)
    clock.advance(days=8)
    assert state(kms, "soon") is KeyState.DELETED
    assert records(kms)["soon"]["material"] is None


@pytest.mark.parametrize("days", [7, 1096])
def test_deletion_window_bounds_accepted(kms, clock, days):
    kms.create_key("k")
    info = kms.schedule_deletion("k", days=days)
    assert info.state is KeyState.PENDING_DELETION


@pytest.mark.parametrize("days", [-1, 0, 1, 6, 1097, 10**6])
def test_deletion_window_bounds_refused(kms, days):
    kms.create_key("k")
    with pytest.raises(InvalidArgument, match="7 to 1096"):
        kms.schedule_deletion("k", days=days)
    assert state(kms, "k") is KeyState.ENABLED


def _to_state(kms, clock, alias, target: KeyState) -> None:
    kms.create_key(alias)
    if target is KeyState.DISABLED:
        kms.disable(alias)
    elif target is KeyState.PENDING_DELETION:
        kms.schedule_deletion(alias, days=7)
    elif target is KeyState.DELETED:
        kms.schedule_deletion(alias, days=7)
        clock.advance(days=7)
        kms.purge_due()
    assert state(kms, alias) is target


# (operation, states in which it is refused with KeyStateError)
REFUSALS = {
    "enable": [KeyState.PENDING_DELETION, KeyState.DELETED],
    "disable": [KeyState.PENDING_DELETION, KeyState.DELETED],
    "schedule_deletion": [KeyState.PENDING_DELETION, KeyState.DELETED],
    "cancel_deletion": [KeyState.ENABLED, KeyState.DISABLED, KeyState.DELETED],
}


@pytest.mark.parametrize("op,st", [(op, s) for op, ss in REFUSALS.items() for s in ss])
def test_lifecycle_refusals(kms, clock, op, st):
    _to_state(kms, clock, "victim", st)
    before = records(kms)["victim"]
    with pytest.raises(KeyStateError) as ei:
        getattr(kms, op)("victim")
    assert "victim" in ei.value.message and st.value in ei.value.message
    assert records(kms)["victim"] == before


# (from state, operation) -> resulting state, for every allowed transition
TRANSITIONS = [
    (KeyState.ENABLED, "enable", KeyState.ENABLED),
    (KeyState.ENABLED, "disable", KeyState.DISABLED),
    (KeyState.ENABLED, "schedule_deletion", KeyState.PENDING_DELETION),
    (KeyState.DISABLED, "enable", KeyState.ENABLED),
    (KeyState.DISABLED, "disable", KeyState.DISABLED),
    (KeyState.DISABLED, "schedule_deletion", KeyState.PENDING_DELETION),
    (KeyState.PENDING_DELETION, "cancel_deletion", KeyState.DISABLED),
    (KeyState.PENDING_DELETION, "purge", KeyState.DELETED),
]


@pytest.mark.parametrize("src,op,dst", TRANSITIONS)
def test_allowed_transitions(kms, clock, src, op, dst):
    _to_state(kms, clock, "k", src)
    if op == "purge":
        clock.advance(days=7)
        assert [i.alias for i in kms.purge_due()] == ["k"]
    else:
        assert getattr(kms, op)("k").state is dst
    assert state(kms, "k") is dst
    rec = records(kms)["k"]
    assert (rec["deletion_date"] is not None) == (dst in (KeyState.PENDING_DELETION, KeyState.DELETED))
    assert (rec["material"] is None) == (dst is KeyState.DELETED)


@pytest.mark.parametrize("st", [KeyState.DISABLED, KeyState.PENDING_DELETION, KeyState.DELETED])
def test_crypto_refused_unless_enabled(kms, clock, st):
    kms.create_key("victim")
    dk, wrapped, _ = kms.generate_data_key("victim", CTX)
    if st is KeyState.DISABLED:
        kms.disable("victim")
    elif st is KeyState.PENDING_DELETION:
        kms.schedule_deletion("victim", days=10)
    else:
        kms.schedule_deletion("victim", days=10)
        clock.advance(days=11)
    assert state(kms, "victim") is st
    with pytest.raises(KeyStateError) as ei:
        kms.generate_data_key("victim", CTX)
    assert "victim" in ei.value.message and st.value in ei.value.message
    with pytest.raises(KeyStateError) as ei:
        kms.decrypt(wrapped, CTX)
    assert "victim" in ei.value.message and st.value in ei.value.message
    if st is KeyState.PENDING_DELETION:
        assert "2030-01-11T12:00:00Z" in ei.value.message
        kms.cancel_deletion("victim")
    if st is not KeyState.DELETED:  # a reversible state: the DK comes back
        kms.enable("victim")
        with kms.decrypt(wrapped, CTX) as again:
            assert bytes(again.buffer) == bytes(dk.buffer)
    dk.wipe()


# -- data keys and context binding -----------------------------------------------------

def test_wrap_unwrap_and_context_binding(kms):
    kms.create_key("a")
    kms.create_key("b")
    dk, wrapped, kid = kms.generate_data_key("a", CTX)
    assert kid == kms.describe("a").key_id
    assert bytes(dk.buffer) not in wrapped
    with kms.decrypt(wrapped, CTX) as got:
        assert bytes(got.buffer) == bytes(dk.buffer)
    with kms.decrypt(wrapped, dict(reversed(list(CTX.items()))), key="a") as got:  # order does not matter
        assert bytes(got.buffer) == bytes(dk.buffer)
    for ctx in ({**CTX, "evscrypt:volume-name": "w"}, {}, {**CTX, "extra": "x"},
                {"evscrypt:volume-uuid": CTX["evscrypt:volume-uuid"]}):
        with pytest.raises(InvalidCiphertext) as ei:
            kms.decrypt(wrapped, ctx)
        assert ei.value.exit_code == 16
    with pytest.raises(InvalidCiphertext, match="was not made under key b"):
        kms.decrypt(wrapped, CTX, key="b")
    bad = bytearray(wrapped)
    bad[-1] ^= 1
    with pytest.raises(InvalidCiphertext):
        kms.decrypt(bytes(bad), CTX)
    with pytest.raises(InvalidCiphertext):
        kms.decrypt(wrapped[:20], CTX)
    with pytest.raises(InvalidCiphertext):
        kms.decrypt(b"XXXX" + wrapped[4:], CTX)
    # two DKs under the same key and context differ
    dk2, wrapped2, _ = kms.generate_data_key("a", CTX)
    assert bytes(dk2.buffer) != bytes(dk.buffer) and wrapped2 != wrapped
    dk.wipe()
    dk2.wipe()


@pytest.mark.parametrize("same_cmk", [True, False])
def test_swapped_wrapped_dk_between_volumes_does_not_unwrap(store, kms, same_cmk):
    kms.create_key("other")
    store.create("A", 1 << 20, key="other")
    store.create("B", 1 << 20, key=None if not same_cmk else "other")
    a = store.header("A")
    with store.data_key("B"):
        pass  # B is fine before the swap
    fd = os.open(store.path("B"), os.O_RDWR)
    try:
        loaded = hdr.load(fd)
        loaded.header.wrapped_dk, loaded.header.key_id = a.wrapped_dk, a.key_id
        hdr.store(fd, loaded.header, loaded)
    finally:
        os.close(fd)
    # the same CMK: the encryption context (built from B's catalog entry)
    # refuses A's wrapped DK; another CMK: the catalog refuses the key field
    # before anything reaches the KMS
    err = InvalidCiphertext if same_cmk else IntegrityError
    with pytest.raises(err):
        store.data_key("B")
    with pytest.raises(err):
        with store.engine("B"):
            pass
    with store.data_key("A"):
        pass  # A is untouched


def _tamper(store, name, **fields):
    fd = os.open(store.path(name), os.O_RDWR)
    try:
        loaded = hdr.load(fd)
        for k, v in fields.items():
            setattr(loaded.header, k, v)
        hdr.store(fd, loaded.header, loaded)
    finally:
        os.close(fd)


def test_swapped_key_fields_and_context_do_not_unwrap(store):
    """A's key fields, context and MAC in B's header, under the same CMK: the
    catalog has nothing to object to, but the context comes from B's catalog
    entry, not from the header, so A's wrapped DK does not unwrap."""
    store.create("A", 1 << 20)
    store.create("B", 1 << 20)
    a = store.header("A")
    _tamper(store, "B", wrapped_dk=a.wrapped_dk, key_id=a.key_id, encryption_context=a.encryption_context,
            mac=a.mac)
    with pytest.raises(InvalidCiphertext):
        store.data_key("B")


@pytest.mark.parametrize("field,value", [("created", "2000-01-01T00:00:00Z"), ("features", []),
                                         ("origin", {"type": "image", "source": "x"}), ("mac", "\u00e9" * 64)])
def test_header_fields_outside_the_catalog_are_caught_by_the_mac(store, field, value):
    store.create("B", 1 << 20)
    _tamper(store, "B", **{field: value})
    with pytest.raises(IntegrityError, match="MAC"):
        store.data_key("B")


# -- sealed root key ---------------------------------------------------------------

@pytest.fixture
def sealed(kms, tmp_path, monkeypatch):
    kms.create_key("s")
    dk, wrapped, _ = kms.generate_data_key("s", CTX)
    plain_root = json.loads(kms.root_path.read_text())["key"]
    pw = tmp_path / "pass"
    pw.write_text("correct horse battery staple\n")
    kms.seal_root(pw)
    doc = json.loads(kms.root_path.read_text())
    assert doc["kdf"] == "scrypt" and "key" not in doc
    assert plain_root not in kms.root_path.read_text()
    yield kms, pw, bytes(dk.buffer), wrapped
    dk.wipe()


def test_sealed_root_with_passphrase_file(sealed, monkeypatch):
    kms, pw, dk, wrapped = sealed
    monkeypatch.setenv("EVSCRYPT_PASSPHRASE_FILE", str(pw))
    with kms.decrypt(wrapped, CTX) as got:
        assert bytes(got.buffer) == dk
    kms.create_key("after-seal")  # new keys are wrapped under the same root
    new_dk, new_wrapped, _ = kms.generate_data_key("after-seal", CTX)
    with kms.decrypt(new_wrapped, CTX) as got:
        assert bytes(got.buffer) == bytes(new_dk.buffer)
    new_dk.wipe()
    # unsealing gives the same root key back
    kms.seal_root(None)
    monkeypatch.delenv("EVSCRYPT_PASSPHRASE_FILE")
    assert json.loads(kms.root_path.read_text())["kdf"] == "none"
    with kms.decrypt(wrapped, CTX) as got:
        assert bytes(got.buffer) == dk


def test_sealed_root_with_systemd_credential(sealed, monkeypatch, tmp_path):
    kms, pw, dk, wrapped = sealed
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / PASSPHRASE_CREDENTIAL).write_bytes(pw.read_bytes())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with kms.decrypt(wrapped, CTX) as got:
        assert bytes(got.buffer) == dk


def test_sealed_root_wrong_passphrase(sealed, monkeypatch, tmp_path):
    kms, _, _, wrapped = sealed
    bad = tmp_path / "bad"
    bad.write_text("Correct horse battery staple\n")
    monkeypatch.setenv("EVSCRYPT_PASSPHRASE_FILE", str(bad))
    with pytest.raises(KMSError, match="wrong passphrase") as ei:
        kms.decrypt(wrapped, CTX)
    assert ei.value.exit_code == 10
    with pytest.raises(KMSError, match="wrong passphrase"):
        kms.generate_data_key("s", CTX)


def test_sealed_root_missing_passphrase(sealed, monkeypatch, tmp_path):
    kms, _, _, wrapped = sealed
    # a sealed keystore without its passphrase is the local form of "KMS unreachable"
    with pytest.raises(KMSUnavailable, match="sealed.*EVSCRYPT_PASSPHRASE_FILE"):
        kms.decrypt(wrapped, CTX)
    monkeypatch.setenv("EVSCRYPT_PASSPHRASE_FILE", str(tmp_path / "does-not-exist"))
    with pytest.raises(KMSUnavailable, match="passphrase file .* cannot be read"):
        kms.decrypt(wrapped, CTX)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    monkeypatch.setenv("EVSCRYPT_PASSPHRASE_FILE", str(empty))
    with pytest.raises(InvalidArgument, match="empty"):
        kms.decrypt(wrapped, CTX)
    # a credentials directory without the credential does not help either
    monkeypatch.delenv("EVSCRYPT_PASSPHRASE_FILE")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(KMSError, match="sealed"):
        kms.decrypt(wrapped, CTX)


# -- concurrency -----------------------------------------------------------------------

def _create_many(directory: str, prefix: str, n: int, start) -> None:
    start.wait(30)
    kms = LocalKMS(Path(directory))
    for i in range(n):
        kms.create_key(f"{prefix}-{i}")


def test_two_processes_create_keys_concurrently(tmp_path):
    d = tmp_path / "kms"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_create_many, args=(str(d), p, 20, start)) for p in ("p", "q")]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    kms = LocalKMS(d)
    doc = json.loads(kms.keys_path.read_text())
    aliases = [r["alias"] for r in doc["keys"]]
    assert sorted(aliases) == sorted(["evs/default"] + [f"{p}-{i}" for p in "pq" for i in range(20)])
    assert len({r["key_id"] for r in doc["keys"]}) == 41
    # every CMK still decrypts under the root key, and every key works
    root = base64.b64decode(json.loads(kms.root_path.read_text())["key"])
    for r in doc["keys"]:
        m = r["material"]
        cmk = AESGCM(root).decrypt(base64.b64decode(m["nonce"]), base64.b64decode(m["ct"]),
                                   b"evscrypt/v1 cmk:" + r["key_id"].encode())
        assert len(cmk) == 32
    dk, wrapped, _ = kms.generate_data_key("q-19", CTX)
    with kms.decrypt(wrapped, CTX) as got:
        assert bytes(got.buffer) == bytes(dk.buffer)
    dk.wipe()
    assert not (d / "keys.json.tmp").exists()


# -- file modes --------------------------------------------------------------------------

def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_file_modes(kms, tmp_path):
    kms.create_key("m")
    assert _mode(kms.dir) == 0o700
    assert _mode(kms.keys_path) == 0o600
    assert _mode(kms.root_path) == 0o600
    assert _mode(kms.dir / ".lock") == 0o600
    pw = tmp_path / "pw"
    pw.write_text("pw")
    kms.seal_root(pw)
    assert _mode(kms.root_path) == 0o600
    # a directory someone loosened is tightened again on next use
    os.chmod(kms.dir, 0o755)
    kms.list_keys()
    assert _mode(kms.dir) == 0o700
