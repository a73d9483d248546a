import Foundation
import PersistentData
import Synchronization
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS

@Suite("Concurrent I/O")
struct PoolConcurrencyTests {
    /// Eight threads write 4 KiB slots of the same shared blocks at once: every
    /// block is written by two threads, so pairs race to break the same
    /// sharing. Each slot is written by exactly one thread, so the result is
    /// known; the snapshot must be untouched and each block copied once.
    @Test(.enabled(if: Oracle.available, "needs thin-provisioning-tools"))
    func racingWritersOnSharedBlocks() throws {
        let dir = TempDir()
        let pool = try UserspaceThinPool.create(dataPath: dir.path + "/data", metadataPath: dir.path + "/metadata",
                                                dataSize: 256 << 20, metadataSize: 8 << 20, blockSize: 64 << 10, logger: quietLogger)
        let blockSize = 64 << 10, blocks = 64
        let original = (0..<blocks * blockSize).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        try pool.message(.createThin(1))
        try original.withUnsafeBytes { try pool.write(1, $0, at: 0) }
        try pool.message(.createSnap(2, origin: 1))
        let usedBefore = try pool.status().usedDataBlocks

        let threads = 8
        let slotsPerBlock = blockSize / 4096
        // Slot s of every block belongs to thread s % threads, so every thread touches every block.
        let errors = ThreadErrors()
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            var slot = [UInt8](repeating: UInt8(t + 1), count: 4096)
            for b in 0..<blocks {
                for s in stride(from: t, to: slotsPerBlock, by: threads) {
                    slot[0] = UInt8(b)
                    let offset = UInt64(b * blockSize + s * 4096)
                    errors.run("thread \(t) writing at \(offset)") { try slot.withUnsafeBytes { try pool.write(1, $0, at: offset) } }
                }
            }
        }
        try #require(errors.all.isEmpty, "\(errors.all)")
        try pool.commit()

        var origin = [UInt8](repeating: 0, count: blocks * blockSize)
        var snap = origin
        try origin.withUnsafeMutableBytes { try pool.read(1, into: $0, at: 0) }
        try snap.withUnsafeMutableBytes { try pool.read(2, into: $0, at: 0) }
        #expect(snap == original, "the snapshot changed")
        for b in 0..<blocks {
            for s in 0..<slotsPerBlock {
                let base = b * blockSize + s * 4096
                let owner = s % threads
                #expect(origin[base] == UInt8(b) && origin[base + 1] == UInt8(owner + 1) && origin[base + 4095] == UInt8(owner + 1),
                        "block \(b) slot \(s)")
            }
        }
        // Exactly one copy per block: a racing writer that lost must reuse the winner's copy.
        #expect(try pool.status().usedDataBlocks == usedBefore + UInt64(blocks))
        #expect(try pool.details(1).mappedBlocks == UInt64(blocks))
        try Oracle.check(dir.path + "/metadata")
    }

    /// Readers run while writers break sharing and a third thread commits:
    /// a reader must always see either the old or the new contents of a 4 KiB slot, never zeros or another block.
    @Test func readersDuringWritesAndCommits() throws {
        let dir = TempDir()
        let pool = try UserspaceThinPool.create(dataPath: dir.path + "/data", metadataPath: dir.path + "/metadata",
                                                dataSize: 256 << 20, metadataSize: 8 << 20, blockSize: 64 << 10, logger: quietLogger)
        let size = 4 << 20
        try pool.message(.createThin(1))
        let old = [UInt8](repeating: 0xAA, count: size)
        try old.withUnsafeBytes { try pool.write(1, $0, at: 0) }
        try pool.message(.createSnap(2, origin: 1))
        let failures = Counter()
        let errors = ThreadErrors()
        DispatchQueue.concurrentPerform(iterations: 4) { role in
            var rng = SeededRandom(seed: UInt64(role))
            var buffer = [UInt8](repeating: 0, count: 4096)
            for i in 0..<400 {
                let slot = Int.random(in: 0..<(size / 4096), using: &rng)
                let offset = UInt64(slot * 4096)
                switch role {
                case 0, 1:
                    let new = [UInt8](repeating: 0xBB, count: 4096)
                    errors.run("writer \(role) at \(offset)") { try new.withUnsafeBytes { try pool.write(1, $0, at: offset) } }
                case 2:
                    errors.run("reading the origin at \(offset)") { try buffer.withUnsafeMutableBytes { try pool.read(1, into: $0, at: offset) } }
                    if !(buffer.allSatisfy { $0 == 0xAA } || buffer.allSatisfy { $0 == 0xBB }) { failures.add() }
                    errors.run("reading the snapshot at \(offset)") { try buffer.withUnsafeMutableBytes { try pool.read(2, into: $0, at: offset) } }
                    if !buffer.allSatisfy({ $0 == 0xAA }) { failures.add() }
                default:
                    if i % 20 == 0 { errors.run("commit \(i / 20)") { try pool.commit() } }
                }
            }
        }
        try #require(errors.all.isEmpty, "\(errors.all)")
        #expect(failures.value == 0)
    }
}

final class Counter: @unchecked Sendable {
    private let lock = Lock()
    private var n = 0
    func add() { lock.withLock { n += 1 } }
    var value: Int { lock.withLock { n } }
}

/// Errors thrown on `concurrentPerform`'s threads, kept for the test to check: a `try!` there
/// would kill the whole test process instead of failing one test.
/// fsync through a `VolumeGroup` when several arrive at once: they share commits (group
/// commit), and each that returned must be in the pool's last commit.
@Suite("Group commit", .enabled(if: E2fsprogs.available, "needs e2fsprogs"))
struct GroupCommitTests {
    /// Eight threads on two volumes of one pool each create files and fsync each one, while two
    /// more write without fsync; then the pool throws away everything after its last commit
    /// (what a crash leaves). Every file whose fsync returned must be there with its bytes, and
    /// the ext4 of each device, opened afresh, must check clean with e2fsck.
    @Test func everyFsyncThatReturnedSurvivesACrash() throws {
        let dir = TempDir()
        let size: UInt64 = 128 << 20
        let pool = try UserspaceThinPool.create(dataPath: dir.path + "/data", metadataPath: dir.path + "/metadata",
                                                dataSize: 1 << 30, metadataSize: 32 << 20, blockSize: 64 << 10, logger: quietLogger)
        for id: ThinDeviceID in [1, 2] {
            try pool.message(.createThin(id))
            _ = try DeviceFormatter(logger: quietLogger).format(pool: pool, id: id, size: size, scratchDirectory: dir.path + "/tmp")
        }
        try pool.commit()
        let group = VolumeGroup(pool: pool, logger: quietLogger)
        let members = [try group.open(device: 1, size: size, readOnly: false, logger: quietLogger),
                       try group.open(device: 2, size: size, readOnly: false, logger: quietLogger)]
        let synced = Mutex<[(device: Int, name: String, bytes: [UInt8])]>([])
        let errors = ThreadErrors()
        DispatchQueue.concurrentPerform(iterations: 10) { t in
            let v = members[t % 2].volume
            for i in 0..<25 {
                let name = "t\(t)-\(i)"
                let bytes = (0..<(1000 + 37 * i)).map { UInt8(truncatingIfNeeded: $0 &* (t + 3) &+ i) }
                errors.run("thread \(t) file \(i)") {
                    let ino = try v.mknod(parent: v.rootInode, name: name, mode: 0o100644, rdev: 0, owner: .root).ino
                    _ = try bytes.withUnsafeBytes { try v.write(ino, at: 0, from: $0) }
                    // Threads 8 and 9 never fsync: their files may or may not survive.
                    if t < 8 {
                        try v.fsync(ino)
                        synced.withLock { $0.append((t % 2, name, bytes)) }
                    }
                }
            }
        }
        try #require(errors.all.isEmpty, "\(errors.all)")
        try pool.abortTransaction()

        let survivors = synced.withLock { $0 }
        #expect(survivors.count == 8 * 25)
        for id: ThinDeviceID in [1, 2] {
            let v = try Volume(device: pool.openDevice(id, size: size), readOnly: true, logger: quietLogger)
            for s in survivors where s.device == Int(id) - 1 {
                do {
                    let a = try v.lookup(parent: v.rootInode, name: s.name)
                    var got = [UInt8](repeating: 0, count: Int(a.size))
                    let n = try got.withUnsafeMutableBytes { try v.read(a.ino, at: 0, into: $0) }
                    #expect(n == s.bytes.count && got == s.bytes, "device \(id): \(s.name) was fsynced but holds \(n) other bytes")
                } catch {
                    Issue.record("device \(id): \(s.name) was fsynced but is gone after the crash: \(error)")
                }
            }
            try v.close()
            let image = dir.path + "/dev\(id).img"
            let out = try FileBlockDevice.create(path: FilePath(image), size: size)
            try pool.openDevice(id, size: size).copy(to: out, length: size)
            try E2fsprogs.check(image)
        }
        withExtendedLifetime(members) {}
    }
}

final class ThreadErrors: @unchecked Sendable {
    private let lock = Lock()
    private var errors: [String] = []

    /// Runs `body`, recording what it throws with `what` it was doing.
    func run(_ what: @autoclosure () -> String, _ body: () throws -> Void) {
        do { try body() } catch {
            let line = "\(what()): \(error)"
            lock.withLock { errors.append(line) }
        }
    }

    var all: [String] { lock.withLock { errors } }
}
