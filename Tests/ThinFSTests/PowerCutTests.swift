import Foundation
import PersistentData
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS

/// Simulated power cuts, in the manner of the kernel's dm-log-writes target and CrashMonkey.
///
/// SIGKILL only kills the process: whatever it wrote is still in the page cache and reaches the
/// disk. A power cut also loses writes that no flush had made durable, in any combination. So a
/// workload runs once through the layer store (the same calls the daemon makes: image import,
/// container writes with `Volume.fsync`, which is what a FUSE fsync runs, layer create and rm)
/// while a `PoolIOHook` records every write and flush the pool sends to its data file and its
/// metadata file, in order, and the store's database is copied after every SQLite commit (each is
/// durable when it returns: WAL, `synchronous=FULL`). Then, for each cut point:
///
/// 1. each pool file gets the writes up to its last flush before the cut;
/// 2. of the writes after that flush, split into 4 KiB pages, none, all, or a random subset is
///    added, in order (so any page may hold any version written since the flush: the disk may
///    persist any of them), except that a durable write (`O_DSYNC`: the superblock) that
///    returned before the cut is always there, and only it, not the writes before it; one in
///    flight at the cut is like any other unflushed write; the database is as of its last
///    commit before the cut;
/// 3. the result must pass: thin_check; the store opens (journal rollback or roll-forward);
///    `e2fsck -fn` on every thin device; every file whose fsync returned before the cut has its
///    bytes; every layer whose create returned exists and every layer whose rm returned is gone;
///    thin_check again after the store's recovery wrote to the pool.
///
/// Gated on THINFS_POWERCUT=1 (`scripts/powercut.sh`, a CI step of its own). THINFS_POWERCUT_CUTS
/// sets the number of cut points (default 200, CI's budget), THINFS_SEED replays a run; the seed
/// is printed, and every failure names the seed, the cut point and the check that failed.
@Suite("Power cuts", .enabled(if: PowerCut.enabled, "set THINFS_POWERCUT=1 (scripts/powercut.sh); needs thin_check, e2fsck and python3"))
struct PowerCutTests {
    @Test func everyCutPointRecovers() throws {
        let env = ProcessInfo.processInfo.environment
        let seed = UInt64(env["THINFS_SEED"] ?? "") ?? UInt64.random(in: 0...UInt64.max)
        let cuts = Int(env["THINFS_POWERCUT_CUTS"] ?? "") ?? 200
        print("power cuts: seed \(seed) (rerun with THINFS_SEED=\(seed)), \(cuts) cut points")
        let dir = TempDir()
        let started = Date()
        let recording = try PowerCut.record(in: dir.path, seed: seed)
        print("power cuts: recorded \(recording.log.events.count) events (\(recording.log.summary)) in \(Int(Date().timeIntervalSince(started)))s")
        let failures = try PowerCut.replay(recording, in: dir.path + "/crash", seed: seed, cuts: cuts)
        print("power cuts: \(cuts) cut points checked in \(Int(Date().timeIntervalSince(started)))s, \(failures.count) failed")
        for f in failures {
            print("POWERCUT FAILED: \(f)")
            Issue.record("\(f)")
        }
    }
}

enum PowerCut {
    static var enabled: Bool {
        ProcessInfo.processInfo.environment["THINFS_POWERCUT"] == "1" && Oracle.available && PyTar.available
            && FileManager.default.isExecutableFile(atPath: "/sbin/e2fsck")
    }

    /// What the workload was told had happened: the promises a cut after this point must keep.
    enum Ack {
        case layerCreated(String)
        /// `rm` was called: from here the layer may be gone (the journal finishes a delete it
        /// finds open), until it returns.
        case layerRemoving(String)
        case layerRemoved(String)
        /// `fsync` returned with the file holding `bytes`.
        case fileSynced(layer: String, name: String, bytes: [UInt8])
        /// The file is being rewritten: until its next fsync any mix of old and new is allowed.
        case fileUnsettled(layer: String, name: String)
    }

    enum Event {
        case write(PoolIOOperation.File, offset: UInt64, bytes: [UInt8])
        case zero(PoolIOOperation.File, offset: UInt64, length: UInt64)
        case truncate(PoolIOOperation.File, size: UInt64)
        case sync(PoolIOOperation.File)
        /// A write that was durable when it returned: a write, then a flush of that write alone.
        case durableWrite(PoolIOOperation.File, offset: UInt64, bytes: [UInt8])
        /// The database's files as of a commit (an index into `Log.databases`).
        case database(Int)
        case ack(Ack)

        var label: String {
            switch self {
            case .write(let f, let o, let b): "write \(f.rawValue) \(b.count) bytes at \(o)"
            case .zero(let f, let o, let l): "zero \(f.rawValue) \(l) bytes at \(o)"
            case .truncate(let f, let s): "truncate \(f.rawValue) to \(s)"
            case .sync(let f): "fdatasync \(f.rawValue)"
            case .durableWrite(let f, let o, let b): "durable write \(f.rawValue) \(b.count) bytes at \(o)"
            case .database(let i): "database commit #\(i)"
            case .ack(.layerCreated(let id)): "acknowledged: layer \(id) created"
            case .ack(.layerRemoving(let id)): "layer \(id) being removed"
            case .ack(.layerRemoved(let id)): "acknowledged: layer \(id) removed"
            case .ack(.fileSynced(let layer, let name, let bytes)): "acknowledged: \(layer):/\(name) fsynced (\(bytes.count) bytes)"
            case .ack(.fileUnsettled(let layer, let name)): "\(layer):/\(name) being written"
            }
        }
    }

    /// The recording: a `PoolIOHook` on the workload's pool, and the database's commits.
    final class Log: PoolIOHook, @unchecked Sendable {
        let lock = Lock()
        private(set) var events: [Event] = []
        /// layers.db and layers.db-wal (absent: nil) as of each commit.
        private(set) var databases: [(db: Data, wal: Data?)] = []
        let root: String

        init(root: String) { self.root = root }

        func willPerform(_ operation: PoolIOOperation) throws(Errno) -> Int? { nil }

        func didPerform(_ operation: PoolIOOperation) {
            let event: Event
            switch operation {
            case .write(let f, let offset, let bytes): event = .write(f, offset: offset, bytes: Array(bytes))
            case .zero(let f, let offset, let length): event = .zero(f, offset: offset, length: length)
            case .truncate(let f, let size): event = .truncate(f, size: size)
            case .sync(let f): event = .sync(f)
            case .durableWrite(let f, let offset, let bytes): event = .durableWrite(f, offset: offset, bytes: Array(bytes))
            case .read: return
            }
            lock.withLock { events.append(event) }
        }

        /// Copies the database's files: called after each commit, when they hold it durably.
        func databaseCommitted() {
            let db = FileManager.default.contents(atPath: root + "/layers.db") ?? Data()
            let wal = FileManager.default.contents(atPath: root + "/layers.db-wal")
            lock.withLock {
                databases.append((db, wal))
                events.append(.database(databases.count - 1))
            }
        }

        func acknowledge(_ ack: Ack) { lock.withLock { events.append(.ack(ack)) } }

        var summary: String {
            var writes = 0, syncs = 0, durable = 0, commits = 0, acks = 0
            for e in events {
                switch e {
                case .write, .zero, .truncate: writes += 1
                case .sync: syncs += 1
                case .durableWrite: durable += 1
                case .database: commits += 1
                case .ack: acks += 1
                }
            }
            return "\(writes) writes, \(syncs) flushes, \(durable) durable writes, \(commits) database commits, \(acks) acknowledgements"
        }
    }

    struct Recording {
        var log: Log
        /// The store right after `thinfs init`, before the recording began.
        var baseRoot: String
        var dataSize: UInt64
    }

    static func options() throws -> StorageOptions {
        try StorageOptions(parsing: ["dm.basesize=32M", "dm.loopdatasize=256M", "dm.loopmetadatasize=8M"])
    }

    // MARK: The workload

    /// Runs the seeded workload on a new store in `dir/work`, recording it.
    static func record(in dir: String, seed: UInt64) throws -> Recording {
        var rng = SeededRandom(seed: seed)
        let root = dir + "/work", base = dir + "/base"
        try LayerStore.initialize(root: root, options: options(), logger: quietLogger).close()
        // The state the recording starts from: the pool files (sparse) and the database.
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        let copy = try Oracle.run("/bin/cp", ["-a", "--sparse=always", root + "/pool", root + "/layers.db", root + "/pool.json", base + "/"])
        try #require(copy.status == 0, "cp: \(copy.stderr)")
        if FileManager.default.fileExists(atPath: root + "/layers.db-wal") {
            try FileManager.default.copyItem(atPath: root + "/layers.db-wal", toPath: base + "/layers.db-wal")
        }
        let images = try (0..<3).map { i in
            try TestImage.make(dir + "/image\(i)", files: (0..<3).map { f in
                (name: "data/f\(f)", size: Int.random(in: 4096...(600 << 10), using: &rng), seed: Int(i * 10 + f))
            }, oci: true)
        }

        let log = Log(root: root)
        let dataPath = try PoolRoot(path: root).config().data
        PoolIOHooks.install(log, dataPath: dataPath)
        defer { PoolIOHooks.remove(dataPath: dataPath) }
        let store = try LayerStore.open(root: root, logger: quietLogger)
        log.databaseCommitted()
        store.db.afterCommit = { [log] in log.databaseCommitted() }

        var imageLayers: [String] = []          // active image layers (possible parents)
        var emptyImages: [String] = []          // image layers made by createImageLayer, childless
        var containers: [String] = []
        var open: [String: LayerStore.OpenLayer] = [:]
        var files: [String: [String: [UInt8]]] = [:]   // container -> name -> bytes written
        var imported = 0, counter = 0

        func randomBytes(_ n: Int) -> [UInt8] {
            var b = [UInt8](repeating: 0, count: n)
            var i = 0
            while i < n {
                var w = rng.next()
                for _ in 0..<8 where i < n { b[i] = UInt8(truncatingIfNeeded: w); w >>= 8; i += 1 }
            }
            return b
        }
        func write(_ v: Volume, ino: UInt64, _ bytes: [UInt8], at offset: UInt64) throws {
            try bytes.withUnsafeBytes { p in
                var done = 0
                while done < p.count {
                    let chunk = min(p.count - done, 128 << 10)   // FUSE's largest write
                    done += try v.write(ino, at: offset + UInt64(done), from: UnsafeRawBufferPointer(rebasing: p[done..<done + chunk]))
                }
            }
        }

        let steps = 60
        for step in 0..<steps {
            counter += 1
            let roll = Int.random(in: 0..<100, using: &rng)
            if imported < images.count && (roll < 12 || step == 0) {
                let top = try store.importImage(images[imported].oci, name: "image\(imported)")
                imported += 1
                imageLayers.append(top)
                log.acknowledge(.layerCreated(top))
            } else if roll < 20 {
                let id = "img\(counter)"
                _ = try store.createImageLayer(id, parent: nil)
                imageLayers.append(id)
                emptyImages.append(id)
                log.acknowledge(.layerCreated(id))
            } else if roll < 35 && !imageLayers.isEmpty {
                let parent = imageLayers.randomElement(using: &rng)!
                let id = "c\(counter)"
                _ = try store.createContainerLayer(id, parent: parent, size: nil)
                emptyImages.removeAll { $0 == parent }
                containers.append(id)
                log.acknowledge(.layerCreated(id))
                open[id] = try store.openLayer(id, readOnly: false, what: "power-cut workload")
            } else if roll < 80, let id = open.keys.sorted().randomElement(using: &rng), let layer = open[id] {
                let v = layer.volume
                let existing = files[id, default: [:]]
                if let name = existing.keys.sorted().randomElement(using: &rng), Int.random(in: 0..<3, using: &rng) == 0 {
                    // Rewrite part of a file: blocks the last commit references are copied, not overwritten.
                    var bytes = existing[name]!
                    let at = Int.random(in: 0..<bytes.count, using: &rng)
                    let patch = randomBytes(min(bytes.count - at, Int.random(in: 1...(64 << 10), using: &rng)))
                    log.acknowledge(.fileUnsettled(layer: id, name: name))
                    let ino = try v.lookup(parent: v.rootInode, name: name).ino
                    try write(v, ino: ino, patch, at: UInt64(at))
                    bytes.replaceSubrange(at..<at + patch.count, with: patch)
                    files[id]![name] = bytes
                    try v.fsync(ino)
                    log.acknowledge(.fileSynced(layer: id, name: name, bytes: bytes))
                } else {
                    let name = "f\(counter)"
                    // Now and then a file larger than the volume's block cache holds dirty (2 MiB), so
                    // that its write-back reaches the pool between two commits.
                    let large = Int.random(in: 0..<8, using: &rng) == 0
                    let bytes = randomBytes(Int.random(in: large ? (2 << 20)...(3 << 20) : 1...(400 << 10), using: &rng))
                    let a = try v.mknod(parent: v.rootInode, name: name, mode: 0o100644, rdev: 0, owner: .root)
                    try v.open(a.ino)
                    try write(v, ino: a.ino, bytes, at: 0)
                    files[id, default: [:]][name] = bytes
                    if Int.random(in: 0..<4, using: &rng) != 0 {
                        try v.fsync(a.ino)
                        log.acknowledge(.fileSynced(layer: id, name: name, bytes: bytes))
                    } else {
                        // Not fsynced: no promise, and a later fsync of another file may or may not carry it.
                        log.acknowledge(.fileUnsettled(layer: id, name: name))
                    }
                    v.release(a.ino)
                }
            } else if roll < 90, let id = containers.randomElement(using: &rng) {
                try open.removeValue(forKey: id)?.close()
                log.acknowledge(.layerRemoving(id))
                #expect(try store.remove(id) == .deleted)
                containers.removeAll { $0 == id }
                files[id] = nil
                log.acknowledge(.layerRemoved(id))
            } else if let id = emptyImages.randomElement(using: &rng) {
                log.acknowledge(.layerRemoving(id))
                #expect(try store.remove(id) == .deleted)
                emptyImages.removeAll { $0 == id }
                imageLayers.removeAll { $0 == id }
                log.acknowledge(.layerRemoved(id))
            }
        }
        for (_, layer) in open.sorted(by: { $0.key < $1.key }) { try layer.close() }
        try store.close()
        return Recording(log: log, baseRoot: base, dataSize: try fileSize(base + "/pool/data"))
    }

    // MARK: Replay

    /// A write of the log cut to one 4 KiB page: the unit a disk persists or loses.
    struct Piece {
        var file: PoolIOOperation.File
        var offset: UInt64
        /// nil: zeros of `length`.
        var bytes: ArraySlice<UInt8>?
        var length: Int
    }

    static func pieces(of event: Event) -> [Piece] {
        let page: UInt64 = 4096
        switch event {
        case .write(let f, let offset, let bytes), .durableWrite(let f, let offset, let bytes):
            var out: [Piece] = []
            var at = offset
            while at < offset + UInt64(bytes.count) {
                let end = min((at / page + 1) * page, offset + UInt64(bytes.count))
                out.append(Piece(file: f, offset: at, bytes: bytes[Int(at - offset)..<Int(end - offset)], length: Int(end - at)))
                at = end
            }
            return out
        case .zero(let f, let offset, let length):
            var out: [Piece] = []
            var at = offset
            while at < offset + length {
                let end = min((at / page + 1) * page, offset + length)
                out.append(Piece(file: f, offset: at, bytes: nil, length: Int(end - at)))
                at = end
            }
            return out
        default:
            return []
        }
    }

    /// Which of the writes after each file's last flush reach the disk.
    enum Variant: CustomStringConvertible {
        case none, all, subset(probability: Double)
        var description: String {
            switch self {
            case .none: "none of the unflushed writes"
            case .all: "all the unflushed writes"
            case .subset(let p): "a random \(Int(p * 100))% of the unflushed pages"
            }
        }
    }

    /// Undoes what a check writes to the crash image's data file, so that the next cut point
    /// starts from the durable state again without copying the whole file.
    final class UndoLog: PoolIOHook, @unchecked Sendable {
        let lock = Lock()
        let fd: FileDescriptor
        var saved: [(offset: UInt64, bytes: [UInt8])] = []
        init(fd: FileDescriptor) { self.fd = fd }

        func willPerform(_ operation: PoolIOOperation) throws(Errno) -> Int? {
            switch operation {
            case .write(.data, let offset, let bytes), .durableWrite(.data, let offset, let bytes): save(offset, bytes.count)
            case .zero(.data, let offset, let length): save(offset, Int(length))
            default: break
            }
            return nil
        }
        func didPerform(_ operation: PoolIOOperation) {}

        func save(_ offset: UInt64, _ count: Int) {
            var old = [UInt8](repeating: 0, count: count)
            _ = try? old.withUnsafeMutableBytes { try fd.read(fromAbsoluteOffset: Int64(offset), into: $0) }
            lock.withLock { saved.append((offset, old)) }
        }

        func undo() throws {
            let all = lock.withLock { defer { saved = [] }; return saved }
            for s in all.reversed() { try write(fd, s.bytes[...], at: s.offset) }
        }
    }

    static func write(_ fd: FileDescriptor, _ bytes: ArraySlice<UInt8>, at offset: UInt64) throws {
        _ = try bytes.withUnsafeBytes { try fd.writeAll(toAbsoluteOffset: Int64(offset), $0) }
    }

    static let zeros = [UInt8](repeating: 0, count: 1 << 20)

    /// Replays `recording` at `cuts` cut points into a crash image at `crash`; returns the failures.
    static func replay(_ recording: Recording, in crash: String, seed: UInt64, cuts: Int) throws -> [String] {
        var rng = SeededRandom(seed: seed ^ 0x5eed_c075)
        let events = recording.log.events
        let fm = FileManager.default
        try fm.createDirectory(atPath: crash + "/pool", withIntermediateDirectories: true)
        let data = crash + "/pool/data", metadata = crash + "/pool/metadata"
        let copy = try Oracle.run("/bin/cp", ["--sparse=always", recording.baseRoot + "/pool/data", data])
        try #require(copy.status == 0, "cp: \(copy.stderr)")
        var config = try PoolRoot(path: recording.baseRoot).config()
        config.data = data
        config.metadata = metadata
        try JSONEncoder().encode(config).write(to: URL(fileURLWithPath: crash + "/pool.json"))
        var durableMetadata = [UInt8](try Data(contentsOf: URL(fileURLWithPath: recording.baseRoot + "/pool/metadata")))
        let baseDatabase = (db: try Data(contentsOf: URL(fileURLWithPath: recording.baseRoot + "/layers.db")),
                            wal: fm.contents(atPath: recording.baseRoot + "/layers.db-wal"))

        let dataFD = try FileDescriptor.open(FilePath(data), .readWrite)
        defer { try? dataFD.close() }
        let undo = UndoLog(fd: dataFD)
        PoolIOHooks.install(undo, dataPath: data)
        defer { PoolIOHooks.remove(dataPath: data) }

        func apply(_ piece: Piece, metadata: inout [UInt8]) throws {
            switch piece.file {
            case .data:
                if let bytes = piece.bytes { try write(dataFD, bytes, at: piece.offset) } else {
                    try write(dataFD, zeros[0..<piece.length], at: piece.offset)
                }
            case .metadata:
                let o = Int(piece.offset)
                if let bytes = piece.bytes { metadata.replaceSubrange(o..<o + piece.length, with: bytes) } else {
                    metadata.replaceSubrange(o..<o + piece.length, with: repeatElement(0, count: piece.length))
                }
            }
        }

        // Cut points: half anywhere, half just before a flush or a durable write (the most writes
        // in flight; before a durable write, it too may have landed or not).
        let flushes = events.indices.filter {
            switch events[$0] {
            case .sync, .durableWrite: true
            default: false
            }
        }
        var points = Set<Int>([events.count])
        while points.count < min(cuts, events.count + 1) {
            if Bool.random(using: &rng), let f = flushes.randomElement(using: &rng) { points.insert(f) } else {
                points.insert(Int.random(in: 0...events.count, using: &rng))
            }
        }

        // The durable state advances with the cut points: each file has every write up to its last flush.
        var durableUpTo: [PoolIOOperation.File: Int] = [.data: 0, .metadata: 0]
        var failures: [String] = []
        for cut in points.sorted() {
            var lastSync: [PoolIOOperation.File: Int] = [.data: -1, .metadata: -1]
            var database = baseDatabase
            var acks: [Ack] = []
            for i in 0..<cut {
                switch events[i] {
                case .sync(let f): lastSync[f] = i
                case .database(let n): database = recording.log.databases[n]
                case .ack(let a): acks.append(a)
                default: break
                }
            }
            for f in [PoolIOOperation.File.data, .metadata] {
                while durableUpTo[f]! < lastSync[f]! {
                    let e = events[durableUpTo[f]!]
                    durableUpTo[f]! += 1
                    if case .truncate(f, let size) = e, f == .data { _ = ftruncate(dataFD.rawValue, off_t(size)) }
                    for p in pieces(of: e) where p.file == f { try apply(p, metadata: &durableMetadata) }
                }
            }
            // The unflushed writes, in order; a durable write that returned before the cut is in
            // `durable` too (it must land), and one in flight at the cut is only pending.
            var pending: [(piece: Piece, durable: Bool)] = []
            let firstUnflushed = min(lastSync[.data]!, lastSync[.metadata]!) + 1
            for i in firstUnflushed..<max(cut + 1, firstUnflushed) where i < events.count {
                var durable = false
                if case .durableWrite = events[i] { durable = i < cut } else if i == cut { continue }
                for p in pieces(of: events[i]) where i > lastSync[p.file]! { pending.append((p, durable)) }
            }
            let variant: Variant = switch Int.random(in: 0..<4, using: &rng) {
            case 0: .none
            case 1: .all
            default: .subset(probability: [0.2, 0.5, 0.8].randomElement(using: &rng)!)
            }
            var image = durableMetadata
            var applied = 0
            for (p, durable) in pending {
                let keep: Bool = switch variant {
                case .none: durable
                case .all: true
                case .subset(let probability): Double.random(in: 0..<1, using: &rng) < probability || durable
                }
                if keep {
                    if p.file == .data { undo.save(p.offset, p.length) }
                    try apply(p, metadata: &image)
                    applied += 1
                }
            }
            try Data(image).write(to: URL(fileURLWithPath: metadata))
            try database.db.write(to: URL(fileURLWithPath: crash + "/layers.db"))
            try? fm.removeItem(atPath: crash + "/layers.db-shm")
            try? fm.removeItem(atPath: crash + "/layers.db-wal")
            if let wal = database.wal { try wal.write(to: URL(fileURLWithPath: crash + "/layers.db-wal")) }

            let at = cut < events.count ? "before event \(cut) (\(events[cut].label))" : "after the last event"
            let context = "seed \(seed), cut point \(cut) of \(events.count) \(at), \(variant) (\(applied) of \(pending.count) pages)"
            // THINFS_POWERCUT_KEEP=DIR keeps the crash image of each failed cut point in DIR/cut-N.
            let keep = ProcessInfo.processInfo.environment["THINFS_POWERCUT_KEEP"]
            if let keep { _ = try Oracle.run("/bin/cp", ["-a", "--sparse=always", crash, keep + "/pending"]) }
            if let failure = check(crash: crash, acks: acks) {
                if let keep { try fm.moveItem(atPath: keep + "/pending", toPath: keep + "/cut-\(cut)") }
                failures.append("\(context): \(failure)")
                if failures.count >= 3 { break }
            }
            if let keep { try? fm.removeItem(atPath: keep + "/pending") }
            try undo.undo()
        }
        return failures
    }

    // MARK: The checks

    /// The checks one crash image must pass; the first that fails, named, or nil.
    static func check(crash: String, acks: [Ack]) -> String? {
        let metadata = crash + "/pool/metadata"
        do {
            let before = try Oracle.run("thin_check", [metadata])
            if before.status != 0 { return "thin_check before opening: \(before.stdout)\(before.stderr)" }
            let store: LayerStore
            do { store = try LayerStore.open(root: crash, logger: quietLogger) } catch {
                return "the store does not open: \(error)"
            }
            var failure: String?
            do { failure = try checkOpen(store, crash: crash, acks: acks) } catch {
                failure = "checking the opened store: \(error)"
            }
            do { try store.close() } catch { failure = failure ?? "closing the store: \(error)" }
            if let failure { return failure }
            let after = try Oracle.run("thin_check", [metadata])
            if after.status != 0 { return "thin_check after recovery: \(after.stdout)\(after.stderr)" }
            return nil
        } catch {
            return "running the checks: \(error)"
        }
    }

    static func checkOpen(_ store: LayerStore, crash: String, acks: [Ack]) throws -> String? {
        // What the acknowledgements promise, in order.
        var created = Set<String>(), removed = Set<String>()
        var synced: [String: [String: [UInt8]]] = [:]
        for a in acks {
            switch a {
            case .layerCreated(let id): created.insert(id); removed.remove(id)
            case .layerRemoving(let id): created.remove(id); synced[id] = nil
            case .layerRemoved(let id): removed.insert(id); created.remove(id); synced[id] = nil
            case .fileSynced(let layer, let name, let bytes): synced[layer, default: [:]][name] = bytes
            case .fileUnsettled(let layer, let name): synced[layer]?[name] = nil
            }
        }
        for id in created.sorted() {
            guard let layer = try store.layer(id) else {
                return "layer \(id) was created before the cut and is missing (recovery: \(store.lastRecovery); layers: \(try store.allLayers().map(\.id)))"
            }
            guard layer.state == .active else { return "layer \(id) was created before the cut and is \(layer.state)" }
        }
        for id in removed.sorted() where try store.layer(id) != nil {
            return "layer \(id) was removed before the cut and is back"
        }
        for (id, files) in synced.sorted(by: { $0.key < $1.key }) {
            let open = try store.openLayer(id, readOnly: true, what: "power-cut check")
            defer { try? open.close() }
            let v = open.volume
            for (name, bytes) in files.sorted(by: { $0.key < $1.key }) {
                let a: FileAttributes
                do { a = try v.lookup(parent: v.rootInode, name: name) } catch {
                    return "layer \(id): /\(name) was fsynced before the cut and is missing (\(error))"
                }
                guard a.size == UInt64(bytes.count) else {
                    return "layer \(id): /\(name) was fsynced with \(bytes.count) bytes and has \(a.size)"
                }
                var found = [UInt8](repeating: 0, count: bytes.count)
                let n = try found.withUnsafeMutableBytes { try v.read(a.ino, at: 0, into: $0) }
                if n != bytes.count || found != bytes {
                    let first = bytes.indices.first { found[$0] != bytes[$0] } ?? n
                    return "layer \(id): /\(name) was fsynced and differs from byte \(first) on (\(bytes.count) bytes)"
                }
            }
        }
        // e2fsck -fn on every thin device the store has: the base and each layer's.
        let pool = try #require(store.pool as? UserspaceThinPool)
        let devices = [(name: "the base device", id: store.base.deviceID, size: store.base.size)]
            + (try store.allLayers()).map { (name: "layer \($0.id)", id: $0.deviceID, size: $0.size) }
        let image = crash + "/fsck.img"
        defer { try? FileManager.default.removeItem(atPath: image) }
        for d in devices {
            try export(pool, device: d.id, size: d.size, to: image)
            let r = try Oracle.run("/sbin/e2fsck", ["-fn", image])
            if r.status != 0 { return "e2fsck -fn on \(d.name) (thin device \(d.id)) exit \(r.status): \(r.stdout)\(r.stderr)" }
        }
        return nil
    }

    /// Copies the mapped blocks of thin device `id` into a sparse image for e2fsck.
    static func export(_ pool: UserspaceThinPool, device id: ThinDeviceID, size: UInt64, to path: String) throws {
        try? FileManager.default.removeItem(atPath: path)
        let vblocks = try pool.withMetadata { md in
            var v: [UInt64] = []
            try md.mappings(id) { vb, _ in v.append(vb); return true }
            return v
        }
        let out = try FileDescriptor.open(FilePath(path), .readWrite, options: [.create, .truncate], permissions: .ownerReadWrite)
        defer { try? out.close() }
        _ = ftruncate(out.rawValue, off_t(size))
        let device = try pool.openDevice(id, size: size)
        defer { device.close() }
        let bs = pool.blockSize
        var buffer = [UInt8](repeating: 0, count: Int(bs))
        for vb in vblocks where vb * bs < size {
            let n = Int(min(bs, size - vb * bs))
            try buffer.withUnsafeMutableBytes { try device.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: vb * bs) }
            try write(out, buffer[0..<n], at: vb * bs)
        }
    }

    static func fileSize(_ path: String) throws -> UInt64 {
        (try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.uint64Value ?? 0
    }
}
