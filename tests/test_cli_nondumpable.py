"""CLI processes that hold a DK are non-dumpable at the moment they hold it.

Each command runs as the real CLI (evscrypt.cli.root.entry, as the `evscrypt`
program runs it) in its own process, with observers around the two points
where a DK comes into being in the local KMS (decrypt and
generate_data_key): right after each returns, the observer reads
PR_GET_DUMPABLE from the kernel.  A command that holds no key stays
dumpable, which shows the reading can tell the difference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from kms_fixtures import moto_kms  # noqa: F401  (fixture)

RUN_CLI = textwrap.dedent("""
    import atexit, ctypes, sys
    from evscrypt.kms.local import LocalKMS
    libc = ctypes.CDLL(None)
    held = []
    def observe(name):
        real = getattr(LocalKMS, name)
        def wrapper(self, *a, **kw):
            out = real(self, *a, **kw)
            held.append(f"{name}:{libc.prctl(3, 0, 0, 0, 0)}")
            return out
        setattr(LocalKMS, name, wrapper)
    observe("decrypt")
    observe("generate_data_key")
    atexit.register(lambda: print("DK", *held, "END", libc.prctl(3, 0, 0, 0, 0), file=sys.stderr))
    from evscrypt.cli.root import entry
    sys.argv = ["evscrypt", *sys.argv[1:]]
    entry()
""")


@pytest.fixture
def cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVSCRYPT_")}
    env.update(EVSCRYPT_HOME=str(tmp_path / "home"), EVSCRYPT_RUNTIME_DIR=str(tmp_path / "run"))

    def run(*args: str) -> tuple[list[str], int, str]:
        p = subprocess.run([sys.executable, "-c", RUN_CLI, *map(str, args)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        line = [x for x in p.stderr.splitlines() if x.startswith("DK ")][-1].split()
        return line[1:line.index("END")], int(line[-1]), p.stdout
    return run


def assert_nondumpable_while_holding(result) -> None:
    held, at_exit, _ = result
    assert held, "the command was expected to hold a DK"
    assert all(h.endswith(":0") for h in held), f"a DK was held while the process was dumpable: {held}"
    assert at_exit == 0


def test_cli_commands_holding_a_dk_are_non_dumpable(cli, tmp_path):
    held, at_exit, _ = cli("volume", "list")  # the control: no key, so still dumpable
    assert (held, at_exit) == ([], 1)
    assert_nondumpable_while_holding(cli("volume", "create", "v", "--size", "8M", "--preallocate"))
    assert_nondumpable_while_holding(cli("volume", "dump-key", "v", "--key-file", tmp_path / "dk"))
    assert_nondumpable_while_holding(cli("volume", "resize", "v", "--size", "12M"))
    cli("snapshot", "create", "v", "s")
    assert_nondumpable_while_holding(cli("volume", "create", "w", "--from-snapshot", "s"))
    cli("key", "create", "other")
    *_, out = cli("backup", "create", "v", tmp_path / "backups")
    src = out.split("--from-backup ")[1].split()[0]
    # another CMK: the restore re-encrypts under a new DK (the transcode path)
    assert_nondumpable_while_holding(cli("volume", "create", "r", "--from-backup", src, "--key", "other"))


AWS_OBSERVED = textwrap.dedent("""
    import ctypes, sys
    from pathlib import Path
    from evscrypt.kms import open_backend
    from evscrypt.kms.aws import AwsKMS
    libc = ctypes.CDLL(None)
    seen = []
    real = AwsKMS._call
    def observed(self, key, op, **kw):
        if op in ("decrypt", "generate_data_key"):
            seen.append(f"{op}:{libc.prctl(3, 0, 0, 0, 0)}")  # before botocore holds a plaintext DK
        return real(self, key, op, **kw)
    AwsKMS._call = observed
    kms = open_backend("aws", Path(sys.argv[1]))
    ctx = {"evscrypt:volume-uuid": "u", "evscrypt:volume-name": "n"}
    dk, wrapped, key_id = kms.generate_data_key("alias/nd", ctx)
    dk.wipe()
    kms.decrypt(wrapped, ctx, key_id).wipe()
    print(*seen)
""")


def test_aws_kms_makes_the_process_non_dumpable_before_the_plaintext_arrives(moto_kms, tmp_path):
    moto_kms.create_key("alias/nd")
    p = subprocess.run([sys.executable, "-c", AWS_OBSERVED, str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert p.stdout.split() == ["generate_data_key:0", "decrypt:0"], p.stdout + p.stderr
