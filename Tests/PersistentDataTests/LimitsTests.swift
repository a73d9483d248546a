import Foundation
import TestSupport
import Testing
@testable import PersistentData

/// The edges of the format: 24-bit device ids, 64-bit virtual blocks, and
/// running out of data or metadata space.
@Suite struct LimitsTests {
    @Test func deviceIDsAre24Bits() throws {
        let pool = try ScratchPool()
        let md = pool.md
        let top = ThinMetadata.maxDeviceID
        #expect(top == (1 << 24) - 1)
        try md.createThin(top)
        try pool.map(top, 0..<10)
        try md.createSnap(top - 1, origin: top)
        try md.commit()
        #expect(md.deviceIDs == [top - 1, top])
        #expect(try ThinMetadata.checkID(UInt64(top)) == top)

        // One past the limit is refused by every message, and nothing changes.
        let tooLarge = ThinMetadata.MessageError.deviceIDTooLarge(1 << 24)
        #expect(throws: tooLarge) { try md.createThin(1 << 24) }
        #expect(throws: tooLarge) { try md.createSnap(1 << 24, origin: top) }
        #expect(throws: tooLarge) { try ThinMetadata.checkID(1 << 24) }
        #expect(throws: tooLarge) { try md.restoreDevice(1 << 24, details: DeviceDetails(mappedBlocks: 0, transactionID: 0, creationTime: 0, snapshottedTime: 0), mappings: []) }
        #expect(md.mode == .readWrite)
        #expect(md.deviceIDs == [top - 1, top])

        let report = try md.check()
        #expect(report.isClean, "\(report)")
        if Oracle.available {
            try Oracle.check(pool.path)
            let dump = try Oracle.dump(pool.path)
            #expect(dump.contains("dev_id=\"16777215\""))
            #expect(try md.dumpXML() == dump)
        }
    }

    @Test func virtualBlocksBeyond32Bits() throws {
        let pool = try ScratchPool()
        let md = pool.md
        try md.createThin(1)
        let vblocks: [UInt64] = [0, (1 << 32) - 2, (1 << 32) - 1, 1 << 32, (1 << 32) + 1, 1 << 40, (1 << 56) - 1]
        var expected: [UInt64: UInt64] = [:]
        for v in vblocks {
            let b = try md.allocateDataBlock()
            try md.insert(1, v, dataBlock: b)
            expected[v] = b
        }
        try md.commit()
        try md.createSnap(2, origin: 1)
        try md.insert(2, 1 << 32, dataBlock: try md.allocateDataBlock())
        try md.commit()

        let reopened = try ThinMetadata.open(storage: FileMetadataStorage(path: pool.path))
        for (v, b) in expected {
            #expect(try reopened.lookup(1, v)?.dataBlock == b, "virtual block \(v)")
        }
        // Keys that differ from a mapped one only above bit 31 must not alias it.
        #expect(try reopened.lookup(1, 1 << 33) == nil)
        #expect(try reopened.lookup(1, (1 << 40) + (1 << 32)) == nil)
        var order: [UInt64] = []
        try reopened.mappings(1) { v, _ in order.append(v); return true }
        #expect(order == vblocks)
        #expect(try reopened.highestMapped(1) == (1 << 56) - 1)
        #expect(try reopened.lookup(2, 1 << 32)?.dataBlock != expected[1 << 32])
        let report = try reopened.check()
        #expect(report.isClean, "\(report)")
        if Oracle.available {
            try Oracle.check(pool.path)
            #expect(try reopened.dumpXML() == (try Oracle.dump(pool.path)))
        }
    }

    @Test func dataSpaceExhaustion() throws {
        let pool = try ScratchPool(dataBlocks: 500)
        let md = pool.md
        try md.createThin(1)
        try pool.map(1, 0..<500)
        #expect(throws: MetadataError.noDataSpace) { try md.allocateDataBlock() }
        #expect(md.mode == .readWrite, "running out of data space is not a metadata failure")
        try md.commit()
        #expect(md.usedDataBlocks == 500)

        // A block freed in this transaction stays allocated on disk until the
        // commit, so it must not be handed out before then.
        let freed = try md.lookup(1, 0)!.dataBlock
        #expect(try md.remove(1, 0))
        #expect(throws: MetadataError.noDataSpace) { try md.allocateDataBlock() }
        try md.commit()
        #expect(try md.allocateDataBlock() == freed)
        try md.insert(1, 0, dataBlock: freed)
        try md.commit()

        let report = try md.check()
        #expect(report.isClean && report.warnings.isEmpty, "\(report)")
        if Oracle.available { try Oracle.check(pool.path) }
    }

    /// A metadata device of 64 blocks (the smallest `format` accepts) runs out
    /// after a few thousand mappings. The failing change is rolled back, the
    /// metadata goes read-only with needs_check set on disk, as the kernel's
    /// `metadata_operation_failed` does, and the last commit stays intact.
    @Test func metadataSpaceExhaustion() throws {
        let pool = try ScratchPool(metadataBytes: 64 * 4096)
        let md = pool.md
        try md.createThin(1)
        try md.commit()
        var lastCommitted = try md.dumpXML()
        var failure: Error?
        var v: UInt64 = 0
        outer: while v < 100_000 {
            do {
                for _ in 0..<97 {
                    try md.insert(1, v * 3, dataBlock: try md.allocateDataBlock())
                    v += 1
                }
                try md.commit()
                lastCommitted = try md.dumpXML()
            } catch {
                failure = error
                break outer
            }
        }
        #expect(failure as? MetadataError == .noMetadataSpace, "\(String(describing: failure)) after \(v) mappings")
        #expect(v > 1000)
        #expect(md.needsCheck)
        guard case .readOnly = md.mode else {
            Issue.record("mode is \(md.mode) after running out of metadata space")
            return
        }
        #expect(throws: MetadataError.self) { try md.createThin(2) }

        // Reopened: the last commit, flagged needs_check (flags="1" is the only
        // difference in the dump), and read-only until checked.
        let reopened = try ThinMetadata.open(storage: FileMetadataStorage(path: pool.path))
        #expect(reopened.needsCheck)
        #expect(reopened.mode != .readWrite)
        let flagged = lastCommitted.replacingOccurrences(of: " flags=\"0\" ", with: " flags=\"1\" ")
        #expect(try reopened.dumpXML() == flagged)
        let report = try reopened.check()
        #expect(report.isClean, "\(report)")
        #expect(report.warnings.contains { $0.contains("needs_check") })
        if Oracle.available {
            // thin_check 0.9.0 checks metadata with needs_check set like any other.
            let r = try Oracle.run("thin_check", [pool.path])
            #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
            print("thin_check on needs_check metadata: exit \(r.status); stderr: \(r.stderr.split(separator: "\n").joined(separator: " | "))")
            #expect(try Oracle.dump(pool.path) == flagged)
        }
    }
}
