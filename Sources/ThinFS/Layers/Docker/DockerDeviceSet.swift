import Foundation

/// What Docker's devicemapper graphdriver (removed in Docker 25) left on disk: one JSON file per
/// thin device, the device set's own file, and an open transaction if Docker stopped inside one.
/// Read only; nothing here is ever written. Field names and rules are moby's
/// `daemon/graphdriver/devmapper/deviceset.go` (`devInfo`, `DeviceSet`, `transaction`).
///
///     DOCKERDM/                                 e.g. /var/lib/docker/devicemapper
///     ├── devicemapper/                         loop-lvm only (none with dm.thinpooldev)
///     │   ├── data                              sparse, the pool's data device (100G by default)
///     │   ├── metadata                          sparse, dm-thin metadata (2G by default)
///     │   └── json[.migrated]                   Docker < 1.7's single metadata file, migrated at start
///     └── metadata/
///         ├── base                              the base device (hash ""):
///         │     {"device_id":1,"size":10737418240,"transaction_id":1,"initialized":true,"deleted":false}
///         ├── <hash>                            an image layer or a container, the same five fields
///         ├── <hash>-init                       a container's init layer (a snapshot between image and container)
///         ├── deviceset-metadata                {"next_device_id":7,"BaseDeviceUUID":"<ext4 uuid>","BaseDeviceFilesystem":"ext4"}
///         ├── transaction-metadata              {"open_transaction_id":6,"device_hash":"<hash>","device_id":6}
///         └── .tmpNNNN                          writeMetaFile's temporary files (ignored, as Docker does)
///
/// - `size` is the thin device's length in bytes (dm keeps it in the table, not in pool metadata).
/// - `transaction_id` is the pool transaction that created the device. Docker journals every
///   create and delete: it writes `transaction-metadata`, sends the pool message, writes the device
///   file, then `set_transaction_id` to `open_transaction_id`. At start, an open id above the
///   pool's means the change never closed, and Docker rolls it back (deletes `device_id` from the
///   pool and `metadata/<device_hash>`).
/// - `initialized` is the base device's "mkfs finished" flag. Docker never sets it on snapshots
///   (`registerDevice` writes `false`; only `createBaseImage` sets `true`), so it means nothing there.
/// - `deleted` marks a device removed under deferred deletion but still busy, to be deleted later.
/// - Go's decoder leaves a missing field at its zero value; files of old Docker versions lack
///   `deleted`, and old device-set files lack the UUID and filesystem.
public struct DockerDeviceSet: Sendable {
    /// One `metadata/<hash>` file (Go's `devInfo`).
    public struct Device: Equatable, Sendable {
        /// The file's name: the layer's cache id (`<id>`, `<id>-init`), or `base`.
        public var hash: String
        /// The file it came from, for errors and reports.
        public var file: String
        public var deviceID: UInt32
        public var size: UInt64
        public var transactionID: UInt64
        public var initialized: Bool
        public var deleted: Bool
        /// The file's modification time: when Docker last wrote it.
        public var modified: Date

        public var isBase: Bool { hash == DockerDeviceSet.baseFileName }
    }

    /// `metadata/deviceset-metadata` (the exported fields of Go's `DeviceSet`).
    public struct Settings: Equatable, Sendable {
        public var nextDeviceID: UInt32?
        public var baseDeviceUUID: String?
        public var baseDeviceFilesystem: String?
    }

    /// `metadata/transaction-metadata` (Go's `transaction`).
    public struct Transaction: Equatable, Sendable {
        public var openTransactionID: UInt64
        public var deviceHash: String
        public var deviceID: UInt32
    }

    public enum Error: Swift.Error, CustomStringConvertible, Equatable {
        case notADeviceSet(String, reason: String)
        case unreadable(file: String, reason: String)
        case malformed(file: String, reason: String)
        case duplicateDeviceID(UInt32, files: [String])

        public var description: String {
            switch self {
            case .notADeviceSet(let path, let why):
                "\(path) is not Docker's devicemapper directory (such as /var/lib/docker/devicemapper): \(why)"
            case .unreadable(let file, let why): "cannot read \(file): \(why)"
            case .malformed(let file, let why): "\(file) is not a Docker devicemapper metadata file: \(why)"
            case .duplicateDeviceID(let id, let files):
                "thin device \(id) is claimed by more than one metadata file: \(files.joined(separator: ", ")); the metadata is inconsistent, refusing to guess which one owns it"
            }
        }
    }

    public static let baseFileName = "base"
    public static let settingsFileName = "deviceset-metadata"
    public static let transactionFileName = "transaction-metadata"
    /// dm-thin device ids are 24 bits (moby's `maxDeviceID`).
    public static let maxDeviceID: UInt32 = 0xff_ffff

    /// The directory given (`DOCKERDM`), standardized.
    public let root: String
    /// Every device file, deleted ones included, sorted by device id.
    public let devices: [Device]
    public let settings: Settings?
    public let transaction: Transaction?

    public var metadataDirectory: String { root + "/metadata" }
    public var loopDataFile: String { root + "/devicemapper/data" }
    public var loopMetadataFile: String { root + "/devicemapper/metadata" }
    public var base: Device? { devices.first(where: \.isBase) }

    /// Reads `DOCKERDM/metadata`. Every file that Docker would load must parse, or the error names it.
    public init(root: String) throws {
        let root = URL(fileURLWithPath: root).standardizedFileURL.path
        self.root = root
        let directory = root + "/metadata"
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
            if FileManager.default.fileExists(atPath: root + "/devicemapper/json") {
                throw Error.notADeviceSet(root, reason: "it has only \(root)/devicemapper/json, the metadata of Docker before 1.7; start that Docker once so that it migrates it to metadata/")
            }
            throw Error.notADeviceSet(root, reason: "\(directory) does not exist")
        }
        let names: [String]
        do {
            names = try FileManager.default.contentsOfDirectory(atPath: directory).sorted()
        } catch {
            throw Error.unreadable(file: directory, reason: "\(error.localizedDescription)")
        }
        var devices: [Device] = []
        var settings: Settings?
        var transaction: Transaction?
        for name in names {
            let path = directory + "/" + name
            // moby's deviceFileWalkFunction skips these; directories are skipped by its walk.
            if name.hasPrefix(".") || name.hasSuffix(".migrated") { continue }
            var dir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &dir), !dir.boolValue else { continue }
            switch name {
            case Self.settingsFileName: settings = try Self.decode(SettingsFile.self, path).settings
            case Self.transactionFileName: transaction = try Self.decode(TransactionFile.self, path).transaction(file: path)
            default: devices.append(try Self.decode(DeviceFile.self, path).device(hash: name, file: path, modified: Self.modified(path)))
            }
        }
        var byID: [UInt32: [String]] = [:]
        for d in devices { byID[d.deviceID, default: []].append(d.file) }
        if let (id, files) = byID.filter({ $0.value.count > 1 }).min(by: { $0.key < $1.key }) {
            throw Error.duplicateDeviceID(id, files: files)
        }
        self.devices = devices.sorted { $0.deviceID < $1.deviceID }
        self.settings = settings
        self.transaction = transaction
    }

    // MARK: Decoding

    /// Go's field names, each optional: encoding/json leaves a missing field at its zero value.
    private struct DeviceFile: Decodable {
        var device_id: Int64?
        var size: UInt64?
        var transaction_id: UInt64?
        var initialized: Bool?
        var deleted: Bool?

        func device(hash: String, file: String, modified: Date) throws -> Device {
            // Without an id or a size there is nothing to activate; Docker would fail on it too.
            guard let id = device_id else { throw Error.malformed(file: file, reason: "it has no device_id") }
            guard id >= 0, id <= Int64(maxDeviceID) else {
                throw Error.malformed(file: file, reason: "device_id \(id) is outside dm-thin's 24-bit range (0...\(maxDeviceID))")
            }
            guard let size else { throw Error.malformed(file: file, reason: "it has no size") }
            return Device(hash: hash, file: file, deviceID: UInt32(id), size: size, transactionID: transaction_id ?? 0,
                          initialized: initialized ?? false, deleted: deleted ?? false, modified: modified)
        }
    }

    private struct SettingsFile: Decodable {
        var next_device_id: Int64?
        var BaseDeviceUUID: String?
        var BaseDeviceFilesystem: String?

        var settings: Settings {
            Settings(nextDeviceID: next_device_id.flatMap { UInt32(exactly: $0) },
                     baseDeviceUUID: BaseDeviceUUID.flatMap { $0.isEmpty ? nil : $0 },
                     baseDeviceFilesystem: BaseDeviceFilesystem.flatMap { $0.isEmpty ? nil : $0 })
        }
    }

    private struct TransactionFile: Decodable {
        var open_transaction_id: UInt64?
        var device_hash: String?
        var device_id: Int64?

        func transaction(file: String) throws -> Transaction {
            let id = device_id ?? 0
            guard id >= 0, id <= Int64(maxDeviceID) else {
                throw Error.malformed(file: file, reason: "device_id \(id) is outside dm-thin's 24-bit range (0...\(maxDeviceID))")
            }
            return Transaction(openTransactionID: open_transaction_id ?? 0, deviceHash: device_hash ?? "", deviceID: UInt32(id))
        }
    }

    private static func decode<T: Decodable>(_ type: T.Type, _ path: String) throws -> T {
        guard let bytes = FileManager.default.contents(atPath: path) else {
            throw Error.unreadable(file: path, reason: String(cString: strerror(errno)))
        }
        do {
            return try JSONDecoder().decode(T.self, from: bytes)
        } catch let DecodingError.typeMismatch(_, context) where context.codingPath.isEmpty {
            throw Error.malformed(file: path, reason: "it is not a JSON object")
        } catch let DecodingError.typeMismatch(expected, context) {
            throw Error.malformed(file: path, reason: "field \(context.codingPath.map(\.stringValue).joined(separator: ".")) is not \(describe(expected))")
        } catch let DecodingError.dataCorrupted(context) where context.codingPath.isEmpty {
            throw Error.malformed(file: path, reason: "it is not JSON (\(bytes.count) bytes)")
        } catch let DecodingError.dataCorrupted(context) {
            throw Error.malformed(file: path, reason: "field \(context.codingPath.map(\.stringValue).joined(separator: ".")): \(context.debugDescription)")
        } catch {
            throw Error.malformed(file: path, reason: "\(error)")
        }
    }

    private static func describe(_ type: Any.Type) -> String {
        switch type {
        case is Bool.Type: "a boolean"
        case is String.Type: "a string"
        case is Int64.Type, is UInt64.Type: "an integer"
        case is [String: Any].Type: "a JSON object"
        default: "of type \(type)"
        }
    }

    private static func modified(_ path: String) -> Date {
        ((try? FileManager.default.attributesOfItem(atPath: path))?[.modificationDate] as? Date) ?? Date(timeIntervalSince1970: 0)
    }
}
