"""Where evscrypt keeps its state and its runtime files: the one place that says so.

State (images, keystore): ``--home`` or ``EVSCRYPT_HOME``; by default
``/var/lib/evscrypt`` for root and ``~/.local/share/evscrypt`` otherwise::

    <home>/catalog.json          what each image must be (evscrypt.catalog),
    <home>/.catalog.lock         changed under this lock
    <home>/volumes/NAME.img      a volume's image (evscrypt.volumes)
    <home>/snapshots/NAME/       a snapshot: image, meta.json (evscrypt.snapshots)
    <home>/images/NAME/          an image: image, meta.json
    <home>/kms/local/            the local KMS's keystore (evscrypt.kms.local)

A volume, snapshot or image is built under a hidden temporary name in its
area and renamed into place when complete (evscrypt.tempentry); the backup
of an attached volume copies it into a hidden entry in ``snapshots/`` first.

Runtime (control socket, FUSE mount): ``EVSCRYPT_RUNTIME_DIR``; by default
``/run/evscrypt`` for root and ``$XDG_RUNTIME_DIR/evscrypt`` otherwise::

    <runtime>/control.sock       the daemon's control socket
    <runtime>/disks/NAME         an attached volume's disk file (FUSE)
"""

from __future__ import annotations

import os

# pathlib (and typing, for its annotations) is imported only inside the
# functions that build a pathlib.Path: the quick CLI path (evscrypt.entry)
# uses only the string functions, and these imports are a visible share of
# its start-up.  So the Path functions carry their type in the docstring.


def default_home():
    """The state directory (a pathlib.Path)."""
    from pathlib import Path

    env = os.environ.get("EVSCRYPT_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/evscrypt")
    return Path(os.path.expanduser("~/.local/share/evscrypt"))


def runtime_dir_name() -> str:
    """The runtime directory as a plain string (see :func:`default_runtime_dir`)."""
    env = os.environ.get("EVSCRYPT_RUNTIME_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/evscrypt"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "evscrypt")
    return f"/tmp/evscrypt-{os.getuid()}"


def default_runtime_dir():
    """The runtime directory (a pathlib.Path)."""
    from pathlib import Path

    return Path(runtime_dir_name())


#: The control socket's name inside the runtime directory, and the FUSE mount's.
SOCKET_NAME, DISKS_NAME = "control.sock", "disks"


def socket_path(runtime):
    """The control socket in ``runtime`` (a pathlib.Path)."""
    return runtime / SOCKET_NAME


def socket_name(runtime: str) -> str:
    """:func:`socket_path` for a plain string: the quick CLI path
    (evscrypt.entry) uses strings so that it need not import pathlib."""
    return os.path.join(runtime, SOCKET_NAME)


def disks_dir(runtime):
    """The FUSE mount point in ``runtime`` (a pathlib.Path): the attached disks."""
    return runtime / DISKS_NAME


# -- the state directory ---------------------------------------------------------------
# Each function takes the state directory (a pathlib.Path) and returns one.

VOLUMES, SNAPSHOTS, IMAGES = "volumes", "snapshots", "images"
#: The areas of the state directory where entries are built under temporary names.
TEMP_AREAS = (VOLUMES, SNAPSHOTS, IMAGES)
VOLUME_SUFFIX = ".img"
#: The files of a snapshot's or an image's directory: the copied image and what it is.
COPY_IMAGE, COPY_META = "image", "meta.json"
#: The catalog's file and its lock file, in the state directory itself.
CATALOG_FILE, CATALOG_LOCK = "catalog.json", ".catalog.lock"
#: Which backing store the state directory's volumes live in (evscrypt.store.chosen).
STORE_FILE = "store"


def volumes_dir(home):
    return home / VOLUMES


def volume_image(home, name: str):
    """Volume ``name``'s image (the name is checked by the caller: evscrypt.names)."""
    return volumes_dir(home) / (name + VOLUME_SUFFIX)


def volume_name(filename: str) -> str | None:
    """The volume whose image is called ``filename`` in the volumes directory;
    None for anything else there (hidden files, temporary entries)."""
    if filename.endswith(VOLUME_SUFFIX) and not filename.startswith("."):
        return filename[:-len(VOLUME_SUFFIX)]
    return None


def snapshots_dir(home):
    return home / SNAPSHOTS


def images_dir(home):
    return home / IMAGES


def backup_scratch(home, volume: str):
    """Where a backup of attached volume ``volume`` has the daemon copy it
    first: the name a hidden temporary directory is made next to (a sibling
    of the snapshots, so the copy can be a reflink of the volume's image)."""
    return snapshots_dir(home) / f"backup-{volume}"


def kms_dir(home, backend: str):
    """The state of KMS backend ``backend`` that keeps any here (the local one)."""
    return home / "kms" / backend
