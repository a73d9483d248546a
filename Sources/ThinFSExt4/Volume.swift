internal import CExt2fs
import Foundation
import Logging
import SystemPackage
import ThinFSCore

/// An ext4 filesystem on any `BlockDevice`, read and written in userspace
/// through libext2fs. ThinFSExt4 is the only module that imports CExt2fs.
///
/// ## The io_manager
/// libext2fs reaches its device through an `io_manager`: a table of C
/// callbacks (open, read_blk64, write_blk64, flush, discard, ...) that get an
/// `io_channel`. `blockDeviceIOManager` implements that table over a Swift
/// `BlockDevice`; `ext2fs_open2` names the device with a key of
/// `ChannelRegistry`, and the channel's `private_data` holds the device.
/// A flush of the channel is a flush of the device: on a thin device, a pool
/// commit.
///
/// ## Serialization
/// libext2fs is not thread-safe: a filesystem handle keeps block and inode
/// caches, bitmaps and a dirty superblock with no locking. Every call that
/// reaches `fs` runs under `lock`, so one thread at a time owns the handle;
/// FUSE threads queue on it. The bytes of file data move outside it: reads
/// map under the lock and read the device without it (`read`), and writes of
/// 64 KiB or more allocate under it, write their whole blocks without it and
/// finish under it again (WritesInFlight.swift, with its invariants and lock order).
public final class Volume: FileSystemVolume, @unchecked Sendable {
    public let device: BlockDevice
    public let isReadOnly: Bool
    public var rootInode: UInt64 { UInt64(EXT2_ROOT_INO) }
    let logger: Logger

    let lock = Lock()
    var fs: ext2_filsys?
    let channelName: String
    /// Counts the reopenings of `fs` (`growFilesystem`): a read planned on an earlier handle is
    /// redone under the lock, as after a block free, since its block numbers came from there.
    var handleEpoch: UInt64 = 0
    /// Open handles per inode, and inodes whose last link went while open or held (freed once
    /// neither: `freeIfUnheld`).
    var openCounts: [UInt64: Int] = [:]
    var orphans: Set<UInt64> = []
    /// Kernel references per inode (`remember`/`forget`), from FUSE servers that see no opens: such
    /// an inode may be open in a process. Under `heldLock`, a leaf lock taken alone or inside `lock`,
    /// so that a LOOKUP's `remember` never waits for the volume's I/O.
    let heldLock = Lock()
    var held: [UInt64: Int] = [:]
    /// Inodes known to hold no extended attribute, so that `getxattr` answers ENODATA without
    /// `lock`: the kernel asks for `security.capability` before every write(2), and would otherwise
    /// wait behind the WRITEs that hold the volume's lock. Under `xattrFreeLock`, a leaf lock taken
    /// alone or inside `lock`. The invariants are in Volume+Xattr.swift ("Attribute-free inodes").
    let xattrFreeLock = Lock()
    var xattrFree: Set<UInt64> = []
    /// Held shared by writes whose data goes to the device outside `lock`, and exclusively,
    /// before `lock`, by what must not run between a write's allocation and its size update:
    /// commits, size changes, fallocate, resize (WritesInFlight.swift).
    let dataGate = ReadWriteLock(preferringWriters: true)
    /// The byte ranges writes are working on (WritesInFlight.swift).
    let writesInFlight = WritesInFlight()
    /// Name → inode per directory, changed with the directory under `lock` (DirectoryCache.swift).
    var directories = DirectoryCache()
    /// Directories this volume grew by a block, to be given an htree index where they stop
    /// changing (`indexGrownDirectories`, Volume+DirectoryIndex.swift).
    var grownDirectories: Set<UInt64> = []
    /// The directory whose blocks `buildIndex` is rewriting, from its first rewritten block to
    /// its index flag: a failure meanwhile leaves that directory inconsistent.
    var halfIndexed: UInt64?
    var nextGeneration = UInt32.random(in: 0...UInt32.max)

    /// Group commit for a volume that commits its own device (no `commitHook`: `thinfs-mount`),
    /// as `VolumeGroup` does for its members: fsyncs asked for (`fsyncRequested`) and the highest
    /// one a finished flush covered (`fsyncCovered`), under `fsyncTickets`. A leaf lock: nothing
    /// is taken while it is held.
    let fsyncTickets = Lock()
    var fsyncRequested: UInt64 = 0
    var fsyncCovered: UInt64 = 0

    /// What `fsync` runs after libext2fs's state is on the device, outside the lock: for a volume
    /// in a `VolumeGroup`, the group's commit (the device's own flush then commits nothing).
    let commitHook: (@Sendable () throws -> Void)?

    /// Opens the ext4 on `device`. Read-only volumes never write to it.
    ///
    /// `commit`, when given, is called by every `fsync` after the filesystem's state has been
    /// written to the device and the volume's lock released: see `VolumeGroup`.
    public init(device: BlockDevice, readOnly: Bool, logger: Logger = Logger(label: "thinfs.volume"),
                commit: (@Sendable () throws -> Void)? = nil) throws {
        _ = Self.errorTable
        self.commitHook = commit
        self.device = device
        self.isReadOnly = readOnly
        self.logger = logger
        channelName = ChannelRegistry.shared.register(device)
        do {
            fs = try Self.openHandle(channelName, readOnly: readOnly)
        } catch {
            ChannelRegistry.shared.unregister(channelName)
            throw error
        }
    }

    /// Opens the ext4 on the device registered as `channelName`.
    static func openHandle(_ channelName: String, readOnly: Bool) throws(VolumeError) -> ext2_filsys {
        var handle: ext2_filsys?
        var flags = EXT2_FLAG_64BITS | EXT2_FLAG_SKIP_MMP
        if !readOnly { flags |= EXT2_FLAG_RW }
        let rc = ext2fs_open2(channelName, nil, flags, 0, 0, blockDeviceIOManager, &handle)
        guard rc == 0, let handle else {
            throw VolumeError(Self.errno(rc), "the device holds no ext4 filesystem libext2fs can open (\(Self.message(rc)))")
        }
        // Modes come from callers; libext2fs must not mask them.
        handle.pointee.umask = 0
        if !readOnly {
            // As kernel ext4 in normal operation: the primary superblock and descriptors only.
            // Otherwise every flush that changed a free count rewrote the backup copies in the
            // sparse groups too, each in a pool block of its own (mapped anew under atomic
            // commit); e2fsck reads them only when the primary is damaged.
            handle.pointee.flags |= EXT2_FLAG_MASTER_SB_ONLY
            let rb = ext2fs_read_bitmaps(handle)
            guard rb == 0 else {
                var opened: ext2_filsys? = handle
                ext2fs_close_free(&opened)
                throw VolumeError(Self.errno(rb), "cannot read the allocation bitmaps (\(Self.message(rb)))")
            }
            // Unlocked file reads must learn of every block freed while their device reads ran.
            ext2fs_set_block_alloc_stats_callback(handle, countBlockFree, nil)
            ext2fs_set_block_alloc_stats_range_callback(handle, countBlockRangeFree, nil)
            ext2fs_set_new_range_callback(handle, recordNewRange, nil)
        }
        return handle
    }

    /// Lets `body` change the filesystem under this open volume (`thinfs layer resize` of a
    /// mounted layer: resize2fs grows it), then opens it again. libext2fs's state is written
    /// and the handle closed first, so `body` sees the whole filesystem on the device; the
    /// volume's lock is held throughout, so every FUSE request waits, and none fails. What the
    /// volume keeps about inodes (open counts, unlinked-but-open inodes, generations) stays:
    /// growing an ext4 keeps every inode's number. The directory cache goes (it is rebuilt as
    /// directories are read again), and reads planned on the old handle are redone
    /// (`handleEpoch`), since resize2fs may move blocks to make room for new group descriptors.
    /// If `body` fails, the filesystem is opened again as it is.
    public func reopen(around body: () throws -> Void) throws {
        try dataGate.withWriteLock { try reopenQuiesced(around: body) }
    }

    private func reopenQuiesced(around body: () throws -> Void) throws {
        lock.lock()
        defer { lock.unlock() }
        guard fs != nil else { throw VolumeError(.badFileDescriptor, "the volume is closed") }
        directories.removeAll()
        xattrFreeLock.withLock { xattrFree.removeAll() }
        handleEpoch &+= 1
        let rc = ext2fs_close_free(&fs)
        var failure: Swift.Error? = rc == 0 ? nil : VolumeError(Self.errno(rc), "closing the filesystem (\(Self.message(rc)))")
        if failure == nil {
            do { try body() } catch { failure = error }
        }
        do {
            fs = try Self.openHandle(channelName, readOnly: isReadOnly)
        } catch {
            logger.error("the filesystem could not be opened again; the volume answers EBADF", metadata: ["error": "\(error)"])
            throw failure ?? error
        }
        if let failure { throw failure }
    }

    /// No indexing here (`close` does it): a volume dropped unclosed is on an error path.
    deinit { try? closeHandle() }

    /// The filesystem UUID of the ext4 on `device`, read without changing anything.
    public static func filesystemUUID(device: BlockDevice) throws -> String {
        let volume = try Volume(device: device, readOnly: true)
        defer { try? volume.close() }
        return try volume.withFS { fs throws(VolumeError) in
            let bytes = withUnsafeBytes(of: fs.pointee.super.pointee.s_uuid) { Array($0) }
            return UUID(uuid: (bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7], bytes[8],
                               bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15])).uuidString.lowercased()
        }
    }

    /// The libext2fs version, for `thinfs info`.
    public static var libraryVersion: String {
        var version: UnsafePointer<CChar>?
        var date: UnsafePointer<CChar>?
        _ = ext2fs_get_library_version(&version, &date)
        return version.map { String(cString: $0) } ?? "unknown"
    }

    /// Indexes the directories a read-write volume grew that nothing indexed yet
    /// (`indexBeforeClose`, Volume+DirectoryIndex.swift: a FUSE mount's), then writes everything
    /// back (superblock, bitmaps, inodes) and closes the filesystem. The handle is closed even
    /// when the indexing fails; the first failure is thrown.
    public func close() throws {
        var failure: Swift.Error?
        if !isReadOnly {
            do { try indexBeforeClose() } catch { failure = error }
        }
        do { try closeHandle() } catch { failure = failure ?? error }
        if let failure { throw failure }
    }

    /// Writes everything back (superblock, bitmaps, inodes) and closes the filesystem.
    func closeHandle() throws {
        try dataGate.withWriteLock { () throws(VolumeError) in try closeHandleQuiesced() }
    }

    private func closeHandleQuiesced() throws(VolumeError) {
        try lock.withLock { () throws(VolumeError) in
            guard fs != nil else { return }
            directories.removeAll()
            let rc = ext2fs_close_free(&fs)
            ChannelRegistry.shared.unregister(channelName)
            if rc != 0 { throw VolumeError(Self.errno(rc), "closing the filesystem (\(Self.message(rc)))") }
        }
    }

    // MARK: Errors

    /// com_err needs the ext2 table registered before it can name ext2 error codes.
    static let errorTable: Void = { initialize_ext2_error_table() }()

    /// libext2fs error codes are errno values or com_err codes of the ext2 table; the latter map to the errno
    /// a kernel filesystem returns in the same situation.
    static func errno(_ rc: errcode_t) -> Errno {
        if rc > 0 && rc < 4096 { return Errno(rawValue: Int32(rc)) }
        switch rc {
        case EXT2_ET_FILE_NOT_FOUND: return .noSuchFileOrDirectory
        case EXT2_ET_RO_FILSYS: return .readOnlyFileSystem
        case EXT2_ET_DIR_NO_SPACE, EXT2_ET_BLOCK_ALLOC_FAIL, EXT2_ET_INODE_ALLOC_FAIL, EXT2_ET_EA_NO_SPACE,
             EXT2_ET_INLINE_DATA_NO_SPACE, EXT2_ET_DIR_NO_SPACE_FOR_CSUM:
            return .noSpace
        case EXT2_ET_NO_MEMORY: return .noMemory
        case EXT2_ET_EA_KEY_NOT_FOUND: return .init(rawValue: ENODATA)
        case EXT2_ET_FILE_TOO_BIG: return .fileTooLarge
        case EXT2_ET_BAD_MAGIC, EXT2_ET_UNSUPP_FEATURE: return .invalidArgument
        default: return .ioError
        }
    }

    static func message(_ rc: errcode_t) -> String { String(cString: error_message(rc)) }

    func check(_ rc: errcode_t, _ context: @autoclosure () -> String) throws(VolumeError) {
        if rc != 0 { throw VolumeError(Self.errno(rc), "\(context()) (\(Self.message(rc)))") }
    }

    /// Runs `body` with the filesystem handle, holding the lock.
    func withFS<T>(_ body: (ext2_filsys) throws(VolumeError) -> T) throws(VolumeError) -> T {
        lock.lock()
        defer { lock.unlock() }
        guard let fs else { throw VolumeError(.badFileDescriptor, "the volume is closed") }
        return try body(fs)
    }

    /// `withFS` with no write's data in flight to the device outside the lock, and none starting
    /// until `body` returns: `dataGate`, exclusively, then the lock (WritesInFlight.swift).
    func withQuiescedFS<T>(_ body: (ext2_filsys) throws(VolumeError) -> T) throws(VolumeError) -> T {
        try dataGate.withWriteLock { () throws(VolumeError) -> T in try withFS(body) }
    }

    /// The block cache's blocks, clean and dirty (for tests: it grows while a full pool refuses
    /// write-backs and shrinks once they succeed).
    var cachedBlockCounts: (total: Int, dirty: Int) {
        get throws(VolumeError) { try withFS { fs throws(VolumeError) in channelState(fs.pointee.io).counts } }
    }

    /// The writes libext2fs and the bulk path have sent the block cache since the volume opened
    /// (for tests: a write's cost follows its requests, not its blocks).
    var channelWriteCount: Int {
        get throws(VolumeError) { try withFS { fs throws(VolumeError) in channelState(fs.pointee.io).writeCalls } }
    }

    /// The directory cache's hits, directory builds and entries (tests).
    var directoryCacheCounts: (hits: UInt64, builds: UInt64, entries: Int) {
        get throws(VolumeError) { try withFS { _ throws(VolumeError) in (directories.hits, directories.builds, directories.entryCount) } }
    }

    func requireWritable(_ op: String) throws(VolumeError) {
        if isReadOnly { throw VolumeError(.readOnlyFileSystem, "\(op): the volume is read-only") }
    }
}

extension Volume {
    // MARK: Lifetime of inodes, durability

    public func open(_ ino: UInt64) throws(VolumeError) {
        try withFS { fs throws(VolumeError) in
            _ = try readInode(fs, ino)
            openCounts[ino, default: 0] += 1
        }
    }

    public func release(_ ino: UInt64) {
        try? withFS { fs throws(VolumeError) in
            guard let n = openCounts[ino] else { return }
            if n > 1 {
                openCounts[ino] = n - 1
                return
            }
            openCounts[ino] = nil
            try freeIfUnheld(fs, ino)
        }
    }

    public func remember(_ ino: UInt64) {
        heldLock.withLock { held[ino, default: 0] += 1 }
    }

    public func forget(_ ino: UInt64) {
        let last = heldLock.withLock { () -> Bool in
            guard let n = held[ino] else { return false }
            held[ino] = n > 1 ? n - 1 : nil
            return n == 1
        }
        guard last else { return }
        do {
            try withFS { fs throws(VolumeError) in try freeIfUnheld(fs, ino) }
        } catch {
            logger.info("could not free an unlinked inode", metadata: ["ino": "\(ino)", "error": "\(error)"])
        }
    }

    /// Whether a kernel holds `ino` (`remember`).
    func isHeld(_ ino: UInt64) -> Bool { heldLock.withLock { held[ino] != nil } }

    /// Frees an unlinked inode once nothing holds it: no open handle, no kernel reference. Under `lock`.
    /// The held count is read again here, under `lock`, so a `forget` that raced a new reference
    /// (a `remember` after its count reached zero) frees nothing.
    func freeIfUnheld(_ fs: ext2_filsys, _ ino: UInt64) throws(VolumeError) {
        guard orphans.contains(ino), openCounts[ino] == nil, !isHeld(ino) else { return }
        try freeInode(fs, ino)
    }

    /// Writes libext2fs's dirty state (inode and block caches, bitmaps, superblock) and flushes the device.
    ///
    /// Without a commit hook, concurrent fsyncs share flushes: each takes a ticket before it
    /// queues on the lock, and a flush covers every ticket taken before it started, since what
    /// those callers wrote was in the volume by then (the kernel sends FSYNC once the WRITEs it
    /// covers have been answered). A caller whose ticket a finished flush covered returns
    /// without one of its own, even if other writes came in since: they are their own fsync's.
    public func fsync(_ ino: UInt64?) throws(VolumeError) {
        guard !isReadOnly else { return }
        guard let commitHook else {
            let ticket = fsyncTickets.withLock { () -> UInt64 in
                fsyncRequested += 1
                return fsyncRequested
            }
            try withQuiescedFS { fs throws(VolumeError) in
                if fsyncTickets.withLock({ fsyncCovered >= ticket }) { return }
                let covers = fsyncTickets.withLock { fsyncRequested }
                try flushFilesystem(fs)
                fsyncTickets.withLock { fsyncCovered = max(fsyncCovered, covers) }
            }
            return
        }
        try withQuiescedFS { fs throws(VolumeError) in try flushFilesystem(fs) }
        do { try commitHook() } catch { throw VolumeError(Errno(reporting: error), "committing the pool: \(error)") }
    }

    /// Writes libext2fs's dirty state to the device, then runs `body` still holding the volume's
    /// lock, so nothing in this filesystem changes until `body` returns. `VolumeGroup` nests this
    /// over its volumes around one pool commit.
    public func withFlushedState<T>(_ body: () throws -> T) throws -> T {
        try dataGate.withWriteLock {
            lock.lock()
            defer { lock.unlock() }
            if let fs, !isReadOnly { try flushFilesystem(fs) }
            return try body()
        }
    }

    /// libext2fs's dirty state to the device, then one flush of the device (on a thin device, a
    /// pool commit).
    ///
    /// Not `ext2fs_flush`, which writes the superblock, every group descriptor block and the
    /// backup superblocks even when none of them changed (for its `s_wtime`), and flushes the
    /// channel twice, before and after the primary superblock: through `thinfs-mount`, two pool
    /// commits per fsync, each mapping those blocks anew under atomic commit. Here the superblock
    /// and descriptors are written only when libext2fs marked them dirty (every allocation and
    /// free does, through its alloc stats), with libext2fs's own flushes off, and the channel is
    /// flushed once after them. That flush orders nothing less: a pool commit makes all that was
    /// written before it durable at once, and a crash before it leaves the last commit whole; on a
    /// device without atomic commit ext4 has no journal here, so no write order made a crash
    /// between the two flushes safe either.
    func flushFilesystem(_ fs: ext2_filsys) throws(VolumeError) {
        if fs.pointee.flags & (EXT2_FLAG_DIRTY | EXT2_FLAG_BB_DIRTY | EXT2_FLAG_IB_DIRTY) != 0 {
            try check(ext2fs_flush2(fs, EXT2_FLAG_FLUSH_NO_SYNC), "flushing the filesystem")
        }
        do { try channelState(fs.pointee.io).flush() } catch {
            throw VolumeError(Errno(reporting: error), "flushing the device: \(error)")
        }
    }
}
