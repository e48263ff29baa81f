#!/usr/bin/env bash
# make bench: fio side by side on a 256 MiB disk: a plain file, qemu-storage-daemon
# FUSE exports (raw and LUKS), gocryptfs, and evscrypt (encrypted, --no-encrypt,
# and on stock pyfuse3 as a pip install runs it), then bench/bench_multi.py: 1, 4 and 8
# busy disks at once.
# Installs the peers (as root) and matplotlib into the venv for the PNG (not a
# project dependency), then runs bench/bench_fio.py.  BENCH_RUNTIME=1 for a quick run;
# see bench/bench_fio.py for the other BENCH_* variables.  Then bench/bench_rbd.py:
# the RBD peers and evscrypt on an RBD pool.  `make bench-rbd` runs only the install
# steps (BENCH_ONLY_INSTALL=1), then bench_rbd.py: qemu-block-extra is qemu's rbd driver.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fio fuse3 qemu-utils qemu-system-common qemu-block-extra gocryptfs)
VENV=.venv

. scripts/apt-ensure.sh
APT_ENSURE_NOTE="those systems will be skipped" apt_ensure bench "${APT_PACKAGES[@]}"

if ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
    echo "bench: pip install matplotlib into $VENV (for the PNG only)"
    "$VENV/bin/pip" install -q --disable-pip-version-check matplotlib \
        || echo "bench: could not install matplotlib; the PNG will be skipped" >&2
fi

# make bench-rbd uses the install steps above only
[[ ${BENCH_ONLY_INSTALL:-} == 1 ]] && exit 0

# evs-stock: evscrypt as a plain `pip install` gives it (stock pyfuse3, the
# trio data path), in a venv of its own, remade when the sources change.
STOCK=.venv-stock
if [[ ! -x $STOCK/bin/evscrypt || -n $(find evscrypt pyproject.toml setup.py -newer "$STOCK/bin/evscrypt" -print -quit) ]]; then
    echo "bench: making $STOCK (pip install . with stock pyfuse3)"
    rm -rf "$STOCK"
    "${PYTHON:-python3}" -m venv "$STOCK"
    "$STOCK/bin/pip" install -q --disable-pip-version-check . \
        || echo "bench: could not make $STOCK; evs-stock will be skipped" >&2
    touch "$STOCK/bin/evscrypt" 2>/dev/null || true
fi

"$VENV/bin/python" bench/bench_fio.py "$@"
# many busy disks at once (1, 4, 8 volumes), beside qemu-storage-daemon LUKS
# with as many exports and plain files; BENCH_MULTI=0 skips it
[[ ${BENCH_MULTI:-1} == 0 ]] || "$VENV/bin/python" bench/bench_multi.py
# The RBD table: qemu-storage-daemon driver=rbd (+ luks) over FUSE, `rbd bench`
# as the unencrypted limit, and evscrypt on the pool (evs-rbd); its own cluster.
# BENCH_RBD=0 skips it.
[[ ${BENCH_RBD:-1} == 0 ]] || exec "$VENV/bin/python" bench/bench_rbd.py
