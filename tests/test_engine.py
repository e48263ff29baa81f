"""The byte-range engine against a shadow copy of the plaintext, with the
backing file checked sector by sector against the reference XTS path."""

from __future__ import annotations

import os
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evscrypt.crypto.xts import SectorCipher, reference_crypt
from evscrypt.errors import OutOfRange
from evscrypt.format import SECTOR_SIZE
from evscrypt.image.engine import PLAINTEXT, Engine
from evscrypt.image.header import HEADER_AREA
from evscrypt.secret import Secret

ZERO = bytes(SECTOR_SIZE)
NSECT = 8
SIZE = NSECT * SECTOR_SIZE
DATA_OFFSET = HEADER_AREA  # the smallest legal offset; also catches off-by-header bugs


def stored_sectors(fd: int, data_offset: int, size: int) -> list[bytes]:
    raw = os.pread(fd, size, data_offset)
    assert len(raw) == size
    return [raw[i:i + SECTOR_SIZE] for i in range(0, size, SECTOR_SIZE)]


def check_backing(fd: int, key: bytes, data_offset: int, shadow: bytes | bytearray) -> None:
    """Every stored sector is either a hole (and then the plaintext is zero)
    or exactly the reference ciphertext of the plaintext."""
    for n, got in enumerate(stored_sectors(fd, data_offset, len(shadow))):
        plain = bytes(shadow[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE])
        if got == ZERO:
            assert plain == ZERO, f"sector {n} is stored as zeros but its plaintext is not"
        else:
            assert got == reference_crypt(key, n, plain, True), f"sector {n} is not the reference ciphertext"


class Image:
    """An Engine over a temporary sparse file, with its key in the clear for checking."""

    def __init__(self, path: str, size: int = SIZE, data_offset: int = DATA_OFFSET, encrypted: bool = True):
        self.key = os.urandom(64)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, data_offset + size)
        self.secret = Secret.from_buffer(self.key) if encrypted else None
        self.cipher = SectorCipher(self.secret) if encrypted else None
        self.eng = Engine(self.fd, size, data_offset, self.cipher or PLAINTEXT)
        self.file_size = data_offset + size

    def close(self):
        if self.cipher:
            self.cipher.close()
            self.secret.wipe()
        os.close(self.fd)


@pytest.fixture
def img(tmp_path):
    im = Image(str(tmp_path / "e.img"))
    yield im
    im.close()


# -- the model-based test --------------------------------------------------------

def _ranges(size: int):
    return st.integers(0, size).flatmap(lambda off: st.tuples(st.just(off), st.integers(0, size - off)))


OPS = st.one_of(
    st.tuples(st.just("write"), _ranges(SIZE), st.integers(0, 255) | st.just(-1) | st.just(0)),
    st.tuples(st.just("read"), _ranges(SIZE), st.just(None)),
    st.tuples(st.just("discard"), _ranges(SIZE), st.just(None)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=25))
def test_random_ops_match_shadow_and_reference(ops):
    with tempfile.TemporaryDirectory() as d:
        im = Image(os.path.join(d, "m.img"))
        try:
            shadow = bytearray(SIZE)
            for kind, (off, length), fill in ops:
                if kind == "write":
                    data = os.urandom(length) if fill == -1 else bytes([fill]) * length
                    assert im.eng.write(off, data) == length
                    shadow[off:off + length] = data
                elif kind == "discard":
                    im.eng.discard(off, length)
                    shadow[off:off + length] = bytes(length)
                else:
                    assert im.eng.read(off, length) == bytes(shadow[off:off + length])
            assert im.eng.read(0, SIZE) == bytes(shadow)
            assert os.fstat(im.fd).st_size == im.file_size
            # the header area was never touched
            assert os.pread(im.fd, DATA_OFFSET, 0) == bytes(DATA_OFFSET)
            check_backing(im.fd, im.key, DATA_OFFSET, shadow)
        finally:
            im.close()


def test_the_backing_check_can_fail(img):
    """Negative control for check_backing: a wrong shadow or a wrong key is caught."""
    img.eng.write(5000, b"hello")
    shadow = bytearray(SIZE)
    shadow[5000:5005] = b"hello"
    check_backing(img.fd, img.key, DATA_OFFSET, shadow)
    shadow[5000] ^= 1
    with pytest.raises(AssertionError):
        check_backing(img.fd, img.key, DATA_OFFSET, shadow)
    shadow[5000] ^= 1
    with pytest.raises(AssertionError):
        check_backing(img.fd, os.urandom(64), DATA_OFFSET, shadow)
    with pytest.raises(AssertionError):
        check_backing(img.fd, img.key, DATA_OFFSET, bytearray(SIZE))  # sector 1 holds data


# -- specific behaviour -------------------------------------------------------------

def test_unwritten_reads_as_zeros_and_nothing_is_stored(img):
    assert img.eng.read(0, SIZE) == bytes(SIZE)
    assert img.eng.read(123, 4567) == bytes(4567)
    assert os.pread(img.fd, SIZE, DATA_OFFSET) == bytes(SIZE)


def test_written_zeros_are_stored_encrypted(img):
    img.eng.write(SECTOR_SIZE, bytes(SECTOR_SIZE))
    s = stored_sectors(img.fd, DATA_OFFSET, SIZE)
    assert s[1] != ZERO and s[1] == reference_crypt(img.key, 1, ZERO, True)
    assert s[0] == ZERO and s[2] == ZERO
    assert img.eng.read(0, 3 * SECTOR_SIZE) == bytes(3 * SECTOR_SIZE)


def test_partial_write_keeps_neighbours(img):
    base = os.urandom(SIZE)
    img.eng.write(0, base)
    img.eng.write(4090, b"ABCDEFGHIJKL")  # straddles sectors 0 and 1
    want = bytearray(base)
    want[4090:4102] = b"ABCDEFGHIJKL"
    assert img.eng.read(0, SIZE) == bytes(want)
    check_backing(img.fd, img.key, DATA_OFFSET, want)


OUT_OF_RANGE = [(SIZE, 1), (SIZE - 1, 2), (-1, 1), (0, SIZE + 1), (SIZE + 4096, 0)]


@pytest.mark.parametrize("op", ["read", "write", "discard"])
@pytest.mark.parametrize("off,length", OUT_OF_RANGE + [(5, -1)])
def test_out_of_range_is_refused(img, op, off, length):
    if op == "write" and length < 0:
        op = "check"  # a write cannot have a negative length; the range check still must refuse it
    img.eng.write(0, os.urandom(SIZE))
    before = os.pread(img.fd, SIZE, DATA_OFFSET)
    with pytest.raises(OutOfRange) as ei:
        if op == "read":
            img.eng.read(off, length)
        elif op == "write":
            img.eng.write(off, b"x" * length)
        elif op == "discard":
            img.eng.discard(off, length)
        else:
            img.eng.check_range(off, length)
    assert ei.value.exit_code == 17
    assert os.pread(img.fd, SIZE, DATA_OFFSET) == before
    assert os.fstat(img.fd).st_size == img.file_size


def test_edges_are_in_range_and_file_never_grows(img):
    img.eng.write(SIZE - 1, b"z")
    img.eng.write(0, b"a")
    assert img.eng.read(SIZE - 1, 1) == b"z"
    assert img.eng.read(SIZE, 0) == b""
    assert img.eng.write(SIZE, b"") == 0
    img.eng.discard(SIZE - 3, 3)
    img.eng.write(0, os.urandom(SIZE))
    img.eng.fsync()
    assert os.fstat(img.fd).st_size == img.file_size


def test_discard_punches_holes(tmp_path):
    nsect = 256  # 1 MiB
    im = Image(str(tmp_path / "holes.img"), size=nsect * SECTOR_SIZE)
    try:
        data = os.urandom(nsect * SECTOR_SIZE)
        im.eng.write(0, data)
        im.eng.fsync()
        full = os.fstat(im.fd).st_blocks
        assert full * 512 >= nsect * SECTOR_SIZE
        # an unaligned discard: whole sectors 1..127 are freed, sectors 0 and 128 are partial
        im.eng.discard(100, 128 * SECTOR_SIZE)
        im.eng.fsync()
        after = os.fstat(im.fd).st_blocks
        assert after < full
        assert (full - after) * 512 >= 127 * SECTOR_SIZE
        shadow = bytearray(data)
        shadow[100:100 + 128 * SECTOR_SIZE] = bytes(128 * SECTOR_SIZE)
        assert im.eng.read(0, nsect * SECTOR_SIZE) == bytes(shadow)
        s = stored_sectors(im.fd, DATA_OFFSET, nsect * SECTOR_SIZE)
        assert all(s[n] == ZERO for n in range(1, 128))
        assert s[0] != ZERO and s[128] != ZERO
        check_backing(im.fd, im.key, DATA_OFFSET, shadow)
        # discarding the rest of a partial sector turns it into a hole
        im.eng.discard(0, 100)
        assert stored_sectors(im.fd, DATA_OFFSET, SECTOR_SIZE)[0] == ZERO
        assert os.fstat(im.fd).st_size == im.file_size
    finally:
        im.close()


def test_concurrent_partial_writes_lose_no_update(img):
    """8 threads, each owning one 512-byte slice of every sector, rewrite
    their slice many times; every read-modify-write must see the others."""
    nthreads, rounds = 8, 40
    slice_len = SECTOR_SIZE // nthreads
    sectors = [0, 1, 2, 3]
    barrier = threading.Barrier(nthreads)
    errors: list = []

    def pattern(t: int, r: int) -> bytes:
        return bytes([t * 16 + 1]) + r.to_bytes(2, "big") + bytes([t]) * (slice_len - 3)

    def worker(t: int):
        try:
            barrier.wait()
            for r in range(rounds):
                for s in sectors:
                    img.eng.write(s * SECTOR_SIZE + t * slice_len, pattern(t, r))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    want = bytearray(SIZE)
    for s in sectors:
        for t in range(nthreads):
            off = s * SECTOR_SIZE + t * slice_len
            want[off:off + slice_len] = pattern(t, rounds - 1)
    got = img.eng.read(0, SIZE)
    lost = [(s, t) for s in sectors for t in range(nthreads)
            if got[s * SECTOR_SIZE + t * slice_len:s * SECTOR_SIZE + (t + 1) * slice_len]
            != want[s * SECTOR_SIZE + t * slice_len:s * SECTOR_SIZE + (t + 1) * slice_len]]
    assert not lost, f"lost updates (sector, thread): {lost}"
    check_backing(img.fd, img.key, DATA_OFFSET, want)


def test_unencrypted_engine_stores_plaintext(tmp_path):
    im = Image(str(tmp_path / "plain.img"), encrypted=False)
    try:
        data = os.urandom(10000)
        im.eng.write(777, data)
        assert os.pread(im.fd, len(data), DATA_OFFSET + 777) == data
        assert im.eng.read(777, len(data)) == data
        im.eng.discard(777, 100)
        assert os.pread(im.fd, 100, DATA_OFFSET + 777) == bytes(100)
        assert os.fstat(im.fd).st_size == im.file_size
    finally:
        im.close()


# -- through a real VolumeStore volume ------------------------------------------------

def test_volume_store_engine_encrypted(store):
    size = 16 * SECTOR_SIZE
    h = store.create("enc", size)
    with store.engine("enc") as (eng, hh):
        assert hh == h and eng.size == size and eng.cipher is not None
        assert eng.read(0, size) == bytes(size)
        payload = os.urandom(3 * SECTOR_SIZE + 11)
        eng.write(2 * SECTOR_SIZE - 5, payload)
        eng.discard(10 * SECTOR_SIZE, 2 * SECTOR_SIZE)
    shadow = bytearray(size)
    shadow[2 * SECTOR_SIZE - 5:2 * SECTOR_SIZE - 5 + len(payload)] = payload
    with store.engine("enc") as (eng, _):  # reopened: data persisted
        assert eng.read(0, size) == bytes(shadow)
    with store.data_key("enc") as dk:
        key = bytes(dk.buffer)
    fd = os.open(store.path("enc"), os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == h.data_offset + size
        check_backing(fd, key, h.data_offset, shadow)
    finally:
        os.close(fd)


def test_volume_store_unencrypted_stores_plaintext(store):
    size = 8 * SECTOR_SIZE
    h = store.create("plain", size, encrypted=False)
    assert not h.encrypted and h.wrapped_dk is None
    data = os.urandom(5000)
    with store.engine("plain") as (eng, _):
        assert eng.cipher is None
        eng.write(3000, data)
        assert eng.read(3000, 5000) == data
    raw = store.path("plain").read_bytes()
    assert raw[h.data_offset + 3000:h.data_offset + 8000] == data
    assert len(raw) == h.data_offset + size


def _interleave_discard_with_write(im: Image, monkeypatch) -> bytes:
    """Force a write to land inside a partial-sector discard's
    read-modify-write window (between its pread and its pwrite), if the
    engine lets it; return what the written range reads afterwards."""
    import evscrypt.image.engine as engine_mod

    im.eng.write(0, b"A" * SECTOR_SIZE)
    read_done, write_done = threading.Event(), threading.Event()
    real = engine_mod.pread_into

    def pread_then_pause(fd, buf, offset):
        real(fd, buf, offset)
        if threading.current_thread().name == "discarder":
            read_done.set()
            write_done.wait(5)

    monkeypatch.setattr(engine_mod, "pread_into", pread_then_pause)
    disc = threading.Thread(target=im.eng.discard, args=(2048, 512), name="discarder")
    disc.start()
    assert read_done.wait(5)
    wr = threading.Thread(target=im.eng.write, args=(0, b"B" * 512))
    wr.start()
    wr.join(0.5)  # a correct engine blocks this write on the sector lock
    write_done.set()
    disc.join(5)
    wr.join(5)
    assert not disc.is_alive() and not wr.is_alive()
    monkeypatch.setattr(engine_mod, "pread_into", real)
    got = im.eng.read(0, SECTOR_SIZE)
    assert got[2048:2560] == bytes(512)  # the discard itself happened
    return got[:512]


def test_write_racing_partial_discard_is_not_lost_encrypted(img, monkeypatch):
    assert _interleave_discard_with_write(img, monkeypatch) == b"B" * 512


def test_write_racing_partial_discard_is_not_lost_unencrypted(tmp_path, monkeypatch):
    im = Image(str(tmp_path / "plain.img"), encrypted=False)
    try:
        assert _interleave_discard_with_write(im, monkeypatch) == b"B" * 512
    finally:
        im.close()


@pytest.mark.parametrize("encrypted", [True, False])
def test_large_reads_never_return_stale_memory(tmp_path, monkeypatch, encrypted):
    """Large reads use a buffer that is not zero-filled first (read_buffer):
    every byte must come from the file, or be zero past its end.  Hand the
    engine buffers full of 0xAA (the worst stale memory), then read 1 MiB of
    a volume whose first half was never written and whose image is cut
    short in the middle of the read."""
    import evscrypt.image.engine as engine_mod
    from evscrypt.image.backing import UNFILLED_MIN, read_buffer

    assert len(read_buffer(UNFILLED_MIN)) == UNFILLED_MIN and len(read_buffer(100)) == 100
    monkeypatch.setattr(engine_mod, "read_buffer", lambda n: bytearray(b"\xaa" * n))
    nsect = 256
    im = Image(str(tmp_path / "img"), size=nsect * SECTOR_SIZE, encrypted=encrypted)
    try:
        im.eng.write(128 * SECTOR_SIZE, b"\x42" * (64 * SECTOR_SIZE))
        os.ftruncate(im.fd, DATA_OFFSET + 160 * SECTOR_SIZE)  # sectors 160.. lie past the end
        got = im.eng.read(0, nsect * SECTOR_SIZE)
        assert bytes(got[:128 * SECTOR_SIZE]) == bytes(128 * SECTOR_SIZE)
        assert bytes(got[128 * SECTOR_SIZE:160 * SECTOR_SIZE]) == b"\x42" * (32 * SECTOR_SIZE)
        assert bytes(got[160 * SECTOR_SIZE:]) == bytes(96 * SECTOR_SIZE)
    finally:
        im.close()


@pytest.mark.parametrize("path", ["evp", "vaes"])
def test_large_reads_split_only_on_the_evp_path(tmp_path, monkeypatch, path):
    """1 MiB writes are split across the cores on every path, 1 MiB reads on
    the EVP path only (see SectorCipher.splits); both paths store exactly
    the reference ciphertext and read back what was written."""
    import evscrypt.image.engine as engine_mod
    from evscrypt.crypto import vaes

    if path == "vaes" and not vaes.available():
        pytest.skip("this CPU has no VAES/AVX-512")
    monkeypatch.setenv("EVSCRYPT_XTS", path)
    calls = []
    real = engine_mod.split_run
    monkeypatch.setattr(engine_mod, "split_run", lambda count, fn: (calls.append(count), real(count, fn)))
    nsect = 300
    im = Image(str(tmp_path / "img"), size=nsect * SECTOR_SIZE)
    try:
        assert im.cipher.path == path and im.cipher.splits == (path == "evp")
        data = os.urandom(256 * SECTOR_SIZE)
        im.eng.write(10 * SECTOR_SIZE, data)
        assert bytes(im.eng.read(10 * SECTOR_SIZE, len(data))) == data
        shadow = bytes(10 * SECTOR_SIZE) + data + bytes(34 * SECTOR_SIZE)
        check_backing(im.fd, im.key, DATA_OFFSET, shadow)
        assert calls == ([256, 256] if path == "evp" else [256])  # the write, then the read
        # split=False (the daemon's choice when other requests are in flight)
        calls.clear()
        im.eng.write(10 * SECTOR_SIZE, data, split=False)
        assert bytes(im.eng.read(10 * SECTOR_SIZE, len(data), split=False)) == data
        check_backing(im.fd, im.key, DATA_OFFSET, shadow)
        assert calls == []
    finally:
        im.close()


def test_whole_sector_fast_path(img):
    """One aligned 4 KiB sector takes a shorter path in read and write: it
    must store the reference ciphertext, read back, read unwritten sectors
    as zeros, refuse out-of-range sectors, and take the same sector lock as
    every other request on that sector."""
    eng = img.eng
    shadow = bytearray(SIZE)
    for n in (0, NSECT - 1, 3):
        data = os.urandom(SECTOR_SIZE)
        assert eng.write(n * SECTOR_SIZE, data) == SECTOR_SIZE
        shadow[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE] = data
        assert bytes(eng.read(n * SECTOR_SIZE, SECTOR_SIZE)) == data
    assert bytes(eng.read(SECTOR_SIZE, SECTOR_SIZE)) == ZERO
    check_backing(img.fd, img.key, DATA_OFFSET, shadow)
    for off in (SIZE, -SECTOR_SIZE):
        with pytest.raises(OutOfRange):
            eng.write(off, ZERO)
        with pytest.raises(OutOfRange):
            eng.read(off, SECTOR_SIZE)
    for n in (0, 5, 64 + 5):
        held = eng._locks.acquire(n, 1)
        try:
            assert eng._locks.one(n) is held[0] and held[0].locked()
        finally:
            eng._locks.release(held)
