"""Key material in the daemon's memory stays locked, and is gone after detach.

A real daemon attaches 8 volumes, serves I/O on each (so every XTS backend
has built its key schedules: the VAES schedule in a Secret, or OpenSSL's EVP
contexts per worker thread), then detaches 3.  The whole address space is
then searched (/proc/PID/mem) for each volume's DK halves, header-MAC key
and every AES round key its XTS key expands to (tests/aes_schedule.py, an
independent oracle).  Every occurrence of a live volume's key material must
lie in a mapping whose VmFlags has ``lo``; nothing of a detached volume's may
remain anywhere.  Run on both fast backends, whose schedules live in
different places, and on the reference path.

The same search over a daemon that runs with --allow-swappable-keys and no
way to lock memory finds key material in unlocked mappings: the assertion
can fail.  The refusal to start without locked memory is tested here too.
"""

from __future__ import annotations

import os
import resource
import shutil
from pathlib import Path

import pytest

from evscrypt.crypto import evp, vaes
from evscrypt.errors import MemoryProtectionError
from evscrypt.image import header as hdr
from evscrypt.kms.local import LocalKMS
from evscrypt.volumes import VolumeStore

from aes_schedule import decrypt_schedule_256, expand_256, xts_round_key_blocks
from daemon_fixture import make_daemon  # noqa: F401  (fixture)
from memscan import scan

N_VOLUMES, N_DETACHED = 8, 3
#: Runs the daemon without CAP_IPC_LOCK and with a 64 KiB RLIMIT_MEMLOCK.
NO_LOCK_PREFIX = ("prlimit", "--memlock=65536:65536", "setpriv", "--bounding-set=-ipc_lock",
                  "--inh-caps=-ipc_lock", "--")

needs_tools = pytest.mark.skipif(shutil.which("prlimit") is None or shutil.which("setpriv") is None,
                                 reason="needs prlimit and setpriv (util-linux)")


def key_material(store: VolumeStore, name: str) -> dict[str, bytes]:
    """What of a volume's keys may be found in memory, by label."""
    with store.data_key(name) as dk, hdr.mac_key(dk) as mk:
        key = bytes(dk.buffer)
        mac = bytes(mk.buffer)
    out = {f"{name} DK half 1": key[:32], f"{name} DK half 2": key[32:], f"{name} MAC key": mac}
    for i, block in enumerate(sorted(xts_round_key_blocks(key))):
        out[f"{name} round key {i}"] = block
    return out


def encryption_round_keys(material: dict[str, bytes], name: str) -> list[str]:
    """Labels of the encryption round keys 2..14 of both halves: every
    backend stores these (OpenSSL's encrypt contexts, the VAES schedule)."""
    want = set(expand_256(material[f"{name} DK half 1"])[2:]) | set(expand_256(material[f"{name} DK half 2"])[2:])
    return [k for k, v in material.items() if "round key" in k and v in want]


def exercise(path) -> None:
    """Write and read back through the mount: builds the encrypt and the
    decrypt key schedules (several worker threads for the 1 MiB request)."""
    data = os.urandom(1 << 20)
    fd = os.open(path, os.O_RDWR)
    try:
        for off in (0, 8 << 20):
            os.pwrite(fd, data, off)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 1 << 20, 8 << 20) == data
        assert os.pread(fd, 4096, 4096) == data[4096:8192]
    finally:
        os.close(fd)


def start_with_volumes(make_daemon, xts: str, n: int, **kw):
    d = make_daemon(start=False, **kw)
    d.env["EVSCRYPT_XTS"] = xts
    names = [f"v{i}" for i in range(n)]
    for name in names:
        d.cli("volume", "create", name, "--size", "16M")
    d.start()
    store = VolumeStore(d.home)
    material = {name: key_material(store, name) for name in names}
    for name in names:
        exercise(d.attach(name))
    return d, names, material


def vaes_schedule(key: bytes) -> bytes:
    """The key schedule exactly as _xtsvaes.c lays it out (encryption and
    decryption round keys of half 1, encryption round keys of half 2): found
    in the daemon's memory only when the VAES backend runs."""
    return b"".join(expand_256(key[:32]) + decrypt_schedule_256(key[:32]) + expand_256(key[32:]))


def backends():
    out = []
    if vaes.available():
        out.append("vaes")
    if evp.available():
        out.append("evp")
    return out


#: The reference path (cryptography, a context per sector) keeps no round
#: keys between sectors; it is searched for the DK and MAC key only.
KEEPS_ROUND_KEYS = {"vaes", "evp"}


@pytest.mark.parametrize("xts", [*backends(), "reference"])
def test_live_key_material_is_locked_and_detached_is_gone(make_daemon, xts):
    d, names, material = start_with_volumes(make_daemon, xts, N_VOLUMES)
    detached = names[:N_DETACHED]
    for name in detached:
        d.cli("detach", name)
    live = names[N_DETACHED:]

    # the local KMS's root key and CMK pass through the daemon on every attach
    kms = LocalKMS(d.home / "kms" / "local")
    with kms._root_key() as root:
        others = {"root key": bytes(root.buffer)}
    with kms._locked():
        rec = kms._find(kms._load(), "alias/evs/default")
    with kms._cmk(rec) as cmk:
        others["CMK evs/default"] = bytes(cmk.buffer)

    needles = {k: v for name in names for k, v in material[name].items()}
    needles.update(others)
    sched = {name: vaes_schedule(material[name][f"{name} DK half 1"] + material[name][f"{name} DK half 2"])
             for name in live}
    needles.update({f"{name} VAES schedule": v for name, v in sched.items()})
    hits = scan(d.pid, needles)

    for name in live:  # the backend asked for is the one that runs
        assert bool(hits[f"{name} VAES schedule"]) == (xts == "vaes"), f"{name} does not run on {xts}"

    for name in live:  # the search must find them, or it proves nothing
        rounds = encryption_round_keys(material[name], name) if xts in KEEPS_ROUND_KEYS else []
        for label in (f"{name} DK half 1", f"{name} DK half 2", f"{name} MAC key", *rounds):
            assert hits[label], f"{label} not found in the daemon's memory ({xts}): the search is blind"
    unlocked = [f"{label} at {h.address:x} in {h.mapping}" for name in live for label in material[name]
                for h in hits[label] if not h.mapping.locked]
    unlocked += [f"{label} at {h.address:x} in {h.mapping}" for label in others for h in hits[label]
                 if not h.mapping.locked]
    assert not unlocked, f"{len(unlocked)} occurrences of live key material in unlocked memory:\n" + \
        "\n".join(unlocked[:20])
    left = [f"{label} at {h.address:x} in {h.mapping}" for name in detached for label in material[name]
            for h in hits[label]]
    assert not left, "key material of detached volumes is still in the daemon's memory:\n" + "\n".join(left[:20])
    d.stop()


@needs_tools
def test_daemon_refuses_to_start_without_locked_memory(make_daemon):
    """No CAP_IPC_LOCK and RLIMIT_MEMLOCK at 64 KiB: mlockall fails, and the
    daemon says why in one line and exits with its own code."""
    d = make_daemon(start=False, prefix=NO_LOCK_PREFIX)
    p = d.popen()
    rc = p.wait(60)
    out = d.log.strip().splitlines()
    assert rc == MemoryProtectionError.exit_code, d.log
    assert len(out) == 1 and out[0].startswith("evscrypt: error: cannot lock memory"), d.log
    for words in ("RLIMIT_MEMLOCK is 64 KiB", "LimitMEMLOCK=infinity", "--allow-swappable-keys"):
        assert words in out[0]
    assert "Traceback" not in d.log


@needs_tools
@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_MEMLOCK)[1] != resource.RLIM_INFINITY,
                    reason="needs a hard RLIMIT_MEMLOCK of infinity (to run a daemon without CAP_IPC_LOCK "
                           "but with an unlimited or large limit)")
@pytest.mark.parametrize("limit, starts", [("unlimited", True), (str(4 << 30), False)])
def test_daemon_without_cap_ipc_lock_needs_an_unlimited_limit(make_daemon, limit, starts):
    """mlockall succeeds under a large finite limit, but later allocations
    would fail: refused.  With no limit the daemon runs, locked."""
    prefix = ("prlimit", f"--memlock={limit}:{limit}", *NO_LOCK_PREFIX[2:])
    d = make_daemon(start=False, prefix=prefix)
    if starts:
        d.start()
        assert "lo" in open(f"/proc/{d.pid}/smaps").read()
        d.stop()
    else:
        assert d.popen().wait(60) == MemoryProtectionError.exit_code
        assert "later allocations would fail" in d.log


@needs_tools
@pytest.mark.skipif(not evp.available(), reason="libcrypto has no XTS")
def test_allow_swappable_keys_runs_and_the_search_sees_unlocked_keys(make_daemon):
    """With the flag the daemon runs anyway and says so; and the search of the
    first test, over this daemon, does find key material in unlocked memory
    (the control: that test's assertion can fail).  On the EVP backend,
    whose key schedules OpenSSL allocates: only mlockall locks those."""
    d, names, material = start_with_volumes(make_daemon, "evp", 1, prefix=NO_LOCK_PREFIX,
                                            extra_args=("--allow-swappable-keys",))
    warning = [line for line in d.log.splitlines() if " WARNING " in line and "--allow-swappable-keys" in line]
    assert warning and "RLIMIT_MEMLOCK" in warning[0], d.log
    hits = scan(d.pid, material[names[0]])
    unlocked = [label for label, hs in hits.items() for h in hs if not h.mapping.locked]
    assert unlocked, "with memory unlockable, the search should find key material outside locked mappings"
    d.stop()


def test_the_systemd_unit_lets_the_daemon_lock_its_memory():
    unit = (Path(__file__).parent.parent / "systemd" / "evscrypt.service").read_text().splitlines()
    assert "LimitMEMLOCK=infinity" in unit
    caps = [line for line in unit if line.startswith("CapabilityBoundingSet=")]
    assert caps and "CAP_IPC_LOCK" in caps[-1].split("=", 1)[1].split()
