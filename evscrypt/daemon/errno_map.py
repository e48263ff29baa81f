"""The one place that maps evscrypt errors to errno for FUSE replies."""

from __future__ import annotations

import errno

from ..errors import Busy, EvscryptError, NoSpace, NotFound, OutOfRange, PermissionDenied, StorageError

_MAP = [
    (NoSpace, errno.ENOSPC),
    (OutOfRange, errno.ENOSPC),  # a disk does not grow: writing past the end is "no space"
    (StorageError, errno.EIO),
    (PermissionDenied, errno.EACCES),
    (NotFound, errno.ENOENT),
    (Busy, errno.EBUSY),
]


def errno_for(exc: BaseException) -> int:
    for cls, code in _MAP:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, EvscryptError):
        return errno.EIO
    return errno.EIO
