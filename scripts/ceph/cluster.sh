#!/usr/bin/env bash
# A throw-away single-node Ceph cluster for ThinFS's RBD tests: one ceph-mon and one ceph-osd
# started as plain processes (no systemd, no ceph-mgr, which RBD I/O does not need) in a
# scratch directory, on 127.0.0.1 only, with auth off and memstore (the OSD keeps its
# objects in memory: nothing to format, ready in about a second).
#
#   scripts/ceph/cluster.sh start DIR [POOL]   start it in DIR (made, must be empty); prints
#                                              DIR/ceph.conf once POOL (default: rbd) is writable
#   scripts/ceph/cluster.sh stop DIR           stop both daemons by the PIDs in DIR, remove DIR
#   scripts/ceph/cluster.sh halt DIR           stop both daemons by PID (SIGTERM), keep DIR: the
#                                              cluster is down, its data kept (the outage tests)
#   scripts/ceph/cluster.sh resume DIR         start the halted daemons again on the same data;
#                                              returns once the pool takes a write
#
# THINFS_CEPH_ADDR (default 127.0.0.1) is the address both daemons listen on: a second cluster
# on another loopback address (127.0.0.2) runs beside the first, and one on a veth address is
# reachable from a network namespace.
#
# Pitfalls it avoids (issue 16):
#   - `admin socket` only in the daemon sections: a global one makes every client process
#     (rbd, librbd in our tests) collide on one socket path;
#   - `paxos propose interval = 0.05`: the monitor allocates snapshot ids at its commit
#     interval, 1 s by default, which is what every RBD snapshot would cost;
#   - the ports are fixed (mon 3300 and 6789, OSD 6800-7300 on the address): one cluster per
#     address at a time, so `start` refuses when something already listens on its 6789;
#   - `osd fast shutdown = false`: the fast one exits without unmounting the object store, and
#     memstore writes its objects to DIR/osd only at the unmount, so `halt` would lose them.
#   - the rbd CLI wants --no-progress.
set -euo pipefail

usage() { echo "usage: $0 start DIR [POOL] | stop DIR | halt DIR | resume DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 dir=$2 pool=${3:-rbd}
addr=${THINFS_CEPH_ADDR:-127.0.0.1}

halt() {
    local d=$1
    for name in osd mon; do
        local pidfile=$d/$name.pid
        [ -s "$pidfile" ] || continue
        local pid; pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}
stop() { halt "$1"; rm -rf "$1"; }

# The daemons outlive this script, so they must not keep descriptors it inherited (0-2 are
# redirected; bash's own 255 is close-on-exec). swift-corelibs-foundation's Process, which the
# tests' Oracle.run uses, learns that its child ended through a socket the child inherits: a
# daemon holding a copy keeps it open, and the caller waits for ever for `cluster.sh start` to end
# (seen in session 8 as RBDOutageTests hanging after start had exited). Runs in a subshell.
close_inherited() {
    local fd
    for fd in /proc/$BASHPID/fd/*; do
        fd=${fd##*/}
        case $fd in 0|1|2|255) ;; *) eval "exec $fd>&-" 2>/dev/null ;; esac
    done
}
# Starts the daemons of DIR on their data (made by `start`, or left by `halt`).
run_daemons() {
    ( close_inherited; exec ceph-mon -c "$conf" -i a --pid-file "$dir/mon.pid" >>"$dir/log/mon.out" 2>&1 </dev/null )
    for _ in $(seq 1 100); do [ -s "$dir/mon.pid" ] && break; sleep 0.05; done
}
run_osd() {
    local id; id=$(cat "$dir/osd.id")
    ( close_inherited; exec ceph-osd -c "$conf" -i "$id" --pid-file "$dir/osd.pid" >>"$dir/log/osd.out" 2>&1 </dev/null )
}
# Returns once POOL takes a write (30 s at most).
wait_writable() {
    for _ in $(seq 1 300); do
        if timeout 5 rados -c "$conf" -p "$pool" put thinfs-ready "$conf" 2>/dev/null; then
            rados -c "$conf" -p "$pool" rm thinfs-ready
            return 0
        fi
        sleep 0.1
    done
    echo "ceph cluster: pool $pool not writable after 30 s" >&2
    return 1
}

case $cmd in
stop)
    stop "$dir"
    exit 0 ;;
halt)
    halt "$dir"
    exit 0 ;;
resume)
    dir=$(cd "$dir" && pwd) conf=$dir/ceph.conf
    [ -s "$dir/osd.id" ] || { echo "ceph cluster: $dir holds no cluster made by '$0 start'" >&2; exit 2; }
    pool=$(cat "$dir/pool")
    run_daemons
    run_osd
    wait_writable
    echo "$conf"
    exit 0 ;;
start) ;;
*) usage ;;
esac

for bin in ceph-mon ceph-osd ceph rbd monmaptool; do
    command -v $bin >/dev/null || { echo "ceph cluster: $bin not found (apt-get install ceph-mon ceph-osd ceph-common)" >&2; exit 3; }
done
if (exec 3<>/dev/tcp/$addr/6789) 2>/dev/null; then
    echo "ceph cluster: something already listens on $addr:6789 (another test cluster?); the ports are fixed, so only one can run" >&2
    exit 4
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
[ -z "$(ls -A "$dir")" ] || { echo "ceph cluster: $dir is not empty" >&2; exit 2; }
# Stop what was started if start-up fails part way.
trap 'echo "ceph cluster: start-up failed; logs in $dir/log:" >&2; tail -n 20 "$dir"/log/*.log >&2 2>/dev/null; stop "$dir"' ERR

fsid=$(cat /proc/sys/kernel/random/uuid)
mkdir -p "$dir/mon" "$dir/osd" "$dir/log" "$dir/run"
cat > "$dir/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = $addr
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool delete = true
mon allow pool size one = true
paxos propose interval = 0.05
osd client watch timeout = 5
log file = $dir/log/\$name.log
run dir = $dir/run
mon data avail warn = 1
mon data avail crit = 0
[mon]
public addr = $addr
admin socket = $dir/run/\$name.asok
mon data = $dir/mon
[osd]
public addr = $addr
cluster addr = $addr
admin socket = $dir/run/\$name.asok
osd data = $dir/osd
osd objectstore = memstore
osd fast shutdown = false
memstore device bytes = 2147483648
osd max object name len = 256
osd max object namespace len = 64
CONF
conf=$dir/ceph.conf

monmaptool --create --clobber --fsid "$fsid" --addv a "[v2:$addr:3300,v1:$addr:6789]" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >"$dir/log/mkfs-mon.out" 2>&1
run_daemons

osd=$(ceph -c "$conf" osd create)
echo "$osd" > "$dir/osd.id"
echo "$pool" > "$dir/pool"
ceph-osd -c "$conf" -i "$osd" --mkfs --osd-uuid "$(cat /proc/sys/kernel/random/uuid)" >"$dir/log/mkfs-osd.out" 2>&1
run_osd
ceph -c "$conf" osd crush add "osd.$osd" 1 root=default host=localhost >/dev/null 2>&1 || true

ceph -c "$conf" osd pool create "$pool" 8 8 >/dev/null 2>&1
ceph -c "$conf" osd pool application enable "$pool" rbd >/dev/null 2>&1
wait_writable
trap - ERR
echo "$conf"
