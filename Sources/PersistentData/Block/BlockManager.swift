/// Caches metadata blocks, validates them as they are read, and writes the
/// dirty ones back at commit.
///
/// The block manager never decides *where* a block goes: the transaction
/// manager only hands it blocks that are free in the committed state, so a
/// dirty block may be written out at any time without endangering the last
/// commit. Only the superblock is written in place, and only by `commit`.
///
/// Not thread-safe: its owner (`ThinMetadata`, behind the pool's metadata lock)
/// serializes every call.
public final class BlockManager {
    public let storage: MetadataStorage
    private var cache: [UInt64: Entry] = [:]
    private var dirty: Set<UInt64> = []
    /// Clean blocks kept in memory; dirty blocks stay until they are written.
    public var cacheCapacity: Int

    private final class Entry {
        let block: MetadataBlock
        var type: BlockType
        init(_ block: MetadataBlock, _ type: BlockType) {
            self.block = block
            self.type = type
        }
    }

    public init(storage: MetadataStorage, cacheCapacity: Int = 32768) {
        self.storage = storage
        self.cacheCapacity = cacheCapacity
    }

    public var nrBlocks: UInt64 { storage.nrBlocks }
    /// True when `location` is in the cache (read and validated, or written in this transaction).
    public func isCached(_ location: UInt64) -> Bool { cache[location] != nil }
    public var dirtyCount: Int { dirty.count }

    /// Reads and validates a block. A block that fails validation is never cached.
    public func read(_ location: UInt64, as type: BlockType) throws(MetadataError) -> MetadataBlock {
        if let entry = cache[location] {
            if entry.type != type {
                // The same bytes seen as another type must pass that type's check too.
                if !dirty.contains(location) { try entry.block.validate(type: type, blocknrOffset: Self.blocknrOffset(type)) }
                entry.type = type
            }
            return entry.block
        }
        let block = MetadataBlock(location: location)
        try storage.read(block: location, into: block.mutableBuffer)
        try block.validate(type: type, blocknrOffset: Self.blocknrOffset(type))
        insert(Entry(block, type))
        return block
    }

    /// Reads a block without validation (for the checker's diagnostics only).
    public func readRaw(_ location: UInt64) throws(MetadataError) -> MetadataBlock {
        let block = MetadataBlock(location: location)
        try storage.read(block: location, into: block.mutableBuffer)
        return block
    }

    /// A zeroed block at `location`, marked dirty; its old contents are not read.
    public func new(_ location: UInt64, as type: BlockType) throws(MetadataError) -> MetadataBlock {
        guard location < storage.nrBlocks else { throw .blockOutOfRange(block: location, nrBlocks: storage.nrBlocks) }
        let block = MetadataBlock(location: location)
        cache[location] = Entry(block, type)
        dirty.insert(location)
        return block
    }

    /// Marks a cached block as modified, to be sealed and written at the next flush.
    public func markDirty(_ block: MetadataBlock, as type: BlockType) {
        // Shadowing marks the same block dirty over and over within a transaction.
        if dirty.contains(block.location), let entry = cache[block.location], entry.block === block, entry.type == type { return }
        if let entry = cache[block.location], entry.block === block {
            entry.type = type
        } else {
            cache[block.location] = Entry(block, type)
        }
        dirty.insert(block.location)
    }

    public func isDirty(_ location: UInt64) -> Bool { dirty.contains(location) }

    /// Seals and writes every dirty block except the superblock, then syncs.
    public func flushDirty(except superblock: UInt64) throws(MetadataError) {
        for location in dirty.sorted() where location != superblock {
            guard let entry = cache[location] else { continue }
            entry.block.seal(type: entry.type, blocknrOffset: Self.blocknrOffset(entry.type))
            try storage.write(block: location, from: entry.block.buffer)
        }
        dirty = dirty.contains(superblock) ? [superblock] : []
        try storage.sync()
        trim()
    }

    /// Writes one block now and returns once it is durable (the superblock, at the end of a
    /// commit), without a sync of the whole storage: what it points at must be synced before.
    public func writeNow(_ block: MetadataBlock, as type: BlockType) throws(MetadataError) {
        block.seal(type: type, blocknrOffset: Self.blocknrOffset(type))
        try storage.writeDurably(block: block.location, from: block.buffer)
        dirty.remove(block.location)
        cache[block.location] = Entry(block, type)
    }

    /// Forgets every cached block (after an aborted transaction).
    public func discardAll() {
        cache.removeAll()
        dirty.removeAll()
    }

    /// Forgets one block, so the next read goes to the device.
    public func forget(_ location: UInt64) {
        cache.removeValue(forKey: location)
        dirty.remove(location)
    }

    private func insert(_ entry: Entry) {
        cache[entry.block.location] = entry
        if cache.count - dirty.count > cacheCapacity { trim() }
    }

    /// Drops clean blocks until they are three quarters of the capacity. Dirty blocks
    /// stay (they are written at the next flush) and do not count, so a large
    /// transaction does not make every read miss rescan the cache.
    private func trim() {
        var excess = cache.count - dirty.count - cacheCapacity * 3 / 4
        guard excess > 0 else { return }
        for (location, _) in cache where excess > 0 && !dirty.contains(location) {
            cache.removeValue(forKey: location)
            excess -= 1
        }
    }

    /// Where each block type records its own block number: at offset 8 for all of them.
    @inline(__always) static func blocknrOffset(_ type: BlockType) -> Int { 8 }
}
