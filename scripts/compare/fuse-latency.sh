#!/bin/bash
# fuse-latency.sh ROUNDS LABEL=BINDIR...: where a sequential write through a thinfs mount waits.
# Per thinfs build, alternating round by round on one pool each (8G data, a 4G device): a 512 MiB
# fio write in 1 MiB requests without an end fsync (timed), then an fsync of the file (timed), with
# the FUSE requests of the write traced in a private tracefs instance (fuse_request_send to
# fuse_request_end: GETXATTR and WRITE latencies, median, p90 and total); then a cold sequential
# read of the file and a cold 32 MiB random 4 KiB read (fio's bandwidth). Caches are dropped before
# each step. Prints one line per build and round. Needs root, /dev/fuse, fio and tracefs. Every
# mount, daemon (by PID, bench-lib.sh) and the trace instance are removed on exit. docs/benchmarks.md, "Session
# 12: getxattr without the volume lock".
set -euo pipefail
R=${1:?usage: fuse-latency.sh ROUNDS LABEL=BINDIR...}; shift
WORK=$(mktemp -d /var/tmp/fuse-latency.XXXXXX)
BENCH_NAME=fuse-latency
. "$(dirname "$0")/bench-lib.sh"   # bench_cleanup (on EXIT): MOUNTS, PIDS, SCRATCH; drop_caches
SCRATCH=("$WORK")
TR=/sys/kernel/tracing/instances/fuse-latency-$$
trace_cleanup() { if [ -d "$TR" ]; then echo 0 > "$TR/events/fuse/enable"; rmdir "$TR"; fi; }
trap 'trace_cleanup; bench_cleanup' EXIT
declare -A BIN
LABELS=()
for a in "$@"; do l=${a%%=*}; LABELS+=($l); BIN[$l]=${a#*=}; T=${BIN[$l]}
  $T/thinfs pool create --root $WORK/p-$l --data-size 8G --metadata-size 256M >/dev/null
  $T/thinfs pool message --root $WORK/p-$l create_thin 1 >/dev/null
  $T/thinfs dev format --root $WORK/p-$l 1 --size 4G >/dev/null
  mkdir -p $WORK/m-$l; MOUNTS+=("$WORK/m-$l"); $T/thinfs-mount --root $WORK/p-$l --device 1 $WORK/m-$l 2>/dev/null
  PIDS+=("$(pgrep -n -f "thinfs-mount --root $WORK/p-$l")")
done
mkdir "$TR"; echo 65536 > "$TR/buffer_size_kb"
for r in $(seq 1 $R); do
  for l in "${LABELS[@]}"; do
    m=$WORK/m-$l; rm -f $m/f; drop_caches
    read -r maj min < <(stat -c '%Hd %Ld' "$m")   # the mount's connection, as the kernel's dev_t
    for e in fuse_request_send fuse_request_end; do
      echo "connection == $(( (maj << 20) | min ))" > "$TR/events/fuse/$e/filter"; echo 1 > "$TR/events/fuse/$e/enable"
    done
    echo > "$TR/trace"
    t0=$(date +%s%N); fio --name=seq --filename=$m/f --rw=write --bs=1M --size=512M --output-format=terse >/dev/null 2>&1; t1=$(date +%s%N)
    echo 0 > $TR/events/fuse/enable
    python3 -c "import os; fd=os.open('$m/f',os.O_RDONLY); os.fsync(fd)"; t2=$(date +%s%N)
    lat=$(python3 - $TR/trace <<'PY'
import re, sys, statistics
send={}; lat={}
for l in open(sys.argv[1]):
    m=re.search(r'\s(\d+\.\d+): fuse_request_(send|end): connection \d+ req (\d+) (?:opcode \d+ \((\w+)\))?', l)
    if not m: continue
    t=float(m.group(1)); u=m.group(3)
    if m.group(2)=='send': send[u]=(t,m.group(4))
    elif u in send:
        t0,op=send.pop(u); lat.setdefault(op,[]).append((t-t0)*1e6)
out=[]
for op in ('FUSE_GETXATTR','FUSE_WRITE'):
    v=sorted(lat.get(op,[0]))
    out.append(f"{op[5:]} med {statistics.median(v):.0f} p90 {v[int(len(v)*.9)]:.0f} sum {sum(v)/1e3:.0f} ms")
print('; '.join(out))
PY
)
    drop_caches
    rd=$(fio --name=r --filename=$m/f --rw=read --bs=1M --size=512M --output-format=terse 2>/dev/null | awk -F';' '{print int($7/1024)}')
    drop_caches
    rr=$(fio --name=rr --filename=$m/f --rw=randread --bs=4k --size=512M --io_size=32M --output-format=terse 2>/dev/null | awk -F';' '{print int($7/1024)}')
    echo "round $r $l: write $(( (t1-t0)/1000000 )) ms, fsync $(( (t2-t1)/1000000 )) ms, seq read $rd MiB/s, rand read $rr MiB/s; $lat; load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
