"""The CMK-state contract, end to end, for both KMS backends.

One suite, parametrized over backend in ("local", "aws"), drives a real
`evscrypt daemon` (tests/daemon_fixture.py) through the CLI and through the
FUSE disk files it exposes, and checks every cell of this table:

| state             | create | attach | I/O when attached | detach                 | re-attach | dump-key |
| Enabled           | ok     | ok     | ok                | ok                     | ok        | ok       |
| Disabled          | 12     | 12     | keeps working     | 12; --force + warning  | 12        | 12       |
| PendingDeletion   | 12     | 12     | keeps working     | 12; --force + warning  | 12        | 12       |
| Deleted/not found | 12/11  | 12/11  | keeps working     | refused; --force works | refused   | refused  |
| KMS unreachable   | 14     | 14 (bounded time) | keeps working | refused; --force  | 14, then ok when back | 14 |

Every refusal must be exactly one line on stderr that names the key and its
state.  A small adapter per backend makes a key and moves it between states:

* local: `evscrypt key ...`; Deleted = schedule deletion, move the date into
  the past, `key purge-due`; unreachable = the root key is sealed and the
  passphrase file the daemon and CLI use is taken away (and put back).
* aws: moto_server behind a TCP proxy (tests/kms_fixtures.py); states are set
  with boto3 straight at moto; "not found" = moto restarted empty;
  unreachable = the proxy is down (or a blackhole, with small timeouts).
"""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from daemon_fixture import EVSCRYPT, Daemon, make_daemon, pread_all  # noqa: F401  (fixture used by name)
from kms_fixtures import HOST, moto_kms, no_credentials_env, set_aws_env  # noqa: F401  (fixture used by name)
from evscrypt.image import header as hdr
from evscrypt.secret import Secret
from evscrypt.volumes import VolumeStore, encryption_context

pytestmark = pytest.mark.fuse

MiB = 1 << 20
SIZE = "8M"
OK, INVALID_ARGUMENT, INTEGRITY = 0, 3, 9
NOT_FOUND_KEY, KEY_STATE, UNAVAILABLE, DENIED, BAD_CIPHERTEXT = 11, 12, 14, 15, 16
#: An unreachable endpoint must be given up on within this long (default timeouts).
UNREACHABLE_BOUND = 30.0
#: ... and within this long with EVSCRYPT_AWS_{CONNECT,READ}_TIMEOUT=1 (blackhole).
BLACKHOLE_BOUND = 15.0


# -- helpers -------------------------------------------------------------------
def run(d: Daemon, *args, env: dict | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI against ``d`` (its env, or ``env``); return (process, seconds)."""
    t0 = time.monotonic()
    p = subprocess.run([EVSCRYPT, *map(str, args)], env=env if env is not None else d.env, capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return p, time.monotonic() - t0


def ok(d: Daemon, *args, **kw) -> subprocess.CompletedProcess:
    p, _ = run(d, *args, **kw)
    assert p.returncode == OK, (f"evscrypt {' '.join(map(str, args))} exited {p.returncode}\n"
                                f"stdout: {p.stdout}\nstderr: {p.stderr}\ndaemon log:\n{d.log[-4000:]}")
    return p


def one_line(stream: str, prefix: str) -> str:
    lines = stream.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stream}"
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def refused(d: Daemon, code: int, *args, words=(), env: dict | None = None,
            within: float | None = None) -> str:
    """Run ``args``; require exit ``code``, one error line on stderr containing
    every word in ``words``, nothing on stdout, and (optionally) a time bound."""
    p, took = run(d, *args, env=env)
    assert p.returncode == code, (f"evscrypt {' '.join(map(str, args))}: expected exit {code}, got "
                                  f"{p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    line = one_line(p.stderr, "evscrypt: error: ")
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    assert p.stdout == "", p.stdout
    if within is not None:
        assert took < within, f"evscrypt {' '.join(map(str, args))} took {took:.1f} s (bound {within} s)"
    return line


def data(n: int, seed) -> bytes:
    return random.Random(repr(seed)).randbytes(n)


def write_sync(path: Path, off: int, buf: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        mv = memoryview(buf)
        pos = off
        while mv:
            n = os.pwrite(fd, mv, pos)
            assert n > 0
            mv, pos = mv[n:], pos + n
        os.fsync(fd)
    finally:
        os.close(fd)


def read_back(path: Path, off: int, n: int) -> bytes:
    """Read through the daemon: drop the clean cached pages first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return pread_all(fd, n, off)
    finally:
        os.close(fd)


class Pattern:
    """Data written to a volume at known offsets, to check later."""

    def __init__(self):
        self.blocks: list[tuple[int, bytes]] = []

    def write(self, path: Path, off: int, n: int = 64 * 1024) -> None:
        buf = data(n, (str(path), off, len(self.blocks)))
        write_sync(path, off, buf)
        self.blocks = [(o, b) for o, b in self.blocks if o + len(b) <= off or o >= off + n]
        self.blocks.append((off, buf))
        assert read_back(path, off, n) == buf

    def check(self, path: Path) -> None:
        for off, buf in self.blocks:
            assert read_back(path, off, len(buf)) == buf, f"{path}: data at {off} differs"


# -- backend adapters --------------------------------------------------------------
class LocalAdapter:
    """The local soft-HSM, with its root key sealed by a passphrase file, so
    that taking the file away makes the keystore unreachable."""

    name = "local"
    lost_code, lost_word = KEY_STATE, "Deleted"
    unreachable_words = ("passphrase file", "cannot be read")

    def __init__(self, d: Daemon, tmp: Path):
        self.d = d
        self.passphrase = tmp / "passphrase"
        self.away = tmp / "passphrase.away"

    def prepare(self) -> None:
        """Before the daemon starts: seal the root key; CLI and daemon use the file."""
        self.passphrase.write_text("correct horse battery staple\n")
        self.passphrase.chmod(0o600)
        ok(self.d, "key", "seal-root", "--passphrase-file", self.passphrase)
        self.d.env["EVSCRYPT_PASSPHRASE_FILE"] = str(self.passphrase)

    def label(self, ref: str) -> str:
        return ref  # how messages name the key

    def make_key(self, name: str) -> str:
        ok(self.d, "key", "create", name)
        return name

    def disable(self, ref: str) -> None:
        ok(self.d, "key", "disable", ref)

    def enable(self, ref: str) -> None:
        ok(self.d, "key", "enable", ref)

    def schedule_deletion(self, ref: str) -> str:
        ok(self.d, "key", "schedule-deletion", ref, "--days", "7")
        return json.loads(ok(self.d, "key", "describe", ref, "--json").stdout)["deletion_date"]

    def cancel_deletion(self, ref: str) -> None:
        ok(self.d, "key", "cancel-deletion", ref)

    def make_due(self, ref: str) -> None:
        """Move a scheduled deletion date into the past (what a clock would do)."""
        kdir = self.d.home / "kms" / "local"
        fd = os.open(kdir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            doc = json.loads((kdir / "keys.json").read_text())
            [rec] = [r for r in doc["keys"] if r["alias"] == ref]
            assert rec["state"] == "PendingDeletion"
            rec["deletion_date"] = "2000-01-01T00:00:00Z"
            tmp = kdir / "keys.json.test-tmp"
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, kdir / "keys.json")
        finally:
            os.close(fd)

    def delete_or_lose(self, ref: str) -> None:
        self.schedule_deletion(ref)
        self.make_due(ref)
        assert f"deleted key {ref}" in ok(self.d, "key", "purge-due").stdout

    def kms_down(self) -> None:
        os.rename(self.passphrase, self.away)

    def kms_up(self) -> None:
        os.rename(self.away, self.passphrase)


class AwsAdapter:
    """AWS KMS as moto behind a proxy; key states set with boto3 at moto."""

    name = "aws"
    lost_code, lost_word = NOT_FOUND_KEY, "not found"
    unreachable_words = ("unreachable",)

    def __init__(self, d: Daemon, moto):
        self.d = d
        self.moto = moto

    def prepare(self) -> None:
        pass

    def label(self, ref: str) -> str:
        return ref

    def make_key(self, name: str) -> str:
        ref = f"alias/{name}"
        self.moto.create_key(ref, description=f"test key {name}")
        return ref

    def disable(self, ref: str) -> None:
        self.moto.disable(ref)

    def enable(self, ref: str) -> None:
        self.moto.enable(ref)

    def schedule_deletion(self, ref: str) -> str:
        return self.moto.schedule_deletion(ref, 7).isoformat()

    def cancel_deletion(self, ref: str) -> None:
        self.moto.cancel_deletion(ref)

    def delete_or_lose(self, ref: str) -> None:
        self.moto.restart_backend()  # moto forgets every key

    def kms_down(self) -> None:
        self.moto.down()

    def kms_up(self) -> None:
        self.moto.up()


class Kit:
    """A running daemon, its backend adapter, and volume helpers."""

    def __init__(self, d: Daemon, kms):
        self.d = d
        self.kms = kms
        self.backend = kms.name

    def create(self, name: str, key: str) -> None:
        p = ok(self.d, "volume", "create", name, "--size", SIZE, "--kms", self.backend, "--key", key)
        assert f"created volume {name}" in p.stdout

    def attach(self, name: str) -> Path:
        path = Path(ok(self.d, "attach", name).stdout.strip().splitlines()[0])
        assert path == self.d.disk(name) and path.exists()
        return path

    def detach(self, name: str, force: bool = False) -> subprocess.CompletedProcess:
        p = ok(self.d, "detach", name, *(["--force"] if force else []))
        assert f"detached {name}" in p.stdout
        assert not self.d.disk(name).exists()
        return p

    def info(self, name: str) -> dict:
        return json.loads(ok(self.d, "volume", "info", name, "--json").stdout)

    def attached(self) -> set[str]:
        return {p.name for p in self.d.mountpoint.iterdir()}

    def key_with_volumes(self, alias: str, at: int = 0, also: tuple = ("w",)) -> tuple[str, str, Path, "Pattern"]:
        """A new key, volume v under it, attached, with a pattern written at
        ``at``, and the detached volumes ``also``: (the key, how messages
        name it, v's disk, the pattern)."""
        key = self.kms.make_key(alias)
        for name in ("v", *also):
            self.create(name, key)
        disk = self.attach("v")
        pat = Pattern()
        pat.write(disk, at)
        return key, self.kms.label(key), disk, pat

    def comes_back(self, name: str, pat: "Pattern") -> None:
        """Volume ``name`` attaches again, its data intact; then it is detached."""
        pat.check(self.attach(name))
        self.detach(name)

    @staticmethod
    def still_serves(disk: Path, pat: "Pattern", at: int) -> None:
        """The attached volume keeps its key in memory: reads and writes go on."""
        pat.write(disk, at)
        pat.check(disk)

    def refuses_new_uses(self, code: int, key: str, words: tuple, attach_words: tuple | None = None) -> str:
        """A new volume x under ``key`` and an attach of volume w are refused
        with ``code`` (and ``words``); the line that refused volume x."""
        line = refused(self.d, code, "volume", "create", "x", "--size", SIZE, "--kms", self.backend, "--key", key,
                       words=words)
        assert not self.d.image("x").exists()
        refused(self.d, code, "attach", "w", words=words if attach_words is None else attach_words)
        assert "w" not in self.attached()
        return line

    def refuses_dump_key(self, code: int, tmp_path: Path, words: tuple = (), within: float | None = None) -> None:
        """`volume dump-key v` is refused with ``code`` and writes no key file."""
        key_file = tmp_path / "v.key"
        refused(self.d, code, "volume", "dump-key", "v", "--key-file", key_file, words=words, within=within)
        assert not key_file.exists()


def guard_holds(kit: Kit, name: str, message: str, reason: str, summary: str) -> None:
    """Every path that would let go of ``name``'s key says ``message``, word
    for word (evscrypt.reattach): detach refuses, `evscrypt stop` refuses and
    the daemon keeps serving, `status` marks the volume; then `detach
    --force` warns with it.  The volume is detached at the end."""
    d = kit.d
    line = refused(d, KEY_STATE, "detach", name)
    assert line == f"evscrypt: error: {message}; use --force to detach anyway", line
    [v] = [v for v in d.status()["volumes"] if v["name"] == name]
    r = v["reattach"]
    assert (r["ok"], r["reason"], r["message"], r["summary"]) == (False, reason, message, summary), r
    assert f"{name}: {message}" in ok(d, "status").stdout and summary in ok(d, "status").stdout
    line = refused(d, KEY_STATE, "stop")
    assert line == (f"evscrypt: error: refusing to stop: 1 attached volume(s) could not be attached again: "
                    f"[{name}] {message}; fix the keys, detach the volumes, or use --force"), line
    assert d.alive and d.disk(name).exists()
    p = kit.detach(name, force=True)
    assert one_line(p.stderr, "evscrypt: warning: ") == f"evscrypt: warning: {message}"


def _kit(request, make_daemon, tmp_path, backend: str, env: dict | None = None) -> Kit:
    moto = request.getfixturevalue("moto_kms") if backend == "aws" else None  # before the daemon copies env
    d = make_daemon(start=False)
    if env:
        d.env.update(env)
    adapter = AwsAdapter(d, moto) if backend == "aws" else LocalAdapter(d, tmp_path)
    adapter.prepare()
    d.start()
    return Kit(d, adapter)


@pytest.fixture(params=["local", "aws"])
def kit(request, make_daemon, tmp_path) -> Kit:
    return _kit(request, make_daemon, tmp_path, request.param)


def _deletion_date(kit: Kit, key: str) -> str:
    """The deletion date as the backend reports it (and messages quote it)."""
    if kit.backend == "local":
        return json.loads(ok(kit.d, "key", "describe", key, "--json").stdout)["deletion_date"]
    return json.loads(ok(kit.d, "key", "describe", "--kms", "aws", key, "--json").stdout)["deletion_date"]


# -- the contract, row by row --------------------------------------------------------
def test_enabled_key_allows_everything(kit: Kit, tmp_path):
    d, kms = kit.d, kit.kms
    key = kms.make_key("k-enabled")
    kit.create("v", key)
    info = kit.info("v")
    assert info["kms"] == kit.backend and info["key_state"] == "Enabled" and info["encrypted"]

    disk = kit.attach("v")
    pat = Pattern()
    pat.write(disk, 0)
    pat.write(disk, 5 * MiB + 4096, 3 * 4096)

    key_file = tmp_path / "v.key"
    p = ok(d, "volume", "dump-key", "v", "--key-file", key_file)
    assert "cryptsetup open" in p.stdout
    assert key_file.stat().st_size == 64 and key_file.stat().st_mode & 0o777 == 0o600

    p = kit.detach("v")
    assert p.stderr == "", p.stderr  # no warning with an Enabled key
    kit.comes_back("v", pat)


def test_disabled_key(kit: Kit, tmp_path):
    d, kms = kit.d, kit.kms
    key, who, disk, pat = kit.key_with_volumes("k-disabled")
    kms.disable(key)
    words = (who, "Disabled")
    kit.refuses_new_uses(KEY_STATE, key, words)
    assert kit.info("v")["key_state"] == "Disabled"
    kit.still_serves(disk, pat, 2 * MiB)
    kit.refuses_dump_key(KEY_STATE, tmp_path, words)

    hint = f"evscrypt key enable {who}" if kit.backend == "local" else "AWS KMS EnableKey"
    message = (f"key {who} is Disabled: once detached, volume v cannot be attached again until the key is "
               f"enabled ({hint})")
    refused(d, KEY_STATE, "detach", "v")
    assert disk.exists()
    pat.write(disk, 3 * MiB)  # still attached and working after the refused detach
    guard_holds(kit, "v", message, "key-disabled", "no (key Disabled)")

    refused(d, KEY_STATE, "attach", "v", words=words)

    kms.enable(key)
    disk = kit.attach("v")
    pat.check(disk)  # including what was written while the key was Disabled
    kit.attach("w")
    kit.detach("v")
    kit.detach("w")


def test_pending_deletion_key(kit: Kit, tmp_path):
    d, kms = kit.d, kit.kms
    key, who, disk, pat = kit.key_with_volumes("k-pending", at=4096)
    when = kms.schedule_deletion(key)
    assert when
    day = when[:10]  # YYYY-MM-DD, however the time part is written
    words = (who, "PendingDeletion", day)
    assert "deletion" in kit.refuses_new_uses(KEY_STATE, key, words)
    kit.still_serves(disk, pat, 6 * MiB)
    kit.refuses_dump_key(KEY_STATE, tmp_path, words)

    date = _deletion_date(kit, key)
    hint = (f"evscrypt key cancel-deletion {who}, then evscrypt key enable {who}" if kit.backend == "local"
            else "AWS KMS CancelKeyDeletion, then EnableKey")
    message = (f"key {who} is PendingDeletion (deletion on {date}): once detached, volume v cannot be attached "
               f"again unless its deletion is cancelled and the key then enabled, before that date ({hint}); "
               f"after it, the data is lost for good")
    guard_holds(kit, "v", message, "key-pending-deletion", f"no (key PendingDeletion, deletion on {date})")

    refused(d, KEY_STATE, "attach", "v", words=words)

    # cancelling a deletion leaves the key Disabled (the AWS model): still refused
    kms.cancel_deletion(key)
    refused(d, KEY_STATE, "attach", "v", words=(who, "Disabled"))
    kms.enable(key)
    kit.comes_back("v", pat)


def test_deleted_or_missing_key(kit: Kit, tmp_path):
    d, kms = kit.d, kit.kms
    key, who, disk, pat = kit.key_with_volumes("k-lost")
    kms.delete_or_lose(key)
    kit.refuses_new_uses(kms.lost_code, key, (who, kms.lost_word), attach_words=(kms.lost_word,))
    kit.still_serves(disk, pat, 7 * MiB)  # the DK in memory outlives its CMK
    kit.refuses_dump_key(kms.lost_code, tmp_path, (kms.lost_word,))

    lost = (f"once detached, volume v can never be attached again; its data is lost for good")
    if kit.backend == "local":
        message, reason, summary = f"key {who} is Deleted: {lost}", "key-deleted", "no (key Deleted)"
    else:  # the key is gone from the KMS: the header's ARN is all there is to name it
        arn = VolumeStore(d.home).header("v").key_id
        message, reason, summary = f"key {arn} no longer exists: {lost}", "key-not-found", "no (key not found)"
    pat.check(disk)
    guard_holds(kit, "v", message, reason, summary)

    refused(d, kms.lost_code, "attach", "v", words=(kms.lost_word,))


def test_kms_goes_away_while_volumes_are_attached(kit: Kit, tmp_path):
    """I/O continues on attached volumes; attach of another volume fails
    cleanly within a bounded time; everything works again once the KMS is
    back, and data written meanwhile is intact after detach and re-attach."""
    d, kms = kit.d, kit.kms
    key = kms.make_key("k-net")
    for name in ("v", "w", "x"):
        kit.create(name, key)
    disks = {n: kit.attach(n) for n in ("v", "x")}
    pats = {n: Pattern() for n in disks}
    for n, disk in disks.items():
        pats[n].write(disk, 0)

    kms.kms_down()
    try:
        for n, disk in disks.items():  # I/O needs no KMS
            pats[n].write(disk, 1 * MiB)
            pats[n].write(disk, 0, 4096)
            pats[n].check(disk)

        refused(d, UNAVAILABLE, "attach", "w", words=kms.unreachable_words, within=UNREACHABLE_BOUND)
        assert "w" not in kit.attached()
        refused(d, UNAVAILABLE, "volume", "create", "y", "--size", SIZE, "--kms", kit.backend, "--key", key,
                within=UNREACHABLE_BOUND)
        assert not d.image("y").exists()
        kit.refuses_dump_key(UNAVAILABLE, tmp_path, within=UNREACHABLE_BOUND)

        # --force detaches even when the key state cannot be checked ...
        kit.detach("x", force=True)
        # ... and the volume then cannot come back until the KMS does
        refused(d, UNAVAILABLE, "attach", "x", within=UNREACHABLE_BOUND)
        pats["v"].write(disks["v"], 2 * MiB)
    finally:
        kms.kms_up()

    kit.attach("w")
    disks["x"] = kit.attach("x")
    pats["x"].check(disks["x"])
    kit.detach("v")
    disks["v"] = kit.attach("v")
    pats["v"].check(disks["v"])
    ok(d, "volume", "dump-key", "v", "--key-file", tmp_path / "v.key")
    for n in ("v", "w", "x"):
        kit.detach(n)



@pytest.mark.parametrize("kit", ["local",
                                 "aws"], indirect=True)
def test_kms_unreachable_detach_needs_force(kit: Kit):
    """With the KMS unreachable, detach cannot know whether the volume will
    attach again: it must refuse without --force and warn with it."""
    d, kms = kit.d, kit.kms
    _, _, disk, pat = kit.key_with_volumes("k-detach", also=())

    kms.kms_down()
    try:
        p, took = run(d, "detach", "v")
        assert took < UNREACHABLE_BOUND
        assert p.returncode == KEY_STATE, (p.returncode, p.stdout, p.stderr)
        line = one_line(p.stderr, "evscrypt: error: ")
        assert "--force" in line and "attach again" in line
        assert disk.exists()
        pat.write(disk, MiB)

        p = kit.detach("v", force=True)
        warning = one_line(p.stderr, "evscrypt: warning: ")
        assert "attach again" in warning
        who = VolumeStore(d.home).header("v").key_id  # the KMS cannot name it: the header's key id
        assert line.startswith(f"evscrypt: error: cannot check key state of {who} (")
        assert line.endswith("): once detached, volume v may not attach again; use --force to detach anyway")
        assert warning.startswith(f"evscrypt: warning: cannot check key state of {who} (")
    finally:
        kms.kms_up()
    kit.comes_back("v", pat)


def test_wrapped_dk_copied_into_another_header_does_not_unwrap(kit: Kit, tmp_path):
    """The encryption context binds a wrapped DK to its volume (uuid, name)."""
    d, kms = kit.d, kit.kms
    key = kms.make_key("k-ctx")
    kit.create("v1", key)
    kit.create("v2", key)
    store = VolumeStore(d.home)
    h1 = store.header("v1")
    assert h1.encryption_context == encryption_context(h1.uuid, "v1")
    op = store.open("v2", write=True)
    try:
        h2 = op.header
        assert h2.encryption_context == encryption_context(h2.uuid, "v2")
        assert h2.wrapped_dk != h1.wrapped_dk
        h2.wrapped_dk = h1.wrapped_dk
        hdr.store(op.fd, h2, op.loaded)
    finally:
        op.close()

    refused(d, BAD_CIPHERTEXT, "attach", "v2", words=("wrapped data key",))
    refused(d, BAD_CIPHERTEXT, "volume", "dump-key", "v2", "--key-file", tmp_path / "v2.key")
    assert not (tmp_path / "v2.key").exists()

    # copying the donor's encryption context along does not help: the context
    # for unwrapping is built from v2's catalog entry, not read from the header
    op = store.open("v2", write=True)
    try:
        h2 = op.header
        h2.encryption_context = dict(h1.encryption_context)
        hdr.store(op.fd, h2, op.loaded)
    finally:
        op.close()
    refused(d, BAD_CIPHERTEXT, "attach", "v2", words=("wrapped data key",))

    # a wrapped DK made under another key does not unwrap under this one
    other = kms.make_key("k-other")
    kit.create("v3", other)
    op = store.open("v3", write=True)
    try:
        h3 = op.header
        h3.wrapped_dk = h1.wrapped_dk
        hdr.store(op.fd, h3, op.loaded)
    finally:
        op.close()
    p, _ = run(d, "attach", "v3")
    # local: InvalidCiphertext (16); moto answers AccessDenied (15) where AWS
    # itself answers IncorrectKeyException
    assert p.returncode in ((BAD_CIPHERTEXT,) if kit.backend == "local" else (BAD_CIPHERTEXT, DENIED)), p
    one_line(p.stderr, "evscrypt: error: ")
    assert not {"v2", "v3"} & kit.attached()

    kit.attach("v1")  # the donor is unaffected
    kit.detach("v1")


# -- backend specifics -----------------------------------------------------------------
def test_local_deleted_on_use_without_purge(make_daemon, tmp_path, request):
    """A key whose deletion date has passed is Deleted at its next use, even
    if nobody ran `key purge-due`."""
    kit = _kit(request, make_daemon, tmp_path, "local")
    d, kms = kit.d, kit.kms
    key = kms.make_key("k-due")
    kit.create("v", key)
    kms.schedule_deletion(key)
    kms.make_due(key)
    refused(d, KEY_STATE, "attach", "v", words=(key, "Deleted", "lost"))
    assert json.loads(ok(d, "key", "describe", key, "--json").stdout)["state"] == "Deleted"
    assert kit.info("v")["key_state"] == "Deleted"


def test_aws_blackholed_endpoint_with_small_timeouts(make_daemon, tmp_path, request):
    """An endpoint that accepts connections and never answers: attach fails
    with 14 within the configured timeouts, I/O goes on, attach works again
    once the endpoint answers."""
    kit = _kit(request, make_daemon, tmp_path, "aws",
               env={"EVSCRYPT_AWS_CONNECT_TIMEOUT": "1", "EVSCRYPT_AWS_READ_TIMEOUT": "1"})
    d, kms, moto = kit.d, kit.kms, kit.kms.moto
    key, _, disk, pat = kit.key_with_volumes("k-hole")

    moto.blackhole()
    try:
        pat.write(disk, 3 * MiB)
        pat.check(disk)
        refused(d, UNAVAILABLE, "attach", "w", words=("unreachable",), within=BLACKHOLE_BOUND)
        assert "w" not in kit.attached()
        refused(d, UNAVAILABLE, "volume", "create", "y", "--size", SIZE, "--kms", "aws", "--key", key,
                within=BLACKHOLE_BOUND)
        pat.write(disk, 4 * MiB)
    finally:
        moto.up()
    assert moto.proxy.connections > 0

    kit.attach("w")
    kit.detach("v")
    kit.comes_back("v", pat)
    kit.detach("w")


def test_aws_header_records_key_arn_and_context(moto_kms, make_daemon, tmp_path):
    d = make_daemon(start=False)  # CLI only
    meta = moto_kms.create_key("alias/hdr", description="header test")
    # the key may be named by alias, id or ARN; the header always records the ARN
    for name, ref in (("v", "alias/hdr"), ("v-id", meta["KeyId"]), ("v-arn", meta["Arn"])):
        ok(d, "volume", "create", name, "--size", SIZE, "--kms", "aws", "--key", ref)
        info = json.loads(ok(d, "volume", "info", name, "--json").stdout)
        assert info["kms"] == "aws"
        assert info["key_id"].startswith("arn:aws:kms:") and info["key_id"] == meta["Arn"]
        assert info["key_state"] == "Enabled" and info["key_alias"] == "alias/hdr"
        h = VolumeStore(d.home).header(name)
        assert h.kms_backend == "aws" and h.key_id == meta["Arn"]
        assert h.uuid == info["uuid"]
        assert h.encryption_context == {"evscrypt:volume-uuid": h.uuid, "evscrypt:volume-name": name}

    # the wrapped DK really is a KMS ciphertext bound to that context, and it
    # is the key the header MAC was made with
    h = VolumeStore(d.home).header("v")
    plain = bytearray(moto_kms.client.decrypt(CiphertextBlob=h.wrapped_dk, EncryptionContext=h.encryption_context,
                                              KeyId=meta["Arn"])["Plaintext"])
    assert len(plain) == 64
    with Secret.from_buffer(plain, wipe_source=True) as dk:
        hdr.verify(h, dk)
    from botocore.exceptions import ClientError
    with pytest.raises(ClientError, match="InvalidCiphertext"):
        moto_kms.client.decrypt(CiphertextBlob=h.wrapped_dk, KeyId=meta["Arn"],
                                EncryptionContext=encryption_context(h.uuid, "other"))

    refused(d, INVALID_ARGUMENT, "volume", "create", "nokey", "--size", SIZE, "--kms", "aws", words=("--key",))
    refused(d, NOT_FOUND_KEY, "volume", "create", "nokey", "--size", SIZE, "--kms", "aws", "--key", "alias/nope",
            words=("alias/nope", "not found"))
    assert not d.image("nokey").exists()


def test_aws_missing_credentials_is_access_denied(moto_kms, make_daemon, tmp_path):
    d = make_daemon(start=False)
    moto_kms.create_key("alias/creds")
    ok(d, "volume", "create", "v", "--size", SIZE, "--kms", "aws", "--key", "alias/creds")  # with credentials
    d.env = no_credentials_env(d.env)
    d.start()  # the daemon has no credentials either
    words = ("no AWS credentials found", "AWS_ACCESS_KEY_ID")
    refused(d, DENIED, "attach", "v", words=words, within=UNREACHABLE_BOUND)
    refused(d, DENIED, "volume", "create", "w", "--size", SIZE, "--kms", "aws", "--key", "alias/creds",
            words=words, within=UNREACHABLE_BOUND)
    refused(d, DENIED, "volume", "dump-key", "v", "--key-file", tmp_path / "v.key", words=words)
    refused(d, DENIED, "key", "list", "--kms", "aws", words=words)
    refused(d, DENIED, "key", "describe", "--kms", "aws", "alias/creds", words=words)
    assert not (tmp_path / "v.key").exists() and not d.image("w").exists()


def test_aws_key_list_and_describe_show_states(moto_kms, make_daemon):
    d = make_daemon(start=False)
    on = moto_kms.create_key("alias/on", description="stays on")
    off = moto_kms.create_key("alias/off")
    gone = moto_kms.create_key("alias/gone")
    bare = moto_kms.create_key()  # no alias
    moto_kms.disable("alias/off")
    when = moto_kms.schedule_deletion("alias/gone", 7)

    keys = json.loads(ok(d, "key", "list", "--kms", "aws", "--json").stdout)
    by_id = {k["key_id"]: k for k in keys}
    assert set(by_id) == {on["KeyId"], off["KeyId"], gone["KeyId"], bare["KeyId"]}
    assert by_id[on["KeyId"]]["state"] == "Enabled" and by_id[on["KeyId"]]["alias"] == "alias/on"
    assert by_id[on["KeyId"]]["description"] == "stays on"
    assert by_id[off["KeyId"]]["state"] == "Disabled" and by_id[off["KeyId"]]["alias"] == "alias/off"
    assert by_id[gone["KeyId"]]["state"] == "PendingDeletion"
    assert by_id[gone["KeyId"]]["deletion_date"][:10] == when.isoformat()[:10]
    assert by_id[bare["KeyId"]]["alias"] is None and by_id[bare["KeyId"]]["state"] == "Enabled"
    assert all(k["backend"] == "aws" and k["arn"].startswith("arn:aws:kms:") for k in keys)

    table = ok(d, "key", "list", "--kms", "aws").stdout
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "Disabled" in rows["alias/off"] and "PendingDeletion" in rows["alias/gone"]
    assert "Enabled" in rows["alias/on"]

    desc = json.loads(ok(d, "key", "describe", "--kms", "aws", "alias/gone", "--json").stdout)
    assert desc["state"] == "PendingDeletion" and desc["key_id"] == gone["KeyId"]
    assert desc["arn"] == gone["Arn"] and desc["alias"] == "alias/gone" and desc["backend"] == "aws"
    assert desc["deletion_date"][:10] == when.isoformat()[:10]
    desc = json.loads(ok(d, "key", "describe", "--kms", "aws", off["Arn"], "--json").stdout)
    assert desc["state"] == "Disabled" and desc["alias"] == "alias/off"
    assert "state:" in ok(d, "key", "describe", "--kms", "aws", "alias/on").stdout

    refused(d, NOT_FOUND_KEY, "key", "describe", "--kms", "aws", "alias/missing", words=("alias/missing", "not found"))
    moto_kms.down()
    try:
        refused(d, UNAVAILABLE, "key", "list", "--kms", "aws", words=("unreachable",), within=UNREACHABLE_BOUND)
        refused(d, UNAVAILABLE, "key", "describe", "--kms", "aws", "alias/on", within=UNREACHABLE_BOUND)
    finally:
        moto_kms.up()


def test_aws_lifecycle_commands_are_refused(moto_kms, make_daemon):
    d = make_daemon(start=False)
    moto_kms.create_key("alias/life")
    for args in (("disable", "alias/life"), ("enable", "alias/life"), ("schedule-deletion", "alias/life"),
                 ("cancel-deletion", "alias/life"), ("create", "newkey"), ("purge-due",)):
        refused(d, INVALID_ARGUMENT, "key", *args, "--kms", "aws",
                words=("manage the lifecycle of aws keys", "own tools"))
    assert moto_kms.state("alias/life") == "Enabled"
    assert len(moto_kms.client.list_keys()["Keys"]) == 1



class _Gateway(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's current (status, body)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        code, ctype, body = self.server.reply
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_gateway(monkeypatch):
    """An HTTP endpoint on 127.0.0.1 that answers KMS calls with server errors,
    like a load balancer or VPC endpoint whose KMS backend is down."""
    srv = http.server.ThreadingHTTPServer((HOST, 0), _Gateway)
    srv.daemon_threads = True
    srv.reply = (503, "text/html", b"<html><body>503 Service Unavailable</body></html>")
    t = threading.Thread(target=srv.serve_forever, name="kms-gateway", daemon=True)
    t.start()
    set_aws_env(monkeypatch, f"http://{HOST}:{srv.server_port}")
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)


def test_aws_server_errors_mean_kms_unavailable(failing_gateway, make_daemon):
    d = make_daemon(start=False)  # CLI only
    replies = [
        (503, "text/html", b"<html><body>503 Service Unavailable</body></html>"),
        (502, "text/plain", b"Bad Gateway"),
        (500, "application/x-amz-json-1.1", b'{"__type":"InternalFailure","message":"internal failure"}'),
        (503, "application/x-amz-json-1.1", b'{"__type":"ServiceUnavailableException","message":"try later"}'),
    ]
    codes = {}
    for reply in replies:
        failing_gateway.reply = reply
        p, took = run(d, "key", "describe", "--kms", "aws", "alias/gw")
        one_line(p.stderr, "evscrypt: error: ")
        assert took < UNREACHABLE_BOUND
        codes[reply[0], reply[2][:40]] = (p.returncode, p.stderr.strip())
    assert all(rc == UNAVAILABLE for rc, _ in codes.values()), codes



def test_status_answers_within_one_kms_timeout_while_kms_blackholed(make_daemon, tmp_path, request):
    """`status` is the liveness check: a silent KMS must not make it take one
    KMS timeout per attached volume."""
    timeout = 8  # one KMS call into the blackhole takes this long
    kit = _kit(request, make_daemon, tmp_path, "aws",
               env={"EVSCRYPT_AWS_CONNECT_TIMEOUT": "1", "EVSCRYPT_AWS_READ_TIMEOUT": str(timeout),
                    "EVSCRYPT_AWS_MAX_ATTEMPTS": "1"})
    d, kms, moto = kit.d, kit.kms, kit.kms.moto
    key = kms.make_key("k-status")
    names = ["s0", "s1", "s2", "s3"]
    for n in names:
        kit.create(n, key)
        kit.attach(n)
    moto.blackhole()
    try:
        p, took = run(d, "status", "--json")
        assert p.returncode == OK, p
        states = {v["name"]: v["key_state"] for v in json.loads(p.stdout)["volumes"]}
        assert set(states) == set(names)
        # one KMS timeout per volume, one after the other, would be 32 s; even
        # a single one would be 8 s: status answers after its own deadline
        # (3 s) instead, with room for a busy machine's start-up of the CLI
        assert took < timeout, f"status took {took:.1f} s; one KMS call takes {timeout} s"
    finally:
        moto.up()
