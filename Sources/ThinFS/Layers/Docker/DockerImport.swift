import Foundation
import Logging
import PersistentData

/// `thinfs import-docker`: the devices of Docker's devicemapper graphdriver become read-only
/// layers of a new layer store, with no Docker and no kernel device-mapper (loop-lvm files are
/// read by the userspace engine; a named kernel pool is read through libdevmapper).
///
///     DockerDeviceSet (metadata/*)  ─┐
///     DockerLayerDB (optional names) ├─▶ plan: validate against the pool ─▶ LayerStore.initializeReadOnly
///     the pool (files or kernel)    ─┘      (ids, sizes, ext4, base UUID)     (ROOT: layers.db, pool.json)
///
/// Nothing under DOCKERDM is written: the pool is opened read-only, and every thin device is
/// opened only to read its ext4 superblock.
public enum DockerImport {
    /// Where the pool is.
    public enum PoolSource: Equatable, Sendable, CustomStringConvertible {
        /// loop-lvm: `DOCKERDM/devicemapper/{data,metadata}`, read by the userspace engine.
        case loopFiles(data: String, metadata: String)
        /// direct-lvm or `dm.thinpooldev`: an active kernel thin pool, by its dm name.
        case kernel(poolName: String)

        public var description: String {
            switch self {
            case .loopFiles(let data, let metadata): "the loop-lvm files \(data) and \(metadata)"
            case .kernel(let name): "the kernel thin pool \(name)"
            }
        }
    }

    /// A device left out, and why.
    public struct Skipped: Equatable, Sendable {
        public var hash: String
        public var deviceID: UInt32
        public var file: String
        public var reason: String
    }

    /// What to import: `initializeReadOnly`'s arguments, and what was left out.
    public struct Plan: Sendable {
        public var source: PoolSource
        public var base: LayerStore.Base
        /// Parents before children, then by device id.
        public var layers: [LayerStore.Layer]
        public var skipped: [Skipped]
        /// Things the user should know that do not stop the import.
        public var notes: [String]
        public var poolTransactionID: UInt64
        /// The layer database that named the layers, if one was used.
        public var layerDB: String?
    }

    public enum Error: Swift.Error, CustomStringConvertible, Equatable {
        case noBase(file: String)
        case baseUnusable(file: String, reason: String)
        case unsupportedFilesystem(String, file: String)
        case missingPoolFile(String)
        case poolActive(file: String, loopDevice: String)
        case missingDevice(UInt32, hash: String, file: String, poolTransactionID: UInt64)
        case badSize(hash: String, file: String, size: UInt64, reason: String)
        case badFilesystem(hash: String, deviceID: UInt32, file: String, reason: String)
        case baseUUIDMismatch(expected: String, found: String, file: String)
        case badLayerID(hash: String, file: String, reason: String)
        case dockerDeviceActive(String, file: String)

        public var description: String {
            switch self {
            case .noBase(let file):
                "\(file) does not exist: without Docker's base device there is nothing to import"
            case .baseUnusable(let file, let why): "the base device (\(file)) \(why)"
            case .unsupportedFilesystem(let fs, let file):
                "the devices hold \(fs) (BaseDeviceFilesystem in \(file)); ThinFS reads ext4 only"
            case .missingPoolFile(let path):
                "\(path) does not exist: this is not a loop-lvm pool; for direct-lvm name the kernel pool with --thinpool NAME"
            case .poolActive(let file, let loop):
                "\(file) is attached to \(loop): the pool is still active in the kernel, and its metadata file may be behind the kernel's; stop Docker and remove the pool's devices (dmsetup remove), or import through the running pool with --thinpool NAME"
            case .missingDevice(let id, let hash, let file, let tx):
                "thin device \(id) of \(hash) (\(file)) is not in the pool (pool transaction id \(tx)): the metadata does not belong to this pool, or the pool has been changed since"
            case .badSize(let hash, let file, let size, let why): "\(hash) (\(file)): size \(size) \(why)"
            case .badFilesystem(let hash, let id, let file, let why): "\(hash) (thin device \(id), \(file)): \(why)"
            case .baseUUIDMismatch(let expected, let found, let file):
                "the base device's ext4 UUID is \(found), but \(file) records \(expected): the metadata belongs to another pool"
            case .badLayerID(let hash, let file, let why): "\(hash) (\(file)) cannot name a layer: \(why)"
            case .dockerDeviceActive(let name, let file):
                "Docker's device \(name) (\(file)) is active: Docker or one of its containers still uses the pool; stop Docker and remove its devices (dmsetup remove \(name)) first"
            }
        }
    }

    // MARK: Opening the pool

    /// Opens the pool read-only: the loop-lvm files, or the kernel pool `thinPool`.
    public static func openPool(_ set: DockerDeviceSet, thinPool: String?,
                                logger: Logger = Logger(label: "thinfs.import-docker")) throws -> (ThinPoolBackend, PoolSource) {
        try openPool(set, thinPool: thinPool, sysBlock: "/sys/block", control: LibDeviceMapper.shared, logger: logger)
    }

    /// `sysBlock`: where loop devices are listed; `control`: device-mapper (tests give fakes).
    static func openPool(_ set: DockerDeviceSet, thinPool: String?, sysBlock: String, control: DeviceMapperControl,
                         logger: Logger) throws -> (ThinPoolBackend, PoolSource) {
        if let thinPool {
            // Read-only: no pool message, thin devices activated read-only.
            let pool = try KernelThinPool(poolName: thinPool, control: control, readOnly: true, logger: logger)
            // Docker's own activations (docker-MAJ:MIN-INO-<hash>): Docker or one of its containers
            // still uses the pool, and what we read could change under us.
            let active = try control.list().map(\.name)
            for device in set.devices {
                let suffix = "-" + (device.isBase ? DockerDeviceSet.baseFileName : device.hash)
                if let name = active.first(where: { $0.hasPrefix("docker-") && $0.hasSuffix(suffix) }) {
                    throw Error.dockerDeviceActive(name, file: device.file)
                }
            }
            return (pool, .kernel(poolName: pool.poolName))
        }
        let data = set.loopDataFile, metadata = set.loopMetadataFile
        for file in [data, metadata] where !FileManager.default.fileExists(atPath: file) {
            throw Error.missingPoolFile(file)
        }
        for file in [data, metadata] {
            if let loop = loopDevice(backing: file, sysBlock: sysBlock) { throw Error.poolActive(file: file, loopDevice: loop) }
        }
        let pool = try UserspaceThinPool.open(dataPath: data, metadataPath: metadata, readOnly: true, logger: logger)
        return (pool, .loopFiles(data: data, metadata: metadata))
    }

    /// The loop device whose backing file is `file`, from sysfs (`/sys/block/loopN/loop/backing_file`).
    static func loopDevice(backing file: String, sysBlock: String) -> String? {
        let target = URL(fileURLWithPath: file).resolvingSymlinksInPath().path
        let names = (try? FileManager.default.contentsOfDirectory(atPath: sysBlock)) ?? []
        for name in names.sorted() where name.hasPrefix("loop") {
            guard let data = FileManager.default.contents(atPath: "\(sysBlock)/\(name)/loop/backing_file") else { continue }
            let backing = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            if backing == target { return "/dev/\(name)" }
        }
        return nil
    }

    // MARK: Planning

    /// Checks the device set against the pool and turns it into layers. Reads the pool and each
    /// device's ext4 superblock; changes nothing.
    public static func plan(_ set: DockerDeviceSet, pool: ThinPoolBackend, source: PoolSource, layerDB: DockerLayerDB?,
                            logger: Logger = Logger(label: "thinfs.import-docker")) throws -> Plan {
        let settingsFile = set.metadataDirectory + "/" + DockerDeviceSet.settingsFileName
        guard let baseDevice = set.base else { throw Error.noBase(file: set.metadataDirectory + "/" + DockerDeviceSet.baseFileName) }
        var notes: [String] = []
        if baseDevice.deleted { throw Error.baseUnusable(file: baseDevice.file, reason: "is marked deleted") }
        if !baseDevice.initialized {
            // Docker deletes and recreates a base whose mkfs never finished: no layer can be a snapshot of it.
            throw Error.baseUnusable(file: baseDevice.file, reason: "was never initialized (its mkfs did not finish); Docker would delete and recreate it, so there is nothing to import")
        }
        let filesystem = set.settings?.baseDeviceFilesystem ?? "ext4"
        guard filesystem == "ext4" else { throw Error.unsupportedFilesystem(filesystem, file: settingsFile) }
        if set.settings?.baseDeviceFilesystem == nil {
            notes.append("\(settingsFile) records no BaseDeviceFilesystem (an old Docker): ext4 assumed, and checked on every device")
        }

        let poolTransactionID = try pool.status().transactionID
        // Docker's open transaction: an id above the pool's never closed, and Docker would roll it back.
        var rolledBack: String?
        if let t = set.transaction, t.openTransactionID > poolTransactionID {
            let hash = t.deviceHash.isEmpty ? DockerDeviceSet.baseFileName : t.deviceHash
            if hash == DockerDeviceSet.baseFileName {
                throw Error.baseUnusable(file: baseDevice.file, reason: "is the subject of Docker's unfinished transaction \(t.openTransactionID) (the pool is at \(poolTransactionID)); Docker would roll it back")
            }
            rolledBack = hash
        }
        if baseDevice.transactionID > poolTransactionID {
            throw Error.baseUnusable(file: baseDevice.file, reason: "was created in transaction \(baseDevice.transactionID), after the pool's last commit (\(poolTransactionID)): its creation never completed")
        }

        // The base: in the pool, an ext4 that fits, and the UUID Docker recorded.
        let baseCheck = try inspect(baseDevice, pool: pool, poolTransactionID: poolTransactionID)
        if let recorded = set.settings?.baseDeviceUUID {
            guard recorded.lowercased() == baseCheck.uuid else {
                throw Error.baseUUIDMismatch(expected: recorded, found: baseCheck.uuid, file: settingsFile)
            }
        } else {
            notes.append("\(settingsFile) records no BaseDeviceUUID: the base device's UUID \(baseCheck.uuid) could not be checked")
        }
        let base = LayerStore.Base(deviceID: baseDevice.deviceID, uuid: baseCheck.uuid, size: baseDevice.size, filesystem: filesystem)

        var skipped: [Skipped] = []
        var layers: [LayerStore.Layer] = []
        var hashOf: [String: String] = [:]   // layer id -> device hash, for reports
        let live = Set(set.devices.filter { !$0.deleted }.map(\.hash))
        for device in set.devices where !device.isBase {
            func skip(_ why: String) {
                skipped.append(Skipped(hash: device.hash, deviceID: device.deviceID, file: device.file, reason: why))
            }
            if device.deleted {
                skip("marked deleted (Docker's deferred deletion had not run yet)")
                continue
            }
            if device.hash == rolledBack, let t = set.transaction {
                skip("the subject of Docker's unfinished transaction \(t.openTransactionID) (the pool is at \(poolTransactionID)); Docker would roll it back")
                continue
            }
            if device.transactionID > poolTransactionID {
                skip("created in transaction \(device.transactionID), after the pool's last commit (\(poolTransactionID)): never completed")
                continue
            }
            // A device smaller than the base is no error: raising dm.basesize grows the base's
            // size (checkGrowBaseDeviceFS) and leaves older layers at theirs. What must hold is that
            // each ext4 fits its own device (`inspect`).
            let check = try inspect(device, pool: pool, poolTransactionID: poolTransactionID)
            let entry = layerDB?.entries[device.hash]
            let id = entry?.id ?? device.hash
            do { try LayerStore.validate(id: id) } catch let e as LayerStore.Error {
                guard case .invalidLayerID(_, let why) = e else { throw e }
                throw Error.badLayerID(hash: device.hash, file: device.file, reason: "'\(id)': \(why)")
            }
            // Without the database, a container is known by its init layer: moby names it <mount-id>-init.
            let hasInit = live.contains(device.hash + "-init")
            let parent = entry.map(\.parent) ?? (hasInit ? device.hash + "-init" : nil)
            let kind = entry?.kind ?? (hasInit ? .container : .image)
            hashOf[id] = device.hash
            layers.append(LayerStore.Layer(id: id, parent: parent, deviceID: device.deviceID, kind: kind, size: device.size,
                                           state: .active, uuid: check.uuid, created: device.modified))
        }
        if layerDB == nil {
            notes.append("no layer database at \(DockerLayerDB.path(forDeviceSet: set.root)): layers are named by their device hashes, and image layers' parents are unknown (each diffs against the base device)")
        }
        if let layerDB {
            notes += layerDB.problems
            let imported = Set(set.devices.map(\.hash))
            for (hash, entry) in layerDB.entries.sorted(by: { $0.key < $1.key }) where !imported.contains(hash) {
                notes.append("\(entry.source) names device \(hash), which has no metadata file: ignored")
            }
        }

        // Parents must be imported layers; a parent left out (deleted, unknown) is reported.
        let ids = Set(layers.map(\.id))
        for i in layers.indices {
            guard let parent = layers[i].parent, !ids.contains(parent) else { continue }
            notes.append("layer \(layers[i].id) (\(hashOf[layers[i].id] ?? "?")): its parent \(parent) is not imported; it is listed as a snapshot of the base device")
            layers[i].parent = nil
        }
        // A parent is an image layer in the store's model; Docker only snapshots image layers and init layers.
        let parents = Set(layers.compactMap(\.parent))
        for i in layers.indices where parents.contains(layers[i].id) && layers[i].kind == .container {
            layers[i].kind = .image
        }
        logger.info("planned docker import", metadata: ["layers": "\(layers.count)", "skipped": "\(skipped.count)",
                                                        "pool.transaction_id": "\(poolTransactionID)"])
        return Plan(source: source, base: base, layers: ordered(layers), skipped: skipped, notes: notes,
                    poolTransactionID: poolTransactionID, layerDB: layerDB?.path)
    }

    /// What a device holds: it must be in the pool, and be an ext4 no larger than the device.
    private static func inspect(_ device: DockerDeviceSet.Device, pool: ThinPoolBackend,
                                poolTransactionID: UInt64) throws -> (uuid: String, filesystemBytes: UInt64) {
        try checkSectors(device)
        // Opened straight away: a kernel pool's existence probe is an activation of its own.
        let block: BlockDevice
        do {
            block = try pool.openDevice(device.deviceID, size: device.size)
        } catch {
            if (try? pool.deviceExists(device.deviceID)) == false {
                throw Error.missingDevice(device.deviceID, hash: device.hash, file: device.file, poolTransactionID: poolTransactionID)
            }
            throw error
        }
        defer { block.close() }
        do {
            let uuid = try Volume.filesystemUUID(device: block)
            let volume = try Volume(device: block, readOnly: true, logger: Logger(label: "thinfs.volume"))
            defer { try? volume.close() }
            let stats = try volume.statfs()
            let bytes = stats.blocks * stats.blockSize
            guard bytes <= device.size else {
                throw Error.badSize(hash: device.hash, file: device.file, size: device.size,
                                    reason: "is smaller than the ext4 on the device (\(bytes) bytes): the metadata does not match the device")
            }
            return (uuid, bytes)
        } catch let e as VolumeError {
            throw Error.badFilesystem(hash: device.hash, deviceID: device.deviceID, file: device.file, reason: "\(e)")
        }
    }

    /// A thin device's table length is whole 512-byte sectors, and never zero.
    private static func checkSectors(_ device: DockerDeviceSet.Device) throws {
        guard device.size > 0, device.size % 512 == 0 else {
            throw Error.badSize(hash: device.hash, file: device.file, size: device.size,
                                reason: device.size == 0 ? "is zero" : "is not a whole number of 512-byte sectors")
        }
    }

    /// Parents before children; otherwise by device id.
    static func ordered(_ layers: [LayerStore.Layer]) -> [LayerStore.Layer] {
        var done: Set<String> = []
        var out: [LayerStore.Layer] = []
        var pending = layers.sorted { $0.deviceID < $1.deviceID }
        while !pending.isEmpty {
            let before = pending.count
            pending.removeAll { layer in
                guard layer.parent.map(done.contains) ?? true else { return false }
                done.insert(layer.id)
                out.append(layer)
                return true
            }
            // A cycle in the layer database (never written by Docker): cut it at the lowest device.
            if pending.count == before, var first = pending.first {
                first.parent = nil
                pending[0] = first
            }
        }
        return out
    }
}

// MARK: Running

extension DockerImport {
    /// What `run` did.
    public struct Report: Sendable {
        public var plan: Plan
        /// The new store, open; nil for a dry run.
        public var store: LayerStore?
    }

    /// Reads Docker's device set at `deviceSetRoot`, checks it against its pool, and makes the
    /// read-only layer store `root` over that pool. `thinPool`: a kernel pool instead of the
    /// loop-lvm files. `dryRun`: check and plan only.
    public static func run(deviceSetRoot: String, root: String, thinPool: String? = nil, useLayerDB: Bool = true,
                           dryRun: Bool = false, logger: Logger = Logger(label: "thinfs.import-docker")) throws -> Report {
        let set = try DockerDeviceSet(root: deviceSetRoot)
        let root = URL(fileURLWithPath: root).standardizedFileURL.path
        // The store writes its own files (layers.db, pool.json, locks): never among Docker's.
        if root == set.root || root.hasPrefix(set.root + "/") {
            throw LayerStore.Error.unsupported("\(root) is inside \(set.root): the store's root must be elsewhere, since nothing under Docker's directory may change")
        }
        guard try !LayerStore.probe(at: root) else { throw LayerStore.Error.alreadyInitialized(root: root) }
        let layerDB = useLayerDB ? DockerLayerDB(path: DockerLayerDB.path(forDeviceSet: set.root)) : nil
        let (pool, source) = try openPool(set, thinPool: thinPool, logger: logger)
        let plan: Plan
        do {
            defer { try? pool.close() }
            plan = try Self.plan(set, pool: pool, source: source, layerDB: layerDB, logger: logger)
        }
        guard !dryRun else { return Report(plan: plan, store: nil) }
        let location: LayerStore.PoolLocation = switch source {
        case .loopFiles(let data, let metadata): .files(data: data, metadata: metadata)
        case .kernel(let name): .kernel(poolName: name)
        }
        let store = try LayerStore.initializeReadOnly(root: root, pool: location, base: plan.base, layers: plan.layers,
                                                      logger: logger)
        logger.info("imported docker devices", metadata: ["layers": "\(plan.layers.count)", "root": "\(root)"])
        return Report(plan: plan, store: store)
    }
}
