"""Images end to end: made from (attached) volumes, they keep the volume's
encryption; volumes made from an encrypted image are encrypted with its
key; an encrypted image is never exported; an unencrypted one exports as a
raw, sparse disk."""

from __future__ import annotations

import os

import pytest

from copy_helpers import (
    MiB, allocated, assert_reads, cli_json, data_area, expect_fail, header_of, pattern, state_leftovers, write_sync,
)
from daemon_fixture import daemon, make_daemon  # noqa: F401  (fixtures are used by name)
from evscrypt import errors

pytestmark = pytest.mark.fuse

LAYOUT = [(0, 8192), (2 * MiB + 512, 100_000), (15 * MiB, MiB)]
RULE = errors.EncryptionRuleError.exit_code


def test_encrypted_image(daemon, tmp_path):
    d = daemon
    d.cli("volume", "create", "base", "--size", "16M")
    d.cli("key", "create", "other")
    data = pattern("enc-image", LAYOUT)
    write_sync(d.attach("base"), data)
    d.cli("image", "create", "gold", "--from-volume", "base")  # attached: the daemon copies it
    meta = cli_json(d, "image", "info", "gold")
    assert meta["encrypted"] is True and meta["volume"] == "base" and meta["kind"] == "image"
    assert [i["name"] for i in cli_json(d, "image", "list")] == ["gold"]

    # an encrypted image cannot be exported, nor made into anything unencrypted
    out = tmp_path / "out"
    out.mkdir()
    expect_fail(d, RULE, "image", "export", "gold", str(out), match="encrypted images cannot be exported")
    assert os.listdir(out) == []
    expect_fail(d, RULE, "volume", "create", "x", "--from-image", "gold", "--no-encrypt", match="encrypted")
    expect_fail(d, RULE, "volume", "create", "x", "--from-image", "gold", "--key", "other")
    assert not d.image("x").exists()

    # volumes created from it are encrypted, with its DK and CMK
    for name in ("vm1", "vm2"):
        d.cli("volume", "create", name, "--from-image", "gold")
        h = header_of(d.image(name))
        assert h.encrypted and h.key_id == header_of(d.image("base")).key_id
        assert h.origin == {"type": "image", "source": "gold"}
        assert_reads(d.attach(name), data, zeros=[(8 * MiB, MiB)])
    assert header_of(d.image("vm1")).uuid != header_of(d.image("vm2")).uuid
    assert data_area(d.image("vm1"), 15 * MiB, MiB) == data_area(d.image("vm2"), 15 * MiB, MiB) != data[15 * MiB]
    for name in ("vm1", "vm2", "base"):
        d.cli("detach", name)
    d.cli("image", "delete", "gold")
    assert cli_json(d, "image", "list") == []
    expect_fail(d, errors.NotFound.exit_code, "volume", "create", "x", "--from-image", "gold")
    assert state_leftovers(d.home) == []


def test_unencrypted_image_exports_and_gives_unencrypted_volumes(daemon, tmp_path):
    d = daemon
    d.cli("volume", "create", "plain", "--size", "16M", "--no-encrypt")
    data = pattern("plain-image", LAYOUT)
    write_sync(d.attach("plain"), data)
    d.cli("detach", "plain")
    d.cli("image", "create", "pub", "--from-volume", "plain")  # detached: the CLI copies it under the lock
    assert cli_json(d, "image", "info", "pub")["encrypted"] is False

    out = tmp_path / "out"
    out.mkdir()
    p = d.cli("image", "export", "pub", str(out))
    raw = out / "pub.raw"
    assert str(raw) in p.stdout
    blob = raw.read_bytes()
    assert len(blob) == 16 * MiB
    for off, piece in data.items():
        assert blob[off:off + len(piece)] == piece
    assert allocated(raw) < 2 * MiB  # sparse: the holes stayed holes
    expect_fail(d, errors.AlreadyExists.exit_code, "image", "export", "pub", str(raw))
    d.cli("image", "export", "pub", str(tmp_path / "named.img"))
    assert (tmp_path / "named.img").read_bytes() == blob

    # a volume from an unencrypted image is unencrypted (EVS: "creating from an
    # image, source disk not encrypted: no"); asking for encryption is refused
    # and points to `image copy`
    d.cli("volume", "create", "u", "--from-image", "pub")
    assert not header_of(d.image("u")).encrypted
    assert_reads(d.attach("u"), data)
    d.cli("key", "create", "other")
    for ask in (("--encrypt",), ("--key", "other"), ("--kms", "local"), ("--encrypt", "--size", "32M")):
        line = expect_fail(d, RULE, "volume", "create", "e", "--from-image", "pub", *ask)
        assert line == ("evscrypt: error: image 'pub' is not encrypted, so a volume made from it is not encrypted "
                        "either; for an encrypted volume, first make an encrypted copy of the image: evscrypt "
                        "image copy pub NEW --encrypt [--key KEY], then create the volume from NEW"), line
        assert not d.image("e").exists()

    # the way the line names: an encrypted copy, under a new DK, gives encrypted volumes
    d.cli("image", "copy", "pub", "pub-enc", "--encrypt")
    info = cli_json(d, "image", "info", "pub-enc")
    assert info["encrypted"] is True and info["copied_from"] == "pub" and info["key_alias"] == "evs/default"
    assert info["key_state"] == "Enabled"
    d.cli("volume", "create", "e", "--from-image", "pub-enc", "--size", "32M")
    h = header_of(d.image("e"))
    assert h.encrypted and h.size == 32 * MiB and h.origin == {"type": "image", "source": "pub-enc"}
    assert data_area(d.image("e"), 15 * MiB, 4096) != data[15 * MiB][:4096]
    assert_reads(d.attach("e"), data, zeros=[(20 * MiB, MiB)])
    # an image of an encrypted volume is encrypted: the rule holds the other way round too
    d.cli("image", "create", "e-img", "--from-volume", "e")
    expect_fail(d, RULE, "image", "export", "e-img", str(tmp_path / "e.raw"))
    assert not (tmp_path / "e.raw").exists()
    for name in ("u", "e"):
        d.cli("detach", name)
    assert state_leftovers(d.home) == [] and not [n for n in os.listdir(out) if n.startswith(".")]


def _dk(d, name: str) -> bytes:
    """A volume's DK, unwrapped in-process through its KMS."""
    from evscrypt.volumes import VolumeStore

    with VolumeStore(d.home).data_key(name) as dk:
        return bytes(dk.buffer)


def test_image_copy_follows_the_replication_rules(daemon):
    d = daemon
    d.cli("key", "create", "k1")
    d.cli("key", "create", "k2")
    d.cli("volume", "create", "src", "--size", "16M", "--key", "k1")
    data = pattern("copy-image", LAYOUT)
    write_sync(d.attach("src"), data)
    d.cli("detach", "src")
    d.cli("image", "create", "gold", "--from-volume", "src")
    gold = cli_json(d, "image", "info", "gold")
    assert gold["key_alias"] == "k1" and gold["key_state"] == "Enabled"

    # encrypted -> encrypted under its own CMK: the same DK and ciphertext
    d.cli("image", "copy", "gold", "same")
    same = cli_json(d, "image", "info", "same")
    assert same["encrypted"] and same["key_id"] == gold["key_id"] and same["copied_from"] == "gold"
    d.cli("volume", "create", "v-same", "--from-image", "same")
    assert _dk(d, "v-same") == _dk(d, "src")
    assert data_area(d.image("v-same"), 15 * MiB, MiB) == data_area(d.image("src"), 15 * MiB, MiB)
    assert_reads(d.attach("v-same"), data)

    # encrypted -> encrypted under another CMK: re-encrypted under a new DK
    d.cli("image", "copy", "gold", "other", "--key", "k2")
    other = cli_json(d, "image", "info", "other")
    assert other["encrypted"] and other["key_alias"] == "k2" and other["key_id"] != gold["key_id"]
    d.cli("volume", "create", "v-other", "--from-image", "other")
    assert header_of(d.image("v-other")).key_id == other["key_id"]
    assert _dk(d, "v-other") != _dk(d, "src")
    assert data_area(d.image("v-other"), 15 * MiB, MiB) != data_area(d.image("src"), 15 * MiB, MiB)
    assert_reads(d.attach("v-other"), data, zeros=[(8 * MiB, MiB)])

    # encrypted -> unencrypted: never
    line = expect_fail(d, RULE, "image", "copy", "gold", "plain", "--no-encrypt")
    assert line == ("evscrypt: error: image 'gold' is encrypted: a copy of it is encrypted too "
                    "(encrypted images never become unencrypted)")

    # unencrypted -> unencrypted by default; volumes from it are unencrypted
    d.cli("volume", "create", "p", "--size", "16M", "--no-encrypt")
    d.cli("image", "create", "pub", "--from-volume", "p")
    d.cli("image", "copy", "pub", "pub2")
    assert cli_json(d, "image", "info", "pub2")["encrypted"] is False
    # ... or encrypted under the CMK --key names (a new DK)
    d.cli("image", "copy", "pub", "pub-k2", "--key", "k2")
    assert cli_json(d, "image", "info", "pub-k2")["key_alias"] == "k2"
    d.cli("volume", "create", "v-pk2", "--from-image", "pub-k2")
    assert header_of(d.image("v-pk2")).encrypted

    # a copy needs the CMK of the image Enabled, like any use of it
    d.cli("key", "disable", "k1")
    expect_fail(d, errors.KeyStateError.exit_code, "image", "copy", "gold", "late", match="Disabled")
    assert cli_json(d, "image", "info", "gold")["key_state"] == "Disabled"
    assert not (d.home / "images" / "late").exists()
    for name in ("v-same", "v-other"):
        d.cli("detach", name, "--force")
    assert state_leftovers(d.home) == []
