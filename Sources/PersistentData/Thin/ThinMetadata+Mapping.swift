/// Block mappings of thin devices.
extension ThinMetadata {
    public struct Mapping: Equatable, Sendable {
        public var dataBlock: UInt64
        public var time: UInt32
        /// Another device (or a shared metadata node) may reference this data
        /// block, so it must not be written in place.
        public var shared: Bool
    }

    func device(_ id: ThinDeviceID) throws(MessageError) -> Device {
        guard let d = devices[id] else { throw .unknownDevice(id) }
        return d
    }

    /// The mapping of virtual block `vblock` of device `id`, or nil if unmapped.
    ///
    /// Sharing follows the kernel (`__snapshotted_since`): a mapping older than
    /// the device's last snapshot may be shared. It is then checked exactly: a
    /// shared node on the path, or a data block counted more than once.
    public func lookup(_ id: ThinDeviceID, _ vblock: UInt64) throws -> Mapping? {
        let d = try device(id)
        let found = try inspect { () throws -> (BlockTime, Bool)? in
            guard let (v, pathShared) = try mappingTree.lookupSharing(d.root, vblock) else { return nil }
            let bt = BlockTime(packed: v)
            guard bt.block < dataSM.nrBlocks else {
                throw MetadataError.inconsistent(block: d.root, tree: "mapping",
                                                 reason: "device \(id) block \(vblock) maps to data block \(bt.block), beyond \(dataSM.nrBlocks)")
            }
            return (bt, pathShared)
        }
        guard let (bt, pathShared) = found else { return nil }
        let mayBeShared = d.details.snapshottedTime > bt.time
        let shared = mayBeShared && (pathShared || dataSM.count(bt.block) > 1)
        return Mapping(dataBlock: bt.block, time: bt.time, shared: shared)
    }

    /// Maps `vblock` of device `id` to `dataBlock`, which the caller has
    /// allocated (its one reference passes to the mapping). An overwritten
    /// mapping's data block loses a reference.
    public func insert(_ id: ThinDeviceID, _ vblock: UInt64, dataBlock: UInt64) throws {
        var d = try device(id)
        try change { () throws(MetadataError) in
            // Shadow the top-level path first: if it is shared (a metadata
            // snapshot holds it), the copy takes its own reference to the old
            // subtree root before the subtree is shadowed below, as dm-btree's
            // multi-level insert does. Once shadowed in this transaction the
            // path stays private until the commit, so it is done once per device.
            try makeTopPathPrivate(id, d.root)
            let r = try mappingTree.insert(d.root, vblock, BlockTime(block: dataBlock, time: superblock.time).packed)
            d.root = r.root
            mappingRoot = try topTree.insert(mappingRoot, UInt64(id), d.root).root
            if let old = r.old {
                try dataSM.dec(old >> 24)
            } else {
                d.details.mappedBlocks += 1
            }
            d.changed = true
            devices[id] = d
        }
    }

    /// Unmaps `vblock`; returns whether it was mapped.
    @discardableResult
    public func remove(_ id: ThinDeviceID, _ vblock: UInt64) throws -> Bool {
        var d = try device(id)
        guard try inspect({ try mappingTree.lookup(d.root, vblock) }) != nil else { return false }
        try change { () throws(MetadataError) in
            try makeTopPathPrivate(id, d.root)
            let r = try mappingTree.remove(d.root, vblock)
            d.root = r.root
            mappingRoot = try topTree.insert(mappingRoot, UInt64(id), d.root).root
            if let old = r.old {
                try dataSM.dec(old >> 24)
                d.details.mappedBlocks -= 1
            }
            d.changed = true
            devices[id] = d
        }
        return true
    }

    private func makeTopPathPrivate(_ id: ThinDeviceID, _ root: UInt64) throws(MetadataError) {
        guard !privateTopPaths.contains(id) else { return }
        mappingRoot = try topTree.insert(mappingRoot, UInt64(id), root).root
        privateTopPaths.insert(id)
    }

    /// Every mapping of device `id` with virtual block in `range`, in order.
    public func mappings(_ id: ThinDeviceID, in range: ClosedRange<UInt64> = 0...UInt64.max,
                         _ body: (UInt64, BlockTime) throws -> Bool) throws {
        let d = try device(id)
        try inspect {
            try mappingTree.forEach(d.root, from: range.lowerBound) { k, v in
                guard k <= range.upperBound else { return false }
                return try body(k, BlockTime(packed: v))
            }
        }
    }

    /// Highest mapped virtual block of a device, if any.
    public func highestMapped(_ id: ThinDeviceID) throws -> UInt64? {
        let d = try device(id)
        let tree = mappingTree
        return try inspect { () throws -> UInt64? in
            var location = d.root
            while true {
                let n = try tree.node(location)
                let c = BTreeNode.count(n)
                guard c > 0 else { return nil }
                if BTreeNode.isLeaf(n) { return BTreeNode.key(n, c - 1) }
                location = try tree.child(n, c - 1)
            }
        }
    }

    // MARK: Data blocks

    /// A data block free now and in the committed state, with one reference.
    public func allocateDataBlock() throws(MetadataError) -> UInt64 {
        try requireWritable()
        guard let b = dataSM.allocate() else { throw .noDataSpace }
        return b
    }

    /// Drops a reference taken by `allocateDataBlock` that was never mapped.
    /// Once the metadata is read-only (needs_check) nothing is committed any more,
    /// and a rollback may already have taken the allocation with it: nothing to release.
    public func releaseDataBlock(_ b: UInt64) {
        guard mode == .readWrite, dataSM.isNew(b) else { return }
        // isNew: allocated in this transaction, so the count is at least 1.
        try? dataSM.dec(b)
    }

    /// True when data block `b` was allocated since the last commit, so no
    /// committed mapping can point at it and it may be overwritten in place.
    public func isDataBlockNew(_ b: UInt64) -> Bool { dataSM.isNew(b) }
}
