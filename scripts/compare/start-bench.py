#!/usr/bin/env python3
"""start-bench.py: container starts (`thinfs layer create-rw ID --parent P --mount DIR`, the
pool's daemon already running) with two or more thinfs builds, interleaved round by round in one
run, so that a shared, busy machine treats them alike.

    scripts/compare/start-bench.py [--rounds 8] [--starts 6] [--strace 5] [--layers 1000]
                                   [--dir /var/tmp] LABEL=BINDIR [LABEL=BINDIR...]

Each LABEL=BINDIR is a build (BINDIR holds thinfs and thinfs-mount, e.g. .build/release); each
gets its own store (`thinfs init`, an empty image layer, and one container mounted first, so that
its thinfs-mount daemon runs for the whole run). A round runs every label in turn (the order
alternates from round to round): caches dropped, then --starts starts, each timed from the
command's fork to its exit; afterwards (untimed) the round's containers are unmounted and
removed, so that every round starts with the same open volumes. The report gives each label's
median and p95, their ratio to the first label's, the load average of each round, and the
daemon's CPU time per start (/proc utime + stime over the timed starts; 10 ms ticks).

With --layers N, each store gets N more image layers before the timed rounds (untimed): `layer
create fillI --parent img`, siblings of the image layer sharing all its blocks, made by 4 clients
at a time through the running daemon (as layer-bench.sh's row 3); they stay for the whole run, so
every start is measured with them in the pool. The report gives the pool's layer count from
`layer ls --json` and issue 11's goal (create-rw + mount in at most 30 ms with 1,000 layers).

With --strace N, each label then runs N more starts with `strace -f -c` attached to its daemon,
and the report gives the daemon's fdatasync, fsync and pwrite64 calls per start: counts that do
not depend on the machine's load. Needs root, /dev/fuse and strace for --strace. Reports; never
fails on a number.
"""
import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def percentile(values, p):
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def mounts():
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f]


def daemon_pids(root):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"thinfs-mount") and root.encode() in argv:
            out.append(int(d))
    return out


class Store:
    def __init__(self, label, bindir, scratch):
        self.label, self.thinfs = label, os.path.join(bindir, "thinfs")
        self.dir = os.path.join(scratch, label)
        self.root = os.path.join(self.dir, "root")
        self.count = 0
        os.makedirs(os.path.join(self.dir, "mnt"))
        self.run("init", "--root", self.root, "--storage-opt", "dm.use_deferred_deletion=true",
                 "--storage-opt", "dm.use_deferred_removal=true")
        self.run("layer", "create", "--root", self.root, "img")
        self.keep = self.start()    # starts the daemon, which then runs to the end

    def run(self, *args):
        p = subprocess.run([self.thinfs, *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"start-bench: {self.label}: thinfs {' '.join(args)}: exit {p.returncode}: {p.stderr.strip()[-400:]}")
        return p.stdout

    def fill(self, n):
        """n more image layers, siblings of img, 4 clients at a time; returns the seconds taken."""
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: self.run("layer", "create", "--root", self.root, f"fill{i}", "--parent", "img"),
                          range(1, n + 1)))
        return time.perf_counter() - t

    def layer_count(self):
        return len(json.loads(self.run("layer", "ls", "--root", self.root, "--json")))   # an array of rows

    def start(self):
        self.count += 1
        cid = f"c{self.count}"
        mp = os.path.join(self.dir, "mnt", cid)
        os.mkdir(mp)
        self.run("layer", "create-rw", "--root", self.root, cid, "--parent", "img", "--mount", mp)
        return cid, mp

    def timed_start(self):
        t = time.perf_counter()
        c = self.start()
        return c, (time.perf_counter() - t) * 1000

    def remove(self, containers):
        for cid, mp in containers:
            if os.path.realpath(mp) in mounts():
                self.run("umount", mp)
            self.run("layer", "rm", "--root", self.root, cid)
            os.rmdir(mp)

    def cpu_ms(self):
        """The daemon's CPU time so far (utime + stime, in clock ticks of 10 ms)."""
        with open(f"/proc/{self.daemon()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")

    def daemon(self):
        pids = daemon_pids(self.root)
        if len(pids) != 1:
            raise SystemExit(f"start-bench: {self.label}: {len(pids)} thinfs-mount daemons for {self.root}, want 1")
        return pids[0]


def strace_counts(store, n):
    out = os.path.join(store.dir, "strace.txt")
    s = subprocess.Popen(["strace", "-f", "-c", "-o", out, "-p", str(store.daemon())],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)    # attached to every thread
    made = [store.start() for _ in range(n)]
    time.sleep(0.5)
    s.send_signal(signal.SIGINT)
    s.wait()
    store.remove(made)
    counts = {}
    with open(out) as f:
        for line in f:
            w = line.split()
            # % time, seconds, usecs/call, calls, [errors,] syscall (or "total")
            if len(w) in (5, 6) and w[-1].isidentifier() and w[3].isdigit():
                counts[w[-1]] = int(w[3])
    return {k: counts.get(k, 0) / n for k in ("fdatasync", "fsync", "pwrite64", "total")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--starts", type=int, default=6)
    ap.add_argument("--strace", type=int, default=0)
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("builds", nargs="+", metavar="LABEL=BINDIR")
    a = ap.parse_args()
    builds = [b.split("=", 1) for b in a.builds]
    scratch = tempfile.mkdtemp(prefix="start-bench.", dir=a.dir)
    stores = []
    try:
        for label, bindir in builds:
            stores.append(Store(label, bindir, scratch))
        nlayers = {}
        for s in stores:
            if a.layers:
                secs = s.fill(a.layers)
                print(f"start-bench: {s.label}: {a.layers} image layers made in {secs:.1f} s (untimed)", file=sys.stderr)
            nlayers[s.label] = s.layer_count()
        samples = {s.label: [] for s in stores}
        cpu_ms = {s.label: 0.0 for s in stores}
        loads = []
        for r in range(a.rounds):
            loads.append(loadavg())
            for s in (stores if r % 2 == 0 else list(reversed(stores))):
                drop_caches()
                made = []
                cpu = s.cpu_ms()
                for _ in range(a.starts):
                    c, ms = s.timed_start()
                    made.append(c)
                    samples[s.label].append(ms)
                cpu_ms[s.label] += s.cpu_ms() - cpu
                s.remove(made)
        if a.rounds:
            base = stores[0].label
            bmed, bp95 = statistics.median(samples[base]), percentile(samples[base], 95)
            print(f"container start, daemon running: {a.rounds} rounds x {a.starts} starts per build, "
                  f"alternating; load average (1 min) at each round: {' '.join(loads)}")
            print("layers in each pool during the starts (layer ls, the kept container included): "
                  + ", ".join(f"{s.label} {nlayers[s.label]}" for s in stores))
            print(f"{'build':<12} {'median ms':>10} {'p95 ms':>8} {'min ms':>8} {'median/' + base:>14} {'p95/' + base:>10} "
                  f"{'daemon CPU ms/start':>20}")
            for s in stores:
                v = samples[s.label]
                med, p95 = statistics.median(v), percentile(v, 95)
                print(f"{s.label:<12} {med:>10.1f} {p95:>8.1f} {min(v):>8.1f} {med / bmed:>14.2f} {p95 / bp95:>10.2f} "
                      f"{cpu_ms[s.label] / len(v):>20.1f}")
            if a.layers:
                for s in stores:
                    med = statistics.median(samples[s.label])
                    verdict = ("PASS" if med <= 30 else "MISS") if nlayers[s.label] >= 1000 else "not judged (fewer than 1,000 layers)"
                    print(f"issue 11 goal, create-rw + mount <= 30 ms with 1,000 layers: {s.label} median {med:.1f} ms "
                          f"with {nlayers[s.label]} layers: {verdict}")
        if a.strace:
            print(f"daemon syscalls per start (strace -f -c, {a.strace} starts; strace slows the daemon):")
            print(f"{'build':<12} {'fdatasync':>10} {'fsync':>6} {'pwrite64':>9} {'all':>6}")
            for s in stores:
                c = strace_counts(s, a.strace)
                print(f"{s.label:<12} {c['fdatasync']:>10.1f} {c['fsync']:>6.1f} {c['pwrite64']:>9.1f} {c['total']:>6.0f}")
    finally:
        for s in stores:
            try:
                s.remove([s.keep])
            except SystemExit as e:
                print(e, file=sys.stderr)
        for s in stores:
            end = time.monotonic() + 30
            while daemon_pids(s.root) and time.monotonic() < end:
                time.sleep(0.1)
        left = [m for m in mounts() if m.startswith(scratch + "/")]
        if left:
            print(f"start-bench: still mounted: {left}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
