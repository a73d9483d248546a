import Foundation
import PersistentData

/// `thinfs layer ls` and `thinfs info`.
extension LayerStore {
    public struct Usage: Codable, Equatable, Sendable {
        /// Bytes of the device's mapped blocks.
        public var mapped: UInt64
        /// Bytes in blocks no other device maps.
        public var exclusive: UInt64
        /// Bytes in blocks another device maps too (a parent, a sibling).
        public var shared: UInt64
    }

    /// Space per thin device. One pass over every device's mappings counts how many devices map
    /// each data block, as thin_ls does for its EXCLUSIVE and SHARED columns.
    public func usage() throws -> [ThinDeviceID: Usage] {
        try locked {
            let blockSize = try pool.status().dataBlockSize
            let blocks = try pool.mappedDataBlocks()
            var users: [UInt64: UInt32] = [:]
            for list in blocks.values { for b in list { users[b, default: 0] += 1 } }
            var result: [ThinDeviceID: Usage] = [:]
            for (id, list) in blocks {
                let exclusive = UInt64(list.count { users[$0] == 1 })
                result[id] = Usage(mapped: UInt64(list.count) * blockSize, exclusive: exclusive * blockSize,
                                   shared: (UInt64(list.count) - exclusive) * blockSize)
            }
            return result
        }
    }

    public struct Listing: Codable, Equatable, Sendable {
        public var id: String
        public var parent: String?
        public var deviceID: ThinDeviceID
        public var kind: Kind
        public var size: UInt64
        public var state: String
        public var mappedBytes: UInt64
        public var exclusiveBytes: UInt64
        public var sharedBytes: UInt64
    }

    /// Every layer with its state (active, mounted, deleted) and space.
    public func listing() throws -> [Listing] {
        try locked {
            let usage = try usage()
            return try allLayers().map { layer in
                var state = layer.state.rawValue
                if layer.state == .active, let holder = try busyHolder(layer.id) {
                    state = holder.readOnly ? "mounted-ro" : "mounted"
                }
                let u = usage[layer.deviceID] ?? Usage(mapped: 0, exclusive: 0, shared: 0)
                return Listing(id: layer.id, parent: layer.parent, deviceID: layer.deviceID, kind: layer.kind, size: layer.size,
                               state: state, mappedBytes: u.mapped, exclusiveBytes: u.exclusive, sharedBytes: u.shared)
            }
        }
    }

    public static func formatListing(_ rows: [Listing]) -> String {
        let header = ["LAYER", "PARENT", "DEVICE", "KIND", "SIZE", "STATE", "MAPPED", "EXCLUSIVE", "SHARED"]
        let table = [header] + rows.map {
            [$0.id, $0.parent ?? "-", String($0.deviceID), $0.kind.rawValue, ByteSize.human($0.size), $0.state,
             ByteSize.human($0.mappedBytes), ByteSize.human($0.exclusiveBytes), ByteSize.human($0.sharedBytes)]
        }
        let widths = header.indices.map { c in table.map { $0[c].count }.max() ?? 0 }
        return table.map { row in
            row.enumerated().map { c, cell in c == row.count - 1 ? cell : cell.padding(toLength: widths[c], withPad: " ", startingAt: 0) }
                .joined(separator: "  ")
        }.joined(separator: "\n") + "\n"
    }

    /// `thinfs pool status` of this store's pool, as the pool is now (a daemon's view, with
    /// what it found since its last commit).
    public func poolStatusReport(human: Bool) throws -> PoolStatusReport {
        try locked { try PoolStatusReport.of(pool, human: human) }
    }

    /// `thinfs info`: the devicemapper section of `docker info`, with the same field names.
    public func info() throws -> String {
        "Storage Driver: thinfs\n" + (try statusFields()).map { " \($0.0): \($0.1)\n" }.joined()
    }

    /// The pairs of `thinfs info`, in order: what the Docker plugin's `GraphDriver.Status`
    /// answers, so `docker info` prints them under the driver's name as it did devicemapper's.
    public func statusFields() throws -> [(String, String)] {
        try locked {
            let s = try pool.status()
            let kernel = pool as? KernelThinPool
            var files: [(String, String)] = []
            if let kernel {
                let table = try kernel.poolTable()
                files = [("Data device", table.dataDevice), ("Metadata device", table.metadataDevice)]
            }
            if let rbd = pool as? RBDPool {
                files = [("RBD Pool", rbd.configuration.pool), ("RBD Image Prefix", rbd.configuration.prefix),
                         ("RBD Config", rbd.configuration.conf ?? "(librados default)")]
            } else if options.poolBackend != .kernel {
                let config = try poolRoot.config()
                files = [("Data file", config.data), ("Metadata file", config.metadata)] + files
            }
            let engine = switch options.poolBackend {
            case .userspace: "userspace dm-thin (no libdevmapper)"
            case .loop: "kernel dm-thin on loop devices, libdevmapper \(LibDeviceMapper.libraryVersion)"
            case .kernel: "kernel dm-thin, libdevmapper \(LibDeviceMapper.libraryVersion)"
            case .rbd: "Ceph RBD, librbd \(RBDPool.libraryVersion)"
            }
            let dataTotal = s.totalDataBlocks * s.dataBlockSize, dataUsed = s.usedDataBlocks * s.dataBlockSize
            let metaTotal = s.totalMetadataBlocks * 4096, metaUsed = s.usedMetadataBlocks * 4096
            let minFree = dataTotal * options.minFreeSpacePercent / 100
            let fields: [(String, String)] = [
                ("Pool Name", poolName),
                ("Pool Blocksize", ByteSize.human(s.dataBlockSize)),
                ("Base Device Size", ByteSize.human(base.size)),
                ("Backing Filesystem", base.filesystem == "ext4" ? "extfs" : base.filesystem),
                ("Udev Sync Supported", kernel != nil ? String(LibDeviceMapper.shared.udev == .sync) : "false (userspace pool)"),
            ] + files + [
                ("Data Space Used", ByteSize.human(dataUsed)),
                ("Data Space Total", ByteSize.human(dataTotal)),
                ("Data Space Available", ByteSize.human(dataTotal - dataUsed)),
                ("Metadata Space Used", ByteSize.human(metaUsed)),
                ("Metadata Space Total", ByteSize.human(metaTotal)),
                ("Metadata Space Available", ByteSize.human(metaTotal - metaUsed)),
                ("Thin Pool Minimum Free Space", ByteSize.human(minFree)),
                ("Deferred Removal Enabled", String(options.deferredRemoval)),
                ("Deferred Deletion Enabled", String(options.deferredDeletion)),
                ("Deferred Deleted Device Count", String(try deferredDeletedCount())),
                ("Layers", String(try allLayers().count)),
                ("Pool Transaction Id", String(s.transactionID)),
                ("Pool Mode", s.mode.rawValue + (s.needsCheck ? ", needs_check" : "")),
                ("Backend", options.poolBackend.rawValue + (readOnly ? " (read-only)" : "")),
                ("Library Version", "\(engine); libext2fs \(Volume.libraryVersion), libfuse \(FUSEServer.libraryVersion), SQLite \(LayerDatabase.libraryVersion)"),
            ]
            return fields
        }
    }
}
