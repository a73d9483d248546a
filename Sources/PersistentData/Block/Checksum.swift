import CCRC32C

/// The block types of dm-thin metadata and the salt each one xors into its checksum.
///
/// Every metadata block starts with a little-endian `csum` field, computed as
///
///     csum = crc32c(seed: 0xffffffff, block[4 ..< 4096]) ^ salt
///
/// (`dm_bm_checksum` in drivers/md/persistent-data/dm-block-manager.c). The salts
/// are the kernel's `*_CSUM_XOR` constants.
public enum BlockType: Sendable, CustomStringConvertible {
    case superblock
    case btreeNode
    case bitmap
    case metadataIndex

    public var salt: UInt32 {
        switch self {
        case .superblock: 160774      // SUPERBLOCK_CSUM_XOR, dm-thin-metadata.c
        case .btreeNode: 121107       // BTREE_CSUM_XOR, dm-btree-internal.h
        case .bitmap: 240779          // BITMAP_CSUM_XOR, dm-space-map-common.c
        case .metadataIndex: 160478   // INDEX_CSUM_XOR, dm-space-map-common.c
        }
    }

    public var description: String {
        switch self {
        case .superblock: "superblock"
        case .btreeNode: "btree node"
        case .bitmap: "space-map bitmap"
        case .metadataIndex: "metadata space-map index"
        }
    }
}

public enum CRC32C {
    /// The kernel's raw `crc32c(seed, data, len)` update (no final inversion).
    @inlinable
    public static func update(_ seed: UInt32, _ buffer: UnsafeRawBufferPointer) -> UInt32 {
        thinfs_crc32c(seed, buffer.baseAddress, buffer.count)
    }

    /// The same update computed in software, whatever the CPU offers.
    public static func updateSoftware(_ seed: UInt32, _ buffer: UnsafeRawBufferPointer) -> UInt32 {
        thinfs_crc32c_software(seed, buffer.baseAddress, buffer.count)
    }

    /// True when the SSE4.2 instruction is in use.
    public static var isHardwareAccelerated: Bool { thinfs_crc32c_is_hardware() != 0 }

    /// The standard CRC-32C of `bytes` (initial value and final xor 0xffffffff).
    public static func checksum<S: Sequence>(_ bytes: S) -> UInt32 where S.Element == UInt8 {
        let array = Array(bytes)
        return array.withUnsafeBytes { ~update(0xffff_ffff, $0) }
    }

    /// `dm_bm_checksum` over a metadata block, salted for its type.
    @inlinable
    public static func blockChecksum(_ block: UnsafeRawBufferPointer, salt: UInt32) -> UInt32 {
        update(0xffff_ffff, UnsafeRawBufferPointer(rebasing: block[4...])) ^ salt
    }
}
