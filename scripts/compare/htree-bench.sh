#!/usr/bin/env bash
# htree-bench.sh: kernel ext4 looking up every file of one directory the daemon grew, with the
# directory left plain (as libext2fs grows it) and with the htree index thinfs now builds at the
# end of a layer write (Volume+DirectoryIndex.swift). Round by round, interleaved: each step
# loop-mounts its image read-only, drops the page cache, and lstat()s every name (from a list:
# no readdir) from one Python process, in a fixed random order and in creation order; the load
# average is printed with each step. Creation order flatters a plain directory: kernel ext4
# starts each linear search at the block where the last one found its name (i_dir_start_lookup). Needs root and a build with tests (swift build --build-tests).
#
#   scripts/compare/htree-bench.sh [--files 16000] [--rounds 5] [--dir /var/tmp]
set -euo pipefail
FILES=16000
ROUNDS=5
DIR=/var/tmp
while [ $# -gt 0 ]; do
    case "$1" in
        --files) FILES="$2"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --dir) DIR="$2"; shift ;;
        *) echo "usage: $0 [--files N] [--rounds N] [--dir DIR]" >&2; exit 2 ;;
    esac
    shift
done
cd "$(dirname "$0")/../.."
WORK=$(mktemp -d "$DIR/htree-bench.XXXXXX")
MNT="$WORK/mnt"
mkdir -p "$MNT"
LOOP=""
cleanup() {
    if mountpoint -q "$MNT"; then umount "$MNT"; fi
    if [ -n "$LOOP" ]; then losetup -d "$LOOP"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

THINFS_HTREE_BENCH_DIR="$WORK" THINFS_HTREE_BENCH_FILES="$FILES" \
    swift test --skip-build --filter 'DirectoryIndexTests/benchmarkImages' > "$WORK/gen.log" 2>&1 \
    || { cat "$WORK/gen.log"; echo "htree-bench: writing the images failed" >&2; exit 1; }
[ -f "$WORK/linear.img" ] && [ -f "$WORK/indexed.img" ] || { echo "htree-bench: the images were not written" >&2; exit 1; }

cat > "$WORK/stat.py" <<'PY'
import os, random, sys, time
d, n, order = sys.argv[1], int(sys.argv[2]), sys.argv[3]
names = [f"{d}/file-{i}" for i in range(n)]
if order == "random":
    random.Random(1).shuffle(names)
t = time.perf_counter()
for p in names:
    os.lstat(p)
print(f"{time.perf_counter() - t:.3f}")
PY

echo "files=$FILES rounds=$ROUNDS kernel=$(uname -r) cpus=$(nproc)"
printf '%-6s %-8s %-8s %9s %9s  %s\n' round setup order seconds "us/file" loadavg
for r in $(seq 1 "$ROUNDS"); do
    for step in linear:random indexed:random linear:created indexed:created; do
        setup=${step%:*} order=${step#*:}
        LOOP=$(losetup --find --show --read-only "$WORK/$setup.img")
        mount -t ext4 -o ro,noload "$LOOP" "$MNT"
        sync; echo 3 > /proc/sys/vm/drop_caches
        secs=$(python3 "$WORK/stat.py" "$MNT/d" "$FILES" "$order")
        load=$(cut -d' ' -f1-3 /proc/loadavg)
        umount "$MNT"; losetup -d "$LOOP"; LOOP=""
        printf '%-6s %-8s %-8s %9s %9.1f  %s\n' "$r" "$setup" "$order" "$secs" "$(echo "$secs * 1000000 / $FILES" | bc -l)" "$load"
    done
done
