#!/usr/bin/env bash
# build-pyfuse3.sh VENV
#
# Install into VENV a pyfuse3 3.5.0 with two patches, applied in order:
# - patches/pyfuse3-3.5.0-fallocate.patch forwards FUSE fallocate requests to
#   Operations.fallocate(fh, mode, offset, length).  Without it, fallocate(2)
#   on a pyfuse3 mount fails with EOPNOTSUPP and never reaches Python.
# - patches/pyfuse3-3.5.0-threads.patch adds pyfuse3.main_threads(): worker
#   threads that receive requests and answer those of the data path (read,
#   write, getattr, fsync, flush) synchronously, in parallel, and count them
#   (the daemon's data path; see the patch header).
# - patches/pyfuse3-3.5.0-cfilter.patch adds pyfuse3.set_request_filter(): a C
#   function that answers requests in the worker threads without the GIL
#   (evscrypt's C data path), an adaptive spin before a worker sleeps, and
#   the enable_splice_read and max_background settings.
#
# Idempotent: if VENV already has a pyfuse3 with both, exit 0 at once.
# Otherwise download the pyfuse3 3.5.0 sdist (sha256 checked), apply the
# patches, delete the shipped Cython output (src/pyfuse3/__init__.c) so that it
# is generated again from the patched sources, and build and install the
# package with VENV's pip.  pip builds in an isolated environment with
# setuptools, setuptools_scm and Cython (pinned below) from the package
# index, so nothing but pyfuse3 changes in VENV.  The installed version is
# 3.5.0+evscrypt.DIGEST (see LOCAL_VERSION).
#
# Needs: gcc, pkg-config, libfuse3-dev, the Python headers of VENV's
# interpreter (already needed to install pyfuse3 from PyPI, which has no
# wheels), and access to the package index.
set -euo pipefail

# The patches are made for this release and no other: their hunks, the
# sdist's sha256 and the Cython below are its.  PYFUSE3_VERSION may be set
# only to say so again; any other version fails here, before any download.
PATCHED_FOR=3.5.0
PYFUSE3_VERSION=${PYFUSE3_VERSION:-$PATCHED_FOR}
SDIST_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
# The Cython that generated the __init__.c shipped in the 3.5.0 sdist.
CYTHON_VERSION=3.2.4
# The local version label carries a digest of the patches, so that a venv
# with an older patched build is rebuilt when a patch changes.

die() { echo "build-pyfuse3: error: $*" >&2; exit 1; }
say() { echo "build-pyfuse3: $*"; }

(($# == 1)) || die "usage: $0 VENV"
[[ $PYFUSE3_VERSION == "$PATCHED_FOR" ]] || die "the patches are made for pyfuse3 $PATCHED_FOR; pyfuse3 \
$PYFUSE3_VERSION is not supported with them.  Use $PATCHED_FOR, or run stock pyfuse3 $PYFUSE3_VERSION \
without the patches (pip install pyfuse3==$PYFUSE3_VERSION: the trio data path, no discard)"
VENV=$(cd "$1" 2>/dev/null && pwd) || die "no such directory: $1"
PY=$VENV/bin/python
[[ -x $PY ]] || die "$PY is missing or not executable"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCHES=("$HERE/../patches/pyfuse3-$PYFUSE3_VERSION-fallocate.patch"
         "$HERE/../patches/pyfuse3-$PYFUSE3_VERSION-threads.patch"
         "$HERE/../patches/pyfuse3-$PYFUSE3_VERSION-cfilter.patch")
for PATCH in "${PATCHES[@]}"; do
    [[ -f $PATCH ]] || die "patch not found: $PATCH"
done
LOCAL_VERSION=$PYFUSE3_VERSION+evscrypt.$(cat "${PATCHES[@]}" | sha256sum | cut -c1-12)
export LOCAL_VERSION

# The Python stub alone proves nothing (it is pure Python); the compiled
# module must contain the new C handler too, or the op is not registered.
check() {
    "$PY" - <<'EOF'
import importlib.metadata
import os
import sys
import pyfuse3
have = importlib.metadata.version("pyfuse3")
if have != os.environ["LOCAL_VERSION"]:
    sys.exit("pyfuse3 %s is not the build of the current patches" % have)
if not hasattr(pyfuse3.Operations, "fallocate"):
    sys.exit("pyfuse3.Operations has no fallocate")
with open(pyfuse3.__file__, "rb") as f:
    if b"fuse_fallocate" not in f.read():
        sys.exit("%s has no fuse_fallocate handler" % pyfuse3.__file__)
if not hasattr(pyfuse3, "main_threads"):
    sys.exit("pyfuse3 has no main_threads")
if not hasattr(pyfuse3, "set_request_filter"):
    sys.exit("pyfuse3 has no set_request_filter")
EOF
}

if check >/dev/null 2>&1; then
    say "pyfuse3 in $VENV is already patched; nothing to do"
    exit 0
fi

SECONDS=0
have=$("$PY" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' 2>/dev/null) || have="not installed"
say "pyfuse3 in $VENV: $have; building patched pyfuse3 $LOCAL_VERSION"

# Fail early, with a clear message, on missing build prerequisites.
command -v gcc >/dev/null || die "gcc not found (apt-get install gcc)"
command -v pkg-config >/dev/null || die "pkg-config not found (apt-get install pkg-config)"
pkg-config --atleast-version=3.2.0 fuse3 || die "libfuse3 development files not found (apt-get install libfuse3-dev)"
inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])') || die "$PY does not run"
[[ -f $inc/Python.h ]] || die "$inc/Python.h not found: install the Python headers for $PY (Debian: python3-dev)"
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/build-pyfuse3.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# Pin Cython in pip's isolated build environment (PIP_CONSTRAINT reaches the
# pip that installs the build requirements); keep any constraints already set.
echo "Cython==$CYTHON_VERSION" >"$TMP/constraints.txt"
export PIP_CONSTRAINT="${PIP_CONSTRAINT:+$PIP_CONSTRAINT }$TMP/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1

say "downloading the pyfuse3 $PYFUSE3_VERSION sdist"
# --no-binary only for pyfuse3: with :all: pip would also build the build
# requirements (Cython!) from source, which takes minutes.
"$PY" -m pip download -q --no-deps --no-binary pyfuse3 -d "$TMP/dl" "pyfuse3==$PYFUSE3_VERSION" \
    || die "pip download of pyfuse3==$PYFUSE3_VERSION failed"
SDIST=$TMP/dl/pyfuse3-$PYFUSE3_VERSION.tar.gz
[[ -f $SDIST ]] || die "pip download did not produce $SDIST"
got=$(sha256sum "$SDIST" | cut -d' ' -f1)
[[ $got == "$SDIST_SHA256" ]] || die "sha256 mismatch for $SDIST: got $got, want $SDIST_SHA256"

tar -xzf "$SDIST" -C "$TMP" || die "cannot unpack $SDIST"
SRC=$TMP/pyfuse3-$PYFUSE3_VERSION
for PATCH in "${PATCHES[@]}"; do
say "applying $(basename "$PATCH")"
if command -v patch >/dev/null; then
    patch -d "$SRC" -p1 --forward --batch --no-backup-if-mismatch <"$PATCH" >"$TMP/patch.log" \
        || { cat "$TMP/patch.log" >&2; die "the patch does not apply"; }
else
    # No GNU patch (it is not part of a minimal Debian): apply the unified
    # diff with Python.  Strict: every hunk must match exactly where it says
    # (the sdist is pinned by its sha256, so it does).
    "$PY" - "$SRC" "$PATCH" <<'EOF' || die "the patch does not apply"
import re, sys
root, patch = sys.argv[1], sys.argv[2]
lines = open(patch, encoding="utf-8").read().splitlines(keepends=True)
i = 0
while i < len(lines):
    if not (lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")):
        i += 1
        continue
    path = lines[i + 1][4:].split("\t")[0].strip().split("/", 1)[1]
    i += 2
    with open(f"{root}/{path}", encoding="utf-8") as f:
        old = f.read().splitlines(keepends=True)
    new, pos = [], 0
    while i < len(lines) and lines[i].startswith("@@"):
        m = re.match(r"@@ -(\d+)(?:,(\d+))? \+\d+(?:,\d+)? @@", lines[i])
        start = int(m.group(1)) - (0 if m.group(2) == "0" else 1)
        new += old[pos:start]
        pos = start
        i += 1
        while i < len(lines) and lines[i][:1] in (" ", "-", "+", "\\"):
            tag, text = lines[i][:1], lines[i][1:]
            if tag in " -":
                if old[pos] != text:
                    sys.exit(f"{path}:{pos + 1}: context does not match")
                pos += 1
            if tag in " +":
                new.append(text)
            i += 1
    new += old[pos:]
    with open(f"{root}/{path}", "w", encoding="utf-8") as f:
        f.writelines(new)
    print(f"patched {path}")
EOF
fi

done

# The sdist ships a pre-generated __init__.c; remove it so that the build must
# run Cython on the patched .pyx/.pxi (without Cython it then fails loudly).
rm -f "$SRC/src/pyfuse3/__init__.c"

say "building and installing into $VENV (Cython $CYTHON_VERSION)"
# The local version label marks the build as patched; it also keeps
# setuptools_scm from taking the version of some enclosing git checkout.
SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3=$LOCAL_VERSION \
    "$PY" -m pip install -q --no-deps --force-reinstall "$SRC" \
    || die "building/installing the patched pyfuse3 failed (see pip output above)"
grep -q _worker_thread "$SRC/src/pyfuse3/__init__.c" 2>/dev/null \
    || die "Cython did not regenerate src/pyfuse3/__init__.c from the patched sources"

if ! out=$(check 2>&1); then
    die "installed, but the check still fails: $out"
fi
say "done: pyfuse3 $LOCAL_VERSION (fallocate, worker threads) in $VENV (${SECONDS}s)"
