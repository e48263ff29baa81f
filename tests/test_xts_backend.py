"""Which XTS implementation runs (crypto/backend.py), and its overrides.

The rule: EVP where the system libcrypto has its own VAES XTS (OpenSSL >=
3.5 on a CPU with what that code needs), else our VAES where the CPU has
it, else EVP, else the reference.  The libcrypto version and the CPU flags
are replaced here to walk every branch; the real ones are checked against
independent sources (Python's ssl module, /proc/cpuinfo).
"""

from __future__ import annotations

import re
import ssl
import subprocess

import pytest

from evscrypt.crypto import backend, evp, vaes
from evscrypt.crypto.xts import SectorCipher
from evscrypt.errors import InvalidArgument, UnsupportedFeature
from evscrypt.secret import Secret

ALL_FLAGS = backend.OPENSSL_VAES_XTS_CPU | {"aes", "avx2"}


@pytest.fixture(autouse=True)
def _unforced(monkeypatch):
    monkeypatch.delenv("EVSCRYPT_XTS", raising=False)


def machine(monkeypatch, openssl: int, flags=ALL_FLAGS, have_vaes: bool = True, have_evp: bool = True) -> None:
    monkeypatch.setattr(evp, "version_num", lambda: openssl)
    monkeypatch.setattr(evp, "available", lambda: have_evp)
    monkeypatch.setattr(backend, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(vaes, "available", lambda: have_vaes)


@pytest.mark.parametrize("openssl, flags, have_vaes, have_evp, want", [
    (0x30500000, ALL_FLAGS, True, True, "evp"),  # OpenSSL 3.5: its own VAES XTS
    (0x40100010, ALL_FLAGS, True, True, "evp"),  # and later
    (0x30500000, ALL_FLAGS - {"avx512_vbmi2"}, True, True, "vaes"),  # 3.5 would not use its VAES code here
    (0x30000130, ALL_FLAGS, True, True, "vaes"),  # OpenSSL 3.0: ours is twice as fast
    (0x30000130, {"aes"}, False, True, "evp"),  # no VAES in the CPU
    (0x30500000, ALL_FLAGS, True, False, "vaes"),  # no libcrypto at all
    (0, {"aes"}, False, False, "reference"),
], ids=["3.5-vaes-cpu", "4.1-vaes-cpu", "3.5-no-vbmi2", "3.0-vaes-cpu", "3.0-old-cpu", "no-libcrypto",
        "nothing"])
def test_default_follows_the_rule(monkeypatch, openssl, flags, have_vaes, have_evp, want):
    machine(monkeypatch, openssl, flags, have_vaes, have_evp)
    assert backend.default() == want == backend.choose()


def test_this_machine(monkeypatch):
    """The real inputs: the default here is what the rule says for them."""
    ossl_35 = evp.version_num() >= 0x30500000
    cpu_ok = backend.OPENSSL_VAES_XTS_CPU <= backend.cpu_flags()
    want = "evp" if evp.available() and ossl_35 and cpu_ok else "vaes" if vaes.available() else \
        "evp" if evp.available() else "reference"
    c = SectorCipher(Secret.random(64))
    assert c.path == want
    c.close()


@pytest.mark.skipif(not evp.available(), reason="libcrypto is not loadable")
def test_libcrypto_version_matches_the_ssl_module():
    """Python's ssl module links the same system OpenSSL: an independent
    reading of the version, as a string and as the version number."""
    m = re.match(r"OpenSSL (\d+)\.(\d+)\.(\d+)", ssl.OPENSSL_VERSION)
    if m is None:
        pytest.skip(f"the ssl module is not on OpenSSL: {ssl.OPENSSL_VERSION}")
    major, minor, patch = map(int, m.groups())
    assert evp.version() == f"{major}.{minor}.{patch}"
    assert evp.version_num() == ssl.OPENSSL_VERSION_NUMBER  # both 0xMNN00PP0 (OpenSSL 3 numbering)
    assert evp.version_num() >> 4 == major << 24 | minor << 16 | patch
    assert backend.describe("evp") == f"evp openssl {major}.{minor}.{patch}"
    assert backend.describe("vaes") == "vaes" and backend.describe("reference") == "reference"


def test_cpu_flags_are_the_kernels():
    out = subprocess.run(["grep", "-m1", "^flags", "/proc/cpuinfo"], capture_output=True, text=True).stdout
    assert backend.cpu_flags() == frozenset(out.split(":", 1)[1].split()) if out else frozenset()


@pytest.mark.parametrize("name", backend.NAMES)
def test_override_forces_an_available_one(monkeypatch, name):
    if name == "vaes" and not vaes.available():
        pytest.skip("this CPU has no VAES/AVX-512")
    if name == "evp" and not evp.available():
        pytest.skip("libcrypto is not loadable")
    monkeypatch.setenv("EVSCRYPT_XTS", name)
    c = SectorCipher(Secret.random(64))
    assert c.path == name
    c.close()


def test_forcing_vaes_where_it_is_missing_is_an_error(monkeypatch):
    monkeypatch.setattr(vaes, "_xtsvaes", None)
    monkeypatch.setenv("EVSCRYPT_XTS", "vaes")
    with pytest.raises(UnsupportedFeature, match="EVSCRYPT_XTS=vaes: evscrypt was installed without"):
        SectorCipher(Secret.random(64))


def test_forcing_vaes_on_a_cpu_without_it_is_an_error(monkeypatch):
    class NoCpu:
        BUILT, SUPPORTED = True, False

    monkeypatch.setattr(vaes, "_xtsvaes", NoCpu)
    monkeypatch.setenv("EVSCRYPT_XTS", "vaes")
    with pytest.raises(UnsupportedFeature, match="this CPU .*has no VAES"):
        backend.choose()


def test_forcing_evp_without_libcrypto_is_an_error(monkeypatch):
    monkeypatch.setattr(evp, "available", lambda: False)
    monkeypatch.setenv("EVSCRYPT_XTS", "evp")
    with pytest.raises(UnsupportedFeature, match="EVSCRYPT_XTS=evp: the system libcrypto"):
        SectorCipher(Secret.random(64))


@pytest.mark.parametrize("value", ["fast", "VAES", "openssl"])
def test_an_unknown_override_is_refused(monkeypatch, value):
    monkeypatch.setenv("EVSCRYPT_XTS", value)
    with pytest.raises(InvalidArgument, match="choose one of vaes, evp, reference"):
        SectorCipher(Secret.random(64))


def test_the_daemon_refuses_to_start_on_a_bad_override(tmp_path):
    """Checked at start, not at the first attach; one line, its exit code."""
    from daemon_fixture import EVSCRYPT

    env = {"PATH": "/usr/bin:/bin", "EVSCRYPT_HOME": str(tmp_path / "h"), "EVSCRYPT_RUNTIME_DIR": str(tmp_path / "r"),
           "EVSCRYPT_XTS": "fast"}
    p = subprocess.run([EVSCRYPT, "daemon"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == InvalidArgument.exit_code
    assert [line for line in p.stderr.splitlines() if line.startswith("evscrypt: error:")] == \
        ["evscrypt: error: EVSCRYPT_XTS='fast': choose one of vaes, evp, reference (or leave it unset)"]
    assert "Traceback" not in p.stderr


def test_version_names_the_backend():
    env = {"PATH": "/usr/bin:/bin", "EVSCRYPT_XTS": "reference"}
    from daemon_fixture import EVSCRYPT

    out = subprocess.run([EVSCRYPT, "--version"], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[2] == "XTS backend: reference"
    env["EVSCRYPT_XTS"] = "fast"
    out = subprocess.run([EVSCRYPT, "--version"], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[2].startswith("XTS backend: refused: EVSCRYPT_XTS='fast'")
