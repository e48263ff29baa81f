"""split_run: one large run of sectors split across the cores."""

from __future__ import annotations

import threading

import pytest

from evscrypt import parallel
from evscrypt.parallel import MIN_PART_SECTORS, split_run


def record_parts(count: int) -> list[tuple[int, int, str]]:
    parts, lock = [], threading.Lock()

    def fn(lo, hi):
        with lock:
            parts.append((lo, hi, threading.current_thread().name))

    split_run(count, fn)
    return sorted(parts)


@pytest.mark.parametrize("count", [0, 1, MIN_PART_SECTORS, 2 * MIN_PART_SECTORS - 1, 2 * MIN_PART_SECTORS,
                                   2 * MIN_PART_SECTORS + 1, 256, 1001])
def test_parts_cover_the_range_exactly_once(monkeypatch, count):
    monkeypatch.setattr(parallel, "_CPUS", 2)
    parts = record_parts(count)
    covered = [s for lo, hi, _ in parts for s in range(lo, hi)]
    assert covered == list(range(count))
    assert all(hi > lo for lo, hi, _ in parts) or count == 0
    if count >= 2 * MIN_PART_SECTORS:
        # two parts, one of them in the pool: the work really runs on two threads
        assert len(parts) == 2 and len({name for _, _, name in parts}) == 2
    else:
        assert len(parts) == 1 and parts[0][2] == threading.current_thread().name


def test_more_cores_more_parts(monkeypatch):
    monkeypatch.setattr(parallel, "_CPUS", 4)
    parts = record_parts(4 * MIN_PART_SECTORS + 3)
    assert len(parts) == 4
    assert [s for lo, hi, _ in parts for s in range(lo, hi)] == list(range(4 * MIN_PART_SECTORS + 3))


def test_a_part_error_reaches_the_caller_after_all_parts_finish(monkeypatch):
    monkeypatch.setattr(parallel, "_CPUS", 2)
    done = []

    def fn(lo, hi):
        if lo:
            raise OSError(5, "part failed")
        done.append((lo, hi))

    with pytest.raises(OSError, match="part failed"):
        split_run(4 * MIN_PART_SECTORS, fn)
    assert done == [(0, 2 * MIN_PART_SECTORS)]
    # the split lock was released: the next large run splits again
    assert len(record_parts(4 * MIN_PART_SECTORS)) == 2


def test_nested_and_concurrent_runs_do_not_split(monkeypatch):
    """While one run is split, another (nested, or from another thread) runs
    whole in its own thread: it does not queue for the pool."""
    monkeypatch.setattr(parallel, "_CPUS", 2)
    inner = []

    def outer(lo, hi):
        if lo == 0:
            inner.extend(record_parts(4 * MIN_PART_SECTORS))

    split_run(4 * MIN_PART_SECTORS, outer)
    assert len(inner) == 1 and inner[0][:2] == (0, 4 * MIN_PART_SECTORS)


def test_a_run_does_not_split_while_another_is_in_progress(monkeypatch):
    """With one run in progress in another thread (split or not), a new run
    goes whole: at high queue depths splitting only queues for the pool."""
    monkeypatch.setattr(parallel, "_CPUS", 2)
    started, release = threading.Event(), threading.Event()

    def slow(lo, hi):
        started.set()
        release.wait(10)

    t = threading.Thread(target=split_run, args=(MIN_PART_SECTORS, slow))  # too small to split: runs whole
    t.start()
    try:
        assert started.wait(10)
        assert record_parts(4 * MIN_PART_SECTORS) == [(0, 4 * MIN_PART_SECTORS, threading.current_thread().name)]
    finally:
        release.set()
        t.join()
    assert len(record_parts(4 * MIN_PART_SECTORS)) == 2  # alone again: splits
