import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A kernel thin pool on two sparse files, as Docker's loop-lvm mode built
/// one: `data` and `metadata` files on loop devices, then a `thin-pool`
/// table over them. For machines without a spare disk; `thinfs setup-lvm` on
/// a real device is what production should use.
public enum LoopThinPool {
    public struct Configuration: Sendable {
        public var dataFile: String
        public var metadataFile: String
        /// Docker's loop-lvm defaults: 100 GiB of data, 2 GiB of metadata, 64 KiB blocks.
        public var dataSize: UInt64 = 100 << 30
        public var metadataSize: UInt64 = 2 << 30
        public var blockSize: UInt64 = 64 << 10
        /// Free blocks below which the kernel raises a dm event (Docker used 32768; capped at a tenth of the pool).
        public var lowWaterMark: UInt64?
        /// Docker's loop-lvm passed skip_block_zeroing: a new block is not zeroed before a partial write.
        public var features: [String] = ["skip_block_zeroing"]

        public init(dataFile: String, metadataFile: String, dataSize: UInt64 = 100 << 30, metadataSize: UInt64 = 2 << 30,
                    blockSize: UInt64 = 64 << 10, lowWaterMark: UInt64? = nil, features: [String] = ["skip_block_zeroing"]) {
            self.dataFile = dataFile
            self.metadataFile = metadataFile
            self.dataSize = dataSize
            self.metadataSize = metadataSize
            self.blockSize = blockSize
            self.lowWaterMark = lowWaterMark
            self.features = features
        }

        /// The pool table over the given loop devices.
        public func table(metadataDevice: String, dataDevice: String) -> ThinPoolTable {
            let blockSectors = blockSize / 512
            let dataSectors = dataSize / blockSize * blockSectors
            let blocks = dataSectors / blockSectors
            return ThinPoolTable(metadataDevice: metadataDevice, dataDevice: dataDevice, dataSectors: dataSectors,
                                 blockSectors: blockSectors, lowWaterMark: lowWaterMark ?? min(32768, blocks / 10), features: features)
        }
    }

    /// Creates the files if they are missing (sparse; a fresh metadata file
    /// starts with a zeroed superblock, which makes the kernel format it),
    /// binds them to autoclear loop devices, and activates pool `name`.
    /// Existing files are reused as they are: the kernel opens the pool in them.
    public static func create(name: String, _ config: Configuration, devicePrefix: String? = nil,
                              control: DeviceMapperControl = LibDeviceMapper.shared, deferredRemoval: Bool = false,
                              removeWhenIdle: Bool = false, logger: Logger = Logger(label: "thinfs.loop-pool")) throws -> KernelThinPool {
        guard config.blockSize >= 64 << 10, config.blockSize <= 1 << 30, config.blockSize % (64 << 10) == 0 else {
            throw ThinPoolError.invalidConfiguration("block size \(config.blockSize): dm-thin takes 64K to 1G in multiples of 64K")
        }
        try ensureSparse(config.dataFile, size: config.dataSize)
        try ensureSparse(config.metadataFile, size: config.metadataSize)
        let metadata = try LoopDevice.attach(file: config.metadataFile)
        defer { metadata.close() }
        let data = try LoopDevice.attach(file: config.dataFile)
        defer { data.close() }
        let table = config.table(metadataDevice: metadata.path, dataDevice: data.path)
        // On failure the deferred closes end the autoclear bindings: nothing is left behind.
        try control.create(name, table: [table.target], readOnly: false)
        logger.info("loop thin pool active", metadata: ["dm.pool": "\(name)", "dm.table": "\(table.line)"])
        do {
            return try KernelThinPool(poolName: name, devicePrefix: devicePrefix, control: control,
                                      deferredRemoval: deferredRemoval, removeWhenIdle: removeWhenIdle, logger: logger)
        } catch {
            try? control.removeRetryingBusy(name)
            throw error
        }
    }

    /// Grows the data file, tells its loop device, and grows the pool's table.
    public static func resize(_ pool: KernelThinPool, dataFile: String, to bytes: UInt64) throws {
        let table = try pool.poolTable()
        let fd = open(dataFile, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw ThinPoolError.io(operation: "open", path: dataFile, errno: Errno(rawValue: errno)) }
        defer { close(fd) }
        guard bytes >= table.dataSectors * 512 else {
            throw ThinPoolError.invalidConfiguration("thin pool '\(pool.poolName)': shrinking to \(bytes) bytes is not supported")
        }
        if ftruncate(fd, off_t(bytes)) != 0 { throw ThinPoolError.io(operation: "ftruncate", path: dataFile, errno: Errno(rawValue: errno)) }
        try LoopDevice.setCapacity(try KernelThinPool.nodePath(forDevice: table.dataDevice))
        try pool.resize(dataBytes: bytes)
    }

    /// Removes the pool device; its autoclear loop devices unbind with it.
    public static func remove(name: String, control: DeviceMapperControl = LibDeviceMapper.shared) throws {
        try control.removeRetryingBusy(name)
    }

    private static func ensureSparse(_ path: String, size: UInt64) throws {
        var st = stat()
        if stat(path, &st) == 0 { return }
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw ThinPoolError.io(operation: "create", path: path, errno: Errno(rawValue: errno)) }
        defer { close(fd) }
        if ftruncate(fd, off_t(size)) != 0 { throw ThinPoolError.io(operation: "ftruncate", path: path, errno: Errno(rawValue: errno)) }
    }
}
