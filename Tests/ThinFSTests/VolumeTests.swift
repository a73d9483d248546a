import Foundation
import PersistentData
import SystemPackage
import Synchronization
import TestSupport
import Testing
@testable import ThinFS
@testable import ThinFSExt4
#if canImport(Glibc)
import Glibc
#endif

/// mke2fs and e2fsck from e2fsprogs: the oracle for the filesystem the Volume writes.
enum E2fsprogs {
    static var available: Bool { FileManager.default.isExecutableFile(atPath: "/sbin/mke2fs") }

    static func mkfs(_ path: String, size: UInt64) throws {
        let f = FileManager.default
        _ = f.createFile(atPath: path, contents: nil)
        let h = FileHandle(forWritingAtPath: path)!
        try h.truncate(atOffset: size)
        try h.close()
        let r = try Oracle.run("/sbin/mke2fs", ["-t", "ext4", "-b", "4096", "-F", "-q", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", path])
        guard r.status == 0 else { throw Oracle.OracleError.failed("mke2fs: \(r.stderr)") }
    }

    /// e2fsck -fn: forced, read-only; exit 0 means clean.
    static func check(_ path: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try Oracle.run("/sbin/e2fsck", ["-fn", path])
        #expect(r.status == 0, "e2fsck -fn \(path):\n\(r.stdout)\(r.stderr)", sourceLocation: sourceLocation)
    }
}

@Suite("Volume (libext2fs)", .enabled(if: E2fsprogs.available, "needs e2fsprogs"))
struct VolumeTests {
    func withImage(_ body: (Volume, String) throws -> Void) throws {
        let dir = TempDir()
        let image = dir.path + "/fs.img"
        try E2fsprogs.mkfs(image, size: 64 << 20)
        let volume = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false, logger: quietLogger)
        try body(volume, image)
        try volume.close()
        try E2fsprogs.check(image)
    }

    @Test func createReadWriteAndNames() throws {
        try withImage { v, _ in
            let root = v.rootInode
            let owner = Owner(uid: 1000, gid: 1000)
            let dir = try v.mkdir(parent: root, name: "etc", mode: 0o755, owner: owner)
            #expect(dir.isDirectory && dir.mode & 0o7777 == 0o755 && dir.uid == 1000 && dir.nlink == 2)
            #expect(try v.getattr(root).nlink == 4)   // ., .., lost+found's .., etc's ..
            let file = try v.mknod(parent: dir.ino, name: "hosts", mode: 0o100644, rdev: 0, owner: owner)
            let text = Array("127.0.0.1 localhost\n".utf8)
            #expect(try text.withUnsafeBytes { try v.write(file.ino, at: 0, from: $0) } == text.count)
            var back = [UInt8](repeating: 0, count: 100)
            let n = try back.withUnsafeMutableBytes { try v.read(file.ino, at: 0, into: $0) }
            #expect(Array(back.prefix(n)) == text)
            #expect(try v.lookup(parent: dir.ino, name: "hosts").size == UInt64(text.count))
            #expect(throws: VolumeError.self) { try v.lookup(parent: dir.ino, name: "missing") }
            let e = #expect(throws: VolumeError.self) { try v.mknod(parent: dir.ino, name: "hosts", mode: 0o100644, rdev: 0, owner: owner) }
            #expect(e?.errno == .fileExists)

            // Large file past 4 GiB (sparse) and a read across the hole.
            let big = try v.mknod(parent: root, name: "big", mode: 0o100600, rdev: 0, owner: .root)
            let tail = Array("tail".utf8)
            _ = try tail.withUnsafeBytes { try v.write(big.ino, at: 5 << 30, from: $0) }
            #expect(try v.getattr(big.ino).size == (5 << 30) + 4)
            #expect(try v.seek(big.ino, from: 0, to: .data) == (5 << 30) / 4096 * 4096)
            #expect(try v.seek(big.ino, from: 0, to: .hole) == 0)

            // Symlinks, fast and slow.
            let short = try v.symlink(parent: root, name: "short", target: "etc/hosts", owner: owner)
            #expect(short.isSymlink)
            #expect(try v.readlink(short.ino) == "etc/hosts")
            let longTarget = String(repeating: "x/", count: 200) + "end"
            let long = try v.symlink(parent: root, name: "long", target: longTarget, owner: owner)
            #expect(try v.readlink(long.ino) == longTarget)

            // Hard links across directories.
            let linked = try v.link(file.ino, newParent: root, newName: "hosts-link")
            #expect(linked.nlink == 2)
            try v.unlink(parent: dir.ino, name: "hosts")
            #expect(try v.getattr(file.ino).nlink == 1)
            #expect(try v.lookup(parent: root, name: "hosts-link").ino == file.ino)

            // Devices and fifos.
            let null = try v.mknod(parent: root, name: "null", mode: 0o020666, rdev: Volume.makedev(major: 1, minor: 3), owner: .root)
            #expect(Volume.major(null.rdev) == 1 && Volume.minor(null.rdev) == 3)
            let big8 = try v.mknod(parent: root, name: "bigdev", mode: 0o060600, rdev: Volume.makedev(major: 259, minor: 70000), owner: .root)
            #expect(Volume.major(big8.rdev) == 259 && Volume.minor(big8.rdev) == 70000)
            _ = try v.mknod(parent: root, name: "fifo", mode: 0o010644, rdev: 0, owner: .root)

            // readdir sees everything once, with resumable cookies.
            var names: [String] = []
            try v.readdir(root, after: 0) { names.append($0.name); return true }
            #expect(Set(names) == [".", "..", "lost+found", "etc", "big", "short", "long", "hosts-link", "null", "bigdev", "fifo"])
            var firstTwo: [DirectoryEntry] = []
            try v.readdir(root, after: 0) { firstTwo.append($0); return firstTwo.count < 2 }
            var rest: [String] = []
            try v.readdir(root, after: firstTwo[1].cookie) { rest.append($0.name); return true }
            #expect(firstTwo.map(\.name) + rest == names)
        }
    }

    @Test func renameSemantics() throws {
        try withImage { v, _ in
            let root = v.rootInode
            let a = try v.mkdir(parent: root, name: "a", mode: 0o755, owner: .root)
            let b = try v.mkdir(parent: root, name: "b", mode: 0o755, owner: .root)
            let f = try v.mknod(parent: a.ino, name: "f", mode: 0o100644, rdev: 0, owner: .root)
            let g = try v.mknod(parent: b.ino, name: "g", mode: 0o100644, rdev: 0, owner: .root)
            // Over an existing file: the target's inode goes.
            try v.rename(parent: a.ino, name: "f", newParent: b.ino, newName: "g", flags: [])
            #expect(try v.lookup(parent: b.ino, name: "g").ino == f.ino)
            #expect(throws: VolumeError.self) { try v.getattr(g.ino) }
            // NOREPLACE refuses; EXCHANGE swaps.
            let h = try v.mknod(parent: a.ino, name: "h", mode: 0o100644, rdev: 0, owner: .root)
            let e = #expect(throws: VolumeError.self) { try v.rename(parent: a.ino, name: "h", newParent: b.ino, newName: "g", flags: .noReplace) }
            #expect(e?.errno == .fileExists)
            try v.rename(parent: a.ino, name: "h", newParent: b.ino, newName: "g", flags: .exchange)
            #expect(try v.lookup(parent: a.ino, name: "h").ino == f.ino)
            #expect(try v.lookup(parent: b.ino, name: "g").ino == h.ino)
            // Directories: over an empty one works and fixes link counts; over a non-empty one fails.
            let d = try v.mkdir(parent: a.ino, name: "d", mode: 0o755, owner: .root)
            _ = try v.mkdir(parent: b.ino, name: "empty", mode: 0o755, owner: .root)
            try v.rename(parent: a.ino, name: "d", newParent: b.ino, newName: "empty", flags: [])
            #expect(try v.getattr(a.ino).nlink == 2 && (try v.getattr(b.ino).nlink) == 3)
            #expect(try v.lookup(parent: d.ino, name: "..").ino == b.ino)
            let full = #expect(throws: VolumeError.self) { try v.rename(parent: root, name: "a", newParent: root, newName: "b", flags: []) }
            #expect(full?.errno == .directoryNotEmpty)
            // A directory cannot move into itself.
            let loop = #expect(throws: VolumeError.self) { try v.rename(parent: root, name: "b", newParent: d.ino, newName: "x", flags: []) }
            #expect(loop?.errno == .invalidArgument)
            let notEmpty = #expect(throws: VolumeError.self) { try v.rmdir(parent: root, name: "b") }
            #expect(notEmpty?.errno == .directoryNotEmpty)
        }
    }

    /// A directory made where a removed one was reuses its inode number, and FUSE names inodes by
    /// number and generation: with the same generation, a kernel still holding the removed
    /// directory's inode (marked dead by rmdir) takes the new directory for it, and every lookup,
    /// create and readdir in it fails with ENOENT. containerd's conformance suite hit this in the
    /// qemu guest (128LayersMount: RemoveAll then Mkdir of /ONLYME, then a create in it).
    /// The kernel's ext4 and fuse2fs give every new inode a new generation.
    @Test func reusedDirectoryInodeGetsANewGeneration() throws {
        try withImage { v, _ in
            let root = v.rootInode
            let first = try v.mkdir(parent: root, name: "d", mode: 0o755, owner: .root)
            _ = try v.mknod(parent: first.ino, name: "f", mode: 0o100644, rdev: 0, owner: .root)
            try v.unlink(parent: first.ino, name: "f")
            try v.rmdir(parent: root, name: "d")
            let second = try v.mkdir(parent: root, name: "d", mode: 0o755, owner: .root)
            try #require(second.ino == first.ino, "libext2fs did not reuse inode \(first.ino): the test proves nothing")
            #expect(second.generation != first.generation, "directory inode \(second.ino) reused with generation \(second.generation)")
            #expect(try v.getattr(second.ino).generation == second.generation)
            // The directory still works (its block's checksum is seeded by the generation).
            let f = try v.mknod(parent: second.ino, name: "g", mode: 0o100644, rdev: 0, owner: .root)
            #expect(try v.lookup(parent: second.ino, name: "g").ino == f.ino)
        }
    }

    /// As for directories: ext2fs_symlink gives the inode no generation, so a symlink made where a
    /// removed one was had the same FUSE (nodeid, generation), and a kernel still holding the
    /// removed one could take the new one for it. Fast (in the inode) and slow (a block) targets.
    @Test(arguments: ["t", String(repeating: "long/", count: 20)])
    func reusedSymlinkInodeGetsANewGeneration(target: String) throws {
        try withImage { v, _ in
            let root = v.rootInode
            let first = try v.symlink(parent: root, name: "s", target: target, owner: .root)
            try v.unlink(parent: root, name: "s")
            let second = try v.symlink(parent: root, name: "s", target: target + "2", owner: .root)
            try #require(second.ino == first.ino, "libext2fs did not reuse inode \(first.ino): the test proves nothing")
            #expect(second.generation != first.generation, "symlink inode \(second.ino) reused with generation \(second.generation)")
            #expect(try v.getattr(second.ino).generation == second.generation)
            #expect(try v.readlink(second.ino) == target + "2")
        }
    }

    @Test func attributesXattrsAndSparseFiles() throws {
        try withImage { v, _ in
            let root = v.rootInode
            let f = try v.mknod(parent: root, name: "f", mode: 0o100644, rdev: 0, owner: .root)
            let t = Timestamp(seconds: 1_700_000_000, nanoseconds: 123_456_789)
            let after2038 = Timestamp(seconds: 4_000_000_000, nanoseconds: 5)
            var a = try v.setattr(f.ino, AttributeChanges(mode: 0o4750, uid: 70000, gid: 42, atime: .set(after2038), mtime: .set(t)))
            #expect(a.mode == 0o104750 && a.uid == 70000 && a.gid == 42 && a.mtime == t && a.atime == after2038)
            a = try v.setattr(f.ino, AttributeChanges(size: 1 << 20))
            #expect(a.size == 1 << 20 && a.blocks == 0, "truncate up leaves a hole")

            try v.setxattr(f.ino, name: "user.color", value: Array("blue".utf8), flags: [])
            try v.setxattr(f.ino, name: "security.capability", value: [1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], flags: [])
            #expect(try v.getxattr(f.ino, name: "user.color") == Array("blue".utf8))
            #expect(Set(try v.listxattr(f.ino)) == ["user.color", "security.capability"])
            #expect((#expect(throws: VolumeError.self) { try v.setxattr(f.ino, name: "user.color", value: [1], flags: .create) })?.errno == .fileExists)
            #expect((#expect(throws: VolumeError.self) { try v.setxattr(f.ino, name: "user.none", value: [1], flags: .replace) })?.errno == .noData)
            try v.removexattr(f.ino, name: "user.color")
            #expect((#expect(throws: VolumeError.self) { try v.getxattr(f.ino, name: "user.color") })?.errno == .noData)

            // fallocate, then punch a hole in the middle.
            try v.fallocate(f.ino, mode: .keepSize, offset: 0, length: 1 << 20)
            let data = [UInt8](repeating: 0x5A, count: 1 << 20)
            _ = try data.withUnsafeBytes { try v.write(f.ino, at: 0, from: $0) }
            try v.fallocate(f.ino, mode: [.punchHole, .keepSize], offset: 4096 + 100, length: 3 * 4096)
            var back = [UInt8](repeating: 1, count: 5 * 4096)
            _ = try back.withUnsafeMutableBytes { try v.read(f.ino, at: 0, into: $0) }
            #expect(back[0..<4196].allSatisfy { $0 == 0x5A })
            #expect(back[4196..<(4096 + 100 + 3 * 4096)].allSatisfy { $0 == 0 })
            #expect(back[(4096 + 100 + 3 * 4096)...].allSatisfy { $0 == 0x5A })
            #expect(try v.seek(f.ino, from: 4096 + 100, to: .hole) == 2 * 4096)
            let st = try v.statfs()
            #expect(st.blockSize == 4096 && st.freeBlocks > 0 && st.availableBlocks <= st.freeBlocks)
        }
    }

    /// getxattr answers ENODATA from the inode alone when it holds no attributes (no EA block, no
    /// in-inode EA header): the kernel asks for security.capability before every write(2). Attributes
    /// kept in the inode, in an EA block, or in both must still be found, and none once removed.
    @Test func getxattrFindsAttributesInTheInodeAndInTheBlock() throws {
        try withImage { v, _ in
            let f = try v.mknod(parent: v.rootInode, name: "f", mode: 0o100644, rdev: 0, owner: .root)
            #expect((#expect(throws: VolumeError.self) { try v.getxattr(f.ino, name: "security.capability") })?.errno == .noData)
            try v.setxattr(f.ino, name: "user.small", value: [1, 2, 3], flags: [])
            #expect(try v.getxattr(f.ino, name: "user.small") == [1, 2, 3])
            let big = [UInt8](repeating: 9, count: 2000)
            try v.setxattr(f.ino, name: "user.big", value: big, flags: [])
            #expect(try v.getxattr(f.ino, name: "user.big") == big)
            try v.removexattr(f.ino, name: "user.small")
            #expect(try v.getxattr(f.ino, name: "user.big") == big, "an attribute in the EA block alone")
            try v.removexattr(f.ino, name: "user.big")
            #expect((#expect(throws: VolumeError.self) { try v.getxattr(f.ino, name: "user.big") })?.errno == .noData)
            #expect(try v.listxattr(f.ino).isEmpty)
        }
    }

    /// An inode known to hold no attribute answers getxattr without the volume's lock (the kernel
    /// asks for `security.capability` before every write(2), while WRITEs hold that lock), and
    /// stops being known so the moment an attribute is set: the kernel's removal of a file
    /// capability on write depends on it.
    @Test func getxattrOfAnAttributeFreeInodeDoesNotWaitForTheVolumeLock() throws {
        try withImage { v, _ in
            let f = try v.mknod(parent: v.rootInode, name: "f", mode: 0o100644, rdev: 0, owner: .root)
            // The first answer reads the inode, under the lock, and remembers it.
            #expect((#expect(throws: VolumeError.self) { try v.getxattr(f.ino, name: "security.capability") })?.errno == .noData)
            let answered = DispatchSemaphore(value: 0)
            let errno = Mutex<Errno?>(nil)
            v.lock.lock()
            Thread {
                do throws(VolumeError) { _ = try v.getxattr(f.ino, name: "security.capability") } catch { errno.withLock { $0 = error.errno } }
                answered.signal()
            }.start()
            let inTime = answered.wait(timeout: .now() + 5) == .success
            v.lock.unlock()
            if !inTime { answered.wait() }
            #expect(inTime, "getxattr waited for the volume's lock")
            #expect(errno.withLock { $0 } == .noData)
            // Setting an attribute ends it, before the setxattr returns.
            let cap: [UInt8] = [1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
            try v.setxattr(f.ino, name: "security.capability", value: cap, flags: [])
            #expect(try v.getxattr(f.ino, name: "security.capability") == cap)
            try v.removexattr(f.ino, name: "security.capability")
            #expect((#expect(throws: VolumeError.self) { try v.getxattr(f.ino, name: "security.capability") })?.errno == .noData)
            // So does any other attribute.
            try v.setxattr(f.ino, name: "user.k", value: [1], flags: [])
            #expect(try v.getxattr(f.ino, name: "user.k") == [1])
        }
    }

    /// The same with the attributes written by kernel ext4 (a loop mount): a small one the kernel
    /// keeps in the inode, a large one in an EA block, security.capability alone in the inode.
    @Test(.enabled(if: Host.isRoot && FileManager.default.fileExists(atPath: "/dev/loop-control"), "needs root and loop devices"))
    func getxattrFindsWhatKernelExt4Wrote() throws {
        let dir = TempDir()
        let image = dir.path + "/fs.img", mnt = dir.path + "/mnt"
        try E2fsprogs.mkfs(image, size: 64 << 20)
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let m = try Oracle.run("/bin/mount", ["-o", "loop", image, mnt])
        try #require(m.status == 0, "\(m.stderr)")
        var mounted = true
        defer { if mounted { _ = try? Oracle.run("/bin/umount", [mnt]) } }
        let cap: [UInt8] = [1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        let big = [UInt8](repeating: 7, count: 3000)
        let files: [(String, [(String, [UInt8])])] = [("small", [("user.k", [1, 2])]), ("big", [("user.big", big)]),
                                                      ("both", [("user.k", [5]), ("user.big", big)]),
                                                      ("cap", [("security.capability", cap)]), ("none", [])]
        // sys/xattr.h is not in the Glibc module: setxattr(2) through dlsym.
        typealias SetXattr = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafeRawPointer?, Int, Int32) -> Int32
        let setxattr = unsafeBitCast(try #require(dlsym(UnsafeMutableRawPointer(bitPattern: 0), "setxattr")), to: SetXattr.self)
        for (file, attrs) in files {
            try #require(FileManager.default.createFile(atPath: mnt + "/" + file, contents: Data([1])))
            for (name, value) in attrs {
                let rc = value.withUnsafeBytes { setxattr(mnt + "/" + file, name, $0.baseAddress, $0.count, 0) }
                try #require(rc == 0, "setxattr \(name) on \(file): errno \(errno)")
            }
        }
        let u = try Oracle.run("/bin/umount", [mnt])
        try #require(u.status == 0, "\(u.stderr)")
        mounted = false
        let v = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: true, logger: quietLogger)
        defer { try? v.close() }
        func ino(_ name: String) throws -> UInt64 { try v.lookup(parent: v.rootInode, name: name).ino }
        #expect(try v.getxattr(ino("small"), name: "user.k") == [1, 2])
        #expect(try v.getxattr(ino("big"), name: "user.big") == big)
        #expect(try v.getxattr(ino("both"), name: "user.k") == [5])
        #expect(try v.getxattr(ino("both"), name: "user.big") == big)
        #expect(try v.getxattr(ino("cap"), name: "security.capability") == cap)
        for (file, name) in [("none", "security.capability"), ("small", "security.capability"), ("big", "user.k")] {
            #expect((#expect(throws: VolumeError.self) { try v.getxattr(ino(file), name: name) })?.errno == .noData, "\(file) \(name)")
        }
    }

    @Test func unlinkedOpenFileLivesUntilRelease() throws {
        try withImage { v, _ in
            let f = try v.mknod(parent: v.rootInode, name: "tmp", mode: 0o100600, rdev: 0, owner: .root)
            _ = try [UInt8](repeating: 7, count: 100_000).withUnsafeBytes { try v.write(f.ino, at: 0, from: $0) }
            let freeBefore = try v.statfs().freeBlocks
            try v.open(f.ino)
            try v.unlink(parent: v.rootInode, name: "tmp")
            var b = [UInt8](repeating: 0, count: 10)
            #expect(try b.withUnsafeMutableBytes { try v.read(f.ino, at: 0, into: $0) } == 10 && b[9] == 7)
            v.release(f.ino)
            #expect(throws: VolumeError.self) { try v.getattr(f.ino) }
            #expect(try v.statfs().freeBlocks > freeBefore)
        }
    }

    /// A kernel's reference (`remember`, from a FUSE server that sees no opens) keeps an unlinked
    /// inode as an open handle does; it goes at the last of `forget` and `release`, in either order.
    @Test func unlinkedRememberedFileLivesUntilForget() throws {
        try withImage { v, _ in
            let f = try v.mknod(parent: v.rootInode, name: "tmp", mode: 0o100600, rdev: 0, owner: .root)
            _ = try [UInt8](repeating: 7, count: 100_000).withUnsafeBytes { try v.write(f.ino, at: 0, from: $0) }
            let freeBefore = try v.statfs().freeBlocks
            v.remember(f.ino)
            v.remember(f.ino)   // two mounts of the volume
            try v.open(f.ino)
            try v.unlink(parent: v.rootInode, name: "tmp")
            v.release(f.ino)
            var b = [UInt8](repeating: 0, count: 10)
            #expect(try b.withUnsafeMutableBytes { try v.read(f.ino, at: 0, into: $0) } == 10 && b[9] == 7, "held after the release")
            v.forget(f.ino)
            #expect(try v.statfs().freeBlocks == freeBefore, "still held by the second mount")
            _ = try [UInt8](repeating: 8, count: 10).withUnsafeBytes { try v.write(f.ino, at: 100_000, from: $0) }
            v.forget(f.ino)
            #expect(throws: VolumeError.self) { try v.getattr(f.ino) }
            #expect(try v.statfs().freeBlocks > freeBefore)
            // A forget without a remember (a FUSE server that sees opens) changes nothing.
            let g = try v.mknod(parent: v.rootInode, name: "g", mode: 0o100600, rdev: 0, owner: .root)
            v.forget(g.ino)
            #expect(try v.getattr(g.ino).nlink == 1)
            // Not held, not open: freed by the unlink itself.
            try v.unlink(parent: v.rootInode, name: "g")
            #expect(throws: VolumeError.self) { try v.getattr(g.ino) }
        }
    }

    /// Unaligned writes into blocks another file freed: the uncovered parts read as zeros, never the old bytes.
    @Test func unalignedWritesNeverExposeFreedBlocks() throws {
        try withImage { v, _ in
            let old = try v.mknod(parent: v.rootInode, name: "old", mode: 0o100644, rdev: 0, owner: .root)
            _ = try [UInt8](repeating: 0xEE, count: 1 << 20).withUnsafeBytes { try v.write(old.ino, at: 0, from: $0) }
            try v.unlink(parent: v.rootInode, name: "old")
            let f = try v.mknod(parent: v.rootInode, name: "new", mode: 0o100644, rdev: 0, owner: .root)
            _ = try [UInt8](repeating: 0x11, count: 10_000).withUnsafeBytes { try v.write(f.ino, at: 3000, from: $0) }
            _ = try [UInt8](repeating: 0x22, count: 9000).withUnsafeBytes { try v.write(f.ino, at: 40_000, from: $0) }
            var back = [UInt8](repeating: 0xFF, count: 49_000)
            #expect(try back.withUnsafeMutableBytes { try v.read(f.ino, at: 0, into: $0) } == 49_000)
            #expect(back[0..<3000].allSatisfy { $0 == 0 })
            #expect(back[3000..<13_000].allSatisfy { $0 == 0x11 })
            #expect(back[13_000..<40_000].allSatisfy { $0 == 0 })
            #expect(back[40_000...].allSatisfy { $0 == 0x22 })
        }
    }

    /// Reads do their device I/O outside the volume lock. While one thread reads a file whose
    /// bytes never change, another frees blocks and reuses them for other files (write, truncate,
    /// unlink, write again): the reader must never see anything but its file's bytes. Holes and
    /// the tail past EOF read as zeros.
    @Test func unlockedReadsNeverSeeReusedBlocks() throws {
        try withImage { v, _ in
            let stable = try v.mknod(parent: v.rootInode, name: "stable", mode: 0o100644, rdev: 0, owner: .root)
            var pattern = [UInt8](repeating: 0, count: 4 << 20)
            for i in pattern.indices { pattern[i] = UInt8(truncatingIfNeeded: i / 4096 &* 31 &+ 7) | 1 }
            _ = try pattern.withUnsafeBytes { try v.write(stable.ino, at: 0, from: $0) }
            // A hole, then more data: the runs mix device reads and zero fills.
            _ = try pattern[0..<(1 << 20)].withUnsafeBytes { try v.write(stable.ino, at: 6 << 20, from: $0) }
            final class Flag: Sendable { let stop = Atomic<Bool>(false) }
            let done = Flag()
            let churn = Thread {
                var n = 0
                let junk = [UInt8](repeating: 0, count: 1 << 20)
                while !done.stop.load(ordering: .relaxed) {
                    let name = "churn\(n % 3)"
                    if let f = try? v.mknod(parent: v.rootInode, name: name, mode: 0o100644, rdev: 0, owner: .root) {
                        _ = try? junk.withUnsafeBytes { try v.write(f.ino, at: 0, from: $0) }
                        var c = AttributeChanges()
                        c.size = 4096
                        _ = try? v.setattr(f.ino, c)
                    }
                    try? v.unlink(parent: v.rootInode, name: "churn\((n + 1) % 3)")
                    n += 1
                }
            }
            churn.start()
            defer { done.stop.store(true, ordering: .relaxed) }
            var buffer = [UInt8](repeating: 0xFF, count: 1 << 20)
            for round in 0..<200 {
                let offset = UInt64(round % 7) << 20   // 0-3 MiB data, 4-5 MiB a hole, 6 MiB data
                let got = try buffer.withUnsafeMutableBytes { try v.read(stable.ino, at: offset, into: $0) }
                #expect(got == 1 << 20)
                let expected: ArraySlice<UInt8> = offset < 4 << 20 ? pattern[Int(offset)..<Int(offset + (1 << 20))]
                    : offset == 6 << 20 ? pattern[0..<(1 << 20)] : ArraySlice(repeating: 0, count: 1 << 20)
                if !buffer.elementsEqual(expected) {
                    Issue.record("read \(round) at \(offset) returned bytes that are not the file's")
                    break
                }
            }
            done.stop.store(true, ordering: .relaxed)
            while !churn.isFinished { usleep(1000) }
        }
    }

    @Test func readOnlyVolumeRefusesWrites() throws {
        let dir = TempDir()
        let image = dir.path + "/fs.img"
        try E2fsprogs.mkfs(image, size: 16 << 20)
        let before = try Data(contentsOf: URL(fileURLWithPath: image))
        let v = try Volume(device: FileBlockDevice(path: FilePath(image), readOnly: true), readOnly: true, logger: quietLogger)
        #expect((#expect(throws: VolumeError.self) { try v.mkdir(parent: v.rootInode, name: "x", mode: 0o755, owner: .root) })?.errno == .readOnlyFileSystem)
        #expect(try v.lookup(parent: v.rootInode, name: "lost+found").isDirectory)
        try v.close()
        #expect(try Data(contentsOf: URL(fileURLWithPath: image)) == before)
    }

    @Test func notAnExt4IsRefusedClearly() throws {
        let dir = TempDir()
        let path = dir.file("zeros", size: 8 << 20)
        let e = #expect(throws: VolumeError.self) { try Volume(device: FileBlockDevice(path: FilePath(path)), readOnly: true, logger: quietLogger) }
        #expect(e.map { "\($0)" }?.contains("no ext4 filesystem") == true)
    }

    /// The whole path on a thin device: format, write through libext2fs, commit, and the pool and the filesystem both check clean.
    @Test(.enabled(if: Oracle.available)) func volumeOnAThinDevice() throws {
        let dir = TempDir()
        // A pool smaller than the filesystem, so that statfs's cap by the pool binds.
        let pool = try UserspaceThinPool.create(dataPath: dir.path + "/data", metadataPath: dir.path + "/metadata", dataSize: 128 << 20,
                                                metadataSize: 16 << 20, blockSize: 64 << 10, logger: quietLogger)
        try pool.message(.createThin(1))
        let size: UInt64 = 256 << 20
        _ = try DeviceFormatter(logger: quietLogger).format(pool: pool, id: 1, size: size, scratchDirectory: dir.path + "/tmp")
        do {
            let v = try Volume(device: pool.openDevice(1, size: size), readOnly: false, logger: quietLogger)
            let d = try v.mkdir(parent: v.rootInode, name: "data", mode: 0o755, owner: .root)
            for i in 0..<200 {
                let f = try v.mknod(parent: d.ino, name: "file-\(i)", mode: 0o100644, rdev: 0, owner: .root)
                _ = try [UInt8](repeating: UInt8(i), count: 5000 + i).withUnsafeBytes { try v.write(f.ino, at: 0, from: $0) }
            }
            let st = try v.statfs()
            let status = try pool.status()
            let poolFree = (status.totalDataBlocks - status.usedDataBlocks) * status.dataBlockSize
            #expect(st.blocks * st.blockSize == size && poolFree < 128 << 20)
            // Available space leaves out the reserve only the filesystem's metadata may use.
            let reserve = UserspaceThinPool.reservedDataBlocks(nrDataBlocks: status.totalDataBlocks, blockSize: status.dataBlockSize) * status.dataBlockSize
            #expect(reserve > 0 && poolFree > reserve)
            #expect(st.availableBlocks == (poolFree - reserve) / st.blockSize && st.freeBlocks == poolFree / st.blockSize,
                    "statfs is capped by the pool's free space: \(st.availableBlocks) blocks available, \(st.freeBlocks) free, the pool has \(poolFree) bytes, \(reserve) of them reserved")
            try v.close()
        }
        // Snapshot, change the origin, and read the snapshot's untouched file back.
        try pool.message(.createSnap(2, origin: 1))
        do {
            let v = try Volume(device: pool.openDevice(1, size: size), readOnly: false, logger: quietLogger)
            let d = try v.lookup(parent: v.rootInode, name: "data")
            try v.unlink(parent: d.ino, name: "file-7")
            try v.close()
        }
        let snap = try Volume(device: pool.openDevice(2, size: size), readOnly: true, logger: quietLogger)
        let d = try snap.lookup(parent: snap.rootInode, name: "data")
        let f7 = try snap.lookup(parent: d.ino, name: "file-7")
        var b = [UInt8](repeating: 0, count: 5007)
        #expect(try b.withUnsafeMutableBytes { try snap.read(f7.ino, at: 0, into: $0) } == 5007 && b.allSatisfy { $0 == 7 })
        try snap.close()
        try pool.commit()
        try Oracle.check(dir.path + "/metadata")
        for id: ThinDeviceID in [1, 2] {
            let image = dir.path + "/dev\(id).img"
            let dev = try pool.openDevice(id, size: size)
            let out = try FileBlockDevice.create(path: FilePath(image), size: size)
            try dev.copy(to: out, length: size)
            try E2fsprogs.check(image)
        }
    }
}
