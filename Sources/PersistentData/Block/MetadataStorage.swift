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
}

/// Metadata on a regular file or block device, through pread/pwrite.
public final class FileMetadataStorage: MetadataStorage {
    public let path: String
    public let nrBlocks: UInt64
    public let readOnly: Bool
    private let fd: Int32

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
    }

    deinit { close(fd) }

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
