"""Could this volume be attached again once it is detached?

The one answer, and the one wording of it, for every path that lets go of
a volume's key: detach (which refuses without --force), `evscrypt stop`
(likewise), SIGTERM (which cannot refuse, and warns), and `status` (which
marks such volumes).  An attached volume keeps its DK in memory and works
whatever happens to its CMK; once detached, attaching needs the CMK Enabled
and the volume's owner allowed to use it.  The EVS documentation asks users
to check exactly this before they detach a disk under a custom key.
"""

from __future__ import annotations

import enum
import pwd
from dataclasses import asdict, dataclass

from .errors import EvscryptError, KeyNotFound
from .image.header import Header
from .kms.base import Access, KeyState, KMSBackend


class Reason(str, enum.Enum):
    KEY_DISABLED = "key-disabled"
    KEY_PENDING_DELETION = "key-pending-deletion"
    KEY_DELETED = "key-deleted"
    KEY_NOT_FOUND = "key-not-found"
    KEY_UNUSABLE = "key-unusable"  # an AWS-only state that allows no use (Unavailable, ...)
    GRANT_REVOKED = "grant-revoked"
    OWNER_NOT_ALLOWED = "owner-not-allowed"
    UNKNOWN = "unknown"  # the KMS did not answer: nobody can promise the volume comes back


@dataclass(frozen=True)
class Verdict:
    """The answer for one volume.  ``message`` says what detaching would do
    and what brings the volume back; ``short`` is the status column."""

    volume: str
    ok: bool
    reason: Reason | None = None
    backend: str | None = None
    key: str | None = None  # the key's alias, else its id
    state: str | None = None  # the key state, when the KMS told it
    deletion_date: str | None = None
    user: str | None = None  # the volume's owner, for the access reasons
    detail: str | None = None  # why the state is unknown

    @property
    def message(self) -> str:
        return "" if self.ok else _MESSAGES[self.reason](self)

    @property
    def short(self) -> str:
        if self.ok:
            return "yes"
        return f"no ({_SHORT[self.reason](self)})"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reason"] = self.reason.value if self.reason else None
        d["message"] = self.message or None
        d["summary"] = self.short
        return d


def _hint(v: Verdict, local: str, aws: str) -> str:
    """The command that fixes it, in the words of the volume's backend."""
    text = local if v.backend == "local" else aws if v.backend == "aws" else ""
    return f" ({text})" if text else ""


def _lost(v: Verdict, what: str) -> str:
    return (f"{what}: once detached, volume {v.volume} can never be attached again; "
            f"its data is lost for good")


_MESSAGES = {
    Reason.KEY_DISABLED: lambda v: (
        f"key {v.key} is Disabled: once detached, volume {v.volume} cannot be attached again until the "
        f"key is enabled" + _hint(v, f"evscrypt key enable {v.key}", "AWS KMS EnableKey")),
    Reason.KEY_PENDING_DELETION: lambda v: (
        f"key {v.key} is PendingDeletion (deletion on {v.deletion_date or 'an unknown date'}): once detached, "
        f"volume {v.volume} cannot be attached again unless its deletion is cancelled and the key then "
        f"enabled, before that date"
        + _hint(v, f"evscrypt key cancel-deletion {v.key}, then evscrypt key enable {v.key}",
                "AWS KMS CancelKeyDeletion, then EnableKey")
        + "; after it, the data is lost for good"),
    Reason.KEY_DELETED: lambda v: _lost(v, f"key {v.key} is Deleted"),
    Reason.KEY_NOT_FOUND: lambda v: _lost(v, f"key {v.key} no longer exists"),
    Reason.KEY_UNUSABLE: lambda v: (
        f"key {v.key} is {v.state}: once detached, volume {v.volume} cannot be attached again until the "
        f"key is Enabled"),
    Reason.GRANT_REVOKED: lambda v: (
        f"the grant of key {v.key} to {v.user}, the owner of volume {v.volume}, was revoked: once detached, "
        f"{v.volume} cannot be attached again until the key's owner grants it again"
        + _hint(v, f"evscrypt key grant {v.key} --to {v.user}", "")),
    Reason.OWNER_NOT_ALLOWED: lambda v: (
        f"{v.user}, the owner of volume {v.volume}, is not allowed to use key {v.key}: once detached, "
        f"{v.volume} cannot be attached again until the key's owner grants it"
        + _hint(v, f"evscrypt key grant {v.key} --to {v.user}", "")),
    Reason.UNKNOWN: lambda v: (
        f"cannot check key state of {v.key} ({v.detail}): once detached, volume {v.volume} may not attach again"),
}

_SHORT = {
    Reason.KEY_DISABLED: lambda v: "key Disabled",
    Reason.KEY_PENDING_DELETION: lambda v: f"key PendingDeletion, deletion on {v.deletion_date}",
    Reason.KEY_DELETED: lambda v: "key Deleted",
    Reason.KEY_NOT_FOUND: lambda v: "key not found",
    Reason.KEY_UNUSABLE: lambda v: f"key {v.state}",
    Reason.GRANT_REVOKED: lambda v: "grant revoked",
    Reason.OWNER_NOT_ALLOWED: lambda v: "owner not allowed",
    Reason.UNKNOWN: lambda v: "key state unknown",
}

_BY_STATE = {
    KeyState.DISABLED: Reason.KEY_DISABLED,
    KeyState.PENDING_DELETION: Reason.KEY_PENDING_DELETION,
    KeyState.DELETED: Reason.KEY_DELETED,
}


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check(volume: str, header: Header, owner: int, backend: KMSBackend | None) -> Verdict:
    """Could ``owner`` attach volume ``volume`` (whose header is ``header``)
    again after a detach?  ``backend`` is the header's KMS (None when it is
    not encrypted).  Blocks on the KMS: call it from a worker thread in the
    daemon.  Never raises for a KMS failure: that is the UNKNOWN answer."""
    if not header.encrypted:
        return Verdict(volume, True)
    base = dict(volume=volume, ok=False, backend=header.kms_backend, key=header.key_id)
    try:
        info = backend.check_usable(header.key_id)
        base["key"], base["state"] = info.alias or info.key_id, info.state.value
        if info.state is not KeyState.ENABLED:
            reason = _BY_STATE.get(info.state, Reason.KEY_UNUSABLE)
            return Verdict(**base, reason=reason, deletion_date=info.deletion_date)
        if owner == 0:
            return Verdict(volume, True, backend=header.kms_backend, key=base["key"], state=base["state"])
        access = backend.access(header.key_id, owner)
    except KeyNotFound:
        return Verdict(**{**base, "state": "NotFound"}, reason=Reason.KEY_NOT_FOUND)
    except (EvscryptError, OSError) as e:
        why = e.message if isinstance(e, EvscryptError) else (e.strerror or str(e))
        return Verdict(**{**base, "state": "Unknown"}, reason=Reason.UNKNOWN, detail=why)
    if access is Access.ALLOWED:
        return Verdict(volume, True, backend=header.kms_backend, key=base["key"], state=base["state"])
    reason = Reason.GRANT_REVOKED if access is Access.GRANT_REVOKED else Reason.OWNER_NOT_ALLOWED
    return Verdict(**base, reason=reason, user=user_name(owner))
