"""Header backup and restore, like `cryptsetup luksHeaderBackup/Restore`.

A header backup file holds the image's whole header area (both copies).  It
contains the wrapped DK, never a plaintext key, so it is as sensitive as the
image header itself.  Restoring writes it back with the crash-safe two-copy
protocol, with a sequence number above any copy already in the image.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..catalog import Entry
from ..errors import FormatError, InvalidArgument
from ..fsutil import write_private
from . import header as hdr
from .backing import pread_into


def backup(image_fd: int, dest: Path) -> hdr.Loaded:
    """Write the header area to ``dest`` (created 0600, never overwritten)."""
    loaded = hdr.load(image_fd, "image")
    area = bytearray(hdr.HEADER_AREA)
    pread_into(image_fd, area, 0)
    write_private(dest, area)
    return loaded


def read_backup(src: Path) -> hdr.Loaded:
    try:
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidArgument(f"cannot open header backup {src}: {e.strerror}")
    try:
        if os.fstat(fd).st_size < hdr.HEADER_AREA:
            raise FormatError(f"{src} is too short to be an evscrypt header backup")
        return hdr.load(fd, str(src))
    finally:
        os.close(fd)


def restore(image_fd: int, src: Path, entry: Entry, what: str) -> hdr.Header:
    """Write the header in ``src`` into the image (both copies).

    The saved header must say what the volume's catalog ``entry`` says, so a
    restore can never change the volume's uuid, encryption, key or data
    offset, nor shrink it, whatever state the image's own header is in:
    another volume's header (``IntegrityError``) is refused even when both
    of the image's copies are destroyed.
    """
    saved = read_backup(src)
    entry.check(saved.header, f"{src} as the header of {what}", done="nothing was written")
    try:
        current = hdr.load(image_fd, "image")
    except FormatError:
        current = None
    seq = max(saved.seqno, current.seqno if current else 0)
    base = hdr.Loaded(saved.header, seq, 0, (False, False), (None, None))
    return hdr.store(image_fd, saved.header, base).header
