"""Loop device, mkfs and mount on top of an attached disk file, and undoing it.

These are the steps `attach --mount` adds and `detach` reverses.  They shell
out to util-linux and e2fsprogs/xfsprogs, as an admin would, and run in worker
threads because mkfs and mount block.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
from dataclasses import dataclass, asdict
from pathlib import Path

from ..errors import Busy, EvscryptError, InvalidArgument, LoopUnavailable

log = logging.getLogger("evscrypt.mount")
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"]}


@dataclass
class MountInfo:
    loop: str
    mountpoint: str
    fstype: str | None
    created_fs: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _run(cmd: list[str], what: str, timeout: float = 300) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise EvscryptError(f"{what}: {cmd[0]} is not installed")
    except subprocess.TimeoutExpired:
        raise EvscryptError(f"{what}: {cmd[0]} did not finish in {timeout:.0f} s")
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise EvscryptError(f"{what}: {msg[-1] if msg else f'{cmd[0]} exited {p.returncode}'}")
    return p.stdout.strip()


def loop_available() -> bool:
    return os.path.exists("/dev/loop-control")


def loops_backing(path: Path) -> list[str]:
    """Loop devices whose backing file is ``path`` (or lies under it)."""
    target = str(path)
    found = []
    for bf in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            backing = Path(bf).read_text().strip()
        except OSError:
            continue
        if backing == target or backing.startswith(target.rstrip("/") + "/"):
            found.append("/dev/" + bf.split("/")[3])
    return sorted(found)


def _mounts() -> list[tuple[str, str]]:
    """(device, mount point) of each mount, from /proc/self/mounts: it lists
    a dead FUSE mount too, where a stat of the mount point would hang or fail."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    return [(f[0], f[1].replace("\\040", " ")) for f in map(str.split, lines) if len(f) >= 2]


def mounts_of(device: str) -> list[str]:
    """Mount points where ``device`` is mounted."""
    return [mp for dev, mp in _mounts() if dev == device]


def is_mountpoint(path) -> bool:
    """Is something mounted on ``path``?"""
    target = os.path.realpath(path)
    return any(mp == target for _, mp in _mounts())


def setup(disk: Path, mountpoint: Path, mkfs: str | None) -> MountInfo:
    if mkfs is not None and mkfs not in MKFS:
        raise InvalidArgument(f"unsupported filesystem {mkfs!r} (choose ext4 or xfs)")
    if not loop_available():
        raise LoopUnavailable("loop devices are not available on this host (no /dev/loop-control)")
    try:
        loop = _run(["losetup", "--find", "--show", "--direct-io=on", str(disk)], "losetup")
    except EvscryptError:
        loop = _run(["losetup", "--find", "--show", str(disk)], "losetup")
    try:
        fstype = _probe(loop)
        created = False
        if fstype is None:
            if mkfs is None:
                raise InvalidArgument(f"{disk.name} holds no filesystem; add --mkfs ext4 to create one")
            _run(MKFS[mkfs] + [loop], f"mkfs.{mkfs}")
            fstype, created = mkfs, True
        os.makedirs(mountpoint, exist_ok=True)
        _run(["mount", "-t", fstype, loop, str(mountpoint)], "mount")
    except BaseException:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        raise
    log.info("mounted %s (%s) at %s", loop, fstype, mountpoint)
    return MountInfo(loop, str(mountpoint), fstype, created)


def _probe(dev: str) -> str | None:
    """The filesystem type on ``dev``, or None if it is blank."""
    p = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", dev], capture_output=True, text=True)
    if p.returncode == 2:  # nothing found
        return None
    if p.returncode != 0:
        raise EvscryptError(f"blkid {dev}: {p.stderr.strip() or 'failed'}")
    return p.stdout.strip() or None


def teardown(info: MountInfo, force: bool = False) -> None:
    """Unmount and free the loop device, in reverse order of setup."""
    if os.path.ismount(info.mountpoint):
        p = subprocess.run(["umount", info.mountpoint], capture_output=True, text=True)
        if p.returncode != 0:
            if not force:
                raise Busy(f"cannot unmount {info.mountpoint}: {p.stderr.strip() or 'busy'} (use --force)")
            subprocess.run(["umount", "-l", info.mountpoint], capture_output=True)
    detach_loop(info.loop)


def detach_loop(loop: str) -> None:
    subprocess.run(["losetup", "-d", loop], capture_output=True)


def cleanup_stale(disks: Path) -> list[str]:
    """After a crash: lazily unmount filesystems on loops over our old mount
    and free those loops.  Returns what was cleaned, for the log."""
    cleaned = []
    for loop in loops_backing(disks):
        for mp in mounts_of(loop):
            subprocess.run(["umount", "-l", mp], capture_output=True)
            cleaned.append(f"unmounted {mp}")
        detach_loop(loop)
        cleaned.append(f"freed {loop}")
    return cleaned


def grow(info: MountInfo) -> None:
    """After the disk file grew: make the loop device see the new size, then
    grow the filesystem on it, online (resize2fs, xfs_growfs)."""
    _run(["losetup", "--set-capacity", info.loop], "losetup --set-capacity")
    if info.fstype in ("ext2", "ext3", "ext4"):
        _run(["resize2fs", info.loop], "resize2fs")
    elif info.fstype == "xfs":
        _run(["xfs_growfs", info.mountpoint], "xfs_growfs")
    else:
        log.warning("%s: cannot grow a %s filesystem; the device has grown", info.loop, info.fstype)
