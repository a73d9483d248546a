import Foundation
import SystemPackage
import Synchronization
import TestSupport
import Testing
@testable import ThinFS

/// Volume.write's bulk path: the whole blocks of a write go to the device in runs of consecutive
/// blocks (one channel write each), the partial blocks at its edges through libext2fs's file I/O.
/// Each test checks the bytes against a model of the file, read back through the open volume and
/// again through a new one (so the device has them, not only the block cache), and e2fsck -fn.
@Suite("Volume bulk writes", .enabled(if: E2fsprogs.available, "needs e2fsprogs"))
struct BulkWriteTests {
    /// The byte at `offset` of write number `n`: differs between writes and along a write.
    static func pattern(_ n: Int, _ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: ($0 / 512) &* 7 &+ n &* 37 &+ $0) | 1 }
    }

    func withImage(_ body: (Volume, String) throws -> Void) throws {
        let dir = TempDir()
        let image = dir.path + "/fs.img"
        try E2fsprogs.mkfs(image, size: 64 << 20)
        let volume = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false, logger: quietLogger)
        try body(volume, image)
        try volume.close()
        try E2fsprogs.check(image)
    }

    func expectContents(_ v: Volume, _ ino: UInt64, _ model: [UInt8], _ what: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(try v.getattr(ino).size == UInt64(model.count), "\(what): size", sourceLocation: sourceLocation)
        var back = [UInt8](repeating: 0xFF, count: model.count + 8192)
        let n = try back.withUnsafeMutableBytes { try v.read(ino, at: 0, into: $0) }
        #expect(n == model.count, "\(what): read \(n) bytes of \(model.count)", sourceLocation: sourceLocation)
        if let i = zip(back.prefix(n), model).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset {
            Issue.record("\(what): byte \(i) is \(back[i]), the model has \(model[i])", sourceLocation: sourceLocation)
        }
    }

    /// Unaligned starts and ends, writes across and past EOF (leaving holes), into holes, into a
    /// preallocated (unwritten) range, over data already written, and over blocks cached dirty by a
    /// partial write just before: each against the model.
    @Test func editsMatchAModel() throws {
        try withImage { v, image in
            let f = try v.mknod(parent: v.rootInode, name: "f", mode: 0o100644, rdev: 0, owner: .root)
            var model: [UInt8] = []
            var n = 0
            func write(_ offset: Int, _ count: Int, _ what: String) throws {
                n += 1
                let bytes = Self.pattern(n, count)
                let wrote = try bytes.withUnsafeBytes { try v.write(f.ino, at: UInt64(offset), from: $0) }
                #expect(wrote == count, "\(what): wrote \(wrote) of \(count)")
                if model.count < offset + count { model += [UInt8](repeating: 0, count: offset + count - model.count) }
                model.replaceSubrange(offset..<(offset + count), with: bytes)
                try expectContents(v, f.ino, model, what)
            }
            try write(0, 1 << 20, "aligned 1 MiB into an empty file")
            try write(100, 3 * 4096, "unaligned start and end inside the file")
            try write(4096 * 10 + 7, 4096 * 3, "unaligned, three blocks' worth")
            try write((1 << 20) - 5000, 20_000, "across EOF, unaligned")
            try write((3 << 20), 256 << 10, "past EOF, aligned: a hole before it")
            try write((2 << 20) + 123, 64 << 10, "into the hole, unaligned")
            try write((2 << 20) + 300 << 10, 8192, "into the hole, aligned")
            try write(4096 * 5 + 1, 10, "a partial block (cached dirty)")
            try write(4096 * 5, 4096 * 2, "whole blocks over a block cached dirty")
            try v.fallocate(f.ino, mode: .keepSize, offset: UInt64(model.count), length: 1 << 20)
            try write(model.count, 128 << 10, "into a preallocated (unwritten) range past EOF")
            try v.fallocate(f.ino, mode: [], offset: UInt64(model.count), length: 64 << 10)
            model += [UInt8](repeating: 0, count: 64 << 10)
            try write(model.count - (64 << 10) + 4096, 8192, "into a preallocated range inside the file")
            try write((5 << 20) + 4095, 4097, "ending on a block boundary past EOF")
            try write(0, 4096, "the first block alone")
            try v.close()
            try E2fsprogs.check(image)
            let again = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: true, logger: quietLogger)
            defer { try? again.close() }
            try expectContents(again, try again.lookup(parent: again.rootInode, name: "f").ino, model, "read back through a new volume")
        }
    }

    /// Several threads write one file at once, each its own interleaved stripes (aligned and
    /// unaligned, growing the file), while another rewrites a region all of them left alone:
    /// the file must be the union of the stripes.
    @Test func concurrentWritersToOneFile() throws {
        try withImage { v, image in
            let f = try v.mknod(parent: v.rootInode, name: "shared", mode: 0o100644, rdev: 0, owner: .root)
            let threads = 4, rounds = 24, stripe = 40_000
            // Thread t writes stripe r * threads + t in round r: unaligned sizes and offsets.
            final class Failures: Sendable { let count = Atomic<Int>(0) }
            let failures = Failures()
            var workers: [Thread] = []
            for t in 0..<threads {
                let worker = Thread {
                    for r in 0..<rounds {
                        let index = r * threads + t
                        let bytes = Self.pattern(index, stripe)
                        do {
                            _ = try bytes.withUnsafeBytes { try v.write(f.ino, at: UInt64(index * stripe), from: $0) }
                        } catch {
                            failures.count.add(1, ordering: .relaxed)
                        }
                    }
                }
                workers.append(worker)
                worker.start()
            }
            while workers.contains(where: { !$0.isFinished }) { usleep(1000) }
            #expect(failures.count.load(ordering: .relaxed) == 0)
            var model: [UInt8] = []
            for index in 0..<(threads * rounds) { model += Self.pattern(index, stripe) }
            try expectContents(v, f.ino, model, "after the concurrent writes")
            try v.close()
            try E2fsprogs.check(image)
            let again = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: true, logger: quietLogger)
            defer { try? again.close() }
            try expectContents(again, try again.lookup(parent: again.rootInode, name: "shared").ino, model, "read back through a new volume")
        }
    }

    /// Whole blocks written over data a thin snapshot shares: the snapshot still reads the old
    /// bytes, the origin the new ones; thin_check and e2fsck pass on both.
    @Test(.enabled(if: Oracle.available)) func overwritesOfSnapshotSharedBlocks() throws {
        let dir = TempDir()
        let pool = try UserspaceThinPool.create(dataPath: dir.path + "/data", metadataPath: dir.path + "/metadata", dataSize: 128 << 20,
                                                metadataSize: 16 << 20, blockSize: 64 << 10, logger: quietLogger)
        try pool.message(.createThin(1))
        let size: UInt64 = 128 << 20
        _ = try DeviceFormatter(logger: quietLogger).format(pool: pool, id: 1, size: size, scratchDirectory: dir.path + "/tmp")
        let old = Self.pattern(1, 2 << 20)
        do {
            let v = try Volume(device: pool.openDevice(1, size: size), readOnly: false, logger: quietLogger)
            let f = try v.mknod(parent: v.rootInode, name: "f", mode: 0o100644, rdev: 0, owner: .root)
            _ = try old.withUnsafeBytes { try v.write(f.ino, at: 0, from: $0) }
            try v.close()
        }
        try pool.commit()
        try pool.message(.createSnap(2, origin: 1))
        var new = old
        do {
            let v = try Volume(device: pool.openDevice(1, size: size), readOnly: false, logger: quietLogger)
            let f = try v.lookup(parent: v.rootInode, name: "f")
            for (i, (offset, count)) in [(0, 1 << 20), (1_500_000, 300_000), (4096 * 300, 4096)].enumerated() {
                let bytes = Self.pattern(10 + i, count)
                _ = try bytes.withUnsafeBytes { try v.write(f.ino, at: UInt64(offset), from: $0) }
                new.replaceSubrange(offset..<(offset + count), with: bytes)
            }
            try expectContents(v, f.ino, new, "the origin")
            try v.close()
        }
        try pool.commit()
        for (id, model) in [(1, new), (2, old)] as [(UInt32, [UInt8])] {
            let v = try Volume(device: pool.openDevice(id, size: size), readOnly: true, logger: quietLogger)
            try expectContents(v, try v.lookup(parent: v.rootInode, name: "f").ino, model, "thin device \(id)")
            try v.close()
            let image = dir.path + "/dev\(id).img"
            let out = try FileBlockDevice.create(path: FilePath(image), size: size)
            try pool.openDevice(id, size: size).copy(to: out, length: size)
            try E2fsprogs.check(image)
        }
        try Oracle.check(dir.path + "/metadata")
    }
}
