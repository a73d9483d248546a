import Foundation
import TestSupport
import Testing
@testable import PersistentData

/// Damaged metadata must be refused with an error naming the block, and a
/// failed open or lookup must write nothing.
@Suite struct CorruptionTests {
    enum Target: String, CaseIterable, CustomTestStringConvertible {
        case superblock         // block 0: read first by open
        case mappingLeaf        // a leaf of device 1's mapping tree: read on lookup
        case dataBitmap         // the data space map's first bitmap: read by open
        case metadataIndex      // the metadata space map's index block: read by open
        var testDescription: String { rawValue }

        func locate(_ md: ThinMetadata) throws -> (block: UInt64, type: BlockType, offset: Int) {
            switch self {
            // Offset 100 lies in the data space-map root, clear of the magic.
            case .superblock: (0, .superblock, 100)
            case .mappingLeaf: (try leaves(of: md, device: 1)[2], .btreeNode, 48)
            case .dataBitmap: (md.dataStore.bitmapBlocks[0], .bitmap, 2000)
            case .metadataIndex: (md.metadataStore.indexRoot, .metadataIndex, 20)
            }
        }
    }

    @Test(arguments: Target.allCases)
    func flippedByteIsABadChecksum(_ target: Target) throws {
        let pool = try ScratchPool.standard(mappings: 3000)
        let (block, type, offset) = try target.locate(pool.md)
        try MetadataFile.flipByte(pool.path, block: block, offset: offset)
        let damaged = try MetadataFile.bytes(pool.path)

        let error: MetadataError? = {
            do {
                let md = try ThinMetadata.open(storage: FileMetadataStorage(path: pool.path))
                // Open reads the superblock and space maps; a device's tree is read on lookup.
                #expect(target == .mappingLeaf, "open succeeded despite a damaged \(target)")
                for v in UInt64(0)..<3000 { _ = try md.lookup(1, v) }
                return nil
            } catch let e as MetadataError {
                return e
            } catch {
                Issue.record("unexpected error \(error)")
                return nil
            }
        }()
        guard case .badChecksum(let at, let t, let stored, let computed)? = error else {
            Issue.record("expected a bad checksum at block \(block), got \(String(describing: error))")
            return
        }
        #expect(at == block)
        #expect(t == type)
        #expect(stored != computed)
        #expect("\(error!)".contains("metadata block \(block) "))
        #expect(try MetadataFile.bytes(pool.path) == damaged, "a failed open or lookup wrote to the metadata")

        // Both checkers see it.
        let report = try ThinMetadata.check(storage: FileMetadataStorage(path: pool.path, readOnly: true))
        #expect(report.errors.contains { $0.contains("block \(block)") }, "\(report)")
        if Oracle.available {
            #expect(try Oracle.run("thin_check", [pool.path]).status != 0)
        }
        #expect(try MetadataFile.bytes(pool.path) == damaged, "checking wrote to the metadata")
    }

    /// Not thin metadata at all: the magic is checked before the checksum.
    @Test(arguments: [false, true])   // random bytes, or zeroes
    func foreignFileIsBadMagic(random: Bool) throws {
        let dir = TempDir()
        let path = dir.file("meta", size: 1 << 20)
        if random {
            var rng = SeededRandom(seed: 99)
            let bytes = Data((0..<(1 << 20)).map { _ in UInt8.random(in: 0...255, using: &rng) })
            try bytes.write(to: URL(fileURLWithPath: path))
        }
        let before = try MetadataFile.bytes(path)
        #expect {
            _ = try ThinMetadata.open(storage: FileMetadataStorage(path: path))
        } throws: { error in
            guard case .badMagic(let found) = error as? MetadataError else { return false }
            return random || found == 0
        }
        let report = try ThinMetadata.check(storage: FileMetadataStorage(path: path, readOnly: true))
        #expect(report.errors.contains { $0.contains("magic") }, "\(report)")
        #expect(try MetadataFile.bytes(path) == before)
    }

    /// A block with a valid checksum in the wrong place (a misdirected write)
    /// is caught by the block number it records.
    @Test func blockCopiedElsewhereIsAWrongBlockNumber() throws {
        let pool = try ScratchPool.standard(mappings: 3000)
        let leaves = try leaves(of: pool.md, device: 1)
        let (a, b) = (leaves[1], leaves[3])
        try MetadataFile.writeBlock(pool.path, try MetadataFile.readBlock(pool.path, a), at: b)
        let damaged = try MetadataFile.bytes(pool.path)

        let md = try ThinMetadata.open(storage: FileMetadataStorage(path: pool.path))
        #expect(throws: MetadataError.wrongBlockNumber(block: b, type: .btreeNode, recorded: a)) {
            try md.mappings(1) { _, _ in true }
        }
        let report = try md.check()
        #expect(report.errors.contains { $0.contains("metadata block \(b) ") && $0.contains("records block number \(a)") }, "\(report)")
        #expect(try MetadataFile.bytes(pool.path) == damaged)
    }
}
