import Foundation
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS
@testable import ThinFSExt4

/// A file device that counts what reaches it: flushes, and the 4 KiB blocks each write touched.
private final class CountingDevice: BlockDevice, @unchecked Sendable {
    let base: FileBlockDevice
    private let lock = NSLock()
    private(set) var flushes = 0
    /// Every block any write touched, in order (a block once per write that touched it).
    private(set) var blocksWritten: [UInt64] = []

    init(_ base: FileBlockDevice) { self.base = base }

    func reset() { lock.withLock { flushes = 0; blocksWritten = [] } }
    private func record(_ count: Int, _ offset: UInt64) {
        guard count > 0 else { return }
        lock.withLock { blocksWritten += Array((offset / 4096)...((offset + UInt64(count) - 1) / 4096)) }
    }

    var size: UInt64 { base.size }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws { try base.read(into: buffer, at: offset) }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try base.write(buffer, at: offset)
        record(buffer.count, offset)
    }
    func writeFileData(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try base.write(buffer, at: offset)
        record(buffer.count, offset)
    }
    func discard(offset: UInt64, length: UInt64) throws { try base.discard(offset: offset, length: length) }
    func flush() throws {
        try base.flush()
        lock.withLock { flushes += 1 }
    }
    func close() { base.close() }
    func freeSpace() throws -> PoolFreeSpace? { try base.freeSpace() }
}

/// What a write and an fsync cost in device and block-cache operations, counted, against bounds
/// derived from their sizes (not timed: speed goals are benchmarks, docs/benchmarks.md).
@Suite("Volume write and fsync cost", .enabled(if: E2fsprogs.available, "needs e2fsprogs"))
struct WriteCostTests {
    /// 64 MiB in 1 MiB requests, into a new file and into one preallocated first (fio's
    /// `fallocate=native`, what `thinfs compare` runs): the whole blocks of each request go to the
    /// block cache in a few calls, not one (plus an inode rewrite) per 4 KiB block, which is what
    /// made the compare report's thinfs 0.03x overlayfs (a build from before the bulk path).
    @Test(arguments: [false, true]) func sequentialWritesCostPerRequestNotPerBlock(preallocated: Bool) throws {
        let dir = TempDir()
        let image = dir.path + "/fs.img"
        try E2fsprogs.mkfs(image, size: 256 << 20)
        let v = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false, logger: quietLogger)
        let f = try v.mknod(parent: v.rootInode, name: "seq", mode: 0o100644, rdev: 0, owner: .root)
        let request = 1 << 20, requests = 64
        if preallocated { try v.fallocate(f.ino, mode: [], offset: 0, length: UInt64(request * requests)) }
        let before = try v.channelWriteCount
        var bytes = [UInt8](repeating: 0, count: request)
        for i in 0..<requests {
            for j in stride(from: 0, to: request, by: 4096) { bytes[j] = UInt8(truncatingIfNeeded: i &* 31 &+ j / 4096) | 1 }
            let wrote = try bytes.withUnsafeBytes { try v.write(f.ino, at: UInt64(i * request), from: $0) }
            #expect(wrote == request)
        }
        let calls = try v.channelWriteCount - before
        // Per request: the data in one run (or a few, if the allocation is fragmented) and a
        // handful of inode and extent-block writes. A block-at-a-time path makes at least one
        // call per 4 KiB block: 256 per request.
        let blocksPerRequest = request / 4096
        #expect(calls <= requests * 16, "\(calls) block-cache writes for \(requests) requests of \(blocksPerRequest) blocks (preallocated: \(preallocated))")
        try v.fsync(nil)
        var back = [UInt8](repeating: 0, count: request)
        for i in [0, requests / 2, requests - 1] {
            let n = try back.withUnsafeMutableBytes { try v.read(f.ino, at: UInt64(i * request), into: $0) }
            #expect(n == request)
            #expect(back[4096 * 3] == UInt8(truncatingIfNeeded: i &* 31 &+ 3) | 1, "request \(i) read back")
        }
        try v.close()
        try E2fsprogs.check(image)
    }

    /// An fsync after a 4 KiB overwrite in an existing file (a database commit): one device flush
    /// (a pool commit on a thin device), and only the blocks that changed, the data block and the
    /// inode's table block. ext2fs_flush rewrote the superblock and every group descriptor block
    /// (and the backup superblocks) each time and flushed the device twice, before and after the
    /// superblock: two pool commits per fsync through thinfs-mount, each mapping those blocks anew
    /// under atomic commit. After an allocation, the fsync still writes the descriptors and
    /// superblock, once; and what every fsync returned is on the device whole, with no close
    /// (a SIGKILL): e2fsck passes on a copy of the image taken right after.
    @Test func fsyncWritesWhatChangedAndFlushesOnce() throws {
        let dir = TempDir()
        let image = dir.path + "/fs.img"
        try E2fsprogs.mkfs(image, size: 256 << 20)
        let device = CountingDevice(try FileBlockDevice(path: FilePath(image)))
        let v = try Volume(device: device, readOnly: false, logger: quietLogger)
        let f = try v.mknod(parent: v.rootInode, name: "db", mode: 0o100644, rdev: 0, owner: .root)
        var page = [UInt8](repeating: 7, count: 4096)
        _ = try [UInt8](repeating: 1, count: 64 * 4096).withUnsafeBytes { try v.write(f.ino, at: 0, from: $0) }
        try v.fsync(f.ino)

        let rounds = 20
        device.reset()
        for i in 0..<rounds {
            page[0] = UInt8(i)
            _ = try page.withUnsafeBytes { try v.write(f.ino, at: UInt64(i % 64) * 4096, from: $0) }
            try v.fsync(f.ino)
        }
        #expect(device.flushes == rounds, "\(device.flushes) device flushes for \(rounds) fsyncs")
        // Block 0 holds the superblock, block 1 on the primary group descriptors.
        let metadata = device.blocksWritten.filter { $0 <= 1 }
        #expect(metadata.isEmpty, "the superblock or group descriptors were written \(metadata.count) times by \(rounds) fsyncs of overwrites")
        #expect(device.blocksWritten.count <= rounds * 2,
                "\(device.blocksWritten.count) blocks written by \(rounds) fsyncs of a 4 KiB overwrite: \(Set(device.blocksWritten).sorted().prefix(20))")

        // An allocation dirties the free counts: the next fsync writes them, once.
        device.reset()
        let g = try v.mknod(parent: v.rootInode, name: "new", mode: 0o100644, rdev: 0, owner: .root)
        _ = try page.withUnsafeBytes { try v.write(g.ino, at: 0, from: $0) }
        try v.fsync(g.ino)
        #expect(device.flushes == 1, "\(device.flushes) device flushes for one fsync after a create")
        #expect(device.blocksWritten.contains(0), "the superblock (free counts) not written by the fsync after a create")
        #expect(device.blocksWritten.contains(1), "the group descriptors not written by the fsync after a create")

        // As after a SIGKILL: no close, the image as the last fsync left it.
        let copy = dir.path + "/killed.img"
        try FileManager.default.copyItem(atPath: image, toPath: copy)
        try E2fsprogs.check(copy)
        let after = try Volume(device: FileBlockDevice(path: FilePath(copy)), readOnly: true, logger: quietLogger)
        var back = [UInt8](repeating: 0, count: 4096)
        for (name, first) in [("db", UInt8(rounds - 1)), ("new", UInt8(rounds - 1))] {
            let ino = try after.lookup(parent: after.rootInode, name: name).ino
            let offset: UInt64 = name == "db" ? UInt64((rounds - 1) % 64) * 4096 : 0
            _ = try back.withUnsafeMutableBytes { try after.read(ino, at: offset, into: $0) }
            #expect(back[0] == first && back[1] == 7, "\(name): the last fsynced write, read back from the killed image")
        }
        try after.close()
        try v.close()
        try E2fsprogs.check(image)
    }
}
