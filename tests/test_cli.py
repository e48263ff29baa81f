"""The `evscrypt` command line, driven in-process through evscrypt.cli.root.main
and, once, as the installed console script."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from evscrypt import errors
from evscrypt.cli.core import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE
from evscrypt.cli.root import main
from evscrypt.image.header import HEADER_AREA
from evscrypt.volumes import VolumeStore

SCRIPT = Path(sys.executable).parent / "evscrypt"
INFO_KEYS = {"name", "uuid", "size", "encrypted", "sector_size", "data_offset", "kms", "key_id",
             "key_state", "image_path", "created", "origin"}


class Cli:
    def __init__(self, home: Path, capsys):
        self.home = home
        self.capsys = capsys

    def __call__(self, *args: str):
        self.capsys.readouterr()
        rc = main(["--home", str(self.home), *args])
        out, err = self.capsys.readouterr()
        return rc, out, err

    def ok(self, *args: str) -> str:
        rc, out, err = self(*args)
        assert rc == 0, f"{args} -> {rc}: {err}"
        assert "Traceback" not in err
        return out

    def json(self, *args: str):
        return json.loads(self.ok(*args, "--json"))

    def fails(self, exc: type[errors.EvscryptError], *args: str, match: str | None = None) -> str:
        """Run a failing command: its class's exit code, one stderr line, no traceback."""
        rc, out, err = self(*args)
        assert rc == exc.exit_code, f"{args} -> {rc} (want {exc.__name__} {exc.exit_code}): {err!r}"
        assert "Traceback" not in err and "Traceback" not in out
        lines = err.splitlines()
        assert len(lines) == 1, f"stderr is not one line: {err!r}"
        assert lines[0].startswith("evscrypt: error: "), lines[0]
        if match:
            assert match in lines[0], lines[0]
        return lines[0]


@pytest.fixture
def cli(home, capsys):
    return Cli(home, capsys)


# -- volumes -----------------------------------------------------------------------

def test_volume_create_list_info_delete(cli, home):
    out = cli.ok("volume", "create", "data", "--size", "4M")
    assert "created volume data" in out and "4 MiB" in out and "encrypted" in out
    cli.ok("volume", "create", "scratch", "--size", "1M", "--no-encrypt")

    info = cli.json("volume", "info", "data")
    assert INFO_KEYS <= set(info)
    assert info["name"] == "data" and info["size"] == 4 << 20 and info["encrypted"] is True
    assert info["sector_size"] == 4096 and info["data_offset"] == 1 << 20
    assert info["kms"] == "local" and info["key_state"] == "Enabled" and info["key_alias"] == "evs/default"
    assert info["image_path"] == str(home / "volumes" / "data.img")
    assert info["origin"] == {"type": "empty", "source": None}
    assert info["created"].endswith("Z") and len(info["uuid"]) == 36
    assert info["header_copies_valid"] == [True, True]
    h = VolumeStore(home).header("data")
    assert info["uuid"] == h.uuid and info["key_id"] == h.key_id

    plain = cli.json("volume", "info", "scratch")
    assert plain["encrypted"] is False and plain["kms"] is None and plain["key_id"] is None
    assert plain["key_state"] is None

    listed = cli.json("volume", "list")
    assert [v["name"] for v in listed] == ["data", "scratch"]
    assert all(INFO_KEYS <= set(v) for v in listed)
    table = cli.ok("volume", "list")
    assert "data" in table and "scratch" in table and "evs/default" in table

    text = cli.ok("volume", "info", "data")
    assert "uuid:" in text and h.uuid in text and "4 MiB" in text

    assert "deleted volume data" in cli.ok("volume", "delete", "data")
    assert not (home / "volumes" / "data.img").exists()
    assert [v["name"] for v in cli.json("volume", "list")] == ["scratch"]
    cli.fails(errors.NotFound, "volume", "info", "data", match="'data' not found")
    cli.fails(errors.NotFound, "volume", "delete", "data")


def test_volume_create_with_named_key_by_alias_id_and_arn(cli):
    cli.ok("key", "create", "team/db", "--description", "db key")
    k = cli.json("key", "describe", "team/db")
    for i, ref in enumerate(("team/db", "alias/team/db", k["key_id"], k["arn"])):
        cli.ok("volume", "create", f"v{i}", "--size", "1M", "--key", ref)
        info = cli.json("volume", "info", f"v{i}")
        assert info["key_id"] == k["key_id"] and info["key_alias"] == "team/db"


def test_dump_key(cli, home, tmp_path):
    cli.ok("volume", "create", "vol", "--size", "1M")
    kf = tmp_path / "vol.key"
    rc, out, err = cli("volume", "dump-key", "vol", "--key-file", str(kf))
    assert rc == 0 and "Traceback" not in err
    assert "plaintext data key" in err  # warned
    assert stat.S_IMODE(os.stat(kf).st_mode) == 0o600
    raw = kf.read_bytes()
    assert len(raw) == 64
    store = VolumeStore(home)
    with store.data_key("vol") as dk:
        assert raw == bytes(dk.buffer)
    cmd = out.strip()
    assert cmd.startswith("cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512")
    assert "--sector-size 4096" in cmd and "--offset 2048" in cmd.split("--key-file")[0]
    assert f"--key-file {kf}" in cmd and str(home / "volumes" / "vol.img") in cmd
    # never overwrites an existing file
    cli.fails(errors.AlreadyExists, "volume", "dump-key", "vol", "--key-file", str(kf))
    assert kf.read_bytes() == raw


def test_dump_key_command_quotes_its_paths(cli, home, tmp_path):
    """The printed command survives paths with spaces and shell characters."""
    import shlex

    cli.ok("volume", "create", "vol", "--size", "1M")
    odd = tmp_path / "key dir; rm -rf $HOME"
    odd.mkdir()
    kf = odd / "it's.key"
    out = cli.ok("volume", "dump-key", "vol", "--key-file", str(kf))
    argv = shlex.split(out.strip())
    assert argv[argv.index("--key-file") + 1] == str(kf)
    assert argv[-2:] == [str(home / "volumes" / "vol.img"), "vol"]


def test_dump_key_refused_when_key_disabled(cli, tmp_path):
    cli.ok("key", "create", "k")
    cli.ok("volume", "create", "vol", "--size", "1M", "--key", "k")
    cli.ok("key", "disable", "k")
    kf = tmp_path / "x.key"
    line = cli.fails(errors.KeyStateError, "volume", "dump-key", "vol", "--key-file", str(kf))
    assert "k is Disabled" in line
    assert not kf.exists()
    cli.ok("key", "enable", "k")
    cli.ok("volume", "dump-key", "vol", "--key-file", str(kf))
    assert kf.stat().st_size == 64


def test_dump_key_of_unencrypted_volume(cli, tmp_path):
    cli.ok("volume", "create", "p", "--size", "1M", "--no-encrypt")
    cli.fails(errors.EncryptionRuleError, "volume", "dump-key", "p", "--key-file", str(tmp_path / "k"),
              match="volume 'p' is not encrypted: it has no data key to dump")
    assert not (tmp_path / "k").exists()


# -- keys --------------------------------------------------------------------------

def test_key_lifecycle(cli):
    out = cli.ok("key", "create", "life", "--description", "lifecycle test")
    assert "created key life" in out
    keys = cli.json("key", "list")
    assert sorted(k["alias"] for k in keys) == ["evs/default", "life"]
    assert "life" in cli.ok("key", "list") and "lifecycle test" in cli.ok("key", "list")
    d = cli.json("key", "describe", "life")
    assert d["state"] == "Enabled" and d["description"] == "lifecycle test" and d["backend"] == "local"
    assert "state:" in cli.ok("key", "describe", "life")

    assert "is Disabled" in cli.ok("key", "disable", "life")
    assert cli.json("key", "describe", "life")["state"] == "Disabled"
    assert "is Enabled" in cli.ok("key", "enable", "life")
    out = cli.ok("key", "schedule-deletion", "life", "--days", "7")
    assert "PendingDeletion" in out and "will be deleted on" in out
    d = cli.json("key", "describe", "life")
    assert d["state"] == "PendingDeletion" and d["deletion_date"]
    assert "no key is due" in cli.ok("key", "purge-due")
    assert "is Disabled" in cli.ok("key", "cancel-deletion", "life")
    d = cli.json("key", "describe", "life")
    assert d["state"] == "Disabled" and d["deletion_date"] is None
    cli.ok("key", "schedule-deletion", d["key_id"])  # default 30 days
    assert cli.json("key", "describe", "life")["state"] == "PendingDeletion"
    cli.fails(errors.KeyStateError, "key", "enable", "life", match="PendingDeletion")


def test_key_purge_due_destroys_expired_keys(cli, home):
    from datetime import datetime, timedelta, timezone

    from evscrypt.kms.local import LocalKMS

    cli.ok("key", "create", "old")
    cli.ok("key", "schedule-deletion", "old", "--days", "7")
    # move the deletion date into the past (the CLI has no clock option)
    kdir = home / "kms" / "local"
    doc = json.loads((kdir / "keys.json").read_text())
    for r in doc["keys"]:
        if r["alias"] == "old":
            r["deletion_date"] = (datetime.now(timezone.utc) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    (kdir / "keys.json").write_text(json.dumps(doc))
    assert "deleted key old" in cli.ok("key", "purge-due")
    assert LocalKMS(kdir).describe("old").state.value == "Deleted"
    assert cli.json("key", "describe", "old")["state"] == "Deleted"


# -- error paths ---------------------------------------------------------------------

@pytest.mark.parametrize("size", ["10X", "5000", "0", "-1G", "", "1.5", "4096.5K", "1e6", "65T"])
def test_bad_sizes(cli, home, size):
    cli.fails(errors.InvalidArgument, "volume", "create", "v", f"--size={size}")
    assert not (home / "volumes" / "v.img").exists()


def test_huge_size_is_invalid_argument_not_internal_error(cli):
    cli.fails(errors.InvalidArgument, "volume", "create", "v", "--size", "9" * 400)


@pytest.mark.parametrize("name", ["a/b", "/abs", ".hidden", "..", ".", "a\nb", "tab\there", "nul\x01",
                                  "", "x" * 129, "sp ace"])
def test_bad_volume_names(cli, home, name):
    cli.fails(errors.InvalidArgument, "volume", "create", name, "--size", "1M", match="invalid volume name")
    cli.fails(errors.InvalidArgument, "volume", "info", name)
    cli.fails(errors.InvalidArgument, "volume", "delete", name)
    assert not (home / "volumes").exists() or list((home / "volumes").iterdir()) == []


def test_missing_volume_and_key(cli, tmp_path):
    cli.fails(errors.NotFound, "volume", "info", "ghost")
    cli.fails(errors.NotFound, "volume", "dump-key", "ghost", "--key-file", str(tmp_path / "k"))
    for args in (("key", "describe", "ghost"), ("key", "enable", "ghost"), ("key", "disable", "ghost"),
                 ("key", "schedule-deletion", "ghost"), ("key", "cancel-deletion", "ghost")):
        cli.fails(errors.KeyNotFound, *args, match="'ghost' not found")
    cli.fails(errors.KeyNotFound, "volume", "create", "v", "--size", "1M", "--key", "ghost")
    assert cli.json("volume", "list") == []


def test_duplicate_volume_and_key(cli):
    cli.ok("volume", "create", "v", "--size", "1M")
    uuid_before = cli.json("volume", "info", "v")["uuid"]
    cli.fails(errors.AlreadyExists, "volume", "create", "v", "--size", "2M", match="already exists")
    cli.fails(errors.AlreadyExists, "volume", "create", "v", "--size", "2M", "--no-encrypt")
    info = cli.json("volume", "info", "v")
    assert info["uuid"] == uuid_before and info["size"] == 1 << 20
    cli.ok("key", "create", "k")
    cli.fails(errors.AlreadyExists, "key", "create", "k")


def test_disabled_key_refused_at_create(cli, home):
    cli.ok("key", "create", "k")
    cli.ok("key", "disable", "k")
    cli.fails(errors.KeyStateError, "volume", "create", "v", "--size", "1M", "--key", "k", match="k is Disabled")
    assert not (home / "volumes" / "v.img").exists()
    cli.ok("key", "schedule-deletion", "k", "--days", "7")
    cli.fails(errors.KeyStateError, "volume", "create", "v", "--size", "1M", "--key", "k", match="PendingDeletion")


def test_default_key_protected(cli):
    cli.fails(errors.KeyProtected, "key", "disable", "evs/default", match="evs/default")
    cli.fails(errors.KeyProtected, "key", "schedule-deletion", "evs/default")
    assert cli.json("key", "describe", "evs/default")["state"] == "Enabled"
    cli.fails(errors.InvalidArgument, "key", "create", "evs/other", match="reserved")
    cli.fails(errors.InvalidArgument, "key", "create", "bad alias")


@pytest.mark.parametrize("days", ["6", "1097", "0", "-7"])
def test_wrong_deletion_window(cli, days):
    cli.ok("key", "create", "k")
    cli.fails(errors.InvalidArgument, "key", "schedule-deletion", "k", f"--days={days}", match="7 to 1096")
    assert cli.json("key", "describe", "k")["state"] == "Enabled"


def test_usage_errors_exit_2(cli, home):
    for args in (("volume", "create", "v", "--size", "1M", "--no-encrypt", "--key", "k"),
                 ("key", "schedule-deletion", "k", "--days", "soon"),
                 ("volume", "create", "v"),
                 ("volume", "frobnicate")):
        rc, out, err = cli(*args)
        assert rc == EXIT_USAGE, (args, rc, err)
        assert "Traceback" not in err and err.startswith("evscrypt: usage error: ")
        assert len(err.strip().splitlines()) == 1, err  # one line, like every other error
    assert not (home / "volumes" / "v.img").exists()


def test_corrupt_image(cli, home):
    cli.ok("volume", "create", "bad", "--size", "1M")
    cli.ok("volume", "create", "good", "--size", "1M")
    img = home / "volumes" / "bad.img"
    with open(img, "r+b") as f:
        f.write(bytes(HEADER_AREA))
    line = cli.fails(errors.FormatError, "volume", "info", "bad", match="no valid header copy")
    assert "'bad'" in line
    listed = {v["name"]: v for v in cli.json("volume", "list")}
    assert "no valid header copy" in listed["bad"]["error"]  # one bad image does not hide the others
    assert listed["good"]["encrypted"] is True


def test_busy_volume_cannot_be_deleted(cli, home):
    cli.ok("volume", "create", "v", "--size", "1M")
    with VolumeStore(home).engine("v"):
        cli.fails(errors.Busy, "volume", "delete", "v", match="attached")
        assert cli.json("volume", "info", "v")["attached"] is True
    cli.ok("volume", "delete", "v")


def test_volume_whose_image_is_gone(cli, home):
    """An image removed behind evscrypt's back: its catalog entry still lists
    the volume, says what is missing, and `volume delete` removes the entry."""
    cli.ok("volume", "create", "v", "--size", "1M")
    (home / "volumes" / "v.img").unlink()
    [listed] = cli.json("volume", "list")
    assert listed["name"] == "v" and "its image" in listed["error"] and "is missing" in listed["error"]
    cli.fails(errors.NotFound, "volume", "info", "v", match="volume 'v' is in the catalog but its image")
    assert cli.ok("volume", "delete", "v") == "deleted volume v\n"
    assert cli.json("volume", "list") == []
    cli.fails(errors.NotFound, "volume", "delete", "v", match="volume 'v' not found")


def test_exit_codes_are_distinct():
    classes = errors.error_classes()
    assert {"EvscryptError", "InvalidArgument", "FormatError", "UnsupportedFeature", "KeyStateError",
            "InvalidCiphertext", "OutOfRange"} <= set(classes)
    codes = {name: cls.exit_code for name, cls in classes.items()}
    assert len(set(codes.values())) == len(codes), codes
    assert not set(codes.values()) & {0, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED}
    assert all(0 < c < 126 for c in codes.values())
    assert all(issubclass(c, errors.EvscryptError) for c in classes.values())


def test_version_and_help(cli):
    rc, out, _ = cli("--version")
    assert rc == 0 and out.startswith("evscrypt, version")
    rc, out, _ = cli("volume", "--help")
    assert rc == 0 and "dump-key" in out


# -- the console script ----------------------------------------------------------------

def test_console_script(tmp_path):
    assert SCRIPT.exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVSCRYPT_")}
    env["EVSCRYPT_HOME"] = str(tmp_path / "state")  # the home comes from the environment here

    def run(*args):
        return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)

    p = run("volume", "create", "sub", "--size", "2M")
    assert p.returncode == 0, p.stderr
    p = run("volume", "info", "sub", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert INFO_KEYS <= set(info) and info["size"] == 2 << 20
    assert info["image_path"] == str(tmp_path / "state" / "volumes" / "sub.img")
    p = run("volume", "info", "nosuch")
    assert p.returncode == errors.NotFound.exit_code
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr and p.stdout == ""
    p = run("volume", "create", "x", "--size", "9" * 400)
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1
