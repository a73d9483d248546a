import CRBD
import Foundation
import Logging
import PersistentData
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

// With RBDPool+Catalogue.swift (the layer catalogue shared between hosts), the only Swift
// files that import CRBD, which dlopens librados and librbd on a `RadosConnection`'s first use
// and calls them through `ceph` (`ceph.rbd_open(...)`). Every librbd and librados call goes through the types here: `RadosConnection` owns the cluster handle and the pool's I/O context, `RBDImage` one
// open image, `RBDBlockDevice` the I/O on it, and `RBDPool` the dm-thin message vocabulary.
// Every return code goes through `check`, which throws with the operation and image named.

/// A thin pool over a Ceph RBD pool (issue 16): dm-thin's model, one for one, at cluster scale.
///
///     dm-thin                         RBD (librbd, format 2 images)
///     thin device <id>                image <prefix><id>: layering, exclusive-lock, object-map, fast-diff
///     create_thin <id>                rbd_create4 of the store's base size (images are thin)
///     create_snap <id> <origin>       snapshot thinfs-clone-<id> of the origin, protected, then a
///                                     v1 clone of it named <prefix><id>
///     delete <id>                     remove the image; see "Deletion" for one that has clones
///     set_transaction_id              the pool's rbd metadata key thinfs.<prefix>transaction_id
///     commit                          flush every image this process has open
///     thin device status, thin_ls     rbd_diff_iterate2 extents (fast with object-map/fast-diff)
///
/// ## Why v1 (protected) clones
/// A v2 clone needs no protection step but requires `ceph osd set-require-min-compat-client
/// mimic` on the whole cluster, a setting a shared cluster's other clients may not allow.
/// v1 clones work with every client; the price is one `snap protect` (a monitor round, tens of
/// ms with `paxos propose interval = 0.05`) per snapshot, and the rule below for deletion.
///
/// ## Deletion
/// dm-thin deletes an origin whose snapshots live on; Ceph refuses to remove an image whose
/// snapshot still has clones (they read through it). So `delete` of such an image renames it
/// to `<prefix>deleted-<id>-<uuid>` (it is no longer thin device <id>, and the id is free for
/// reuse) and removes its snapshots that have no clones; when the last clone of a renamed image
/// goes, the clone's `delete` removes the parent's snapshot and then the parent itself, up the
/// chain. Nothing a clone reads is ever removed; nothing unreachable is kept.
///
/// ## Exclusive lock
/// A device opened for writing takes the image's exclusive lock explicitly
/// (`rbd_lock_acquire`), and holds it until its last opener in this process closes it. Another
/// client's writes (another host's store) then fail at once with EROFS instead of the lock
/// moving between them, and its `openDevice` fails naming the holder. When a holder dies, Ceph
/// lets another client take the lock after `osd client watch timeout` (blocklisting the dead one).
///
/// ## Concurrency
/// librbd is thread-safe for I/O on one image handle; this pool serializes its management
/// sequences (snapshot, protect, clone; open-or-share a handle) under `state`. Lock order: a
/// caller's locks (the store's, a volume's), then `state`; librbd's own locks are innermost.
public final class RBDPool: ThinPoolBackend, @unchecked Sendable {
    public struct Configuration: Codable, Equatable, Sendable {
        /// rbd.pool: the RADOS pool holding the images.
        public var pool: String
        /// rbd.conf: a ceph.conf path; nil for librados's default search (/etc/ceph/ceph.conf).
        public var conf: String?
        /// rbd.id: the client name without `client.` (default `admin`).
        public var clientID: String?
        /// rbd.prefix: image names are `<prefix><id>`, so several stores can share one pool.
        public var prefix: String
        /// The size `create_thin` gives a new image (dm.basesize); `openDevice` grows it as asked.
        public var imageSize: UInt64
        /// The unit of `status` and `deviceDetails` counts (dm.blocksize): RBD has no pool blocks.
        public var blockSize: UInt64
        /// rbd.catalogue: the RADOS object, in `pool`, of the layer catalogue that stores sharing
        /// image layers between hosts have in common (RBDPool+Catalogue.swift); nil: no sharing.
        public var catalogue: String?
        /// rbd.osd_timeout: seconds an I/O waits for the OSDs (librados's rados_osd_op_timeout)
        /// before it fails with EIO. Ceph's own default, 0, waits for ever: a cluster that stops
        /// would hang every process touching the mount.
        public var osdTimeout: UInt32
        /// rbd.mon_timeout: seconds a connection and a monitor command wait for the monitors
        /// (client_mount_timeout, rados_mon_op_timeout; Ceph's defaults are 300 and for ever).
        public var monTimeout: UInt32

        public static let defaultOSDTimeout: UInt32 = 30
        public static let defaultMonTimeout: UInt32 = 15

        public init(pool: String = "rbd", conf: String? = nil, clientID: String? = nil, prefix: String = "thinfs-",
                    imageSize: UInt64 = 10 << 30, blockSize: UInt64 = 64 << 10, catalogue: String? = nil,
                    osdTimeout: UInt32 = Configuration.defaultOSDTimeout, monTimeout: UInt32 = Configuration.defaultMonTimeout) {
            self.pool = pool
            self.conf = conf
            self.clientID = clientID
            self.prefix = prefix
            self.imageSize = imageSize
            self.blockSize = blockSize
            self.catalogue = catalogue
            self.osdTimeout = osdTimeout
            self.monTimeout = monTimeout
        }
    }

    public enum Error: Swift.Error, CustomStringConvertible, Sendable {
        /// A librados or librbd call failed; `target` names the cluster, pool or image.
        case call(operation: String, target: String, errno: Errno)
        /// Another client holds the image's exclusive lock (another host's store writing it).
        case lockedByAnotherClient(image: String, holders: [String])
        /// `thinfs init` found images or a transaction id under the prefix already.
        case prefixInUse(pool: String, prefix: String, images: [String], transactionID: UInt64)
        /// librados.so.2 or librbd.so.1 could not be loaded (CRBD dlopens them on first use);
        /// `reason` is dlerror()'s text.
        case libraryUnavailable(library: String, reason: String)
        /// A RADOS object of librbd's (an image's id object) holds what librbd never writes.
        case malformedObject(object: String, reason: String)

        public var description: String {
            switch self {
            case .call(let op, let target, let e): "\(op) \(target): \(e)"
            case .lockedByAnotherClient(let image, let holders):
                "rbd image \(image) is locked exclusively by \(holders.isEmpty ? "another client" : holders.joined(separator: ", ")) (another host writing it?); stop that writer, or wait for Ceph to expire a dead one's lock (osd client watch timeout)"
            case .prefixInUse(let pool, let prefix, let images, let tx):
                "rbd pool \(pool) already holds images with prefix '\(prefix)' (\(images.prefix(5).joined(separator: ", "))\(images.count > 5 ? ", ..." : ""); transaction id \(tx)): give this store its own rbd.prefix, or remove them ('rbd rm')"
            case .libraryUnavailable(let library, let reason):
                "thinfs.backend=rbd needs Ceph's client library \(library), which could not be loaded (\(reason)): install it (Debian: librbd1, librados2), or give this store another thinfs.backend"
            case .malformedObject(let object, let reason): "rados object \(object): \(reason) (not written by librbd?)"
            }
        }

        public var errno: Errno {
            switch self {
            case .call(_, _, let e): e
            case .lockedByAnotherClient: .readOnlyFileSystem
            case .prefixInUse: .fileExists
            case .libraryUnavailable: Errno(rawValue: ELIBACC)
            case .malformedObject: .ioError
            }
        }
    }

    public let configuration: Configuration
    public let readOnly: Bool
    let connection: RadosConnection
    let logger: Logger
    /// Images this process has open, shared by their openers, with the open count.
    private let state = Mutex<[ThinDeviceID: (image: RBDImage, opens: Int)]>([:])
    /// Device ids of this store that name another store's image (a shared layer adopted, a
    /// container taken over), from the catalogue. Lock order: `state`, then this.
    let aliases = Mutex<[ThinDeviceID: String]>([:])

    /// Connects to the cluster (`rbd.conf`, `rbd.id`) and opens `rbd.pool`.
    public init(_ configuration: Configuration, readOnly: Bool = false,
                logger: Logger = Logger(label: "thinfs.rbd-pool")) throws {
        guard !configuration.prefix.isEmpty, !configuration.prefix.contains("/"), !configuration.prefix.contains("@") else {
            throw ThinPoolError.invalidConfiguration("rbd.prefix '\(configuration.prefix)' must be non-empty, without '/' or '@'")
        }
        self.configuration = configuration
        self.readOnly = readOnly
        self.logger = logger
        connection = try RadosConnection(conf: configuration.conf, clientID: configuration.clientID, pool: configuration.pool,
                                         osdTimeout: configuration.osdTimeout, monTimeout: configuration.monTimeout)
        let loaded = try loadAliases()
        aliases.withLock { $0 = loaded }
    }

    deinit {
        state.withLock { $0.removeAll() }
    }

    /// librbd's version, as `rbd --version` numbers it (major.minor.extra of the librbd API), or
    /// why it could not be loaded.
    public static var libraryVersion: String {
        do {
            let library = try CephLibraries.load()
            var major: Int32 = 0, minor: Int32 = 0, extra: Int32 = 0
            library.rbd_version(&major, &minor, &extra)
            return "\(major).\(minor).\(extra)"
        } catch {
            return "not loaded: \(error)"
        }
    }

    // MARK: Names

    public func imageName(_ id: ThinDeviceID) -> String { aliases.withLock { $0[id] } ?? "\(configuration.prefix)\(id)" }
    /// `pool/image`, as the rbd CLI names an image.
    public func spec(_ id: ThinDeviceID) -> String { "\(configuration.pool)/\(imageName(id))" }
    /// Named by the clone's image, not only its id: another store's clones of a shared image
    /// would collide on the id alone.
    func cloneSnapshot(_ child: ThinDeviceID) -> String { "thinfs-clone-\(configuration.prefix)\(child)" }
    var deletedPrefix: String { configuration.prefix + "deleted-" }
    var transactionKey: String { "thinfs.\(configuration.prefix)transaction_id" }

    /// The device id an image name stands for, or nil for another store's (or a renamed) image.
    func deviceID(ofImage name: String) -> ThinDeviceID? {
        guard name.hasPrefix(configuration.prefix) else { return nil }
        let digits = name.dropFirst(configuration.prefix.count)
        guard !digits.isEmpty, digits.allSatisfy(\.isASCII), digits.allSatisfy(\.isNumber), let v = ThinDeviceID(digits) else { return nil }
        return v
    }

    // MARK: ThinPoolBackend

    public func message(_ message: PoolMessage) throws {
        if readOnly { throw ThinPoolError.readOnly("rbd pool \(configuration.pool) is open read-only: '\(message)' refused") }
        switch message {
        case .createThin(let id): try createThin(id)
        case .createSnap(let id, let origin): try createSnap(id, origin: origin)
        case .delete(let id): try delete(id)
        case .setTransactionID(let current, let new):
            let actual = try transactionID()
            guard actual == current else { throw ThinPoolError.message(.transactionIDMismatch(current: actual, given: current)) }
            try connection.setPoolMetadata(transactionKey, String(new))
        case .reserveMetadataSnap, .releaseMetadataSnap:
            throw ThinPoolError.invalidConfiguration("'\(message)': an RBD pool has no dm-thin metadata to hold; its reads are consistent as they are")
        }
    }

    private func createThin(_ id: ThinDeviceID) throws {
        let name = imageName(id)
        try state.withLock { _ in
            let rc = withImageOptions { opts in connection.withIO { ceph.rbd_create4($0, name, configuration.imageSize, opts) } }
            if rc == -EEXIST { throw ThinPoolError.message(.deviceIDInUse(id)) }
            try check(rc, "rbd_create4", spec(id))
            logger.debug("created rbd image", metadata: ["thin.id": "\(id)", "rbd.image": "\(name)"])
        }
    }

    private func createSnap(_ id: ThinDeviceID, origin: ThinDeviceID) throws {
        let name = imageName(id), originName = imageName(origin)
        // Another store's image (a shared layer) is cloned from the snapshot its owner made
        // and protected when it published it: this store never opens it for writing.
        let viaShared = deviceID(ofImage: originName) != origin
        let snap = viaShared ? Self.sharedSnapshot : cloneSnapshot(id)
        try state.withLock { open in
            guard try !connection.imageExists(name) else { throw ThinPoolError.message(.deviceIDInUse(id)) }
            // The origin's own handle when this process has it open: it holds the exclusive
            // lock, and flushing it first is what suspending the origin is to dm-thin (no write
            // in flight may land after the snapshot).
            let image: RBDImage
            if viaShared {
                do { image = try RBDImage(connection: connection, name: originName, readOnly: true) } catch let e as Error {
                    if case .call(_, _, .noSuchFileOrDirectory) = e { throw ThinPoolError.message(.unknownOrigin(origin)) }
                    throw e
                }
            } else if let shared = open[origin]?.image {
                image = shared
                try image.flush()
            } else {
                do { image = try RBDImage(connection: connection, name: originName, readOnly: false) } catch let e as Error {
                    if case .call(_, _, .noSuchFileOrDirectory) = e { throw ThinPoolError.message(.unknownOrigin(origin)) }
                    throw e
                }
            }
            // A snapshot left by an interrupted create_snap of the same child id is reused.
            if !viaShared {
                try image.createProtectedSnapshot(snap)
            } else {
                image.close()
            }
            let rc = withImageOptions { opts in
                _ = ceph.rbd_image_options_set_uint64(opts, Int32(RBD_IMAGE_OPTION_CLONE_FORMAT), 1)
                return connection.withIO { ceph.rbd_clone3($0, originName, snap, $0, name, opts) }
            }
            if rc == -EEXIST { throw ThinPoolError.message(.deviceIDInUse(id)) }
            try check(rc, "rbd_clone3", "\(configuration.pool)/\(originName)@\(snap) to \(name)")
            logger.debug("cloned rbd image", metadata: ["thin.id": "\(id)", "thin.origin": "\(origin)", "rbd.image": "\(name)"])
        }
    }

    /// Format 2 with layering, exclusive-lock, object-map and fast-diff (the last two make
    /// `rbd_diff_iterate2`, so device status and usage, cheap).
    private func withImageOptions(_ body: (rbd_image_options_t) -> Int32) -> Int32 {
        var opts: rbd_image_options_t?
        ceph.rbd_image_options_create(&opts)
        defer { ceph.rbd_image_options_destroy(opts) }
        let features = UInt64(RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK | RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF)
        _ = ceph.rbd_image_options_set_uint64(opts, Int32(RBD_IMAGE_OPTION_FORMAT), 2)
        _ = ceph.rbd_image_options_set_uint64(opts, Int32(RBD_IMAGE_OPTION_FEATURES), features)
        return body(opts!)
    }

    private func delete(_ id: ThinDeviceID) throws {
        let name = imageName(id)
        try state.withLock { open in
            if let n = open[id]?.opens, n > 0 { throw ThinPoolError.deviceBusy(id, openCount: n) }
            guard try connection.imageExists(name) else { throw ThinPoolError.message(.unknownDevice(id)) }
            if let holder = try externalUseLocked(name), deviceID(ofImage: name) == id {
                throw ThinPoolError.io(operation: "delete (\(holder))", path: spec(id), errno: .resourceBusy)
            }
            // A shared layer's alias goes, its image stays; one another store uses is refused.
            guard try unpublishForDelete(id, image: name) else { return }
            try removeOrRetire(name, deviceID: id)
        }
    }

    /// Removes image `name`, or renames it to a deleted-image name if clones still read
    /// through its snapshots; then lets its parent go if that was the parent's last clone.
    private func removeOrRetire(_ name: String, deviceID id: ThinDeviceID?) throws {
        let image = try RBDImage(connection: connection, name: name, readOnly: false)
        let parent = try image.parent()
        var kept = 0
        for snap in try image.snapshots() {
            if try image.children(of: snap).isEmpty {
                try image.removeSnapshot(snap)
            } else {
                kept += 1
            }
        }
        image.close()
        if kept == 0 {
            try check(connection.withIO { ceph.rbd_remove($0, name) }, "rbd_remove", "\(configuration.pool)/\(name)")
            logger.debug("removed rbd image", metadata: ["rbd.image": "\(name)"])
        } else {
            let retired = "\(deletedPrefix)\(id.map(String.init) ?? "x")-\(UUID().uuidString.lowercased())"
            try check(connection.withIO { ceph.rbd_rename($0, name, retired) }, "rbd_rename", "\(configuration.pool)/\(name) to \(retired)")
            logger.debug("retired rbd image with clones", metadata: ["rbd.image": "\(name)", "rbd.retired": "\(retired)", "rbd.snapshots": "\(kept)"])
        }
        guard let parent else { return }
        // This image was a clone: drop the parent's snapshot it read through, and a retired
        // parent once nothing reads through it any more.
        let parentImage = try RBDImage(connection: connection, name: parent.image, readOnly: false)
        // A published layer's shared snapshot stays while it is published: other stores clone it.
        let keep = try parent.snapshot == Self.sharedSnapshot && imageRecord(parent.image) != nil
        if !keep, try parentImage.children(of: parent.snapshot).isEmpty {
            try parentImage.removeSnapshot(parent.snapshot)
        }
        let left = try parentImage.snapshots().count
        parentImage.close()
        if left == 0, parent.image.hasPrefix(deletedPrefix) {
            try removeOrRetire(parent.image, deviceID: nil)
        }
    }

    public func status() throws -> PoolStatus {
        var (total, used) = try connection.clusterUsage()
        // The monitors learn the cluster's capacity from ceph-mgr; a cluster without one (the
        // test cluster: RBD I/O does not need it) reports 0 bytes. Then the capacity is unknown,
        // and reported as `unknownCapacity` so that dm.min_free_space refuses nothing.
        if total == 0 { total = Self.unknownCapacity; used = 0 }
        let bs = configuration.blockSize
        // RADOS keeps image headers, object maps and data on the same OSDs: the metadata counts
        // are the same space, in 4K units, so dm.min_free_space checks both against it.
        return PoolStatus(transactionID: try transactionID(), usedMetadataBlocks: used / 4096, totalMetadataBlocks: total / 4096,
                          usedDataBlocks: used / bs, totalDataBlocks: total / bs, heldMetadataRoot: nil,
                          mode: readOnly ? .ro : .rw, discard: "discard_passdown", errorIfNoSpace: true, needsCheck: false,
                          metadataLowWatermark: 0, dataBlockSize: bs)
    }

    /// What `status` reports as the capacity when the cluster reports none (no ceph-mgr): 1 PiB.
    public static let unknownCapacity: UInt64 = 1 << 50

    func transactionID() throws -> UInt64 {
        guard let text = try connection.poolMetadata(transactionKey) else { return 0 }
        guard let v = UInt64(text) else {
            throw ThinPoolError.invalidConfiguration("rbd pool \(configuration.pool): metadata \(transactionKey) is '\(text)', not a number")
        }
        return v
    }

    /// Mapped sectors and the highest one, counting what a clone reads from its parents, as a
    /// dm-thin snapshot maps its origin's blocks.
    public func deviceStatus(_ id: ThinDeviceID) throws -> ThinDeviceStatus {
        let extents = try withImage(id) { try $0.allocatedExtents(includeParent: true) }
        let mapped = extents.reduce(0) { $0 + $1.length }
        let highest = extents.map { $0.offset + $0.length }.max().map { $0 / 512 - 1 }
        return ThinDeviceStatus(mappedSectors: mapped / 512, highestMappedSector: highest)
    }

    /// Opens image `id` (sharing this process's handle). A writable open takes the exclusive
    /// lock; `size` grows an image that is smaller (never shrinks one). `ThinDevice.maximumSize`
    /// means "as large as it is" (`thinfs dev read`).
    public func openDevice(_ id: ThinDeviceID, size: UInt64) throws -> BlockDevice {
        try state.withLock { open in
            let image: RBDImage
            if let shared = open[id]?.image {
                image = shared
            } else {
                let name = imageName(id)
                // A container another store took over is that store's to write now.
                if !readOnly { try checkOwned(name) }
                do {
                    image = try RBDImage(connection: connection, name: name, readOnly: readOnly)
                } catch Error.call(_, _, .noSuchFileOrDirectory) {
                    throw ThinPoolError.message(.unknownDevice(id))
                }
                if !readOnly {
                    do { try image.acquireExclusiveLock() } catch {
                        image.close()
                        throw error
                    }
                }
            }
            var current = try image.size()
            if size != ThinDevice.maximumSize, size > current {
                guard !readOnly else { throw ThinPoolError.readOnly("rbd image \(image.name) is \(current) bytes, \(size) asked, and the pool is read-only") }
                try image.resize(to: size)
                current = size
            }
            open[id, default: (image, 0)].opens += 1
            return RBDBlockDevice(image: image, size: size == ThinDevice.maximumSize ? current : size,
                                  freeSpace: { [weak self] in try self?.status().freeDataBytes },
                                  onClose: { [weak self] in self?.released(id) })
        }
    }

    /// Registers `image`, opened (and locked) by `takeOver`, as device `id`'s open handle.
    func adoptOpen(_ id: ThinDeviceID, image: RBDImage) throws -> BlockDevice {
        let size = try image.size()
        state.withLock { open in open[id] = (image, (open[id]?.opens ?? 0) + 1) }
        return RBDBlockDevice(image: image, size: size, freeSpace: { [weak self] in try self?.status().freeDataBytes },
                              onClose: { [weak self] in self?.released(id) })
    }

    private func released(_ id: ThinDeviceID) {
        let image: RBDImage? = state.withLock { open in
            guard var entry = open[id] else { return nil }
            entry.opens -= 1
            if entry.opens > 0 { open[id] = entry; return nil }
            open[id] = nil
            return entry.image
        }
        // Closing flushes and releases the exclusive lock.
        image?.close()
    }

    public func deviceExists(_ id: ThinDeviceID) throws -> Bool { try connection.imageExists(imageName(id)) }

    /// This store's images, and its aliases whose image exists.
    public func deviceIDs() throws -> [ThinDeviceID] {
        let names = try connection.imageNames()
        let present = Set(names)
        let aliased = aliases.withLock { $0 }.filter { present.contains($0.value) }.map(\.key)
        return (names.compactMap(deviceID(ofImage:)) + aliased).sorted()
    }

    /// Images under other names that this store's prefix owns: retired parents still read by clones.
    public func retiredImages() throws -> [String] { try connection.imageNames().filter { $0.hasPrefix(deletedPrefix) }.sorted() }

    public func deviceDetails() throws -> [ThinDeviceID: DeviceDetails] {
        var result: [ThinDeviceID: DeviceDetails] = [:]
        let bs = configuration.blockSize
        for id in try deviceIDs() {
            let (blocks, created) = try withImage(id) { image in
                (Self.blocks(of: try image.allocatedExtents(includeParent: true), blockSize: bs).count, try image.createTimestamp())
            }
            result[id] = DeviceDetails(mappedBlocks: UInt64(blocks), transactionID: 0, creationTime: UInt32(truncatingIfNeeded: created),
                                       snapshottedTime: UInt32(truncatingIfNeeded: created))
        }
        return result
    }

    /// The blocks each image holds itself (not what a clone reads from its parent). RADOS objects
    /// are never shared between images (a clone copies an object up on its first write), so
    /// every block is numbered apart, image by image: thin_ls's SHARED is always 0 here.
    public func mappedDataBlocks() throws -> [ThinDeviceID: [UInt64]] {
        var result: [ThinDeviceID: [UInt64]] = [:]
        for (index, id) in try deviceIDs().enumerated() {
            let own = try withImage(id) { try $0.allocatedExtents(includeParent: false) }
            result[id] = Self.blocks(of: own, blockSize: configuration.blockSize).map { UInt64(index) << 40 | $0 }
        }
        return result
    }

    static func blocks(of extents: [(offset: UInt64, length: UInt64)], blockSize: UInt64) -> [UInt64] {
        var blocks: [UInt64] = []
        for e in extents where e.length > 0 {
            var b = e.offset / blockSize
            let end = (e.offset + e.length - 1) / blockSize
            while b <= end {
                if blocks.last != b { blocks.append(b) }
                b += 1
            }
        }
        return blocks
    }

    /// Another client watching the image (another host's store has it open).
    public func externalUse(_ id: ThinDeviceID) throws -> String? {
        try state.withLock { _ in try externalUseLocked(imageName(id)) }
    }

    /// Asked of RADOS (the watchers of the image's header object), without opening the image.
    private func externalUseLocked(_ name: String) throws -> String? {
        guard let watchers = try connection.imageWatchers(name) else { return nil }
        let ours = connection.instanceID
        let others = watchers.filter { $0.id != ours }
        guard !others.isEmpty else { return nil }
        return "rbd image \(configuration.pool)/\(name) is open by \(others.map { "client.\($0.id) at \($0.address)" }.joined(separator: ", "))"
    }

    public func commit() throws {
        let images = state.withLock { $0.values.map(\.image) }
        // An image closed since the list was taken is skipped: its close flushed it.
        for image in images { try image.whileOpen { try image.flush() } }
    }

    public func resize(dataBytes: UInt64) throws {
        throw ThinPoolError.invalidConfiguration("an RBD pool grows with its cluster (add OSDs, raise the pool's quota); 'thinfs pool resize' does not apply")
    }

    /// Commits, then ends the cluster session if no device is open (the store's close, after
    /// every layer closed). The pool is unusable afterwards.
    public func close() throws {
        try commit()
        if state.withLock({ $0.isEmpty }) { connection.shutdown() }
    }

    /// Runs `body` on image `id`: this process's handle if open (held open for the call: a
    /// device that closes meanwhile waits for it), else a read-only one for the call.
    private func withImage<T>(_ id: ThinDeviceID, _ body: (RBDImage) throws -> T) throws -> T {
        if let shared = state.withLock({ $0[id]?.image }), let result = try shared.whileOpen({ try body(shared) }) { return result }
        let image: RBDImage
        do {
            image = try RBDImage(connection: connection, name: imageName(id), readOnly: true)
        } catch Error.call(_, _, .noSuchFileOrDirectory) {
            throw ThinPoolError.message(.unknownDevice(id))
        }
        defer { image.close() }
        return try body(image)
    }

    /// The store's check at `thinfs init`: nothing under this prefix yet.
    public func checkUnused() throws {
        let names = try connection.imageNames().filter { $0.hasPrefix(configuration.prefix) }
        let tx = try transactionID()
        guard names.isEmpty, tx == 0 else {
            throw Error.prefixInUse(pool: configuration.pool, prefix: configuration.prefix, images: names.sorted(), transactionID: tx)
        }
    }
}

/// librados and librbd, which CRBD dlopens on first use so that processes that never touch an
/// RBD store (every `thinfs` command of a local store, the daemon of one) do not load them.
enum CephLibraries {
    /// Loads them (once per process; later calls return the first one's outcome).
    static func load() throws(RBDPool.Error) -> thinfs_rbd {
        var library: UnsafePointer<CChar>?
        var reason: UnsafePointer<CChar>?
        guard let table = thinfs_rbd_load(&library, &reason) else {
            throw .libraryUnavailable(library: library.map { String(cString: $0) } ?? "librbd.so.1",
                                      reason: reason.map { String(cString: $0) } ?? "unknown")
        }
        return table.pointee
    }
}

/// The loaded functions, for every call after a `RadosConnection` exists: its init is the only
/// way to a cluster handle, and it loads the libraries first (throwing
/// `RBDPool.Error.libraryUnavailable` if it cannot), so a call through here finds them loaded.
var ceph: thinfs_rbd {
    guard let table = try? CephLibraries.load() else {
        preconditionFailure("librados/librbd called before a RadosConnection loaded them")
    }
    return table
}

/// Throws `RBDPool.Error.call` for a negative return code (librados and librbd return -errno).
@discardableResult
func check<T: SignedInteger>(_ rc: T, _ operation: String, _ target: String) throws -> T {
    guard rc < 0 else { return rc }
    throw RBDPool.Error.call(operation: operation, target: target, errno: Errno(rawValue: Int32(truncatingIfNeeded: 0 - rc)))
}

/// A cluster connection and the pool's I/O context. Shut down by `RBDPool.close` once no device
/// is open, else when the last user (the pool, its images, their devices) lets go.
///
/// The explicit shutdown matters at exit: a process that exits with librados connected runs
/// Ceph's static destructors (exit's handlers) while librados's own threads still run, and may
/// abort. Waiting for the last reference is not enough, since any retained object (a closure,
/// a cache) keeps the connection alive to the end.
///
/// The shutdown frees what librados and librbd work with: a call on the handles in progress
/// (`withIO`, `withCluster`) holds `gate` for reading, so the shutdown waits for it; and an
/// open image (`RBDImage`: librbd keeps the I/O context and the cluster until its rbd_close) defers
/// it to the last image's close. A temporary handle (`RBDPool.withImage`) may be
/// open on another thread when the store closes the pool.
final class RadosConnection: @unchecked Sendable {
    /// librados's handles are thread-safe; `gate` only orders their use against `shutdown`.
    private struct Handles {
        let cluster: rados_t
        let io: rados_ioctx_t
    }
    /// Prefers readers, as RBDImage's: calls nest (an image opened inside `withObjectLock`).
    private let gate = ReadWriteLock(preferringWriters: false)
    /// Under `gate`; nil once shut down.
    private var handles: Handles?
    /// Images open on `io`, and whether a shutdown waits for the last of them to close.
    private let images = Mutex((open: 0, shutdownPending: false))
    /// The handles, for one call. Used after `shutdown` only by a bug of ours (a pool used after
    /// its store closed it), never because of anything the cluster sends: an assertion, not an error.
    private func withHandles<T>(_ body: (Handles) throws -> T) rethrows -> T {
        try gate.withReadLock { () throws -> T in
            guard let handles else {
                preconditionFailure("the cluster connection of pool \(pool) was used after RBDPool.close shut it down")
            }
            return try body(handles)
        }
    }
    /// Runs `body` with the pool's I/O context, which stays valid until it returns.
    func withIO<T>(_ body: (rados_ioctx_t) throws -> T) rethrows -> T { try withHandles { try body($0.io) } }
    /// Runs `body` with the cluster handle, which stays valid until it returns.
    func withCluster<T>(_ body: (rados_t) throws -> T) rethrows -> T { try withHandles { try body($0.cluster) } }
    let pool: String
    let instanceID: UInt64
    /// rbd.osd_timeout, for the errors that name it.
    let osdTimeout: UInt32

    init(conf: String?, clientID: String?, pool: String,
         osdTimeout: UInt32 = RBDPool.Configuration.defaultOSDTimeout, monTimeout: UInt32 = RBDPool.Configuration.defaultMonTimeout) throws {
        _ = try CephLibraries.load()
        var cluster: rados_t?
        let name = "client.\(clientID ?? "admin")"
        try check(ceph.rados_create2(&cluster, "ceph", name, 0), "rados_create2", name)
        guard let cluster else { throw RBDPool.Error.call(operation: "rados_create2", target: name, errno: .ioError) }
        var connected = false
        defer { if !connected { ceph.rados_shutdown(cluster) } }
        try check(ceph.rados_conf_read_file(cluster, conf), "rados_conf_read_file", conf ?? "the default ceph.conf")
        // A cluster that is down fails the connection, monitor commands and I/O after these
        // (rbd.mon_timeout, rbd.osd_timeout) instead of hanging: librados then completes the
        // op with -ETIMEDOUT, which the device reports as EIO.
        _ = ceph.rados_conf_set(cluster, "client_mount_timeout", "\(monTimeout)")
        _ = ceph.rados_conf_set(cluster, "rados_mon_op_timeout", "\(monTimeout)")
        _ = ceph.rados_conf_set(cluster, "rados_osd_op_timeout", "\(osdTimeout)")
        // BlockDevice.discard promises zeros where it unmapped; librbd by default skips the part
        // of a discard that does not cover whole objects (4 MiB), leaving the old bytes there.
        _ = ceph.rados_conf_set(cluster, "rbd_skip_partial_discard", "false")
        try check(ceph.rados_connect(cluster), "rados_connect", "the cluster of \(conf ?? "the default ceph.conf") as \(name)")
        var io: rados_ioctx_t?
        try check(ceph.rados_ioctx_create(cluster, pool, &io), "rados_ioctx_create", "pool \(pool)")
        connected = true
        self.handles = Handles(cluster: cluster, io: io!)
        self.pool = pool
        self.osdTimeout = osdTimeout
        self.instanceID = ceph.rados_get_instance_id(cluster)
    }

    deinit { shutdown() }

    /// Destroys the I/O context and disconnects (the monitor drops the session), once the calls
    /// in progress have returned; with images open, when the last of them closes. Idempotent.
    func shutdown() {
        gate.withWriteLock {
            guard let live = handles else { return }
            // Under the write side: an image opening counts itself under the read side.
            let waitForImages = images.withLock { state -> Bool in
                if state.open > 0 { state.shutdownPending = true }
                return state.open > 0
            }
            if waitForImages { return }
            handles = nil
            ceph.rados_ioctx_destroy(live.io)
            ceph.rados_shutdown(live.cluster)
        }
    }

    /// An image opened on `io` (RBDImage.init, inside `withIO`).
    func imageOpened() { images.withLock { $0.open += 1 } }

    /// An image closed (after its rbd_close); the last one does a shutdown that waited for it.
    func imageClosed() {
        let shutdownNow = images.withLock { state -> Bool in
            state.open -= 1
            return state.open == 0 && state.shutdownPending
        }
        if shutdownNow { shutdown() }
    }

    func imageNames() throws -> [String] {
        var max = 64
        while true {
            var specs = [rbd_image_spec_t](repeating: rbd_image_spec_t(), count: max)
            let rc = withIO { ceph.rbd_list2($0, &specs, &max) }
            if rc == -ERANGE { continue }
            try check(rc, "rbd_list2", "pool \(pool)")
            defer { ceph.rbd_image_spec_list_cleanup(&specs, max) }
            return specs.prefix(max).map { String(cString: $0.name) }
        }
    }

    // MARK: Images asked of RADOS
    //
    // Whether an image exists and who has it open are questions about two RADOS objects of
    // librbd's format 2 (the only format this pool makes): `rbd_id.<name>`, which holds the
    // image's id, and `rbd_header.<id>`, which every client with the image open watches. Asked
    // so, they cost a stat or a read and no rbd_open. A temporary read-only rbd_open for them
    // (ImageCtx built, its config copied, the header read, closed again) was the only librbd
    // call in progress in both cores of issue 16's crash of `thinfs serve` (SIGSEGV in the
    // ImageCtx constructor's md_config_t; librbd's io_context thread aborting).

    /// librbd's id object of image `name` (format 2).
    static func idObject(_ name: String) -> String { "rbd_id.\(name)" }
    /// librbd's header object of the image with id `id` (format 2).
    static func headerObject(id: String) -> String { "rbd_header.\(id)" }

    /// Whether image `name` exists: its id object does.
    func imageExists(_ name: String) throws -> Bool {
        let object = Self.idObject(name)
        var size: UInt64 = 0
        var mtime: time_t = 0
        let rc = withIO { ceph.rados_stat($0, object, &size, &mtime) }
        if rc == -ENOENT { return false }
        try check(rc, "rados_stat", "\(pool)/\(name) (object \(object))")
        return true
    }

    /// Image `name`'s id, from its id object: a Ceph-encoded string (a little-endian 32-bit
    /// length, then the bytes); nil if the image does not exist.
    func imageID(_ name: String) throws -> String? {
        let object = Self.idObject(name)
        var buffer = [UInt8](repeating: 0, count: 128)
        let n = buffer.withUnsafeMutableBytes { bytes in
            withIO { ceph.rados_read($0, object, bytes.baseAddress!.assumingMemoryBound(to: CChar.self), bytes.count, 0) }
        }
        if n == -ENOENT { return nil }
        try check(n, "rados_read", "\(pool)/\(name) (object \(object))")
        return try Self.decodeImageID(buffer.prefix(Int(n)), object: "\(pool)/\(object)")
    }

    /// An id object's bytes: length-prefixed, lower-case letters and digits (librbd's ids are
    /// hexadecimal).
    static func decodeImageID(_ bytes: ArraySlice<UInt8>, object: String) throws -> String {
        let bytes = Array(bytes)
        guard bytes.count >= 4 else { throw RBDPool.Error.malformedObject(object: object, reason: "\(bytes.count) bytes, less than a length") }
        let length = Int(bytes[0]) | Int(bytes[1]) << 8 | Int(bytes[2]) << 16 | Int(bytes[3]) << 24
        guard length > 0, length == bytes.count - 4 else {
            throw RBDPool.Error.malformedObject(object: object, reason: "an id of \(length) bytes in \(bytes.count - 4)")
        }
        let id = bytes[4...]
        guard id.allSatisfy({ (0x30...0x39).contains($0) || (0x61...0x7a).contains($0) }) else {
            throw RBDPool.Error.malformedObject(object: object, reason: "an id that is not lower-case letters and digits")
        }
        return String(decoding: id, as: UTF8.self)
    }

    /// The clients watching image `name` (librbd watches the header of an image it has open,
    /// as `rbd status` lists them); nil if the image does not exist (or went meanwhile).
    func imageWatchers(_ name: String) throws -> [RBDImage.Watcher]? {
        guard let id = try imageID(name) else { return nil }
        let header = Self.headerObject(id: id)
        var max = 16
        while true {
            var list = [obj_watch_t](repeating: obj_watch_t(), count: max)
            let rc = withIO { thinfs_rados_list_watchers($0, header, &list, &max) }
            if rc == -ENOENT { return nil }
            if rc == -ERANGE { continue }
            try check(rc, "list_watchers", "\(pool)/\(name) (object \(header))")
            return list.prefix(max).map { w in
                let address = withUnsafeBytes(of: w.addr) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                return RBDImage.Watcher(id: UInt64(bitPattern: w.watcher_id), address: address.isEmpty ? "?" : address)
            }
        }
    }

    func poolMetadata(_ key: String) throws -> String? {
        var length = 64
        while true {
            var buffer = [CChar](repeating: 0, count: length)
            let rc = withIO { ceph.rbd_pool_metadata_get($0, key, &buffer, &length) }
            if rc == -ENOENT { return nil }
            if rc == -ERANGE { continue }
            try check(rc, "rbd_pool_metadata_get", "pool \(pool) key \(key)")
            return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    func setPoolMetadata(_ key: String, _ value: String) throws {
        try check(withIO { ceph.rbd_pool_metadata_set($0, key, value) }, "rbd_pool_metadata_set", "pool \(pool) key \(key)")
    }

    /// The cluster's raw capacity and use, in bytes.
    func clusterUsage() throws -> (total: UInt64, used: UInt64) {
        var stat = rados_cluster_stat_t()
        try check(withCluster { ceph.rados_cluster_stat($0, &stat) }, "rados_cluster_stat", "pool \(pool)")
        return (stat.kb * 1024, stat.kb_used * 1024)
    }
}

/// One open image. librbd allows concurrent calls on a handle from many threads, but none
/// alongside or after its `rbd_close`, which frees the image (librbd's ImageCtx) before it
/// returns: a call that overlaps the close, or follows it, works on freed memory, and librbd's
/// io_context threads then abort the process ("terminate called after throwing an instance of
/// 'std::system_error' what(): Invalid argument", a destroyed mutex locked) or crash it with
/// SIGSEGV (issue 16: `thinfs serve` died so in CI's RBD end to end when a container's device
/// closed while the pool's commit flushed every open image). So every call on `handle` holds
/// `gate` for reading and `close` holds it for writing: a close waits for the calls in progress,
/// and a call after it fails with EBADF instead of reaching librbd.
final class RBDImage: @unchecked Sendable {
    let connection: RadosConnection
    let name: String
    /// Prefers readers: a call may hold it while it makes another (`whileOpen`), and that inner
    /// read must not queue behind a close waiting for the outer one (writer preference would).
    private let gate = ReadWriteLock(preferringWriters: false)
    /// Under `gate`.
    private var isClosed = false
    /// Only inside `withHandle` (under `gate`).
    private let handle: rbd_image_t
    var target: String { "\(connection.pool)/\(name)" }

    init(connection: RadosConnection, name: String, readOnly: Bool) throws {
        var image: rbd_image_t?
        // Counted inside the call, so that a shutdown cannot slip in between (it waits for this image's close).
        let rc = connection.withIO { io -> Int32 in
            let rc = readOnly ? ceph.rbd_open_read_only(io, name, &image, nil) : ceph.rbd_open(io, name, &image, nil)
            if rc == 0 { connection.imageOpened() }
            return rc
        }
        try check(rc, readOnly ? "rbd_open_read_only" : "rbd_open", "\(connection.pool)/\(name)")
        self.connection = connection
        self.name = name
        self.handle = image!
    }

    deinit { close() }

    /// Flushes and closes (releasing the exclusive lock), once the calls in progress have
    /// returned. Idempotent.
    func close() {
        let first = gate.withWriteLock { () -> Bool in
            guard !isClosed else { return false }
            isClosed = true
            _ = ceph.rbd_close(handle)
            return true
        }
        if first { connection.imageClosed() }
    }

    /// Runs `body` on the handle, which stays open until it returns; throws EBADF, naming
    /// `operation`, if the image is closed.
    @discardableResult
    func withHandle<T>(_ operation: String, _ body: (rbd_image_t) throws -> T) throws -> T {
        try gate.withReadLock { () throws -> T in
            guard !isClosed else { throw RBDPool.Error.call(operation: operation, target: target, errno: .badFileDescriptor) }
            return try body(handle)
        }
    }

    /// Runs `body` with the image held open, or returns nil without running it if the image is
    /// closed (a shared handle whose last device closed since it was looked up).
    func whileOpen<T>(_ body: () throws -> T) throws -> T? {
        try gate.withReadLock { () throws -> T? in isClosed ? nil : try body() }
    }

    func size() throws -> UInt64 {
        var size: UInt64 = 0
        try withHandle("rbd_get_size") { try check(ceph.rbd_get_size($0, &size), "rbd_get_size", target) }
        return size
    }

    func resize(to size: UInt64) throws {
        try withHandle("rbd_resize") { try check(ceph.rbd_resize($0, size), "rbd_resize", target) }
    }

    func flush() throws { try withHandle("rbd_flush") { try check(ceph.rbd_flush($0), "rbd_flush", target) } }

    /// Takes the exclusive lock for this handle; refuses, naming the holder, when another
    /// client holds it explicitly (librbd's EROFS) or will not give it up (EBUSY).
    func acquireExclusiveLock() throws {
        let rc = try withHandle("rbd_lock_acquire") { ceph.rbd_lock_acquire($0, RBD_LOCK_MODE_EXCLUSIVE) }
        if rc == -EROFS || rc == -EBUSY {
            throw RBDPool.Error.lockedByAnotherClient(image: target, holders: (try? lockOwners()) ?? [])
        }
        try check(rc, "rbd_lock_acquire", target)
    }

    func lockOwners() throws -> [String] {
        try withHandle("rbd_lock_get_owners") { handle in
            var mode = RBD_LOCK_MODE_EXCLUSIVE
            var max = 8
            var owners = [UnsafeMutablePointer<CChar>?](repeating: nil, count: max)
            let rc = ceph.rbd_lock_get_owners(handle, &mode, &owners, &max)
            if rc == -ENOENT { return [] }
            try check(rc, "rbd_lock_get_owners", target)
            defer { ceph.rbd_lock_get_owners_cleanup(&owners, max) }
            return owners.prefix(max).compactMap { $0.map { String(cString: $0) } }
        }
    }

    /// A client watching an image's header (RadosConnection.imageWatchers): `id` is its
    /// client (global) id, client.<id>.
    struct Watcher { var id: UInt64; var address: String }

    func snapshots() throws -> [String] {
        try withHandle("rbd_snap_list") { handle in
            var max: Int32 = 16
            while true {
                var snaps = [rbd_snap_info_t](repeating: rbd_snap_info_t(), count: Int(max) + 1)
                let rc = ceph.rbd_snap_list(handle, &snaps, &max)
                if rc == -ERANGE { continue }
                let n = try check(rc, "rbd_snap_list", target)
                defer { ceph.rbd_snap_list_end(&snaps) }
                return snaps.prefix(Int(n)).map { String(cString: $0.name) }
            }
        }
    }

    /// Snapshot `snap`, protected (what a v1 clone reads through); one that exists (left by an
    /// interrupted create_snap of the same child, or published before) is reused.
    func createProtectedSnapshot(_ snap: String) throws {
        try withHandle("rbd_snap_create") { handle in
            var exists = false
            try check(ceph.rbd_snap_exists(handle, snap, &exists), "rbd_snap_exists", "\(target)@\(snap)")
            if !exists { try check(ceph.rbd_snap_create(handle, snap), "rbd_snap_create", "\(target)@\(snap)") }
            var protected: Int32 = 0
            try check(ceph.rbd_snap_is_protected(handle, snap, &protected), "rbd_snap_is_protected", "\(target)@\(snap)")
            if protected == 0 { try check(ceph.rbd_snap_protect(handle, snap), "rbd_snap_protect", "\(target)@\(snap)") }
        }
    }

    /// The clones of snapshot `snap` (image names).
    func children(of snap: String) throws -> [String] {
        try withHandle("rbd_list_children3") { handle in
            try check(ceph.rbd_snap_set(handle, snap), "rbd_snap_set", "\(target)@\(snap)")
            defer { _ = ceph.rbd_snap_set(handle, nil) }
            var max = 16
            while true {
                var specs = [rbd_linked_image_spec_t](repeating: rbd_linked_image_spec_t(), count: max)
                let rc = ceph.rbd_list_children3(handle, &specs, &max)
                if rc == -ERANGE { continue }
                try check(rc, "rbd_list_children3", "\(target)@\(snap)")
                defer { ceph.rbd_linked_image_spec_list_cleanup(&specs, max) }
                return specs.prefix(max).map { String(cString: $0.image_name) }
            }
        }
    }

    func removeSnapshot(_ snap: String) throws {
        try withHandle("rbd_snap_remove") { handle in
            var protected: Int32 = 0
            try check(ceph.rbd_snap_is_protected(handle, snap, &protected), "rbd_snap_is_protected", "\(target)@\(snap)")
            if protected != 0 { try check(ceph.rbd_snap_unprotect(handle, snap), "rbd_snap_unprotect", "\(target)@\(snap)") }
            try check(ceph.rbd_snap_remove(handle, snap), "rbd_snap_remove", "\(target)@\(snap)")
        }
    }

    /// The image and snapshot this clone reads through, or nil for an image that is no clone.
    func parent() throws -> (image: String, snapshot: String)? {
        try withHandle("rbd_get_parent") { handle in
            var image = rbd_linked_image_spec_t()
            var snap = rbd_snap_spec_t()
            let rc = ceph.rbd_get_parent(handle, &image, &snap)
            if rc == -ENOENT { return nil }
            try check(rc, "rbd_get_parent", target)
            defer { ceph.rbd_linked_image_spec_cleanup(&image); ceph.rbd_snap_spec_cleanup(&snap) }
            return (String(cString: image.image_name), String(cString: snap.name))
        }
    }

    func createTimestamp() throws -> Int {
        var ts = timespec()
        try withHandle("rbd_get_create_timestamp") { try check(ceph.rbd_get_create_timestamp($0, &ts), "rbd_get_create_timestamp", target) }
        return ts.tv_sec
    }

    /// The allocated extents, merged where they touch.
    func allocatedExtents(includeParent: Bool) throws -> [(offset: UInt64, length: UInt64)] {
        final class Box { var extents: [(offset: UInt64, length: UInt64)] = [] }
        let box = Box()
        try withHandle("rbd_diff_iterate2") { handle in
            var size: UInt64 = 0
            try check(ceph.rbd_get_size(handle, &size), "rbd_get_size", target)
            let rc = withExtendedLifetime(box) {
                ceph.rbd_diff_iterate2(handle, nil, 0, size, includeParent ? 1 : 0, 0, { offset, length, exists, arg in
                    let box = Unmanaged<Box>.fromOpaque(arg!).takeUnretainedValue()
                    guard exists != 0 else { return 0 }
                    if let last = box.extents.last, last.offset + last.length == offset {
                        box.extents[box.extents.count - 1].length += UInt64(length)
                    } else {
                        box.extents.append((offset, UInt64(length)))
                    }
                    return 0
                }, Unmanaged.passUnretained(box).toOpaque())
            }
            try check(rc, "rbd_diff_iterate2", target)
        }
        return box.extents
    }

    /// Runs one AIO request and waits for it, the image held open throughout. Requests from
    /// several threads (FUSE's workers) are in flight together; librbd splits each into its
    /// objects' RADOS ops itself.
    func aio(_ operation: String, offset: UInt64, length: Int, _ submit: (rbd_image_t, rbd_completion_t) -> Int32) throws -> Int {
        let where_ = "\(target) at \(offset)+\(length)"
        do {
            return try withHandle(operation) { handle in
                var completion: rbd_completion_t?
                try check(ceph.rbd_aio_create_completion(nil, nil, &completion), "rbd_aio_create_completion", target)
                defer { ceph.rbd_aio_release(completion) }
                try check(submit(handle, completion!), operation, where_)
                // Bounded: librados completes every op it sent with -ETIMEDOUT after rbd.osd_timeout.
                _ = ceph.rbd_aio_wait_for_complete(completion)
                let rv = ceph.rbd_aio_get_return_value(completion)
                if rv < 0 { throw deviceError(operation, where_, Errno(rawValue: Int32(-rv))) }
                return rv
            }
        } catch let e as RBDPool.Error {
            throw deviceError(operation, where_, e.errno)
        }
    }

    /// A failed request as the Volume (and through it the application) sees it. A request the
    /// cluster did not answer within rbd.osd_timeout (librados's ETIMEDOUT) is EIO, as from a
    /// disk that stopped answering: what a write or fsync may fail with, where ETIMEDOUT would
    /// read as a network call's; the message keeps the cause.
    func deviceError(_ operation: String, _ where_: String, _ e: Errno) -> ThinPoolError {
        guard e == .timedOut else { return .io(operation: operation, path: where_, errno: e) }
        return .io(operation: "\(operation): no answer from the cluster within rbd.osd_timeout (\(connection.osdTimeout) s)", path: where_, errno: .ioError)
    }
}

/// An open RBD image as a block device: what the Volume reads and writes ext4 through.
final class RBDBlockDevice: BlockDevice, @unchecked Sendable {
    let image: RBDImage
    let size: UInt64
    private let closed = Atomic(false)
    private let onClose: @Sendable () -> Void
    private let poolFreeSpace: @Sendable () throws -> UInt64?

    init(image: RBDImage, size: UInt64, freeSpace: @escaping @Sendable () throws -> UInt64?, onClose: @escaping @Sendable () -> Void) {
        self.image = image
        self.size = size
        self.poolFreeSpace = freeSpace
        self.onClose = onClose
    }

    deinit { close() }

    func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        onClose()
    }

    private func checkOpen(_ operation: String, _ offset: UInt64, _ length: Int) throws {
        if closed.load(ordering: .relaxed) {
            throw ThinPoolError.io(operation: operation, path: image.target, errno: .badFileDescriptor)
        }
        if offset > size || UInt64(length) > size - offset {
            throw ThinPoolError.io(operation: "\(operation) at \(offset)+\(length) beyond the device's \(size) bytes", path: image.target, errno: .invalidArgument)
        }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try BlockDeviceError.wrap(.read, image.target, offset: offset, length: buffer.count) {
            try checkOpen("read", offset, buffer.count)
            guard buffer.count > 0 else { return }
            let n = try image.aio("rbd_aio_read", offset: offset, length: buffer.count) { h, c in
                ceph.rbd_aio_read(h, offset, buffer.count, buffer.baseAddress!.assumingMemoryBound(to: CChar.self), c)
            }
            // Past the image's end (a smaller image than the device asked for): zeros.
            if n < buffer.count { UnsafeMutableRawBufferPointer(rebasing: buffer[n...]).initializeMemory(as: UInt8.self, repeating: 0) }
        }
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try BlockDeviceError.wrap(.write, image.target, offset: offset, length: buffer.count) {
            try checkOpen("write", offset, buffer.count)
            guard buffer.count > 0 else { return }
            _ = try image.aio("rbd_aio_write", offset: offset, length: buffer.count) { h, c in
                ceph.rbd_aio_write(h, offset, buffer.count, buffer.baseAddress!.assumingMemoryBound(to: CChar.self), c)
            }
        }
    }

    func discard(offset: UInt64, length: UInt64) throws {
        try BlockDeviceError.wrap(.discard, image.target, offset: offset, length: Int(clamping: length)) {
            try checkOpen("discard", offset, 0)
            let length = min(length, size - offset)
            guard length > 0 else { return }
            _ = try image.aio("rbd_aio_discard", offset: offset, length: Int(length)) { h, c in
                ceph.rbd_aio_discard(h, offset, length, c)
            }
        }
    }

    /// A real flush: librbd's cache (if on) written back and the OSDs' acks for every write.
    func flush() throws {
        try BlockDeviceError.wrap(.flush, image.target) {
            try checkOpen("flush", 0, 0)
            _ = try image.aio("rbd_aio_flush", offset: 0, length: 0) { h, c in ceph.rbd_aio_flush(h, c) }
        }
    }

    func freeSpace() throws -> PoolFreeSpace? {
        guard let free = try BlockDeviceError.wrap(.freeSpace, image.target, { try poolFreeSpace() }) else { return nil }
        return PoolFreeSpace(free: free, forFileData: free)
    }
}
