#!/usr/bin/env bash
# Regenerates the thin_dump-style XML fixtures in this directory.
#
# Deterministic: a fixed-seed PRNG drives a small model of a thin pool
# (create_thin, create_snap, writes that provision or break sharing, deletes),
# and each fixture is the pool's state written exactly as thin_dump 0.9.0
# prints it: devices in id order, mappings in virtual-block order, maximal
# runs of consecutive virtual and data blocks with one time as
# <range_mapping>, lone blocks as <single_mapping>. That canonical form is what
# lets the tests compare thin_dump's output with the file byte for byte.
#
# Usage: ./make-fixtures.sh   (needs python3; rewrites *.xml here)
set -euo pipefail
cd "$(dirname "$0")"
exec python3 - <<'PY'
import random


class Pool:
    """The parts of dm-thin's pool metadata that thin_dump shows."""

    def __init__(self, seed, nr_data_blocks, data_block_size=128, transaction=0):
        self.rng = random.Random(seed)
        self.nr_data_blocks = nr_data_blocks
        self.data_block_size = data_block_size
        self.transaction = transaction
        self.time = 0
        self.devices = {}      # id -> dict(mappings={vblock: (data, time)}, trans, ctime, stime)
        self.refs = {}         # data block -> number of mappings to it
        self.next_free = 0

    def allocate(self):
        # Sequential allocation, skipping blocks still referenced, as a fresh pool does.
        while self.refs.get(self.next_free, 0):
            self.next_free += 1
        assert self.next_free < self.nr_data_blocks, "fixture needs more data blocks"
        b = self.next_free
        self.next_free += 1
        return b

    def create_thin(self, dev):
        assert dev not in self.devices
        self.devices[dev] = dict(mappings={}, trans=self.transaction, ctime=self.time, stime=self.time)

    def create_snap(self, dev, origin):
        # The kernel bumps the pool time, then stamps origin and snapshot with it.
        o = self.devices[origin]
        self.time += 1
        o["stime"] = self.time
        self.devices[dev] = dict(mappings=dict(o["mappings"]), trans=self.transaction,
                                 ctime=self.time, stime=self.time)
        for data, _ in o["mappings"].values():
            self.refs[data] += 1

    def write(self, dev, vblock):
        # A write to an unmapped or shared block provisions a new data block.
        m = self.devices[dev]["mappings"]
        if vblock in m:
            data, _ = m[vblock]
            if self.refs[data] == 1:
                return
            self.refs[data] -= 1
        b = self.allocate()
        self.refs[b] = 1
        m[vblock] = (b, self.time)

    def write_run(self, dev, start, length):
        for v in range(start, start + length):
            self.write(dev, v)

    def delete(self, dev):
        for data, _ in self.devices.pop(dev)["mappings"].values():
            self.refs[data] -= 1

    def xml(self):
        out = ['<superblock uuid="" time="%d" transaction="%d" flags="0" version="2" '
               'data_block_size="%d" nr_data_blocks="%d">' %
               (self.time, self.transaction, self.data_block_size, self.nr_data_blocks)]
        for dev in sorted(self.devices):
            d = self.devices[dev]
            m = d["mappings"]
            out.append('  <device dev_id="%d" mapped_blocks="%d" transaction="%d" '
                       'creation_time="%d" snap_time="%d">' % (dev, len(m), d["trans"], d["ctime"], d["stime"]))
            run = None  # [origin, data, length, time]

            def flush():
                if run is None:
                    return
                o, b, n, t = run
                if n == 1:
                    out.append('    <single_mapping origin_block="%d" data_block="%d" time="%d"/>' % (o, b, t))
                else:
                    out.append('    <range_mapping origin_begin="%d" data_begin="%d" length="%d" time="%d"/>'
                               % (o, b, n, t))

            for v in sorted(m):
                b, t = m[v]
                if run and run[0] + run[2] == v and run[1] + run[2] == b and run[3] == t:
                    run[2] += 1
                else:
                    flush()
                    run = [v, b, 1, t]
            flush()
            out.append('  </device>')
        out.append('</superblock>')
        return "\n".join(out) + "\n"

    def save(self, name):
        with open(name, "w") as f:
            f.write(self.xml())


# empty-pool: a formatted pool with no devices.
p = Pool(seed=0, nr_data_blocks=1024, transaction=0)
p.save("empty-pool.xml")

# basic: two devices, ranges and single mappings, an empty device.
p = Pool(seed=1, nr_data_blocks=4096, transaction=7)
p.create_thin(0)
p.write_run(0, 0, 100)
for _ in range(60):
    p.write(0, p.rng.randrange(100, 2000))
p.write_run(0, 5000, 17)
p.create_thin(1)
p.write_run(1, 10, 3)
p.write(1, 99)
p.create_thin(5)
p.save("basic.xml")

# snapshot-chain: snapshots of snapshots. Many data blocks are shared by three
# or more devices, so the data space map needs ref-count tree entries.
p = Pool(seed=2, nr_data_blocks=20000, transaction=3)
p.create_thin(1)
p.write_run(1, 0, 3000)
p.create_snap(2, 1)
for _ in range(200):
    p.write(2, p.rng.randrange(0, 4000))
p.create_snap(3, 2)
p.write_run(3, 1000, 50)
p.create_snap(4, 3)
for _ in range(100):
    p.write(1, p.rng.randrange(0, 3000))
p.create_snap(6, 1)
p.write_run(4, 2500, 600)
p.create_snap(7, 4)
p.delete(3)
p.save("snapshot-chain.xml")

# huge-vblocks: virtual block numbers at and far beyond 2^32 (a range crosses
# the 2^32 boundary), up to 2^56 (with 128-sector blocks, 2^63 sectors).
p = Pool(seed=3, nr_data_blocks=1000, transaction=1)
p.create_thin(9)
p.write_run(9, 0, 4)
p.write_run(9, 2**32 - 3, 6)
p.write(9, 2**40)
p.write(9, 2**40 + 2)
p.write_run(9, 2**48 + 5, 10)
p.write(9, 2**56 - 1)
p.create_snap(10, 9)
p.write(10, 2**32)
p.save("huge-vblocks.xml")

# multilevel: 50000 mappings in one device, so thin_restore's trees have three
# levels (sequential inserts leave leaves half full: 126 of 252 entries), and a
# snapshot of it with 3000 scattered overwrites and a rewritten run of 5000.
# Mostly long runs, to keep the file small.
p = Pool(seed=4, nr_data_blocks=200000, transaction=11)
p.create_thin(1)
v = 0
while len(p.devices[1]["mappings"]) < 50000:
    n = p.rng.choice([1, 2, 5, 40, 300, 1000, 2000])
    p.write_run(1, v, min(n, 50000 - len(p.devices[1]["mappings"])))
    v += n + p.rng.choice([0, 1, 3, 1000])
p.create_snap(2, 1)
keys = sorted(p.devices[2]["mappings"])
for vb in p.rng.sample(keys, 3000):
    p.write(2, vb)
for vb in keys[20000:25000]:
    p.write(2, vb)
p.save("multilevel.xml")

# many-devices: 400 devices, ids spread over the 24-bit range (0 and 2^24-1
# included), so the top-level mapping tree and the details tree have several
# leaves; a few mappings each, some shared by snapshots, some devices empty.
p = Pool(seed=5, nr_data_blocks=8192, transaction=400)
ids = sorted(set([0, 2**24 - 1] + p.rng.sample(range(1, 2**24 - 1), 398)))
for i, dev in enumerate(ids):
    if i % 10 == 9:
        p.create_snap(dev, ids[i - 1])
        p.write(dev, p.rng.randrange(0, 16))
    else:
        p.create_thin(dev)
        if i % 7:
            p.write_run(dev, p.rng.randrange(0, 1000), p.rng.randrange(1, 12))
p.save("many-devices.xml")
PY
