/// Reference counts for every block of a device: the data device or the
/// metadata device.
///
/// On disk (see `SpaceMap+Disk.swift`) a space map is a run of bitmap blocks,
/// two bits per block, plus a btree holding the counts of three or more. In
/// memory it is kept in the same shape: `words` is the concatenation of every
/// bitmap's payload, and `overflow` holds the counts that do not fit two bits.
///
///     2-bit entry value   meaning
///     0                   free
///     1, 2                reference count
///     3                   count >= 3, the real count is in the ref-count btree
///
/// Allocation follows the kernel's rule for crash safety
/// (`sm_ll_find_common_free_block`): a block is handed out only if it is free
/// both now and in the last committed state, so a crash before the next commit
/// finds every committed block untouched.
///
/// Not thread-safe; the owner serializes access.
public final class SpaceMap {
    public static let entriesPerWord = 32
    /// (4096 - 16-byte bitmap header) * 4 entries per byte.
    public static let entriesPerBitmap = 16320
    public static let wordsPerBitmap = entriesPerBitmap / entriesPerWord

    public private(set) var nrBlocks: UInt64
    /// What this map counts ("data space map", "metadata space map"), for errors.
    public let name: String
    public private(set) var nrAllocated: UInt64 = 0
    /// Two bits per block, in the kernel's bit order (see `entry(_:)`).
    private(set) var words: [UInt64]
    private(set) var overflow: [UInt64: UInt32] = [:]
    /// One bit per block: referenced in the last committed state.
    private var committed: [UInt64]
    /// Blocks whose count changed since the last commit.
    private var touched: Set<UInt64> = []
    /// Bitmaps whose contents changed since the last commit.
    public private(set) var dirtyBitmaps: Set<Int> = []
    /// Blocks whose overflow (btree) entry must be inserted or removed.
    public var overflowDirty: Set<UInt64> = []
    private var cursor: UInt64 = 0

    public init(nrBlocks: UInt64, name: String = "space map") {
        self.nrBlocks = nrBlocks
        self.name = name
        let nrWords = Int((nrBlocks + 31) / 32)
        self.words = [UInt64](repeating: 0, count: nrWords)
        self.committed = [UInt64](repeating: 0, count: (nrWords + 1) / 2)
    }

    public var nrBitmaps: Int { Int(Self.bitmapsNeeded(nrBlocks)) }

    /// The bitmaps that `nrBlocks` entries take: rounded up without `nrBlocks + per - 1`, which
    /// overflows for a count near 2^64 read from a damaged superblock (found by fuzz-superblock).
    public static func bitmapsNeeded(_ nrBlocks: UInt64) -> UInt64 {
        let per = UInt64(entriesPerBitmap)
        return nrBlocks / per + (nrBlocks % per == 0 ? 0 : 1)
    }
    public var nrFree: UInt64 { nrBlocks - nrAllocated }
    /// Blocks referenced by the last commit and free now: `allocate` may not hand them out
    /// before the next commit (the rule above), so they are free but not yet allocatable.
    public private(set) var nrFreedSinceCommit: UInt64 = 0
    /// Blocks `allocate` can hand out now.
    public var nrAllocatable: UInt64 { nrFree - nrFreedSinceCommit }

    /// The kernel stores entry `b` of a 64-bit little-endian word at bits
    /// 2*(b%32) (high bit of the count) and 2*(b%32)+1 (low bit):
    /// `sm_lookup_bitmap` in dm-space-map-common.c.
    @inline(__always) func entry(_ b: UInt64) -> UInt32 {
        let w = words[Int(b >> 5)]
        let shift = (b & 31) << 1
        let hi = (w >> shift) & 1
        let lo = (w >> (shift + 1)) & 1
        return UInt32(hi << 1 | lo)
    }

    @inline(__always) private func setEntry(_ b: UInt64, _ v: UInt32) {
        let i = Int(b >> 5)
        let shift = (b & 31) << 1
        let bits = UInt64((v >> 1) & 1) | UInt64(v & 1) << 1
        words[i] = (words[i] & ~(3 << shift)) | (bits << shift)
    }

    /// The reference count of block `b`; 0 beyond the map, so that a block
    /// number read from disk cannot index past the bitmaps.
    @inline(__always) public func count(_ b: UInt64) -> UInt32 {
        guard b < nrBlocks else { return 0 }
        let e = entry(b)
        return e < 3 ? e : overflow[b] ?? 3
    }

    public func isCommitted(_ b: UInt64) -> Bool { committed[Int(b >> 6)] & (1 << (b & 63)) != 0 }

    /// True when `b` was allocated since the last commit and may be changed in place.
    public func isNew(_ b: UInt64) -> Bool { b < nrBlocks && !isCommitted(b) && entry(b) != 0 }

    /// Sets the count of `b`, keeping the allocation total and the dirty sets right.
    /// Block numbers come from metadata on disk (btree values, child pointers), so
    /// one beyond the map is damage to report, not a crash.
    public func set(_ b: UInt64, count: UInt32) throws(MetadataError) {
        guard b < nrBlocks else {
            throw .inconsistent(block: b, tree: name, reason: "a reference to a block beyond the \(nrBlocks) blocks it counts")
        }
        store(b, count: count)
    }

    /// `set` for a block known to be in range.
    private func store(_ b: UInt64, count: UInt32) {
        // Only `set` (which checks) and `allocate` (which searches below nrBlocks) get here.
        assert(b < nrBlocks)
        let old = self.count(b)
        guard old != count else { return }
        if old == 0 { nrAllocated += 1 } else if count == 0 { nrAllocated -= 1 }
        if isCommitted(b) {
            if count == 0 { nrFreedSinceCommit += 1 } else if old == 0 { nrFreedSinceCommit -= 1 }
        }
        let oldEntry = entry(b)
        let newEntry = min(count, 3)
        if oldEntry != newEntry {
            setEntry(b, newEntry)
            dirtyBitmaps.insert(Int(b / UInt64(Self.entriesPerBitmap)))
        }
        if count >= 3 { overflow[b] = count } else if old >= 3 { overflow.removeValue(forKey: b) }
        if old >= 3 || count >= 3 { overflowDirty.insert(b) }
        touched.insert(b)
    }

    public func inc(_ b: UInt64) throws(MetadataError) {
        let c = count(b)
        // A ref-count btree value of 2^32-1 comes from disk; adding to it would overflow.
        guard c < UInt32.max else { throw .inconsistent(block: b, tree: name, reason: "its reference count \(c) cannot grow") }
        try set(b, count: c + 1)
    }

    /// Drops a reference. A count already 0 means the space map disagrees with a
    /// tree that references the block: the kernel's "unable to decrement a
    /// reference count below 0", which dm-thin turns into needs_check.
    public func dec(_ b: UInt64) throws(MetadataError) {
        let c = count(b)
        guard c > 0 else {
            throw .inconsistent(block: b, tree: name, reason: b < nrBlocks ? "a reference is dropped but its count is already 0"
                                                                          : "a reference to a block beyond the \(nrBlocks) blocks it counts")
        }
        try set(b, count: c - 1)
    }

    /// Allocates a block free now and in the committed state, with count 1.
    public func allocate() -> UInt64? {
        guard nrAllocated < nrBlocks else { return nil }
        if let b = search(from: cursor, to: nrBlocks) ?? search(from: 0, to: cursor) {
            store(b, count: 1)
            cursor = b + 1
            return b
        }
        return nil
    }

    /// Finds a block in [from, to) free now and in the committed state.
    private func search(from: UInt64, to: UInt64) -> UInt64? { firstZero(from: from, to: to, orCommitted: false) }

    /// The first block in [from, to) whose count is zero and, unless `orCommitted`, that the
    /// last commit does not reference either.
    private func firstZero(from: UInt64, to: UInt64, orCommitted: Bool) -> UInt64? {
        var b = from
        while b < to {
            // Skip a whole word at once when all 32 entries are in use.
            if b & 31 == 0 && Self.allNonZero(words[Int(b >> 5)]) {
                b += 32
                continue
            }
            if entry(b) == 0 && (orCommitted || !isCommitted(b)) { return b }
            b += 1
        }
        return nil
    }

    /// True when every 2-bit entry of `w` is non-zero.
    @inline(__always) private static func allNonZero(_ w: UInt64) -> Bool {
        let pairs = (w | (w >> 1)) & 0x5555_5555_5555_5555
        return pairs == 0x5555_5555_5555_5555
    }

    /// Records the current counts as the committed state; called once a commit is durable.
    public func didCommit() {
        for b in touched {
            let word = Int(b >> 6)
            let bit = UInt64(1) << (b & 63)
            if entry(b) != 0 { committed[word] |= bit } else { committed[word] &= ~bit }
        }
        touched.removeAll()
        dirtyBitmaps.removeAll()
        overflowDirty.removeAll()
        nrFreedSinceCommit = 0
        cursor = 0
    }

    /// Marks every bitmap dirty (a freshly formatted space map has none on disk).
    public func markAllBitmapsDirty() {
        for i in 0..<nrBitmaps { dirtyBitmaps.insert(i) }
    }

    /// Grows the map; new blocks are free. Shrinking is not supported.
    public func extend(to newNrBlocks: UInt64) {
        // Callers (resizeData) refuse shrinking before they get here; no disk value reaches it.
        precondition(newNrBlocks >= nrBlocks)
        let oldBitmaps = nrBitmaps
        nrBlocks = newNrBlocks
        let nrWords = Int((newNrBlocks + 31) / 32)
        words.append(contentsOf: repeatElement(0, count: nrWords - words.count))
        let committedWords = (nrWords + 1) / 2
        committed.append(contentsOf: repeatElement(0, count: committedWords - committed.count))
        for i in oldBitmaps..<nrBitmaps { dirtyBitmaps.insert(i) }
        // The previously last bitmap may have been partial: its disk image must grow too.
        if oldBitmaps > 0 { dirtyBitmaps.insert(oldBitmaps - 1) }
    }

    // MARK: Bitmap images

    /// Copies bitmap `index`'s payload words into a bitmap block (after its 16-byte header).
    func storeBitmap(_ index: Int, into block: MetadataBlock) {
        let base = index * Self.wordsPerBitmap
        for i in 0..<Self.wordsPerBitmap {
            let w = base + i < words.count ? words[base + i] : 0
            block.setU64(16 + i * 8, w)
        }
    }

    /// Loads bitmap `index`'s payload from a block; the caller recomputes totals afterwards.
    func loadBitmap(_ index: Int, from block: MetadataBlock) {
        let base = index * Self.wordsPerBitmap
        for i in 0..<Self.wordsPerBitmap where base + i < words.count {
            var w = block.u64(16 + i * 8)
            // Entries past nr_blocks in the last word are ignored.
            let firstEntry = UInt64(base + i) * 32
            if firstEntry + 32 > nrBlocks {
                let valid = nrBlocks - firstEntry
                w &= valid == 0 ? 0 : (UInt64.max >> (64 - valid * 2))
            }
            words[base + i] = w
        }
    }

    /// Sets an overflow count read from the ref-count btree at open.
    func loadOverflow(_ b: UInt64, _ count: UInt32) { overflow[b] = count }

    /// After loading: recounts allocations and treats everything as committed.
    /// Returns a block whose bitmap entry says 3+ but has no overflow count, if any.
    func finishLoad() -> UInt64? {
        nrAllocated = 0
        for (i, w) in words.enumerated() {
            var bits = (w | (w >> 1)) & 0x5555_5555_5555_5555
            nrAllocated += UInt64(bits.nonzeroBitCount)
            var cw = UInt64(0)
            var k = 0
            while bits != 0 {
                if bits & 1 != 0 { cw |= 1 << k }
                bits >>= 2
                k += 1
            }
            let ci = i >> 1
            if i & 1 == 0 { committed[ci] = cw } else { committed[ci] |= cw << 32 }
        }
        touched.removeAll()
        dirtyBitmaps.removeAll()
        overflowDirty.removeAll()
        nrFreedSinceCommit = 0
        for (i, w) in words.enumerated() {
            var threes = w & (w >> 1) & 0x5555_5555_5555_5555
            while threes != 0 {
                let b = UInt64(i) * 32 + UInt64(threes.trailingZeroBitCount / 2)
                if overflow[b] == nil { return b }
                threes &= threes - 1
            }
        }
        return nil
    }

    /// Number of non-zero entries in bitmap `index`, and the first zero entry.
    func bitmapUsage(_ index: Int) -> (used: Int, firstFree: Int) {
        let start = UInt64(index * Self.entriesPerBitmap)
        let end = min(start + UInt64(Self.entriesPerBitmap), nrBlocks)
        var used = 0
        let base = index * Self.wordsPerBitmap
        for i in 0..<Self.wordsPerBitmap where base + i < words.count {
            let w = words[base + i]
            used += ((w | (w >> 1)) & 0x5555_5555_5555_5555).nonzeroBitCount
        }
        let firstFree = firstZero(from: start, to: end, orCommitted: true).map { Int($0 - start) } ?? Int(end - start)
        return (used, firstFree)
    }

    /// Every block with a non-zero count, in order (for checkers and dumps).
    public func forEachAllocated(_ body: (UInt64, UInt32) throws -> Void) rethrows {
        for (wi, w) in words.enumerated() where w != 0 {
            for k in 0..<32 {
                let b = UInt64(wi) * 32 + UInt64(k)
                guard b < nrBlocks else { break }
                if entry(b) != 0 { try body(b, count(b)) }
            }
        }
    }
}
