#!/usr/bin/env python3
"""The engine of `thinfs compare`: ThinFS against overlayfs and fuse-overlayfs, on one image.

`thinfs compare` checks its arguments (typed errors, nothing made on bad input) and then runs this
file with python3; the plots need matplotlib anyway, and the workloads are small programs around
fio, tar and a few system calls. This file holds the one implementation of every workload; the
low-level scripts beside it (fs-bench.sh, create-bench.sh, layer-bench.sh) call `compare.py
workload ...` for the ones they share.

    compare.py --list                       setups and workloads, as JSON (thinfs compare reads it)
    compare.py run --image P --output D ...  a whole comparison (what thinfs compare runs)
    compare.py workload NAME ARGS...         one workload step, timed, for the shell scripts
    compare.py report RESULTS.json DIR       the report and plots again from a results.json

Every setup is built from the same layers: the image's, plus one workload layer made here (a tree
of small files and one large file), so that the stat, read, copy-on-write and memory workloads read
files that come from an image layer on every setup.
"""

import argparse
import base64
import datetime
import errno
import gzip
import hashlib
import html
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time

SETUPS = ["thinfs", "thinfs-kernel", "overlayfs", "fuse-overlayfs", "containerd-overlayfs", "containerd-thinfs"]

# name: (group, metric label, unit, which way is better, description)
WORKLOADS = {
    "seq-write": ("fio-seq-write", "throughput", "MiB/s", "higher", "fio: sequential write, 1 MiB requests, fsync at the end"),
    "seq-read": ("fio-seq-read", "throughput", "MiB/s", "higher", "fio: sequential read, 1 MiB requests, cold cache"),
    "rand-write": ("fio-rand-write", "throughput", "MiB/s", "higher", "fio: random 4 KiB writes into an existing file, fsync at the end"),
    "rand-read": ("fio-rand-read", "throughput", "MiB/s", "higher", "fio: random 4 KiB reads, cold cache"),
    "untar": ("untar", "time", "s", "lower", "tar -xf of a tree (from tmpfs) into the container, then syncfs"),
    "create": ("create", "time", "s", "lower", "N files of 4 KiB created in one directory (open O_CREAT|O_EXCL, write, close)"),
    "stat-cold": ("stat", "time", "s", "lower", "lstat of every entry of the image's tree, cold cache"),
    "stat-warm": ("stat", "time", "s", "lower", "the same walk again, warm"),
    "read-cold": ("read", "time", "s", "lower", "read every file of the image's tree, cold cache"),
    "read-warm": ("read", "time", "s", "lower", "the same reads again, warm"),
    "cow-first": ("cow", "latency", "ms", "lower", "first 4 KiB write (open, pwrite, fsync, close) into the large image file: copy-up against block copy-on-write"),
    "cow-later": ("cow", "latency", "ms", "lower", "later 4 KiB writes into the same file (median of 8)"),
    "unpack": ("unpack", "time", "s", "lower", "the image unpacked into the driver's storage from a fresh state (thinfs: image import into a new store; overlayfs, fuse-overlayfs: each layer extracted into a lower directory, then syncfs; containerd: ctr images import --snapshotter)"),
    "start": ("start", "latency", "ms", "lower", "container start: create + mount, or `ctr run -d` for the containerd setups (median; p95 in the table)"),
    "space": ("space", "disk used", "MiB", "lower", "disk used by N containers, each writing M MiB"),
    "memory": ("memory", "page cache", "MiB", "lower", "page cache used when N containers read the same image files (the tree)"),
}

QUICK = dict(reps=1, fio_seq_mib=16, fio_rand_mib=16, fio_rand_ios=256, tree_files=200, create_files=300,
             big_mib=16, start_containers=3, space_containers=3, space_mib=2, memory_containers=3)
FULL = dict(reps=5, fio_seq_mib=256, fio_rand_mib=64, fio_rand_ios=4000, tree_files=4000, create_files=10000,
            big_mib=512, start_containers=20, space_containers=10, space_mib=16, memory_containers=8)

# Each setup's ratios are against its reference: containerd's thinfs snapshotter against containerd's
# overlayfs snapshotter on the same containerd (issue 12's comparison), everything else against
# kernel overlayfs.
def reference(setup):
    return "containerd-overlayfs" if setup == "containerd-thinfs" else "overlayfs"

# Plot sizes in pixels (figsize in inches at PLOT_DPI); the CI check reads them from the PNG header.
PLOT_DPI = 100
PLOTS = {"ratios.png": (1200, 700), "latency-cdf.png": (1200, 800), "scaling.png": (1200, 500)}

FIO_PERCENTILES = [1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97, 99, 99.5, 99.9, 99.99]


class Interrupted(Exception):
    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class CompareError(Exception):
    pass


# ───────────────────────────────────────────────────────────── helpers

def sh(*args, check=True, capture=True, timeout=None, cwd=None, env=None):
    """Runs a command; on failure raises CompareError with the command and its stderr."""
    p = subprocess.run([str(a) for a in args], stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=timeout, cwd=cwd, env=env)
    if check and p.returncode != 0:
        raise CompareError(f"{shlex.join(str(a) for a in args)} exited {p.returncode}: {p.stderr.strip()[-800:]}")
    return p.stdout if capture else ""


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def du_bytes(*paths):
    """Allocated bytes (du -B1) of the given files or trees; 0 for missing ones."""
    paths = [p for p in paths if os.path.exists(p)]
    if not paths:
        return 0
    out = sh("du", "-s", "-B1", "-c", *paths)
    return int(out.strip().splitlines()[-1].split()[0])


def mounts():
    with open("/proc/mounts") as f:
        return [line.split()[1].replace("\\040", " ") for line in f]


def is_mounted(path):
    return os.path.realpath(path) in mounts()


def pids_matching(needle):
    """PIDs whose command line contains needle (a scratch path: only our own processes)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue   # processes come and go
        if needle in cmd:
            out.append(int(d))
    return out


def process_name(pid):
    """argv[0] of a process ("" once it has gone); thinfs-mount daemons are started with that name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.basename(f.read().split(b"\0")[0].decode(errors="replace"))
    except OSError:
        return ""


def wait_gone(pids, seconds=30):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if not pids:
            return []
        time.sleep(0.05)
    return pids


def percentile(values, p):
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# ───────────────────────────────────────────────────────────── workload steps
# Each step runs in its own process (python3 compare.py workload ...), prints JSON, and times only
# its own work (time.perf_counter), so a process start is never measured.

def step_create_files(d, n):
    data = os.urandom(4096)
    os.mkdir(d)
    t = time.perf_counter()
    for i in range(n):
        fd = os.open(f"{d}/f{i:06}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    return {"seconds": time.perf_counter() - t, "files": n}


def step_make_tree(root, ndirs, per_dir):
    """ndirs directories of per_dir 4 KiB files (fs-bench.sh's tree)."""
    data = os.urandom(4096)
    os.mkdir(root)
    t = time.perf_counter()
    for dn in range(ndirs):
        dp = f"{root}/d{dn:03}"
        os.mkdir(dp)
        for fn in range(per_dir):
            fd = os.open(f"{dp}/f{fn:04}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
    return {"seconds": time.perf_counter() - t, "files": ndirs * per_dir}


def step_stat_tree(root):
    t = time.perf_counter()
    n = 0
    for dp, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lstat(os.path.join(dp, name))
            n += 1
    return {"seconds": time.perf_counter() - t, "entries": n}


def step_read_tree(root):
    t = time.perf_counter()
    n = b = 0
    for dp, dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dp, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as fh:
                while True:
                    chunk = fh.read(1 << 20)
                    if not chunk:
                        break
                    b += len(chunk)
            n += 1
    return {"seconds": time.perf_counter() - t, "files": n, "bytes": b}


def step_cow_write(path, later, fsync=1):
    """The first 4 KiB write into an existing large file, then `later` more at other offsets; each is
    open O_RDWR + pwrite + (fsync) + close, in milliseconds."""
    size = os.path.getsize(path)
    out = []
    for i in range(1 + later):
        off = (size // 2 + i * 65536 * 7) % max(size - 4096, 4096)
        off -= off % 4096
        t = time.perf_counter()
        fd = os.open(path, os.O_RDWR)
        os.pwrite(fd, b"\xa5" * 4096, off)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        out.append((time.perf_counter() - t) * 1000)
    return {"first_ms": out[0], "later_ms": out[1:]}


def step_write_file(path, mib):
    chunk = os.urandom(1 << 20)
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return {"seconds": time.perf_counter() - t}


def step_fio(group, directory, mib, ios):
    """One fio job of FIO_JOBS; a read or rewrite job needs its file laid out first (fio-layout)."""
    cfg = {"fio_seq_mib": mib, "fio_rand_mib": mib, "fio_rand_ios": ios}
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        r = fio(directory, group, cfg, f.name)
    r.pop("cdf")
    return r


def step_fio_layout(group, directory, mib):
    fio_layout(directory, group, {"fio_seq_mib": mib, "fio_rand_mib": mib})
    return {}


def step_overlay_lower(tar_path, dest):
    untar_for_overlay(tar_path, dest)
    return {}


# The steps, by name, with the types of their arguments: `compare.py workload NAME ARGS...`.
STEPS = {
    "create-files": (step_create_files, [str, int]),          # DIR N
    "make-tree": (step_make_tree, [str, int, int]),           # DIR NDIRS FILES_PER_DIR
    "stat-tree": (step_stat_tree, [str]),                     # DIR
    "read-tree": (step_read_tree, [str]),                     # DIR
    "cow-write": (step_cow_write, [str, int, int]),           # FILE LATER_WRITES FSYNC(0|1)
    "write-file": (step_write_file, [str, int]),              # FILE MIB
    "fio": (lambda *a: step_fio(*a), [str, str, int, int]),   # GROUP DIR MIB IOS (GROUP: a key of FIO_JOBS)
    "fio-layout": (lambda *a: step_fio_layout(*a), [str, str, int]),   # GROUP DIR MIB: the file a job reads or rewrites
    "overlay-lower": (lambda *a: step_overlay_lower(*a), [str, str]),   # LAYER_TAR DEST
}


def run_step(name, *args, cgroup=None):
    """Runs a step in a child python3 (in cgroup, if given) and returns its JSON."""
    cmd = [sys.executable, os.path.abspath(__file__), "workload", name] + [str(a) for a in args]
    if cgroup:
        cmd = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(cgroup, "cgroup.procs")] + cmd
    return json.loads(sh(*cmd))


FIO_JOBS = {
    # group: (rw, block size, extra options); sizes come from the configuration
    "fio-seq-write": ("write", "1M", ["--end_fsync=1"]),
    "fio-seq-read": ("read", "1M", []),
    "fio-rand-write": ("randwrite", "4k", ["--end_fsync=1", "--randrepeat=1"]),
    "fio-rand-read": ("randread", "4k", ["--randrepeat=1"]),
}


def fio(directory, group, cfg, out_json):
    rw, bs, extra = FIO_JOBS[group]
    seq = group.startswith("fio-seq")
    size = cfg["fio_seq_mib"] if seq else cfg["fio_rand_mib"]
    args = ["fio", "--name=" + group, f"--directory={directory}", "--filename=fio.data", f"--rw={rw}", f"--bs={bs}",
            f"--size={size}M", "--ioengine=psync", "--output-format=json", f"--output={out_json}",
            "--percentile_list=" + ":".join(str(p) for p in FIO_PERCENTILES)] + extra
    if not seq:
        args.append(f"--number_ios={cfg['fio_rand_ios']}")
    sh(*args)
    with open(out_json) as f:
        job = json.load(f)["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    cdf = sorted((float(k), v / 1e6) for k, v in pct.items())
    def p(x):
        for k, v in cdf:
            if abs(k - x) < 1e-6:
                return v
        return None
    return {"value": side["bw_bytes"] / 1048576, "iops": side["iops"], "p50_ms": p(50), "p95_ms": p(95),
            "p99_ms": p(99), "cdf": cdf}


def fio_layout(directory, group, cfg):
    """The file a read or rewrite job works on, written (and fsynced) before the timed run."""
    size = cfg["fio_seq_mib"] if group.startswith("fio-seq") else cfg["fio_rand_mib"]
    sh("fio", "--name=layout", f"--directory={directory}", "--filename=fio.data", "--rw=write", "--bs=1M",
       f"--size={size}M", "--end_fsync=1", "--output=/dev/null")


# ───────────────────────────────────────────────────────────── the image

def read_json(path):
    with open(path) as f:
        return json.load(f)


def image_layers(image, work):
    """The image's layer tars in order, bottom first, as files under work (paths to plain or compressed
    tars), and what kind of image it was."""
    if os.path.isdir(image) and os.path.exists(os.path.join(image, "oci-layout")):
        def blob(d):
            return os.path.join(image, "blobs", *d.split(":", 1))
        index = read_json(os.path.join(image, "index.json"))
        desc = index["manifests"][0]
        doc = read_json(blob(desc["digest"]))
        while "manifests" in doc:   # an image index: the first manifest for linux/amd64, or the first
            pick = [m for m in doc["manifests"] if m.get("platform", {}).get("architecture") in (None, "amd64")]
            doc = read_json(blob((pick or doc["manifests"])[0]["digest"]))
        return "oci", [blob(l["digest"]) for l in doc["layers"]]
    if os.path.isdir(image):
        t = os.path.join(work, "dir-layer.tar")
        sh("tar", "--create", "--file", t, "--directory", image, "--numeric-owner", "--xattrs", "--xattrs-include=*", ".")
        return "directory", [t]
    d = os.path.join(work, "docker-save")
    os.mkdir(d)
    sh("tar", "-xf", image, "-C", d)
    manifest = read_json(os.path.join(d, "manifest.json"))
    return "docker-save", [os.path.join(d, l) for l in manifest[0]["Layers"]]


def make_tree_tar(path, root_name, nfiles, big_mib, seed=15):
    """The workload layer: root_name/tree (nfiles files, 50 a directory, mostly 1-16 KiB, some up to
    256 KiB, from a fixed seed) and root_name/big.bin (big_mib MiB). Returns (entries, bytes)."""
    rng = random.Random(seed)
    entries = total = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        def add_dir(name):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            tar.addfile(ti)
        def add_file(name, data):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1700000000
            tar.addfile(ti, io.BytesIO(data))
        add_dir(root_name)
        add_dir(f"{root_name}/tree")
        for i in range(nfiles):
            if i % 50 == 0:
                add_dir(f"{root_name}/tree/d{i // 50:04}")
                entries += 1
            size = rng.choice([1024, 2048, 4096, 4096, 8192, 16384]) if rng.random() < 0.95 else rng.randint(1, 256) * 1024
            add_file(f"{root_name}/tree/d{i // 50:04}/f{i:06}", rng.randbytes(size))
            entries += 1
            total += size
        if big_mib:
            ti = tarfile.TarInfo(f"{root_name}/big.bin")
            ti.size, ti.mode, ti.mtime = big_mib << 20, 0o644, 1700000000
            tar.addfile(ti, _RandomReader(big_mib << 20, rng))
    return entries, total


class _RandomReader(io.RawIOBase):
    def __init__(self, n, rng):
        self.left, self.rng = n, rng

    def read(self, size=-1):
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return self.rng.randbytes(size)


def untar_for_overlay(tar_path, dest):
    """A layer tar into a lower directory, OCI whiteouts turned into overlayfs's: .wh.NAME -> a 0/0
    character device NAME, .wh..wh..opq -> trusted.overlay.opaque=y on its directory."""
    os.makedirs(dest)
    sh("tar", "--extract", "--file", tar_path, "--directory", dest, "--xattrs", "--xattrs-include=*",
       "--numeric-owner", "--same-permissions", "--same-owner")
    for top, dirs, files in os.walk(dest):
        for name in files:
            if not name.startswith(".wh."):
                continue
            os.unlink(os.path.join(top, name))
            if name == ".wh..wh..opq":
                os.setxattr(top, "trusted.overlay.opaque", b"y")
            else:
                os.mknod(os.path.join(top, name[4:]), 0o020600, os.makedev(0, 0))


# ───────────────────────────────────────────────────────────── setups

class Setup:
    """A way to run containers of the image: prepare once, then containers made and removed."""
    name = ""

    def __init__(self, ctx):
        self.ctx = ctx
        self.dir = os.path.join(ctx.scratch, self.name)
        os.makedirs(self.dir)
        self.count = 0

    def daemons(self):
        return []



def pool_block_size(thinfs, root):
    info = sh(thinfs, "info", "--root", root)
    # info prints decimal units ("65.54 kB"); the block size is a multiple of 512 bytes.
    m = re.search(r"Pool Blocksize:\s*([0-9.]+)\s*([kMG]?B)", info)
    if not m:
        raise CompareError(f"thinfs info --root {root} gave no pool block size: {info.strip()[:400]}")
    return round(float(m.group(1)) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)] / 512) * 512


def pool_space_bytes(thinfs, root, block_size):
    # The pool's own accounting: the data file's du is a high-water mark (freed pool blocks are
    # reused, not punched), so it would not see the space of new containers after earlier ones went.
    f = sh(thinfs, "pool", "status", "--root", root).split()
    meta, data = (int(x.split("/")[0]) for x in f[1:3])
    return data * block_size + meta * 4096


class ThinFSSetup(Setup):
    name = "thinfs"

    def thinfs(self, *args):
        return sh(self.ctx.thinfs, *args)

    def prepare(self, kind, layers, bench_tar):
        self.root = os.path.join(self.dir, "root")
        self.thinfs("init", "--root", self.root, "--storage-opt", "dm.use_deferred_deletion=true",
                    "--storage-opt", "dm.use_deferred_removal=true")
        if kind == "directory":
            self.thinfs("layer", "create", "--root", self.root, "image")
            self.thinfs("layer", "apply-diff", "--root", self.root, "image", layers[0])
            top = "image"
        else:
            top = self.thinfs("image", "import", "--root", self.root, self.ctx.image).strip().splitlines()[-1]
        self.thinfs("layer", "create", "--root", self.root, "bench", "--parent", top)
        self.thinfs("layer", "apply-diff", "--root", self.root, "bench", bench_tar)
        self.top = "bench"
        self.block_size = pool_block_size(self.ctx.thinfs, self.root)

    def create(self):
        self.count += 1
        cid = f"c{self.count}"
        mp = os.path.join(self.dir, "mnt", cid)
        os.makedirs(mp)
        # One command, as a container runtime would use it: `create-rw` then `mount` is two
        # process start-ups, most of a container start's time (docs/benchmarks.md, session 9).
        self.thinfs("layer", "create-rw", "--root", self.root, cid, "--parent", self.top, "--mount", mp)
        return (cid, mp)

    def remove_all(self, containers):
        for cid, mp in containers:
            if is_mounted(mp):
                self.thinfs("umount", mp)
        left = wait_gone(self.daemons())
        if left:
            raise CompareError(f"thinfs-mount {left} still running 30 s after the last umount of {self.root}")
        for cid, mp in containers:
            self.thinfs("layer", "rm", "--root", self.root, cid)
            os.rmdir(mp)

    def daemons(self):
        return pids_matching(f"--root {self.root} ")

    def unpack(self, kind, layers, rep):
        """`thinfs image import` of the image into a new store (init not timed)."""
        root = os.path.join(self.dir, f"unpack-{rep}")
        self.thinfs("init", "--root", root)
        drop_caches()
        t = time.perf_counter()
        if kind == "directory":
            self.thinfs("layer", "create", "--root", root, "image")
            self.thinfs("layer", "apply-diff", "--root", root, "image", layers[0])
        else:
            self.thinfs("image", "import", "--root", root, self.ctx.image)
        seconds = time.perf_counter() - t
        shutil.rmtree(root)
        return seconds

    space_how = "the pool's used data blocks x block size + used metadata blocks x 4 KiB (thinfs pool status)"

    def space_bytes(self):
        return pool_space_bytes(self.ctx.thinfs, self.root, self.block_size)


class OverlaySetup(Setup):
    name = "overlayfs"

    def prepare(self, kind, layers, bench_tar):
        self.lowers = self.ctx.lowers(layers, bench_tar)

    def mount(self, upper, work, merged):
        sh("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={':'.join(self.lowers)},upperdir={upper},workdir={work}", merged)

    def create(self):
        self.count += 1
        d = os.path.join(self.dir, "c", f"c{self.count}")
        upper, work, merged = (os.path.join(d, x) for x in ("upper", "work", "merged"))
        for x in (upper, work, merged):
            os.makedirs(x)
        self.mount(upper, work, merged)
        return (d, merged)

    def remove_all(self, containers):
        for d, merged in containers:
            if is_mounted(merged):
                sh("umount", merged)
        left = wait_gone(self.daemons())
        if left:
            raise CompareError(f"{self.name} daemons {left} still running 30 s after their umount")
        for d, merged in containers:
            shutil.rmtree(d)

    space_how = "du -B1 of the containers' upper and work directories"

    def unpack(self, kind, layers, rep):
        """Each layer extracted into a new lower directory (whiteouts converted), then syncfs: what
        the lower directories of every container are made by."""
        d = os.path.join(self.dir, f"unpack-{rep}")
        drop_caches()
        t = time.perf_counter()
        for i, layer in enumerate(layers):
            untar_for_overlay(layer, os.path.join(d, str(i + 1)))
        sh("sync", "-f", d)
        seconds = time.perf_counter() - t
        shutil.rmtree(d)
        return seconds

    def space_bytes(self):
        # Not the merged directory: it is the mount point, and du would count the image through it.
        c = os.path.join(self.dir, "c")
        dirs = [os.path.join(c, x, y) for x in (os.listdir(c) if os.path.isdir(c) else []) for y in ("upper", "work")]
        return du_bytes(*dirs)


class FuseOverlaySetup(OverlaySetup):
    name = "fuse-overlayfs"

    def mount(self, upper, work, merged):
        # fuse-overlayfs goes to the background once the mount is in place.
        sh("fuse-overlayfs", "-o", f"lowerdir={':'.join(self.lowers)},upperdir={upper},workdir={work}", merged)

    def daemons(self):
        return pids_matching(f"upperdir={self.dir}/")


def oci_archive(path, layers, name):
    """An OCI image archive (what `ctr images import` reads) of the given layer tars, bottom first,
    each as it is (gzip, zstd or plain), named name. The diff ids are the digests of the
    uncompressed tars."""
    def digest_of(f, decompress=None):
        h = hashlib.sha256()
        if decompress == "zstd":
            p = subprocess.Popen(["zstd", "-dc", f], stdout=subprocess.PIPE)
            for chunk in iter(lambda: p.stdout.read(1 << 20), b""):
                h.update(chunk)
            if p.wait() != 0:
                raise CompareError(f"zstd -dc {f} failed")
        else:
            with (gzip.open(f, "rb") if decompress == "gzip" else open(f, "rb")) as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return "sha256:" + h.hexdigest()
    descs, diff_ids, blobs = [], [], []
    for f in layers:
        with open(f, "rb") as fh:
            magic = fh.read(4)
        kind = "gzip" if magic[:2] == b"\x1f\x8b" else "zstd" if magic == b"\x28\xb5\x2f\xfd" else None
        d = digest_of(f)
        diff_ids.append(digest_of(f, kind) if kind else d)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar" + {"gzip": "+gzip", "zstd": "+zstd", None: ""}[kind],
                      "digest": d, "size": os.path.getsize(f)})
        blobs.append((d, f))
    def doc(obj):
        data = json.dumps(obj).encode()
        return "sha256:" + hashlib.sha256(data).hexdigest(), data
    cfg_d, cfg = doc({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    man_d, man = doc({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_d, "size": len(cfg)},
                      "layers": descs})
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_d, "size": len(man),
        "annotations": {"org.opencontainers.image.ref.name": name, "io.containerd.image.name": name}}]}).encode()
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1700000000
            tar.addfile(ti, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for d, data in ((cfg_d, cfg), (man_d, man)):
            add("blobs/sha256/" + d.split(":")[1], data)
        done = set()
        for d, f in blobs:
            if d not in done:
                done.add(d)
                tar.add(f, arcname="blobs/sha256/" + d.split(":")[1], recursive=False)


CONTAINERD_TOOLS = ("containerd", "ctr", "runc", "containerd-shim-runc-v2")


class Containerd:
    """One private containerd for the whole run (its own root, state, sockets, runc root, FIFO
    directory and namespaces, all under the scratch directory, as scripts/containerd-e2e.sh runs
    it), with its built-in overlayfs snapshotter and `thinfs serve --containerd-socket` as the
    proxy snapshotter `thinfs`. Both are started by PID and stopped by PID (Context.cleanup calls
    stop first, also after a failure, Ctrl-C or SIGTERM)."""
    IMAGE = "thinfs-compare/image:latest"        # the image alone: the unpack workload
    WORKLOAD = "thinfs-compare/workload:latest"   # the image + compare's workload layer: the containers

    def __init__(self, ctx):
        self.ctx = ctx
        self.dir = os.path.join(ctx.scratch, "containerd")
        self.root, self.state = os.path.join(self.dir, "root"), os.path.join(self.dir, "state")
        self.addr = os.path.join(self.dir, "containerd.sock")
        self.store = os.path.join(self.dir, "thinfs-store")
        self.sock = os.path.join(self.dir, "thinfs.sock")
        self.runc_root, self.fifo = os.path.join(self.dir, "runc"), os.path.join(self.dir, "fifo")
        self.prefix = f"thinfs-compare-{os.getpid()}"
        self.namespaces = set()
        self.serve_pid = self.containerd_pid = None
        self.archives = None
        self.run_containerd_existed = os.path.isdir("/run/containerd")
        ctx.finalizers.append(self.stop)
        for d in (self.dir, self.runc_root, self.fifo):
            os.makedirs(d, exist_ok=True)
        self.start()

    def log_tail(self, name, n=15):
        try:
            with open(os.path.join(self.dir, name), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def start(self):
        with open(os.path.join(self.dir, "serve.log"), "ab") as log:
            p = subprocess.Popen([self.ctx.thinfs, "serve", "--root", self.store, "--containerd-socket", self.sock,
                                  "--log-level", "warning"], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.serve_pid = p.pid
        self._serve = p
        end = time.monotonic() + 60
        while not os.path.exists(self.sock):
            if p.poll() is not None:
                raise CompareError(f"thinfs serve exited {p.returncode} at start-up: {self.log_tail('serve.log')}")
            if time.monotonic() > end:
                raise CompareError(f"thinfs serve: no socket {self.sock} after 60 s: {self.log_tail('serve.log')}")
            time.sleep(0.1)
        with open(os.path.join(self.dir, "config.toml"), "w") as f:
            f.write(f"""version = 2
root = "{self.root}"
state = "{self.state}"
# No CRI (it wants CNI and a sandbox image) and none of the snapshotters that probe the host.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.addr}"
[ttrpc]
  address = "{self.addr}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.dir}/opt"
[proxy_plugins.thinfs]
  type = "snapshot"
  address = "{self.sock}"
""")
        with open(os.path.join(self.dir, "containerd.log"), "ab") as log:
            p = subprocess.Popen(["containerd", "--config", os.path.join(self.dir, "config.toml")],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.containerd_pid = p.pid
        self._containerd = p
        end = time.monotonic() + 60
        while subprocess.run(["ctr", "--address", self.addr, "version"], capture_output=True).returncode != 0:
            if p.poll() is not None:
                raise CompareError(f"containerd exited {p.returncode} at start-up: {self.log_tail('containerd.log')}")
            if time.monotonic() > end:
                raise CompareError(f"containerd not answering on {self.addr} after 60 s: {self.log_tail('containerd.log')}")
            time.sleep(0.1)
        plugins = sh("ctr", "--address", self.addr, "plugins", "ls")
        if not re.search(r"io\.containerd\.snapshotter\.v1\s+thinfs\s", plugins):
            raise CompareError(f"containerd did not load the thinfs proxy snapshotter: {plugins}")

    def ctr(self, ns, *args, timeout=1800):
        """ctr against our containerd, bounded: a hung snapshotter fails the run instead of hanging it."""
        self.namespaces.add(ns)
        try:
            return sh("ctr", "--address", self.addr, "--namespace", ns, *args, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CompareError(f"ctr {' '.join(args)} did not finish in {timeout} s")

    def gc(self, ns):
        """containerd removes snapshots and content at its next garbage collection, which removals
        alone do not start; removing a lease with --sync runs one and waits for it."""
        lease = self.ctr(ns, "leases", "create").split()[0]
        self.ctr(ns, "leases", "rm", "--sync", lease)

    def prepare_archives(self, layers, bench_tar):
        if self.archives is None:
            image, workload = os.path.join(self.dir, "image.tar"), os.path.join(self.dir, "workload.tar")
            oci_archive(image, layers, self.IMAGE)
            oci_archive(workload, layers + [bench_tar], self.WORKLOAD)
            self.archives = (image, workload)
        return self.archives

    def stop(self):
        """Containers (runc kills their processes), the shims, containerd, thinfs serve (SIGTERM
        unmounts what it mounted and commits), each by PID; then what runc and the shims left
        outside the scratch directory."""
        for ns in sorted(self.namespaces):
            rr = os.path.join(self.runc_root, ns)
            ids = subprocess.run(["runc", "--root", rr, "list", "-q"], capture_output=True, text=True).stdout.split()
            for cid in ids:
                subprocess.run(["runc", "--root", rr, "delete", "-f", cid], capture_output=True)
        def stop_pid(pid, proc=None, seconds=20):
            if not pid or not os.path.exists(f"/proc/{pid}"):
                return
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            if proc is not None:
                try:
                    proc.wait(seconds)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            elif wait_gone([pid], seconds):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        stop_pid(self.containerd_pid, getattr(self, "_containerd", None))
        self.containerd_pid = None
        for pid in pids_matching(f"-address {self.addr} "):   # the shims of our containerd
            stop_pid(pid)
        stop_pid(self.serve_pid, getattr(self, "_serve", None), 60)
        self.serve_pid = None
        for ns in self.namespaces:
            bases = ["/sys/fs/cgroup"] + [os.path.join("/sys/fs/cgroup", c) for c in
                                          (os.listdir("/sys/fs/cgroup") if os.path.isdir("/sys/fs/cgroup") else [])]
            dirs = [os.path.join(b, ns) for b in bases if os.path.isdir(os.path.join(b, ns))]
            # A shim stopped while it created a container leaves its `runc init` waiting for ever
            # (seen in CI: SIGTERM during `ctr run`), still in the namespace's cgroup, which then
            # cannot be removed. Every process in these cgroups is one of this run's containers:
            # killed by PID, then the cgroups removed once the kernel has let go of them.
            left = set()
            for d in dirs:
                for root, _, files in os.walk(d):
                    if "cgroup.procs" in files:
                        try:
                            with open(os.path.join(root, "cgroup.procs")) as f:
                                left.update(int(x) for x in f.read().split())
                        except (OSError, ValueError):
                            pass
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_gone(left, 10)
            for d in dirs:
                subs = sorted((os.path.join(root, x) for root, xs, _ in os.walk(d) for x in xs), key=len, reverse=True)
                for path in subs + [d]:
                    end = time.monotonic() + 10
                    while True:
                        try:
                            os.rmdir(path)
                            break
                        except FileNotFoundError:
                            break
                        except OSError as e:
                            # EBUSY until the last task of the cgroup is gone.
                            if e.errno != errno.EBUSY or time.monotonic() > end:
                                break
                            time.sleep(0.1)
            shutil.rmtree(os.path.join("/run/containerd/fifo", ns), ignore_errors=True)
        if not self.run_containerd_existed:
            for d in ("/run/containerd/s", "/run/containerd/fifo", "/run/containerd"):
                try:
                    os.rmdir(d)
                except OSError:
                    pass


class ContainerdSetup(Setup):
    """Containers run by `ctr run -d` on the private containerd, with one snapshotter. The workloads
    run in each container's rootfs, as the shim mounted it (STATE/io.containerd.runtime.v2.task/NS/ID/
    rootfs); the container's process is /bin/true, and a stopped task keeps its rootfs mounted
    until it is deleted."""
    snapshotter = ""

    def prepare(self, kind, layers, bench_tar):
        self.cd = self.ctx.containerd()
        self.ns = f"{self.cd.prefix}-{self.snapshotter}"
        self.image_tar, workload_tar = self.cd.prepare_archives(layers, bench_tar)
        self.cd.ctr(self.ns, "images", "import", "--snapshotter", self.snapshotter, workload_tar)

    def create(self):
        self.count += 1
        cid = f"c{self.count}"
        self.cd.ctr(self.ns, "run", "-d", "--null-io", "--runc-root", self.cd.runc_root, "--fifo-dir", self.cd.fifo,
                    "--snapshotter", self.snapshotter, self.cd.WORKLOAD, cid, "/bin/true")
        return (cid, os.path.join(self.cd.state, "io.containerd.runtime.v2.task", self.ns, cid, "rootfs"))

    def remove_all(self, containers):
        ids = [cid for cid, _ in containers]
        if ids:
            self.cd.ctr(self.ns, "tasks", "rm", "-f", *ids)   # the shim unmounts the rootfs
            self.cd.ctr(self.ns, "containers", "rm", *ids)
        self.cd.gc(self.ns)   # the snapshots go now, not in the middle of a later step

    def unpack(self, kind, layers, rep):
        """`ctr images import --snapshotter X` of the image (no workload layer) into a namespace of
        its own, where no snapshot of the image exists yet; removed (with a garbage collection)
        afterwards, so each round starts from the same state."""
        ns = f"{self.cd.prefix}-unpack-{self.snapshotter}-{rep}"
        drop_caches()
        t = time.perf_counter()
        self.cd.ctr(ns, "images", "import", "--snapshotter", self.snapshotter, self.image_tar)
        seconds = time.perf_counter() - t
        self.cd.ctr(ns, "images", "rm", "--sync", self.cd.IMAGE)
        self.cd.gc(ns)
        left = self.cd.ctr(ns, "snapshots", "--snapshotter", self.snapshotter, "ls").strip().splitlines()[1:]
        if left:
            raise CompareError(f"{self.name}: snapshots left in namespace {ns} after the unpack round: {left}")
        return seconds


class ContainerdOverlaySetup(ContainerdSetup):
    name = "containerd-overlayfs"
    snapshotter = "overlayfs"
    space_how = "du -B1 -x of containerd's overlayfs snapshotter directory (the containers' snapshots)"

    def space_bytes(self):
        d = os.path.join(self.cd.root, "io.containerd.snapshotter.v1.overlayfs")
        return int(sh("du", "-s", "-x", "-B1", d).split()[0])


class ContainerdThinFSSetup(ContainerdSetup):
    name = "containerd-thinfs"
    snapshotter = "thinfs"
    space_how = "thinfs serve's pool: used data blocks x block size + used metadata blocks x 4 KiB (thinfs pool status)"

    def prepare(self, kind, layers, bench_tar):
        super().prepare(kind, layers, bench_tar)
        self.block_size = pool_block_size(self.ctx.thinfs, self.cd.store)

    def daemons(self):
        return [self.cd.serve_pid] if self.cd.serve_pid else []

    def space_bytes(self):
        return pool_space_bytes(self.ctx.thinfs, self.cd.store, self.block_size)


SETUP_CLASSES = {"thinfs": ThinFSSetup, "overlayfs": OverlaySetup, "fuse-overlayfs": FuseOverlaySetup,
                 "containerd-overlayfs": ContainerdOverlaySetup, "containerd-thinfs": ContainerdThinFSSetup}


def availability(name, thinfs):
    """None if this host can run the setup, else the reason it can't."""
    if name == "thinfs":
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        return None
    if name == "thinfs-kernel":
        p = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True)
        if p.returncode != 0 or "thin-pool" not in p.stdout:
            return "no kernel dm-thin pool on this host (dmsetup targets: " + \
                   ((p.stderr or p.stdout).strip().splitlines() or ["no output"])[0] + ")"
        return "a kernel pool exists, but compare does not drive kernel-mount mode yet (thinfs mount --kernel on a kernel-pool store)"
    if name == "overlayfs":
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                subprocess.run(["modprobe", "overlay"], capture_output=True)
        with open("/proc/filesystems") as f:
            return None if "overlay" in f.read() else "the kernel has no overlay file system"
    if name == "fuse-overlayfs":
        if not shutil.which("fuse-overlayfs"):
            return "fuse-overlayfs is not installed (apt-get install fuse-overlayfs)"
        return None if os.path.exists("/dev/fuse") else "/dev/fuse is missing"
    if name.startswith("containerd-"):
        if os.geteuid() != 0:
            return "needs root (a private containerd and runc)"
        missing = [t for t in CONTAINERD_TOOLS if not shutil.which(t)]
        if missing:
            return f"{', '.join(missing)} not installed (scripts/setup.sh installs containerd and runc)"
        if name == "containerd-thinfs" and not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        return None
    return "unknown setup"


# ───────────────────────────────────────────────────────────── memory accounting

class MemoryGroup:
    """A memory cgroup (v1 or v2) that the readers and the setup's daemons run in, so that its page
    cache figure counts what this workload caches and nothing else on the machine."""

    def __init__(self, scratch_name):
        self.path = None
        self.kind = "meminfo"
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
        for line in lines:
            _, ctrl, rel = line.split(":", 2)
            if "memory" in ctrl.split(",") and os.path.isdir("/sys/fs/cgroup/memory"):
                base, self.kind = "/sys/fs/cgroup/memory" + rel, "v1"
                break
            if ctrl == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
                base, self.kind = "/sys/fs/cgroup" + rel, "v2"
        if self.kind != "meminfo":
            try:
                self.path = os.path.join(base, scratch_name)
                os.mkdir(self.path)
            except OSError:
                self.path, self.kind = None, "meminfo"
        self.parent = os.path.dirname(self.path) if self.path else None

    def cache_bytes(self):
        if self.path:
            with open(os.path.join(self.path, "memory.stat")) as f:
                stat = dict(line.split() for line in f)
            return int(stat["total_cache" if self.kind == "v1" else "file"])
        with open("/proc/meminfo") as f:
            info = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f}
        return info["Cached"]

    def add(self, pid):
        if self.path:
            with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                f.write(str(pid))

    def release(self):
        """Moves every task back to the parent and removes the group (its charges go to the parent)."""
        if not self.path or not os.path.isdir(self.path):
            return
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                pids = f.read().split()
            for p in pids:
                try:
                    with open(os.path.join(self.parent, "cgroup.procs"), "w") as f:
                        f.write(p)
                except OSError:
                    pass
            os.rmdir(self.path)
        except OSError:
            pass


# ───────────────────────────────────────────────────────────── the run

class Context:
    def __init__(self, args):
        self.args = args
        self.image = os.path.abspath(args.image)
        self.thinfs = args.thinfs
        self.cfg = dict(QUICK if args.quick else FULL)
        if args.reps:
            self.cfg["reps"] = args.reps
        self.scratch = tempfile.mkdtemp(prefix="thinfs-compare.", dir=args.dir)   # mode 0700: thinfs mounts get suid,dev
        self.shm = tempfile.mkdtemp(prefix="thinfs-compare.", dir="/dev/shm") if os.path.isdir("/dev/shm") else self.scratch
        self._lowers = None
        self._containerd = None
        self.finalizers = []   # called first by cleanup (the private containerd's stop)
        self.memgroups = []
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()

    def lowers(self, layers, bench_tar):
        """Lower directories for overlayfs and fuse-overlayfs, top first (shared by both)."""
        if self._lowers is None:
            base = os.path.join(self.scratch, "lower")
            dirs = []
            for i, t in enumerate(layers):
                d = os.path.join(base, str(i + 1))
                untar_for_overlay(t, d)
                dirs.append(d)
            d = os.path.join(base, "bench")
            untar_for_overlay(bench_tar, d)
            dirs.append(d)
            self._lowers = list(reversed(dirs))
        return self._lowers

    def containerd(self):
        """The run's one private containerd, started on first use."""
        if self._containerd is None:
            self.progress("starting a private containerd and thinfs serve")
            self._containerd = Containerd(self)
        return self._containerd

    def progress(self, text, final=False):
        stamp = time.strftime("%H:%M:%S", time.gmtime())
        if self.tty:
            sys.stderr.write(f"\r\033[Kthinfs compare [{time.monotonic() - self.t0:5.0f} s] {text}" + ("\n" if final else ""))
        else:
            sys.stderr.write(f"[{stamp}] thinfs compare: {text}\n")
        sys.stderr.flush()

    def cleanup(self):
        """Every mount under the scratch directory, every daemon serving it, the cgroups, the scratch."""
        def unmount_all():
            for mp in sorted((m for m in mounts() if m.startswith(self.scratch + "/")), reverse=True):
                r = subprocess.run(["umount", mp], capture_output=True)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", mp], capture_output=True)
        for f in self.finalizers:
            try:
                f()
            except Exception as e:   # what it could not stop, the generic pass below still does
                sys.stderr.write(f"thinfs compare: cleanup: {e}\n")
        # Workload processes first (a fio job runs in a child that outlives the fio we were waiting
        # for), so that nothing holds the mounts; the FUSE daemons then exit once unmounted.
        for p in pids_matching(self.scratch + "/"):
            if not process_name(p).startswith(("thinfs-mount", "fuse-overlayfs")):
                try:
                    os.kill(p, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        unmount_all()
        left = wait_gone(pids_matching(self.scratch + "/"), 30)
        for p in left:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
        wait_gone(left, 10)
        # A daemon that was still starting when the run was stopped may have mounted since the first pass.
        unmount_all()
        for g in self.memgroups:
            g.release()
        still = [m for m in mounts() if m.startswith(self.scratch + "/")]
        if still:
            sys.stderr.write(f"thinfs compare: still mounted, not removing {self.scratch}: {still}\n")
        else:
            shutil.rmtree(self.scratch, ignore_errors=True)
        if self.shm != self.scratch:
            shutil.rmtree(self.shm, ignore_errors=True)


def run_group(ctx, setup, group, rep, wanted):
    """Runs one group of workloads on one setup: fresh containers, the timed steps, teardown.
    Returns {workload: (value, extra)} for the workloads in wanted."""
    cfg = ctx.cfg
    res = {}
    containers = []
    try:
        if group.startswith("fio-"):
            c = setup.create(); containers.append(c)
            d = os.path.join(c[1], "fio")
            os.mkdir(d)
            if group in ("fio-seq-read", "fio-rand-read", "fio-rand-write"):
                fio_layout(d, group, cfg)
            drop_caches()
            r = fio(d, group, cfg, os.path.join(ctx.scratch, "fio.json"))
            res[group[4:]] = (r.pop("value"), r)
        elif group == "untar":
            c = setup.create(); containers.append(c)
            d = os.path.join(c[1], "untar")
            os.mkdir(d)
            drop_caches()
            t = time.perf_counter()
            sh("tar", "-xf", ctx.untar_tar, "-C", d)
            sh("sync", "-f", d)
            res["untar"] = (time.perf_counter() - t, {"entries": ctx.tree_entries})
        elif group == "create":
            c = setup.create(); containers.append(c)
            drop_caches()
            r = run_step("create-files", os.path.join(c[1], "create"), cfg["create_files"])
            res["create"] = (r["seconds"], {"files": r["files"], "us_per_file": r["seconds"] * 1e6 / r["files"]})
        elif group in ("stat", "read"):
            c = setup.create(); containers.append(c)
            tree = os.path.join(c[1], "thinfs-compare", "tree")
            drop_caches()
            step = "stat-tree" if group == "stat" else "read-tree"
            cold, warm = run_step(step, tree), run_step(step, tree)
            res[f"{group}-cold"] = (cold.pop("seconds"), cold)
            res[f"{group}-warm"] = (warm.pop("seconds"), warm)
        elif group == "cow":
            c = setup.create(); containers.append(c)
            drop_caches()
            r = run_step("cow-write", os.path.join(c[1], "thinfs-compare", "big.bin"), 8, 1)
            res["cow-first"] = (r["first_ms"], {})
            res["cow-later"] = (statistics.median(r["later_ms"]), {"samples_ms": r["later_ms"]})
        elif group == "unpack":
            res["unpack"] = (setup.unpack(ctx.image_kind, ctx.image_layers, rep), {})
        elif group == "start":
            lat = []
            drop_caches()
            for _ in range(cfg["start_containers"]):
                t = time.perf_counter()
                containers.append(setup.create())
                lat.append((time.perf_counter() - t) * 1000)
            res["start"] = (statistics.median(lat), {"samples_ms": lat, "p95_ms": percentile(lat, 95),
                                                      "first_ms": lat[0]})
        elif group == "space":
            before = setup.space_bytes()
            curve = []
            for i in range(cfg["space_containers"]):
                c = setup.create(); containers.append(c)
                run_step("write-file", os.path.join(c[1], "space.bin"), cfg["space_mib"])
                os.sync()
                curve.append((setup.space_bytes() - before) / 1048576)
            res["space"] = (curve[-1], {"curve_mib": curve, "containers": cfg["space_containers"],
                                        "mib_each": cfg["space_mib"], "measured": setup.space_how})
        elif group == "memory":
            for _ in range(cfg["memory_containers"]):
                containers.append(setup.create())
            g = MemoryGroup(os.path.basename(ctx.scratch) + f"-{setup.name}-{rep}")
            ctx.memgroups.append(g)
            try:
                for p in setup.daemons():
                    g.add(p)   # the daemon's own reads of the pool file or of the lower files count too
                drop_caches()
                base = g.cache_bytes()
                curve = []
                for c in containers:
                    run_step("read-tree", os.path.join(c[1], "thinfs-compare", "tree"), cgroup=g.path)
                    curve.append((g.cache_bytes() - base) / 1048576)
            finally:
                g.release()
            res["memory"] = (curve[-1], {"curve_mib": curve, "accounting": g.kind if g.kind != "meminfo" else
                                         "/proc/meminfo Cached (whole machine: noisy)"})
    except BaseException:
        # The run stops here (an error, Ctrl-C, SIGTERM): Context.cleanup takes down every mount,
        # daemon and process under the scratch directory, whatever state this step left them in.
        raise
    setup.remove_all(containers)
    return {w: v for w, v in res.items() if w in wanted}


def thinfs_build(thinfs):
    """When the thinfs binary and the thinfs-mount beside it (which `thinfs mount` starts) were built,
    and whether a commit of this checkout changed Sources/ after that: a report is about the code
    it ran. (The session-6 report ran a release build made minutes before the bulk write path
    landed and showed sequential writes at 0.03x overlayfs; the code of its day did 0.59x.)"""
    path = os.path.realpath(shutil.which(thinfs) or thinfs)
    built = {}
    for name in ("thinfs", "thinfs-mount"):
        try:
            built[name] = os.stat(os.path.join(os.path.dirname(path), name)).st_mtime
        except OSError:
            pass
    if not built:
        return "not found"
    oldest = min(built.values())
    text = f"{os.path.dirname(path)}, built {datetime.datetime.fromtimestamp(oldest, datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        p = subprocess.run(["git", "-C", repo, "log", "-1", "--format=%ct %h", "--", "Sources"],
                           capture_output=True, text=True, timeout=20)
        last = p.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        last = []
    if len(last) == 2 and int(last[0]) > oldest:
        text += (f"; STALE: commit {last[1]} changed Sources/ at "
                 f"{datetime.datetime.fromtimestamp(int(last[0]), datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, after the build")
    return text


def machine_info(ctx):
    def first(cmd):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            lines = (p.stdout or p.stderr).strip().splitlines() or [""]
            # fuse-overlayfs --version prints fusermount3's version first
            return next((l for l in lines if os.path.basename(cmd[0]) in l), lines[0])
        except (OSError, subprocess.TimeoutExpired):
            return "not found"
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    try:
        import matplotlib
        mpl = matplotlib.__version__
    except ImportError:
        mpl = "not installed"
    fs = first(["df", "--output=fstype", ctx.scratch]) and sh("df", "--output=fstype", ctx.scratch).split()[-1]
    return {
        "host": os.uname().nodename, "cpu": cpu, "cpus": os.cpu_count(), "memory_bytes": mem,
        "kernel": " ".join(os.uname()[2:4]), "scratch": ctx.args.dir, "scratch_fs": fs,
        "versions": {
            "thinfs": first([ctx.thinfs, "--version"]), "thinfs build": thinfs_build(ctx.thinfs), "fio": first(["fio", "--version"]),
            "fuse-overlayfs": first(["fuse-overlayfs", "--version"]), "tar": first(["tar", "--version"]),
            "containerd": first(["containerd", "--version"]), "runc": first(["runc", "--version"]),
            "python3": sys.version.split()[0], "matplotlib": mpl,
        },
    }


def summarize(runs, setups, workloads):
    """Per workload and setup: median, min, max, n of the values; the ratio of medians to overlayfs,
    and the spread of the per-round ratios (each round's value over overlayfs's in the same round)."""
    summary = {}
    for w in workloads:
        summary[w] = {}
        for s in setups:
            ovl = {r["rep"]: r["value"] for r in runs if r["workload"] == w and r["setup"] == reference(s)}
            vals = [r for r in runs if r["workload"] == w and r["setup"] == s]
            if not vals:
                continue
            v = [r["value"] for r in vals]
            e = {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
            if w == "start":
                e["p95_ms"] = percentile([x for r in vals for x in r["extra"]["samples_ms"]], 95)
            if ovl and statistics.median(ovl.values()) > 0:
                e["ratio"] = e["median"] / statistics.median(ovl.values())
                e["reference"] = reference(s)
                per = [r["value"] / ovl[r["rep"]] for r in vals if ovl.get(r["rep"])]
                if per:
                    e["ratio_min"], e["ratio_max"] = min(per), max(per)
            summary[w][s] = e
    return summary


def fmt(v):
    if v is None:
        return "–"
    a = abs(v)
    return f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 else f"{v:.3g}"


def reading(w, summary):
    """A sentence on what the figures of workload w say, from the medians."""
    unit, better = WORKLOADS[w][2], WORKLOADS[w][3]
    s = summary.get(w, {})
    if not any("ratio" in e for n, e in s.items() if n != "overlayfs"):
        return "overlayfs did not run, so there is no ratio to read."
    parts = []
    for name, e in s.items():
        if name == "overlayfs" or "ratio" not in e:
            continue
        r, ref = e["ratio"], e.get("reference", "overlayfs")
        if r <= 0:
            parts.append(f"{name} measured 0 {unit} against {ref}'s {fmt(s[ref]['median'])}")
            continue
        if 0.9 <= r <= 1.1:
            parts.append(f"{name} is within 10% of {ref}")
        else:
            good = (r > 1) == (better == "higher")
            k = r if r > 1 else 1 / r
            if better == "higher":
                parts.append(f"{name} is {k:.1f}x {'faster' if good else 'slower'} than {ref}")
            elif unit == "MiB":
                parts.append(f"{name} uses {k:.1f}x {'less' if good else 'more'} than {ref}")
            else:
                parts.append(f"{name} takes {k:.1f}x {'less' if good else 'more'} time than {ref}")
        if "ratio_min" in e and e["n"] > 1:
            lo, hi = e["ratio_min"], e["ratio_max"]
            if (lo < 1 < hi) and not (0.9 <= r <= 1.1):
                parts[-1] += f" (but the rounds range {lo:.2f}x-{hi:.2f}x, either side of 1: not settled)"
    extra = {
        "cow-first": " overlayfs copies the whole file up on the first write; a block-level snapshot copies one pool block.",
        "memory": " overlayfs shares one page-cache copy of a lower file between containers; a block-level driver "
                  "caches the file once per container (devicemapper's known weakness), which shows as growth with N.",
        "space": " Each thin-pool allocation is a whole pool block, and the metadata grows with the mappings.",
        "start": " For thinfs the first container of a run also starts the FUSE daemon. The containerd setups time "
                 "`ctr run -d` (a container record, its snapshot prepared and mounted by the shim, runc starting the "
                 "process), so they are compared with each other.",
        "unpack": " containerd's overlayfs snapshotter extracts each layer into a plain directory; thinfs writes it "
                  "through ext4 into a thin snapshot of the layer below.",
    }.get(w, "")
    return ("; ".join(parts) + "." if parts else "Only overlayfs ran.") + extra


# ───────────────────────────────────────────────────────────── plots

def make_plots(out, summary, runs, setups, workloads, cfg):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    colors = {"thinfs": "#1f77b4", "overlayfs": "#7f7f7f", "fuse-overlayfs": "#ff7f0e", "thinfs-kernel": "#2ca02c",
              "containerd-overlayfs": "#bcbd22", "containerd-thinfs": "#9467bd"}
    made = {}

    def save(fig, name):
        w, h = PLOTS[name]
        fig.set_size_inches(w / PLOT_DPI, h / PLOT_DPI)
        fig.savefig(os.path.join(out, name), dpi=PLOT_DPI)
        plt.close(fig)
        made[name] = {"width": w, "height": h}

    # 1. each workload against overlayfs, turned so that right of 1 is better than overlayfs for every
    # workload (for time, latency, space and memory the ratio is overlayfs / setup); the whiskers are
    # the range of the per-round ratios.
    fig, ax = plt.subplots()
    others = [s for s in setups if s != "overlayfs"]
    n = max(len(others), 1)
    height = 0.8 / n
    for i, s in enumerate(others):
        ys, xs, lo, hi = [], [], [], []
        for j, w in enumerate(workloads):
            e = summary.get(w, {}).get(s)
            if not e or not e.get("ratio"):
                continue
            inv = WORKLOADS[w][3] == "lower"
            r = 1 / e["ratio"] if inv else e["ratio"]
            a, b = e.get("ratio_min", e["ratio"]), e.get("ratio_max", e["ratio"])
            a, b = (1 / b, 1 / a) if inv and a > 0 and b > 0 else (a, b)
            ys.append(j - 0.4 + height * (i + 0.5))
            xs.append(r)
            lo.append(max(r - a, 0))
            hi.append(max(b - r, 0))
        ax.barh(ys, xs, height, xerr=[lo, hi], capsize=3, color=colors.get(s),
                label=s if reference(s) == "overlayfs" else f"{s} (against {reference(s)})")
    ax.axvline(1, color="black", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_yticks(range(len(workloads)))
    ax.set_yticklabels([f"{w} ({WORKLOADS[w][2]}, {WORKLOADS[w][3]} is better)" for w in workloads], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("advantage over the reference (log scale): right of 1 is better, left is worse")
    ax.set_title("Each workload against overlayfs, containerd-thinfs against containerd-overlayfs\n"
                 "(bars: ratio of medians; whiskers: range over the rounds)", fontsize=10)
    if others:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "only overlayfs ran: nothing to compare", ha="center", va="center", transform=ax.transAxes)
    fig.subplots_adjust(left=0.25, right=0.98, top=0.93, bottom=0.1)
    save(fig, "ratios.png")

    # 2. latency CDFs: fio (the median round of each setup) and container start (every sample)
    fig, axes = plt.subplots(2, 3)
    panels = ["seq-write", "seq-read", "rand-write", "rand-read", "start"]
    for ax, w in zip(axes.flat, panels):
        ax.set_title(w, fontsize=10)
        ax.set_xlabel("latency (ms, log scale)", fontsize=8)
        ax.set_ylabel("fraction of requests" if w != "start" else "fraction of containers", fontsize=8)
        for s in setups:
            rs = [r for r in runs if r["workload"] == w and r["setup"] == s]
            if not rs:
                continue
            if w == "start":
                v = sorted(x for r in rs for x in r["extra"]["samples_ms"])
                ax.step(v, [(k + 1) / len(v) for k in range(len(v))], where="post", label=s, color=colors.get(s))
            else:
                mid = sorted(rs, key=lambda r: r["value"])[len(rs) // 2]
                cdf = [(p, ms) for p, ms in mid["extra"].get("cdf", []) if ms > 0]
                if cdf:
                    ax.plot([ms for _, ms in cdf], [p / 100 for p, _ in cdf], marker=".", label=s, color=colors.get(s))
        if ax.lines:
            ax.set_xscale("log")
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    axes.flat[-1].axis("off")
    fig.suptitle("Latency distributions (fio completion latency; container start: create + mount, or ctr run -d)")
    fig.subplots_adjust(hspace=0.45, wspace=0.3, left=0.06, right=0.98)
    save(fig, "latency-cdf.png")

    # 3. space and memory against the number of containers (the median round's curve)
    fig, axes = plt.subplots(1, 2)
    for ax, w, label in ((axes[0], "space", f"disk added (MiB), each container writing {cfg['space_mib']} MiB"),
                         (axes[1], "memory", "page cache (MiB) after each container read the image files")):
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("containers")
        for s in setups:
            rs = [r for r in runs if r["workload"] == w and r["setup"] == s]
            if not rs:
                continue
            mid = sorted(rs, key=lambda r: r["value"])[len(rs) // 2]
            c = mid["extra"]["curve_mib"]
            ax.plot(range(0, len(c) + 1), [0] + c, marker="o", label=s, color=colors.get(s))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
            ax.set_ylim(bottom=0)
        else:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12)
    save(fig, "scaling.png")
    return made


# ───────────────────────────────────────────────────────────── report

def report_blocks(res):
    """The report as blocks (heading, para, table, image), rendered to Markdown and to HTML."""
    m, cfg, summary, setups = res["machine"], res["config"], res["summary"], res["setups"]
    ran = [s for s, v in setups.items() if v["status"] == "ran"]
    base = res.get("baseline")
    b = [("h1", "thinfs compare"),
         ("p", f"Command: `{res['command_line']}`"),
         ("p", f"Run {res['started']} to {res['finished']} ({res['seconds']:.0f} s), "
               f"{'quick sizes' if cfg['quick'] else 'full sizes'}, {cfg['reps']} round{'s' if cfg['reps'] != 1 else ''}, setups interleaved round by round "
               f"(the order rotates each round); caches dropped before every timed step."),
         ("h2", "Machine"),
         ("table", ["", ""], [
             ["CPU", f"{m['cpu']} ({m['cpus']} CPUs)"], ["memory", f"{m['memory_bytes'] / 2**30:.1f} GiB"],
             ["kernel", m["kernel"]], ["scratch", f"{m['scratch']} ({m['scratch_fs']})"],
             ["load average before", " ".join(f"{x:.2f}" for x in res["load"]["before"])],
             ["load average after", " ".join(f"{x:.2f}" for x in res["load"]["after"])],
             ["1-min load at the steps", (f"{min(r['load1'] for r in res['runs']):.2f}–{max(r['load1'] for r in res['runs']):.2f} "
                                          "(each step's is in results.json)") if res["runs"] else "–"],
         ] + [[f"{k} version", v] for k, v in m["versions"].items()]),
         ("h2", "Image and setups"),
         ("p", f"Image `{res['image']['path']}` ({res['image']['kind']}, {res['image']['layers']} layers), plus a "
               f"workload layer made by compare: {res['image']['tree_entries']} entries "
               f"({res['image']['tree_bytes'] / 1048576:.1f} MiB) under /thinfs-compare/tree and a "
               f"{res['image'].get('big_mib', cfg['big_mib'])} MiB /thinfs-compare/big.bin "
               "(both empty when no workload reads them)."),
         ("table", ["setup", "status", "how"], [[s, v["status"], v.get("reason") or v.get("how", "")] for s, v in setups.items()]),
         ("h2", "Results"),
         ("p", "Each table gives the median of the rounds, the range (min–max), and the ratio of the median to "
               "overlayfs's, or, for containerd-thinfs, to containerd-overlayfs's on the same containerd (the whiskers "
               "of ratios.png are the range of the per-round ratios). Whether a higher or a lower figure is better is "
               "given per workload. In ratios.png every ratio is turned so that right of 1 is better than the reference."),
         ("img", "ratios.png", "Each workload relative to overlayfs"),
         ]
    if base:
        b.insert(-1, ("p", f"The before column is the median of `{base['path']}` (run {base.get('started') or 'at an unknown time'}); "
                           "after / before is this run's median over it."))
    for w in res["workloads"]:
        label, unit, better, desc = WORKLOADS[w][1], WORKLOADS[w][2], WORKLOADS[w][3], WORKLOADS[w][4]
        desc = desc.replace("N files", f"{cfg['create_files']} files").replace(
            "N containers, each writing M MiB", f"{cfg['space_containers']} containers, each writing {cfg['space_mib']} MiB").replace(
            "N containers read", f"{cfg['memory_containers']} containers read")
        b.append(("h3", f"{w}: {desc}"))
        head = ["setup", f"{label} ({unit}), median", "min–max", "n", "× reference"]
        if w == "start":
            head.insert(2, "p95 (ms)")
        if base:
            head += ["before", "after / before"]
        rows = []
        for s in ran:
            e = summary.get(w, {}).get(s)
            if not e:
                continue
            row = [s, fmt(e["median"]), f"{fmt(e['min'])}–{fmt(e['max'])}", str(e["n"]),
                   (f"{e['ratio']:.2f}x" + ("" if e.get("reference", "overlayfs") == "overlayfs" else f" {e['reference']}"))
                   if "ratio" in e else "–"]
            if w == "start":
                row.insert(2, fmt(e.get("p95_ms")))
            if base:
                old = base["summary"].get(w, {}).get(s)
                row += [fmt(old["median"]) if old else "–",
                        f"{e['median'] / old['median']:.2f}x" if old and old["median"] else "–"]
            rows.append(row)
        b.append(("table", head, rows))
        b.append(("p", f"{'Higher' if better == 'higher' else 'Lower'} is better. " + reading(w, summary)))
    b.append(("img", "latency-cdf.png", "Latency distributions"))
    b.append(("img", "scaling.png", "Space and memory against the number of containers"))
    b.append(("h2", "Method"))
    b.append(("p", "thinfs: `thinfs init` (deferred removal and deletion on), `thinfs image import` of the image (or "
                   "`layer create` + `apply-diff` of a directory), the workload layer by `layer apply-diff`, and a "
                   "container by `layer create-rw --mount` (create and FUSE-mount in one command, on the userspace pool). overlayfs and "
                   "fuse-overlayfs: each layer tar extracted into its own lower directory (OCI whiteouts converted to "
                   "overlayfs's), and a container by `mkdir upper work merged` + mount. containerd-overlayfs and "
                   "containerd-thinfs: one private containerd for the run (its own root, state, sockets and namespaces) "
                   "with its overlayfs snapshotter and `thinfs serve --containerd-socket` as the proxy snapshotter "
                   "`thinfs`; the image plus the workload layer imported once per snapshotter (`ctr images import "
                   "--snapshotter`), and a container by `ctr run -d` of /bin/true, the workloads running in the rootfs "
                   "the shim mounted; unpack imports the image alone into a namespace of its own each round. Every "
                   "setup's files live in "
                   "the same scratch directory. \"Cold\" means `sync; echo 3 > /proc/sys/vm/drop_caches` before the "
                   "step; the FUSE daemons keep running, so a userspace cache they hold is not dropped. fio runs with "
                   "psync, buffered. Space is the pool's used data and metadata blocks (thinfs, containerd-thinfs: "
                   "`thinfs pool status`), `du -B1` of the containers' upper and work directories (overlayfs, "
                   "fuse-overlayfs) or of containerd's overlayfs snapshotter directory, each as the growth over the "
                   "figure before the first container. Memory is the page cache "
                   "charged to a memory cgroup holding the readers and the setup's daemons. Every raw figure is in "
                   "results.json."))
    return b


def inline(text, html_mode):
    if not html_mode:
        return text
    parts = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def render_md(blocks):
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + blk[1] + "\n")
        elif kind == "p":
            out.append(blk[1] + "\n")
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})\n")
        elif kind == "table":
            head, rows = blk[1], blk[2]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
            for r in rows:
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
            out.append("")
    return "\n".join(out)


def render_html(blocks, out_dir):
    body = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{inline(blk[1], True)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{inline(blk[1], True)}</p>")
        elif kind == "img":
            with open(os.path.join(out_dir, blk[1]), "rb") as f:
                data = base64.b64encode(f.read()).decode()
            body.append(f'<figure><img alt="{html.escape(blk[2])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(blk[1])}</figcaption></figure>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in blk[1])
            rows = "".join("<tr>" + "".join(f"<td>{inline(c, True)}</td>" for c in r) + "</tr>" for r in blk[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:sans-serif;max-width:1250px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}code{background:#f4f4f4}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>thinfs compare</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(res, out, written):
    """The plots, report.md, report.html and results.json of res into out; each file's path is added
    to written as it is made (so that an interrupted run removes them)."""
    ran = [s for s, v in res["setups"].items() if v["status"] == "ran"]
    res["plots"] = make_plots(out, res["summary"], res["runs"], ran, res["workloads"], res["config"])
    written += [os.path.join(out, p) for p in res["plots"]]
    blocks = report_blocks(res)
    for name, text in (("report.md", render_md(blocks)), ("report.html", render_html(blocks, out)),
                       ("results.json", json.dumps(res, indent=1) + "\n")):
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
        written.append(os.path.join(out, name))


def rerender(results, out):
    """`compare.py report RESULTS.json DIR`: the report and plots again from a results.json (after a
    change to the report's code, or into another directory); the figures are not touched."""
    res = read_json(results)
    os.makedirs(out, exist_ok=True)
    write_report(res, out, [])
    return 0


# ───────────────────────────────────────────────────────────── main

def run(args):
    setups = args.setups.split(",") if args.setups else SETUPS
    workloads = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    for s in setups:
        if s not in SETUPS:
            raise CompareError(f"unknown setup {s!r} (known: {', '.join(SETUPS)})")
    for w in workloads:
        if w not in WORKLOADS:
            raise CompareError(f"unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
    baseline = read_json(args.baseline) if args.baseline else None
    out = os.path.abspath(args.output)
    made_out = not os.path.exists(out)
    written = []
    ctx = Context(args)
    interrupted = None
    ok = False

    def on_signal(signum, frame):
        raise Interrupted(signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        started = datetime.datetime.now(datetime.timezone.utc)
        load_before = loadavg()
        status = {}
        for s in SETUPS:
            if s not in setups:
                continue
            why = availability(s, ctx.thinfs)
            status[s] = {"status": "skipped", "reason": why} if why else {"status": "ran"}
        ran = [s for s in setups if status[s]["status"] == "ran"]
        if "thinfs" in ran and "STALE" in (build := thinfs_build(ctx.thinfs)):
            ctx.progress(f"warning: the thinfs build is older than its sources: {build}", final=True)
        if "overlayfs" not in ran:
            ctx.progress("overlayfs is not among the setups that run: the report has no ratios")
        ctx.progress(f"preparing the image for {', '.join(ran)}")
        kind, layers = image_layers(ctx.image, ctx.scratch)
        ctx.image_kind, ctx.image_layers = kind, layers
        bench_tar = os.path.join(ctx.shm, "bench-layer.tar")
        # The tree and the large file are read only by these groups; without them the layer stays
        # empty (a run of unpack, start and space does not import 540 MiB it never reads).
        needs_tree = any(WORKLOADS[w][0] in ("stat", "read", "cow", "memory") for w in workloads)
        ctx.tree_entries, tree_bytes = make_tree_tar(bench_tar, "thinfs-compare", ctx.cfg["tree_files"] if needs_tree else 0,
                                                     ctx.cfg["big_mib"] if needs_tree else 0)
        ctx.untar_tar = os.path.join(ctx.shm, "untar.tar")
        make_tree_tar(ctx.untar_tar, "tree", ctx.cfg["tree_files"], 0, seed=16)
        objs = {}
        for s in ran:
            ctx.progress(f"preparing {s}")
            objs[s] = SETUP_CLASSES[s](ctx)
            objs[s].prepare(kind, layers, bench_tar)
        how = {"thinfs": "container layers through FUSE (thinfs-mount) on the userspace pool",
               "overlayfs": "kernel overlayfs, the layers as lowerdirs",
               "fuse-overlayfs": "fuse-overlayfs, the same lowerdirs",
               "containerd-overlayfs": "a private containerd's overlayfs snapshotter, containers by ctr run",
               "containerd-thinfs": "the same containerd, thinfs serve as its proxy snapshotter (FUSE on the userspace pool), containers by ctr run"}
        for s in ran:
            status[s]["how"] = how[s]

        groups = []
        for w in workloads:
            if WORKLOADS[w][0] not in groups:
                groups.append(WORKLOADS[w][0])
        runs = []
        reps = ctx.cfg["reps"]
        total = reps * len(groups) * len(ran)
        k = 0
        for rep in range(1, reps + 1):
            rot = (rep - 1) % max(len(ran), 1)
            order = ran[rot:] + ran[:rot]   # so that no setup always runs right after the same other one
            for g in groups:
                for s in order:
                    k += 1
                    ctx.progress(f"round {rep}/{reps}  step {k}/{total}  {s}: {g}")
                    load = loadavg()[0]
                    t = time.monotonic()
                    for w, (value, extra) in run_group(ctx, objs[s], g, rep, workloads).items():
                        runs.append({"rep": rep, "setup": s, "workload": w, "value": value, "extra": extra,
                                     "load1": load, "step_seconds": time.monotonic() - t})
        load_after = loadavg()
        finished = datetime.datetime.now(datetime.timezone.utc)
        summary = summarize(runs, ran, workloads)
        ctx.progress("writing the report")
        os.makedirs(out, exist_ok=True)
        res = {
            "schema": 1, "command_line": args.command_line or shlex.join(sys.argv),
            "started": started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
            "seconds": (finished - started).total_seconds(), "machine": machine_info(ctx),
            "load": {"before": load_before, "after": load_after},
            "config": dict(ctx.cfg, quick=args.quick),
            "image": {"path": args.image, "kind": kind, "layers": len(layers), "tree_entries": ctx.tree_entries,
                      "tree_bytes": tree_bytes, "big_mib": ctx.cfg["big_mib"] if needs_tree else 0},
            "setups": status, "workloads": workloads,
            "units": {w: {"metric": WORKLOADS[w][1], "unit": WORKLOADS[w][2], "better": WORKLOADS[w][3],
                          "description": WORKLOADS[w][4]} for w in workloads},
            "runs": runs, "summary": summary,
        }
        if baseline:
            res["baseline"] = {"path": args.baseline, "started": baseline.get("started"), "summary": baseline["summary"]}
        write_report(res, out, written)
        ctx.progress(f"done: {out}/report.md, report.html, results.json, {', '.join(res['plots'])}", final=True)
        ok = True
    except Interrupted as e:
        interrupted = e.signum
    except KeyboardInterrupt:
        interrupted = signal.SIGINT
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if ctx.tty and not ok:
            sys.stderr.write("\n")
        if not ok:
            # An unfinished report is not left behind.
            for p in written:
                try:
                    os.unlink(p)
                except OSError:
                    pass
            if made_out and os.path.isdir(out) and not os.listdir(out):
                os.rmdir(out)
        ctx.cleanup()
    if interrupted:
        sys.stderr.write(f"thinfs compare: interrupted by {signal.Signals(interrupted).name}; "
                         "every mount, daemon and scratch directory removed\n")
        return 128 + interrupted
    return 0


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "--list":
        print(json.dumps({"setups": SETUPS, "workloads": list(WORKLOADS), "plots": PLOTS}))
        return 0
    if len(sys.argv) >= 2 and sys.argv[1] == "workload":
        if len(sys.argv) < 3 or sys.argv[2] not in STEPS:
            sys.stderr.write(f"compare.py workload: one of {', '.join(STEPS)}\n")
            return 2
        fn, types = STEPS[sys.argv[2]]
        vals = sys.argv[3:]
        if len(vals) != len(types):
            sys.stderr.write(f"compare.py workload {sys.argv[2]}: {len(types)} arguments\n")
            return 2
        print(json.dumps(fn(*(t(v) for t, v in zip(types, vals)))))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "report":
        return rerender(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(prog="compare.py run")
    ap.add_argument("cmd", choices=["run"])
    ap.add_argument("--image", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--setups")
    ap.add_argument("--workloads")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--baseline")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--thinfs", default="thinfs")
    ap.add_argument("--command-line")
    args = ap.parse_args()
    try:
        return run(args)
    except CompareError as e:
        sys.stderr.write(f"thinfs compare: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
