"""The KMS backend interface, shared by the local soft-HSM and AWS KMS.

A backend holds customer master keys (CMKs) and only ever hands out data keys
(DKs): it generates a DK under a CMK and returns it both in plaintext (a
:class:`Secret`) and wrapped; later it unwraps the wrapped DK, given the same
encryption context, and it re-wraps a DK under a new context.  Key states follow the cloud model; the refusals for each
state are the backend's job, and each names the key and its state.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, asdict

from ..errors import KeyStateError
from ..secret import Secret


class KeyState(str, enum.Enum):
    ENABLED = "Enabled"
    DISABLED = "Disabled"
    PENDING_DELETION = "PendingDeletion"
    DELETED = "Deleted"
    # AWS-only states; none of them allows cryptographic use
    UNAVAILABLE = "Unavailable"
    PENDING_IMPORT = "PendingImport"
    CREATING = "Creating"
    UPDATING = "Updating"
    PENDING_REPLICA_DELETION = "PendingReplicaDeletion"

    def __str__(self) -> str:
        return self.value


class Access(str, enum.Enum):
    """May a user use a CMK?  Why not matters to the user: a grant that was
    revoked is asked for again from the key's owner."""

    ALLOWED = "allowed"
    GRANT_REVOKED = "grant-revoked"
    NOT_ALLOWED = "not-allowed"


@dataclass
class KeyInfo:
    key_id: str
    arn: str
    alias: str | None
    state: KeyState
    description: str = ""
    created: str | None = None
    deletion_date: str | None = None
    backend: str = "local"
    owner: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    def require_usable(self) -> None:
        """Refuse cryptographic use unless the key is Enabled."""
        if self.state is KeyState.ENABLED:
            return
        what = f"key {self.alias or self.key_id} is {self.state.value}"
        if self.state is KeyState.PENDING_DELETION and self.deletion_date:
            what += f" (deletion on {self.deletion_date})"
        if self.state is KeyState.DELETED:
            what += "; volumes under it are lost"
        raise KeyStateError(what)


class KMSBackend(abc.ABC):
    """What every KMS backend provides."""

    name: str = "?"

    @abc.abstractmethod
    def generate_data_key(self, key: str, context: dict[str, str], nbytes: int = 64) -> tuple[Secret, bytes, str]:
        """Return (plaintext DK, wrapped DK, canonical key id) under ``key``."""

    @abc.abstractmethod
    def wrap_data_key(self, key: str, dk: Secret, context: dict[str, str]) -> tuple[bytes, str]:
        """Wrap an existing DK under ``key`` with ``context``; return (wrapped
        DK, canonical key id).  Refuse unless the key is Enabled.  A volume made
        from a snapshot, image or backup keeps its DK under a new context."""

    @abc.abstractmethod
    def decrypt(self, wrapped: bytes, context: dict[str, str], key: str) -> Secret:
        """Unwrap ``wrapped`` with ``context``; refuse unless the key is Enabled."""

    @abc.abstractmethod
    def describe(self, key: str) -> KeyInfo:
        """Describe a key by id, ARN or alias."""

    def check_usable(self, key: str) -> KeyInfo:
        """Describe ``key`` and prove the backend could use it now: a state
        check alone can miss a keystore that is sealed or unreachable."""
        return self.describe(key)

    def check_access(self, key: str, uid: int) -> KeyInfo:
        """Refuse a non-root local user a CMK they may not use.  Backends whose
        access control lives in the provider (AWS IAM) allow it here."""
        return self.describe(key)

    def access(self, key: str, uid: int) -> Access:
        """Whether ``uid`` may use ``key`` now, and if not, whether a grant was
        taken back.  Backends whose access control lives in the provider
        (AWS IAM) cannot tell, and answer ALLOWED."""
        return Access.ALLOWED

    @abc.abstractmethod
    def list_keys(self) -> list[KeyInfo]:
        """All keys this backend can see."""

    # Lifecycle.  Backends whose lifecycle lives elsewhere (AWS) refuse these.
    def create_key(self, alias: str, description: str = "", owner: int | None = None) -> KeyInfo:
        raise NotImplementedError

    def enable(self, key: str) -> KeyInfo:
        raise NotImplementedError

    def disable(self, key: str) -> KeyInfo:
        raise NotImplementedError

    def schedule_deletion(self, key: str, days: int = 30) -> KeyInfo:
        raise NotImplementedError

    def cancel_deletion(self, key: str) -> KeyInfo:
        raise NotImplementedError

    def purge_due(self) -> list[KeyInfo]:
        return []

    def default_key(self) -> str:
        """The key used when the user names none."""
        raise NotImplementedError
