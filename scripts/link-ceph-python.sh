#!/usr/bin/env bash
# Link Debian's `rados` and `rbd` extension modules (python3-rados,
# python3-rbd) into a venv's site-packages, so the RBD store can import them.
# Only when the venv's Python has the same extension ABI as Debian's python3
# (same EXT_SUFFIX, e.g. .cpython-311-x86_64-linux-gnu.so); otherwise it says
# so and links nothing, and the RBD store and its tests are unavailable.
# Idempotent.  Usage: scripts/link-ceph-python.sh VENV
set -euo pipefail
VENV=${1:?usage: $0 VENV}
DIST=/usr/lib/python3/dist-packages

read -r suffix site < <("$VENV/bin/python" -c \
    'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"), sysconfig.get_paths()["platlib"])')
for mod in rados rbd; do
    src=$DIST/$mod$suffix
    if [[ ! -f $src ]]; then
        echo "link-ceph-python: no $src (python3-$mod missing, or another Python ABI); RBD store unavailable" >&2
        continue
    fi
    [[ $(readlink "$site/$mod$suffix" 2>/dev/null) == "$src" ]] || ln -sfn "$src" "$site/$mod$suffix"
done
