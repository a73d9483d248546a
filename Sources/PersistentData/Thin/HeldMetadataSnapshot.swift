/// A live pool's held metadata snapshot, read the way `thin_ls -m` and `thin_dump -m` read it.
///
/// The kernel keeps rewriting a live pool's trees, so their blocks cannot be read consistently
/// from outside. `reserve_metadata_snap` makes the kernel write a copy of the superblock and keep
/// every block reachable from it unchanged until `release_metadata_snap`:
///
///     block 0: live superblock ── held_root ──▶ superblock copy (space-map roots wiped)
///                                                 ├─ data_mapping_root ─▶ dev id ─▶ vblock ─▶ block_time
///                                                 └─ device_details_root ─▶ dev id ─▶ DeviceDetails
///
/// Only block 0 and the blocks below the copy are read: not the live space maps, not the live
/// trees (`ThinMetadata.open` would read both, and could see them half-written).
public struct HeldMetadataSnapshot {
    /// The superblock copy; its space-map roots are zero, as the kernel leaves them.
    public let superblock: Superblock
    let tm: TransactionManager

    /// The held snapshot of the metadata in `storage`, or nil if none is held.
    public static func read(storage: MetadataStorage) throws(MetadataError) -> HeldMetadataSnapshot? {
        let bm = BlockManager(storage: storage)
        let raw = try bm.readRaw(Superblock.location)
        let magic = raw.u64(32)
        guard magic == Superblock.magic else { throw .badMagic(found: magic) }
        let live = try Superblock(block: try bm.read(Superblock.location, as: .superblock))
        guard live.heldRoot != 0 else { return nil }
        let copy = try Superblock(block: try bm.read(live.heldRoot, as: .superblock))
        // Reading never allocates: the space map only satisfies the transaction manager's type.
        // It is sized by the device, not by the superblock's metadata_nr_blocks: that field comes
        // from disk, and a bogus 2^43 would ask for terabytes (a fuzz finding, FuzzFindingTests).
        let tm = TransactionManager(bm: bm, sm: SpaceMap(nrBlocks: min(storage.nrBlocks, ThinMetadata.maxMetadataBlocks)))
        return HeldMetadataSnapshot(superblock: copy, tm: tm)
    }

    /// Every device's details, from the copy's device-details tree.
    public func devices() throws(MetadataError) -> [ThinDeviceID: DeviceDetails] {
        var result: [ThinDeviceID: DeviceDetails] = [:]
        let root = superblock.deviceDetailsRoot
        _ = try rethrowing {
            try BTree<DeviceDetails>(tm: tm).forEach(root) { id, details in
                guard id <= UInt64(ThinMetadata.maxDeviceID) else {
                    throw MetadataError.corrupt(block: root, reason: "device id \(id) exceeds 24 bits")
                }
                result[ThinDeviceID(id)] = details
                return true
            }
        }
        return result
    }

    /// Device `id`'s mappings in virtual-block order, until `body` returns false.
    public func mappings(_ id: ThinDeviceID, _ body: (UInt64, BlockTime) throws -> Bool) throws {
        let top = BTree<UInt64>(tm: tm)
        guard let root = try top.lookup(superblock.dataMappingRoot, UInt64(id)) else {
            throw MetadataError.corrupt(block: superblock.dataMappingRoot, reason: "device \(id) has no mapping tree in the metadata snapshot")
        }
        try BTree<UInt64>(tm: tm).forEach(root) { vblock, packed in try body(vblock, BlockTime(packed: packed)) }
    }
}
