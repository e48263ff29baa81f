"""Backups of volume images to a directory or to S3.

A backup is the volume's image as stored (header with the wrapped DK, then
ciphertext), cut into content-addressed chunks, plus a manifest listing the
chunks' SHA-256 in order.  The store never sees plaintext or a plaintext DK.
Chunks already in the store are not written again, so a second backup of a
volume writes only the chunks that changed.
"""

from .manifest import CHUNK_SIZE, Manifest
from .store import BackupStore, open_store, parse_source

__all__ = ["BackupStore", "CHUNK_SIZE", "Manifest", "open_store", "parse_source"]
