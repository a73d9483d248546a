#!/usr/bin/env bash
# The second host's "pull" of an image the first host already has (issue 16), against a fresh
# unpack: two stores (separate roots and rbd.prefix, one rbd.catalogue) on a test cluster; each
# round a new catalogue, host A imports (unpacks and publishes), then host B imports the same
# archive (adopts both layers). docs/benchmarks.md has the figures.
#
#   scripts/ceph/bench-sharing.sh CEPH_CONF [MIB] [ROUNDS]   (thinfs from .build/debug)
# Leaves its images in the cluster: run it against a throw-away one (scripts/ceph/cluster.sh).
set -euo pipefail
conf=${1:?usage: bench-sharing.sh CEPH_CONF [MIB] [ROUNDS]} mib=${2:-64} rounds=${3:-3}
thinfs=$(cd "$(dirname "$0")/../.." && pwd)/.build/debug/thinfs
work=$(mktemp -d /tmp/thinfs-bench-sharing.XXXXXX)
trap 'rm -rf "$work"' EXIT
# A docker-save archive: two layers of incompressible 1 MiB files (MIB, then MIB/4).
python3 - "$work/image.tar" "$mib" <<'PY'
import hashlib, io, json, os, sys, tarfile
out, mib = sys.argv[1], int(sys.argv[2])
def layer(files):
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, size in files:
            ti = tarfile.TarInfo(name); ti.size = size; ti.mode = 0o644; ti.mtime = 1700000000
            t.addfile(ti, io.BytesIO(os.urandom(size)))
    return b.getvalue()
l1 = layer([(f"data/a{i}", 1 << 20) for i in range(mib)])
l2 = layer([(f"data/b{i}", 1 << 20) for i in range(max(1, mib // 4))])
ids = ["sha256:" + hashlib.sha256(l).hexdigest() for l in (l1, l2)]
config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": ids}}).encode()
cid = hashlib.sha256(config).hexdigest()
with tarfile.open(out, "w") as t:
    def add(name, data):
        ti = tarfile.TarInfo(name); ti.size = len(data); t.addfile(ti, io.BytesIO(data))
    add(f"{cid}.json", config); add("l1/layer.tar", l1); add("l2/layer.tar", l2)
    add("manifest.json", json.dumps([{"Config": f"{cid}.json", "RepoTags": ["bench:latest"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}]).encode())
PY
for round in $(seq 1 "$rounds"); do
    tag=$$-$round
    for h in a b; do
        "$thinfs" init --root "$work/$h$round" --storage-opt thinfs.backend=rbd --storage-opt rbd.conf="$conf" \
            --storage-opt rbd.prefix="bench-$tag-$h-" --storage-opt rbd.catalogue="bench-catalogue-$tag" \
            --storage-opt dm.basesize=512M >/dev/null
    done
    s=$(date +%s.%N); "$thinfs" image import "$work/image.tar" --root "$work/a$round" >/dev/null 2>"$work/a.err"; m=$(date +%s.%N)
    "$thinfs" image import "$work/image.tar" --root "$work/b$round" >/dev/null 2>"$work/b.err"; e=$(date +%s.%N)
    echo "round $round: host A unpack $(echo "$m - $s" | bc) s, host B adopt $(echo "$e - $m" | bc) s ($(tail -1 "$work/b.err")); load $(cut -d' ' -f1 /proc/loadavg)"
done
