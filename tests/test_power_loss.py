"""Header updates survive power loss: a grow (resize) or a header restore
that stops after any write step leaves a volume that opens, with either the
old or the new header, its key unwrapping and its data intact."""

from __future__ import annotations

import pytest

from evscrypt.image import header as hdr
from evscrypt.image import headerfile

MiB = 1 << 20


def crash_after(monkeypatch, steps: int):
    real = hdr.store

    def store(fd, header, prev=None, **kw):
        return real(fd, header, prev, crash_after=steps)

    monkeypatch.setattr(hdr, "store", store)


@pytest.mark.parametrize("steps", [0, 1])
def test_grow_interrupted_after_each_header_write(store, monkeypatch, steps):
    store.create("g", 8 * MiB)
    with store.engine("g") as (eng, _):
        eng.write(12345, b"survives" * 500)
    with monkeypatch.context() as m:
        crash_after(m, steps)
        with pytest.raises(hdr.SimulatedCrash):
            store.grow("g", 16 * MiB)
    size = store.header("g").size
    assert size == (8 * MiB if steps == 0 else 16 * MiB)  # one copy written: the newer wins
    with store.engine("g") as (eng, h):  # unwraps, MAC verifies
        assert eng.read(12345, 4000) == b"survives" * 500
    # the next write repairs the header: both copies valid, the grow completes
    store.grow("g", 16 * MiB)
    assert store.info("g")["header_copies_valid"] == [True, True]
    assert store.header("g").size == 16 * MiB


@pytest.mark.parametrize("steps", [0, 1])
def test_header_restore_interrupted_after_each_write(store, monkeypatch, tmp_path, steps):
    store.create("r", 4 * MiB)
    saved = tmp_path / "r.hdr"
    with store.locked("r") as op:
        headerfile.backup(op.fd, saved)
    with monkeypatch.context() as m:
        crash_after(m, steps)
        with pytest.raises(hdr.SimulatedCrash):
            store.restore_header("r", saved)
    with store.engine("r") as (eng, h):
        assert h.size == 4 * MiB
