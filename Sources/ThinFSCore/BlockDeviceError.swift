import PersistentData
import SystemPackage

/// The one error every `BlockDevice` throws: which device, which operation (and where on the
/// device), and the errno its user hears.
///
/// A file, a userspace thin device, a kernel /dev/mapper node and an RBD image each fail in
/// their own words (an Errno from pwrite, a pool that is out of space or needs_check, librbd's
/// timeout); their devices turn those into this, so that the errno a writer hears depends on
/// the fault and not on which device or which path (libext2fs's io_manager callbacks, the
/// Volume's bulk data path, a group commit) met it. `Errno(reporting:)` is the one mapping.
public struct BlockDeviceError: Error, CustomStringConvertible, Sendable {
    public enum Operation: String, Sendable {
        case open, read, write, discard, flush
        case freeSpace = "free-space query"
    }

    public var operation: Operation
    /// The device as its owner names it: a path, "thin device 3", an RBD image.
    public var device: String
    /// The byte range of a read, write or discard.
    public var offset: UInt64?
    public var length: UInt64?
    /// What the device's user hears (see `reportable`): EIO, ENOSPC, EROFS or ENOMEM.
    public var errno: Errno
    /// What the layer below said, when it said more than `errno`: the pool's reason for being
    /// read-only, a cluster's timeout, the errno of a failed syscall that `errno` generalizes.
    public var cause: String?

    public init(_ operation: Operation, device: String, offset: UInt64? = nil, length: UInt64? = nil,
                errno: Errno, cause: String? = nil) {
        self.operation = operation
        self.device = device
        self.offset = offset
        self.length = length
        self.errno = Self.reportable(errno)
        self.cause = cause ?? (self.errno == errno ? nil : "\(errno)")
    }

    /// A failure of the layer below (a pool, a file descriptor, librbd) as this device's error.
    /// An error that already is one passes through unchanged (a wrapper over another device).
    public init(_ operation: Operation, device: String, offset: UInt64? = nil, length: UInt64? = nil, cause: any Error) {
        if let e = cause as? BlockDeviceError {
            self = e
            return
        }
        self.init(operation, device: device, offset: offset, length: length, errno: Errno(reporting: cause), cause: "\(cause)")
    }

    /// Runs one operation of a device, turning whatever it throws into this error.
    @inline(__always)
    public static func wrap<T>(_ operation: Operation, _ device: @autoclosure () -> String, offset: UInt64? = nil,
                               length: Int? = nil, _ body: () throws -> T) throws(BlockDeviceError) -> T {
        do { return try body() } catch {
            throw BlockDeviceError(operation, device: device(), offset: offset, length: length.map { UInt64($0) }, cause: error)
        }
    }

    /// What a block device's user can be told. A device either has no space (a thin pool out of
    /// data space, a quota), has gone read-only (a pool with needs_check), is out of memory, or
    /// failed: EIO, as the kernel completes a failed bio (blk_status_to_errno) and as write(2)
    /// and fsync(2) document a failure below the filesystem. The cause's own errno (EBADF of a
    /// closed device, EINVAL of a range past its end, EBUSY) would tell a writer something
    /// about its own call that is not true; it stays in `cause`.
    static func reportable(_ errno: Errno) -> Errno {
        switch errno {
        case .noSpace, .diskQuotaExceeded: .noSpace
        case .readOnlyFileSystem, .noMemory, .ioError: errno
        default: .ioError
        }
    }

    public var description: String {
        let range = offset.map { " at \($0)" + (length.map { "+\($0)" } ?? "") } ?? ""
        return "\(operation.rawValue)\(range) on \(device): \(cause ?? "\(errno)")"
    }
}

extension Errno {
    /// The one mapping from an error to the errno a filesystem's caller hears: the errcode_t a
    /// libext2fs io_manager callback returns (errno values are valid error codes there), the
    /// errno a `Volume` puts in its `VolumeError` for a failed device or pool operation, and what
    /// the FUSE server and the control socket fall back on for errors of no subsystem of theirs.
    ///
    /// - `BlockDeviceError`: its errno (EIO, ENOSPC, EROFS or ENOMEM; see `reportable`).
    /// - `VolumeError`: its errno, the one a kernel filesystem returns in the same situation.
    /// - `ThinPoolError` and `MetadataError`: the pool's mapping (`ThinPoolError.errno`: ENOSPC
    ///   out of space, EROFS read-only or needs_check, EIO damaged metadata).
    /// - An `Errno` (swift-system's syscall wrappers): itself.
    /// - Anything else: EIO, a failure of the layer below.
    public init(reporting error: any Swift.Error) {
        switch error {
        case let e as BlockDeviceError: self = e.errno
        case let e as VolumeError: self = e.errno
        case let e as ThinPoolError: self = e.errno
        case let e as MetadataError: self = ThinPoolError.metadata(e).errno
        case let e as Errno: self = e
        default: self = .ioError
        }
    }
}
