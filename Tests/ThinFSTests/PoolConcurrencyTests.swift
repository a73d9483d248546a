import Foundation
import PersistentData
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
