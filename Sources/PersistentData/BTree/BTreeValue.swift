/// A fixed-size little-endian value stored in btree leaves.
public protocol BTreeValue {
    static var size: Int { get }
    init(loadingFrom block: MetadataBlock, at offset: Int)
    func store(into block: MetadataBlock, at offset: Int)
}

extension UInt64: BTreeValue {
    public static var size: Int { 8 }
    public init(loadingFrom block: MetadataBlock, at offset: Int) { self = block.u64(offset) }
    public func store(into block: MetadataBlock, at offset: Int) { block.setU64(offset, self) }
}

extension UInt32: BTreeValue {
    public static var size: Int { 4 }
    public init(loadingFrom block: MetadataBlock, at offset: Int) { self = block.u32(offset) }
    public func store(into block: MetadataBlock, at offset: Int) { block.setU32(offset, self) }
}
