"""The daemon's probe of pyfuse3 (evscrypt/daemon/datapath.py), on stand-ins
for each kind of pyfuse3 and on the real one installed here."""

from __future__ import annotations

import types

import pytest

from evscrypt.daemon import datapath
from evscrypt.errors import UnsupportedFeature


def fake(version: str, threads: bool, fallocate: bool):
    ops = type("Operations", (), {"fallocate": (lambda self, *a: None)} if fallocate else {})
    mod = types.SimpleNamespace(__version__=version, Operations=ops, main=lambda: None)
    if threads:
        mod.main_threads = lambda n: None
    return mod


def test_stock_pyfuse3_runs_the_trio_path_without_discard():
    dp = datapath.probe(fake("3.5.0", threads=False, fallocate=False))
    assert (dp.name, dp.discard) == ("trio", False)
    assert dp.describe().startswith("trio (") and "discard answers EOPNOTSUPP; stock pyfuse3 3.5.0" in dp.describe()


def test_the_patched_build_runs_the_threads_path_with_discard():
    dp = datapath.probe(fake("3.5.0+evscrypt.0123456789ab", threads=True, fallocate=True))
    assert (dp.name, dp.discard) == ("threads", True)
    assert "discard on; patched pyfuse3 3.5.0+evscrypt.0123456789ab" in dp.describe()


def test_an_upstream_fallocate_alone_gives_discard_on_the_trio_path():
    """If upstream takes the fallocate patch, discard works without ours."""
    dp = datapath.probe(fake("3.6.0", threads=False, fallocate=True))
    assert (dp.name, dp.discard) == ("trio", True)


@pytest.mark.parametrize("version", ["3.6.0", "3.5.0", "3.5.0+other.1"])
def test_main_threads_on_anything_but_our_build_is_refused(version):
    with pytest.raises(UnsupportedFeature) as e:
        datapath.probe(fake(version, threads=True, fallocate=True))
    want = f"pyfuse3 {version} has main_threads() but is not evscrypt's patched build of pyfuse3 3.5.0"
    assert want in e.value.message
    assert "make install" in e.value.message


def test_the_installed_pyfuse3():
    import pyfuse3

    dp = datapath.probe()
    assert dp.pyfuse3_version == pyfuse3.__version__
    assert dp.name == ("threads" if hasattr(pyfuse3, "main_threads") else "trio")
    fn = dp.main(1)
    assert (fn.func is pyfuse3.main_threads and fn.args == (1,)) if dp.name == "threads" else fn is pyfuse3.main
