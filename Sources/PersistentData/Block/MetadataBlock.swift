/// One 4096-byte metadata block held in memory.
///
/// All multi-byte fields in dm-thin metadata are little-endian; the accessors
/// below read and write them at byte offsets, so no Swift struct is ever
/// overlaid on disk bytes.
public final class MetadataBlock {
    public static let size = 4096

    /// The block's number on the metadata device.
    public let location: UInt64
    public let bytes: UnsafeMutableRawPointer

    public init(location: UInt64) {
        self.location = location
        // 64-byte alignment keeps every 8-byte field aligned and the buffer O_DIRECT-friendly.
        self.bytes = UnsafeMutableRawPointer.allocate(byteCount: Self.size, alignment: 64)
        bytes.initializeMemory(as: UInt8.self, repeating: 0, count: Self.size)
    }

    deinit { bytes.deallocate() }

    public var buffer: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: bytes, count: Self.size) }
    public var mutableBuffer: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: bytes, count: Self.size)
    }

    @inline(__always) public func u64(_ offset: Int) -> UInt64 {
        UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }
    @inline(__always) public func u32(_ offset: Int) -> UInt32 {
        UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }
    @inline(__always) public func setU64(_ offset: Int, _ value: UInt64) {
        bytes.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt64.self)
    }
    @inline(__always) public func setU32(_ offset: Int, _ value: UInt32) {
        bytes.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt32.self)
    }

    public func zero() { bytes.initializeMemory(as: UInt8.self, repeating: 0, count: Self.size) }
    public func copy(from other: MetadataBlock) { bytes.copyMemory(from: other.bytes, byteCount: Self.size) }

    /// Stamps the block number at `blocknrOffset` and the salted checksum at offset 0.
    public func seal(type: BlockType, blocknrOffset: Int = 8) {
        setU64(blocknrOffset, location)
        setU32(0, CRC32C.blockChecksum(buffer, salt: type.salt))
    }

    /// Checks the checksum and the self-recorded block number, naming the block on failure.
    public func validate(type: BlockType, blocknrOffset: Int = 8) throws(MetadataError) {
        let stored = u32(0)
        let computed = CRC32C.blockChecksum(buffer, salt: type.salt)
        guard stored == computed else {
            throw .badChecksum(block: location, type: type, stored: stored, computed: computed)
        }
        let recorded = u64(blocknrOffset)
        guard recorded == location else {
            throw .wrongBlockNumber(block: location, type: type, recorded: recorded)
        }
    }
}
