import Foundation
import PersistentData
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS

/// What a pool commit sends its two files, in order: the host flushes an fsync waits for, and
/// dm-thin's rule that the superblock never becomes durable before what it points at. The
/// power-cut replay (`PowerCutTests`) checks what a crash leaves; this checks the sequence.
@Suite("Commit flushes")
struct CommitFlushTests {
    /// The pool's writes and flushes, by kind, in the order they completed.
    final class Recorder: PoolIOHook, @unchecked Sendable {
        let lock = Lock()
        private var ops: [String] = []

        func willPerform(_ operation: PoolIOOperation) throws(Errno) -> Int? { nil }

        func didPerform(_ operation: PoolIOOperation) {
            let name: String? = switch operation {
            case .write(let f, let offset, _): "write \(f.rawValue)" + (f == .metadata && offset == 0 ? " superblock" : "")
            case .durableWrite(let f, let offset, _): "durable write \(f.rawValue)" + (f == .metadata && offset == 0 ? " superblock" : "")
            case .sync(let f): "sync \(f.rawValue)"
            case .zero(let f, _, _): "zero \(f.rawValue)"
            case .truncate, .read: nil
            }
            if let name { lock.withLock { ops.append(name) } }
        }

        /// The operations since the last call.
        func take() -> [String] { lock.withLock { defer { ops = [] }; return ops } }
    }

    static let bs: UInt64 = 64 << 10

    static func pool(_ dir: TempDir, _ recorder: Recorder, atomicCommit: Bool = true) throws -> UserspaceThinPool {
        PoolIOHooks.install(recorder, dataPath: dir.path + "/data")
        let pool = try UserspaceThinPool.create(dataPath: dir.path + "/data", metadataPath: dir.path + "/metadata",
                                                dataSize: 64 * bs, metadataSize: 4 << 20, blockSize: bs,
                                                options: .init(atomicCommit: atomicCommit), logger: quietLogger)
        try pool.message(.createThin(1))
        return pool
    }

    /// One whole pool block of `byte` at virtual block `block` of thin device 1.
    static func write(_ pool: UserspaceThinPool, block: UInt64, _ byte: UInt8) throws {
        let bytes = [UInt8](repeating: byte, count: Int(bs))
        try bytes.withUnsafeBytes { try pool.write(1, $0, at: block * bs) }
    }

    @Test func aCommitSyncsDataAndMetadataThenWritesTheSuperblockDurably() throws {
        let dir = TempDir()
        let recorder = Recorder()
        defer { PoolIOHooks.remove(dataPath: dir.path + "/data") }
        let pool = try Self.pool(dir, recorder)
        defer { try? pool.close() }
        _ = recorder.take()

        try Self.write(pool, block: 0, 0xa5)
        try pool.commit()
        let ops = recorder.take()
        let superblock = "durable write metadata superblock"
        // The superblock is written once, last, by a write that is durable when it returns; no
        // plain write of it, and no flush after it.
        #expect(ops.last == superblock, "\(ops)")
        #expect(ops.filter { $0 == superblock }.count == 1, "\(ops)")
        #expect(!ops.contains("write metadata superblock"), "\(ops)")
        let at = try #require(ops.firstIndex(of: superblock))
        // Before it, both files are synced, and no metadata block is written after the
        // metadata file's sync: everything the superblock points at is durable first.
        #expect(ops[..<at].contains("sync data"), "\(ops)")
        let metadataSync = try #require(ops[..<at].lastIndex(of: "sync metadata"), "\(ops)")
        #expect(!ops[metadataSync...].contains("write metadata"), "\(ops)")
        // Two flushes of a whole file per commit, not three: one of each file. They run in
        // parallel (the data file's on another thread), so they are recorded in either order.
        #expect(ops.filter { $0.hasPrefix("sync") }.sorted() == ["sync data", "sync metadata"], "\(ops)")

        // Nothing changed since: a second commit writes and flushes nothing.
        try pool.commit()
        #expect(recorder.take() == [])
    }

    @Test func aCommitWithOnlyInPlaceDataWritesSyncsTheDataFileAlone() throws {
        // Without atomic commit, a rewrite of a committed block the device owns alone goes in
        // place and changes no mapping: the superblock on disk already points at it.
        let dir = TempDir()
        let recorder = Recorder()
        defer { PoolIOHooks.remove(dataPath: dir.path + "/data") }
        let pool = try Self.pool(dir, recorder, atomicCommit: false)
        defer { try? pool.close() }
        try Self.write(pool, block: 0, 0xa5)
        try pool.commit()
        _ = recorder.take()

        try Self.write(pool, block: 0, 0x3c)
        try pool.commit()
        #expect(recorder.take() == ["write data", "sync data"])
        var back = [UInt8](repeating: 0, count: Int(Self.bs))
        try back.withUnsafeMutableBytes { try pool.read(1, into: $0, at: 0) }
        #expect(back == [UInt8](repeating: 0x3c, count: Int(Self.bs)))

        // A write that maps a new block is a full commit again.
        try Self.write(pool, block: 1, 0x5a)
        try pool.commit()
        #expect(recorder.take().last == "durable write metadata superblock")
    }
}
