#!/usr/bin/env bash
# fs-bench.sh: file-system benchmarks through the mount, side by side in one run on the same data.
#
#   scripts/compare/fs-bench.sh [--quick] [--dir DIR] [--setups a,b,...] [--seq-only]
#
# Setups:   thinfs    thinfs-mount of a formatted thin device (userspace pool, FUSE, libext2fs)
#           fuse2fs   fuse2fs on an 8G sparse ext4 image (the stock libext2fs FUSE server)
#           ext4      kernel ext4 on a loop device over an 8G sparse image
#           overlay   kernel overlayfs, upper/work/lower as plain directories on the host fs
# All images, the pool and the overlay directories live in the same scratch directory
# (DIR/fs-bench.XXXXXX, default DIR=/var/tmp), which is removed at the end.
#
# --setups runs a subset (default thinfs,fuse2fs,ext4,overlay); --seq-only runs only the
# sequential rows (write, cached read, cold read), for quick iterations on the read path.
# It is a report, not a test: it prints PASS/MISS per goal and exits 0 either way.
# Needs root (mount, loop devices, drop_caches) and /dev/fuse. Installs fuse2fs if missing.
set -euo pipefail

QUICK=0
DIR=/var/tmp
SETUPS=(thinfs fuse2fs ext4 overlay)
SEQ_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --dir) DIR="$2"; shift ;;
        --setups) IFS=, read -r -a SETUPS <<< "$2"; shift ;;
        --seq-only) SEQ_ONLY=1 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "fs-bench: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$(id -u)" != 0 ]; then echo "fs-bench: needs root (mount, losetup, drop_caches)" >&2; exit 1; fi
[ -e /dev/fuse ] || { echo "fs-bench: /dev/fuse is missing" >&2; exit 1; }

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="${THINFS_BIN:-$REPO/.build-fsbench/release}"
THINFS="$BIN/thinfs"
THINFS_MOUNT="$BIN/thinfs-mount"
for b in "$THINFS" "$THINFS_MOUNT"; do
    [ -x "$b" ] || { echo "fs-bench: $b not built; run: swift build -c release --scratch-path .build-fsbench --product $(basename "$b")" >&2; exit 1; }
done
if ! command -v fuse2fs >/dev/null; then
    echo "fs-bench: installing fuse2fs" >&2
    apt-get install -y fuse2fs >/dev/null
fi

if [ $QUICK = 1 ]; then
    BIG_MB=128; NDIRS=20; PERDIR=100; ONEDIR=4000
    TAR_SRC=(/usr/share/vim /usr/share/i18n)
else
    BIG_MB=1024; NDIRS=100; PERDIR=100; ONEDIR=16000
    TAR_SRC=(/usr/share/locale /usr/share/doc /usr/share/man /usr/share/vim /usr/share/icons /usr/share/perl /usr/share/i18n)
fi
NFILES=$((NDIRS * PERDIR))

WORK="$(mktemp -d "$DIR/fs-bench.XXXXXX")"
# Sources live in tmpfs so that reading them costs the same for every setup and survives drop_caches.
SHM="$(mktemp -d /dev/shm/fs-bench.XXXXXX)"

BENCH_NAME=fs-bench
. "$(dirname "$0")/bench-lib.sh"   # bench_cleanup (on EXIT), drop_caches, wait_gone
SCRATCH=("$WORK" "$SHM")
wait_mounted() { local i; for i in $(seq 1 100); do mountpoint -q "$1" && return 0; sleep 0.1; done; echo "fs-bench: $1 did not mount" >&2; return 1; }
# This VM's balloon returns idle memory to the host; re-faulting it costs more than the fs does.
# Touch as much page cache as the next write adds (untimed), so every setup starts on backed memory.
pretouch() { dd if=/dev/zero of="$WORK/pretouch" bs=1M count="$1" status=none; rm -f "$WORK/pretouch"; }

echo "fs-bench: preparing sources in $SHM (big file ${BIG_MB} MiB, $NFILES small files, tar of ${TAR_SRC[*]})" >&2
dd if=/dev/urandom of="$SHM/big" bs=1M count="$BIG_MB" status=none
if [ $SEQ_ONLY = 1 ]; then
    TAR_MB=0; TAR_FILES=0    # the tar rows do not run
else
    tar -cf "$SHM/rootfs.tar" "${TAR_SRC[@]}" 2>/dev/null || true
    TAR_MB=$(( $(stat -c %s "$SHM/rootfs.tar") / 1048576 ))
    TAR_FILES=$(tar -tf "$SHM/rootfs.tar" | wc -l)
fi

mkimage() { truncate -s 8G "$1"; mke2fs -q -F -t ext4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$1"; IMAGES+=("$1"); }

# ── Setups: setup_<name> prepares once, mount_<name>/umount_<name> mount on $MNT ──
POOL="$WORK/thinfs-root"; TPID=""
setup_thinfs() {
    "$THINFS" pool create --root "$POOL" --data-size 20G --metadata-size 256M >/dev/null
    "$THINFS" pool message --root "$POOL" create_thin 1 >/dev/null
    "$THINFS" dev format --root "$POOL" 1 --size 8G >/dev/null
}
mount_thinfs() {
    "$THINFS_MOUNT" --root "$POOL" --device 1 "$MNT"
    local p c
    for p in /proc/[0-9]*; do
        c="$( { tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null)" || continue   # processes come and go
        case "$c" in *thinfs-mount*"--device 1 $MNT -f"*) TPID="${p#/proc/}"; PIDS+=("$TPID") ;; esac
    done
    [ -n "$TPID" ] || { echo "fs-bench: cannot find the thinfs-mount daemon for $MNT" >&2; return 1; }
}
umount_thinfs() { umount "$MNT"; wait_gone "$TPID"; TPID=""; }

F2IMG="$WORK/fuse2fs.img"; FPID=""
setup_fuse2fs() { mkimage "$F2IMG"; }
mount_fuse2fs() { fuse2fs "$F2IMG" "$MNT" -o fakeroot -f >"$WORK/fuse2fs.log" 2>&1 & FPID=$!; PIDS+=("$FPID"); wait_mounted "$MNT"; }
umount_fuse2fs() { umount "$MNT"; wait_gone "$FPID"; FPID=""; }

E4IMG="$WORK/ext4.img"
setup_ext4() { mkimage "$E4IMG"; }
mount_ext4() { mount -o loop "$E4IMG" "$MNT"; }
umount_ext4() { umount "$MNT"; }   # mount -o loop sets autoclear: the loop device goes with the mount

OVL="$WORK/overlay"
setup_overlay() { mkdir -p "$OVL/lower" "$OVL/upper" "$OVL/work"; echo lower > "$OVL/lower/from-lower"; }
mount_overlay() { mount -t overlay overlay -o "lowerdir=$OVL/lower,upperdir=$OVL/upper,workdir=$OVL/work" "$MNT"; }
umount_overlay() { umount "$MNT"; }

remount_cold() { "umount_$1"; drop_caches; "mount_$1"; }

# ── Workloads ──
declare -A T
now() { date +%s.%N; }
timed() { local key="$1"; shift; local t0 t1; t0=$(now); "$@"; t1=$(now); T[$key]=$(echo "$t1 - $t0" | bc -l); }
# timed_cpu also records the reader's own CPU seconds (user + system) as row "<row>_cpu". On a
# loaded machine the wall time of a page-cache read is mostly waiting for a CPU; its CPU time
# is what the file system's read path costs.
timed_cpu() {
    local key="$1"; shift; local t0 t1
    t0=$(now); /usr/bin/time -f '%U %S' -o "$WORK/cpu.txt" "$@"; t1=$(now)
    T[$key]=$(echo "$t1 - $t0" | bc -l)
    T[${key}_cpu]=$(awk '{print $1 + $2}' "$WORK/cpu.txt")
}

# The workload steps are compare.py's (`thinfs compare` runs the same code); timed here from outside.
COMPARE="$(cd "$(dirname "$0")" && pwd)/compare.py"
make_small() { python3 "$COMPARE" workload make-tree "$1" "$NDIRS" "$PERDIR" >/dev/null; }
# ONEDIR files of 4 KiB in one directory: the per-entry cost of a growing directory.
make_onedir() { python3 "$COMPARE" workload create-files "$1" "$ONEDIR" >/dev/null; }
read_small() { python3 "$COMPARE" workload read-tree "$1" >/dev/null; }
stat_tree() { python3 "$COMPARE" workload stat-tree "$1" >/dev/null; }
seq_read() { dd if="$1" of=/dev/null bs=1M status=none; }

run_setup() {
    local s="$1"
    MNT="$WORK/mnt-$s"; mkdir -p "$MNT"; MOUNTS+=("$MNT")
    echo "fs-bench: $s" >&2
    "setup_$s"
    drop_caches; "mount_$s"

    pretouch "$BIG_MB"
    timed "$s,seq_write" dd if="$SHM/big" of="$MNT/big" bs=1M conv=fsync status=none
    seq_read "$MNT/big"                                   # first read: warms whatever cache there is
    timed_cpu "$s,seq_read_cached" dd if="$MNT/big" of=/dev/null bs=1M status=none
    remount_cold "$s"
    timed "$s,seq_read_cold" seq_read "$MNT/big"
    cmp -s "$MNT/big" "$SHM/big" || echo "fs-bench: $s: big file differs after remount!" >&2
    if [ $SEQ_ONLY = 1 ]; then "umount_$s"; return; fi

    pretouch $((NFILES * 4096 / 1048576 + 1))
    timed "$s,small_create" make_small "$MNT/small"
    pretouch $((ONEDIR * 4096 / 1048576 + 1))
    timed "$s,onedir_create" make_onedir "$MNT/onedir"
    remount_cold "$s"
    timed "$s,small_read_cold" read_small "$MNT/small"
    remount_cold "$s"
    timed "$s,stat_cold" stat_tree "$MNT/small"
    timed "$s,stat_cached" stat_tree "$MNT/small"

    pretouch "$TAR_MB"
    mkdir "$MNT/untar"
    timed "$s,untar" tar -xf "$SHM/rootfs.tar" -C "$MNT/untar"
    local n; n=$(find "$MNT/untar" | wc -l)
    [ "$n" -ge "$TAR_FILES" ] || echo "fs-bench: $s: untar produced $n entries, the archive has $TAR_FILES" >&2
    "umount_$s"
}

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
for s in "${SETUPS[@]}"; do run_setup "$s"; done
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

# ── Report ──
ROWS=(seq_write seq_read_cold seq_read_cached seq_read_cached_cpu small_create onedir_create small_read_cold stat_cold stat_cached untar)
[ $SEQ_ONLY = 1 ] && ROWS=(seq_write seq_read_cold seq_read_cached seq_read_cached_cpu)
declare -A LABEL=(
    [seq_write]="seq write ${BIG_MB} MiB (1M, fsync)"
    [seq_read_cold]="seq read cold"
    [seq_read_cached]="seq read cached"
    [seq_read_cached_cpu]="  its reader CPU (user+sys s)"
    [small_create]="create $NFILES x 4K files"
    [onedir_create]="create $ONEDIR x 4K in one dir"
    [small_read_cold]="read back $NFILES files cold"
    [stat_cold]="stat $NFILES-file tree cold"
    [stat_cached]="stat $NFILES-file tree cached"
    [untar]="untar ${TAR_MB} MB, $TAR_FILES entries")
has() { [ -n "${T[$1,$2]:-}" ]; }   # setup row: was it measured in this run?
ratio() { if has "$2" "$1" && has thinfs "$1"; then printf '%.3f' "$(echo "${T[$2,$1]} / ${T[thinfs,$1]}" | bc -l)"; else echo "-"; fi; }

echo
echo "fs-bench: $( [ $QUICK = 1 ] && echo quick || echo full ) run$( [ $SEQ_ONLY = 1 ] && echo ", sequential rows only"), $(nproc) CPUs, $(awk '/MemTotal/ {print $2" kB"}' /proc/meminfo), scratch $(df -T "$WORK" | awk 'NR==2 {print $2" on "$1}')"
echo "Load average (1, 5, 15 min): $LOAD_BEFORE before, $LOAD_AFTER after."
echo "Seconds per workload (MB/s for sequential rows in brackets). Ratios are other_time / thinfs_time: > 1 means thinfs is faster."
printf '%-34s %16s %16s %16s %16s | %8s %8s %8s\n' workload thinfs fuse2fs ext4 overlay "vs f2fs" "vs ovl" "vs ext4"
for r in "${ROWS[@]}"; do
    line=$(printf '%-34s' "${LABEL[$r]}")
    for s in thinfs fuse2fs ext4 overlay; do
        if has "$s" "$r"; then
            cell=$(printf '%.2f' "${T[$s,$r]}")
            case "$r" in *_cpu) ;; seq_*) cell="$cell ($(echo "$BIG_MB * 1.048576 / ${T[$s,$r]}" | bc -l | xargs printf '%.0f'))" ;; esac
        else
            cell="-"
        fi
        line="$line $(printf '%16s' "$cell")"
    done
    line="$line | $(printf '%8s %8s %8s' "$(ratio "$r" fuse2fs)x" "$(ratio "$r" overlay)x" "$(ratio "$r" ext4)x")"
    echo "$line"
done

echo
echo "Goals:"
goal() { # name row other minimum
    local v; v=$(ratio "$2" "$3")
    if [ "$v" = - ]; then return; fi
    if [ "$(echo "$v >= $4" | bc -l)" = 1 ]; then echo "  PASS  $1: ${v}x (goal >= $4x)"; else echo "  MISS  $1: ${v}x (goal >= $4x)"; fi
}
for r in "${ROWS[@]}"; do
    # "Beat" fuse2fs: strictly faster.
    case "$r" in *_cpu) continue ;; esac
    v=$(ratio "$r" fuse2fs)
    [ "$v" = - ] && continue
    if [ "$(echo "${T[fuse2fs,$r]} > ${T[thinfs,$r]}" | bc -l)" = 1 ]; then echo "  PASS  beat fuse2fs, ${LABEL[$r]}: ${v}x"; else echo "  MISS  beat fuse2fs, ${LABEL[$r]}: ${v}x"; fi
done
goal "cached seq read vs overlayfs" seq_read_cached overlay 0.9
goal "cold seq read vs overlayfs" seq_read_cold overlay 0.5
goal "cold small-file read vs overlayfs" small_read_cold overlay 0.5
exit 0
