"""What every command group shares: the context object, sizes, output."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .. import client
from ..errors import InvalidArgument, NotFound, PermissionDenied
from .core import warn  # noqa: F401  (one place for the warning format)
from ..paths import default_runtime_dir, socket_path

if TYPE_CHECKING:
    from ..volumes import VolumeStore

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'10G', '512M', '1.5T', '4096' -> bytes (binary units)."""
    m = _SIZE.fullmatch(text or "")
    if not m or len(text) > 40:
        raise InvalidArgument(f"invalid size {text!r}: write it like 10G, 512M or 4096")
    from fractions import Fraction  # here, not at the top: start-up time of every command

    n = Fraction(m.group(1)) * _UNITS[m.group(2).upper()]  # exact: no float rounding
    if n.denominator != 1:
        raise InvalidArgument(f"invalid size {text!r}: not a whole number of bytes")
    return int(n)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class Env:
    """The per-invocation context: where state lives, lazily opened stores."""

    home: Path
    debug: bool = False
    runtime: Path = field(default_factory=default_runtime_dir)
    store_spec: str | None = None  # --store / EVSCRYPT_STORE (evscrypt.store.chosen)
    _store: "VolumeStore | None" = None

    @property
    def daemon(self) -> client.Client:
        """The control socket of this runtime directory's daemon."""
        return client.Client(socket_path(self.runtime))

    @property
    def store(self) -> "VolumeStore":
        if self._store is None:
            from ..volumes import VolumeStore  # heavy: only commands that need it pay

            self._store = VolumeStore(self.home, self.store_spec)
        return self._store


pass_env = click.make_pass_decorator(Env)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def table(rows: list[list], headers: list[str]) -> None:
    if not rows:
        return
    cols = [headers] + [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    for r in cols:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())




def encryption_wanted(encrypt: bool, no_encrypt: bool, kms: str | None, key: str | None) -> bool | None:
    """--encrypt and --no-encrypt are two flags, not click's flag pair, whose
    last word would silently win: contradictions are usage errors.  None:
    neither was given."""
    if encrypt and no_encrypt:
        raise click.UsageError("--encrypt and --no-encrypt contradict each other")
    if no_encrypt and (kms or key):
        given = " and ".join(o for o, v in (("--kms", kms), ("--key", key)) if v)
        raise click.UsageError(f"--no-encrypt contradicts {given}, which choose how to encrypt")
    return True if encrypt else False if no_encrypt else None


def progress_bar(length: int, label: str):
    """A progress bar on a terminal; silent elsewhere."""
    return click.progressbar(length=length, label=label, file=sys.stderr,
                             hidden=not sys.stderr.isatty())


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def long_operation(fn):
    """For commands that build something big: SIGTERM unwinds like Ctrl-C
    (KeyboardInterrupt), so the half-built volume, snapshot or backup is
    removed on the way out instead of being left behind."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        old = signal.signal(signal.SIGTERM, _sigterm)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, old)
    return wrapper


def daemon_snapshot(env: Env):
    """The ``online`` capture for snapshots.capture: the daemon copies an
    attached volume with its writes quiesced."""
    def online(name: str, dest: Path, uuid: str) -> None:
        env.daemon.snapshot(name, str(Path(dest).absolute()), uuid)
    return online


def resolve_owner(user: str | None) -> int:
    """The uid that will own a new volume or key: ``user`` (root only), else the caller."""
    if user is None:
        return os.geteuid()
    if os.geteuid() != 0:
        raise PermissionDenied("only root can create things for another user (--owner)")
    return user_uid(user)


def user_uid(user: str) -> int:
    """A user name or numeric uid -> uid."""
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        if user.isdigit():
            return int(user)
        raise NotFound(f"no such user {user!r}")
