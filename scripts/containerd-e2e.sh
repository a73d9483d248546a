#!/usr/bin/env bash
# containerd-e2e.sh: ThinFS as containerd's snapshotter, end to end (issue 12, section 3).
#
# Starts a PRIVATE containerd (its own root, state, sockets, runc root, FIFO directory and
# namespace, all under one scratch directory; a system containerd is never touched) whose
# `[proxy_plugins.thinfs]` points at a fresh `thinfs serve --containerd-socket`, and checks:
#   import       ctr images import --snapshotter thinfs of the test image (scripts/make-test-image.sh)
#   run          ctr run: a program reads the image's files (both layers, whiteouts, opaque
#                directory) and writes its own; the write is in the snapshot's mount afterwards
#   user         a process as 65534:65534 reads the image and writes /tmp, and /etc refuses it
#                (ctr 1.6 has no `run --user`: the process is `ctr tasks exec --user`, which
#                runc starts with that uid and gid, as `run --user` would)
#   snapshots    ctr snapshots ls|info|usage|rm, with a parent that has children refused
#   sharing      two containers of one image share the image's blocks (thinfs layer ls)
#   overlayfs    the same image on containerd's overlayfs snapshotter: the file trees that
#                containers see on each are listed (modes, owners, sizes, links, sha256) and compared
#   registry     Debian's docker-registry on 127.0.0.1, skopeo copy, ctr images pull --plain-http
#   sigkill      thinfs serve SIGKILLed in the middle of an unpack: thin_check clean on what it
#                left, restart, pull again completes with the right bytes, nothing orphaned
#   restart      containerd restarts while a container runs; the container carries on
#   parallel     ten containers started at once
#   teardown     removing every image and container leaves no layer, mount or snapshot directory,
#                and thin_check is clean after serve's SIGTERM
# It also prints measured unpack and `ctr run` times against overlayfs on the same containerd.
#
# Needs root, /dev/fuse, containerd, ctr, runc, containerd-shim-runc-v2, thin_check, busybox-static,
# docker-registry and skopeo; skips with the reason when one is missing. Everything it starts is
# stopped by pid on exit, failure included. A failure ends the output with the failed check's name.
#   THINFS=PATH   the thinfs binary (default: swift build's debug product, built if missing)
#   KEEP=1        keep the scratch directory (logs, the stopped store)
#   THINFS_E2E_BACKEND=rbd   the store on Ceph RBD (thinfs.backend=rbd, issue 16) of the running
#                 cluster whose ceph.conf THINFS_CEPH_CONF names (scripts/test.sh's "ceph rbd" step
#                 starts one with scripts/ceph/cluster.sh): the checks setup, import, run, snapshots,
#                 rbd (the removed container's RBD image is gone from `rbd ls`, the image layers'
#                 stay), overlayfs, measure and teardown (only the base device's image left). The
#                 userspace pool's own checks (thin_check; user, sharing, registry, sigkill, restart,
#                 parallel: the same snapshotter code on either backend) are skipped, saying so.
#                 Every image of its rbd.prefix (ctr-e2e-PID-) is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

skip() { echo "containerd-e2e: skipped ($*)"; exit 0; }
[[ $(id -u) == 0 ]] || skip "needs root"
[[ -e /dev/fuse ]] || skip "needs /dev/fuse"
for tool in containerd ctr runc containerd-shim-runc-v2 thin_check docker-registry skopeo python3; do
    command -v "$tool" >/dev/null || skip "$tool missing: scripts/setup.sh installs it"
done
backend=${THINFS_E2E_BACKEND:-userspace}
case $backend in
userspace) ;;
rbd)
    command -v rbd >/dev/null || skip "rbd missing: scripts/setup.sh installs ceph-common"
    [[ -n ${THINFS_CEPH_CONF:-} ]] || skip "THINFS_E2E_BACKEND=rbd without a cluster: set THINFS_CEPH_CONF to the ceph.conf that 'scripts/ceph/cluster.sh start DIR' prints"
    [[ -f $THINFS_CEPH_CONF ]] || skip "THINFS_CEPH_CONF=$THINFS_CEPH_CONF does not exist" ;;
*) echo "containerd-e2e: THINFS_E2E_BACKEND=$backend: expected userspace or rbd" >&2; exit 2 ;;
esac
[[ -x /bin/busybox ]] || skip "busybox-static missing: scripts/setup.sh installs it"

if [[ -z ${THINFS:-} ]]; then
    THINFS="$(swift build --show-bin-path)/thinfs"
    [[ -x $THINFS ]] || swift build --product thinfs
fi

# ---- checks: the current one's name is what a failure reports, last
current="setup"
started=$(date +%s)
check() {
    # A snapshotter that died during the last check fails that check, not a later one.
    [[ -z ${serve_pid:-} ]] || kill -0 "$serve_pid" 2>/dev/null || die "thinfs serve (pid $serve_pid) is gone (its log is below)"
    current=$1; echo "=== containerd-e2e: [$(($(date +%s) - started)) s] $1"
}
die() { echo "containerd-e2e: check '$current': $*" >&2; exit 1; }
expect_eq() { [[ $1 == "$2" ]] || die "$3: expected '$2', got '$1'"; }
expect_contains() { grep -qF -- "$2" <<<"$1" || die "$3: '$2' missing from: $1"; }
trap 'die "command failed (exit $?): $BASH_COMMAND"' ERR

w=$(mktemp -d /var/tmp/thinfs-ctr-e2e.XXXXXX)
store=$w/store
sock=$w/thinfs.sock
cd_root=$w/containerd
addr=$cd_root/containerd.sock
ns=thinfs-e2e-$$
ns_reg=$ns-registry
ns_kill=$ns-sigkill
image=thinfs-test:latest
serve_pid="" containerd_pid="" registry_pid=""
rbd_pool=rbd rbd_prefix=ctr-e2e-$$-
case $backend in
userspace) store_opts=(--storage-opt dm.loopdatasize=8G --storage-opt dm.loopmetadatasize=128M) ;;
rbd) store_opts=(--storage-opt thinfs.backend=rbd --storage-opt "rbd.conf=$THINFS_CEPH_CONF"
                 --storage-opt "rbd.pool=$rbd_pool" --storage-opt "rbd.prefix=$rbd_prefix") ;;
esac
# The shims' sockets go in /run/containerd/s whatever the config says; remove what we made.
[[ -d /run/containerd ]] && run_containerd_existed=1 || run_containerd_existed=""

# ---- cleanup, by pid, failure or not
pids_with_arg() {  # the pids whose command line contains $1 (our own scratch paths only)
    local p
    for p in /proc/[0-9]*; do
        { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "$1" && echo "${p#/proc/}"
    done
    return 0
}
stop_pid() {  # stop_pid PID [SIGNAL]: signal it and wait up to 20 s, then SIGKILL
    local pid=$1 sig=${2:-TERM}
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -s "$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -s KILL "$pid" 2>/dev/null || true
}
# remove_cgroups NS: the cgroups runc made for containerd namespace NS (cgroup v1: one per
# controller; v2: one). A shim stopped while it created a container leaves its `runc init`
# waiting in them for ever (seen by ci-compare), and a cgroup with a task cannot be removed: every
# process still in them is one of this run's containers, killed by pid, then the cgroups go,
# deepest first, retrying EBUSY for up to 10 s while the kernel lets go.
remove_cgroups() {
    local dirs=() d pid left
    for d in /sys/fs/cgroup/"$1" /sys/fs/cgroup/*/"$1"; do [[ -d $d ]] && dirs+=("$d"); done
    ((${#dirs[@]})) || return 0
    left=$(find "${dirs[@]}" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
    for pid in $left; do kill -KILL "$pid" 2>/dev/null; done
    for _ in $(seq 100); do
        for pid in $left; do kill -0 "$pid" 2>/dev/null && break; pid=""; done
        [[ -z ${pid:-} ]] && break
        sleep 0.1
    done
    for _ in $(seq 100); do
        find "${dirs[@]}" -depth -type d -exec rmdir {} + 2>/dev/null
        for d in "${dirs[@]}"; do [[ -d $d ]] && break; d=""; done
        [[ -z $d ]] && break
        sleep 0.1
    done
}
# The images of this run's rbd.prefix in the cluster (RBD backend).
rbd_images() { rbd -c "$THINFS_CEPH_CONF" ls "$rbd_pool" | grep "^$rbd_prefix" || true; }
# Every image of the prefix removed, whatever a failure left: clones before the snapshots they
# come from can go, so pass after pass while any remain (each pass removes at least the leaves).
rbd_cleanup() {
    local pass img snap
    for pass in 1 2 3 4 5 6; do
        [[ -n $(rbd_images) ]] || break
        for img in $(rbd_images); do
            for snap in $(rbd -c "$THINFS_CEPH_CONF" snap ls "$rbd_pool/$img" --format json 2>/dev/null |
                          python3 -c 'import json, sys; print(" ".join(s["name"] for s in json.load(sys.stdin)))'); do
                rbd -c "$THINFS_CEPH_CONF" snap unprotect "$rbd_pool/$img@$snap" >/dev/null 2>&1
                rbd -c "$THINFS_CEPH_CONF" snap rm --no-progress "$rbd_pool/$img@$snap" >/dev/null 2>&1
            done
            rbd -c "$THINFS_CEPH_CONF" rm --no-progress "$rbd_pool/$img" >/dev/null 2>&1
        done
    done
    rbd -c "$THINFS_CEPH_CONF" pool metadata remove "$rbd_pool" "thinfs.${rbd_prefix}transaction_id" >/dev/null 2>&1
    [[ -z $(rbd_images) ]] || echo "containerd-e2e: images of $rbd_prefix left in pool $rbd_pool: $(rbd_images | tr '\n' ' ')"
}
cleanup() {
    local rc=$?
    trap - ERR
    set +e
    if ((rc != 0)); then
        # A crash report's head (the crashed thread's frames) comes before its registers and
        # images, which a tail alone shows: print the head first (CI keeps only the end).
        if grep -qE 'Program crashed|Fatal error|ceph_assert|terminate called' "$w/serve.log" 2>/dev/null; then
            echo "--- thinfs serve log: the crash report's first 40 lines"
            sed -n '/Program crashed\|Fatal error\|ceph_assert\|terminate called/,+40p' "$w/serve.log" | head -n 40
        fi
        echo "--- thinfs serve log (last 25 lines)"; tail -n 25 "$w/serve.log" 2>/dev/null
        echo "--- containerd log (last 15 lines)"; tail -n 15 "$cd_root/containerd.log" 2>/dev/null
    fi
    # Containers first (runc kills their processes), then the shims of our containerd, then it.
    local n id
    for n in "$ns" "$ns_reg" "$ns_kill"; do
        for id in $(runc --root "$w/runc/$n" list -q 2>/dev/null); do runc --root "$w/runc/$n" delete -f "$id" >/dev/null 2>&1; done
    done
    stop_pid "$containerd_pid"
    for id in $(pids_with_arg "-address $addr "); do stop_pid "$id"; done
    stop_pid "$registry_pid"
    stop_pid "$serve_pid"
    # What a crash left mounted under the scratch directory, deepest first.
    grep -oE " $w/[^ ]*" /proc/mounts 2>/dev/null | sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
    for n in "$ns" "$ns_reg" "$ns_kill"; do
        remove_cgroups "$n"
        rm -rf "/run/containerd/fifo/$n" 2>/dev/null
    done
    [[ $backend == rbd ]] && rbd_cleanup
    [[ -n $run_containerd_existed ]] || rmdir /run/containerd/s /run/containerd/fifo /run/containerd 2>/dev/null
    if [[ ${KEEP:-} == 1 ]]; then echo "kept $w"; else rm -rf "$w"; fi
    if ((rc != 0)); then
        echo "=== containerd-e2e: FAILED at check '$current' (exit $rc)" >&2
    else
        echo "=== containerd-e2e: all checks passed in $(($(date +%s) - started)) s"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# ---- the services
start_serve() {
    local before
    before=$(grep -cw ready "$w/serve.log" 2>/dev/null || true)
    "$THINFS" serve --root "$store" --containerd-socket "$sock" --log-level info \
        --storage-opt dm.basesize=512M "${store_opts[@]}" >>"$w/serve.log" 2>&1 &
    serve_pid=$!
    for _ in $(seq 300); do
        kill -0 "$serve_pid" 2>/dev/null || die "thinfs serve exited at start-up (see its log)"
        (($(grep -cw ready "$w/serve.log") > ${before:-0})) && return 0
        sleep 0.1
    done
    die "thinfs serve not ready after 30 s"
}
start_containerd() {
    containerd --config "$cd_root/config.toml" >>"$cd_root/containerd.log" 2>&1 &
    containerd_pid=$!
    for _ in $(seq 300); do
        kill -0 "$containerd_pid" 2>/dev/null || die "containerd exited at start-up (see its log)"
        ctr --address "$addr" version >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "containerd not answering after 30 s"
}
# Every ctr call is bounded: a hung snapshotter must fail the check, not CI's timeout.
c() { timeout 120 ctr --address "$addr" --namespace "$ns" "$@"; }
cn() { local n=$1; shift; timeout 120 ctr --address "$addr" --namespace "$n" "$@"; }
run_opts=(--runc-root "$w/runc" --fifo-dir "$w/fifo")
# containerd removes a snapshot from its own records at once, and from the snapshotter at its next
# garbage collection, which deletions alone do not start (deletion_threshold is 0 by default).
# Removing a lease with --sync runs one collection and waits for it.
gc_sync() { local n=${1:-$ns} l; l=$(cn "$n" leases create | awk '{print $1}'); cn "$n" leases rm --sync "$l" >/dev/null; }
# The snapshots containerd has on thinfs, in all our namespaces, and the layers in the store.
count_snapshots() {
    local n total=0
    for n in "$ns" "$ns_reg" "$ns_kill"; do
        total=$((total + $(cn "$n" snapshots --snapshotter thinfs ls | tail -n +2 | grep -c . || true)))
    done
    echo "$total"
}
store_layers() { "$THINFS" layer ls --root "$store" --json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))'; }

check "setup: the test image, thinfs serve, a private containerd"
scripts/make-test-image.sh "$w/image" >/dev/null
# shellcheck disable=SC1091
source "$w/image/expected.env"
tar -C "$w/image/oci" -cf "$w/image/oci.tar" .
mkdir -p "$cd_root" "$w/runc" "$w/fifo"
cat >"$cd_root/config.toml" <<EOF
version = 2
root = "$cd_root/root"
state = "$cd_root/state"
# No CRI (it wants CNI and a sandbox image) and none of the snapshotters that probe the host.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$addr"
[ttrpc]
  address = "$addr.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$cd_root/opt"
[proxy_plugins.thinfs]
  type = "snapshot"
  address = "$sock"
EOF
start_serve
if [[ $backend == rbd ]]; then
    # A fresh store has its base device and nothing else (what the teardown must come back to).
    base_images=$(rbd_images)
    expect_eq "$(wc -l <<<"$base_images")" "1" "images of $rbd_prefix in rbd ls after serve made the store ($base_images)"
fi
start_containerd
expect_contains "$(ctr --address "$addr" plugins ls)" "io.containerd.snapshotter.v1    thinfs" "ctr plugins ls"

now() { date +%s%N; }
elapsed_ms() { echo $((($(now) - $1) / 1000000)); }

check "import: ctr images import --snapshotter thinfs"
t0=$(now)
c images import --snapshotter thinfs "$w/image/oci.tar" >/dev/null
import_thinfs_ms=$(elapsed_ms "$t0")
expect_contains "$(c images ls -q)" "$image" "ctr images ls"
snaps=$(c snapshots --snapshotter thinfs ls)
expect_contains "$snaps" "$CHAIN_ID_1" "the bottom layer's snapshot (chain id)"
expect_contains "$snaps" "$CHAIN_ID_2" "the top layer's snapshot (chain id)"
expect_eq "$(awk -v k="$CHAIN_ID_2" '$1 == k {print $2, $3}' <<<"$snaps")" "$CHAIN_ID_1 Committed" "the top layer's parent and kind"

check "run: ctr run --snapshotter thinfs reads the image and writes its own files"
out=$(c run "${run_opts[@]}" --snapshotter thinfs "$image" run1 /bin/sh -c '
    set -e
    cat /etc/hostname /etc/motd /var/lib/app/app.conf /usr/share/doc/new.txt
    [ ! -e /etc/issue ] && echo "issue: whited out"
    [ ! -e /usr/share/doc/old ] && echo "old: whited out"
    [ ! -e /var/lib/app/cache ] && echo "cache: opaque"
    stat -c "%a %u:%g %n" /home/user /home/user/notes.txt /bin/fake-su
    head -c 1048576 /bin/busybox > /copy && wc -c < /copy
    mkdir -p /data && echo "written by run1" > /data/mine && sync && cat /data/mine')
expect_eq "$out" "thinfs-test-2
Welcome
setting=2
new doc
issue: whited out
old: whited out
cache: opaque
700 1000:1000 /home/user
644 1000:1000 /home/user/notes.txt
4755 0:0 /bin/fake-su
1048576
written by run1" "what run1 printed"
# The container is gone (its task), its snapshot is not: what it wrote is in the snapshot's mount.
src=$(c snapshots --snapshotter thinfs mounts /x run1 | awk '{for (i = 1; i < NF; i++) if ($i == "bind") print $(i + 1)}')
[[ $src == "$store"/snapshots/* ]] || die "ctr snapshots mounts run1: expected a bind of $store/snapshots/LAYER, got '$src'"
expect_eq "$(cat "$src/data/mine")" "written by run1" "run1's file in its snapshot's mount ($src)"
cmp <(head -c 1048576 /bin/busybox) "$src/copy" || die "run1's /copy differs from the image's busybox"
# The store's layers with run1 (the rbd check looks for their images once run1 is gone).
timeout 60 "$THINFS" layer ls --root "$store" --json >"$w/layers-run1.json" || die "thinfs layer ls (exit $?; 124: no answer in 60 s)"
run1_layer=$(basename "$src")

check "snapshots: ctr snapshots ls|info|usage|rm"
snaps=$(c snapshots --snapshotter thinfs ls)
expect_eq "$(awk '$1 == "run1" {print $2, $3}' <<<"$snaps")" "$CHAIN_ID_2 Active" "ls: run1's parent and kind"
info=$(c snapshots --snapshotter thinfs info run1)
expect_contains "$info" '"Kind": "Active"' "info run1"
expect_contains "$info" "\"Parent\": \"$CHAIN_ID_2\"" "info run1"
# Usage: run1 wrote 1 MiB of its own plus a small file; the image's blocks are not its own.
usage=$(c snapshots --snapshotter thinfs usage -b run1 | awk '$1 == "run1" {print $2}')
((usage >= 1048576 && usage < 16 * 1048576)) || die "usage run1: $usage bytes, expected between 1 MiB and 16 MiB"
c snapshots --snapshotter thinfs prepare scratch1 "$CHAIN_ID_2" >/dev/null
expect_contains "$(c snapshots --snapshotter thinfs ls)" "scratch1" "ls after prepare"
c snapshots --snapshotter thinfs rm scratch1
[[ $(c snapshots --snapshotter thinfs ls) != *scratch1* ]] || die "scratch1 still listed after rm"
c snapshots --snapshotter thinfs info scratch1 >/dev/null 2>&1 && die "info scratch1 answered after rm"
if err=$(c snapshots --snapshotter thinfs rm "$CHAIN_ID_1" 2>&1); then die "rm of a snapshot with children succeeded"; fi
expect_contains "$err" "failed precondition" "rm of the bottom layer (it has a child)"
c containers rm run1
gc_sync
for _ in $(seq 50); do [[ $(c snapshots --snapshotter thinfs ls) != *run1* ]] && break; sleep 0.1; done
[[ $(c snapshots --snapshotter thinfs ls) != *run1* ]] || die "run1's snapshot left after ctr containers rm"
[[ ! -e $src ]] || die "run1's mount directory $src left after its snapshot went"

if [[ $backend == rbd ]]; then
check "rbd: run1's RBD image went with its snapshot; the image layers' images stay"
# Each layer's image is <rbd.prefix><device id> (README, "Beyond one machine").
read -r run1_image kept_images < <(python3 - "$w/layers-run1.json" "$run1_layer" "$rbd_prefix" <<'EOF'
import json, sys
layers, run1, prefix = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
mine = [f"{prefix}{l['deviceID']}" for l in layers if l["id"] == run1]
others = sorted(f"{prefix}{l['deviceID']}" for l in layers if l["id"] != run1)
assert len(mine) == 1 and len(others) == 2, f"expected run1 and the image's two layers in layer ls: {layers}"
print(mine[0], ",".join(others))
EOF
)
images=$(rbd_images)
! grep -qx -- "$run1_image" <<<"$images" || die "run1's image $run1_image is still in rbd ls after its snapshot was removed: $images"
for img in ${kept_images//,/ }; do
    grep -qx -- "$img" <<<"$images" || die "the image layer's RBD image $img is gone from rbd ls: $images"
done
# Nothing renamed for later deletion either: run1 had no clones.
! grep -q -- "^${rbd_prefix}deleted-" <<<"$images" || die "deleted images left behind: $images"
echo "rbd ls: run1's $run1_image gone; the image layers' ${kept_images//,/ and } kept"
fi

# The userspace pool's own checks (the snapshotter's code is the same on every backend); the
# blocks are not indented because their here-documents end at column 0.
if [[ $backend == userspace ]]; then

check "user: a process as 65534:65534 reads the image and writes /tmp"
c run -d "${run_opts[@]}" --snapshotter thinfs "$image" user1 /bin/busybox sleep 600 >/dev/null
out=$(c tasks exec --fifo-dir "$w/fifo" --exec-id u --user 65534:65534 user1 /bin/sh -c '
    id -u; id -g; cat /etc/hostname; /bin/busybox true && echo "busybox runs"
    echo "nobody was here" > /tmp/nobody && cat /tmp/nobody
    touch /etc/nobody 2>/dev/null || echo "/etc refused"
    cat /home/user/notes.txt 2>/dev/null || echo "/home/user refused"')
expect_eq "$out" "65534
65534
thinfs-test-2
busybox runs
nobody was here
/etc refused
/home/user refused" "what uid 65534 printed"

check "sharing: two containers of one image share the image's blocks"
c run -d "${run_opts[@]}" --snapshotter thinfs "$image" share2 /bin/busybox sleep 600 >/dev/null
# Both read every byte of the image's largest files.
for id in user1 share2; do
    c tasks exec --fifo-dir "$w/fifo" --exec-id read "$id" /bin/sh -c 'cat /bin/busybox /bin/ping > /dev/null'
done
layer_of() { c snapshots --snapshotter thinfs mounts /x "$1" | awk '{for (i = 1; i < NF; i++) if ($i == "bind") print $(i + 1)}' | xargs basename; }
"$THINFS" layer ls --root "$store" --json >"$w/layers.json"
python3 - "$w/layers.json" "$(layer_of user1)" "$(layer_of share2)" <<'EOF'
import json, sys
layers = {l["id"]: l for l in json.load(open(sys.argv[1]))}
a, b = layers[sys.argv[2]], layers[sys.argv[3]]
top = layers[a["parent"]]
assert a["parent"] == b["parent"], f"the two containers have different parents: {a['parent']} {b['parent']}"
mib = 1 << 20
image_bytes = top["mappedBytes"]
assert image_bytes >= 4 * mib, f"the image's top layer maps {image_bytes} bytes: expected the busybox image's >= 4 MiB"
for c in (a, b):
    # A container maps the image's blocks (shared) and owns only what it wrote (ext4 metadata).
    assert c["sharedBytes"] >= image_bytes * 9 // 10, f"{c['id']} shares {c['sharedBytes']} of the image's {image_bytes} bytes"
    assert c["exclusiveBytes"] <= image_bytes // 4, f"{c['id']} owns {c['exclusiveBytes']} bytes: the image was copied?"
print(f"image top layer maps {image_bytes / mib:.1f} MiB; containers own {a['exclusiveBytes'] / mib:.2f} and "
      f"{b['exclusiveBytes'] / mib:.2f} MiB, share {a['sharedBytes'] / mib:.1f} and {b['sharedBytes'] / mib:.1f} MiB")
EOF
for id in user1 share2; do
    c tasks kill -s SIGKILL "$id" >/dev/null; c tasks rm -f "$id" >/dev/null 2>&1 || true; c containers rm "$id"
done
else echo "=== containerd-e2e: skipped on $backend: user, sharing"; fi

# The tree a container sees, one line per path: type and mode, owner, mtime, and a regular
# file's size, inode and sha256, a symlink's target, a device's numbers. normalize_tree then turns
# inodes into hard-link groups (the first path of each), since inode numbers are the
# filesystem's own, and overlayfs reports a lower file's link count as its lower layer had it
# (/etc/hostname.link: 2 after layer 2 replaced /etc/hostname; it is 1), so counts are not compared.
tree_script='cd / && /bin/busybox find . -xdev ! -path . | /bin/busybox sort | while read -r p; do
    if [ -L "$p" ]; then echo "$p|$(/bin/busybox stat -c "%f|%u:%g|%Y" "$p")|-|-|$(/bin/busybox readlink "$p")"
    elif [ -d "$p" ]; then echo "$p|$(/bin/busybox stat -c "%f|%u:%g|%Y" "$p")|-|-|-"
    elif [ -f "$p" ]; then echo "$p|$(/bin/busybox stat -c "%f|%u:%g|%Y|%s|%i" "$p")|$(/bin/busybox sha256sum < "$p" | cut -c1-64)"
    else echo "$p|$(/bin/busybox stat -c "%f|%u:%g|%Y|-|-|%t:%T" "$p")"; fi
done'
# normalize_tree FILE: stdout, the listing with hard-link groups for inodes, and without what is
# not the image's: the mtimes of the runtime's mount points (runc makes /proc, /sys and /run, and
# mounts /dev, as the container starts), and the root's lost+found (ext4's own directory: every
# ThinFS layer filesystem has it, as Docker's devicemapper containers did; overlayfs has none).
normalize_tree() {
    python3 - "$1" <<'PY'
import sys
leaders = {}
for line in open(sys.argv[1]):
    path, mode, owner, *rest = line.rstrip("\n").split("|")
    if path == "./lost+found":
        print(f"(accepted: {sys.argv[1]} has ./lost+found, ext4's own)", file=sys.stderr)
        continue
    mtime, size, inode, extra = rest
    if path in ("./dev", "./proc", "./sys", "./run"):
        mtime = "(mount point)"
    if inode != "-":
        inode = "link group " + leaders.setdefault(inode, path)
    print(path, mode, owner, mtime, size, inode, extra)
PY
}

check "overlayfs: the same image on containerd's overlayfs snapshotter, file trees compared"
t0=$(now)
c images import --snapshotter overlayfs "$w/image/oci.tar" >/dev/null
import_overlay_ms=$(elapsed_ms "$t0")
# Each listing goes to a file on a bind mount under the container's /run (a tmpfs find -xdev does
# not enter), not to ctr's stdout: listings lost their last lines on the way out through the
# shim's fifo under load (three times in the RBD runs: twice the kernel overlayfs container's,
# once the thinfs one's), and a thinfs listing cut short could not be told from a readdir that
# missed entries.
for setup in thinfs overlayfs; do
    mkdir -p "$w/tree-out-$setup"
    c run --rm "${run_opts[@]}" --mount "type=bind,src=$w/tree-out-$setup,dst=/run/out,options=rbind:rw" \
        --snapshotter "$setup" "$image" "tree-$setup" /bin/sh -c "($tree_script) >/run/out/tree" >/dev/null
    mv "$w/tree-out-$setup/tree" "$w/tree.$setup"
done
(($(wc -l <"$w/tree.thinfs") >= 60)) || die "the thinfs tree has $(wc -l <"$w/tree.thinfs") entries; expected the image's (>= 60)"
grep -q '^./bin/busybox|81ed|0:0|' "$w/tree.thinfs" || die "the thinfs tree has no /bin/busybox 0755 root: $(head -3 "$w/tree.thinfs")"
normalize_tree "$w/tree.thinfs" >"$w/tree.thinfs.n"
normalize_tree "$w/tree.overlayfs" >"$w/tree.overlayfs.n"
grep -q ' link group ./usr/share/doc/new.link ' <(grep '^./usr/share/doc/new.txt ' "$w/tree.thinfs.n") ||
    die "the hard link pair new.link/new.txt is not one inode on thinfs: $(grep new "$w/tree.thinfs.n")"
diff -u "$w/tree.overlayfs.n" "$w/tree.thinfs.n" >&2 || die "the trees differ (- overlayfs, + thinfs; above)"
echo "$(wc -l <"$w/tree.overlayfs.n") paths, identical on thinfs and overlayfs"

check "measure: ctr run latency, thinfs ($backend) against overlayfs (same containerd)"
declare -A run_ms
for sn in thinfs overlayfs; do
    times=()
    for i in 1 2 3 4 5; do
        t0=$(now)
        c run --rm "${run_opts[@]}" --snapshotter "$sn" "$image" "lat-$sn-$i" /bin/true
        times+=("$(elapsed_ms "$t0")")
    done
    run_ms[$sn]=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)
done
echo "measured: image import+unpack ${import_thinfs_ms} ms on thinfs ($backend), ${import_overlay_ms} ms on overlayfs;" \
    "ctr run --rm /bin/true median of 5: ${run_ms[thinfs]} ms on thinfs ($backend), ${run_ms[overlayfs]} ms on overlayfs" \
    "(load $(cut -d' ' -f1-3 /proc/loadavg))"

if [[ $backend == userspace ]]; then

check "registry: docker-registry on 127.0.0.1, skopeo copy, ctr images pull --plain-http --snapshotter thinfs"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$w/registry/data"
cat >"$w/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $w/registry/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
docker-registry serve "$w/registry/config.yml" >>"$w/registry/log" 2>&1 &
registry_pid=$!
registry_up() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "http://127.0.0.1:$port/v2/" 2>/dev/null; }
for _ in $(seq 100); do registry_up && break; sleep 0.1; done
registry_up || die "docker-registry not answering on 127.0.0.1:$port ($(tail -2 "$w/registry/log"))"
ref=127.0.0.1:$port/thinfs/test:latest
timeout 120 skopeo copy --quiet --dest-tls-verify=false "oci:$w/image/oci:thinfs-test:latest" "docker://$ref"
# A namespace of its own: containerd unpacks into fresh snapshots there, through thinfs.
cn "$ns_reg" images pull --plain-http --snapshotter thinfs "$ref" >/dev/null
expect_contains "$(cn "$ns_reg" snapshots --snapshotter thinfs ls)" "$CHAIN_ID_2" "the pulled image's top snapshot"
out=$(cn "$ns_reg" run --rm "${run_opts[@]}" --snapshotter thinfs "$ref" reg1 /bin/sh -c 'cat /etc/hostname /etc/motd')
expect_eq "$out" "thinfs-test-2
Welcome" "a container of the pulled image"

check "sigkill: thinfs serve SIGKILLed in the middle of an unpack"
# A bigger image (the busybox layer and 48 MiB of random files, uncompressed: gzip costs more
# than the unpack) so that the unpack takes a while.
bulk=$w/bulk
mkdir -p "$bulk/rootfs/bulk" "$bulk/oci/blobs/sha256"
for i in $(seq -w 1 48); do head -c 1048576 /dev/urandom >"$bulk/rootfs/bulk/f$i"; done
(cd "$bulk/rootfs/bulk" && sha256sum f* >SHA256SUMS)
tar -C "$bulk/rootfs" --numeric-owner --owner=0 --group=0 --sort=name -cf "$bulk/layer2.tar" .
python3 - "$bulk" "$w/image/oci" "$BLOB_1" "$DIFF_ID_1" <<'EOF'
import hashlib, json, sys
bulk, base_oci, blob1, diff1 = sys.argv[1:]
blobs = f"{bulk}/oci/blobs/sha256"
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{blobs}/{d}", "wb").write(data)
    return {"digest": f"sha256:{d}", "size": len(data)}
raw = open(f"{bulk}/layer2.tar", "rb").read()
l1 = open(f"{base_oci}/blobs/sha256/{blob1.split(':')[1]}", "rb").read()
layers = [dict(put(l1), mediaType="application/vnd.oci.image.layer.v1.tar+gzip"),
          dict(put(raw), mediaType="application/vnd.oci.image.layer.v1.tar")]
config = put(json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [diff1, "sha256:" + hashlib.sha256(raw).hexdigest()]}}).encode())
manifest = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"), "layers": layers}).encode())
open(f"{bulk}/oci/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
json.dump({"schemaVersion": 2, "manifests": [dict(manifest, mediaType="application/vnd.oci.image.manifest.v1+json",
           annotations={"org.opencontainers.image.ref.name": "bulk"})]}, open(f"{bulk}/oci/index.json", "w"))
EOF
bulk_ref=127.0.0.1:$port/thinfs/bulk:latest
timeout 120 skopeo copy --quiet --dest-tls-verify=false "oci:$bulk/oci:bulk" "docker://$bulk_ref"
cn "$ns_kill" images pull --plain-http --snapshotter thinfs "$bulk_ref" >"$w/pull1.log" 2>&1 &
pull_pid=$!
# Wait for the bulk layer's extraction snapshot to be written to, then kill serve.
killed=""
for _ in $(seq 600); do
    # The extraction snapshot is the one mount of the store with a /bulk directory.
    for d in "$store"/snapshots/snap-*; do
        [[ -d $d/bulk ]] || continue
        written=$(ls "$d/bulk" 2>/dev/null | wc -l)
        if ((written >= 2)); then
            kill -KILL "$serve_pid"; wait "$serve_pid" 2>/dev/null || true
            killed="with $written of 49 files written"; serve_pid=""
        fi
        break
    done
    [[ -n $killed ]] && break
    kill -0 "$pull_pid" 2>/dev/null || break
    sleep 0.02
done
[[ -n $killed ]] || die "the unpack ended before it could be killed (pull: $(tail -1 "$w/pull1.log"))"
echo "killed thinfs serve $killed"
if wait "$pull_pid"; then die "the pull succeeded though its snapshotter was killed mid-unpack"; fi
# What SIGKILL left on disk is the last commit: thin_check must accept it as it is.
thin_check "$store/pool/metadata" >"$w/thin_check.log" 2>&1 || die "thin_check after SIGKILL: $(cat "$w/thin_check.log")"
start_serve
# containerd's proxy client reconnects with a backoff, and until it has, calls fail at once
# (Unavailable). Usage is a call that reaches the snapshotter (ls and info answer from
# containerd's own records), so wait for it to answer.
t0=$(now)
for _ in $(seq 100); do c snapshots --snapshotter thinfs usage "$CHAIN_ID_2" >/dev/null 2>&1 && break; sleep 0.1; done
echo "containerd reached the restarted thinfs serve after $(elapsed_ms "$t0") ms"
# The restarted serve lazily unmounted the dead FUSE mounts of the killed one: what is mounted
# under the store now answers.
for m in $(grep -oE " $store/[^ ]*" /proc/mounts || true); do
    stat "$m" >/dev/null 2>&1 || die "$m is mounted but does not answer after the restart: $(stat "$m" 2>&1)"
done
cn "$ns_kill" images pull --plain-http --snapshotter thinfs "$bulk_ref" >"$w/pull2.log" 2>&1 ||
    die "the second pull failed: $(tail -3 "$w/pull2.log")"
out=$(cn "$ns_kill" run --rm "${run_opts[@]}" --snapshotter thinfs "$bulk_ref" bulk1 /bin/sh -c 'cd /bulk && /bin/busybox sha256sum -c SHA256SUMS | grep -c ": OK$"')
expect_eq "$out" "48" "files of the bulk layer with the right sha256 after the restart"
# Nothing orphaned: every layer in the store is a snapshot containerd knows, in some namespace.
gc_sync "$ns_kill"
expect_eq "$(store_layers)" "$(count_snapshots)" "layers in the store against containerd's snapshots (all namespaces)"

check "restart: containerd restarts while a container runs"
c run -d "${run_opts[@]}" --snapshotter thinfs "$image" long1 /bin/sh -c \
    'i=0; while :; do i=$((i + 1)); echo $i > /tmp/ticks; /bin/busybox sleep 0.2; done' >/dev/null
sleep 1
stop_pid "$containerd_pid"; containerd_pid=""
(($(pids_with_arg "-address $addr " | wc -l) >= 1)) || die "no shim left running after containerd stopped"
before=$(cat "$(ls -d "$store"/snapshots/snap-*/tmp/ticks | head -1)" 2>/dev/null || echo 0)
start_containerd
expect_contains "$(c tasks ls)" "RUNNING" "ctr tasks ls after the restart"
sleep 1
out=$(c tasks exec --fifo-dir "$w/fifo" --exec-id after long1 /bin/sh -c 'cat /etc/hostname; cat /tmp/ticks')
expect_eq "$(head -1 <<<"$out")" "thinfs-test-2" "the image, read after containerd's restart"
((${out##*$'\n'} > before)) || die "the container's loop did not go on across the restart: ticks ${out##*$'\n'} after, $before before"
c tasks kill -s SIGKILL long1 >/dev/null
for _ in $(seq 50); do [[ $(c tasks ls) == *STOPPED* || $(c tasks ls) != *long1* ]] && break; sleep 0.1; done
c tasks rm -f long1 >/dev/null 2>&1 || true
c containers rm long1

check "parallel: ten containers start at once"
for i in $(seq 10); do
    c run --rm "${run_opts[@]}" --snapshotter thinfs "$image" "par$i" /bin/sh -c \
        "cat /etc/hostname && echo $i > /tmp/me && cat /tmp/me" >"$w/par$i.out" 2>&1 &
    eval "par_pid$i=\$!"
done
failed=""
for i in $(seq 10); do
    eval "pid=\$par_pid$i"
    wait "$pid" || failed+=" par$i"
done
[[ -z $failed ]] || die "failed:$failed ($(cat "$w/par${failed##* par}.out"))"
for i in $(seq 10); do expect_eq "$(cat "$w/par$i.out")" "thinfs-test-2
$i" "par$i's output"; done
[[ $(c snapshots --snapshotter thinfs ls) != *par* ]] || die "a parallel container's snapshot was left"
gc_sync
expect_eq "$(store_layers)" "$(count_snapshots)" "layers in the store against containerd's snapshots after the parallel runs"

else echo "=== containerd-e2e: skipped on $backend: registry, sigkill, restart, parallel"; fi

check "teardown: nothing left once every image and container is gone"
for n in "$ns" "$ns_reg" "$ns_kill"; do
    for id in $(cn "$n" containers ls -q); do cn "$n" tasks rm -f "$id" >/dev/null 2>&1 || true; cn "$n" containers rm "$id"; done
    for l in $(cn "$n" leases ls -q); do cn "$n" leases rm --sync "$l" >/dev/null; done
    for img in $(cn "$n" images ls -q); do cn "$n" images rm --sync "$img" >/dev/null; done
    gc_sync "$n"
done
for _ in $(seq 100); do [[ $(count_snapshots) == 0 ]] && break; sleep 0.1; done
expect_eq "$(count_snapshots)" "0" "containerd's thinfs snapshots after removing everything"
expect_eq "$(store_layers)" "0" "layers left in the store"
expect_eq "$(grep -c " $store/" /proc/mounts || true)" "0" "mounts left under the store"
expect_eq "$(ls "$store/snapshots" | wc -l)" "0" "directories left in $store/snapshots"
stop_pid "$serve_pid"
wait "$serve_pid" 2>/dev/null && serve_rc=0 || serve_rc=$?
serve_pid=""
expect_eq "$serve_rc" "0" "thinfs serve's exit status after SIGTERM"
case $backend in
userspace) thin_check "$store/pool/metadata" >"$w/thin_check.log" 2>&1 || die "thin_check at the end: $(cat "$w/thin_check.log")" ;;
# The store's base device is all that is left in the cluster.
rbd) expect_eq "$(rbd_images)" "$base_images" "images of $rbd_prefix in rbd ls (only the base device's)" ;;
esac
