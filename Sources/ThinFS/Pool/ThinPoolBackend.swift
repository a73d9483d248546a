import PersistentData
import SystemPackage

/// What the layer store needs from a thin pool. Two implementations:
/// `UserspaceThinPool` (sparse files, this process) and `KernelThinPool` (the kernel's dm-thin,
/// driven through libdevmapper).
public protocol ThinPoolBackend: AnyObject, Sendable {
    /// Sends a dm-thin pool message (`create_thin 1`, `create_snap 2 1`, ...).
    func message(_ message: PoolMessage) throws
    func status() throws -> PoolStatus
    func deviceStatus(_ id: ThinDeviceID) throws -> ThinDeviceStatus
    /// Opens a thin device; `size` is its virtual size in bytes (dm keeps it in the table, not in metadata).
    /// Close the device when done: the kernel pool deactivates a device its last opener closed.
    func openDevice(_ id: ThinDeviceID, size: UInt64) throws -> BlockDevice
    func deviceExists(_ id: ThinDeviceID) throws -> Bool
    func deviceIDs() throws -> [ThinDeviceID]
    /// Every thin device's details (mapped blocks, transaction id, times), as thin_ls reads them.
    func deviceDetails() throws -> [ThinDeviceID: DeviceDetails]
    /// Every thin device's mapped data blocks, for thin_ls's EXCLUSIVE and SHARED accounting.
    func mappedDataBlocks() throws -> [ThinDeviceID: [UInt64]]
    /// Who uses thin device `id` other than this process's open devices (a kernel mount, a
    /// process holding its /dev/mapper node), or nil if nobody; always nil in userspace, where
    /// only this process can reach a device.
    func externalUse(_ id: ThinDeviceID) throws -> String?
    /// Makes everything written so far durable (a dm-thin commit).
    func commit() throws
    /// Grows the data device.
    func resize(dataBytes: UInt64) throws
    /// Commits and lets the pool go (the userspace pool's writer lock; an idle loop pool's devices).
    func close() throws
}

/// A pool message in the kernel's grammar (Documentation/admin-guide/device-mapper/thin-provisioning.rst,
/// "Pool messages"): a keyword and decimal arguments separated by spaces.
public enum PoolMessage: Equatable, Sendable, CustomStringConvertible {
    case createThin(ThinDeviceID)
    case createSnap(ThinDeviceID, origin: ThinDeviceID)
    case delete(ThinDeviceID)
    case setTransactionID(current: UInt64, new: UInt64)
    case reserveMetadataSnap
    case releaseMetadataSnap

    public init(parsing text: String) throws(ThinPoolError) {
        let words = text.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        guard let keyword = words.first else { throw .malformedMessage(text, "empty message") }
        let args = Array(words.dropFirst())
        func expect(_ n: Int, _ usage: String) throws(ThinPoolError) {
            guard args.count == n else { throw .malformedMessage(text, "usage: \(usage)") }
        }
        func number(_ s: String, _ what: String) throws(ThinPoolError) -> UInt64 {
            guard let v = UInt64(s) else { throw .malformedMessage(text, "\(what) '\(s)' is not a decimal number") }
            return v
        }
        func deviceID(_ s: String, _ what: String) throws(ThinPoolError) -> ThinDeviceID {
            let v = try number(s, what)
            guard v <= UInt64(ThinMetadata.maxDeviceID) else {
                throw .message(.deviceIDTooLarge(v))
            }
            return ThinDeviceID(v)
        }
        switch keyword {
        case "create_thin":
            try expect(1, "create_thin <dev id>")
            self = .createThin(try deviceID(args[0], "device id"))
        case "create_snap":
            try expect(2, "create_snap <dev id> <origin id>")
            self = .createSnap(try deviceID(args[0], "device id"), origin: try deviceID(args[1], "origin id"))
        case "delete":
            try expect(1, "delete <dev id>")
            self = .delete(try deviceID(args[0], "device id"))
        case "set_transaction_id":
            try expect(2, "set_transaction_id <current id> <new id>")
            self = .setTransactionID(current: try number(args[0], "current id"), new: try number(args[1], "new id"))
        case "reserve_metadata_snap":
            try expect(0, "reserve_metadata_snap")
            self = .reserveMetadataSnap
        case "release_metadata_snap":
            try expect(0, "release_metadata_snap")
            self = .releaseMetadataSnap
        default:
            throw .malformedMessage(text, "unknown message '\(keyword)' (expected create_thin, create_snap, delete, set_transaction_id, reserve_metadata_snap or release_metadata_snap)")
        }
    }

    public var description: String {
        switch self {
        case .createThin(let id): "create_thin \(id)"
        case .createSnap(let id, let origin): "create_snap \(id) \(origin)"
        case .delete(let id): "delete \(id)"
        case .setTransactionID(let c, let n): "set_transaction_id \(c) \(n)"
        case .reserveMetadataSnap: "reserve_metadata_snap"
        case .releaseMetadataSnap: "release_metadata_snap"
        }
    }
}

/// The fields of the kernel's thin-pool status line, in its order (dm-thin.c `pool_status`):
///
///     <transaction id> <used metadata blocks>/<total metadata blocks> <used data blocks>/<total data blocks>
///     <held metadata root|-> rw|ro|out_of_data_space discard_passdown|no_discard_passdown|ignore_discard
///     queue_if_no_space|error_if_no_space needs_check|- <metadata low watermark>
public struct PoolStatus: Equatable, Sendable {
    public enum Mode: String, Sendable { case rw, ro, outOfDataSpace = "out_of_data_space", fail = "Fail" }
    public var transactionID: UInt64
    public var usedMetadataBlocks: UInt64
    public var totalMetadataBlocks: UInt64
    public var usedDataBlocks: UInt64
    public var totalDataBlocks: UInt64
    public var heldMetadataRoot: UInt64?
    public var mode: Mode
    public var discard: String
    public var errorIfNoSpace: Bool
    public var needsCheck: Bool
    public var metadataLowWatermark: UInt64
    /// Data block size in bytes (not in the line; the table carries it).
    public var dataBlockSize: UInt64
    /// Why the pool is read-only, when it knows (not in the kernel's line, which
    /// only says needs_check; the kernel logs the reason instead).
    public var readOnlyReason: String? = nil

    public var line: String {
        if mode == .fail { return "Fail" }
        return "\(transactionID) \(usedMetadataBlocks)/\(totalMetadataBlocks) \(usedDataBlocks)/\(totalDataBlocks) "
            + "\(heldMetadataRoot.map(String.init) ?? "-") \(mode.rawValue) \(discard) "
            + "\(errorIfNoSpace ? "error_if_no_space" : "queue_if_no_space") \(needsCheck ? "needs_check" : "-") \(metadataLowWatermark)"
    }

    /// "Used metadata blocks" as the kernel reports them: it keeps a reserve of min(4096, total/10)
    /// blocks out of the free count, so that a pool short of metadata can still commit
    /// (dm-thin-metadata.c `__set_metadata_reserve`, `dm_pool_get_free_metadata_block_count`).
    /// The space map itself (and thin_check) count only the blocks allocated.
    public static func reportedUsedMetadataBlocks(allocated: UInt64, total: UInt64) -> UInt64 {
        let reserve = min(4096, total / 10)
        let free = total - min(allocated, total)
        return total - (free < reserve ? 0 : free - reserve)
    }

    /// Data space that writes to unprovisioned blocks can still get, in bytes: free data blocks
    /// times the block size (0 for a failed pool, whose status has no counts). Not less
    /// `dm.min_free_space`: that reserve only refuses new thin devices (Docker's
    /// `checkThinPool`), while a device that exists may write into all of it.
    public var freeDataBytes: UInt64 {
        (totalDataBlocks - min(usedDataBlocks, totalDataBlocks)) * dataBlockSize
    }

    /// The kernel's `calc_metadata_threshold`: 4 MiB of metadata, or a quarter of the device if smaller.
    public static func metadataLowWatermark(totalMetadataBlocks: UInt64) -> UInt64 {
        min(1024, totalMetadataBlocks / 4)
    }
}

/// The thin target's status line: `<nr mapped sectors> <highest mapped sector>` (dm-thin.c `thin_status`).
public struct ThinDeviceStatus: Equatable, Sendable {
    public var mappedSectors: UInt64
    /// The last sector of the highest mapped block, or nil when nothing is mapped.
    public var highestMappedSector: UInt64?

    public var line: String { "\(mappedSectors) \(highestMappedSector.map(String.init) ?? "-")" }
}
