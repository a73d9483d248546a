import Foundation
import TestSupport
import Testing
@testable import PersistentData

/// reserve_metadata_snap / release_metadata_snap, against thin_dump -m.
@Suite(.enabled(if: Oracle.available, "needs thin-provisioning-tools"))
struct MetadataSnapshotTests {
    @Test func heldSnapshotShowsTheOldMappings() throws {
        let pool = try ScratchPool.standard(mappings: 3000)
        let md = pool.md
        let before = try md.dumpXML()
        // The one difference thin_dump -m shows: the superblock copy does not
        // record the data device's size, so it prints nr_data_blocks="0".
        let beforeAsSnapshot = before.replacingOccurrences(of: "nr_data_blocks=\"100000\"", with: "nr_data_blocks=\"0\"")
        #expect(beforeAsSnapshot != before)

        try md.reserveMetadataSnap()
        try md.commit()
        try Oracle.check(pool.path)
        let held = try md.check()
        #expect(held.isClean && held.warnings.isEmpty, "\(held)")
        #expect(md.heldRoot != 0)
        // Nothing changed yet: the snapshot is the live state.
        #expect(try md.dumpXML(metadataSnapshot: true) == beforeAsSnapshot)
        #expect(try Oracle.dump(pool.path, metadataSnap: true) == beforeAsSnapshot)

        // Reserving again is refused, naming the held block, and changes nothing.
        #expect(throws: ThinMetadata.MessageError.metadataSnapshotHeld(md.heldRoot)) { try md.reserveMetadataSnap() }

        // Change mappings in both devices, delete one and create another.
        try pool.map(1, stride(from: 0, to: 3000, by: 5))
        try pool.map(2, 2990..<3100)
        #expect(try md.remove(1, 7))
        try md.createThin(3)
        try pool.map(3, 0..<10)
        try md.delete(2)
        try md.setTransactionID(current: 0, new: 9)
        try md.commit()
        try Oracle.check(pool.path)
        let report = try md.check()
        #expect(report.isClean && report.warnings.isEmpty, "\(report)")

        let snapshot = try Oracle.dump(pool.path, metadataSnap: true)
        #expect(try md.dumpXML(metadataSnapshot: true) == snapshot)
        #expect(snapshot == beforeAsSnapshot, "thin_dump -m shows the state at reserve time")
        let live = try md.dumpXML()
        #expect(live == (try Oracle.dump(pool.path)))
        #expect(live != before)
        #expect(try md.lookup(1, 5)?.dataBlock != nil)

        try md.releaseMetadataSnap()
        try md.commit()
        #expect(md.heldRoot == 0)
        try Oracle.check(pool.path)
        #expect(try md.check().isClean)
        #expect(try md.dumpXML() == live)
        let noSnap = try Oracle.run("thin_dump", ["-m", pool.path])
        #expect(noSnap.status != 0, "thin_dump -m with no snapshot held")
        #expect(throws: ThinMetadata.MessageError.noMetadataSnapshot) { try md.releaseMetadataSnap() }

        // Releasing dropped every reference the snapshot held: deleting what is
        // left frees every data block and all metadata but the empty pool's.
        try md.delete(1)
        try md.delete(3)
        try md.commit()
        #expect(md.usedDataBlocks == 0)
        #expect(try md.check().isClean)
        try Oracle.check(pool.path)
    }

    /// A snapshot held across reopening, then released by the new instance.
    @Test func heldSnapshotSurvivesReopen() throws {
        let pool = try ScratchPool.standard(mappings: 500)
        try pool.md.reserveMetadataSnap()
        try pool.map(2, 0..<100)
        try pool.md.commit()
        let snapshot = try pool.md.dumpXML(metadataSnapshot: true)

        let reopened = try ThinMetadata.open(storage: FileMetadataStorage(path: pool.path))
        #expect(reopened.heldRoot == pool.md.heldRoot)
        #expect(try reopened.dumpXML(metadataSnapshot: true) == snapshot)
        #expect(try reopened.check().isClean)
        try reopened.releaseMetadataSnap()
        try reopened.commit()
        try Oracle.check(pool.path)
        #expect(try reopened.check().isClean)
    }

    /// `HeldMetadataSnapshot` reads only the held copy's trees (what the kernel pool reads from a
    /// live pool's metadata device): its devices and mappings must be thin_dump -m's, even after
    /// the live state has moved on.
    @Test func heldSnapshotReaderMatchesThinDumpM() throws {
        let pool = try ScratchPool.standard(mappings: 3000)
        let md = pool.md
        #expect(try HeldMetadataSnapshot.read(storage: FileMetadataStorage(path: pool.path)) == nil, "no snapshot held yet")
        try md.reserveMetadataSnap()
        try md.commit()
        // The live state moves on: more mappings, a device deleted, another created.
        try pool.map(1, stride(from: 1, to: 3000, by: 3))
        try md.delete(2)
        try md.createThin(3)
        try pool.map(3, 0..<50)
        try md.commit()

        let snap = try #require(try HeldMetadataSnapshot.read(storage: FileMetadataStorage(path: pool.path)))
        var ours: [String] = []
        for (id, details) in try snap.devices().sorted(by: { $0.key < $1.key }) {
            ours.append("device \(id) mapped \(details.mappedBlocks)")
            try snap.mappings(id) { v, bt in
                ours.append("\(id) \(v) \(bt.block) \(bt.time)")
                return true
            }
        }
        // thin_dump -m's XML, expanded to one line per mapping.
        var theirs: [String] = []
        var device = ""
        for line in try Oracle.dump(pool.path, metadataSnap: true).split(separator: "\n") {
            func attribute(_ name: String) -> UInt64 {
                guard let r = line.range(of: "\(name)=\"") else { return 0 }
                return UInt64(line[r.upperBound...].prefix { $0 != "\"" }) ?? 0
            }
            if line.contains("<device ") {
                device = String(attribute("dev_id"))
                theirs.append("device \(device) mapped \(attribute("mapped_blocks"))")
            } else if line.contains("<single_mapping") {
                theirs.append("\(device) \(attribute("origin_block")) \(attribute("data_block")) \(attribute("time"))")
            } else if line.contains("<range_mapping") {
                for k in 0..<attribute("length") {
                    theirs.append("\(device) \(attribute("origin_begin") + k) \(attribute("data_begin") + k) \(attribute("time"))")
                }
            }
        }
        #expect(theirs.count > 3000, "the snapshot holds devices 1 and 2 with their mappings")
        #expect(ours == theirs)
        #expect(!ours.contains { $0.hasPrefix("device 3") }, "device 3 was made after the snapshot")
    }
}
