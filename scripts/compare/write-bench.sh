#!/usr/bin/env bash
# write-bench.sh: write and fsync workloads through a mount, for two or more thinfs-mount builds
# (before/after a change) and the kernel, interleaved round by round in one run, so that a
# shared, busy machine treats them alike.
#
#   scripts/compare/write-bench.sh [--rounds 3] [--dir DIR] [--kernel ext4,overlay] [--strace]
#                                  [--workloads seq,rand,rewrite,rewrite4,sqlite,pgbench]
#                                  [--pgbench-seconds 20] LABEL=BINDIR...
#
# Each LABEL=BINDIR is a thinfs build (BINDIR holds thinfs and thinfs-mount); each gets its own
# pool and 8G device. --kernel adds kernel ext4 on a loop device and overlayfs (upper on DIR's
# filesystem). Workloads, each on a fresh cold mount (drop_caches before it):
#   seq      fio: 256 MiB written sequentially in 1 MiB writes, fsync at the end
#   rand     fio: 2,000 random 4 KiB writes into an existing 64 MiB file, fsync at the end
#   rewrite  200 times: pwrite 4 KiB into an existing file, fsync (python3)
#   rewrite4 the same from 4 threads at once, 50 each (concurrent fsyncs; not by default)
#   sqlite   200 transactions of one INSERT each, synchronous=FULL (python3's sqlite3)
#   pgbench  PostgreSQL 15 (not by default): a cluster made on the mount (initdb, then
#            `pgbench -i -s 4`, untimed, as user postgres), the mount remounted cold, the server
#            started on a unix socket in a private directory (no TCP), then
#            `pgbench -n -c 2 -j 2 -T S` (S: --pgbench-seconds or PGBENCH_SECONDS, default 20)
#            with fsync=on and synchronous_commit=on; reported as pgbench's tps (and the daemon's
#            CPU ms per transaction), the ratio tps/tps(overlay) above 1 meaning faster. The
#            server is stopped by its postmaster PID (pg_ctl stop -m fast) before the unmount.
# --strace attaches strace -f -c to the daemon during each timed step and reports its syscalls
# (all, fdatasync, pwrite64) per step: counts that do not move with the load, and wall times that
# strace inflates (run without it for those).
# The report gives the wall time of each step, the ratio to the first label and to overlayfs,
# the load average, and for thinfs the daemon's CPU time for the step (from /proc/PID/stat,
# steadier than the wall time on a busy machine). Needs root, /dev/fuse and fio (and PostgreSQL 15
# with a postgres user, and pgbench, for pgbench).
set -euo pipefail

ROUNDS=3
DIR=/var/tmp
KERNEL=(ext4 overlay)
WORKLOADS=(seq rand rewrite sqlite)
LABELS=()
STRACE=0
PG_SECONDS="${PGBENCH_SECONDS:-20}"
declare -A BINS
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift ;;
        --dir) DIR="$2"; shift ;;
        --kernel) if [ "$2" = none ]; then KERNEL=(); else IFS=, read -r -a KERNEL <<< "$2"; fi; shift ;;
        --workloads) IFS=, read -r -a WORKLOADS <<< "$2"; shift ;;
        --strace) STRACE=1 ;;
        --pgbench-seconds) PG_SECONDS="$2"; shift ;;
        -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *=*) LABELS+=("${1%%=*}"); BINS[${1%%=*}]="${1#*=}" ;;
        *) echo "write-bench: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#LABELS[@]} -gt 0 ] || { echo "write-bench: give at least one LABEL=BINDIR" >&2; exit 2; }
if [ "$(id -u)" != 0 ]; then echo "write-bench: needs root (mount, losetup, drop_caches)" >&2; exit 1; fi
command -v fio >/dev/null || { echo "write-bench: needs fio (apt-get install fio)" >&2; exit 1; }
PG_BIN=/usr/lib/postgresql/15/bin
if [[ " ${WORKLOADS[*]} " == *" pgbench "* ]]; then
    [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ] && command -v pgbench >/dev/null && id postgres >/dev/null 2>&1 ||
        { echo "write-bench: pgbench needs PostgreSQL 15 ($PG_BIN), pgbench and the user postgres" >&2; exit 1; }
fi
if [ "$STRACE" = 1 ]; then command -v strace >/dev/null || { echo "write-bench: --strace needs strace" >&2; exit 1; }; fi
for l in "${LABELS[@]}"; do
    for b in thinfs thinfs-mount; do
        [ -x "${BINS[$l]}/$b" ] || { echo "write-bench: ${BINS[$l]}/$b is missing" >&2; exit 1; }
    done
done

WORK="$(mktemp -d "$DIR/write-bench.XXXXXX")"
BENCH_NAME=write-bench
. "$(dirname "$0")/bench-lib.sh"   # bench_cleanup (on EXIT), drop_caches, wait_gone
SCRATCH=("$WORK")
# User postgres (pgbench) reaches the mounts and its socket directory under WORK (then thinfs-mount
# warns that it mounts nosuid,nodev: nothing here depends on either).
[[ " ${WORKLOADS[*]} " != *" pgbench "* ]] || chmod 711 "$WORK"

# PostgreSQL (pgbench): one server at a time, run as postgres, listening on a unix socket alone in
# a directory of its own per step (no TCP), on a port of this run. PG_PID is its postmaster while
# it runs; pg_cleanup (on EXIT, before bench_cleanup's unmounts) stops it by that PID.
PG_PORT=$(( 20000 + $$ % 20000 )); PG_PID=""; PG_DATA=""; PG_SOCK=""
as_pg() { (cd / && runuser -u postgres -- "$@"); }
pg_start() {   # pg_start DATADIR SOCKETDIR
    PG_DATA="$1"; PG_SOCK="$2"
    mkdir -p "$PG_SOCK"; chown postgres: "$PG_SOCK"; chmod 700 "$PG_SOCK"
    as_pg "$PG_BIN/pg_ctl" start -w -s -D "$PG_DATA" -l "$PG_SOCK/server.log" \
        -o "-c listen_addresses='' -c unix_socket_directories='$PG_SOCK' -p $PG_PORT -c fsync=on -c synchronous_commit=on" >/dev/null
    PG_PID=$(head -1 "$PG_DATA/postmaster.pid")
}
pg_stop() {
    [ -n "$PG_PID" ] || return 0
    if kill -0 "$PG_PID" 2>/dev/null; then
        as_pg "$PG_BIN/pg_ctl" stop -w -s -m fast -D "$PG_DATA" || kill -INT "$PG_PID"
        wait_gone "$PG_PID"
    fi
    PG_PID=""
}
pg_cleanup() { set +e; pg_stop; }
trap 'pg_cleanup; bench_cleanup' EXIT

SETUPS=("${LABELS[@]}" "${KERNEL[@]}")
declare -A TPID
setup() {
    local s="$1"; mkdir -p "$WORK/mnt-$s"; MOUNTS+=("$WORK/mnt-$s")
    case "$s" in
        ext4) truncate -s 8G "$WORK/ext4.img"; IMAGES+=("$WORK/ext4.img")
              mke2fs -q -F -t ext4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$WORK/ext4.img" ;;
        overlay) mkdir -p "$WORK/ovl/lower" "$WORK/ovl/upper" "$WORK/ovl/work" ;;
        *) local t="${BINS[$s]}/thinfs" root="$WORK/pool-$s"
           "$t" pool create --root "$root" --data-size 20G --metadata-size 256M >/dev/null
           "$t" pool message --root "$root" create_thin 1 >/dev/null
           "$t" dev format --root "$root" 1 --size 8G >/dev/null ;;
    esac
}
mount_setup() {
    local s="$1" mnt="$WORK/mnt-$1"
    case "$s" in
        ext4) mount -o loop "$WORK/ext4.img" "$mnt" ;;
        overlay) mount -t overlay overlay -o "lowerdir=$WORK/ovl/lower,upperdir=$WORK/ovl/upper,workdir=$WORK/ovl/work" "$mnt" ;;
        *) "${BINS[$s]}/thinfs-mount" --root "$WORK/pool-$s" --device 1 "$mnt"
           local p c; TPID[$s]=""
           for p in /proc/[0-9]*; do
               c="$( { tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null)" || continue
               case "$c" in *thinfs-mount*"--device 1 $mnt -f"*) TPID[$s]="${p#/proc/}"; PIDS+=("${p#/proc/}") ;; esac
           done
           [ -n "${TPID[$s]}" ] || { echo "write-bench: no daemon for $mnt" >&2; return 1; } ;;
    esac
}
umount_setup() {
    umount "$WORK/mnt-$1"
    case "$1" in ext4|overlay) ;; *) wait_gone "${TPID[$1]}" ;; esac
}
daemon_cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.0f", ($14 + $15) * 1000 / hz}' "/proc/$1/stat"; }

# The fio jobs and their file layout are compare.py's (`thinfs compare` runs the same jobs).
COMPARE="$(cd "$(dirname "$0")" && pwd)/compare.py"
# Files the steps rewrite exist before the timed part (prepare), in the step's own directory.
prepare() {
    local w="$1" d="$2"
    mkdir -p "$d"
    case "$w" in
        rand|rewrite|rewrite4) python3 "$COMPARE" workload fio-layout fio-rand-write "$d" 64 >/dev/null ;;
        pgbench) mkdir "$d/pg"; chown postgres: "$d/pg"; chmod 700 "$d/pg"
                 as_pg "$PG_BIN/initdb" -D "$d/pg" -A trust -U postgres --no-sync >/dev/null
                 pg_start "$d/pg" "$WORK/pgsock-prep"
                 as_pg pgbench -h "$PG_SOCK" -p "$PG_PORT" -U postgres -i -s 4 -q postgres > "$WORK/pgbench-init.out" 2>&1 ||
                     { cat "$WORK/pgbench-init.out" >&2; echo "write-bench: pgbench -i failed" >&2; return 1; }
                 pg_stop ;;
        *) ;;
    esac
}
run() {
    local w="$1" d="$2"
    case "$w" in
        seq) python3 "$COMPARE" workload fio fio-seq-write "$d" 256 0 >/dev/null ;;
        rand) python3 "$COMPARE" workload fio fio-rand-write "$d" 64 2000 >/dev/null ;;
        rewrite) python3 - "$d/fio.data" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
data = os.urandom(4096)
for i in range(200):
    os.pwrite(fd, data, (i * 7919 % 16384) * 4096)   # within the 64 MiB file fio-layout wrote
    os.fsync(fd)
os.close(fd)
PY
        ;;
        rewrite4) python3 - "$d/fio.data" <<'PY'
import os, sys, threading
def worker(t):
    fd = os.open(sys.argv[1], os.O_WRONLY)
    data = os.urandom(4096)
    for i in range(50):
        os.pwrite(fd, data, ((t * 50 + i) * 7919 % 16384) * 4096)
        os.fsync(fd)
    os.close(fd)
threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
for t in threads: t.start()
for t in threads: t.join()
PY
        ;;
        pgbench) as_pg pgbench -h "$PG_SOCK" -p "$PG_PORT" -U postgres -n -c 2 -j 2 -T "$PG_SECONDS" postgres > "$WORK/pgbench.out" ;;
        sqlite) python3 - "$d/db" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA synchronous=FULL")
c.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
for i in range(200):
    c.execute("BEGIN")
    c.execute("INSERT INTO t (v) VALUES (randomblob(200))")
    c.execute("COMMIT")
c.close()
PY
        ;;
    esac
}

for s in "${SETUPS[@]}"; do echo "write-bench: setting up $s" >&2; setup "$s"; done

declare -A SUM CSUM TPS TXN
LOG="$WORK/steps.txt"
for r in $(seq 1 "$ROUNDS"); do
    # Rotate the order each round, so that no setup always runs right after another.
    order=("${SETUPS[@]:$(( (r - 1) % ${#SETUPS[@]} ))}" "${SETUPS[@]:0:$(( (r - 1) % ${#SETUPS[@]} ))}")
    for w in "${WORKLOADS[@]}"; do
        for s in "${order[@]}"; do
            mount_setup "$s"
            prepare "$w" "$WORK/mnt-$s/r$r-$w"
            umount_setup "$s"
            drop_caches
            mount_setup "$s"
            [ "$w" != pgbench ] || pg_start "$WORK/mnt-$s/r$r-$w/pg" "$WORK/pgsock-$r-$s"   # untimed
            load="$(cut -d' ' -f1 /proc/loadavg)"
            c0=""; [ -n "${TPID[$s]:-}" ] && c0=$(daemon_cpu_ms "${TPID[$s]}")
            spid=""
            if [ "$STRACE" = 1 ] && [ -n "${TPID[$s]:-}" ]; then
                strace -f -c -p "${TPID[$s]}" -o "$WORK/strace-$r-$w-$s.txt" 2>/dev/null & spid=$!
                sleep 1   # attached to every thread before the step starts
            fi
            t0=$(date +%s.%N)
            run "$w" "$WORK/mnt-$s/r$r-$w"
            t1=$(date +%s.%N)
            sys=""
            if [ -n "$spid" ]; then
                kill -INT "$spid"; wait "$spid" || true
                # strace -c's columns: % time, seconds, usecs/call, calls, [errors,] syscall.
                sys=$(awk '$NF == "total" {t = $4} $NF == "fdatasync" {f = $4} $NF == "pwrite64" {p = $4}
                           END {printf "syscalls %d fdatasync %d pwrite64 %d", t, f, p}' "$WORK/strace-$r-$w-$s.txt")
            fi
            cpu=""
            if [ -n "${TPID[$s]:-}" ]; then
                cpu=$(( $(daemon_cpu_ms "${TPID[$s]}") - c0 ))
                CSUM[$s,$w]=$(( ${CSUM[$s,$w]:-0} + cpu ))
            fi
            if [ "$w" = pgbench ]; then
                pg_stop
                # pgbench's own figures: tps over the run (connections excluded), transactions.
                tps=$(awk '/^tps = / {print $3; exit}' "$WORK/pgbench.out")
                txn=$(awk -F': ' '/^number of transactions actually processed/ {print $2; exit}' "$WORK/pgbench.out")
                [ -n "$tps" ] && [ -n "$txn" ] || { cat "$WORK/pgbench.out" >&2; echo "write-bench: no tps from pgbench" >&2; exit 1; }
                cpt="-"; [ -z "$cpu" ] || cpt=$(printf '%.2f ms' "$(echo "$cpu / $txn" | bc -l)")
                sys="tps $tps  transactions $txn  daemon CPU/txn $cpt  $sys"
                TPS[$s]=$(echo "${TPS[$s]:-0} + $tps" | bc -l); TXN[$s]=$(( ${TXN[$s]:-0} + txn ))
            fi
            umount_setup "$s"
            ms=$(echo "($t1 - $t0) * 1000" | bc -l)
            printf 'round %d  %-8s %-10s %9.1f ms  daemon CPU %6s ms  load %s  %s\n' "$r" "$w" "$s" "$ms" "${cpu:--}" "$load" "$sys" | tee -a "$LOG" >&2
            SUM[$s,$w]=$(echo "${SUM[$s,$w]:-0} + $ms" | bc -l)
        done
    done
done

if [ "${WORKLOADS[*]}" != pgbench ]; then
    echo
    echo "Mean of $ROUNDS rounds (wall ms; daemon CPU ms for thinfs); ratios to ${LABELS[0]} and to overlay"
    printf '%-8s %-10s %10s %10s %10s %10s\n' workload setup wall_ms cpu_ms "x_${LABELS[0]}" x_overlay
fi
for w in "${WORKLOADS[@]}"; do
    [ "$w" != pgbench ] || continue   # its wall time is -T: the tps table below
    for s in "${SETUPS[@]}"; do
        m=$(echo "${SUM[$s,$w]} / $ROUNDS" | bc -l)
        base=$(echo "${SUM[${LABELS[0]},$w]} / $ROUNDS" | bc -l)
        ov="-"; [ -n "${SUM[overlay,$w]:-}" ] && ov=$(printf '%.2f' "$(echo "$m / (${SUM[overlay,$w]} / $ROUNDS)" | bc -l)")
        cpu="-"; [ -n "${CSUM[$s,$w]:-}" ] && cpu=$(( CSUM[$s,$w] / ROUNDS ))
        printf '%-8s %-10s %10.1f %10s %10.2f %10s\n' "$w" "$s" "$m" "$cpu" "$(echo "$m / $base" | bc -l)" "$ov"
    done
done
if [ -n "${TPS[${LABELS[0]}]:-}" ]; then
    echo
    echo "pgbench (-c 2 -j 2 -T $PG_SECONDS, scale 4, fsync=on, synchronous_commit=on): mean tps of $ROUNDS rounds;"
    echo "ratios of tps, so above 1 means faster than ${LABELS[0]} / overlay"
    printf '%-10s %10s %14s %10s %10s\n' setup tps cpu_ms/txn "x_${LABELS[0]}" x_overlay
    for s in "${SETUPS[@]}"; do
        t=$(echo "${TPS[$s]} / $ROUNDS" | bc -l)
        cpu="-"; [ -n "${CSUM[$s,pgbench]:-}" ] && cpu=$(printf '%.2f' "$(echo "${CSUM[$s,pgbench]} / ${TXN[$s]}" | bc -l)")
        ov="-"; [ -n "${TPS[overlay]:-}" ] && ov=$(printf '%.2f' "$(echo "${TPS[$s]} / ${TPS[overlay]}" | bc -l)")
        printf '%-10s %10.1f %14s %10.2f %10s\n' "$s" "$t" "$cpu" "$(echo "${TPS[$s]} / ${TPS[${LABELS[0]}]}" | bc -l)" "$ov"
    done
fi
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; $(uname -r)"
