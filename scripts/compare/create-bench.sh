#!/usr/bin/env bash
# create-bench.sh: N files created in one directory through a mount, for several N, with two
# or more thinfs-mount builds (before/after a change) and the kernel, interleaved round by round
# in one run, so that a shared, busy machine treats them alike.
#
#   scripts/compare/create-bench.sh [--counts 1000,4000,16000] [--rounds 3] [--dir DIR]
#                                   [--kernel ext4,overlay] [--read | --untar TAR | --rm] LABEL=BINDIR[:OPTIONS]...
#
# Each LABEL=BINDIR is a thinfs build (BINDIR holds thinfs and thinfs-mount, e.g.
# .build-fsbench/release), mounted with `-o OPTIONS` if given; each gets its own pool and 8G
# device. --kernel adds kernel ext4 on a loop device and overlayfs (default both; --kernel none
# for neither). Every step mounts cold
# (drop_caches before it), creates N files of 4 KiB in a new directory with
# open(O_CREAT|O_EXCL)/write/close from one process, and unmounts. The report gives the time
# per file for each setup and N, the ratio of each setup to the first label, to overlayfs, and
# each N against the smallest N, with the load average of every step, and for thinfs the
# daemon's CPU time per file (robust to a busy machine). Needs root and /dev/fuse.
#
# --read measures warm reads instead: the N files are created once per setup (untimed); each
# step mounts cold, reads every file twice (compare.py's read-tree) and times the second pass,
# the page cache's. With tracefs, each pass's FUSE upcalls per file are counted by opcode (a
# private trace instance, fuse:fuse_request_send, filtered on the mount's connection). READ
# requests in a second pass mean something emptied the page cache between the passes (another
# process's drop_caches on a shared machine): leave that step out.
#
# --untar TAR measures `tar -xf TAR` into a new directory, then `sync -f` (as `thinfs compare`'s
# untar step), per entry of TAR (--counts is ignored): each step mounts cold (drop_caches first)
# and, with tracefs, counts the FUSE upcalls per entry by opcode.
#
# --rm measures removal: each step creates the N files in a new directory as above (untimed,
# without the label's options), unmounts, drops caches and mounts cold, then times `rm -rf DIR`
# and `sync -f` of the mount, per file; the daemon's CPU time is counted over the rm alone and,
# with tracefs, the FUSE upcalls per file by opcode (issue 11's goal: 10,000 files in one
# directory removed in at most 2x overlayfs's time).
set -euo pipefail

COUNTS=(1000 4000 16000)
ROUNDS=3
DIR=/var/tmp
KERNEL=(ext4 overlay)
MODE=create
LABELS=()
declare -A BINS OPTS
while [ $# -gt 0 ]; do
    case "$1" in
        --counts) IFS=, read -r -a COUNTS <<< "$2"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --dir) DIR="$2"; shift ;;
        --kernel) if [ "$2" = none ]; then KERNEL=(); else IFS=, read -r -a KERNEL <<< "$2"; fi; shift ;;
        --read) MODE=read ;;
        --untar) MODE=untar; UNTAR="$(realpath "$2")"; shift ;;
        --rm) MODE=rm ;;
        -h|--help) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *=*:*) l="${1%%=*}"; v="${1#*=}"; LABELS+=("$l"); BINS[$l]="${v%%:*}"; OPTS[$l]="${v#*:}" ;;
        *=*) LABELS+=("${1%%=*}"); BINS[${1%%=*}]="${1#*=}" ;;
        *) echo "create-bench: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#LABELS[@]} -gt 0 ] || { echo "create-bench: give at least one LABEL=BINDIR" >&2; exit 2; }
if [ "$(id -u)" != 0 ]; then echo "create-bench: needs root (mount, losetup, drop_caches)" >&2; exit 1; fi
for l in "${LABELS[@]}"; do
    for b in thinfs thinfs-mount; do
        [ -x "${BINS[$l]}/$b" ] || { echo "create-bench: ${BINS[$l]}/$b is missing" >&2; exit 1; }
    done
done

WORK="$(mktemp -d "$DIR/create-bench.XXXXXX")"
BENCH_NAME=create-bench
. "$(dirname "$0")/bench-lib.sh"   # bench_cleanup (on EXIT), drop_caches, wait_gone
SCRATCH=("$WORK")

# ── Setups: thinfs builds by label, kernel ext4, overlayfs ──
SETUPS=("${LABELS[@]}" "${KERNEL[@]}")
declare -A TPID
setup() {
    local s="$1"; MNT="$WORK/mnt-$s"; mkdir -p "$MNT"; MOUNTS+=("$MNT")
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
# mount_setup SETUP [plain]: plain leaves out the label's options (the read mode's untimed writes).
mount_setup() {
    local s="$1" mnt="$WORK/mnt-$1"
    case "$s" in
        ext4) mount -o loop "$WORK/ext4.img" "$mnt" ;;
        overlay) mount -t overlay overlay -o "lowerdir=$WORK/ovl/lower,upperdir=$WORK/ovl/upper,workdir=$WORK/ovl/work" "$mnt" ;;
        *) local o=(); [ -z "${OPTS[$s]:-}" ] || [ "${2:-}" = plain ] || o=(-o "${OPTS[$s]}")
           "${BINS[$s]}/thinfs-mount" --root "$WORK/pool-$s" --device 1 "$mnt" "${o[@]}"
           local p c; TPID[$s]=""
           for p in /proc/[0-9]*; do
               c="$( { tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null)" || continue
               case "$c" in *thinfs-mount*"--device 1 $mnt "*"-f"*) TPID[$s]="${p#/proc/}"; PIDS+=("${p#/proc/}") ;; esac
           done
           [ -n "${TPID[$s]}" ] || { echo "create-bench: no daemon for $mnt" >&2; return 1; } ;;
    esac
}
umount_setup() {
    umount "$WORK/mnt-$1"
    case "$1" in ext4|overlay) ;; *) wait_gone "${TPID[$1]}" ;; esac
}

# compare.py's step (`thinfs compare` runs the same code): N files of 4 KiB in one new directory.
create_files() { python3 "$(dirname "$0")/compare.py" workload create-files "$1" "$2" >/dev/null; }
# compare.py's read-tree: every file read; prints the seconds of the reads alone (no process start).
read_tree() { python3 "$(dirname "$0")/compare.py" workload read-tree "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["seconds"])'; }

# FUSE upcalls by opcode, counted with a private tracefs instance (none without tracefs).
TRACE=""
if [ "$MODE" != create ] && [ -d /sys/kernel/tracing/events/fuse/fuse_request_send ]; then
    TRACE="/sys/kernel/tracing/instances/create-bench-$$"
    mkdir "$TRACE"
    echo 16384 > "$TRACE/buffer_size_kb"
fi
trace_cleanup() { if [ -n "$TRACE" ] && [ -d "$TRACE" ]; then echo 0 > "$TRACE/events/fuse/fuse_request_send/enable"; rmdir "$TRACE"; fi; }
trap 'trace_cleanup; bench_cleanup' EXIT
# daemon_cpu SETUP: the thinfs daemon's utime + stime in clock ticks (nothing for a kernel setup).
daemon_cpu() { [ -z "${TPID[$1]:-}" ] || awk '{print $14 + $15}' "/proc/${TPID[$1]}/stat"; }
# trace_start MOUNTPOINT: count the requests of that mount's connection (its device, as the kernel's dev_t).
trace_start() {
    [ -n "$TRACE" ] || return 0
    [ "$(stat -f -c %T "$1")" = fuseblk ] || [ "$(stat -f -c %T "$1")" = fuse ] || return 0
    local maj min; read -r maj min < <(stat -c '%Hd %Ld' "$1")
    echo "connection == $(( (maj << 20) | min ))" > "$TRACE/events/fuse/fuse_request_send/filter"
    echo > "$TRACE/trace"
    echo 1 > "$TRACE/events/fuse/fuse_request_send/enable"
}
# trace_stop N: "OPCODE=count/N ..." for the requests since trace_start, per file.
trace_stop() {
    [ -n "$TRACE" ] || { echo "-"; return 0; }
    [ "$(cat "$TRACE/events/fuse/fuse_request_send/enable")" = 1 ] || { echo "-"; return 0; }
    echo 0 > "$TRACE/events/fuse/fuse_request_send/enable"
    { grep -o '(FUSE_[A-Z_]*)' "$TRACE/trace" || true; } | tr -d '()' | sed 's/FUSE_//' | sort | uniq -c |
        awk -v n="$1" '{printf "%s%s=%.2f", sep, $2, $1 / n; sep=" "} END {if (!NR) printf "none"}'
}

if [ "$MODE" = untar ]; then COUNTS=("$(tar -tf "$UNTAR" | wc -l)"); fi
for s in "${SETUPS[@]}"; do echo "create-bench: setting up $s" >&2; setup "$s"; done
if [ "$MODE" = read ]; then
    for s in "${SETUPS[@]}"; do
        mount_setup "$s" plain
        for n in "${COUNTS[@]}"; do create_files "$WORK/mnt-$s/tree-$n" "$n"; done
        umount_setup "$s"
    done
fi

declare -A SUM NRUN CSUM
LOG="$WORK/steps.txt"
for r in $(seq 1 "$ROUNDS"); do
    # Rotate the order each round, so that no setup always runs right after another.
    order=("${SETUPS[@]:$(( (r - 1) % ${#SETUPS[@]} ))}" "${SETUPS[@]:0:$(( (r - 1) % ${#SETUPS[@]} ))}")
    for n in "${COUNTS[@]}"; do
        for s in "${order[@]}"; do
            if [ "$MODE" = read ]; then
                drop_caches
                mount_setup "$s"
                load="$(cut -d' ' -f1 /proc/loadavg)"
                trace_start "$WORK/mnt-$s"
                cold=$(read_tree "$WORK/mnt-$s/tree-$n")
                up1=$(trace_stop "$n")
                trace_start "$WORK/mnt-$s"
                c0=$(daemon_cpu "$s")
                warm=$(read_tree "$WORK/mnt-$s/tree-$n")
                c1=$(daemon_cpu "$s")
                up2=$(trace_stop "$n")
                cpu=""
                if [ -n "$c0" ]; then
                    cpu=$(echo "($c1 - $c0) * 1000000 / $(getconf CLK_TCK) / $n" | bc -l)
                    CSUM[$s,$n]=$(echo "${CSUM[$s,$n]:-0} + $cpu" | bc -l)
                fi
                umount_setup "$s"
                us=$(echo "$warm * 1000000 / $n" | bc -l)
                printf 'round %d  %-10s %6d files  warm %8.1f us/file (daemon CPU %s)  cold %8.1f us/file  load %s\n' \
                    "$r" "$s" "$n" "$us" "$(printf '%.1f' "${cpu:-0}")" "$(echo "$cold * 1000000 / $n" | bc -l)" "$load" | tee -a "$LOG" >&2
                printf '    upcalls per file, first pass: %s\n    second pass: %s\n' "$up1" "$up2" | tee -a "$LOG" >&2
                SUM[$s,$n]=$(echo "${SUM[$s,$n]:-0} + $us" | bc -l)
                NRUN[$s,$n]=$(( ${NRUN[$s,$n]:-0} + 1 ))
                continue
            fi
            if [ "$MODE" = rm ]; then   # the files to remove, untimed, then a cold mount
                mount_setup "$s" plain
                create_files "$WORK/mnt-$s/r$r-n$n" "$n"
                umount_setup "$s"
            fi
            drop_caches
            mount_setup "$s"
            load="$(cut -d' ' -f1 /proc/loadavg)"
            c0=$(daemon_cpu "$s")
            if [ "$MODE" = rm ]; then
                trace_start "$WORK/mnt-$s"
                t0=$(date +%s.%N)
                rm -rf "$WORK/mnt-$s/r$r-n$n"
                tr=$(date +%s.%N)
                sync -f "$WORK/mnt-$s"
                t1=$(date +%s.%N)
                up1=$(trace_stop "$n")
            elif [ "$MODE" = untar ]; then
                mkdir "$WORK/mnt-$s/r$r"
                trace_start "$WORK/mnt-$s"
                t0=$(date +%s.%N)
                tar -xf "$UNTAR" -C "$WORK/mnt-$s/r$r"
                sync -f "$WORK/mnt-$s/r$r"
                t1=$(date +%s.%N)
                up1=$(trace_stop "$n")
            else
                t0=$(date +%s.%N)
                create_files "$WORK/mnt-$s/r$r-n$n" "$n"
                t1=$(date +%s.%N)
            fi
            cpu=""
            # The daemon's own CPU time (utime + stime) since it started: on a busy machine the
            # wall time is mostly waiting for a CPU, the CPU time is what the daemon's work costs.
            if [ -n "${TPID[$s]:-}" ] && [ "$MODE" = rm ]; then   # over the rm alone
                cpu=$(echo "($(daemon_cpu "$s") - $c0) * 1000000 / $(getconf CLK_TCK) / $n" | bc -l | xargs printf '%.1f')
                CSUM[$s,$n]=$(echo "${CSUM[$s,$n]:-0} + $cpu" | bc -l)
            elif [ -n "${TPID[$s]:-}" ]; then
                cpu=$(awk -v n="$n" -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) * 1000000 / hz / n}' "/proc/${TPID[$s]}/stat")
                CSUM[$s,$n]=$(echo "${CSUM[$s,$n]:-0} + $cpu" | bc -l)
            fi
            umount_setup "$s"
            us=$(echo "($t1 - $t0) * 1000000 / $n" | bc -l)
            printf 'round %d  %-10s %6d files  %8.1f us/file  daemon CPU %8s us/file  load %s\n' "$r" "$s" "$n" "$us" "${cpu:--}" "$load" | tee -a "$LOG" >&2
            [ "$MODE" != untar ] || printf '    upcalls per entry: %s\n' "$up1" | tee -a "$LOG" >&2
            [ "$MODE" != rm ] || printf '    of which sync -f %.1f ms; upcalls per file: %s\n' "$(echo "($t1 - $tr) * 1000" | bc -l)" "$up1" | tee -a "$LOG" >&2
            SUM[$s,$n]=$(echo "${SUM[$s,$n]:-0} + $us" | bc -l)
            NRUN[$s,$n]=$(( ${NRUN[$s,$n]:-0} + 1 ))
        done
    done
done

mean() { echo "${SUM[$1,$2]} / ${NRUN[$1,$2]}" | bc -l; }
echo
echo "create-bench: $ROUNDS rounds, $(nproc) CPUs, load average now $(cut -d' ' -f1-3 /proc/loadavg); scratch $(df -T "$WORK" | awk 'NR==2 {print $2}')"
if [ "$MODE" = untar ]; then
    echo "Mean microseconds per entry of tar -xf $UNTAR then sync -f, then ratios."
elif [ "$MODE" = rm ]; then
    echo "Mean microseconds per file of rm -rf of N files of 4 KiB in one directory (cold mount) then sync -f, then ratios."
elif [ "$MODE" = read ]; then
    echo "Mean microseconds per file of the second of two reads of every file (4 KiB each, open/read/close), then ratios."
else
    echo "Mean microseconds per file (open O_CREAT|O_EXCL, 4 KiB write, close), then ratios."
fi
printf '%-12s' setup; for n in "${COUNTS[@]}"; do printf ' %12s' "$n"; done
printf ' | %s\n' "last N / first N"
for s in "${SETUPS[@]}"; do
    printf '%-12s' "$s"
    for n in "${COUNTS[@]}"; do printf ' %12.1f' "$(mean "$s" "$n")"; done
    printf ' | %.2fx\n' "$(echo "$(mean "$s" "${COUNTS[-1]}") / $(mean "$s" "${COUNTS[0]}")" | bc -l)"
done
if [ "$MODE" = read ]; then echo "Mean daemon CPU microseconds per file in the second pass (thinfs builds):"
elif [ "$MODE" = rm ]; then echo "Mean daemon CPU microseconds per file over the rm and sync (thinfs builds):"
else echo "Mean daemon CPU microseconds per file (thinfs builds):"; fi
for s in "${LABELS[@]}"; do
    printf '%-12s' "$s"
    for n in "${COUNTS[@]}"; do printf ' %12.1f' "$(echo "${CSUM[$s,$n]} / ${NRUN[$s,$n]}" | bc -l)"; done
    printf ' | %.2fx\n' "$(echo "${CSUM[$s,${COUNTS[-1]}]} / ${CSUM[$s,${COUNTS[0]}]}" | bc -l)"
done
base="${LABELS[0]}"
for s in "${SETUPS[@]}"; do
    [ "$s" = "$base" ] && continue
    printf '%-12s' "$s/$base"; for n in "${COUNTS[@]}"; do printf ' %11.2fx' "$(echo "$(mean "$s" "$n") / $(mean "$base" "$n")" | bc -l)"; done; echo
done
if [[ " ${KERNEL[*]} " == *" overlay "* ]]; then
    for s in "${LABELS[@]}"; do
        printf '%-12s' "$s/overlay"; for n in "${COUNTS[@]}"; do printf ' %11.2fx' "$(echo "$(mean "$s" "$n") / $(mean overlay "$n")" | bc -l)"; done; echo
    done
fi
echo
echo "Steps:"; cat "$LOG"
exit 0
