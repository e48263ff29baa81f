"""Re-wrapping a DK for a volume made from a snapshot, an image or a backup:
the KMS backends' wrap_data_key (local soft-HSM and AWS KMS through moto),
and what the key's state means for clones and restores."""

from __future__ import annotations

import pytest

from copy_helpers import MiB, rand, state_leftovers
from evscrypt import errors
from evscrypt.cli.root import main
from evscrypt.kms.aws import AwsKMS
from evscrypt.volumes import VolumeStore, encryption_context
from kms_fixtures import moto_kms  # noqa: F401  (fixture used by name)

CTX1 = encryption_context("11111111-1111-4111-8111-111111111111", "one")
CTX2 = encryption_context("22222222-2222-4222-8222-222222222222", "two")


def test_local_wrap_data_key(kms):
    dk, wrapped1, key_id = kms.generate_data_key("evs/default", CTX1)
    with dk:
        wrapped2, key_id2 = kms.wrap_data_key(key_id, dk, CTX2)
        assert key_id2 == key_id and wrapped2 != wrapped1
        with kms.decrypt(wrapped2, CTX2, key_id) as again:
            assert again.view() == dk.view()
        with pytest.raises(errors.InvalidCiphertext):
            kms.decrypt(wrapped2, CTX1, key_id)  # bound to the new context only
        kms.create_key("k")
        kms.disable("k")
        with pytest.raises(errors.KeyStateError):
            kms.wrap_data_key("k", dk, CTX2)
        with pytest.raises(errors.KeyNotFound):
            kms.wrap_data_key("nosuch", dk, CTX2)


def test_aws_wrap_data_key(moto_kms):
    meta = moto_kms.create_key("alias/wrap")
    aws = AwsKMS()
    dk, wrapped1, arn = aws.generate_data_key("alias/wrap", CTX1)
    with dk:
        wrapped2, arn2 = aws.wrap_data_key(arn, dk, CTX2)  # kms:Encrypt
        assert arn2 == arn == meta["Arn"] and wrapped2 != wrapped1
        with aws.decrypt(wrapped2, CTX2, arn) as again:
            assert again.view() == dk.view()
        moto_kms.disable("alias/wrap")
        with pytest.raises(errors.KeyStateError):
            aws.wrap_data_key(arn, dk, CTX2)


class Cli:
    def __init__(self, home, capsys):
        self.home, self.capsys = home, capsys

    def __call__(self, *args) -> tuple[int, str]:
        self.capsys.readouterr()
        rc = main(["--home", str(self.home), *map(str, args)])
        return rc, self.capsys.readouterr().err

    def ok(self, *args) -> None:
        rc, err = self(*args)
        assert rc == 0, (args, err)


def test_clones_and_restores_need_the_key_enabled(home, tmp_path, capsys):
    cli = Cli(home, capsys)
    cli.ok("key", "create", "k")
    cli.ok("volume", "create", "v", "--size", "8M", "--key", "k")
    store = VolumeStore(home)
    with store.engine("v", write=True) as (eng, _):
        eng.write(MiB, rand(MiB, "v"))
    cli.ok("snapshot", "create", "v", "s")
    cli.ok("image", "create", "i", "--from-volume", "v")
    cli.ok("backup", "create", "v", tmp_path / "bk")
    src = f"{tmp_path / 'bk'}::" + next((tmp_path / "bk" / "backups").iterdir()).name[:-5]
    cli.ok("key", "disable", "k")
    for args in (("--from-snapshot", "s"), ("--from-image", "i"), ("--from-backup", src),
                 ("--from-backup", src, "--no-encrypt"), ("--from-backup", src, "--key", "evs/default")):
        rc, err = cli("volume", "create", "x", *args)
        assert rc == errors.KeyStateError.exit_code, (args, err)
        assert "Disabled" in err
    assert not store.exists("x") and state_leftovers(home) == []
    cli.ok("key", "enable", "k")
    cli.ok("volume", "create", "x", "--from-backup", src, "--key", "evs/default")
    with store.engine("x") as (eng, h):
        assert eng.read(MiB, MiB) == rand(MiB, "v") and h.key_id != store.header("v").key_id


def test_aws_clone_and_restore(moto_kms, home, tmp_path, capsys):
    meta = moto_kms.create_key("alias/vols")
    cli = Cli(home, capsys)
    cli.ok("volume", "create", "a", "--size", "8M", "--kms", "aws", "--key", "alias/vols")
    store = VolumeStore(home)
    with store.engine("a", write=True) as (eng, _):
        eng.write(3 * MiB, rand(MiB, "aws"))
    cli.ok("snapshot", "create", "a", "s")
    cli.ok("volume", "create", "c", "--from-snapshot", "s")
    h, src = store.header("c"), store.header("a")
    assert h.kms_backend == "aws" and h.key_id == src.key_id == meta["Arn"] and h.wrapped_dk != src.wrapped_dk
    cli.ok("backup", "create", "a", tmp_path / "bk")
    bsrc = f"{tmp_path / 'bk'}::" + next((tmp_path / "bk" / "backups").iterdir()).name[:-5]
    cli.ok("volume", "create", "l", "--from-backup", bsrc, "--kms", "local")  # to another KMS: a new DK
    assert store.header("l").kms_backend == "local"
    for name in ("c", "l"):
        with store.engine(name) as (eng, _):
            assert eng.read(3 * MiB, MiB) == rand(MiB, "aws"), name
