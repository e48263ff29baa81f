"""The volume catalog: what each image's header must say, kept outside the image.

The image store may be hostile.  Whoever can write an image can give it a
header of their own making that passes every checksum: an *unencrypted*
header over an encrypted volume (no key, so no MAC to check), or the whole
image of another volume (its own valid MAC).  The header cannot vouch for
itself, so the state directory keeps, for every volume, snapshot and image,
the facts its header must match: uuid, encryption, KMS backend, key, data
offset and size (volumes only grow, so the catalog keeps the smallest size
allowed).  Every path that opens an image checks its header against its
entry before anything else, and the encryption context for unwrapping the DK
is built from the entry, not read from the header.

``catalog.json`` (mode 0600) is written atomically, under ``.catalog.lock``
(an flock), at create, grow, restore and delete.  A state directory made
before the catalog existed adopts its images on first use (logged once);
after that, an image without an entry is refused until root adopts it
explicitly (``evscrypt volume adopt``).  docs/FORMAT.md specifies the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import FormatError, IntegrityError, StorageError
from .fsutil import locked_file, write_atomic
from .paths import CATALOG_FILE as FILE, CATALOG_LOCK as LOCK  # in the state directory

log = logging.getLogger("evscrypt.catalog")

VERSION = 1
#: Sections of the catalog, by the kind of image they describe.
VOLUME, SNAPSHOT, IMAGE = "volume", "snapshot", "image"
KINDS = (VOLUME, SNAPSHOT, IMAGE)
CONTEXT_UUID = "evscrypt:volume-uuid"
CONTEXT_NAME = "evscrypt:volume-name"


def encryption_context(uuid: str, name: str) -> dict[str, str]:
    """The context a volume's DK is wrapped under: it binds the wrapped DK to
    one volume, so a wrapped DK copied into another header does not unwrap."""
    return {CONTEXT_UUID: uuid, CONTEXT_NAME: name}


@dataclass(frozen=True)
class Entry:
    """What one image's header must say.

    ``name`` is the volume name its DK's encryption context binds: the
    volume's own name, or for a snapshot or image, that of the volume it was
    copied from.  ``size`` is the smallest size allowed for a volume (it may
    have grown since) and the exact size of a snapshot or image."""

    uuid: str
    name: str
    encrypted: bool
    kms: str | None
    key_id: str | None
    data_offset: int
    size: int

    @classmethod
    def of(cls, header, name: str | None = None) -> "Entry":
        return cls(uuid=header.uuid, name=name if name is not None else header.name, encrypted=header.encrypted,
                   kms=header.kms_backend if header.encrypted else None,
                   key_id=header.key_id if header.encrypted else None,
                   data_offset=header.data_offset, size=header.size)

    @classmethod
    def of_image(cls, header) -> "Entry":
        """An entry that trusts what ``header`` says, binding the name its own
        encryption context names: for adopting an image, and for a backup,
        whose header the catalog never saw."""
        return cls.of(header, header.encryption_context.get(CONTEXT_NAME, header.name))

    def context(self) -> dict[str, str]:
        return encryption_context(self.uuid, self.name)

    def check(self, header, what: str, exact_size: bool = False, done: str = "nothing was served") -> None:
        """Refuse a header that does not say what this entry says: one line
        naming the first field that differs, and ``done``."""
        fields = (("uuid", header.uuid, self.uuid), ("encrypted", header.encrypted, self.encrypted),
                  ("kms", header.kms_backend if header.encrypted else None, self.kms),
                  ("key_id", header.key_id if header.encrypted else None, self.key_id),
                  ("data_offset", header.data_offset, self.data_offset))
        for field, got, want in fields:
            if got != want:
                raise IntegrityError(f"{what}: header field {field} is {got!r} but the catalog says {want!r} "
                                     f"(tampered or substituted image); {done}")
        if header.size < self.size or (exact_size and header.size != self.size):
            raise IntegrityError(f"{what}: header field size is {header.size} but the catalog says "
                                 f"{'exactly' if exact_size else 'at least'} {self.size} "
                                 f"(tampered or substituted image); {done}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d) -> "Entry":
        try:
            e = cls(**d)
        except TypeError:
            raise FormatError("catalog entry has the wrong fields")
        if not (isinstance(e.uuid, str) and isinstance(e.name, str) and isinstance(e.encrypted, bool)
                and isinstance(e.data_offset, int) and isinstance(e.size, int)):
            raise FormatError("catalog entry has fields of the wrong type")
        return e


def _empty() -> dict:
    return {"version": VERSION, **{k: {} for k in KINDS}}


#: (kind, name) -> header, for adopting what a state directory already holds.
Scan = Callable[[], Iterator[tuple[str, str, object, str]]]


class Catalog:
    """The catalog of one state directory."""

    def __init__(self, home: Path, scan: Scan | None = None):
        self.home = Path(home)
        self.path = self.home / FILE
        self._scan = scan

    # -- the file ----------------------------------------------------------------
    @contextlib.contextmanager
    def adding(self, kind: str, name: str, entry: Entry):
        """Record ``entry``, then run the body (which puts the image in place)
        under the state lock; if the body fails, the previous entry is back.

        The entry is written first: a crash before the image is in place
        leaves an entry without an image, which the next create of that name
        replaces, never an image without an entry."""
        with self._locked():
            doc = self._doc_locked()
            old = doc[kind].get(name)
            doc[kind][name] = entry.to_json()
            self._write(doc)
            try:
                yield
            except BaseException:
                if old is None:
                    doc[kind].pop(name, None)
                else:
                    doc[kind][name] = old
                self._write(doc)
                raise

    def names(self, kind: str) -> list[str]:
        return sorted(self._doc()[kind])

    def _locked(self) -> contextlib.AbstractContextManager:
        """The state lock: orders every read-modify-write of the catalog
        across processes (CLI commands and the daemon)."""
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        return locked_file(self.home / LOCK,
                           lambda e: StorageError(f"cannot lock the catalog in {self.home}: {e.strerror}"))

    def _read(self) -> dict | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"cannot read the catalog {self.path}: {e.strerror}")
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise FormatError(f"the catalog {self.path} is damaged (not JSON)")
        if not isinstance(doc, dict) or doc.get("version") != VERSION or \
                not all(isinstance(doc.get(k), dict) for k in KINDS):
            raise FormatError(f"the catalog {self.path} has an unknown format")
        return doc

    def _write(self, doc: dict) -> None:
        try:
            write_atomic(self.path, json.dumps(doc, indent=1, sort_keys=True).encode(), 0o600)
        except OSError as e:
            raise StorageError(f"cannot write the catalog {self.path}: {e.strerror}")

    def _doc(self) -> dict:
        """The catalog, adopting the state directory's images on first use."""
        doc = self._read()
        if doc is not None:
            return doc
        with self._locked():
            return self._doc_locked()

    def _doc_locked(self) -> dict:
        doc = self._read()
        return doc if doc is not None else self._adopt_all()

    def _adopt_all(self) -> dict:
        """First use: trust every image already here, once, and say so."""
        doc = _empty()
        adopted = []
        for kind, name, header, bound in (self._scan() if self._scan else ()):
            doc[kind][name] = Entry.of(header, bound).to_json()
            adopted.append(f"{kind} {name}")
        self._write(doc)
        if adopted:
            log.warning("the state directory %s had no catalog: adopted %d image(s) as they are now (%s); "
                        "see docs/FORMAT.md", self.home, len(adopted), ", ".join(adopted))
        return doc

    # -- entries ---------------------------------------------------------------
    def get(self, kind: str, name: str) -> Entry | None:
        d = self._doc()[kind].get(name)
        return Entry.from_json(d) if d is not None else None

    def require(self, kind: str, name: str) -> Entry:
        e = self.get(kind, name)
        if e is None:
            hint = f"; if you trust this image, run 'evscrypt volume adopt {name}' as root" if kind == VOLUME else ""
            raise IntegrityError(f"{kind} {name!r} has no catalog entry: its image was not made here{hint}")
        return e

    def check(self, kind: str, name: str, header) -> Entry:
        """The entry of ``name``, after checking ``header`` against it."""
        e = self.require(kind, name)
        e.check(header, f"{kind} {name!r}", exact_size=kind != VOLUME)
        return e

    def put(self, kind: str, name: str, entry: Entry) -> None:
        with self._locked():
            doc = self._doc_locked()
            doc[kind][name] = entry.to_json()
            self._write(doc)

    def grow(self, name: str, size: int) -> None:
        """Raise a volume's smallest allowed size (after its header says so)."""
        with self._locked():
            doc = self._doc_locked()
            d = doc[VOLUME].get(name)
            if d is not None and d["size"] < size:
                d["size"] = size
                self._write(doc)

    def remove(self, kind: str, name: str) -> None:
        with self._locked():
            doc = self._doc_locked()
            if doc[kind].pop(name, None) is not None:
                self._write(doc)


class SharedCatalog(Catalog):
    """The catalog of a store that many hosts share (evscrypt.store: its
    ``shared`` stores): the entries live in the store's own key-value area
    (on RBD, the omap of one RADOS object), one key ``KIND/NAME`` each, so
    every host checks images against the same facts.  Each change is one
    compare-and-swap (evscrypt.store.base.Catalog.update): two hosts never
    lose each other's entries.  There is nothing to adopt: a shared store
    starts with its catalog."""

    def __init__(self, kv):
        self._kv = kv

    @staticmethod
    def _key(kind: str, name: str) -> str:
        return f"{kind}/{name}"

    @staticmethod
    def _decode(raw: bytes, what: str) -> dict:
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError):
            raise FormatError(f"the shared catalog's entry for {what} is damaged (not JSON)")
        if not isinstance(d, dict):
            raise FormatError(f"the shared catalog's entry for {what} has an unknown format")
        return d

    def names(self, kind: str) -> list[str]:
        prefix = kind + "/"
        return sorted(k[len(prefix):] for k in self._kv.read().entries if k.startswith(prefix))

    def get(self, kind: str, name: str) -> Entry | None:
        raw = self._kv.read().entries.get(self._key(kind, name))
        return None if raw is None else Entry.from_json(self._decode(raw, f"{kind} {name!r}"))

    def put(self, kind: str, name: str, entry: Entry) -> None:
        data = json.dumps(entry.to_json(), sort_keys=True).encode()
        self._kv.update(lambda entries: ({self._key(kind, name): data}, ()))

    def remove(self, kind: str, name: str) -> None:
        key = self._key(kind, name)
        self._kv.update(lambda entries: ({}, (key,) if key in entries else ()))

    def grow(self, name: str, size: int) -> None:
        key = self._key(VOLUME, name)

        def change(entries):
            if key not in entries:
                return {}, ()
            d = self._decode(entries[key], f"volume {name!r}")
            if d.get("size", 0) >= size:
                return {}, ()
            return {key: json.dumps({**d, "size": size}, sort_keys=True).encode()}, ()

        self._kv.update(change)

    @contextlib.contextmanager
    def adding(self, kind: str, name: str, entry: Entry):
        key = self._key(kind, name)
        data = json.dumps(entry.to_json(), sort_keys=True).encode()
        old: dict = {}

        def change(entries):
            old["raw"] = entries.get(key)
            return {key: data}, ()

        self._kv.update(change)
        try:
            yield
        except BaseException:
            self._kv.update(lambda entries: ({key: old["raw"]}, ()) if old["raw"] is not None else ({}, (key,)))
            raise
