"""Backing stores: where volume images live (see base.py and docs/STORE.md).

``open_store(spec, root)`` picks one from a store spec: ``rbd://POOL`` or
``rbd://POOL/NAMESPACE`` for Ceph RBD (the cluster from CEPH_CONF, the client
from EVSCRYPT_RBD_CLIENT, default ``admin``), ``local`` or None for the
local files under ``root``.  The rbd module is imported only for an rbd
spec, so hosts without python3-rados run the local store as before.

``chosen(home, requested)`` keeps the choice per state directory: the first
command that names a store (``--store`` or EVSCRYPT_STORE) records it in
``HOME/store``; later commands use the recorded one, and one that asks for
another is refused, so one state directory never mixes two stores.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import EncryptionRuleError, InvalidArgument, StorageError
from ..fsutil import write_atomic
from ..paths import CATALOG_FILE, STORE_FILE
from .base import BackingStore

RBD_SCHEME = "rbd://"
LOCAL = "local"
#: Set to ``allow`` on a host that accepts unencrypted volumes in a shared
#: store (see :func:`check_unencrypted`).
SHARED_UNENCRYPTED_ENV = "EVSCRYPT_SHARED_UNENCRYPTED"


def check_unencrypted(store: BackingStore, name: str, *, creating: bool = False) -> None:
    """Refuse an unencrypted volume in a shared store, unless this host allows them.

    Whoever may write a shared pool may also rewrite its catalog, and an
    unencrypted header has no MAC: such a writer could record an encrypted
    volume as unencrypted and make a host write the guest's data in
    plaintext from then on.  A host cannot tell that forgery from a real
    unencrypted volume, so by default it uses neither (as a cloud account
    can make encryption mandatory for every new volume).  A local store
    keeps its catalog in the state directory, out of the image store's
    reach, and needs no such rule."""
    if not store.shared or os.environ.get(SHARED_UNENCRYPTED_ENV) == "allow":
        return
    how = f"a host that accepts unencrypted volumes there sets {SHARED_UNENCRYPTED_ENV}=allow"
    if creating:
        raise EncryptionRuleError(f"cannot create unencrypted volume {name!r} in a store that many hosts "
                                  f"share ({how})")
    raise EncryptionRuleError(f"volume {name!r} is recorded as unencrypted in a store that many hosts share, "
                              f"which anyone who may write the pool could have done: this host does not "
                              f"use it ({how})")


def chosen(home: Path, requested: str | None) -> str:
    """The store of state directory ``home``: the recorded one, or
    ``requested`` (recorded now); InvalidArgument if they differ."""
    requested = (requested or "").strip() or None
    if requested is not None and requested != LOCAL:
        parse(requested)
    record = Path(home) / STORE_FILE
    try:
        recorded = record.read_text().strip()
    except FileNotFoundError:
        recorded = None
    except OSError as e:
        raise StorageError(f"cannot read {record}: {e.strerror}")
    if recorded is None:
        if requested is None or requested == LOCAL:
            return LOCAL  # the default needs no record: state directories made before stores keep working
        if (Path(home) / CATALOG_FILE).exists():
            raise InvalidArgument(f"the state directory {home} already keeps volumes in local files, "
                                  f"not in {requested}; use another state directory (--home) for that store")
        try:
            Path(home).mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(record, (requested + "\n").encode(), 0o644)
        except OSError as e:
            raise StorageError(f"cannot record the store in {record}: {e.strerror}")
        return requested
    if requested is not None and requested != recorded:
        raise InvalidArgument(f"the state directory {home} uses the store {recorded}, not {requested}; "
                              f"use another state directory (--home) for another store")
    return recorded


def parse(spec: str) -> tuple[str, str]:
    if not spec.startswith(RBD_SCHEME):
        raise InvalidArgument(f"unknown store {spec!r}: use rbd://POOL[/NAMESPACE], or local")
    return parse_rbd_spec(spec)


def parse_rbd_spec(spec: str) -> tuple[str, str]:
    """``rbd://POOL[/NAMESPACE]`` -> (pool, namespace)."""
    rest = spec[len(RBD_SCHEME):]
    pool, _, ns = rest.partition("/")
    if not pool or "/" in ns:
        raise InvalidArgument(f"invalid store {spec!r}: use rbd://POOL or rbd://POOL/NAMESPACE")
    return pool, ns


def open_store(spec: str | None, root: Path) -> BackingStore:
    if spec and spec != LOCAL:
        pool, ns = parse(spec)
        try:
            from .rbd import RBDStore
        except ImportError:
            raise InvalidArgument("the RBD store needs python3-rados and python3-rbd (make install links them)")
        return RBDStore(pool, namespace=ns, client=os.environ.get("EVSCRYPT_RBD_CLIENT", "admin"),
                        conf=os.environ.get("CEPH_CONF") or None)
    from .local import LocalStore
    return LocalStore(root)
