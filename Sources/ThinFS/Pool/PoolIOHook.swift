import PersistentData
import SystemPackage

/// A seam under the userspace pool's two files, for tests that must see or break its I/O.
///
/// The power-cut replay (`Tests/ThinFSTests/PowerCutTests.swift`) records every write and flush
/// the pool sends to its data and metadata files, in order, as the kernel's dm-log-writes target
/// does below a filesystem, and later rebuilds what a disk could hold after a cut. Fault injection
/// fails a chosen operation with an errno, or makes a write short, as a failing disk would.
///
/// Nothing installs a hook in production: a pool then calls its files directly, and the seam
/// costs one nil check per I/O. A hook is installed by data-file path (`PoolIOHooks.install`),
/// so parallel tests with pools of their own never see each other's I/O.
public protocol PoolIOHook: AnyObject, Sendable {
    /// Called before `operation` reaches the file. Throwing fails it with that errno and leaves
    /// the file unchanged; returning a count below a write's length writes only that prefix, and
    /// the write then fails with EIO (a short write that the pool must not take for success).
    func willPerform(_ operation: PoolIOOperation) throws(Errno) -> Int?
    /// Called once `operation` has reached the file (the page cache, until a `sync`).
    func didPerform(_ operation: PoolIOOperation)
}

/// One operation on a pool file, as a `PoolIOHook` sees it.
public enum PoolIOOperation {
    public enum File: String, Sendable { case data, metadata }
    /// `bytes` is valid only for the duration of the call.
    case write(File, offset: UInt64, bytes: UnsafeRawBufferPointer)
    /// A range that reads back as zeros afterwards (fallocate ZERO_RANGE or PUNCH_HOLE).
    case zero(File, offset: UInt64, length: UInt64)
    case truncate(File, size: UInt64)
    /// fdatasync: every completed write of the file is durable once it returns.
    case sync(File)
    /// A write that is durable once it returns (`O_DSYNC`, or FUA on a device): a write, then a
    /// flush of that write alone. The file's other writes since its last sync stay as they were,
    /// durable or not. The superblock at the end of a commit.
    case durableWrite(File, offset: UInt64, bytes: UnsafeRawBufferPointer)
    case read(File, offset: UInt64, length: Int)

    public var file: File {
        switch self {
        case .write(let f, _, _), .zero(let f, _, _), .truncate(let f, _), .sync(let f), .read(let f, _, _),
             .durableWrite(let f, _, _): f
        }
    }
}

/// Where hooks are installed: by the pool's data-file path, read when a pool is opened or created.
public enum PoolIOHooks {
    private final class Registry: @unchecked Sendable {
        let lock = Lock()
        var hooks: [String: any PoolIOHook] = [:]
    }
    private static let registry = Registry()

    /// Every pool opened or created from now on over `dataPath` runs its I/O through `hook`.
    public static func install(_ hook: any PoolIOHook, dataPath: String) {
        registry.lock.withLock { registry.hooks[dataPath] = hook }
    }

    /// Pools opened from now on over `dataPath` run without a hook (open ones keep theirs).
    public static func remove(dataPath: String) {
        _ = registry.lock.withLock { registry.hooks.removeValue(forKey: dataPath) }
    }

    static func hook(dataPath: String) -> (any PoolIOHook)? {
        registry.lock.withLock { registry.hooks[dataPath] }
    }
}

/// The pool's data file: a file descriptor, and the hook when a test installed one. Its methods
/// are the `FileDescriptor` helpers the data path calls, with the same names, so the data path
/// reads the same with or without it.
struct PoolDataFile {
    let fd: FileDescriptor
    let hook: (any PoolIOHook)?

    var rawValue: Int32 { fd.rawValue }

    func seek(offset: Int64, from whence: FileDescriptor.SeekOrigin) throws -> Int64 {
        try fd.seek(offset: offset, from: whence)
    }

    func close() throws { try fd.close() }

    private func ask(_ operation: PoolIOOperation, _ name: String, path: String) throws -> Int? {
        guard let hook else { return nil }
        do { return try hook.willPerform(operation) } catch {
            throw ThinPoolError.io(operation: name, path: path, errno: error)
        }
    }

    func readFully(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, path: String) throws {
        _ = try ask(.read(.data, offset: offset, length: buffer.count), "read", path: path)
        try fd.readFully(into: buffer, at: offset, path: path)
    }

    func writeFully(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, path: String) throws {
        guard let hook else { return try fd.writeFully(buffer, at: offset, path: path) }
        let operation = PoolIOOperation.write(.data, offset: offset, bytes: buffer)
        if let allowed = try ask(operation, "write", path: path), allowed < buffer.count {
            let prefix = UnsafeRawBufferPointer(rebasing: buffer[0..<max(0, allowed)])
            try fd.writeFully(prefix, at: offset, path: path)
            hook.didPerform(.write(.data, offset: offset, bytes: prefix))
            throw ThinPoolError.io(operation: "write", path: path, errno: .ioError)
        }
        try fd.writeFully(buffer, at: offset, path: path)
        hook.didPerform(operation)
    }

    func zeroRange(offset: UInt64, length: UInt64, path: String) throws {
        _ = try ask(.zero(.data, offset: offset, length: length), "fallocate(ZERO_RANGE)", path: path)
        try fd.zeroRange(offset: offset, length: length, path: path)
        hook?.didPerform(.zero(.data, offset: offset, length: length))
    }

    func dataSync(path: String) throws {
        _ = try ask(.sync(.data), "fdatasync", path: path)
        try fd.dataSync(path: path)
        hook?.didPerform(.sync(.data))
    }

    func truncate(to size: UInt64, path: String) throws {
        _ = try ask(.truncate(.data, size: size), "ftruncate", path: path)
        try fd.truncate(to: size, path: path)
        hook?.didPerform(.truncate(.data, size: size))
    }
}

/// The pool's metadata file under a hook (see `PoolDataFile`).
final class HookedMetadataStorage: MetadataStorage {
    let inner: MetadataStorage
    let hook: any PoolIOHook

    init(_ inner: MetadataStorage, hook: any PoolIOHook) {
        self.inner = inner
        self.hook = hook
    }

    var nrBlocks: UInt64 { inner.nrBlocks }
    var name: String { inner.name }

    private func ask(_ operation: PoolIOOperation, _ name: String) throws(MetadataError) -> Int? {
        do { return try hook.willPerform(operation) } catch {
            throw .io(operation: name, path: inner.name, errno: error.rawValue)
        }
    }

    func read(block: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(MetadataError) {
        _ = try ask(.read(.metadata, offset: block * UInt64(MetadataBlock.size), length: buffer.count), "pread")
        try inner.read(block: block, into: buffer)
    }

    func write(block: UInt64, from buffer: UnsafeRawBufferPointer) throws(MetadataError) {
        try write(block: block, from: buffer, durably: false)
    }

    func writeDurably(block: UInt64, from buffer: UnsafeRawBufferPointer) throws(MetadataError) {
        try write(block: block, from: buffer, durably: true)
    }

    private func write(block: UInt64, from buffer: UnsafeRawBufferPointer, durably: Bool) throws(MetadataError) {
        let offset = block * UInt64(MetadataBlock.size)
        func operation(_ bytes: UnsafeRawBufferPointer) -> PoolIOOperation {
            durably ? .durableWrite(.metadata, offset: offset, bytes: bytes) : .write(.metadata, offset: offset, bytes: bytes)
        }
        func write(_ bytes: UnsafeRawBufferPointer) throws(MetadataError) {
            if durably { try inner.writeDurably(block: block, from: bytes) } else { try inner.write(block: block, from: bytes) }
        }
        if let allowed = try ask(operation(buffer), "pwrite"), allowed < buffer.count {
            // A short write of a metadata block: the first `allowed` bytes land, the rest keep
            // what the file had there. The storage writes whole blocks, so merge by hand.
            let merged = UnsafeMutableRawBufferPointer.allocate(byteCount: buffer.count, alignment: 4096)
            defer { merged.deallocate() }
            try inner.read(block: block, into: merged)
            let n = max(0, allowed)
            UnsafeMutableRawBufferPointer(rebasing: merged[0..<n]).copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
            try write(UnsafeRawBufferPointer(merged))
            hook.didPerform(operation(UnsafeRawBufferPointer(merged)))
            throw .io(operation: "pwrite", path: inner.name, errno: Errno.ioError.rawValue)
        }
        try write(buffer)
        hook.didPerform(operation(buffer))
    }

    func sync() throws(MetadataError) {
        _ = try ask(.sync(.metadata), "fdatasync")
        try inner.sync()
        hook.didPerform(.sync(.metadata))
    }
}
