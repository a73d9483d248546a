import Foundation
import PersistentData
import Synchronization
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS

/// `RBDPool` against a real (throw-away, single-node) Ceph cluster: the dm-thin message
/// vocabulary over RBD images, snapshots and clones, the Volume over an image (e2fsck judges
/// it), deletion of an origin whose clones live on, and the exclusive lock between two clients.
/// Each test uses its own rbd.prefix, so they share the cluster.
@Suite("RBD pool", .enabled(if: Ceph.available, "needs the Ceph packages and a test cluster (the reason is printed)"))
struct RBDPoolTests {
    static let blockSize = 64 << 10

    static func pool(_ prefix: String, imageSize: UInt64 = 8 << 20) throws -> RBDPool {
        try RBDPool(.init(pool: Ceph.pool, conf: Ceph.confPath, prefix: prefix, imageSize: imageSize, blockSize: UInt64(blockSize)),
                    logger: quietLogger)
    }

    /// Deletes every device left under the pool's prefix, and checks nothing (not even a
    /// retired parent) is left in the cluster.
    static func removeAll(_ pool: RBDPool, sourceLocation: SourceLocation = #_sourceLocation) throws {
        // Clones before their origins is not needed (deletion retires origins), but any order must work.
        for id in try pool.deviceIDs() { try pool.message(.delete(id)) }
        #expect(try Ceph.images(prefix: pool.configuration.prefix) == [], sourceLocation: sourceLocation)
    }

    /// The pool-level model test of the userspace engine (PoolModelTests), against RBD: random
    /// create_thin, create_snap, delete, writes and block discards, each device's bytes checked
    /// against an independent model, and the device set against the pool's.
    @Test func randomOperationsMatchTheModel() throws {
        let seed = UInt64(ProcessInfo.processInfo.environment["THINFS_SEED"] ?? "") ?? UInt64.random(in: 0...UInt64.max)
        let context = "seed \(seed) (rerun with THINFS_SEED=\(seed))"
        print("RBDPoolTests: \(context)")
        var rng = SeededRandom(seed: seed)
        let prefix = Ceph.uniquePrefix("model")
        let size = 24 * Self.blockSize
        let pool = try Self.pool(prefix, imageSize: UInt64(size))
        var model: [ThinDeviceID: [UInt8]] = [:]
        var nextID: ThinDeviceID = 1
        let operations = Int(ProcessInfo.processInfo.environment["THINFS_RBD_MODEL_OPS"] ?? "") ?? 150

        func read(_ id: ThinDeviceID) throws -> [UInt8] {
            let device = try pool.openDevice(id, size: UInt64(size))
            defer { device.close() }
            var bytes = [UInt8](repeating: 0xee, count: size)
            try bytes.withUnsafeMutableBytes { try device.read(into: $0, at: 0) }
            return bytes
        }

        for step in 0..<operations {
            let ids = model.keys.sorted()
            let roll = Int.random(in: 0..<100, using: &rng)
            switch roll {
            case 0..<8 where ids.count < 6:
                try pool.message(.createThin(nextID))
                model[nextID] = [UInt8](repeating: 0, count: size)
                nextID += 1
            case 8..<20 where !ids.isEmpty && ids.count < 6:
                let origin = ids.randomElement(using: &rng)!
                try pool.message(.createSnap(nextID, origin: origin))
                model[nextID] = model[origin]
                nextID += 1
            case 20..<28 where ids.count > 1:
                let id = ids.randomElement(using: &rng)!
                try pool.message(.delete(id))
                model[id] = nil
            case 28..<85 where !ids.isEmpty:
                let id = ids.randomElement(using: &rng)!
                let offset = Int.random(in: 0..<(size - 1), using: &rng)
                let length = Int.random(in: 1...min(3 * Self.blockSize, size - offset), using: &rng)
                let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) }
                let device = try pool.openDevice(id, size: UInt64(size))
                try bytes.withUnsafeBytes { try device.write($0, at: UInt64(offset)) }
                if Bool.random(using: &rng) { try device.flush() }
                device.close()
                model[id]!.replaceSubrange(offset..<offset + length, with: bytes)
            case 85..<90 where !ids.isEmpty:
                // Whole blocks (librbd zeroes exactly the range; the model's unit is the block).
                let id = ids.randomElement(using: &rng)!
                let first = Int.random(in: 0..<24, using: &rng), count = Int.random(in: 1...min(4, 24 - first), using: &rng)
                let device = try pool.openDevice(id, size: UInt64(size))
                try device.discard(offset: UInt64(first * Self.blockSize), length: UInt64(count * Self.blockSize))
                device.close()
                model[id]!.replaceSubrange(first * Self.blockSize..<(first + count) * Self.blockSize,
                                           with: [UInt8](repeating: 0, count: count * Self.blockSize))
            case 90..<100 where !ids.isEmpty:
                let id = ids.randomElement(using: &rng)!
                let back = try read(id)
                guard back == model[id]! else {
                    Issue.record("device \(id) differs from the model at step \(step): first byte \(String(describing: back.indices.first { back[$0] != model[id]![$0] })); \(context)")
                    return
                }
            default:
                continue
            }
        }
        #expect(Set(try pool.deviceIDs()) == Set(model.keys), "\(context)")
        for (id, bytes) in model {
            let back = try read(id)
            #expect(back == bytes, "device \(id); \(context)")
        }
        // Status counts what each device maps, its parents' data included (dm-thin's view).
        for (id, bytes) in model {
            let status = try pool.deviceStatus(id)
            let allZero = bytes.allSatisfy { $0 == 0 }
            if !allZero { #expect(status.mappedSectors > 0, "device \(id) has data but maps nothing; \(context)") }
        }
        try Self.removeAll(pool)
    }

    /// A chain of layers, one clone per layer: each sees its own writes and its parents' data,
    /// never a child's.
    @Test func snapshotPerLayer() throws {
        let prefix = Ceph.uniquePrefix("chain")
        let pool = try Self.pool(prefix)
        defer { try? Self.removeAll(pool) }
        try pool.message(.createThin(1))
        let layers = 6
        for layer in 1...layers {
            let id = ThinDeviceID(layer)
            if layer > 1 { try pool.message(.createSnap(id, origin: id - 1)) }
            let device = try pool.openDevice(id, size: 8 << 20)
            // Layer n writes its number at block n; later layers must still see blocks 1..<n.
            try [UInt8](repeating: UInt8(layer), count: Self.blockSize).withUnsafeBytes { try device.write($0, at: UInt64(layer * Self.blockSize)) }
            try device.flush()
            device.close()
        }
        for layer in 1...layers {
            let device = try pool.openDevice(ThinDeviceID(layer), size: 8 << 20)
            defer { device.close() }
            for block in 1...layers {
                var bytes = [UInt8](repeating: 0xee, count: Self.blockSize)
                try bytes.withUnsafeMutableBytes { try device.read(into: $0, at: UInt64(block * Self.blockSize)) }
                let expected: UInt8 = block <= layer ? UInt8(block) : 0
                #expect(bytes.allSatisfy { $0 == expected }, "layer \(layer) block \(block)")
            }
        }
        let details = try pool.deviceDetails()
        #expect(details.keys.sorted() == (1...ThinDeviceID(layers)).map { $0 })
        // dm-thin's view: a layer maps its parents' blocks too (how much more depends on the
        // object store's extent reporting: memstore reports whole extents from offset 0).
        for layer in 1...layers {
            #expect(details[ThinDeviceID(layer)].map { $0.mappedBlocks >= UInt64(layer) } == true, "\(String(describing: details[ThinDeviceID(layer)]))")
        }
        // Each layer's own objects hold its own block: its first write copied the parent's object up.
        let own = try pool.mappedDataBlocks()
        for layer in 1...layers {
            #expect(own[ThinDeviceID(layer)]?.contains { $0 & 0xff_ffff_ffff == UInt64(layer) } == true, "layer \(layer): \(String(describing: own[ThinDeviceID(layer)]))")
        }
    }

    /// dm-thin deletes an origin whose snapshots live on; Ceph cannot remove it while clones
    /// read through it. The origin is retired (renamed) and goes with its last clone.
    @Test func deletingAnOriginWithClonesRetiresIt() throws {
        let prefix = Ceph.uniquePrefix("retire")
        let pool = try Self.pool(prefix)
        try pool.message(.createThin(1))
        let device = try pool.openDevice(1, size: 8 << 20)
        try [UInt8](repeating: 0x5a, count: 4096).withUnsafeBytes { try device.write($0, at: 0) }
        device.close()
        try pool.message(.createSnap(2, origin: 1))
        try pool.message(.createSnap(3, origin: 2))
        try pool.message(.delete(1))
        try pool.message(.delete(2))
        #expect(try pool.deviceIDs() == [3])
        #expect(try pool.retiredImages().count == 2)
        #expect(throws: ThinPoolError.self) { try pool.message(.delete(1)) }
        // The id is free again: a new device 1 is a new, empty image.
        try pool.message(.createThin(1))
        let reused = try pool.openDevice(1, size: 8 << 20)
        var fresh = [UInt8](repeating: 0xee, count: 4096)
        try fresh.withUnsafeMutableBytes { try reused.read(into: $0, at: 0) }
        reused.close()
        #expect(fresh.allSatisfy { $0 == 0 })
        // The grandchild still reads the retired origin's data.
        let clone = try pool.openDevice(3, size: 8 << 20)
        var bytes = [UInt8](repeating: 0, count: 4096)
        try bytes.withUnsafeMutableBytes { try clone.read(into: $0, at: 0) }
        clone.close()
        #expect(bytes.allSatisfy { $0 == 0x5a })
        try pool.message(.delete(3))
        #expect(try pool.retiredImages() == [])
        try pool.message(.delete(1))
        #expect(try Ceph.images(prefix: prefix) == [])
    }

    /// ext4 through the Volume on an image, exported and checked by e2fsck, and a clone of it.
    @Test func volumeOverAnImagePassesE2fsck() throws {
        let prefix = Ceph.uniquePrefix("volume")
        let dir = TempDir()
        let pool = try Self.pool(prefix, imageSize: 64 << 20)
        defer { try? Self.removeAll(pool) }
        try pool.message(.createThin(1))
        _ = try DeviceFormatter(logger: quietLogger).format(pool: pool, id: 1, size: 64 << 20, scratchDirectory: dir.path)
        try pool.message(.createSnap(2, origin: 1))
        let text = Array("written through the Volume into an RBD clone\n".utf8)
        do {
            let volume = try Volume(device: try pool.openDevice(2, size: 64 << 20), readOnly: false, logger: quietLogger)
            let owner = Owner(uid: 0, gid: 0)
            let etc = try volume.mkdir(parent: volume.rootInode, name: "etc", mode: 0o755, owner: owner)
            let file = try volume.mknod(parent: etc.ino, name: "motd", mode: 0o100644, rdev: 0, owner: owner)
            _ = try text.withUnsafeBytes { try volume.write(file.ino, at: 0, from: $0) }
            let big = try volume.mknod(parent: volume.rootInode, name: "big", mode: 0o100644, rdev: 0, owner: owner)
            let chunk = [UInt8](repeating: 0xab, count: 1 << 20)
            for i in 0..<8 { _ = try chunk.withUnsafeBytes { try volume.write(big.ino, at: UInt64(i) << 20, from: $0) } }
            try volume.close()
        }
        for id: ThinDeviceID in [1, 2] {
            let image = dir.path + "/export-\(id).img"
            let target = try FileBlockDevice.create(path: FilePath(image), size: 64 << 20)
            let device = try pool.openDevice(id, size: 64 << 20)
            try device.copy(to: target, length: 64 << 20)
            device.close()
            let fsck = try Oracle.run("/sbin/e2fsck", ["-fn", image])
            #expect(fsck.status == 0, "e2fsck -fn of device \(id):\n\(fsck.stdout)\(fsck.stderr)")
            let cat = try Oracle.run("/sbin/debugfs", ["-R", "cat /etc/motd", image])
            #expect(cat.stdout == (id == 2 ? String(decoding: text, as: UTF8.self) : ""), "device \(id): \(cat.stderr)")
        }
    }

    /// Two clients (two hosts' stores): the writer holds the exclusive lock; the other's open
    /// for writing is refused naming the holder, it sees the use, and cannot delete the image.
    /// Once the writer lets go, the other takes over and reads the flushed data.
    @Test func exclusiveLockBetweenTwoClients() throws {
        let prefix = Ceph.uniquePrefix("lock")
        let a = try Self.pool(prefix), b = try Self.pool(prefix)
        defer { try? Self.removeAll(a) }
        try a.message(.createThin(1))
        let writer = try a.openDevice(1, size: 8 << 20)
        try [UInt8](repeating: 7, count: 4096).withUnsafeBytes { try writer.write($0, at: 0) }
        try writer.flush()
        do {
            let second = try b.openDevice(1, size: 8 << 20)
            second.close()
            Issue.record("a second client opened an image the first holds for writing")
        } catch let error as RBDPool.Error {
            guard case .lockedByAnotherClient(let image, let holders) = error else { throw error }
            #expect(image == "\(Ceph.pool)/\(prefix)1")
            #expect(!holders.isEmpty, "\(error)")
            #expect("\(error)".contains("locked exclusively by"))
        }
        let use = try b.externalUse(1)
        #expect(use?.contains("open by client.") == true, "\(String(describing: use))")
        #expect(throws: ThinPoolError.self) { try b.message(.delete(1)) }
        writer.close()
        let taken = try b.openDevice(1, size: 8 << 20)
        var bytes = [UInt8](repeating: 0, count: 4096)
        try bytes.withUnsafeMutableBytes { try taken.read(into: $0, at: 0) }
        taken.close()
        #expect(bytes.allSatisfy { $0 == 7 })
    }

    /// Closing the pool ends its cluster session, whoever still holds the pool object. A process
    /// that exits with librados connected runs Ceph's static destructors under its live threads:
    /// `thinfs serve` on an RBD store aborted at its SIGTERM exit (status 134) in CI's RBD end to
    /// end, and under gdb its exit never reached rados_shutdown. The monitor's session list is
    /// the oracle: the client's session must be gone once `close` returns.
    @Test func closeEndsTheClusterSession() throws {
        let pool = try Self.pool(Ceph.uniquePrefix("close"))
        let client = pool.connection.instanceID
        /// Whether the monitor has a session of global id `client` (listed as "client.?" with it).
        func listed() throws -> Bool {
            let result = try Oracle.run("/usr/bin/ceph", ["-c", Ceph.confPath, "tell", "mon.*", "sessions"])
            try #require(result.status == 0, "ceph tell mon.* sessions: \(result.stderr)")
            let json = try #require(result.stdout.firstIndex(of: "[").map { result.stdout[$0...] }, "no session list: \(result.stdout)")
            let sessions = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]])
            return sessions.contains { ($0["global_id"] as? NSNumber)?.uint64Value == client }
        }
        try #require(try listed(), "the monitor lists no session of client global id \(client)")
        try pool.message(.createThin(1))
        let device = try pool.openDevice(1, size: 8 << 20)
        device.close()
        try pool.message(.delete(1))
        try pool.close()
        var stillListed = try listed()
        let deadline = Date().addingTimeInterval(10)
        while stillListed && Date() < deadline {
            Thread.sleep(forTimeInterval: 0.5)
            stillListed = try listed()
        }
        #expect(!stillListed, "client global id \(client)'s session outlived RBDPool.close() by 10 s")
        withExtendedLifetime(pool) {}
    }

    /// A device closed (rbd_close) while other threads use its handle: the pool's commit (which
    /// flushes every open image, as the FUSE committer and every store transaction ask) and
    /// `deviceStatus` (which reads through the open handle, as `thinfs layer ls` and containerd's
    /// usage do). librbd frees the image at rbd_close, and a call that overlaps or follows it
    /// crashes the process in librbd's io_context threads ("terminate called after throwing an
    /// instance of 'std::system_error' what(): Invalid argument", or SIGSEGV): issue 16's flake
    /// in CI's RBD end to end, where a container's FUSE session ends (its device closes) while the
    /// next `ctr run` commits. The opens, uses and closes here must neither crash nor fail.
    @Test func handleClosedWhileOtherThreadsUseIt() throws {
        let pool = try Self.pool(Ceph.uniquePrefix("inuse"))
        defer { try? Self.removeAll(pool) }
        try pool.message(.createThin(1))
        let cycles = Int(ProcessInfo.processInfo.environment["THINFS_RBD_CLOSE_CYCLES"] ?? "") ?? 150
        final class Stop: Sendable { let flag = Atomic(false) }
        let stop = Stop()
        let failures = RBDPoolBenchmark.Mutex2()
        let users = DispatchGroup()
        for user in ["commit", "deviceStatus", "commit"] {
            users.enter()
            Thread.detachNewThread {
                defer { users.leave() }
                while !stop.flag.load(ordering: .acquiring) {
                    do {
                        if user == "commit" { try pool.commit() } else { _ = try pool.deviceStatus(1) }
                    } catch {
                        failures.record("\(user): \(error)")
                    }
                }
            }
        }
        let block = [UInt8](repeating: 0x5a, count: 4096)
        do {
            for cycle in 0..<cycles {
                let device = try pool.openDevice(1, size: 8 << 20)
                try block.withUnsafeBytes { try device.write($0, at: UInt64(cycle % 64) * 4096) }
                device.close()
            }
        } catch {
            failures.record("open, write, close: \(error)")
        }
        stop.flag.store(true, ordering: .releasing)
        users.wait()
        #expect(failures.all.isEmpty, "\(failures.all.count) failures, the first: \(failures.all.prefix(3))")
    }

    /// Many threads asking whether images exist and who uses them (`deviceExists`,
    /// `externalUse`: the store's busy checks, `thinfs layer ls`, containerd's Remove) while
    /// another makes, clones, opens, writes, closes and deletes images, as `thinfs serve` does
    /// in CI's RBD end to end. There, in issue 16, `thinfs serve` died inside librbd about one run
    /// in ten with a temporary read-only rbd_open of those questions the only RBD call in
    /// progress. Nothing may crash or fail; every answer must match the image's state.
    @Test func existenceAndUseAskedWhileImagesComeAndGo() throws {
        let pool = try Self.pool(Ceph.uniquePrefix("probe"))
        defer { try? Self.removeAll(pool) }
        try pool.message(.createThin(1))
        let cycles = Int(ProcessInfo.processInfo.environment["THINFS_RBD_PROBE_CYCLES"] ?? "") ?? 25
        final class Shared: Sendable { let stop = Atomic(false); let probes = Atomic(0) }
        let shared = Shared()
        let failures = RBDPoolBenchmark.Mutex2()
        let probers = DispatchGroup()
        for prober in 0..<4 {
            probers.enter()
            Thread.detachNewThread {
                defer { probers.leave() }
                var n = 0
                while !shared.stop.load(ordering: .acquiring) {
                    // 1 always exists; 2 and 3 come and go; 9 never exists.
                    let id: ThinDeviceID = [1, 2, 3, 9][(n + prober) % 4]
                    do {
                        let exists = try pool.deviceExists(id)
                        if id == 1 && !exists { failures.record("device 1 reported missing") }
                        if id == 9 && exists { failures.record("device 9 reported present") }
                        if let use = try pool.externalUse(id) { failures.record("device \(id) in use by another client: \(use)") }
                    } catch {
                        failures.record("probe of \(id): \(error)")
                    }
                    n += 1
                    shared.probes.add(1, ordering: .relaxed)
                }
            }
        }
        let block = [UInt8](repeating: 0x5a, count: 4096)
        do {
            for cycle in 0..<cycles {
                try pool.message(.createThin(2))
                try pool.message(.createSnap(3, origin: 2))
                let device = try pool.openDevice(3, size: 8 << 20)
                try block.withUnsafeBytes { try device.write($0, at: UInt64(cycle % 64) * 4096) }
                try pool.commit()
                device.close()
                try pool.message(.delete(3))
                try pool.message(.delete(2))
            }
        } catch {
            failures.record("create, clone, open, write, close, delete: \(error)")
        }
        shared.stop.store(true, ordering: .releasing)
        probers.wait()
        print("RBDPoolTests.existenceAndUseAskedWhileImagesComeAndGo: \(cycles) cycles, \(shared.probes.load(ordering: .relaxed)) probes")
        #expect(failures.all.isEmpty, "\(failures.all.count) failures, the first: \(failures.all.prefix(3))")
    }

    /// An image's existence and its users, asked of RADOS (the id object `rbd_id.<name>`, the
    /// watchers of `rbd_header.<id>`) with no image opened. Oracles: `rbd info` (the id) and
    /// `rados listwatchers` (the header's watchers); two clients, A writing, B asking.
    @Test func existenceAndWatchersComeFromRADOS() throws {
        let prefix = Ceph.uniquePrefix("asks")
        let a = try Self.pool(prefix), b = try Self.pool(prefix)
        defer { try? Self.removeAll(a) }
        let name = "\(prefix)1"
        #expect(try !a.deviceExists(1))
        #expect(try a.connection.imageID(name) == nil)
        #expect(try a.connection.imageWatchers(name) == nil)
        #expect(try b.externalUse(1) == nil)
        try a.message(.createThin(1))
        #expect(try a.deviceExists(1))
        #expect(try !a.deviceExists(2))
        let info = try Ceph.rbd(["info", "\(Ceph.pool)/\(name)", "--format", "json"])
        try #require(info.status == 0, "rbd info: \(info.stderr)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as? [String: Any])
        let id = try #require(try a.connection.imageID(name))
        #expect(id == json["id"] as? String)
        #expect(try a.connection.imageWatchers(name)?.isEmpty == true)

        let writer = try a.openDevice(1, size: 8 << 20)
        let watchers = try #require(try b.connection.imageWatchers(name))
        let listed = try Oracle.run("/usr/bin/rados", ["-c", Ceph.confPath, "-p", Ceph.pool, "listwatchers", "rbd_header.\(id)"])
        try #require(listed.status == 0, "rados listwatchers: \(listed.stderr)")
        #expect(watchers.map(\.id) == [a.connection.instanceID], "\(watchers)")
        #expect(listed.stdout.contains("client.\(a.connection.instanceID)"), "\(listed.stdout)")
        #expect(listed.stdout.split(separator: "\n").count == watchers.count, "\(listed.stdout)")
        let use = try #require(try b.externalUse(1))
        #expect(use.contains("rbd image \(Ceph.pool)/\(name) is open by client.\(a.connection.instanceID) at "), "\(use)")
        // A's own open is not another client's use.
        #expect(try a.externalUse(1) == nil)
        writer.close()
        #expect(try b.externalUse(1) == nil)

        try a.message(.delete(1))
        #expect(try !b.deviceExists(1))
        #expect(try b.connection.imageWatchers(name) == nil)
        #expect(try b.externalUse(1) == nil)
    }

    /// The layer catalogue between two stores (two clients, two prefixes, one catalogue object):
    /// A publishes an image, B adopts it (an alias: no image of B's made), clones it from the
    /// shared snapshot and reads A's bytes; A's delete is refused naming B while B uses it, B's
    /// delete of the alias leaves A's image; then A's delete removes it. `rados` lists the omap.
    @Test func catalogueSharesALayerBetweenTwoStores() throws {
        let catalogue = "thinfs-catalogue-\(UUID().uuidString.prefix(8).lowercased())"
        let prefixA = Ceph.uniquePrefix("cata"), prefixB = Ceph.uniquePrefix("catb")
        func pool(_ prefix: String) throws -> RBDPool {
            try RBDPool(.init(pool: Ceph.pool, conf: Ceph.confPath, prefix: prefix, imageSize: 8 << 20,
                              blockSize: UInt64(Self.blockSize), catalogue: catalogue), logger: quietLogger)
        }
        let a = try pool(prefixA), b = try pool(prefixB)
        defer {
            try? Self.removeAll(b)
            try? Self.removeAll(a)
            _ = try? Oracle.run("/usr/bin/rados", ["-c", Ceph.confPath, "-p", Ceph.pool, "rm", catalogue])
        }
        try a.message(.createThin(1))
        let writer = try a.openDevice(1, size: 8 << 20)
        try [UInt8](repeating: 0x42, count: 8192).withUnsafeBytes { try writer.write($0, at: 4096) }
        writer.close()
        #expect(try a.publishLayer(1, chainID: "sha256:aaaa", size: 8 << 20, uuid: "u", parent: nil))
        // Published once: a second publisher (B with its own copy) keeps its copy to itself.
        #expect(try b.sharedLayers().map(\.chainID) == ["sha256:aaaa"])
        let keys = try Oracle.run("/usr/bin/rados", ["-c", Ceph.confPath, "-p", Ceph.pool, "listomapkeys", catalogue]).stdout
        #expect(keys.contains("layer.sha256:aaaa") && keys.contains("image.\(prefixA)1"), "\(keys)")

        let adopted = try b.adoptLayer("sha256:aaaa", as: 5)
        #expect(adopted.image == "\(prefixA)1" && adopted.host == prefixA)
        #expect(try b.deviceIDs() == [5])
        #expect(try Ceph.images(prefix: prefixB) == [])
        #expect(try a.sharedLayers().first?.users == [prefixB: RBDPool.hostname])
        // A fresh pool object (B's next process) finds the alias in the catalogue.
        #expect(try pool(prefixB).imageName(5) == "\(prefixA)1")

        try b.message(.createSnap(6, origin: 5))
        #expect(try Ceph.images(prefix: prefixB) == ["\(prefixB)6"])
        let clone = try b.openDevice(6, size: 8 << 20)
        var bytes = [UInt8](repeating: 0, count: 8192)
        try bytes.withUnsafeMutableBytes { try clone.read(into: $0, at: 4096) }
        clone.close()
        #expect(bytes.allSatisfy { $0 == 0x42 })

        do {
            try a.checkDeletable(1)
            Issue.record("A may delete a layer B uses")
        } catch let error as RBDPool.CatalogueError {
            guard case .inUse(_, let users) = error else { throw error }
            #expect(users.count == 1 && users[0].contains(prefixB), "\(error)")
        }
        #expect(throws: RBDPool.CatalogueError.self) { try a.message(.delete(1)) }
        #expect(try Ceph.images(prefix: prefixA) == ["\(prefixA)1"])

        try b.message(.delete(6))
        try b.message(.delete(5))
        #expect(try b.deviceIDs() == [])
        #expect(try Ceph.images(prefix: prefixA) == ["\(prefixA)1"])
        #expect(try a.sharedLayers().first?.users == [:])
        try a.message(.delete(1))
        #expect(try Ceph.images(prefix: prefixA) == [])
        #expect(try a.sharedLayers().isEmpty)
    }

    /// The transaction id lives in the cluster (pool metadata under the prefix), checked like
    /// dm-thin's set_transaction_id.
    @Test func transactionID() throws {
        let prefix = Ceph.uniquePrefix("tx")
        let pool = try Self.pool(prefix)
        #expect(try pool.status().transactionID == 0)
        try pool.message(.setTransactionID(current: 0, new: 1))
        #expect(try Self.pool(prefix).status().transactionID == 1)
        #expect(throws: ThinPoolError.self) { try pool.message(.setTransactionID(current: 0, new: 2)) }
        #expect(throws: RBDPool.Error.self) { try pool.checkUnused() }
        try pool.message(.setTransactionID(current: 1, new: 0))
        try pool.checkUnused()
    }
}

/// Side-by-side figures, RBD against the userspace pool, at the `ThinPoolBackend` and
/// `BlockDevice` level (what the Volume sees): snapshot (create_snap) latency, sequential
/// 1 MiB writes and reads, 4 KiB random writes and reads with several threads in flight.
/// Opt-in (THINFS_RBD_BENCH=1): it prints, and checks only that the data read back is what was written.
@Suite("RBD pool benchmark", .enabled(if: ProcessInfo.processInfo.environment["THINFS_RBD_BENCH"] == "1" && Ceph.available,
                                      "set THINFS_RBD_BENCH=1 (and have a Ceph test cluster)"))
struct RBDPoolBenchmark {
    static func seconds(_ body: () throws -> Void) rethrows -> Double {
        let start = ContinuousClock.now
        try body()
        let d = ContinuousClock.now - start
        return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    static func run(_ name: String, _ pool: any ThinPoolBackend) throws {
        let size: UInt64 = 256 << 20
        let snapshots = 10
        try pool.message(.createThin(1))
        let snap = try seconds {
            for i in 0..<snapshots { try pool.message(.createSnap(ThinDeviceID(10 + i), origin: 1)) }
        }
        let device = try pool.openDevice(1, size: size)
        defer { device.close() }
        let mib = [UInt8]((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        let total = 128
        let write = try seconds {
            for i in 0..<total { try mib.withUnsafeBytes { try device.write($0, at: UInt64(i) << 20) } }
            try device.flush()
        }
        var back = [UInt8](repeating: 0, count: 1 << 20)
        let read = try seconds {
            for i in 0..<total { try back.withUnsafeMutableBytes { try device.read(into: $0, at: UInt64(i) << 20) } }
        }
        // Checked outside the timing (a debug build's array compare costs more than the read).
        for i in [0, total / 2, total - 1] {
            try back.withUnsafeMutableBytes { try device.read(into: $0, at: UInt64(i) << 20) }
            #expect(back == mib, "\(name): sequential read-back of MiB \(i) differs")
        }
        // 4 KiB random I/O from 8 threads (FUSE's workers), 256 requests each.
        let threads = 8, perThread = 256
        let failures = Mutex2()
        func parallel(_ body: @escaping @Sendable (Int, inout SeededRandom) throws -> Void) -> Double {
            seconds {
                DispatchQueue.concurrentPerform(iterations: threads) { t in
                    var rng = SeededRandom(seed: UInt64(t))
                    do { for _ in 0..<perThread { try body(t, &rng) } } catch { failures.record("\(error)") }
                }
            }
        }
        let block = [UInt8](repeating: 0x42, count: 4096)
        let randomWrite = parallel { _, rng in
            let offset = UInt64.random(in: 0..<(UInt64(total) << 8), using: &rng) * 4096
            try block.withUnsafeBytes { try device.write($0, at: offset) }
        }
        try device.flush()
        let randomRead = parallel { _, rng in
            var buffer = [UInt8](repeating: 0, count: 4096)
            let offset = UInt64.random(in: 0..<(UInt64(total) << 8), using: &rng) * 4096
            try buffer.withUnsafeMutableBytes { try device.read(into: $0, at: offset) }
        }
        #expect(failures.all.isEmpty, "\(failures.all.prefix(3))")
        let ops = Double(threads * perThread)
        print(String(format: "BENCH %@: create_snap %.1f ms; seq write %.0f MiB/s; seq read %.0f MiB/s; 4K random write %.0f IOPS; 4K random read %.0f IOPS (8 threads)",
                     name, snap / Double(snapshots) * 1000, Double(total) / write, Double(total) / read, ops / randomWrite, ops / randomRead))
    }

    final class Mutex2: @unchecked Sendable {
        private let lock = NSLock()
        private var errors: [String] = []
        func record(_ e: String) { lock.lock(); errors.append(e); lock.unlock() }
        var all: [String] { lock.lock(); defer { lock.unlock() }; return errors }
    }

    @Test func rbdAgainstUserspace() throws {
        let dir = TempDir()
        let userspace = try UserspaceThinPool.create(dataPath: dir.path + "/data", metadataPath: dir.path + "/metadata",
                                                     dataSize: 2 << 30, metadataSize: 64 << 20, blockSize: 64 << 10, logger: quietLogger)
        try Self.run("userspace", userspace)
        try userspace.close()
        let prefix = Ceph.uniquePrefix("bench")
        let rbd = try RBDPoolTests.pool(prefix, imageSize: 256 << 20)
        defer { try? RBDPoolTests.removeAll(rbd) }
        try Self.run("rbd", rbd)
    }
}

/// The id object's encoding (no cluster): what RADOS returns is data, never a precondition.
@Suite("RBD id objects")
struct RBDIDObjectTests {
    @Test func decodesALengthPrefixedID() throws {
        let bytes: [UInt8] = [12, 0, 0, 0] + Array("1022ba9215d3".utf8)
        #expect(try RadosConnection.decodeImageID(bytes[...], object: "rbd/rbd_id.x") == "1022ba9215d3")
    }

    @Test(arguments: [
        ([1, 0, 0] as [UInt8], "less than a length"),
        ([5, 0, 0, 0, 0x61], "an id of 5 bytes in 1"),
        ([0, 0, 0, 0], "an id of 0 bytes in 0"),
        ([2, 0, 0, 0, 0x61, 0x2f], "not lower-case letters and digits"),
    ])
    func refusesWhatLibrbdNeverWrites(bytes: [UInt8], reason: String) {
        #expect {
            try RadosConnection.decodeImageID(bytes[...], object: "rbd/rbd_id.x")
        } throws: { error in
            guard case .malformedObject(let object, let r)? = error as? RBDPool.Error else { return false }
            return object == "rbd/rbd_id.x" && r.contains(reason)
        }
    }
}
