"""Use a volume offline under its lock, else ask the daemon that has it attached.

Snapshots, images, backups and resizes work on a volume whether it is
attached or not.  A detached volume is used here, under its exclusive
attach lock, so no attach can race the work; an attached one is worked on
by the daemon, which holds it.  Between the two tries the volume may be
detached (the daemon then answers NotFound) or attached again (the lock is
then Busy), so the choice is made again, a few times.  :func:`offline_or_daemon`
is that choice, made in one place for every command that needs it (as
borg's ``with_repository`` opens and locks the repository for each command).
"""

from __future__ import annotations

from typing import Callable, TypeVar

from .errors import Busy, DaemonUnavailable, NotFound

T = TypeVar("T")

#: A volume may be detached (or attached) between our lock attempt and the
#: daemon's answer; try the other way this many times.
ATTEMPTS = 3


def offline_or_daemon(name: str, offline: Callable[[], T], daemon: Callable[[], T] | None) -> T:
    """``offline()``, which takes volume ``name``'s exclusive lock and raises
    Busy while the volume is attached; if it is, ``daemon()``, which asks the
    daemon and raises NotFound if the volume is not attached (any more).

    Without ``daemon`` (None), Busy is the answer.  A daemon that does not
    answer makes the volume Busy: it is locked, and nobody here can use it."""
    for _ in range(ATTEMPTS):
        try:
            return offline()
        except Busy:
            if daemon is None:
                raise
        try:
            return daemon()
        except NotFound:
            continue  # detached since we tried the lock: offline, next time round
        except DaemonUnavailable as e:
            raise Busy(f"volume {name!r} is locked but the daemon does not answer ({e.message})")
    raise Busy(f"volume {name!r} is locked, but not by this host's daemon; try again later")
