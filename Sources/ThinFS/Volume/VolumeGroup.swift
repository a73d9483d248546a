import Logging
import PersistentData
import Synchronization

/// Volumes on several thin devices of one pool, in one process, committed together.
///
/// A pool commit makes the current mappings of *every* thin device durable at once. A
/// volume's ext4 is only consistent on its device right after libext2fs has flushed its
/// caches, so a commit started by one volume must first flush all the others, and keep
/// them still until the pool's metadata is written. Otherwise a crash could leave one
/// layer's ext4 half-written in the committed state while another layer asked for the commit.
///
///     fsync(A) ─▶ flush A under A's lock ─▶ release A ─▶ group.commit():
///         group lock ─▶ lock + flush A ─▶ lock + flush B ─▶ … ─▶ pool.commit() ─▶ unlock B, A
///
/// Each member volume sees its device through `MemberDevice`, whose `flush` writes nothing
/// and commits nothing: the group commits instead, through the volume's commit hook.
///
/// **Lock order:** the group's lock, then the volumes' locks in the order they joined; `tickets`
/// is a leaf (nothing is taken while it is held). A
/// volume never takes the group's lock while it holds its own (`Volume.fsync` calls the hook
/// after releasing it), so the order always holds and the commit cannot deadlock.
public final class VolumeGroup: @unchecked Sendable {
    public let pool: ThinPoolBackend
    private let lock = Lock()
    /// Members in joining order; the commit walks them in this order.
    private var members: [(key: Int, volume: Volume)] = []
    private var nextKey = 0
    private let logger: Logger

    public init(pool: ThinPoolBackend, logger: Logger = Logger(label: "thinfs.volumes")) {
        self.pool = pool
        self.logger = logger
    }

    /// A member's handle: close it to leave the group (flushes, commits, releases the device).
    public final class Member: @unchecked Sendable {
        public let volume: Volume
        public let deviceID: ThinDeviceID
        let key: Int
        let device: MemberDevice
        weak var group: VolumeGroup?

        init(volume: Volume, deviceID: ThinDeviceID, key: Int, device: MemberDevice, group: VolumeGroup) {
            self.volume = volume
            self.deviceID = deviceID
            self.key = key
            self.device = device
            self.group = group
        }

        /// Writes the volume back, commits the pool, and closes the volume and its device.
        public func close() throws {
            guard let group else { return }
            self.group = nil
            try group.leave(self)
        }

        /// Grows the open volume's device to `size` and its filesystem with it, with no close:
        /// the volume is held still (`Volume.reopen`) while `resize` grows the ext4 on the
        /// bigger device, which it gets uncommitted (the group's commit after makes it durable
        /// with every other member's state). The device is opened again at the new size (the
        /// kernel pool reloads its table); the old opening stays open until the member closes,
        /// for reads planned on it without the volume's lock.
        public func grow(to size: UInt64, resize: (BlockDevice) throws -> Void) throws {
            guard let group else { throw VolumeError(.badFileDescriptor, "the volume on thin device \(deviceID) is closed") }
            let bigger = try group.pool.openDevice(deviceID, size: size)
            var handedOver = false
            defer { if !handedOver { bigger.close() } }
            try volume.reopen {
                try resize(MemberDevice(bigger))
                device.replace(with: bigger)
                handedOver = true
            }
            try group.commit()
        }
    }

    /// Opens the ext4 on thin device `id` as a member of the group.
    public func open(device id: ThinDeviceID, size: UInt64, readOnly: Bool,
                     logger: Logger = Logger(label: "thinfs.volume")) throws -> Member {
        let device = try pool.openDevice(id, size: size)
        do {
            let key = lock.withLock { () -> Int in
                nextKey += 1
                return nextKey
            }
            let member = MemberDevice(device)
            let volume = try Volume(device: member, readOnly: readOnly, logger: logger,
                                    commit: { [weak self] in try self?.commit() })
            lock.withLock { members.append((key, volume)) }
            return Member(volume: volume, deviceID: id, key: key, device: member, group: self)
        } catch {
            device.close()
            throw error
        }
    }

    /// Commits asked for (`requested`) and the highest request a finished commit covered
    /// (`covered`), under `tickets`: group commit.
    private let tickets = Lock()
    private var requested: UInt64 = 0
    private var covered: UInt64 = 0

    /// Flushes every member and commits the pool once, with every member held still.
    ///
    /// Concurrent callers share commits: each takes a ticket before it queues on the group's
    /// lock, and a commit covers every ticket taken before it started (it flushes every member
    /// after that, so whatever those callers had written is in it). A caller whose ticket a
    /// finished commit covered returns without one of its own: n fsyncs that arrive while a
    /// commit runs wait for one more commit, not n.
    public func commit() throws {
        let ticket = tickets.withLock { () -> UInt64 in
            requested += 1
            return requested
        }
        try lock.withLock {
            if tickets.withLock({ covered >= ticket }) { return }
            let covers = tickets.withLock { requested }
            let volumes = members.map(\.volume)
            try commitHolding(volumes[...])
            tickets.withLock { covered = max(covered, covers) }
        }
    }

    private func commitHolding(_ rest: ArraySlice<Volume>) throws {
        guard let first = rest.first else {
            try pool.commit()
            return
        }
        try first.withFlushedState { try commitHolding(rest.dropFirst()) }
    }

    fileprivate func leave(_ member: Member) throws {
        defer { member.device.closeAll() }
        // Closing writes libext2fs's last state; the commit makes it durable with everyone else's.
        var failure: Error?
        do { try member.volume.close() } catch { failure = error }
        let writersLeft = lock.withLock { () -> Bool in
            members.removeAll { $0.key == member.key }
            return members.contains { !$0.volume.isReadOnly }
        }
        guard !member.volume.isReadOnly else {
            if let failure { throw failure }
            return
        }
        if let failure, !writersLeft, let userspace = pool as? UserspaceThinPool, userspace.options.atomicCommit {
            // Part of the volume's last state never reached the device (the pool out of space
            // even for metadata): a commit now would publish a half-written ext4 (e2fsck:
            // bitmap differences, blocks in use in a BLOCK_UNINIT group). Under atomic commit
            // the last commit holds it whole, so go back to that, as after a crash. With other
            // writers open this cannot be done without losing theirs, and the commit goes ahead.
            logger.error("a volume closed without all of its state written: its thin device goes back to the pool's last commit",
                         metadata: ["thin.id": "\(member.deviceID)", "error": "\(failure)"])
            do { try userspace.abortTransaction() } catch {
                throw VolumeError(.ioError, "closing the filesystem on thin device \(member.deviceID) failed (\(failure)), "
                                  + "and so did going back to the pool's last commit (\(error))")
            }
            throw failure
        }
        do { try commit() } catch { failure = failure ?? error }
        if let failure { throw failure }
    }
}

/// A thin device as a group member sees it: `flush` does not commit (the group does). Also what
/// a resize is handed (`Member.grow`, `LayerStore.growFilesystem`), for the same reason.
///
/// A member's device can grow (`replace`): I/O goes to the newest opening, and the earlier ones
/// stay open until `closeAll`, so that a read that took one just before cannot find it closed.
final class MemberDevice: BlockDevice, @unchecked Sendable {
    private let openings: Mutex<[BlockDevice]>
    init(_ base: BlockDevice) { openings = Mutex([base]) }
    var base: BlockDevice { openings.withLock { $0[$0.count - 1] } }

    func replace(with bigger: BlockDevice) { openings.withLock { $0.append(bigger) } }

    /// Closes every opening, newest first.
    func closeAll() {
        for device in openings.withLock({ $0.reversed() }) { device.close() }
    }

    var size: UInt64 { base.size }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws { try base.read(into: buffer, at: offset) }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws { try base.write(buffer, at: offset) }
    func writeFileData(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws { try base.writeFileData(buffer, at: offset) }
    var spaceFreedAtCommit: Bool { base.spaceFreedAtCommit }
    func discard(offset: UInt64, length: UInt64) throws { try base.discard(offset: offset, length: length) }
    /// The data is in the pool once written; durability is the group commit's job.
    func flush() throws {}
    func freeSpace() throws -> PoolFreeSpace? { try base.freeSpace() }
}
