"""Backing stores: where volume images live (see base.py and docs/STORE.md).

``open_store(spec, root)`` picks one from a store spec: ``rbd://POOL`` or
``rbd://POOL/NAMESPACE`` for Ceph RBD (the cluster from CEPH_CONF, the client
from EVSCRYPT_RBD_CLIENT, default ``admin``), anything else (None) for the
local files under ``root``.  The rbd module is imported only for an rbd
spec, so hosts without python3-rados run the local store as before.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidArgument
from .base import BackingStore

RBD_SCHEME = "rbd://"


def parse_rbd_spec(spec: str) -> tuple[str, str]:
    """``rbd://POOL[/NAMESPACE]`` -> (pool, namespace)."""
    rest = spec[len(RBD_SCHEME):]
    pool, _, ns = rest.partition("/")
    if not pool or "/" in ns:
        raise InvalidArgument(f"invalid store {spec!r}: use rbd://POOL or rbd://POOL/NAMESPACE")
    return pool, ns


def open_store(spec: str | None, root: Path) -> BackingStore:
    if spec and spec.startswith(RBD_SCHEME):
        pool, ns = parse_rbd_spec(spec)
        try:
            from .rbd import RBDStore
        except ImportError:
            raise InvalidArgument("the RBD store needs python3-rados and python3-rbd (make install links them)")
        return RBDStore(pool, namespace=ns, client=os.environ.get("EVSCRYPT_RBD_CLIENT", "admin"),
                        conf=os.environ.get("CEPH_CONF") or None)
    if spec:
        raise InvalidArgument(f"unknown store {spec!r}: use rbd://POOL[/NAMESPACE], or none for local files")
    from .local import LocalStore
    return LocalStore(root)
