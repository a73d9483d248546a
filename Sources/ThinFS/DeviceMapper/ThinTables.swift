import PersistentData
// Tables and status lines of the kernel's thin targets, as text.
// Source: Documentation/admin-guide/device-mapper/thin-provisioning.rst and
// drivers/md/dm-thin.c (pool_ctr, thin_ctr, pool_status, thin_status).

/// The `thin-pool` target's table:
///
///     0 <data sectors> thin-pool <metadata dev> <data dev> <data block size (sectors)> <low water mark (blocks)>
///       [<#feature args> [skip_block_zeroing] [ignore_discard] [no_discard_passdown] [read_only] [error_if_no_space]]
public struct ThinPoolTable: Equatable, Sendable {
    public var metadataDevice: String
    public var dataDevice: String
    public var dataSectors: UInt64
    /// In 512-byte sectors: 128 (64 KiB) to 2097152 (1 GiB), a multiple of 128.
    public var blockSectors: UInt64
    /// Free data blocks below which the kernel raises a dm event (dmeventd's cue to extend).
    public var lowWaterMark: UInt64
    public var features: [String]

    public init(metadataDevice: String, dataDevice: String, dataSectors: UInt64, blockSectors: UInt64 = 128,
                lowWaterMark: UInt64 = 0, features: [String] = []) {
        self.metadataDevice = metadataDevice
        self.dataDevice = dataDevice
        self.dataSectors = dataSectors
        self.blockSectors = blockSectors
        self.lowWaterMark = lowWaterMark
        self.features = features
    }

    public var target: DeviceMapperTarget {
        var params = "\(metadataDevice) \(dataDevice) \(blockSectors) \(lowWaterMark)"
        if !features.isEmpty { params += " \(features.count) " + features.joined(separator: " ") }
        return DeviceMapperTarget(length: dataSectors, type: "thin-pool", params: params)
    }

    public var line: String { target.description }

    /// Reads a live `thin-pool` table line (as `table()` returns it).
    public init(_ target: DeviceMapperTarget) throws(KernelStatusError) {
        guard target.type == "thin-pool" else { throw .wrongTarget(expected: "thin-pool", found: target.type) }
        let w = target.params.split(separator: " ").map(String.init)
        guard w.count >= 4, let block = UInt64(w[2]), let lwm = UInt64(w[3]) else {
            throw .malformed("thin-pool table", target.params)
        }
        var features: [String] = []
        if w.count > 4 {
            guard let n = Int(w[4]), w.count == 5 + n else { throw .malformed("thin-pool table", target.params) }
            features = Array(w[5...])
        }
        self.init(metadataDevice: w[0], dataDevice: w[1], dataSectors: target.length, blockSectors: block,
                  lowWaterMark: lwm, features: features)
    }
}

/// The `thin` target's table: `0 <sectors> thin <pool dev> <dev id> [<external origin dev>]`.
public struct ThinTable: Equatable, Sendable {
    public var poolDevice: String
    public var id: ThinDeviceID
    public var sectors: UInt64
    public var externalOrigin: String?

    public init(poolDevice: String, id: ThinDeviceID, sectors: UInt64, externalOrigin: String? = nil) {
        self.poolDevice = poolDevice
        self.id = id
        self.sectors = sectors
        self.externalOrigin = externalOrigin
    }

    public var target: DeviceMapperTarget {
        DeviceMapperTarget(length: sectors, type: "thin", params: "\(poolDevice) \(id)" + (externalOrigin.map { " \($0)" } ?? ""))
    }

    public var line: String { target.description }
}

/// A status line that is not what the kernel prints.
public enum KernelStatusError: Error, Equatable, Sendable, CustomStringConvertible {
    case malformed(String, String)
    case wrongTarget(expected: String, found: String)
    /// The kernel could not read the pool's metadata for the status ("Error").
    case statusError(String)

    public var description: String {
        switch self {
        case .malformed(let what, let line): "malformed \(what): '\(line)'"
        case .wrongTarget(let e, let f): "expected a \(e) target, found \(f)"
        case .statusError(let what): "the kernel reported an error reading the \(what) status (see dmesg)"
        }
    }
}

extension PoolStatus {
    /// Parses the `thin-pool` status params (dm-thin.c `pool_status`, STATUSTYPE_INFO):
    ///
    ///     <transaction id> <used meta>/<total meta> <used data>/<total data> <held root|->
    ///     rw|ro|out_of_data_space  ignore_discard|discard_passdown|no_discard_passdown
    ///     error_if_no_space|queue_if_no_space  needs_check|-  <metadata low watermark>
    ///
    /// or `Fail` when the pool has failed. The watermark appeared in kernel 4.19;
    /// older lines end after needs_check and parse with a watermark of 0.
    /// `dataBlockSize` comes from the table (the status line lacks it).
    public init(kernelLine line: String, dataBlockSize: UInt64) throws(KernelStatusError) {
        let w = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        if w == ["Fail"] {
            self.init(transactionID: 0, usedMetadataBlocks: 0, totalMetadataBlocks: 0, usedDataBlocks: 0, totalDataBlocks: 0,
                      heldMetadataRoot: nil, mode: .fail, discard: "-", errorIfNoSpace: false, needsCheck: false,
                      metadataLowWatermark: 0, dataBlockSize: dataBlockSize)
            return
        }
        if w == ["Error"] { throw .statusError("thin-pool") }
        func bad() -> KernelStatusError { .malformed("thin-pool status", line) }
        guard w.count == 8 || w.count == 9 else { throw bad() }
        func fraction(_ s: String) throws(KernelStatusError) -> (UInt64, UInt64) {
            let p = s.split(separator: "/")
            guard p.count == 2, let a = UInt64(p[0]), let b = UInt64(p[1]) else { throw bad() }
            return (a, b)
        }
        guard let txn = UInt64(w[0]) else { throw bad() }
        let (usedMeta, totalMeta) = try fraction(w[1])
        let (usedData, totalData) = try fraction(w[2])
        let held: UInt64?
        if w[3] == "-" { held = nil } else if let h = UInt64(w[3]) { held = h } else { throw bad() }
        guard let mode = Mode(rawValue: w[4]), mode != .fail else { throw bad() }
        guard ["ignore_discard", "discard_passdown", "no_discard_passdown"].contains(w[5]) else { throw bad() }
        let errorIfNoSpace: Bool
        switch w[6] {
        case "error_if_no_space": errorIfNoSpace = true
        case "queue_if_no_space": errorIfNoSpace = false
        default: throw bad()
        }
        guard w[7] == "needs_check" || w[7] == "-" else { throw bad() }
        var watermark: UInt64 = 0
        if w.count == 9 {
            guard let v = UInt64(w[8]) else { throw bad() }
            watermark = v
        }
        self.init(transactionID: txn, usedMetadataBlocks: usedMeta, totalMetadataBlocks: totalMeta,
                  usedDataBlocks: usedData, totalDataBlocks: totalData, heldMetadataRoot: held, mode: mode,
                  discard: w[5], errorIfNoSpace: errorIfNoSpace, needsCheck: w[7] == "needs_check",
                  metadataLowWatermark: watermark, dataBlockSize: dataBlockSize)
    }
}

/// What the `thin` target's status says (dm-thin.c `thin_status`).
public enum KernelThinStatus: Equatable, Sendable {
    /// `<nr mapped sectors> <highest mapped sector|->`.
    case ok(ThinDeviceStatus)
    /// `Fail`: the pool has failed.
    case fail
    /// `-`: the thin device is being torn down.
    case unavailable

    public init(kernelLine line: String) throws(KernelStatusError) {
        let w = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        switch w {
        case ["Fail"]: self = .fail
        case ["-"]: self = .unavailable
        case ["Error"]: throw .statusError("thin")
        default:
            guard w.count == 2, let mapped = UInt64(w[0]) else { throw .malformed("thin status", line) }
            let highest: UInt64?
            if w[1] == "-" { highest = nil } else if let h = UInt64(w[1]) { highest = h } else { throw .malformed("thin status", line) }
            self = .ok(ThinDeviceStatus(mappedSectors: mapped, highestMappedSector: highest))
        }
    }
}
