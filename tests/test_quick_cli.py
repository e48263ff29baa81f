"""`evscrypt attach NAME` / `detach NAME` take a quick path without click
(evscrypt/entry.py).  It must answer exactly like the full CLI: same output,
same messages, same exit codes; and anything with an option must still go to
the full CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from daemon_fixture import EVSCRYPT, daemon, make_daemon  # noqa: F401  (fixtures used by name)
from evscrypt import entry

pytestmark = pytest.mark.fuse


def quick(d, *args: str) -> subprocess.CompletedProcess:
    """The installed `evscrypt` program: the quick path for attach/detach NAME."""
    return subprocess.run([EVSCRYPT, *args], env=d.env, capture_output=True, text=True, timeout=60)


def full(d, *args: str) -> subprocess.CompletedProcess:
    """The click CLI, always (evscrypt.cli.root.main)."""
    code = "import sys; from evscrypt.cli.root import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=d.env, capture_output=True, text=True,
                          timeout=60)


def same(a: subprocess.CompletedProcess, b: subprocess.CompletedProcess) -> tuple:
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
    return a.returncode, a.stdout, a.stderr


def test_quick_path_is_taken_only_for_bare_attach_and_detach(monkeypatch):
    calls = []
    monkeypatch.setattr(entry, "QUICK", {"attach": lambda rt, n: calls.append(("attach", n)),
                                         "detach": lambda rt, n: calls.append(("detach", n))})
    monkeypatch.delenv("EVSCRYPT_DEBUG", raising=False)
    assert entry.quick(["attach", "v1"]) == 0 and entry.quick(["detach", "v1"]) == 0
    assert calls == [("attach", "v1"), ("detach", "v1")]
    for argv in (["attach"], ["attach", "v1", "--mount", "/mnt"], ["attach", "--help"], ["detach", "--force"],
                 ["detach", "v1", "--force"], ["--home", "/x", "attach", "v1"], ["status"], [],
                 ["volume", "list"], ["attach", "-h"]):
        assert entry.quick(argv) is None, argv
    monkeypatch.setenv("EVSCRYPT_DEBUG", "1")
    assert entry.quick(["attach", "v1"]) is None  # --debug output comes from the full CLI
    assert len(calls) == 2


def test_quick_and_full_answer_alike(daemon):
    d = daemon
    # the daemon is not running: same message and exit code
    d.stop()
    rc, out, err = same(quick(d, "attach", "v"), full(d, "attach", "v"))
    assert rc == 19 and out == "" and "daemon is not running" in err
    d.start()
    d.cli("volume", "create", "v", "--size", "16M")
    # attach: the disk path on stdout, nothing else
    a = quick(d, "attach", "v")
    assert a.returncode == 0 and a.stderr == "" and a.stdout.strip().endswith("/disks/v")
    # attaching an attached volume again answers with its path, from both
    rc, out, err = same(quick(d, "attach", "v"), full(d, "attach", "v"))
    assert (rc, out, err) == (0, a.stdout, "")
    # detach, then detach again: the same answers
    assert quick(d, "detach", "v").stdout == "detached v\n"
    rc, out, err = same(quick(d, "detach", "v"), full(d, "detach", "v"))
    assert rc == 4 and "is not attached" in err
    # the full CLI attaches the same way
    b = full(d, "attach", "v")
    assert (b.returncode, b.stdout, b.stderr) == (a.returncode, a.stdout, a.stderr)
    assert full(d, "detach", "v").stdout == "detached v\n"
    # no such volume
    rc, out, err = same(quick(d, "attach", "nosuch"), full(d, "attach", "nosuch"))
    assert rc == 4 and err == "evscrypt: error: volume 'nosuch' not found\n"
    # a name that is not a valid volume name
    rc, out, err = same(quick(d, "attach", "bad/name"), full(d, "attach", "bad/name"))
    assert rc != 0 and err.startswith("evscrypt: error: ")


def test_options_still_reach_the_full_cli(daemon):
    d = daemon
    p = quick(d, "attach", "--help")
    assert p.returncode == 0 and "--mount" in p.stdout
    p = quick(d, "attach", "v", "--mkfs", "ext4")
    assert p.returncode == 2 and "--mkfs needs --mount" in p.stderr
