"""Backup manifests and the spelling of DEST and SRC, without any I/O."""

from __future__ import annotations

import json

import pytest

from evscrypt.backup import open_store, parse_source
from evscrypt.backup.manifest import CHUNK_SIZE, Manifest, new_id
from evscrypt.backup.s3store import S3Store
from evscrypt.errors import BackupCorrupt, InvalidArgument, NotFound

H = "ab" * 32


def manifest(**over) -> Manifest:
    m = Manifest(id=new_id("vol"), volume="vol", uuid="u", encrypted=True, kms="local", key_id="k",
                 size=20 << 20, data_offset=1 << 20, image_size=21 << 20, chunks=[H, None, H])
    for k, v in over.items():
        setattr(m, k, v)
    return m


def test_round_trip_and_ranges():
    m = manifest()
    again = Manifest.from_json(m.to_json(), "t")
    assert again == m and again.chunk_count == 3
    assert again.chunk_range(2) == (2 * CHUNK_SIZE, (21 << 20) - 2 * CHUNK_SIZE)
    assert again.stored_chunks == {H}


@pytest.mark.parametrize("change", [
    {"chunks": [H, None]},                       # too few
    {"chunks": [H, None, "xyz"]},                # not a hash
    {"image_size": 22 << 20},                    # does not add up
    {"size": -4096},
    {"id": "../../etc/passwd"},
])
def test_bad_manifests_are_corrupt(change):
    raw = json.loads(manifest().to_json())
    raw.update(change)
    with pytest.raises(BackupCorrupt):
        Manifest.from_json(json.dumps(raw).encode(), "t")
    with pytest.raises(BackupCorrupt):
        Manifest.from_json(b"{", "t")
    with pytest.raises(BackupCorrupt):
        Manifest.from_json(json.dumps({**raw, "version": 2}).encode(), "t")


def test_ids_keep_sources_unambiguous():
    bid = new_id("db::prod:1")
    assert bid.startswith("db__prod_1-") and "::" not in bid
    assert parse_source(f"/b::{bid}") == ("/b", bid)


def test_sources_and_destinations(tmp_path):
    assert parse_source("/b/dir::vol-1") == ("/b/dir", "vol-1")
    assert parse_source("s3://bkt/a/b::vol-1") == ("s3://bkt/a/b", "vol-1")
    assert parse_source("/b/dir/backups/vol-1.json") == ("/b/dir", "vol-1")
    assert parse_source("s3://bkt/p/backups/vol-1.json") == ("s3://bkt/p", "vol-1")
    for bad in ("/b/dir", "::vol", "/b/dir::", "/b::../x"):
        with pytest.raises(InvalidArgument):
            parse_source(bad)
    s3 = open_store("s3://bkt/a/b/")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bkt", "a/b")
    assert s3.source("id") == "s3://bkt/a/b::id" and s3._key("chunks", H) == f"a/b/chunks/{H}"
    assert open_store("s3://bkt")._key("backups", "x.json") == "backups/x.json"
    with pytest.raises(InvalidArgument):
        open_store("s3:///nobucket")
    with pytest.raises(NotFound):
        open_store(str(tmp_path / "missing"))
    d = open_store(str(tmp_path / "new"), create=True)
    assert d.source("id") == f"{tmp_path / 'new'}::id" and d.manifest_ids() == [] and d.known_chunks() == set()
