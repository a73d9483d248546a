import Logging
import PersistentData
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A kernel dm-thin pool (an LVM thin pool such as `docker-thinpool`, or a
/// loop-file pool from `LoopThinPool`), driven through a `DeviceMapperControl`.
///
/// Thin device `id` is activated as `/dev/mapper/<prefix>-<id>` with the table
/// `0 <sectors> thin /dev/mapper/<pool> <id>`, and opened with O_DIRECT.
///
/// ## Activation
/// A thin device is active while something uses it: `openDevice` activates it, and closing
/// the last device it returned deactivates it again, with dm's deferred remove when
/// `deferredRemoval` is set (Docker's `dm.use_deferred_removal`: if another process still holds
/// the node, the kernel removes it when that process lets go, instead of the removal failing).
/// `delete` deactivates an unused device first; the kernel refuses to delete an active one.
///
/// ## Concurrency
/// `lock` serializes this pool's multi-step sequences (suspend, message,
/// resume; activate-or-reload) and guards `opens`. Lock order: this pool's lock, then the
/// control's (libdevmapper's) lock; the control never calls back.
public final class KernelThinPool: ThinPoolBackend {
    public enum Error: Swift.Error, Sendable, CustomStringConvertible {
        case noSuchPool(String)
        case notAThinPool(String, found: String)
        case poolFailed(String)
        case thinDeviceFailed(String)
        case status(String, KernelStatusError)
        case notOurs(String, transactionID: UInt64, usedDataBlocks: UInt64)

        public var description: String {
            switch self {
            case .noSuchPool(let n):
                "no device-mapper device '\(n)': create the pool first ('thinfs setup-lvm' or a loop pool), see 'dmsetup ls'"
            case .notAThinPool(let n, let found): "device-mapper device '\(n)' is not a thin pool (its table is '\(found)')"
            case .poolFailed(let n): "thin pool '\(n)' has failed (status 'Fail'); see dmesg, repair with thin_check/thin_repair"
            case .thinDeviceFailed(let n): "thin device '\(n)' has failed (status 'Fail'): its pool has failed"
            case .status(let n, let e): "\(n): \(e)"
            case .notOurs(let n, let t, let u):
                "thin pool '\(n)' is not empty (transaction id \(t), \(u) data blocks used) and not ThinFS's: give ThinFS a pool of its own ('thinfs setup-lvm' on a fresh device)"
            }
        }
    }

    /// The pool's dm name (`docker-thinpool`).
    public let poolName: String
    /// Thin devices are named `<devicePrefix>-<id>`.
    public let devicePrefix: String
    public let control: DeviceMapperControl
    /// How removal and cancelling a deferred remove retry EBUSY.
    public let busyRetry: BusyRetry
    /// Deactivate released devices with dm's deferred remove.
    public let deferredRemoval: Bool
    /// Remove the pool itself at `close` when none of its thin devices is active (a loop pool
    /// that `LoopThinPool.create` activated for a layer store; its loop devices go with it).
    public let removeWhenIdle: Bool
    /// Send no messages that change the pool; activate and open thin devices read-only.
    public let readOnly: Bool
    let logger: Logger
    /// Open `DirectBlockDevice`s per thin device, from `openDevice`.
    private let lock = Mutex<[ThinDeviceID: Int]>([:])

    /// Attaches to an existing, active pool; it is checked to be a `thin-pool` target.
    ///
    /// - Parameters:
    ///   - poolName: the dm name, as in `dm.thinpooldev=/dev/mapper/NAME` (a `/dev/mapper/` prefix is dropped).
    ///   - devicePrefix: the thin devices' name prefix (default: the pool name).
    public init(poolName: String, devicePrefix: String? = nil, control: DeviceMapperControl = LibDeviceMapper.shared,
                busyRetry: BusyRetry = .removal, deferredRemoval: Bool = false, removeWhenIdle: Bool = false,
                readOnly: Bool = false, logger: Logger = Logger(label: "thinfs.kernel-pool")) throws {
        var name = poolName.hasPrefix("/dev/mapper/") ? String(poolName.dropFirst("/dev/mapper/".count)) : poolName
        guard try control.info(name) != nil else { throw Error.noSuchPool(name) }
        // Once an LVM pool holds thin LVs, lvm2 activates the thin-pool target as `<name>-tpool`
        // and leaves `<name>` a linear layer over it: follow it there.
        if try control.table(name).first?.type != "thin-pool", try control.info("\(name)-tpool") != nil,
           try control.table("\(name)-tpool").first?.type == "thin-pool" {
            self.devicePrefix = devicePrefix ?? name
            name += "-tpool"
        } else {
            self.devicePrefix = devicePrefix ?? name
        }
        self.poolName = name
        self.control = control
        self.busyRetry = busyRetry
        self.deferredRemoval = deferredRemoval
        self.removeWhenIdle = removeWhenIdle
        self.readOnly = readOnly
        self.logger = logger
        _ = try poolTable()
    }

    /// Whether a store may take this pool (`dm.thinpooldev=NAME`): an empty one (transaction id 0,
    /// no data used), or one at the transaction id the store recorded for it (already ours).
    /// A failed or read-only pool is refused too. Docker's driver applied the same rule.
    public func checkAdoptable(recordedTransactionID: UInt64?) throws {
        let s = try status()
        if s.mode == .fail { throw Error.poolFailed(poolName) }
        if s.mode == .ro || s.needsCheck {
            throw ThinPoolError.readOnly("thin pool '\(poolName)' is read-only\(s.needsCheck ? " and needs_check is set" : ""); repair it with thin_check/thin_repair first")
        }
        if let recorded = recordedTransactionID, recorded == s.transactionID { return }
        guard s.transactionID == 0 && s.usedDataBlocks == 0 else {
            throw Error.notOurs(poolName, transactionID: s.transactionID, usedDataBlocks: s.usedDataBlocks)
        }
    }

    // MARK: - Names and tables

    public func deviceName(_ id: ThinDeviceID) -> String { "\(devicePrefix)-\(id)" }
    public func devicePath(_ id: ThinDeviceID) -> String { "/dev/mapper/\(deviceName(id))" }
    public var poolPath: String { "/dev/mapper/\(poolName)" }

    public func thinTable(_ id: ThinDeviceID, size: UInt64) -> ThinTable {
        // A thin device's length is whole sectors; the kernel rounds nothing for us.
        ThinTable(poolDevice: poolPath, id: id, sectors: (size + 511) / 512)
    }

    /// The pool's live `thin-pool` table.
    public func poolTable() throws -> ThinPoolTable {
        let table = try control.table(poolName)
        guard table.count == 1, table[0].type == "thin-pool" else {
            throw Error.notAThinPool(poolName, found: table.map(\.description).joined(separator: "; "))
        }
        do throws(KernelStatusError) { return try ThinPoolTable(table[0]) } catch { throw Error.status(poolName, error) }
    }

    // MARK: - ThinPoolBackend

    /// Sends a pool message. `create_snap` of an active origin suspends the
    /// origin around the message and resumes it after, even on failure: the
    /// kernel requires the origin to be quiesced, or writes in flight may land
    /// after the snapshot's copy-on-write sharing is set up (containerd#4374:
    /// snapshots of a busy origin came out corrupt without it).
    public func message(_ message: PoolMessage) throws {
        if readOnly {
            switch message {
            case .reserveMetadataSnap, .releaseMetadataSnap: break
            default: throw ThinPoolError.readOnly("thin pool '\(poolName)' is open read-only: '\(message)' refused")
            }
        }
        try lock.withLock { opens in
            if case .delete(let id) = message, try control.info(deviceName(id)) != nil {
                if let n = opens[id], n > 0 { throw ThinPoolError.deviceBusy(id, openCount: n) }
                try deactivateLocked(id, deferred: false)
            }
            if case .createSnap(_, let origin) = message, let info = try control.info(deviceName(origin)), !info.suspended {
                try control.suspend(deviceName(origin), noFlush: false)
                defer {
                    do { try control.resume(deviceName(origin)) } catch {
                        logger.info("resume after snapshot failed", metadata: ["thin.id": "\(origin)", "error": "\(error)"])
                    }
                }
                try send(message)
            } else {
                try send(message)
            }
        }
    }

    /// One message, with the kernel's errno turned into the pool layer's errors.
    private func send(_ message: PoolMessage) throws {
        do {
            try control.message(poolName, sector: 0, message.description)
            logger.debug("pool message", metadata: ["dm.pool": "\(poolName)", "dm.message": "\(message)"])
        } catch {
            throw translate(error, message)
        }
    }

    private func translate(_ error: DeviceMapperError, _ message: PoolMessage) -> Swift.Error {
        switch (message, error.errno) {
        case (.createThin(let id), .fileExists?), (.createSnap(let id, _), .fileExists?):
            return ThinPoolError.message(.deviceIDInUse(id))
        case (.createSnap(_, let origin), .noData?):
            return ThinPoolError.message(.unknownOrigin(origin))
        case (.delete(let id), .noData?):
            return ThinPoolError.message(.unknownDevice(id))
        case (.delete(let id), .resourceBusy?):
            let open = (try? control.info(deviceName(id)))??.openCount ?? 0
            return ThinPoolError.deviceBusy(id, openCount: Int(open))
        case (.createThin(let id), .noSpace?), (.createSnap(let id, _), .noSpace?):
            return ThinPoolError.noDataSpace(id)
        case (.setTransactionID(let given, _), .invalidArgument?):
            if let s = try? status(), s.mode != .fail { return ThinPoolError.message(.transactionIDMismatch(current: s.transactionID, given: given)) }
            return error
        case (.reserveMetadataSnap, .resourceBusy?), (.reserveMetadataSnap, .invalidArgument?):
            return ThinPoolError.message(.metadataSnapshotHeld((try? status())?.heldMetadataRoot ?? 0))
        case (.releaseMetadataSnap, .invalidArgument?):
            return ThinPoolError.message(.noMetadataSnapshot)
        case (_, .readOnlyFileSystem?), (_, .notSupported?):
            return ThinPoolError.readOnly("the kernel refused '\(message)' on pool '\(poolName)' (\(error.errno!)); see its status")
        default:
            return error
        }
    }

    public func status() throws -> PoolStatus {
        let table = try poolTable()
        let lines = try control.status(poolName)
        guard let line = lines.first, line.type == "thin-pool" else { throw Error.notAThinPool(poolName, found: lines.map(\.description).joined()) }
        do throws(KernelStatusError) {
            return try PoolStatus(kernelLine: line.params, dataBlockSize: table.blockSectors * 512)
        } catch {
            throw Error.status(poolName, error)
        }
    }

    /// The thin target's status. The kernel reports it only for an active
    /// device, so an inactive one is activated for the query and removed again.
    public func deviceStatus(_ id: ThinDeviceID) throws -> ThinDeviceStatus {
        try lock.withLock { _ in
            let name = deviceName(id)
            let wasActive = try control.info(name) != nil
            if !wasActive { try activateLocked(id, size: 4096) }
            defer { if !wasActive { try? control.removeRetryingBusy(name, retry: busyRetry) } }
            guard let line = try control.status(name).first else { throw Error.status(name, .malformed("thin status", "")) }
            let parsed: KernelThinStatus
            do throws(KernelStatusError) { parsed = try KernelThinStatus(kernelLine: line.params) } catch { throw Error.status(name, error) }
            switch parsed {
            case .ok(let s): return s
            case .fail: throw Error.thinDeviceFailed(name)
            case .unavailable: throw Error.status(name, .malformed("thin status (device being removed)", line.params))
            }
        }
    }

    /// Activates the thin device (or grows its table to `size`) and opens its node with O_DIRECT.
    /// Closing the last one deactivates the device (see "Activation").
    public func openDevice(_ id: ThinDeviceID, size: UInt64) throws -> BlockDevice {
        try lock.withLock { opens in
            try activateLocked(id, size: size)
            let device: DirectBlockDevice
            do {
                // The thin target maps into this pool: its free data blocks are what the device can still get.
                device = try DirectBlockDevice(path: devicePath(id), readOnly: readOnly,
                                               freeSpace: { [weak self] in try self?.status().freeDataBytes },
                                               onClose: { [weak self] in self?.released(id) })
            } catch {
                if opens[id, default: 0] == 0 { try? deactivateLocked(id, deferred: false) }
                throw error
            }
            opens[id, default: 0] += 1
            return device
        }
    }

    /// The last opener of `id` closed it: deactivate it. A failure (someone else holds the node,
    /// without deferred removal) leaves it active, as Docker left a device it could not remove:
    /// the layer then shows as busy, and the next open or `delete` takes the device as it is.
    private func released(_ id: ThinDeviceID) {
        lock.withLock { opens in
            opens[id, default: 1] -= 1
            guard opens[id] == 0 else { return }
            opens[id] = nil
            do {
                try deactivateLocked(id, deferred: deferredRemoval)
            } catch {
                logger.warning("could not deactivate a released thin device", metadata: ["thin.id": "\(id)", "error": "\(error)"])
            }
        }
    }

    /// Whether the pool has thin device `id`. The kernel has no query for one id: an active
    /// device exists; otherwise the metadata snapshot's device-details tree says. (A probe
    /// activation is no answer: a thin target for an unknown id fails with ENODATA in the kernel,
    /// but libdevmapper's create-and-load reports that as EIO.)
    public func deviceExists(_ id: ThinDeviceID) throws -> Bool {
        if try lock.withLock({ _ in try control.info(deviceName(id)) }) != nil { return true }
        return try deviceDetails()[id] != nil
    }

    /// Every thin device id in the pool (from the device-details tree of a metadata snapshot).
    public func deviceIDs() throws -> [ThinDeviceID] { try deviceDetails().keys.sorted() }

    public func deviceDetails() throws -> [ThinDeviceID: DeviceDetails] {
        try withMetadataSnapshot { try $0.devices() }
    }

    public func mappedDataBlocks() throws -> [ThinDeviceID: [UInt64]] {
        try withMetadataSnapshot { snap in
            var result: [ThinDeviceID: [UInt64]] = [:]
            for id in try snap.devices().keys {
                var blocks: [UInt64] = []
                try snap.mappings(id) { _, bt in
                    blocks.append(bt.block)
                    return true
                }
                result[id] = blocks
            }
            return result
        }
    }

    /// Reads a metadata snapshot (`reserve_metadata_snap`, then the held root's trees read
    /// with O_DIRECT from the metadata device, then `release_metadata_snap`): the kernel keeps
    /// a held snapshot's blocks intact, so the read is consistent while the pool runs. This is
    /// what `thin_ls -m` does.
    private func withMetadataSnapshot<T>(_ body: (HeldMetadataSnapshot) throws -> T) throws -> T {
        try lock.withLock { _ in
            let table = try poolTable()
            try send(.reserveMetadataSnap)
            defer { try? send(.releaseMetadataSnap) }
            let storage = try DirectMetadataStorage(path: try Self.nodePath(forDevice: table.metadataDevice))
            guard let snap = try HeldMetadataSnapshot.read(storage: storage) else {
                throw ThinPoolError.message(.noMetadataSnapshot)
            }
            return try body(snap)
        }
    }

    /// Openers of the device beyond this process's `openDevice`s: a kernel mount (named with
    /// its mount point), or a process holding the node.
    public func externalUse(_ id: ThinDeviceID) throws -> String? {
        try lock.withLock { opens in
            guard let info = try control.info(deviceName(id)) else { return nil }
            let outside = Int(info.openCount) - opens[id, default: 0]
            if info.deferredRemove { return "\(devicePath(id)), pending deferred removal (open \(info.openCount) times)" }
            guard outside > 0 else { return nil }
            if let mountPoint = Self.mountPoint(major: info.major, minor: info.minor) {
                return "\(devicePath(id)), mounted at \(mountPoint)"
            }
            return "\(devicePath(id)), open \(outside) time\(outside == 1 ? "" : "s") outside ThinFS"
        }
    }

    /// Where block device `major:minor` is mounted (/proc/self/mountinfo).
    static func mountPoint(major: UInt32, minor: UInt32) -> String? {
        MountTable.current().last { $0.device.major == major && $0.device.minor == minor }?.mountPoint
    }

    /// dm-thin commits on every flush to a thin device (and once a second when
    /// dirty): this flushes every active thin device of the pool.
    public func commit() throws {
        for device in try control.list() where device.name.hasPrefix("\(devicePrefix)-") && device.name != poolName {
            let fd = open("/dev/mapper/\(device.name)", O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { continue }
            defer { Glibc.close(fd) }
            while fsync(fd) != 0 {
                if errno == EINTR { continue }
                throw ThinPoolError.io(operation: "fsync", path: "/dev/mapper/\(device.name)", errno: Errno(rawValue: errno))
            }
        }
    }

    /// Commits. A pool activated for this store only (`removeWhenIdle`) is removed when none of
    /// its thin devices is active any more; one still in use (a kernel mount, a deferred remove
    /// pending) stays until a later close finds it idle.
    public func close() throws {
        try commit()
        guard removeWhenIdle else { return }
        try lock.withLock { opens in
            let active = try control.list().filter { $0.name.hasPrefix("\(devicePrefix)-") && $0.name != poolName }
            guard active.isEmpty, opens.isEmpty else {
                logger.info("leaving the loop pool active: thin devices are in use",
                            metadata: ["dm.pool": "\(poolName)", "dm.devices": "\(active.map(\.name))"])
                return
            }
            try control.removeRetryingBusy(poolName, retry: busyRetry)
            logger.debug("removed the idle loop pool", metadata: ["dm.pool": "\(poolName)"])
        }
    }

    /// Grows the pool's table to `dataBytes` (the data device must already be that large:
    /// `lvextend`, or `LoopThinPool.resize`, which grows the file and the loop device first).
    public func resize(dataBytes: UInt64) throws {
        try lock.withLock { _ in
            var table = try poolTable()
            let sectors = dataBytes / 512 / table.blockSectors * table.blockSectors
            guard sectors >= table.dataSectors else {
                throw ThinPoolError.invalidConfiguration("thin pool '\(poolName)': shrinking from \(table.dataSectors * 512) to \(dataBytes) bytes is not supported")
            }
            guard sectors > table.dataSectors else { return }
            table.dataSectors = sectors
            try control.reload(poolName, table: [table.target])
        }
    }

    // MARK: - Activation and removal

    /// Activates thin device `id` with `size` bytes, or reloads an active one whose size differs.
    public func activate(_ id: ThinDeviceID, size: UInt64) throws {
        try lock.withLock { _ in try activateLocked(id, size: size) }
    }

    private func activateLocked(_ id: ThinDeviceID, size: UInt64) throws {
        let name = deviceName(id)
        let table = thinTable(id, size: size)
        if let info = try control.info(name) {
            if info.deferredRemove {
                // Re-activating a device pending removal: take it back instead (Docker did the same).
                try control.cancelDeferredRemoveRetryingBusy(name, retry: busyRetry)
                if let lib = control as? LibDeviceMapper { try lib.makeNodes(name) }
            }
            let live = try control.table(name)
            if live != [table.target] { try control.reload(name, table: [table.target]) }
            return
        }
        try control.create(name, table: [table.target], readOnly: readOnly)
        logger.debug("activated thin device", metadata: ["thin.id": "\(id)", "dm.name": "\(name)"])
    }

    /// Deactivates thin device `id`. Not deferred: EBUSY is retried (see
    /// `removeRetryingBusy`), then thrown. Deferred: the kernel removes it when
    /// its last opener closes (at once if none). Absent devices are fine.
    public func deactivate(_ id: ThinDeviceID, deferred: Bool = false) throws {
        try lock.withLock { _ in try deactivateLocked(id, deferred: deferred) }
    }

    private func deactivateLocked(_ id: ThinDeviceID, deferred: Bool) throws {
        let name = deviceName(id)
        guard let info = try control.info(name), !(deferred && info.deferredRemove) else { return }
        do {
            try control.removeRetryingBusy(name, deferred: deferred, retry: deferred ? .never : busyRetry)
        } catch {
            guard error.errno == .resourceBusy else { throw error }
            let open = (try? control.info(name))??.openCount ?? 0
            throw ThinPoolError.deviceBusy(id, openCount: Int(open))
        }
    }

    /// Cancels a pending deferred remove of thin device `id`, so it stays active.
    public func cancelDeferredRemove(_ id: ThinDeviceID) throws {
        try lock.withLock { _ in
            let name = deviceName(id)
            try control.cancelDeferredRemoveRetryingBusy(name, retry: busyRetry)
            // Without udev, libdevmapper may already have removed the node; make it again.
            if let lib = control as? LibDeviceMapper { try lib.makeNodes(name) }
        }
    }

    /// The dm state of thin device `id` (open count, deferred remove), or nil when inactive.
    public func info(_ id: ThinDeviceID) throws -> DeviceMapperInfo? { try control.info(deviceName(id)) }

    // MARK: -

    /// `/dev/<name>` of a table's `major:minor` (or a path, unchanged), through sysfs.
    static func nodePath(forDevice device: String) throws -> String {
        if device.hasPrefix("/") { return device }
        let uevent = "/sys/dev/block/\(device)/uevent"
        guard let f = fopen(uevent, "r") else { throw ThinPoolError.io(operation: "open", path: uevent, errno: Errno(rawValue: errno)) }
        defer { fclose(f) }
        var buf = [CChar](repeating: 0, count: 256)
        while fgets(&buf, Int32(buf.count), f) != nil {
            let line = String(decoding: buf.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if line.hasPrefix("DEVNAME=") { return "/dev/" + line.dropFirst(8) }
        }
        throw ThinPoolError.io(operation: "DEVNAME in", path: uevent, errno: .noSuchFileOrDirectory)
    }
}

/// Metadata blocks read with O_DIRECT from a live pool's metadata device: the
/// kernel writes metadata through dm-bufio, below the device's page cache, so a
/// buffered read could return stale blocks. Read-only.
final class DirectMetadataStorage: MetadataStorage {
    let device: DirectBlockDevice
    let nrBlocks: UInt64
    var name: String { device.path }

    init(path: String) throws {
        device = try DirectBlockDevice(path: path, readOnly: true)
        nrBlocks = device.size / UInt64(MetadataBlock.size)
    }

    func read(block: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(MetadataError) {
        do {
            try device.read(into: buffer, at: block * UInt64(MetadataBlock.size))
        } catch {
            throw .io(operation: "pread(O_DIRECT)", path: name, errno: Errno(reporting: error).rawValue)
        }
    }

    func write(block: UInt64, from buffer: UnsafeRawBufferPointer) throws(MetadataError) {
        throw .io(operation: "write", path: name, errno: EROFS)
    }

    func sync() throws(MetadataError) {}
}
