/// dm-thin pool metadata: the superblock, the two-level mapping tree, the
/// device-details tree and the two space maps, kept exactly in the kernel's
/// on-disk format (Documentation/admin-guide/device-mapper/thin-provisioning.rst,
/// drivers/md/dm-thin-metadata.c).
///
///     superblock (block 0)
///       ├── data_mapping_root ──► btree: dev id ──► btree: virtual block ──► block_time
///       ├── device_details_root ► btree: dev id ──► DeviceDetails
///       ├── data space map ─────► index btree ─► bitmaps;  ref-count btree
///       ├── metadata space map ─► index block ─► bitmaps;  ref-count btree
///       └── held_root ──────────► a superblock copy (metadata snapshot), or 0
///
/// A `ThinMetadata` is not thread-safe. The pool owns one and calls it under
/// its metadata lock; see `UserspaceThinPool`.
public final class ThinMetadata {
    public enum Mode: Equatable, Sendable {
        case readWrite
        /// Refuses every change; the reason is reported to callers.
        case readOnly(String)
    }

    /// The highest device id: 24 bits (the kernel's MAX_DEV_ID).
    public static let maxDeviceID: ThinDeviceID = (1 << 24) - 1
    /// dm-thin's metadata device limit (THIN_METADATA_MAX_SECTORS): 255 bitmaps of 16320 blocks.
    public static let maxMetadataBlocks = UInt64(SpaceMapStore.maxMetadataBitmaps * SpaceMap.entriesPerBitmap)

    public let bm: BlockManager
    public private(set) var tm: TransactionManager
    public private(set) var metadataStore: SpaceMapStore
    public private(set) var dataStore: SpaceMapStore
    public internal(set) var superblock: Superblock
    public internal(set) var mode: Mode

    /// Current roots (they move as trees are shadowed).
    var mappingRoot: UInt64
    var detailsRoot: UInt64

    struct Device {
        var details: DeviceDetails
        /// Root of the device's mapping tree (the value in the top-level tree).
        var root: UInt64
        var changed: Bool
    }
    /// Every device, loaded at open; details are written back at commit.
    var devices: [ThinDeviceID: Device] = [:]
    /// Devices whose top-level path was shadowed in this transaction; emptied at commit and abort.
    var privateTopPaths: Set<ThinDeviceID> = []

    public var metadataSM: SpaceMap { metadataStore.sm }
    public var dataSM: SpaceMap { dataStore.sm }

    // MARK: Trees

    /// Bottom level: virtual block -> block_time; each value holds a data-block reference.
    var mappingTree: BTree<UInt64> {
        let data = dataStore.sm
        // The data space map checks the block numbers: one beyond the data device,
        // or a count that would drop below zero, is an inconsistency it names.
        return BTree<UInt64>(
            tm: tm, name: "mapping",
            incValue: { v throws(MetadataError) in try data.inc(v >> 24) },
            decValue: { v throws(MetadataError) in try data.dec(v >> 24) })
    }

    /// Top level: device id -> root of its mapping tree; each value holds a metadata reference.
    var topTree: BTree<UInt64> {
        let tm = self.tm
        let bottom = mappingTree
        return BTree<UInt64>(tm: tm, name: "top-level mapping", incValue: { r throws(MetadataError) in try tm.inc(r) },
                             decValue: { r throws(MetadataError) in try bottom.delete(r) })
    }

    var detailsTree: BTree<DeviceDetails> { BTree<DeviceDetails>(tm: tm, name: "device details") }

    // MARK: Format and open

    private init(bm: BlockManager, tm: TransactionManager, metadataStore: SpaceMapStore, dataStore: SpaceMapStore,
                 superblock: Superblock, mode: Mode) {
        self.bm = bm
        self.tm = tm
        self.metadataStore = metadataStore
        self.dataStore = dataStore
        self.superblock = superblock
        self.mode = mode
        self.mappingRoot = superblock.dataMappingRoot
        self.detailsRoot = superblock.deviceDetailsRoot
    }

    /// Writes fresh, empty metadata (as the kernel does on a zeroed metadata device).
    public static func format(storage: MetadataStorage, dataBlockSize: UInt32, nrDataBlocks: UInt64) throws(MetadataError) -> ThinMetadata {
        let nrBlocks = min(storage.nrBlocks, maxMetadataBlocks)
        guard nrBlocks >= 64 else { throw .tooSmall(path: storage.name, bytes: storage.nrBlocks * 4096) }
        // A mapping holds its data block in 40 bits (as resizeData already enforces).
        guard nrDataBlocks < (1 << 40) else { throw .invalidArgument("\(nrDataBlocks) data blocks exceed the 40-bit block field") }
        let bm = BlockManager(storage: storage)
        let msm = SpaceMap(nrBlocks: nrBlocks, name: SpaceMapStore.Kind.metadata.treeName)
        try msm.set(Superblock.location, count: 1)
        let tm = TransactionManager(bm: bm, sm: msm)
        let metadataStore = try SpaceMapStore.newMetadata(sm: msm, tm: tm)
        let dataStore = try SpaceMapStore.newData(nrBlocks: nrDataBlocks, tm: tm)
        let mapping = try BTree<UInt64>(tm: tm).create()
        let details = try BTree<DeviceDetails>(tm: tm).create()
        let sb = Superblock(dataSpaceMap: dataStore.root, metadataSpaceMap: metadataStore.root, dataMappingRoot: mapping,
                            deviceDetailsRoot: details, dataBlockSize: dataBlockSize, metadataNrBlocks: nrBlocks)
        let md = ThinMetadata(bm: bm, tm: tm, metadataStore: metadataStore, dataStore: dataStore, superblock: sb, mode: .readWrite)
        try md.commit()
        return md
    }

    /// Opens existing metadata. Nothing is written until a change is committed.
    public static func open(storage: MetadataStorage) throws(MetadataError) -> ThinMetadata {
        let bm = BlockManager(storage: storage)
        let parts = try load(bm: bm)
        let md = ThinMetadata(bm: bm, tm: parts.tm, metadataStore: parts.metadata, dataStore: parts.data,
                              superblock: parts.sb, mode: parts.sb.needsCheck ? .readOnly("the needs_check flag is set; run thin_check and clear it") : .readWrite)
        try md.loadDevices()
        return md
    }

    /// Reads the superblock and space maps.
    private static func load(bm: BlockManager) throws(MetadataError) -> (sb: Superblock, tm: TransactionManager, metadata: SpaceMapStore, data: SpaceMapStore) {
        guard bm.nrBlocks > 0 else { throw .tooSmall(path: bm.storage.name, bytes: 0) }
        let raw = try bm.readRaw(Superblock.location)
        // Check the magic before the checksum, so that a file from another tool gets the clearer error.
        let magic = raw.u64(32)
        guard magic == Superblock.magic else { throw .badMagic(found: magic) }
        let sbBlock = try bm.read(Superblock.location, as: .superblock)
        let sb = try Superblock(block: sbBlock)
        let metadata = try SpaceMapStore.loadMetadata(root: sb.metadataSpaceMap, bm: bm)
        let tm = TransactionManager(bm: bm, sm: metadata.sm)
        let data = try SpaceMapStore.loadData(root: sb.dataSpaceMap, tm: tm)
        return (sb, tm, metadata, data)
    }

    private func loadDevices() throws(MetadataError) {
        devices = [:]
        var details: [ThinDeviceID: DeviceDetails] = [:]
        try rethrowing {
            try detailsTree.forEach(detailsRoot) { id, d in
                guard id <= UInt64(Self.maxDeviceID) else {
                    throw MetadataError.corrupt(block: self.detailsRoot, reason: "device id \(id) exceeds 24 bits")
                }
                details[ThinDeviceID(id)] = d
                return true
            }
            try topTree.forEach(mappingRoot) { id, root in
                guard let d = details[ThinDeviceID(truncatingIfNeeded: id)], id <= UInt64(Self.maxDeviceID) else {
                    throw MetadataError.corrupt(block: self.mappingRoot, reason: "device \(id) has mappings but no details")
                }
                self.devices[ThinDeviceID(id)] = Device(details: d, root: root, changed: false)
                return true
            }
        }
        if let orphan = details.keys.first(where: { devices[$0] == nil }) {
            throw .corrupt(block: detailsRoot, reason: "device \(orphan) has details but no mapping tree")
        }
    }

    // MARK: Transactions

    /// The superblock as the last commit wrote it, to tell a commit that has nothing to write
    /// (nil until this process commits: then the next commit always writes).
    private var committedSuperblock: [UInt8]?

    /// The superblock a commit would write now, before the roots the flush itself moves.
    private func superblockBytes() -> [UInt8] {
        var sb = superblock
        sb.dataMappingRoot = mappingRoot
        sb.deviceDetailsRoot = detailsRoot
        let block = MetadataBlock(location: Superblock.location)
        sb.store(into: block)
        return Array(block.buffer[4...])   // without the checksum, which `seal` sets
    }

    /// Whether a commit now would write anything: a changed device, a dirty metadata block, a
    /// space-map change, or a superblock field (transaction id, held root, flags) changed.
    public var commitWouldWrite: Bool {
        if bm.dirtyCount > 0 || devices.values.contains(where: \.changed) { return true }
        for sm in [dataSM, metadataSM] where !sm.dirtyBitmaps.isEmpty || !sm.overflowDirty.isEmpty || sm.nrFreedSinceCommit > 0 {
            return true
        }
        return committedSuperblock != superblockBytes()
    }

    /// Makes every change since the last commit durable. The superblock is written last, by a
    /// write that returns once it alone is durable (`BlockManager.writeNow`): the metadata blocks
    /// are written and synced before it, so it never reaches the disk ahead of what it points at.
    ///
    /// `beforeSuperblock` runs after the metadata blocks are written and synced and before the
    /// superblock: the caller's last chance to make durable what the new mappings point at (the
    /// pool syncs its data file there). If it throws, nothing is committed, and the transaction
    /// is abandoned as any failed change is (`fail`: roll back, needs_check, read-only). It is not
    /// kept for a retry: Linux reports a write-back error to one fsync only and may already have
    /// dropped the pages it could not write, so a later sync that returns 0 proves nothing, and
    /// committing these mappings then could publish blocks whose data is lost.
    public func commit(beforeSuperblock: () throws(MetadataError) -> Void = {}) throws(MetadataError) {
        try requireWritable()
        do {
            for id in devices.keys.sorted() where devices[id]!.changed {
                detailsRoot = try detailsTree.insert(detailsRoot, UInt64(id), devices[id]!.details).root
                devices[id]!.changed = false
            }
            try dataStore.flushData(tm: tm)
            try metadataStore.flushMetadata(tm: tm)
            superblock.dataMappingRoot = mappingRoot
            superblock.deviceDetailsRoot = detailsRoot
            superblock.dataSpaceMap = dataStore.root
            superblock.metadataSpaceMap = metadataStore.root
            try bm.flushDirty(except: Superblock.location)
        } catch {
            try fail(error)
        }
        committedSuperblock = nil
        do { try beforeSuperblock() } catch { try fail(error) }
        do {
            let sb = MetadataBlock(location: Superblock.location)
            superblock.store(into: sb)
            try bm.writeNow(sb, as: .superblock)
            committedSuperblock = superblockBytes()
        } catch {
            try fail(error)
        }
        metadataSM.didCommit()
        dataSM.didCommit()
        privateTopPaths.removeAll()
    }

    /// Throws away every change since the last commit and reloads it from disk.
    public func abort() throws(MetadataError) {
        bm.discardAll()
        do {
            let parts = try Self.load(bm: bm)
            tm = parts.tm
            metadataStore = parts.metadata
            dataStore = parts.data
            superblock = parts.sb
            mappingRoot = superblock.dataMappingRoot
            detailsRoot = superblock.deviceDetailsRoot
            privateTopPaths.removeAll()
            try loadDevices()
        } catch {
            // The transaction's blocks are gone from the cache, yet the space
            // maps and roots in memory still point at them: a commit now would
            // publish blocks that were never written.
            mode = .readOnly("the last commit could not be reloaded: \(error)")
            throw error
        }
    }

    /// A failure in the middle of a change: roll back to the last commit and, as
    /// the kernel does, flag the metadata for checking and go read-only.
    func fail(_ error: MetadataError) throws(MetadataError) -> Never {
        do {
            try abort()
            superblock.needsCheck = true
            let sb = MetadataBlock(location: Superblock.location)
            superblock.store(into: sb)
            try? bm.writeNow(sb, as: .superblock)
        } catch {
            // The last commit could not be reloaded, so `superblock` may still
            // hold this transaction's roots (commit sets them before writing the
            // blocks): writing it could publish blocks that never reached the
            // disk. Like the kernel when dm_pool_abort_metadata fails (fail_io),
            // leave the disk alone; needs_check is only recorded in memory.
            superblock.needsCheck = true
        }
        mode = .readOnly("\(error); needs_check is set")
        throw error
    }

    /// Runs a change; if it fails part way, the transaction is rolled back and the
    /// metadata goes read-only with needs_check (the kernel's metadata_operation_failed).
    func change<T>(_ body: () throws(MetadataError) -> T) throws(MetadataError) -> T {
        try requireWritable()
        do {
            return try body()
        } catch {
            try fail(error)
        }
    }

    /// Runs a read of the trees. Damage it meets (a bad checksum, contents that
    /// contradict the format) is reported as it is, and the metadata goes
    /// read-only with needs_check: the trees can no longer be trusted for the
    /// writes that would follow. Unlike a failed change (`fail`), a read writes
    /// nothing: the flag stays in memory, as a failed lookup changes nothing on
    /// disk in the kernel either (it only fails the bio); a change that meets the
    /// damage later sets it on disk.
    @discardableResult
    func inspect<T>(_ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let e as MetadataError where e.isDamage && mode == .readWrite {
            superblock.needsCheck = true
            mode = .readOnly("\(e); needs_check is set")
            throw e
        }
    }

    public func requireWritable() throws(MetadataError) {
        if case .readOnly(let why) = mode { throw .readOnly(reason: why) }
    }

    /// Clears needs_check after a successful check (thin_check --clear-needs-check-flag).
    /// It starts again from the last commit, so nothing of a failed transaction is published.
    public func clearNeedsCheck() throws(MetadataError) {
        try abort()
        superblock.needsCheck = false
        mode = .readWrite
        try commit()
    }

    // MARK: Status

    public var transactionID: UInt64 { superblock.transactionID }
    public var time: UInt32 { superblock.time }
    public var heldRoot: UInt64 { superblock.heldRoot }
    public var dataBlockSize: UInt32 { superblock.dataBlockSize }
    public var nrDataBlocks: UInt64 { dataSM.nrBlocks }
    public var nrMetadataBlocks: UInt64 { metadataSM.nrBlocks }
    public var usedDataBlocks: UInt64 { dataSM.nrAllocated }
    public var usedMetadataBlocks: UInt64 { metadataSM.nrAllocated }
    public var needsCheck: Bool { superblock.needsCheck }
    public var deviceIDs: [ThinDeviceID] { devices.keys.sorted() }

    public func details(_ id: ThinDeviceID) -> DeviceDetails? { devices[id]?.details }
}

/// Narrows an untyped error from a closure-taking API back to `MetadataError`.
func rethrowing<T>(_ body: () throws -> T) throws(MetadataError) -> T {
    do { return try body() } catch let e as MetadataError { throw e } catch { throw .invalidArgument("\(error)") }
}
