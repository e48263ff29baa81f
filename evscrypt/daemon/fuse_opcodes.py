"""Names of the FUSE opcodes, for the request counters that `status` shows.

The numbers are the kernel's ABI (``enum fuse_opcode`` in linux/fuse.h);
pyfuse3.request_counts() (patches/pyfuse3-3.5.0-threads.patch) counts
received requests by number.
"""

from __future__ import annotations

NAMES = {
    1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK", 6: "SYMLINK", 8: "MKNOD",
    9: "MKDIR", 10: "UNLINK", 11: "RMDIR", 12: "RENAME", 13: "LINK", 14: "OPEN", 15: "READ", 16: "WRITE",
    17: "STATFS", 18: "RELEASE", 20: "FSYNC", 21: "SETXATTR", 22: "GETXATTR", 23: "LISTXATTR",
    24: "REMOVEXATTR", 25: "FLUSH", 26: "INIT", 27: "OPENDIR", 28: "READDIR", 29: "RELEASEDIR",
    30: "FSYNCDIR", 31: "GETLK", 32: "SETLK", 33: "SETLKW", 34: "ACCESS", 35: "CREATE", 36: "INTERRUPT",
    37: "BMAP", 38: "DESTROY", 39: "IOCTL", 40: "POLL", 41: "NOTIFY_REPLY", 42: "BATCH_FORGET",
    43: "FALLOCATE", 44: "READDIRPLUS", 45: "RENAME2", 46: "LSEEK", 47: "COPY_FILE_RANGE",
    48: "SETUPMAPPING", 49: "REMOVEMAPPING", 50: "SYNCFS", 51: "TMPFILE", 52: "STATX",
}


def named(counts: dict[int, int]) -> dict[str, int]:
    """{opcode: count} -> {name: count}; an opcode without a name keeps its
    number (0: a request whose header pyfuse3 could not see)."""
    return {NAMES.get(op, f"OPCODE_{op}"): n for op, n in sorted(counts.items())}
