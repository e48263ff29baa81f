"""Where evscrypt keeps its state and its runtime files.

State (images, keystore): ``--home`` or ``EVSCRYPT_HOME``; by default
``/var/lib/evscrypt`` for root and ``~/.local/share/evscrypt`` otherwise.
Runtime (control socket, FUSE mount): ``EVSCRYPT_RUNTIME_DIR``; by default
``/run/evscrypt`` for root and ``$XDG_RUNTIME_DIR/evscrypt`` otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    env = os.environ.get("EVSCRYPT_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/evscrypt")
    return Path(os.path.expanduser("~/.local/share/evscrypt"))


def default_runtime_dir() -> Path:
    env = os.environ.get("EVSCRYPT_RUNTIME_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/evscrypt")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "evscrypt"
    return Path(f"/tmp/evscrypt-{os.getuid()}")


def socket_path(runtime: Path) -> Path:
    return runtime / "control.sock"


def disks_dir(runtime: Path) -> Path:
    return runtime / "disks"
