import Foundation
import PersistentData
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// The same scripted steps, run through real syscalls on a thinfs FUSE mount
/// (libext2fs over a userspace thin device) and on kernel ext4 loop-mounted
/// from an image: every result and errno must match.
///
/// Accepted differences, also listed in the README:
/// - st_blocks and directory sizes are not compared: libext2fs and the kernel
///   allocate differently (the kernel keeps htree indexes and preallocates),
///   and neither is observable through file contents.
/// - times are compared only where a step sets them explicitly.
@Suite("FUSE against kernel ext4", .enabled(if: Host.canMountFUSE && FileManager.default.fileExists(atPath: "/dev/loop-control"),
                                          "needs root, /dev/fuse and loop devices"))
struct DifferentialTests {
    /// One line per step: what a step returned, with paths relative to the root.
    final class Log {
        var lines: [String] = []
        func add(_ s: String) { lines.append(s) }
    }

    /// Kernel ext4 on a loop-mounted image; unmounted (and the loop device auto-cleared) by `close`.
    final class KernelExt4 {
        let image: String
        let mountpoint: String
        init(dir: String, size: UInt64) throws {
            image = dir + "/kernel.img"
            mountpoint = dir + "/kernel"
            try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
            _ = FileManager.default.createFile(atPath: image, contents: nil)
            guard truncate(image, off_t(size)) == 0 else { throw VolumeError(.ioError, "truncate \(image)") }
            let mk = try Oracle.run("/sbin/mke2fs", ["-t", "ext4", "-F", "-q", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", image])
            guard mk.status == 0 else { throw VolumeError(.ioError, "mke2fs: \(mk.stderr)") }
            let m = try Oracle.run("/bin/mount", ["-o", "loop", image, mountpoint])
            guard m.status == 0 else { throw VolumeError(.ioError, "mount: \(m.stderr)") }
        }
        func close() {
            _ = try? Oracle.run("/bin/umount", [mountpoint])
        }
    }

    /// A thinfs mount of a fresh ext4 on a thin device, served in-process.
    final class ThinFSMount {
        let pool: UserspaceThinPool
        let volume: Volume
        let server: FUSEServer
        let thread: Thread
        let mountpoint: String
        init(dir: String, size: UInt64) throws {
            pool = try UserspaceThinPool.create(dataPath: dir + "/data", metadataPath: dir + "/metadata", dataSize: 2 << 30,
                                                metadataSize: 64 << 20, blockSize: 64 << 10, logger: quietLogger)
            try pool.message(.createThin(1))
            _ = try DeviceFormatter(logger: quietLogger).format(pool: pool, id: 1, size: size, scratchDirectory: dir + "/tmp")
            volume = try Volume(device: pool.openDevice(1, size: size), readOnly: false, logger: quietLogger)
            mountpoint = dir + "/thinfs"
            try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
            server = FUSEServer(volume: volume, mountpoint: mountpoint,
                                    options: .init(allowOther: true, source: "differential"), logger: quietLogger)
            try server.mount()
            let s = server
            thread = Thread { try? s.run() }
            thread.start()
        }
        func close() throws {
            server.stop()
            while Host.isMounted(mountpoint) { usleep(10_000) }
            try volume.close()
        }
    }

    @Test func scriptedStepsMatchKernelExt4() throws {
        let dir = TempDir()
        let size: UInt64 = 512 << 20
        let kernel = try KernelExt4(dir: dir.path, size: size)
        defer { kernel.close() }
        let thin = try ThinFSMount(dir: dir.path, size: size)
        var closed = false
        defer { if !closed { try? thin.close() } }

        let kernelLog = try Self.run(root: kernel.mountpoint)
        let thinLog = try Self.run(root: thin.mountpoint)
        #expect(kernelLog.count == thinLog.count)
        for (i, (k, t)) in zip(kernelLog, thinLog).enumerated() where k != t {
            Issue.record("step \(i): kernel ext4 says \(k), thinfs says \(t)")
        }
        #expect(kernelLog.count > 100, "the script ran")

        // After unmounting, the filesystem on the thin device checks clean, and so does the pool.
        try thin.close()
        closed = true
        try thin.pool.commit()
        let image = dir.path + "/thin.img"
        let out = try FileBlockDevice.create(path: FilePath(image), size: size)
        let dev = try thin.pool.openDevice(1, size: size)
        try dev.copy(to: out, length: size)
        let fsck = try Oracle.run("/sbin/e2fsck", ["-fn", image])
        #expect(fsck.status == 0, "\(fsck.stdout)")
        try Oracle.check(dir.path + "/metadata")
    }

    /// The one known difference in privilege clearing, pinned so that a kernel or libfuse that
    /// closes it fails here (and the README's entry is then removed): a write by a user outside
    /// the file's group to a set-group-ID file **without** group-execute. Kernel ext4 (6.2 and
    /// later, `setattr_should_drop_sgid`) clears set-group-ID; FUSE without HANDLE_KILLPRIV drops
    /// the mode the VFS computed, refreshes it, and clears set-group-ID only together with
    /// group-execute (`fuse_setattr`), so the daemon is never asked. With HANDLE_KILLPRIV the
    /// daemon would have to clear the bits on WRITE itself, which it cannot do correctly: a
    /// writeback WRITE does not carry the writer's CAP_FSETID or groups (README, "Accepted
    /// differences"). The cases beside it, with group-execute, and set-user-ID, match.
    @Test func setGroupIDWithoutGroupExecuteSurvivesANonMembersWrite() throws {
        let dir = TempDir()
        let size: UInt64 = 64 << 20
        let kernel = try KernelExt4(dir: dir.path, size: size)
        defer { kernel.close() }
        let thin = try ThinFSMount(dir: dir.path, size: size)
        defer { try? thin.close() }

        /// root:root files of these modes, appended to by uid/gid 1000 (in no group of root's):
        /// name, mode before, mode after.
        func modes(_ root: String) throws -> [String] {
            let cases = [("sg-noexec", 0o2666), ("sg-exec", 0o2676), ("su-sg-noexec", 0o6666), ("su", 0o4766)]
            for (name, mode) in cases {
                #expect(Self.create(root + "/" + name, Array("privileged".utf8)) == 0)
                #expect(chmod(root + "/" + name, mode_t(mode)) == 0)
            }
            let appended = try Self.asUser(root, cases.map { "echo x >> \($0.0) && echo ok" }.joined(separator: "; "))
            #expect(appended == Array(repeating: "ok", count: cases.count).joined(separator: "\n"), "uid 1000 appends: \(appended)")
            return cases.map { name, mode in
                var st = Glibc.stat()
                guard lstat(root + "/" + name, &st) == 0 else { return "\(name): \(Self.errnoName(errno))" }
                return "\(name) \(String(mode, radix: 8)) -> \(String(st.st_mode & 0o7777, radix: 8))"
            }
        }
        let kernelModes = try modes(kernel.mountpoint)
        let thinModes = try modes(thin.mountpoint)
        #expect(kernelModes == ["sg-noexec 2666 -> 666", "sg-exec 2676 -> 676", "su-sg-noexec 6666 -> 666", "su 4766 -> 766"],
                "kernel ext4 clears both bits on a non-member's write")
        #expect(thinModes == ["sg-noexec 2666 -> 2666", "sg-exec 2676 -> 676", "su-sg-noexec 6666 -> 2666", "su 4766 -> 766"],
                "thinfs keeps set-group-ID without group-execute (the accepted difference); if this fails with ext4's modes, drop the README entry")
    }

    /// fallocate(2)'s FALLOC_FL_ZERO_RANGE, and PUNCH_HOLE|KEEP_SIZE, against kernel ext4: ranges
    /// inside the file, across and past its end, with unaligned edges, with and without KEEP_SIZE,
    /// over bytes the daemon already holds (fsynced first) and bytes still dirty in the kernel's
    /// writeback cache. Every result, size and content must match; then the volume itself, opened
    /// again after the unmount, must hold what kernel ext4 shows, and e2fsck must find it clean.
    @Test func zeroRangeMatchesKernelExt4() throws {
        let dir = TempDir()
        let size: UInt64 = 256 << 20
        let kernel = try KernelExt4(dir: dir.path, size: size)
        defer { kernel.close() }
        let thin = try ThinFSMount(dir: dir.path, size: size)
        var closed = false
        defer { if !closed { try? thin.close() } }

        let kernelLog = Self.zeroRangeSteps(root: kernel.mountpoint)
        let thinLog = Self.zeroRangeSteps(root: thin.mountpoint)
        #expect(kernelLog.count == thinLog.count)
        for (k, t) in zip(kernelLog, thinLog) where k != t {
            Issue.record("kernel ext4 says \(k), thinfs says \(t)")
        }
        #expect(kernelLog.count == Self.zeroRangeCases.count * 2 * 6, "every step ran")

        // The kernel may have answered reads from its page cache: what the volume holds must match.
        try thin.close()
        closed = true
        try thin.pool.commit()
        let volume = try Volume(device: thin.pool.openDevice(1, size: size), readOnly: true, logger: quietLogger)
        defer { try? volume.close() }
        for name in Self.zeroRangeFileNames {
            let kernelBytes = FileManager.default.contents(atPath: kernel.mountpoint + "/" + name).map { [UInt8]($0) }
            let attributes = try volume.lookup(parent: volume.rootInode, name: name)
            var stored = [UInt8](repeating: 0xEE, count: Int(attributes.size))
            let n = try stored.withUnsafeMutableBytes { try volume.read(attributes.ino, at: 0, into: $0) }
            #expect(n == stored.count && stored == kernelBytes, "\(name): the volume holds \(n) bytes, crc \(CRC32C.checksum(stored)); kernel ext4 \(kernelBytes?.count ?? -1) bytes, crc \(kernelBytes.map { CRC32C.checksum($0) } ?? 0)")
        }
        try volume.close()
        let image = dir.path + "/thin.img"
        let out = try FileBlockDevice.create(path: FilePath(image), size: size)
        try thin.pool.openDevice(1, size: size).copy(to: out, length: size)
        let fsck = try Oracle.run("/sbin/e2fsck", ["-fn", image])
        #expect(fsck.status == 0, "\(fsck.stdout)")
    }

    /// Thousands of creates, unlinks, renames and hard links in one directory (names of 1 to 255
    /// bytes, so records of every size split and merge), the same seeded steps on kernel ext4:
    /// every result and the final listing must match. Then the volume must check clean with
    /// e2fsck, and kernel ext4 must read the directory thinfs grew (it verifies each block's
    /// checksum) and list what it listed through FUSE.
    @Test func largeDirectoryChurnMatchesKernelExt4() throws {
        let dir = TempDir()
        let size: UInt64 = 256 << 20
        let kernel = try KernelExt4(dir: dir.path, size: size)
        defer { kernel.close() }
        let thin = try ThinFSMount(dir: dir.path, size: size)
        var closed = false
        defer { if !closed { try? thin.close() } }

        let kernelLog = Self.largeDirectorySteps(root: kernel.mountpoint)
        let thinLog = Self.largeDirectorySteps(root: thin.mountpoint)
        #expect(kernelLog.count == thinLog.count)
        var mismatches = 0
        for (i, (k, t)) in zip(kernelLog, thinLog).enumerated() where k != t {
            mismatches += 1
            if mismatches <= 20 { Issue.record("step \(i): kernel ext4 says \(k), thinfs says \(t)") }
        }
        #expect(mismatches == 0, "\(mismatches) steps differ")
        #expect(kernelLog.count > 8000, "the script ran")
        let listed = Self.names(thin.mountpoint + "/big")

        try thin.close()
        closed = true
        try thin.pool.commit()
        let image = dir.path + "/thin.img"
        let out = try FileBlockDevice.create(path: FilePath(image), size: size)
        try thin.pool.openDevice(1, size: size).copy(to: out, length: size)
        let fsck = try Oracle.run("/sbin/e2fsck", ["-fn", image])
        #expect(fsck.status == 0, "\(fsck.stdout)")
        let mountpoint = dir.path + "/thin-by-kernel"
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
        let m = try Oracle.run("/bin/mount", ["-o", "loop,ro", image, mountpoint])
        try #require(m.status == 0, "kernel mount of the thinfs volume: \(m.stderr)")
        defer { _ = try? Oracle.run("/bin/umount", [mountpoint]) }
        #expect(Self.names(mountpoint + "/big") == listed, "kernel ext4 lists the directory thinfs grew as FUSE did")
    }

    /// The steps of `largeDirectoryChurnMatchesKernelExt4`: one line per step.
    static func largeDirectorySteps(root: String) -> [String] {
        var log: [String] = []
        var rng = SeededRandom(seed: 11)
        let big = root + "/big"
        log.append("mkdir: \(errnoName(LibC.check(mkdir(big, 0o755))))")
        func name(_ i: Int) -> String {
            // Lengths from 1 to 255 bytes: short names split slack, long ones need whole free records.
            let length = [1, 2, 5, 8, 13, 30, 64, 120, 200, 255][i % 10]
            let stem = "\(i)-"
            return stem.count >= length ? stem : stem + String(repeating: "x", count: length - stem.count)
        }
        var live: [String] = []
        for i in 0..<3000 {
            let n = name(i)
            log.append("create \(n.count) \(i): \(errnoName(create(big + "/" + n, [UInt8(i & 0xff)])))")
            live.append(n)
        }
        for round in 0..<3 {
            // Unlink about a third, rename a fifth (some over a live name), link a few, create more.
            for _ in 0..<1000 where !live.isEmpty {
                let n = live.remove(at: Int.random(in: 0..<live.count, using: &rng))
                log.append("unlink \(n.count): \(errnoName(LibC.check(unlink(big + "/" + n))))")
            }
            for j in 0..<600 where live.count > 2 {
                let from = live.remove(at: Int.random(in: 0..<live.count, using: &rng))
                let to = j % 5 == 0 ? live[Int.random(in: 0..<live.count, using: &rng)] : name(10_000 * (round + 1) + j)
                log.append("rename \(from.count) -> \(to.count): \(errnoName(LibC.check(rename(big + "/" + from, big + "/" + to))))")
                if !live.contains(to) { live.append(to) }
            }
            for j in 0..<200 {
                let from = live[Int.random(in: 0..<live.count, using: &rng)]
                let to = name(20_000 * (round + 1) + j)
                log.append("link \(from.count) -> \(to.count): \(errnoName(LibC.check(link(big + "/" + from, big + "/" + to))))")
                live.append(to)
            }
            for j in 0..<1000 {
                let n = name(30_000 * (round + 1) + j)
                log.append("create \(n.count): \(errnoName(create(big + "/" + n, [UInt8(j & 0xff)])))")
                live.append(n)
            }
            log.append("exists again: \(errnoName(create(big + "/" + live[0], [0])))")
            log.append("listing after round \(round): crc \(CRC32C.checksum(Array(names(big).utf8)))")
        }
        for n in live.sorted() where n.count % 3 == 0 { log.append("stat \(n.count): \(stat(big + "/" + n))") }
        return log
    }

    static let zeroRange: Int32 = 0x10  // FALLOC_FL_ZERO_RANGE

    /// Each case: a file of `size` bytes of a pattern (nil: sparse, 8 KiB of data at 0 and at
    /// 1 MiB, 1 MiB + 8 KiB long), then fallocate(mode, offset, length). Blocks are 4 KiB.
    static let zeroRangeCases: [(name: String, size: Int?, mode: Int32, offset: Int64, length: Int64)] = [
        ("aligned-inside", 20_000, zeroRange, 4096, 8192),                       // whole blocks only
        ("unaligned-inside", 20_000, zeroRange, 100, 10_000),                    // partial blocks at both edges
        ("one-block", 20_000, zeroRange, 5000, 100),                             // inside one block
        ("to-eof", 20_000, zeroRange, 12_345, 7655),                             // ends at the end of the file
        ("across-eof", 20_000, zeroRange, 15_000, 10_000),                       // extends the file
        ("across-eof-keep", 20_000, zeroRange | LibC.keepSize, 15_000, 10_000),  // preallocates past the end
        ("past-eof", 20_000, zeroRange, 30_000, 5000),                           // a gap, then the range
        ("past-eof-keep", 20_000, zeroRange | LibC.keepSize, 30_000, 5000),      // nothing visible changes
        ("whole-file", 20_000, zeroRange, 0, 20_000),
        ("many-blocks", (1 << 20) + 7, zeroRange, 4097, 900_000),
        ("many-blocks-keep", (1 << 20) + 7, zeroRange | LibC.keepSize, 4097, 2 << 20),
        ("over-holes", nil, zeroRange, 4000, (1 << 20) - 3900),                  // data, hole, data
        ("edges-in-holes", nil, zeroRange, 10_000, 20_000),                      // partial blocks in holes
        ("punch-edges-in-holes", nil, LibC.punchHole | LibC.keepSize, 10_000, 20_000),
        ("punch-unaligned", 20_000, LibC.punchHole | LibC.keepSize, 100, 10_000),
        ("punch-across-eof", 20_000, LibC.punchHole | LibC.keepSize, 15_000, 10_000),
        ("zero-and-punch", 20_000, zeroRange | LibC.punchHole | LibC.keepSize, 0, 4096),  // refused
        ("zero-length", 20_000, zeroRange, 0, 0),                                // EINVAL
    ]

    static var zeroRangeFileNames: [String] {
        zeroRangeCases.flatMap { c in ["synced", "cached"].map { "\(c.name)-\($0)" } }
    }

    /// Six lines per case and variant: fallocate's result, the size and content after it, a write
    /// into the middle of the range, and the size and content after that.
    static func zeroRangeSteps(root: String) -> [String] {
        var log: [String] = []
        func pattern(_ count: Int, seed: Int) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ seed) | 1 } }
        func describe(_ fd: Int32) -> (size: String, content: String) {
            var st = Glibc.stat()
            guard fstat(fd, &st) == 0 else { return (errnoName(errno), "") }
            var bytes = [UInt8](repeating: 0xEE, count: Int(st.st_size))
            let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
            return ("size \(st.st_size)", n < 0 ? errnoName(errno) : "\(n) bytes, crc \(CRC32C.checksum(bytes[0..<n]))")
        }
        for (i, c) in zeroRangeCases.enumerated() {
            for synced in [true, false] {
                let name = "\(c.name)-\(synced ? "synced" : "cached")"
                let fd = open(root + "/" + name, O_RDWR | O_CREAT | O_EXCL, 0o644)
                guard fd >= 0 else {
                    log.append("\(name): create: \(errnoName(errno))")
                    continue
                }
                defer { Glibc.close(fd) }
                var chunks: [(offset: Int64, bytes: [UInt8])] = [(0, pattern(8192, seed: i)), (1 << 20, pattern(8192, seed: i + 100))]
                if let size = c.size { chunks = [(0, pattern(size, seed: i))] }
                for (offset, bytes) in chunks {
                    _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
                }
                if synced { fsync(fd) }
                log.append("\(name): fallocate: \(errnoName(LibC.fallocate(fd, mode: c.mode, offset: c.offset, length: c.length)))")
                var (size, content) = describe(fd)
                log.append("\(name): \(size)")
                log.append("\(name): \(content)")
                // A write inside the range lands in an unwritten extent (or past the end of the file).
                let marker = Array("XY".utf8)
                let at = off_t(c.offset + c.length / 2)
                let wrote = marker.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, at) }
                log.append("\(name): write at \(at): \(wrote == marker.count ? "ok" : errnoName(errno))")
                (size, content) = describe(fd)
                log.append("\(name): \(size)")
                log.append("\(name): \(content)")
            }
        }
        return log
    }

    // MARK: The script

    static func errnoName(_ e: Int32) -> String { e == 0 ? "ok" : "errno \(e) (\(String(cString: strerror(e))))" }

    /// stat fields compared across filesystems (see the accepted differences above).
    static func stat(_ path: String, times: Bool = false) -> String {
        var st = Glibc.stat()
        guard lstat(path, &st) == 0 else { return errnoName(errno) }
        var s = "mode \(String(st.st_mode, radix: 8)) nlink \(st.st_nlink) uid \(st.st_uid) gid \(st.st_gid) rdev \(st.st_rdev)"
        if st.st_mode & S_IFMT != S_IFDIR { s += " size \(st.st_size)" }
        if times { s += " mtime \(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec) atime \(st.st_atim.tv_sec).\(st.st_atim.tv_nsec)" }
        return s
    }

    static func content(_ path: String) -> String {
        guard let d = FileManager.default.contents(atPath: path) else { return errnoName(errno) }
        return "\(d.count) bytes, crc \(CRC32C.checksum(d))"
    }

    static func names(_ path: String) -> String {
        guard let n = try? FileManager.default.contentsOfDirectory(atPath: path) else { return "cannot list" }
        return n.sorted().joined(separator: ",")
    }

    static func create(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o644, exclusive: Bool = true) -> Int32 {
        let fd = open(path, O_WRONLY | O_CREAT | (exclusive ? O_EXCL : O_TRUNC), mode)
        guard fd >= 0 else { return errno }
        defer { Glibc.close(fd) }
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        return n == bytes.count ? 0 : errno
    }

    static func pwriteAt(_ path: String, _ bytes: [UInt8], _ offset: off_t) -> Int32 {
        let fd = open(path, O_WRONLY)
        guard fd >= 0 else { return errno }
        defer { Glibc.close(fd) }
        return bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, offset) } == bytes.count ? 0 : errno
    }

    /// Runs `sh -c` as uid/gid 1000 through setpriv; returns its output (exit codes echoed by the script).
    static func asUser(_ root: String, _ script: String) throws -> String {
        let r = try Oracle.run("/usr/bin/setpriv", ["--reuid", "1000", "--regid", "1000", "--clear-groups", "/bin/sh", "-c",
                                                    "cd '\(root)' && " + script])
        return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    static func run(root: String) throws -> [String] {
        let log = Log()
        func p(_ rel: String) -> String { root + "/" + rel }
        func step(_ what: String, _ result: String) { log.add("\(what): \(result)") }
        func step(_ what: String, _ rc: Int32) { step(what, errnoName(rc)) }

        // Directories and files.
        step("mkdir a", LibC.check(mkdir(p("a"), 0o755)))
        step("mkdir a again", LibC.check(mkdir(p("a"), 0o755)))
        step("mkdir a/b/c (no parent)", LibC.check(mkdir(p("a/b/c"), 0o755)))
        step("create a/f", create(p("a/f"), Array("hello, world\n".utf8)))
        step("create a/f exclusive again", create(p("a/f"), [1]))
        step("stat a/f", stat(p("a/f")))
        step("read a/f", content(p("a/f")))
        step("overwrite middle", pwriteAt(p("a/f"), Array("WORLD".utf8), 7))
        step("read a/f", content(p("a/f")))
        step("truncate down", LibC.check(truncate(p("a/f"), 5)))
        step("truncate up", LibC.check(truncate(p("a/f"), 10000)))
        step("read a/f", content(p("a/f")))
        step("stat a", stat(p("a")))
        step("rmdir a (not empty)", LibC.check(rmdir(p("a"))))
        step("unlink a (directory)", LibC.check(unlink(p("a"))))
        step("rmdir a/f (file)", LibC.check(rmdir(p("a/f"))))
        step("open a/f/x", LibC.check(open(p("a/f/x"), O_RDONLY)))
        step("long name", create(p(String(repeating: "n", count: 256)), [1]))
        step("255-byte name", create(p(String(repeating: "n", count: 255)), [1]))

        // Hard links across directories.
        step("mkdir d1", LibC.check(mkdir(p("d1"), 0o755)))
        step("mkdir d2", LibC.check(mkdir(p("d2"), 0o700)))
        step("link a/f d1/f1", LibC.check(link(p("a/f"), p("d1/f1"))))
        step("link a/f d2/f2", LibC.check(link(p("a/f"), p("d2/f2"))))
        step("stat d2/f2", stat(p("d2/f2")))
        step("link to a directory", LibC.check(link(p("d1"), p("d2/dirlink"))))
        step("link over existing", LibC.check(link(p("a/f"), p("d1/f1"))))
        step("unlink a/f", LibC.check(unlink(p("a/f"))))
        step("stat d1/f1", stat(p("d1/f1")))
        step("read d2/f2", content(p("d2/f2")))

        // Rename over files and directories, and the renameat2 flags.
        step("create r1", create(p("r1"), Array("one".utf8)))
        step("create r2", create(p("r2"), Array("two".utf8)))
        step("rename r1 over r2", LibC.rename(p("r1"), p("r2"), flags: 0))
        step("read r2", content(p("r2")))
        step("stat r1", stat(p("r1")))
        step("create r3", create(p("r3"), Array("three".utf8)))
        step("noreplace r3 -> r2", LibC.rename(p("r3"), p("r2"), flags: LibC.renameNoReplace))
        step("exchange r3 <-> r2", LibC.rename(p("r3"), p("r2"), flags: LibC.renameExchange))
        step("read r2", content(p("r2")))
        step("read r3", content(p("r3")))
        step("exchange with missing", LibC.rename(p("r3"), p("nothing"), flags: LibC.renameExchange))
        step("mkdir e1", LibC.check(mkdir(p("e1"), 0o755)))
        step("mkdir e2", LibC.check(mkdir(p("e2"), 0o755)))
        step("rename dir over empty dir", LibC.rename(p("e1"), p("e2"), flags: 0))
        step("names /", names(root))
        step("rename dir over non-empty dir", LibC.rename(p("e2"), p("d1"), flags: 0))
        step("rename file over dir", LibC.rename(p("r2"), p("d1"), flags: 0))
        step("rename dir over file", LibC.rename(p("e2"), p("r2"), flags: 0))
        step("rename dir into itself", LibC.rename(p("d1"), p("d1/sub"), flags: 0))
        step("rename dir across", LibC.rename(p("e2"), p("d1/e2"), flags: 0))
        step("stat d1", stat(p("d1")))
        step("stat /", stat(root))
        step("exchange dir and file across", LibC.rename(p("d1/e2"), p("r3"), flags: LibC.renameExchange))
        step("stat d1/e2", stat(p("d1/e2")))
        step("stat r3", stat(p("r3")))

        // Symlinks and special files.
        step("symlink s -> r2", LibC.check(symlink("r2", p("s"))))
        step("symlink long", LibC.check(symlink(String(repeating: "y/", count: 300) + "z", p("slong"))))
        for name in ["s", "slong"] {
            var buf = [CChar](repeating: 0, count: 4096)
            let n = readlink(p(name), &buf, buf.count)
            step("readlink \(name)", n < 0 ? errnoName(errno) : "\(n) bytes, crc \(CRC32C.checksum(buf[0..<n].map { UInt8(bitPattern: $0) }))")
        }
        var one = [CChar](repeating: 0, count: 16)
        step("readlink of a file", LibC.check(readlink(p("r2"), &one, one.count)))
        step("stat s", stat(p("s")))
        step("read through s", content(p("s")))
        step("mkfifo", LibC.check(mkfifo(p("fifo"), 0o640)))
        step("mknod char", LibC.check(mknod(p("null"), S_IFCHR | 0o666, dev_t(Volume.makedev(major: 1, minor: 3)))))
        step("mknod block (big numbers)", LibC.check(mknod(p("blk"), S_IFBLK | 0o600, dev_t(Volume.makedev(major: 259, minor: 70000)))))
        for name in ["fifo", "null", "blk"] { step("stat \(name)", stat(p(name))) }

        // Attributes.
        step("chmod", LibC.check(chmod(p("r2"), 0o4751)))
        step("chown", LibC.check(chown(p("r2"), 1234, 5678)))
        step("stat r2", stat(p("r2")))
        var times = [timespec(tv_sec: 1_600_000_000, tv_nsec: 123_456_789), timespec(tv_sec: 1_700_000_000, tv_nsec: 987_654_321)]
        step("utimensat", LibC.check(utimensat(AT_FDCWD, p("r2"), &times, 0)))
        step("stat r2 with times", stat(p("r2"), times: true))
        var late = [timespec(tv_sec: 4_102_444_800, tv_nsec: 1), timespec(tv_sec: 4_102_444_800, tv_nsec: 999_999_999)]
        step("utimensat after 2038", LibC.check(utimensat(AT_FDCWD, p("r3"), &late, AT_SYMLINK_NOFOLLOW)))
        step("stat r3 with times", stat(p("r3"), times: true))
        step("mkdir setgid", LibC.check(mkdir(p("sg"), 0o775)))
        step("chown setgid dir", LibC.check(chown(p("sg"), 0, 4321)))
        step("chmod setgid dir", LibC.check(chmod(p("sg"), 0o2775)))
        step("create in setgid", create(p("sg/file"), [1]))
        step("mkdir in setgid", LibC.check(mkdir(p("sg/sub"), 0o755)))
        step("stat sg/file", stat(p("sg/file")))
        step("stat sg/sub", stat(p("sg/sub")))
        step("symlink in setgid", LibC.check(symlink("file", p("sg/link"))))
        step("stat sg/link", stat(p("sg/link")))
        step("mknod fifo in setgid", LibC.check(mkfifo(p("sg/fifo"), 0o600)))
        step("stat sg/fifo", stat(p("sg/fifo")))

        // Extended attributes.
        step("setxattr user", LibC.setxattr(p("r2"), "user.k", Array("v".utf8)))
        step("setxattr create existing", LibC.setxattr(p("r2"), "user.k", [1], flags: LibC.xattrCreate))
        step("setxattr replace missing", LibC.setxattr(p("r2"), "user.none", [1], flags: LibC.xattrReplace))
        step("setxattr security.capability", LibC.setxattr(p("r2"), "security.capability",
                                                            [1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
        step("setxattr trusted big", LibC.setxattr(p("r2"), "trusted.big", [UInt8](repeating: 7, count: 3000)))
        step("setxattr bad namespace", LibC.setxattr(p("r2"), "bogus.k", [1]))
        step("listxattr", LibC.listxattr(p("r2")).sorted().joined(separator: ","))
        for (name, size) in [("user.k", 0), ("user.k", 100), ("user.k", 0 + 0), ("trusted.big", 10), ("user.none", 10)] {
            switch LibC.getxattr(p("r2"), name, size: size) {
            case .success(let v): step("getxattr \(name) size \(size)", "\(v.count) bytes, crc \(CRC32C.checksum(v))")
            case .failure(let e): step("getxattr \(name) size \(size)", errnoName(e.rawValue))
            }
        }
        step("removexattr", LibC.removexattr(p("r2"), "user.k"))
        step("removexattr missing", LibC.removexattr(p("r2"), "user.k"))
        let aclAccess: [UInt8] = [2, 0, 0, 0, 1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff, 4, 0, 4, 0, 0xff, 0xff, 0xff, 0xff,
                                  0x20, 0, 4, 0, 0xff, 0xff, 0xff, 0xff]
        step("setxattr system.posix_acl_access", LibC.setxattr(p("r3"), "system.posix_acl_access", aclAccess))
        step("stat r3 after acl", stat(p("r3")))
        step("listxattr r3 (an equivalent ACL is not stored)", LibC.listxattr(p("r3")).sorted().joined(separator: ","))
        // user::rwx user:1000:rwx group::r-x mask::r-x other::---
        let aclNamed: [UInt8] = [2, 0, 0, 0, 1, 0, 7, 0, 0xff, 0xff, 0xff, 0xff, 2, 0, 7, 0, 0xe8, 3, 0, 0,
                                 4, 0, 5, 0, 0xff, 0xff, 0xff, 0xff, 0x10, 0, 5, 0, 0xff, 0xff, 0xff, 0xff,
                                 0x20, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]
        step("setxattr named-user acl", LibC.setxattr(p("r2"), "system.posix_acl_access", aclNamed))
        step("stat r2 after named acl", stat(p("r2")))
        switch LibC.getxattr(p("r2"), "system.posix_acl_access", size: 100) {
        case .success(let v): step("getxattr named acl", "\(v.count) bytes, crc \(CRC32C.checksum(v))")
        case .failure(let e): step("getxattr named acl", errnoName(e.rawValue))
        }
        step("setxattr malformed acl", LibC.setxattr(p("r2"), "system.posix_acl_access", [1, 2, 3]))

        // Sparse files, fallocate, SEEK_DATA/SEEK_HOLE, a file over 4 GiB.
        step("create sparse", create(p("sparse"), []))
        step("write at 1M", pwriteAt(p("sparse"), [UInt8](repeating: 0xAB, count: 8192), 1 << 20))
        step("write past 4G", pwriteAt(p("sparse"), Array("end".utf8), (5 << 30) + 17))
        step("stat sparse", stat(p("sparse")))
        do {
            let fd = open(p("sparse"), O_RDWR)
            for (what, from, whence) in [("data from 0", Int64(0), LibC.seekData), ("hole from 0", 0, LibC.seekHole),
                                         ("hole from 1M", 1 << 20, LibC.seekHole), ("data past end", 6 << 30, LibC.seekData)] {
                let r = lseek(fd, off_t(from), whence)
                step("lseek \(what)", r < 0 ? errnoName(errno) : "\(r)")
            }
            step("fallocate keep size", LibC.fallocate(fd, mode: LibC.keepSize, offset: 2 << 20, length: 1 << 20))
            step("fallocate punch", LibC.fallocate(fd, mode: LibC.punchHole | LibC.keepSize, offset: (1 << 20) + 100, length: 5000))
            step("fallocate punch without keep", LibC.fallocate(fd, mode: LibC.punchHole, offset: 0, length: 4096))
            step("fallocate extend", LibC.fallocate(fd, mode: 0, offset: 6 << 30, length: 4096))
            var buf = [UInt8](repeating: 0, count: 8192)
            let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 8192, off_t(1 << 20)) }
            step("read after punch", "\(n) bytes, crc \(CRC32C.checksum(buf))")
            Glibc.close(fd)
        }
        step("stat sparse after", stat(p("sparse")))

        // A large directory.
        step("mkdir big", LibC.check(mkdir(p("big"), 0o755)))
        var failures = 0
        for i in 0..<10_000 where create(p("big/entry-\(i)"), []) != 0 { failures += 1 }
        step("create 10000 entries", "\(failures) failures")
        let listed = (try? FileManager.default.contentsOfDirectory(atPath: p("big"))) ?? []
        step("list big", "\(listed.count) entries, \(Set(listed).count) distinct")
        for i in stride(from: 0, to: 10_000, by: 2) where unlink(p("big/entry-\(i)")) != 0 { failures += 1 }
        step("remove half", "\(failures) failures")
        step("list big", "\(((try? FileManager.default.contentsOfDirectory(atPath: p("big"))) ?? []).count) entries")

        // Permissions for an unprivileged user, and sticky directories (the kernel checks both, via default_permissions).
        step("mkdir sticky", LibC.check(mkdir(p("sticky"), 0o777)))
        step("chmod sticky", LibC.check(chmod(p("sticky"), 0o1777)))
        step("root file in sticky", create(p("sticky/rootfile"), [1], mode: 0o666))
        step("mkdir private", LibC.check(mkdir(p("private"), 0o700)))
        step("create readonly file", create(p("ro-file"), [1], mode: 0o444))
        step("user steps", try asUser(root, """
            touch private/x 2>/dev/null; echo "touch in 0700 root dir: $?"
            ls private >/dev/null 2>&1; echo "list 0700 root dir: $?"
            echo x >> ro-file 2>/dev/null; echo "append to 0444 file: $?"
            rm -f sticky/rootfile 2>/dev/null; echo "remove root's file in sticky dir: $?"
            touch sticky/mine; echo "create in sticky: $?"
            rm sticky/mine; echo "remove own file in sticky: $?"
            mkdir d1/u 2>/dev/null; echo "mkdir in root's 0755 dir: $?"
            chmod 777 r2 2>/dev/null; echo "chmod root's file: $?"
            cat d2/f2 >/dev/null 2>&1; echo "read in root's 0700 dir: $?"
            """))

        // Set-user-ID, set-group-ID and security.capability after writes, truncates and chowns: the
        // kernel decides what to drop (file_remove_privs asks for security.capability before every
        // write; chown drops both) and the daemon stores it; a getxattr that missed the attribute
        // would leave it in place.
        func xattr(_ path: String, _ name: String) -> String {
            switch LibC.getxattr(path, name, size: 100) {
            case .success(let v): return "\(v.count) bytes, crc \(CRC32C.checksum(v))"
            case .failure(let e): return errnoName(e.rawValue)
            }
        }
        let capability: [UInt8] = [1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        for (name, mode) in [("kp-user", 0o6777), ("kp-trunc", 0o6777), ("kp-root", 0o6755), ("kp-chown", 0o6755), ("kp-cap", 0o644)] {
            step("create \(name)", create(p(name), Array("privileged".utf8)))
            step("chmod \(name) \(String(mode, radix: 8))", LibC.check(chmod(p(name), mode_t(mode))))
        }
        step("setxattr kp-cap security.capability", LibC.setxattr(p("kp-cap"), "security.capability", capability))
        step("user steps on set-user-ID files", try asUser(root, """
            echo x >> kp-user; echo "append to a 06777 root file: $?"
            truncate -s 3 kp-trunc; echo "truncate a 06777 root file: $?"
            """))
        step("stat kp-user", stat(p("kp-user")))
        step("stat kp-trunc", stat(p("kp-trunc")))
        step("root writes kp-root", pwriteAt(p("kp-root"), Array("P".utf8), 0))
        step("stat kp-root", stat(p("kp-root")))
        step("root truncates kp-root", LibC.check(truncate(p("kp-root"), 2)))
        step("stat kp-root", stat(p("kp-root")))
        step("root chowns kp-chown", LibC.check(chown(p("kp-chown"), 1000, 1000)))
        step("stat kp-chown", stat(p("kp-chown")))
        step("getxattr kp-cap security.capability", xattr(p("kp-cap"), "security.capability"))
        step("root writes kp-cap", pwriteAt(p("kp-cap"), Array("C".utf8), 1))
        step("getxattr kp-cap security.capability after a write", xattr(p("kp-cap"), "security.capability"))
        step("setxattr kp-cap security.capability again", LibC.setxattr(p("kp-cap"), "security.capability", capability))
        step("setxattr kp-cap user.k", LibC.setxattr(p("kp-cap"), "user.k", [UInt8](repeating: 5, count: 3000)))
        step("root chowns kp-cap", LibC.check(chown(p("kp-cap"), 1000, 1000)))
        step("getxattr kp-cap security.capability after a chown", xattr(p("kp-cap"), "security.capability"))
        step("getxattr kp-cap user.k after a chown", xattr(p("kp-cap"), "user.k"))
        step("read kp-cap", content(p("kp-cap")))

        // Removal of everything left in the directories made above.
        step("rmdir e2 (renamed away)", LibC.check(rmdir(p("e2"))))
        step("unlink d1/f1", LibC.check(unlink(p("d1/f1"))))
        step("stat d2/f2", stat(p("d2/f2")))
        step("names /", names(root))
        return log.lines
    }
}
