import Crypto
import Foundation
import PersistentData
import TestSupport
import Testing
@testable import ThinFS

/// `thinfs import-docker` without Docker and without the kernel: a Docker loop-lvm directory is
/// built by the userspace engine (pool files where Docker keeps them, moby's device files and
/// its transaction protocol), imported, and read back. DOCKERDM must be byte-identical afterwards.
@Suite("Docker import", .enabled(if: Oracle.available, "thin-provisioning-tools are not installed"))
struct DockerImportTests {
    /// A Docker devicemapper directory as Docker 17-24 left it with loop-lvm, made here.
    ///
    ///     device 1  base        ext4, initialized
    ///     device 2  A           image layer: /etc/hello "A", /bin/tool
    ///     device 3  B           image layer on A: /etc/hello "B", /etc/gone removed
    ///     device 4  C-init      container init on B: /etc/hostname
    ///     device 5  C           container on C-init: /data/log
    ///     device 6  D           on B, marked deleted (deferred deletion pending)
    ///     device 7  E           on B, created in transaction 7 that never closed (pool at 6)
    struct Fixture {
        let dir = TempDir()
        var docker: String { dir.path + "/docker" }
        var dm: String { docker + "/devicemapper" }
        var store: String { dir.path + "/store" }
        let baseSize: UInt64 = 64 << 20
        var baseUUID = ""
        let hash: [String: String] = {
            var h: [String: String] = [:]
            for name in ["A", "B", "C", "D", "E"] { h[name] = Fixture.hex(32) }
            h["C-init"] = h["C"]! + "-init"
            return h
        }()
        let chain = (a: Fixture.hex(32), b: Fixture.hex(32))
        let container = Fixture.hex(32)

        static func hex(_ bytes: Int) -> String {
            (0..<bytes).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
        }

        init(layerDB: Bool = false) throws {
            let fm = FileManager.default
            try fm.createDirectory(atPath: dm + "/devicemapper", withIntermediateDirectories: true)
            try fm.createDirectory(atPath: dm + "/metadata", withIntermediateDirectories: true)
            // Docker's loop-lvm: 64K blocks, skip_block_zeroing; smaller files than its 100G/2G.
            let pool = try UserspaceThinPool.create(dataPath: dm + "/devicemapper/data", metadataPath: dm + "/devicemapper/metadata",
                                                    dataSize: 256 << 20, metadataSize: 8 << 20, blockSize: 64 << 10,
                                                    options: .init(blockZeroing: false, atomicCommit: false), logger: quietLogger)
            var tx: UInt64 = 0
            func closeTransaction() throws {
                try pool.message(.setTransactionID(current: tx, new: tx + 1))
                tx += 1
            }
            try pool.message(.createThin(1))
            baseUUID = try DeviceFormatter(logger: quietLogger).format(pool: pool, id: 1, size: baseSize,
                                                                       scratchDirectory: dir.path + "/scratch").uuid
            try closeTransaction()
            try writeDevice("base", id: 1, tx: tx, initialized: true)

            func snapshot(_ name: String, id: UInt32, of origin: UInt32, _ body: (Volume) throws -> Void) throws {
                try pool.message(.createSnap(id, origin: origin))
                let v = try Volume(device: pool.openDevice(id, size: baseSize), readOnly: false, logger: quietLogger)
                try body(v)
                try v.close()
                try pool.commit()
            }
            try snapshot("A", id: 2, of: 1) { v in
                let etc = try v.mkdir(parent: v.rootInode, name: "etc", mode: 0o755, owner: .root)
                try Self.write(v, etc.ino, "hello", "A\n")
                try Self.write(v, etc.ino, "gone", "doomed\n")
                let bin = try v.mkdir(parent: v.rootInode, name: "bin", mode: 0o755, owner: .root)
                try Self.write(v, bin.ino, "tool", String(repeating: "tool bytes ", count: 20_000), mode: 0o100755)
            }
            try closeTransaction()
            try writeDevice(hash["A"]!, id: 2, tx: tx)
            try snapshot("B", id: 3, of: 2) { v in
                let etc = try v.lookup(parent: v.rootInode, name: "etc")
                try v.unlink(parent: etc.ino, name: "hello")
                try Self.write(v, etc.ino, "hello", "B\n")
                try v.unlink(parent: etc.ino, name: "gone")
            }
            try closeTransaction()
            try writeDevice(hash["B"]!, id: 3, tx: tx)
            try snapshot("C-init", id: 4, of: 3) { v in
                try Self.write(v, try v.lookup(parent: v.rootInode, name: "etc").ino, "hostname", "container\n")
            }
            try closeTransaction()
            try writeDevice(hash["C-init"]!, id: 4, tx: tx)
            try snapshot("C", id: 5, of: 4) { v in
                let data = try v.mkdir(parent: v.rootInode, name: "data", mode: 0o700, owner: .root)
                try Self.write(v, data.ino, "log", "written by the container\n")
            }
            try closeTransaction()
            try writeDevice(hash["C"]!, id: 5, tx: tx)
            try snapshot("D", id: 6, of: 3) { _ in }
            try closeTransaction()
            try writeDevice(hash["D"]!, id: 6, tx: tx, deleted: true)
            // Docker's open transaction: transaction-metadata, the message, the device file, and no
            // set_transaction_id (the daemon died there).
            try Data(#"{"open_transaction_id":\#(tx + 1),"device_hash":"\#(hash["E"]!)","device_id":7}"#.utf8)
                .write(to: URL(fileURLWithPath: dm + "/metadata/transaction-metadata"))
            try pool.message(.createSnap(7, origin: 3))
            try writeDevice(hash["E"]!, id: 7, tx: tx + 1)
            try pool.close()
            try Data(#"{"next_device_id":7,"BaseDeviceUUID":"\#(baseUUID)","BaseDeviceFilesystem":"ext4"}"#.utf8)
                .write(to: URL(fileURLWithPath: dm + "/metadata/deviceset-metadata"))
            // One of writeMetaFile's temporary files, left by a crash: Docker skips it, so must we.
            try Data("{".utf8).write(to: URL(fileURLWithPath: dm + "/metadata/.tmp123456"))

            if layerDB {
                let db = docker + "/image/devicemapper/layerdb"
                try field(db + "/sha256/\(chain.a)", "cache-id", hash["A"]!)
                try field(db + "/sha256/\(chain.a)", "diff", "sha256:" + Self.hex(32))
                try field(db + "/sha256/\(chain.b)", "cache-id", hash["B"]!)
                try field(db + "/sha256/\(chain.b)", "parent", "sha256:\(chain.a)")
                try field(db + "/mounts/\(container)", "mount-id", hash["C"]!)
                try field(db + "/mounts/\(container)", "init-id", hash["C-init"]!)
                try field(db + "/mounts/\(container)", "parent", "sha256:\(chain.b)")
            }
        }

        /// moby's `saveMetadata`: json.Marshal of devInfo, no newline.
        func writeDevice(_ name: String, id: UInt32, tx: UInt64, initialized: Bool = false, deleted: Bool = false) throws {
            let size = baseSize
            try Data(#"{"device_id":\#(id),"size":\#(size),"transaction_id":\#(tx),"initialized":\#(initialized),"deleted":\#(deleted)}"#.utf8)
                .write(to: URL(fileURLWithPath: dm + "/metadata/" + name))
        }

        func field(_ dir: String, _ name: String, _ value: String) throws {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try Data(value.utf8).write(to: URL(fileURLWithPath: dir + "/" + name))
        }

        static func write(_ v: Volume, _ dir: UInt64, _ name: String, _ text: String, mode: UInt32 = 0o100644) throws {
            let f = try v.mknod(parent: dir, name: name, mode: mode, rdev: 0, owner: .root)
            _ = try Array(text.utf8).withUnsafeBytes { try v.write(f.ino, at: 0, from: $0) }
        }

        /// sha256 of every file under the Docker directory, by path.
        func digests() throws -> [String: String] {
            var out: [String: String] = [:]
            let e = FileManager.default.enumerator(atPath: docker)!
            while let relative = e.nextObject() as? String {
                let path = docker + "/" + relative
                var isDir: ObjCBool = false
                guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir), !isDir.boolValue else { continue }
                let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
                var hasher = SHA256()
                while let chunk = try handle.read(upToCount: 4 << 20), !chunk.isEmpty { hasher.update(data: chunk) }
                try handle.close()
                out[relative] = hasher.finalize().map { String(format: "%02x", $0) }.joined()
            }
            return out
        }
    }

    static func contents(_ store: LayerStore, _ layer: String, _ path: String) throws -> String? {
        let open = try store.openLayer(layer, readOnly: true, what: "test")
        defer { try? open.close() }
        let v = open.volume
        var ino = v.rootInode
        for part in path.split(separator: "/") {
            do { ino = try v.lookup(parent: ino, name: String(part)).ino } catch { return nil }
        }
        let size = try v.getattr(ino).size
        var bytes = [UInt8](repeating: 0, count: Int(size))
        _ = try bytes.withUnsafeMutableBytes { try v.read(ino, at: 0, into: $0) }
        return String(decoding: bytes, as: UTF8.self)
    }

    @Test func importsLoopLVMDevicesAsReadOnlyLayers() throws {
        let f = try Fixture()
        let before = try f.digests()
        // data, metadata, 7 device files, deviceset-metadata, transaction-metadata, the .tmp file
        #expect(before.count == 12, "\(before.keys.sorted())")
        let report = try DockerImport.run(deviceSetRoot: f.dm, root: f.store, logger: quietLogger)
        let store = try #require(report.store)
        let h = f.hash

        // Without the layer database: device hashes, a container known by its -init sibling.
        let layers = try store.allLayers()
        #expect(Set(layers.map(\.id)) == Set([h["A"]!, h["B"]!, h["C-init"]!, h["C"]!]))
        let byID = Dictionary(uniqueKeysWithValues: layers.map { ($0.id, $0) })
        #expect(byID[h["A"]!]?.deviceID == 2 && byID[h["B"]!]?.deviceID == 3 && byID[h["C"]!]?.deviceID == 5)
        #expect(byID[h["C"]!]?.parent == h["C-init"]! && byID[h["C"]!]?.kind == .container)
        #expect(byID[h["A"]!]?.parent == nil && byID[h["B"]!]?.parent == nil)
        #expect(layers.allSatisfy { $0.size == f.baseSize && $0.uuid == f.baseUUID })
        #expect(store.base.deviceID == 1 && store.base.uuid == f.baseUUID && store.base.size == f.baseSize)

        // The deleted device and the one in the unfinished transaction are left out, and said so.
        let skipped = Dictionary(uniqueKeysWithValues: report.plan.skipped.map { ($0.hash, $0) })
        #expect(skipped.count == 2)
        #expect(skipped[h["D"]!]?.reason.contains("deleted") == true && skipped[h["D"]!]?.deviceID == 6)
        #expect(skipped[h["E"]!]?.reason.contains("unfinished transaction 7") == true && skipped[h["E"]!]?.deviceID == 7)
        #expect(report.plan.poolTransactionID == 6)
        #expect(report.plan.notes.contains { $0.contains("no layer database") })

        // Each layer reads what was written into it, and not its children's changes.
        #expect(try Self.contents(store, h["A"]!, "etc/hello") == "A\n")
        #expect(try Self.contents(store, h["A"]!, "etc/gone") == "doomed\n")
        #expect(try Self.contents(store, h["B"]!, "etc/hello") == "B\n")
        #expect(try Self.contents(store, h["B"]!, "etc/gone") == nil)
        #expect(try Self.contents(store, h["B"]!, "bin/tool") == String(repeating: "tool bytes ", count: 20_000))
        #expect(try Self.contents(store, h["C"]!, "etc/hostname") == "container\n")
        #expect(try Self.contents(store, h["C"]!, "data/log") == "written by the container\n")
        #expect(try Self.contents(store, h["C-init"]!, "data/log") == nil)

        // Nothing may be written: each refusal names the layer.
        for (what, body) in [("rm", { _ = try store.remove(h["C"]!) }),
                             ("create", { _ = try store.createImageLayer("new", parent: h["B"]!) }),
                             ("create-rw", { _ = try store.createContainerLayer("new", parent: h["B"]!, size: nil) }),
                             ("open read-write", { _ = try store.openLayer(h["C"]!, readOnly: false, what: "test") })] as [(String, () throws -> Void)] {
            do {
                try body()
                Issue.record("\(what) on an imported store succeeded")
            } catch {
                #expect("\(error)".contains("read-only"), "\(what): \(error)")
                #expect("\(error)".contains(h["C"]!) || "\(error)".contains(h["B"]!) || "\(error)".contains("new"), "\(what): \(error)")
            }
        }
        #expect(try store.allLayers().count == 4)

        // The diff of the container against its init layer is exactly what the container wrote
        // (and the root directory, whose times changed).
        let tar = f.dir.path + "/c.tar"
        try store.diff(h["C"]!, to: tar)
        let listing = try Oracle.run("/usr/bin/tar", ["-tf", tar])
        #expect(Set(listing.stdout.split(separator: "\n").map(String.init)) == ["./", "data/", "data/log"], "\(listing.stdout)")
        try store.close()

        // Reopened, the store is the same; Docker's files never changed.
        let again = try LayerStore.open(root: f.store, logger: quietLogger)
        #expect(try again.allLayers().map(\.id).sorted() == layers.map(\.id).sorted())
        #expect(try Self.contents(again, h["B"]!, "etc/hello") == "B\n")
        try again.close()
        #expect(try f.digests() == before)
        #expect(try Oracle.check(f.dm + "/devicemapper/metadata"))
    }

    @Test func layerDatabaseNamesLayersAndParents() throws {
        let f = try Fixture(layerDB: true)
        let before = try f.digests()
        let report = try DockerImport.run(deviceSetRoot: f.dm, root: f.store, logger: quietLogger)
        let store = try #require(report.store)
        defer { try? store.close() }
        let layers = Dictionary(uniqueKeysWithValues: try store.allLayers().map { ($0.id, $0) })
        let a = "sha256:\(f.chain.a)", b = "sha256:\(f.chain.b)", c = f.container
        #expect(Set(layers.keys) == [a, b, c + "-init", c])
        #expect(layers[a]?.parent == nil && layers[a]?.deviceID == 2)
        #expect(layers[b]?.parent == a && layers[b]?.deviceID == 3 && layers[b]?.kind == .image)
        #expect(layers[c + "-init"]?.parent == b && layers[c + "-init"]?.kind == .image)
        #expect(layers[c]?.parent == c + "-init" && layers[c]?.kind == .container && layers[c]?.deviceID == 5)
        #expect(report.plan.layerDB == f.docker + "/image/devicemapper/layerdb")
        // Parents come first, as a store lists them.
        let order = report.plan.layers.map(\.id)
        #expect(order == [a, b, c + "-init", c])
        #expect(try Self.contents(store, b, "etc/hello") == "B\n")

        // B's diff against its parent A: the new hello and the whiteout of etc/gone.
        let tar = f.dir.path + "/b.tar"
        try store.diff(b, to: tar)
        let listing = Set(try Oracle.run("/usr/bin/tar", ["-tf", tar]).stdout.split(separator: "\n").map(String.init))
        #expect(listing == ["./", "etc/", "etc/hello", "etc/.wh.gone"], "\(listing)")
        try store.close()
        #expect(try f.digests() == before)
    }

    @Test(.enabled(if: CLI.available, "needs the built thinfs binary"))
    func theCLIImportsListsAndRefuses() throws {
        let f = try Fixture(layerDB: true)
        let before = try f.digests()
        let dry = try CLI.run(["import-docker", "--root", f.store, f.dm, "--dry-run"])
        #expect(dry.status == 0, "\(dry.stderr)")
        #expect(dry.stdout.contains("would import 4 layers") && !LayerStore.exists(at: f.store))
        let r = try CLI.run(["import-docker", "--root", f.store, f.dm])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("imported 4 layers"), "\(r.stdout)")
        #expect(r.stdout.contains("skipped 2 devices") && r.stdout.contains(f.hash["D"]!) && r.stdout.contains(f.hash["E"]!), "\(r.stdout)")
        let ls = try CLI.run(["layer", "ls", "--root", f.store, "--json"])
        #expect(ls.status == 0, "\(ls.stderr)")
        #expect(ls.stdout.contains("sha256:\(f.chain.b)") && ls.stdout.contains(f.container), "\(ls.stdout)")
        let info = try CLI.run(["info", "--root", f.store])
        #expect(info.status == 0, "\(info.stderr)")
        let rm = try CLI.run(["layer", "rm", "--root", f.store, f.container])
        #expect(rm.status != 0 && rm.stderr.contains(f.container) && rm.stderr.contains("read-only"), "\(rm.stderr)")
        // A second import into the same root is refused; so is a root inside Docker's directory.
        let twice = try CLI.run(["import-docker", "--root", f.store, f.dm])
        #expect(twice.status != 0 && twice.stderr.contains("already"), "\(twice.stderr)")
        let inside = try CLI.run(["import-docker", "--root", f.dm + "/thinfs", f.dm])
        #expect(inside.status != 0 && inside.stderr.contains("inside"), "\(inside.stderr)")
        #expect(try f.digests() == before)
    }

    /// Each bad input is refused with an error naming the file at fault, and nothing is created.
    /// (16 cases.)
    @Test(arguments: [
        // (what to break, the file the error must name, text it must contain)
        ("not json", "metadata/B", "not JSON"),
        ("device_id not a number", "metadata/B", "device_id"),
        ("device_id beyond 24 bits", "metadata/B", "24-bit"),
        ("device not in the pool", "metadata/B", "not in the pool"),
        ("size zero", "metadata/B", "is zero"),
        ("a layer's size below its filesystem", "metadata/B", "smaller than the ext4"),
        ("size below the filesystem", "metadata/base", "smaller than the ext4"),
        ("two files, one device", "metadata/A", "more than one metadata file"),
        ("base UUID mismatch", "metadata/deviceset-metadata", "another pool"),
        ("xfs", "metadata/deviceset-metadata", "ext4 only"),
        ("no base", "metadata/base", "does not exist"),
        ("base uninitialized", "metadata/base", "never initialized"),
        ("base never committed", "metadata/base", "never completed"),
        ("no metadata directory", "metadata", "does not exist"),
        ("no pool files", "devicemapper/data", "loop-lvm"),
        ("Docker before 1.7", "devicemapper/json", "before 1.7"),
    ])
    func badInputIsNamed(_ breakage: String, _ file: String, _ text: String) throws {
        let f = try Fixture()
        let h = f.hash
        let md = f.dm + "/metadata/"
        func put(_ name: String, _ json: String) throws { try Data(json.utf8).write(to: URL(fileURLWithPath: md + name)) }
        switch breakage {
        case "not json": try put(h["B"]!, "device 3, 64M")
        case "device_id not a number": try put(h["B"]!, #"{"device_id":"three","size":67108864}"#)
        case "device_id beyond 24 bits": try put(h["B"]!, #"{"device_id":16777216,"size":67108864}"#)
        case "device not in the pool": try put(h["B"]!, #"{"device_id":99,"size":67108864,"transaction_id":3}"#)
        case "size zero": try put(h["B"]!, #"{"device_id":3,"size":0,"transaction_id":3}"#)
        case "a layer's size below its filesystem": try put(h["B"]!, #"{"device_id":3,"size":1048576,"transaction_id":3}"#)
        case "size below the filesystem":
            try put("base", #"{"device_id":1,"size":1048576,"transaction_id":1,"initialized":true}"#)
        case "two files, one device": try put(h["A"]!, #"{"device_id":3,"size":67108864,"transaction_id":2}"#)
        case "base UUID mismatch":
            try put("deviceset-metadata", #"{"next_device_id":7,"BaseDeviceUUID":"\#(UUID().uuidString.lowercased())","BaseDeviceFilesystem":"ext4"}"#)
        case "xfs": try put("deviceset-metadata", #"{"next_device_id":7,"BaseDeviceUUID":"\#(f.baseUUID)","BaseDeviceFilesystem":"xfs"}"#)
        case "no base": try FileManager.default.removeItem(atPath: md + "base")
        case "base uninitialized": try put("base", #"{"device_id":1,"size":67108864,"transaction_id":1,"initialized":false}"#)
        case "base never committed": try put("base", #"{"device_id":1,"size":67108864,"transaction_id":9,"initialized":true}"#)
        case "no metadata directory": try FileManager.default.removeItem(atPath: md)
        case "no pool files": try FileManager.default.removeItem(atPath: f.dm + "/devicemapper/data")
        case "Docker before 1.7":
            try FileManager.default.removeItem(atPath: md)
            try Data(#"{"Devices":{}}"#.utf8).write(to: URL(fileURLWithPath: f.dm + "/devicemapper/json"))
        default: Issue.record("unknown case \(breakage)")
        }
        let named = f.dm + "/" + file.replacingOccurrences(of: "/B", with: "/" + h["B"]!).replacingOccurrences(of: "/A", with: "/" + h["A"]!)
        let before = try f.digests()
        do {
            _ = try DockerImport.run(deviceSetRoot: f.dm, root: f.store, logger: quietLogger)
            Issue.record("\(breakage): the import succeeded")
        } catch {
            #expect("\(error)".contains(named), "\(breakage): \(error)")
            #expect("\(error)".contains(text), "\(breakage): \(error)")
        }
        #expect(!LayerStore.exists(at: f.store), "\(breakage): a store was created")
        #expect(try f.digests() == before, "\(breakage): Docker's files changed")
    }

    /// Loop files still attached to a loop device: the kernel's pool may be ahead of the metadata
    /// file, so the import is refused, naming the file and the loop device (sysfs faked here).
    @Test func anAttachedPoolIsRefused() throws {
        let f = try Fixture()
        let sys = f.dir.path + "/sys-block"
        for (name, backing) in [("loop0", "/somewhere/else"), ("loop7", f.dm + "/devicemapper/metadata"), ("sda", "")] {
            try FileManager.default.createDirectory(atPath: "\(sys)/\(name)/loop", withIntermediateDirectories: true)
            if !backing.isEmpty { try Data((backing + "\n").utf8).write(to: URL(fileURLWithPath: "\(sys)/\(name)/loop/backing_file")) }
        }
        let set = try DockerDeviceSet(root: f.dm)
        #expect(throws: DockerImport.Error.poolActive(file: f.dm + "/devicemapper/metadata", loopDevice: "/dev/loop7")) {
            _ = try DockerImport.openPool(set, thinPool: nil, sysBlock: sys, control: FakeDeviceMapper(), logger: quietLogger)
        }
        // Detached (no backing file left), the same files open.
        try FileManager.default.removeItem(atPath: "\(sys)/loop7/loop/backing_file")
        let (pool, source) = try DockerImport.openPool(set, thinPool: nil, sysBlock: sys, control: FakeDeviceMapper(), logger: quietLogger)
        #expect(source == .loopFiles(data: f.dm + "/devicemapper/data", metadata: f.dm + "/devicemapper/metadata"))
        #expect(try pool.deviceExists(5) && !(try pool.deviceExists(8)))
        try pool.close()
    }

    /// direct-lvm (--thinpool): a Docker device still active on the pool (Docker, or a container of
    /// it, is running) is refused, naming the dm device and its metadata file. device-mapper is faked.
    @Test func aRunningDockerIsRefusedOnAKernelPool() throws {
        let f = try Fixture()
        let set = try DockerDeviceSet(root: f.dm)
        let dm = FakeDeviceMapper()
        dm.addPool("docker-thinpool", table: ThinPoolTable(metadataDevice: "253:0", dataDevice: "253:1", dataSectors: 524_288, blockSectors: 128))
        for id in 1...5 { _ = try dm.message("docker-thinpool", sector: 0, "create_thin \(id)") }
        let (pool, source) = try DockerImport.openPool(set, thinPool: "docker-thinpool", sysBlock: "/nonexistent", control: dm, logger: quietLogger)
        #expect(source == .kernel(poolName: "docker-thinpool") && (pool as? KernelThinPool)?.readOnly == true)
        let container = "docker-8:1-4242-" + f.hash["C"]!
        try dm.create(container, table: [DeviceMapperTarget(start: 0, length: 131_072, type: "thin", params: "/dev/mapper/docker-thinpool 5")], readOnly: false)
        #expect(throws: DockerImport.Error.dockerDeviceActive(container, file: f.dm + "/metadata/" + f.hash["C"]!)) {
            _ = try DockerImport.openPool(set, thinPool: "docker-thinpool", sysBlock: "/nonexistent", control: dm, logger: quietLogger)
        }
        #expect(!dm.calls.contains { $0.hasPrefix("message") && !$0.contains("create_thin") }, "a message was sent: \(dm.calls)")
    }

    @Test func deviceFilesDecodeAsGoDoes() throws {
        let dir = TempDir()
        try FileManager.default.createDirectory(atPath: dir.path + "/metadata", withIntermediateDirectories: true)
        func put(_ name: String, _ json: String) throws {
            try Data(json.utf8).write(to: URL(fileURLWithPath: dir.path + "/metadata/" + name))
        }
        // An old Docker's base file: no "deleted" (Go's zero value, false); a file Docker marked migrated; a temp file.
        try put("base", #"{"device_id":0,"size":10737418240,"transaction_id":1,"initialized":true}"#)
        try put("abc", #"{"device_id":5,"size":10737418240,"transaction_id":4,"initialized":false,"deleted":true,"extra":1}"#)
        try put("json.migrated", "not json at all")
        try put(".tmp0001", "{")
        try put("deviceset-metadata", #"{"next_device_id":6}"#)
        let set = try DockerDeviceSet(root: dir.path)
        #expect(set.devices.map(\.hash) == ["base", "abc"])
        #expect(set.base == set.devices[0] && set.devices[0].deviceID == 0 && !set.devices[0].deleted && set.devices[0].initialized)
        #expect(set.devices[1].deleted && set.devices[1].transactionID == 4 && set.devices[1].size == 10 << 30)
        #expect(set.settings == DockerDeviceSet.Settings(nextDeviceID: 6, baseDeviceUUID: nil, baseDeviceFilesystem: nil))
        #expect(set.transaction == nil)
    }
}
