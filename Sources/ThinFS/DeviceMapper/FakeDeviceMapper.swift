import PersistentData
import Synchronization
import SystemPackage

/// An in-memory device-mapper for hosts without one (this machine's kernel has
/// none). It keeps devices with their tables, suspend state, open counts and
/// deferred removes, and understands just enough of dm-thin to act as a pool:
/// thin-pool devices take create_thin / create_snap / delete /
/// set_transaction_id messages, and a thin table for an unknown id fails with
/// ENODATA as thin_ctr does. Every call is recorded in `calls`, and failures
/// can be injected per operation and device.
public final class FakeDeviceMapper: DeviceMapperControl {
    struct Device {
        var table: [DeviceMapperTarget]
        var inactive: [DeviceMapperTarget]?
        var suspended = false
        var openCount: Int32 = 0
        var deferredRemove = false
        var readOnly = false
        var minor: UInt32
        /// For a thin-pool device: its thin ids and transaction id.
        var thinIDs: Set<ThinDeviceID> = []
        var transactionID: UInt64 = 0
        var heldRoot: UInt64?
    }

    struct State {
        var devices: [String: Device] = [:]
        var calls: [String] = []
        /// (operation, device) → errnos to fail with, one per call, in order.
        var faults: [String: [Errno]] = [:]
        var nextMinor: UInt32 = 0
        /// Status line override per device (e.g. "Fail", "... out_of_data_space ...").
        var statusOverride: [String: String] = [:]
    }

    private let state = Mutex(State())

    public init() {}

    /// Every call so far, as `op name [detail]`.
    public var calls: [String] { state.withLock { $0.calls } }
    public func clearCalls() { state.withLock { $0.calls.removeAll() } }

    /// Makes the next `times` calls of `operation` on `device` fail with `errno`.
    public func inject(_ errno: Errno, _ operation: DeviceMapperError.Operation, _ device: String, times: Int = 1) {
        state.withLock { $0.faults["\(operation.rawValue) \(device)", default: []] += Array(repeating: errno, count: times) }
    }

    /// Simulates `count` openers of a device (a mount, a FUSE server).
    public func setOpenCount(_ device: String, _ count: Int32) {
        state.withLock { s in
            s.devices[device]?.openCount = count
            if count == 0, s.devices[device]?.deferredRemove == true { s.devices[device] = nil }
        }
    }

    /// Replaces the status line the device reports.
    public func overrideStatus(_ device: String, _ line: String?) { state.withLock { $0.statusOverride[device] = line } }

    /// Creates a pool device as LVM or `LoopThinPool` would.
    public func addPool(_ name: String, table: ThinPoolTable) {
        state.withLock { s in
            s.nextMinor += 1
            s.devices[name] = Device(table: [table.target], minor: s.nextMinor)
        }
    }

    /// The thin ids a fake pool holds.
    public func thinIDs(pool: String) -> Set<ThinDeviceID> { state.withLock { $0.devices[pool]?.thinIDs ?? [] } }

    // MARK: - DeviceMapperControl

    private func call<T>(_ op: DeviceMapperError.Operation, _ name: String, _ detail: String? = nil,
                         _ body: (inout State) throws(DeviceMapperError) -> T) throws(DeviceMapperError) -> T {
        try state.withLock { (s: inout State) throws(DeviceMapperError) -> T in
            s.calls.append("\(op.rawValue) \(name)" + (detail.map { " \($0)" } ?? ""))
            let key = "\(op.rawValue) \(name)"
            if var queue = s.faults[key], !queue.isEmpty {
                let e = queue.removeFirst()
                s.faults[key] = queue
                throw DeviceMapperError(op, device: name, errno: e, detail: detail)
            }
            return try body(&s)
        }
    }

    private static func missing(_ op: DeviceMapperError.Operation, _ name: String) -> DeviceMapperError {
        DeviceMapperError(op, device: name, errno: .noSuchAddressOrDevice)
    }

    public func create(_ name: String, table: [DeviceMapperTarget], readOnly: Bool) throws(DeviceMapperError) {
        try call(.create, name, table.map(\.description).joined(separator: "; ")) { s throws(DeviceMapperError) in
            guard s.devices[name] == nil else { throw DeviceMapperError(.create, device: name, errno: .resourceBusy) }
            try Self.validate(table, in: s, op: .create, name)
            s.nextMinor += 1
            s.devices[name] = Device(table: table, readOnly: readOnly, minor: s.nextMinor)
        }
    }

    /// thin_ctr's check: the pool exists and has the id.
    private static func validate(_ table: [DeviceMapperTarget], in s: State, op: DeviceMapperError.Operation, _ name: String) throws(DeviceMapperError) {
        for t in table where t.type == "thin" {
            let w = t.params.split(separator: " ").map(String.init)
            let pool = w.first.map { $0.hasPrefix("/dev/mapper/") ? String($0.dropFirst(12)) : $0 } ?? ""
            guard w.count >= 2, let id = ThinDeviceID(w[1]), let p = s.devices[pool], p.table.first?.type == "thin-pool" else {
                throw DeviceMapperError(op, device: name, errno: .invalidArgument, detail: t.description)
            }
            guard p.thinIDs.contains(id) else { throw DeviceMapperError(op, device: name, errno: .noData, detail: t.description) }
        }
    }

    public func load(_ name: String, table: [DeviceMapperTarget]) throws(DeviceMapperError) {
        try call(.load, name, table.map(\.description).joined(separator: "; ")) { s throws(DeviceMapperError) in
            guard s.devices[name] != nil else { throw Self.missing(.load, name) }
            try Self.validate(table, in: s, op: .load, name)
            s.devices[name]!.inactive = table
        }
    }

    public func suspend(_ name: String, noFlush: Bool) throws(DeviceMapperError) {
        try call(.suspend, name) { s throws(DeviceMapperError) in
            guard s.devices[name] != nil else { throw Self.missing(.suspend, name) }
            s.devices[name]!.suspended = true
        }
    }

    public func resume(_ name: String) throws(DeviceMapperError) {
        try call(.resume, name) { s throws(DeviceMapperError) in
            guard var d = s.devices[name] else { throw Self.missing(.resume, name) }
            if let t = d.inactive { d.table = t; d.inactive = nil }
            d.suspended = false
            s.devices[name] = d
        }
    }

    public func remove(_ name: String, deferred: Bool) throws(DeviceMapperError) {
        let op: DeviceMapperError.Operation = deferred ? .deferredRemove : .remove
        try call(op, name) { s throws(DeviceMapperError) in
            guard let d = s.devices[name] else { throw Self.missing(op, name) }
            if d.openCount > 0 {
                guard deferred else { throw DeviceMapperError(op, device: name, errno: .resourceBusy) }
                s.devices[name]!.deferredRemove = true
                return
            }
            s.devices[name] = nil
        }
    }

    @discardableResult
    public func message(_ name: String, sector: UInt64, _ text: String) throws(DeviceMapperError) -> String? {
        try call(.message, name, text) { s throws(DeviceMapperError) -> String? in
            guard var d = s.devices[name] else { throw Self.missing(.message, name) }
            func fail(_ e: Errno) -> DeviceMapperError { DeviceMapperError(.message, device: name, errno: e, detail: text) }
            if text == "@cancel_deferred_remove" {
                guard d.deferredRemove else { throw fail(.noSuchAddressOrDevice) }
                d.deferredRemove = false
                s.devices[name] = d
                return nil
            }
            guard d.table.first?.type == "thin-pool" else { throw fail(.invalidArgument) }
            guard let parsed = try? PoolMessage(parsing: text) else { throw fail(.invalidArgument) }
            switch parsed {
            case .createThin(let id):
                guard d.thinIDs.insert(id).inserted else { throw fail(.fileExists) }
            case .createSnap(let id, let origin):
                guard d.thinIDs.contains(origin) else { throw fail(.noData) }
                guard d.thinIDs.insert(id).inserted else { throw fail(.fileExists) }
            case .delete(let id):
                guard d.thinIDs.contains(id) else { throw fail(.noData) }
                let active = s.devices.values.contains { $0.table.contains { t in t.type == "thin" && t.params.hasSuffix(" \(id)") } }
                if active { throw fail(.resourceBusy) }
                d.thinIDs.remove(id)
            case .setTransactionID(let current, let new):
                guard current == d.transactionID else { throw fail(.invalidArgument) }
                d.transactionID = new
            case .reserveMetadataSnap:
                guard d.heldRoot == nil else { throw fail(.resourceBusy) }
                d.heldRoot = 42
            case .releaseMetadataSnap:
                guard d.heldRoot != nil else { throw fail(.invalidArgument) }
                d.heldRoot = nil
            }
            s.devices[name] = d
            return nil
        }
    }

    public func status(_ name: String) throws(DeviceMapperError) -> [DeviceMapperTarget] {
        try call(.status, name) { s throws(DeviceMapperError) in
            guard let d = s.devices[name] else { throw Self.missing(.status, name) }
            return d.table.map { t in
                let line: String
                if let o = s.statusOverride[name] {
                    line = o
                } else if t.type == "thin-pool" {
                    line = "\(d.transactionID) 10/1024 \(d.thinIDs.count)/16384 \(d.heldRoot.map(String.init) ?? "-") rw discard_passdown queue_if_no_space - 256"
                } else if t.type == "thin" {
                    line = "0 -"
                } else {
                    line = ""
                }
                return DeviceMapperTarget(start: t.start, length: t.length, type: t.type, params: line)
            }
        }
    }

    public func table(_ name: String) throws(DeviceMapperError) -> [DeviceMapperTarget] {
        try call(.table, name) { s throws(DeviceMapperError) in
            guard let d = s.devices[name] else { throw Self.missing(.table, name) }
            return d.table
        }
    }

    public func info(_ name: String) throws(DeviceMapperError) -> DeviceMapperInfo? {
        try call(.info, name) { s throws(DeviceMapperError) in
            guard let d = s.devices[name] else { return nil }
            return DeviceMapperInfo(suspended: d.suspended, liveTable: true, inactiveTable: d.inactive != nil, openCount: d.openCount,
                                    minor: d.minor, readOnly: d.readOnly, targetCount: Int32(d.table.count), deferredRemove: d.deferredRemove)
        }
    }

    public func list() throws(DeviceMapperError) -> [DeviceMapperDevice] {
        try call(.list, "") { s throws(DeviceMapperError) in
            s.devices.map { DeviceMapperDevice(name: $0.key, major: 253, minor: $0.value.minor) }.sorted { $0.name < $1.name }
        }
    }
}
