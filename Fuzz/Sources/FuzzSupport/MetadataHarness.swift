import PersistentData

/// Metadata in memory, loaded from an image; reads past the image return zeros.
public final class ImageMetadataStorage: MetadataStorage {
    public let nrBlocks: UInt64
    public var name: String { "fuzzed metadata" }
    var image: [UInt8]

    public init(image: [UInt8], nrBlocks: Int) {
        self.nrBlocks = UInt64(nrBlocks)
        var image = image
        if image.count < nrBlocks * 4096 { image += [UInt8](repeating: 0, count: nrBlocks * 4096 - image.count) }
        self.image = image
    }

    public func read(block: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(MetadataError) {
        guard block < nrBlocks else { throw .blockOutOfRange(block: block, nrBlocks: nrBlocks) }
        let start = Int(block) * 4096
        image.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[start ..< start + 4096])) }
    }

    public func write(block: UInt64, from buffer: UnsafeRawBufferPointer) throws(MetadataError) {
        guard block < nrBlocks else { throw .blockOutOfRange(block: block, nrBlocks: nrBlocks) }
        let start = Int(block) * 4096
        image.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[start ..< start + 4096]).copyMemory(from: buffer) }
    }

    public func sync() throws(MetadataError) {}

    /// Stamps block `b`'s checksum (and its own block number) for `type`, as the engine seals a
    /// block it writes: the fuzzer's changes then pass the checksum and reach the parsers.
    public func reseal(_ b: Int, as type: BlockType) {
        let block = MetadataBlock(location: UInt64(b))
        image.withUnsafeBytes { block.mutableBuffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[b * 4096 ..< (b + 1) * 4096])) }
        block.seal(type: type)
        image.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[b * 4096 ..< (b + 1) * 4096]).copyMemory(from: block.buffer) }
    }

    /// Lays `bytes` over block `b` from `offset` (what does not fit is dropped).
    public func overlay(_ b: Int, at offset: Int = 0, _ bytes: ArraySlice<UInt8>) {
        let n = min(bytes.count, 4096 - offset)
        guard n > 0 else { return }
        let start = b * 4096 + offset
        image.replaceSubrange(start ..< start + n, with: bytes.prefix(n))
    }
}

/// Drives the metadata through what the pool does with it: open, check, dump, look up, the
/// held snapshot, and one transaction of changes, then opens and checks what was committed.
/// Every error is expected; only a trap, a sanitizer report or a hang is a finding.
public enum MetadataExercise {
    public static func run(_ storage: ImageMetadataStorage) {
        exportHandler?(storage)
        _ = try? ThinMetadata.check(storage: storage)
        if let held = try? HeldMetadataSnapshot.read(storage: storage) {
            if let devices = try? held.devices() {
                for id in devices.keys.sorted().prefix(4) {
                    var n = 0
                    try? held.mappings(id) { _, _ in n += 1; return n < 2000 }
                }
            }
        }
        guard let md = try? ThinMetadata.open(storage: storage) else { return }
        _ = try? md.check()
        var xmlBytes = 0
        try? md.dumpXML { xmlBytes += $0.utf8.count }
        try? md.dumpXML(metadataSnapshot: true) { xmlBytes += $0.utf8.count }
        let ids = md.deviceIDs
        for id in ids.prefix(6) {
            for v: UInt64 in [0, 1, 7, 11, 100, 252, 253, 299, 300, 5000, UInt64.max] { _ = try? md.lookup(id, v) }
            _ = md.details(id)
        }
        _ = try? md.metadataSnapshot()
        // One transaction of changes, as the pool's writes, snapshots and deletes make them.
        if let first = ids.first {
            for v: UInt64 in [3, 300, 1000] {
                if let b = md.dataSM.allocate() { _ = try? md.insert(first, v, dataBlock: b) }
            }
            _ = try? md.remove(first, 7)
            let fresh = (ids.last ?? 0) &+ 1
            if fresh <= ThinMetadata.maxDeviceID { try? md.createSnap(fresh, origin: first) }
        }
        if ids.count > 1 { try? md.delete(ids[1]) }
        try? md.createThin(ThinMetadata.maxDeviceID)
        try? md.resizeData(nrBlocks: md.nrDataBlocks &+ 100)
        try? md.setTransactionID(current: md.transactionID, new: md.transactionID &+ 1)
        try? md.commit()
        try? md.releaseMetadataSnap()
        try? md.commit()
        _ = try? md.check()
        // Whatever was committed must open again (or fail with an error).
        _ = try? ThinMetadata.check(storage: storage)
    }
}

/// How each metadata harness turns its input into a metadata device: a part of the reference
/// pool replaced by the input, checksums recomputed.
public enum MetadataInput {
    /// `superblock`: the input overlays block 0 from byte 4 (after the checksum).
    public static func superblock(_ data: UnsafeRawBufferPointer) -> ImageMetadataStorage {
        let ref = ReferencePool.shared
        let s = ImageMetadataStorage(image: ref.image, nrBlocks: ReferencePool.nrBlocks)
        s.overlay(0, at: 4, ArraySlice(data.prefix(4092)))
        s.reseal(0, as: .superblock)
        return s
    }

    /// `btree`: each 4096 bytes of input overlay the next btree node of the reference pool,
    /// in block order (the last chunk may be shorter: it replaces the start of its node).
    public static func btree(_ data: UnsafeRawBufferPointer) -> ImageMetadataStorage {
        overlayChunks(data, blocks: ReferencePool.shared.btreeNodes, header: 0)
    }

    /// `space-map`: the first 64 bytes replace the data and metadata space-map roots of the
    /// superblock (32 bytes each: nr_blocks, nr_allocated, bitmap_root, ref_count_root); then
    /// each 4096 bytes overlay the next space-map block (`ReferencePool.spaceMapBlocks`).
    public static func spaceMap(_ data: UnsafeRawBufferPointer) -> ImageMetadataStorage {
        overlayChunks(data, blocks: ReferencePool.shared.spaceMapBlocks, header: 64)
    }

    /// `pool`: the input is a whole metadata device, block after block (missing blocks are
    /// zero). Byte 0 of each block, where the checksum goes, says how to seal it: 0 superblock,
    /// 1 btree node, 2 bitmap, 3 index, anything else left as it is (checksum and all).
    public static func pool(_ data: UnsafeRawBufferPointer) -> ImageMetadataStorage {
        let s = ImageMetadataStorage(image: Array(data.prefix(ReferencePool.nrBlocks * 4096)), nrBlocks: ReferencePool.nrBlocks)
        var b = 0
        while b * 4096 < min(data.count, ReferencePool.nrBlocks * 4096) {
            switch data[b * 4096] {
            case 0: s.reseal(b, as: .superblock)
            case 1: s.reseal(b, as: .btreeNode)
            case 2: s.reseal(b, as: .bitmap)
            case 3: s.reseal(b, as: .metadataIndex)
            default: break
            }
            b += 1
        }
        return s
    }

    static func overlayChunks(_ data: UnsafeRawBufferPointer, blocks: [Int], header: Int) -> ImageMetadataStorage {
        let ref = ReferencePool.shared
        let s = ImageMetadataStorage(image: ref.image, nrBlocks: ReferencePool.nrBlocks)
        let bytes = Array(data)
        if header > 0 {
            let h = bytes.prefix(header)
            s.overlay(0, at: 64, h.prefix(32))
            s.overlay(0, at: 192, h.dropFirst(32).prefix(32))
            s.reseal(0, as: .superblock)
        }
        var offset = header
        for b in blocks where offset < bytes.count {
            s.overlay(b, bytes[offset ..< min(offset + 4096, bytes.count)])
            s.reseal(b, as: ref.types[b] ?? .btreeNode)
            offset += 4096
        }
        return s
    }

    // MARK: Seeds

    /// The reference pool's blocks as each harness reads them, plus a few simple variants.
    public static func seeds(_ harness: String) -> [(String, [UInt8])] {
        let ref = ReferencePool.shared
        func trimmed(_ bytes: ArraySlice<UInt8>) -> [UInt8] {
            var a = Array(bytes)
            while a.last == 0 { a.removeLast() }
            return a
        }
        switch harness {
        case "superblock":
            // Bytes 4..<364 hold every field; the rest of the block is zero.
            let sb = Array(ref.block(0).dropFirst(4).prefix(360))
            var needsCheck = sb
            needsCheck[0] |= 1
            var noHeld = sb
            for i in 52 ..< 60 { noHeld[i] = 0 }
            return [("reference", sb), ("needs-check", needsCheck), ("no-held-snapshot", noHeld), ("header-only", Array(sb.prefix(48)))]
        case "btree":
            // All the nodes; the first alone (so that a short input edits a root); the first three.
            let all = ref.btreeNodes.flatMap { Array(ref.block($0)) }
            return [("all-nodes", all), ("first-node", trimmed(ref.block(ref.btreeNodes[0]))),
                    ("first-three-nodes", Array(all.prefix(2 * 4096)) + trimmed(ref.block(ref.btreeNodes[2])))]
        case "space-map":
            let roots = Array(ref.block(0)[64 ..< 96]) + Array(ref.block(0)[192 ..< 224])
            var seeds: [(String, [UInt8])] = [("roots-only", roots)]
            var all = roots
            for b in ref.spaceMapBlocks { all += Array(ref.block(b)) }
            seeds.append(("all-blocks", all))
            var some = roots
            for b in ref.spaceMapBlocks.prefix(2) { some += Array(ref.block(b)) }
            seeds.append(("index-and-bitmap", some))
            return seeds
        case "pool":
            // Tag every block with its type in byte 0, and drop the zero blocks at the end.
            var image = ref.image
            let last = (ref.types.keys.max() ?? 0) + 1
            for b in 0 ..< last {
                let tag: UInt8
                switch ref.types[b] {
                case .superblock: tag = 0
                case .btreeNode: tag = 1
                case .bitmap: tag = 2
                case .metadataIndex: tag = 3
                case nil: tag = 255
                }
                image[b * 4096] = tag
            }
            return [("reference", Array(image.prefix(last * 4096))), ("superblock-only", Array(image.prefix(4096)))]
        default:
            return []
        }
    }
}
