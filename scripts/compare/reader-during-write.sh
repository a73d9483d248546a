#!/bin/bash
# reader-during-write.sh ROUNDS [--loop] LABEL=BINDIR...: does a writer hold up the rest of a mount?
# Per thinfs build (its own pool, 8G data, a 4G device; with --loop the pool's data is a loop
# device over a sparse file instead of a plain file), alternating round by round:
#   1. a cold tree of 2,000 files of 3,000 bytes is read alone (stat, then read each), timed;
#   2. the same tree is read again, cold, while fio writes 512 MiB in 1 MiB writes into another
#      file of the mount (no end fsync), both timed.
# Caches are dropped before each step. Prints one line per build and round, with the load. Needs
# root, /dev/fuse and fio. Every mount, daemon (by PID), loop device and scratch directory goes on
# exit (bench-lib.sh). docs/benchmarks.md, "Session 13: writes outside the volume lock".
set -euo pipefail
R=${1:?usage: reader-during-write.sh ROUNDS [--loop] LABEL=BINDIR...}; shift
LOOP=0; if [ "${1:-}" = --loop ]; then LOOP=1; shift; fi
WORK=$(mktemp -d /var/tmp/reader-during-write.XXXXXX)
BENCH_NAME=reader-during-write
. "$(dirname "$0")/bench-lib.sh"
SCRATCH=("$WORK")
LABELS=()
for a in "$@"; do l=${a%%=*}; LABELS+=($l); T=${a#*=}
  data=$WORK/data-$l
  if [ $LOOP = 1 ]; then truncate -s 8G $WORK/back-$l; IMAGES+=("$WORK/back-$l"); data=$(losetup -f --show $WORK/back-$l); fi
  $T/thinfs pool create --root $WORK/p-$l --data $data --data-size 8G --metadata-size 256M >/dev/null
  $T/thinfs pool message --root $WORK/p-$l create_thin 1 >/dev/null
  $T/thinfs dev format --root $WORK/p-$l 1 --size 4G >/dev/null
  mkdir $WORK/m-$l; MOUNTS+=("$WORK/m-$l"); $T/thinfs-mount --root $WORK/p-$l --device 1 $WORK/m-$l 2>/dev/null
  PIDS+=("$(pgrep -n -f "thinfs-mount --root $WORK/p-$l")")
  mkdir $WORK/m-$l/tree
  python3 -c "import os,sys; [open('%s/f%04d' % (sys.argv[1], i), 'wb').write(os.urandom(3000)) for i in range(2000)]" $WORK/m-$l/tree
done
read_tree() { python3 -c "
import os, sys, time
t = time.monotonic()
for e in os.scandir(sys.argv[1]):
    os.stat(e.path); open(e.path, 'rb').read()
print('%.0f' % ((time.monotonic() - t) * 1000))" "$1"; }
for r in $(seq 1 $R); do
  for l in "${LABELS[@]}"; do
    m=$WORK/m-$l; rm -f $m/f; drop_caches
    alone=$(read_tree $m/tree)
    rm -f $m/f; drop_caches
    t0=$(date +%s%N)
    fio --name=seq --filename=$m/f --rw=write --bs=1M --size=512M --output-format=terse >/dev/null 2>&1 & F=$!
    sleep 0.15; during=$(read_tree $m/tree); wait $F; t1=$(date +%s%N)
    echo "round $r $l: tree read alone $alone ms, during the write $during ms; write $(( (t1 - t0) / 1000000 )) ms; load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
