import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The device-mapper operations ThinFS needs, one per ioctl that libdevmapper
/// wraps. Two implementations: `LibDeviceMapper` (the kernel, through
/// libdevmapper; the only `import CDevMapper`) and `FakeDeviceMapper` (in
/// memory, for host tests, which have no device-mapper).
///
/// Names are dm device names (`docker-thinpool`, `thinfs-7`); the node is
/// `/dev/mapper/<name>`. Every error is a `DeviceMapperError` naming the
/// operation and the device.
public protocol DeviceMapperControl: AnyObject, Sendable {
    /// Creates a device. With a table, libdevmapper loads it and resumes the
    /// device, so it is active on return; without one, the device is empty.
    func create(_ name: String, table: [DeviceMapperTarget], readOnly: Bool) throws(DeviceMapperError)
    /// Loads `table` into the inactive slot; the next resume swaps it in.
    func load(_ name: String, table: [DeviceMapperTarget]) throws(DeviceMapperError)
    /// Suspends I/O (flushing first unless `noFlush`).
    func suspend(_ name: String, noFlush: Bool) throws(DeviceMapperError)
    func resume(_ name: String) throws(DeviceMapperError)
    /// Removes a device now (EBUSY while it is open), or with `deferred`, marks
    /// it to go when its last opener closes (removed at once if nobody has it open).
    func remove(_ name: String, deferred: Bool) throws(DeviceMapperError)
    /// Sends a target message (`create_thin 1`, `@cancel_deferred_remove`); returns the reply, if any.
    @discardableResult
    func message(_ name: String, sector: UInt64, _ text: String) throws(DeviceMapperError) -> String?
    /// The status lines of the live table, one per target.
    func status(_ name: String) throws(DeviceMapperError) -> [DeviceMapperTarget]
    /// The live table.
    func table(_ name: String) throws(DeviceMapperError) -> [DeviceMapperTarget]
    /// The device's state, or nil if there is no such device.
    func info(_ name: String) throws(DeviceMapperError) -> DeviceMapperInfo?
    /// Every dm device on the system.
    func list() throws(DeviceMapperError) -> [DeviceMapperDevice]
}

extension DeviceMapperControl {
    /// The node path for a device name.
    public static func nodePath(_ name: String) -> String { "/dev/mapper/\(name)" }

    /// Replaces the live table: load, suspend, resume (how a pool or thin device is grown).
    public func reload(_ name: String, table: [DeviceMapperTarget]) throws(DeviceMapperError) {
        try load(name, table: table)
        try suspend(name, noFlush: false)
        try resume(name)
    }

    /// Cancels a pending deferred remove: a message to the dm core itself, not to the target.
    public func cancelDeferredRemove(_ name: String) throws(DeviceMapperError) {
        try message(name, sector: 0, "@cancel_deferred_remove")
    }

    /// `remove`, retried while the kernel answers EBUSY.
    ///
    /// Why retry: right after a device is closed or activated, udev's
    /// blkid probe (and the page-cache flush of the last closer) can hold it
    /// open for a moment, so the kernel refuses with EBUSY although nobody
    /// really uses it. Docker's devmapper driver hit this and retried removal
    /// (200 × 100 ms) and cancelling a deferred remove (100 × 100 ms); we do the
    /// same with a growing delay. A device that stays busy still fails, with
    /// the last EBUSY. Never call it holding a lock another thread needs to
    /// close the device.
    public func removeRetryingBusy(_ name: String, deferred: Bool = false, retry: BusyRetry = .removal) throws(DeviceMapperError) {
        try retry.run { () throws(DeviceMapperError) in try remove(name, deferred: deferred) }
    }

    /// `cancelDeferredRemove`, retried on EBUSY for the same reason as removal:
    /// the kernel answers EBUSY while the deferred remove is already running.
    public func cancelDeferredRemoveRetryingBusy(_ name: String, retry: BusyRetry = .cancelDeferredRemove) throws(DeviceMapperError) {
        try retry.run { () throws(DeviceMapperError) in try cancelDeferredRemove(name) }
    }
}

/// How often, and how patiently, an EBUSY answer is retried.
public struct BusyRetry: Sendable {
    public var attempts: Int
    /// The first delay; each later one doubles, up to `maximumDelay`.
    public var initialDelay: Duration
    public var maximumDelay: Duration

    public init(attempts: Int, initialDelay: Duration, maximumDelay: Duration) {
        self.attempts = max(1, attempts)
        self.initialDelay = initialDelay
        self.maximumDelay = maximumDelay
    }

    /// Docker waited up to 20 s for a removal (200 × 100 ms); this waits about as long.
    public static let removal = BusyRetry(attempts: 40, initialDelay: .milliseconds(10), maximumDelay: .milliseconds(500))
    /// Docker waited up to 10 s to cancel a deferred removal (100 × 100 ms).
    public static let cancelDeferredRemove = BusyRetry(attempts: 25, initialDelay: .milliseconds(10), maximumDelay: .milliseconds(500))
    /// One try, for tests and callers that handle EBUSY themselves.
    public static let never = BusyRetry(attempts: 1, initialDelay: .zero, maximumDelay: .zero)

    func run(_ body: () throws(DeviceMapperError) -> Void) throws(DeviceMapperError) {
        var delay = initialDelay
        for attempt in 1...attempts {
            do {
                return try body()
            } catch where error.errno == .resourceBusy && attempt < attempts {
                let ns = delay.components.seconds * 1_000_000_000 + delay.components.attoseconds / 1_000_000_000
                var ts = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
                var rest = timespec()
                while nanosleep(&ts, &rest) != 0 && errno == EINTR { ts = rest }
                delay = min(delay * 2, maximumDelay)
            }
        }
    }
}

/// One line of a table or status: `<start> <length> <target type> <params>` (sectors of 512 bytes).
public struct DeviceMapperTarget: Equatable, Sendable, CustomStringConvertible {
    public var start: UInt64
    public var length: UInt64
    public var type: String
    public var params: String

    public init(start: UInt64 = 0, length: UInt64, type: String, params: String) {
        self.start = start
        self.length = length
        self.type = type
        self.params = params
    }

    /// As `dmsetup table` prints it.
    public var description: String { "\(start) \(length) \(type) \(params)" }
}

/// What DM_DEVICE_INFO reports.
public struct DeviceMapperInfo: Equatable, Sendable {
    public var suspended: Bool
    public var liveTable: Bool
    public var inactiveTable: Bool
    public var openCount: Int32
    public var eventNumber: UInt32
    public var major: UInt32
    public var minor: UInt32
    public var readOnly: Bool
    public var targetCount: Int32
    /// A deferred remove is pending: the device goes when its last opener closes.
    public var deferredRemove: Bool

    public init(suspended: Bool = false, liveTable: Bool = true, inactiveTable: Bool = false, openCount: Int32 = 0,
                eventNumber: UInt32 = 0, major: UInt32 = 253, minor: UInt32 = 0, readOnly: Bool = false,
                targetCount: Int32 = 1, deferredRemove: Bool = false) {
        self.suspended = suspended
        self.liveTable = liveTable
        self.inactiveTable = inactiveTable
        self.openCount = openCount
        self.eventNumber = eventNumber
        self.major = major
        self.minor = minor
        self.readOnly = readOnly
        self.targetCount = targetCount
        self.deferredRemove = deferredRemove
    }
}

/// One entry of DM_DEVICE_LIST.
public struct DeviceMapperDevice: Equatable, Sendable {
    public var name: String
    public var major: UInt32
    public var minor: UInt32
}

/// A failed device-mapper operation: which one, on which device, and the
/// kernel's errno (from `dm_task_get_errno`, never from log text).
public struct DeviceMapperError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Operation: String, Sendable {
        case create, load, suspend, resume, remove, deferredRemove = "deferred remove", message, status, table, info, list
        case mknodes, version, setup
    }
    public var operation: Operation
    public var device: String
    /// The kernel's errno, when the ioctl got that far.
    public var errno: Errno?
    /// What the caller was doing (the message text, the table), for the error line.
    public var detail: String?

    public init(_ operation: Operation, device: String, errno: Errno?, detail: String? = nil) {
        self.operation = operation
        self.device = device
        self.errno = errno
        self.detail = detail
    }

    public var description: String {
        var s = "device-mapper \(operation.rawValue) \(device.isEmpty ? "" : "'\(device)' ")failed"
        if let detail { s += " (\(detail))" }
        if let errno { s += ": \(errno)" }
        switch (operation, errno) {
        case (.remove, .resourceBusy?), (.deferredRemove, .resourceBusy?):
            s += "; the device is still open: unmount it or close its users, or remove it deferred"
        case (_, .noSuchFileOrDirectory?), (_, .noSuchAddressOrDevice?):
            s += "; no such device (see 'dmsetup ls')"
        case (_, .permissionDenied?), (_, .notPermitted?):
            s += "; device-mapper needs root (CAP_SYS_ADMIN)"
        default:
            break
        }
        return s
    }
}
