"""Offline under the lock, else the daemon (evscrypt.offline): the one choice
that `volume resize`, `snapshot create`, `image create` and `backup create`
make between working on a volume here and asking the daemon that holds it."""

from __future__ import annotations

import pytest

from daemon_fixture import daemon, make_daemon  # noqa: F401  (fixtures are used by name)
from evscrypt import errors
from evscrypt.cli.root import main
from evscrypt.offline import ATTEMPTS, offline_or_daemon
from evscrypt.volumes import VolumeStore


class Script:
    """``offline()`` and ``daemon()`` that answer from a list, and the calls made."""

    def __init__(self, offline: list, daemon: list):
        self.answers = {"offline": list(offline), "daemon": list(daemon)}
        self.calls: list[str] = []

    def _next(self, side: str):
        self.calls.append(side)
        a = self.answers[side].pop(0)
        if isinstance(a, BaseException):
            raise a
        return a

    def offline(self):
        return self._next("offline")

    def daemon(self):
        return self._next("daemon")


BUSY = errors.Busy("volume 'v' is attached")
GONE = errors.NotFound("volume 'v' is not attached")


def test_a_detached_volume_is_used_offline():
    s = Script(["here"], [])
    assert offline_or_daemon("v", s.offline, s.daemon) == "here"
    assert s.calls == ["offline"]


def test_an_attached_volume_goes_to_the_daemon():
    s = Script([BUSY], ["there"])
    assert offline_or_daemon("v", s.offline, s.daemon) == "there"
    assert s.calls == ["offline", "daemon"]


def test_without_a_daemon_busy_is_the_answer():
    s = Script([BUSY], [])
    with pytest.raises(errors.Busy) as e:
        offline_or_daemon("v", s.offline, None)
    assert e.value is BUSY and s.calls == ["offline"]


def test_detached_in_between_is_tried_offline_again():
    s = Script([BUSY, "here"], [GONE])
    assert offline_or_daemon("v", s.offline, s.daemon) == "here"
    assert s.calls == ["offline", "daemon", "offline"]


def test_a_lock_nobody_here_holds_gives_up_after_a_few_tries():
    s = Script([BUSY] * ATTEMPTS, [GONE] * ATTEMPTS)
    with pytest.raises(errors.Busy, match="locked, but not by this host's daemon; try again later"):
        offline_or_daemon("v", s.offline, s.daemon)
    assert s.calls == ["offline", "daemon"] * ATTEMPTS


def test_a_daemon_that_does_not_answer_makes_the_volume_busy():
    s = Script([BUSY], [errors.DaemonUnavailable("the evscrypt daemon is not running")])
    with pytest.raises(errors.Busy, match=r"volume 'v' is locked but the daemon does not answer "
                                          r"\(the evscrypt daemon is not running\)"):
        offline_or_daemon("v", s.offline, s.daemon)


@pytest.mark.parametrize("error", [errors.NotFound("volume 'v' not found"), errors.StorageError("disk on fire")],
                         ids=["missing", "storage"])
def test_other_errors_of_offline_pass_through(error):
    s = Script([error], [])
    with pytest.raises(type(error)) as e:
        offline_or_daemon("v", s.offline, s.daemon)
    assert e.value is error and s.calls == ["offline"]


def test_other_errors_of_the_daemon_pass_through():
    error = errors.KeyStateError("key Disabled")
    s = Script([BUSY], [error])
    with pytest.raises(errors.KeyStateError) as e:
        offline_or_daemon("v", s.offline, s.daemon)
    assert e.value is error and s.calls == ["offline", "daemon"]


# -- the commands that use it ----------------------------------------------------------
COMMANDS = {
    "volume resize": ["volume", "resize", "v", "--size", "2M"],
    "snapshot create": ["snapshot", "create", "v", "s"],
    "image create": ["image", "create", "i", "--from-volume", "v"],
    "backup create": ["backup", "create", "v", "{tmp}/backups"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_locked_volume_without_a_daemon(command, home, tmp_path, monkeypatch, capsys):
    """The volume is locked (here: by this test) and no daemon answers: Busy,
    one line, and nothing made."""
    monkeypatch.setenv("EVSCRYPT_RUNTIME_DIR", str(tmp_path / "no-daemon"))
    assert main(["--home", str(home), "volume", "create", "v", "--size", "1M"]) == 0
    args = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    with VolumeStore(home).engine("v"):
        capsys.readouterr()
        rc = main(["--home", str(home), *args])
    err = capsys.readouterr().err
    assert rc == errors.Busy.exit_code, err
    assert err == ("evscrypt: error: volume 'v' is locked but the daemon does not answer (the evscrypt daemon "
                   f"is not running (no socket at {tmp_path / 'no-daemon' / 'control.sock'}))\n")
    assert VolumeStore(home).header("v").size == 1 << 20
    assert not (home / "snapshots" / "s").exists() and not (home / "images" / "i").exists()


@pytest.mark.fuse
@pytest.mark.parametrize("command", list(COMMANDS))
def test_locked_volume_the_daemon_does_not_hold(command, daemon, tmp_path):
    """The daemon answers, but the volume is not attached there: it is locked
    by someone else.  Each command tries both ways a few times, then says so."""
    d = daemon
    d.cli("volume", "create", "v", "--size", "1M")
    args = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    with VolumeStore(d.home).engine("v"):
        p = d.cli(*args, check=False)
    assert p.returncode == errors.Busy.exit_code, p.stderr
    assert p.stderr == "evscrypt: error: volume 'v' is locked, but not by this host's daemon; try again later\n"
    assert d.status()["volumes"] == []
    d.cli("snapshot", "create", "v", "s")  # and once the lock is gone, it works
