import Foundation
import TestSupport
import Testing
@testable import PersistentData

/// Metadata the fuzzer (Fuzz/, scripts/fuzz.sh) found crashing the process, checked in as the
/// metadata image each harness built from its crashing input (Fixtures/fuzz/README.md says how).
/// Each crashed on an allocation sized by a field read from disk; each must now end in a report
/// or a typed error, and what the damage does not touch must still read.
@Suite struct FuzzFindingTests {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures/fuzz")

    /// The fixture as a 128-block metadata file (the harnesses' device size; the image leaves
    /// off its zero blocks at the end).
    static func storage(_ name: String, in dir: TempDir) throws -> FileMetadataStorage {
        var bytes = try Data(contentsOf: Self.directory.appendingPathComponent(name))
        bytes.append(Data(count: 128 * 4096 - bytes.count))
        let path = dir.path + "/" + name
        try bytes.write(to: URL(fileURLWithPath: path))
        return try FileMetadataStorage(path: path)
    }

    /// The live superblock's metadata_nr_blocks is 2^43 + 128 (the device has 128 blocks).
    /// Reading the held metadata snapshot sized a space map by it: 2^43 2-bit entries, an
    /// allocation of 2.5 TiB (fuzz-superblock: "requested allocation size 0x28000000040 exceeds
    /// maximum supported size"). The snapshot's trees do not depend on that field.
    @Test func heldSnapshotIgnoresABogusMetadataSize() throws {
        let dir = TempDir()
        let storage = try Self.storage("held-snapshot-metadata-nr-blocks-2-43.img", in: dir)
        let held = try #require(try HeldMetadataSnapshot.read(storage: storage))
        // The reference pool's four devices (Fuzz/Sources/FuzzSupport/ReferencePool.swift), held at its last commit.
        #expect(try held.devices().keys.sorted() == [0, 1, 2, 3])
        var mapped = 0
        try held.mappings(0) { _, _ in
            mapped += 1
            return true
        }
        #expect(mapped == 300)
    }

    /// The data space map's nr_blocks is 743029362208 (under 2^40, so it passed the range
    /// check), and its index root points past the device. The checker sized its expected data
    /// counts by nr_blocks, one byte per block, before reading the index: 692 GiB (fuzz-space-map:
    /// "AddressSanitizer: out-of-memory ... RefCounter.init(count:)"; without ASan, "Fatal error:
    /// failed to allocate 743029362240 bytes"). Now the report names the data space map's index.
    @Test func checkerReportsABogusDataSizeWithoutSizingByIt() throws {
        let dir = TempDir()
        let storage = try Self.storage("checker-data-nr-blocks-2-39.img", in: dir)
        let report = try ThinMetadata.check(storage: storage)
        #expect(!report.isClean)
        #expect(report.errors.contains { $0.contains("data space-map") && $0.contains("beyond") }, "\(report)")
    }

    /// The data space map's nr_blocks is close to 2^64: opening the metadata rounded it up to
    /// whole bitmaps with `nr_blocks + entriesPerBitmap - 1`, which overflowed (fuzz-superblock in
    /// CI: "Swift runtime failure: arithmetic overflow" in SpaceMapStore.loadData). Now it is
    /// refused as inconsistent metadata.
    @Test func openingAHugeDataSpaceMapDoesNotOverflow() throws {
        let dir = TempDir()
        let storage = try Self.storage("data-space-map-nr-blocks-overflow.img", in: dir)
        do {
            let report = try ThinMetadata.check(storage: storage)
            #expect(!report.isClean, "\(report)")
        } catch let error as MetadataError {
            #expect("\(error)".contains("space"), "\(error)")
        }
    }

    /// A btree node of the held snapshot leads back to itself: the recursive walk of its
    /// mappings never ended and overflowed the stack (fuzz-btree in CI: "AddressSanitizer:
    /// stack-overflow" in BTree.forEach). Now a walk deeper than any real tree throws.
    @Test func aBtreeCycleEndsInAnError() throws {
        let dir = TempDir()
        let storage = try Self.storage("held-snapshot-btree-cycle.img", in: dir)
        let held = try #require(try HeldMetadataSnapshot.read(storage: storage))
        var errors: [String] = []
        for id in try held.devices().keys.sorted() {
            do {
                try held.mappings(id) { _, _ in true }
            } catch let error as MetadataError {
                errors.append("\(error)")
            }
        }
        #expect(errors.contains { $0.contains("levels deep") }, "\(errors)")
    }
}
