import PersistentData
import SystemPackage

/// Errors of the pool layer. Each names the device, path or message at fault.
public enum ThinPoolError: Error, CustomStringConvertible, Sendable {
    case metadata(MetadataError)
    case message(ThinMetadata.MessageError)
    case malformedMessage(String, String)
    case deviceBusy(ThinDeviceID, openCount: Int)
    case noDataSpace(ThinDeviceID)
    case readOnly(String)
    case beyondDevice(ThinDeviceID, offset: UInt64, length: UInt64, size: UInt64)
    case io(operation: String, path: String, errno: Errno)
    case invalidConfiguration(String)
    case noPool(root: String)
    /// Another process holds the pool open for writing (its data file's flock).
    case heldByAnotherProcess(data: String)

    public var description: String {
        switch self {
        case .metadata(let e): "\(e)"
        case .message(let e): "\(e)"
        case .malformedMessage(let m, let why): "bad pool message '\(m)': \(why)"
        case .deviceBusy(let id, let n): "thin device \(id) is busy: open \(n) time(s)"
        case .noDataSpace(let id): "thin device \(id): the pool is out of data space; grow it with 'thinfs pool resize'"
        case .readOnly(let why): "the pool is read-only: \(why)"
        case .beyondDevice(let id, let o, let l, let s): "thin device \(id): I/O at \(o)+\(l) is beyond its size of \(s) bytes"
        case .io(let op, let path, let e): "\(op) \(path): \(e)"
        case .invalidConfiguration(let s): s
        case .noPool(let root): "no thin pool at \(root): create one with 'thinfs pool create --root \(root)'"
        case .heldByAnotherProcess(let data): "the pool with data \(data) is open for writing by another process (a thinfs-mount daemon?); stop it first"
        }
    }

    /// The errno a block-device user (or FUSE) should see.
    public var errno: Errno {
        switch self {
        case .noDataSpace, .metadata(.noDataSpace), .metadata(.noMetadataSpace): .noSpace
        case .readOnly, .metadata(.readOnly): .readOnlyFileSystem
        // Damaged metadata: the kernel fails the bio, which reaches a filesystem as EIO.
        case .metadata(let e) where e.isDamage: .ioError
        case .metadata(.io(_, _, let e)): Errno(rawValue: e)
        case .deviceBusy, .heldByAnotherProcess: .resourceBusy
        case .message(.unknownDevice), .message(.unknownOrigin), .noPool: .noSuchFileOrDirectory
        case .message(.deviceIDInUse): .fileExists
        case .io(_, _, let e): e
        case .beyondDevice: .noSpace
        default: .invalidArgument
        }
    }
}
