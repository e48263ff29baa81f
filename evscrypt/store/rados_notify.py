"""Which watchers of a RADOS object answer a notify, by client id.

python-rados reports a notify that some watcher missed only as ETIMEDOUT,
dropping the per-watcher lists that librados returns with it.  Telling a
dead lock holder from a live one needs those lists (another watcher of the
image, not the holder, may be the one that missed it), so this calls
librados' C API through ctypes: ``rados_notify2`` and
``rados_decode_notify_response``.  It uses a connection of its own, opened
for the one call; it is only used when breaking a lock, which is rare.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import NamedTuple

from ..errors import StorageError

_LIB = "librados.so.2"
#: Seconds to reach the monitors before the cluster counts as down.
CONNECT_TIMEOUT = 30


class _Ack(ctypes.Structure):  # struct notify_ack_t (librados.h)
    _fields_ = [("notifier_id", ctypes.c_uint64), ("cookie", ctypes.c_uint64),
                ("payload", ctypes.c_char_p), ("payload_len", ctypes.c_uint64)]


class _Timeout(ctypes.Structure):  # struct notify_timeout_t
    _fields_ = [("notifier_id", ctypes.c_uint64), ("cookie", ctypes.c_uint64)]


class Replies(NamedTuple):
    acked: frozenset[int]  # client global ids that answered
    timed_out: frozenset[int]  # watchers that did not answer in time


_lib = None


def _librados():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(_LIB, use_errno=True)
        vp, cp = ctypes.c_void_p, ctypes.c_char_p
        pvp = ctypes.POINTER(ctypes.c_void_p)
        lib.rados_create2.argtypes = (pvp, cp, cp, ctypes.c_uint64)
        lib.rados_conf_read_file.argtypes = (vp, cp)
        lib.rados_conf_set.argtypes = (vp, cp, cp)
        lib.rados_conf_parse_env.argtypes = (vp, cp)
        lib.rados_connect.argtypes = (vp,)
        lib.rados_shutdown.argtypes = (vp,)
        lib.rados_ioctx_create.argtypes = (vp, cp, pvp)
        lib.rados_ioctx_destroy.argtypes = (vp,)
        lib.rados_ioctx_set_namespace.argtypes = (vp, cp)
        lib.rados_notify2.argtypes = (vp, cp, cp, ctypes.c_int, ctypes.c_uint64,
                                      pvp, ctypes.POINTER(ctypes.c_size_t))
        lib.rados_decode_notify_response.argtypes = (
            vp, ctypes.c_size_t, ctypes.POINTER(ctypes.POINTER(_Ack)), ctypes.POINTER(ctypes.c_size_t),
            ctypes.POINTER(ctypes.POINTER(_Timeout)), ctypes.POINTER(ctypes.c_size_t))
        lib.rados_free_notify_response.argtypes = (ctypes.POINTER(_Ack), ctypes.c_size_t, ctypes.POINTER(_Timeout))
        lib.rados_buffer_free.argtypes = (vp,)
        _lib = lib
    return _lib


def _check(ret: int, what: str) -> None:
    if ret < 0:
        raise StorageError(f"RADOS {what}: {os.strerror(-ret)}")


def notify(conf: str | None, client: str, pool: str, namespace: str, oid: str, timeout_ms: int) -> Replies:
    """Notify ``oid`` and wait up to ``timeout_ms`` for its watchers."""
    lib = _librados()
    cluster = ctypes.c_void_p()
    _check(lib.rados_create2(ctypes.byref(cluster), b"ceph", f"client.{client}".encode(), 0), "create")
    try:
        _check(lib.rados_conf_read_file(cluster, conf.encode() if conf else None), "reading the configuration")
        _check(lib.rados_conf_parse_env(cluster, None), "CEPH_ARGS")
        # a cluster that is down fails the connect in this time, not 300 s
        _check(lib.rados_conf_set(cluster, b"client_mount_timeout", str(CONNECT_TIMEOUT).encode()), "conf")
        _check(lib.rados_connect(cluster), "connect")
        io = ctypes.c_void_p()
        _check(lib.rados_ioctx_create(cluster, pool.encode(), ctypes.byref(io)), f"pool {pool!r}")
        try:
            lib.rados_ioctx_set_namespace(io, namespace.encode())
            return _notify(lib, io, oid, timeout_ms)
        finally:
            lib.rados_ioctx_destroy(io)
    finally:
        lib.rados_shutdown(cluster)


def _notify(lib, io, oid: str, timeout_ms: int) -> Replies:
    reply, reply_len = ctypes.c_void_p(), ctypes.c_size_t()
    ret = lib.rados_notify2(io, oid.encode(), b"", 0, timeout_ms, ctypes.byref(reply), ctypes.byref(reply_len))
    if ret not in (0, -errno.ETIMEDOUT):  # a timeout still fills in the reply
        _check(ret, f"notify of {oid}")
    if not reply.value:
        return Replies(frozenset(), frozenset())
    try:
        acks, n_acks = ctypes.POINTER(_Ack)(), ctypes.c_size_t()
        touts, n_touts = ctypes.POINTER(_Timeout)(), ctypes.c_size_t()
        _check(lib.rados_decode_notify_response(reply, reply_len, ctypes.byref(acks), ctypes.byref(n_acks),
                                                ctypes.byref(touts), ctypes.byref(n_touts)), "notify reply")
        try:
            return Replies(frozenset(acks[i].notifier_id for i in range(n_acks.value)),
                           frozenset(touts[i].notifier_id for i in range(n_touts.value)))
        finally:
            lib.rados_free_notify_response(acks, n_acks, touts)
    finally:
        lib.rados_buffer_free(reply)
