"""Where evscrypt keeps its state and its runtime files.

State (images, keystore): ``--home`` or ``EVSCRYPT_HOME``; by default
``/var/lib/evscrypt`` for root and ``~/.local/share/evscrypt`` otherwise.
Runtime (control socket, FUSE mount): ``EVSCRYPT_RUNTIME_DIR``; by default
``/run/evscrypt`` for root and ``$XDG_RUNTIME_DIR/evscrypt`` otherwise.
"""

from __future__ import annotations

import os

# pathlib (and typing, for its annotations) is imported only inside the
# functions that build a pathlib.Path: the quick CLI path (evscrypt.entry)
# uses only the string functions, and these imports are a visible share of
# its start-up.  So the Path functions carry their type in the docstring.


def default_home():
    """The state directory (a pathlib.Path)."""
    from pathlib import Path

    env = os.environ.get("EVSCRYPT_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/evscrypt")
    return Path(os.path.expanduser("~/.local/share/evscrypt"))


def runtime_dir_name() -> str:
    """The runtime directory as a plain string (see :func:`default_runtime_dir`)."""
    env = os.environ.get("EVSCRYPT_RUNTIME_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/evscrypt"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "evscrypt")
    return f"/tmp/evscrypt-{os.getuid()}"


def default_runtime_dir():
    """The runtime directory (a pathlib.Path)."""
    from pathlib import Path

    return Path(runtime_dir_name())


#: The control socket's name inside the runtime directory.
SOCKET_NAME = "control.sock"


def socket_path(runtime):
    """The control socket in ``runtime`` (a pathlib.Path)."""
    return runtime / SOCKET_NAME


def socket_name(runtime: str) -> str:
    """:func:`socket_path` for a plain string: the quick CLI path
    (evscrypt.entry) uses strings so that it need not import pathlib."""
    return os.path.join(runtime, SOCKET_NAME)


def disks_dir(runtime):
    """The FUSE mount point in ``runtime`` (a pathlib.Path)."""
    return runtime / "disks"
