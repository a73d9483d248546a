#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where metadata blocks live: a file or block device, or memory in tests.
public protocol MetadataStorage: AnyObject {
    /// Size of the device in 4096-byte blocks.
    var nrBlocks: UInt64 { get }
    var name: String { get }
    func read(block: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(MetadataError)
    func write(block: UInt64, from buffer: UnsafeRawBufferPointer) throws(MetadataError)
    /// Makes every completed write durable (fdatasync).
    func sync() throws(MetadataError)
    /// Writes one block and returns once that block is durable, like a write with FUA: the
    /// superblock at the end of a commit. Other writes not yet synced need not become durable
    /// with it, so a caller must `sync` first whatever the block points at.
    func writeDurably(block: UInt64, from buffer: UnsafeRawBufferPointer) throws(MetadataError)
}

extension MetadataStorage {
    /// A write, then a sync of everything: durable, if more than a FUA write promises.
    public func writeDurably(block: UInt64, from buffer: UnsafeRawBufferPointer) throws(MetadataError) {
        try write(block: block, from: buffer)
        try sync()
    }
}

/// Metadata on a regular file or block device, through pread/pwrite.
public final class FileMetadataStorage: MetadataStorage {
    public let path: String
    public let nrBlocks: UInt64
    public let readOnly: Bool
    private let fd: Int32
    /// The same file opened `O_DSYNC` (writers only): a pwrite through it returns once its bytes
    /// are durable, one syscall where a pwrite and an fdatasync were two, and it flushes only
    /// that range of the page cache. On a block device with FUA, the kernel sends it as one FUA
    /// write, as dm-thin writes its superblock (`RWF_DSYNC` per write would do the same, but
    /// Glibc's Swift module hides `pwritev2`).
    private let dsyncFD: Int32

    public var name: String { path }

    public init(path: String, readOnly: Bool = false) throws(MetadataError) {
        self.path = path
        self.readOnly = readOnly
        let fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open", path: path, errno: errno) }
        self.fd = fd
        let size = lseek(fd, 0, SEEK_END)
        guard size >= 0 else {
            let e = errno
            close(fd)
            throw .io(operation: "lseek", path: path, errno: e)
        }
        self.nrBlocks = UInt64(size) / UInt64(MetadataBlock.size)
        if readOnly {
            dsyncFD = -1
        } else {
            dsyncFD = open(path, O_RDWR | O_DSYNC | O_CLOEXEC)
            guard dsyncFD >= 0 else {
                let e = errno
                close(fd)
                throw .io(operation: "open (O_DSYNC)", path: path, errno: e)
            }
        }
    }

    deinit {
        close(fd)
        if dsyncFD >= 0 { close(dsyncFD) }
    }

    public func read(block: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(MetadataError) {
        guard block < nrBlocks else { throw .blockOutOfRange(block: block, nrBlocks: nrBlocks) }
        try fullIO("pread", buffer.count) { done in
            pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(block) * 4096 + off_t(done))
        }
    }

    public func write(block: UInt64, from buffer: UnsafeRawBufferPointer) throws(MetadataError) {
        guard block < nrBlocks else { throw .blockOutOfRange(block: block, nrBlocks: nrBlocks) }
        try fullIO("pwrite", buffer.count) { done in
            pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(block) * 4096 + off_t(done))
        }
    }

    /// One pwrite through the `O_DSYNC` descriptor. It returns once the block is durable; an
    /// error (EIO from the write-back) means it may or may not be.
    public func writeDurably(block: UInt64, from buffer: UnsafeRawBufferPointer) throws(MetadataError) {
        guard block < nrBlocks else { throw .blockOutOfRange(block: block, nrBlocks: nrBlocks) }
        guard dsyncFD >= 0 else { throw .io(operation: "pwrite", path: path, errno: EBADF) }
        try fullIO("pwrite (O_DSYNC)", buffer.count) { done in
            pwrite(dsyncFD, buffer.baseAddress! + done, buffer.count - done, off_t(block) * 4096 + off_t(done))
        }
    }

    public func sync() throws(MetadataError) {
        while fdatasync(fd) != 0 {
            if errno != EINTR { throw .io(operation: "fdatasync", path: path, errno: errno) }
        }
    }

    /// Repeats a pread/pwrite until all bytes moved, retrying EINTR; a short read at EOF is an error.
    private func fullIO(_ op: String, _ count: Int, _ call: (Int) -> Int) throws(MetadataError) {
        var done = 0
        while done < count {
            let n = call(done)
            if n < 0 {
                if errno == EINTR { continue }
                throw .io(operation: op, path: path, errno: errno)
            }
            if n == 0 { throw .io(operation: op, path: path, errno: EIO) }
            done += n
        }
    }
}

/// Metadata in memory. Tests use it to inject write failures and to simulate a
/// crash: `crash()` throws away every write made since the last `sync()`.
public final class MemoryMetadataStorage: MetadataStorage {
    public let nrBlocks: UInt64
    public var name: String { "memory" }
    private var durable: [UInt64: [UInt8]] = [:]
    private var pending: [UInt64: [UInt8]] = [:]
    /// When set, the write of this many more blocks succeeds and the next fails with EIO.
    public var failWritesAfter: Int?

    public init(nrBlocks: UInt64) { self.nrBlocks = nrBlocks }

    public func read(block: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(MetadataError) {
        guard block < nrBlocks else { throw .blockOutOfRange(block: block, nrBlocks: nrBlocks) }
        if let bytes = pending[block] ?? durable[block] {
            bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
        } else {
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    public func write(block: UInt64, from buffer: UnsafeRawBufferPointer) throws(MetadataError) {
        guard block < nrBlocks else { throw .blockOutOfRange(block: block, nrBlocks: nrBlocks) }
        if let n = failWritesAfter {
            if n == 0 { throw .io(operation: "write", path: name, errno: EIO) }
            failWritesAfter = n - 1
        }
        pending[block] = Array(buffer)
    }

    public func sync() throws(MetadataError) {
        durable.merge(pending) { $1 }
        pending.removeAll()
    }

    /// Loses every write since the last sync, as a power cut would.
    public func crash() { pending.removeAll() }
}
