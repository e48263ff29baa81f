"""`pip install .` in a fresh venv, with no make, gives a working evscrypt.

The venv is the session's ``stock_venv`` (conftest.py): a new venv and a
plain ``pip install`` of this checkout, so pyfuse3 comes stock from the
package index and the daemon runs the trio data path.  From that venv alone
the daemon starts, a volume attaches, fio verifies what it wrote, and
``status --json`` names the data path.  boto3 is not installed there (it is
the ``aws`` extra), and the AWS features say so in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from daemon_fixture import Daemon, fuse_skip_reason, needs_fio
from daemon_fixture import run_fio

EXIT_UNSUPPORTED = 8


def venv_env(venv) -> dict:
    """The environment of a user who activated the venv: its bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVSCRYPT_")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def test_the_install_is_a_real_install_of_stock_pyfuse3(stock_venv, tmp_path):
    env = venv_env(stock_venv)
    exe = shutil.which("evscrypt", path=env["PATH"])
    assert exe == str(stock_venv / "bin" / "evscrypt")
    code = "import evscrypt, pyfuse3; print(evscrypt.__file__); print(pyfuse3.__version__)"
    where, pyfuse3_version = subprocess.run([str(stock_venv / "bin" / "python"), "-c", code], env=env, cwd=tmp_path,
                                            capture_output=True, text=True, check=True).stdout.split()
    assert where.startswith(str(stock_venv)), "evscrypt must come from the venv, not the checkout"
    assert "+evscrypt" not in pyfuse3_version

    out = subprocess.run(["evscrypt", "--version"], env=env, capture_output=True, text=True, check=True).stdout
    from evscrypt import __version__
    from evscrypt.crypto import backend

    lines = out.splitlines()
    assert lines[0] == f"evscrypt, version {__version__}"
    assert lines[1].startswith("data path: trio (") and f"stock pyfuse3 {pyfuse3_version}" in lines[1]
    assert lines[2] == f"XTS backend: {backend.describe(backend.choose())}"


@pytest.mark.parametrize("args", [["backup", "list", "s3://bucket/prefix"],
                                  ["volume", "create", "a", "--size", "1M", "--kms", "aws", "--key", "alias/x"],
                                  ["key", "list", "--kms", "aws"]],
                         ids=["s3", "kms", "kms-list"])
def test_aws_features_without_boto3_say_how_to_get_it(stock_venv, tmp_path, args):
    env = venv_env(stock_venv)
    assert subprocess.run([str(stock_venv / "bin" / "python"), "-c", "import boto3"], env=env,
                          capture_output=True).returncode != 0, "boto3 must not come with a plain install"
    env["EVSCRYPT_HOME"] = str(tmp_path / "home")
    p = subprocess.run(["evscrypt", *args], env=env, capture_output=True, text=True)
    assert p.returncode == EXIT_UNSUPPORTED, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]  # one line, no traceback
    assert "needs boto3" in p.stderr and "pip install 'evscrypt[aws]'" in p.stderr


@needs_fio
@pytest.mark.fuse
def test_daemon_from_the_pip_venv_attaches_and_passes_fio_verify(stock_venv, tmp_path):
    reason = fuse_skip_reason()
    if reason:
        pytest.skip(reason)
    d = Daemon(tmp_path / "home", log_dir=tmp_path, exe=str(stock_venv / "bin" / "evscrypt"), data_path="trio")
    d.env = {**venv_env(stock_venv), **{k: v for k, v in d.env.items() if k.startswith("EVSCRYPT_")}}
    try:
        d.start()
        d.cli("volume", "create", "pip", "--size", "48M")
        path = d.attach("pip")
        job = run_fio(path, ["--rw=randwrite", "--bs=4k", "--ioengine=libaio", "--iodepth=16", "--direct=1",
                             "--do_verify=1"])
        assert job["read"]["io_bytes"] == 32 << 20  # the verify pass read everything back
        st = json.loads(d.cli("status", "--json").stdout)
        assert st["data_path"] == "trio" and st["discard"] is False
        [v] = st["volumes"]
        assert v["name"] == "pip" and v["io"]["errors"] == 0 and v["io"]["writes"] > 0
        d.cli("detach", "pip")
        d.stop()
    finally:
        d.cleanup()
