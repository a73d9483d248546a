import Foundation
import SystemPackage
import PersistentData
import TestSupport
import Testing
@testable import ThinFS
@testable import ThinFSExt4

@Suite("Pool limits and bad input")
struct PoolLimitTests {
    func makePool(_ dir: TempDir, dataBlocks: UInt64 = 64, metadata: UInt64 = 8 << 20,
                  options: UserspaceThinPool.Options = .init()) throws -> UserspaceThinPool {
        try UserspaceThinPool.create(dataPath: dir.path + "/data", metadataPath: dir.path + "/metadata",
                                     dataSize: dataBlocks * (64 << 10), metadataSize: metadata, blockSize: 64 << 10,
                                     options: options, logger: quietLogger)
    }

    @Test(.enabled(if: Oracle.available)) func fullDataSpaceFailsWithENOSPCAndRecoversAfterGrowth() throws {
        let dir = TempDir()
        let pool = try makePool(dir, dataBlocks: 16)
        try pool.message(.createThin(1))
        let block = [UInt8](repeating: 7, count: 64 << 10)
        for b in 0..<16 { try block.withUnsafeBytes { try pool.write(1, $0, at: UInt64(b) << 16) } }
        try pool.commit()
        #expect(try pool.status().mode == .outOfDataSpace)
        #expect(try pool.status().line.contains(" out_of_data_space "))
        let error = #expect(throws: ThinPoolError.self) {
            try block.withUnsafeBytes { try pool.write(1, $0, at: 16 << 16) }
        }
        #expect(error?.errno == .noSpace)
        // A write that spans a free and a full block fails whole: nothing is half-allocated.
        #expect(try pool.status().usedDataBlocks == 16)
        try pool.commit()
        try Oracle.check(dir.path + "/metadata")
        try pool.resize(dataBytes: 32 << 16)
        try block.withUnsafeBytes { try pool.write(1, $0, at: 16 << 16) }
        try pool.commit()
        #expect(try pool.status().mode == .rw)
        #expect(try pool.status().totalDataBlocks == 32)
        try Oracle.check(dir.path + "/metadata")
        // Shrinking is refused, with nothing changed.
        #expect(throws: ThinPoolError.self) { try pool.resize(dataBytes: 16 << 16) }
        #expect(try pool.status().totalDataBlocks == 32)
    }

    /// File data (`keepingReserve`) stops where the reserve starts; other writes (ext4's
    /// metadata) may use the reserve to the last block. Discarded blocks count as free for file
    /// data only once a commit has made them allocatable.
    @Test(.enabled(if: Oracle.available)) func fileDataLeavesTheReserveToMetadata() throws {
        let dir = TempDir()
        let pool = try makePool(dir, dataBlocks: 64)
        try pool.message(.createThin(1))
        let reserve = UserspaceThinPool.reservedDataBlocks(nrDataBlocks: 64, blockSize: 64 << 10)
        #expect(reserve == 8)   // an eighth of a small pool
        let block = [UInt8](repeating: 7, count: 64 << 10)
        func writeData(_ b: UInt64) throws { try block.withUnsafeBytes { try pool.write(1, $0, at: b << 16, keepingReserve: true) } }
        var b: UInt64 = 0
        while (try? writeData(b)) != nil { b += 1 }
        #expect(b == 64 - reserve)
        let refused = #expect(throws: ThinPoolError.self) { try writeData(b) }
        #expect(refused?.errno == .noSpace)
        for m in b..<64 { try block.withUnsafeBytes { try pool.write(1, $0, at: m << 16) } }
        #expect(try pool.status().mode == .outOfDataSpace)
        try pool.commit()
        try pool.discard(1, offset: 0, length: 16 << 16)
        #expect(pool.spaceFreedAtCommit)
        #expect(throws: ThinPoolError.self) { try writeData(0) }
        try pool.commit()
        #expect(!pool.spaceFreedAtCommit)
        for m in 0..<(16 - reserve) { try writeData(m) }
        #expect(throws: ThinPoolError.self) { try writeData(16 - reserve) }
        try pool.commit()
        try Oracle.check(dir.path + "/metadata")
    }

    /// A file write that runs the pool out of data space fails with ENOSPC, and after the pool
    /// grows the filesystem is still clean: the blocks the failed write had reserved past the
    /// file's new end are released (e2fsck rejects initialized blocks past i_size; the guest's
    /// layers-pool-full test found them on an LVM pool), and the failed write leaves the size
    /// where it was. File data stops at the pool's reserve, with the write that hits it failing
    /// (not a write-back after it), and the reserve lets ext4's metadata be flushed on the full
    /// pool; every write that succeeded is on the device.
    @Test(.enabled(if: Oracle.available)) func fileWriteOnAFullPoolLeavesACleanFilesystem() throws {
        let dir = TempDir()
        let pool = try makePool(dir, dataBlocks: 192)   // 12 MiB: the format takes about 5
        try pool.message(.createThin(1))
        let size: UInt64 = 64 << 20
        _ = try DeviceFormatter(logger: quietLogger).format(pool: pool, id: 1, size: size, scratchDirectory: dir.path + "/tmp")
        try pool.commit()
        let volume = try Volume(device: pool.openDevice(1, size: size), readOnly: false, logger: quietLogger)
        let file = try volume.mknod(parent: volume.rootInode, name: "fill", mode: 0o100644, rdev: 0, owner: .root)
        // MiB m of the file: a pattern that differs from one MiB to the next.
        func mebibyte(_ m: UInt64) -> [UInt8] { (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(m)) } }
        var written: UInt64 = 0
        var failure: VolumeError?
        while written < size {
            let chunk = mebibyte(written >> 20)
            do {
                written += UInt64(try chunk.withUnsafeBytes { try volume.write(file.ino, at: written, from: $0) })
            } catch let e as VolumeError {
                failure = e
                break
            }
        }
        let error = try #require(failure, "the pool never ran out of space")
        #expect(error.errno == .noSpace, "\(error)")
        let full = try pool.status()
        let reserve = UserspaceThinPool.reservedDataBlocks(nrDataBlocks: full.totalDataBlocks, blockSize: full.dataBlockSize)
        #expect(reserve > 0 && full.totalDataBlocks - full.usedDataBlocks < reserve + 16,
                "file data stopped short of the reserve of \(reserve) blocks by less than the 1 MiB write: \(full.line)")

        // The failed write's data never stays in the block cache to be written back later: what
        // the cache still holds dirty is metadata, and a flush writes it on the full pool.
        let held = try volume.cachedBlockCounts
        #expect(held.dirty < 64, "the cache holds \(held.dirty) dirty blocks after the failed write")
        try volume.fsync(nil)
        #expect(try volume.cachedBlockCounts.dirty == 0)
        try pool.resize(dataBytes: 2048 << 16)
        try volume.fsync(nil)
        let after = try volume.cachedBlockCounts
        #expect(after.dirty == 0 && after.total <= 1024, "after the flush: \(after)")
        try volume.close()
        try pool.commit()
        let image = dir.path + "/fs.img"
        let target = try FileBlockDevice.create(path: FilePath(image), size: size)
        try pool.openDevice(1, size: size).copy(to: target, length: size)
        let r = try Oracle.run("/sbin/e2fsck", ["-fn", image])
        #expect(r.status == 0, "e2fsck -fn after the failed write:\n\(r.stdout)\(r.stderr)")
        try Oracle.check(dir.path + "/metadata")
        // Every byte of every write that succeeded reached the device, the held ones too (read
        // back through a new Volume).
        let reopened = try Volume(device: pool.openDevice(1, size: size), readOnly: true, logger: quietLogger)
        defer { try? reopened.close() }
        let fill = try reopened.lookup(parent: reopened.rootInode, name: "fill")
        #expect(fill.size == written)
        var missing: [UInt64] = []
        var back = [UInt8](repeating: 0, count: 1 << 20)
        for m in 0..<(written >> 20) {
            _ = try back.withUnsafeMutableBytes { try reopened.read(fill.ino, at: m << 20, into: $0) }
            if back != mebibyte(m) { missing.append(m) }
        }
        #expect(missing.isEmpty, "MiB of the file not on the device: \(missing.prefix(10))")
    }

    @Test(.enabled(if: Oracle.available)) func growthAcrossBitmapBoundaryKeepsCountsRight() throws {
        let dir = TempDir()
        // 16320 entries fit one bitmap; grow from 1 bitmap to 3.
        let pool = try makePool(dir, dataBlocks: 16000)
        try pool.message(.createThin(1))
        let chunk = [UInt8](repeating: 1, count: 4096)
        try chunk.withUnsafeBytes { try pool.write(1, $0, at: 0) }
        try pool.resize(dataBytes: 40000 << 16)
        try chunk.withUnsafeBytes { try pool.write(1, $0, at: 30000 << 16) }
        try pool.commit()
        #expect(try pool.status().totalDataBlocks == 40000)
        #expect(try pool.status().usedDataBlocks == 2)
        try Oracle.check(dir.path + "/metadata")
        #expect(try pool.dumpXML() == (try Oracle.dump(dir.path + "/metadata")))
    }

    @Test(.enabled(if: Oracle.available)) func virtualBlocksBeyond32BitsAndLargestDeviceID() throws {
        let dir = TempDir()
        let pool = try makePool(dir)
        let id = ThinMetadata.maxDeviceID
        try pool.message(.createThin(id))
        let bytes = Array("far away".utf8)
        let offset: UInt64 = (1 << 34) << 16 + 123   // virtual block 2^34, past 2^32
        try bytes.withUnsafeBytes { try pool.write(id, $0, at: offset) }
        try pool.commit()
        var back = [UInt8](repeating: 0, count: bytes.count)
        try back.withUnsafeMutableBytes { try pool.read(id, into: $0, at: offset) }
        #expect(back == bytes)
        #expect(try pool.deviceStatus(id).line == "128 \(((1 << 34) + 1) * 128 - 1)")
        try Oracle.check(dir.path + "/metadata")
        #expect(throws: ThinPoolError.self) { try PoolMessage(parsing: "create_thin 16777216") }
    }

    /// Each case: a message, and a fragment the error must contain.
    @Test(arguments: [
        ("create_thin", "usage: create_thin <dev id>"),
        ("create_thin x", "'x' is not a decimal number"),
        ("create_snap 5", "usage: create_snap"),
        ("delete 1 2", "usage: delete"),
        ("frobnicate 1", "unknown message 'frobnicate'"),
        ("", "empty message"),
        ("create_thin 16777216", "exceeds the 24-bit maximum"),
    ])
    func malformedMessages(text: String, fragment: String) {
        do {
            _ = try PoolMessage(parsing: text)
            Issue.record("'\(text)' parsed")
        } catch {
            #expect("\(error)".contains(fragment), "\(error)")
        }
    }

    @Test func messageErrorsNameTheDevice() throws {
        let dir = TempDir()
        let pool = try makePool(dir)
        try pool.message(.createThin(1))
        let cases: [(PoolMessage, String)] = [
            (.createThin(1), "thin device 1 already exists"),
            (.createSnap(2, origin: 9), "origin thin device 9 does not exist"),
            (.delete(7), "thin device 7 does not exist"),
            (.setTransactionID(current: 5, new: 6), "the pool is at 0, the message expected 5"),
            (.releaseMetadataSnap, "no metadata snapshot is held"),
        ]
        for (m, fragment) in cases {
            let e = #expect(throws: ThinPoolError.self) { try pool.message(m) }
            #expect(e.map { "\($0)" }?.contains(fragment) == true, "\(m): \(String(describing: e))")
        }
        try pool.message(.setTransactionID(current: 0, new: 1))
        #expect(try pool.status().transactionID == 1)
        // An open device cannot be deleted.
        let dev = try pool.openDevice(1, size: 1 << 20)
        let busy = #expect(throws: ThinPoolError.self) { try pool.message(.delete(1)) }
        #expect(busy?.errno == .resourceBusy)
        (dev as? ThinDevice)?.close()
        try pool.message(.delete(1))
    }

    /// Each case: a pool parameter set that must be refused, and a fragment of the error.
    @Test(arguments: [
        (UInt64(32 << 10), UInt64(1 << 30), "block size 32K is invalid"),
        (UInt64(96 << 10), UInt64(96 << 20), "block size 96K is invalid"),
        (UInt64(64 << 10), UInt64((1 << 30) + 4096), "not a positive multiple of the block size"),
    ])
    func badCreateParameters(blockSize: UInt64, dataSize: UInt64, fragment: String) {
        let dir = TempDir()
        do {
            _ = try UserspaceThinPool.create(dataPath: dir.path + "/data", metadataPath: dir.path + "/metadata", dataSize: dataSize,
                                             metadataSize: 8 << 20, blockSize: blockSize, logger: quietLogger)
            Issue.record("created")
        } catch {
            #expect("\(error)".contains(fragment), "\(error)")
        }
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/data"), "a refused create left files behind")
    }

    @Test func foreignMetadataIsRefusedAndUntouched() throws {
        let dir = TempDir()
        let meta = dir.file("metadata", size: 0)
        let junk = Data((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 2654435761 >> 7) })
        try junk.write(to: URL(fileURLWithPath: meta))
        _ = dir.file("data", size: 1 << 30)
        let e = #expect(throws: ThinPoolError.self) {
            try UserspaceThinPool.open(dataPath: dir.path + "/data", metadataPath: meta, logger: quietLogger)
        }
        #expect(e.map { "\($0)" }?.contains("not thin-pool metadata") == true, "\(String(describing: e))")
        #expect(try Data(contentsOf: URL(fileURLWithPath: meta)) == junk)
    }

    @Test func blockZeroingOnPartialWrites() throws {
        for zeroing in [true, false] {
            let dir = TempDir()
            let pool = try makePool(dir, options: .init(blockZeroing: zeroing, atomicCommit: true))
            try pool.message(.createThin(1))
            // Leave stale bytes in a data block, free it, and get it reallocated.
            let stale = [UInt8](repeating: 0xEE, count: 64 << 10)
            try stale.withUnsafeBytes { try pool.write(1, $0, at: 0) }
            try pool.commit()
            try pool.discard(1, offset: 0, length: 64 << 10)
            try pool.commit()
            try [UInt8](repeating: 1, count: 512).withUnsafeBytes { try pool.write(1, $0, at: 4096) }
            var back = [UInt8](repeating: 9, count: 4096)
            try back.withUnsafeMutableBytes { try pool.read(1, into: $0, at: 0) }
            if zeroing {
                #expect(back.allSatisfy { $0 == 0 }, "the unwritten part of a new block must read as zeros")
            } else {
                // skip_block_zeroing: the allocator hands out block 1 next; block 0's stale bytes stay free.
                #expect(back.allSatisfy { $0 == 0 || $0 == 0xEE })
            }
        }
    }
}

@Suite("One writer per pool")
struct PoolLockTests {
    @Test func aSecondWriterIsRefusedAndReadersAreNot() throws {
        let dir = TempDir()
        let data = dir.path + "/data", meta = dir.path + "/metadata"
        var first: UserspaceThinPool? = try UserspaceThinPool.create(dataPath: data, metadataPath: meta, dataSize: 64 << 20,
                                                                     metadataSize: 4 << 20, blockSize: 64 << 10, logger: quietLogger)
        try first!.message(.createThin(1))
        let e = #expect(throws: ThinPoolError.self) { try UserspaceThinPool.open(dataPath: data, metadataPath: meta, logger: quietLogger) }
        #expect(e.map { "\($0)" }?.contains("open for writing by another process") == true)
        let reader = try UserspaceThinPool.open(dataPath: data, metadataPath: meta, readOnly: true, logger: quietLogger)
        #expect(try reader.deviceIDs() == [1])
        first = nil   // the lock goes with the last reference
        _ = try UserspaceThinPool.open(dataPath: data, metadataPath: meta, logger: quietLogger)
    }
}

/// `pool status` reports used metadata blocks as the kernel does, its reserve included; the VM
/// suite compares the whole line with the kernel's on the same pools.
@Test(arguments: [
    (15, 1024, 117),          // seen in the VM: the kernel printed 117/1024 where the space map holds 15
    (0, 100_000, 4096),       // the reserve is capped at 4096 blocks
    (1000, 1024, 1024),       // less free than the reserve: the kernel reports none free
    (1024, 1024, 1024),       // full
] as [(UInt64, UInt64, UInt64)])
func usedMetadataBlocksCountTheKernelsReserve(allocated: UInt64, total: UInt64, reported: UInt64) {
    #expect(PoolStatus.reportedUsedMetadataBlocks(allocated: allocated, total: total) == reported)
}
