internal import CExt2fs
import Foundation
import Logging
import SystemPackage
import ThinFSCore

// MARK: - The io_manager over BlockDevice

/// Devices handed to libext2fs by name: `ext2fs_open2` takes a name, not a pointer.
final class ChannelRegistry: @unchecked Sendable {
    static let shared = ChannelRegistry()
    private let lock = Lock()
    private var devices: [String: BlockDevice] = [:]
    private var next = 0

    func register(_ device: BlockDevice) -> String {
        lock.withLock {
            next += 1
            let name = "thinfs-blockdevice-\(next)"
            devices[name] = device
            return name
        }
    }

    func unregister(_ name: String) { lock.withLock { _ = devices.removeValue(forKey: name) } }
    func device(_ name: String) -> BlockDevice? { lock.withLock { devices[name] } }
}


func channelState(_ channel: io_channel?) -> ChannelState {
    Unmanaged<ChannelState>.fromOpaque(channel!.pointee.private_data).takeUnretainedValue()
}

/// libext2fs's block-allocation callbacks (`ext2fs_block_alloc_stats2` and its range form, which
/// every free of a data block goes through: punch, truncate, inode release). A free bumps the
/// channel's `freeGeneration` and discards the blocks (`discardFreed`); a single block's
/// allocation is noted while a write records them (`allocations`). They run inside
/// libext2fs calls, so under the Volume's lock.
let countBlockFree: @convention(c) (ext2_filsys?, blk64_t, Int32) -> Void = { fs, block, inuse in
    guard let fs else { return }
    let channel = channelState(fs.pointee.io)
    if inuse > 0 { channel.allocations?.append((UInt64(block), 1)) }
    guard inuse < 0 else { return }
    channel.freeGeneration &+= 1
    channel.discardFreed(UInt64(block), count: 1)
}
let countBlockRangeFree: @convention(c) (ext2_filsys?, blk64_t, blk_t, Int32) -> Void = { fs, block, count, inuse in
    guard inuse < 0, let fs else { return }
    let channel = channelState(fs.pointee.io)
    channel.freeGeneration &+= 1
    channel.discardFreed(UInt64(block), count: UInt64(count))
}

/// libext2fs's range allocator (`ext2fs_new_range`, which fallocate calls for each run it
/// claims): the same search over the block bitmap, and the range found is noted while a write
/// records its allocations. (The range form of the alloc-stats callback cannot note it: libext2fs
/// calls it with the range already consumed, its start past the end and its count 0.)
let recordNewRange: @convention(c) (ext2_filsys?, Int32, blk64_t, blk64_t, UnsafeMutablePointer<blk64_t>?,
                                    UnsafeMutablePointer<blk64_t>?) -> errcode_t = { fs, flags, goal, len, pblk, plen in
    guard let fs else { return errcode_t(EXT2_ET_INVALID_ARGUMENT) }
    // An explicit bitmap: libext2fs calls this callback only when given none.
    let rc = ext2fs_new_range(fs, flags, goal, len, fs.pointee.block_map, pblk, plen)
    if rc == 0, let pblk, let plen { channelState(fs.pointee.io).allocations?.append((UInt64(pblk.pointee), UInt64(plen.pointee))) }
    return rc
}

/// Byte range of a libext2fs block request: a negative count is a byte count (ext2_io.h).
private func byteRange(_ channel: io_channel?, _ block: UInt64, _ count: Int32) -> (offset: UInt64, length: Int) {
    let bs = UInt64(channel!.pointee.block_size)
    return (block * bs, count < 0 ? Int(-count) : Int(count) * Int(bs))
}

/// A device error as an errno-valued errcode_t (libext2fs accepts errno values as error codes),
/// through the one mapping the Volume's own paths use too (`Errno(reporting:)`).
private func errcode(_ error: Error) -> errcode_t { errcode_t(Errno(reporting: error).rawValue) }

private func channelRead(_ channel: io_channel?, _ block: UInt64, _ count: Int32, _ data: UnsafeMutableRawPointer?) -> errcode_t {
    do {
        try channelState(channel).read(block, count, data!, byteRange(channel, block, count))
        return 0
    } catch { return errcode(error) }
}

private func channelWrite(_ channel: io_channel?, _ block: UInt64, _ count: Int32, _ data: UnsafeRawPointer?) -> errcode_t {
    do {
        try channelState(channel).write(block, count, data!, byteRange(channel, block, count))
        return 0
    } catch { return errcode(error) }
}

nonisolated(unsafe) let blockDeviceIOManager: io_manager = {
    let m = UnsafeMutablePointer<struct_io_manager>.allocate(capacity: 1)
    m.initialize(to: struct_io_manager())
    m.pointee.magic = EXT2_ET_MAGIC_IO_MANAGER
    m.pointee.name = UnsafePointer(strdup("ThinFS BlockDevice I/O manager"))
    m.pointee.open = { name, _, channelOut in
        guard let name, let device = ChannelRegistry.shared.device(String(cString: name)) else { return errcode_t(ENOENT) }
        let ch = UnsafeMutablePointer<struct_io_channel>.allocate(capacity: 1)
        ch.initialize(to: struct_io_channel())
        ch.pointee.magic = EXT2_ET_MAGIC_IO_CHANNEL
        ch.pointee.manager = blockDeviceIOManager
        ch.pointee.name = strdup(name)
        ch.pointee.block_size = 1024
        ch.pointee.refcount = 1
        ch.pointee.private_data = UnsafeMutableRawPointer(Unmanaged.passRetained(ChannelState(device: device)).toOpaque())
        channelOut?.pointee = ch
        return 0
    }
    m.pointee.close = { channel in
        guard let channel else { return 0 }
        channel.pointee.refcount -= 1
        guard channel.pointee.refcount <= 0 else { return 0 }
        // ext2fs_close flushes a dirty filesystem first; anything still cached dirty goes out now.
        let written: errcode_t
        do { try channelState(channel).writeBackDirty(); written = 0 } catch { written = errcode(error) }
        Unmanaged<ChannelState>.fromOpaque(channel.pointee.private_data).release()
        free(channel.pointee.name)
        channel.deallocate()
        return written
    }
    m.pointee.set_blksize = { channel, size in
        do {
            try channelState(channel).setBlockSize(Int(size))
            channel?.pointee.block_size = size
            return 0
        } catch { return errcode(error) }
    }
    m.pointee.read_blk = { channel, block, count, data in channelRead(channel, UInt64(block), count, data) }
    m.pointee.write_blk = { channel, block, count, data in channelWrite(channel, UInt64(block), count, data) }
    m.pointee.read_blk64 = { channel, block, count, data in channelRead(channel, UInt64(block), count, data) }
    m.pointee.write_blk64 = { channel, block, count, data in channelWrite(channel, UInt64(block), count, data) }
    m.pointee.write_byte = { channel, offset, count, data in
        do {
            // A byte write (the superblock) is never a whole block: it goes through to the device.
            try channelState(channel).write(0, -count, data!, (UInt64(offset), Int(count)))
            return 0
        } catch { return errcode(error) }
    }
    m.pointee.flush = { channel in
        do {
            try channelState(channel).flush()
            return 0
        } catch { return errcode(error) }
    }
    m.pointee.discard = { channel, block, count in
        let bs = UInt64(channel!.pointee.block_size)
        do {
            try channelState(channel).discard((UInt64(block) * bs, Int(UInt64(count) * bs)))
            return 0
        } catch { return errcode(error) }
    }
    m.pointee.set_option = { _, _, _ in errcode_t(EXT2_ET_INVALID_ARGUMENT) }
    return m
}()

/// ext2fs_free_mem is an inline function taking a pointer to the pointer; this is its effect.
func ext2fs_free_mem_shim(_ p: UnsafeMutableRawPointer?) { free(p) }
