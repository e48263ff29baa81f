"""Stopping the daemon keeps the detach guard: `evscrypt stop` refuses while
an attached volume could not be attached again (and the daemon serves on,
I/O unaffected), `stop --force` stops with one warning per such volume, and
SIGTERM/SIGINT, which cannot be refused, log one WARNING per such volume
before the key is wiped."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from daemon_fixture import daemon, is_mounted, make_daemon, needs_fio  # noqa: F401  (fixtures by name)

pytestmark = pytest.mark.fuse

KEY_STATE, DAEMON_UNAVAILABLE = 12, 19


def io_counters(d, name: str) -> dict:
    for v in d.client().status()["volumes"]:
        if v["name"] == name:
            return v["io"]
    raise AssertionError(f"{name} is not attached")


def wait_for_io(d, name: str, fio: subprocess.Popen, reads: int, writes: int) -> dict:
    """Wait (for events: the daemon's own counters) until volume ``name``
    has served more than ``reads`` reads and ``writes`` writes."""
    while True:
        io = io_counters(d, name)
        if io["reads"] > reads and io["writes"] > writes:
            return io
        assert fio.poll() is None, fio.communicate()
        time.sleep(0.05)


def disabled_message(key: str, volume: str) -> str:
    return (f"key {key} is Disabled: once detached, volume {volume} cannot be attached again until the key is "
            f"enabled (evscrypt key enable {key})")


@needs_fio
@pytest.mark.timeout(240)
def test_stop_refused_then_io_goes_on_then_stop_force(daemon, tmp_path):
    d = daemon
    d.cli("key", "create", "k")
    d.cli("volume", "create", "v", "--size", "32M", "--key", "k")
    d.cli("volume", "create", "w", "--size", "8M")  # under evs/default: no reason to refuse
    disk = d.attach("v")
    d.attach("w")
    # random writes, each verified soon after (verify_backlog), until told to stop
    fio = subprocess.Popen(
        ["fio", "--output-format=json", "--verify_state_save=0", "--fallocate=none", "--name=go-on",
         f"--filename={disk}", "--ioengine=libaio", "--direct=1", "--iodepth=8", "--rw=randwrite", "--bs=4k",
         "--verify=crc32c", "--verify_backlog=32", "--verify_fatal=1", "--size=32M", "--time_based",
         "--runtime=600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        io = wait_for_io(d, "v", fio, 0, 0)
        d.cli("key", "disable", "k")

        p = d.cli("stop", check=False)
        assert p.returncode == KEY_STATE and p.stdout == "", (p.returncode, p.stdout, p.stderr)
        assert p.stderr == (f"evscrypt: error: refusing to stop: 1 attached volume(s) could not be attached "
                            f"again: [v] {disabled_message('k', 'v')}; fix the keys, detach the volumes, "
                            f"or use --force\n")
        p = d.cli("stop", "--json", check=False)
        assert p.returncode == KEY_STATE
        out = json.loads(p.stdout)
        assert out["stopped"] is False and out["error"]["exit_code"] == KEY_STATE
        assert [(b["volume"], b["reason"], b["message"]) for b in out["blocked"]] == [
            ("v", "key-disabled", disabled_message("k", "v"))]

        # the daemon serves on: fio's writes and verifying reads keep flowing
        assert d.alive and d.disk("v").exists() and d.disk("w").exists()
        wait_for_io(d, "v", fio, io["reads"], io["writes"])
        fio.send_signal(signal.SIGINT)
        out, err = fio.communicate(timeout=60)
        job = json.loads(out[out.index("{"):])["jobs"][0]
        assert job["error"] == 0, (job["error"], err)
        assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0  # the reads are the verification
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()

    p = d.cli("stop", "--force", "--json")
    r = json.loads(p.stdout)
    assert r["stopped"] is True and sorted(r["detached"]) == ["v", "w"] and r["pid"] == d.pid
    assert r["warnings"] == [disabled_message("k", "v")]
    assert p.stderr == f"evscrypt: warning: {disabled_message('k', 'v')}\n"
    # `stop` returns once the daemon has exited: by itself, cleanly, unmounted
    assert not d.alive and d.wait() == 0
    assert not is_mounted(d.mountpoint)
    warned = [ln for ln in d.log.splitlines() if " WARNING " in ln]
    assert len(warned) == 1 and warned[0].endswith(
        f"volume v: {disabled_message('k', 'v')}; stopping anyway (evscrypt stop --force)"), warned
    assert "Traceback" not in d.log


def test_stop_with_nothing_in_the_way(daemon):
    d = daemon
    d.cli("volume", "create", "c", "--size", "8M")
    d.attach("c")
    p = d.cli("stop")
    assert p.stdout == f"stopped the daemon (pid {d.pid}); detached 1 volume(s): c\n" and p.stderr == ""
    assert d.wait() == 0 and not is_mounted(d.mountpoint)
    assert "detached c; key wiped" in d.log and " WARNING " not in d.log
    p = d.cli("stop", check=False)
    assert p.returncode == DAEMON_UNAVAILABLE and "not running" in p.stderr
    p = d.cli("stop", "--json", check=False)
    assert p.returncode == DAEMON_UNAVAILABLE
    assert json.loads(p.stdout)["error"]["type"] == "DaemonUnavailable"
    # and it starts again, its volumes intact
    d.start()
    d.attach("c")
    d.cli("stop")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_cannot_be_refused_and_warns_per_volume(daemon, sig):
    d = daemon
    for k in ("k1", "k2"):
        d.cli("key", "create", k)
    d.cli("volume", "create", "a", "--size", "8M", "--key", "k1")
    d.cli("volume", "create", "b", "--size", "8M", "--key", "k2")
    d.cli("volume", "create", "c", "--size", "8M")
    for n in ("a", "b", "c"):
        d.attach(n)
    d.cli("key", "disable", "k1")
    d.cli("key", "schedule-deletion", "k2", "--days", "7")
    date = json.loads(d.cli("key", "describe", "k2", "--json").stdout)["deletion_date"]
    pending = (f"key k2 is PendingDeletion (deletion on {date}): once detached, volume b cannot be attached again "
               f"unless its deletion is cancelled and the key then enabled, before that date (evscrypt key "
               f"cancel-deletion k2, then evscrypt key enable k2); after it, the data is lost for good")

    d.signal(sig)
    assert d.wait() == 0
    lines = d.log.splitlines()
    warned = [ln for ln in lines if " WARNING " in ln]
    name = signal.Signals(sig).name
    assert len(warned) == 2, warned
    assert warned[0].endswith(f"WARNING evscrypt.manager: volume a: {disabled_message('k1', 'a')}; "
                              f"detaching it anyway: the daemon is stopping ({name})"), warned[0]
    assert warned[1].endswith(f"WARNING evscrypt.manager: volume b: {pending}; detaching it anyway: the daemon "
                              f"is stopping ({name})"), warned[1]
    # each warning comes before its key is wiped
    for n, w in (("a", warned[0]), ("b", warned[1])):
        assert lines.index(w) < lines.index(next(ln for ln in lines if ln.endswith(f"detached {n}; key wiped")))
    assert not is_mounted(d.mountpoint)
