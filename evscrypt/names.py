"""Validation of user-chosen names: volumes, snapshots, key aliases.

Volume names become file names and systemd instance names, so they are held
to a short whitelist: no ``/``, no leading ``.``, no control characters.
"""

from __future__ import annotations

import re

from .errors import InvalidArgument

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+@-]{0,127}")
_ALIAS_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")

DEFAULT_ALIAS = "evs/default"
RESERVED_ALIAS_PREFIX = "evs/"


def _printable(s: str) -> str:
    return s.encode("unicode_escape").decode("ascii")


def check_name(name: str, what: str = "volume") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid {what} name {_printable(name)!r}: use letters, digits and _.:+@- "
            "(at most 128, not starting with '.' and without '/')"
        )
    return name


def check_alias(alias: str) -> str:
    """Key aliases may have '/'-separated parts (``team/db``), each a name."""
    a = alias[6:] if alias.startswith("alias/") else alias
    parts = a.split("/")
    if not a or len(a) > 256 or not all(_ALIAS_PART.fullmatch(p) for p in parts):
        raise InvalidArgument(f"invalid key alias {_printable(alias)!r}")
    return a
