import Foundation
import Logging
import PersistentData

/// A ThinFS root directory: it records where its pool's data and metadata live.
///
///     DIR/
///       pool.json        { "data": PATH, "metadata": PATH, "options": {...} }
///       pool/data        sparse data file (unless --data points elsewhere)
///       pool/metadata    sparse metadata file, dm-thin format
public struct PoolRoot: Sendable {
    public struct Config: Codable, Equatable, Sendable {
        public var version = 1
        public var data: String
        public var metadata: String
        public var options: UserspaceThinPool.Options
    }

    public let path: String

    public init(path: String) { self.path = path }

    /// `$THINFS_ROOT`, or /var/lib/thinfs.
    public static var defaultPath: String {
        ProcessInfo.processInfo.environment["THINFS_ROOT"].flatMap { $0.isEmpty ? nil : $0 } ?? "/var/lib/thinfs"
    }

    public var configPath: String { path + "/pool.json" }
    public var defaultDataPath: String { path + "/pool/data" }
    public var defaultMetadataPath: String { path + "/pool/metadata" }

    public var hasPool: Bool { FileManager.default.fileExists(atPath: configPath) }

    public func config() throws -> Config {
        guard let bytes = FileManager.default.contents(atPath: configPath) else { throw ThinPoolError.noPool(root: path) }
        do {
            return try JSONDecoder().decode(Config.self, from: bytes)
        } catch {
            throw ThinPoolError.invalidConfiguration("\(configPath) is not a ThinFS pool configuration: \(error)")
        }
    }

    /// Writes the configuration atomically (temporary file, fsync, rename).
    func save(_ config: Config) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let bytes = try encoder.encode(config)
        do {
            try bytes.write(to: URL(fileURLWithPath: configPath), options: .atomic)
        } catch {
            throw ThinPoolError.invalidConfiguration("cannot write \(configPath): \(error)")
        }
    }

    private func refuseExisting() throws {
        guard !hasPool else {
            throw ThinPoolError.invalidConfiguration("\(path) already has a pool (\(configPath)); use another --root or remove it")
        }
    }

    /// Creates a new pool and records it in the root.
    public func create(data: String?, metadata: String?, dataSize: UInt64, metadataSize: UInt64, blockSize: UInt64,
                       options: UserspaceThinPool.Options, logger: Logger = Logger(label: "thinfs.pool")) throws -> UserspaceThinPool {
        try refuseExisting()
        let dataPath = absolute(data ?? defaultDataPath)
        let metadataPath = absolute(metadata ?? defaultMetadataPath)
        // The root, and what is under it, are ours to make (the defaults live there). Elsewhere an
        // explicit path's directory must exist already: a missing one is a typo, and `mkdir -p` of
        // it would bury the pool somewhere the user never meant.
        let root = absolute(path)
        var toMake: [String] = []
        for p in [dataPath, metadataPath] {
            let directory = (p as NSString).deletingLastPathComponent
            if directory == root || directory.hasPrefix(root + "/") {
                toMake.append(directory)
                continue
            }
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
                throw ThinPoolError.invalidConfiguration("\(directory): no such directory (for \(p)); make it first, or leave the option out for the default under \(path)")
            }
        }
        for directory in toMake {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }
        let pool = try UserspaceThinPool.create(dataPath: dataPath, metadataPath: metadataPath, dataSize: dataSize,
                                                metadataSize: metadataSize, blockSize: blockSize, options: options, logger: logger)
        try save(Config(data: dataPath, metadata: metadataPath, options: options))
        return pool
    }

    /// Adopts an existing pool (made by the kernel, thin_restore or another root) without changing it.
    public func adopt(data: String, metadata: String, options: UserspaceThinPool.Options,
                      logger: Logger = Logger(label: "thinfs.pool")) throws -> UserspaceThinPool {
        try refuseExisting()
        let dataPath = absolute(data), metadataPath = absolute(metadata)
        let pool = try UserspaceThinPool.open(dataPath: dataPath, metadataPath: metadataPath, options: options,
                                              readOnly: true, logger: logger)
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        try save(Config(data: dataPath, metadata: metadataPath, options: options))
        return pool
    }

    /// Opens the root's pool.
    public func open(readOnly: Bool = false, logger: Logger = Logger(label: "thinfs.pool")) throws -> UserspaceThinPool {
        let c = try config()
        return try UserspaceThinPool.open(dataPath: c.data, metadataPath: c.metadata, options: c.options,
                                          readOnly: readOnly, logger: logger)
    }

    /// A filesystem put on a thin device by `thinfs dev format`.
    public struct FilesystemRecord: Codable, Equatable, Sendable {
        public var type: String
        public var uuid: String
        public var size: UInt64
        public init(type: String, uuid: String, size: UInt64) {
            self.type = type
            self.uuid = uuid
            self.size = size
        }
    }

    public var filesystemsPath: String { path + "/filesystems.json" }

    /// The filesystems recorded in this root, by thin device id.
    public func filesystems() throws -> [ThinDeviceID: FilesystemRecord] {
        guard let bytes = FileManager.default.contents(atPath: filesystemsPath) else { return [:] }
        do {
            // Keyed by the id as a string, so the JSON is an object.
            let byName = try JSONDecoder().decode([String: FilesystemRecord].self, from: bytes)
            return Dictionary(uniqueKeysWithValues: byName.compactMap { k, v in ThinDeviceID(k).map { ($0, v) } })
        } catch {
            throw ThinPoolError.invalidConfiguration("\(filesystemsPath) is corrupt: \(error)")
        }
    }

    /// Records (or, with nil, forgets) the filesystem of a device; written atomically.
    public func record(filesystem: FilesystemRecord?, for id: ThinDeviceID) throws {
        var all = try filesystems()
        all[id] = filesystem
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        do {
            try encoder.encode(Dictionary(uniqueKeysWithValues: all.map { (String($0.key), $0.value) })).write(to: URL(fileURLWithPath: filesystemsPath), options: .atomic)
        } catch {
            throw ThinPoolError.invalidConfiguration("cannot write \(filesystemsPath): \(error)")
        }
    }

    private func absolute(_ p: String) -> String {
        p.hasPrefix("/") ? p : FileManager.default.currentDirectoryPath + "/" + p
    }
}
