import PersistentData

/// One thin device of a userspace pool, as a block device.
///
/// Thin devices have no size in dm-thin metadata (the kernel's table gives
/// it), so the opener chooses one. Closing (or releasing) the device ends its
/// hold on the pool: a device that is open cannot be deleted.
public final class ThinDevice: BlockDevice, @unchecked Sendable {
    /// 2^63 - 1 bytes: the largest offset an off_t can carry.
    public static let maximumSize = UInt64(Int64.max)

    public let pool: UserspaceThinPool
    public let id: ThinDeviceID
    public let size: UInt64
    private let closed = Lock()
    private var isClosed = false

    init(pool: UserspaceThinPool, id: ThinDeviceID, size: UInt64) {
        self.pool = pool
        self.id = id
        self.size = size
    }

    deinit { close() }

    /// Releases the device; later I/O fails. Idempotent.
    public func close() {
        let first = closed.withLock { () -> Bool in
            defer { isClosed = true }
            return !isClosed
        }
        if first { pool.closeDevice(id) }
    }

    private func check(_ offset: UInt64, _ count: Int) throws {
        guard !closed.withLock({ isClosed }) else { throw ThinPoolError.readOnly("thin device \(id) is closed") }
        guard offset <= size, UInt64(count) <= size - offset else {
            throw ThinPoolError.beyondDevice(id, offset: offset, length: UInt64(count), size: size)
        }
    }

    /// The device as its errors name it.
    private var name: String { "thin device \(id)" }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try BlockDeviceError.wrap(.read, name, offset: offset, length: buffer.count) {
            try check(offset, buffer.count)
            try pool.read(id, into: buffer, at: offset)
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try BlockDeviceError.wrap(.write, name, offset: offset, length: buffer.count) {
            try check(offset, buffer.count)
            try pool.write(id, buffer, at: offset)
        }
    }

    /// File data leaves the pool's reserve to ext4's metadata (`UserspaceThinPool.reservedDataBlocks`).
    public func writeFileData(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try BlockDeviceError.wrap(.write, name, offset: offset, length: buffer.count) {
            try check(offset, buffer.count)
            try pool.write(id, buffer, at: offset, keepingReserve: true)
        }
    }

    public var spaceFreedAtCommit: Bool { pool.spaceFreedAtCommit }

    public func discard(offset: UInt64, length: UInt64) throws {
        try BlockDeviceError.wrap(.discard, name, offset: offset, length: Int(clamping: length)) {
            try check(offset, 0)
            try pool.discard(id, offset: offset, length: min(length, size - offset))
        }
    }

    public func flush() throws { try BlockDeviceError.wrap(.flush, name) { try pool.commit() } }

    /// The pool's free data space; file data leaves the reserve (see `writeFileData`).
    public func freeSpace() throws -> PoolFreeSpace? {
        let s = try BlockDeviceError.wrap(.freeSpace, name) { try pool.status() }
        let reserve = UserspaceThinPool.reservedDataBlocks(nrDataBlocks: s.totalDataBlocks, blockSize: s.dataBlockSize) * s.dataBlockSize
        let free = s.freeDataBytes
        return PoolFreeSpace(free: free, forFileData: free > reserve ? free - reserve : 0)
    }
}
