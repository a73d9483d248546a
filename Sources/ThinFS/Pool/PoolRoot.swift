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
        for p in [dataPath, metadataPath] {
            try FileManager.default.createDirectory(atPath: (p as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
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

    private func absolute(_ p: String) -> String {
        p.hasPrefix("/") ? p : FileManager.default.currentDirectoryPath + "/" + p
    }
}
