/// A thin device id: 24 bits, as the kernel's `dm_thin_id` allows (MAX_DEV_ID).
public typealias ThinDeviceID = UInt32

/// A value in the device-details btree (`struct disk_device_details`):
///
///     0  mapped_blocks (u64)   8  transaction_id (u64)   16  creation_time (u32)   20  snapshotted_time (u32)
public struct DeviceDetails: BTreeValue, Equatable, Sendable {
    public var mappedBlocks: UInt64
    public var transactionID: UInt64
    public var creationTime: UInt32
    public var snapshottedTime: UInt32

    public static var size: Int { 24 }

    public init(mappedBlocks: UInt64, transactionID: UInt64, creationTime: UInt32, snapshottedTime: UInt32) {
        self.mappedBlocks = mappedBlocks
        self.transactionID = transactionID
        self.creationTime = creationTime
        self.snapshottedTime = snapshottedTime
    }

    public init(loadingFrom block: MetadataBlock, at offset: Int) {
        mappedBlocks = block.u64(offset)
        transactionID = block.u64(offset + 8)
        creationTime = block.u32(offset + 16)
        snapshottedTime = block.u32(offset + 20)
    }

    public func store(into block: MetadataBlock, at offset: Int) {
        block.setU64(offset, mappedBlocks)
        block.setU64(offset + 8, transactionID)
        block.setU32(offset + 16, creationTime)
        block.setU32(offset + 20, snapshottedTime)
    }
}

/// A mapping in the bottom level of the mapping tree: the data block in the
/// high 40 bits and the pool time of the write in the low 24.
public struct BlockTime: Equatable, Sendable {
    public var block: UInt64
    public var time: UInt32

    public init(block: UInt64, time: UInt32) {
        self.block = block
        self.time = time
    }

    public init(packed: UInt64) {
        block = packed >> 24
        time = UInt32(packed & 0xff_ffff)
    }

    public var packed: UInt64 { block << 24 | UInt64(time & 0xff_ffff) }
}
