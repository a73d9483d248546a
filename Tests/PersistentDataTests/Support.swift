import Foundation
import TestSupport
import Testing
@testable import PersistentData

/// Raw access to a metadata file, for damaging it on purpose.
enum MetadataFile {
    static func bytes(_ path: String) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path)) }

    static func readBlock(_ path: String, _ block: UInt64) throws -> MetadataBlock {
        let storage = try FileMetadataStorage(path: path, readOnly: true)
        let b = MetadataBlock(location: block)
        try storage.read(block: block, into: b.mutableBuffer)
        return b
    }

    static func writeBlock(_ path: String, _ block: MetadataBlock, at location: UInt64? = nil) throws {
        let storage = try FileMetadataStorage(path: path)
        try storage.write(block: location ?? block.location, from: block.buffer)
        try storage.sync()
    }

    /// Inverts the bits of one byte, leaving the checksum stale.
    static func flipByte(_ path: String, block: UInt64, offset: Int) throws {
        let b = try readBlock(path, block)
        b.mutableBuffer[offset] ^= 0xff
        try writeBlock(path, b)
    }

    /// Edits a block and reseals it, so that it passes its validator and only a
    /// structural check can find the damage.
    static func patch(_ path: String, block: UInt64, as type: BlockType, _ edit: (MetadataBlock) -> Void) throws {
        let b = try readBlock(path, block)
        edit(b)
        b.seal(type: type)
        try writeBlock(path, b)
    }
}

/// A committed pool in a scratch file: devices with mappings, some shared by snapshots.
struct ScratchPool {
    let dir = TempDir()
    let path: String
    let md: ThinMetadata

    init(metadataBytes: UInt64 = 8 << 20, dataBlocks: UInt64 = 100_000) throws {
        path = dir.file("meta", size: metadataBytes)
        md = try ThinMetadata.format(storage: FileMetadataStorage(path: path), dataBlockSize: 128, nrDataBlocks: dataBlocks)
    }

    /// Maps each of `vblocks` of device `id` to a newly allocated data block.
    func map(_ id: ThinDeviceID, _ vblocks: some Sequence<UInt64>) throws {
        for v in vblocks { try md.insert(id, v, dataBlock: try md.allocateDataBlock()) }
    }

    /// Device 1 with `mappings` mappings (a multi-level tree when large), a
    /// snapshot 2 of it, and overwrites in 1 that unshare the leaves of its
    /// first quarter; the rest stay shared with 2.
    static func standard(mappings: UInt64 = 2000) throws -> ScratchPool {
        let pool = try ScratchPool()
        try pool.md.createThin(1)
        try pool.map(1, 0..<mappings)
        try pool.md.commit()
        try pool.md.createSnap(2, origin: 1)
        try pool.map(1, stride(from: 0, to: mappings / 4, by: 7))
        try pool.md.commit()
        return pool
    }
}

/// The leaves of a device's mapping tree, left to right.
func leaves(of md: ThinMetadata, device id: ThinDeviceID) throws -> [UInt64] {
    var result: [UInt64] = []
    try md.mappingTree.forEachNode(md.devices[id]!.root) { n, _ in
        if BTreeNode.isLeaf(n) { result.append(n.location) }
    }
    return result
}
