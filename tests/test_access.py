"""Access control with a real second user: SO_PEERCRED identifies callers,
users attach and detach only their own volumes and use only CMKs they own or
were granted; attached files belong to them alone."""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import shutil
import subprocess
import uuid

import pytest

from daemon_fixture import make_daemon, run_as  # noqa: F401  (fixture)


def as_user(pw, fn):
    """Run ``fn()`` in a forked child as the user of pwd entry ``pw``."""
    return run_as(pw.pw_uid, pw.pw_gid, fn)

USER = "evsuser" + uuid.uuid4().hex[:6]
GROUP = "evsgrp" + uuid.uuid4().hex[:6]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                                reason="needs root and useradd to create a second user")


@pytest.fixture(scope="module")
def user():
    subprocess.run(["groupadd", GROUP], check=True)
    subprocess.run(["useradd", "-M", "-N", "-g", GROUP, "-s", "/usr/sbin/nologin", USER], check=True)
    pw = pwd.getpwnam(USER)
    try:
        yield pw
    finally:
        subprocess.run(["userdel", USER], capture_output=True)
        subprocess.run(["groupdel", GROUP], capture_output=True)



@pytest.fixture
def setup(make_daemon, user):  # noqa: F811
    d = make_daemon(start=False, extra_args=("--socket-group", GROUP))
    os.chmod(d.runtime, 0o755)  # users must reach the socket and the disks
    d.start()
    d.cli("key", "create", "ukey", "--owner", USER)
    d.cli("key", "create", "rootkey")
    d.cli("volume", "create", "uvol", "--size", "8M", "--key", "ukey", "--owner", USER)
    d.cli("volume", "create", "rootvol", "--size", "8M", "--key", "rootkey")
    return d, d.socket


def test_socket_is_group_restricted(setup, user):
    d, sock = setup
    st = os.stat(sock)
    assert st.st_mode & 0o777 == 0o660 and st.st_gid == grp.getgrnam(GROUP).gr_gid
    # in the group: answered; the reply lists only the caller's volumes
    assert as_user(user, lambda: d.client().status()["volumes"]) == {"ok": []}
    # the FUSE request counts cover every user's volumes: root's alone
    assert as_user(user, lambda: "fuse_requests" in d.client().status()) == {"ok": False}
    assert d.client().status()["fuse_requests"]["INIT"] == 1
    # not in the group: the kernel refuses the connection
    out = as_user(pwd.getpwnam("nobody"), lambda: d.client().status())
    assert out["error"] == "DaemonUnavailable" and "permission denied" in out["message"]


def test_user_attaches_own_volume_and_owns_the_file(setup, user):
    d, sock = setup
    out = as_user(user, lambda: d.client().attach("uvol")["path"])
    path = out["ok"]
    st = os.stat(path)
    assert (st.st_uid, st.st_mode & 0o777) == (user.pw_uid, 0o600)

    def io():
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"mine" * 1024, 8192)
            os.fsync(fd)
            return os.pread(fd, 4096, 8192).decode()
        finally:
            os.close(fd)

    assert as_user(user, io) == {"ok": "mine" * 1024}
    nobody = pwd.getpwnam("nobody")
    assert as_user(nobody, lambda: os.open(path, os.O_RDONLY)) == {"errno": errno.EACCES}
    # status shows the user their volume; root sees it too
    vols = as_user(user, lambda: [v["name"] for v in d.client().status()["volumes"]])
    assert vols == {"ok": ["uvol"]}
    assert as_user(user, lambda: d.client().detach("uvol")["detached"]) == {"ok": True}


def test_user_cannot_touch_other_volumes_or_mount(setup, user, tmp_path):
    d, sock = setup
    out = as_user(user, lambda: d.client().attach("rootvol"))
    assert out["error"] == "PermissionDenied" and "another user" in out["message"]
    d.attach("rootvol")  # root's own attach
    out = as_user(user, lambda: d.client().detach("rootvol", force=True))
    assert out["error"] == "PermissionDenied"
    assert "rootvol" in os.listdir(d.mountpoint)
    # the daemon mounts as root, so a user may not choose a mount point
    out = as_user(user, lambda: d.client().attach("uvol", mount=str(tmp_path / "m")))
    assert out["error"] == "PermissionDenied"
    assert "uvol" not in os.listdir(d.mountpoint)


def test_grants_decide_who_may_use_a_key(setup, user):
    d, sock = setup
    # root cannot give the user a volume under a key the user may not use
    p = d.cli("volume", "create", "gvol", "--size", "8M", "--key", "rootkey", "--owner", USER, check=False)
    assert p.returncode == 20 and "not yours" in p.stderr
    d.cli("key", "grant", "rootkey", "--to", USER)
    assert json.loads(d.cli("key", "list-grants", "rootkey", "--json").stdout) == [
        {"uid": user.pw_uid, "user": USER}]
    d.cli("volume", "create", "gvol", "--size", "8M", "--key", "rootkey", "--owner", USER)
    assert "ok" in as_user(user, lambda: d.client().attach("gvol"))
    assert "ok" in as_user(user, lambda: d.client().detach("gvol"))
    # once revoked, the user's volume under that key no longer attaches
    d.cli("key", "revoke", "rootkey", "--from", USER)
    out = as_user(user, lambda: d.client().attach("gvol"))
    assert out["error"] == "PermissionDenied" and "rootkey" in out["message"]
    p = d.cli("key", "revoke", "rootkey", "--from", USER, check=False)
    assert p.returncode == 4  # no such grant
    # root still attaches it: root manages everything
    d.attach("gvol")


def test_revoked_grant_is_part_of_the_detach_guard(setup, user):
    """A volume attached through a grant: once the grant is revoked, its
    owner could not attach it again, so detach, stop and status say so, and
    --force warns with the same words."""
    d, sock = setup
    d.cli("key", "grant", "rootkey", "--to", USER)
    d.cli("volume", "create", "gvol", "--size", "8M", "--key", "rootkey", "--owner", USER)
    assert "ok" in as_user(user, lambda: d.client().attach("gvol"))
    d.cli("key", "revoke", "rootkey", "--from", USER)

    message = (f"the grant of key rootkey to {USER}, the owner of volume gvol, was revoked: once detached, gvol "
               f"cannot be attached again until the key's owner grants it again "
               f"(evscrypt key grant rootkey --to {USER})")
    out = as_user(user, lambda: d.client().detach("gvol"))
    assert out == {"error": "KeyStateError", "message": f"{message}; use --force to detach anyway"}, out
    [v] = json.loads(d.cli("status", "--json").stdout)["volumes"]
    assert (v["reattach"]["reason"], v["reattach"]["message"], v["reattach"]["summary"]) == (
        "grant-revoked", message, "no (grant revoked)")
    p = d.cli("stop", check=False)
    assert p.returncode == 12 and f"[gvol] {message}" in p.stderr and d.alive
    assert "gvol" in os.listdir(d.mountpoint)

    out = as_user(user, lambda: d.client().detach("gvol", force=True)["warnings"])
    assert out == {"ok": [message]}
    out = as_user(user, lambda: d.client().attach("gvol"))
    assert out == {"error": "PermissionDenied", "message": "the grant of key rootkey to you was revoked"}
    # granted again: the guard is satisfied
    d.cli("key", "grant", "rootkey", "--to", USER)
    assert "ok" in as_user(user, lambda: d.client().attach("gvol"))
    assert as_user(user, lambda: d.client().detach("gvol")["warnings"]) == {"ok": []}


def test_owner_not_allowed_the_key_is_part_of_the_detach_guard(setup, user):
    """root gives a volume to a user who may not use its key (a chown of
    the image): root can attach it, but its owner could never attach it
    again, and the guard says so."""
    d, sock = setup
    os.chown(d.image("rootvol"), user.pw_uid, -1)
    d.attach("rootvol")
    message = (f"{USER}, the owner of volume rootvol, is not allowed to use key rootkey: once detached, rootvol "
               f"cannot be attached again until the key's owner grants it (evscrypt key grant rootkey --to {USER})")
    p = d.cli("detach", "rootvol", check=False)
    assert p.returncode == 12 and p.stderr == f"evscrypt: error: {message}; use --force to detach anyway\n"
    p = d.cli("status")
    assert "no (owner not allowed)" in p.stdout and f"rootvol: {message}" in p.stdout
    r = json.loads(d.cli("detach", "rootvol", "--force", "--json").stdout)
    assert r["warnings"] == [message] and r["reattach"]["reason"] == "owner-not-allowed"


def test_only_root_stops_the_daemon(setup, user):
    d, sock = setup
    out = as_user(user, lambda: d.client().stop(force=True))
    assert out == {"error": "PermissionDenied", "message": "only root can stop the daemon"}
    assert d.alive and d.status()["volumes"] == []


def test_only_root_breaks_a_lock(setup, user):
    """Breaking a lock fences another host: a user may not, even on their own volume."""
    d, _ = setup
    out = as_user(user, lambda: d.client().attach("uvol", break_lock=True))
    assert out == {"error": "PermissionDenied", "message": "only root can attach with --break-lock"}
    assert d.status()["volumes"] == []


def test_default_key_takes_no_grants(setup, user):
    d, _ = setup
    default_id = json.loads(d.cli("key", "describe", "evs/default", "--json").stdout)["key_id"]
    for ref in ("evs/default", "alias/evs/default", default_id):
        p = d.cli("key", "grant", ref, "--to", USER, check=False)
        assert p.returncode == 2, (ref, p.stderr)
        assert p.stderr.startswith("evscrypt: usage error: evs/default is everyone's key: there is nothing to grant")
    assert json.loads(d.cli("key", "list-grants", "evs/default", "--json").stdout) == []
