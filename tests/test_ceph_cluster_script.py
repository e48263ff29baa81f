"""scripts/ceph-cluster.sh beyond `start` and `stop`, which every RBD test
uses through the ceph_cluster fixture: `env`, and its refusals."""

from __future__ import annotations

import subprocess

from ceph_fixture import SCRIPT


def run(*args):
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_env_prints_the_conf(ceph_cluster):
    r = run("env", ceph_cluster.dir)
    assert r.returncode == 0 and r.stdout == f"export CEPH_CONF={ceph_cluster.conf}\n"


def test_start_refuses_a_running_cluster(ceph_cluster):
    r = run("start", ceph_cluster.dir)
    assert r.returncode != 0 and "already holds a cluster" in r.stderr
    assert "osd.0 up" in ceph_cluster.ceph("osd", "dump"), "the running cluster is untouched"


def test_stop_and_env_refuse_other_directories(tmp_path):
    for cmd in ("stop", "env"):
        r = run(cmd, tmp_path)
        assert r.returncode != 0 and "is not a cluster directory" in r.stderr
    assert tmp_path.exists(), "stop removes nothing that is not a cluster"
    r = run("frobnicate", tmp_path)
    assert r.returncode != 0 and "usage" in r.stderr
