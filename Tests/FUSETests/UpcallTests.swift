import Foundation
import TestSupport
import Testing
@testable import ThinFS
@testable import ThinFSFUSE
#if canImport(Glibc)
import Glibc
#endif

/// Requests the server declines so that the kernel stops sending them, and what must still hold.
@Suite("FUSE upcalls", .enabled(if: Host.canMountFUSE, "needs /dev/fuse and root"))
struct UpcallTests {
    /// FLUSH is answered ENOSYS, so after the first close the kernel sends none. close(2) must
    /// still deliver the file's cached pages to the volume before it returns, for every file,
    /// not only the first, and report nothing wrong.
    @Test func closeDeliversTheDataWithoutFlushRequests() throws {
        try TestMount.with { m in
            for i in 0..<20 {
                let name = "f\(i)"
                let bytes = (0..<(1000 * i + 1)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) }
                let fd = open(m.file(name), O_WRONLY | O_CREAT | O_EXCL, 0o644)
                #expect(fd >= 0)
                // Several writes, as tar makes them: the kernel's cache merges them.
                for chunk in stride(from: 0, to: bytes.count, by: 700) {
                    let end = min(chunk + 700, bytes.count)
                    let n = bytes[chunk..<end].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                    #expect(n == end - chunk)
                }
                #expect(close(fd) == 0, "close of \(name): \(errno)")
                // Straight from the volume, not through the kernel's page cache.
                let ino = try #require(m.volume.inode(name))
                #expect(m.volume.contents(ino) == bytes, "\(name) reached the volume when close returned")
            }
            // The kernel sends RELEASE after close(2) has returned (fuse_release is asynchronous),
            // so the releases may still be on their way: wait for them, with a bound that only a
            // lost release exceeds.
            let deadline = Date().addingTimeInterval(20)
            while !m.volume.record.opens.values.allSatisfy({ $0 == 0 }) && Date() < deadline { usleep(20_000) }
            #expect(m.volume.record.opens.values.allSatisfy { $0 == 0 }, "every open was released: \(m.volume.record.opens)")
        }
    }
}

/// Opens that never reach the daemon (FUSE_CAP_NO_OPEN_SUPPORT), and the lifetime of unlinked
/// files that follows from it: the daemon no longer sees opens and closes, so an unlinked inode
/// must stay until the kernel forgets it. Each test runs with opens in the kernel (the default)
/// and without (`opensInKernel: false`, the path of a kernel that lacks the capability).
@Suite("FUSE opens", .enabled(if: Host.canMountFUSE && FileManager.default.isExecutableFile(atPath: "/sbin/mke2fs"),
                              "needs /dev/fuse, root and e2fsprogs"))
struct OpenUpcallTests {
    /// Small files read twice, as a second `cat` of an image's files would: the second pass is
    /// the kernel's page cache and nothing else, no OPEN, READ or RELEASE reaches the volume. The
    /// first pass sends one OPEN (answered ENOSYS). Without opens in the kernel, each open and
    /// release reaches the volume, and they balance.
    @Test(arguments: [true, false]) func secondReadOfSmallFilesReachesNoDaemon(opensInKernel: Bool) throws {
        let v = MemoryVolume()
        var files: [(name: String, data: [UInt8])] = []
        for i in 0..<200 {
            let data = (0..<(37 * i + 1)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ i) }
            try v.seed(name: "f\(i)", data: data)
            files.append(("f\(i)", data))
        }
        try TestMount.with(v, opensInKernel: opensInKernel) { m in
            for f in files { #expect(Sys.readFile(m.file(f.name)) == f.data, "\(f.name), first pass") }
            // RELEASE is asynchronous: let the first pass's arrive before counting.
            _ = eventually(5) { let c = m.volume.record.calls; return c["release", default: 0] >= c["open", default: 0] }
            let before = m.volume.record.calls
            for f in files { #expect(Sys.readFile(m.file(f.name)) == f.data, "\(f.name), second pass") }
            usleep(200_000)
            let after = m.volume.record.calls
            let delta = { (op: String) in after[op, default: 0] - before[op, default: 0] }
            #expect(delta("read") == 0, "the second pass is the page cache's")
            if opensInKernel {
                for op in ["open", "release"] {
                    #expect(delta(op) == 0, "\(op) calls in the second pass: \(delta(op)) for \(files.count) files")
                }
                #expect(m.server.openRequests.load(ordering: .relaxed) == 1, "one OPEN, answered ENOSYS")
                #expect(m.server.releaseRequests.load(ordering: .relaxed) == 0)
            } else {
                #expect(delta("open") == files.count)
                #expect(eventually(5) { m.volume.record.opens.values.allSatisfy { $0 == 0 } }, "every open was released")
            }
        }
    }

    /// A file unlinked while a process has it open stays readable and writable through that
    /// descriptor and keeps its blocks; the last close (and the kernel's FORGET) frees them. The
    /// same for a file unlinked while its creating descriptor is open (CREATE's handle), and an
    /// unlinked file nobody holds is freed at once. e2fsck finds the image clean.
    @Test(arguments: [true, false]) func unlinkedOpenFileLivesUntilTheLastClose(opensInKernel: Bool) throws {
        let dir = TempDir()
        let image = try Ext4Image(dir: dir.path)
        let served = try Ext4Image.Served(image, options: .init(source: "opens", opensInKernel: opensInKernel))
        var closed = false
        defer { if !closed { try? served.close() } }
        let v = served.volume
        let mnt = image.mountpoint
        let data = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        #expect(Sys.writeFile(mnt + "/held", data) == 0)
        #expect(Sys.writeFile(mnt + "/gone", data) == 0)
        let free0 = try v.statfs().freeBlocks

        // Nobody holds "gone": its megabyte comes back once the kernel lets go of the inode.
        #expect(unlink(mnt + "/gone") == 0)
        #expect(eventually(10) { ((try? v.statfs().freeBlocks) ?? 0) >= free0 + 256 }, "the unlinked file's blocks were freed")
        let free1 = try v.statfs().freeBlocks

        let fd = open(mnt + "/held", O_RDWR)
        try #require(fd >= 0)
        let ino = try v.lookup(parent: v.rootInode, name: "held").ino
        #expect(unlink(mnt + "/held") == 0)
        #expect(Sys.attributes(mnt + "/held").0 == ENOENT)
        // Writes through the descriptor, past the old end too, reach the volume's inode.
        let tail = [UInt8](repeating: 0xC3, count: 8192)
        #expect(tail.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(data.count - 4096)) } == tail.count)
        #expect(fsync(fd) == 0)
        var back = [UInt8](repeating: 0, count: data.count + 4096)
        #expect(back.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) } == back.count)
        let expected = Array(data[..<(data.count - 4096)]) + tail
        #expect(back == expected, "the unlinked file reads back what was written")
        var fromVolume = [UInt8](repeating: 0, count: expected.count)
        #expect(try fromVolume.withUnsafeMutableBytes { try v.read(ino, at: 0, into: $0) } == expected.count)
        #expect(fromVolume == expected, "fsync delivered the write to the volume's inode")

        // A created file, unlinked while the descriptor of its O_CREAT is open.
        let made = open(mnt + "/made", O_RDWR | O_CREAT | O_EXCL, 0o600)
        try #require(made >= 0)
        let madeIno = try v.lookup(parent: v.rootInode, name: "made").ino
        #expect(data.withUnsafeBytes { pwrite(made, $0.baseAddress, $0.count, 0) } == data.count)
        #expect(fsync(made) == 0)
        #expect(unlink(mnt + "/made") == 0)
        var madeBack = [UInt8](repeating: 0, count: data.count)
        #expect(madeBack.withUnsafeMutableBytes { pread(made, $0.baseAddress, $0.count, 0) } == data.count)
        #expect(madeBack == data)
        let free2 = try v.statfs().freeBlocks
        usleep(300_000)
        #expect(try v.statfs().freeBlocks <= free2, "the open unlinked files keep their blocks")
        #expect(free2 + 256 <= free1, "the created file's blocks are in use")
        #expect(throws: Never.self) { try v.getattr(ino) }
        #expect(throws: Never.self) { try v.getattr(madeIno) }

        #expect(close(fd) == 0)
        #expect(eventually(10) { ((try? v.statfs().freeBlocks) ?? 0) >= free2 + 256 }, "the last close of 'held' freed its blocks")
        #expect(eventually(10) { (try? v.getattr(ino)) == nil }, "inode \(ino) is free")
        #expect(throws: Never.self) { try v.getattr(madeIno) }
        #expect(close(made) == 0)
        #expect(eventually(10) { ((try? v.statfs().freeBlocks) ?? 0) >= free2 + 512 }, "the last close of 'made' freed its blocks")
        #expect(eventually(10) { (try? v.getattr(madeIno)) == nil }, "inode \(madeIno) is free")

        try served.close()
        closed = true
        let fsck = try Oracle.run("/sbin/e2fsck", ["-fn", image.path])
        #expect(fsck.status == 0, "e2fsck -fn: \(fsck.stdout)\(fsck.stderr)")
    }

    /// An unlinked file still open when the mount goes away (lazily detached, then the connection
    /// ended when the last descriptor closed): the volume frees it before its last commit.
    @Test func unlinkedOpenFileAtUnmountIsFreed() throws {
        let dir = TempDir()
        let image = try Ext4Image(dir: dir.path)
        let served = try Ext4Image.Served(image, options: .init(source: "opens"))
        var closed = false
        defer { if !closed { try? served.close() } }
        let mnt = image.mountpoint
        #expect(Sys.writeFile(mnt + "/held", [UInt8](repeating: 5, count: 1 << 20)) == 0)
        let fd = open(mnt + "/held", O_RDONLY)
        try #require(fd >= 0)
        #expect(unlink(mnt + "/held") == 0)
        #expect(umount2(mnt, Int32(MNT_DETACH)) == 0)
        #expect(close(fd) == 0)
        try served.close()
        closed = true
        let fsck = try Oracle.run("/sbin/e2fsck", ["-fn", image.path])
        #expect(fsck.status == 0, "e2fsck -fn: \(fsck.stdout)\(fsck.stderr)")
    }
}
