import CThinFSShims
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A byte-addressed block device: a thin device, a plain file, or (with the
/// kernel backend) a /dev/mapper node. The Volume layer reads ext4 through it.
public protocol BlockDevice: AnyObject, Sendable {
    /// Size in bytes.
    var size: UInt64 { get }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Writes a file's data (a Volume's `write`), as opposed to filesystem metadata. A userspace
    /// thin device refuses it with ENOSPC while the pool is down to its reserve, which only
    /// metadata may use (`UserspaceThinPool.reservedDataBlocks`); other devices just write it.
    func writeFileData(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// True when the next commit (`flush`) makes space free that writes cannot have now: a thin
    /// pool hands out blocks freed since its last commit only after the next one.
    var spaceFreedAtCommit: Bool { get }
    /// Unmaps a range; later reads of whole unmapped blocks return zeros.
    func discard(offset: UInt64, length: UInt64) throws
    /// Makes completed writes durable.
    func flush() throws
    /// Lets the device go now rather than when the last reference does; later I/O fails.
    /// Idempotent. A kernel thin device is deactivated once its last opener closes it.
    func close()
    /// The space that writes to blocks not yet backed can still get from the storage beneath:
    /// a thin device's pool's free data space, which every thin device of the pool shares. nil
    /// when the device's whole size is its own (a file as a scratch image), so that the
    /// filesystem's free count is the whole answer. A filesystem's statfs caps its free space
    /// by this, so every wrapper must forward it (no default: a wrapper that forgets does not
    /// compile, rather than showing a container the ext4's free space instead of the pool's).
    func freeSpace() throws -> PoolFreeSpace?
}

/// What a thin pool can still give its devices' writes (`BlockDevice.freeSpace()`), in bytes.
///
/// statfs maps it the way ext4 maps its root reserve: `f_bfree` is capped by `free`, and
/// `f_bavail` by `forFileData`, so `df` shows what a container's files can still get.
public struct PoolFreeSpace: Equatable, Sendable {
    /// Free data space: what any write can still get, filesystem metadata included.
    public var free: UInt64
    /// What writes of file data can get: `free` less the reserve that only metadata may use
    /// (`UserspaceThinPool.reservedDataBlocks`). The same as `free` on a kernel pool, which
    /// overwrites metadata in place and keeps no reserve.
    public var forFileData: UInt64

    public init(free: UInt64, forFileData: UInt64) {
        self.free = free
        self.forFileData = min(forFileData, free)
    }
}

extension BlockDevice {
    public func close() {}

    public func writeFileData(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws { try write(buffer, at: offset) }
    public var spaceFreedAtCommit: Bool { false }

    /// Copies the first `length` bytes to `target`, 1 MiB at a time (exporting a device as an image).
    public func copy(to target: BlockDevice, length: UInt64) throws {
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { chunk.deallocate() }
        var offset: UInt64 = 0
        while offset < length {
            let part = UnsafeMutableRawBufferPointer(rebasing: chunk[0..<Int(min(UInt64(chunk.count), length - offset))])
            try read(into: part, at: offset)
            try target.write(UnsafeRawBufferPointer(part), at: offset)
            offset += UInt64(part.count)
        }
    }
}

/// A regular file as a block device (tests, mkfs scratch images).
public final class FileBlockDevice: BlockDevice {
    public let path: FilePath
    public let size: UInt64
    private let fd: FileDescriptor
    /// The path as errors print it, made once: converting `path` on every I/O cost a heap allocation.
    private let name: String

    public init(path: FilePath, readOnly: Bool = false) throws {
        self.path = path
        self.name = path.string
        do {
            fd = try FileDescriptor.open(path, readOnly ? .readOnly : .readWrite, options: [.closeOnExec])
            size = UInt64(try fd.seek(offset: 0, from: .end))
        } catch let e as Errno {
            throw ThinPoolError.io(operation: "open", path: path.string, errno: e)
        }
    }

    deinit { try? fd.close() }

    /// Creates a sparse file of `size` bytes (refusing an existing one) and opens it.
    public static func create(path: FilePath, size: UInt64) throws -> FileBlockDevice {
        do {
            let fd = try FileDescriptor.open(path, .readWrite, options: [.create, .exclusiveCreate, .closeOnExec], permissions: [.ownerReadWrite])
            defer { try? fd.close() }
            try fd.truncate(to: size, path: path.string)
        } catch let e as Errno {
            throw ThinPoolError.io(operation: "create", path: path.string, errno: e)
        }
        return try FileBlockDevice(path: path)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try BlockDeviceError.wrap(.read, name, offset: offset, length: buffer.count) { try fd.readFully(into: buffer, at: offset, path: name) }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try BlockDeviceError.wrap(.write, name, offset: offset, length: buffer.count) { try fd.writeFully(buffer, at: offset, path: name) }
    }

    public func discard(offset: UInt64, length: UInt64) throws {
        try BlockDeviceError.wrap(.discard, name, offset: offset, length: Int(clamping: length)) {
            try fd.punchHole(offset: offset, length: length, path: name)
        }
    }

    public func flush() throws { try BlockDeviceError.wrap(.flush, name) { try fd.dataSync(path: name) } }

    /// A file backs all of its size (a sparse one could run out of host disk, as a preallocated
    /// block device cannot, but that is the host's free space, not a pool's).
    public func freeSpace() throws -> PoolFreeSpace? { nil }
}

extension FileDescriptor {
    /// pread until the buffer is full; bytes past end of file read as zeros.
    package func readFully(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, path: String) throws {
        var done = 0
        while done < buffer.count {
            let n: Int
            do {
                n = try read(fromAbsoluteOffset: Int64(offset) + Int64(done),
                             into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), retryOnInterrupt: true)
            } catch let e as Errno {
                throw ThinPoolError.io(operation: "read", path: path, errno: e)
            }
            if n == 0 {
                UnsafeMutableRawBufferPointer(rebasing: buffer[done...]).initializeMemory(as: UInt8.self, repeating: 0)
                return
            }
            done += n
        }
    }

    /// pwrite until every byte is written.
    package func writeFully(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, path: String) throws {
        var done = 0
        while done < buffer.count {
            do {
                done += try write(toAbsoluteOffset: Int64(offset) + Int64(done),
                                  UnsafeRawBufferPointer(rebasing: buffer[done...]), retryOnInterrupt: true)
            } catch let e as Errno {
                throw ThinPoolError.io(operation: "write", path: path, errno: e)
            }
        }
    }

    package func dataSync(path: String) throws {
        while fdatasync(rawValue) != 0 {
            if errno == EINTR { continue }
            throw ThinPoolError.io(operation: "fdatasync", path: path, errno: Errno(rawValue: errno))
        }
    }

    /// fallocate(PUNCH_HOLE | KEEP_SIZE): returns the range to the file system.
    package func punchHole(offset: UInt64, length: UInt64, path: String) throws {
        if thinfs_punch_hole(rawValue, Int64(offset), Int64(length)) != 0 {
            throw ThinPoolError.io(operation: "fallocate(PUNCH_HOLE)", path: path, errno: Errno(rawValue: errno))
        }
    }

    /// fallocate(ZERO_RANGE | KEEP_SIZE), or zeros written where the file system lacks it.
    package func zeroRange(offset: UInt64, length: UInt64, path: String) throws {
        if thinfs_zero_range(rawValue, Int64(offset), Int64(length)) == 0 { return }
        guard errno == EOPNOTSUPP || errno == ENOSYS else {
            throw ThinPoolError.io(operation: "fallocate(ZERO_RANGE)", path: path, errno: Errno(rawValue: errno))
        }
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(length, 1 << 20)), alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(zeros.count), length - done))
            try writeFully(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: offset + done, path: path)
            done += UInt64(n)
        }
    }

    package func truncate(to size: UInt64, path: String) throws {
        if ftruncate(rawValue, off_t(size)) != 0 {
            throw ThinPoolError.io(operation: "ftruncate", path: path, errno: Errno(rawValue: errno))
        }
    }
}
