/// Errors of the persistent-data layer. Each names the block or object at fault.
public enum MetadataError: Error, Equatable, CustomStringConvertible, Sendable {
    case badChecksum(block: UInt64, type: BlockType, stored: UInt32, computed: UInt32)
    case wrongBlockNumber(block: UInt64, type: BlockType, recorded: UInt64)
    case badMagic(found: UInt64)
    case unsupportedVersion(UInt32)
    case unsupportedMetadataBlockSize(sectors: UInt32)
    case corrupt(block: UInt64, reason: String)
    /// Contents that pass their checksum but contradict the format or each other
    /// (dm-thin answers these with needs_check and read-only). `tree` names the
    /// btree or space map the block belongs to; for a space map, `block` is the
    /// block whose count is wrong.
    case inconsistent(block: UInt64, tree: String, reason: String)
    case blockOutOfRange(block: UInt64, nrBlocks: UInt64)
    case io(operation: String, path: String, errno: Int32)
    case tooSmall(path: String, bytes: UInt64)
    case noMetadataSpace
    case noDataSpace
    case readOnly(reason: String)
    case invalidArgument(String)

    /// True for damage found in the metadata itself (as opposed to I/O errors, a
    /// full device or a refused change): what makes dm-thin set needs_check.
    public var isDamage: Bool {
        switch self {
        case .badChecksum, .wrongBlockNumber, .corrupt, .inconsistent, .blockOutOfRange: true
        default: false
        }
    }

    public var description: String {
        switch self {
        case .badChecksum(let b, let t, let s, let c):
            "metadata block \(b) (\(t)): bad checksum (stored 0x\(String(s, radix: 16)), computed 0x\(String(c, radix: 16)))"
        case .wrongBlockNumber(let b, let t, let r):
            "metadata block \(b) (\(t)): records block number \(r); it was written elsewhere or is not metadata"
        case .badMagic(let m):
            "superblock magic is \(m), not dm-thin's 27022010: this is not thin-pool metadata"
        case .unsupportedVersion(let v): "thin metadata version \(v) is not supported (1 and 2 are)"
        case .unsupportedMetadataBlockSize(let s): "metadata block size of \(s) sectors is not supported (only 8)"
        case .corrupt(let b, let r): "metadata block \(b) is corrupt: \(r)"
        case .inconsistent(let b, let t, let r): "\(t): block \(b) is inconsistent: \(r)"
        case .blockOutOfRange(let b, let n): "metadata block \(b) is beyond the metadata device (\(n) blocks)"
        case .io(let op, let p, let e): "\(op) \(p): \(String(cString: strerror(e)))"
        case .tooSmall(let p, let n): "\(p) is too small for thin metadata (\(n) bytes)"
        case .noMetadataSpace: "out of metadata space"
        case .noDataSpace: "out of data space"
        case .readOnly(let why): "metadata is read-only: \(why)"
        case .invalidArgument(let s): s
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
