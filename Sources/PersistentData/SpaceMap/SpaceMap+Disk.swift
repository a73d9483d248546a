/// The on-disk form of a space map (dm-space-map-common.c, dm-space-map-disk.c,
/// dm-space-map-metadata.c).
///
/// The superblock holds a 128-byte root for each space map, of which the first 32 bytes are used:
///
///     offset  size
///          0     8  nr_blocks        blocks tracked
///          8     8  nr_allocated     blocks with a non-zero count
///         16     8  bitmap_root      data: root of the index btree; metadata: the index block
///         24     8  ref_count_root   btree: block number -> u32 count, for counts >= 3
///
/// Bitmap block (one per 16320 tracked blocks):
///
///     0  csum (salt 240779)  4  not_used  8  blocknr  16  2-bit entries, 64-bit words, 4080 bytes
///
///     word w, bits 2k and 2k+1:  entry 32*w + k;  value = bit(2k) << 1 | bit(2k+1)
///
/// Index entry (16 bytes), one per bitmap:
///
///     0  blocknr (u64)   8  nr_free (u32)   12  none_free_before (u32)
///
/// The data space map keeps its index entries in a btree keyed by bitmap
/// number. The metadata space map keeps them in one index block, so it can be
/// read without itself:
///
///     0  csum (salt 160478)  4  padding  8  blocknr  16  index_entry[255]
public struct IndexEntry: BTreeValue, Equatable, Sendable {
    public var blocknr: UInt64
    public var nrFree: UInt32
    public var noneFreeBefore: UInt32

    public static var size: Int { 16 }

    public init(blocknr: UInt64, nrFree: UInt32, noneFreeBefore: UInt32) {
        self.blocknr = blocknr
        self.nrFree = nrFree
        self.noneFreeBefore = noneFreeBefore
    }

    public init(loadingFrom block: MetadataBlock, at offset: Int) {
        blocknr = block.u64(offset)
        nrFree = block.u32(offset + 8)
        noneFreeBefore = block.u32(offset + 12)
    }

    public func store(into block: MetadataBlock, at offset: Int) {
        block.setU64(offset, blocknr)
        block.setU32(offset + 8, nrFree)
        block.setU32(offset + 12, noneFreeBefore)
    }
}

/// The 32 meaningful bytes of a space-map root.
public struct SpaceMapRoot: Equatable, Sendable {
    public var nrBlocks: UInt64
    public var nrAllocated: UInt64
    public var bitmapRoot: UInt64
    public var refCountRoot: UInt64

    public static let fieldSize = 128

    init(nrBlocks: UInt64, nrAllocated: UInt64, bitmapRoot: UInt64, refCountRoot: UInt64) {
        self.nrBlocks = nrBlocks
        self.nrAllocated = nrAllocated
        self.bitmapRoot = bitmapRoot
        self.refCountRoot = refCountRoot
    }

    init(block: MetadataBlock, at offset: Int) {
        nrBlocks = block.u64(offset)
        nrAllocated = block.u64(offset + 8)
        bitmapRoot = block.u64(offset + 16)
        refCountRoot = block.u64(offset + 24)
    }

    func store(into block: MetadataBlock, at offset: Int) {
        for i in stride(from: 0, to: Self.fieldSize, by: 8) { block.setU64(offset + i, 0) }
        block.setU64(offset, nrBlocks)
        block.setU64(offset + 8, nrAllocated)
        block.setU64(offset + 16, bitmapRoot)
        block.setU64(offset + 24, refCountRoot)
    }
}

/// Where a space map's bitmaps, index and ref-count tree live, and how to write them back.
public final class SpaceMapStore {
    public enum Kind: Sendable {
        case data, metadata
        /// How errors name this space map.
        public var treeName: String { self == .data ? "data space map" : "metadata space map" }
    }
    /// The kernel's MAX_METADATA_BITMAPS: what one index block holds.
    public static let maxMetadataBitmaps = 255
    static let indexEntriesOffset = 16

    public let kind: Kind
    public let sm: SpaceMap
    var bitmapLocations: [UInt64]
    var indexEntries: [IndexEntry]
    /// Data: the index btree's root. Metadata: the index block.
    public private(set) var indexRoot: UInt64
    public private(set) var refCountRoot: UInt64

    init(kind: Kind, sm: SpaceMap, bitmapLocations: [UInt64], indexEntries: [IndexEntry], indexRoot: UInt64, refCountRoot: UInt64) {
        self.kind = kind
        self.sm = sm
        self.bitmapLocations = bitmapLocations
        self.indexEntries = indexEntries
        self.indexRoot = indexRoot
        self.refCountRoot = refCountRoot
    }

    public var root: SpaceMapRoot {
        SpaceMapRoot(nrBlocks: sm.nrBlocks, nrAllocated: sm.nrAllocated, bitmapRoot: indexRoot, refCountRoot: refCountRoot)
    }

    /// The bitmap blocks, in order (for checkers).
    public var bitmapBlocks: [UInt64] { bitmapLocations }

    // MARK: Creating

    /// A new data space map; its index and ref-count trees are allocated from `tm`.
    static func newData(nrBlocks: UInt64, tm: TransactionManager) throws(MetadataError) -> SpaceMapStore {
        let sm = SpaceMap(nrBlocks: nrBlocks, name: Kind.data.treeName)
        sm.markAllBitmapsDirty()
        let index = try BTree<IndexEntry>(tm: tm).create()
        let refs = try BTree<UInt32>(tm: tm).create()
        return SpaceMapStore(kind: .data, sm: sm, bitmapLocations: Array(repeating: 0, count: sm.nrBitmaps),
                             indexEntries: Array(repeating: IndexEntry(blocknr: 0, nrFree: 0, noneFreeBefore: 0), count: sm.nrBitmaps),
                             indexRoot: index, refCountRoot: refs)
    }

    /// A new metadata space map over `sm`, whose blocks it records itself.
    static func newMetadata(sm: SpaceMap, tm: TransactionManager) throws(MetadataError) -> SpaceMapStore {
        guard sm.nrBitmaps <= maxMetadataBitmaps else {
            throw .invalidArgument("metadata device of \(sm.nrBlocks) blocks needs \(sm.nrBitmaps) bitmaps; one index block holds \(maxMetadataBitmaps)")
        }
        sm.markAllBitmapsDirty()
        let refs = try BTree<UInt32>(tm: tm).create()
        return SpaceMapStore(kind: .metadata, sm: sm, bitmapLocations: Array(repeating: 0, count: sm.nrBitmaps),
                             indexEntries: Array(repeating: IndexEntry(blocknr: 0, nrFree: 0, noneFreeBefore: 0), count: sm.nrBitmaps),
                             indexRoot: 0, refCountRoot: refs)
    }

    // MARK: Loading

    /// Reads the metadata space map with the bare block manager (it has no transaction manager yet).
    static func loadMetadata(root: SpaceMapRoot, bm: BlockManager) throws(MetadataError) -> SpaceMapStore {
        guard root.nrBlocks <= bm.nrBlocks else {
            throw .corrupt(block: 0, reason: "metadata space map tracks \(root.nrBlocks) blocks, the device has \(bm.nrBlocks)")
        }
        let sm = SpaceMap(nrBlocks: root.nrBlocks, name: Kind.metadata.treeName)
        guard sm.nrBitmaps <= maxMetadataBitmaps else {
            throw .corrupt(block: 0, reason: "metadata space map of \(root.nrBlocks) blocks needs more than \(maxMetadataBitmaps) bitmaps")
        }
        let index = try bm.read(root.bitmapRoot, as: .metadataIndex)
        var locations: [UInt64] = []
        var entries: [IndexEntry] = []
        for i in 0..<sm.nrBitmaps {
            let e = IndexEntry(loadingFrom: index, at: indexEntriesOffset + 16 * i)
            entries.append(e)
            locations.append(e.blocknr)
        }
        let store = SpaceMapStore(kind: .metadata, sm: sm, bitmapLocations: locations, indexEntries: entries,
                                  indexRoot: root.bitmapRoot, refCountRoot: root.refCountRoot)
        try store.loadBitmapsAndCounts(bm: bm, refTree: { location throws(MetadataError) in
            try bm.read(location, as: .btreeNode)
        })
        return store
    }

    /// Reads the data space map through the transaction manager.
    static func loadData(root: SpaceMapRoot, tm: TransactionManager) throws(MetadataError) -> SpaceMapStore {
        // nr_blocks comes from disk: compare it with the bitmaps the index really
        // has before sizing anything by it (2^50 blocks would ask for petabytes).
        let needed = SpaceMap.bitmapsNeeded(root.nrBlocks)
        var found: [UInt64: IndexEntry] = [:]
        do {
            try BTree<IndexEntry>(tm: tm, name: "data space-map index").forEach(root.bitmapRoot) { key, e in
                guard key < needed else {
                    throw MetadataError.inconsistent(block: root.bitmapRoot, tree: Kind.data.treeName,
                                                     reason: "its index has bitmap \(key), but \(root.nrBlocks) blocks need \(needed)")
                }
                found[key] = e
                return true
            }
        } catch let e as MetadataError { throw e } catch { throw .corrupt(block: root.bitmapRoot, reason: "\(error)") }
        guard UInt64(found.count) == needed else {
            throw .inconsistent(block: root.bitmapRoot, tree: Kind.data.treeName,
                                reason: "its index has \(found.count) bitmaps, \(needed) expected for \(root.nrBlocks) blocks")
        }
        let sm = SpaceMap(nrBlocks: root.nrBlocks, name: Kind.data.treeName)
        // Every key below `needed` is present (count and range checked above).
        let entries = (0..<needed).map { found[$0]! }
        let store = SpaceMapStore(kind: .data, sm: sm, bitmapLocations: entries.map(\.blocknr), indexEntries: entries,
                                  indexRoot: root.bitmapRoot, refCountRoot: root.refCountRoot)
        try store.loadBitmapsAndCounts(bm: tm.bm, refTree: { location throws(MetadataError) in try tm.read(location, as: .btreeNode) })
        return store
    }

    private func loadBitmapsAndCounts(bm: BlockManager, refTree read: (UInt64) throws(MetadataError) -> MetadataBlock) throws(MetadataError) {
        for (i, location) in bitmapLocations.enumerated() {
            // The metadata space map tracks at most the whole device; its own blocks lie within what it tracks.
            let limit = kind == .metadata ? sm.nrBlocks : bm.nrBlocks
            guard location < limit else {
                throw .inconsistent(block: indexRoot, tree: kind.treeName,
                                    reason: "index entry \(i) points to bitmap block \(location), beyond the metadata device of \(limit) blocks")
            }
            let block = try bm.read(location, as: .bitmap)
            sm.loadBitmap(i, from: block)
        }
        // Walk the ref-count btree by hand: this runs before a transaction manager exists.
        func walk(_ location: UInt64) throws(MetadataError) {
            let n = try read(location)
            let tree = "\(kind.treeName) ref-count"
            try BTreeNode.validate(n, leafValueSize: UInt32.size, tree: tree)
            for i in 0..<BTreeNode.count(n) {
                if BTreeNode.isLeaf(n) {
                    let b = BTreeNode.key(n, i)
                    let c = n.u32(BTreeNode.valueOffset(n, i))
                    guard b < sm.nrBlocks, c >= 3 else {
                        throw .inconsistent(block: location, tree: tree, reason: "ref-count entry for block \(b) with count \(c) is invalid")
                    }
                    sm.loadOverflow(b, c)
                } else {
                    let child = BTreeNode.child(n, i)
                    guard child < bm.nrBlocks else {
                        throw .inconsistent(block: location, tree: tree, reason: "child \(i) points to block \(child), beyond the metadata device")
                    }
                    try walk(child)
                }
            }
        }
        try walk(refCountRoot)
        if let missing = sm.finishLoad() {
            throw .inconsistent(block: refCountRoot, tree: "\(kind.treeName) ref-count", reason: "block \(missing) has count 3+ in its bitmap but no ref-count entry")
        }
    }

    // MARK: Writing back

    /// Writes the data space map's changed bitmaps, index entries and overflow
    /// counts; every metadata block it needs comes from `tm`.
    func flushData(tm: TransactionManager) throws(MetadataError) {
        // Our own call pattern (commit flushes each store with its own method); no disk value decides it.
        precondition(kind == .data)
        let refTree = BTree<UInt32>(tm: tm, name: "data space map ref-count")
        for b in sm.overflowDirty.sorted() {
            let c = sm.count(b)
            refCountRoot = c >= 3 ? try refTree.insert(refCountRoot, b, c).root : try refTree.remove(refCountRoot, b).root
        }
        sm.overflowDirty.removeAll()
        let indexTree = BTree<IndexEntry>(tm: tm, name: "data space-map index")
        for i in sm.dirtyBitmaps.sorted() {
            let block = try writableBitmap(i, tm: tm)
            writeBitmap(i, into: block, bm: tm.bm)
            indexRoot = try indexTree.insert(indexRoot, UInt64(i), indexEntries[i]).root
        }
    }

    /// Writes the metadata space map. Allocating blocks for its own bitmaps,
    /// index and ref-count tree changes the counts it records, so it repeats
    /// until a pass allocates nothing; then it writes the final counts.
    func flushMetadata(tm: TransactionManager) throws(MetadataError) {
        // As in flushData: which store is flushed how is our code's choice, not the disk's.
        precondition(kind == .metadata && sm === tm.sm)
        guard !sm.dirtyBitmaps.isEmpty || !sm.overflowDirty.isEmpty || indexRoot == 0 else { return }
        let refTree = BTree<UInt32>(tm: tm, name: "metadata space map ref-count")
        var changed = true
        while changed {
            changed = false
            let overflow = sm.overflowDirty
            sm.overflowDirty.removeAll()
            for b in overflow.sorted() {
                let c = sm.count(b)
                refCountRoot = c >= 3 ? try refTree.insert(refCountRoot, b, c).root : try refTree.remove(refCountRoot, b).root
                changed = true
            }
            for i in sm.dirtyBitmaps.sorted() where !isWritable(bitmapLocations[i]) {
                _ = try writableBitmap(i, tm: tm)
                changed = true
            }
            if !isWritable(indexRoot) {
                let index = try tm.newBlock(as: .metadataIndex)
                if indexRoot != 0 { try tm.dec(indexRoot) }
                indexRoot = index.location
                changed = true
            }
        }
        for i in sm.dirtyBitmaps.sorted() {
            writeBitmap(i, into: try tm.read(bitmapLocations[i], as: .bitmap), bm: tm.bm)
        }
        let index = try tm.read(indexRoot, as: .metadataIndex)
        index.zero()
        for (i, e) in indexEntries.enumerated() { e.store(into: index, at: Self.indexEntriesOffset + 16 * i) }
        tm.bm.markDirty(index, as: .metadataIndex)
    }

    /// For the metadata space map, whose own blocks it tracks: allocated in this transaction.
    private func isWritable(_ location: UInt64) -> Bool { location != 0 && sm.isNew(location) }

    /// The block of bitmap `i`, moved to a block allocated in this transaction if needed.
    private func writableBitmap(_ i: Int, tm: TransactionManager) throws(MetadataError) -> MetadataBlock {
        let location = bitmapLocations[i]
        if location != 0 && tm.sm.isNew(location) {
            return try tm.read(location, as: .bitmap)
        }
        let block = try tm.newBlock(as: .bitmap)
        if location != 0 { try tm.dec(location) }
        bitmapLocations[i] = block.location
        return block
    }

    private func writeBitmap(_ i: Int, into block: MetadataBlock, bm: BlockManager) {
        block.zero()
        sm.storeBitmap(i, into: block)
        bm.markDirty(block, as: .bitmap)
        let usage = sm.bitmapUsage(i)
        indexEntries[i] = IndexEntry(blocknr: block.location,
                                     nrFree: UInt32(SpaceMap.entriesPerBitmap - usage.used),
                                     noneFreeBefore: UInt32(usage.firstFree))
    }

    /// Grows a data space map to `nrBlocks` (new bitmaps are written at the next commit).
    func extend(to nrBlocks: UInt64) {
        sm.extend(to: nrBlocks)
        while bitmapLocations.count < sm.nrBitmaps {
            bitmapLocations.append(0)
            indexEntries.append(IndexEntry(blocknr: 0, nrFree: 0, noneFreeBefore: 0))
        }
    }
}
