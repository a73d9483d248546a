import SystemPackage

/// The POSIX-shaped filesystem API the FUSE server serves and the layer store
/// writes through. `Volume` implements it over libext2fs; tests use an
/// in-memory fake.
///
/// Inode numbers are the filesystem's own (ext4's root directory is 2); the
/// FUSE layer maps its root node id (1) to `rootInode`. Every method throws
/// `VolumeError`, which carries the errno a kernel filesystem would return.
/// Implementations serialize calls internally; callers may use any thread.
public protocol FileSystemVolume: AnyObject, Sendable {
    var rootInode: UInt64 { get }
    var isReadOnly: Bool { get }

    func lookup(parent: UInt64, name: String) throws(VolumeError) -> FileAttributes
    func getattr(_ ino: UInt64) throws(VolumeError) -> FileAttributes
    func setattr(_ ino: UInt64, _ changes: AttributeChanges) throws(VolumeError) -> FileAttributes

    /// Calls `body` for each entry after `cookie` (0 starts at the beginning, "." and ".." included)
    /// until it returns false. Each entry carries the cookie that resumes after it.
    func readdir(_ ino: UInt64, after cookie: UInt64, _ body: (DirectoryEntry) throws(VolumeError) -> Bool) throws(VolumeError)

    func mkdir(parent: UInt64, name: String, mode: UInt32, owner: Owner) throws(VolumeError) -> FileAttributes
    /// Regular files (S_IFREG), fifos, sockets, character and block devices; `mode` includes the type bits.
    func mknod(parent: UInt64, name: String, mode: UInt32, rdev: UInt64, owner: Owner) throws(VolumeError) -> FileAttributes
    func symlink(parent: UInt64, name: String, target: String, owner: Owner) throws(VolumeError) -> FileAttributes
    func readlink(_ ino: UInt64) throws(VolumeError) -> String
    func link(_ ino: UInt64, newParent: UInt64, newName: String) throws(VolumeError) -> FileAttributes
    func unlink(parent: UInt64, name: String) throws(VolumeError)
    func rmdir(parent: UInt64, name: String) throws(VolumeError)
    func rename(parent: UInt64, name: String, newParent: UInt64, newName: String, flags: RenameFlags) throws(VolumeError)

    /// Reads up to `buffer.count` bytes; returns the count (short only at end of file).
    func read(_ ino: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(VolumeError) -> Int
    /// Writes all of `buffer`, extending the file as needed; returns the count.
    func write(_ ino: UInt64, at offset: UInt64, from buffer: UnsafeRawBufferPointer) throws(VolumeError) -> Int
    /// fallocate(2) modes: 0 (allocate, may extend), KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE
    /// (with or without KEEP_SIZE).
    func fallocate(_ ino: UInt64, mode: FallocateMode, offset: UInt64, length: UInt64) throws(VolumeError)
    /// lseek(2) with SEEK_DATA or SEEK_HOLE.
    func seek(_ ino: UInt64, from offset: UInt64, to whence: SeekTarget) throws(VolumeError) -> UInt64

    func getxattr(_ ino: UInt64, name: String) throws(VolumeError) -> [UInt8]
    func setxattr(_ ino: UInt64, name: String, value: [UInt8], flags: XattrFlags) throws(VolumeError)
    func listxattr(_ ino: UInt64) throws(VolumeError) -> [String]
    func removexattr(_ ino: UInt64, name: String) throws(VolumeError)

    func statfs() throws(VolumeError) -> FileSystemStatistics
    /// Makes the file's (or, with nil, every) change durable: on a thin device this commits the pool.
    func fsync(_ ino: UInt64?) throws(VolumeError)

    /// A kernel took its first reference to `ino` (its FUSE lookup count went from 0 to 1), through
    /// a FUSE server that never hears of opens and closes (FUSE_CAP_NO_OPEN_SUPPORT). Until the
    /// matching `forget`, any process may have `ino` open: unlinked, it keeps its blocks.
    func remember(_ ino: UInt64)
    /// A kernel dropped its last reference to `ino`: an unlinked inode nothing else holds can be freed now.
    func forget(_ ino: UInt64)
    /// The file was opened / its last open handle closed (unlinked-but-open files stay until released).
    func open(_ ino: UInt64) throws(VolumeError)
    func release(_ ino: UInt64)
}

/// stat(2)'s fields.
public struct FileAttributes: Equatable, Sendable {
    public var ino: UInt64
    /// Type and permission bits, as st_mode.
    public var mode: UInt32
    public var nlink: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var rdev: UInt64
    public var size: UInt64
    /// 512-byte units allocated.
    public var blocks: UInt64
    public var atime: Timestamp
    public var mtime: Timestamp
    public var ctime: Timestamp
    public var blockSize: UInt32
    public var generation: UInt32

    public init(ino: UInt64, mode: UInt32, nlink: UInt32, uid: UInt32, gid: UInt32, rdev: UInt64, size: UInt64,
                blocks: UInt64, atime: Timestamp, mtime: Timestamp, ctime: Timestamp, blockSize: UInt32, generation: UInt32) {
        self.ino = ino
        self.mode = mode
        self.nlink = nlink
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.size = size
        self.blocks = blocks
        self.atime = atime
        self.mtime = mtime
        self.ctime = ctime
        self.blockSize = blockSize
        self.generation = generation
    }

    public var isDirectory: Bool { mode & 0o170000 == 0o040000 }
    public var isRegular: Bool { mode & 0o170000 == 0o100000 }
    public var isSymlink: Bool { mode & 0o170000 == 0o120000 }
}

/// Seconds and nanoseconds since the epoch.
public struct Timestamp: Equatable, Hashable, Sendable, Comparable {
    public var seconds: Int64
    public var nanoseconds: UInt32
    public init(seconds: Int64, nanoseconds: UInt32) {
        self.seconds = seconds
        self.nanoseconds = nanoseconds
    }
    public static func < (a: Timestamp, b: Timestamp) -> Bool {
        (a.seconds, a.nanoseconds) < (b.seconds, b.nanoseconds)
    }
}

/// setattr(2)-style changes; nil leaves a field alone.
public struct AttributeChanges: Equatable, Sendable {
    public enum Time: Equatable, Sendable {
        case now
        case set(Timestamp)
    }
    public var mode: UInt32?
    public var uid: UInt32?
    public var gid: UInt32?
    public var size: UInt64?
    public var atime: Time?
    public var mtime: Time?
    public var ctime: Timestamp?
    public init(mode: UInt32? = nil, uid: UInt32? = nil, gid: UInt32? = nil, size: UInt64? = nil,
                atime: Time? = nil, mtime: Time? = nil, ctime: Timestamp? = nil) {
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.atime = atime
        self.mtime = mtime
        self.ctime = ctime
    }
}

/// The caller who creates a file: its owner, before set-group-ID directory inheritance.
public struct Owner: Equatable, Sendable {
    public var uid: UInt32
    public var gid: UInt32
    /// The caller's umask is applied by the kernel for FUSE; this is for direct callers.
    public init(uid: UInt32, gid: UInt32) {
        self.uid = uid
        self.gid = gid
    }
    public static let root = Owner(uid: 0, gid: 0)
}

public struct DirectoryEntry: Equatable, Sendable {
    public var name: String
    public var ino: UInt64
    /// The type bits of st_mode (S_IFDIR, S_IFREG, ...).
    public var type: UInt32
    /// Pass to `readdir(after:)` to continue after this entry.
    public var cookie: UInt64
    public init(name: String, ino: UInt64, type: UInt32, cookie: UInt64) {
        self.name = name
        self.ino = ino
        self.type = type
        self.cookie = cookie
    }
}

public struct RenameFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// RENAME_NOREPLACE (1): fail with EEXIST if the target exists.
    public static let noReplace = RenameFlags(rawValue: 1)
    /// RENAME_EXCHANGE (2): swap the two names atomically.
    public static let exchange = RenameFlags(rawValue: 2)
}

public struct FallocateMode: OptionSet, Sendable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    public static let keepSize = FallocateMode(rawValue: 0x01)   // FALLOC_FL_KEEP_SIZE
    public static let punchHole = FallocateMode(rawValue: 0x02)  // FALLOC_FL_PUNCH_HOLE
    public static let zeroRange = FallocateMode(rawValue: 0x10)  // FALLOC_FL_ZERO_RANGE
}

public enum SeekTarget: Sendable {
    case data   // SEEK_DATA
    case hole   // SEEK_HOLE
}

public struct XattrFlags: OptionSet, Sendable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    public static let create = XattrFlags(rawValue: 1)   // XATTR_CREATE
    public static let replace = XattrFlags(rawValue: 2)  // XATTR_REPLACE
}

public struct FileSystemStatistics: Equatable, Sendable {
    public var blockSize: UInt64
    public var blocks: UInt64
    public var freeBlocks: UInt64
    /// Free blocks for unprivileged users (reserved blocks excluded).
    public var availableBlocks: UInt64
    public var files: UInt64
    public var freeFiles: UInt64
    public var nameMax: UInt64
    public init(blockSize: UInt64, blocks: UInt64, freeBlocks: UInt64, availableBlocks: UInt64, files: UInt64,
                freeFiles: UInt64, nameMax: UInt64) {
        self.blockSize = blockSize
        self.blocks = blocks
        self.freeBlocks = freeBlocks
        self.availableBlocks = availableBlocks
        self.files = files
        self.freeFiles = freeFiles
        self.nameMax = nameMax
    }
}

/// A filesystem error: the errno the caller should see, and what failed.
public struct VolumeError: Error, Equatable, CustomStringConvertible, Sendable {
    public var errno: Errno
    public var context: String
    public init(_ errno: Errno, _ context: String) {
        self.errno = errno
        self.context = context
    }
    public var description: String { "\(context): \(errno)" }
}
