import Foundation
import Logging
import PersistentData
import SystemPackage

/// Which engine drives a store's pool, and how the store holds it (`StorageOptions.poolBackend`).
///
///     backend     pool                                         the store's writer lock
///     userspace   ROOT/pool/{data,metadata}, this process      the data file's flock (UserspaceThinPool)
///     loop        the same files on loop devices, dm-thin as   ROOT/store.lock
///                 `thinfs-MAJ:MIN-INO-pool` (Docker's loop-lvm;
///                 activated at open, removed at close if idle)
///     kernel      dm.thinpooldev, an existing kernel pool      ROOT/store.lock
///                 (direct-lvm: `thinfs setup-lvm`)
///     rbd         images in a Ceph RBD pool (RBDPool),         ROOT/store.lock (and each image's
///                 rbd.pool / rbd.prefix                        exclusive lock while open for writing)
///
/// The kernel serializes a kernel pool's messages, but the store's journal and database still
/// need one writer, as with the userspace pool: ROOT/store.lock is that writer's flock, and a
/// `thinfs-mount` daemon holds it while layers are mounted.
///
/// The loop and userspace backends share a format: the loop pool's files are made by the
/// userspace engine at `thinfs init` (the kernel opens the formatted metadata as its own).
extension LayerStore {
    /// Where a read-only store's pool lives (`initializeReadOnly`, for `thinfs import-docker`).
    public enum PoolLocation: Codable, Equatable, Sendable {
        /// Data and metadata files (or block devices), read by the userspace engine.
        case files(data: String, metadata: String)
        /// An active kernel thin pool, by dm name.
        case kernel(poolName: String)
    }

    /// Opens the pool that `options` name. `readOnly`: nothing in it may change.
    static func openPool(root: String, options: StorageOptions, readOnly: Bool,
                         logger: Logger) throws -> (pool: any ThinPoolBackend, lock: FileDescriptor?) {
        switch options.poolBackend {
        case .userspace:
            return (try PoolRoot(path: root).open(readOnly: readOnly, logger: logger), nil)
        case .kernel:
            let lock = try takeStoreLock(root: root)
            do {
                let pool = try KernelThinPool(poolName: options.thinPoolDevice ?? "", deferredRemoval: options.deferredRemoval,
                                              readOnly: readOnly, logger: logger)
                return (pool, lock)
            } catch {
                try? lock.close()
                throw error
            }
        case .rbd:
            let lock = try takeStoreLock(root: root)
            do {
                return (try RBDPool(options.rbdConfiguration, readOnly: readOnly, logger: logger), lock)
            } catch {
                try? lock.close()
                throw error
            }
        case .loop:
            let lock = try takeStoreLock(root: root)
            do {
                return (try activateLoopPool(root: root, options: options, logger: logger), lock)
            } catch {
                try? lock.close()
                throw error
            }
        }
    }

    /// The loop pool of `root`: the active one, or a new activation over the root's files.
    static func activateLoopPool(root: String, options: StorageOptions, logger: Logger) throws -> KernelThinPool {
        let names = loopPoolNames(root: root)
        let control = LibDeviceMapper.shared
        if try control.info(names.pool) != nil {
            return try KernelThinPool(poolName: names.pool, devicePrefix: names.prefix, control: control,
                                      deferredRemoval: options.deferredRemoval, removeWhenIdle: true, logger: logger)
        }
        let config = try PoolRoot(path: root).config()
        var loop = LoopThinPool.Configuration(dataFile: config.data, metadataFile: config.metadata,
                                              dataSize: try fileSize(config.data), metadataSize: try fileSize(config.metadata),
                                              blockSize: options.blockSize)
        // Zero new blocks before a partial write, as the userspace engine does: a layer must never
        // read another (deleted) layer's bytes. Docker's loop-lvm skipped zeroing for speed.
        loop.features = []
        return try LoopThinPool.create(name: names.pool, loop, devicePrefix: names.prefix, control: control,
                                       deferredRemoval: options.deferredRemoval, removeWhenIdle: true, logger: logger)
    }

    /// Docker named its loop pool `docker-MAJ:MIN-INO-pool` after the root's device and inode,
    /// and its thin devices `docker-MAJ:MIN-INO-<hash>`; ThinFS's are `thinfs-MAJ:MIN-INO-<id>`.
    static func loopPoolNames(root: String) -> (pool: String, prefix: String) {
        var st = stat()
        guard stat(root, &st) == 0 else { return ("thinfs-pool", "thinfs") }
        // glibc's gnu_dev_major/minor encoding of dev_t.
        let dev = UInt64(st.st_dev)
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff))
        let minor = (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff))
        let prefix = "thinfs-\(major):\(minor)-\(st.st_ino)"
        return (prefix + "-pool", prefix)
    }

    /// The pool's name as `thinfs info` shows it: the dm name of a kernel pool; for the
    /// userspace pool, the name a loop pool of this root would have.
    public var poolName: String {
        if let rbd = pool as? RBDPool { return "\(rbd.configuration.pool)/\(rbd.configuration.prefix)*" }
        return (pool as? KernelThinPool)?.poolName ?? Self.loopPoolNames(root: root).pool
    }

    static func storeLockPath(_ root: String) -> String { root + "/store.lock" }

    /// The store's writer lock for kernel pools (see the table above).
    static func takeStoreLock(root: String) throws -> FileDescriptor {
        let path = storeLockPath(root)
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(FilePath(path), .readWrite, options: [.create, .closeOnExec], permissions: [.ownerReadWrite])
        } catch let e as Errno {
            throw ThinPoolError.io(operation: "open", path: path, errno: e)
        }
        guard flock(fd.rawValue, LOCK_EX | LOCK_NB) == 0 else {
            try? fd.close()
            throw ThinPoolError.heldByAnotherProcess(data: "\(root) (its kernel pool's writer lock \(path))")
        }
        return fd
    }

    private static func fileSize(_ path: String) throws -> UInt64 {
        var st = stat()
        guard stat(path, &st) == 0 else { throw ThinPoolError.io(operation: "stat", path: path, errno: Errno(rawValue: errno)) }
        return UInt64(st.st_size)
    }
}
