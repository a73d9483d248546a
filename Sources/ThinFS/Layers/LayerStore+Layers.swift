import Foundation
import Logging
import PersistentData
import SystemPackage

/// Creating and removing layers, busy locks, deferred deletion.
extension LayerStore {
    // MARK: Create

    /// `thinfs layer create`: an image layer, a snapshot of `parent` (or of the base device).
    public func createImageLayer(_ id: String, parent: String?) throws -> Layer {
        try create(id, parent: parent, kind: .image, size: nil)
    }

    /// `thinfs layer create-rw`: a container layer, a read-write snapshot of image layer `parent`.
    /// A `size` larger than the parent's filesystem grows the container's filesystem.
    public func createContainerLayer(_ id: String, parent: String, size: UInt64?) throws -> Layer {
        try create(id, parent: parent, kind: .container, size: size)
    }

    /// `state` is `.applying` for a layer whose content is written next (`createImageLayer(_:parent:what:content:)`):
    /// its row is incomplete from the moment it exists.
    func create(_ id: String, parent: String?, kind: Kind, size: UInt64?, state: State = .active) throws -> Layer {
        try requireWritable("creating layer \(id)")
        try Self.validate(id: id)
        return try locked {
            if let existing = try layer(id) { throw Error.layerExists(id, state: existing.state) }
            let origin: (device: ThinDeviceID, size: UInt64, uuid: String)
            if let parent {
                let p = try liveLayer(parent)
                guard p.kind == .image else { throw Error.notAnImageLayer(parent, kind: p.kind) }
                // The parent is frozen from now on: nothing may be serving it read-write.
                if let holder = try busyHolder(parent), !holder.readOnly {
                    throw Error.busy(parent, holder: "\(holder.description); a layer mounted read-write cannot be snapshotted")
                }
                origin = (p.deviceID, p.size, p.uuid)
            } else {
                origin = (base.deviceID, base.size, base.uuid)
            }
            if let size, size < origin.size { throw Error.sizeTooSmall(id, size: size, minimum: origin.size) }
            // A size from a socket (create-rw's size, Docker's --storage-opt size=) is stored as
            // SQLite's signed integer and handed to the pool: past Int64.max, Int64(size) traps.
            if let size, size > ThinDevice.maximumSize {
                throw Error.invalidArgument(what: "size of layer \(id)", value: "\(size)",
                                            reason: "above the largest a thin device can have (\(ThinDevice.maximumSize) bytes)")
            }
            if let size, size % 4096 != 0 {
                throw Error.unsupported("layer \(id): size \(size) must be a multiple of 4K")
            }
            try checkFreeSpace()
            let layer = Layer(id: id, parent: parent, deviceID: try allocateDeviceID(), kind: kind, size: origin.size,
                              state: state, uuid: origin.uuid, created: Date())
            var created = try journaledCreate(layer, origin: origin.device)
            if let size, size > origin.size {
                do {
                    try growFilesystem(of: created, to: size)
                    created.size = size
                } catch {
                    // A container whose filesystem did not grow is not what was asked for.
                    try? journaledDelete(created)
                    throw error
                }
            }
            logger.info("created layer", metadata: ["layer": "\(id)", "thin.id": "\(created.deviceID)", "parent": "\(parent ?? "<base>")"])
            publishContainer(created)
            return created
        }
    }

    /// Docker's `dm.min_free_space` check before every create (deviceset.go `checkThinPool`):
    /// both data and metadata must keep that percentage free (at least one block).
    public func checkFreeSpace() throws {
        let s = try pool.status()
        let percent = options.minFreeSpacePercent
        let minData = max(1, s.totalDataBlocks * percent / 100)
        let freeData = s.totalDataBlocks - s.usedDataBlocks
        if freeData < minData {
            throw Error.lowSpace(what: "data", free: freeData, needed: minData, unit: "blocks of \(ByteSize.format(s.dataBlockSize))")
        }
        let minMeta = max(1, s.totalMetadataBlocks * percent / 100)
        let freeMeta = s.totalMetadataBlocks - s.usedMetadataBlocks
        if freeMeta < minMeta {
            throw Error.lowSpace(what: "metadata", free: freeMeta, needed: minMeta, unit: "blocks of 4K")
        }
    }

    // MARK: Remove

    public enum Removal: Equatable, Sendable {
        case deleted
        /// Busy, and deferred deletion is on: marked deleted; the device goes when it is free.
        case deferred(holder: String)
    }

    /// `thinfs layer rm`.
    public func remove(_ id: String) throws -> Removal {
        try requireWritable("removing layer \(id)")
        return try locked {
            guard let layer = try layer(id) else { throw Error.unknownLayer(id) }
            let children = try children(of: id).filter { $0.state != .deleted }
            guard children.isEmpty else { throw Error.hasChildren(id, children: children.map(\.id)) }
            let claimed = try claimWaitingOutAMoment(layer)
            guard let exclusive = claimed.lock else {
                let holder = claimed.holder?.description ?? "in use"
                // Removed before, still busy: nothing more to do until it is free.
                if layer.state == .deleted { return .deferred(holder: holder) }
                guard options.deferredDeletion else {
                    throw Error.busy(id, holder: "\(holder); unmount it first, or enable dm.use_deferred_deletion")
                }
                try db.execute("UPDATE layers SET state = 'deleted' WHERE id = ?", [.text(id)])
                logger.info("deferred the deletion of a busy layer", metadata: ["layer": "\(id)", "holder": "\(holder)"])
                return .deferred(holder: holder)
            }
            defer { exclusive.release() }
            do {
                try journaledDelete(layer)
            } catch let e as RBDPool.CatalogueError {
                // Another host still uses this shared layer: deferred like a busy one, or refused.
                guard case .inUse = e, options.deferredDeletion else { throw e }
                try db.execute("UPDATE layers SET state = 'deleted' WHERE id = ?", [.text(id)])
                logger.info("deferred the deletion of a layer another host uses", metadata: ["layer": "\(id)", "reason": "\(e)"])
                return .deferred(holder: "\(e)")
            }
            logger.info("deleted layer", metadata: ["layer": "\(id)", "thin.id": "\(layer.deviceID)"])
            return .deleted
        }
    }

    /// `thinfs cleanup`, and every unmount: deletes the deferred-deleted layers nobody uses any more.
    /// Returns the ids deleted.
    @discardableResult
    public func cleanup() throws -> [String] {
        try locked {
            var deleted: [String] = []
            for layer in try allLayers() where layer.state == .deleted {
                guard let exclusive = try claim(layer) else { continue }
                defer { exclusive.release() }
                do {
                    try journaledDelete(layer)
                } catch RBDPool.CatalogueError.inUse {
                    continue   // another host still uses it: it waits, as a busy layer does
                }
                deleted.append(layer.id)
                logger.info("deleted a deferred-deleted layer", metadata: ["layer": "\(layer.id)", "thin.id": "\(layer.deviceID)"])
            }
            return deleted
        }
    }

    /// How many layers wait for deferred deletion (`Deferred Deleted Device Count`).
    public func deferredDeletedCount() throws -> Int {
        Int(try db.query("SELECT COUNT(*) FROM layers WHERE state = 'deleted'").first?.first?.integer ?? 0)
    }

    // MARK: Busy locks

    /// A layer is busy while some process holds a shared flock on its lock file: a FUSE mount
    /// serving it, or a Volume open on it (apply-diff, diff). flock dies with its process, so a
    /// crashed daemon never leaves a layer busy. Holders write who they are next to the lock.
    public final class LayerLock: @unchecked Sendable {
        let fd: FileDescriptor
        let holderPath: String?
        private var released = false
        private let lock = Lock()

        init(fd: FileDescriptor, holderPath: String?) {
            self.fd = fd
            self.holderPath = holderPath
        }

        deinit { release() }

        public func release() {
            let first = lock.withLock { () -> Bool in
                defer { released = true }
                return !released
            }
            guard first else { return }
            if let holderPath { unlink(holderPath) }
            try? fd.close()
        }
    }

    public struct Holder: Codable, Equatable, Sendable, CustomStringConvertible {
        public var pid: Int32
        public var what: String
        public var readOnly: Bool
        public var description: String { pid > 0 ? "held by pid \(pid) (\(what))" : "held by \(what)" }
    }

    func lockPath(_ id: String) -> String { Self.lockPath(root: root, layer: id) }

    private func openLockFile(_ id: String) throws -> FileDescriptor {
        try Self.validate(id: id)
        return try FileDescriptor.open(FilePath(lockPath(id)), .readWrite, options: [.create, .closeOnExec],
                                permissions: [.ownerReadWrite])
    }

    /// Takes `id`'s busy lock shared, for as long as the returned lock lives. `what` says who.
    public func holdBusy(_ id: String, what: String, readOnly: Bool) throws -> LayerLock {
        let fd = try openLockFile(id)
        guard flock(fd.rawValue, LOCK_SH | LOCK_NB) == 0 else {
            try? fd.close()
            throw Error.busy(id, holder: "it is being removed")
        }
        let holderPath = locksDirectory + "/\(id).holder.\(getpid()).\(UUID().uuidString.prefix(8))"
        let holder = Holder(pid: getpid(), what: what, readOnly: readOnly)
        // A plain write, not Data.write(to:), which fsyncs (a flush per mount, on a container's
        // start path): the record only describes a live process, and a crash ends that process
        // and its lock, after which the record is ignored and removed (removeDeadHolderRecords).
        if let bytes = try? JSONEncoder().encode(holder),
           let out = try? FileDescriptor.open(FilePath(holderPath), .writeOnly, options: [.create, .truncate, .closeOnExec],
                                              permissions: [.ownerReadWrite, .groupRead, .otherRead]) {
            _ = try? out.closeAfter { try out.writeAll(bytes) }
        }
        return LayerLock(fd: fd, holderPath: holderPath)
    }

    /// Takes `id`'s busy lock exclusively if nobody holds it; nil if the layer is busy.
    func tryLockExclusive(_ id: String) throws -> LayerLock? {
        let fd = try openLockFile(id)
        guard flock(fd.rawValue, LOCK_EX | LOCK_NB) == 0 else {
            try? fd.close()
            return nil
        }
        return LayerLock(fd: fd, holderPath: nil)
    }

    /// `layer`'s busy lock, exclusively, if nobody uses it: no holder of the lock, and on a
    /// kernel pool no opener of its device outside ThinFS (a kernel mount). Nil if busy.
    func claim(_ layer: Layer) throws -> LayerLock? {
        guard let exclusive = try tryLockExclusive(layer.id) else { return nil }
        if try pool.externalUse(layer.deviceID) != nil {
            exclusive.release()
            return nil
        }
        return exclusive
    }

    /// `claim`, with a moment's hold waited out. A lock held with no live record (a child that
    /// any thread is spawning keeps a copy of the descriptor until its exec) fails a claim;
    /// `busyHolder` waits such a hold out, and when it then finds nobody the layer is claimed
    /// again, instead of being called busy with no holder to name. Returns the lock, or nil
    /// and who holds the layer (nil too if it was taken again meanwhile).
    func claimWaitingOutAMoment(_ layer: Layer) throws -> (lock: LayerLock?, holder: Holder?) {
        if let lock = try claim(layer) { return (lock, nil) }
        let holder = try busyHolder(layer.id)
        if holder == nil, let lock = try claim(layer) { return (lock, nil) }
        return (nil, holder)
    }

    /// Who holds `id` busy, or nil if nobody. Holder files of dead processes are ignored. On a
    /// kernel pool, a device opened outside ThinFS (a kernel mount) is busy too.
    public func busyHolder(_ id: String) throws -> Holder? {
        // A lock held with no live record is usually a moment's: a process that any thread of the
        // holder is spawning keeps a copy of every descriptor, the lock's too, until its exec
        // closes the close-on-exec ones (e2fsck, a mount helper, a test's curl), or a holder has
        // just unlinked its record and is about to close. It is waited out, for at most about
        // 0.4 s, before the layer is called busy for it.
        var wait: useconds_t = 5_000
        for attempt in 0...Self.unrecordedHolderRetries {
            if let probe = try tryLockExclusive(id) {
                probe.release()
                guard let layer = try layer(id), let use = try pool.externalUse(layer.deviceID) else { return nil }
                return Holder(pid: 0, what: use, readOnly: false)
            }
            let holders = liveHolders(id)
            // Read-write holders first: they are what blocks a snapshot.
            if let holder = holders.first(where: { !$0.readOnly }) ?? holders.first { return holder }
            if attempt < Self.unrecordedHolderRetries {
                usleep(wait)
                wait = min(wait * 2, 80_000)
            }
        }
        return Holder(pid: 0, what: "a process that did not say who it is", readOnly: true)
    }

    static let unrecordedHolderRetries = 8

    /// The holder records of `id` whose processes are alive.
    private func liveHolders(_ id: String) -> [Holder] {
        let prefix = "\(id).holder."
        let names = (try? FileManager.default.contentsOfDirectory(atPath: locksDirectory)) ?? []
        return names.filter { $0.hasPrefix(prefix) }.compactMap { name -> Holder? in
            guard let data = FileManager.default.contents(atPath: locksDirectory + "/" + name),
                  let h = try? JSONDecoder().decode(Holder.self, from: data), kill(h.pid, 0) == 0 else { return nil }
            return h
        }
    }

    /// Removes the holder records (`holdBusy`) of processes that are gone: a daemon killed with
    /// SIGKILL lost its locks with its life, but not its files. `busyHolder` already ignores
    /// them; this keeps ROOT/locks from growing with every crash. A record whose pid was reused
    /// stays (it is ignored once that process is gone too).
    func removeDeadHolderRecords() {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: locksDirectory)) ?? []
        for name in names where name.contains(".holder.") {
            let path = locksDirectory + "/" + name
            guard let data = FileManager.default.contents(atPath: path),
                  let h = try? JSONDecoder().decode(Holder.self, from: data), h.pid > 0, Self.isGone(h.pid) else { continue }
            unlink(path)
            logger.info("removed the busy-lock record of a process that is gone", metadata: ["record": "\(name)", "pid": "\(h.pid)"])
        }
    }

    /// No such process, or a zombie: a killed daemon whose parent has not reaped it (a
    /// detached daemon's parent is init, or a subreaper that may be slow) holds nothing.
    static func isGone(_ pid: Int32) -> Bool {
        if kill(pid, 0) != 0 { return errno == ESRCH }
        // /proc/PID/stat: "PID (COMM) STATE ...", COMM may hold spaces and parentheses.
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return false }
        return stat[stat.index(after: close)...].split(separator: " ").first == "Z"
    }

    // MARK: Volumes

    /// An open volume on a layer, holding it busy. Close it to commit and release.
    public final class OpenLayer: @unchecked Sendable {
        public let layer: Layer
        public let member: VolumeGroup.Member
        public var volume: Volume { member.volume }
        let busy: LayerLock?
        /// A read-only view of a volume this process has open read-write (`diff` of a mounted
        /// container): closing it leaves the owner's volume alone.
        let borrowed: Bool
        weak var store: LayerStore?

        init(layer: Layer, member: VolumeGroup.Member, busy: LayerLock?, borrowed: Bool, store: LayerStore) {
            self.layer = layer
            self.member = member
            self.busy = busy
            self.borrowed = borrowed
            self.store = store
        }

        /// Writes the filesystem back, commits the pool, and releases the layer.
        public func close() throws {
            guard !borrowed else { return }
            store?.forget(self)
            defer { busy?.release() }
            try member.close()
        }
    }

    func forget(_ open: OpenLayer) {
        locked { if openWriters[open.layer.id] === open { openWriters[open.layer.id] = nil } }
    }

    /// Opens `id`'s filesystem. Image layers with children are frozen: read-write is refused.
    /// `incomplete` lets a content writer open the `applying` layer it made (`LayerStore+Content.swift`).
    public func openLayer(_ id: String, readOnly: Bool, what: String) throws -> OpenLayer {
        try openLayer(id, readOnly: readOnly, what: what, incomplete: false)
    }

    func openLayer(_ id: String, readOnly: Bool, what: String, incomplete: Bool) throws -> OpenLayer {
        if !readOnly { try requireWritable("opening layer \(id) read-write") }
        return try locked {
            let layer: Layer
            if incomplete, let found = try self.layer(id), found.state == .applying {
                layer = found
            } else {
                layer = try liveLayer(id)
            }
            if !readOnly, let child = try children(of: id).first {
                throw Error.parentFrozen(id, child: child.id)
            }
            // A reader of a layer this process writes shares the writer's Volume: one libext2fs
            // handle sees every change the other has made, and it serializes the two.
            if readOnly, let writer = openWriters[id] {
                return OpenLayer(layer: layer, member: writer.member, busy: nil, borrowed: true, store: self)
            }
            // One writer, or any number of readers: a second Volume over a device being written
            // would read stale caches. Every open happens in the pool's one owner, under the lock.
            if let holder = try busyHolder(id), !readOnly || !holder.readOnly {
                throw Error.busy(id, holder: "\(holder.description); \(readOnly ? "it is open read-write" : "a read-write open needs it unused")")
            }
            let busy = try holdBusy(id, what: what, readOnly: readOnly)
            do {
                let member = try volumes.open(device: layer.deviceID, size: layer.size, readOnly: readOnly,
                                              logger: Logger(label: "thinfs.volume"))
                let open = OpenLayer(layer: layer, member: member, busy: busy, borrowed: false, store: self)
                if !readOnly { openWriters[id] = open }
                return open
            } catch {
                busy.release()
                throw error
            }
        }
    }
}
