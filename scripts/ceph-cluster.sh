#!/usr/bin/env bash
# A throw-away single-node Ceph cluster for tests, CI and benchmarks: one
# ceph-mon and one ceph-osd (bluestore on a sparse file), no mgr, no systemd,
# no cephadm, listening on 127.0.0.1 only.  Everything lives in DIR.
#
#   scripts/ceph-cluster.sh start DIR [POOL...]  build and start it; create the pools
#   scripts/ceph-cluster.sh env DIR              print `export CEPH_CONF=...` for a shell
#   scripts/ceph-cluster.sh stop DIR             stop the daemons (osd first) and remove DIR
#
# Needs Debian's ceph-mon ceph-osd ceph-common (make install brings them).
# Several clusters can run at once (one per test session): each picks a free
# monitor port; the osd binds whatever free ports it finds.
set -euo pipefail

# Reasons for the settings are in docs/STORE.md ("The test cluster").
#: Size of the osd's sparse block file; only what is written takes space.
BLOCK_SIZE=${CEPH_CLUSTER_BLOCK_SIZE:-20G}
#: Upper bound on each wait; the waits end on events (osd up, process gone),
#: this only keeps a broken cluster from hanging CI.
WAIT_LIMIT=${CEPH_CLUSTER_WAIT_LIMIT:-120}

die() { echo "ceph-cluster: $*" >&2; exit 1; }

free_port() {
    # Ask the kernel for a free port; the small race with another process
    # taking it before ceph-mon binds is caught by start's retry.
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
    local dir=$1 port=$2 fsid=$3
    cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public addr = 127.0.0.1
ms bind msgr1 = false
keyring = $dir/keyring
run dir = $dir/run
log file = $dir/log/\$name.log
# clients (tests, evscrypt) get no admin socket: several processes with one
# client name would fight over its path
admin socket =
log to stderr = false
err to stderr = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
paxos propose interval = 0.05
auth cluster required = cephx
auth service required = cephx
auth client required = cephx

[mon]
mon data = $dir/mon.\$id
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid

[osd]
osd data = $dir/osd.\$id
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
osd objectstore = bluestore
bluestore block path = $dir/osd.\$id.block
bluestore block create = true
bluestore block size = $BLOCK_SIZE
bluestore block db create = false
bluestore block wal create = false
bluestore cache autotune = false
bluestore cache size = 128M
bluestore fsck on mkfs = false
bdev aio poll ms = 10
osd memory target = 1G
EOF
}

pid_of() { cat "$1/run/$2.pid" 2>/dev/null || true; }

running() {  # a zombie counts as gone: it holds no ports or files, and the
    # daemons were reparented to an init that may reap them only seconds later
    local state
    state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

wait_gone() {  # wait for a process to exit; bounded by WAIT_LIMIT
    local pid=$1 end=$((SECONDS + WAIT_LIMIT))
    while running "$pid"; do
        ((SECONDS < end)) || die "process $pid did not exit"
        sleep 0.01
    done
}

stop_daemon() {
    local dir=$1 name=$2 pid
    pid=$(pid_of "$dir" "$name")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    # only kill it if it is the daemon of this cluster
    grep -qF -- "$dir/ceph.conf" "/proc/$pid/cmdline" 2>/dev/null || return 0
    # SIGKILL: the cluster is thrown away, so there is nothing to shut down
    # cleanly, and SIGTERM costs seconds (the osd reports itself down and
    # waits for the mon's ack, the mon syncs its store)
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid"
}

cmd_stop() {
    local dir=$1
    [[ -f $dir/ceph.conf ]] || die "$dir is not a cluster directory"
    # the osd first: a mon that goes first makes the osd wait ~5 s for it
    stop_daemon "$dir" osd.0
    stop_daemon "$dir" mon.a
    rm -rf -- "$dir"
}

start_mon() {
    local dir=$1
    mkdir -p "$dir/mon.a"
    monmaptool --create --clobber --fsid "$(grep '^fsid' "$dir/ceph.conf" | cut -d' ' -f3)" \
        --addv a "[v2:127.0.0.1:$2]" "$dir/monmap" >/dev/null
    ceph-mon -c "$dir/ceph.conf" -i a --mkfs --monmap "$dir/monmap" --keyring "$dir/keyring" 2>>"$dir/log/setup.log"
    ceph-mon -c "$dir/ceph.conf" -i a </dev/null >>"$dir/log/setup.log" 2>&1
}

cmd_start() {
    local dir=$1; shift
    [[ ! -e $dir/ceph.conf ]] || die "$dir already holds a cluster"
    command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null || die "ceph-mon/ceph-osd are not installed"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    mkdir -p "$dir/run" "$dir/log" "$dir/osd.0"
    local fsid; fsid=$(cat /proc/sys/kernel/random/uuid)
    local conf=$dir/ceph.conf
    ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$dir/keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$dir/keyring" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap osd 'allow *' >/dev/null
    local tries=0
    while :; do  # a port taken between free_port and bind: try another
        write_conf "$dir" "$(free_port)" "$fsid"
        rm -rf "$dir/mon.a"
        start_mon "$dir" "$(sed -n 's/^mon host = v2:127.0.0.1://p' "$conf")" && break
        ((++tries < 5)) || die "ceph-mon would not start; see $dir/log"
    done
    local osd_uuid; osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    ceph -c "$conf" --connect-timeout "$WAIT_LIMIT" osd new "$osd_uuid" 0 >/dev/null
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" 2>>"$dir/log/setup.log" >/dev/null \
        || die "ceph-osd --mkfs failed; see $dir/log"
    ceph-osd -c "$conf" -i 0 </dev/null >>"$dir/log/setup.log" 2>&1
    # No client op before osd.0 is up: it would wait ~5 s for the next map.
    wait_osd_up "$conf"
    local pool
    for pool in "$@"; do
        ceph -c "$conf" osd pool create "$pool" 8 8 >/dev/null 2>&1
        rbd -c "$conf" pool init "$pool"
    done
}

wait_osd_up() {  # `ceph osd dump` until osd.0 is up; bounded by WAIT_LIMIT
    local conf=$1 end=$((SECONDS + WAIT_LIMIT))
    until ceph -c "$conf" osd dump 2>/dev/null | grep -q '^osd\.0 up'; do
        ((SECONDS < end)) || die "osd.0 did not come up; see $(dirname "$conf")/log"
        sleep 0.05
    done
}

cmd_env() {
    local dir; dir=$(cd "$1" && pwd)
    [[ -f $dir/ceph.conf ]] || die "$dir is not a cluster directory"
    echo "export CEPH_CONF=$dir/ceph.conf"
}

case ${1:-} in
    start) [[ $# -ge 2 ]] || die "usage: $0 start DIR [POOL...]"; shift; cmd_start "$@" ;;
    stop) [[ $# -eq 2 ]] || die "usage: $0 stop DIR"; cmd_stop "$2" ;;
    env) [[ $# -eq 2 ]] || die "usage: $0 env DIR"; cmd_env "$2" ;;
    *) die "usage: $0 start|stop|env DIR" ;;
esac
