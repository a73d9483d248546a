/// The thin-pool superblock, always at metadata block 0 (dm-thin-metadata.c,
/// `struct thin_disk_superblock`; Documentation/admin-guide/device-mapper/thin-provisioning.rst).
///
///     offset  size
///          0     4  csum                      crc32c(block[4..<4096]) ^ 160774
///          4     4  flags                     bit 0: needs_check
///          8     8  blocknr                   0
///         16    16  uuid
///         32     8  magic                     27022010
///         40     4  version                   2
///         44     4  time                      pool time, bumped by each snapshot
///         48     8  trans_id                  set by set_transaction_id
///         56     8  held_root                 metadata snapshot (a superblock copy), or 0
///         64   128  data_space_map_root       see SpaceMapRoot
///        192   128  metadata_space_map_root
///        320     8  data_mapping_root         two-level btree: dev id -> block -> block_time
///        328     8  device_details_root       btree: dev id -> device details
///        336     4  data_block_size           in 512-byte sectors
///        340     4  metadata_block_size       in sectors: 8
///        344     8  metadata_nr_blocks
///        352     4  compat_flags              0
///        356     4  compat_ro_flags           0
///        360     4  incompat_flags            0
public struct Superblock: Equatable, Sendable {
    public static let magic: UInt64 = 27022010
    public static let version: UInt32 = 2
    public static let location: UInt64 = 0
    public static let metadataBlockSectors: UInt32 = 8
    public static let needsCheckFlag: UInt32 = 1

    public var flags: UInt32 = 0
    public var uuid: [UInt8] = Array(repeating: 0, count: 16)
    public var version: UInt32 = Superblock.version
    public var time: UInt32 = 0
    public var transactionID: UInt64 = 0
    public var heldRoot: UInt64 = 0
    public var dataSpaceMap: SpaceMapRoot
    public var metadataSpaceMap: SpaceMapRoot
    public var dataMappingRoot: UInt64
    public var deviceDetailsRoot: UInt64
    public var dataBlockSize: UInt32
    public var metadataNrBlocks: UInt64

    public var needsCheck: Bool {
        get { flags & Self.needsCheckFlag != 0 }
        set { flags = newValue ? flags | Self.needsCheckFlag : flags & ~Self.needsCheckFlag }
    }

    public init(dataSpaceMap: SpaceMapRoot, metadataSpaceMap: SpaceMapRoot, dataMappingRoot: UInt64,
                deviceDetailsRoot: UInt64, dataBlockSize: UInt32, metadataNrBlocks: UInt64) {
        self.dataSpaceMap = dataSpaceMap
        self.metadataSpaceMap = metadataSpaceMap
        self.dataMappingRoot = dataMappingRoot
        self.deviceDetailsRoot = deviceDetailsRoot
        self.dataBlockSize = dataBlockSize
        self.metadataNrBlocks = metadataNrBlocks
    }

    /// Decodes a validated superblock (or a metadata-snapshot copy of one).
    public init(block: MetadataBlock) throws(MetadataError) {
        let magic = block.u64(32)
        guard magic == Self.magic else { throw .badMagic(found: magic) }
        flags = block.u32(4)
        uuid = (0..<16).map { block.buffer[16 + $0] }
        version = block.u32(40)
        guard version == 1 || version == 2 else { throw .unsupportedVersion(version) }
        time = block.u32(44)
        transactionID = block.u64(48)
        heldRoot = block.u64(56)
        dataSpaceMap = SpaceMapRoot(block: block, at: 64)
        metadataSpaceMap = SpaceMapRoot(block: block, at: 192)
        dataMappingRoot = block.u64(320)
        deviceDetailsRoot = block.u64(328)
        dataBlockSize = block.u32(336)
        let mbs = block.u32(340)
        guard mbs == Self.metadataBlockSectors else { throw .unsupportedMetadataBlockSize(sectors: mbs) }
        metadataNrBlocks = block.u64(344)
        let compat = block.u32(352), compatRO = block.u32(356), incompat = block.u32(360)
        guard compat == 0, compatRO == 0, incompat == 0 else {
            throw .corrupt(block: block.location, reason: "unknown feature flags (compat \(compat), compat_ro \(compatRO), incompat \(incompat))")
        }
    }

    /// Encodes into `block`; the block manager seals it with checksum and blocknr.
    public func store(into block: MetadataBlock) {
        block.zero()
        block.setU32(4, flags)
        for (i, b) in uuid.prefix(16).enumerated() { block.mutableBuffer[16 + i] = b }
        block.setU64(32, Self.magic)
        block.setU32(40, version)
        block.setU32(44, time)
        block.setU64(48, transactionID)
        block.setU64(56, heldRoot)
        dataSpaceMap.store(into: block, at: 64)
        metadataSpaceMap.store(into: block, at: 192)
        block.setU64(320, dataMappingRoot)
        block.setU64(328, deviceDetailsRoot)
        block.setU32(336, dataBlockSize)
        block.setU32(340, Self.metadataBlockSectors)
        block.setU64(344, metadataNrBlocks)
    }

    /// The uuid as thin_dump prints it: the bytes up to the first NUL.
    public var uuidString: String {
        String(decoding: uuid.prefix { $0 != 0 }, as: UTF8.self)
    }
}
