#!/usr/bin/env bash
# htree-mount-bench.sh: a directory grown through a read-write FUSE mount (thinfs-mount of a pool
# device), built old and new, interleaved round by round. Per build and round:
#   1. mount, create FILES empty files in /d through the mount, then time the unmount: from
#      `umount` to the daemon's exit (its last commit, the new build's indexing, the close), and
#      print the new daemon's own log of the indexing's duration (column "index");
#   2. mount again, create one file at the root (no directory grows), time that unmount too;
#   3. copy the device out (`thinfs dev read`), loop-mount it read-only with kernel ext4, drop the
#      page cache, and lstat every name of /d from a list, in a fixed random order.
# Each step prints the load average. Needs root and two directories holding `thinfs` and
# `thinfs-mount`: the old build's and the new one's (copy a build's binaries aside first).
#
#   scripts/compare/htree-mount-bench.sh --old DIR --new DIR [--files 10000] [--rounds 3] [--dir /var/tmp]
set -euo pipefail
FILES=10000
ROUNDS=3
DIR=/var/tmp
OLD="" NEW=""
while [ $# -gt 0 ]; do
    case "$1" in
        --old) OLD="$2"; shift ;;
        --new) NEW="$2"; shift ;;
        --files) FILES="$2"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --dir) DIR="$2"; shift ;;
        *) echo "usage: $0 --old DIR --new DIR [--files N] [--rounds N] [--dir DIR]" >&2; exit 2 ;;
    esac
    shift
done
[ -x "$OLD/thinfs-mount" ] && [ -x "$NEW/thinfs-mount" ] || { echo "htree-mount-bench: --old and --new must hold thinfs and thinfs-mount" >&2; exit 2; }
BENCH_NAME=htree-mount-bench
. "$(dirname "$0")/bench-lib.sh"
WORK=$(mktemp -d "$DIR/htree-mount-bench.XXXXXX")
SCRATCH+=("$WORK")
MNT="$WORK/mnt"
KMNT="$WORK/kmnt"
mkdir -p "$MNT" "$KMNT"
MOUNTS+=("$MNT" "$KMNT")

cat > "$WORK/create.py" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.mkdir(d)
for i in range(n):
    os.close(os.open(f"{d}/file-{i}", os.O_CREAT | os.O_WRONLY, 0o644))
PY
cat > "$WORK/stat.py" <<'PY'
import os, random, sys, time
d, n = sys.argv[1], int(sys.argv[2])
names = [f"{d}/file-{i}" for i in range(n)]
random.Random(1).shuffle(names)
t = time.perf_counter()
for p in names:
    os.lstat(p)
print(f"{time.perf_counter() - t:.3f}")
PY

now() { date +%s.%N; }
# mount BIN ROOT: thinfs-mount in the foreground, in the background; sets PID once mounted.
mount_dev() {
    THINFS_LOG=info "$1/thinfs-mount" --root "$2" --device 1 "$MNT" -f > "$WORK/mount.log" 2>&1 &
    PID=$!
    PIDS+=("$PID")
    local i
    for i in $(seq 1 200); do mountpoint -q "$MNT" && return 0; sleep 0.1; done
    cat "$WORK/mount.log" >&2; echo "htree-mount-bench: no mount" >&2; exit 1
}
# timed_unmount: sets SECS to the seconds from umount to the daemon's exit. Not run in a
# command substitution: `wait` must run in the shell whose child the daemon is.
timed_unmount() {
    local t0 t1
    t0=$(now)
    umount "$MNT"
    wait "$PID"
    t1=$(now)
    SECS=$(echo "$t1 - $t0" | bc -l)
}
load() { cut -d' ' -f1-3 /proc/loadavg; }

echo "files=$FILES rounds=$ROUNDS kernel=$(uname -r) cpus=$(nproc)"
printf '%-6s %-5s %14s %10s %14s %12s %9s  %s\n' round build "umount-grown" "index" "umount-none" "lookups(s)" "us/file" loadavg
for r in $(seq 1 "$ROUNDS"); do
    for build in old new; do
        bin=$OLD; [ "$build" = new ] && bin=$NEW
        root="$WORK/$build-$r"
        "$NEW/thinfs" pool create --root "$root" --data-size 2G --metadata-size 32M > /dev/null
        "$NEW/thinfs" pool message --root "$root" create_thin 1 > /dev/null
        "$NEW/thinfs" dev format --root "$root" 1 --size 256M > /dev/null

        mount_dev "$bin" "$root"
        python3 "$WORK/create.py" "$MNT/d" "$FILES"
        drop_caches
        timed_unmount; grown=$SECS
        # The daemon's own measure of the indexing (fsync before it included), new build only.
        index=$(sed -n 's/.*duration=\([0-9.e-]*\) seconds.*indexed grown directories at close.*/\1/p' "$WORK/mount.log" | tail -1)

        mount_dev "$bin" "$root"
        : > "$MNT/one-file"
        drop_caches
        timed_unmount; none=$SECS

        img="$WORK/$build-$r.img"
        IMAGES+=("$img")
        "$NEW/thinfs" dev read --root "$root" 1 --length 256M > "$img"
        rm -rf "$root"
        loop=$(losetup --find --show --read-only "$img")
        mount -t ext4 -o ro,noload "$loop" "$KMNT"
        drop_caches
        secs=$(python3 "$WORK/stat.py" "$KMNT/d" "$FILES")
        umount "$KMNT"; losetup -d "$loop"; rm -f "$img"
        printf '%-6s %-5s %14.3f %10s %14.3f %12s %9.1f  %s\n' "$r" "$build" "$grown" "${index:--}" "$none" "$secs" \
            "$(echo "$secs * 1000000 / $FILES" | bc -l)" "$(load)"
    done
done
