import ThinFS

/// A block device in memory that starts as a copy of `base` and keeps only the 4 KiB blocks
/// written since: a fresh copy of a filesystem image for every input costs nothing.
public final class MemoryBlockDevice: BlockDevice, @unchecked Sendable {
    public let size: UInt64
    private let base: [UInt8]
    private var blocks: [Int: [UInt8]] = [:]
    private let lock = Mutex(())

    public init(base: [UInt8]) {
        self.base = base
        size = UInt64(base.count)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard offset <= size, UInt64(buffer.count) <= size - offset else { throw DeviceRangeError(offset: offset, count: buffer.count, size: size) }
        lock.withLock { _ in
            var done = 0
            while done < buffer.count {
                let position = Int(offset) + done
                let (b, within) = position.quotientAndRemainder(dividingBy: 4096)
                let n = min(4096 - within, buffer.count - done)
                let target = UnsafeMutableRawBufferPointer(rebasing: buffer[done ..< done + n])
                if let block = blocks[b] {
                    block.withUnsafeBytes { target.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[within ..< within + n])) }
                } else {
                    base.withUnsafeBytes { target.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[position ..< position + n])) }
                }
                done += n
            }
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard offset <= size, UInt64(buffer.count) <= size - offset else { throw DeviceRangeError(offset: offset, count: buffer.count, size: size) }
        lock.withLock { _ in
            var done = 0
            while done < buffer.count {
                let position = Int(offset) + done
                let (b, within) = position.quotientAndRemainder(dividingBy: 4096)
                let n = min(4096 - within, buffer.count - done)
                var block = blocks[b] ?? Array(base[b * 4096 ..< (b + 1) * 4096])
                block.withUnsafeMutableBytes {
                    UnsafeMutableRawBufferPointer(rebasing: $0[within ..< within + n]).copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[done ..< done + n]))
                }
                blocks[b] = block
                done += n
            }
        }
    }

    public func discard(offset: UInt64, length: UInt64) throws {}
    public func flush() throws {}
    public func freeSpace() throws -> PoolFreeSpace? { nil }

    /// The device's bytes as they are now.
    public var contents: [UInt8] {
        lock.withLock { _ in
            var bytes = base
            for (b, block) in blocks { bytes.replaceSubrange(b * 4096 ..< (b + 1) * 4096, with: block) }
            return bytes
        }
    }
}

public struct DeviceRangeError: Error, CustomStringConvertible {
    var offset: UInt64, count: Int, size: UInt64
    public var description: String { "I/O of \(count) bytes at \(offset) is beyond the \(size)-byte memory device" }
}
