import Foundation
import TestSupport
import Testing
@testable import PersistentData

@Suite struct SmokeTests {
    @Test func formatCreateSnapshotPassesThinCheck() throws {
        let dir = TempDir()
        let path = dir.file("meta", size: 8 << 20)
        let md = try ThinMetadata.format(storage: FileMetadataStorage(path: path), dataBlockSize: 128, nrDataBlocks: 1000)
        try Oracle.check(path)
        try md.createThin(1)
        for v in UInt64(0)..<300 { try md.insert(1, v, dataBlock: try md.allocateDataBlock()) }
        try md.commit()
        try Oracle.check(path)
        try md.createSnap(2, origin: 1)
        for v in UInt64(0)..<50 { try md.insert(1, v * 3, dataBlock: try md.allocateDataBlock()) }
        try md.commit()
        try Oracle.check(path)
        let ours = try md.dumpXML()
        let theirs = try Oracle.dump(path)
        #expect(ours == theirs)
    }
}
