/// The pool messages that change metadata (dm-thin.c `pool_message`), with the
/// kernel's semantics.
extension ThinMetadata {
    public enum MessageError: Error, Equatable, CustomStringConvertible, Sendable {
        case deviceIDInUse(ThinDeviceID)
        case unknownDevice(ThinDeviceID)
        case unknownOrigin(ThinDeviceID)
        case deviceIDTooLarge(UInt64)
        case transactionIDMismatch(current: UInt64, given: UInt64)
        case metadataSnapshotHeld(UInt64)
        case noMetadataSnapshot

        public var description: String {
            switch self {
            case .deviceIDInUse(let id): "thin device \(id) already exists"
            case .unknownDevice(let id): "thin device \(id) does not exist"
            case .unknownOrigin(let id): "origin thin device \(id) does not exist"
            case .deviceIDTooLarge(let id): "device id \(id) exceeds the 24-bit maximum of \(ThinMetadata.maxDeviceID)"
            case .transactionIDMismatch(let c, let g):
                "transaction id mismatch: the pool is at \(c), the message expected \(g)"
            case .metadataSnapshotHeld(let r): "a metadata snapshot is already held (block \(r)); release it first"
            case .noMetadataSnapshot: "no metadata snapshot is held"
            }
        }
    }

    public static func checkID(_ id: UInt64) throws(MessageError) -> ThinDeviceID {
        guard id <= UInt64(maxDeviceID) else { throw .deviceIDTooLarge(id) }
        return ThinDeviceID(id)
    }

    public func exists(_ id: ThinDeviceID) -> Bool { devices[id] != nil }

    /// `create_thin <id>`: a new device with no mappings.
    public func createThin(_ id: ThinDeviceID) throws {
        guard id <= Self.maxDeviceID else { throw MessageError.deviceIDTooLarge(UInt64(id)) }
        guard devices[id] == nil else { throw MessageError.deviceIDInUse(id) }
        try change { () throws(MetadataError) in
            let root = try mappingTree.create()
            mappingRoot = try topTree.insert(mappingRoot, UInt64(id), root).root
            devices[id] = Device(details: DeviceDetails(mappedBlocks: 0, transactionID: superblock.transactionID,
                                                        creationTime: superblock.time, snapshottedTime: superblock.time),
                                 root: root, changed: true)
        }
    }

    /// `create_snap <id> <origin>`: the new device shares the origin's mapping
    /// tree (one more reference to its root); the pool time moves on, so later
    /// writes to either device can tell shared blocks from their own.
    public func createSnap(_ id: ThinDeviceID, origin: ThinDeviceID) throws {
        guard id <= Self.maxDeviceID else { throw MessageError.deviceIDTooLarge(UInt64(id)) }
        guard devices[id] == nil else { throw MessageError.deviceIDInUse(id) }
        guard let originDevice = devices[origin] else { throw MessageError.unknownOrigin(origin) }
        try change { () throws(MetadataError) in
            try tm.inc(originDevice.root)
            mappingRoot = try topTree.insert(mappingRoot, UInt64(id), originDevice.root).root
            superblock.time &+= 1
            let time = superblock.time
            devices[origin]!.details.snapshottedTime = time
            devices[origin]!.changed = true
            devices[id] = Device(details: DeviceDetails(mappedBlocks: originDevice.details.mappedBlocks,
                                                        transactionID: superblock.transactionID,
                                                        creationTime: time, snapshottedTime: time),
                                 root: originDevice.root, changed: true)
        }
    }

    /// `delete <id>`: drops the device's mapping tree; blocks no other device
    /// references become free after the next commit.
    public func delete(_ id: ThinDeviceID) throws {
        guard devices[id] != nil else { throw MessageError.unknownDevice(id) }
        try change { () throws(MetadataError) in
            let removed = try topTree.remove(mappingRoot, UInt64(id))
            mappingRoot = removed.root
            if let root = removed.old { try mappingTree.delete(root) }
            detailsRoot = try detailsTree.remove(detailsRoot, UInt64(id)).root
            devices[id] = nil
        }
    }

    /// `set_transaction_id <current> <new>`: compare and swap.
    public func setTransactionID(current: UInt64, new: UInt64) throws {
        try requireWritable()
        guard current == superblock.transactionID else {
            throw MessageError.transactionIDMismatch(current: superblock.transactionID, given: current)
        }
        superblock.transactionID = new
    }

    /// `reserve_metadata_snap`: a read-only copy of the superblock whose trees
    /// stay as they are now, for userspace tools (thin_dump -m) to read.
    public func reserveMetadataSnap() throws {
        guard superblock.heldRoot == 0 else { throw MessageError.metadataSnapshotHeld(superblock.heldRoot) }
        // Commit first, so the roots copied below are the ones on disk.
        try commit()
        try change { () throws(MetadataError) in
            let copy = try tm.newBlock(as: .superblock)
            var snap = superblock
            // The copy is not a live superblock: the kernel wipes its space-map roots.
            snap.dataSpaceMap = SpaceMapRoot(nrBlocks: 0, nrAllocated: 0, bitmapRoot: 0, refCountRoot: 0)
            snap.metadataSpaceMap = SpaceMapRoot(nrBlocks: 0, nrAllocated: 0, bitmapRoot: 0, refCountRoot: 0)
            snap.heldRoot = 0
            snap.store(into: copy)
            tm.bm.markDirty(copy, as: .superblock)
            try tm.inc(mappingRoot)
            try tm.inc(detailsRoot)
            superblock.heldRoot = copy.location
        }
    }

    /// `release_metadata_snap`: drops the copy and the references it held.
    public func releaseMetadataSnap() throws {
        let held = superblock.heldRoot
        guard held != 0 else { throw MessageError.noMetadataSnapshot }
        try change { () throws(MetadataError) in
            let snap = try Superblock(block: tm.read(held, as: .superblock))
            try topTree.delete(snap.dataMappingRoot)
            try detailsTree.delete(snap.deviceDetailsRoot)
            try tm.dec(held)
            superblock.heldRoot = 0
        }
    }

    /// The superblock copy of the held metadata snapshot, if any.
    public func metadataSnapshot() throws(MetadataError) -> Superblock? {
        guard superblock.heldRoot != 0 else { return nil }
        return try Superblock(block: tm.read(superblock.heldRoot, as: .superblock))
    }

    /// Grows the data device to `nrBlocks`. Shrinking is refused.
    public func resizeData(nrBlocks: UInt64) throws(MetadataError) {
        guard nrBlocks >= dataSM.nrBlocks else {
            throw .invalidArgument("cannot shrink the data device from \(dataSM.nrBlocks) to \(nrBlocks) blocks")
        }
        guard nrBlocks < (1 << 40) else { throw .invalidArgument("\(nrBlocks) data blocks exceed the 40-bit block field") }
        try change { () throws(MetadataError) in dataStore.extend(to: nrBlocks) }
        try commit()
    }

    /// Sets superblock fields that thin_restore takes from XML.
    public func restoreHeader(uuid: [UInt8], time: UInt32, transactionID: UInt64, flags: UInt32) {
        superblock.uuid = Array((uuid + Array(repeating: 0, count: 16)).prefix(16))
        superblock.time = time
        superblock.transactionID = transactionID
        superblock.flags = flags
    }

    /// Adds a device with given details and an empty mapping tree (restore only).
    public func restoreDevice(_ id: ThinDeviceID, details: DeviceDetails, mappings: [(UInt64, BlockTime)]) throws {
        guard id <= Self.maxDeviceID else { throw MessageError.deviceIDTooLarge(UInt64(id)) }
        guard devices[id] == nil else { throw MessageError.deviceIDInUse(id) }
        try change { () throws(MetadataError) in
            var root = try mappingTree.create()
            let tree = mappingTree
            for (vblock, bt) in mappings {
                guard bt.block < dataSM.nrBlocks else {
                    throw .invalidArgument("device \(id) maps block \(vblock) to data block \(bt.block), beyond the \(dataSM.nrBlocks) data blocks")
                }
                try dataSM.inc(bt.block)
                let r = try tree.insert(root, vblock, bt.packed)
                root = r.root
                if let old = r.old { try dataSM.dec(old >> 24) }
            }
            mappingRoot = try topTree.insert(mappingRoot, UInt64(id), root).root
            devices[id] = Device(details: details, root: root, changed: true)
        }
    }
}
