import Foundation

/// What `thinfs pool status` prints: the kernel's status line (or, `human`, the way `docker
/// info` prints devicemapper's storage section) on standard output, and beside it on standard
/// error why the pool is read-only, when it is.
///
/// The status is the pool's *live* state, as `dmsetup status` reports the kernel pool's: when a
/// daemon (`thinfs serve`, or the on-demand mount daemon) holds the store, the CLI asks it over
/// the control socket (`LayerRequest.Operation.poolStatus`), since only the daemon knows what it
/// found since the last commit: metadata damage met by a read makes its pool read-only with
/// `needs_check` in memory alone (README, "Accepted differences from kernel ext4 and
/// overlayfs"). With no daemon, the CLI opens the pool read-only and reports what is on disk.
public struct PoolStatusReport: Codable, Equatable, Sendable {
    public var output: String
    public var warning: String?

    public init(output: String, warning: String?) {
        self.output = output
        self.warning = warning
    }

    /// The report of `pool`. The caller serialises it with the pool's other users (the store's
    /// lock in a daemon).
    public static func of(_ pool: any ThinPoolBackend, human: Bool) throws -> PoolStatusReport {
        let s = try pool.status()
        guard human else {
            // The line has room only for the flag; say why (and what to do) beside it.
            let warning = (s.needsCheck || s.mode == .ro) ? s.readOnlyReason.map { "the pool is read-only: \($0)" } : nil
            return PoolStatusReport(output: s.line + "\n", warning: warning)
        }
        let bs = s.dataBlockSize
        let ms = UInt64(4096)
        let userspace = pool as? UserspaceThinPool
        var lines = [
            "Storage Driver: thinfs (\(userspace != nil ? "userspace dm-thin pool" : String(describing: type(of: pool))))",
            " Pool Blocksize: \(ByteSize.human(bs))",
        ]
        if let userspace {
            lines += [" Data file: \(userspace.dataPath)", " Metadata file: \(userspace.metadataPath)"]
        }
        lines += [
            " Data Space Used: \(ByteSize.human(s.usedDataBlocks * bs))",
            " Data Space Total: \(ByteSize.human(s.totalDataBlocks * bs))",
            " Data Space Available: \(ByteSize.human((s.totalDataBlocks - s.usedDataBlocks) * bs))",
            " Metadata Space Used: \(ByteSize.human(s.usedMetadataBlocks * ms))",
            " Metadata Space Total: \(ByteSize.human(s.totalMetadataBlocks * ms))",
            " Metadata Space Available: \(ByteSize.human((s.totalMetadataBlocks - s.usedMetadataBlocks) * ms))",
            " Thin Devices: \(try pool.deviceIDs().count)",
            " Transaction Id: \(s.transactionID)",
            " Mode: \(s.mode.rawValue)\(s.needsCheck ? " (needs_check)" : "")\(s.readOnlyReason.map { "\n Read-only Reason: \($0)" } ?? "")",
            " Held Metadata Snapshot: \(s.heldMetadataRoot.map(String.init) ?? "none")",
        ]
        if let userspace {
            lines += [" Atomic Commit: \(userspace.options.atomicCommit)", " Block Zeroing: \(userspace.options.blockZeroing)"]
        }
        return PoolStatusReport(output: lines.joined(separator: "\n") + "\n", warning: nil)
    }
}
