import Dispatch
import Logging
import PersistentData
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A dm-thin pool in userspace: a sparse data file holding pool blocks, and a
/// metadata file in the kernel's exact format, so thin_check, thin_dump and a
/// real kernel (`thin-pool` table over loop devices) accept it.
///
/// ## Concurrency
/// Any number of threads may read, write and discard at once. Three locks,
/// always taken in this order:
///
/// 1. `epoch` (reader-writer): every I/O holds it shared; `commit` and pool
///    messages hold it exclusively. So no I/O is in flight while a commit makes
///    freed data blocks reusable, and a reader can never see a data block
///    reused under it: a block freed by a discard or delete is not handed out
///    again before the next commit (the space map's allocation rule).
/// 2. `stripes` (mutexes, by hash of device and virtual block, locked in
///    ascending index order): a write holds the stripes of every block it
///    touches from lookup to the metadata update. Two writers racing on the
///    same shared block are serialized; the second finds the first's private
///    copy and writes into it instead of copying again.
/// 3. `metaLock` (mutex): guards `ThinMetadata` and `openCounts`. Held only
///    for lookups and updates, never across data I/O.
///
/// ## Commit policy
/// With `atomicCommit` (the default), a write never changes in place a data
/// block that the last commit references: such a block is copied into a new
/// one first, exactly as for a snapshot. Blocks allocated since the last
/// commit are written in place. After a crash, the pool therefore holds
/// exactly the last committed state, data included, which is what makes a
/// journal-less ext4 written through libext2fs crash-consistent. Without it,
/// the pool behaves like the kernel: exclusive blocks are overwritten in place.
public final class UserspaceThinPool: ThinPoolBackend, @unchecked Sendable {
    public struct Options: Sendable, Codable, Equatable {
        /// Zero the rest of a newly allocated block on a partial write (the kernel's default; off = skip_block_zeroing).
        public var blockZeroing: Bool = true
        /// Never overwrite a committed data block in place (see the type's documentation).
        public var atomicCommit: Bool = true
        public init(blockZeroing: Bool = true, atomicCommit: Bool = true) {
            self.blockZeroing = blockZeroing
            self.atomicCommit = atomicCommit
        }
    }

    /// Kernel limits on the data block size: 64 KiB to 1 GiB, in multiples of 64 KiB
    /// (DATA_DEV_BLOCK_SIZE_MIN_SECTORS / _MAX_SECTORS in dm-thin.c).
    public static let minBlockSize: UInt64 = 64 << 10
    public static let maxBlockSize: UInt64 = 1 << 30

    public let dataPath: String
    public let metadataPath: String
    public let blockSize: UInt64
    public let options: Options
    public let readOnly: Bool
    let logger: Logger

    /// The data file, through the test hook when one is installed (`PoolIOHook`).
    let data: PoolDataFile
    let md: ThinMetadata
    let metaLock = Lock()
    let epoch = ReadWriteLock()
    /// Whether data was written since the last fdatasync of the data file (under `metaLock`):
    /// a commit with none skips that flush.
    var unsyncedData = false
    let stripes: [Lock] = (0..<256).map { _ in Lock() }
    var openCounts: [ThinDeviceID: Int] = [:]

    /// One writer per pool: two processes each caching the metadata would
    /// overwrite each other's commits. A writer holds an exclusive flock on the
    /// data file (or device) for as long as it is open; the lock dies with the
    /// process, so a crash never leaves a pool locked. Read-only openers take
    /// no lock: they read the last commit, which a writer never overwrites in
    /// place (only the superblock moves on).
    ///
    /// A lock can outlive its holder's close for an instant: a child forked by
    /// another thread shares the open file description until its exec closes
    /// it. So a busy lock is retried for a second before it counts as held.
    static func lockExclusively(_ fd: FileDescriptor, path: String) throws {
        var attempts = 0
        while flock(fd.rawValue, LOCK_EX | LOCK_NB) != 0 {
            if errno == EINTR { continue }
            if errno == EWOULDBLOCK && attempts < 20 {
                attempts += 1
                usleep(50_000)
                continue
            }
            if errno == EWOULDBLOCK {
                throw ThinPoolError.heldByAnotherProcess(data: path)
            }
            throw ThinPoolError.io(operation: "flock", path: path, errno: Errno(rawValue: errno))
        }
    }

    private init(dataPath: String, metadataPath: String, data: FileDescriptor, md: ThinMetadata,
                 options: Options, readOnly: Bool, logger: Logger) {
        self.dataPath = dataPath
        self.metadataPath = metadataPath
        self.data = PoolDataFile(fd: data, hook: PoolIOHooks.hook(dataPath: dataPath))
        self.md = md
        self.blockSize = UInt64(md.dataBlockSize) * 512
        self.options = options
        self.readOnly = readOnly
        self.logger = logger
    }

    private let closeLock = Lock()
    private var isClosed = false

    deinit { if !isClosed { try? data.close() } }

    /// Commits (a writer) and closes the data file, which releases the writer's flock at once
    /// rather than whenever the last reference goes. Later I/O fails. Idempotent.
    public func close() throws {
        let first = closeLock.withLock { () -> Bool in
            defer { isClosed = true }
            return !isClosed
        }
        guard first else { return }
        defer { try? data.close() }
        // Metadata gone read-only (needs_check) has nothing it may commit: closing still succeeds.
        if !readOnly, metaLock.withLock({ md.mode == .readWrite }) { try commit() }
    }

    public static func validateBlockSize(_ blockSize: UInt64) throws(ThinPoolError) {
        guard blockSize >= minBlockSize, blockSize <= maxBlockSize, blockSize % minBlockSize == 0 else {
            throw .invalidConfiguration("block size \(ByteSize.format(blockSize)) is invalid: it must be 64K to 1G, a multiple of 64K")
        }
    }

    /// Creates a pool: sparse data and metadata files (or existing block devices), and fresh metadata.
    public static func create(dataPath: String, metadataPath: String, dataSize: UInt64, metadataSize: UInt64,
                              blockSize: UInt64, options: Options = Options(),
                              logger: Logger = Logger(label: "thinfs.pool")) throws -> UserspaceThinPool {
        try validateBlockSize(blockSize)
        guard dataSize >= blockSize, dataSize % blockSize == 0 else {
            throw ThinPoolError.invalidConfiguration("data size \(dataSize) is not a positive multiple of the block size \(ByteSize.format(blockSize))")
        }
        guard metadataSize % 4096 == 0, metadataSize >= 2 << 20 else {
            throw ThinPoolError.invalidConfiguration("metadata size \(metadataSize) must be at least 2M and a multiple of 4K")
        }
        let dataFD = try createBacking(dataPath, size: dataSize)
        do {
            try lockExclusively(dataFD, path: dataPath)
            let metaFD = try createBacking(metadataPath, size: metadataSize)
            try? metaFD.close()
        } catch {
            try? dataFD.close()
            throw error
        }
        let storage = hooked(try FileMetadataStorage(path: metadataPath), dataPath: dataPath)
        let md = try ThinMetadata.format(storage: storage, dataBlockSize: UInt32(blockSize / 512), nrDataBlocks: dataSize / blockSize)
        logger.info("created thin pool", metadata: ["pool.data": "\(dataPath)", "pool.metadata": "\(metadataPath)",
                                                    "pool.block_size": "\(blockSize)"])
        return UserspaceThinPool(dataPath: dataPath, metadataPath: metadataPath, data: dataFD, md: md,
                                 options: options, readOnly: false, logger: logger)
    }

    /// Makes a new sparse file of `size`, or checks that an existing block device is large enough.
    /// An existing regular file is refused, so that nothing stored is overwritten.
    private static func createBacking(_ path: String, size: UInt64) throws -> FileDescriptor {
        var st = stat()
        if stat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFBLK else {
                throw ThinPoolError.invalidConfiguration("\(path) already exists; remove it, or adopt an existing pool with 'thinfs pool open'")
            }
            let fd = try openFD(path, readOnly: false)
            let devSize = UInt64(try fd.seek(offset: 0, from: .end))
            guard devSize >= size else {
                try? fd.close()
                throw ThinPoolError.invalidConfiguration("block device \(path) has \(devSize) bytes, \(size) are needed")
            }
            return fd
        }
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(FilePath(path), .readWrite, options: [.create, .exclusiveCreate, .closeOnExec],
                                         permissions: [.ownerReadWrite])
        } catch let e as Errno {
            throw ThinPoolError.io(operation: "create", path: path, errno: e)
        }
        try fd.truncate(to: size, path: path)
        return fd
    }

    /// The metadata file under the test hook installed for the pool's data file, if any.
    private static func hooked(_ storage: MetadataStorage, dataPath: String) -> MetadataStorage {
        PoolIOHooks.hook(dataPath: dataPath).map { HookedMetadataStorage(storage, hook: $0) } ?? storage
    }

    static func openFD(_ path: String, readOnly: Bool) throws -> FileDescriptor {
        do {
            return try FileDescriptor.open(FilePath(path), readOnly ? .readOnly : .readWrite, options: [.closeOnExec])
        } catch let e as Errno {
            throw ThinPoolError.io(operation: "open", path: path, errno: e)
        }
    }

    /// Opens an existing pool without changing it (nothing is written until a change is committed).
    public static func open(dataPath: String, metadataPath: String, options: Options = Options(), readOnly: Bool = false,
                            logger: Logger = Logger(label: "thinfs.pool")) throws -> UserspaceThinPool {
        let dataFD = try openFD(dataPath, readOnly: readOnly)
        if !readOnly {
            do { try lockExclusively(dataFD, path: dataPath) } catch {
                try? dataFD.close()
                throw error
            }
        }
        let storage: FileMetadataStorage
        do { storage = try FileMetadataStorage(path: metadataPath, readOnly: readOnly) } catch {
            try? dataFD.close()
            throw error
        }
        let md: ThinMetadata
        do {
            md = try ThinMetadata.open(storage: hooked(storage, dataPath: dataPath))
        } catch {
            try? dataFD.close()
            throw ThinPoolError.invalidConfiguration("\(metadataPath): \(error)")
        }
        let dataSize = UInt64((try? dataFD.seek(offset: 0, from: .end)) ?? 0)
        let needed = md.nrDataBlocks * UInt64(md.dataBlockSize) * 512
        guard dataSize >= needed else {
            try? dataFD.close()
            throw ThinPoolError.invalidConfiguration("data device \(dataPath) has \(dataSize) bytes; the metadata describes \(md.nrDataBlocks) blocks of \(UInt64(md.dataBlockSize) * 512) bytes (\(needed) bytes)")
        }
        return UserspaceThinPool(dataPath: dataPath, metadataPath: metadataPath, data: dataFD, md: md,
                                 options: options, readOnly: readOnly, logger: logger)
    }

    // MARK: Messages

    public func message(_ message: PoolMessage) throws { try messages([message]) }

    /// Sends `messages` in order and commits them once, together: a change and the
    /// `set_transaction_id` that journals it cost one commit, not one each. The kernel's dm-thin
    /// commits after every message, so with it a crash can fall between the two; here it cannot.
    /// If a message fails, the ones before it are committed, as if each had been sent alone, and
    /// its error is thrown; one that fails first commits nothing.
    public func messages(_ messages: [PoolMessage]) throws {
        try requireWritable()
        let sent = try epoch.withWriteLock {
            try metaLock.withLock {
                try wrap { () -> Int in
                    var sent = 0
                    var failure: (any Error)?
                    for message in messages {
                        do { try apply(message) } catch { failure = error; break }
                        sent += 1
                    }
                    if sent > 0 { try commitLocked() }
                    if let failure { throw failure }
                    return sent
                }
            }
        }
        for message in messages.prefix(sent) { logger.info("pool message", metadata: ["pool.message": "\(message)"]) }
    }

    /// One message's change, under `metaLock`; the caller commits.
    private func apply(_ message: PoolMessage) throws {
        switch message {
        case .createThin(let id): try md.createThin(id)
        case .createSnap(let id, let origin): try md.createSnap(id, origin: origin)
        case .delete(let id):
            if let n = openCounts[id], n > 0 { throw ThinPoolError.deviceBusy(id, openCount: n) }
            try md.delete(id)
        case .setTransactionID(let current, let new): try md.setTransactionID(current: current, new: new)
        case .reserveMetadataSnap: try md.reserveMetadataSnap()
        case .releaseMetadataSnap: try md.releaseMetadataSnap()
        }
    }

    public func deviceExists(_ id: ThinDeviceID) throws -> Bool { metaLock.withLock { md.exists(id) } }
    public func deviceIDs() throws -> [ThinDeviceID] { metaLock.withLock { md.deviceIDs } }

    public func deviceDetails() throws -> [ThinDeviceID: DeviceDetails] {
        metaLock.withLock {
            Dictionary(uniqueKeysWithValues: md.deviceIDs.compactMap { id in md.details(id).map { (id, $0) } })
        }
    }

    public func mappedDataBlocks() throws -> [ThinDeviceID: [UInt64]] {
        try withMetadata { md in
            var result: [ThinDeviceID: [UInt64]] = [:]
            for id in md.deviceIDs {
                var blocks: [UInt64] = []
                try md.mappings(id) { _, bt in
                    blocks.append(bt.block)
                    return true
                }
                result[id] = blocks
            }
            return result
        }
    }

    /// Only this process reaches the pool's devices (the data file's flock).
    public func externalUse(_ id: ThinDeviceID) throws -> String? { nil }

    public func details(_ id: ThinDeviceID) throws -> DeviceDetails {
        try metaLock.withLock {
            guard let d = md.details(id) else { throw ThinPoolError.message(.unknownDevice(id)) }
            return d
        }
    }

    // MARK: The reserve

    /// Data blocks that writes of file data leave free (`write(_:_:at:keepingReserve:)`): 16 MiB,
    /// at least 8 blocks, at most an eighth of the pool.
    ///
    /// Under the atomic-commit policy, rewriting a block the last commit references takes a new
    /// block until the next commit frees the old one, so even ext4 metadata already in the pool
    /// (bitmaps, group descriptors, inode tables, the blocks a container shares with its image)
    /// needs free blocks to change. Without a reserve, the file data that filled the pool left
    /// ext4 unable to write back the allocation it had made for that data, or to free it:
    /// `rm` failed with ENOSPC, and a volume closed then left bitmaps and group descriptors
    /// behind on the device. The kernel's dm-thin overwrites such blocks in place and needs no
    /// reserve. A metadata write-back changes a few blocks per commit, far fewer than this.
    public static func reservedDataBlocks(nrDataBlocks: UInt64, blockSize: UInt64) -> UInt64 {
        min(max((16 << 20) / blockSize, 8), nrDataBlocks / 8)
    }

    /// Data blocks freed since the last commit (discards, deletes) become allocatable at the next.
    public var spaceFreedAtCommit: Bool { metaLock.withLock { md.dataSM.nrFreedSinceCommit > 0 } }

    // MARK: Commit

    public func commit() throws {
        try requireWritable()
        try epoch.withWriteLock { try metaLock.withLock { try wrap { try commitLocked() } } }
    }

    /// Makes everything written so far durable, with the fewest host flushes in a row.
    ///
    /// **Ordering** (dm-thin's rule): the superblock is the commit point, and no superblock may
    /// become durable before the blocks it points at, or a power cut could leave a durable
    /// superblock over metadata or data blocks that never reached the disk. So:
    ///
    /// 1. the data file's fdatasync (on another thread) and, meanwhile, the metadata blocks'
    ///    writes and the metadata file's fdatasync. Both must end before step 2, in either
    ///    order: `beforeSuperblock` waits for the data flush, after the metadata flush.
    /// 2. the superblock, in one write that returns once it is durable (`writeNow`: an `O_DSYNC`
    ///    descriptor, a FUA write on a device that has FUA). It flushes nothing else, and needs
    ///    nothing else: everything it points at is durable since step 1. A cut during it leaves
    ///    the old superblock (the previous commit, whose blocks this transaction never
    ///    overwrote: shadow paging, and atomic commit for data) or the new one, whole or torn;
    ///    a torn one fails its checksum, as after a cut during the pwrite and fdatasync it
    ///    replaces.
    ///
    /// So a commit waits for two host flushes in a row, the second of them a single block's.
    ///
    /// A commit with nothing to write (a second fsync) writes and flushes nothing. One with data
    /// written but no metadata change (in-place writes into blocks the last commit already maps,
    /// without atomic commit) needs only step 1's data flush: the superblock on disk already
    /// points at those blocks, and would be written again byte for byte. If that flush fails,
    /// the commit path below runs with the failure, so that the pool turns read-only with
    /// needs_check as for any failed data flush.
    private func commitLocked() throws {
        // Under the epoch's write lock and `metaLock` (commit): no write is between its flag and its pwrite.
        let syncData = unsyncedData
        let metadataChanged = md.commitWouldWrite
        guard syncData || metadataChanged else { return }
        var dataFlushFailure: (any Error)?
        if syncData && !metadataChanged {
            do {
                try data.dataSync(path: dataPath)
                unsyncedData = false
                return
            } catch {
                dataFlushFailure = error
            }
        }
        let dataSynced = DispatchSemaphore(value: 0)
        let dataError = Mutex<(any Error)?>(dataFlushFailure)
        if syncData && dataFlushFailure == nil {
            let (fd, path) = (data, dataPath)
            DispatchQueue.global(qos: .userInitiated).async {
                do { try fd.dataSync(path: path) } catch { dataError.withLock { $0 = error } }
                dataSynced.signal()
            }
        } else if syncData {
            dataSynced.signal()
        }
        try md.commit(beforeSuperblock: { () throws(MetadataError) in
            guard syncData else { return }
            dataSynced.wait()
            guard let e = dataError.withLock({ $0 }) else { return }
            if case ThinPoolError.io(_, _, let errno) = e { throw MetadataError.io(operation: "fdatasync", path: dataPath, errno: errno.rawValue) }
            throw MetadataError.io(operation: "fdatasync", path: dataPath, errno: EIO)
        })
        unsyncedData = false
    }

    /// Throws away everything since the last commit (a crash, in tests).
    public func abortTransaction() throws {
        try epoch.withWriteLock { try metaLock.withLock { try wrap { try md.abort() } } }
    }

    // MARK: Status

    public func status() throws -> PoolStatus {
        metaLock.withLock {
            // The pool's own mode: opening it read-only to inspect it does not make it "ro".
            let readOnlyReason: String? = { if case .readOnly(let why) = md.mode { return why }; return nil }()
            let metadataReadOnly = readOnlyReason != nil
            let mode: PoolStatus.Mode = metadataReadOnly ? .ro : (md.dataSM.nrFree == 0 ? .outOfDataSpace : .rw)
            return PoolStatus(transactionID: md.transactionID,
                              usedMetadataBlocks: PoolStatus.reportedUsedMetadataBlocks(allocated: md.usedMetadataBlocks,
                                                                                        total: md.nrMetadataBlocks),
                              totalMetadataBlocks: md.nrMetadataBlocks, usedDataBlocks: md.usedDataBlocks,
                              totalDataBlocks: md.nrDataBlocks, heldMetadataRoot: md.heldRoot == 0 ? nil : md.heldRoot,
                              mode: mode, discard: "no_discard_passdown", errorIfNoSpace: true, needsCheck: md.needsCheck,
                              metadataLowWatermark: PoolStatus.metadataLowWatermark(totalMetadataBlocks: md.nrMetadataBlocks),
                              dataBlockSize: blockSize, readOnlyReason: readOnlyReason)
        }
    }

    public func deviceStatus(_ id: ThinDeviceID) throws -> ThinDeviceStatus {
        try metaLock.withLock {
            try wrap {
                guard let d = md.details(id) else { throw ThinPoolError.message(.unknownDevice(id)) }
                let sectorsPerBlock = blockSize / 512
                let highest = try md.highestMapped(id)
                return ThinDeviceStatus(mappedSectors: d.mappedBlocks * sectorsPerBlock,
                                        highestMappedSector: highest.map { ($0 + 1) * sectorsPerBlock - 1 })
            }
        }
    }

    /// The metadata as thin_dump prints it.
    public func dumpXML(metadataSnapshot: Bool = false) throws -> String {
        try metaLock.withLock { try wrap { try md.dumpXML(metadataSnapshot: metadataSnapshot) } }
    }

    /// Runs a closure with exclusive access to the metadata (checkers, tests).
    public func withMetadata<T>(_ body: (ThinMetadata) throws -> T) throws -> T {
        try epoch.withWriteLock { try metaLock.withLock { try wrap { try body(md) } } }
    }

    // MARK: Resize

    /// Grows the data file and the data space map, online. Shrinking is refused.
    public func resize(dataBytes: UInt64) throws {
        try requireWritable()
        guard dataBytes % blockSize == 0 else {
            throw ThinPoolError.invalidConfiguration("data size \(dataBytes) is not a multiple of the block size \(ByteSize.format(blockSize))")
        }
        let blocks = dataBytes / blockSize
        try epoch.withWriteLock {
            try metaLock.withLock {
                guard blocks >= md.nrDataBlocks else {
                    throw ThinPoolError.invalidConfiguration("cannot shrink the pool from \(md.nrDataBlocks * blockSize) to \(dataBytes) bytes: thin pools only grow")
                }
                var st = stat()
                if fstat(data.rawValue, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, UInt64(st.st_size) < dataBytes {
                    try data.truncate(to: dataBytes, path: dataPath)
                } else {
                    let size = UInt64(try data.seek(offset: 0, from: .end))
                    guard size >= dataBytes else {
                        throw ThinPoolError.invalidConfiguration("data device \(dataPath) has only \(size) bytes")
                    }
                }
                try wrap { try md.resizeData(nrBlocks: blocks) }
            }
        }
        logger.info("resized pool", metadata: ["pool.data_blocks": "\(blocks)"])
    }

    // MARK: Devices

    public func openDevice(_ id: ThinDeviceID, size: UInt64 = ThinDevice.maximumSize) throws -> BlockDevice {
        try metaLock.withLock {
            guard md.exists(id) else { throw ThinPoolError.message(.unknownDevice(id)) }
            openCounts[id, default: 0] += 1
        }
        return ThinDevice(pool: self, id: id, size: size)
    }

    func closeDevice(_ id: ThinDeviceID) {
        metaLock.withLock {
            openCounts[id, default: 1] -= 1
            if openCounts[id] == 0 { openCounts[id] = nil }
        }
    }

    func requireWritable() throws(ThinPoolError) {
        if readOnly { throw .readOnly("opened read-only") }
    }

    /// Maps errors of the metadata layer into pool errors.
    func wrap<T>(_ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let e as MetadataError {
            if case .readOnly(let why) = e { throw ThinPoolError.readOnly(why) }
            throw ThinPoolError.metadata(e)
        } catch let e as ThinMetadata.MessageError {
            throw ThinPoolError.message(e)
        }
    }
}
