import Foundation
import Synchronization
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `thinfs layer resize`: a mounted container grows while a writer runs in it and files are
/// open, with no remount; an unmounted one grows through the CLI's own process. e2fsck -fn,
/// dumpe2fs and thin_check judge the results; statvfs on the mount shows the new size.
@Suite("Layer resize", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available && LayerFixture.canMakeImage,
                "needs /dev/fuse, root, the built binaries, thin-provisioning-tools and busybox-static"))
struct LayerResizeTests {
    static let chunk = 1 << 20

    /// Chunk `i` of the writer's file: random bytes with `i` in the first eight.
    static func chunk(_ i: Int, from pattern: [UInt8]) -> [UInt8] {
        var bytes = pattern
        withUnsafeBytes(of: UInt64(i).littleEndian) { for (k, b) in $0.enumerated() { bytes[k] = b } }
        return bytes
    }

    /// Appends chunks to a file until it has written `target` of them (raised by the test),
    /// `paced` between chunks while set; records the errno of a failed write and stops.
    final class Writer: @unchecked Sendable {
        let fd: Int32
        let pattern: [UInt8]
        let target = Atomic<Int>(0)
        let paced = Atomic<Bool>(true)
        let written = Atomic<Int>(0)
        let failure = Atomic<Int32>(0)
        let stop = Atomic<Bool>(false)
        private let done = DispatchSemaphore(value: 0)

        init(path: String, pattern: [UInt8]) throws {
            fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0o644)
            guard fd >= 0 else { throw LayerFixture.Failure("open \(path): errno \(errno)") }
            self.pattern = pattern
        }

        func start() {
            Thread.detachNewThread { [self] in
                defer { done.signal() }
                while !stop.load(ordering: .relaxed) {
                    let i = written.load(ordering: .relaxed)
                    guard i < target.load(ordering: .relaxed) else {
                        usleep(2000)
                        continue
                    }
                    let bytes = LayerResizeTests.chunk(i, from: pattern)
                    let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(i * LayerResizeTests.chunk)) }
                    guard n == bytes.count else {
                        failure.store(n < 0 ? errno : EIO, ordering: .relaxed)
                        return
                    }
                    written.store(i + 1, ordering: .relaxed)
                    if paced.load(ordering: .relaxed) { usleep(20_000) }
                }
            }
        }

        func wait(until count: Int, seconds: Double) -> Bool {
            eventually(seconds) { written.load(ordering: .relaxed) >= count || failure.load(ordering: .relaxed) != 0 }
                && failure.load(ordering: .relaxed) == 0
        }

        func finish() -> Int32 {
            stop.store(true, ordering: .relaxed)
            done.wait()
            let synced = fsync(fd) == 0 ? 0 : errno
            close(fd)
            return synced
        }
    }

    static func sizeOf(_ mountpoint: String) -> UInt64 {
        var st = statvfs()
        guard statvfs(mountpoint, &st) == 0 else { return 0 }
        return UInt64(st.f_blocks) * UInt64(st.f_frsize)
    }

    /// A container mounted through the daemon, with a file open for writing, an open file
    /// already unlinked, and a writer appending, grows from 256M to 768M through the control
    /// socket: statvfs shows the new size at once, the writer goes on past the old size, and
    /// every file reads back as written. A shrink is refused naming the layer and both sizes,
    /// and changes nothing; an unknown layer is named. After the unmount the pool passes
    /// thin_check and the ext4 e2fsck -fn, with 768M of blocks. Then a layer nobody mounts
    /// grows with no daemon running.
    @Test func growsAMountedContainerWhileAWriterRuns() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        let top = try f.importImage()
        try f.ok(["layer", "create-rw", "c1", "--parent", top])
        let mnt = f.mountpoint("c1")
        try f.ok(["mount", "c1", mnt])
        let before = Self.sizeOf(mnt)
        #expect(before > 0 && before <= 256 << 20, "the container starts at \(before) bytes")
        let busybox = Sys.readFile(mnt + "/bin/busybox")
        #expect(busybox != nil)

        var random = SeededRandom(seed: 13)
        let pattern = (0..<Self.chunk).map { _ in UInt8.random(in: 0...255, using: &random) }
        // A file held open for writing across the resize.
        let held = open(mnt + "/held", O_CREAT | O_RDWR, 0o644)
        try #require(held >= 0)
        let first = Self.chunk(1000, from: pattern), second = Self.chunk(1001, from: pattern)
        #expect(first.withUnsafeBytes { pwrite(held, $0.baseAddress, $0.count, 0) } == Self.chunk)
        // An open file whose last name is gone: the volume keeps its inode until the close.
        let orphan = open(mnt + "/orphan", O_CREAT | O_RDWR, 0o644)
        try #require(orphan >= 0)
        #expect(second.withUnsafeBytes { pwrite(orphan, $0.baseAddress, $0.count, 0) } == Self.chunk)
        #expect(unlink(mnt + "/orphan") == 0)

        let writer = try Writer(path: mnt + "/stream", pattern: pattern)
        writer.target.store(150, ordering: .relaxed)
        writer.start()
        #expect(writer.wait(until: 20, seconds: 30), "the writer failed before the resize: errno \(writer.failure.load(ordering: .relaxed))")

        // The resize goes through the daemon's control socket while the writer writes.
        try f.ok(["layer", "resize", "c1", "768M"])
        let after = Self.sizeOf(mnt)
        #expect(after > 700 << 20 && after <= 768 << 20, "after the resize statvfs shows \(after) bytes")
        #expect(writer.written.load(ordering: .relaxed) < 150, "the writer had finished before the resize ended: it ran too fast to overlap")

        // Past the old size: 330 MiB in one file of a filesystem that had 256M.
        writer.paced.store(false, ordering: .relaxed)
        writer.target.store(330, ordering: .relaxed)
        #expect(writer.wait(until: 330, seconds: 120), "the writer stopped at chunk \(writer.written.load(ordering: .relaxed)): errno \(writer.failure.load(ordering: .relaxed))")
        #expect(writer.finish() == 0)

        // The files open across the resize still work, and everything reads back.
        #expect(second.withUnsafeBytes { pwrite(held, $0.baseAddress, $0.count, off_t(Self.chunk)) } == Self.chunk)
        #expect(fsync(held) == 0)
        var back = [UInt8](repeating: 0, count: Self.chunk)
        #expect(back.withUnsafeMutableBytes { pread(orphan, $0.baseAddress, $0.count, 0) } == Self.chunk)
        #expect(back == second, "the unlinked open file changed")
        #expect(Sys.readFile(mnt + "/held") == first + second)
        #expect(Sys.readFile(mnt + "/bin/busybox") == busybox)
        let stream = try #require(FileHandle(forReadingAtPath: mnt + "/stream"))
        var bad: [Int] = []
        for i in 0..<330 {
            let data = stream.readData(ofLength: Self.chunk)
            if [UInt8](data) != Self.chunk(i, from: pattern) { bad.append(i) }
        }
        try stream.close()
        #expect(bad.isEmpty, "chunks that do not read back as written: \(bad.prefix(20))")

        // Shrinking is refused, naming the layer and both sizes; nothing changes.
        let shrink = try f.run(["layer", "resize", "c1", "512M"])
        #expect(shrink.status != 0 && shrink.stderr.contains("c1") && shrink.stderr.contains("768M") && shrink.stderr.contains("512M"),
                "\(shrink.stderr)")
        #expect(Self.sizeOf(mnt) == after)
        #expect(try f.listing("c1")["size"] as? Int == 768 << 20)
        let unknown = try f.run(["layer", "resize", "nosuch", "1G"])
        #expect(unknown.status != 0 && unknown.stderr.contains("nosuch") && unknown.stderr.contains("does not exist"), "\(unknown.stderr)")

        close(orphan)
        close(held)
        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        #expect(try Oracle.check(f.metadata))
        let grown = try f.checkFilesystem("c1", length: "768M")
        #expect(grown.fsck.status == 0, "e2fsck: \(grown.fsck.stdout)\(grown.fsck.stderr)")
        #expect(grown.bytes == 768 << 20)

        // No daemon: the CLI opens the store and grows the unmounted layer itself.
        try f.ok(["layer", "create-rw", "c2", "--parent", top])
        try f.ok(["layer", "resize", "c2", "512M"])
        #expect(try f.listing("c2")["size"] as? Int == 512 << 20)
        let offline = try f.checkFilesystem("c2", length: "512M")
        #expect(offline.fsck.status == 0, "e2fsck: \(offline.fsck.stdout)\(offline.fsck.stderr)")
        #expect(offline.bytes == 512 << 20)
        #expect(try Oracle.check(f.metadata))
        try f.expectNoLeaks()
    }
}
