import Foundation
import TestSupport
import Testing
@testable import PersistentData

/// Long random histories of pool messages and writes against a model of the
/// devices' mappings, checked after every commit by our checker and, now and
/// then, by thin_check and thin_dump. Snapshots of snapshots push metadata and
/// data counts past 2 (into the ref-count trees) and back.
@Suite struct PoolHistoryTests {
    struct Model {
        var devices: [ThinDeviceID: [UInt64: UInt64]] = [:]
    }

    @Test(arguments: [
        (seed: UInt64(11), metadataMiB: UInt64(8)),     // one metadata bitmap
        (seed: UInt64(12), metadataMiB: UInt64(80)),    // two metadata bitmaps (16320 blocks each)
        (seed: UInt64(13), metadataMiB: UInt64(8)),
    ])
    func randomHistory(seed: UInt64, metadataMiB: UInt64) throws {
        var rng = SeededRandom(seed: seed)
        let pool = try ScratchPool(metadataBytes: metadataMiB << 20, dataBlocks: 100_000)
        var md = pool.md
        var model = Model()
        var committed = model
        var nextID: ThinDeviceID = 1
        var held = false

        for step in 0..<60 {
            for _ in 0..<Int.random(in: 1...8, using: &rng) {
                let ids = model.devices.keys.sorted()
                switch Int.random(in: 0..<100, using: &rng) {
                case 0..<6 where ids.count < 12:
                    try md.createThin(nextID)
                    model.devices[nextID] = [:]
                    nextID += 1
                case 6..<14 where !ids.isEmpty && ids.count < 12:
                    let origin = ids.randomElement(using: &rng)!
                    try md.createSnap(nextID, origin: origin)
                    model.devices[nextID] = model.devices[origin]
                    nextID += 1
                case 14..<18 where ids.count > 2:
                    let victim = ids.randomElement(using: &rng)!
                    try md.delete(victim)
                    model.devices[victim] = nil
                case 18..<30 where !ids.isEmpty:
                    // Unmap a run.
                    let id = ids.randomElement(using: &rng)!
                    let start = UInt64.random(in: 0..<3000, using: &rng)
                    for v in start..<(start + UInt64.random(in: 1...150, using: &rng)) {
                        let was = try md.remove(id, v)
                        #expect(was == (model.devices[id]![v] != nil), "seed \(seed) step \(step): remove \(id)/\(v)")
                        model.devices[id]![v] = nil
                    }
                case 30..<100 where !ids.isEmpty:
                    // Write a run: a new block for each (the pool's copy-on-write of shared blocks).
                    let id = ids.randomElement(using: &rng)!
                    let start = UInt64.random(in: 0..<3000, using: &rng)
                    for v in start..<(start + UInt64.random(in: 1...200, using: &rng)) {
                        guard md.usedDataBlocks < md.nrDataBlocks - 1 else { break }
                        let b = try md.allocateDataBlock()
                        try md.insert(id, v, dataBlock: b)
                        model.devices[id]![v] = b
                    }
                default:
                    break
                }
            }
            // Now and then a metadata snapshot is taken or dropped.
            if step % 9 == 4 {
                if held {
                    try md.releaseMetadataSnap()
                } else {
                    // Reserving commits first (so the snapshot's roots are on disk).
                    try md.reserveMetadataSnap()
                    committed = model
                }
                held.toggle()
            }
            if Int.random(in: 0..<8, using: &rng) == 0 {
                // Throw the transaction away instead of committing it.
                try md.abort()
                model = committed
                held = md.heldRoot != 0
                continue
            }
            try md.commit()
            committed = model

            let report = try md.check()
            #expect(report.isClean && report.warnings.isEmpty, "seed \(seed) step \(step): \(report)")
            if step % 10 == 9 {
                // Reopen, compare every mapping with the model, and ask the oracle.
                md = try ThinMetadata.open(storage: FileMetadataStorage(path: pool.path))
                #expect(md.deviceIDs == model.devices.keys.sorted(), "seed \(seed) step \(step)")
                for (id, mappings) in model.devices {
                    var seen: [UInt64: UInt64] = [:]
                    try md.mappings(id) { v, bt in seen[v] = bt.block; return true }
                    #expect(seen == mappings, "seed \(seed) step \(step): device \(id)")
                    #expect(md.details(id)?.mappedBlocks == UInt64(mappings.count), "seed \(seed) step \(step): device \(id)")
                }
                if Oracle.available {
                    try Oracle.check(pool.path)
                    #expect(try md.dumpXML() == (try Oracle.dump(pool.path)), "seed \(seed) step \(step)")
                    if held {
                        #expect(try md.dumpXML(metadataSnapshot: true) == (try Oracle.dump(pool.path, metadataSnap: true)))
                    }
                }
            }
        }
        // Deleting everything returns every data block.
        if held { try md.releaseMetadataSnap() }
        for id in md.deviceIDs { try md.delete(id) }
        try md.commit()
        #expect(md.usedDataBlocks == 0, "seed \(seed)")
        let report = try md.check()
        #expect(report.isClean && report.warnings.isEmpty, "seed \(seed): \(report)")
        if Oracle.available { try Oracle.check(pool.path) }
    }

    /// Growing the data device adds bitmaps and extends the last partial one.
    @Test func dataResizeAcrossBitmaps() throws {
        let pool = try ScratchPool(dataBlocks: 1000)
        let md = pool.md
        try md.createThin(1)
        try pool.map(1, 0..<1000)
        try md.commit()
        try md.resizeData(nrBlocks: 40_000)   // three bitmaps of 16320
        #expect(md.nrDataBlocks == 40_000)
        try pool.map(1, 1000..<20_000)
        try md.commit()
        let reopened = try ThinMetadata.open(storage: FileMetadataStorage(path: pool.path))
        #expect(reopened.nrDataBlocks == 40_000)
        #expect(reopened.usedDataBlocks == 20_000)
        let report = try reopened.check()
        #expect(report.isClean && report.warnings.isEmpty, "\(report)")
        #expect(throws: MetadataError.self) { try reopened.resizeData(nrBlocks: 30_000) }
        if Oracle.available {
            try Oracle.check(pool.path)
            #expect(try reopened.dumpXML() == (try Oracle.dump(pool.path)))
        }
    }
}
