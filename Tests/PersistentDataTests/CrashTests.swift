import Foundation
import Testing
@testable import PersistentData

/// A commit that dies part way, followed (or not) by a power cut, must leave
/// exactly the previous commit: shadow paging writes only blocks free in the
/// committed state, and the superblock last.
@Suite struct CrashTests {
    /// One pool's history: a committed state A, then uncommitted changes that a
    /// successful commit would turn into state B.
    struct Scenario {
        let storage = MemoryMetadataStorage(nrBlocks: 4096)
        let md: ThinMetadata
        let committed: String

        init() throws {
            md = try ThinMetadata.format(storage: storage, dataBlockSize: 128, nrDataBlocks: 20_000)
            try md.createThin(1)
            for v in UInt64(0)..<2000 { try md.insert(1, v, dataBlock: try md.allocateDataBlock()) }
            try md.commit()
            try md.createSnap(2, origin: 1)
            try md.createThin(7)
            try md.commit()
            committed = try md.dumpXML()

            // Changes touching every structure: both mapping trees (shared
            // leaves are copied), the top-level and details trees, a device
            // deleted, the data space map and its ref-count tree.
            for v in stride(from: UInt64(0), to: 2000, by: 3) { try md.insert(1, v, dataBlock: try md.allocateDataBlock()) }
            for v in UInt64(5000)..<5300 { try md.insert(2, v, dataBlock: try md.allocateDataBlock()) }
            for v in stride(from: UInt64(1), to: 600, by: 2) { try md.remove(2, v) }
            try md.createSnap(3, origin: 2)
            try md.delete(7)
            try md.setTransactionID(current: 0, new: 5)
        }

        /// Opens what the storage holds now and checks it.
        func reopen() throws -> (xml: String, report: CheckReport) {
            let md = try ThinMetadata.open(storage: storage)
            return (try md.dumpXML(), try md.check())
        }
    }

    /// The step before the superblock (the pool's data fdatasync) fails: nothing is committed,
    /// the storage opens at the previous commit, crash or not, and the transaction is abandoned
    /// (PoolFaultTests shows what a retry would have published).
    @Test func aFailureBeforeTheSuperblockCommitsNothingAndAbandonsTheTransaction() throws {
        let s = try Scenario()
        #expect(s.md.commitWouldWrite)
        #expect(throws: MetadataError.self) {
            try s.md.commit(beforeSuperblock: { () throws(MetadataError) in throw .io(operation: "fdatasync", path: "data", errno: EIO) })
        }
        // Nothing of the transaction reached the superblock, before a crash or after one; the
        // superblock differs from the last commit only in its needs_check flag (flags="1").
        let flagged = s.committed.replacingOccurrences(of: "flags=\"0\"", with: "flags=\"1\"")
        #expect(flagged != s.committed)
        #expect(try s.reopen().xml == flagged)
        s.storage.crash()
        #expect(try s.reopen().xml == flagged)
        // The transaction is gone, not kept for a retry: a later sync of the data that returns 0
        // (Linux reports a write-back error once) would not prove that its blocks hold their data.
        // As after any failed change, the metadata is read-only and flagged for checking.
        #expect(throws: MetadataError.self) { try s.md.commit() }
        let (xml, report) = try s.reopen()
        #expect(xml == flagged)
        #expect(report.isClean, "\(report)")
        #expect(try ThinMetadata.open(storage: s.storage).needsCheck)
    }

    /// After a commit, a commit with no change in between has nothing to write; a change to
    /// the superblock alone (the transaction id) has.
    @Test func aCommitWithNothingChangedHasNothingToWrite() throws {
        let s = try Scenario()
        try s.md.commit()
        #expect(!s.md.commitWouldWrite)
        try s.md.setTransactionID(current: 5, new: 6)
        #expect(s.md.commitWouldWrite)
        try s.md.commit()
        s.storage.crash()
        #expect(try ThinMetadata.open(storage: s.storage).transactionID == 6)
    }

    @Test func uncommittedChangesAreLostInACrash() throws {
        let s = try Scenario()
        s.storage.crash()
        let (xml, report) = try s.reopen()
        #expect(xml == s.committed)
        #expect(report.isClean, "\(report)")
    }

    /// Every write of the commit in turn fails with EIO: the commit throws, the
    /// instance turns read-only, and the storage, after a crash or not, opens
    /// at the previous commit. Past the last write, the commit succeeds and
    /// survives the crash.
    @Test(arguments: [true, false])   // whether power is cut after the failed commit
    func commitDyingAtEveryWrite(crash: Bool) throws {
        var writes = 0
        while true {
            let s = try Scenario()
            s.storage.failWritesAfter = writes
            let succeeded: Bool
            do {
                try s.md.commit()
                succeeded = true
            } catch {
                succeeded = false
                #expect(error == .io(operation: "write", path: "memory", errno: EIO), "write \(writes)")
                #expect(s.md.mode != .readWrite, "write \(writes)")
            }
            let expected = succeeded ? try s.md.dumpXML() : s.committed
            s.storage.failWritesAfter = nil
            if crash { s.storage.crash() }
            let (xml, report) = try s.reopen()
            #expect(xml == expected, "commit failing at write \(writes), crash \(crash)")
            #expect(report.isClean, "write \(writes): \(report)")
            if succeeded {
                // The commit needs a good number of writes, each of them tried above.
                #expect(writes > 20)
                print("a commit of the crash scenario writes \(writes) blocks")
                break
            }
            writes += 1
        }
    }

    /// A dying device: a write of the commit fails, then so does the read with
    /// which the rollback reloads the last commit, and then writes work again.
    /// The superblock must not be rewritten with this transaction's roots,
    /// whose blocks were never all written (the kernel sets fail_io and leaves
    /// the disk alone when `dm_pool_abort_metadata` fails).
    @Test func failedRollbackWritesNoSuperblock() throws {
        for failAt in [0, 5, 20] {
            let s = try Scenario()
            // Drop the scenario's own changes and make some on an instance over the dying device.
            s.storage.crash()
            let md = try ThinMetadata.open(storage: DyingStorage(s.storage, writesBeforeFailure: failAt))
            for v in stride(from: UInt64(0), to: 2000, by: 3) { try md.insert(1, v, dataBlock: try md.allocateDataBlock()) }
            try md.delete(7)
            #expect(throws: MetadataError.self) { try md.commit() }
            #expect(md.mode != .readWrite)
            s.storage.crash()
            let (xml, report) = try s.reopen()
            #expect(xml == s.committed, "write \(failAt) failed, then the rollback's read")
            #expect(report.isClean, "write \(failAt): \(report)")
        }
    }

    /// An abort that cannot reload the last commit has already dropped the
    /// cached blocks of the transaction; the instance must then refuse to
    /// commit, or it would publish roots whose blocks were never written.
    @Test func failedAbortLeavesTheInstanceReadOnly() throws {
        let s = try Scenario()
        s.storage.crash()
        let dying = DyingStorage(s.storage, writesBeforeFailure: -1)
        let md = try ThinMetadata.open(storage: dying)
        for v in stride(from: UInt64(0), to: 2000, by: 3) { try md.insert(1, v, dataBlock: try md.allocateDataBlock()) }
        dying.failNextRead = true
        #expect(throws: MetadataError.self) { try md.abort() }
        #expect(throws: MetadataError.self) { try md.commit() }
        #expect(md.mode != .readWrite)
        s.storage.crash()
        let (xml, report) = try s.reopen()
        #expect(xml == s.committed)
        #expect(report.isClean, "\(report)")
    }

    /// A failed commit flags needs_check when the superblock can still be
    /// written; reopening then shows the previous commit, flagged.
    @Test func failedCommitWithAWritableSuperblockSetsNeedsCheck() throws {
        let s = try Scenario()
        // Fails the first block write only, so the rollback's superblock write succeeds.
        final class FailOnce: MetadataStorage {
            let inner: MemoryMetadataStorage
            var failed = false
            init(_ inner: MemoryMetadataStorage) { self.inner = inner }
            var nrBlocks: UInt64 { inner.nrBlocks }
            var name: String { inner.name }
            func read(block: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(MetadataError) { try inner.read(block: block, into: buffer) }
            func write(block: UInt64, from buffer: UnsafeRawBufferPointer) throws(MetadataError) {
                if !failed {
                    failed = true
                    throw .io(operation: "write", path: name, errno: EIO)
                }
                try inner.write(block: block, from: buffer)
            }
            func sync() throws(MetadataError) { try inner.sync() }
        }
        let storage = FailOnce(s.storage)
        let md = try ThinMetadata.open(storage: storage)
        try md.createThin(9)
        #expect(throws: MetadataError.self) { try md.commit() }
        #expect(md.needsCheck)
        s.storage.crash()
        let reopened = try ThinMetadata.open(storage: s.storage)
        #expect(reopened.needsCheck)
        #expect(try reopened.dumpXML() == s.committed.replacingOccurrences(of: " flags=\"0\" ", with: " flags=\"1\" "))
        #expect(try reopened.check().isClean)
    }
}

/// Fails one write (after `writesBeforeFailure` good ones), then the next read.
final class DyingStorage: MetadataStorage {
    let inner: MemoryMetadataStorage
    var writesBeforeFailure: Int
    var failNextRead = false
    init(_ inner: MemoryMetadataStorage, writesBeforeFailure: Int) {
        self.inner = inner
        self.writesBeforeFailure = writesBeforeFailure
    }
    var nrBlocks: UInt64 { inner.nrBlocks }
    var name: String { inner.name }
    func read(block: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(MetadataError) {
        if failNextRead {
            failNextRead = false
            throw .io(operation: "read", path: name, errno: EIO)
        }
        try inner.read(block: block, into: buffer)
    }
    func write(block: UInt64, from buffer: UnsafeRawBufferPointer) throws(MetadataError) {
        if writesBeforeFailure == 0 {
            writesBeforeFailure = -1
            failNextRead = true
            throw .io(operation: "write", path: name, errno: EIO)
        }
        writesBeforeFailure -= 1
        try inner.write(block: block, from: buffer)
    }
    func sync() throws(MetadataError) { try inner.sync() }
}
