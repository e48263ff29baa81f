"""Exact I/O on the backing file: pieces, short writes, reads past the end."""

from __future__ import annotations

import os

import pytest

from evscrypt.image import backing
from evscrypt.image.backing import WRITE_CHUNK, pread_into, pwrite_all


@pytest.fixture
def fd(tmp_path):
    """A new empty file, open read-write."""
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


@pytest.mark.parametrize("size", [1, 4096, WRITE_CHUNK - 1, WRITE_CHUNK, WRITE_CHUNK + 1, 8 * WRITE_CHUNK + 4096])
def test_pwrite_all_writes_in_pieces_of_at_most_write_chunk(fd, monkeypatch, size):
    calls = []
    real = os.pwrite
    monkeypatch.setattr(backing.os, "pwrite", lambda fd, b, off: (calls.append(len(b)), real(fd, b, off))[1])
    data = os.urandom(size)
    pwrite_all(fd, data, 12345)
    assert os.pread(fd, size + 10, 12345) == data
    assert max(calls) <= WRITE_CHUNK
    assert sum(calls) == size and len(calls) == -(-size // WRITE_CHUNK)


@pytest.mark.parametrize("size", [3000, WRITE_CHUNK + 5000])
def test_pwrite_all_finishes_short_writes(fd, monkeypatch, size):
    real = os.pwrite
    monkeypatch.setattr(backing.os, "pwrite", lambda fd, b, off: real(fd, bytes(b)[:1000], off))
    data = os.urandom(size)
    pwrite_all(fd, data, 7)
    assert os.pread(fd, size + 10, 7) == data


def test_pread_into_fills_past_the_end_with_zeros(fd):
    os.pwrite(fd, b"x" * 5000, 0)
    buf = bytearray(b"\xaa" * 9000)
    pread_into(fd, buf, 1000)
    assert buf == b"x" * 4000 + bytes(5000)
