import CDevMapper
import CThinFSShims
import Logging
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

// The only Swift file that imports CDevMapper. Everything that talks to the
// kernel's device-mapper goes through `LibDeviceMapper`, which owns every
// dm_task, checks every libdevmapper return code in one place, and runs one
// call at a time.

/// The kernel's device-mapper, through libdevmapper.
///
/// ## One owner
/// libdevmapper keeps process-wide state (the udev cookie semaphores, the
/// node-operation queue, the suspended-device counter, the log hook) and is
/// not thread-safe, so every call runs under `lock`, one at a time. Nothing
/// else in ThinFS calls it. Lock order: a caller's own locks (the pool's) come
/// first, then this one; this lock is never held while calling out.
///
/// ## udev
/// With udev running (`/run/udev/control` exists and `DM_DISABLE_UDEV` is not
/// set), operations that make or remove nodes carry a udev cookie and wait on
/// it (`dm_task_set_cookie` / `dm_udev_wait`), so the node exists (or is gone)
/// when the call returns. Without udev (a container, the test guest) it goes
/// the DM_DISABLE_UDEV route: `dm_udev_set_sync_support(0)`, and libdevmapper
/// creates and removes the /dev/mapper nodes itself.
public final class LibDeviceMapper: DeviceMapperControl {
    public enum UdevMode: Sendable, Equatable {
        /// Cookies and `dm_udev_wait`: udev makes the nodes.
        case sync
        /// No udev: libdevmapper makes the nodes.
        case disabled

        /// What this machine supports.
        public static var detected: UdevMode {
            if let v = getenv("DM_DISABLE_UDEV"), v.pointee != 0 { return .disabled }
            return access("/run/udev/control", F_OK) == 0 ? .sync : .disabled
        }
    }

    /// The process's one instance (libdevmapper's state is per process).
    public static let shared = LibDeviceMapper()

    public let udev: UdevMode
    private let lock = Mutex(())

    /// libdevmapper's version (`dm_get_library_version`), as `dmsetup version` prints it.
    public static var libraryVersion: String {
        var buf = [CChar](repeating: 0, count: 64)
        guard dm_get_library_version(&buf, buf.count) != 0 else { return "unknown" }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private init() {
        DeviceMapperLog.install()
        var mode = UdevMode.detected
        if mode == .sync && dm_cookie_supported() == 0 { mode = .disabled }
        udev = mode
        dm_udev_set_sync_support(mode == .sync ? 1 : 0)
        DeviceMapperLog.logger.withLock { $0 }.debug("device-mapper ready", metadata: ["dm.udev": "\(mode)"])
    }

    // MARK: - Operations

    public func create(_ name: String, table: [DeviceMapperTarget], readOnly: Bool) throws(DeviceMapperError) {
        try run(.create, name, type: DM_DEVICE_CREATE, nodes: true) { t throws(DeviceMapperError) in
            if readOnly { try t.check(dm_task_set_ro(t.raw), .create, name, "read-only flag") }
            try t.add(table, .create, name)
        }
    }

    public func load(_ name: String, table: [DeviceMapperTarget]) throws(DeviceMapperError) {
        try run(.load, name, type: DM_DEVICE_RELOAD) { t throws(DeviceMapperError) in try t.add(table, .load, name) }
    }

    public func suspend(_ name: String, noFlush: Bool) throws(DeviceMapperError) {
        try run(.suspend, name, type: DM_DEVICE_SUSPEND) { t throws(DeviceMapperError) in
            if noFlush { try t.check(dm_task_no_flush(t.raw), .suspend, name, "no-flush flag") }
        }
    }

    public func resume(_ name: String) throws(DeviceMapperError) {
        // A resume can make the node (libdevmapper adds nodes on resume), so it waits for udev.
        try run(.resume, name, type: DM_DEVICE_RESUME, nodes: true) { _ throws(DeviceMapperError) in }
    }

    public func remove(_ name: String, deferred: Bool) throws(DeviceMapperError) {
        let op: DeviceMapperError.Operation = deferred ? .deferredRemove : .remove
        try run(op, name, type: DM_DEVICE_REMOVE, nodes: true,
                // With a cookie, libdevmapper would otherwise remove the node itself even
                // when the kernel only defers the removal (Docker's comment on the same call).
                cookieFlags: deferred ? UInt16(DM_UDEV_DISABLE_LIBRARY_FALLBACK) : 0) { t throws(DeviceMapperError) in
            if deferred { try t.check(dm_task_deferred_remove(t.raw), op, name, "deferred flag") }
        }
    }

    @discardableResult
    public func message(_ name: String, sector: UInt64, _ text: String) throws(DeviceMapperError) -> String? {
        try run(.message, name, type: DM_DEVICE_TARGET_MSG, detail: text) { t throws(DeviceMapperError) in
            try t.check(dm_task_set_sector(t.raw, sector), .message, name, text)
            try t.check(dm_task_set_message(t.raw, text), .message, name, text)
        } result: { t in
            guard let r = dm_task_get_message_response(t.raw), r.pointee != 0 else { return nil }
            return String(cString: r)
        }
    }

    public func status(_ name: String) throws(DeviceMapperError) -> [DeviceMapperTarget] {
        try run(.status, name, type: DM_DEVICE_STATUS) { _ throws(DeviceMapperError) in } result: { $0.targets() }
    }

    public func table(_ name: String) throws(DeviceMapperError) -> [DeviceMapperTarget] {
        try run(.table, name, type: DM_DEVICE_TABLE) { _ throws(DeviceMapperError) in } result: { $0.targets() }
    }

    public func info(_ name: String) throws(DeviceMapperError) -> DeviceMapperInfo? {
        try run(.info, name, type: DM_DEVICE_INFO) { _ throws(DeviceMapperError) in } result: { t throws(DeviceMapperError) in
            var i = dm_info()
            try t.check(dm_task_get_info(t.raw, &i), .info, name, nil)
            guard i.exists != 0 else { return nil }
            return DeviceMapperInfo(suspended: i.suspended != 0, liveTable: i.live_table != 0, inactiveTable: i.inactive_table != 0,
                                    openCount: i.open_count, eventNumber: i.event_nr, major: i.major, minor: i.minor,
                                    readOnly: i.read_only != 0, targetCount: i.target_count, deferredRemove: i.deferred_remove != 0)
        }
    }

    public func list() throws(DeviceMapperError) -> [DeviceMapperDevice] {
        try run(.list, "", type: DM_DEVICE_LIST) { _ throws(DeviceMapperError) in } result: { t in
            guard let first = dm_task_get_names(t.raw), first.pointee.dev != 0 else { return [] }
            var out: [DeviceMapperDevice] = []
            var entry = UnsafeMutableRawPointer(first)
            while true {
                let names = entry.assumingMemoryBound(to: dm_names.self)
                // `char name[]` is a flexible array member Swift does not import; it
                // follows `uint64_t dev` and `uint32_t next` (struct dm_names, 12 bytes in).
                let name = String(cString: (entry + 12).assumingMemoryBound(to: CChar.self))
                let dev = names.pointee.dev
                // The kernel's new_encode_dev: minor in bits 0-7 and 20-31, major in 8-19.
                out.append(DeviceMapperDevice(name: name, major: UInt32((dev & 0xfff00) >> 8),
                                              minor: UInt32((dev & 0xff) | ((dev >> 12) & 0xfff00))))
                guard names.pointee.next != 0 else { break }
                entry += Int(names.pointee.next)
            }
            return out
        }
    }

    /// Makes (or removes) the /dev/mapper node of `name` to match the kernel
    /// (what `dmsetup mknodes` does); needed without udev after a cancelled deferred remove.
    public func makeNodes(_ name: String) throws(DeviceMapperError) {
        try lock.withLock { _ throws(DeviceMapperError) in
            if dm_mknodes(name) == 0 { throw DeviceMapperError(.mknodes, device: name, errno: nil) }
        }
    }

    /// The kernel driver's version (`4.47.0`), or an error when there is no device-mapper.
    public func driverVersion() throws(DeviceMapperError) -> String {
        try run(.version, "", type: DM_DEVICE_VERSION) { _ throws(DeviceMapperError) in } result: { t throws(DeviceMapperError) in
            var buf = [CChar](repeating: 0, count: 64)
            try t.check(dm_task_get_driver_version(t.raw, &buf, buf.count), .version, "", nil)
            return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    // MARK: - The one path every call takes

    /// Creates a task, lets `configure` set it up, runs it (with a udev cookie
    /// when `nodes` and udev is in charge), then reads the result. Every return
    /// code is checked; the task is destroyed whatever happens.
    private func run<T>(_ op: DeviceMapperError.Operation, _ name: String, type: Int, nodes: Bool = false, cookieFlags: UInt16 = 0,
                        detail: String? = nil,
                        _ configure: (DMTask) throws(DeviceMapperError) -> Void,
                        result: (DMTask) throws(DeviceMapperError) -> T) throws(DeviceMapperError) -> T {
        try lock.withLock { _ throws(DeviceMapperError) -> T in
            let task = try DMTask(type: type, op, name)
            if !name.isEmpty { try task.check(dm_task_set_name(task.raw, name), op, name, detail) }
            try configure(task)
            var cookie: UInt32 = 0
            let useCookie = nodes && udev == .sync
            if useCookie { try task.check(dm_task_set_cookie(task.raw, &cookie, cookieFlags), op, name, "udev cookie") }
            let ok = dm_task_run(task.raw)
            // The cookie's semaphore exists once set, whatever the run did; waiting releases it.
            if useCookie { _ = dm_udev_wait(cookie) }
            // Without udev, libdevmapper only queues its node changes (mknod, unlink) and would
            // make them at process exit: make them now, so /dev/mapper/NAME exists (or is gone)
            // when the call returns. dm_udev_wait does the same in the udev case.
            if nodes && udev == .disabled { dm_task_update_nodes() }
            try task.checkRun(ok, op, name, detail)
            return try result(task)
        }
    }

    private func run(_ op: DeviceMapperError.Operation, _ name: String, type: Int, nodes: Bool = false, cookieFlags: UInt16 = 0,
                     detail: String? = nil, _ configure: (DMTask) throws(DeviceMapperError) -> Void) throws(DeviceMapperError) {
        try run(op, name, type: type, nodes: nodes, cookieFlags: cookieFlags, detail: detail, configure) { _ in () }
    }
}

/// Owns one `struct dm_task` and destroys it in deinit. The pointer never
/// leaves `LibDeviceMapper`, which uses it only under its lock.
private final class DMTask {
    let raw: OpaquePointer

    init(type: Int, _ op: DeviceMapperError.Operation, _ name: String) throws(DeviceMapperError) {
        // dm_task_create fails only when it cannot allocate or the driver is missing.
        guard let t = dm_task_create(Int32(type)) else {
            throw DeviceMapperError(op, device: name, errno: Errno(rawValue: errno == 0 ? ENOMEM : errno), detail: "dm_task_create")
        }
        raw = t
    }

    deinit { dm_task_destroy(raw) }

    /// The one checker for libdevmapper's setters: 1 is success, 0 failure.
    func check(_ rc: Int32, _ op: DeviceMapperError.Operation, _ name: String, _ detail: String?) throws(DeviceMapperError) {
        guard rc == 0 else { return }
        throw DeviceMapperError(op, device: name, errno: errnoOrNil, detail: detail)
    }

    /// The checker for dm_task_run: the kernel's errno comes from dm_task_get_errno.
    func checkRun(_ rc: Int32, _ op: DeviceMapperError.Operation, _ name: String, _ detail: String?) throws(DeviceMapperError) {
        guard rc == 0 else { return }
        throw DeviceMapperError(op, device: name, errno: errnoOrNil ?? .ioError, detail: detail)
    }

    private var errnoOrNil: Errno? {
        let e = dm_task_get_errno(raw)
        return e == 0 ? nil : Errno(rawValue: e)
    }

    func add(_ table: [DeviceMapperTarget], _ op: DeviceMapperError.Operation, _ name: String) throws(DeviceMapperError) {
        for target in table {
            try check(dm_task_add_target(raw, target.start, target.length, target.type, target.params), op, name, "\(target)")
        }
    }

    /// The targets a status or table task returned.
    func targets() -> [DeviceMapperTarget] {
        var out: [DeviceMapperTarget] = []
        var next: UnsafeMutableRawPointer? = nil
        repeat {
            var start: UInt64 = 0, length: UInt64 = 0
            var type: UnsafeMutablePointer<CChar>? = nil, params: UnsafeMutablePointer<CChar>? = nil
            next = dm_get_next_target(raw, next, &start, &length, &type, &params)
            if let type {
                out.append(DeviceMapperTarget(start: start, length: length, type: String(cString: type),
                                              params: params.map { String(cString: $0) } ?? ""))
            }
        } while next != nil
        return out
    }
}

/// libdevmapper's log, routed into swift-log through the C trampoline in CThinFSShims.
public enum DeviceMapperLog {
    /// The logger libdevmapper's messages go to (label `thinfs.devmapper`); replaceable.
    public static let logger = Mutex(Logger(label: "thinfs.devmapper"))

    private static let installed: Void = {
        thinfs_dm_log_set_callback { level, file, line, dmErrno, message in
            DeviceMapperLog.emit(level: level, file: file, line: line, dmErrno: dmErrno, message: message)
        }
        // Safe: the trampoline has exactly dm_log_with_errno_fn's C signature; Swift
        // imports that variadic function-pointer type as an OpaquePointer.
        dm_log_with_errno_init(OpaquePointer(thinfs_dm_log_trampoline_address()))
    }()

    static func install() { _ = installed }

    private static func emit(level: Int32, file: UnsafePointer<CChar>?, line: Int32, dmErrno: Int32, message: UnsafePointer<CChar>?) {
        guard let message else { return }
        // libdevmapper's levels are syslog's (_LOG_ERR 3 ... _LOG_DEBUG 7), with flag bits above 0x0f.
        // Its errors become thrown DeviceMapperErrors (errno from dm_task_get_errno), so here they
        // are only context, and library code logs at info or below.
        let swiftLevel: Logger.Level = switch level & 0x0f {
        case 0...4: .info
        case 5, 6: .debug
        default: .trace
        }
        var metadata: Logger.Metadata = ["dm.level": "\(level & 0x0f)"]
        if let file { metadata["dm.source"] = "\(String(cString: file)):\(line)" }
        if dmErrno != 0 && (level & 0x0f) <= 4 { metadata["dm.errno"] = "\(dmErrno)" }
        let text = String(cString: message)
        logger.withLock { $0.log(level: swiftLevel, "\(text)", metadata: metadata) }
    }
}
