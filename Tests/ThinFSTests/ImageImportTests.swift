import Crypto
import Foundation
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS

/// One-layer test images made by python3 (tarfile, hashlib, json): an independent writer of the
/// layer tar, the OCI layout and the `docker save` archive, with digests computed by hashlib.
enum TestImage {
    struct Made {
        var dir: String
        /// The layer's DiffID, which is also its chain id (one layer) and so its layer id in the store.
        var diffID: String
        /// sha256 (hex) of each file of the layer, by path.
        var files: [String: String]
        var layerBlob: String
        var configBlob: String
        var oci: String { dir + "/oci" }
        var docker: String { dir + "/docker.tar" }
    }

    /// `files`: regular files of seeded random bytes. `oci`: also write an OCI layout. `gzip`: compress
    /// docker.tar. `junk`: bytes of zeros in a file docker.tar holds but no manifest names.
    static func make(_ dir: String, files: [(name: String, size: Int, seed: Int)], oci: Bool = false,
                     gzip: Bool = false, junk: Int = 0, link: Bool = false) throws -> Made {
        let spec: [String: Any] = [
            "files": files.map { ["name": $0.name, "size": $0.size, "seed": $0.seed] },
            "oci": oci, "gzip": gzip, "junk": junk, "link": link,
        ]
        let script = #"""
        import hashlib, io, json, os, random, sys, tarfile
        out, spec = sys.argv[1], json.loads(sys.argv[2])
        os.makedirs(out, exist_ok=True)
        layer = os.path.join(out, "layer.tar")
        shas = {}
        with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as t:
            dirs = set()
            for f in spec["files"]:
                d = os.path.dirname(f["name"])
                if d and d not in dirs:
                    i = tarfile.TarInfo(d); i.type = tarfile.DIRTYPE; i.mode = 0o755; t.addfile(i); dirs.add(d)
                data = random.Random(f["seed"]).randbytes(f["size"])
                shas[f["name"]] = hashlib.sha256(data).hexdigest()
                i = tarfile.TarInfo(f["name"]); i.size = len(data); i.mode = 0o644
                t.addfile(i, io.BytesIO(data))
        def sha(path):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""): h.update(chunk)
            return h.hexdigest()
        diff = sha(layer)
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff]}}).encode()
        cfg = hashlib.sha256(config).hexdigest()
        if spec["oci"]:
            blobs = os.path.join(out, "oci", "blobs", "sha256")
            os.makedirs(blobs)
            os.link(layer, os.path.join(blobs, diff))
            open(os.path.join(blobs, cfg), "wb").write(config)
            manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + cfg, "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:" + diff,
                            "size": os.path.getsize(layer)}]}).encode()
            man = hashlib.sha256(manifest).hexdigest()
            open(os.path.join(blobs, man), "wb").write(manifest)
            open(os.path.join(out, "oci", "oci-layout"), "w").write('{"imageLayoutVersion": "1.0.0"}')
            open(os.path.join(out, "oci", "index.json"), "w").write(json.dumps({"schemaVersion": 2, "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + man, "size": len(manifest)}]}))
        class Zeros(io.RawIOBase):
            def readable(self): return True
            def readinto(self, b):
                b[:] = bytes(len(b)); return len(b)
        # docker save's order: the config and the layers first, manifest.json last.
        mode = "w:gz" if spec["gzip"] else "w"
        kw = {"compresslevel": 1} if spec["gzip"] else {}
        with tarfile.open(os.path.join(out, "docker.tar"), mode, format=tarfile.PAX_FORMAT, **kw) as t:
            def add(name, data):
                i = tarfile.TarInfo(name); i.size = len(data); t.addfile(i, io.BytesIO(data))
            add(cfg + ".json", config)
            t.add(layer, arcname=diff + "/layer.tar")
            if spec["junk"]:
                i = tarfile.TarInfo("junk/zeros"); i.size = spec["junk"]; t.addfile(i, io.BufferedReader(Zeros()))
            name = diff + "/layer.tar"
            if spec["link"]:
                # Older docker versions link a layer.tar shared between images.
                i = tarfile.TarInfo("alias/layer.tar"); i.type = tarfile.SYMTYPE; i.linkname = "../" + name; t.addfile(i)
                name = "alias/layer.tar"
            add("manifest.json", json.dumps([{"Config": cfg + ".json", "RepoTags": ["test:latest"],
                                              "Layers": [name]}]).encode())
        print(json.dumps({"diff": "sha256:" + diff, "config": cfg, "files": shas}))
        """#
        let encoded = String(decoding: try JSONSerialization.data(withJSONObject: spec), as: UTF8.self)
        let r = try Oracle.run("/usr/bin/env", ["python3", "-c", script, dir, encoded])
        guard r.status == 0 else { throw Oracle.OracleError.failed("python3 image maker: \(r.stderr)") }
        let out = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])
        let diff = try #require(out["diff"] as? String)
        let config = try #require(out["config"] as? String)
        return Made(dir: dir, diffID: diff, files: try #require(out["files"] as? [String: String]),
                    layerBlob: dir + "/oci/blobs/sha256/" + diff.dropFirst(7), configBlob: dir + "/oci/blobs/sha256/" + config)
    }

    /// Every file of `made` in layer `id` of the store at `root`, with its bytes' sha256 (nil if missing).
    static func contents(root: String, layer id: String, of made: Made) throws -> [String: String?] {
        let store = try LayerStore.open(root: root, logger: quietLogger)
        defer { try? store.close() }
        let open = try store.openLayer(id, readOnly: true, what: "test")
        defer { try? open.close() }
        let v = open.volume
        var found: [String: String?] = [:]
        for name in made.files.keys {
            var ino = v.rootInode
            var missing = false
            for part in name.split(separator: "/") {
                guard let next = try? v.lookup(parent: ino, name: String(part)) else { missing = true; break }
                ino = next.ino
            }
            guard !missing else { found[name] = .some(nil); continue }
            let size = try v.getattr(ino).size
            var hasher = SHA256()
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var offset: UInt64 = 0
            while offset < size {
                let n = try buffer.withUnsafeMutableBytes { try v.read(ino, at: offset, into: $0) }
                guard n > 0 else { break }
                hasher.update(data: buffer[0..<n])
                offset += UInt64(n)
            }
            found[name] = hasher.finalize().map { String(format: "%02x", $0) }.joined()
        }
        return found
    }
}

/// A value shared with a test's helper thread.
private final class Shared<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: T
    init(_ value: T) { self.value = value }
    func withLock<R>(_ body: (inout T) -> R) -> R {
        lock.lock()
        defer { lock.unlock() }
        return body(&value)
    }
}

/// Imports and apply-diffs killed part way, the docker archive's bounded unpacking, the scratch
/// directories a killed import leaves, and OCI layouts whose blobs are not regular files.
@Suite("Image import: interrupted writers, bounded unpacking, hostile layouts",
       .enabled(if: CLI.available && PyTar.available, "needs the thinfs binary and python3"))
struct ImageImportTests {
    static let part = 32 << 20
    /// Three files of random bytes (incompressible: every byte reaches the pool).
    static let files = (0..<3).map { (name: "data/part\($0)", size: part, seed: $0) }

    func initStore(_ root: String) throws {
        let r = try CLI.run(["init", "--root", root, "--storage-opt", "dm.basesize=512M", "--storage-opt", "dm.loopdatasize=2G",
                             "--storage-opt", "dm.loopmetadatasize=32M"])
        try #require(r.status == 0, "thinfs init: \(r.stderr)")
    }

    /// Bytes the pool's data file has allocated: it grows as a writer's blocks reach the pool.
    static func allocated(_ path: String) -> UInt64 {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_blocks) * 512 : 0
    }

    /// Runs `thinfs args`, and kills it with SIGKILL once the layer row `id` exists, no pool change is
    /// in flight (the layer's device, or the scratch snapshot an existing layer is written through,
    /// is committed), and `threshold` bytes more of the pool's data file are allocated than before it
    /// started: part way through writing the layer's content.
    static func killMidway(_ args: [String], root: String, layer id: String, threshold: UInt64) throws {
        let poolData = root + "/pool/data"
        let baseline = allocated(poolData)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: CLI.binary)
        p.arguments = args
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        let db = try LayerDatabase(path: root + "/layers.db")
        defer { db.close() }
        let deadline = Date().addingTimeInterval(300)
        var killed = false
        while p.isRunning, Date() < deadline {
            let row = try db.query("SELECT state FROM layers WHERE id = ?", [.text(id)])
            // A scratch entry stays for the whole write (it names the device being written); only
            // the creates and deletes are pool changes that end.
            let inFlight = try db.query("SELECT COUNT(*) FROM journal WHERE op != 'scratch'").first?.first?.integer ?? 0
            if !row.isEmpty, inFlight == 0, allocated(poolData) >= baseline + threshold {
                kill(p.processIdentifier, SIGKILL)
                killed = true
                break
            }
            usleep(2_000)
        }
        if !killed, p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        try #require(killed, "thinfs \(args.joined(separator: " ")) ended (status \(p.terminationStatus)) before \(threshold) bytes of the layer reached the pool")
        #expect(p.terminationReason == .uncaughtSignal)
    }

    static func unpackDirectories(_ root: String) -> Set<String> {
        Set(((try? FileManager.default.contentsOfDirectory(atPath: root + "/tmp")) ?? []).filter { $0.hasPrefix("thinfs-image-") })
    }

    /// Issue 10: an import killed while it wrote a layer left the layer looking complete, and the
    /// next import reused it: it exited 0, and the layer's files were missing.
    @Test func killedImportIsRedoneByTheNextImport() throws {
        let dir = TempDir()
        let root = dir.path + "/store"
        let made = try TestImage.make(dir.path + "/image", files: Self.files)
        try initStore(root)

        try Self.killMidway(["image", "import", "--root", root, made.docker], root: root, layer: made.diffID, threshold: 40 << 20)
        let left = Self.unpackDirectories(root)
        #expect(!left.isEmpty, "the killed import had an unpack directory in ROOT/tmp")

        let again = try CLI.run(["image", "import", "--root", root, made.docker])
        #expect(again.status == 0, "\(again.stderr)")
        #expect(again.stdout == made.diffID + "\n")
        let found = try TestImage.contents(root: root, layer: made.diffID, of: made)
        for (name, sha) in made.files.sorted(by: { $0.key < $1.key }) {
            #expect(found[name] == .some(sha), "\(name): \(found[name].map { $0 ?? "missing" } ?? "not read")")
        }
        // The killed import's unpack directory is gone (the second import's own is removed when it ends).
        #expect(Self.unpackDirectories(root).isEmpty, "left: \(Self.unpackDirectories(root).sorted())")
    }

    /// A killed `layer apply-diff` must not leave the layer looking complete, and must not lose what
    /// the layer held before: after the next open the layer has exactly its old content (the new
    /// content was written into a scratch snapshot, which recovery deletes) and the pool no device
    /// more. (Until the scratch snapshot, recovery removed the layer, old content included.)
    @Test(.enabled(if: Oracle.available, "needs thin_dump and thin_check"))
    func killedApplyDiffKeepsTheLayersOldContent() throws {
        let dir = TempDir()
        let root = dir.path + "/store"
        let made = try TestImage.make(dir.path + "/image", files: Self.files)
        // The old content: a file the new tar does not touch, and one it overwrites.
        let old = try TestImage.make(dir.path + "/old", files: [(name: "old/kept", size: 1 << 20, seed: 7),
                                                                (name: "data/part0", size: 4096, seed: 8)])
        try initStore(root)
        let create = try CLI.run(["layer", "create", "--root", root, "target"])
        try #require(create.status == 0, "\(create.stderr)")
        let first = try CLI.run(["layer", "apply-diff", "--root", root, "target", old.dir + "/layer.tar"])
        try #require(first.status == 0, "\(first.stderr)")

        try Self.killMidway(["layer", "apply-diff", "--root", root, "target", made.dir + "/layer.tar"], root: root,
                            layer: "target", threshold: 40 << 20)
        let store = try LayerStore.open(root: root, logger: quietLogger)
        let after = try #require(try store.layer("target"), "the killed apply-diff's layer is gone, old content included")
        #expect(after.state == .active)
        #expect(store.lastRecovery.rolledBack.contains("target"), "recovery: \(store.lastRecovery)")
        let base = store.base.deviceID
        // The scratch device is gone: the pool has the base and the layer's device, no more.
        #expect(try LayerStoreTests.dumpedDevices(store) == [base, after.deviceID])
        #expect(try Oracle.check(try store.poolRoot.config().metadata))

        #expect(try TestImage.contents(root: root, layer: "target", of: old) == old.files.mapValues { .some($0) })
        let partial = try TestImage.contents(root: root, layer: "target", of: made)
        let untouched: [String: String?] = ["data/part0": old.files["data/part0"], "data/part1": nil, "data/part2": nil]
        #expect(partial == untouched, "the killed apply-diff's files are in the layer")

        // A complete apply gives every file, over the old content.
        let apply = try CLI.run(["layer", "apply-diff", "--root", root, "target", made.dir + "/layer.tar"])
        #expect(apply.status == 0, "\(apply.stderr)")
        #expect(try TestImage.contents(root: root, layer: "target", of: made) == made.files.mapValues { .some($0) })
        #expect(try TestImage.contents(root: root, layer: "target", of: old)["old/kept"] == .some(old.files["old/kept"]))
    }

    /// Apply-diff into a container layer that holds files: a good tar replaces the content and leaves
    /// no scratch device; a truncated or hostile one fails naming what is at fault and leaves the
    /// container with exactly its files, and the pool with exactly its devices. (Until the scratch
    /// snapshot, a failed apply-diff removed the container, files and all.)
    @Test(.enabled(if: Oracle.available, "needs thin_dump and thin_check"))
    func failedApplyDiffKeepsTheContainersFiles() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path + "/store", options: LayerStoreTests.options(), logger: quietLogger)
        var open = true
        defer { if open { try? store.close() } }
        _ = try store.createImageLayer("image", parent: nil)
        _ = try store.createContainerLayer("c", parent: "image", size: nil)
        let devices = { Set(try store.pool.deviceIDs()) }
        let recorded = { Set(try store.allLayers().map(\.deviceID) + [store.base.deviceID]) }

        let first = dir.path + "/first.tar"
        try PyTar.make(first, """
        dir("etc")
        reg("etc/kept", b"old content")
        reg("etc/changed", b"before")
        """)
        let before = try #require(try store.layer("c")).deviceID
        _ = try store.applyDiff("c", from: first)
        let written = try #require(try store.layer("c"))
        #expect(written.state == .active)
        #expect(try devices() == recorded(), "a good apply-diff left a scratch device (or lost one)")
        // Written through a scratch snapshot that became the layer's device; the old device is gone.
        #expect(try written.deviceID != before && !devices().contains(before))
        #expect(try Self.tree(store, "c") == ["etc": nil, "etc/changed": "before", "etc/kept": "old content"])

        // Truncated in the middle of its last file, after its first entries were written.
        let full = dir.path + "/second.tar", truncated = dir.path + "/truncated.tar"
        try PyTar.make(full, """
        reg("etc/changed", b"after")
        reg("etc/added", b"new")
        reg("big", bytes(range(256)) * 16384)
        """)
        let size = try #require(try FileManager.default.attributesOfItem(atPath: full)[.size] as? NSNumber).intValue
        try Data(try Data(contentsOf: URL(fileURLWithPath: full)).prefix(size - (2 << 20))).write(to: URL(fileURLWithPath: truncated))
        // A hostile entry after a good one: refused by the applier, naming the entry.
        let hostile = dir.path + "/hostile.tar"
        try PyTar.make(hostile, """
        reg("etc/changed", b"hostile")
        reg("../escape", b"no")
        """)
        for (bad, names) in [(truncated, truncated), (hostile, "../escape")] {
            do {
                _ = try store.applyDiff("c", from: bad)
                Issue.record("apply-diff of \(bad) succeeded")
            } catch {
                #expect("\(error)".contains(names), "the error does not name \(names): \(error)")
            }
            let kept = try #require(try store.layer("c"), "a failed apply-diff of \(bad) removed the container")
            #expect(kept == written, "\(bad)")
            #expect(try devices() == recorded(), "\(bad): a scratch device is left")
            #expect(try Self.tree(store, "c") == ["etc": nil, "etc/changed": "before", "etc/kept": "old content"], "\(bad)")
        }

        // The good tar, whole: the new content, on a new device, the old one gone.
        _ = try store.applyDiff("c", from: full)
        let replaced = try #require(try store.layer("c"))
        #expect(replaced.deviceID != written.deviceID)
        #expect(try devices() == recorded())
        let tree = try Self.tree(store, "c")
        #expect(tree["etc/changed"] == .some("after") && tree["etc/kept"] == .some("old content") && tree["etc/added"] == .some("new"))
        #expect(tree["big"] == .some("\(4 << 20) bytes"))
        let image = try #require(try store.layer("image")).deviceID
        open = false
        #expect(try LayerStoreTests.dumpedDevices(store) == [store.base.deviceID, image, replaced.deviceID])
        #expect(try Oracle.check(try store.poolRoot.config().metadata))
    }

    /// Every path under layer `id`, with a regular file's bytes as text (nil for a directory).
    static func tree(_ store: LayerStore, _ id: String) throws -> [String: String?] {
        let open = try store.openLayer(id, readOnly: true, what: "test")
        defer { try? open.close() }
        let v = open.volume
        var found: [String: String?] = [:]
        func walk(_ ino: UInt64, _ prefix: String) throws {
            for name in try v.readdirNames(ino) where !(prefix.isEmpty && name == "lost+found") {
                let attr = try v.lookup(parent: ino, name: name)
                let path = prefix + name
                if attr.mode & 0o170000 == 0o040000 {
                    found[path] = .some(nil)
                    try walk(attr.ino, path + "/")
                } else if attr.size > 4096 {
                    found[path] = "\(attr.size) bytes"
                } else {
                    var bytes = [UInt8](repeating: 0, count: Int(attr.size))
                    let n = try bytes.withUnsafeMutableBytes { try v.read(attr.ino, at: 0, into: $0) }
                    found[path] = String(decoding: bytes[0..<n], as: UTF8.self)
                }
            }
        }
        try walk(v.rootInode, "")
        return found
    }

    /// The content API the writers share: while a new layer's `body` runs the layer is `applying`,
    /// and nothing can mount, snapshot or re-create it; a `body` that throws removes it; one that
    /// returns leaves it active with what it wrote. An existing layer being rewritten stays active
    /// and busy; `apply-diff` of a tar that fails part way leaves it as it was.
    @Test func contentWritersMarkTheLayerCompleteOnlyWhenItIs() throws {
        let dir = TempDir()
        let options = try StorageOptions(parsing: ["dm.basesize=64M", "dm.loopdatasize=512M", "dm.loopmetadatasize=16M"])
        let store = try LayerStore.initialize(root: dir.path + "/store", options: options, logger: quietLogger)
        defer { try? store.close() }

        struct Refused: Error {}
        #expect(throws: Refused.self) {
            try store.createImageLayer("failed", parent: nil, what: "test") { volume in
                _ = try volume.mkdir(parent: volume.rootInode, name: "half", mode: 0o755, owner: .root)
                throw Refused()
            }
        }
        #expect(try store.layer("failed") == nil, "a writer that threw left its layer")

        try store.createImageLayer("good", parent: nil, what: "test") { volume in
            #expect(try store.layer("good")?.state == .applying)
            #expect(throws: LayerStore.Error.incomplete("good")) { try store.openLayer("good", readOnly: true, what: "reader") }
            #expect(throws: LayerStore.Error.incomplete("good")) { try store.createImageLayer("child", parent: "good") }
            #expect(throws: LayerStore.Error.layerExists("good", state: .applying)) { try store.createImageLayer("good", parent: nil) }
            _ = try volume.mkdir(parent: volume.rootInode, name: "done", mode: 0o755, owner: .root)
        }
        #expect(try store.layer("good")?.state == .active)
        let open = try store.openLayer("good", readOnly: true, what: "test")
        #expect(throws: Never.self) { try open.volume.lookup(parent: open.volume.rootInode, name: "done") }
        try open.close()

        // An existing layer being rewritten stays active with its old content and busy: nothing
        // reads, snapshots or removes it until the write ends; then it has what was written.
        func busy(_ attempt: () throws -> Void) -> Bool {
            do { try attempt() } catch LayerStore.Error.busy(let id, _) { return id == "good" } catch { return false }
            return false
        }
        try store.writeContent("good", what: "rewrite") { volume in
            #expect(try store.layer("good")?.state == .active)
            #expect(busy { _ = try store.openLayer("good", readOnly: true, what: "reader") })
            #expect(busy { _ = try store.createImageLayer("child", parent: "good") })
            #expect(busy { _ = try store.remove("good") })
            _ = try volume.mkdir(parent: volume.rootInode, name: "rewritten", mode: 0o755, owner: .root)
        }
        #expect(try store.layer("child") == nil)

        // A tar whose second entry is refused ('..'): the layer it was applied to keeps its content
        // (this asserted the layer was removed until apply-diff wrote through a scratch snapshot).
        let tar = dir.path + "/bad.tar"
        try PyTar.make(tar, """
        reg("ok", b"fine")
        reg("../escape", b"no")
        """)
        let target = try store.createImageLayer("target", parent: "good")
        #expect(throws: LayerApplier.Error.self) { try store.applyDiff("target", from: tar) }
        let after = try #require(try store.layer("target"), "the layer a failed apply-diff was applied to went")
        #expect(after.deviceID == target.deviceID && after.state == .active)
        let kept = try store.openLayer("target", readOnly: true, what: "test")
        #expect(try kept.volume.readdirNames(kept.volume.rootInode).filter { $0 != "lost+found" } == ["done", "rewritten"])
        try kept.close()
    }

    /// A scratch directory an import holds (a lock on it) is kept at store open; one nobody holds
    /// (left by a killed import) is removed.
    @Test func storeOpenRemovesUnpackDirectoriesNobodyHolds() throws {
        let dir = TempDir()
        let root = dir.path + "/store"
        try initStore(root)
        let stale = root + "/tmp/thinfs-image-stale", held = root + "/tmp/thinfs-image-held"
        for d in [stale, held] {
            try FileManager.default.createDirectory(atPath: d + "/blobs", withIntermediateDirectories: true)
            try Data(repeating: 7, count: 4096).write(to: URL(fileURLWithPath: d + "/blobs/layer.tar"))
        }
        // An import in progress holds its directory locked (flock), as long as it uses it.
        let fd = open(held, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        try #require(fd >= 0)
        defer { close(fd) }
        try #require(flock(fd, LOCK_SH) == 0)

        let store = try LayerStore.open(root: root, logger: quietLogger)
        try store.close()
        #expect(!FileManager.default.fileExists(atPath: stale), "the stale unpack directory is still there")
        #expect(FileManager.default.fileExists(atPath: held + "/blobs/layer.tar"), "the held unpack directory was removed")
    }

    /// Issue 10: a docker save archive was unpacked in full before its manifest was read: a small
    /// compressed archive with a large file no manifest names wrote all of it to the scratch directory.
    @Test func dockerArchiveUnpacksOnlyWhatTheManifestNames() throws {
        let dir = TempDir()
        let junk = 256 << 20
        let made = try TestImage.make(dir.path + "/image", files: [(name: "etc/hello", size: 4096, seed: 1)],
                                      gzip: true, junk: junk)
        let archiveSize = try #require(try FileManager.default.attributesOfItem(atPath: made.docker)[.size] as? NSNumber).intValue
        #expect(archiveSize < junk / 64, "the archive should be small: \(archiveSize) bytes")
        let scratch = dir.path + "/scratch"
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)

        // Peak use of the scratch directory while the source is open, sampled, and what it holds then.
        let peak = Shared<UInt64>(0)
        let done = Shared(false)
        let sampler = Thread {
            while !done.withLock({ $0 }) {
                let used = Self.bytesUnder(scratch)
                peak.withLock { $0 = max($0, used) }
                usleep(1_000)
            }
        }
        sampler.start()
        var source: ImageSource? = try ImageSource(path: made.docker, temporaryDirectory: scratch, logger: quietLogger)
        let held = Self.bytesUnder(scratch)
        #expect(try source?.verify(try #require(source?.layers.first)) != nil)
        source = nil
        done.withLock { $0 = true }
        while sampler.isExecuting { usleep(1_000) }
        let layerSize = try #require(try FileManager.default.attributesOfItem(atPath: made.dir + "/layer.tar")[.size] as? NSNumber).uint64Value
        // The layer tar and the config: a few KiB beyond the layer, not the 256 MiB of zeros.
        #expect(held < layerSize + (1 << 20), "the scratch directory holds \(held) bytes")
        #expect(peak.withLock { $0 } < layerSize + (1 << 20), "the scratch directory peaked at \(peak.withLock { $0 }) bytes")
        #expect(Self.bytesUnder(scratch) == 0, "the source left files in its scratch directory")
    }

    /// The two reads need the archive twice: one that comes through a pipe is copied (as it comes)
    /// first. A layer.tar named through a symlink is unpacked once, where the link points.
    @Test func dockerArchiveThroughAPipeAndThroughALink() throws {
        let dir = TempDir()
        let made = try TestImage.make(dir.path + "/image", files: [(name: "etc/hello", size: 4096, seed: 1)], gzip: true, link: true)
        let fifo = dir.path + "/pipe"
        try #require(mkfifo(fifo, 0o600) == 0)
        let bytes = try Data(contentsOf: URL(fileURLWithPath: made.docker))
        Thread.detachNewThread {
            // Blocks until the source opens the pipe for reading.
            if let h = FileHandle(forWritingAtPath: fifo) {
                try? h.write(contentsOf: bytes)
                try? h.close()
            }
        }
        let scratch = dir.path + "/scratch"
        let source = try ImageSource(path: fifo, temporaryDirectory: scratch, logger: quietLogger)
        let layer = try #require(source.layers.first)
        #expect(source.layers.count == 1 && layer.diffID == made.diffID)
        #expect(layer.path.hasSuffix("/" + made.diffID.dropFirst(7) + "/layer.tar"), "\(layer.path)")
        #expect(try source.verify(layer) > 0)
        // What is left: the layer and the config; the pipe's copy is gone.
        var files: [String] = []
        let e = FileManager.default.enumerator(atPath: scratch)
        while let relative = e?.nextObject() as? String {
            var st = stat()
            if lstat(scratch + "/" + relative, &st) == 0, st.st_mode & S_IFMT == S_IFREG { files.append(relative) }
        }
        #expect(files.count == 2 && files.contains { $0.hasSuffix("/layer.tar") } && files.contains { $0.hasSuffix(".json") },
                "\(files.sorted())")
    }

    /// The named files' sizes (from the tar headers) are checked against the scratch directory's
    /// free space before anything is written: a 4 MiB layer does not fit a 1 MiB tmpfs.
    @Test(.enabled(if: getuid() == 0, "mounting a tmpfs needs root"))
    func dockerArchiveThatDoesNotFitIsRefusedBeforeWriting() throws {
        let dir = TempDir()
        let made = try TestImage.make(dir.path + "/image", files: [(name: "big", size: 4 << 20, seed: 2)])
        let small = dir.path + "/small"
        try FileManager.default.createDirectory(atPath: small, withIntermediateDirectories: true)
        let mounted = try Oracle.run("/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", small])
        try #require(mounted.status == 0, "\(mounted.stderr)")
        defer { _ = try? Oracle.run("/bin/umount", [small]) }
        do {
            _ = try ImageSource(path: made.docker, temporaryDirectory: small, logger: quietLogger)
            Issue.record("a 4 MiB layer was unpacked into a 1 MiB tmpfs")
        } catch let error as ImageSource.Error {
            guard case .noRoom(let archive, _, let needed, _) = error else { Issue.record("\(error)"); return }
            #expect(archive == made.docker && needed > 4 << 20, "\(error)")
        }
        #expect(Self.bytesUnder(small) == 0)
    }

    /// Apparent size of every regular file under `path`.
    static func bytesUnder(_ path: String) -> UInt64 {
        guard let e = FileManager.default.enumerator(atPath: path) else { return 0 }
        var total: UInt64 = 0
        while let relative = e.nextObject() as? String {
            var st = stat()
            if lstat(path + "/" + relative, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG { total += UInt64(st.st_size) }
        }
        return total
    }

    /// How a layout's blob is not a regular file inside it.
    enum Hostile: String, CaseIterable, Sendable {
        /// A FIFO as the layer blob: opening it blocked until a writer came, forever.
        case fifoLayer
        /// A FIFO as the config blob, read when the image is opened.
        case fifoConfig
        /// A character device (1:3, /dev/null's numbers) as the layer blob.
        case deviceLayer
        /// A symlink out of the layout, to a copy of the right bytes (so digests match).
        case symlinkOut
    }

    /// Issue 10: an OCI layout whose blob is a FIFO hung the import; a device or a symlink out of the
    /// layout was read too. Each must be refused with an error naming the blob, without blocking.
    @Test(arguments: Hostile.allCases)
    func blobsThatAreNotRegularFilesAreRefused(_ hostile: Hostile) throws {
        if hostile == .deviceLayer, getuid() != 0 { return }   // mknod of a device needs root
        let dir = TempDir()
        let made = try TestImage.make(dir.path + "/image", files: [(name: "etc/hello", size: 4096, seed: 1)], oci: true)
        let target = hostile == .fifoConfig ? made.configBlob : made.layerBlob
        let outside = dir.path + "/outside"
        if hostile == .symlinkOut { try FileManager.default.copyItem(atPath: target, toPath: outside) }
        try FileManager.default.removeItem(atPath: target)
        switch hostile {
        case .fifoLayer, .fifoConfig: try #require(mkfifo(target, 0o644) == 0)
        case .deviceLayer: #expect(mknod(target, S_IFCHR | 0o644, dev_t((1 << 8) | 3)) == 0)   // 1:3, /dev/null's numbers
        case .symlinkOut: try FileManager.default.createSymbolicLink(atPath: target, withDestinationPath: outside)
        }

        // Open and verify on another thread: a hang fails the test after 20 s instead of hanging the suite.
        let result = Shared<Result<Void, any Error>?>(nil)
        let finished = DispatchSemaphore(value: 0)
        let path = made.oci
        Thread.detachNewThread {
            result.withLock {
                $0 = Result {
                    let source = try ImageSource(path: path, logger: quietLogger)
                    for layer in source.layers { try source.verify(layer) }
                }
            }
            finished.signal()
        }
        if finished.wait(timeout: .now() + 20) == .timedOut {
            // Release the blocked reader: a writer that opens and closes gives it end of file.
            let w = open(target, O_WRONLY | O_NONBLOCK)
            if w >= 0 { close(w) }
            _ = finished.wait(timeout: .now() + 20)
            Issue.record("opening the layout blocked on \(target)")
            return
        }
        switch result.withLock({ $0 }) {
        case .failure(let error as ImageSource.Error):
            #expect("\(error)".contains(target), "\(error)")
            #expect("\(error)".contains("not a regular file"), "not refused as a non-regular blob: \(error)")
        case .failure(let error): Issue.record("unexpected error: \(error)")
        case .success: Issue.record("a layout with \(hostile) was accepted")
        case nil: Issue.record("no result")
        }
    }
}
