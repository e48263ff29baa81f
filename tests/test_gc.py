"""Temporary entries: a kill -9 in the middle of a restore, a snapshot, an
image or a backup leaves a hidden entry in the state directory; `evscrypt
gc` and the daemon's start remove it, and leave alone the entry of an
operation that is still running (its builder holds an flock on it)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from copy_helpers import (
    assert_reads, cli_json, open_fifo_writer, pattern, popen_cli, state_leftovers, write_sync,
)
from daemon_fixture import daemon, make_daemon  # noqa: F401  (fixtures by name)
from evscrypt import tempentry

MiB = 1 << 20
#: data in chunk 0 (the header's) and in chunk 3 of a 40 MiB volume (8 MiB chunks)
LAYOUT = [(0, 4096), (25 * MiB, 64 * 1024)]


# -- the mechanism, without a daemon ---------------------------------------------------
def test_collect_removes_only_what_nobody_holds(tmp_path):
    home = tmp_path / "home"
    vols, snaps = home / "volumes", home / "snapshots"
    vols.mkdir(parents=True)
    snaps.mkdir()
    (vols / "v.img").write_bytes(b"a volume")  # a real volume: never touched
    (vols / ".hidden-but-mine").write_bytes(b"x")  # not a temporary name: never touched
    legacy = vols / ".old.img.1a2b3c4d.tmp"  # what an earlier version left
    legacy.write_bytes(b"x")

    held_path, held_fd = tempentry.create(vols / "new.img")  # a build in progress
    stale_path, stale_fd = tempentry.create(snaps / "s", directory=True, mode=0o700)
    (stale_path / "image").write_bytes(b"half a copy")
    os.close(stale_fd)  # its builder died: nobody holds it now

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    link = snaps / ".x.tmp-0badc0de"
    link.symlink_to(outside)  # a temporary name, but a symlink: never followed, never removed

    try:
        r = tempentry.collect(home)
        assert sorted(r.removed) == sorted([str(legacy), str(stale_path)])
        assert r.busy == [str(held_path)] and r.errors == []
        assert held_path.exists() and not stale_path.exists() and not legacy.exists()
        assert (vols / "v.img").exists() and (vols / ".hidden-but-mine").exists()
        assert link.is_symlink() and (outside / "precious").read_bytes() == b"keep me"
    finally:
        os.close(held_fd)
    assert tempentry.collect(home).removed == [str(held_path)]  # its holder is gone


def test_a_builder_that_loses_the_race_to_a_collector_starts_over(tmp_path, monkeypatch):
    """Between creating its entry and locking it, a builder may find that a
    collector took the entry: it must notice and make a new one."""
    home = tmp_path / "home"
    (home / "volumes").mkdir(parents=True)
    real_lock = tempentry._lock
    seen, started = [], []

    def collector_first(fd):
        if not started:  # the builder's first entry: a collector comes in before the builder locks it
            started.append(fd)
            seen.extend(tempentry.collect(home).removed)  # (its own _lock calls pass through)
        return real_lock(fd)

    monkeypatch.setattr(tempentry, "_lock", collector_first)
    path, fd = tempentry.create(home / "volumes" / "v.img")
    try:
        assert len(seen) == 1 and seen[0] != str(path) and not os.path.exists(seen[0])
        assert tempentry.collect(home).busy == [str(path)]  # the second entry is the builder's, locked
        assert os.fstat(fd).st_ino == os.stat(path).st_ino
    finally:
        os.close(fd)


# -- real operations on a real daemon -------------------------------------------------------
def make_backup(d, tmp_path):
    """A 40 MiB volume with data in chunk 3, backed up; chunk 3 then becomes a
    FIFO, so a restore blocks there, half way through building its image."""
    d.cli("volume", "create", "v", "--size", "40M")
    data = pattern("gc", LAYOUT)
    write_sync(d.attach("v"), data)
    dest = tmp_path / "bk"
    r = cli_json(d, "backup", "create", "v", str(dest))
    digest = json.loads((dest / "backups" / f"{r['id']}.json").read_text())["chunks"][3]
    chunk = dest / "chunks" / digest
    blob = chunk.read_bytes()
    chunk.unlink()
    os.mkfifo(chunk)
    return data, r["source"], chunk, blob


def hidden(d, area: str) -> list[str]:
    if not (d.home / area).is_dir():
        return []
    return sorted(n for n in os.listdir(d.home / area) if n.startswith("."))


def test_gc_and_daemon_start_leave_a_running_restore_alone(daemon, tmp_path):
    d = daemon
    data, source, chunk, blob = make_backup(d, tmp_path)
    p = popen_cli(d, "volume", "create", "r", "--from-backup", source)
    fifo = open_fifo_writer(chunk, p)  # the restore is now reading chunk 3, its image half built
    try:
        [entry] = hidden(d, "volumes")
        assert entry.startswith(".r.img.tmp-")
        r = cli_json(d, "gc")
        assert r == {"removed": [], "busy": [str(d.home / "volumes" / entry)], "errors": []}
        out = d.cli("gc").stdout
        assert out == f"in use, left alone: {d.home / 'volumes' / entry}\n"
        # a daemon starting now leaves it alone too
        d.stop()
        d.start()
        assert hidden(d, "volumes") == [entry] and "left by an interrupted operation" not in d.log
        # and the restore goes on to the end, unharmed
        with os.fdopen(fifo, "wb") as f:
            fifo = -1
            f.write(blob)
    finally:
        if fifo >= 0:
            os.close(fifo)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert_reads(d.attach("r"), data)
    assert state_leftovers(d.home) == []


def flocked_inodes() -> set[tuple[int, int]]:
    """(device, inode) of every exclusive flock in the system (/proc/locks):
    seeing a lock without taking one, so the test cannot disturb a builder."""
    out = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if "->" in f:
            continue  # a waiter, not a holder
        if len(f) >= 6 and f[1] == "FLOCK" and f[3] == "WRITE":
            major, minor, ino = f[5].split(":")
            out.add((os.makedev(int(major, 16), int(minor, 16)), int(ino)))
    return out


def wait_locked_entry(d, area: str, proc) -> str:
    """Wait until ``proc`` holds a locked temporary entry in ``area``: the
    event that says it is in the middle of its build."""
    while True:
        locks = flocked_inodes()
        for n in hidden(d, area):
            try:
                st = os.stat(d.home / area / n, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in locks:
                return n
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (exit {proc.returncode}): {proc.communicate()}")


def test_gc_and_daemon_start_remove_what_kill_9_left(daemon, tmp_path):
    d = daemon
    _, source, chunk, blob = make_backup(d, tmp_path)
    killed = []

    # a restore killed half way (blocked on the FIFO chunk)
    p = popen_cli(d, "volume", "create", "r", "--from-backup", source)
    fifo = open_fifo_writer(chunk, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    os.close(fifo)
    killed.append(("volumes", hidden(d, "volumes")[0]))

    # a snapshot, an image and a backup of the attached volume, each killed
    # while it waits for the daemon's quiesced copy (the daemon is stopped)
    # (gc needs no daemon: it runs before the daemon goes on, so the daemon's
    # answers to the dead requests find their destinations gone)
    os.kill(d.pid, signal.SIGSTOP)
    try:
        for args, area in ((("snapshot", "create", "v", "s1"), "snapshots"),
                           (("image", "create", "i1", "--from-volume", "v"), "images"),
                           (("backup", "create", "v", str(tmp_path / "bk2")), "snapshots")):
            before = hidden(d, area)
            p = popen_cli(d, *args)
            entry = wait_locked_entry(d, area, p)
            while entry in before:  # the snapshot's dir is already there when the backup starts
                entry = wait_locked_entry(d, area, p)
            p.send_signal(signal.SIGKILL)
            p.wait()
            killed.append((area, entry))
        assert [a for a, _ in killed] == ["volumes", "snapshots", "images", "snapshots"]
        assert killed[1][1].startswith(".s1.tmp-") and killed[2][1].startswith(".i1.tmp-")
        assert killed[3][1].startswith(".backup-v.tmp-")
        left = sorted(str(d.home / a / n) for a, n in killed)
        assert sorted(state_leftovers(d.home)) == left

        p = d.cli("gc")
        assert sorted(p.stdout.splitlines()) == sorted(f"removed {x}" for x in left)
        assert state_leftovers(d.home) == []
        assert d.cli("gc").stdout == "nothing to remove\n"
    finally:
        os.kill(d.pid, signal.SIGCONT)
    d.cli("snapshot", "create", "v", "s1")  # the names are free, the daemon is well
    assert [s["name"] for s in cli_json(d, "snapshot", "list")] == ["s1"]

    # the daemon removes them when it starts
    p = popen_cli(d, "volume", "create", "r2", "--from-backup", source)
    fifo = open_fifo_writer(chunk, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    os.close(fifo)
    [entry] = hidden(d, "volumes")
    d.stop()
    d.start()
    assert hidden(d, "volumes") == [] and state_leftovers(d.home) == []
    assert f"removed {d.home / 'volumes' / entry}, left by an interrupted operation" in d.log
