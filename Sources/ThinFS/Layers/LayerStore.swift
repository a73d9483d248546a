import Foundation
import Logging
import PersistentData
import Synchronization
import SystemPackage

/// The layer store: Docker's devicemapper graphdriver model over a thin pool.
///
///     base device (thin, fresh ext4, dm.basesize)
///       └─ image layer A      create_snap of the base
///            └─ image layer B create_snap of A      (A is frozen once B exists)
///                 ├─ container c1   rw snapshot of B
///                 └─ container c2   rw snapshot of B
///
/// A root directory holds:
///
///     ROOT/pool.json, ROOT/pool/{data,metadata}   the pool's files (PoolRoot), unless dm.thinpooldev
///     ROOT/store.lock                             the writer's flock over a kernel pool
///     ROOT/layers.db                              SQLite: settings, layers, journal
///     ROOT/locks/<layer>.lock                     busy locks (flock, held while served)
///     ROOT/control.sock                           the pool owner's socket (LayerControl)
///     ROOT/tmp/                                   mkfs scratch images, spooled tars, unpacked
///                                                 docker archives (thinfs-image-*, flock'd by their importer)
///
/// The pool is the userspace engine's, or a kernel dm-thin pool (`LayerStore+Pool.swift`).
///
/// **One writer per pool.** The pool's metadata lives in the memory of the one process that
/// has it open for writing (a flock on the data file; ROOT/store.lock for a kernel pool). A `thinfs-mount` daemon serving layers
/// is that process while it runs; other commands then send it their request through
/// `ROOT/control.sock` (`LayerControl`) instead of opening the pool themselves.
///
/// **Journal.** Every change to the pool runs as moby's open-transaction protocol
/// (`LayerStore+Journal.swift`): the intent goes to the database first, then the pool message,
/// then the record, then `set_transaction_id` and a pool commit. `open` rolls an interrupted
/// change back or forward, removes the layers whose content a writer never finished, then
/// reconciles the database with the pool.
///
/// **Content.** A new layer whose content is being written (image import, and the front doors'
/// appliers, through `createImageLayer(_:parent:what:content:)`) is `applying` in the database
/// until its volume is written back and the pool committed: a writer killed in between leaves it
/// `applying`, nothing can mount or snapshot it, and the next open removes it, as moby's layer
/// store drops layers it never marked complete. New content for an existing layer (apply-diff,
/// `writeContent`) is written into a thin snapshot of its device that replaces the device only
/// once complete, so a failed or killed writer leaves the layer's old content.
///
/// **Concurrency.** Operations of one store serialize on `lock`. Lock order: the store's
/// lock, then a `VolumeGroup`'s, then a volume's; the pool's locks are innermost.
public final class LayerStore: @unchecked Sendable {
    public enum Kind: String, Codable, Sendable { case image, container }
    public enum State: String, Codable, Sendable {
        case active
        /// Removed while busy, with deferred deletion: the device goes when its last user does.
        case deleted
        /// A new layer whose content is being written (`createImageLayer(_:parent:what:content:)`);
        /// incomplete until it is `active`.
        /// Left by a killed writer, it is removed when the store next opens.
        case applying
    }

    public struct Layer: Codable, Equatable, Sendable {
        public var id: String
        public var parent: String?
        public var deviceID: ThinDeviceID
        public var kind: Kind
        /// The filesystem size in bytes (the thin device's size).
        public var size: UInt64
        public var state: State
        public var uuid: String
        public var created: Date
    }

    /// The base device, made by `initialize`.
    public struct Base: Equatable, Sendable {
        public var deviceID: ThinDeviceID
        public var uuid: String
        public var size: UInt64
        public var filesystem: String
    }

    public let root: String
    public let poolRoot: PoolRoot
    public let pool: any ThinPoolBackend
    /// The store's options and base device. Both change only when a bigger dm.basesize grows
    /// the base (`growBase`); they have a lock of their own, so that reading them never waits
    /// behind a long store operation.
    let settings: Mutex<(options: StorageOptions, base: Base)>
    public var options: StorageOptions { settings.withLock { $0.options } }
    /// A store over a pool ThinFS did not make (`initializeReadOnly`): nothing in it changes.
    public let readOnly: Bool
    /// ROOT/store.lock, held while the store is open over a kernel pool.
    let storeLock: FileDescriptor?
    public var base: Base { settings.withLock { $0.base } }
    /// Every volume this process has open on the pool; commits flush them all first.
    public let volumes: VolumeGroup
    let db: LayerDatabase
    let lock = NSRecursiveLock()
    let logger: Logger
    /// Layers this process has open read-write (by `openLayer`), for readers to share.
    var openWriters: [String: OpenLayer] = [:]
    /// What the last `recover` (at open) found and repaired.
    public internal(set) var lastRecovery = RecoveryReport()

    var databasePath: String { Self.databasePath(root) }
    static func databasePath(_ root: String) -> String { root + "/layers.db" }
    public var locksDirectory: String { root + "/locks" }
    public var scratchDirectory: String { root + "/tmp" }
    public static func controlSocketPath(_ root: String) -> String { root + "/control.sock" }

    /// `ROOT:LAYER`, as mount sources name a layer (`mount -t fuse.thinfs`, the FUSE fsname):
    /// split at the first colon after which a layer store's root ends, since layer ids hold
    /// colons (`sha256:...`) and a root's path may too. Nil if no prefix is a layer store.
    public static func splitSource<S: StringProtocol>(_ spec: S) -> (root: String, layer: String)? {
        guard let colon = spec.indices.first(where: {
            spec[$0] == ":" && $0 != spec.startIndex && exists(at: String(spec[..<$0]))
        }), spec.index(after: colon) != spec.endIndex else { return nil }
        return (String(spec[..<colon]), String(spec[spec.index(after: colon)...]))
    }

    /// A layer's busy lock (see `holdBusy`); `thinfs umount` waits on it from outside the store.
    public static func lockPath(root: String, layer: String) -> String { root + "/locks/\(layer).lock" }

    /// Is `root` a layer store (made by `thinfs init`)? A root whose layers.db is damaged is
    /// one: `probe` and `open` say it is corrupt.
    public static func exists(at root: String) -> Bool {
        do { return try probe(at: root) } catch Error.corruptDatabase { return true } catch { return false }
    }

    /// Is `root` a layer store? False without a layers.db, or with one that an interrupted
    /// `thinfs init` left without its settings; `corruptDatabase` if SQLite cannot read it.
    public static func probe(at root: String) throws -> Bool {
        guard FileManager.default.fileExists(atPath: databasePath(root)) else { return false }
        return try classifyingCorruption {
            let db = try LayerDatabase(path: databasePath(root))
            defer { db.close() }
            return try setting(db, "options") != nil
        }
    }

    /// Runs `body`, calling a layers.db that SQLite finds damaged (SQLITE_CORRUPT, SQLITE_NOTADB)
    /// what it is, rather than a store that does not exist: the advice differs (the pool's
    /// devices are intact; removing the root would lose them).
    static func classifyingCorruption<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch { throw classified(error) }
    }

    static func classified(_ error: Swift.Error) -> Swift.Error {
        guard let error = error as? LayerDatabase.Error, error.isCorrupt else { return error }
        return Error.corruptDatabase(path: error.path, reason: error.message)
    }

    private init(root: String, poolRoot: PoolRoot, pool: any ThinPoolBackend, storeLock: FileDescriptor?, db: LayerDatabase,
                 options: StorageOptions, base: Base, readOnly: Bool, logger: Logger) {
        self.root = root
        self.poolRoot = poolRoot
        self.pool = pool
        self.storeLock = storeLock
        self.readOnly = readOnly
        self.db = db
        self.settings = Mutex((options, base))
        self.logger = logger
        self.volumes = VolumeGroup(pool: pool, logger: logger)
    }

    // MARK: Errors

    public enum Error: Swift.Error, CustomStringConvertible, Equatable {
        case notInitialized(root: String)
        case alreadyInitialized(root: String)
        case unknownLayer(String)
        case layerExists(String, state: State)
        case invalidLayerID(String, reason: String)
        /// A path or name that cannot be handed on (a NUL byte ends it early in open(2), mount(2) and SQLite).
        case invalidArgument(what: String, value: String, reason: String)
        /// layers.db exists but SQLite cannot read it.
        case corruptDatabase(path: String, reason: String)
        case hasChildren(String, children: [String])
        case parentFrozen(String, child: String)
        case notAnImageLayer(String, kind: Kind)
        case busy(String, holder: String)
        case deleted(String)
        case incomplete(String)
        case lowSpace(what: String, free: UInt64, needed: UInt64, unit: String)
        case baseMismatch(root: String, expected: String, found: String)
        case unsupported(String)
        case sizeTooSmall(String, size: UInt64, minimum: UInt64)
        /// `thinfs layer resize` to less than the layer's size.
        case shrinkRefused(String, size: UInt64, current: UInt64)
        /// dm.basesize smaller than the base device a store already has.
        case baseShrinkRefused(root: String, size: UInt64, current: UInt64)
        case noFreeDeviceID
        case readOnlyStore(root: String, operation: String)
        case kernelMount(String, reason: String)

        public var description: String {
            switch self {
            case .notInitialized(let root):
                "\(root) is not a ThinFS layer store: run 'thinfs init --root \(root)' first"
            case .alreadyInitialized(let root):
                "\(root) is already a ThinFS layer store (layers.db exists)"
            case .unknownLayer(let id): "layer \(id) does not exist"
            case .layerExists(let id, let state):
                switch state {
                case .deleted: "layer \(id) already exists, removed but not yet deleted (busy); run 'thinfs cleanup' once it is free"
                case .applying: "layer \(id) already exists, with its content being written (or left incomplete by a writer that failed: remove it with 'thinfs layer rm \(id)')"
                case .active: "layer \(id) already exists"
                }
            // Quoted as Swift does (a NUL as \0): the message shows exactly what was sent.
            case .invalidLayerID(let id, let why): "invalid layer id \(id.debugDescription): \(why)"
            case .invalidArgument(let what, let value, let why): "invalid \(what) \(value.debugDescription): \(why)"
            case .corruptDatabase(let path, let why):
                "the layer database \(path) is corrupt (SQLite: \(why)). The layers' data is intact in the thin pool, but which device holds which layer is recorded only there: restore \(path) from a backup if you have one. The pool's thin devices can still be listed and read ('thinfs pool dump --root \((path as NSString).deletingLastPathComponent)', 'thinfs dev read'; thin_dump for a kernel pool's metadata device). Running 'thinfs init' on this root is refused, so as not to lose them."
            case .hasChildren(let id, let children):
                "layer \(id) has children and cannot be removed: \(children.joined(separator: ", ")) (remove them first)"
            case .parentFrozen(let id, let child):
                "layer \(id) cannot be written: layer \(child) is a snapshot of it (image layers are frozen once a child exists)"
            case .notAnImageLayer(let id, let kind):
                "layer \(id) is a \(kind.rawValue) layer; only image layers can be parents"
            case .busy(let id, let holder): "layer \(id) is busy: \(holder)"
            case .deleted(let id):
                "layer \(id) has been removed (deferred deletion pending): it cannot be mounted or snapshotted"
            case .incomplete(let id):
                "layer \(id) is incomplete: its content is being written (an image import), or its writer failed (remove it with 'thinfs layer rm \(id)'; one left by a killed writer is removed when the store next opens); it cannot be mounted, snapshotted or reused"
            case .lowSpace(let what, let free, let needed, let unit):
                "the thin pool has \(free) free \(what) \(unit), less than the \(needed) required by dm.min_free_space: grow the pool ('thinfs pool resize'; lvextend for an LVM thin pool), remove layers, or lower dm.min_free_space"
            case .baseMismatch(let root, let expected, let found):
                "the pool at \(root) is not this store's pool: the base device's filesystem UUID is \(found), the store recorded \(expected)"
            case .unsupported(let what): what
            case .sizeTooSmall(let id, let size, let minimum):
                "layer \(id): size \(ByteSize.human(size)) is smaller than its parent's filesystem (\(ByteSize.human(minimum))); layers can only grow"
            case .shrinkRefused(let id, let size, let current):
                "layer \(id) is \(ByteSize.format(current)) (\(current) bytes); it cannot shrink to \(ByteSize.format(size)) (\(size) bytes): a layer's filesystem only grows"
            case .baseShrinkRefused(let root, let size, let current):
                "the store at \(root) has a base device of \(ByteSize.format(current)) (\(current) bytes); dm.basesize=\(ByteSize.format(size)) (\(size) bytes) would shrink it: the base size only grows (as with devicemapper)"
            case .noFreeDeviceID: "no free thin device id below 2^24"
            case .readOnlyStore(let root, let operation):
                "the store at \(root) is read-only (an imported pool ThinFS did not make): \(operation) is refused"
            case .kernelMount(let id, let reason): "layer \(id): kernel mount: \(reason)"
            }
        }

        public var errno: Errno {
            switch self {
            case .unknownLayer, .notInitialized: .noSuchFileOrDirectory
            case .corruptDatabase: .ioError
            case .layerExists, .alreadyInitialized: .fileExists
            case .busy, .hasChildren, .incomplete: .resourceBusy
            case .lowSpace: .noSpace
            case .parentFrozen, .readOnlyStore: .readOnlyFileSystem
            default: .invalidArgument
            }
        }
    }

    // MARK: Creating and opening

    /// `thinfs init`: creates the pool (or adopts the root's existing one, or the kernel pool
    /// dm.thinpooldev names, if empty), then the base device.
    public static func initialize(root: String, options: StorageOptions,
                                  logger: Logger = Logger(label: "thinfs.layers")) throws -> LayerStore {
        let root = URL(fileURLWithPath: root).standardizedFileURL.path
        guard try !probe(at: root) else { throw Error.alreadyInitialized(root: root) }
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        let poolRoot = PoolRoot(path: root)
        if options.poolBackend != .kernel && options.poolBackend != .rbd {
            if poolRoot.hasPool {
                let pool = try poolRoot.open(logger: logger)
                defer { try? pool.close() }
                let status = try pool.status()
                guard status.transactionID == 0, status.usedDataBlocks == 0, try pool.deviceIDs().isEmpty else {
                    throw Error.unsupported("the pool in \(root) is in use (transaction id \(status.transactionID), \(status.usedDataBlocks) data blocks used): a layer store only adopts an empty pool; if an earlier 'thinfs init' was interrupted, remove \(root) and run it again")
                }
            } else {
                // The loop backend's files are made here too: the kernel opens this metadata as its own.
                try poolRoot.create(data: nil, metadata: nil, dataSize: options.loopDataSize,
                                    metadataSize: options.loopMetadataSize, blockSize: options.blockSize,
                                    options: .init(), logger: logger).close()
            }
        }
        let (pool, storeLock) = try openPool(root: root, options: options, readOnly: false, logger: logger)
        var handedOver = false
        defer { if !handedOver { try? pool.close(); try? storeLock?.close() } }
        if let kernel = pool as? KernelThinPool {
            // Only an empty pool: transaction id 0, no data used, no thin devices.
            try kernel.checkAdoptable(recordedTransactionID: nil)
            let devices = try kernel.deviceIDs()
            if !devices.isEmpty {
                throw Error.unsupported("thin pool '\(kernel.poolName)' already has thin devices (\(devices.map(String.init).joined(separator: ", "))): a layer store only adopts an empty pool; if they are left from an interrupted 'thinfs init', delete them ('thinfs kernel-pool message --pool \(kernel.poolName) \"delete ID\"') and run it again")
            }
        }
        // An RBD store takes only a prefix nothing uses yet in its pool.
        try (pool as? RBDPool)?.checkUnused()
        // The settings row "options" is written last: a root without it is an interrupted init.
        let db = try LayerDatabase(path: databasePath(root))
        defer { if !handedOver { db.close() } }
        let base: Base
        do {
            try createSchema(db)
            // The base device: a thin device with a fresh ext4, with Docker's mkfs options.
            let baseID: ThinDeviceID = 1
            try pool.message(.createThin(baseID))
            let formatted = try DeviceFormatter(logger: logger).format(
                pool: pool, id: baseID, size: options.baseSize, filesystem: .ext4, extraArguments: options.mkfsArguments,
                scratchDirectory: root + "/tmp")
            try pool.message(.setTransactionID(current: 0, new: 1))
            try pool.commit()
            let encoded = String(decoding: try JSONEncoder().encode(options), as: UTF8.self)
            try db.transaction {
                try setSetting(db, "base.device", String(baseID))
                try setSetting(db, "base.uuid", formatted.uuid)
                try setSetting(db, "base.size", String(options.baseSize))
                try setSetting(db, "base.fs", options.filesystem)
                try setSetting(db, "next.device", String(baseID + 1))
                try setSetting(db, "options", encoded)
            }
            base = Base(deviceID: baseID, uuid: formatted.uuid, size: options.baseSize, filesystem: options.filesystem)
        }
        let store = try LayerStore(opened: root, db: db, options: options, base: base, readOnly: false, pool: pool,
                                   storeLock: storeLock, logger: logger)
        handedOver = true
        return store
    }

    /// A read-only store over a pool ThinFS did not make (`thinfs import-docker`): `base` and
    /// `layers` describe the devices already in it. Nothing in the pool is ever written: create,
    /// rm and apply-diff are refused, mounts are read-only, and opening skips recovery.
    public static func initializeReadOnly(root: String, pool location: PoolLocation, base: Base, layers: [Layer],
                                          logger: Logger = Logger(label: "thinfs.layers")) throws -> LayerStore {
        let root = URL(fileURLWithPath: root).standardizedFileURL.path
        guard try !probe(at: root) else { throw Error.alreadyInitialized(root: root) }
        for layer in layers { try validate(id: layer.id) }
        var options = StorageOptions()
        options.baseSize = base.size
        options.filesystem = base.filesystem
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        switch location {
        case .files(let data, let metadata):
            options.backend = .userspace
            try PoolRoot(path: root).adopt(data: data, metadata: metadata, options: .init(), logger: logger).close()
        case .kernel(let name):
            options.thinPoolDevice = name
            options.backend = .kernel
        }
        let db = try LayerDatabase(path: databasePath(root))
        defer { db.close() }
        try createSchema(db)
        let encoded = String(decoding: try JSONEncoder().encode(options), as: UTF8.self)
        try db.transaction {
            for layer in layers {
                try db.execute("INSERT INTO layers(\(columns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                               [.text(layer.id), layer.parent.map { .text($0) } ?? .null, .integer(Int64(layer.deviceID)),
                                .text(layer.kind.rawValue), .integer(Int64(layer.size)), .text(layer.state.rawValue),
                                .text(layer.uuid), .integer(storedTime(layer.created))])
            }
            try setSetting(db, "base.device", String(base.deviceID))
            try setSetting(db, "base.uuid", base.uuid)
            try setSetting(db, "base.size", String(base.size))
            try setSetting(db, "base.fs", base.filesystem)
            try setSetting(db, "next.device", String((layers.map(\.deviceID).max() ?? base.deviceID) + 1))
            try setSetting(db, "readonly", "true")
            try setSetting(db, "options", encoded)
        }
        return try open(root: root, logger: logger)
    }

    /// Opens an initialized store, taking the pool for writing. Recovers an interrupted change
    /// and reconciles the database with the pool.
    public static func open(root: String, logger: Logger = Logger(label: "thinfs.layers")) throws -> LayerStore {
        let root = URL(fileURLWithPath: root).standardizedFileURL.path
        guard FileManager.default.fileExists(atPath: databasePath(root)) else { throw Error.notInitialized(root: root) }
        // The settings are read once: they choose the pool, and the store keeps them.
        let db = try classifyingCorruption { try LayerDatabase(path: databasePath(root)) }
        var pool: (any ThinPoolBackend)?, storeLock: FileDescriptor?
        do {
            guard let encoded = try setting(db, "options"),
                  let options = try? JSONDecoder().decode(StorageOptions.self, from: Data(encoded.utf8)),
                  let baseID = try setting(db, "base.device").flatMap(UInt32.init),
                  let uuid = try setting(db, "base.uuid"),
                  let size = try setting(db, "base.size").flatMap(UInt64.init) else {
                throw Error.notInitialized(root: root)
            }
            let base = Base(deviceID: baseID, uuid: uuid, size: size, filesystem: try setting(db, "base.fs") ?? "ext4")
            let readOnly = try setting(db, "readonly") == "true"
            if !readOnly { try createSchema(db) }
            (pool, storeLock) = try openPool(root: root, options: options, readOnly: readOnly, logger: logger)
            return try LayerStore(opened: root, db: db, options: options, base: base, readOnly: readOnly, pool: pool!,
                                  storeLock: storeLock, logger: logger)
        } catch {
            try? pool?.close()
            try? storeLock?.close()
            db.close()
            throw classified(error)
        }
    }

    /// The store over an open database and pool: recovers an interrupted change, reconciles
    /// the database with the pool, and checks the base device.
    private convenience init(opened root: String, db: LayerDatabase, options: StorageOptions, base: Base, readOnly: Bool,
                             pool: any ThinPoolBackend, storeLock: FileDescriptor?, logger: Logger) throws {
        self.init(root: root, poolRoot: PoolRoot(path: root), pool: pool, storeLock: storeLock, db: db, options: options,
                  base: base, readOnly: readOnly, logger: logger)
        try FileManager.default.createDirectory(atPath: locksDirectory, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: scratchDirectory, withIntermediateDirectories: true)
        // A read-only pool is someone else's: nothing to roll back, and nothing of it to delete.
        if !readOnly { try recover() }
        // Unpack directories of imports killed before they could remove them (a live one is locked).
        ScratchDirectory.removeStale(in: scratchDirectory, logger: logger)
        removeDeadHolderRecords()
        try verifyBase()
    }

    /// A different pool under the same root would hand out other layers' data: the base
    /// device's filesystem must still be the one `initialize` made.
    private func verifyBase() throws {
        guard try pool.deviceExists(base.deviceID) else {
            throw Error.baseMismatch(root: root, expected: base.uuid, found: "missing (no thin device \(base.deviceID))")
        }
        let device = try pool.openDevice(base.deviceID, size: base.size)
        defer { device.close() }
        let found = try Volume.filesystemUUID(device: device)
        guard found == base.uuid else { throw Error.baseMismatch(root: root, expected: base.uuid, found: found) }
    }

    /// Commits and closes the pool, releasing it for other processes. The store's volumes are
    /// closed by their owners first; the store is unusable afterwards.
    public func close() throws {
        try locked {
            defer {
                db.close()
                try? storeLock?.close()
            }
            try pool.close()
        }
    }

    /// Refuses `operation` on a read-only store.
    func requireWritable(_ operation: String) throws {
        if readOnly { throw Error.readOnlyStore(root: root, operation: operation) }
    }

    func locked<T>(_ body: () throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    // MARK: Schema and settings

    static func createSchema(_ db: LayerDatabase) throws {
        try db.execute("CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        try db.execute("""
            CREATE TABLE IF NOT EXISTS layers (
              id TEXT PRIMARY KEY, parent TEXT, device_id INTEGER NOT NULL UNIQUE,
              kind TEXT NOT NULL, size INTEGER NOT NULL, state TEXT NOT NULL, uuid TEXT NOT NULL,
              created INTEGER NOT NULL)
            """)
        // containerd's snapshots (ThinFSContainerd): one row per snapshot key, naming its layer.
        try db.execute("""
            CREATE TABLE IF NOT EXISTS snapshots (
              key TEXT PRIMARY KEY, layer TEXT NOT NULL UNIQUE, parent TEXT, kind TEXT NOT NULL,
              labels TEXT NOT NULL, created INTEGER NOT NULL, updated INTEGER NOT NULL)
            """)
        // One row per pool change in flight (moby's transaction-metadata file).
        try db.execute("""
            CREATE TABLE IF NOT EXISTS journal (
              txid INTEGER PRIMARY KEY, op TEXT NOT NULL, layer TEXT NOT NULL, device_id INTEGER NOT NULL,
              origin INTEGER)
            """)
    }

    static func setting(_ db: LayerDatabase, _ key: String) throws -> String? {
        try db.query("SELECT value FROM settings WHERE key = ?", [.text(key)]).first?.first?.text
    }

    static func setSetting(_ db: LayerDatabase, _ key: String, _ value: String) throws {
        try db.execute("INSERT INTO settings(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                       [.text(key), .text(value)])
    }

    // MARK: Queries

    static let columns = "id, parent, device_id, kind, size, state, uuid, created"

    func decode(_ row: LayerDatabase.Row) -> Layer {
        Layer(id: row[0].text ?? "", parent: row[1].text, deviceID: ThinDeviceID(row[2].integer ?? 0),
              kind: Kind(rawValue: row[3].text ?? "") ?? .image, size: UInt64(row[4].integer ?? 0),
              state: State(rawValue: row[5].text ?? "") ?? .active, uuid: row[6].text ?? "",
              created: Date(timeIntervalSince1970: Double(row[7].integer ?? 0) / 1e9))
    }

    /// Creation times are integer nanoseconds since the epoch. ISO 8601 text cost a formatter per
    /// row to read back: 0.5 ms each (0.14 ms with one shared formatter), measured here, which
    /// made every open of a 1,000-layer store half a second slower.
    static func storedTime(_ date: Date) -> Int64 { Int64((date.timeIntervalSince1970 * 1e9).rounded()) }

    /// Every layer, live and deferred-deleted, in creation order.
    public func allLayers() throws -> [Layer] {
        try db.query("SELECT \(Self.columns) FROM layers ORDER BY created, rowid").map(decode)
    }

    /// The layer `id`, live or deferred-deleted. Every operation on an existing layer looks it
    /// up here first, so this is where a bad id from any front door is refused.
    public func layer(_ id: String) throws -> Layer? {
        try Self.validate(id: id)
        return try db.query("SELECT \(Self.columns) FROM layers WHERE id = ?", [.text(id)]).first.map(decode)
    }

    /// The live layer `id`: a deferred-deleted one is gone as far as users are concerned, and
    /// one whose content is being written (`applying`) is not there yet.
    public func liveLayer(_ id: String) throws -> Layer {
        guard let layer = try layer(id) else { throw Error.unknownLayer(id) }
        switch layer.state {
        case .active: return layer
        case .deleted: throw Error.deleted(id)
        case .applying: throw Error.incomplete(id)
        }
    }

    /// The ids of the layers whose parent is `id`, deferred-deleted ones included.
    public func children(of id: String) throws -> [Layer] {
        try Self.validate(id: id)
        return try db.query("SELECT \(Self.columns) FROM layers WHERE parent = ? ORDER BY created", [.text(id)]).map(decode)
    }

    /// Layer ids are names in a directory and a database key: printable, no slashes. The store
    /// checks every id it is given (`layer(_:)`, `create`, the busy locks), whichever front door
    /// it came through: the CLI, the control socket, or a future gRPC or HTTP service.
    public static func validate(id: String) throws {
        // SQLite binds text up to its first NUL and open(2) stops there too: "a\0b" would be "a".
        guard !id.utf8.contains(0) else { throw Error.invalidLayerID(id, reason: "it contains a NUL byte") }
        guard !id.isEmpty, id.count <= 200 else { throw Error.invalidLayerID(id, reason: "it must have 1 to 200 characters") }
        guard id.unicodeScalars.allSatisfy(idCharacters.contains), id.first != ".", id.first != "-" else {
            throw Error.invalidLayerID(id, reason: "use letters, digits and : . _ - (not starting with . or -)")
        }
    }

    private static let idCharacters = CharacterSet(charactersIn: "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:._-")

    /// A path or name the store hands to open(2), mount(2) or SQLite, which all end a string at
    /// its first NUL byte: with one, it would name something else. `what` names it in the error.
    public static func validate(_ value: String, what: String) throws {
        guard !value.utf8.contains(0) else {
            throw Error.invalidArgument(what: what, value: value, reason: "it contains a NUL byte")
        }
    }

    /// Crash injection for the journal tests: `THINFS_CRASH_AT=<point>` kills the process with
    /// SIGKILL at that point, so nothing after it runs (no defer, no flush).
    static func crashPoint(_ name: String) {
        guard let target = ProcessInfo.processInfo.environment["THINFS_CRASH_AT"], target == name else { return }
        kill(getpid(), SIGKILL)
    }
}
