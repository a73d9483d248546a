import Foundation
import Logging
import ThinFS

/// `docker-dm`: the files Docker's devicemapper driver leaves (`metadata/<hash>`, `base`,
/// `deviceset-metadata`, `transaction-metadata`) and its layer database, read by
/// `DockerDeviceSet` and `DockerLayerDB` and planned by `DockerImport.plan` against a real
/// userspace pool made once:
///
///     device 1  ext4 of 16 MiB (the base)      devices 2, 3  snapshots of 1
///     device 4  thin, never formatted          pool transaction id 5
///
/// Input: a `FileBundle` whose names are relative to Docker's root (`devicemapper/metadata/base`,
/// `image/devicemapper/layerdb/sha256/<chain id>/cache-id`, `image/devicemapper/layerdb/mounts/...`).
/// The pool files are the harness's, never the input's.
public enum DockerDMHarness {
    /// The base ext4's UUID, fixed so that the seeds (make-seeds.py) can name it.
    static let baseUUID = "7e1e0e39-2d8a-4d2c-9a3c-5b0f7b1c2d3e"
    static let quiet = Logger(label: "thinfs.fuzz", factory: { _ in SwiftLogNoOpLogHandler() })

    struct Setup: @unchecked Sendable {
        let scratch: String
        let pool: UserspaceThinPool
        let data: String, metadata: String
    }

    static let setup: Setup = {
        let scratch = Harness.scratchDirectory("docker-dm")
        let data = scratch + "/pool/data", metadata = scratch + "/pool/metadata"
        do {
            try FileManager.default.createDirectory(atPath: scratch + "/pool", withIntermediateDirectories: true)
            let pool = try UserspaceThinPool.create(dataPath: data, metadataPath: metadata, dataSize: 64 << 20, metadataSize: 4 << 20,
                                                    blockSize: 64 << 10, options: .init(blockZeroing: false, atomicCommit: false),
                                                    logger: quiet)
            try pool.message(.createThin(1))
            _ = try DeviceFormatter(logger: quiet).format(pool: pool, id: 1, size: 16 << 20, extraArguments: ["-U", baseUUID],
                                                       scratchDirectory: scratch + "/mkfs")
            try pool.message(.createSnap(2, origin: 1))
            try pool.message(.createSnap(3, origin: 1))
            try pool.message(.createThin(4))
            try pool.message(.setTransactionID(current: 0, new: 5))
            return Setup(scratch: scratch, pool: pool, data: data, metadata: metadata)
        } catch {
            Harness.setupFailed("making the pool", error)
        }
    }()

    /// Makes the fixed part once, before the first input.
    public static func prepare() { _ = setup }

    public static func run(_ data: UnsafeRawBufferPointer) {
        let s = setup
        let docker = s.scratch + "/docker"
        try? FileManager.default.removeItem(atPath: docker)
        try? FileManager.default.createDirectory(atPath: docker + "/devicemapper", withIntermediateDirectories: true)
        FileBundle.write(FileBundle.decode(data), under: docker)
        let root = docker + "/devicemapper"
        let layerDB = DockerLayerDB(path: DockerLayerDB.path(forDeviceSet: root))
        guard let set = try? DockerDeviceSet(root: root) else { return }
        _ = set.base
        _ = try? DockerImport.plan(set, pool: s.pool, source: .loopFiles(data: s.data, metadata: s.metadata), layerDB: layerDB, logger: quiet)
    }
}
