internal import CExt2fs
import Foundation
import Logging
import SystemPackage
import ThinFSCore

/// An ext4 filesystem on any `BlockDevice`, read and written in userspace
/// through libext2fs. This is the only file that imports CExt2fs.
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
/// FUSE threads queue on it. Reads and writes of file data therefore
/// serialize too; this is the price of libext2fs.
public final class Volume: FileSystemVolume, @unchecked Sendable {
    public let device: BlockDevice
    public let isReadOnly: Bool
    public var rootInode: UInt64 { UInt64(EXT2_ROOT_INO) }
    let logger: Logger

    private let lock = Lock()
    private var fs: ext2_filsys?
    private let channelName: String
    /// Counts the reopenings of `fs` (`growFilesystem`): a read planned on an earlier handle is
    /// redone under the lock, as after a block free, since its block numbers came from there.
    private var handleEpoch: UInt64 = 0
    /// Open handles per inode, and inodes whose last link went while open (freed on the last release).
    private var openCounts: [UInt64: Int] = [:]
    private var orphans: Set<UInt64> = []
    /// Name → inode per directory, changed with the directory under `lock` (DirectoryCache.swift).
    private var directories = DirectoryCache()
    private var nextGeneration = UInt32.random(in: 0...UInt32.max)

    /// What `fsync` runs after libext2fs's state is on the device, outside the lock: for a volume
    /// in a `VolumeGroup`, the group's commit (the device's own flush then commits nothing).
    private let commitHook: (@Sendable () throws -> Void)?

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
    private static func openHandle(_ channelName: String, readOnly: Bool) throws(VolumeError) -> ext2_filsys {
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
        lock.lock()
        defer { lock.unlock() }
        guard fs != nil else { throw VolumeError(.badFileDescriptor, "the volume is closed") }
        directories.removeAll()
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

    deinit { try? close() }

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

    /// Writes everything back (superblock, bitmaps, inodes) and closes the filesystem.
    public func close() throws {
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
    private static let errorTable: Void = { initialize_ext2_error_table() }()

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

    private func check(_ rc: errcode_t, _ context: @autoclosure () -> String) throws(VolumeError) {
        if rc != 0 { throw VolumeError(Self.errno(rc), "\(context()) (\(Self.message(rc)))") }
    }

    /// Runs `body` with the filesystem handle, holding the lock.
    private func withFS<T>(_ body: (ext2_filsys) throws(VolumeError) -> T) throws(VolumeError) -> T {
        lock.lock()
        defer { lock.unlock() }
        guard let fs else { throw VolumeError(.badFileDescriptor, "the volume is closed") }
        return try body(fs)
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

    private func requireWritable(_ op: String) throws(VolumeError) {
        if isReadOnly { throw VolumeError(.readOnlyFileSystem, "\(op): the volume is read-only") }
    }

    // MARK: Inodes

    /// An inode's size in bytes (i_size with its high 32 bits).
    private func fileSize(_ inode: ext2_inode_large) -> UInt64 { UInt64(inode.i_size) | UInt64(inode.i_size_high) << 32 }

    private func readInode(_ fs: ext2_filsys, _ ino: UInt64) throws(VolumeError) -> ext2_inode_large {
        guard ino >= 1, ino <= UInt64(fs.pointee.super.pointee.s_inodes_count) else {
            throw VolumeError(.invalidArgument, "inode \(ino) is out of range")
        }
        var inode = ext2_inode_large()
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                ext2fs_read_inode_full(fs, ext2_ino_t(ino), $0, Int32(MemoryLayout<ext2_inode_large>.size))
            }
        }
        try check(rc, "reading inode \(ino)")
        guard inode.i_links_count > 0 || openCounts[ino] != nil || orphans.contains(ino) else {
            throw VolumeError(.noSuchFileOrDirectory, "inode \(ino) is not in use")
        }
        return inode
    }

    private func writeInode(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large) throws(VolumeError) {
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                ext2fs_write_inode_full(fs, ext2_ino_t(ino), $0, Int32(MemoryLayout<ext2_inode_large>.size))
            }
        }
        try check(rc, "writing inode \(ino)")
    }

    /// ext4 timestamps: 32 signed bits of seconds, and an "extra" word holding
    /// nanoseconds << 2 and two epoch bits that extend the seconds past 2038
    /// (Documentation/filesystems/ext4/inodes.rst, "Inode Timestamps").
    static func decodeTime(_ seconds: UInt32, _ extra: UInt32, hasExtra: Bool) -> Timestamp {
        var s = Int64(Int32(bitPattern: seconds))
        guard hasExtra else { return Timestamp(seconds: s, nanoseconds: 0) }
        s += Int64(extra & 3) << 32
        return Timestamp(seconds: s, nanoseconds: extra >> 2)
    }

    static func encodeTime(_ t: Timestamp) -> (UInt32, UInt32) {
        let low = UInt32(truncatingIfNeeded: t.seconds)
        let epoch = UInt32(truncatingIfNeeded: (t.seconds - Int64(Int32(bitPattern: low))) >> 32) & 3
        return (low, (min(t.nanoseconds, 999_999_999) << 2) | epoch)
    }

    /// The last second kernel ext4 can store with the epoch bits (fs/ext4/ext4.h
    /// EXT4_EXTRA_TIMESTAMP_MAX): 2^34 seconds from -2^31.
    static let extraTimeMax = (Int64(1) << 34) - 1 + Int64(Int32.min)

    /// A time as ext4 keeps it. When a time is set, kernel ext4 clamps the seconds to what the inode can
    /// store, [-2^31, EXT4_EXTRA_TIMESTAMP_MAX] with the extra words (else 32 signed bits), and drops the
    /// nanoseconds at either bound (fs/inode.c timestamp_truncate, with ext4's s_time_min/s_time_max).
    /// Encoding an out-of-range time instead would wrap it: 2^34 would read back as 0.
    static func clampTime(_ t: Timestamp, hasExtra: Bool) -> Timestamp {
        let low = Int64(Int32.min), high = hasExtra ? extraTimeMax : Int64(Int32.max)
        let seconds = min(max(t.seconds, low), high)
        return Timestamp(seconds: seconds, nanoseconds: seconds == low || seconds == high ? 0 : t.nanoseconds)
    }

    package static func now() -> Timestamp {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Timestamp(seconds: Int64(ts.tv_sec), nanoseconds: UInt32(ts.tv_nsec))
    }

    private static let extraSize = UInt16(MemoryLayout<ext2_inode_large>.size - Int(EXT2_GOOD_OLD_INODE_SIZE))

    private func hasExtra(_ inode: ext2_inode_large) -> Bool { inode.i_extra_isize >= 24 }

    /// Every time written to an inode passes here, clamped to what that inode can store.
    private func setTimes(_ inode: inout ext2_inode_large, atime: Timestamp? = nil, mtime: Timestamp? = nil,
                          ctime: Timestamp? = nil, crtime: Timestamp? = nil) {
        let extra = hasExtra(inode)
        func encode(_ t: Timestamp) -> (UInt32, UInt32) { Self.encodeTime(Self.clampTime(t, hasExtra: extra)) }
        if let t = atime { (inode.i_atime, inode.i_atime_extra) = encode(t) }
        if let t = mtime { (inode.i_mtime, inode.i_mtime_extra) = encode(t) }
        if let t = ctime { (inode.i_ctime, inode.i_ctime_extra) = encode(t) }
        if let t = crtime { (inode.i_crtime, inode.i_crtime_extra) = encode(t) }
    }

    private func attributes(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large) -> FileAttributes {
        let extra = hasExtra(inode)
        let mode = UInt32(inode.i_mode)
        var rdev: UInt64 = 0
        if Self.isDevice(mode) {
            // Old encoding (major << 8 | minor) in i_block[0], else the new one in i_block[1] (fs/ext4/inode.c).
            let b0 = inode.i_block.0, b1 = inode.i_block.1
            if b0 != 0 {
                rdev = Self.makedev(major: (b0 >> 8) & 0xff, minor: b0 & 0xff)
            } else {
                rdev = Self.makedev(major: (b1 & 0xfff00) >> 8, minor: (b1 & 0xff) | ((b1 >> 12) & 0xfff00))
            }
        }
        let blocks = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_get_stat_i_blocks(fs, $0) }
        }
        return FileAttributes(
            ino: ino, mode: mode, nlink: UInt32(inode.i_links_count),
            uid: Self.uid(inode), gid: Self.gid(inode),
            rdev: rdev, size: fileSize(inode), blocks: UInt64(blocks),
            atime: Self.decodeTime(inode.i_atime, inode.i_atime_extra, hasExtra: extra),
            mtime: Self.decodeTime(inode.i_mtime, inode.i_mtime_extra, hasExtra: extra),
            ctime: Self.decodeTime(inode.i_ctime, inode.i_ctime_extra, hasExtra: extra),
            blockSize: UInt32(fs.pointee.blocksize), generation: inode.i_generation)
    }

    private static func uid(_ inode: ext2_inode_large) -> UInt32 { UInt32(inode.i_uid) | UInt32(inode.osd2.linux2.l_i_uid_high) << 16 }
    private static func gid(_ inode: ext2_inode_large) -> UInt32 { UInt32(inode.i_gid) | UInt32(inode.osd2.linux2.l_i_gid_high) << 16 }

    /// Splits 32-bit ids into ext4's low and high 16-bit fields.
    private static func setOwner(_ inode: inout ext2_inode_large, uid: UInt32? = nil, gid: UInt32? = nil) {
        if let uid {
            inode.i_uid = UInt16(truncatingIfNeeded: uid)
            inode.osd2.linux2.l_i_uid_high = UInt16(truncatingIfNeeded: uid >> 16)
        }
        if let gid {
            inode.i_gid = UInt16(truncatingIfNeeded: gid)
            inode.osd2.linux2.l_i_gid_high = UInt16(truncatingIfNeeded: gid >> 16)
        }
    }

    /// The group of a new entry: a set-group-ID directory passes its own on (inode_init_owner).
    private static func newGroup(_ parent: ext2_inode_large, _ owner: Owner) -> (gid: UInt32, setgidDirectory: Bool) {
        UInt32(parent.i_mode) & 0o2000 != 0 ? (gid(parent), true) : (owner.gid, false)
    }

    static func isDevice(_ mode: UInt32) -> Bool {
        let t = mode & 0o170000
        return t == 0o020000 || t == 0o060000
    }

    package static func makedev(major: UInt32, minor: UInt32) -> UInt64 {
        // glibc's encoding of dev_t.
        (UInt64(major & 0xfff) << 8) | (UInt64(major & ~0xfff) << 32) | UInt64(minor & 0xff) | (UInt64(minor & ~0xff) << 12)
    }

    package static func major(_ dev: UInt64) -> UInt32 { UInt32(((dev >> 8) & 0xfff) | ((dev >> 32) & ~0xfff)) }
    package static func minor(_ dev: UInt64) -> UInt32 { UInt32((dev & 0xff) | ((dev >> 12) & ~0xff)) }

    static func fileType(_ mode: UInt32) -> Int32 {
        switch mode & 0o170000 {
        case 0o100000: EXT2_FT_REG_FILE
        case 0o040000: EXT2_FT_DIR
        case 0o020000: EXT2_FT_CHRDEV
        case 0o060000: EXT2_FT_BLKDEV
        case 0o010000: EXT2_FT_FIFO
        case 0o140000: EXT2_FT_SOCK
        case 0o120000: EXT2_FT_SYMLINK
        default: EXT2_FT_UNKNOWN
        }
    }

    static func mode(fromFileType t: Int32) -> UInt32 {
        switch t {
        case EXT2_FT_REG_FILE: 0o100000
        case EXT2_FT_DIR: 0o040000
        case EXT2_FT_CHRDEV: 0o020000
        case EXT2_FT_BLKDEV: 0o060000
        case EXT2_FT_FIFO: 0o010000
        case EXT2_FT_SOCK: 0o140000
        case EXT2_FT_SYMLINK: 0o120000
        default: 0
        }
    }

    // MARK: Names

    static func checkName(_ name: String) throws(VolumeError) {
        guard !name.isEmpty, name != ".", name != "..", !name.contains("/"), !name.utf8.contains(0) else {
            throw VolumeError(.invalidArgument, "'\(name)' is not a valid file name")
        }
        guard name.utf8.count <= 255 else { throw VolumeError(.fileNameTooLong, "'\(name.prefix(32))...' is longer than 255 bytes") }
    }

    /// The inode `name` links to in `parent`, from the directory cache; a directory not yet
    /// cached is scanned once and cached whole, so the next lookups in it are hash probes.
    private func lookupIno(_ fs: ext2_filsys, _ parent: UInt64, _ name: String) throws(VolumeError) -> UInt64? {
        let bytes = Array(name.utf8)
        switch directories.lookup(parent, bytes) {
        case .found(let entry)?: return UInt64(entry.ino)
        case .absent?: return nil
        case nil: break
        }
        if !DirectoryCache.isDot(bytes) {
            let (listing, layout) = try scanDirectory(fs, parent)
            if directories.store(parent, listing, layout: layout) {
                return directories.lookup(parent, bytes).flatMap { if case .found(let e) = $0 { UInt64(e.ino) } else { nil } }
            }
        }
        // "." and "..", found at once at the start of the first block, and directories too big to cache.
        var ino: ext2_ino_t = 0
        let rc = name.withCString { ext2fs_lookup(fs, ext2_ino_t(parent), $0, Int32(name.utf8.count), nil, &ino) }
        if rc == EXT2_ET_FILE_NOT_FOUND { return nil }
        try check(rc, "looking up '\(name)' in directory \(parent)")
        return UInt64(ino)
    }

    /// Every live entry of `dir`, in one pass over its blocks: what the directory cache is built
    /// from; and, for a plain directory, where each entry is and where there is room (the layout).
    private func scanDirectory(_ fs: ext2_filsys, _ dir: UInt64) throws(VolumeError)
        -> (entries: [(name: [UInt8], entry: DirectoryCache.Entry)], layout: DirectoryCache.Layout?) {
        var inode = try requireDirectory(fs, dir)
        if Self.isPlainDirectory(inode) {
            let (entries, layout) = try scanPlainDirectory(fs, dir, &inode)
            return (entries, layout)
        }
        final class Listing { var entries: [(name: [UInt8], entry: DirectoryCache.Entry)] = [] }
        let listing = Listing()
        let rc = withExtendedLifetime(listing) {
            ext2fs_dir_iterate2(fs, ext2_ino_t(dir), 0, nil, { _, _, dirent, _, _, _, priv in
                guard let dirent else { return 0 }
                let listing = Unmanaged<Listing>.fromOpaque(priv!).takeUnretainedValue()
                let length = Int(dirent.pointee.name_len & 0xff)
                let name = withUnsafeBytes(of: &dirent.pointee.name) { Array($0.prefix(length)) }
                listing.entries.append((name, .init(ino: dirent.pointee.inode, fileType: UInt8(truncatingIfNeeded: ext2fs_dirent_file_type(dirent)))))
                return 0
            }, Unmanaged.passUnretained(listing).toOpaque())
        }
        try check(rc, "reading directory \(dir)")
        return (listing.entries, nil)
    }

    // MARK: Directory blocks
    //
    // A directory without an htree index is a list of blocks, each a chain of records (inode,
    // rec_len, name_len, file_type, name) that covers the block up to its checksum tail
    // (metadata_csum). libext2fs's ext2fs_link looks for room by reading every block of such a
    // directory, and ext2fs_unlink for the name the same way, so a create or an unlink in a
    // directory of n entries cost O(n). The directory cache knows which block holds each name
    // and which blocks have room (DirectoryCache invariant 6), so these add and remove an entry
    // in one block: read with ext2fs_read_dir_block4 (which verifies the block's checksum), the
    // record changed with libext2fs's rec_len and name_len accessors, written with
    // ext2fs_write_dir_block4 (which sets the checksum). They change records as ext2fs_link,
    // ext2fs_unlink and kernel ext4 do (an insert takes the first record with room, splitting a
    // live record's slack or filling an empty one; a removal merges the record into the one before
    // it, or empties the block's first record), so live entries never move and readdir's
    // position cookies stay valid.

    /// Whether `inode` is a directory whose entries this file adds and removes itself: mapped by
    /// blocks, no htree index (its leaves are in hash order), no inline data, no casefolding or
    /// encryption (their records carry a hash).
    private static func isPlainDirectory(_ inode: ext2_inode_large) -> Bool {
        inode.i_flags & UInt32(EXT2_INDEX_FL | EXT4_INLINE_DATA_FL | EXT4_CASEFOLD_FL | EXT4_ENCRYPT_FL) == 0
    }

    /// One record of a directory block.
    private struct DirectoryRecord {
        var offset: Int
        var length: Int
        var ino: UInt32
        var nameLength: Int
        /// The longest record an insert can place here: a live record's slack, a free record's length.
        var room: Int { ino != 0 ? length - DirectoryCache.recordLength(nameLength: nameLength) : length }
    }

    /// The records of a directory block before its checksum tail, each checked as
    /// ext2fs_process_dir_block checks it, and whether the block may take new entries: with
    /// metadata_csum, only if it ends in a tail, which ext2fs_write_dir_block4 needs.
    private func directoryRecords(_ fs: ext2_filsys, _ dir: UInt64, _ block: UnsafeMutableRawBufferPointer,
                                  logical: UInt64) throws(VolumeError) -> (records: [DirectoryRecord], writable: Bool) {
        let size = block.count
        var end = size
        var writable = true
        if ext2fs_has_feature_metadata_csum(fs.pointee.super) != 0 {
            // struct ext2_dir_entry_tail: zero inode, rec_len 12, name_len 0 and file type 0xDE.
            let t = size - 12
            let hasTail = block.load(fromByteOffset: t, as: UInt32.self) == 0
                && UInt16(littleEndian: block.load(fromByteOffset: t + 4, as: UInt16.self)) == 12
                && UInt16(littleEndian: block.load(fromByteOffset: t + 6, as: UInt16.self)) == UInt16(EXT2_DIR_NAME_LEN_CSUM)
            if hasTail { end = t } else { writable = false }
        }
        var records: [DirectoryRecord] = []
        var offset = 0
        while offset < end {
            let dirent = (block.baseAddress! + offset).assumingMemoryBound(to: ext2_dir_entry.self)
            var length: UInt32 = 0
            try check(ext2fs_get_rec_len(fs, dirent, &length), "reading directory \(dir)")
            let nameLength = Int(ext2fs_dirent_name_len(dirent))
            guard offset + 8 <= end, length >= 8, length % 4 == 0, offset + Int(length) <= end,
                  Self.direntNameOffset + nameLength <= Int(length) else {
                throw VolumeError(Self.errno(errcode_t(EXT2_ET_DIR_CORRUPTED)),
                                  "directory \(dir) has a bad entry at offset \(offset) of its block \(logical)")
            }
            records.append(DirectoryRecord(offset: offset, length: Int(length), ino: dirent.pointee.inode, nameLength: nameLength))
            offset += Int(length)
        }
        return (records, writable)
    }

    /// The room a block offers an insert (0 when it takes none).
    private static func room(_ records: [DirectoryRecord], writable: Bool) -> Int {
        writable ? records.lazy.map(\.room).max() ?? 0 : 0
    }

    /// A plain directory's entries and layout, block by block.
    private func scanPlainDirectory(_ fs: ext2_filsys, _ dir: UInt64, _ inode: inout ext2_inode_large) throws(VolumeError)
        -> ([(name: [UInt8], entry: DirectoryCache.Entry)], DirectoryCache.Layout) {
        let blockSize = Int(fs.pointee.blocksize)
        let count = (fileSize(inode) + UInt64(blockSize) - 1) / UInt64(blockSize)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 8)
        defer { buffer.deallocate() }
        var entries: [(name: [UInt8], entry: DirectoryCache.Entry)] = []
        var layout = DirectoryCache.Layout()
        for logical in 0..<count {
            let physical = try directoryBlock(fs, dir, &inode, logical)
            layout.physical.append(physical)
            guard physical != 0 else { layout.room.append(0); continue }   // a hole
            try check(ext2fs_read_dir_block4(fs, physical, buffer.baseAddress, 0, ext2_ino_t(dir)),
                      "reading block \(logical) of directory \(dir)")
            let (records, writable) = try directoryRecords(fs, dir, buffer, logical: logical)
            for r in records where r.ino != 0 {
                let name = Array(UnsafeRawBufferPointer(rebasing: buffer[(r.offset + Self.direntNameOffset)...].prefix(r.nameLength)))
                if DirectoryCache.isDot(name) { continue }
                let dirent = (buffer.baseAddress! + r.offset).assumingMemoryBound(to: ext2_dir_entry.self)
                entries.append((name, .init(ino: r.ino, fileType: UInt8(truncatingIfNeeded: ext2fs_dirent_file_type(dirent)),
                                            block: UInt32(logical))))
            }
            layout.room.append(UInt16(clamping: Self.room(records, writable: writable)))
        }
        return (entries, layout)
    }

    /// The physical block of logical block `logical` of directory `dir` (0 for a hole).
    private func directoryBlock(_ fs: ext2_filsys, _ dir: UInt64, _ inode: inout ext2_inode_large, _ logical: UInt64) throws(VolumeError) -> UInt64 {
        var physical: blk64_t = 0
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                ext2fs_bmap2(fs, ext2_ino_t(dir), $0, nil, 0, logical, nil, &physical)
            }
        }
        try check(rc, "mapping block \(logical) of directory \(dir)")
        return physical
    }

    /// Adds `name` to a directory with a layout, in the first block with room, growing the
    /// directory by a block when none has. Returns false, having changed nothing, when the
    /// directory has no layout (the caller then asks libext2fs).
    private func insertEntry(_ fs: ext2_filsys, _ dir: UInt64, _ name: [UInt8], _ ino: UInt64, fileType: Int32) throws(VolumeError) -> Bool {
        guard let layout = directories.layout(dir) else { return false }
        let need = DirectoryCache.recordLength(nameLength: name.count)
        let logical: Int
        if let b = layout.firstBlock(fitting: need) {
            logical = b
        } else {
            // ext2fs_expand_dir appends one empty block (its checksum tail included) past the last one.
            try check(ext2fs_expand_dir(fs, ext2_ino_t(dir)), "growing directory \(dir)")
            var inode = try readInode(fs, dir)
            let last = (fileSize(inode) + UInt64(fs.pointee.blocksize) - 1) / UInt64(fs.pointee.blocksize) - 1
            let physical = try directoryBlock(fs, dir, &inode, last)
            guard physical != 0, Int(last) >= layout.physical.count else {
                // Not where the layout expected it (a directory ending in a hole): libext2fs takes over.
                directories.dropLayout(dir)
                return false
            }
            directories.addBlock(dir, block: Int(last), physical: physical, room: Int(fs.pointee.blocksize))
            logical = Int(last)
        }
        let physical = directories.layout(dir)!.physical[logical]
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(fs.pointee.blocksize), alignment: 8)
        defer { buffer.deallocate() }
        try check(ext2fs_read_dir_block4(fs, physical, buffer.baseAddress, 0, ext2_ino_t(dir)),
                  "reading block \(logical) of directory \(dir)")
        var (records, writable) = try directoryRecords(fs, dir, buffer, logical: UInt64(logical))
        guard writable, let r = records.first(where: { $0.room >= need }) else {
            // The layout disagrees with the block (a grown block is empty, so this is the cache's
            // error, not the disk's): forget the layout and let libext2fs search.
            logger.warning("directory \(dir): block \(logical) has no room for \(need) bytes though the cache said so")
            directories.dropLayout(dir)
            return false
        }
        let base = buffer.baseAddress!
        var target = (base + r.offset).assumingMemoryBound(to: ext2_dir_entry.self)
        if r.ino != 0 {
            // Split the live record: it keeps what its name needs, the new entry takes the rest.
            let keep = DirectoryCache.recordLength(nameLength: r.nameLength)
            try check(ext2fs_set_rec_len(fs, UInt32(keep), target), "splitting an entry of directory \(dir)")
            target = (base + r.offset + keep).assumingMemoryBound(to: ext2_dir_entry.self)
            try check(ext2fs_set_rec_len(fs, UInt32(r.length - keep), target), "splitting an entry of directory \(dir)")
        }
        target.pointee.inode = ext2_ino_t(ino)
        ext2fs_dirent_set_name_len(target, Int32(name.count))
        ext2fs_dirent_set_file_type(target, ext2fs_has_feature_filetype(fs.pointee.super) != 0 ? fileType : 0)
        name.withUnsafeBytes { UnsafeMutableRawPointer(target).advanced(by: Self.direntNameOffset).copyMemory(from: $0.baseAddress!, byteCount: name.count) }
        try check(ext2fs_write_dir_block4(fs, physical, base, 0, ext2_ino_t(dir)), "writing block \(logical) of directory \(dir)")
        records = try directoryRecords(fs, dir, buffer, logical: UInt64(logical)).records
        directories.setRoom(dir, block: logical, Self.room(records, writable: true))
        directories.added(dir, name, .init(ino: UInt32(ino), fileType: UInt8(truncatingIfNeeded: fileType), block: UInt32(logical)))
        return true
    }

    /// Removes `name` from a directory with a layout, in the block the cache says holds it.
    /// Returns false, having changed nothing, when the directory has no layout or the block does
    /// not hold the name (the caller then asks libext2fs).
    private func deleteEntry(_ fs: ext2_filsys, _ dir: UInt64, _ name: [UInt8]) throws(VolumeError) -> Bool {
        guard let layout = directories.layout(dir), let entry = directories.peek(dir, name),
              Int(entry.block) < layout.physical.count, layout.physical[Int(entry.block)] != 0 else { return false }
        let logical = Int(entry.block), physical = layout.physical[logical]
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(fs.pointee.blocksize), alignment: 8)
        defer { buffer.deallocate() }
        try check(ext2fs_read_dir_block4(fs, physical, buffer.baseAddress, 0, ext2_ino_t(dir)),
                  "reading block \(logical) of directory \(dir)")
        var (records, writable) = try directoryRecords(fs, dir, buffer, logical: UInt64(logical))
        let base = buffer.baseAddress!
        guard let i = records.firstIndex(where: { r in
            r.ino != 0 && r.nameLength == name.count
                && memcmp(base + r.offset + Self.direntNameOffset, name, name.count) == 0
        }) else {
            logger.warning("directory \(dir): block \(logical) does not hold an entry the cache placed there")
            directories.dropLayout(dir)
            return false
        }
        let dirent = (base + records[i].offset).assumingMemoryBound(to: ext2_dir_entry.self)
        if i > 0 {
            let previous = (base + records[i - 1].offset).assumingMemoryBound(to: ext2_dir_entry.self)
            try check(ext2fs_set_rec_len(fs, UInt32(records[i - 1].length + records[i].length), previous),
                      "removing an entry of directory \(dir)")
        } else {
            dirent.pointee.inode = 0
        }
        try check(ext2fs_write_dir_block4(fs, physical, base, 0, ext2_ino_t(dir)), "writing block \(logical) of directory \(dir)")
        (records, writable) = try directoryRecords(fs, dir, buffer, logical: UInt64(logical))
        directories.setRoom(dir, block: logical, Self.room(records, writable: writable))
        directories.removed(dir, name)
        return true
    }

    private func requireDirectory(_ fs: ext2_filsys, _ ino: UInt64) throws(VolumeError) -> ext2_inode_large {
        let inode = try readInode(fs, ino)
        guard UInt32(inode.i_mode) & 0o170000 == 0o040000 else {
            throw VolumeError(.notDirectory, "inode \(ino) is not a directory")
        }
        return inode
    }

    /// Adds a directory entry, growing the directory when its blocks are full: in one block when
    /// the directory cache knows where there is room, else through ext2fs_link.
    private func addLink(_ fs: ext2_filsys, _ dir: UInt64, _ name: String, _ ino: UInt64, mode: UInt32) throws(VolumeError) {
        let bytes = Array(name.utf8)
        if !DirectoryCache.isDot(bytes) {
            do throws(VolumeError) {
                if try insertEntry(fs, dir, bytes, ino, fileType: Self.fileType(mode)) { return }
            } catch {
                directories.drop(dir)   // the directory may or may not have changed
                throw error
            }
        }
        let rc: errcode_t
        do throws(VolumeError) {
            rc = try withDirectorySpace(fs, dir) {
                name.withCString { ext2fs_link(fs, ext2_ino_t(dir), $0, ext2_ino_t(ino), Self.fileType(mode)) }
            }
        } catch {
            directories.drop(dir)
            throw error
        }
        guard rc == 0 else {
            directories.drop(dir)   // the directory may or may not have changed
            try check(rc, "adding '\(name)' to directory \(dir)")
            return
        }
        // libext2fs chose the block: the entry's place is unknown, and so the layout goes (6).
        directories.dropLayout(dir)
        directories.added(dir, bytes, .init(ino: UInt32(ino), fileType: UInt8(Self.fileType(mode))))
    }

    /// Runs a libext2fs call that adds an entry to `dir`, growing the directory once if it is full.
    private func withDirectorySpace(_ fs: ext2_filsys, _ dir: UInt64, _ call: () -> errcode_t) throws(VolumeError) -> errcode_t {
        let rc = call()
        guard rc == EXT2_ET_DIR_NO_SPACE else { return rc }
        try check(ext2fs_expand_dir(fs, ext2_ino_t(dir)), "growing directory \(dir)")
        return call()
    }

    /// Removes a directory entry: in the one block that holds it when the directory cache knows
    /// which, else through ext2fs_unlink.
    private func removeLink(_ fs: ext2_filsys, _ dir: UInt64, _ name: String) throws(VolumeError) {
        let bytes = Array(name.utf8)
        if !DirectoryCache.isDot(bytes) {
            do throws(VolumeError) {
                if try deleteEntry(fs, dir, bytes) { return }
            } catch {
                directories.drop(dir)
                throw error
            }
        }
        let rc = name.withCString { ext2fs_unlink(fs, ext2_ino_t(dir), $0, 0, 0) }
        guard rc == 0 else {
            directories.drop(dir)
            try check(rc, "removing '\(name)' from directory \(dir)")
            return
        }
        directories.dropLayout(dir)
        directories.removed(dir, bytes)
    }

    /// Marks a directory's contents changed (mtime and ctime).
    private func touchDirectory(_ fs: ext2_filsys, _ dir: UInt64, links delta: Int = 0) throws(VolumeError) {
        var inode = try readInode(fs, dir)
        let t = Self.now()
        setTimes(&inode, mtime: t, ctime: t)
        inode.i_links_count = UInt16(Int(inode.i_links_count) + delta)
        try writeInode(fs, dir, &inode)
    }

    // MARK: FileSystemVolume: reading

    public func lookup(parent: UInt64, name: String) throws(VolumeError) -> FileAttributes {
        try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            guard name.utf8.count <= 255 else { throw VolumeError(.fileNameTooLong, "name longer than 255 bytes") }
            guard let ino = try lookupIno(fs, parent, name) else {
                throw VolumeError(.noSuchFileOrDirectory, "'\(name)' is not in directory \(parent)")
            }
            var inode = try readInode(fs, ino)
            return attributes(fs, ino, &inode)
        }
    }

    public func getattr(_ ino: UInt64) throws(VolumeError) -> FileAttributes {
        try withFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            return attributes(fs, ino, &inode)
        }
    }

    /// Directory cookies are positions, as kernel ext4 gives them for a directory without an htree
    /// index: the entry at byte `offset` of logical block `b` is at `b * blocksize + offset`, and its
    /// cookie is that position + 1, "resume past here" (0, the start, is before "." at position 0).
    /// libext2fs never moves a live entry of such a directory: unlink merges the entry's space into the
    /// entry before it, link splits free space, a full directory grows by a block at its end. So a cookie
    /// outlives changes, and an entry neither added nor removed during a listing is returned exactly once
    /// (POSIX readdir), where an index among live entries shifted with every unlink.
    ///
    /// An htree-indexed directory (only kernel ext4 makes them) is listed the same way, but there a
    /// create can split a leaf block (libext2fs's dx_link) and move entries within the directory, so a
    /// listing that runs while entries are added may return some twice; kernel ext4 uses hash cookies
    /// for such directories instead.
    ///
    /// A call reads the directory from the cookie's block on, one block per turn of the lock: the callback
    /// (FUSE buffer packing) runs without the lock, and a whole listing reads each block once.
    public func readdir(_ ino: UInt64, after cookie: UInt64,
                        _ body: (DirectoryEntry) throws(VolumeError) -> Bool) throws(VolumeError) {
        var position = cookie
        while true {
            let (entries, next) = try withFS { fs throws(VolumeError) in try directoryEntries(fs, ino, from: position) }
            for e in entries where !(try body(e)) { return }
            guard let next else { return }
            position = next
        }
    }

    /// The entries at `position` and after it in the first directory block from there that holds any,
    /// and the position just past that block (nil at the end of the directory).
    private func directoryEntries(_ fs: ext2_filsys, _ ino: UInt64,
                                  from position: UInt64) throws(VolumeError) -> ([DirectoryEntry], UInt64?) {
        var inode = try requireDirectory(fs, ino)
        if inode.i_flags & UInt32(EXT4_INLINE_DATA_FL) != 0 {
            return (try inlineDirectoryEntries(fs, ino, from: position), nil)
        }
        let blockSize = UInt64(fs.pointee.blocksize)
        let blocks = (fileSize(inode) + blockSize - 1) / blockSize
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: Int(blockSize), alignment: 8)
        defer { buffer.deallocate() }
        var logical = position / blockSize
        while logical < blocks {
            var physical: blk64_t = 0
            let rc = withUnsafeMutablePointer(to: &inode) {
                $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                    ext2fs_bmap2(fs, ext2_ino_t(ino), $0, nil, 0, logical, nil, &physical)
                }
            }
            try check(rc, "mapping block \(logical) of directory \(ino)")
            // A hole (kernel ext4 leaves them in directories) holds no entries.
            if physical != 0 {
                // read_dir_block4 verifies the block's checksum, as ext2fs_dir_iterate2 does.
                try check(ext2fs_read_dir_block4(fs, physical, buffer, 0, ext2_ino_t(ino)),
                          "reading block \(logical) of directory \(ino)")
                let entries = try directoryBlockEntries(fs, ino, UnsafeMutableRawBufferPointer(start: buffer, count: Int(blockSize)),
                                                        at: logical * blockSize, from: position)
                if !entries.isEmpty { return (entries, (logical + 1) * blockSize) }
            }
            logical += 1
        }
        return ([], nil)
    }

    /// The live entries of one directory block, which starts at directory position `base`, from `position`
    /// on. Each record is checked as ext2fs_process_dir_block checks it.
    private func directoryBlockEntries(_ fs: ext2_filsys, _ ino: UInt64, _ block: UnsafeMutableRawBufferPointer,
                                       at base: UInt64, from position: UInt64) throws(VolumeError) -> [DirectoryEntry] {
        var entries: [DirectoryEntry] = []
        var offset = 0
        while offset + 8 < block.count {
            // Records start 4-byte aligned (checked below) in an 8-byte aligned buffer.
            let dirent = (block.baseAddress! + offset).assumingMemoryBound(to: ext2_dir_entry.self)
            var length: UInt32 = 0
            try check(ext2fs_get_rec_len(fs, dirent, &length), "reading directory \(ino)")
            guard length >= 8, length % 4 == 0, offset + Int(length) <= block.count,
                  Self.direntNameOffset + Int(ext2fs_dirent_name_len(dirent)) <= Int(length) else {
                throw VolumeError(Self.errno(errcode_t(EXT2_ET_DIR_CORRUPTED)),
                                  "directory \(ino) has a bad entry at position \(base + UInt64(offset))")
            }
            if let e = Self.entry(dirent, at: base + UInt64(offset), from: position) { entries.append(e) }
            offset += Int(length)
        }
        return entries
    }

    private static let direntNameOffset = MemoryLayout<ext2_dir_entry>.offset(of: \ext2_dir_entry.name)!

    /// The entry a directory record at position `at` names, if it is live and not before `position`.
    /// libext2fs or the caller has checked that the name lies within the record.
    private static func entry(_ dirent: UnsafePointer<ext2_dir_entry>, at: UInt64, from position: UInt64) -> DirectoryEntry? {
        guard dirent.pointee.inode != 0, at >= position else { return nil }
        let name = String(decoding: UnsafeRawBufferPointer(start: UnsafeRawPointer(dirent) + direntNameOffset,
                                                           count: Int(ext2fs_dirent_name_len(dirent))), as: UTF8.self)
        return DirectoryEntry(name: name, ino: UInt64(dirent.pointee.inode),
                              type: mode(fromFileType: ext2fs_dirent_file_type(dirent)), cookie: at + 1)
    }

    /// A directory of a few entries kept in the inode (the inline_data feature): i_block holds the parent
    /// and then entries, the system.data xattr more. libext2fs walks both areas (empty records included,
    /// so that each area shows itself by its buffer); positions follow kernel ext4's for such a directory
    /// (fs/ext4/inline.c, ext4_read_inline_dir), where the entries land when it grows into a block:
    /// "." at 0, ".." at 12, i_block's entries from 24, the xattr's from 24 + 56.
    private func inlineDirectoryEntries(_ fs: ext2_filsys, _ ino: UInt64,
                                        from position: UInt64) throws(VolumeError) -> [DirectoryEntry] {
        final class Context {
            var entries: [DirectoryEntry] = []
            /// The buffers libext2fs passes for i_block's area, then the xattr's.
            var areas: [UnsafeMutablePointer<CChar>] = []
            let from: UInt64
            init(from: UInt64) { self.from = from }
        }
        let context = Context(from: position)
        let rc = withExtendedLifetime(context) {
            ext2fs_dir_iterate2(fs, ext2_ino_t(ino), DIRENT_FLAG_INCLUDE_EMPTY, nil, { _, _, dirent, offset, _, buf, priv in
                let context = Unmanaged<Context>.fromOpaque(priv!).takeUnretainedValue()
                guard let dirent, let buf else { return 0 }
                let base: UInt64
                // The name's bytes only: the record may end its buffer well before a whole ext2_dir_entry.
                let nameLength = Int(ext2fs_dirent_name_len(dirent))
                let name = UnsafeRawBufferPointer(start: UnsafeRawPointer(dirent) + Volume.direntNameOffset, count: nameLength)
                if dirent.pointee.inode != 0 && !context.areas.contains(buf) && (1...2).contains(nameLength)
                    && name.allSatisfy({ $0 == UInt8(ascii: ".") }) {
                    // libext2fs makes up "." and ".." (the parent is i_block's first word).
                    base = nameLength == 1 ? 0 : 12
                } else {
                    if !context.areas.contains(buf) { context.areas.append(buf) }
                    base = context.areas.count == 1 ? 24 : 24 + 56
                }
                if let e = Volume.entry(dirent, at: base + UInt64(offset), from: context.from) { context.entries.append(e) }
                return 0
            }, Unmanaged.passUnretained(context).toOpaque())
        }
        try check(rc, "reading directory \(ino)")
        return context.entries
    }

    public func readlink(_ ino: UInt64) throws(VolumeError) -> String {
        try withFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            guard UInt32(inode.i_mode) & 0o170000 == 0o120000 else {
                throw VolumeError(.invalidArgument, "inode \(ino) is not a symbolic link")
            }
            let size = Int(inode.i_size)
            let fast = withUnsafeMutablePointer(to: &inode) {
                $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_is_fast_symlink($0) }
            }
            if fast != 0 {
                return withUnsafeBytes(of: &inode.i_block) { String(decoding: $0.prefix(size), as: UTF8.self) }
            }
            let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 8)
            defer { bytes.deallocate() }
            let n = try readData(fs, ino, 0, bytes)
            return String(decoding: UnsafeRawBufferPointer(rebasing: bytes[0..<n]), as: UTF8.self)
        }
    }

    /// Reads file data. Extent-mapped files (every regular ext4 file that is not inline) take
    /// the fast path:
    ///
    /// 1. under the lock: read the inode, resolve the requested range into runs of physically
    ///    consecutive blocks by walking the extent tree once (`mapRuns`), and note the channel's
    ///    free generation;
    /// 2. without the lock: one `BlockDevice.read` per run. The pool is thread-safe, so the
    ///    kernel's parallel read-ahead requests overlap their device I/O, and other requests
    ///    (getattr, lookup, writes) do not queue behind a read's I/O;
    /// 3. under the lock again: if any block of the filesystem was freed meanwhile (a truncate,
    ///    punch or unlink, counted by libext2fs's block-allocation callback), a mapped block may
    ///    have been reused by another file, so the read is redone with the device reads under
    ///    the lock. Otherwise the data is what the file held when it was mapped.
    ///
    /// Overlapping writes to the same range are not ordered against the unlocked read; through
    /// FUSE they never overlap, because the kernel reads only pages it has no dirty copy of.
    public func read(_ ino: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(VolumeError) -> Int {
        enum Plan {
            case done(Int)
            case runs(ReadPlan)
        }
        let plan = try withFS { fs throws(VolumeError) -> Plan in
            var inode = try readInode(fs, ino)
            guard UInt32(inode.i_mode) & 0o170000 != 0o040000 else { throw VolumeError(.isDirectory, "inode \(ino) is a directory") }
            if inode.i_flags & UInt32(EXT4_EXTENTS_FL) != 0 && inode.i_flags & UInt32(EXT4_INLINE_DATA_FL) == 0,
               let plan = try planExtentRead(fs, ino, &inode, offset, buffer.count) {
                return .runs(plan)
            }
            return .done(try readData(fs, ino, offset, buffer))
        }
        guard case .runs(let runs) = plan else {
            if case .done(let n) = plan { return n }
            return 0
        }
        if runs.length == 0 { return 0 }
        try execute(runs, ino, offset, buffer)
        let stillValid = try withFS { fs throws(VolumeError) in
            handleEpoch == runs.epoch && channelState(fs.pointee.io).freeGeneration == runs.generation
        }
        if stillValid { return runs.length }
        // A block was freed while the device reads ran: map and read again, all under the lock.
        return try withFS { fs throws(VolumeError) -> Int in
            var inode = try readInode(fs, ino)
            guard let again = try planExtentRead(fs, ino, &inode, offset, buffer.count) else {
                return try readData(fs, ino, offset, buffer)
            }
            try execute(again, ino, offset, buffer)
            return again.length
        }
    }

    /// What `read` resolves under the lock and reads without it.
    private struct ReadPlan {
        /// One run of the file: `length` bytes at file offset `offset + start`, read from device
        /// offset `device` (nil: a hole or an unwritten extent, which reads as zeros).
        struct Run {
            var start: Int
            var length: Int
            var device: UInt64?
        }
        var runs: [Run] = []
        /// The bytes the read returns (the request, clamped to the file size).
        var length = 0
        var generation: UInt64 = 0
        var epoch: UInt64 = 0
        var device: BlockDevice?
    }

    /// Resolves `count` bytes at `offset` of an extent-mapped inode into device runs. Nil when
    /// the channel's dirty blocks cannot be written back first (the device is full): the read
    /// must then go through the channel, which lays them over what the device has.
    private func planExtentRead(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large, _ offset: UInt64,
                                _ count: Int) throws(VolumeError) -> ReadPlan? {
        let channel = channelState(fs.pointee.io)
        var plan = ReadPlan(generation: channel.freeGeneration, epoch: handleEpoch, device: channel.device)
        let size = fileSize(inode)
        guard offset < size, count > 0 else { return plan }
        let end = min(offset + UInt64(count), size)
        plan.length = Int(end - offset)
        let bs = UInt64(fs.pointee.blocksize)
        // The channel may hold written-back-later blocks: the device must see them first.
        guard channel.writeBackDirtyUnlessFailing() else {
            logger.debug("reading through the channel: its dirty blocks could not be written back", metadata: ["ino": "\(ino)"])
            return nil
        }
        let first = offset / bs, last = (end - 1) / bs
        for m in try mapRuns(fs, ino, &inode, first: first, last: last) {
            // The run's bytes within [offset, end).
            let from = max(offset, m.logical * bs), to = min(end, (m.logical + m.count) * bs)
            guard from < to else { continue }
            let device = m.physical.map { $0 * bs + (from - m.logical * bs) }
            if let lastRun = plan.runs.last, lastRun.start + lastRun.length == Int(from - offset),
               (lastRun.device == nil && device == nil)
                || (lastRun.device != nil && device != nil && lastRun.device! + UInt64(lastRun.length) == device!) {
                plan.runs[plan.runs.count - 1].length += Int(to - from)
            } else {
                plan.runs.append(.init(start: Int(from - offset), length: Int(to - from), device: device))
            }
        }
        return plan
    }

    /// Runs of blocks `first...last` of an extent-mapped inode: consecutive logical blocks that
    /// are consecutive on the device (`physical` set) or that read as zeros (holes and unwritten
    /// extents, `physical` nil). The extent tree is walked once: a goto to the first block, then
    /// leaf by leaf, rather than a lookup per block. Bigalloc filesystems (whose clusters may be
    /// mapped implicitly) take the per-block `ext2fs_bmap2` route.
    private func mapRuns(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large, first: UInt64,
                         last: UInt64) throws(VolumeError) -> [(logical: UInt64, count: UInt64, physical: UInt64?)] {
        var runs: [(logical: UInt64, count: UInt64, physical: UInt64?)] = []
        if fs.pointee.cluster_ratio_bits != 0 {
            for lblk in first...last {
                var physical: blk64_t = 0
                var flags: Int32 = 0
                let rc = withUnsafeMutablePointer(to: &inode) {
                    $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_bmap2(fs, ext2_ino_t(ino), $0, nil, 0, lblk, &flags, &physical) }
                }
                try check(rc, "mapping block \(lblk) of inode \(ino)")
                let data = physical != 0 && flags & BMAP_RET_UNINIT == 0
                runs.append((lblk, 1, data ? physical : nil))
            }
            return runs
        }
        var handle: ext2_extent_handle_t?
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_extent_open2(fs, ext2_ino_t(ino), $0, &handle) }
        }
        try check(rc, "opening the extent tree of inode \(ino)")
        defer { ext2fs_extent_free(handle) }
        var extent = ext2fs_extent()
        var pos = first
        // Position on the extent holding `first`, or the nearest one before or after it.
        var rcGoto = ext2fs_extent_goto2(handle, 0, blk64_t(first))
        if rcGoto == EXT2_ET_EXTENT_NOT_FOUND || rcGoto == EXT2_ET_EXTENT_NO_NEXT { rcGoto = 0 }
        try check(rcGoto, "finding block \(first) of inode \(ino)")
        var have = ext2fs_extent_get(handle, EXT2_EXTENT_CURRENT, &extent) == 0
        while pos <= last {
            // Skip extents that end at or before pos (the goto may leave us on the one before a hole).
            while have && extent.e_lblk + UInt64(extent.e_len) <= pos {
                have = ext2fs_extent_get(handle, EXT2_EXTENT_NEXT_LEAF, &extent) == 0
            }
            guard have, extent.e_len > 0 else {
                runs.append((pos, last - pos + 1, nil))   // past the last extent: a hole to the end
                break
            }
            if extent.e_lblk > pos {
                let n = min(extent.e_lblk, last + 1) - pos
                runs.append((pos, n, nil))
                pos += n
                continue
            }
            let n = min(extent.e_lblk + UInt64(extent.e_len), last + 1) - pos
            let unwritten = extent.e_flags & UInt32(EXT2_EXTENT_FLAGS_UNINIT) != 0
            runs.append((pos, n, unwritten ? nil : extent.e_pblk + (pos - extent.e_lblk)))
            pos += n
        }
        return runs
    }

    /// The device reads of a plan: each data run straight from the device, holes zero-filled.
    private func execute(_ plan: ReadPlan, _ ino: UInt64, _ offset: UInt64, _ buffer: UnsafeMutableRawBufferPointer) throws(VolumeError) {
        for run in plan.runs {
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[run.start..<(run.start + run.length)])
            guard let at = run.device, let device = plan.device else {
                slice.initializeMemory(as: UInt8.self, repeating: 0)
                continue
            }
            do {
                try device.read(into: slice, at: at)
            } catch {
                throw VolumeError((error as? ThinPoolError)?.errno ?? .ioError, "reading inode \(ino) at \(offset + UInt64(run.start)): \(error)")
            }
        }
    }

    private func openFile(_ fs: ext2_filsys, _ ino: UInt64, write: Bool) throws(VolumeError) -> ext2_file_t {
        var file: ext2_file_t?
        try check(ext2fs_file_open2(fs, ext2_ino_t(ino), nil, write ? EXT2_FILE_WRITE : 0, &file), "opening inode \(ino)")
        return file!
    }

    private func readData(_ fs: ext2_filsys, _ ino: UInt64, _ offset: UInt64, _ buffer: UnsafeMutableRawBufferPointer) throws(VolumeError) -> Int {
        let file = try openFile(fs, ino, write: false)
        defer { ext2fs_file_close(file) }
        try check(ext2fs_file_llseek(file, offset, EXT2_SEEK_SET, nil), "seeking inode \(ino) to \(offset)")
        var done = 0
        while done < buffer.count {
            var got: UInt32 = 0
            let want = UInt32(min(buffer.count - done, 1 << 30))
            try check(ext2fs_file_read(file, buffer.baseAddress! + done, want, &got), "reading inode \(ino) at \(offset + UInt64(done))")
            if got == 0 { break }
            done += Int(got)
        }
        return done
    }

    public func statfs() throws(VolumeError) -> FileSystemStatistics {
        let stats = try withFS { fs throws(VolumeError) in
            let sb = fs.pointee.super.pointee
            let blocks = UInt64(sb.s_blocks_count) | UInt64(sb.s_blocks_count_hi) << 32
            let free = UInt64(sb.s_free_blocks_count) | UInt64(sb.s_free_blocks_hi) << 32
            let reserved = UInt64(sb.s_r_blocks_count) | UInt64(sb.s_r_blocks_count_hi) << 32
            // Like the kernel's ext4_statfs, metadata overhead is not counted in f_blocks... libext2fs
            // does not track it; the totals here are the superblock's.
            return FileSystemStatistics(blockSize: UInt64(fs.pointee.blocksize), blocks: blocks, freeBlocks: free,
                                        availableBlocks: free > reserved ? free - reserved : 0,
                                        files: UInt64(sb.s_inodes_count), freeFiles: UInt64(sb.s_free_inodes_count),
                                        nameMax: 255)
        }
        return try limitedByPool(stats)
    }

    /// A container must not believe it has more space than the pool can give: free and
    /// available blocks are capped by the pool's free data space, which the device reports
    /// through every wrapper (a `VolumeGroup` member, a kernel pool's /dev/mapper node).
    /// Available blocks leave out the pool's reserve for metadata, as ext4's own available
    /// count leaves out its root reserve: file data cannot have it.
    /// The cap errs low: an ext4 block freed but still mapped in the pool takes no pool space
    /// when reused. A pool status that cannot be read fails statfs (EIO), rather than showing
    /// the ext4's free space as if the pool had it.
    private func limitedByPool(_ s: FileSystemStatistics) throws(VolumeError) -> FileSystemStatistics {
        let space: PoolFreeSpace?
        do { space = try device.freeSpace() } catch {
            throw VolumeError((error as? ThinPoolError)?.errno ?? .ioError, "reading the pool's free data space for statfs: \(error)")
        }
        guard let space else { return s }
        var r = s
        r.freeBlocks = min(s.freeBlocks, space.free / s.blockSize)
        r.availableBlocks = min(s.availableBlocks, space.forFileData / s.blockSize)
        return r
    }

    // MARK: FileSystemVolume: changing

    public func setattr(_ ino: UInt64, _ changes: AttributeChanges) throws(VolumeError) -> FileAttributes {
        try requireWritable("setattr")
        return try withFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            let now = Self.now()
            if let size = changes.size {
                guard UInt32(inode.i_mode) & 0o170000 == 0o100000 else {
                    throw VolumeError(UInt32(inode.i_mode) & 0o170000 == 0o040000 ? .isDirectory : .invalidArgument,
                                      "truncate of inode \(ino), which is not a regular file")
                }
                let file = try openFile(fs, ino, write: true)
                let rc = ext2fs_file_set_size2(file, ext2_off64_t(size))
                ext2fs_file_close(file)
                try check(rc, "truncating inode \(ino) to \(size)")
                inode = try readInode(fs, ino)
                setTimes(&inode, mtime: now, ctime: now)
            }
            if let mode = changes.mode {
                inode.i_mode = UInt16((UInt32(inode.i_mode) & 0o170000) | (mode & 0o7777))
            }
            Self.setOwner(&inode, uid: changes.uid, gid: changes.gid)
            switch changes.atime {
            case .now: setTimes(&inode, atime: now)
            case .set(let t): setTimes(&inode, atime: t)
            case nil: break
            }
            switch changes.mtime {
            case .now: setTimes(&inode, mtime: now)
            case .set(let t): setTimes(&inode, mtime: t)
            case nil: break
            }
            setTimes(&inode, ctime: changes.ctime ?? now)
            try writeInode(fs, ino, &inode)
            return attributes(fs, ino, &inode)
        }
    }

    /// Allocates and initializes an inode with no links yet.
    private func newInode(_ fs: ext2_filsys, parent: UInt64, mode: UInt32, owner: Owner) throws(VolumeError) -> (UInt64, ext2_inode_large) {
        var ino: ext2_ino_t = 0
        try check(ext2fs_new_inode(fs, ext2_ino_t(parent), Int32(mode), nil, &ino), "allocating an inode in directory \(parent)")
        ext2fs_inode_alloc_stats2(fs, ino, 1, mode & 0o170000 == 0o040000 ? 1 : 0)
        var inode = ext2_inode_large()
        inode.i_mode = UInt16(truncatingIfNeeded: mode)
        inode.i_extra_isize = Self.extraSize
        let group = Self.newGroup(try readInode(fs, parent), owner)
        Self.setOwner(&inode, uid: owner.uid, gid: group.gid)
        inode.i_generation = nextGeneration
        nextGeneration &+= 1
        let t = Self.now()
        setTimes(&inode, atime: t, mtime: t, ctime: t, crtime: t)
        if ext2fs_has_feature_extents(fs.pointee.super) != 0 && mode & 0o170000 != 0o120000 && !Self.isDevice(mode)
            && mode & 0o170000 != 0o010000 && mode & 0o170000 != 0o140000 {
            // An empty extent tree header in i_block, as the kernel gives every new file and directory.
            var handle: ext2_extent_handle_t?
            let rc = withUnsafeMutablePointer(to: &inode) {
                $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_extent_open2(fs, ino, $0, &handle) }
            }
            try check(rc, "initializing the extent tree of inode \(ino)")
            ext2fs_extent_free(handle)
        }
        return (UInt64(ino), inode)
    }

    public func mknod(parent: UInt64, name: String, mode: UInt32, rdev: UInt64, owner: Owner) throws(VolumeError) -> FileAttributes {
        try requireWritable("mknod")
        try Self.checkName(name)
        let type = mode & 0o170000
        guard [0o100000, 0o010000, 0o140000, 0o020000, 0o060000].contains(type) else {
            throw VolumeError(.invalidArgument, "mknod '\(name)': unsupported file type \(String(type, radix: 8))")
        }
        return try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            if try lookupIno(fs, parent, name) != nil { throw VolumeError(.fileExists, "'\(name)' exists in directory \(parent)") }
            var (ino, inode) = try newInode(fs, parent: parent, mode: mode, owner: owner)
            inode.i_links_count = 1
            if Self.isDevice(mode) {
                let major = Self.major(rdev), minor = Self.minor(rdev)
                if major < 256 && minor < 256 {
                    inode.i_block.0 = major << 8 | minor
                } else {
                    inode.i_block.1 = (minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)
                }
            }
            let rc = withUnsafeMutablePointer(to: &inode) {
                $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_write_new_inode(fs, ext2_ino_t(ino), $0) }
            }
            try check(rc, "writing new inode \(ino)")
            try addLink(fs, parent, name, ino, mode: mode)
            try touchDirectory(fs, parent)
            inode = try readInode(fs, ino)
            return attributes(fs, ino, &inode)
        }
    }

    public func mkdir(parent: UInt64, name: String, mode: UInt32, owner: Owner) throws(VolumeError) -> FileAttributes {
        try requireWritable("mkdir")
        try Self.checkName(name)
        return try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            if try lookupIno(fs, parent, name) != nil { throw VolumeError(.fileExists, "'\(name)' exists in directory \(parent)") }
            // ext2fs_mkdir is given the inode and no name, and addLink adds the entry: given a name,
            // it would scan the parent twice more (its own lookup, then ext2fs_link) and leave the
            // directory cache behind. The inode is allocated as ext2fs_mkdir allocates it.
            var newIno: ext2_ino_t = 0
            try check(ext2fs_new_inode(fs, ext2_ino_t(parent), Int32(0o040755), nil, &newIno), "allocating an inode in directory \(parent)")
            try check(ext2fs_mkdir(fs, ext2_ino_t(parent), newIno, nil), "creating directory '\(name)' in \(parent)")
            let ino = UInt64(newIno)
            do throws(VolumeError) {
                try addLink(fs, parent, name, ino, mode: 0o040000)
            } catch {
                // Undo ext2fs_mkdir: the directory's inode and block, and the parent's count of its "..".
                try? freeInode(fs, ino)
                try? touchDirectory(fs, parent, links: -1)
                throw error
            }
            // ext2fs_mkdir sets a default mode, root ownership and times in seconds: make them the caller's.
            var inode = try readInode(fs, ino)
            // A set-group-ID parent passes on its group and, to subdirectories, the bit itself.
            let group = Self.newGroup(try readInode(fs, parent), owner)
            inode.i_mode = UInt16(0o040000 | (mode & 0o7777) | (group.setgidDirectory ? 0o2000 : 0))
            Self.setOwner(&inode, uid: owner.uid, gid: group.gid)
            // A generation of its own, as the kernel's ext4 gives every new inode (ext2fs_mkdir
            // gives none): the inode number is often a removed directory's, and FUSE tells inodes
            // apart by number and generation. A kernel still holding the removed directory (dead
            // since rmdir) would take this one for it and answer ENOENT inside it.
            inode.i_generation = nextGeneration
            nextGeneration &+= 1
            // With metadata_csum the generation seeds the directory block's checksum: the block
            // ext2fs_mkdir wrote is read under the old one and written back under the new one,
            // as fuse2fs's mkdir does.
            let sealed = try readNewDirectoryBlock(fs, ino, &inode)
            defer { sealed?.buffer.deallocate() }
            let attributes = try finishNewEntry(fs, ino, &inode, parent: parent)
            if let sealed {
                try check(ext2fs_write_dir_block4(fs, sealed.physical, sealed.buffer.baseAddress, 0, ext2_ino_t(ino)),
                          "writing block 0 of new directory \(ino)")
            }
            return attributes
        }
    }

    /// Block 0 of a directory ext2fs_mkdir just made, read and checked under its current
    /// generation, when its checksum depends on the generation (metadata_csum, not inline).
    private func readNewDirectoryBlock(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large)
        throws(VolumeError) -> (physical: blk64_t, buffer: UnsafeMutableRawBufferPointer)? {
        guard ext2fs_has_feature_metadata_csum(fs.pointee.super) != 0, inode.i_flags & UInt32(EXT4_INLINE_DATA_FL) == 0 else {
            return nil
        }
        let physical = try directoryBlock(fs, ino, &inode, 0)
        guard physical != 0 else { throw VolumeError(.ioError, "new directory \(ino) has no block 0") }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(fs.pointee.blocksize), alignment: 8)
        do throws(VolumeError) {
            try check(ext2fs_read_dir_block4(fs, physical, buffer.baseAddress, 0, ext2_ino_t(ino)), "reading block 0 of new directory \(ino)")
        } catch {
            buffer.deallocate()
            throw error
        }
        return (physical, buffer)
    }

    /// For entries libext2fs created (ext2fs_mkdir, ext2fs_symlink): room for nanosecond times,
    /// the times themselves, and the parent's mtime and ctime.
    private func finishNewEntry(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large, parent: UInt64) throws(VolumeError) -> FileAttributes {
        if inode.i_extra_isize < Self.extraSize { inode.i_extra_isize = Self.extraSize }
        let t = Self.now()
        setTimes(&inode, atime: t, mtime: t, ctime: t, crtime: t)
        try writeInode(fs, ino, &inode)
        try touchDirectory(fs, parent)
        return attributes(fs, ino, &inode)
    }

    public func symlink(parent: UInt64, name: String, target: String, owner: Owner) throws(VolumeError) -> FileAttributes {
        try requireWritable("symlink")
        try Self.checkName(name)
        guard !target.isEmpty, target.utf8.count < 4096 else {
            throw VolumeError(target.isEmpty ? .noSuchFileOrDirectory : .fileNameTooLong, "symlink target of '\(name)'")
        }
        return try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            if try lookupIno(fs, parent, name) != nil { throw VolumeError(.fileExists, "'\(name)' exists in directory \(parent)") }
            // As in mkdir: the inode allocated as ext2fs_symlink would, no name given to it, the entry added by addLink.
            var newIno: ext2_ino_t = 0
            try check(ext2fs_new_inode(fs, ext2_ino_t(parent), Int32(0o120755), nil, &newIno), "allocating an inode in directory \(parent)")
            try check(target.withCString { ext2fs_symlink(fs, ext2_ino_t(parent), newIno, nil, $0) }, "creating symlink '\(name)' in \(parent)")
            let ino = UInt64(newIno)
            do throws(VolumeError) {
                try addLink(fs, parent, name, ino, mode: 0o120000)
            } catch {
                try? freeInode(fs, ino)
                throw error
            }
            var inode = try readInode(fs, ino)
            Self.setOwner(&inode, uid: owner.uid, gid: Self.newGroup(try readInode(fs, parent), owner).gid)
            // A generation of its own, as mkdir gives (ext2fs_symlink gives none): FUSE tells a
            // reused inode number apart by it. No block of a symlink is checksummed with it.
            inode.i_generation = nextGeneration
            nextGeneration &+= 1
            return try finishNewEntry(fs, ino, &inode, parent: parent)
        }
    }

    public func link(_ ino: UInt64, newParent: UInt64, newName: String) throws(VolumeError) -> FileAttributes {
        try requireWritable("link")
        try Self.checkName(newName)
        return try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, newParent)
            var inode = try readInode(fs, ino)
            guard UInt32(inode.i_mode) & 0o170000 != 0o040000 else {
                throw VolumeError(.notPermitted, "hard link to directory inode \(ino)")
            }
            guard inode.i_links_count < 65000 else { throw VolumeError(.tooManyLinks, "inode \(ino) has too many links") }
            if try lookupIno(fs, newParent, newName) != nil { throw VolumeError(.fileExists, "'\(newName)' exists in directory \(newParent)") }
            try addLink(fs, newParent, newName, ino, mode: UInt32(inode.i_mode))
            inode.i_links_count += 1
            setTimes(&inode, ctime: Self.now())
            try writeInode(fs, ino, &inode)
            try touchDirectory(fs, newParent)
            return attributes(fs, ino, &inode)
        }
    }

    public func unlink(parent: UInt64, name: String) throws(VolumeError) {
        try requireWritable("unlink")
        try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            guard let ino = try lookupIno(fs, parent, name) else {
                throw VolumeError(.noSuchFileOrDirectory, "'\(name)' is not in directory \(parent)")
            }
            var inode = try readInode(fs, ino)
            guard UInt32(inode.i_mode) & 0o170000 != 0o040000 else { throw VolumeError(.isDirectory, "'\(name)' is a directory") }
            try removeLink(fs, parent, name)
            try touchDirectory(fs, parent)
            try dropLink(fs, ino, &inode)
        }
    }

    /// One link fewer; an inode with none left is freed now, or at its last release if open.
    private func dropLink(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large, directory: Bool = false) throws(VolumeError) {
        inode.i_links_count = directory ? 0 : inode.i_links_count - 1
        if directory { directories.drop(ino) }
        setTimes(&inode, ctime: Self.now())
        try writeInode(fs, ino, &inode)
        if inode.i_links_count == 0 {
            if openCounts[ino] != nil { orphans.insert(ino) } else { try freeInode(fs, ino) }
        }
    }

    /// Releases an inode's blocks, extended attributes and the inode itself.
    private func freeInode(_ fs: ext2_filsys, _ ino: UInt64) throws(VolumeError) {
        directories.drop(ino)   // its number may come back as a new directory
        var inode = ext2_inode_large()
        let rr = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                ext2fs_read_inode_full(fs, ext2_ino_t(ino), $0, Int32(MemoryLayout<ext2_inode_large>.size))
            }
        }
        try check(rr, "reading inode \(ino)")
        let valid = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_inode_has_valid_blocks2(fs, $0) }
        }
        if valid != 0 {
            let rc = withUnsafeMutablePointer(to: &inode) {
                $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_punch(fs, ext2_ino_t(ino), $0, nil, 0, ~0) }
            }
            try check(rc, "releasing the blocks of inode \(ino)")
        }
        try check(ext2fs_free_ext_attr(fs, ext2_ino_t(ino), &inode), "releasing the extended attributes of inode \(ino)")
        inode.i_dtime = UInt32(truncatingIfNeeded: Self.now().seconds)
        try writeInode(fs, ino, &inode)
        ext2fs_inode_alloc_stats2(fs, ext2_ino_t(ino), -1, UInt32(inode.i_mode) & 0o170000 == 0o040000 ? 1 : 0)
        orphans.remove(ino)
    }

    private func isEmptyDirectory(_ fs: ext2_filsys, _ ino: UInt64) throws(VolumeError) -> Bool {
        final class Flag { var empty = true }
        let flag = Flag()
        let rc = withExtendedLifetime(flag) {
            ext2fs_dir_iterate2(fs, ext2_ino_t(ino), 0, nil, { _, _, dirent, _, _, _, priv in
                let flag = Unmanaged<Flag>.fromOpaque(priv!).takeUnretainedValue()
                guard let dirent else { return 0 }
                let length = Int(dirent.pointee.name_len & 0xff)
                let dot = withUnsafeBytes(of: &dirent.pointee.name) { raw in
                    (length == 1 && raw[0] == 0x2e) || (length == 2 && raw[0] == 0x2e && raw[1] == 0x2e)
                }
                if !dot && dirent.pointee.inode != 0 {
                    flag.empty = false
                    return DIRENT_ABORT
                }
                return 0
            }, Unmanaged.passUnretained(flag).toOpaque())
        }
        try check(rc, "reading directory \(ino)")
        return flag.empty
    }

    public func rmdir(parent: UInt64, name: String) throws(VolumeError) {
        try requireWritable("rmdir")
        if name == "." { throw VolumeError(.invalidArgument, "rmdir of '.'") }
        if name == ".." { throw VolumeError(.directoryNotEmpty, "rmdir of '..'") }
        try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            guard let ino = try lookupIno(fs, parent, name) else {
                throw VolumeError(.noSuchFileOrDirectory, "'\(name)' is not in directory \(parent)")
            }
            var inode = try readInode(fs, ino)
            guard UInt32(inode.i_mode) & 0o170000 == 0o040000 else { throw VolumeError(.notDirectory, "'\(name)' is not a directory") }
            guard try isEmptyDirectory(fs, ino) else { throw VolumeError(.directoryNotEmpty, "directory '\(name)' is not empty") }
            try removeLink(fs, parent, name)
            try touchDirectory(fs, parent, links: -1)   // its ".." no longer points at the parent
            try dropLink(fs, ino, &inode, directory: true)
        }
    }

    public func rename(parent: UInt64, name: String, newParent: UInt64, newName: String, flags: RenameFlags) throws(VolumeError) {
        try requireWritable("rename")
        try Self.checkName(newName)
        guard !(flags.contains(.noReplace) && flags.contains(.exchange)) else {
            throw VolumeError(.invalidArgument, "RENAME_NOREPLACE and RENAME_EXCHANGE together")
        }
        try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            _ = try requireDirectory(fs, newParent)
            guard let ino = try lookupIno(fs, parent, name) else {
                throw VolumeError(.noSuchFileOrDirectory, "'\(name)' is not in directory \(parent)")
            }
            let target = try lookupIno(fs, newParent, newName)
            if target == ino { return }   // the same file: POSIX says do nothing
            var inode = try readInode(fs, ino)
            let isDir = UInt32(inode.i_mode) & 0o170000 == 0o040000
            if isDir && parent != newParent {
                // A directory cannot move below itself.
                var walk = newParent
                while walk != rootInode {
                    if walk == ino { throw VolumeError(.invalidArgument, "moving directory '\(name)' into itself") }
                    guard let up = try lookupIno(fs, walk, "..") else { break }
                    walk = up
                }
            }
            if flags.contains(.exchange) {
                guard let other = target else { throw VolumeError(.noSuchFileOrDirectory, "'\(newName)' is not in directory \(newParent)") }
                var otherInode = try readInode(fs, other)
                let otherIsDir = UInt32(otherInode.i_mode) & 0o170000 == 0o040000
                try removeLink(fs, parent, name)
                try removeLink(fs, newParent, newName)
                try addLink(fs, parent, name, other, mode: UInt32(otherInode.i_mode))
                try addLink(fs, newParent, newName, ino, mode: UInt32(inode.i_mode))
                if parent != newParent {
                    if isDir { try setDotDot(fs, ino, to: newParent) }
                    if otherIsDir { try setDotDot(fs, other, to: parent) }
                    let delta = (isDir ? 1 : 0) - (otherIsDir ? 1 : 0)
                    try touchDirectory(fs, parent, links: -delta)
                    try touchDirectory(fs, newParent, links: delta)
                } else {
                    try touchDirectory(fs, parent)
                }
                let t = Self.now()
                setTimes(&inode, ctime: t)
                setTimes(&otherInode, ctime: t)
                try writeInode(fs, ino, &inode)
                try writeInode(fs, other, &otherInode)
                return
            }
            if let other = target {
                if flags.contains(.noReplace) { throw VolumeError(.fileExists, "'\(newName)' exists in directory \(newParent)") }
                var otherInode = try readInode(fs, other)
                let otherIsDir = UInt32(otherInode.i_mode) & 0o170000 == 0o040000
                if isDir && !otherIsDir { throw VolumeError(.notDirectory, "'\(newName)' is not a directory") }
                if !isDir && otherIsDir { throw VolumeError(.isDirectory, "'\(newName)' is a directory") }
                if otherIsDir {
                    guard try isEmptyDirectory(fs, other) else { throw VolumeError(.directoryNotEmpty, "directory '\(newName)' is not empty") }
                }
                try removeLink(fs, newParent, newName)
                if otherIsDir { try touchDirectory(fs, newParent, links: -1) }
                try dropLink(fs, other, &otherInode, directory: otherIsDir)
            }
            try removeLink(fs, parent, name)
            try addLink(fs, newParent, newName, ino, mode: UInt32(inode.i_mode))
            if isDir && parent != newParent {
                try setDotDot(fs, ino, to: newParent)
                try touchDirectory(fs, parent, links: -1)
                try touchDirectory(fs, newParent, links: 1)
            } else {
                try touchDirectory(fs, parent)
                if parent != newParent { try touchDirectory(fs, newParent) }
            }
            inode = try readInode(fs, ino)
            setTimes(&inode, ctime: Self.now())
            try writeInode(fs, ino, &inode)
        }
    }

    /// Points a moved directory's ".." at its new parent.
    private func setDotDot(_ fs: ext2_filsys, _ dir: UInt64, to parent: UInt64) throws(VolumeError) {
        try removeLink(fs, dir, "..")
        try addLink(fs, dir, "..", parent, mode: 0o040000)
    }

    public func write(_ ino: UInt64, at offset: UInt64, from buffer: UnsafeRawBufferPointer) throws(VolumeError) -> Int {
        try requireWritable("write")
        do {
            return try writeOnce(ino, at: offset, from: buffer)
        } catch where error.errno == .noSpace && device.spaceFreedAtCommit {
            // A thin pool hands out the blocks freed since its last commit (an rm just now) only
            // after the next one; dm-thin commits when it runs out of data space for the same
            // reason. A commit is consistent once the filesystem is flushed: fsync does both.
            logger.debug("out of space with space freed since the last commit: committing, then writing again", metadata: ["ino": "\(ino)"])
            guard (try? fsync(nil)) != nil else { throw error }
            return try writeOnce(ino, at: offset, from: buffer)
        }
    }

    private func writeOnce(_ ino: UInt64, at offset: UInt64, from buffer: UnsafeRawBufferPointer) throws(VolumeError) -> Int {
        try withFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            guard UInt32(inode.i_mode) & 0o170000 == 0o100000 else {
                throw VolumeError(UInt32(inode.i_mode) & 0o170000 == 0o040000 ? .isDirectory : .invalidArgument, "write to inode \(ino), not a regular file")
            }
            guard buffer.count > 0 else { return 0 }
            // Allocate the blocks the write covers whole in one go: ext2fs_file_write would allocate
            // them one at a time, searching the bitmap from its goal each time, which dominated
            // sequential writes. Only whole blocks: a partially written new block must read zeros
            // elsewhere, which ext2fs_file_write guarantees for blocks it allocates itself.
            let bs = UInt64(fs.pointee.blocksize)
            let firstWhole = (offset + bs - 1) / bs, endWhole = (offset + UInt64(buffer.count)) / bs
            let sizeBefore = fileSize(inode)
            let channel = channelState(fs.pointee.io)
            var file: ext2_file_t?
            var done = 0
            let extentMapped = inode.i_flags & UInt32(EXT4_EXTENTS_FL) != 0 && inode.i_flags & UInt32(EXT4_INLINE_DATA_FL) == 0
                && fs.pointee.cluster_ratio_bits == 0
            do throws(VolumeError) {
                // An overwrite (a database page, a rewrite) has every whole block mapped and
                // written already: then nothing to allocate, and no inode to store for it.
                var whole: [(logical: UInt64, count: UInt64, physical: UInt64?)] = []
                if endWhole > firstWhole && extentMapped { whole = try mapRuns(fs, ino, &inode, first: firstWhole, last: endWhole - 1) }
                if endWhole > firstWhole && (whole.isEmpty || whole.contains { $0.physical == nil }) {
                    whole = []
                    let rc = withUnsafeMutablePointer(to: &inode) {
                        $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                            ext2fs_fallocate(fs, EXT2_FALLOCATE_FORCE_INIT | EXT2_FALLOCATE_INIT_BEYOND_EOF, ext2_ino_t(ino), $0,
                                             ~0, firstWhole, endWhole - firstWhole)
                        }
                    }
                    // What fallocate got done is in `inode` (its extents, i_blocks): store it even if it
                    // failed part-way (zeroing new blocks on a full pool), so the failure path below
                    // releases a consistent allocation.
                    try writeInode(fs, ino, &inode)
                    try check(rc, "allocating blocks \(firstWhole)..<\(endWhole) of inode \(ino)")
                }
                // The blocks libext2fs writes from here to the last close are the file's data, and
                // the inode table and extent blocks that go with it (see `fileDataMode`).
                channel.fileDataMode = true
                defer { channel.fileDataMode = false }
                /// `count` bytes of the request from `at` (a request offset) through libext2fs's file
                /// I/O, a block at a time: partial blocks, unwritten extents, inline and block-mapped files.
                func writeThroughFile(_ at: Int, _ count: Int) throws(VolumeError) {
                    guard count > 0 else { return }
                    let opened = try openFile(fs, ino, write: true)
                    file = opened
                    try check(ext2fs_file_llseek(opened, offset + UInt64(at), EXT2_SEEK_SET, nil), "seeking inode \(ino) to \(offset + UInt64(at))")
                    var written = 0
                    while written < count {
                        var wrote: UInt32 = 0
                        let want = UInt32(min(count - written, 1 << 30))
                        try check(ext2fs_file_write(opened, buffer.baseAddress! + at + written, want, &wrote),
                                  "writing inode \(ino) at \(offset + UInt64(at + written))")
                        if wrote == 0 { throw VolumeError(.noSpace, "writing inode \(ino): no progress") }
                        written += Int(wrote)
                    }
                    file = nil
                    try check(ext2fs_file_close(opened), "closing inode \(ino)")
                    done = max(done, at + count)
                }
                if endWhole > firstWhole && extentMapped {
                    // The bulk path: the whole blocks, allocated above, go to the device in runs of
                    // physically consecutive blocks, one channel write each (which updates the cached
                    // copies of those blocks, so the cache stays coherent), instead of a block at a
                    // time through ext2fs_file_write with a bmap and an inode write per block. Under
                    // the lock, as before: a pool commit cannot come between the allocation and the
                    // data, and no block being written can be freed and given to another file meanwhile.
                    let head = Int(firstWhole * bs - offset)
                    if head > 0 {
                        try writeThroughFile(0, head)
                        // Read again: the head's write may have changed the extent tree.
                        inode = try readInode(fs, ino)
                        whole = []
                    }
                    // Unwritten (preallocated) extents in the range: fio and databases preallocate,
                    // and libext2fs would convert them a block at a time (ext2fs_extent_set_bmap, a
                    // leaf checksum per block). Release them and allocate initialized blocks in their
                    // place, two extent operations per run; the data written below fills them.
                    if whole.isEmpty { whole = try mapRuns(fs, ino, &inode, first: firstWhole, last: endWhole - 1) }
                    let unwritten = whole.filter { $0.physical == nil }
                    for run in unwritten {
                        let last = run.logical + run.count - 1
                        let punched = withUnsafeMutablePointer(to: &inode) {
                            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_punch(fs, ext2_ino_t(ino), $0, nil, run.logical, last) }
                        }
                        try check(punched, "releasing the unwritten blocks \(run.logical)...\(last) of inode \(ino)")
                        let allocated = withUnsafeMutablePointer(to: &inode) {
                            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                                ext2fs_fallocate(fs, EXT2_FALLOCATE_FORCE_INIT | EXT2_FALLOCATE_INIT_BEYOND_EOF, ext2_ino_t(ino), $0,
                                                 ~0, run.logical, run.count)
                            }
                        }
                        try writeInode(fs, ino, &inode)
                        try check(allocated, "allocating blocks \(run.logical)...\(last) of inode \(ino)")
                    }
                    if !unwritten.isEmpty { whole = try mapRuns(fs, ino, &inode, first: firstWhole, last: endWhole - 1) }
                    for run in whole {
                        let at = Int(run.logical * bs - offset), count = Int(run.count * bs)
                        guard let physical = run.physical else {
                            // Still unwritten (not expected after the above): libext2fs converts it.
                            try writeThroughFile(at, count)
                            continue
                        }
                        var block = physical, from = at, left = run.count
                        while left > 0 {
                            let n = min(left, 8192)   // at most 32 MiB in one pwrite
                            try check(io_channel_write_blk64(fs.pointee.io, blk64_t(block), Int32(n), buffer.baseAddress! + from),
                                      "writing inode \(ino) at \(offset + UInt64(from))")
                            block += n
                            from += Int(n * bs)
                            left -= n
                        }
                        done = max(done, at + count)
                    }
                    // The size grows once for the whole blocks (the tail below may grow it further).
                    inode = try readInode(fs, ino)
                    if endWhole * bs > fileSize(inode) {
                        let rc = withUnsafeMutablePointer(to: &inode) {
                            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_inode_size_set(fs, $0, ext2_off64_t(endWhole * bs)) }
                        }
                        try check(rc, "setting the size of inode \(ino)")
                        try writeInode(fs, ino, &inode)
                    }
                    try writeThroughFile(Int(endWhole * bs - offset), buffer.count - Int(endWhole * bs - offset))
                } else {
                    try writeThroughFile(0, buffer.count)
                }
                channel.fileDataMode = false
                // The data goes to the device before the write returns: a pool out of space fails
                // this write, at write(2), rather than a write-back after it was acknowledged.
                do {
                    try channel.writeBackFileData(dataBlocks(fs, ino, offset, buffer.count))
                } catch {
                    throw VolumeError((error as? ThinPoolError)?.errno ?? .ioError, "writing inode \(ino) at \(offset): \(error)")
                }
            } catch {
                if let file {
                    channel.fileDataMode = true
                    ext2fs_file_close(file)
                }
                channel.fileDataMode = false
                defer {
                    // What this write left in the file's blocks reaches the device now or never
                    // (the blocks released above are gone from the cache already): a block the
                    // device refuses must not be written back later, after the caller heard ENOSPC.
                    try? channel.writeBackFileData(dataBlocks(fs, ino, offset, buffer.count))
                }
                // A failed write does not extend the file: ext2fs_file_write has already set the
                // size to what it copied, but the block it was flushing when it failed may never
                // have reached the device, and the caller is told nothing was written.
                restoreSize(fs, ino, to: sizeBefore)
                releaseBeyondEOF(fs, ino, through: (offset + UInt64(buffer.count) - 1) / bs)
                throw error
            }
            inode = try readInode(fs, ino)
            let t = Self.now()
            setTimes(&inode, mtime: t, ctime: t)
            // Writing clears set-user-ID (and set-group-ID with group execute), as the kernel does for unprivileged writers.
            try writeInode(fs, ino, &inode)
            return done
        }
    }

    /// The device blocks holding bytes `offset..<offset + count` of inode `ino`, as runs: where
    /// `write` put the file's data. Empty for files that are not extent-mapped (their data is
    /// then written back as metadata is).
    private func dataBlocks(_ fs: ext2_filsys, _ ino: UInt64, _ offset: UInt64, _ count: Int) -> [(start: UInt64, count: UInt64)] {
        guard count > 0, var inode = try? readInode(fs, ino), inode.i_flags & UInt32(EXT4_EXTENTS_FL) != 0,
              inode.i_flags & UInt32(EXT4_INLINE_DATA_FL) == 0 else { return [] }
        let bs = UInt64(fs.pointee.blocksize)
        let runs = (try? mapRuns(fs, ino, &inode, first: offset / bs, last: (offset + UInt64(count) - 1) / bs)) ?? []
        return runs.compactMap { run in run.physical.map { (start: $0, count: run.count) } }
    }

    /// Shrinks a file a failed write extended back to its size before the write: the size goes
    /// back, the tail of its last block is zeroed, and the blocks past it are released
    /// (`ext2fs_file_set_size2`, a truncate). Best effort, like `releaseBeyondEOF`.
    private func restoreSize(_ fs: ext2_filsys, _ ino: UInt64, to size: UInt64) {
        guard let inode = try? readInode(fs, ino), fileSize(inode) > size,
              let file = try? openFile(fs, ino, write: true) else { return }
        let rc = ext2fs_file_set_size2(file, ext2_off64_t(size))
        let closed = ext2fs_file_close(file)
        if rc != 0 || closed != 0 {
            logger.warning("could not shrink a file back after a failed write",
                           metadata: ["ino": "\(ino)", "size": "\(size)", "error": "\(rc != 0 ? rc : closed)"])
        }
    }

    /// A write that failed part-way (the device full: a thin pool out of data space) leaves the
    /// blocks reserved for it still mapped and initialized past the end of the file, which
    /// e2fsck rejects ("end of extent exceeds allowed value"; the kernel would have left them
    /// unwritten). Unmaps them, up to block `last`, the last one the write covered. Preallocated
    /// blocks there (fallocate KEEP_SIZE) go too: a failed write may lose a preallocation, never
    /// data. Best effort: the write's own error is what the caller reports.
    private func releaseBeyondEOF(_ fs: ext2_filsys, _ ino: UInt64, through last: UInt64) {
        guard var inode = try? readInode(fs, ino) else { return }
        let bs = UInt64(fs.pointee.blocksize)
        let size = fileSize(inode)
        let end = (size + bs - 1) / bs
        guard end <= last else { return }
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_punch(fs, ext2_ino_t(ino), $0, nil, end, last) }
        }
        if rc != 0 {
            logger.warning("could not release the blocks a failed write reserved past the end of the file",
                           metadata: ["ino": "\(ino)", "blocks": "\(end)...\(last)", "error": "\(rc)"])
        }
    }

    public func fallocate(_ ino: UInt64, mode: FallocateMode, offset: UInt64, length: UInt64) throws(VolumeError) {
        try requireWritable("fallocate")
        guard length > 0 else { throw VolumeError(.invalidArgument, "fallocate of zero bytes") }
        try withFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            guard UInt32(inode.i_mode) & 0o170000 == 0o100000 else { throw VolumeError(.operationNotSupportedByDevice, "fallocate of inode \(ino), not a regular file") }
            let bs = UInt64(fs.pointee.blocksize)
            let size = fileSize(inode)
            if mode.contains(.zeroRange) {
                guard mode.subtracting([.zeroRange, .keepSize]).isEmpty else {
                    throw VolumeError(.notSupported, "fallocate mode \(mode.rawValue): ZERO_RANGE takes only KEEP_SIZE")
                }
                try zeroRangeMode(fs, ino, &inode, offset: offset, length: length, keepSize: mode.contains(.keepSize))
            } else if mode.contains(.punchHole) {
                guard mode.contains(.keepSize) else { throw VolumeError(.notSupported, "PUNCH_HOLE needs KEEP_SIZE") }
                // Zero partial blocks at the edges; release the whole blocks between.
                let end = min(offset + length, size)
                guard offset < end else { return }
                let firstWhole = (offset + bs - 1) / bs, endWhole = end / bs
                try zeroRange(fs, ino, offset, min(end, firstWhole * bs))
                if endWhole * bs > offset && endWhole * bs < end { try zeroRange(fs, ino, max(offset, endWhole * bs), end) }
                if firstWhole < endWhole {
                    // Zeroing an edge may have mapped or converted a block: punch the inode as it is now.
                    inode = try readInode(fs, ino)
                    let rc = withUnsafeMutablePointer(to: &inode) {
                        $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                            ext2fs_punch(fs, ext2_ino_t(ino), $0, nil, firstWhole, endWhole - 1)
                        }
                    }
                    try check(rc, "punching blocks \(firstWhole)..<\(endWhole) of inode \(ino)")
                    inode = try readInode(fs, ino)
                }
            } else {
                guard mode.rawValue & ~FallocateMode.keepSize.rawValue == 0 else {
                    throw VolumeError(.notSupported, "fallocate mode \(mode.rawValue)")
                }
                let first = offset / bs, last = (offset + length - 1) / bs
                let rc = withUnsafeMutablePointer(to: &inode) {
                    $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                        ext2fs_fallocate(fs, EXT2_FALLOCATE_INIT_BEYOND_EOF | EXT2_FALLOCATE_FORCE_UNINIT, ext2_ino_t(ino), $0, ~0, first, last - first + 1)
                    }
                }
                try check(rc, "allocating \(length) bytes at \(offset) in inode \(ino)")
                try writeInode(fs, ino, &inode)
                if !mode.contains(.keepSize) && offset + length > size {
                    let file = try openFile(fs, ino, write: true)
                    let sr = ext2fs_file_set_size2(file, ext2_off64_t(offset + length))
                    ext2fs_file_close(file)
                    try check(sr, "extending inode \(ino)")
                }
                inode = try readInode(fs, ino)
            }
            let t = Self.now()
            setTimes(&inode, mtime: t, ctime: t)
            try writeInode(fs, ino, &inode)
        }
    }

    /// FALLOC_FL_ZERO_RANGE, as ext4 does it: the range reads as zeros and stays allocated.
    /// Partial blocks at its edges are written with zeros; the whole blocks between are released
    /// and mapped again as unwritten extents (what ext4 converts them to), so no zeros are written
    /// and a thin pool gives back their space. Blocks past the end of the file are preallocated
    /// unwritten; without KEEP_SIZE the file grows to the end of the range. `inode` is read again
    /// afterwards.
    private func zeroRangeMode(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large,
                               offset: UInt64, length: UInt64, keepSize: Bool) throws(VolumeError) {
        let bs = UInt64(fs.pointee.blocksize)
        let size = fileSize(inode)
        let end = offset + length
        let firstWhole = (offset + bs - 1) / bs, endWhole = end / bs
        // Bytes past the end of the file are zeros already (and hidden under KEEP_SIZE).
        let headEnd = min(end, firstWhole * bs), tailStart = max(headEnd, endWhole * bs)
        try zeroRange(fs, ino, offset, min(headEnd, size))
        try zeroRange(fs, ino, tailStart, min(end, size))
        if firstWhole < endWhole {
            // Zeroing an edge may have mapped or converted a block: punch the inode as it is now.
            inode = try readInode(fs, ino)
            let rc = withUnsafeMutablePointer(to: &inode) {
                $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                    ext2fs_punch(fs, ext2_ino_t(ino), $0, nil, firstWhole, endWhole - 1)
                }
            }
            try check(rc, "releasing blocks \(firstWhole)..<\(endWhole) of inode \(ino) to zero them")
        }
        // The same allocation as plain fallocate: it maps only what is unmapped, here the blocks
        // just released and any holes, and leaves the written edge blocks as they are.
        inode = try readInode(fs, ino)
        let first = offset / bs, last = (end - 1) / bs
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                ext2fs_fallocate(fs, EXT2_FALLOCATE_INIT_BEYOND_EOF | EXT2_FALLOCATE_FORCE_UNINIT, ext2_ino_t(ino), $0, ~0, first, last - first + 1)
            }
        }
        try check(rc, "allocating the zeroed range \(offset)..<\(end) of inode \(ino)")
        try writeInode(fs, ino, &inode)
        if !keepSize && end > size {
            let file = try openFile(fs, ino, write: true)
            let sr = ext2fs_file_set_size2(file, ext2_off64_t(end))
            ext2fs_file_close(file)
            try check(sr, "extending inode \(ino) to \(end)")
        }
        inode = try readInode(fs, ino)
    }

    private func zeroRange(_ fs: ext2_filsys, _ ino: UInt64, _ start: UInt64, _ end: UInt64) throws(VolumeError) {
        guard start < end else { return }
        let zeros = [UInt8](repeating: 0, count: Int(end - start))
        let file = try openFile(fs, ino, write: true)
        var wrote: UInt32 = 0
        var rc = ext2fs_file_llseek(file, start, EXT2_SEEK_SET, nil)
        if rc == 0 { rc = zeros.withUnsafeBytes { ext2fs_file_write(file, $0.baseAddress!, UInt32($0.count), &wrote) } }
        // Closing writes the block out: its failure is the zeroing's.
        let closed = ext2fs_file_close(file)
        try check(rc != 0 ? rc : closed, "zeroing inode \(ino) at \(start)..<\(end)")
        if wrote != zeros.count { throw VolumeError(.noSpace, "zeroing inode \(ino) at \(start): \(wrote) of \(zeros.count) bytes written") }
    }

    public func seek(_ ino: UInt64, from offset: UInt64, to whence: SeekTarget) throws(VolumeError) -> UInt64 {
        try withFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            let size = fileSize(inode)
            guard offset < size else { throw VolumeError(.init(rawValue: ENXIO), "seek past the end of inode \(ino)") }
            let bs = UInt64(fs.pointee.blocksize)
            var block = offset / bs
            let lastBlock = (size - 1) / bs
            while block <= lastBlock {
                var physical: blk64_t = 0
                var retFlags: Int32 = 0
                let rc = withUnsafeMutablePointer(to: &inode) {
                    $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                        ext2fs_bmap2(fs, ext2_ino_t(ino), $0, nil, 0, block, &retFlags, &physical)
                    }
                }
                try check(rc, "mapping block \(block) of inode \(ino)")
                // Unwritten (preallocated) extents read as zeros: the kernel reports them as holes too.
                let isData = physical != 0 && retFlags & BMAP_RET_UNINIT == 0
                if isData == (whence == .data) {
                    return max(offset, block * bs)
                }
                block += 1
            }
            if whence == .hole { return size }
            throw VolumeError(.init(rawValue: ENXIO), "no data after \(offset) in inode \(ino)")
        }
    }

    // MARK: Extended attributes

    private func withXattrs<T>(_ fs: ext2_filsys, _ ino: UInt64, _ body: (OpaquePointer) throws(VolumeError) -> T) throws(VolumeError) -> T {
        var handle: OpaquePointer?
        try check(ext2fs_xattrs_open(fs, ext2_ino_t(ino), &handle), "opening the extended attributes of inode \(ino)")
        defer { ext2fs_xattrs_close(&handle) }
        try check(ext2fs_xattrs_read(handle), "reading the extended attributes of inode \(ino)")
        return try body(handle!)
    }

    static func checkXattrName(_ name: String) throws(VolumeError) {
        let known = ["user.", "trusted.", "security.", "system."]
        guard known.contains(where: name.hasPrefix), name.utf8.count <= 255 else {
            throw VolumeError(.notSupported, "extended attribute name '\(name)' has no supported namespace")
        }
    }

    public func getxattr(_ ino: UInt64, name: String) throws(VolumeError) -> [UInt8] {
        try Self.checkXattrName(name)
        return try withFS { fs throws(VolumeError) in
            _ = try readInode(fs, ino)
            return try withXattrs(fs, ino) { h throws(VolumeError) in
                var value: UnsafeMutableRawPointer?
                var length = 0
                let rc = ext2fs_xattr_get(h, name, &value, &length)
                if rc == EXT2_ET_EA_KEY_NOT_FOUND { throw VolumeError(.init(rawValue: ENODATA), "inode \(ino) has no attribute '\(name)'") }
                try check(rc, "reading attribute '\(name)' of inode \(ino)")
                defer { ext2fs_free_mem_shim(value) }
                return Array(UnsafeRawBufferPointer(start: value, count: length))
            }
        }
    }

    /// An access ACL in the xattr format (posix_acl_xattr.h): a u32 version 2, then
    /// (u16 tag, u16 perm, u32 id) entries. Returns the permission bits it implies
    /// and whether it says no more than those bits (only owner, group and other).
    static func accessACLMode(_ value: [UInt8]) throws(VolumeError) -> (mode: UInt32, equivalent: Bool) {
        func u16(_ i: Int) -> UInt32 { UInt32(value[i]) | UInt32(value[i + 1]) << 8 }
        guard value.count >= 4, (value.count - 4) % 8 == 0, u16(0) == 2, u16(2) == 0 else {
            throw VolumeError(.invalidArgument, "system.posix_acl_access is not a version 2 ACL")
        }
        var owner: UInt32?, group: UInt32?, other: UInt32?, mask: UInt32?
        var named = false
        for i in stride(from: 4, to: value.count, by: 8) {
            let perm = u16(i + 2) & 7
            switch u16(i) {
            case 0x01: owner = perm
            case 0x02, 0x08: named = true
            case 0x04: group = perm
            case 0x10: mask = perm
            case 0x20: other = perm
            default: throw VolumeError(.invalidArgument, "system.posix_acl_access has an unknown tag \(u16(i))")
            }
        }
        guard let owner, let group, let other, !named || mask != nil else {
            throw VolumeError(.invalidArgument, "system.posix_acl_access lacks a required entry")
        }
        return (owner << 6 | (mask ?? group) << 3 | other, !named && mask == nil)
    }

    public func setxattr(_ ino: UInt64, name: String, value: [UInt8], flags: XattrFlags) throws(VolumeError) {
        try requireWritable("setxattr")
        try Self.checkXattrName(name)
        try withFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            if name == "system.posix_acl_access" {
                // As the kernel's posix_acl_update_mode: the ACL's owner, group (or mask) and other
                // permissions become the mode bits, and an ACL that says nothing more is not stored.
                let acl = try Self.accessACLMode(value)
                inode.i_mode = UInt16((UInt32(inode.i_mode) & ~0o777) | acl.mode)
                setTimes(&inode, ctime: Self.now())
                try writeInode(fs, ino, &inode)
                if acl.equivalent {
                    try withXattrs(fs, ino) { h throws(VolumeError) in
                        let rc = ext2fs_xattr_remove(h, name)
                        if rc != EXT2_ET_EA_KEY_NOT_FOUND { try check(rc, "removing attribute '\(name)' of inode \(ino)") }
                    }
                    return
                }
            }
            try withXattrs(fs, ino) { h throws(VolumeError) in
                var existing: UnsafeMutableRawPointer?
                var length = 0
                let lookup = ext2fs_xattr_get(h, name, &existing, &length)
                if lookup == 0 { ext2fs_free_mem_shim(existing) }
                if flags.contains(.create) && lookup == 0 { throw VolumeError(.fileExists, "attribute '\(name)' exists on inode \(ino)") }
                if flags.contains(.replace) && lookup != 0 { throw VolumeError(.init(rawValue: ENODATA), "inode \(ino) has no attribute '\(name)'") }
                let rc = value.withUnsafeBytes { b in
                    // An empty value still needs a non-null pointer.
                    ext2fs_xattr_set(h, name, b.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, b.count)
                }
                try check(rc, "setting attribute '\(name)' of inode \(ino)")
            }
            inode = try readInode(fs, ino)
            setTimes(&inode, ctime: Self.now())
            try writeInode(fs, ino, &inode)
        }
    }

    public func listxattr(_ ino: UInt64) throws(VolumeError) -> [String] {
        try withFS { fs throws(VolumeError) in
            _ = try readInode(fs, ino)
            return try withXattrs(fs, ino) { h throws(VolumeError) in
                final class Names { var list: [String] = [] }
                let names = Names()
                let rc = withExtendedLifetime(names) {
                    ext2fs_xattrs_iterate(h, { name, _, _, priv in
                        let names = Unmanaged<Names>.fromOpaque(priv!).takeUnretainedValue()
                        if let name { names.list.append(String(cString: name)) }
                        return 0
                    }, Unmanaged.passUnretained(names).toOpaque())
                }
                try check(rc, "listing attributes of inode \(ino)")
                return names.list
            }
        }
    }

    public func removexattr(_ ino: UInt64, name: String) throws(VolumeError) {
        try requireWritable("removexattr")
        try Self.checkXattrName(name)
        try withFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            try withXattrs(fs, ino) { h throws(VolumeError) in
                var existing: UnsafeMutableRawPointer?
                var length = 0
                let lookup = ext2fs_xattr_get(h, name, &existing, &length)
                if lookup == EXT2_ET_EA_KEY_NOT_FOUND { throw VolumeError(.init(rawValue: ENODATA), "inode \(ino) has no attribute '\(name)'") }
                try check(lookup, "reading attribute '\(name)' of inode \(ino)")
                ext2fs_free_mem_shim(existing)
                try check(ext2fs_xattr_remove(h, name), "removing attribute '\(name)' of inode \(ino)")
            }
            inode = try readInode(fs, ino)
            setTimes(&inode, ctime: Self.now())
            try writeInode(fs, ino, &inode)
        }
    }

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
            if orphans.contains(ino) { try freeInode(fs, ino) }
        }
    }

    public func forget(_ ino: UInt64) {}

    /// Writes libext2fs's dirty state (inode and block caches, bitmaps, superblock) and flushes the device.
    public func fsync(_ ino: UInt64?) throws(VolumeError) {
        guard !isReadOnly else { return }
        try withFS { fs throws(VolumeError) in try flushFilesystem(fs) }
        guard let commitHook else { return }
        do { try commitHook() } catch { throw VolumeError(.ioError, "committing the pool: \(error)") }
    }

    /// Writes libext2fs's dirty state to the device, then runs `body` still holding the volume's
    /// lock, so nothing in this filesystem changes until `body` returns. `VolumeGroup` nests this
    /// over its volumes around one pool commit.
    public func withFlushedState<T>(_ body: () throws -> T) throws -> T {
        lock.lock()
        defer { lock.unlock() }
        if let fs, !isReadOnly { try flushFilesystem(fs) }
        return try body()
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
    private func flushFilesystem(_ fs: ext2_filsys) throws(VolumeError) {
        if fs.pointee.flags & (EXT2_FLAG_DIRTY | EXT2_FLAG_BB_DIRTY | EXT2_FLAG_IB_DIRTY) != 0 {
            try check(ext2fs_flush2(fs, EXT2_FLAG_FLUSH_NO_SYNC), "flushing the filesystem")
        }
        do { try channelState(fs.pointee.io).flush() } catch {
            throw VolumeError((error as? ThinPoolError)?.errno ?? .ioError, "flushing the device: \(error)")
        }
    }
}

// MARK: - The io_manager over BlockDevice

/// Devices handed to libext2fs by name: `ext2fs_open2` takes a name, not a pointer.
final class ChannelRegistry: @unchecked Sendable {
    static let shared = ChannelRegistry()
    private let lock = Lock()
    private var devices: [String: BlockDevice] = [:]
    private var next = 0

    func register(_ device: BlockDevice) -> String {
        lock.withLock {
            next += 1
            let name = "thinfs-blockdevice-\(next)"
            devices[name] = device
            return name
        }
    }

    func unregister(_ name: String) { lock.withLock { _ = devices.removeValue(forKey: name) } }
    func device(_ name: String) -> BlockDevice? { lock.withLock { devices[name] } }
}

/// What a channel's private_data holds.
/// What a channel's private_data holds: the device, and a small block cache.
///
/// libext2fs re-reads extent-tree, bitmap and directory blocks all the time, and
/// writes a file one block at a time, rewriting its inode-table block after
/// each; unix_io keeps a write-back cache for both, and so does this manager:
///
/// - single-block reads are cached; larger reads go to the device, and the
///   dirty cached blocks they overlap are laid over what it returned;
/// - single-block writes stay in the cache, dirty, and are written back sorted
///   and coalesced into large pwrites when half the cache is dirty, and at
///   every flush, before the device's own flush (a pool commit);
/// - larger writes go straight to the device and update the cached copies they
///   overlap; discards drop them.
///
/// So the device holds everything written once a flush returns, which is all a
/// commit needs. Callbacks run under the Volume's lock; the cache's own lock
/// only makes that independent of the caller.
///
/// When the device takes no writes (a thin pool out of data space), dirty blocks
/// stay in memory, as the kernel keeps dirty pages: reads still work, the cache
/// grows past its size up to `overflowLimit` blocks, and a later write-back
/// (once the pool has grown) writes them all and shrinks it back.
private final class ChannelState {
    let device: BlockDevice
    private struct Entry {
        var data: UnsafeMutableRawPointer
        var dirty: Bool
        /// Written while `fileDataMode` was set: written back with `writeFileData`.
        var fileData = false
    }
    private let lock = Lock()
    private var blocks: [UInt64: Entry] = [:]
    private var order: [UInt64] = []
    private var next = 0
    private var dirtyCount = 0
    /// The cached blocks whose `fileData` is set, always `blocks.filter { $0.value.fileData }.keys`:
    /// `writeBackFileData` visits them and the written file's blocks, not the whole cache (a
    /// filter of every cached block on each 4 KiB write was a quarter of a create's time, and grew
    /// with the cache). Kept by `setFileData` and by every removal of an entry.
    private var fileDataBlocks = Set<UInt64>()
    private var blockSize = 0
    static let capacity = 1024
    /// Set by `Volume.write` around its libext2fs file writes: the blocks written meanwhile are
    /// file data, which the device writes with `writeFileData`, leaving a thin pool's reserve to
    /// the filesystem's metadata (`UserspaceThinPool.reservedDataBlocks`), until
    /// `writeBackFileData` says which of them were (libext2fs writes the inode table and extent
    /// blocks meanwhile too). Read and written under the Volume's lock only.
    var fileDataMode = false
    /// Counts libext2fs's block frees (see `countBlockFrees`). Read and written under the Volume's
    /// lock only: unlocked file reads compare it before and after their device I/O.
    var freeGeneration: UInt64 = 0

    init(device: BlockDevice) { self.device = device }
    deinit {
        for e in blocks.values { e.data.deallocate() }
    }

    func setBlockSize(_ size: Int) throws {
        try lock.withLock {
            discardFreedRun()
            guard size != blockSize else { return }
            try writeBack()
            for e in blocks.values { e.data.deallocate() }
            blocks.removeAll()
            fileDataBlocks.removeAll()
            order.removeAll()
            next = 0
            blockSize = size
        }
    }

    /// Dirty blocks held past `capacity` while write-back fails: 64 MiB of 4K blocks.
    static let overflowLimit = 16 * capacity
    /// After a failed write-back, when to try again: at this dirty count, or a second later
    /// (the pool may have grown); flushes always try. Every insert retrying a write-back the
    /// device refuses would cost a pwrite per dirty run.
    private var retryWriteBack: (dirtyCount: Int, time: ContinuousClock.Instant)?

    /// A write-back now, unless one failed recently (see `retryWriteBack`) and `force` is
    /// false. False if the dirty blocks are still dirty.
    private func writeBackUnlessFailing(force: Bool = false) -> Bool {
        guard dirtyCount > 0 else { return true }
        if !force, let retry = retryWriteBack, dirtyCount < retry.dirtyCount, ContinuousClock.now < retry.time { return false }
        do {
            try writeBack()
            retryWriteBack = nil
            return true
        } catch {
            retryWriteBack = (dirtyCount + Self.capacity / 2, ContinuousClock.now + .seconds(1))
            return false
        }
    }

    func read(_ block: UInt64, _ count: Int32, _ data: UnsafeMutableRawPointer, _ r: (offset: UInt64, length: Int)) throws {
        try lock.withLock {
            discardFreedRun()
            if count == 1, r.length == blockSize, let hit = blocks[block] {
                data.copyMemory(from: hit.data, byteCount: r.length)
                return
            }
            try device.read(into: UnsafeMutableRawBufferPointer(start: data, count: r.length), at: r.offset)
            // Dirty cached blocks are newer than the device: lay them over what was read. (Not a
            // write-back first: on a full thin pool it fails, and reads must keep working.)
            if dirtyCount > 0 {
                for s in shared(r) where s.entry.dirty {
                    data.advanced(by: s.inRange).copyMemory(from: s.entry.data.advanced(by: s.inBlock), byteCount: s.count)
                }
            }
            if count == 1, r.length == blockSize { try insert(block, data, dirty: false) }
        }
    }

    func write(_ block: UInt64, _ count: Int32, _ data: UnsafeRawPointer, _ r: (offset: UInt64, length: Int)) throws {
        try lock.withLock {
            writeCalls += 1
            discardFreedRun()
            if count == 1, r.length == blockSize, blockSize > 0 {
                try insert(block, data, dirty: true)
                return
            }
            let bytes = UnsafeRawBufferPointer(start: data, count: r.length)
            if fileDataMode { try device.writeFileData(bytes, at: r.offset) } else { try device.write(bytes, at: r.offset) }
            guard blockSize > 0, !blocks.isEmpty, r.length > 0 else { return }
            // Keep overlapping cached copies current (a dirty one stays dirty: its other bytes are newer than the device).
            for s in shared(r) {
                s.entry.data.advanced(by: s.inBlock).copyMemory(from: data.advanced(by: s.inRange), byteCount: s.count)
            }
        }
    }

    func discard(_ r: (offset: UInt64, length: Int)) throws {
        try lock.withLock {
            discardFreedRun()
            // Discarded bytes are gone: drop the cached copies, dirty or not, then unmap.
            for b in overlapping(r) { drop(b) }
            try device.discard(offset: r.offset, length: UInt64(r.length))
        }
    }

    /// Blocks the filesystem has just freed (libext2fs's allocation callbacks): their cached
    /// copies go now (a dirty one written back later would map the block again), and the
    /// device unmaps them, so that a thin pool gets the space back (the whole pool blocks
    /// among them) as the kernel's ext4 gives it back with `-o discard`. Without it, `rm` in a
    /// container on a full pool freed nothing in the pool, and new data in the freed ext4
    /// blocks needed new pool blocks.
    ///
    /// libext2fs frees a file's blocks one at a time (punch.c), so consecutive frees gather
    /// into one discard, sent before the channel's next I/O (`discardFreedRun`).
    func discardFreed(_ block: UInt64, count: UInt64) {
        lock.withLock {
            guard blockSize > 0, count > 0 else { return }
            for b in overlapping((block * UInt64(blockSize), Int(count) * blockSize)) { drop(b) }
            if let run = freedRun, run.start + run.count == block {
                freedRun = (run.start, run.count + count)
                return
            }
            discardFreedRun()
            freedRun = (block, count)
        }
    }

    /// Ends a `fileDataMode` write (`Volume.write`, before it returns): the dirty blocks in
    /// `runs`, the file's data, are written back now with `writeFileData`, and those the device
    /// refuses (a thin pool down to its reserve) are dropped, never written later: the write
    /// that made them fails, and the caller hears it. The other blocks written meanwhile are
    /// metadata (the inode table, extent blocks): they lose the file-data mark and are written
    /// back with the rest, never dropped.
    func writeBackFileData(_ runs: [(start: UInt64, count: UInt64)]) throws {
        try lock.withLock {
            discardFreedRun()
            var data = Set<UInt64>()
            for run in runs {
                // A long run covers few cached blocks: then walk the cache instead of the run.
                if run.count < UInt64(blocks.count) {
                    for b in run.start..<(run.start + run.count) where blocks[b] != nil { data.insert(b) }
                } else {
                    data.formUnion(blocks.keys.filter { $0 >= run.start && $0 < run.start + run.count })
                }
            }
            // Only blocks marked since the last call can carry the mark (every call ends with none):
            // those outside `runs` are metadata.
            for b in fileDataBlocks where !data.contains(b) { setFileData(b, false) }
            for b in data { setFileData(b, true) }
            defer { for b in data { setFileData(b, false) } }
            do {
                try writeBack(only: data)
            } catch {
                for b in data where blocks[b]?.dirty == true { drop(b) }
                throw error
            }
        }
    }

    var counts: (total: Int, dirty: Int) { lock.withLock { (order.count, dirtyCount) } }
    /// Calls of `write` (see `Volume.channelWriteCount`).
    private(set) var writeCalls = 0

    /// Writes back every dirty block without flushing the device.
    func writeBackDirty() throws {
        try lock.withLock {
            discardFreedRun()
            try writeBack()
        }
    }

    /// `writeBackDirty` unless one failed recently; false if dirty blocks remain.
    func writeBackDirtyUnlessFailing() -> Bool {
        lock.withLock {
            discardFreedRun()
            return writeBackUnlessFailing()
        }
    }

    /// Writes back every dirty block, then flushes the device (a pool commit on a thin device).
    func flush() throws {
        try lock.withLock {
            discardFreedRun()
            try writeBack()
            retryWriteBack = nil
        }
        try device.flush()
    }

    // MARK: Under the lock

    /// Consecutive freed blocks not yet discarded (see `discardFreed`).
    private var freedRun: (start: UInt64, count: UInt64)?

    /// Discards `freedRun`. Before every other I/O, so that a freed block written again (newly
    /// allocated) is discarded before it is written, never after. Best effort: a failed discard
    /// leaves the blocks mapped, as they were.
    private func discardFreedRun() {
        guard let run = freedRun else { return }
        freedRun = nil
        // Less than 64 KiB, the smallest thin-pool block, never unmaps anything: not worth a call.
        let bs = UInt64(blockSize)
        guard bs > 0, run.count * bs >= 64 << 10 else { return }
        try? device.discard(offset: run.start * bs, length: run.count * bs)
    }

    /// Sets the `fileData` mark of cached block `b`, keeping `fileDataBlocks`.
    private func setFileData(_ b: UInt64, _ value: Bool) {
        guard blocks[b] != nil, blocks[b]!.fileData != value else { return }
        blocks[b]!.fileData = value
        if value { fileDataBlocks.insert(b) } else { fileDataBlocks.remove(b) }
    }

    /// Removes block `b` from the cache, dirty or not.
    private func drop(_ b: UInt64) {
        guard let e = blocks.removeValue(forKey: b) else { return }
        fileDataBlocks.remove(b)
        if e.dirty { dirtyCount -= 1 }
        e.data.deallocate()
        if let i = order.firstIndex(of: b) { order.remove(at: i); if next >= order.count { next = 0 } }
    }

    private func overlapping(_ r: (offset: UInt64, length: Int)) -> [UInt64] {
        guard blockSize > 0, !blocks.isEmpty, r.length > 0 else { return [] }
        let bs = UInt64(blockSize)
        let first = r.offset / bs, last = (r.offset + UInt64(r.length) - 1) / bs
        // A long range overlaps few cached blocks: then walk the cache instead of the range.
        return last - first < UInt64(blocks.count) ? Array(first...last) : blocks.keys.filter { $0 >= first && $0 <= last }
    }

    /// The cached blocks overlapping `r`, each with the bytes it shares with `r`: `count` bytes at
    /// `inBlock` in the block and at `inRange` in the range.
    private func shared(_ r: (offset: UInt64, length: Int)) -> [(entry: Entry, inBlock: Int, inRange: Int, count: Int)] {
        let bs = UInt64(blockSize)
        return overlapping(r).compactMap { b in
            guard let entry = blocks[b] else { return nil }
            let start = max(r.offset, b * bs), end = min(r.offset + UInt64(r.length), (b + 1) * bs)
            return (entry, Int(start - b * bs), Int(start - r.offset), Int(end - start))
        }
    }

    private func insert(_ block: UInt64, _ data: UnsafeRawPointer, dirty: Bool) throws {
        if var e = blocks[block] {
            e.data.copyMemory(from: data, byteCount: blockSize)
            if dirty && !e.dirty { dirtyCount += 1 }
            e.dirty = e.dirty || dirty
            blocks[block] = e
            if dirty { setFileData(block, fileDataMode) }
        } else {
            // Round-robin replacement; a dirty victim is written back first, with all the others.
            if order.count >= Self.capacity, blocks[order[next]]?.dirty == true, !writeBackUnlessFailing() {
                // The device takes no writes: a block read need not be cached, and a block
                // written is held beyond the cache's size rather than lost (see above).
                guard dirty else { return }
                if order.count >= Self.overflowLimit, !writeBackUnlessFailing(force: true) {
                    throw ThinPoolError.io(operation: "holding \(order.count) unwritten blocks in memory", path: "the volume's block cache",
                                           errno: .noSpace)
                }
            }
            // Grow while there is room, or while the victim is still dirty (write-back failing).
            if order.count < Self.capacity || blocks[order[next]]?.dirty == true {
                order.append(block)
            } else {
                if let old = blocks.removeValue(forKey: order[next]) { old.data.deallocate() }
                fileDataBlocks.remove(order[next])
                order[next] = block
                next = (next + 1) % order.count
            }
            let copy = UnsafeMutableRawPointer.allocate(byteCount: blockSize, alignment: 64)
            copy.copyMemory(from: data, byteCount: blockSize)
            blocks[block] = Entry(data: copy, dirty: dirty)
            if dirty { dirtyCount += 1 }
            setFileData(block, dirty && fileDataMode)
        }
        // Write back early, but the block is safely cached either way: a failure here (the device
        // full) leaves the dirty blocks for the next write-back, and fails only a later insert
        // that must evict one of them.
        if dirtyCount >= Self.capacity / 2 { _ = writeBackUnlessFailing() }
    }

    /// Writes the dirty blocks in block order, one pwrite per contiguous run of one kind (file
    /// data or metadata, up to 1 MiB). A run that fails stays dirty and the others are still
    /// tried; the first error is thrown. `only`: those of these cached blocks only.
    private func writeBack(only: Set<UInt64>? = nil) throws {
        guard dirtyCount > 0 else { return }
        var failure: Error?
        let dirty = only.map { $0.filter { blocks[$0]!.dirty }.sorted() } ?? blocks.filter { $0.value.dirty }.keys.sorted()
        let maxRun = max(1, (1 << 20) / blockSize)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: maxRun * blockSize, alignment: 4096)
        defer { buffer.deallocate() }
        var i = 0
        while i < dirty.count {
            let fileData = blocks[dirty[i]]!.fileData
            var n = 0
            while i + n < dirty.count, n < maxRun, dirty[i + n] == dirty[i] + UInt64(n), blocks[dirty[i + n]]!.fileData == fileData {
                buffer.advanced(by: n * blockSize).copyMemory(from: blocks[dirty[i + n]]!.data, byteCount: blockSize)
                n += 1
            }
            do {
                let run = UnsafeRawBufferPointer(start: buffer, count: n * blockSize), at = dirty[i] * UInt64(blockSize)
                if fileData { try device.writeFileData(run, at: at) } else { try device.write(run, at: at) }
                for b in dirty[i..<(i + n)] { blocks[b]!.dirty = false }
                dirtyCount -= n
            } catch {
                failure = failure ?? error
            }
            i += n
        }
        if let failure { throw failure }
        shrinkToCapacity()
    }

    /// After an overflow (write-back failing, the cache grown past `capacity`) has been written
    /// back, every block is clean: give the memory back by dropping the blocks past `capacity`.
    private func shrinkToCapacity() {
        guard dirtyCount == 0, order.count > Self.capacity else { return }
        for b in order[Self.capacity...] {
            blocks.removeValue(forKey: b)?.data.deallocate()
            fileDataBlocks.remove(b)
        }
        order.removeSubrange(Self.capacity...)
        if next >= order.count { next = 0 }
    }
}

private func channelState(_ channel: io_channel?) -> ChannelState {
    Unmanaged<ChannelState>.fromOpaque(channel!.pointee.private_data).takeUnretainedValue()
}

/// libext2fs's block-allocation callbacks (`ext2fs_block_alloc_stats2` and its range form, which
/// every free of a data block goes through: punch, truncate, inode release). A free bumps the
/// channel's `freeGeneration` and discards the blocks (`discardFreed`). They run inside
/// libext2fs calls, so under the Volume's lock.
private let countBlockFree: @convention(c) (ext2_filsys?, blk64_t, Int32) -> Void = { fs, block, inuse in
    guard inuse < 0, let fs else { return }
    let channel = channelState(fs.pointee.io)
    channel.freeGeneration &+= 1
    channel.discardFreed(UInt64(block), count: 1)
}
private let countBlockRangeFree: @convention(c) (ext2_filsys?, blk64_t, blk_t, Int32) -> Void = { fs, block, count, inuse in
    guard inuse < 0, let fs else { return }
    let channel = channelState(fs.pointee.io)
    channel.freeGeneration &+= 1
    channel.discardFreed(UInt64(block), count: UInt64(count))
}

/// Byte range of a libext2fs block request: a negative count is a byte count (ext2_io.h).
private func byteRange(_ channel: io_channel?, _ block: UInt64, _ count: Int32) -> (offset: UInt64, length: Int) {
    let bs = UInt64(channel!.pointee.block_size)
    return (block * bs, count < 0 ? Int(-count) : Int(count) * Int(bs))
}

/// Maps a device error to an errno-valued errcode_t (libext2fs accepts errno values as error codes).
private func errcode(_ error: Error) -> errcode_t {
    if let e = error as? ThinPoolError { return errcode_t(e.errno.rawValue) }
    if let e = error as? Errno { return errcode_t(e.rawValue) }
    return errcode_t(EIO)
}

private func channelRead(_ channel: io_channel?, _ block: UInt64, _ count: Int32, _ data: UnsafeMutableRawPointer?) -> errcode_t {
    do {
        try channelState(channel).read(block, count, data!, byteRange(channel, block, count))
        return 0
    } catch { return errcode(error) }
}

private func channelWrite(_ channel: io_channel?, _ block: UInt64, _ count: Int32, _ data: UnsafeRawPointer?) -> errcode_t {
    do {
        try channelState(channel).write(block, count, data!, byteRange(channel, block, count))
        return 0
    } catch { return errcode(error) }
}

nonisolated(unsafe) let blockDeviceIOManager: io_manager = {
    let m = UnsafeMutablePointer<struct_io_manager>.allocate(capacity: 1)
    m.initialize(to: struct_io_manager())
    m.pointee.magic = EXT2_ET_MAGIC_IO_MANAGER
    m.pointee.name = UnsafePointer(strdup("ThinFS BlockDevice I/O manager"))
    m.pointee.open = { name, _, channelOut in
        guard let name, let device = ChannelRegistry.shared.device(String(cString: name)) else { return errcode_t(ENOENT) }
        let ch = UnsafeMutablePointer<struct_io_channel>.allocate(capacity: 1)
        ch.initialize(to: struct_io_channel())
        ch.pointee.magic = EXT2_ET_MAGIC_IO_CHANNEL
        ch.pointee.manager = blockDeviceIOManager
        ch.pointee.name = strdup(name)
        ch.pointee.block_size = 1024
        ch.pointee.refcount = 1
        ch.pointee.private_data = UnsafeMutableRawPointer(Unmanaged.passRetained(ChannelState(device: device)).toOpaque())
        channelOut?.pointee = ch
        return 0
    }
    m.pointee.close = { channel in
        guard let channel else { return 0 }
        channel.pointee.refcount -= 1
        guard channel.pointee.refcount <= 0 else { return 0 }
        // ext2fs_close flushes a dirty filesystem first; anything still cached dirty goes out now.
        let written: errcode_t
        do { try channelState(channel).writeBackDirty(); written = 0 } catch { written = errcode(error) }
        Unmanaged<ChannelState>.fromOpaque(channel.pointee.private_data).release()
        free(channel.pointee.name)
        channel.deallocate()
        return written
    }
    m.pointee.set_blksize = { channel, size in
        do {
            try channelState(channel).setBlockSize(Int(size))
            channel?.pointee.block_size = size
            return 0
        } catch { return errcode(error) }
    }
    m.pointee.read_blk = { channel, block, count, data in channelRead(channel, UInt64(block), count, data) }
    m.pointee.write_blk = { channel, block, count, data in channelWrite(channel, UInt64(block), count, data) }
    m.pointee.read_blk64 = { channel, block, count, data in channelRead(channel, UInt64(block), count, data) }
    m.pointee.write_blk64 = { channel, block, count, data in channelWrite(channel, UInt64(block), count, data) }
    m.pointee.write_byte = { channel, offset, count, data in
        do {
            // A byte write (the superblock) is never a whole block: it goes through to the device.
            try channelState(channel).write(0, -count, data!, (UInt64(offset), Int(count)))
            return 0
        } catch { return errcode(error) }
    }
    m.pointee.flush = { channel in
        do {
            try channelState(channel).flush()
            return 0
        } catch { return errcode(error) }
    }
    m.pointee.discard = { channel, block, count in
        let bs = UInt64(channel!.pointee.block_size)
        do {
            try channelState(channel).discard((UInt64(block) * bs, Int(UInt64(count) * bs)))
            return 0
        } catch { return errcode(error) }
    }
    m.pointee.set_option = { _, _, _ in errcode_t(EXT2_ET_INVALID_ARGUMENT) }
    return m
}()

/// ext2fs_free_mem is an inline function taking a pointer to the pointer; this is its effect.
private func ext2fs_free_mem_shim(_ p: UnsafeMutableRawPointer?) { free(p) }
