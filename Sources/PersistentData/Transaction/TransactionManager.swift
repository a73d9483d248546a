/// Shadow paging over the block manager and the metadata space map
/// (dm-transaction-manager.c).
///
/// Nothing committed is ever changed in place. To modify a block, a caller
/// *shadows* it: a block allocated in this transaction and referenced once is
/// returned as is; any other block is copied into a newly allocated one and
/// the original's reference is dropped. When the original was shared
/// (count > 1), the copy adds a reference to every child, which the btree
/// does through `BTree.shadow`. A commit writes every dirty block, then the
/// superblock last, so a crash at any point leaves the previous commit intact.
///
/// Not thread-safe; `ThinMetadata` serializes every call.
public final class TransactionManager {
    public let bm: BlockManager
    /// Reference counts of metadata blocks.
    public let sm: SpaceMap

    public init(bm: BlockManager, sm: SpaceMap) {
        self.bm = bm
        self.sm = sm
    }

    public func read(_ location: UInt64, as type: BlockType) throws(MetadataError) -> MetadataBlock {
        guard location < sm.nrBlocks else { throw .blockOutOfRange(block: location, nrBlocks: sm.nrBlocks) }
        return try bm.read(location, as: type)
    }

    /// Allocates a zeroed block with reference count 1.
    public func newBlock(as type: BlockType) throws(MetadataError) -> MetadataBlock {
        guard let location = sm.allocate() else { throw .noMetadataSpace }
        return try bm.new(location, as: type)
    }

    /// Returns a writable version of `location` and whether the caller must add
    /// a reference to each of its children (the original was shared).
    public func shadow(_ location: UInt64, as type: BlockType) throws(MetadataError) -> (block: MetadataBlock, incChildren: Bool) {
        let count = sm.count(location)
        guard count > 0 else { throw .corrupt(block: location, reason: "shadowing a block that is not referenced") }
        if count == 1 && sm.isNew(location) {
            let block = try read(location, as: type)
            bm.markDirty(block, as: type)
            return (block, false)
        }
        let original = try read(location, as: type)
        let copy = try newBlock(as: type)
        copy.copy(from: original)
        try sm.dec(location)
        return (copy, count > 1)
    }

    public func inc(_ location: UInt64) throws(MetadataError) { try sm.inc(location) }
    public func dec(_ location: UInt64) throws(MetadataError) { try sm.dec(location) }
    public func refCount(_ location: UInt64) -> UInt32 { sm.count(location) }
}
