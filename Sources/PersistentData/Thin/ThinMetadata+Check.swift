/// Our own metadata checker: it finds what thin_check finds, and a little more.
///
/// It reads the committed metadata straight from the storage (through a block
/// manager of its own, so neither this instance's cache nor its uncommitted
/// changes colour the result), visits every distinct metadata block once, and
/// applies these rules:
///
/// - Every block passes its validator: salted checksum and self-recorded block
///   number (dm-block-manager.c `dm_bm_read_lock`; thin_check's `check_block_nr`).
/// - Every btree node header is sane: flags internal or leaf, value_size that of
///   its tree (8 in internal nodes), max_entries the kernel's `calc_max_entries`
///   (a multiple of 3), nr_entries <= max_entries (dm-btree-spine.c `node_check`).
/// - Keys are strictly increasing within a node, and lie within the bounds the
///   parent gives the child (thin_check `check_ordered_keys`, `check_parent_key`,
///   `check_leaf_key`): lookups descend by `lower_bound`, so a key outside its
///   range is unreachable.
/// - Every non-root node is at least max_entries/3 full (thin_check
///   `check_nr_entries`): dm-btree-remove.c rebalances on that assumption.
/// - All leaves of a tree are at the same depth: a dm-btree only grows at the
///   root (`btree_split_beneath`) and removal merges siblings of one level.
/// - The reference count of every metadata block equals the number of
///   references to it (thin_check `count_metadata`, `compare_metadata_space_maps`):
///   the superblock and a held superblock copy once; each btree node once per
///   distinct parent node (or root pointer) referencing it, a shared subtree
///   being walked once, as `counting_visitor` does; each device's bottom-tree
///   root once per top-level leaf entry; the metadata space map's index block and
///   bitmaps, the data space map's bitmaps, and the nodes of the data index and
///   both ref-count trees once each. Too low a count lets the kernel reuse a live
///   block (fatal); too high a count leaks it.
/// - The reference count of every data block equals the number of bottom-tree
///   leaf entries mapping it, counted once per distinct leaf block: a shared leaf
///   holds one reference per entry however many devices reach it, because
///   dm-btree only adds references when it copies a shared node (`BTree.shadow`,
///   dm-thin-metadata.c `data_block_inc`). thin_check 0.9.0 leaves this out
///   ("data block reference counting is disabled"); 1.x compares them again.
/// - Space-map internals: a ref-count tree entry exactly where the bitmap says 3
///   (dm-space-map-common.c `sm_ll_lookup`), each with a count of 3 or more;
///   every index entry's blocknr on the device, and no bitmap entry set past
///   nr_blocks. An index entry's nr_free or the root's nr_allocated that
///   disagrees with the bitmaps is a warning (see `hintWrong`).
/// - Devices: the details tree and the top-level mapping tree name the same
///   devices (thin_check "missing devices"), ids fit 24 bits (MAX_DEV_ID), and
///   each device's mapped_blocks equals its mapping count (the kernel reports it
///   as the thin device's usage).
///
/// When this instance has no uncommitted changes, its in-memory space maps, roots
/// and device details must also equal what is on disk.
public struct CheckReport: Sendable, CustomStringConvertible {
    /// Each names the block, device or data block at fault.
    public internal(set) var errors: [String] = []
    /// Not corruption (for example the needs_check flag), but worth knowing.
    public internal(set) var warnings: [String] = []
    /// Distinct metadata blocks read.
    public internal(set) var metadataBlocksVisited = 0
    /// Mappings in distinct bottom-tree leaves.
    public internal(set) var mappingsVisited: UInt64 = 0

    public var isClean: Bool { errors.isEmpty }

    public var description: String {
        var s = isClean ? "metadata is consistent" : "\(errors.count) error(s)"
        s += " (\(metadataBlocksVisited) metadata blocks, \(mappingsVisited) mappings)"
        for e in errors { s += "\n  error: " + e }
        for w in warnings { s += "\n  warning: " + w }
        return s
    }
}

extension ThinMetadata {
    /// Checks the last commit on this instance's storage; see `CheckReport`.
    public func check() throws -> CheckReport {
        var checker = MetadataChecker(storage: bm.storage)
        checker.run()
        if hasUncommittedChanges {
            checker.report.warnings.append("there are uncommitted changes: only the last commit was checked")
        } else if let disk = checker.committed {
            checker.compareInMemory(self, disk)
        }
        return checker.report
    }

    /// Opens the metadata on `storage` and checks it. A failure to open is an
    /// error in the report, and the structural walk still runs for detail.
    public static func check(storage: MetadataStorage) throws -> CheckReport {
        let md: ThinMetadata
        do {
            md = try open(storage: storage)
        } catch {
            var checker = MetadataChecker(storage: storage)
            checker.run()
            var report = checker.report
            report.errors.insert("cannot open the metadata: \(error)", at: 0)
            return report
        }
        return try md.check()
    }

    /// Changes made since the last commit. Every change dirties a block or a
    /// space-map bitmap, moves a root or marks a device changed.
    var hasUncommittedChanges: Bool {
        bm.dirtyCount > 0
            || !metadataSM.dirtyBitmaps.isEmpty || !metadataSM.overflowDirty.isEmpty
            || !dataSM.dirtyBitmaps.isEmpty || !dataSM.overflowDirty.isEmpty
            || mappingRoot != superblock.dataMappingRoot || detailsRoot != superblock.deviceDetailsRoot
            || devices.values.contains { $0.changed }
    }
}

/// Reference counts for a whole device, one byte each until a count outgrows it.
///
/// The counts live in pages allocated when a block of theirs is first counted: `count` comes
/// from the superblock, before anything has confirmed it (a data space map of 2^39 blocks passes
/// the 40-bit check), so memory must follow the references the walk finds, not that field.
struct RefCounter {
    static let pageShift = 16
    static let pageSize = 1 << pageShift
    private var pages: [Int: [UInt8]] = [:]
    private var large: [UInt64: UInt32] = [:]
    let count: Int

    init(count: UInt64) { self.count = Int(clamping: count) }

    mutating func inc(_ b: UInt64) {
        let i = Int(b)
        let (p, o) = (i >> Self.pageShift, i & (Self.pageSize - 1))
        let c = pages[p]?[o] ?? 0
        if c < UInt8.max {
            pages[p, default: [UInt8](repeating: 0, count: Self.pageSize)][o] = c + 1
        } else {
            large[b, default: UInt32(UInt8.max)] += 1
        }
    }

    func get(_ b: UInt64) -> UInt32 {
        let i = Int(b)
        let c = pages[i >> Self.pageShift]?[i & (Self.pageSize - 1)] ?? 0
        return c < UInt8.max ? UInt32(c) : large[b] ?? UInt32(UInt8.max)
    }

    /// True when blocks [from, from + n) all have count 0 (a fast path for sparse maps).
    func allZero(from: Int, count n: Int) -> Bool {
        var i = from
        let end = min(from + n, count)
        while i < end {
            let pageEnd = min(end, (i >> Self.pageShift + 1) << Self.pageShift)
            if let page = pages[i >> Self.pageShift] {
                for j in i ..< pageEnd where page[j & (Self.pageSize - 1)] != 0 { return false }
            }
            i = pageEnd
        }
        return true
    }
}

/// The walk behind `ThinMetadata.check()`.
struct MetadataChecker {
    /// The btrees of dm-thin metadata; each has its own leaf value size.
    enum Tree: UInt8, CustomStringConvertible {
        case top = 10, bottom, details, dataIndex, metadataRefCounts, dataRefCounts

        var leafValueSize: Int {
            switch self {
            case .top, .bottom: 8
            case .details: DeviceDetails.size
            case .dataIndex: IndexEntry.size
            case .metadataRefCounts, .dataRefCounts: 4
            }
        }

        var description: String {
            switch self {
            case .top: "top-level mapping tree"
            case .bottom: "device mapping tree"
            case .details: "device details tree"
            case .dataIndex: "data space-map index tree"
            case .metadataRefCounts: "metadata space-map ref-count tree"
            case .dataRefCounts: "data space-map ref-count tree"
            }
        }
    }

    /// What a metadata block is used as; a block used as two things is corrupt.
    enum Role: UInt8 {
        case unused = 0, superblock, snapshotSuperblock, metadataIndex, metadataBitmap, dataBitmap
    }

    /// What the walk learnt about a subtree, kept so a shared subtree is read once.
    struct Summary {
        var height: Int
        /// Leaf entries below.
        var entries: UInt64
        var firstKey: UInt64?
        var lastKey: UInt64?
        /// Leaf values, for the small trees whose contents the checker compares.
        var items: [Item]
    }

    enum Item {
        /// A top-level leaf entry, with the number of mappings under its root
        /// (nil when that tree is unreadable).
        case device(id: UInt64, root: UInt64, mappings: UInt64?)
        case details(id: UInt64, DeviceDetails)
        case index(UInt64, IndexEntry)
        case refCount(UInt64, UInt32)
    }

    /// The committed state as read from disk, for comparing with an open instance.
    struct Committed {
        var superblock: Superblock
        var devices: [UInt64: (root: UInt64, details: DeviceDetails)]
        var metadataSM: SpaceMap?
        var dataSM: SpaceMap?
    }

    /// How many messages of one kind are listed before the rest are summarised.
    static let messageLimit = 64

    let bm: BlockManager
    var report = CheckReport()
    private(set) var committed: Committed?

    private var nrMetadataBlocks: UInt64 = 0
    private var nrDataBlocks: UInt64 = 0
    private var expectedMetadata = RefCounter(count: 0)
    private var expectedData = RefCounter(count: 0)
    private var roles: [UInt8] = []
    private var summaries: [UInt64: Summary] = [:]
    private var mappingErrors = 0

    init(storage: MetadataStorage) {
        // A block manager of our own: the checker sees what is on disk, and the
        // cache it fills is dropped with it.
        bm = BlockManager(storage: storage, cacheCapacity: 4096)
    }

    private mutating func error(_ message: String) { report.errors.append(message) }

    /// A space map's nr_free and nr_allocated are summaries of its bitmaps,
    /// which are what counts: the kernel only skips a bitmap whose nr_free is 0
    /// (`sm_ll_find_free_block`) and reports nr_allocated as usage. thin_check
    /// does not look at them, and thin_restore 0.9.0 itself writes metadata
    /// space-map roots that are one block off. So a wrong summary is a warning;
    /// our own writes are held to exact values by the tests.
    private mutating func hintWrong(_ message: String) { report.warnings.append(message) }

    // MARK: The walk

    mutating func run() {
        guard bm.nrBlocks > 0 else {
            error("the metadata device is empty")
            return
        }
        // The superblock: magic first, so that a file of another kind gets the clearer error.
        let sb: Superblock
        do {
            let raw = try bm.readRaw(Superblock.location)
            let magic = raw.u64(32)
            guard magic == Superblock.magic else { throw MetadataError.badMagic(found: magic) }
            sb = try Superblock(block: bm.read(Superblock.location, as: .superblock))
        } catch {
            self.error("superblock (block 0): \(error)")
            return
        }
        report.metadataBlocksVisited += 1
        if sb.needsCheck { report.warnings.append("the superblock's needs_check flag is set") }

        nrMetadataBlocks = sb.metadataSpaceMap.nrBlocks
        guard nrMetadataBlocks > 0, nrMetadataBlocks <= bm.nrBlocks,
              nrMetadataBlocks <= ThinMetadata.maxMetadataBlocks else {
            error("superblock (block 0): the metadata space map tracks \(nrMetadataBlocks) blocks; the device has \(bm.nrBlocks), the format allows \(ThinMetadata.maxMetadataBlocks)")
            return
        }
        nrDataBlocks = sb.dataSpaceMap.nrBlocks
        guard nrDataBlocks < (1 << 40) else {
            error("superblock (block 0): the data space map tracks \(nrDataBlocks) blocks, beyond the 40-bit block field")
            return
        }
        expectedMetadata = RefCounter(count: nrMetadataBlocks)
        expectedData = RefCounter(count: nrDataBlocks)
        roles = [UInt8](repeating: 0, count: Int(nrMetadataBlocks))
        reference(Superblock.location, as: .superblock, from: "the superblock itself")

        var state = Committed(superblock: sb, devices: [:])
        state.devices = checkDevices(mappingRoot: sb.dataMappingRoot, detailsRoot: sb.deviceDetailsRoot, label: "")

        if sb.heldRoot != 0 {
            checkMetadataSnapshot(sb.heldRoot)
        }

        state.metadataSM = checkMetadataSpaceMap(sb.metadataSpaceMap)
        state.dataSM = checkDataSpaceMap(sb.dataSpaceMap)

        if let msm = state.metadataSM {
            compareCounts(kind: "metadata", actual: msm, expected: expectedMetadata, roles: roles)
        }
        if let dsm = state.dataSM {
            compareCounts(kind: "data", actual: dsm, expected: expectedData, roles: nil)
        }
        if mappingErrors > Self.messageLimit {
            error("... and \(mappingErrors - Self.messageLimit) more mappings to bad data blocks")
        }
        committed = state
    }

    /// The held metadata snapshot: a superblock copy whose two trees are kept alive.
    private mutating func checkMetadataSnapshot(_ held: UInt64) {
        guard held < nrMetadataBlocks else {
            error("superblock (block 0): held_root \(held) is beyond the \(nrMetadataBlocks) metadata blocks")
            return
        }
        guard reference(held, as: .snapshotSuperblock, from: "held_root") else { return }
        let snap: Superblock
        do {
            snap = try Superblock(block: bm.read(held, as: .superblock))
        } catch {
            self.error("metadata snapshot (block \(held)): \(error)")
            return
        }
        report.metadataBlocksVisited += 1
        _ = checkDevices(mappingRoot: snap.dataMappingRoot, detailsRoot: snap.deviceDetailsRoot,
                         label: "metadata snapshot (block \(held)): ")
    }

    /// Walks a details tree and a two-level mapping tree, and checks they agree.
    private mutating func checkDevices(mappingRoot: UInt64, detailsRoot: UInt64, label: String) -> [UInt64: (root: UInt64, details: DeviceDetails)] {
        let details = walk(detailsRoot, .details, from: "\(label)device_details_root")
        let top = walk(mappingRoot, .top, from: "\(label)data_mapping_root")
        var detailsByID: [UInt64: DeviceDetails] = [:]
        for case .details(let id, let d) in details?.items ?? [] { detailsByID[id] = d }
        var result: [UInt64: (root: UInt64, details: DeviceDetails)] = [:]
        for case .device(let id, let root, let mappings) in top?.items ?? [] {
            if id > UInt64(ThinMetadata.maxDeviceID) {
                error("\(label)device \(id): the id exceeds 24 bits (MAX_DEV_ID is \(ThinMetadata.maxDeviceID))")
            }
            guard let d = detailsByID[id] else {
                if details != nil { error("\(label)device \(id) has a mapping tree (root \(root)) but no details") }
                continue
            }
            result[id] = (root, d)
            if let mappings, mappings != d.mappedBlocks {
                error("\(label)device \(id): mapped_blocks is \(d.mappedBlocks) but its mapping tree (root \(root)) holds \(mappings) mappings")
            }
        }
        if top != nil {
            for id in detailsByID.keys.sorted() where result[id] == nil {
                error("\(label)device \(id) has details but no mapping tree")
            }
        }
        return result
    }

    /// Counts a reference to a metadata block used as `role`, naming it on a conflict.
    /// Returns whether this is the first reference.
    @discardableResult
    private mutating func reference(_ b: UInt64, as role: UInt8, from: String) -> Bool {
        let first = expectedMetadata.get(b) == 0
        expectedMetadata.inc(b)
        let old = roles[Int(b)]
        if old == 0 {
            roles[Int(b)] = role
        } else if old != role {
            error("metadata block \(b) is used as \(Self.roleName(old)) and, from \(from), as \(Self.roleName(role))")
        }
        return first
    }

    @discardableResult
    private mutating func reference(_ b: UInt64, as role: Role, from: String) -> Bool {
        reference(b, as: role.rawValue, from: from)
    }

    static func roleName(_ role: UInt8) -> String {
        if let tree = Tree(rawValue: role) { return "btree node of the \(tree)" }
        switch Role(rawValue: role) ?? .unused {
        case .unused: return "unreferenced"
        case .superblock: return "superblock"
        case .snapshotSuperblock: return "metadata snapshot superblock"
        case .metadataIndex: return "metadata space-map index"
        case .metadataBitmap: return "metadata space-map bitmap"
        case .dataBitmap: return "data space-map bitmap"
        }
    }

    /// Walks the tree at `location`, counting each reference and reading each
    /// distinct node once. `lower` and `upper` (exclusive) are the key bounds
    /// the parent gives this subtree. Returns nil when the subtree is unreadable.
    private mutating func walk(_ location: UInt64, _ tree: Tree, lower: UInt64? = nil, upper: UInt64? = nil,
                               isRoot: Bool = true, from: String, device: UInt64? = nil) -> Summary? {
        let context = device.map { "device \($0)'s mapping tree" } ?? "the \(tree)"
        guard location < nrMetadataBlocks else {
            error("\(from): btree node \(location) of \(context) is beyond the \(nrMetadataBlocks) metadata blocks")
            return nil
        }
        let first = reference(location, as: tree.rawValue, from: from)
        if !first {
            // Shared: its children were counted with its first reference. Only
            // the bounds of this parent remain to be checked.
            guard let s = summaries[location] else { return nil }   // unreadable, or a cycle
            checkBounds(location, s, lower: lower, upper: upper, context: context)
            return s
        }
        let n: MetadataBlock
        do {
            n = try bm.read(location, as: .btreeNode)
            // The checker reports key order itself, with the bounds its parent gives.
            try BTreeNode.validate(n, leafValueSize: tree.leafValueSize, tree: "\(tree)", keyOrder: false)
        } catch {
            self.error("\(context), reached from \(from): \(error)")
            return nil
        }
        report.metadataBlocksVisited += 1
        let count = BTreeNode.count(n)
        let max = BTreeNode.maxEntries(n)
        let leaf = BTreeNode.isLeaf(n)
        if !isRoot && count < max / 3 {
            error("btree node \(location) of \(context): \(count) entries, fewer than max_entries/3 = \(max / 3) for a non-root node")
        }
        if !leaf && count == 0 {
            error("btree node \(location) of \(context): an internal node with no entries")
        }
        for i in 1..<Swift.max(count, 1) where BTreeNode.key(n, i) <= BTreeNode.key(n, i - 1) {
            error("btree node \(location) of \(context): keys out of order at index \(i) (\(BTreeNode.key(n, i)) after \(BTreeNode.key(n, i - 1)))")
            break
        }
        var s = Summary(height: 0, entries: 0, firstKey: count > 0 ? BTreeNode.key(n, 0) : nil,
                        lastKey: count > 0 ? BTreeNode.key(n, count - 1) : nil, items: [])
        if leaf {
            s.entries = UInt64(count)
            for i in 0..<count {
                let key = BTreeNode.key(n, i)
                let offset = BTreeNode.valueOffset(n, i)
                switch tree {
                case .bottom:
                    let bt = BlockTime(packed: n.u64(offset))
                    report.mappingsVisited += 1
                    if bt.block < nrDataBlocks {
                        expectedData.inc(bt.block)
                    } else {
                        mappingErrors += 1
                        if mappingErrors <= Self.messageLimit {
                            error("\(context), leaf \(location): virtual block \(key) maps to data block \(bt.block), beyond the \(nrDataBlocks) data blocks")
                        }
                    }
                case .top:
                    // The leaf holds one reference to each device's tree; a
                    // shared leaf is walked once, so its references count once.
                    let root = n.u64(offset)
                    let tree = walk(root, .bottom, from: "top-level leaf \(location)", device: key)
                    s.items.append(.device(id: key, root: root, mappings: tree?.entries))
                case .details:
                    s.items.append(.details(id: key, DeviceDetails(loadingFrom: n, at: offset)))
                case .dataIndex:
                    s.items.append(.index(key, IndexEntry(loadingFrom: n, at: offset)))
                case .metadataRefCounts, .dataRefCounts:
                    s.items.append(.refCount(key, n.u32(offset)))
                }
            }
        } else {
            var height: Int?
            for i in 0..<count {
                let childLower = BTreeNode.key(n, i)
                let childUpper = i + 1 < count ? BTreeNode.key(n, i + 1) : upper
                guard let c = walk(BTreeNode.child(n, i), tree, lower: childLower, upper: childUpper, isRoot: false,
                                   from: "btree node \(location) of \(context)", device: device) else { continue }
                if let h = height, h != c.height {
                    error("btree node \(location) of \(context): its children hold leaves at different depths (\(h + 1) and \(c.height + 1) levels down)")
                }
                height = height ?? c.height
                s.entries += c.entries
                s.items += c.items
                if i == count - 1 { s.lastKey = c.lastKey ?? s.lastKey }
            }
            s.height = (height ?? 0) + 1
        }
        checkBounds(location, s, lower: lower, upper: upper, context: context)
        summaries[location] = s
        return s
    }

    /// A child's keys must be >= the parent's key for it and < the next one.
    private mutating func checkBounds(_ location: UInt64, _ s: Summary, lower: UInt64?, upper: UInt64?, context: String) {
        if let lower, let first = s.firstKey, first < lower {
            error("btree node \(location) of \(context): its lowest key \(first) is below the parent's key \(lower)")
        }
        if let upper, let last = s.lastKey, last >= upper {
            error("btree node \(location) of \(context): its key \(last) is not below the parent's next key \(upper)")
        }
    }

    // MARK: Space maps

    /// The metadata space map: an index block listing bitmaps, and a ref-count tree.
    private mutating func checkMetadataSpaceMap(_ root: SpaceMapRoot) -> SpaceMap? {
        let sm = SpaceMap(nrBlocks: root.nrBlocks)
        guard sm.nrBitmaps <= SpaceMapStore.maxMetadataBitmaps else {
            error("metadata space map: \(root.nrBlocks) blocks need \(sm.nrBitmaps) bitmaps, one index block holds \(SpaceMapStore.maxMetadataBitmaps)")
            return nil
        }
        guard root.bitmapRoot < nrMetadataBlocks else {
            error("metadata space map: index block \(root.bitmapRoot) is beyond the \(nrMetadataBlocks) metadata blocks")
            return nil
        }
        reference(root.bitmapRoot, as: .metadataIndex, from: "the metadata space-map root")
        var entries: [IndexEntry] = []
        do {
            let index = try bm.read(root.bitmapRoot, as: .metadataIndex)
            report.metadataBlocksVisited += 1
            for i in 0..<sm.nrBitmaps {
                entries.append(IndexEntry(loadingFrom: index, at: SpaceMapStore.indexEntriesOffset + 16 * i))
            }
        } catch {
            self.error("metadata space-map index: \(error)")
            return nil
        }
        let refs = walk(root.refCountRoot, .metadataRefCounts, from: "the metadata space-map root")
        return loadSpaceMap(sm, kind: "metadata", root: root, entries: entries, role: .metadataBitmap, refs: refs)
    }

    /// The data space map: an index btree keyed by bitmap number, and a ref-count tree.
    private mutating func checkDataSpaceMap(_ root: SpaceMapRoot) -> SpaceMap? {
        guard let index = walk(root.bitmapRoot, .dataIndex, from: "the data space-map root") else { return nil }
        // nr_blocks comes from disk: size nothing by it until the index agrees with it.
        let needed = SpaceMap.bitmapsNeeded(root.nrBlocks)
        let nrIndexEntries = index.items.reduce(0) { n, item in if case .index = item { n + 1 } else { n } }
        guard needed == UInt64(nrIndexEntries) else {
            error("data space map: \(root.nrBlocks) blocks need \(needed) bitmaps, its index tree has \(nrIndexEntries)")
            return nil
        }
        let sm = SpaceMap(nrBlocks: root.nrBlocks)
        var entries = [IndexEntry?](repeating: nil, count: sm.nrBitmaps)
        for case .index(let key, let e) in index.items {
            guard key < UInt64(entries.count) else {
                error("data space-map index tree: an entry for bitmap \(key), but \(root.nrBlocks) blocks need only \(entries.count) bitmaps")
                continue
            }
            entries[Int(key)] = e
        }
        if let missing = entries.firstIndex(where: { $0 == nil }) {
            error("data space-map index tree: no entry for bitmap \(missing)")
            return nil
        }
        let refs = walk(root.refCountRoot, .dataRefCounts, from: "the data space-map root")
        // None is nil: checked just above.
        return loadSpaceMap(sm, kind: "data", root: root, entries: entries.map { $0! }, role: .dataBitmap, refs: refs)
    }

    /// Reads a space map's bitmaps and overflow counts into `sm`, checking the
    /// index entries and the agreement of bitmaps and ref-count tree.
    private mutating func loadSpaceMap(_ sm: SpaceMap, kind: String, root: SpaceMapRoot, entries: [IndexEntry],
                                       role: Role, refs: Summary?) -> SpaceMap? {
        var ok = true
        let perBitmap = UInt64(SpaceMap.entriesPerBitmap)
        for (i, e) in entries.enumerated() {
            let what = "\(kind) space-map bitmap \(i)"
            guard e.blocknr != 0, e.blocknr < nrMetadataBlocks else {
                error("\(what): index entry names block \(e.blocknr), not a metadata block")
                ok = false
                continue
            }
            reference(e.blocknr, as: role, from: "\(kind) space-map index entry \(i)")
            let block: MetadataBlock
            do {
                block = try bm.read(e.blocknr, as: .bitmap)
            } catch {
                self.error("\(what): \(error)")
                ok = false
                continue
            }
            report.metadataBlocksVisited += 1
            // Entries past nr_blocks must be free: the kernel never sets them.
            let first = UInt64(i) * perBitmap
            let valid = Int(min(perBitmap, root.nrBlocks - first))
            var used = 0, stray = 0
            for w in 0..<SpaceMap.wordsPerBitmap {
                let word = block.u64(16 + 8 * w)
                guard word != 0 else { continue }
                for k in 0..<SpaceMap.entriesPerWord where (word >> (2 * k)) & 3 != 0 {
                    if w * SpaceMap.entriesPerWord + k < valid { used += 1 } else { stray += 1 }
                }
            }
            if stray > 0 {
                error("\(what) (block \(e.blocknr)): \(stray) entries past the \(root.nrBlocks) blocks of the device are not free")
            }
            // The kernel counts a last, partial bitmap's missing entries as free
            // (sm_ll_extend); thin-provisioning-tools does not. Both are sound.
            let nrFree = Int(e.nrFree)
            if nrFree != SpaceMap.entriesPerBitmap - used && nrFree != valid - used {
                hintWrong("\(what) (block \(e.blocknr)): index entry says \(nrFree) free, the bitmap has \(valid - used) free of \(valid)")
            }
            sm.loadBitmap(i, from: block)
        }
        guard ok else { return nil }
        guard let refs else { return nil }
        for case .refCount(let b, let c) in refs.items {
            guard b < root.nrBlocks else {
                error("\(kind) space-map ref-count tree: an entry for block \(b), beyond the \(root.nrBlocks) blocks")
                continue
            }
            if c < 3 {
                error("\(kind) space-map ref-count tree: block \(b) has count \(c); the tree holds only counts of 3 or more")
            }
            if sm.entry(b) != 3 {
                error("\(kind) space-map ref-count tree: block \(b) has count \(c) but its bitmap entry is \(sm.entry(b)), not 3")
                continue
            }
            sm.loadOverflow(b, c)
        }
        if let missing = sm.finishLoad() {
            error("\(kind) space map: block \(missing) has bitmap entry 3 but no ref-count tree entry")
        }
        if sm.nrAllocated != root.nrAllocated {
            hintWrong("\(kind) space map: the root says \(root.nrAllocated) blocks are allocated, the bitmaps have \(sm.nrAllocated)")
        }
        return sm
    }

    /// Compares the space map on disk with the counts the walk expects.
    /// `roles` names what each block is used as (metadata only; data blocks are all mapped).
    private mutating func compareCounts(kind: String, actual: SpaceMap, expected: RefCounter, roles: [UInt8]?) {
        var reported = 0
        let nr = Swift.min(actual.nrBlocks, UInt64(expected.count))
        var b: UInt64 = 0
        while b < nr {
            // Skip a word of 32 free blocks that nothing references.
            if b & 31 == 0, actual.words[Int(b >> 5)] == 0, expected.allZero(from: Int(b), count: 32) {
                b += 32
                continue
            }
            let have = actual.count(b), want = expected.get(b)
            if have != want {
                reported += 1
                if reported <= Self.messageLimit {
                    let use = want == 0 ? "unreferenced" : roles.map { Self.roleName($0[Int(b)]) } ?? "mapped"
                    error("\(kind) block \(b) (\(use)): the space map counts \(have), the metadata references it \(want) time(s)\(have > want ? " (leaked)" : "")")
                }
            }
            b += 1
        }
        if reported > Self.messageLimit {
            error("... and \(reported - Self.messageLimit) more \(kind) blocks with wrong counts")
        }
    }

    // MARK: In-memory state

    /// With nothing uncommitted, an open instance must hold exactly what is on disk.
    mutating func compareInMemory(_ md: ThinMetadata, _ disk: Committed) {
        let sb = disk.superblock
        if md.mappingRoot != sb.dataMappingRoot || md.detailsRoot != sb.deviceDetailsRoot || md.superblock.heldRoot != sb.heldRoot {
            error("in memory: roots (mapping \(md.mappingRoot), details \(md.detailsRoot), held \(md.superblock.heldRoot)) differ from the superblock's (\(sb.dataMappingRoot), \(sb.deviceDetailsRoot), \(sb.heldRoot))")
        }
        for id in Set(md.devices.keys.map(UInt64.init)).union(disk.devices.keys).sorted() {
            let mem = md.devices[ThinDeviceID(truncatingIfNeeded: id)]
            let onDisk = disk.devices[id]
            if mem?.root != onDisk?.root || mem?.details != onDisk?.details {
                error("in memory: device \(id) (root \(mem.map { String($0.root) } ?? "none")) differs from disk (root \(onDisk.map { String($0.root) } ?? "none"))")
            }
        }
        for (kind, mem, onDisk) in [("metadata", md.metadataSM, disk.metadataSM), ("data", md.dataSM, disk.dataSM)] {
            guard let onDisk else { continue }
            guard mem.nrBlocks == onDisk.nrBlocks else {
                error("in memory: the \(kind) space map tracks \(mem.nrBlocks) blocks, on disk \(onDisk.nrBlocks)")
                continue
            }
            guard mem.words != onDisk.words || mem.overflow != onDisk.overflow || mem.nrAllocated != onDisk.nrAllocated else { continue }
            var reported = 0
            for b in 0..<mem.nrBlocks where mem.count(b) != onDisk.count(b) {
                reported += 1
                if reported <= Self.messageLimit {
                    error("in memory: \(kind) block \(b) has count \(mem.count(b)), on disk \(onDisk.count(b))")
                }
            }
            if reported == 0 {
                error("in memory: the \(kind) space map has \(mem.nrAllocated) blocks allocated, on disk \(onDisk.nrAllocated)")
            }
        }
    }
}
