"""The one error tree of evscrypt.

Every error a user can meet is a subclass of :class:`EvscryptError`.  Each
class carries its own exit code, so scripts can tell failures apart, and its
message is the one line the CLI prints.  Only the CLI turns these into exit
codes; library code raises and never exits.  Vendor exceptions (botocore,
OSError from the backing file, ...) are converted where they enter, so the
messages here never carry key material.
"""

from __future__ import annotations


class EvscryptError(Exception):
    """Something went wrong."""

    exit_code = 1

    def __init__(self, message: str | None = None, details: dict | None = None):
        super().__init__(message or (self.__doc__ or "").strip())
        #: structured facts behind the message, for --json output (the
        #: control protocol carries them); never key material
        self.details = details

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgument(EvscryptError):
    """An argument is not valid."""

    exit_code = 3


class NotFound(EvscryptError):
    """The named object does not exist."""

    exit_code = 4


class AlreadyExists(EvscryptError):
    """The named object already exists."""

    exit_code = 5


class Busy(EvscryptError):
    """The object is in use (attached, locked or open)."""

    exit_code = 6


class FormatError(EvscryptError):
    """The image header is damaged or not an evscrypt image."""

    exit_code = 7


class UnsupportedFeature(FormatError):
    """The image uses a feature this version does not know."""

    exit_code = 8


class IntegrityError(EvscryptError):
    """The header MAC does not verify: wrong key or tampered header."""

    exit_code = 9


class KMSError(EvscryptError):
    """The key management service refused or failed."""

    exit_code = 10


class KeyNotFound(KMSError):
    """The key does not exist."""

    exit_code = 11


class KeyStateError(KMSError):
    """The key is not in a state that allows this operation."""

    exit_code = 12


class KeyProtected(KMSError):
    """The default key cannot be disabled or deleted."""

    exit_code = 13


class KMSUnavailable(KMSError):
    """The key management service cannot be reached."""

    exit_code = 14


class KMSAccessDenied(KMSError):
    """The key management service denied access."""

    exit_code = 15


class InvalidCiphertext(KMSError):
    """The wrapped data key does not decrypt under this key and context."""

    exit_code = 16


class OutOfRange(EvscryptError):
    """The I/O range lies outside the volume."""

    exit_code = 17


class NoSpace(EvscryptError):
    """No space left on the backing filesystem."""

    exit_code = 18


class DaemonUnavailable(EvscryptError):
    """The evscrypt daemon is not running or does not answer."""

    exit_code = 19


class PermissionDenied(EvscryptError):
    """The caller is not allowed to do this."""

    exit_code = 20


class ProtocolError(EvscryptError):
    """A control-socket message is malformed."""

    exit_code = 21


class StorageError(EvscryptError):
    """The backing image cannot be read or written."""

    exit_code = 22


class LoopUnavailable(EvscryptError):
    """Loop devices are not available on this host."""

    exit_code = 23


class BackupCorrupt(EvscryptError):
    """A backup does not verify: its manifest or a chunk is missing or damaged."""

    exit_code = 24


class EncryptionRuleError(EvscryptError):
    """The encryption rules forbid this (a volume's encryption never changes;
    an encrypted image cannot be exported or made unencrypted)."""

    exit_code = 25


class MemoryProtectionError(EvscryptError):
    """Key memory cannot be protected: it cannot be locked against swapping,
    or the process cannot be made non-dumpable."""

    exit_code = 26


#: Exit codes by class name, for the docs and the control protocol, which
#: sends the class name so the client can re-raise the same class.
def error_classes() -> dict[str, type[EvscryptError]]:
    out: dict[str, type[EvscryptError]] = {}
    stack: list[type[EvscryptError]] = [EvscryptError]
    while stack:
        cls = stack.pop()
        out[cls.__name__] = cls
        stack.extend(cls.__subclasses__())
    return out
