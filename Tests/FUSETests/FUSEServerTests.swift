import Foundation
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS
@testable import ThinFSFUSE
@testable import ThinFSCore
#if canImport(Glibc)
import Glibc
#endif

/// The FUSE server over an in-memory volume, through real syscalls on a real mount.
@Suite("FUSE server", .enabled(if: Host.canMountFUSE, "needs /dev/fuse and root"))
struct FUSEServerTests {
    @Test func filesDirectoriesAndLinks() throws {
        try TestMount.with { m in
            let v = m.volume
            let a = m.file("a")
            #expect(Sys.writeFile(a, Array("hello".utf8)) == 0)
            #expect(Sys.readFile(a) == Array("hello".utf8))
            let ino = try #require(v.inode("a"))
            #expect(v.contents(ino) == Array("hello".utf8), "close flushes the writeback cache to the volume")
            let (rc, st) = Sys.attributes(a)
            #expect(rc == 0)
            #expect(st.st_ino == ino && st.st_size == 5 && st.st_mode & S_IFMT == S_IFREG)
            #expect(v.record.opens[ino, default: 0] == 0, "every open was released (none counted with opens in the kernel)")

            // ENOENT and EEXIST
            #expect(Sys.attributes(m.file("missing")).0 == ENOENT)
            #expect(LibC.check(unlink(m.file("missing"))) == ENOENT)
            #expect(LibC.check(mkdir(m.file("d"), 0o755)) == 0)
            #expect(LibC.check(mkdir(m.file("d"), 0o755)) == EEXIST)
            let fd = open(a, O_WRONLY | O_CREAT | O_EXCL, 0o644)
            #expect(fd == -1 && errno == EEXIST)

            // Symlinks and hard links across directories
            #expect(LibC.check(symlink("a", m.file("s"))) == 0)
            var target = [CChar](repeating: 0, count: 64)
            #expect(Glibc.readlink(m.file("s"), &target, 64) == 1)
            #expect(v.record.calls["symlink"] == 1)
            #expect(LibC.check(link(a, m.file("d/h"))) == 0)
            #expect(Sys.attributes(a).1.st_nlink == 2)
            #expect(Sys.attributes(m.file("d/h")).1.st_ino == ino)

            // ENOTEMPTY, then the directory empties and goes
            #expect(LibC.check(rmdir(m.file("d"))) == ENOTEMPTY)
            #expect(LibC.check(unlink(m.file("d/h"))) == 0)
            #expect(LibC.check(rmdir(m.file("d"))) == 0)
            #expect(Sys.attributes(m.file("d")).0 == ENOENT)
            #expect(Sys.attributes(a).1.st_nlink == 1)

            // setattr: mode, owner, times (explicit and UTIME_NOW), size
            #expect(LibC.check(chmod(a, 0o600)) == 0)
            #expect(LibC.check(chown(a, 1234, 5678)) == 0)
            var times = [timespec(tv_sec: 1_000_000_000, tv_nsec: 0), timespec(tv_sec: 1_000_000_000, tv_nsec: 123_456_789)]
            times[0].tv_nsec = LibC.utimeNow
            #expect(LibC.check(utimensat(AT_FDCWD, a, &times, 0)) == 0)
            let after = try v.getattr(ino)
            #expect(after.mode & 0o7777 == 0o600 && after.uid == 1234 && after.gid == 5678)
            #expect(after.mtime == Timestamp(seconds: 1_000_000_000, nanoseconds: 123_456_789))
            #expect(after.atime.seconds > 1_600_000_000, "UTIME_NOW reached the volume as .now")
            #expect(LibC.check(truncate(a, 2)) == 0)
            #expect(try v.getattr(ino).size == 2 && Sys.readFile(a) == Array("he".utf8))

            // A fifo through mknod
            #expect(LibC.check(mkfifo(m.file("p"), 0o644)) == 0)
            let fifo = try #require(v.inode("p"))
            #expect(try v.getattr(fifo).mode & S_IFMT == S_IFIFO)

            // statfs
            var sv = statvfs()
            #expect(LibC.check(statvfs(m.path, &sv)) == 0)
            #expect(sv.f_bsize == 4096 && sv.f_blocks == 1 << 20 && sv.f_bavail == 1 << 18 && sv.f_namemax == 255)

            // fsync and fsyncdir reach the volume
            let f = open(a, O_RDWR)
            #expect(LibC.check(fsync(f)) == 0)
            close(f)
            let dfd = open(m.path, O_RDONLY | O_DIRECTORY)
            #expect(LibC.check(fsync(dfd)) == 0)
            close(dfd)
            #expect(v.record.fsyncs.contains(ino))
            #expect(v.record.fsyncs.contains(v.rootInode), "fsyncdir of FUSE's root is the volume's root inode")
        }
    }

    @Test func renameFlags() throws {
        try TestMount.with { m in
            for (name, text) in [("a", "A"), ("b", "B"), ("x", "X"), ("y", "Y")] {
                #expect(Sys.writeFile(m.file(name), Array(text.utf8)) == 0)
            }
            #expect(LibC.rename(m.file("a"), m.file("b"), flags: LibC.renameNoReplace) == EEXIST)
            #expect(LibC.rename(m.file("a"), m.file("c"), flags: LibC.renameNoReplace) == 0)
            #expect(LibC.rename(m.file("x"), m.file("y"), flags: LibC.renameExchange) == 0)
            #expect(Sys.readFile(m.file("x")) == Array("Y".utf8) && Sys.readFile(m.file("y")) == Array("X".utf8))
            #expect(LibC.rename(m.file("x"), m.file("nothere"), flags: LibC.renameExchange) == ENOENT)
            // RENAME_WHITEOUT reaches the server, which knows only NOREPLACE and EXCHANGE.
            #expect(LibC.rename(m.file("x"), m.file("w"), flags: LibC.renameWhiteout) == EINVAL)
            // Plain rename over an existing file replaces it.
            #expect(LibC.rename(m.file("c"), m.file("b"), flags: 0) == 0)
            #expect(Sys.readFile(m.file("b")) == Array("A".utf8) && Sys.attributes(m.file("c")).0 == ENOENT)
            // Over a non-empty directory: ENOTEMPTY; over an empty one: fine.
            #expect(LibC.check(mkdir(m.file("d1"), 0o755)) == 0 && LibC.check(mkdir(m.file("d2"), 0o755)) == 0)
            #expect(Sys.writeFile(m.file("d2/f"), [1]) == 0)
            #expect(LibC.rename(m.file("d1"), m.file("d2"), flags: 0) == ENOTEMPTY)
            #expect(LibC.rename(m.file("d2"), m.file("d1"), flags: 0) == 0)
            #expect(Sys.readFile(m.file("d1/f")) == [1])
            #expect(m.volume.names(in: m.volume.rootInode).sorted() == ["b", "d1", "x", "y"])
        }
    }

    @Test func extendedAttributes() throws {
        try TestMount.with { m in
            let a = m.file("a")
            #expect(Sys.writeFile(a, [1, 2, 3]) == 0)
            let ino = try #require(m.volume.inode("a"))
            #expect(LibC.setxattr(a, "user.color", Array("blue".utf8)) == 0)
            #expect(try LibC.getxattr(a, "user.color", size: 0).get().count == 4, "a size-0 probe returns the length")
            #expect(LibC.getxattr(a, "user.color", size: 2) == .failure(Errno(rawValue: ERANGE)))
            #expect(LibC.getxattr(a, "user.color", size: 64) == .success(Array("blue".utf8)))
            #expect(LibC.setxattr(a, "user.color", [1], flags: LibC.xattrCreate) == EEXIST)
            #expect(LibC.setxattr(a, "user.size", [1], flags: LibC.xattrReplace) == ENODATA)
            #expect(LibC.setxattr(a, "user.size", Array("big".utf8)) == 0)
            #expect(LibC.listxattr(a) == ["user.color", "user.size"])
            #expect(m.volume.xattrs(ino)["user.size"] == Array("big".utf8))
            #expect(LibC.removexattr(a, "user.color") == 0)
            #expect(LibC.getxattr(a, "user.color", size: 64) == .failure(Errno(rawValue: ENODATA)))
            #expect(LibC.removexattr(a, "user.color") == ENODATA)
            #expect(m.volume.xattrs(ino).keys.sorted() == ["user.size"])
        }
    }

    @Test func sparseFilesSeekAndFallocate() throws {
        try TestMount.with { m in
            let fd = open(m.file("sparse"), O_RDWR | O_CREAT, 0o644)
            #expect(fd >= 0)
            defer { close(fd) }
            let page = [UInt8](repeating: 7, count: 4096)
            #expect(page.withUnsafeBytes { pwrite(fd, $0.baseAddress, 4096, 0) } == 4096)
            #expect(page.withUnsafeBytes { pwrite(fd, $0.baseAddress, 4096, 1 << 20) } == 4096)
            #expect(LibC.check(fsync(fd)) == 0)
            #expect(lseek(fd, 0, LibC.seekHole) == 4096)
            #expect(lseek(fd, 4096, LibC.seekData) == 1 << 20)
            #expect(lseek(fd, (1 << 20) + 4096, LibC.seekData) == -1 && errno == ENXIO)
            // Punch the first page out: the first data is now at 1 MiB.
            #expect(LibC.fallocate(fd, mode: LibC.punchHole | LibC.keepSize, offset: 0, length: 4096) == 0)
            #expect(lseek(fd, 0, LibC.seekData) == 1 << 20)
            // Allocate past the end: mode 0 extends, KEEP_SIZE does not.
            #expect(LibC.fallocate(fd, mode: LibC.keepSize, offset: 3 << 20, length: 4096) == 0)
            var st = Glibc.stat()
            #expect(fstat(fd, &st) == 0 && st.st_size == (1 << 20) + 4096)
            #expect(LibC.fallocate(fd, mode: 0, offset: 2 << 20, length: 4096) == 0)
            #expect(fstat(fd, &st) == 0 && st.st_size == (2 << 20) + 4096)
            #expect(m.volume.record.calls["seek", default: 0] >= 4 && m.volume.record.calls["fallocate"] == 3)
        }
    }

    /// O_TMPFILE is an accepted difference (README): the kernel sends FUSE_TMPFILE (opcode 51),
    /// libfuse 3.14 has no operation for it and answers ENOSYS, and the kernel turns that into
    /// EOPNOTSUPP, the errno programs (glibc's tmpfile, systemd, nix) take as "fall back to a
    /// named file". This pins that errno; the server is never asked.
    @Test func tmpfileIsNotSupported() throws {
        try TestMount.with { m in
            let fd = open(m.path, LibC.tmpfile | O_RDWR, 0o600)
            let e = errno
            if fd >= 0 { close(fd) }
            #expect(fd == -1 && e == EOPNOTSUPP, "errno \(e)")
            #expect(m.volume.record.calls["mknod", default: 0] == 0, "nothing was created")
        }
    }

    @Test func oneMebibyteReadsAndWrites() throws {
        let v = MemoryVolume()
        // Seeded beside the kernel, so the first read has to come from the server.
        let cold = (0..<(4 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 13) }
        let coldIno = try v.seed(name: "cold", data: cold)
        try TestMount.with(v) { m in
            let chunk = 1 << 20
            let data = (0..<(4 << 20)).map { UInt8(truncatingIfNeeded: $0 / 4096 &+ $0) }
            let fd = open(m.file("big"), O_RDWR | O_CREAT, 0o644)
            #expect(fd >= 0)
            for i in 0..<4 {
                #expect(data.withUnsafeBytes { pwrite(fd, $0.baseAddress! + i * chunk, chunk, off_t(i * chunk)) } == chunk)
            }
            #expect(LibC.check(fsync(fd)) == 0)
            close(fd)
            #expect(v.record.maxWrite == chunk, "the kernel sends max_write (1 MiB) requests")
            let bigIno = try #require(v.inode("big"))
            #expect(v.contents(bigIno) == data)

            let rfd = open(m.file("cold"), O_RDONLY)
            #expect(rfd >= 0)
            var back = [UInt8](repeating: 0, count: cold.count)
            for i in 0..<4 {
                #expect(back.withUnsafeMutableBytes { pread(rfd, $0.baseAddress! + i * chunk, chunk, off_t(i * chunk)) } == chunk)
            }
            close(rfd)
            #expect(back == cold)
            #expect(v.record.maxRead == chunk, "1 MiB reads (max_read, max_pages and the raised read-ahead)")
            #expect(v.record.opens[coldIno, default: 0] == 0)
        }
    }

    @Test func tenThousandEntriesInCookieOrder() throws {
        let v = MemoryVolume()
        var rng = SeededRandom(seed: 42)
        // Insertion (cookie) order differs from name order, so a sorted listing would be caught.
        let names = (0..<10_000).map { "entry-\($0)" }.shuffled(using: &rng)
        let dir = try v.seedDirectory("big", entries: names)
        try TestMount.with(v) { m in
            let listing = try #require(Sys.readdir(m.file("big")))
            #expect(listing.count == 10_002)
            #expect(listing == [".", ".."] + names, "every entry, in cookie order")
            #expect(m.server.lookupCount(dir) == 1, "the path lookup only: '.' in READDIRPLUS is not a lookup")
            // The first READDIRPLUS (at offset 0) handed out lookups; each entry counts once.
            let counts = names.compactMap { v.inode("big/\($0)") }.map { m.server.lookupCount($0) }
            #expect(counts.contains(1))
            #expect(counts.allSatisfy { $0 <= 1 })
        }
    }

    @Test func forgetReachesTheVolumeAtZeroLookups() throws {
        try TestMount.with { m in
            #expect(Sys.writeFile(m.file("doomed"), [1]) == 0)
            let ino = try #require(m.volume.inode("doomed"))
            #expect(m.server.lookupCount(ino) == 1)
            #expect(!m.volume.record.forgotten.contains(ino))
            #expect(LibC.check(unlink(m.file("doomed"))) == 0)
            #expect(eventually { m.volume.record.forgotten.contains(ino) }, "the kernel's FORGET reached the volume")
            #expect(m.server.lookupCount(ino) == 0)
        }
    }

    @Test func readOnlyMountRefusesEveryChange() throws {
        let v = MemoryVolume()
        let ino = try v.seed(name: "a", data: Array("data".utf8))
        _ = try v.seedDirectory("d", entries: ["x"])
        try TestMount.with(v, readOnly: true) { m in
            let a = m.file("a")
            #expect(Sys.readFile(a) == Array("data".utf8))
            #expect(Sys.readdir(m.file("d")) == [".", "..", "x"])
            // Each modifying call fails with EROFS (the kernel's ro flag or the server: both say EROFS).
            let fd = open(a, O_WRONLY)
            #expect(fd == -1 && errno == EROFS)
            let created = open(m.file("new"), O_WRONLY | O_CREAT, 0o644)
            #expect(created == -1 && errno == EROFS)
            #expect(LibC.check(mkdir(m.file("n"), 0o755)) == EROFS)
            #expect(LibC.check(unlink(a)) == EROFS)
            #expect(LibC.check(rmdir(m.file("d"))) == EROFS)
            #expect(LibC.rename(a, m.file("b"), flags: 0) == EROFS)
            #expect(LibC.check(symlink("a", m.file("s"))) == EROFS)
            #expect(LibC.check(link(a, m.file("h"))) == EROFS)
            #expect(LibC.check(chmod(a, 0o600)) == EROFS)
            #expect(LibC.check(truncate(a, 0)) == EROFS)
            #expect(LibC.setxattr(a, "user.x", [1]) == EROFS)
            #expect(LibC.removexattr(a, "user.x") == EROFS)
            #expect(v.modifyingCalls == 0, "nothing modifying reached the volume")
            #expect(v.contents(ino) == Array("data".utf8))
        }
        #expect(v.record.fsyncs.isEmpty, "a read-only mount never commits")
    }

    @Test func stopUnmountsFlushesAndCommitsLast() throws {
        let v = MemoryVolume()
        let m = try TestMount(volume: v)
        defer {
            m.tearDown()
            #expect(!Host.isMounted(m.path))
        }
        // Written but not fsynced: the pages sit in the kernel's writeback cache.
        #expect(Sys.writeFile(m.file("pending"), [UInt8](repeating: 9, count: 100_000)) == 0)
        let fd = open(m.file("open-while-stopping"), O_WRONLY | O_CREAT, 0o644)
        #expect(fd >= 0)
        close(fd)
        // As the SIGTERM source does: stop() from another thread while the loop runs.
        DispatchQueue.global().async { m.server.stop() }
        #expect(m.waitForExit(seconds: 10), "the session loop returned")
        #expect(!Host.isMounted(m.path))
        #expect(v.record.lastCall == "fsync" && v.record.fsyncs.last == .some(nil), "the final commit comes last")
        let pending = try #require(v.inode("pending"))
        #expect(v.contents(pending) == [UInt8](repeating: 9, count: 100_000))
    }

    @Test func periodicCommitsOnlyAfterChanges() throws {
        try TestMount.with(commitInterval: .milliseconds(200)) { m in
            usleep(500_000)
            #expect(!m.volume.record.fsyncs.contains(nil), "an idle mount does not commit")
            #expect(Sys.writeFile(m.file("a"), [1, 2, 3]) == 0)
            #expect(eventually(2) { m.volume.record.fsyncs.contains(nil) }, "a change is committed within the interval")
            let commits = m.volume.record.fsyncs.filter { $0 == nil }.count
            usleep(700_000)
            #expect(m.volume.record.fsyncs.filter { $0 == nil }.count <= commits + 1, "and then the mount is idle again")
        }
    }

    @Test func mountpointErrorsNameTheMountpoint() throws {
        let dir = TempDir()
        let full = dir.path + "/full", file = dir.path + "/file", missing = dir.path + "/missing"
        mkdir(full, 0o755)
        _ = FileManager.default.createFile(atPath: full + "/x", contents: nil)
        _ = FileManager.default.createFile(atPath: file, contents: nil)
        func mountError(_ path: String, _ extra: [String] = []) -> FUSEServer.Error? {
            let s = FUSEServer(volume: MemoryVolume(), mountpoint: path, options: .init(extraOptions: extra), logger: quietLogger)
            do {
                try s.mount()
                s.stop()
                return nil
            } catch {
                return error
            }
        }
        guard case .notEmpty(let p)? = mountError(full) else { Issue.record("a non-empty mount point was accepted"); return }
        #expect(p.hasSuffix("/full") && "\(FUSEServer.Error.notEmpty(p))".contains(p))
        guard case .notADirectory? = mountError(file) else { Issue.record("a file was accepted as mount point"); return }
        guard case .mountpointMissing? = mountError(missing) else { Issue.record("a missing mount point was accepted"); return }
        try TestMount.with { m in
            guard case .busy(let p)? = mountError(m.path) else { Issue.record("a busy mount point was accepted"); return }
            #expect(p == m.path)
        }
        // nonempty lets a full directory through (the mount hides its contents).
        #expect(mountError(full, ["nonempty"]) == nil)
        #expect(!Host.isMounted(full))
    }
}

/// Pieces that need no mount.
@Suite("FUSE server, unprivileged")
struct FUSEServerUnitTests {
    @Test func mountOptions() {
        let everyone = MountAccess(allowOther: true, setuidAndDevices: false, warnings: [])
        let ownerOnly = MountAccess(allowOther: false, setuidAndDevices: false, warnings: [])
        let container = MountAccess(allowOther: true, setuidAndDevices: true, warnings: [])
        let rw = FUSEServer(volume: MemoryVolume(), mountpoint: "/x",
                            options: .init(source: "/var/lib/thinfs:7", extraOptions: ["noatime", "nonempty", "max_read=4096", "allow_other"]))
        #expect(rw.mountOptions(everyone) == ["default_permissions", "fsname=thinfs:/var/lib/thinfs:7", "subtype=thinfs", "max_read=1048576",
                                              "allow_other", "noatime"])
        #expect(rw.mountOptions(ownerOnly) == ["default_permissions", "fsname=thinfs:/var/lib/thinfs:7", "subtype=thinfs", "max_read=1048576",
                                               "noatime"], "an explicit allow_other does not override the decision")
        #expect(rw.mountOptions(container) == ["default_permissions", "fsname=thinfs:/var/lib/thinfs:7", "subtype=thinfs", "max_read=1048576",
                                               "allow_other", "suid", "dev", "noatime"])
        #expect(rw.cacheTimeout == 1)
        let ro = FUSEServer(volume: MemoryVolume(), mountpoint: "/x", options: .init(readOnly: true, source: "a,b", extraOptions: ["rw", "nosuid"]))
        #expect(ro.mountOptions(ownerOnly) == ["default_permissions", "fsname=thinfs:a\\,b", "subtype=thinfs", "max_read=1048576", "ro", "nosuid"])
        #expect(ro.cacheTimeout == 3600)
        let roVolume = FUSEServer(volume: MemoryVolume(readOnly: true), mountpoint: "/x")
        #expect(roVolume.mountOptions(everyone).contains("ro"), "a read-only volume makes a read-only mount")
        #expect(roVolume.options.allowOther && !roVolume.options.setuidAndDevices, "the defaults: everyone may enter; nosuid,nodev")
    }

    @Test func errnoMapping() {
        // Each case: the error, and the errno the kernel must see.
        let cases: [(any Error, Int32)] = [
            (VolumeError(.noSuchFileOrDirectory, "x"), ENOENT),         // passed through
            (VolumeError(.directoryNotEmpty, "x"), ENOTEMPTY),          // passed through
            (VolumeError(.init(rawValue: ENOSYS), "x"), EOPNOTSUPP),   // ENOSYS would disable the op for the mount
            (VolumeError(.init(rawValue: 0), "x"), EIO),                // no errno is no answer
            (CocoaError(.fileReadUnknown), EIO),                         // anything else is an I/O error
        ]
        for (error, code) in cases { #expect(FUSEServer.errnoCode(for: error) == code, "\(error)") }
    }

    @Test func mountTableParsing() {
        let text = """
            36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
            99 28 0:77 / /tmp/with\\040space rw,nosuid,nodev,relatime shared:1 - fuse.thinfs thinfs:/r:1 rw,user_id=0
            """
        let entries = MountTable.parse(text)
        #expect(entries.count == 2)
        #expect(entries[1].mountPoint == "/tmp/with space" && entries[1].type == "fuse.thinfs" && entries[1].source == "thinfs:/r:1")
        #expect(entries[1].device == .init(major: 0, minor: 77))
    }

    /// /proc/self/mountinfo is a seq_file: one read(2) returns about a page. Foundation's
    /// String(contentsOfFile:) stopped after that first read, so with a few dozen overlay mounts on
    /// the machine the later entries (layer-bench's last container) were missing, and `thinfs
    /// umount` called a mounted FUSE layer "not a mount point". The kernel's own mount(2) is the
    /// oracle: every tmpfs mounted here must be in the table, however long the table is.
    @Test func mountTableSeesEveryMountOfALongTable() throws {
        let dir = TempDir()
        var mounted: [String] = []
        defer { for p in mounted.reversed() { umount2(p, 0) } }
        for i in 0..<48 {
            let p = dir.path + "/a-long-mount-point-name-so-that-the-table-passes-a-page-\(i)"
            try #require(mkdir(p, 0o755) == 0)
            try #require(mount("tmpfs", p, "tmpfs", 0, "size=64k") == 0, "mount tmpfs on \(p): errno \(errno)")
            mounted.append(p)
        }
        let bytes = MountTable.current().reduce(0) { $0 + $1.mountPoint.utf8.count }
        // One read(2) of a seq_file returns about a page; the mount points alone must pass that.
        #expect(bytes > 4096, "the table's mount points alone span more than a page")
        let table = MountTable.current()
        for p in mounted {
            #expect(table.entry(at: p)?.type == "tmpfs", "\(p) is mounted but missing from MountTable.current()")
        }
    }
}
