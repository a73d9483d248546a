import CRBD
import Foundation
import Logging
import PersistentData
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Sharing one RBD pool between hosts (issue 16): the layer catalogue.
///
/// Each host has its own store (its own root, SQLite and `rbd.prefix`, so device ids never
/// collide); stores given the same `rbd.catalogue=NAME` share image layers and can hand
/// containers over through one RADOS object, NAME, in the pool. Its omap is the shared truth:
///
///     layer.<chain id>            an image layer: its image, the store (prefix) that imported it,
///                                 size, filesystem uuid, parent chain id (SharedLayer, JSON)
///     container.<prefix>/<layer>  a container layer and the store that writes it (SharedContainer)
///     image.<image>               what an image is in the catalogue, and which store owns it
///     user.<image>/<prefix>       another store that reads through this image (its hostname)
///     alias.<prefix>/<device id>  a store's device id that names another store's image
///
/// ## Why RADOS omap on one object, not image metadata
/// A host that joins lists everything with one omap read (`rados listomapvals NAME` shows the
/// same), where image metadata would mean opening every image. Every change to the catalogue
/// is one atomic omap write op, made under the object's cls_lock (`rados_lock_exclusive`, 30 s,
/// so a dead host's lock expires): "check for users, then unpublish" and "check the layer,
/// then record a user" cannot interleave between hosts.
///
/// ## Adoption
/// `thinfs image import` on host B looks each layer's chain id up here before unpacking. A
/// published layer is adopted: B's device id becomes an alias of A's image (no new image, no
/// data written), and B records itself as a user. B's containers of that layer are clones of
/// the layer's `thinfs-shared` snapshot, made (and protected) by A when it published the layer,
/// so B never opens A's image for writing. A's later delete of the layer is refused while
/// another store uses it; B's delete of its alias drops the alias and its user record only.
///
/// ## Takeover
/// A container's image is written by one host at a time: the writer holds librbd's exclusive
/// lock. `takeOver` moves a container to this store: it opens the image and takes the lock
/// first (refused, naming the holder, while the writer lives; possible once Ceph has expired a
/// dead writer's watch, `osd client watch timeout`), then records the new owner. The old owner's
/// store then refuses to open or delete that image.
extension RBDPool {
    public static let sharedSnapshot = "thinfs-shared"

    /// An image layer in the catalogue.
    public struct SharedLayer: Codable, Equatable, Sendable {
        public var chainID: String
        public var image: String
        /// The rbd.prefix of the store that imported (and owns) it.
        public var host: String
        public var hostname: String
        public var size: UInt64
        public var uuid: String
        public var parent: String?
        /// The other stores (prefix: hostname) that use it: kept as their own keys, filled in by
        /// `sharedLayers`.
        public var users: [String: String]? = nil
    }

    /// A container layer in the catalogue, and the store that writes it.
    public struct SharedContainer: Codable, Equatable, Sendable {
        public var layer: String
        public var image: String
        public var host: String
        public var hostname: String
        public var size: UInt64
        public var uuid: String
        public var parent: String
    }

    /// What an image is in the catalogue.
    struct ImageRecord: Codable, Equatable {
        enum Kind: String, Codable { case layer, container }
        var kind: Kind
        /// The chain id (a layer) or the `container.` key's tail (a container).
        var key: String
        var host: String
    }

    public enum CatalogueError: Swift.Error, CustomStringConvertible, Sendable {
        case notConfigured(pool: String)
        case unknownLayer(catalogue: String, chainID: String)
        case unknownContainer(catalogue: String, host: String, layer: String)
        case inUse(image: String, users: [String])
        case ownedByAnotherStore(image: String, owner: String)
        case corrupt(catalogue: String, key: String, reason: String)
        case lockTimeout(catalogue: String)
        /// `forgetStore`: the catalogue has no record of that store.
        case unknownStore(catalogue: String, store: String)
        /// `forgetStore` of this store itself.
        case cannotForgetSelf(store: String)
        /// `forgetStore`: a client still watches one of that store's images (its daemon lives).
        case storeStillActive(store: String, image: String, holders: [String])

        public var description: String {
            switch self {
            case .notConfigured(let pool):
                "the store's rbd pool \(pool) has no layer catalogue: give every sharing store the same rbd.catalogue=NAME at 'thinfs init'"
            case .unknownLayer(let c, let chain): "layer catalogue \(c) has no image layer \(chain)"
            case .unknownContainer(let c, let host, let layer): "layer catalogue \(c) has no container \(layer) of store \(host)"
            case .inUse(let image, let users):
                "rbd image \(image) is a shared layer still used by \(users.joined(separator: ", ")): it is kept; remove their layers of it first"
            case .ownedByAnotherStore(let image, let owner):
                "rbd image \(image) now belongs to store \(owner) (taken over): this store no longer writes or deletes it"
            case .corrupt(let c, let key, let why): "layer catalogue \(c): key \(key): \(why)"
            case .lockTimeout(let c): "layer catalogue \(c): its lock stayed held by another client for 40 s"
            case .unknownStore(let c, let store): "layer catalogue \(c) has no record of store \(store) (its rbd.prefix)"
            case .cannotForgetSelf(let store): "store \(store) is this store: 'cluster forget' is for another store that is gone for good"
            case .storeStillActive(let store, let image, let holders):
                "store \(store) is not gone: rbd image \(image) is still held by \(holders.joined(separator: ", ")); stop that host's daemon (a dead one's hold expires after the OSDs' watch timeout), then forget it"
            }
        }

        public var errno: Errno {
            switch self {
            case .notConfigured, .corrupt: .invalidArgument
            case .unknownLayer, .unknownContainer: .noSuchFileOrDirectory
            case .inUse, .lockTimeout, .storeStillActive: .resourceBusy
            case .ownedByAnotherStore: .readOnlyFileSystem
            case .unknownStore: .noSuchFileOrDirectory
            case .cannotForgetSelf: .invalidArgument
            }
        }
    }

    var catalogue: String? { configuration.catalogue }
    var host: String { configuration.prefix }
    static var hostname: String { ProcessInfo.processInfo.hostName }

    func requireCatalogue() throws -> String {
        guard let catalogue else { throw CatalogueError.notConfigured(pool: configuration.pool) }
        return catalogue
    }

    static func aliasKey(host: String, _ id: ThinDeviceID) -> String { "alias.\(host)/\(id)" }

    /// This store's aliases, as the catalogue has them.
    func loadAliases() throws -> [ThinDeviceID: String] {
        guard let catalogue else { return [:] }
        let prefix = "alias.\(host)/"
        var result: [ThinDeviceID: String] = [:]
        for (key, value) in try connection.omapValues(catalogue, prefix: prefix) {
            guard let id = ThinDeviceID(key.dropFirst(prefix.count)) else {
                throw CatalogueError.corrupt(catalogue: catalogue, key: key, reason: "not a device id")
            }
            result[id] = String(decoding: value, as: UTF8.self)
        }
        return result
    }

    private func decode<T: Decodable>(_ type: T.Type, _ data: Data, key: String) throws -> T {
        do { return try JSONDecoder().decode(type, from: data) } catch {
            throw CatalogueError.corrupt(catalogue: catalogue ?? "?", key: key, reason: "\(error)")
        }
    }

    private func encode<T: Encodable>(_ value: T) -> Data { (try? JSONEncoder().encode(value)) ?? Data() }

    // MARK: Reading

    /// Every image layer in the catalogue, with its users: what a host that joins finds.
    public func sharedLayers() throws -> [SharedLayer] {
        let catalogue = try requireCatalogue()
        let all = try connection.omapValues(catalogue, prefix: "")
        // user.<image>/<prefix>: neither an image name nor a prefix holds a '/'.
        var users: [String: [String: String]] = [:]
        for (key, value) in all where key.hasPrefix("user.") {
            guard let slash = key.firstIndex(of: "/") else { continue }
            let image = String(key[key.index(key.startIndex, offsetBy: 5)..<slash])
            users[image, default: [:]][String(key[key.index(after: slash)...])] = String(decoding: value, as: UTF8.self)
        }
        return try all.filter { $0.key.hasPrefix("layer.") }.sorted { $0.key < $1.key }.map { key, value in
            var layer = try decode(SharedLayer.self, value, key: key)
            layer.users = users[layer.image] ?? [:]
            return layer
        }
    }

    public func sharedLayer(_ chainID: String) throws -> SharedLayer? {
        let catalogue = try requireCatalogue()
        guard let value = try connection.omapValues(catalogue, keys: ["layer.\(chainID)"])["layer.\(chainID)"] else { return nil }
        return try decode(SharedLayer.self, value, key: "layer.\(chainID)")
    }

    public func sharedContainers() throws -> [SharedContainer] {
        let catalogue = try requireCatalogue()
        return try connection.omapValues(catalogue, prefix: "container.").sorted { $0.key < $1.key }.map { key, value in
            try decode(SharedContainer.self, value, key: key)
        }
    }

    func imageRecord(_ image: String) throws -> ImageRecord? {
        guard let catalogue else { return nil }
        let key = "image.\(image)"
        return try connection.omapValues(catalogue, keys: [key])[key].map { try decode(ImageRecord.self, $0, key: key) }
    }

    /// Refuses `image` if the catalogue gives it to another store (a container taken over).
    func checkOwned(_ image: String) throws {
        if let record = try imageRecord(image), record.host != host {
            throw CatalogueError.ownedByAnotherStore(image: "\(configuration.pool)/\(image)", owner: record.host)
        }
    }

    // MARK: Publishing

    /// Publishes this store's complete image layer `id` as `chainID`: snapshots and protects
    /// it (`thinfs-shared`, what other stores clone), then records it. A layer another store
    /// published first stays theirs; this store's copy stays its own. Returns whether published.
    @discardableResult
    public func publishLayer(_ id: ThinDeviceID, chainID: String, size: UInt64, uuid: String, parent: String?) throws -> Bool {
        let catalogue = try requireCatalogue()
        let name = imageName(id)
        guard deviceID(ofImage: name) == id else { return false }   // an alias: already someone's
        return try connection.withObjectLock(catalogue) {
            if try sharedLayer(chainID) != nil { return false }
            let image = try RBDImage(connection: connection, name: name, readOnly: false)
            defer { image.close() }
            try image.createProtectedSnapshot(Self.sharedSnapshot)
            let layer = SharedLayer(chainID: chainID, image: name, host: host, hostname: Self.hostname, size: size, uuid: uuid, parent: parent)
            try connection.omapUpdate(catalogue, set: [
                "layer.\(chainID)": encode(layer),
                "image.\(name)": encode(ImageRecord(kind: .layer, key: chainID, host: host)),
            ])
            logger.info("published image layer", metadata: ["layer": "\(chainID)", "rbd.image": "\(name)", "rbd.catalogue": "\(catalogue)"])
            return true
        }
    }

    /// Records this store's container layer `layer` (device `id`) and that this store writes it.
    public func publishContainer(_ id: ThinDeviceID, layer: String, size: UInt64, uuid: String, parent: String) throws {
        let catalogue = try requireCatalogue()
        let name = imageName(id)
        let key = "\(host)/\(layer)"
        let record = SharedContainer(layer: layer, image: name, host: host, hostname: Self.hostname, size: size, uuid: uuid, parent: parent)
        try connection.withObjectLock(catalogue) {
            try connection.omapUpdate(catalogue, set: [
                "container.\(key)": encode(record),
                "image.\(name)": encode(ImageRecord(kind: .container, key: key, host: host)),
            ])
        }
    }

    // MARK: Adopting

    /// Makes device `id` of this store an alias of the published layer `chainID` and records
    /// this store as its user. Nothing is written to any image.
    public func adoptLayer(_ chainID: String, as id: ThinDeviceID) throws -> SharedLayer {
        let catalogue = try requireCatalogue()
        return try connection.withObjectLock(catalogue) {
            guard let layer = try sharedLayer(chainID) else { throw CatalogueError.unknownLayer(catalogue: catalogue, chainID: chainID) }
            guard try connection.imageExists(layer.image) else {
                throw CatalogueError.corrupt(catalogue: catalogue, key: "layer.\(chainID)", reason: "its image \(layer.image) does not exist")
            }
            try connection.omapUpdate(catalogue, set: [
                Self.aliasKey(host: host, id): Data(layer.image.utf8),
                "user.\(layer.image)/\(host)": Data(Self.hostname.utf8),
            ])
            aliases.withLock { $0[id] = layer.image }
            logger.info("adopted a shared image layer", metadata: ["layer": "\(chainID)", "rbd.image": "\(layer.image)", "thin.id": "\(id)"])
            return layer
        }
    }

    /// Moves container `layer` of store `from` to this store as device `id`: takes the image's
    /// exclusive lock first (refused, naming the holder, while its writer lives), then records
    /// this store as the writer. The caller keeps the returned device open to keep the lock.
    public func takeOver(container layer: String, from: String, as id: ThinDeviceID) throws -> (SharedContainer, BlockDevice) {
        let catalogue = try requireCatalogue()
        let key = "container.\(from)/\(layer)"
        guard let value = try connection.omapValues(catalogue, keys: [key])[key] else {
            throw CatalogueError.unknownContainer(catalogue: catalogue, host: from, layer: layer)
        }
        var record = try decode(SharedContainer.self, value, key: key)
        // The lock first: while the writer lives, nothing in the catalogue changes.
        let image = try RBDImage(connection: connection, name: record.image, readOnly: false)
        do { try image.acquireExclusiveLock() } catch {
            image.close()
            throw error
        }
        do {
            try connection.withObjectLock(catalogue) {
                record.host = host
                record.hostname = Self.hostname
                try connection.omapUpdate(catalogue, set: [
                    "container.\(host)/\(layer)": encode(record),
                    "image.\(record.image)": encode(ImageRecord(kind: .container, key: "\(host)/\(layer)", host: host)),
                    Self.aliasKey(host: host, id): Data(record.image.utf8),
                ], remove: [key])
            }
        } catch {
            image.close()
            throw error
        }
        aliases.withLock { $0[id] = record.image }
        let device = try adoptOpen(id, image: image)
        logger.info("took over a container", metadata: ["layer": "\(layer)", "from": "\(from)", "rbd.image": "\(record.image)", "thin.id": "\(id)"])
        return (record, device)
    }

    // MARK: Deleting

    /// Refuses the delete of device `id` if the catalogue keeps its image: a published layer
    /// other stores use, or an image another store took over. The store asks before it journals
    /// the delete, so a refusal leaves nothing to recover.
    public func checkDeletable(_ id: ThinDeviceID) throws {
        guard let catalogue else { return }
        let name = imageName(id)
        guard let record = try imageRecord(name) else { return }
        if deviceID(ofImage: name) != id, record.host != host { return }   // an alias: only the alias goes
        if record.host != host { throw CatalogueError.ownedByAnotherStore(image: "\(configuration.pool)/\(name)", owner: record.host) }
        let users = try connection.omapValues(catalogue, prefix: "user.\(name)/").map { key, value in
            "store \(key.dropFirst("user.\(name)/".count)) on \(String(decoding: value, as: UTF8.self))"
        }
        if !users.isEmpty { throw CatalogueError.inUse(image: "\(configuration.pool)/\(name)", users: users.sorted()) }
    }

    /// Before `delete` of image `name` (device `id`): an alias is dropped from the catalogue
    /// and its image left alone (returns false), unless this store owns it (a container it took
    /// over); a published image with users elsewhere is refused; an owned one is unpublished.
    /// Returns whether the image itself is to be removed.
    func unpublishForDelete(_ id: ThinDeviceID, image name: String) throws -> Bool {
        guard let catalogue else { return true }
        return try connection.withObjectLock(catalogue) {
            let record = try imageRecord(name)
            let isAlias = deviceID(ofImage: name) != id
            if isAlias, record?.host != host {
                try connection.omapUpdate(catalogue, remove: [Self.aliasKey(host: host, id), "user.\(name)/\(host)"])
                aliases.withLock { $0[id] = nil }
                return false
            }
            guard let record else { return true }
            if record.host != host { throw CatalogueError.ownedByAnotherStore(image: "\(configuration.pool)/\(name)", owner: record.host) }
            let users = try connection.omapValues(catalogue, prefix: "user.\(name)/").map { key, value in
                "store \(key.dropFirst("user.\(name)/".count)) on \(String(decoding: value, as: UTF8.self))"
            }
            if !users.isEmpty { throw CatalogueError.inUse(image: "\(configuration.pool)/\(name)", users: users.sorted()) }
            var remove = ["image.\(name)", record.kind == .layer ? "layer.\(record.key)" : "container.\(record.key)"]
            if isAlias { remove.append(Self.aliasKey(host: host, id)) }
            try connection.omapUpdate(catalogue, remove: remove)
            if isAlias { aliases.withLock { $0[id] = nil } }
            return true
        }
    }
}

// MARK: Forgetting a departed store

extension RBDPool {
    /// What `forgetStore` dropped, and what it kept.
    public struct ForgottenStore: Codable, Equatable, Sendable {
        public var store: String
        /// The catalogue keys removed: its user records and aliases.
        public var removed: [String]
        /// Image layers it published (chain ids): other stores may read through them, so they stay.
        public var keptLayers: [String]
        /// Its containers (layer ids): another store may take them over (`thinfs cluster take-over`).
        public var keptContainers: [String]
    }

    /// Drops the catalogue records of store `store` (an rbd.prefix), a host gone for good: its
    /// `user.` records, which keep the owners of the layers it read from deleting them, and its
    /// `alias.` records. Its published layers and its containers stay (others read the first,
    /// and may take the second over). Refused, naming the holder, while any client watches one
    /// of its images (its daemon has it open, or died less than the OSDs' watch timeout ago;
    /// an exclusive lock's holder always watches). A store with nothing open holds nothing to
    /// see: the caller vouches that it is gone.
    public func forgetStore(_ store: String) throws -> ForgottenStore {
        let catalogue = try requireCatalogue()
        guard store != host else { throw CatalogueError.cannotForgetSelf(store: store) }
        return try connection.withObjectLock(catalogue) {
            let all = try connection.omapValues(catalogue, prefix: "")
            // user.<image>/<prefix>: neither holds a '/'.
            let users = all.keys.filter { $0.hasPrefix("user.") && $0.split(separator: "/", maxSplits: 1).last.map(String.init) == store }
            let aliases = all.keys.filter { $0.hasPrefix("alias.\(store)/") }
            var layers: [String] = [], containers: [String] = []
            var images: Set<String> = []
            for (key, value) in all {
                if key.hasPrefix("layer.") {
                    let layer = try decode(SharedLayer.self, value, key: key)
                    if layer.host == store { layers.append(layer.chainID); images.insert(layer.image) }
                } else if key.hasPrefix("container.") {
                    let container = try decode(SharedContainer.self, value, key: key)
                    if container.host == store { containers.append(container.layer); images.insert(container.image) }
                }
            }
            guard !users.isEmpty || !aliases.isEmpty || !layers.isEmpty || !containers.isEmpty else {
                throw CatalogueError.unknownStore(catalogue: catalogue, store: store)
            }
            // Its own devices (<prefix><id>, and <prefix>deleted-... kept for their clones) too:
            // a live daemon of that store has at least one of these open.
            for name in try connection.imageNames() where name.hasPrefix(store) {
                let rest = name.dropFirst(store.count)
                if rest.hasPrefix("deleted-") || (!rest.isEmpty && rest.allSatisfy { $0.isASCII && $0.isNumber }) { images.insert(name) }
            }
            for name in images.sorted() {
                // Watchers, not lock owners (librbd lists those only on a handle open for
                // writing): a client holding the exclusive lock watches the image too.
                guard let watchers = try connection.imageWatchers(name) else { continue }
                let ours = connection.instanceID
                let holders = watchers.filter { $0.id != ours }.map { "client.\($0.id) at \($0.address)" }
                if !holders.isEmpty {
                    throw CatalogueError.storeStillActive(store: store, image: "\(configuration.pool)/\(name)", holders: holders)
                }
            }
            let removed = (users + aliases).sorted()
            if !removed.isEmpty { try connection.omapUpdate(catalogue, remove: removed) }
            logger.notice("forgot a departed store", metadata: ["store": "\(store)", "rbd.catalogue": "\(catalogue)", "removed": "\(removed.count)"])
            return ForgottenStore(store: store, removed: removed, keptLayers: layers.sorted(), keptContainers: containers.sorted())
        }
    }
}

// MARK: RADOS omap and object locks

extension RadosConnection {
    /// The omap of `object` whose keys start with `prefix`; empty if the object does not exist.
    func omapValues(_ object: String, prefix: String) throws -> [String: Data] {
        var result: [String: Data] = [:]
        var after = ""
        while true {
            let op = ceph.rados_create_read_op()
            defer { ceph.rados_release_read_op(op) }
            var iterator: rados_omap_iter_t?
            var more: UInt8 = 0
            var rv: Int32 = 0
            ceph.rados_read_op_omap_get_vals2(op, after, prefix, 512, &iterator, &more, &rv)
            let rc = withIO { ceph.rados_read_op_operate(op, $0, object, 0) }
            if rc == -ENOENT { return result }
            try check(rc, "rados_read_op_operate (omap)", "\(pool)/\(object)")
            try check(rv, "rados_read_op_omap_get_vals2", "\(pool)/\(object)")
            defer { ceph.rados_omap_get_end(iterator) }
            var last: String?
            while true {
                var key: UnsafeMutablePointer<CChar>?, value: UnsafeMutablePointer<CChar>?
                var keyLength = 0, valueLength = 0
                try check(ceph.rados_omap_get_next2(iterator, &key, &value, &keyLength, &valueLength), "rados_omap_get_next2", "\(pool)/\(object)")
                guard let key else { break }
                let k = String(decoding: UnsafeRawBufferPointer(start: key, count: keyLength), as: UTF8.self)
                result[k] = value.map { Data(bytes: $0, count: valueLength) } ?? Data()
                last = k
            }
            guard more != 0, let last else { return result }
            after = last
        }
    }

    /// The values of `keys` in `object`'s omap that exist.
    func omapValues(_ object: String, keys: [String]) throws -> [String: Data] {
        var result: [String: Data] = [:]
        for key in keys {
            // A prefix read of the key itself: exact matches only are kept.
            if let v = try omapValues(object, prefix: key)[key] { result[key] = v }
        }
        return result
    }

    /// Sets and removes omap keys of `object` in one atomic write op, creating it if needed.
    func omapUpdate(_ object: String, set: [String: Data] = [:], remove: [String] = []) throws {
        let op = ceph.rados_create_write_op()
        defer { ceph.rados_release_write_op(op) }
        ceph.rados_write_op_create(op, LIBRADOS_CREATE_IDEMPOTENT, nil)
        let keys = Array(set.keys), values = keys.map { set[$0]! }
        var keyPointers = keys.map { UnsafePointer(strdup($0)) }
        var valuePointers = values.map { v -> UnsafePointer<CChar>? in
            let p = UnsafeMutablePointer<CChar>.allocate(capacity: max(v.count, 1))
            v.withUnsafeBytes { raw in if let b = raw.baseAddress { p.update(from: b.assumingMemoryBound(to: CChar.self), count: v.count) } }
            return UnsafePointer(p)
        }
        var removePointers = remove.map { UnsafePointer(strdup($0)) }
        defer {
            for p in keyPointers { free(UnsafeMutablePointer(mutating: p)) }
            for p in valuePointers { UnsafeMutablePointer(mutating: p)?.deallocate() }
            for p in removePointers { free(UnsafeMutablePointer(mutating: p)) }
        }
        var keyLengths = keys.map { $0.utf8.count }, valueLengths = values.map(\.count), removeLengths = remove.map { $0.utf8.count }
        if !keys.isEmpty { ceph.rados_write_op_omap_set2(op, &keyPointers, &valuePointers, &keyLengths, &valueLengths, keys.count) }
        if !remove.isEmpty { ceph.rados_write_op_omap_rm_keys2(op, &removePointers, &removeLengths, remove.count) }
        try check(withIO { ceph.rados_write_op_operate(op, $0, object, nil, 0) }, "rados_write_op_operate (omap)", "\(pool)/\(object)")
    }

    /// Runs `body` holding `object`'s exclusive cls_lock. The lock lasts 30 s at most, so one
    /// a dead host held expires; waits up to 40 s for it.
    func withObjectLock<T>(_ object: String, _ body: () throws -> T) throws -> T {
        let cookie = "thinfs-\(instanceID)-\(UUID().uuidString.prefix(8))"
        var duration = timeval(tv_sec: 30, tv_usec: 0)
        let deadline = Date().addingTimeInterval(40)
        while true {
            let rc = withIO { ceph.rados_lock_exclusive($0, object, "thinfs-catalogue", cookie, "thinfs layer catalogue", &duration, 0) }
            if rc == 0 { break }
            guard rc == -EBUSY || rc == -EEXIST else { try check(rc, "rados_lock_exclusive", "\(pool)/\(object)"); break }
            guard Date() < deadline else { throw RBDPool.CatalogueError.lockTimeout(catalogue: "\(pool)/\(object)") }
            usleep(20_000)
        }
        defer { _ = withIO { ceph.rados_unlock($0, object, "thinfs-catalogue", cookie) } }
        return try body()
    }
}
