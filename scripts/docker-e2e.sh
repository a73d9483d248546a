#!/bin/bash
# docker-e2e.sh: a private dockerd 20.10 (its own data-root, exec-root, socket, pidfile and
# managed containerd) with ThinFS as its graphdriver plugin (`thinfs serve --docker-plugin`):
# load the test image, run containers that read and write, docker diff/commit/run of the commit,
# rm -f of a running container, rmi, docker info's devicemapper pairs, --storage-opt size=,
# `thinfs layer resize` of a running container, a second dockerd refused, and a dockerd restart
# that keeps the images. Everything it starts is stopped by PID; what dockerd
# writes outside its own directories (/etc/docker/key.json) is removed if it was not there.
#
# Needs root, /dev/fuse, dockerd/docker/containerd/runc (docker.io), busybox-static (the test
# image). Skips with a printed reason when one is missing. THINFS=path picks the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
skip() { echo "docker-e2e: skipped ($1)"; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root"
[ -e /dev/fuse ] || skip "needs /dev/fuse"
for tool in dockerd docker containerd runc; do command -v $tool >/dev/null || skip "$tool missing: apt-get install docker.io"; done
[ -x /bin/busybox ] || skip "busybox missing: apt-get install busybox-static"
THINFS=${THINFS:-$(swift build --show-bin-path)/thinfs}
[ -x "$THINFS" ] || { echo "docker-e2e: $THINFS missing (swift build first)" >&2; exit 1; }

name=thinfs-e2e-$$
work=$(mktemp -d /tmp/thinfs-docker-e2e.XXXXXX)
dsock=$work/docker.sock
key_existed=no; [ -e /etc/docker/key.json ] && key_existed=yes
etc_existed=no; [ -d /etc/docker ] && etc_existed=yes
serve_pid=""; dockerd_pid=""; second_pid=""
D() { docker -H "unix://$dsock" "$@"; }

stop_pid() {  # stop_pid PID: SIGTERM, then SIGKILL after 30 s
    local pid=$1 i
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    echo "docker-e2e: pid $pid did not stop on SIGTERM; SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
    set +e
    stop_pid "$second_pid"
    stop_pid "$dockerd_pid"
    stop_pid "$serve_pid"
    # Anything still mounted under the scratch directory (a failed step's leftovers), innermost first.
    awk -v w="$work" '$2 ~ "^"w {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
    rm -f "/run/docker/plugins/$name.sock"
    rmdir /run/docker/plugins /run/docker 2>/dev/null
    [ $key_existed = yes ] || rm -f /etc/docker/key.json
    [ $etc_existed = yes ] || rmdir /etc/docker 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "docker-e2e: FAILED: $*" >&2; echo "--- dockerd log (end):" >&2; tail -n 30 "$work/dockerd.log" >&2 || true
         echo "--- thinfs serve log (end):" >&2; tail -n 30 "$work/serve.log" >&2 || true; exit 1; }
expect() {  # expect WHAT GOT WANT: GOT must contain WANT
    case "$2" in *"$3"*) echo "docker-e2e: ok: $1";; *) fail "$1: expected '$3' in: $2";; esac
}

bash scripts/make-test-image.sh "$work/image" >/dev/null

"$THINFS" serve --root "$work/thinfs" --docker-plugin "$name" --log-level warning \
    --storage-opt dm.basesize=1G --storage-opt dm.loopdatasize=8G --storage-opt dm.loopmetadatasize=64M \
    --storage-opt dm.use_deferred_deletion=true 2>"$work/serve.log" &
serve_pid=$!
for i in $(seq 300); do [ -S "/run/docker/plugins/$name.sock" ] && break; kill -0 $serve_pid 2>/dev/null || fail "thinfs serve exited"; sleep 0.1; done
[ -S "/run/docker/plugins/$name.sock" ] || fail "thinfs serve did not listen on /run/docker/plugins/$name.sock"

start_dockerd() {
    dockerd --experimental --iptables=false --ip-masq=false --bridge=none \
        --data-root "$work/docker" --exec-root "$work/exec" --pidfile "$work/docker.pid" -H "unix://$dsock" \
        --storage-driver "$name" --storage-opt dm.use_deferred_deletion=true >>"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for i in $(seq 300); do D version >/dev/null 2>&1 && return 0; kill -0 $dockerd_pid 2>/dev/null || fail "dockerd exited"; sleep 0.1; done
    fail "dockerd did not answer in 30 s"
}
start_dockerd

D load -i "$work/image/docker.tar" >/dev/null || fail "docker load"
expect "docker images" "$(D images --format '{{.Repository}}:{{.Tag}}')" "thinfs-test:latest"

# Layer 2 adds /etc/motd, deletes /etc/issue (a whiteout) and makes /var/lib/app opaque.
out=$(D run --rm --network none thinfs-test:latest sh -c 'cat /etc/motd /etc/group; echo written > /tmp/x; cat /tmp/x;
      ls /var/lib/app; ls /etc/issue 2>&1 || true') || fail "docker run: $out"
expect "run reads the image" "$out" "Welcome"
expect "run reads layer 2's change" "$out" "staff:x:50"
expect "run writes" "$out" "written"
expect "the whiteout hides /etc/issue" "$out" "/etc/issue: No such file"
case "$out" in *cache*) fail "the opaque /var/lib/app shows layer 1's cache: $out";; esac

info=$(D info 2>&1)
expect "docker info driver" "$info" "Storage Driver: $name"
for pair in "Pool Blocksize:" "Base Device Size: 1" "Backing Filesystem: extfs" "Data file:" "Metadata file:" \
            "Data Space Used:" "Data Space Total:" "Data Space Available:" "Metadata Space Used:" \
            "Metadata Space Total:" "Metadata Space Available:" "Thin Pool Minimum Free Space:" \
            "Udev Sync Supported:" "Deferred Removal Enabled: false" "Deferred Deletion Enabled: true" \
            "Deferred Deleted Device Count:" "Library Version:"; do
    expect "docker info: $pair" "$info" "$pair"
done

D run --name c1 --network none thinfs-test:latest sh -c 'echo hi > /hello; rm /etc/motd' >/dev/null || fail "run c1"
diff_out=$(D diff c1) || fail "docker diff: $diff_out"
expect "docker diff: added" "$diff_out" "A /hello"
expect "docker diff: deleted" "$diff_out" "D /etc/motd"
D commit c1 committed:1 >/dev/null || fail "docker commit"
out=$(D run --rm --network none committed:1 sh -c 'cat /hello; ls /etc/motd 2>&1 || true') || fail "run of the commit: $out"
expect "run of the commit sees its file" "$out" "hi"
expect "run of the commit misses the deleted file" "$out" "No such file"

D run -d --name c2 --network none thinfs-test:latest sh -c 'sleep 300' >/dev/null || fail "run -d c2"
D rm -f c2 >/dev/null || fail "rm -f of a running container"
case "$(D ps -a --format '{{.Names}}')" in *c2*) fail "c2 still listed";; esac
echo "docker-e2e: ok: rm -f of a running container"

out=$(D run --rm --network none --storage-opt size=2G thinfs-test:latest busybox df -k /) || fail "run --storage-opt size: $out"
# The source name is long: df may wrap it, so the size is the fifth field from the end.
kb=$(echo "$out" | awk 'END {print $(NF-4)}')
[ "${kb:-0}" -gt 1800000 ] && [ "${kb:-0}" -le 2097152 ] || fail "df in a size=2G container: $out"
echo "docker-e2e: ok: --storage-opt size=2G gives a ${kb} KiB filesystem"

# thinfs layer resize of a running container: its filesystem grows under it, no remount.
D run -d --name grow --network none thinfs-test:latest sh -c 'echo kept > /kept; sleep 300' >/dev/null || fail "run -d grow"
device=$(D inspect -f '{{.GraphDriver.Data.DeviceName}}' grow) || fail "inspect grow"
layer=${device##*:}   # DeviceName is ROOT:LAYER; Docker's layer ids have no colon
df_kb() { D exec grow busybox df -k / | awk 'END {print $(NF-4)}'; }
for i in $(seq 50); do D exec grow cat /kept >/dev/null 2>&1 && break; sleep 0.1; done
kb_before=$(df_kb); sums_before=$(D exec grow busybox md5sum /bin/busybox /kept /etc/motd) || fail "md5sum in grow"
"$THINFS" layer resize --root "$work/thinfs" "$layer" 3G >/dev/null || fail "thinfs layer resize $layer 3G"
kb_after=$(df_kb)
[ "${kb_after:-0}" -gt 2800000 ] && [ "${kb_after:-0}" -le 3145728 ] && [ "${kb_after:-0}" -gt "${kb_before:-0}" ] ||
    fail "df in the running container after thinfs layer resize 3G: ${kb_before} KiB -> ${kb_after} KiB"
[ "$(D exec grow busybox md5sum /bin/busybox /kept /etc/motd)" = "$sums_before" ] || fail "files changed across the resize"
D exec grow sh -c 'busybox dd if=/dev/zero of=/after bs=1M count=32 2>/dev/null && busybox sync' || fail "write after the resize"
echo "docker-e2e: ok: thinfs layer resize of a running container: df ${kb_before} KiB -> ${kb_after} KiB, files intact"
shrink=$("$THINFS" layer resize --root "$work/thinfs" "$layer" 2G 2>&1) && fail "a shrink was accepted"
expect "a shrink is refused naming both sizes" "$shrink" "3G"

# A second dockerd (another data-root) on the same plugin: refused with a clear error, and it exits.
dockerd --experimental --iptables=false --ip-masq=false --bridge=none \
    --data-root "$work/docker2" --exec-root "$work/exec2" --pidfile "$work/docker2.pid" -H "unix://$work/docker2.sock" \
    --storage-driver "$name" >"$work/dockerd2.log" 2>&1 &
second_pid=$!
for i in $(seq 200); do kill -0 $second_pid 2>/dev/null || break; sleep 0.1; done
kill -0 $second_pid 2>/dev/null && { stop_pid $second_pid; fail "a second dockerd started on the plugin: $(tail -5 "$work/dockerd2.log")"; }
second_pid=""
expect "a second dockerd is refused" "$(cat "$work/dockerd2.log")" "second dockerd"
# Its managed containerd goes with it; one left behind is stopped here (by its pid file).
[ -f "$work/exec2/containerd/containerd.pid" ] && stop_pid "$(cat "$work/exec2/containerd/containerd.pid")"
expect "the first dockerd still runs its container" "$(D exec grow cat /kept)" "kept"
D rm -f grow >/dev/null || fail "rm -f grow"

D rm c1 >/dev/null || fail "rm c1"
D rmi committed:1 >/dev/null || fail "docker rmi"
case "$(D images --format '{{.Repository}}')" in *committed*) fail "rmi left the image";; esac
echo "docker-e2e: ok: rmi"

stop_pid "$dockerd_pid"
start_dockerd
expect "images after a dockerd restart" "$(D images --format '{{.Repository}}:{{.Tag}}')" "thinfs-test:latest"
out=$(D run --rm --network none thinfs-test:latest cat /etc/motd) || fail "run after restart: $out"
expect "run after a dockerd restart" "$out" "Welcome"
stop_pid "$dockerd_pid"; dockerd_pid=""
stop_pid "$serve_pid"; wait "$serve_pid" 2>/dev/null && rc=0 || rc=$?
serve_pid=""
[ "$rc" = 0 ] || fail "thinfs serve exited $rc on SIGTERM"
if grep -q " $work/" /proc/mounts; then fail "mounts left: $(grep " $work/" /proc/mounts)"; fi
echo "docker-e2e: all passed"
