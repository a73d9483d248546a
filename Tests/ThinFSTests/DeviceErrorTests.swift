import Foundation
import Logging
import PersistentData
import SystemPackage
import Synchronization
import TestSupport
import Testing
@testable import ThinFS

/// A file as a block device that fails writes while a fault is armed, as a failing disk does:
/// each failing write may land a prefix first (a short write), and its discards may leave the
/// old bytes in place (BLKDISCARD on most disks does not promise zeros).
final class FaultyDevice: BlockDevice, @unchecked Sendable {
    struct Fault {
        /// Which writes fail: the file data a `Volume.write` sends (`writeFileData`), or all.
        var fileDataOnly: Bool
        /// Bytes of each failing write that reach the file before it fails.
        var landing: Int = 0
        /// What the write throws.
        var error: @Sendable (_ operation: String, _ offset: UInt64, _ length: Int) -> any Error
    }

    let base: FileBlockDevice
    let keepsDiscardedBytes: Bool
    private let fault = Mutex<Fault?>(nil)
    private let failures = Atomic(0)

    init(_ base: FileBlockDevice, keepsDiscardedBytes: Bool = false) {
        self.base = base
        self.keepsDiscardedBytes = keepsDiscardedBytes
    }

    func arm(_ f: Fault?) { fault.withLock { $0 = f } }
    var failed: Int { failures.load(ordering: .relaxed) }

    private func fail(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fileData: Bool) throws {
        guard let f = fault.withLock({ $0 }), fileData || !f.fileDataOnly else { return }
        failures.add(1, ordering: .relaxed)
        let n = min(f.landing, buffer.count)
        if n > 0 { try base.write(UnsafeRawBufferPointer(rebasing: buffer[0..<n]), at: offset) }
        throw f.error(fileData ? "write (file data)" : "write", offset, buffer.count)
    }

    var size: UInt64 { base.size }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws { try base.read(into: buffer, at: offset) }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try fail(buffer, at: offset, fileData: false)
        try base.write(buffer, at: offset)
    }
    func writeFileData(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try fail(buffer, at: offset, fileData: true)
        try base.write(buffer, at: offset)
    }
    func discard(offset: UInt64, length: UInt64) throws {
        if !keepsDiscardedBytes { try base.discard(offset: offset, length: length) }
    }
    func flush() throws { try base.flush() }
    func close() { base.close() }
    func freeSpace() throws -> PoolFreeSpace? { try base.freeSpace() }
}

/// Device errors reach the writer as one errno, whichever door they come through (issue 14:
/// "Device errors get one typed error and one mapping to errno. Today errors are mapped in four
/// places, with different results").
@Suite("Device errors", .enabled(if: E2fsprogs.available && Oracle.available, "needs e2fsprogs and thin-provisioning-tools"))
struct DeviceErrorTests {
    /// The same device fault, met by a file's data (the bulk write path, which the Volume maps
    /// itself) and by its metadata (written back through libext2fs's io_manager callbacks): one errno.
    @Test func oneFaultGivesOneErrnoThroughDataAndMetadataWrites() throws {
        let dir = TempDir()
        let image = dir.path + "/fs.img"
        try E2fsprogs.mkfs(image, size: 32 << 20)
        let device = FaultyDevice(try FileBlockDevice(path: FilePath(image)))
        let v = try Volume(device: device, readOnly: false, logger: quietLogger)
        let file = try v.mknod(parent: v.rootInode, name: "f", mode: 0o100644, rdev: 0, owner: .root)
        try v.fsync(nil)
        // A device below that says ENOSPC the way swift-system reports a failed pwrite: an Errno.
        // First only to the file's data, which the Volume writes back itself before the write
        // returns; then to everything, so that the new directory's blocks meet it in libext2fs.
        device.arm(.init(fileDataOnly: true, error: { _, _, _ in Errno.noSpace }))
        let data = [UInt8](repeating: 0x5a, count: 256 << 10)
        let viaData = #expect(throws: VolumeError.self) { _ = try data.withUnsafeBytes { try v.write(file.ino, at: 0, from: $0) } }
        device.arm(.init(fileDataOnly: false, error: { _, _, _ in Errno.noSpace }))
        let viaMetadata = #expect(throws: VolumeError.self) {
            _ = try v.mkdir(parent: v.rootInode, name: "d", mode: 0o755, owner: .root)
            try v.fsync(nil)
        }
        #expect(device.failed > 0)
        #expect(viaData?.errno == .noSpace, "file data: \(String(describing: viaData))")
        #expect(viaMetadata?.errno == .noSpace, "metadata: \(String(describing: viaMetadata))")
        device.arm(nil)
        try v.close()
    }

    /// A pool gone read-only (needs_check: its metadata could not be written) refuses the next
    /// commit. An fsync meets that refusal through the device's flush (a Volume alone on a thin
    /// device, as `thinfs-mount` runs it) or through the group commit (`VolumeGroup`, as `thinfs
    /// serve` runs every mount): one errno, the pool's own (EROFS).
    @Test func aReadOnlyPoolGivesOneErrnoToFsyncThroughEitherCommit() throws {
        let dir = TempDir()
        let dataPath = dir.path + "/data", metaPath = dir.path + "/metadata"
        let fault = PoolFaultTests.Fault(.metadata, .write)
        PoolIOHooks.install(fault, dataPath: dataPath)
        defer { PoolIOHooks.remove(dataPath: dataPath) }
        let size: UInt64 = 64 << 20
        let pool = try UserspaceThinPool.create(dataPath: dataPath, metadataPath: metaPath, dataSize: 256 << 20,
                                                metadataSize: 8 << 20, blockSize: 64 << 10, logger: quietLogger)
        defer { try? pool.close() }
        try pool.message(.createThin(1))
        try pool.message(.createThin(2))
        for id: ThinDeviceID in [1, 2] {
            _ = try DeviceFormatter(logger: quietLogger).format(pool: pool, id: id, size: size, scratchDirectory: dir.path + "/tmp\(id)")
        }
        try pool.commit()
        let alone = try Volume(device: pool.openDevice(1, size: size), readOnly: false, logger: quietLogger)
        let group = VolumeGroup(pool: pool, logger: quietLogger)
        let member = try group.open(device: 2, size: size, readOnly: false, logger: quietLogger)
        defer {
            try? alone.close()
            try? member.volume.close()
        }
        for v in [alone, member.volume] {
            let f = try v.mknod(parent: v.rootInode, name: "f", mode: 0o100644, rdev: 0, owner: .root)
            _ = try [UInt8](repeating: 1, count: 8192).withUnsafeBytes { try v.write(f.ino, at: 0, from: $0) }
            try v.fsync(nil)
        }
        // Both volumes are clean: their next fsync has nothing to write, only the commit. A
        // commit that cannot write the pool's metadata turns it read-only with needs_check.
        try pool.message(.createThin(3))
        try [UInt8](repeating: 3, count: 4096).withUnsafeBytes { try pool.write(3, $0, at: 0) }
        fault.arm(true)
        #expect(throws: (any Error).self) { try pool.commit() }
        fault.arm(false)
        #expect(try pool.status().needsCheck)

        let viaDevice = #expect(throws: VolumeError.self) { try alone.fsync(nil) }
        let viaGroup = #expect(throws: VolumeError.self) { try member.volume.fsync(nil) }
        #expect(viaDevice?.errno == viaGroup?.errno,
                "fsync on a needs_check pool: \(String(describing: viaDevice)) alone, \(String(describing: viaGroup)) in a group")
        #expect(viaGroup?.errno == .readOnlyFileSystem, "\(String(describing: viaGroup))")
    }
}

/// A write into the middle of a file that fails part-way (the device fails the data with EIO or
/// ENOSPC, maybe after part of it landed) leaves the file as it was: the blocks it allocated for
/// holes and preallocated ranges are given back, so they read zeros, not whatever the device
/// holds there; e2fsck -fn finds nothing, and no block leaks.
@Suite("A write into a file that fails part-way", .enabled(if: E2fsprogs.available, "needs e2fsprogs"))
struct FailedWriteInsideFileTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var errno: Errno
        /// Bytes of each failed device write that land (a short write).
        var landing: Int
        /// Discards leave the old bytes (a deleted file's) on the device.
        var keepsDiscardedBytes: Bool
        /// The range written was preallocated (an unwritten extent), not a hole.
        var preallocated: Bool
        var testDescription: String {
            "\(errno) \(landing > 0 ? "short write" : "nothing lands")\(keepsDiscardedBytes ? ", discard keeps bytes" : "")"
                + (preallocated ? ", into a preallocated range" : ", into a hole")
        }
    }

    static let cases: [Case] = [false, true].flatMap { preallocated in [
        Case(errno: .ioError, landing: 0, keepsDiscardedBytes: true, preallocated: preallocated),
        Case(errno: .ioError, landing: 6000, keepsDiscardedBytes: false, preallocated: preallocated),
        Case(errno: .noSpace, landing: 6000, keepsDiscardedBytes: false, preallocated: preallocated),
    ] }

    @Test(arguments: cases)
    func theFileReadsAsBeforeAndNothingLeaks(_ c: Case) throws {
        let dir = TempDir()
        let image = dir.path + "/fs.img"
        try E2fsprogs.mkfs(image, size: 64 << 20)
        let device = FaultyDevice(try FileBlockDevice(path: FilePath(image)), keepsDiscardedBytes: c.keepsDiscardedBytes)
        let v = try Volume(device: device, readOnly: false, logger: quietLogger)
        // A deleted file's bytes, left on the device where its blocks were.
        let junk = try v.mknod(parent: v.rootInode, name: "junk", mode: 0o100644, rdev: 0, owner: .root)
        _ = try [UInt8](repeating: 0xee, count: 8 << 20).withUnsafeBytes { try v.write(junk.ino, at: 0, from: $0) }
        try v.fsync(nil)
        try v.unlink(parent: v.rootInode, name: "junk")
        try v.fsync(nil)

        // 1 MiB of data, a 2 MiB hole (or preallocated range), 1 MiB of data.
        let file = try v.mknod(parent: v.rootInode, name: "f", mode: 0o100644, rdev: 0, owner: .root)
        var model = [UInt8](repeating: 0, count: 4 << 20)
        for i in 0..<(1 << 20) { model[i] = UInt8(truncatingIfNeeded: i &* 7 &+ 1) }
        for i in (3 << 20)..<(4 << 20) { model[i] = UInt8(truncatingIfNeeded: i &* 13 &+ 5) }
        _ = try model.withUnsafeBytes { try v.write(file.ino, at: 0, from: UnsafeRawBufferPointer(rebasing: $0[0..<(1 << 20)])) }
        _ = try model.withUnsafeBytes { try v.write(file.ino, at: 3 << 20, from: UnsafeRawBufferPointer(rebasing: $0[(3 << 20)...])) }
        if c.preallocated { try v.fallocate(file.ino, mode: [], offset: 1 << 20, length: 2 << 20) }
        try v.fsync(nil)
        let freeBefore = try v.statfs().freeBlocks

        // Unaligned at both ends: partial blocks go through libext2fs's file writes, the whole
        // blocks between through the bulk path.
        let errno = c.errno
        device.arm(.init(fileDataOnly: true, landing: c.landing, error: { _, offset, length in
            BlockDeviceError(.write, device: image, offset: offset, length: UInt64(length), errno: errno)
        }))
        let data = [UInt8](repeating: 0x77, count: (1 << 20) + 5000)
        let error = #expect(throws: VolumeError.self) {
            _ = try data.withUnsafeBytes { try v.write(file.ino, at: (1 << 20) + 300, from: $0) }
        }
        device.arm(nil)
        #expect(device.failed > 0)
        #expect(error?.errno == c.errno, "\(String(describing: error))")
        #expect(try v.getattr(file.ino).size == UInt64(model.count))

        func differences(_ v: Volume, _ ino: UInt64) throws -> String {
            var back = [UInt8](repeating: 0xff, count: model.count)
            let n = try back.withUnsafeMutableBytes { try v.read(ino, at: 0, into: $0) }
            let differ = (0..<model.count).filter { back[$0] != model[$0] }
            guard n == model.count, let first = differ.first else { return n == model.count ? "" : "read \(n) bytes" }
            return "\(differ.count) bytes differ, from \(first) (\(back[first]) for \(model[first])) to \(differ.last!)"
        }
        let afterWrite = try differences(v, file.ino)
        #expect(afterWrite == "", "after the failed write: \(afterWrite)")
        try v.fsync(nil)
        if !c.preallocated {
            // A hole filled and given back: the same free blocks as before the write.
            #expect(try v.statfs().freeBlocks == freeBefore)
        }
        try v.close()
        try E2fsprogs.check(image)
        let reopened = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: true, logger: quietLogger)
        defer { try? reopened.close() }
        let afterReopen = try differences(reopened, file.ino)
        #expect(afterReopen == "", "after a reopen: \(afterReopen)")
    }
}

/// libext2fs 1.46.6 to 1.47.3 refuses to free a range of blocks that ends at the filesystem's
/// last block (EXT2_ET_BAD_BLOCK_NUM from ext2fs_punch; e2fsprogs commit 509da989, fixed in
/// 1.47.4), after it has already taken the range out of the extent tree. A file that holds that
/// block (one that filled the filesystem) could then not be truncated or deleted cleanly.
@Suite("Freeing the filesystem's last block", .enabled(if: E2fsprogs.available, "needs e2fsprogs"))
struct LastBlockTests {
    final class Capture: LogHandler, @unchecked Sendable {
        let lines = Mutex<[String]>([])
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .info
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            guard event.level >= .warning else { return }
            lines.withLock { $0.append("\(event.level) \(event.message) \(event.metadata ?? [:])") }
        }
    }

    enum Release: String, CaseIterable, Sendable { case unlink, truncate }

    /// Fills the filesystem with one file to its last block (the last write fails with ENOSPC,
    /// and the blocks it reserved past the end are released), then frees the file's blocks.
    @Test(arguments: Release.allCases)
    func aFileHoldingTheLastBlockIsFreedCleanly(_ release: Release) throws {
        let dir = TempDir()
        let image = dir.path + "/fs.img"
        try E2fsprogs.mkfs(image, size: 16 << 20)
        let capture = Capture()
        let v = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false,
                           logger: Logger(label: "test", factory: { _ in capture }))
        let freeAtStart = try v.statfs().freeBlocks
        let file = try v.mknod(parent: v.rootInode, name: "fill", mode: 0o100644, rdev: 0, owner: .root)
        var written: UInt64 = 0
        // 1 MiB writes until one fails, then single blocks until one fails: the file ends up
        // holding every block, the last one included.
        for chunk in [[UInt8](repeating: 0x42, count: 1 << 20), [UInt8](repeating: 0x43, count: 4096)] {
            var failure: VolumeError?
            while failure == nil && written < 64 << 20 {
                do { written += UInt64(try chunk.withUnsafeBytes { try v.write(file.ino, at: written, from: $0) }) } catch let e as VolumeError {
                    failure = e
                }
            }
            #expect(failure?.errno == .noSpace, "\(String(describing: failure))")
        }
        #expect(try v.statfs().freeBlocks == 0, "the file did not fill the filesystem")
        switch release {
        case .unlink: try v.unlink(parent: v.rootInode, name: "fill")
        case .truncate: _ = try v.setattr(file.ino, AttributeChanges(size: 0))
        }
        try v.fsync(nil)
        // The inode (unlinked) holds nothing: every block the file had is free again.
        #expect(try v.statfs().freeBlocks == freeAtStart)
        try v.close()
        #expect(capture.lines.withLock { $0 } == [], "warnings")
        try E2fsprogs.check(image)
    }
}
