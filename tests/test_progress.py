"""Long operations show click's progress bar on a terminal, and nothing on a
pipe (scripts and logs stay clean)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

EVSCRYPT = str(Path(sys.executable).parent / "evscrypt")


def run(env, *args, tty: bool) -> tuple[int, str]:
    if not tty:
        p = subprocess.run([EVSCRYPT, *map(str, args)], env=env, capture_output=True, text=True, timeout=60)
        return p.returncode, p.stderr
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([EVSCRYPT, *map(str, args)], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        out = bytearray()
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        return p.wait(60), out.decode(errors="replace")
    finally:
        os.close(master)


def test_progress_bar_on_a_terminal_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVSCRYPT_")}
    env["EVSCRYPT_HOME"] = str(tmp_path / "home")
    env["EVSCRYPT_RUNTIME_DIR"] = str(tmp_path / "run")  # no daemon: the volume is detached
    assert run(env, "volume", "create", "v", "--size", "64M", tty=False)[0] == 0
    rc, err = run(env, "backup", "create", "v", tmp_path / "bk", tty=True)
    assert rc == 0 and "backing up v" in err and "100%" in err, err
    rc, err = run(env, "backup", "create", "v", tmp_path / "bk", tty=False)
    assert rc == 0 and err == ""
    rc, err = run(env, "snapshot", "create", "v", "s", tty=True)
    assert rc == 0 and "copying v" in err, err
    rc, err = run(env, "volume", "create", "c", "--from-snapshot", "s", tty=False)
    assert rc == 0 and err == ""
