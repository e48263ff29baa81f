"""The on-disk header: round trip, the two redundant copies, crash safety,
the HKDF-keyed MAC, and a fuzz of the slot parser."""

from __future__ import annotations

import copy as copymod
import dataclasses
import hashlib
import json
import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evscrypt.errors import FormatError, IntegrityError, UnsupportedFeature
from evscrypt.image import header as hdr
from evscrypt.image.header import (
    HEADER_AREA, MAGIC, PREFIX_SIZE, SLOT_SIZE, VERSION, Header, SimulatedCrash, load, pack_copy, slots,
    store, unpack_copy,
)
from evscrypt.secret import Secret

DATA_OFFSET = 1 << 20


def make_header(**over) -> tuple[Header, Secret]:
    """A fully populated, sealed, encrypted header and its DK."""
    dk = Secret.random(64)
    vid = str(uuid.uuid4())
    h = Header(
        uuid=vid, name="vol-1", size=8 << 20, encrypted=True, data_offset=DATA_OFFSET,
        kms_backend="local", key_id=str(uuid.uuid4()), wrapped_dk=os.urandom(93),
        encryption_context={"evscrypt:volume-uuid": vid, "evscrypt:volume-name": "vol-1"},
        created="2031-02-03T04:05:06Z", origin={"type": "snapshot", "source": "base@s1"},
    )
    for k, v in over.items():
        setattr(h, k, v)
    hdr.seal(h, dk)
    return h, dk


@pytest.fixture
def image(tmp_path):
    """An open fd on an empty image file big enough for the header area."""
    p = tmp_path / "vol.img"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, DATA_OFFSET + 4096)
    yield fd
    os.close(fd)


def damage(fd: int, copy: int) -> None:
    """Flip bytes inside the checksummed part of one slot."""
    off = copy * SLOT_SIZE + PREFIX_SIZE + 10
    b = bytearray(os.pread(fd, 16, off))
    for i in range(len(b)):
        b[i] ^= 0xA5
    os.pwrite(fd, bytes(b), off)


def raw_slot(payload: bytes, seqno: int = 1, copy: int = 0, version: int = VERSION, magic: bytes = MAGIC) -> bytes:
    """A slot with a correct checksum over an arbitrary payload."""
    prefix = slots._PREFIX.pack(magic, version, copy, len(payload), seqno, bytes(8))
    out = prefix + hashlib.sha256(prefix + payload).digest() + payload
    return out + bytes(SLOT_SIZE - len(out))


# -- round trip ---------------------------------------------------------------

def test_round_trip_every_field(image):
    h, dk = make_header()
    written = store(image, h)
    got = load(image)
    assert got.seqno == written.seqno == 1
    assert got.valid == (True, True) and got.errors == (None, None) and not got.damaged
    for f in dataclasses.fields(Header):
        assert getattr(got.header, f.name) == getattr(h, f.name), f.name
    assert got.header == h
    assert isinstance(got.header.wrapped_dk, bytes)
    hdr.verify(got.header, dk)  # the MAC survives too


def test_round_trip_unencrypted(image):
    h = Header(uuid=str(uuid.uuid4()), name="plain", size=4096, encrypted=False, data_offset=HEADER_AREA)
    store(image, h)
    got = load(image).header
    assert got == h
    assert got.wrapped_dk is None and got.key_id is None and got.mac is None
    assert got.features == ["zero-unwritten"]


def test_both_copies_are_written_identically_but_for_the_index(image):
    h, _ = make_header()
    store(image, h)
    s0, s1 = hdr.read_slots(image)
    assert s0[:8] == s1[:8] == MAGIC
    assert unpack_copy(s0, 0) == unpack_copy(s1, 1)
    with pytest.raises(FormatError, match="claims to be copy"):
        unpack_copy(s0, 1)


# -- redundancy ---------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 1])
def test_damaged_copy_is_reported_and_repaired(image, bad):
    h, dk = make_header()
    prev = store(image, h)
    store(image, h, prev)  # seqno 2
    damage(image, bad)
    got = load(image)
    assert got.header == h
    assert got.winner == 1 - bad
    assert got.damaged
    assert got.valid[bad] is False and got.valid[1 - bad] is True
    assert got.errors[bad] and f"copy {bad}" in got.errors[bad] and "checksum" in got.errors[bad]
    assert got.errors[1 - bad] is None
    # the next store rewrites the damaged copy
    store(image, got.header, got)
    again = load(image)
    assert again.valid == (True, True) and not again.damaged
    assert again.seqno == got.seqno + 1 == 3
    for i, raw in enumerate(hdr.read_slots(image)):
        hh, seq = unpack_copy(raw, i)
        assert hh == h and seq == 3
    hdr.verify(again.header, dk)


@pytest.mark.parametrize("how", ["flip", "zero"])
def test_both_copies_damaged_is_format_error(image, how):
    h, _ = make_header()
    store(image, h)
    if how == "flip":
        damage(image, 0)
        damage(image, 1)
    else:
        os.pwrite(image, bytes(HEADER_AREA), 0)
    with pytest.raises(FormatError) as ei:
        load(image, "vol.img")
    assert type(ei.value) is FormatError
    assert "no valid header copy" in ei.value.message and "vol.img" in ei.value.message
    assert ei.value.exit_code == 7


def test_not_an_image_at_all(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(os.urandom(3 * SLOT_SIZE))
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(FormatError, match="magic"):
            load(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("newer", [0, 1])
def test_higher_seqno_wins(image, newer):
    old, _ = make_header(name="old-one")
    new, _ = make_header(name="new-one")
    os.pwrite(image, pack_copy(new, 9, newer), newer * SLOT_SIZE)
    os.pwrite(image, pack_copy(old, 8, 1 - newer), (1 - newer) * SLOT_SIZE)
    got = load(image)
    assert got.header.name == "new-one" and got.seqno == 9 and got.winner == newer
    assert got.valid == (True, True)


def test_higher_seqno_wins_even_if_damaged_copy_claimed_more(image):
    """A damaged copy's sequence number counts for nothing."""
    good, _ = make_header(name="good")
    bad, _ = make_header(name="bad")
    os.pwrite(image, pack_copy(good, 3, 0), 0)
    os.pwrite(image, pack_copy(bad, 1000, 1), SLOT_SIZE)
    damage(image, 1)
    got = load(image)
    assert got.header.name == "good" and got.seqno == 3


# -- versions and features ------------------------------------------------------

def test_unknown_feature_flag_is_refused(image):
    h, _ = make_header(features=["zero-unwritten", "from-the-future"])
    store(image, h)  # store does not police features; the reader must
    with pytest.raises(UnsupportedFeature, match="from-the-future") as ei:
        load(image)
    assert ei.value.exit_code == 8
    with pytest.raises(UnsupportedFeature):
        Header.from_json(h.to_json())


def test_known_feature_set_may_be_empty(image):
    h, _ = make_header(features=[])
    store(image, h)
    assert load(image).header.features == []


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_wrong_format_version_is_refused(image, version):
    h, _ = make_header()
    payload = h.to_json()
    for c in (0, 1):
        os.pwrite(image, raw_slot(payload, 5, c, version=version), c * SLOT_SIZE)
    with pytest.raises(UnsupportedFeature, match=f"format version {version}"):
        load(image)
    # the same payload with the right version is fine (so the slot builder is right)
    for c in (0, 1):
        os.pwrite(image, raw_slot(payload, 5, c), c * SLOT_SIZE)
    assert load(image).header == h


def test_newest_copy_with_unknown_feature_is_not_silently_ignored(image):
    old, _ = make_header(name="v")
    new, _ = make_header(name="v", features=["zero-unwritten", "from-the-future"])
    os.pwrite(image, pack_copy(old, 7, 0), 0)
    os.pwrite(image, pack_copy(new, 8, 1), SLOT_SIZE)  # a newer evscrypt wrote this copy last
    with pytest.raises(UnsupportedFeature):
        load(image)


# -- crash safety ---------------------------------------------------------------

@pytest.mark.parametrize("crash_after", [0, 1])
@pytest.mark.parametrize("damaged_before", [None, 0, 1])
def test_crash_during_store_leaves_old_or_new(image, crash_after, damaged_before):
    old, dk = make_header(name="before")
    prev = store(image, old)
    prev = store(image, old, prev)
    if damaged_before is not None:
        damage(image, damaged_before)
        prev = load(image)
    new = copymod.deepcopy(old)
    new.size *= 2
    hdr.seal(new, dk)
    with pytest.raises(SimulatedCrash):
        store(image, new, prev, crash_after=crash_after)
    got = load(image)
    assert got.header in (old, new)
    if crash_after == 0:
        assert got.header == old  # nothing was written
    else:
        assert got.header == new and got.seqno == prev.seqno + 1  # the losing copy already holds it
    hdr.verify(got.header, dk)
    # and life goes on: a full store from here leaves both copies valid
    store(image, got.header, got)
    final = load(image)
    assert final.valid == (True, True) and final.header == got.header


def test_crash_never_touches_the_copy_that_was_read(image):
    h, dk = make_header()
    prev = store(image, h)
    before = hdr.read_slots(image)[prev.winner]
    h2 = copymod.deepcopy(h)
    h2.name = "renamed"
    hdr.seal(h2, dk)
    with pytest.raises(SimulatedCrash):
        store(image, h2, prev, crash_after=1)
    assert hdr.read_slots(image)[prev.winner] == before


# -- MAC ------------------------------------------------------------------------

def test_mac_verifies_with_right_key_only(image):
    h, dk = make_header()
    store(image, h)
    got = load(image).header
    hdr.verify(got, dk)
    with Secret.random(64) as wrong:
        with pytest.raises(IntegrityError, match="vol-1") as ei:
            hdr.verify(got, wrong)
    assert ei.value.exit_code == 9
    # a one-bit change of the DK is enough
    flipped = Secret.from_buffer(dk.buffer)
    flipped.buffer[63] ^= 1
    with pytest.raises(IntegrityError):
        hdr.verify(got, flipped)


def test_missing_mac_does_not_verify():
    h, dk = make_header()
    h.mac = None
    with pytest.raises(IntegrityError):
        hdr.verify(h, dk)


TAMPERS = {
    "size": lambda h: 16 << 20,
    "name": lambda h: "evil",
    "uuid": lambda h: str(uuid.uuid4()),
    "key_id": lambda h: str(uuid.uuid4()),
    "kms_backend": lambda h: "aws",
    "wrapped_dk": lambda h: os.urandom(len(h.wrapped_dk)),
    "encryption_context": lambda h: {**h.encryption_context, "evscrypt:volume-name": "other"},
    "data_offset": lambda h: h.data_offset + 4096,
    "created": lambda h: "1999-01-01T00:00:00Z",
    "origin": lambda h: {"type": "image", "source": "/tmp/x"},
    "features": lambda h: [],
}


@pytest.mark.parametrize("field", sorted(TAMPERS))
def test_tampered_field_fails_mac_even_with_good_checksum(image, field):
    h, dk = make_header()
    prev = store(image, h)
    loaded = load(image)
    tampered = loaded.header
    setattr(tampered, field, TAMPERS[field](tampered))
    store(image, tampered, loaded)  # checksums recomputed: the copies are "valid"
    got = load(image)
    assert got.valid == (True, True) and got.seqno == prev.seqno + 1
    assert getattr(got.header, field) == getattr(tampered, field)
    with pytest.raises(IntegrityError):
        hdr.verify(got.header, dk)


def test_tampered_encrypted_flag_is_refused(image):
    """Flipping 'encrypted' off (checksums recomputed) must not make the
    volume readable or writable as plaintext."""
    h, dk = make_header()
    store(image, h)
    h.encrypted = False
    for c in (0, 1):
        os.pwrite(image, pack_copy(h, 9, c), c * SLOT_SIZE)
    with pytest.raises(FormatError, match="tampered"):
        load(image)
    # and a MAC that is present is always checked
    with pytest.raises(IntegrityError):
        hdr.verify(h, Secret.random(64))


def test_mac_input_excludes_only_the_mac():
    h, _ = make_header()
    d = json.loads(h.mac_input())
    assert "mac" not in d
    assert set(d) == {f.name for f in dataclasses.fields(Header)} - {"mac"}


def test_mac_is_keyed_through_hkdf_not_the_raw_dk():
    import hmac as hmaclib

    h, dk = make_header()
    raw = hmaclib.new(bytes(dk.buffer), h.mac_input(), hashlib.sha256).hexdigest()
    assert h.mac != raw and len(h.mac) == 64


# -- fuzz -------------------------------------------------------------------------

def _valid_slot() -> tuple[bytes, bytes]:
    h, _ = make_header()
    return pack_copy(h, 42, 0), h.to_json()


VALID_SLOT, VALID_PAYLOAD = _valid_slot()
USED = PREFIX_SIZE + len(VALID_PAYLOAD)


def _parse(raw: bytes, copy: int = 0):
    try:
        res = unpack_copy(raw, copy)
    except FormatError:  # includes UnsupportedFeature
        return None
    assert isinstance(res[0], Header)
    return res


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: MAGIC + b),
    st.binary(min_size=24, max_size=24).map(lambda b: MAGIC + b + bytes(SLOT_SIZE)),
))
def test_fuzz_random_bytes_only_raise_format_error(raw):
    _parse(raw)
    _parse(raw, 1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, USED + 16), st.integers(0, 255)), min_size=1, max_size=8),
    st.one_of(st.none(), st.integers(0, USED + 16)),
)
def test_fuzz_mutated_valid_slot_only_raises_format_error(edits, cut):
    raw = bytearray(VALID_SLOT)
    for pos, val in edits:
        raw[pos] = val
    if cut is not None:
        raw = raw[:cut]
    _parse(bytes(raw))


def _json_values():
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
        lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
        max_leaves=12,
    )


FIELD_NAMES = sorted(json.loads(VALID_PAYLOAD))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(FIELD_NAMES + ["extra"]), st.one_of(st.just(KeyError), _json_values())),
             min_size=1, max_size=4),
    st.integers(0, 2**64 - 1),
)
def test_fuzz_checksummed_payloads_only_raise_format_error(changes, seqno):
    """Mutations behind a correct checksum reach the JSON validator."""
    d = json.loads(VALID_PAYLOAD)
    for k, v in changes:
        if v is KeyError:
            d.pop(k, None)
        else:
            d[k] = v
    payload = json.dumps(d).encode()
    if PREFIX_SIZE + len(payload) > SLOT_SIZE:
        return
    res = _parse(raw_slot(payload, seqno))
    if res is not None:
        assert res[1] == seqno


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=200).map(str.encode))
def test_fuzz_checksummed_garbage_payload_only_raises_format_error(payload):
    _parse(raw_slot(payload))
