#!/usr/bin/env bash
# make demo: the main job end to end on the local soft-HSM, in a scratch
# state directory: create an encrypted volume, attach it through the daemon,
# run fio with verification on the plaintext disk file, detach (wiping the key).
set -euo pipefail
cd "$(dirname "$0")/.."
EVS=$PWD/.venv/bin/evscrypt
export EVSCRYPT_HOME=${EVSCRYPT_HOME:-$(mktemp -d /tmp/evscrypt-demo.XXXXXX)}
export EVSCRYPT_RUNTIME_DIR=${EVSCRYPT_RUNTIME_DIR:-$(mktemp -d /tmp/evscrypt-run.XXXXXX)}
log=$EVSCRYPT_RUNTIME_DIR/daemon.log
daemon_pid=

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid"; wait "$daemon_pid" || true
    fi
}
trap cleanup EXIT

step "state in $EVSCRYPT_HOME, runtime in $EVSCRYPT_RUNTIME_DIR"
step "evscrypt volume create demo --size 1G   (encrypted under evs/default)"
$EVS volume create demo --size 1G
$EVS volume info demo
step "evscrypt key list"
$EVS key list

step "evscrypt daemon   (log: $log)"
$EVS daemon 2>"$log" &
daemon_pid=$!
for _ in $(seq 100); do $EVS status >/dev/null 2>&1 && break; sleep 0.1; done
$EVS status >/dev/null

step "evscrypt attach demo"
disk=$($EVS attach demo)
echo "$disk"
ls -l "$disk"

# The FUSE requests the daemon has received, by opcode (status --json, as root).
requests() { $EVS status --json >"$EVSCRYPT_RUNTIME_DIR/$1.json"; }

step "fio on $disk: 4k random write+verify (libaio QD16); 4k random read+write, 70% reads (QD16); 1M sequential read (QD8)"
fio --name=randwrite-verify --filename="$disk" --direct=1 --ioengine=libaio --iodepth=16 \
    --rw=randwrite --bs=4k --size=64M --verify=crc32c --do_verify=1 --verify_state_save=0 --output-format=terse \
    --terse-version=3 >/dev/null
requests before
fio --name=rand4k --filename="$disk" --direct=1 --ioengine=libaio --iodepth=16 --rw=randrw --rwmixread=70 \
    --bs=4k --size=256M --runtime=5 --time_based --group_reporting --minimal >"$EVSCRYPT_RUNTIME_DIR/r1"
requests after
fio --name=seq1m --filename="$disk" --direct=1 --ioengine=libaio --iodepth=8 --rw=read \
    --bs=1M --size=256M --runtime=5 --time_based --group_reporting --minimal >"$EVSCRYPT_RUNTIME_DIR/r2"
awk -F';' '{printf "  %-8s read %8.1f MiB/s %8d IOPS   write %8.1f MiB/s %8d IOPS\n", $3, $7/1024, $8, $48/1024, $49}' \
    "$EVSCRYPT_RUNTIME_DIR/r1" "$EVSCRYPT_RUNTIME_DIR/r2"
"$PWD/.venv/bin/python" - "$EVSCRYPT_RUNTIME_DIR/before.json" "$EVSCRYPT_RUNTIME_DIR/after.json" <<'EOF'
import json, sys
before, after = (json.load(open(p)).get("fuse_requests") for p in sys.argv[1:])
if after is not None:  # root only
    n = {op: after.get(op, 0) - before.get(op, 0) for op in ("READ", "WRITE", "GETATTR")}
    print("  rand4k   the daemon received %(READ)d READ, %(WRITE)d WRITE and %(GETATTR)d GETATTR requests" % n)
EOF
echo "  verify: crc32c over 64 MiB of random 4k writes passed"

step "evscrypt status"
$EVS status

step "evscrypt detach demo   (flush, unexpose, wipe the data key)"
$EVS detach demo
$EVS status

step "the backing image holds only ciphertext and a wrapped key"
img=$EVSCRYPT_HOME/volumes/demo.img
printf '  %s: %s apparent, %s allocated\n' "$img" "$(du -h --apparent-size "$img" | cut -f1)" "$(du -h "$img" | cut -f1)"
kill -TERM "$daemon_pid"; wait "$daemon_pid"; daemon_pid=
echo "daemon stopped; demo state left in $EVSCRYPT_HOME"
