"""The state directory's layout (evscrypt.paths), written out by hand: an
upgrade must find every existing state directory where it was."""

from __future__ import annotations

from pathlib import Path

from evscrypt import paths
from evscrypt.fsutil import temp_name


def test_layout():
    home, runtime = Path("/h"), Path("/r")
    assert paths.volume_image(home, "v") == Path("/h/volumes/v.img")
    assert paths.snapshots_dir(home) == Path("/h/snapshots") and paths.images_dir(home) == Path("/h/images")
    assert (paths.COPY_IMAGE, paths.COPY_META) == ("image", "meta.json")
    assert (paths.CATALOG_FILE, paths.CATALOG_LOCK) == ("catalog.json", ".catalog.lock")
    assert paths.kms_dir(home, "local") == Path("/h/kms/local")
    assert paths.backup_scratch(home, "v") == Path("/h/snapshots/backup-v")
    assert set(paths.TEMP_AREAS) == {"volumes", "snapshots", "images"}
    assert paths.socket_path(runtime) == Path("/r/control.sock") == Path(paths.socket_name("/r"))
    assert paths.disks_dir(runtime) == Path("/r/disks")


def test_only_volume_images_name_volumes():
    assert paths.volume_name("v.img") == "v"
    assert paths.volume_name("a.b.img") == "a.b"
    for other in ("v", "v.img.bak", ".v.img", temp_name(Path("/h/volumes/v.img")).name, ".old.img.1a2b3c4d.tmp"):
        assert paths.volume_name(other) is None, other
