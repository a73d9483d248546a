#!/usr/bin/env python3
"""Writes the seed corpora of the harnesses whose inputs are files: layer-tar, image, docker-dm,
control and docker-plugin (the metadata harnesses and containerd write their own: see make-seeds.sh). Python's tarfile, json and
hashlib are an independent writer of what ThinFS reads. Deterministic: running it again gives the
same bytes.

    make-seeds.py CORPUS_DIR      writes CORPUS_DIR/<harness>/<seed>
"""
import gzip, hashlib, io, json, os, sys, tarfile

MTIME = 1700000000
# No padding after the end-of-archive blocks: small seeds fuzz faster.
tarfile.RECORDSIZE = 1024
SEP = b"\0\0\n"  # FileBundle's separator (Sources/FuzzSupport/TarWriter.swift)


def tar(entries, fmt=tarfile.PAX_FORMAT, compress=False):
    """entries: (name, kind, data/linkname, extra dict)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, kind, payload, extra in entries:
            i = tarfile.TarInfo(name)
            i.mtime = MTIME
            i.mode = extra.get("mode", 0o755 if kind == "dir" else 0o644)
            i.uid = extra.get("uid", 0)
            i.gid = extra.get("gid", 0)
            if extra.get("xattrs"):
                i.pax_headers = {"SCHILY.xattr." + k: v for k, v in extra["xattrs"].items()}
            data = None
            if kind == "reg":
                i.type = tarfile.REGTYPE
                i.size = len(payload)
                data = io.BytesIO(payload)
            elif kind == "dir":
                i.type = tarfile.DIRTYPE
            elif kind == "sym":
                i.type, i.linkname = tarfile.SYMTYPE, payload
            elif kind == "hard":
                i.type, i.linkname = tarfile.LNKTYPE, payload
            elif kind in ("chr", "blk"):
                i.type = tarfile.CHRTYPE if kind == "chr" else tarfile.BLKTYPE
                i.devmajor, i.devminor = payload
            elif kind == "fifo":
                i.type = tarfile.FIFOTYPE
            t.addfile(i, data)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def reg(name, data=b"", **kw): return (name, "reg", data, kw)
def d(name, **kw): return (name, "dir", None, kw)
def sym(name, target): return (name, "sym", target, {"mode": 0o777})
def hard(name, target): return (name, "hard", target, {})


def layer_tar_seeds():
    # The lower layer the harness applies first: etc/{hostname,passwd} bin/sh usr/lib/libc.so var/cache/{a,b}.
    yield "files", tar([d("app"), reg("app/main", b"print('hi')\n", mode=0o755), reg("app/empty"), sym("app/link", "main"),
                        hard("app/hard", "app/main"), reg("etc/hostname", b"layer\n")])
    yield "whiteouts", tar([reg("etc/.wh.hostname"), d("var/cache"), reg("var/cache/.wh..wh..opq"), reg("var/cache/new", b"n"),
                            reg("usr/lib/.wh.libc.so")])
    yield "xattrs-owners", tar([reg("bin/ping", b"\x7fELF", mode=0o4755, uid=1000, gid=1000,
                                    xattrs={"security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
                                            "user.note": "x"}),
                                d("tmp", mode=0o1777)])
    yield "devices", tar([d("dev"), ("dev/null", "chr", (1, 3), {}), ("dev/sda", "blk", (8, 0), {}), ("dev/fifo", "fifo", None, {})])
    long = "deep/" + "d" * 120 + "/" + "f" * 150
    yield "gnu-long-names", tar([d("deep"), d("deep/" + "d" * 120), reg(long, b"long"), sym("deep/l", "x" * 200)], fmt=tarfile.GNU_FORMAT)
    yield "ustar", tar([d("u"), reg("u/file", b"ustar\n")], fmt=tarfile.USTAR_FORMAT)
    yield "gzip", tar([reg("compressed", b"z" * 5000), d("etc"), reg("etc/passwd", b"root:x:0:0::/:/bin/sh\n")], compress=True)
    yield "replace-kinds", tar([reg("bin", b"was a directory"), d("etc/hostname"), reg("etc/hostname/inner", b"i"),
                                hard("linked-to-lower", "bin/sh")])
    yield "large-sparse-ish", tar([reg("big", b"\0" * 65536 + b"end"), reg("bin/sh", b"replaced")])
    yield "empty", b"\0" * 1024


def bundle(files):
    return SEP.join(name.encode() + b"\n" + data for name, data in files)


def sha(b): return "sha256:" + hashlib.sha256(b).hexdigest()


def image_seeds():
    layer = tar([d("etc"), reg("etc/os-release", b"ID=fuzz\n"), sym("etc/link", "os-release")])
    layer_gz = gzip.compress(layer, mtime=0)
    layer2 = tar([reg("etc/.wh.link"), reg("top", b"t")])
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha(layer), sha(layer2)]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(layer_gz), "size": len(layer_gz)},
                                      {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(layer2), "size": len(layer2)}]}).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest), "size": len(manifest),
         "annotations": {"org.opencontainers.image.ref.name": "latest"}, "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    blob = lambda b: "blobs/sha256/" + hashlib.sha256(b).hexdigest()
    oci = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index), (blob(manifest), manifest),
           (blob(config), config), (blob(layer_gz), layer_gz), (blob(layer2), layer2)]
    yield "oci-layout", b"\0" + bundle(oci)
    cfg_name = hashlib.sha256(config).hexdigest() + ".json"
    docker_manifest = json.dumps([{"Config": cfg_name, "RepoTags": ["fuzz:latest"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}]).encode()
    docker = [(cfg_name, config), ("l1/layer.tar", layer), ("l2/layer.tar", layer2), ("manifest.json", docker_manifest)]
    yield "docker-save-directory", b"\1" + bundle(docker)
    yield "docker-save-tar", b"\2" + bundle(docker)
    raw = tar([reg(n, b) for n, b in docker])
    yield "docker-save-raw", b"\3" + raw
    yield "docker-save-raw-gzip", b"\3" + gzip.compress(raw, mtime=0)


def docker_dm_seeds():
    # Matches the harness's pool: device 1 the 16 MiB base ext4 with this UUID, 2 and 3 its
    # snapshots, 4 unformatted; the pool's transaction id is 5.
    uuid = "7e1e0e39-2d8a-4d2c-9a3c-5b0f7b1c2d3e"
    dev = lambda i, size=16 << 20, tx=1, init=False, deleted=False: json.dumps(
        {"device_id": i, "size": size, "transaction_id": tx, "initialized": init, "deleted": deleted}).encode()
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    meta = "devicemapper/metadata/"
    base = [(meta + "base", dev(1, init=True)),
            (meta + "deviceset-metadata", json.dumps({"next_device_id": 5, "BaseDeviceUUID": uuid, "BaseDeviceFilesystem": "ext4"}).encode())]
    layers = [(meta + a, dev(2, tx=2)), (meta + b + "-init", dev(3, tx=3)), (meta + b, dev(4, tx=4))]
    yield "base-only", bundle(base)
    yield "layers", bundle(base + layers)
    yield "open-transaction", bundle(base + layers + [(meta + "transaction-metadata",
                                                       json.dumps({"open_transaction_id": 6, "device_hash": b, "device_id": 4}).encode())])
    chain = "1" * 64
    db = "image/devicemapper/layerdb/"
    yield "layerdb", bundle(base + layers + [(db + "sha256/" + chain + "/cache-id", a.encode()),
                                             (db + "mounts/" + c + "/mount-id", b.encode()),
                                             (db + "mounts/" + c + "/init-id", (b + "-init").encode()),
                                             (db + "mounts/" + c + "/parent", ("sha256:" + chain).encode())])
    yield "old-docker", bundle([(meta + "base", b'{"device_id":1,"size":16777216,"transaction_id":0,"initialized":true}'),
                                (meta + a, b'{"device_id":2,"size":16777216}')])
    yield "deleted-and-bad", bundle(base + [(meta + a, dev(2, deleted=True)), (meta + c, dev(3, size=1000)), (meta + ".tmp123", b"{")])


def control_seeds():
    requests = [
        {"operation": "ls"}, {"operation": "ls", "json": True}, {"operation": "info"}, {"operation": "cleanup"},
        {"operation": "create", "layer": "l1", "parent": "img"}, {"operation": "create", "layer": "l2"},
        {"operation": "create-rw", "layer": "c2", "parent": "img", "size": 33554432},
        {"operation": "rm", "layer": "ctr"}, {"operation": "rm", "layer": "img"},
        {"operation": "mount", "layer": "ctr", "mountpoint": "/nonexistent/m", "readOnly": True, "mountOptions": ["ro", "noatime"]},
        {"operation": "apply-diff", "layer": "ctr", "path": "/nonexistent.tar"},
        {"operation": "image-import", "path": "/nonexistent", "name": "x"},
        {"operation": "pool-status"}, {"operation": "pool-status", "human": True},
    ]
    for i, r in enumerate(requests):
        yield "request-%02d-%s" % (i, r["operation"]), json.dumps(r).encode() + b"\n"
    yield "bad-size", b'{"operation":"create-rw","layer":"c","parent":"img","size":-1}\n'
    yield "bad-type", b'{"operation":"create","layer":7}\n'
    yield "two-lines", b'{"operation":"ls"}\n{"operation":"info"}\n'
    yield "no-newline", b'{"operation":"info"}'
    yield "dotdot", b'{"operation":"create","layer":"../../etc","parent":"img"}\n'


def docker_plugin_seeds():
    """Requests as dockerd's graphdriver proxy (moby daemon/graphdriver/proxy.go) sends them:
    METHOD?QUERY newline BODY, several in a bundle. The harness has layers img and ctr (on img)."""
    def req(method, body=None, raw=None):
        return (method, raw if raw is not None else json.dumps(body).encode())
    c = lambda i, p="", **kw: dict({"ID": i, "Parent": p, "MountLabel": "", "StorageOpt": None}, **kw)
    layer = tar([d("etc"), reg("etc/hostname", b"plugin\n"), reg("etc/.wh.gone")])
    seeds = {
        "activate": [req("Plugin.Activate", raw=b"")],
        "capabilities-status": [req("GraphDriver.Capabilities", {}), req("GraphDriver.Status", {})],
        "create-image": [req("GraphDriver.Create", c("l1", "img")), req("GraphDriver.Exists", {"ID": "l1"}),
                         req("GraphDriver.GetMetadata", {"ID": "l1"})],
        "create-rw-size": [req("GraphDriver.CreateReadWrite", c("c1", "img", StorageOpt={"size": "32M"}))],
        "create-rw-bad-option": [req("GraphDriver.CreateReadWrite", c("c2", "img", StorageOpt={"size": "lots", "dm.x": "1"}))],
        "create-rw-init": [req("GraphDriver.Create", c("l2")), req("GraphDriver.CreateReadWrite", c("l2-init", "l2")),
                           req("GraphDriver.CreateReadWrite", c("c3", "l2-init"))],
        "remove": [req("GraphDriver.Remove", {"ID": "ctr"}), req("GraphDriver.Remove", {"ID": "img"}),
                   req("GraphDriver.Exists", {"ID": "ctr"})],
        "get-put": [req("GraphDriver.Get", {"ID": "ctr", "MountLabel": ""}), req("GraphDriver.Put", {"ID": "ctr"})],
        "apply-diff": [("GraphDriver.ApplyDiff?id=ctr&parent=img", layer), req("GraphDriver.DiffSize", {"ID": "ctr", "Parent": "img"})],
        "apply-diff-bad-parent": [("GraphDriver.ApplyDiff?id=ctr&parent=other", layer)],
        "diff-changes": [req("GraphDriver.Changes", {"ID": "ctr", "Parent": "img"}), req("GraphDriver.Diff", {"ID": "ctr", "Parent": ""}),
                         req("GraphDriver.Diff", {"ID": "ctr", "Parent": "nope"})],
        "cleanup": [req("GraphDriver.Cleanup", {})],
        "bad-json": [req("GraphDriver.Create", raw=b'{"ID":7}'), req("GraphDriver.Remove", raw=b"{"),
                     req("GraphDriver.Exists", {"ID": "../etc"}), req("GraphDriver.Nope", {})],
        "init": [req("GraphDriver.Init", {"Home": "/var/lib/docker/thinfs", "Opts": ["dm.basesize=16M"]})],
    }
    for name, requests in seeds.items():
        yield name, bundle(requests)


def main():
    out = sys.argv[1]
    for harness, seeds in (("layer-tar", layer_tar_seeds()), ("image", image_seeds()),
                           ("docker-dm", docker_dm_seeds()), ("control", control_seeds()),
                           ("docker-plugin", docker_plugin_seeds())):
        os.makedirs(os.path.join(out, harness), exist_ok=True)
        for name, data in seeds:
            with open(os.path.join(out, harness, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
