"""Packaging: `python -m build` makes an sdist and a wheel; the wheel builds
from the sdist with a plain C compiler and no network; where the compiler
lacks the VAES intrinsics, _xtsvaes is a stub and EVP runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import CHECKOUT

CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")
X86_64 = os.uname().machine == "x86_64"


def _run(argv, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=900, **kw)
    assert p.returncode == 0, \
        f"{' '.join(map(str, argv))} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _extensions(names) -> set[str]:
    return {n.split("/")[-1].split(".")[0] for n in names if n.startswith("evscrypt/crypto/_xts") and n.endswith(".so")}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(CHECKOUT)])
    return out


@pytest.fixture(scope="module")
def build_venv(tmp_path_factory) -> Path:
    """A venv with the build requirements, for builds without isolation."""
    venv = tmp_path_factory.mktemp("buildenv")
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "setuptools>=61", "wheel",
          "build"])
    return venv


@needs_cc
def test_python_m_build_makes_an_sdist_and_a_wheel(dist):
    from evscrypt import __version__

    [sdist] = dist.glob("*.tar.gz")
    [wheel] = dist.glob("*.whl")
    assert sdist.name == f"evscrypt-{__version__}.tar.gz"
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for need in ("setup.py", "pyproject.toml", "README.md", "evscrypt/crypto/_xtsvaes.c",
                 "evscrypt/crypto/_xtsloop.c", "evscrypt/crypto/_xtssector.h", "evscrypt/daemon/datapath.py",
                 "evscrypt/daemon/_cpath.c", "evscrypt/daemon/_cpath_rbd.c", "evscrypt/daemon/_cpath.h",
                 "evscrypt/crypto/backend.py"):
        assert need in names, need
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(f"evscrypt-{__version__}.dist-info/METADATA").decode()
        entry = z.read(f"evscrypt-{__version__}.dist-info/entry_points.txt").decode()
    assert _extensions(names) == {"_xtsloop", "_xtsvaes"}
    assert "evscrypt = evscrypt.entry:main" in entry
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    plain = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith("boto3") for r in plain), "boto3 belongs to the aws extra"
    assert any(r.startswith("boto3") and 'extra == "aws"' in r for r in requires)
    assert not any(r.startswith(("pytest", "moto", "hypothesis")) for r in plain)


@needs_cc
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_the_wheel_builds_from_the_sdist_with_no_network(dist, build_venv, tmp_path):
    """The build requirements (setuptools, wheel) go into a venv first; then,
    in a network namespace of its own (no interface but a down loopback)
    and without build isolation (which would fetch them), the wheel is built
    with the C compiler and the Python headers only."""
    [sdist] = dist.glob("*.tar.gz")
    venv = build_venv
    out = tmp_path / "wheel"
    p = _run(["unshare", "--net", str(venv / "bin" / "python"), "-m", "build", "--no-isolation", "--wheel",
              "--outdir", str(out), str(sdist)])
    assert "_xtsvaes is built as a stub" not in p.stdout
    [wheel] = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert _extensions(z.namelist()) == {"_xtsloop", "_xtsvaes"}
        z.extractall(tmp_path / "unpacked")
    so = next((tmp_path / "unpacked" / "evscrypt" / "crypto").glob("_xtsvaes*.so"))
    got = _run([sys.executable, "-c", LOAD_STUB, str(so)], cwd=tmp_path).stdout.split()
    assert got[:1] == [str(X86_64)]  # BUILT: the real VAES code, where the compiler has it


#: Load an _xtsvaes build in place of the installed one, then report
#: BUILT, SUPPORTED, the implementation chosen and whether it is right.
LOAD_STUB = textwrap.dedent("""
    import importlib.util, os, sys
    import evscrypt.crypto
    spec = importlib.util.spec_from_file_location("evscrypt.crypto._xtsvaes", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["evscrypt.crypto._xtsvaes"] = mod
    from evscrypt.crypto import backend, vaes
    from evscrypt.crypto.xts import SectorCipher, reference_crypt
    from evscrypt.errors import UnsupportedFeature
    from evscrypt.secret import Secret
    assert vaes._xtsvaes is mod
    key = Secret.random(64)
    c = SectorCipher(key)
    data = os.urandom(3 * 4096)
    right = bytes(c.encrypt(7, data)) == reference_crypt(bytes(key.buffer), 7, data, True)
    os.environ["EVSCRYPT_XTS"] = "vaes"
    try:
        SectorCipher(key)
        forced = "ok"
    except UnsupportedFeature as e:
        forced = e.message.replace(" ", "_")
    print(mod.BUILT, mod.SUPPORTED, c.path, right, forced)
""")


@needs_cc
def test_without_the_intrinsics_vaes_is_a_stub_and_evp_runs(tmp_path):
    """-DEVSCRYPT_NO_VAES is what setup.py defines when its probe finds no
    VAES intrinsics in the compiler: the module still imports, reports
    itself unsupported, and the cipher runs (correctly) on EVP; forcing
    vaes is a clear error."""
    so = tmp_path / ("_xtsvaes" + sysconfig.get_config_var("EXT_SUFFIX"))
    _run([CC, "-shared", "-fPIC", "-O1", "-DEVSCRYPT_NO_VAES", f"-I{sysconfig.get_paths()['include']}",
          str(CHECKOUT / "evscrypt" / "crypto" / "_xtsvaes.c"), "-o", str(so)])
    env = {k: v for k, v in os.environ.items() if k != "EVSCRYPT_XTS"}
    built, supported, path, right, forced = _run([sys.executable, "-c", LOAD_STUB, str(so)], env=env,
                                                 cwd=tmp_path).stdout.split()
    assert (built, supported, path, right) == ("False", "False", "evp", "True")
    assert "EVSCRYPT_XTS=vaes" in forced and "stub" in forced


@needs_cc
def test_setup_py_builds_the_stub_where_the_compiler_lacks_the_intrinsics(dist, build_venv, tmp_path):
    """setup.py's probe decides: a compiler that cannot compile the probe
    (a wrapper that refuses it, as an old gcc refuses target("vaes")) gets
    the stub, and the rest of the build goes on."""
    [sdist] = dist.glob("*.tar.gz")
    cc = tmp_path / "cc-without-vaes"
    cc.write_text(f'#!/bin/sh\ncase "$*" in *vaes_probe.c*) echo "error: no vaes" >&2; exit 1;; esac\nexec {CC} "$@"\n')
    cc.chmod(0o755)
    out = tmp_path / "wheel"
    p = _run([str(build_venv / "bin" / "python"), "-m", "build", "--no-isolation", "--wheel", "--outdir", str(out),
              str(sdist)], env={**os.environ, "CC": str(cc)})
    assert "_xtsvaes is built as a stub" in p.stdout
    [wheel] = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert _extensions(z.namelist()) == {"_xtsloop", "_xtsvaes"}
        z.extractall(tmp_path / "unpacked")
    so = next((tmp_path / "unpacked" / "evscrypt" / "crypto").glob("_xtsvaes*.so"))
    env = {k: v for k, v in os.environ.items() if k != "EVSCRYPT_XTS"}
    built, supported, path, right, _ = _run([sys.executable, "-c", LOAD_STUB, str(so)], env=env,
                                            cwd=tmp_path).stdout.split()
    assert (built, supported, path, right) == ("False", "False", "evp", "True")


@pytest.mark.parametrize("version", ["3.6.0", "3.4.2"])
def test_the_patched_build_is_pinned_to_3_5_0(version):
    """Any other pyfuse3 with the patches is refused with a clear message,
    before anything is downloaded or changed in the venv."""
    from evscrypt.daemon.datapath import PATCHED_VERSION

    import pyfuse3

    before = pyfuse3.__version__
    p = subprocess.run([str(CHECKOUT / "scripts" / "build-pyfuse3.sh"), str(Path(sys.executable).parent.parent)],
                       env={**os.environ, "PYFUSE3_VERSION": version}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith(f"build-pyfuse3: error: the patches are made for pyfuse3 {PATCHED_VERSION}; "
                               f"pyfuse3 {version} is not supported with them.")
    assert f"pip install pyfuse3=={version}" in p.stderr
    out = subprocess.run([sys.executable, "-c", "import pyfuse3; print(pyfuse3.__version__)"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == before
