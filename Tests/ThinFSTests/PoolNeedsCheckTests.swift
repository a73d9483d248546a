import Foundation
import SystemPackage
import TestSupport
import Testing
@testable import PersistentData
@testable import ThinFS

/// A pool whose metadata is damaged behind good checksums keeps serving: the
/// damaged read gets EIO, the pool goes read-only with needs_check (writes get
/// EROFS), the process lives on, and `thinfs pool status` says so and why once a
/// change has met the damage and set the flag on disk.
@Suite("Pool with inconsistent metadata")
struct PoolNeedsCheckTests {
    @Test func damagedMappingGivesEIOThenReadOnlyAndStatusSaysWhy() throws {
        let dir = TempDir()
        let dataPath = dir.path + "/data", metaPath = dir.path + "/metadata"
        let block = [UInt8](repeating: 0x5a, count: 64 << 10)
        do {
            let pool = try UserspaceThinPool.create(dataPath: dataPath, metadataPath: metaPath, dataSize: 64 * (64 << 10),
                                                    metadataSize: 8 << 20, blockSize: 64 << 10, logger: quietLogger)
            try pool.message(.createThin(1))
            try pool.message(.createThin(2))
            for b in 0..<8 { try block.withUnsafeBytes { try pool.write(1, $0, at: UInt64(b) << 16) } }
            try block.withUnsafeBytes { try pool.write(2, $0, at: 0) }
            try pool.close()
        }
        // Device 1's mapping tree is one leaf: give it a value size the mapping tree
        // does not use, and reseal it so its checksum is good.
        let leaf = try ThinMetadata.open(storage: FileMetadataStorage(path: metaPath, readOnly: true)).devices[1]!.root
        let storage = try FileMetadataStorage(path: metaPath)
        let b = MetadataBlock(location: leaf)
        try storage.read(block: leaf, into: b.mutableBuffer)
        b.setU32(24, 16)
        b.seal(type: .btreeNode)
        try storage.write(block: leaf, from: b.buffer)
        try storage.sync()

        let pool = try UserspaceThinPool.open(dataPath: dataPath, metadataPath: metaPath, logger: quietLogger)
        #expect(try pool.status().needsCheck == false)
        var buffer = [UInt8](repeating: 0, count: 4096)
        let readError = #expect(throws: ThinPoolError.self) {
            try buffer.withUnsafeMutableBytes { try pool.read(1, into: $0, at: 0) }
        }
        #expect(readError?.errno == .ioError, "\(String(describing: readError))")
        #expect("\(readError.map { "\($0)" } ?? "")".contains("block \(leaf)"))

        let status = try pool.status()
        #expect(status.needsCheck && status.mode == .ro, "\(status.line)")
        #expect(status.line.contains(" ro ") && status.line.contains(" needs_check "), "\(status.line)")
        #expect(status.readOnlyReason?.contains("block \(leaf)") == true, "\(String(describing: status.readOnlyReason))")

        // Writes, to the damaged device or any other, are refused as read-only.
        for id: ThinDeviceID in [1, 2] {
            let writeError = #expect(throws: ThinPoolError.self) {
                try block.withUnsafeBytes { try pool.write(id, $0, at: 1 << 20) }
            }
            #expect(writeError?.errno == .readOnlyFileSystem, "\(String(describing: writeError))")
        }
        // What is intact still reads.
        try buffer.withUnsafeMutableBytes { try pool.read(2, into: $0, at: 0) }
        #expect(buffer == Array(block[0..<4096]))
        try pool.close()

        // A read wrote nothing; a change that meets the damage (deleting the device
        // walks its tree) fails with EIO and sets needs_check on disk.
        do {
            let pool = try UserspaceThinPool.open(dataPath: dataPath, metadataPath: metaPath, logger: quietLogger)
            #expect(try pool.status().needsCheck == false)
            let deleteError = #expect(throws: ThinPoolError.self) { try pool.message(.delete(1)) }
            #expect(deleteError?.errno == .ioError, "\(String(describing: deleteError))")
            #expect(try pool.status().needsCheck)
            try pool.close()
        }

        if Oracle.available {
            #expect(try Oracle.run("thin_check", [metaPath]).status != 0)
        }

        // The flag is on disk, so a later look at the pool shows it too.
        if CLI.available {
            let root = dir.path + "/root"
            let adopt = try CLI.run(["pool", "open", "--root", root, "--data", dataPath, "--metadata", metaPath])
            #expect(adopt.status == 0, "\(adopt.stderr)")
            let line = try CLI.run(["pool", "status", "--root", root])
            #expect(line.status == 0, "\(line.stderr)")
            #expect(line.stdout.contains(" ro ") && line.stdout.contains(" needs_check "), "\(line.stdout)")
            #expect(line.stderr.contains("needs_check"), "\(line.stderr)")
            let human = try CLI.run(["pool", "status", "--human", "--root", root])
            #expect(human.stdout.contains("Mode: ro (needs_check)"), "\(human.stdout)")
            #expect(human.stdout.contains("Read-only Reason: "), "\(human.stdout)")
        }
    }
}
