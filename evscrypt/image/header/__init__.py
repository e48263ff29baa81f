"""The on-disk volume header, in three parts, as LUKS2 divides its own:

* ``model``: the fields, their JSON form and the rules of a valid header
  (the schema);
* ``slots``: the two copies on disk, their checksums and sequence numbers,
  the crash-safe write that repairs a damaged copy (the disk I/O);
* ``mac``: the HKDF-keyed MAC that catches a wrong key or a tampered header.

Importers use the package (``from evscrypt.image import header as hdr``);
it re-exports each part's public names.  The numbers of the image layout
(slot size, header area) are the format's (evscrypt/format.py).
"""

from .mac import mac_key, seal, seal_with, verify
from .model import DEFAULT_FEATURES, KNOWN_FEATURES, MAX_WRAPPED_DK, ORIGINS, ZERO_UNWRITTEN, Header, now_iso
from .slots import (
    COPIES, HEADER_AREA, MAGIC, MAX_PAYLOAD, PREFIX_SIZE, SLOT_SIZE, VERSION, Loaded, SimulatedCrash, load,
    load_bytes, load_slots, pack_copy, read_slots, store, unpack_copy,
)

__all__ = [
    "COPIES", "DEFAULT_FEATURES", "HEADER_AREA", "KNOWN_FEATURES", "MAGIC", "MAX_PAYLOAD", "MAX_WRAPPED_DK",
    "ORIGINS", "PREFIX_SIZE", "SLOT_SIZE", "VERSION", "ZERO_UNWRITTEN", "Header", "Loaded", "SimulatedCrash",
    "load", "load_bytes", "load_slots", "mac_key", "now_iso", "pack_copy", "read_slots", "seal", "seal_with",
    "store", "unpack_copy", "verify",
]
