import PersistentData

/// A small but complete pool's metadata, made once per process by the engine itself: every kind
/// of block a pool has, so that the metadata harnesses start from a valid pool and the fuzzer
/// changes a part of it.
///
///     device 0   thin, 300 mappings (two leaves and an internal root)
///     device 1   snapshot of 0, then every 7th block remapped (shared and private leaves)
///     device 2   snapshot of 0, then every 11th block remapped (data counts of 3: ref-count tree)
///     device 3   thin, empty
///     held metadata snapshot reserved; transaction id 1
///
/// 128 metadata blocks, 20000 data blocks (two data bitmaps), 64 KiB data blocks.
public final class ReferencePool: @unchecked Sendable {
    public static let nrBlocks = 128
    public static let shared: ReferencePool = {
        do { return try ReferencePool() } catch { Harness.setupFailed("building the reference pool", error) }
    }()

    /// The metadata device, `nrBlocks` blocks of 4096 bytes.
    public let image: [UInt8]
    /// The type of every block in use, by block number.
    public let types: [Int: BlockType]
    /// In-use blocks of each type, in block order.
    public let btreeNodes: [Int]
    /// The space-map blocks: the metadata index, the metadata bitmaps, the data bitmaps, the
    /// data index's root, and the two ref-count roots.
    public let spaceMapBlocks: [Int]

    private init() throws {
        let storage = MemoryMetadataStorage(nrBlocks: UInt64(Self.nrBlocks))
        let md = try ThinMetadata.format(storage: storage, dataBlockSize: 128, nrDataBlocks: 20000)
        func map(_ id: ThinDeviceID, _ v: UInt64) throws {
            guard let b = md.dataSM.allocate() else { throw MetadataError.noDataSpace }
            try md.insert(id, v, dataBlock: b)
        }
        try md.createThin(0)
        for v in UInt64(0)..<300 { try map(0, v) }
        try md.commit()
        try md.createSnap(1, origin: 0)
        try md.createSnap(2, origin: 0)
        for v in stride(from: UInt64(0), to: 300, by: 7) { try map(1, v) }
        for v in stride(from: UInt64(0), to: 300, by: 11) { try map(2, v) }
        try md.createThin(3)
        try md.setTransactionID(current: 0, new: 1)
        try md.commit()
        try md.reserveMetadataSnap()
        try md.commit()

        var image = [UInt8](repeating: 0, count: Self.nrBlocks * 4096)
        try image.withUnsafeMutableBytes { raw in
            for b in 0..<Self.nrBlocks {
                try storage.read(block: UInt64(b), into: UnsafeMutableRawBufferPointer(rebasing: raw[b * 4096 ..< (b + 1) * 4096]))
            }
        }
        self.image = image
        var types: [Int: BlockType] = [0: .superblock, Int(md.heldRoot): .superblock,
                                       Int(md.metadataStore.indexRoot): .metadataIndex]
        for b in md.metadataStore.bitmapBlocks + md.dataStore.bitmapBlocks { types[Int(b)] = .bitmap }
        for b in 0..<Self.nrBlocks where md.metadataSM.count(UInt64(b)) > 0 && types[b] == nil { types[b] = .btreeNode }
        self.types = types
        btreeNodes = types.filter { $0.value == .btreeNode }.map(\.key).sorted()
        spaceMapBlocks = [Int(md.metadataStore.indexRoot)] + md.metadataStore.bitmapBlocks.map { Int($0) }
            + md.dataStore.bitmapBlocks.map { Int($0) }
            + [Int(md.dataStore.indexRoot), Int(md.metadataStore.refCountRoot), Int(md.dataStore.refCountRoot)]
    }

    /// Block `b` of the image.
    public func block(_ b: Int) -> ArraySlice<UInt8> { image[b * 4096 ..< (b + 1) * 4096] }
}
