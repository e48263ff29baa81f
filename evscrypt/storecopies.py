"""Snapshots and images in a store that many hosts share (an RBD pool).

Every host must see them, so they live in the store, not in a state
directory: each is an image of the store under a hidden name
(store.base.copy_image_name), a copy-on-write clone of a store snapshot of
the volume taken at one point in time (VolumeStore.frozen: crash-consistent,
whichever host has the volume attached, if any).  The clone has one snapshot
of its own, ``base``, and a volume made from the copy is a clone of that
(VolumeStore.create_copy with ``start``).  As in the state directory, a copy
holds the volume's header (its wrapped DK) and ciphertext as they were:
nothing is decrypted to make it, and the encryption rules are those of
evscrypt.clone.  Its catalog entry is in the shared catalog, and what
meta.json says in a state directory is kept in the store's catalog too, under
``meta/KIND/NAME``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from .catalog import IMAGE
from .errors import AlreadyExists, EvscryptError, InvalidArgument, NotFound
from .image import header as hdr
from .names import check_name
from .snapshots import META_VERSION, CopyStore, ImageStore, Online, Progress
from .store.base import copy_image_name
from .volumes import VolumeStore

#: The snapshot of a copy's image that volumes made from the copy are cloned from.
BASE = "base"


class StoreCopies(CopyStore):
    """The snapshots (``kind="snapshot"``) or images (``kind="image"``) of a shared store."""

    def __init__(self, volumes: VolumeStore, kind: str):
        self.kind, self.home, self.volumes = kind, volumes.home, volumes
        self.images, self.catalog = volumes.images, volumes.catalog
        self._kv = self.images.catalog()

    def image_name(self, name: str) -> str:
        return copy_image_name(self.kind, check_name(name, self.kind))

    def path(self, name: str) -> Path:
        return Path(self.images.location(self.image_name(name)))

    image_path = path

    def _meta_key(self, name: str) -> str:
        return f"meta/{self.kind}/{name}"

    def exists(self, name: str) -> bool:
        return self._meta_key(check_name(name, self.kind)) in self._kv.read().entries

    def names(self) -> list[str]:
        prefix = f"meta/{self.kind}/"
        return sorted(k[len(prefix):] for k in self._kv.read().entries if k.startswith(prefix))

    meta_where = "its record in the store's catalog"

    def _meta_bytes(self, name: str) -> bytes | None:
        return self._kv.read().entries.get(self._meta_key(check_name(name, self.kind)))

    def info(self, name: str) -> dict:
        d = self.meta(name)
        try:
            with self.images.open(self.image_name(name)) as img:
                d["allocated"] = img.allocated()
        except EvscryptError:
            d["allocated"] = None
        d["path"] = self.images.location(self.image_name(name))
        return d

    # -- create / delete -----------------------------------------------------
    def create(self, name: str, store: VolumeStore, volume: str, online: Online | None,
               progress: Progress | None = None) -> dict:
        """A clone of volume ``volume`` at one point in time, attached on any host or not."""
        if self.exists(name):
            raise AlreadyExists(f"{self.kind} {name!r} already exists")
        hidden = self.image_name(name)
        t0 = time.monotonic()
        with store.frozen(volume) as (op, snap):
            h = op.header
            meta = {"version": META_VERSION, "kind": self.kind, "name": name, "created": hdr.now_iso(),
                    "volume": volume, "volume_uuid": h.uuid, **self._encryption(h)}
            with self.catalog.adding(self.kind, name, dataclasses.replace(op.entry, size=h.size)):
                self.images.clone(volume, snap, hidden)
                try:
                    self.images.snapshot(hidden, BASE)
                    meta["seconds"] = round(time.monotonic() - t0, 3)
                    self._kv.update(lambda entries: self._put_new(entries, name, meta))
                except BaseException:
                    self.images.delete(hidden)
                    raise
        if progress:
            progress(h.data_offset + h.size)
        return meta

    def _put_new(self, entries: dict, name: str, meta: dict):
        if self._meta_key(name) in entries:
            raise AlreadyExists(f"{self.kind} {name!r} already exists")
        return {self._meta_key(name): json.dumps(meta, sort_keys=True).encode()}, ()

    def build(self, name: str, fill: Callable[[Path], tuple[dict, object]]) -> dict:
        raise InvalidArgument(f"copying an {IMAGE} into a new one is not available in a store that many hosts "
                              "share; make a volume from it and an image of that volume")

    def delete(self, name: str) -> None:
        """The record first, then the image: a copy is gone as soon as no host
        lists it; volumes cloned from it keep its data (the RBD trash)."""
        self.meta(name)  # NotFound
        key = self._meta_key(name)
        self._kv.update(lambda entries: ({}, (key,) if key in entries else ()))
        self.catalog.remove(self.kind, name)
        try:
            self.images.delete(self.image_name(name))
        except NotFound:
            pass

    # -- reading it ----------------------------------------------------------
    def open_image(self, name: str):
        try:
            return self.images.open(self.image_name(name), snapshot=BASE)
        except NotFound:
            raise NotFound(f"{self.kind} {name!r} not found") from None

    def clone_source(self, name: str) -> tuple[str, str]:
        return self.image_name(name), BASE

    def write_image_to(self, name: str, progress: Progress | None = None) -> Callable[[object], None]:
        """Nothing to write: the new volume is a clone (:meth:`clone_source`)."""
        def written(_image) -> None:
            if progress:
                progress(self.image_size(name))
        return written


class StoreImages(StoreCopies, ImageStore):
    """The images of a shared store; `image export` as in a state directory."""

    def __init__(self, volumes: VolumeStore):
        StoreCopies.__init__(self, volumes, IMAGE)
