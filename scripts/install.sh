#!/usr/bin/env bash
# make install: system packages (as root), the venv, and the package with its
# test extra.  Idempotent; a second run with nothing missing takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc fio cryptsetup-bin e2fsprogs xfsprogs util-linux kmod systemd
              ceph-mon ceph-osd ceph-common python3-rados python3-rbd)
PYTHON=${PYTHON:-python3}
VENV=.venv

. scripts/apt-ensure.sh
apt_ensure install "${APT_PACKAGES[@]}"

if [[ ! -x $VENV/bin/python ]]; then
    echo "install: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp=$VENV/.evscrypt-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp || setup.py -nt $stamp || evscrypt/crypto/_xtsloop.c -nt $stamp || evscrypt/crypto/_xtsvaes.c -nt $stamp
      || evscrypt/crypto/_xtssector.h -nt $stamp || evscrypt/daemon/_cpath.c -nt $stamp
      || evscrypt/daemon/_cpath_rbd.c -nt $stamp || evscrypt/daemon/_cpath.h -nt $stamp
      || scripts/install.sh -nt $stamp ]]; then
    echo "install: pip install -e .[test]"
    # compat mode: the editable install is a plain path entry; the default
    # mode installs an import hook that costs every `evscrypt` command ~10 ms
    # of start-up (pathlib, importlib.util, re).
    "$VENV/bin/pip" install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[test]'
    touch "$stamp"
fi
# Byte-compile the sources: where PYTHONDONTWRITEBYTECODE is set, Python
# never caches them itself, and every `evscrypt` command would compile its
# modules again (~25 ms of each command's start-up).  Quick when up to date.
"$VENV/bin/python" -m compileall -q evscrypt >/dev/null
# librados and librbd come only from Debian (no PyPI package has them): link
# their python3.11 extension modules into the venv when its ABI is the same.
scripts/link-ceph-python.sh "$VENV"
# pyfuse3 3.5.0 lacks the fallocate op (discard); rebuild it with our patch.
scripts/build-pyfuse3.sh "$VENV"
