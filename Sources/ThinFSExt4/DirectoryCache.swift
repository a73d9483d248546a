/// Name → (inode, file type) per directory, so that a lookup, and the existence check that
/// every create, link and rename makes, cost a hash probe instead of a directory scan.
///
/// libext2fs's `ext2fs_lookup` reads every block of a directory (checksums included) until it
/// finds the name, and all of them when the name is absent, which is the case of every create.
/// Without this cache a create in a directory of n entries cost three scans: the kernel's
/// LOOKUP, the create's own existence check and `ext2fs_link`'s search for room.
///
/// ## Invariants
/// 1. **Complete or absent.** A directory is either not in the cache, or its map holds exactly
///    the live entries of the directory on disk, "." and ".." excepted. So a name missing from
///    a cached directory is missing on disk: a negative answer is as good as a positive one.
/// 2. **Bytes, not characters.** Names are the on-disk bytes and compare bytewise, as ext4
///    and `ext2fs_lookup` do. (Swift's `String ==` equates canonically equivalent spellings,
///    "é" and "e\u{301}", which ext4 keeps apart.)
/// 3. **Changed in the same critical section as the disk.** Every call that adds or removes
///    an entry of a directory (`ext2fs_link`, `ext2fs_unlink`, and `ext2fs_mkdir` or
///    `ext2fs_symlink` given a name) updates the map before the volume's lock is released:
///    `added` and `removed` on success; on failure the disk may hold either state, so the
///    directory is `dropped`, and the next lookup builds it again from the disk.
/// 4. **A freed directory is dropped.** Its inode number may come back as a new directory.
/// 5. **Bounded.** At most `capacity` entries in all; the least recently used directories go
///    first, and a directory larger than the whole budget is not cached (lookups in it scan).
///    Dropping is always safe, by (1).
///
/// 6. **Where there is room, exactly.** A cached directory may carry a `Layout`: for each of its
///    logical blocks, the physical block and the longest record an insert can place in it; and
///    then every entry knows the logical block that holds it. `Volume` adds and removes entries
///    of such a directory itself, one block read and written (so a create or an unlink costs
///    the same in a directory of 16 entries or of 16,000), and keeps the layout current in the
///    same critical section (3). A change libext2fs makes itself (an htree or inline directory,
///    "..", a fallback) clears the layout, `dropLayout`; the directory's names stay cached. A
///    layout is only ever built whole, from a scan, with the names (`store`).
///
/// "." and ".." are never cached: ".." changes when a directory moves (`setDotDot`), and
/// both sit at the start of the first block, where a scan finds them at once.
///
/// ## Locking
/// None of its own. The cache is a value inside `Volume`, read and changed only under the
/// volume's lock, in the same critical section as the libext2fs call that changed the
/// directory (3), so no thread can see the cache and the disk disagree. It takes no lock, so
/// it adds nothing to the program's lock order. Its lifetime is the `Volume`'s: a volume
/// opened again (after a crash, a rollback to the last commit, or on another mount) starts
/// with an empty cache, and two volumes never share one, even when their inode numbers
/// coincide (snapshots of one layer).
struct DirectoryCache {
    /// What a directory entry says: its inode and its `EXT2_FT_*` type, and the directory's
    /// logical block that holds it (`unknownBlock` when the directory has no layout).
    struct Entry: Equatable {
        var ino: UInt32
        var fileType: UInt8
        var block: UInt32 = Entry.unknownBlock
        static let unknownBlock = UInt32.max
    }

    /// Where a plain directory (block-mapped, no htree index, no inline data) has room (6).
    struct Layout: Equatable {
        /// Logical block → physical block; 0 for a hole, which never takes an entry.
        var physical: [UInt64] = []
        /// Logical block → the longest record (`recordLength`) one insert can place in it.
        var room: [UInt16] = []

        /// The first block with room for a record of `length` bytes, as kernel ext4 and libext2fs
        /// fill a directory without an index (first fit). A scan of two bytes per block: a
        /// directory of 16,000 entries has about 100 blocks of 4 KiB.
        func firstBlock(fitting length: Int) -> Int? {
            room.firstIndex { Int($0) >= length }
        }
    }

    /// The length of the record that holds a name of `nameLength` bytes: 8 bytes of header and
    /// the name, rounded up to 4 (`EXT2_DIR_REC_LEN`).
    static func recordLength(nameLength: Int) -> Int { (nameLength + 8 + 3) & ~3 }

    /// The answer for a cached directory; nil from `lookup` means "not cached, scan".
    enum Answer: Equatable {
        case found(Entry)
        case absent
    }

    private struct Directory {
        var names: [[UInt8]: Entry]
        var lastUse: UInt64
        var layout: Layout?
    }

    /// The entry budget across all directories.
    let capacity: Int
    private var directories: [UInt64: Directory] = [:]
    private(set) var entryCount = 0
    private var clock: UInt64 = 0

    /// Hits, misses (uncached directories) and builds, for tests and the unmount log.
    private(set) var hits: UInt64 = 0
    private(set) var misses: UInt64 = 0
    private(set) var builds: UInt64 = 0

    /// 200,000 entries: about 20 MB at worst, more than the largest directories of a Linux
    /// root filesystem together, and enough that a 16,000-entry directory stays cached.
    init(capacity: Int = 200_000) {
        self.capacity = capacity
    }

    static func isDot(_ name: some Collection<UInt8>) -> Bool {
        name.count == 1 && name.first == 0x2e || name.count == 2 && name.allSatisfy { $0 == 0x2e }
    }

    /// Whether `dir` is cached (tests).
    func contains(_ dir: UInt64) -> Bool { directories[dir] != nil }

    /// The answer for `name` in `dir`, or nil when `dir` is not cached (or the name is a dot).
    mutating func lookup(_ dir: UInt64, _ name: [UInt8]) -> Answer? {
        guard !Self.isDot(name), let entry = directories[dir].map({ $0.names[name] }) else {
            misses += 1
            return nil
        }
        hits += 1
        clock += 1
        directories[dir]!.lastUse = clock
        return entry.map(Answer.found) ?? .absent
    }

    /// `name`'s entry in `dir` without counting a hit (for a change that already looked it up).
    func peek(_ dir: UInt64, _ name: [UInt8]) -> Entry? { directories[dir]?.names[name] }

    /// `dir`'s layout, if it is cached with one (6).
    func layout(_ dir: UInt64) -> Layout? { directories[dir]?.layout }

    /// Block `block` of `dir` now has room for records of `room` bytes (after an insert or removal in it).
    mutating func setRoom(_ dir: UInt64, block: Int, _ room: Int) {
        guard directories[dir]?.layout != nil else { return }
        directories[dir]!.layout!.room[block] = UInt16(clamping: room)
    }

    /// `dir` grew by logical block `block` at `physical`, with room for records of `room` bytes.
    mutating func addBlock(_ dir: UInt64, block: Int, physical: UInt64, room: Int) {
        guard directories[dir]?.layout != nil else { return }
        directories[dir]!.layout!.physical.append(contentsOf: repeatElement(0, count: max(0, block + 1 - directories[dir]!.layout!.physical.count)))
        directories[dir]!.layout!.room.append(contentsOf: repeatElement(0, count: max(0, block + 1 - directories[dir]!.layout!.room.count)))
        directories[dir]!.layout!.physical[block] = physical
        directories[dir]!.layout!.room[block] = UInt16(clamping: room)
    }

    /// libext2fs changed `dir`'s blocks itself: its names stay, its layout goes (6).
    mutating func dropLayout(_ dir: UInt64) {
        guard directories[dir]?.layout != nil else { return }
        directories[dir]!.layout = nil
    }

    /// Installs `dir`'s complete listing, from one scan made under the volume's lock (1), with
    /// its layout when the directory is a plain one (6).
    /// Returns false when the directory alone exceeds the budget and is left uncached.
    @discardableResult
    mutating func store(_ dir: UInt64, _ entries: [(name: [UInt8], entry: Entry)], layout: Layout? = nil) -> Bool {
        drop(dir)
        var names: [[UInt8]: Entry] = [:]
        names.reserveCapacity(entries.count)
        for e in entries where !Self.isDot(e.name) { names[e.name] = e.entry }
        guard names.count <= capacity else { return false }
        evict(toFit: names.count)
        clock += 1
        builds += 1
        directories[dir] = Directory(names: names, lastUse: clock, layout: layout)
        entryCount += names.count
        return true
    }

    /// `name` was added to `dir` on disk.
    mutating func added(_ dir: UInt64, _ name: [UInt8], _ entry: Entry) {
        guard !Self.isDot(name), directories[dir] != nil else { return }
        // In place through the subscript's modify accessor: the map is not copied.
        if directories[dir]!.names.updateValue(entry, forKey: name) == nil { entryCount += 1 }
        if entry.block == Entry.unknownBlock { dropLayout(dir) }   // (6): a layout knows every entry's block
        guard entryCount > capacity else { return }
        evict(toFit: 0, keeping: dir)
        if entryCount > capacity { drop(dir) }   // it outgrew the whole budget by itself
    }

    /// `name` was removed from `dir` on disk.
    mutating func removed(_ dir: UInt64, _ name: [UInt8]) {
        guard !Self.isDot(name), directories[dir] != nil else { return }
        if directories[dir]!.names.removeValue(forKey: name) != nil { entryCount -= 1 }
    }

    /// Forgets `dir`: a change of it failed part-way (3), or its inode was freed (4).
    mutating func drop(_ dir: UInt64) {
        if let d = directories.removeValue(forKey: dir) { entryCount -= d.names.count }
    }

    mutating func removeAll() {
        directories = [:]
        entryCount = 0
    }

    /// Drops the least recently used directories (other than `keeping`) until `extra` more
    /// entries fit in the budget.
    private mutating func evict(toFit extra: Int, keeping: UInt64? = nil) {
        guard entryCount + extra > capacity else { return }
        let oldestFirst = directories.filter { $0.key != keeping }.sorted { $0.value.lastUse < $1.value.lastUse }
        for (dir, _) in oldestFirst where entryCount + extra > capacity { drop(dir) }
    }
}
