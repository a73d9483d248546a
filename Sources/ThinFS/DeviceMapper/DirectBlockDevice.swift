import CThinFSShims
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A block device node (`/dev/mapper/<prefix>-<id>`) opened with O_DIRECT.
///
/// O_DIRECT bypasses the page cache, so what a read returns is what the thin
/// target maps now, and a write has reached the target when it returns (a
/// cached copy could outlive a snapshot or a deferred remove). The kernel
/// requires the buffer, offset and length to be aligned to the logical block
/// size; callers may pass anything, so unaligned requests go through an
/// aligned bounce buffer (read-modify-write for partial blocks).
///
/// Writes may come from several threads at once (`Volume.write` moves a
/// write's data outside the volume's lock). A read-modify-write of a partly
/// written 4 KiB page rewrites the page's other bytes as it read them, so two
/// of them on one page (an ext4 with 1 KiB blocks, two writes side by side)
/// would undo each other: they run one at a time (`partialPages`). A write
/// whose offset and length are aligned owns its pages whole and needs no read,
/// only a copy when its buffer is not aligned.
public final class DirectBlockDevice: BlockDevice, @unchecked Sendable {
    /// O_DIRECT alignment: 4096 covers every logical block size dm-thin devices have (512 or 4096).
    public static let alignment = 4096

    public let path: String
    public let size: UInt64
    /// The descriptor, or -1 once closed (later I/O then fails with EBADF).
    private let descriptor: Atomic<Int32>
    private var fd: Int32 { descriptor.load(ordering: .relaxed) }
    /// Runs once, after the descriptor is closed (the kernel pool deactivates the device there).
    private let onClose: (@Sendable () -> Void)?
    /// The free data space of the pool the node's thin target maps into (the kernel pool's status);
    /// nil for a node that is not a thin device.
    private let poolFreeSpace: (@Sendable () throws -> UInt64?)?
    /// Held across each read-modify-write of partly written pages (see above).
    private let partialPages = Mutex(())

    /// - Parameters:
    ///   - freeSpace: what `freeSpace()` answers: the thin pool's free data space, read when asked.
    ///   - onClose: runs once, after the descriptor is closed.
    public init(path: String, readOnly: Bool = false, freeSpace: (@Sendable () throws -> UInt64?)? = nil,
                onClose: (@Sendable () -> Void)? = nil) throws {
        self.path = path
        let fd = thinfs_open_direct(path, readOnly ? O_RDONLY : O_RDWR)
        guard fd >= 0 else { throw ThinPoolError.io(operation: "open(O_DIRECT)", path: path, errno: Errno(rawValue: errno)) }
        let size = thinfs_device_size(fd)
        guard size >= 0 else {
            let e = errno
            Glibc.close(fd)
            throw ThinPoolError.io(operation: "BLKGETSIZE64", path: path, errno: Errno(rawValue: e))
        }
        self.descriptor = Atomic(fd)
        self.size = UInt64(size)
        self.onClose = onClose
        self.poolFreeSpace = freeSpace
    }

    deinit { close() }

    public func close() {
        let fd = descriptor.exchange(-1, ordering: .acquiringAndReleasing)
        guard fd >= 0 else { return }
        Glibc.close(fd)
        onClose?()
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try BlockDeviceError.wrap(.read, path, offset: offset, length: buffer.count) {
            try check(offset, buffer.count)
            if isAligned(buffer.baseAddress, offset, buffer.count) {
                try transfer(buffer, offset, write: false)
                return
            }
            try withBounce(offset, buffer.count) { bounce, start in
                try transfer(bounce, start, write: false)
                buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: bounce[Int(offset - start)..<Int(offset - start) + buffer.count]))
            }
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try BlockDeviceError.wrap(.write, path, offset: offset, length: buffer.count) {
            try check(offset, buffer.count)
            if isAligned(buffer.baseAddress, offset, buffer.count) {
                try transfer(UnsafeMutableRawBufferPointer(mutating: buffer), offset, write: true)
                return
            }
            let a = UInt64(Self.alignment)
            if offset % a == 0 && buffer.count % Self.alignment == 0 {
                // Whole pages, from an unaligned buffer: a copy, no read.
                try withBounce(offset, buffer.count) { bounce, start in
                    bounce.copyMemory(from: buffer)
                    try transfer(bounce, start, write: true)
                }
                return
            }
            try partialPages.withLock { _ in
                try withBounce(offset, buffer.count) { bounce, start in
                    // Read the partial edge blocks first, so the bytes around the write survive.
                    try transfer(bounce, start, write: false)
                    UnsafeMutableRawBufferPointer(rebasing: bounce[Int(offset - start)..<Int(offset - start) + buffer.count]).copyMemory(from: buffer)
                    try transfer(bounce, start, write: true)
                }
            }
        }
    }

    /// BLKDISCARD: dm-thin unmaps whole pool blocks in the range (and passes it down if configured).
    public func discard(offset: UInt64, length: UInt64) throws {
        try BlockDeviceError.wrap(.discard, path, offset: offset, length: Int(clamping: length)) {
            try check(offset, Int(length))
            var range: (UInt64, UInt64) = (offset, length)
            // BLKDISCARD is _IO(0x12, 119); its argument is a uint64_t[2] of offset and length.
            let rc = withUnsafeMutableBytes(of: &range) { thinfs_ioctl_pointer(fd, 0x1277, $0.baseAddress) }
            if rc != 0 { throw ThinPoolError.io(operation: "BLKDISCARD", path: path, errno: Errno(rawValue: errno)) }
        }
    }

    public func flush() throws {
        try BlockDeviceError.wrap(.flush, path) {
            while fsync(fd) != 0 {
                if errno == EINTR { continue }
                throw ThinPoolError.io(operation: "fsync", path: path, errno: Errno(rawValue: errno))
            }
        }
    }

    /// The kernel pool keeps no reserve: all of its free space is there for file data.
    public func freeSpace() throws -> PoolFreeSpace? {
        try poolFreeSpace?().map { PoolFreeSpace(free: $0, forFileData: $0) }
    }

    // MARK: -

    private func check(_ offset: UInt64, _ length: Int) throws {
        guard offset <= size, UInt64(length) <= size - offset else {
            throw ThinPoolError.io(operation: "I/O at \(offset)+\(length) beyond \(size) bytes", path: path, errno: .noSpace)
        }
    }

    private func isAligned(_ base: UnsafeRawPointer?, _ offset: UInt64, _ count: Int) -> Bool {
        let a = Self.alignment
        return Int(bitPattern: base) % a == 0 && offset % UInt64(a) == 0 && count % a == 0
    }

    private func withBounce(_ offset: UInt64, _ count: Int, _ body: (UnsafeMutableRawBufferPointer, UInt64) throws -> Void) throws {
        let a = UInt64(Self.alignment)
        let start = offset / a * a
        let end = (offset + UInt64(count) + a - 1) / a * a
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(end - start), alignment: Self.alignment)
        defer { bounce.deallocate() }
        try body(bounce, start)
    }

    /// pread/pwrite until done; EINTR retried here, once for both directions.
    private func transfer(_ buffer: UnsafeMutableRawBufferPointer, _ offset: UInt64, write: Bool) throws {
        var done = 0
        while done < buffer.count {
            let n = write
                ? pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
                : pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw ThinPoolError.io(operation: write ? "write" : "read", path: path, errno: Errno(rawValue: errno))
            }
            if n == 0 {
                throw ThinPoolError.io(operation: write ? "write" : "read", path: path, errno: .ioError)
            }
            done += n
        }
    }
}
