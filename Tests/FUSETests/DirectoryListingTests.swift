import Foundation
import Synchronization
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// An ext4 image file: served by thinfs through FUSE (libext2fs), or loop-mounted by kernel ext4.
final class Ext4Image {
    let path: String
    let mountpoint: String

    /// mke2fs with the inode size stated: it decides ext4's time range.
    init(dir: String, size: UInt64 = 64 << 20) throws {
        path = dir + "/fs.img"
        mountpoint = dir + "/mnt"
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        guard truncate(path, off_t(size)) == 0 else { throw VolumeError(Errno(rawValue: errno), "truncate \(path)") }
        let mk = try Oracle.run("/sbin/mke2fs", ["-t", "ext4", "-b", "4096", "-I", "256", "-F", "-q",
                                                 "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", path])
        guard mk.status == 0 else { throw VolumeError(.ioError, "mke2fs: \(mk.stderr)") }
    }

    /// The image served by an in-process thinfs FUSE server until `close`.
    final class Served {
        let volume: Volume
        let server: FUSEServer
        private let finished = DispatchSemaphore(value: 0)

        init(_ image: Ext4Image, options: FUSEServer.Options = .init(source: "listing")) throws {
            volume = try Volume(device: FileBlockDevice(path: FilePath(image.path)), readOnly: false, logger: quietLogger)
            server = FUSEServer(volume: volume, mountpoint: image.mountpoint, options: options, logger: quietLogger)
            do { try server.mount() } catch {
                try? volume.close()
                throw error
            }
            let (s, done) = (server, finished)
            Thread {
                try? s.run()
                done.signal()
            }.start()
        }

        /// Unmounts, waits for the session loop, and writes the filesystem back.
        func close() throws {
            server.stop()
            _ = finished.wait(timeout: .now() + 20)
            try volume.close()
        }
    }

    /// The image loop-mounted by kernel ext4 until `close`.
    final class Kernel {
        let mountpoint: String
        init(_ image: Ext4Image) throws {
            mountpoint = image.mountpoint
            let m = try Oracle.run("/bin/mount", ["-t", "ext4", "-o", "loop", image.path, mountpoint])
            guard m.status == 0 else { throw VolumeError(.ioError, "mount: \(m.stderr)") }
        }
        func close() {
            _ = try? Oracle.run("/bin/umount", [mountpoint])
        }
    }
}

enum Loop {
    static var available: Bool { FileManager.default.fileExists(atPath: "/dev/loop-control") && getuid() == 0 }
}

@Suite("Directory listings and times through a thinfs mount of a Volume",
       .enabled(if: Host.canMountFUSE && FileManager.default.isExecutableFile(atPath: "/sbin/mke2fs"), "needs root, /dev/fuse and mke2fs"))
struct DirectoryListingTests {
    static func name(_ i: Int) -> String { "package-\(i)_1.0-1_amd64.deb" }

    static func entryName(_ e: UnsafeMutablePointer<dirent>) -> String {
        withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
    }

    static func createFiles(_ dir: String, _ names: [String]) throws {
        for n in names {
            let fd = open(dir + "/" + n, O_WRONLY | O_CREAT | O_EXCL, 0o644)
            guard fd >= 0 else { throw VolumeError(Errno(rawValue: errno), "create \(n)") }
            close(fd)
        }
    }

    /// What `perl -e 'opendir D, $d; while ($f = readdir D) { unlink "$d/$f" }'` and `apt-get clean` do:
    /// unlink each entry as soon as readdir(3) returns it. POSIX says every entry neither added nor
    /// removed during the listing comes back exactly once, so all 300 go (overlayfs and kernel ext4: 0 left).
    @Test func unlinkingDuringReaddirRemovesEveryEntry() throws {
        let dir = TempDir()
        let image = try Ext4Image(dir: dir.path)
        let thin = try Ext4Image.Served(image)
        var closed = false
        defer { if !closed { try? thin.close() } }
        let archives = image.mountpoint + "/archives"
        #expect(mkdir(archives, 0o755) == 0)
        let names = (0..<300).map(Self.name)
        try Self.createFiles(archives, names)

        var removed = 0
        let d = try #require(opendir(archives))
        while let e = readdir(d) {
            let n = Self.entryName(e)
            if n == "." || n == ".." { continue }
            if unlink(archives + "/" + n) == 0 { removed += 1 }
        }
        closedir(d)
        #expect(removed == names.count)
        let left = try FileManager.default.contentsOfDirectory(atPath: archives)
        #expect(left.isEmpty, "\(left.count) of \(names.count) files left")

        try thin.close()
        closed = true
        let fsck = try Oracle.run("/sbin/e2fsck", ["-fn", image.path])
        #expect(fsck.status == 0, "\(fsck.stdout)")
    }

    /// A reader that never deletes, while another thread removes a known third of the entries (half of
    /// them before the reader's second getdents, the rest while it reads on) and creates new files:
    /// every survivor comes back exactly once, and nothing comes back twice.
    @Test func readerSeesEverySurvivorOnceWhileAnotherThreadUnlinksAndCreates() throws {
        let dir = TempDir()
        let image = try Ext4Image(dir: dir.path)
        let thin = try Ext4Image.Served(image)
        defer { try? thin.close() }
        let d = image.mountpoint + "/d"
        #expect(mkdir(d, 0o755) == 0)
        let names = (0..<300).map(Self.name)
        try Self.createFiles(d, names)
        let doomed = stride(from: 0, to: 300, by: 3).map { names[$0] }
        let survivors = Set(names).subtracting(doomed)

        let firstPassDone = DispatchSemaphore(value: 0)
        let start = DispatchSemaphore(value: 0)
        let allDone = DispatchSemaphore(value: 0)
        let created = Mutex<Set<String>>([])
        let failures = Mutex<[String]>([])
        Thread {
            start.wait()
            for (i, name) in doomed.enumerated() {
                if unlink(d + "/" + name) != 0 { failures.withLock { $0.append("unlink \(name): errno \(errno)") } }
                let new = "new-\(i)-with-a-long-enough-name"
                let fd = open(d + "/" + new, O_WRONLY | O_CREAT | O_EXCL, 0o644)
                if fd >= 0 { close(fd); created.withLock { _ = $0.insert(new) } }
                if i == doomed.count / 2 { firstPassDone.signal() }
                usleep(200)
            }
            allDone.signal()
        }.start()

        var counts: [String: Int] = [:]
        let dp = try #require(opendir(d))
        var n = 0
        while let e = readdir(dp) {
            let name = Self.entryName(e)
            if name == "." || name == ".." { continue }
            counts[name, default: 0] += 1
            n += 1
            // Well inside the first getdents buffer: let the other thread remove entries already
            // returned and entries not yet returned before the next one.
            if n == 40 {
                start.signal()
                firstPassDone.wait()
            }
            usleep(100)
        }
        closedir(dp)
        allDone.wait()

        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        let missing = survivors.filter { counts[$0] == nil }.sorted()
        #expect(missing.isEmpty, "\(missing.count) of \(survivors.count) survivors never returned, e.g. \(missing.prefix(3))")
        let twice = counts.filter { $0.value > 1 }.keys.sorted()
        #expect(twice.isEmpty, "returned more than once: \(twice.prefix(5))")
        let unknown = Set(counts.keys).subtracting(names).subtracting(created.withLock { $0 })
        #expect(unknown.isEmpty, "names never created: \(unknown)")
    }

    /// A directory kernel ext4 made big enough for an htree index (its interior blocks hold one empty
    /// record each, and metadata_csum checksums them differently): the volume lists what the kernel lists,
    /// in batches, each entry once.
    @Test(.enabled(if: Loop.available, "needs loop devices"))
    func kernelMadeIndexedDirectoryListsAsTheKernelDoes() throws {
        let dir = TempDir()
        let image = try Ext4Image(dir: dir.path)
        let kernel = try Ext4Image.Kernel(image)
        var kernelNames: [String] = []
        do {
            defer { kernel.close() }
            try #require(mkdir(image.mountpoint + "/big", 0o755) == 0)
            try Self.createFiles(image.mountpoint + "/big", (0..<3000).map(Self.name))
            for i in stride(from: 0, to: 3000, by: 7) { unlink(image.mountpoint + "/big/" + Self.name(i)) }
            kernelNames = try FileManager.default.contentsOfDirectory(atPath: image.mountpoint + "/big")
        }
        let v = try Volume(device: FileBlockDevice(path: FilePath(image.path)), readOnly: true, logger: quietLogger)
        defer { try? v.close() }
        let big = try v.lookup(parent: v.rootInode, name: "big")
        var cookie: UInt64 = 0
        var names: [String] = []
        while true {
            var batch: [DirectoryEntry] = []
            try v.readdir(big.ino, after: cookie) { batch.append($0); return batch.count < 50 }
            guard let last = batch.last else { break }
            cookie = last.cookie
            names += batch.map(\.name).filter { $0 != "." && $0 != ".." }
        }
        #expect(names.count == kernelNames.count && Set(names) == Set(kernelNames),
                "volume listed \(names.count) names (\(Set(names).count) distinct), kernel ext4 \(kernelNames.count)")
    }

    /// Times set outside ext4's range, on a file and on a directory: after a remount, `stat` says what
    /// kernel ext4 says after the same steps on an image made the same way (256-byte inodes), and what
    /// the mount said before the remount.
    ///
    /// One exception, from FUSE and not the volume: with the writeback cache the kernel keeps the mtime
    /// it was asked to set on a regular file (it trusts its own mtime for regular files and ignores the
    /// one setattr returns), and FUSE cannot tell it ext4's range, so until the inode leaves the kernel's
    /// cache a file's mtime reads as set. Its atime, and a directory's times, come from the volume.
    @Test(.enabled(if: Loop.available, "needs loop devices"))
    func timesOutsideExt4RangeMatchKernelExt4AcrossARemount() throws {
        let times: [(Int, Int)] = [
            (1 << 34, 123),                   // read back as 0 before the clamp
            (15_032_385_536, 0),              // one past the top: read back as -2^31
            (15_032_385_535, 999),            // the top itself
            (-2_147_483_748, 1),              // 100 s before the bottom: read back in 2446
            (-2_147_483_648, 500),            // the bottom itself
            (15_032_385_534, 5),              // in range, kept
        ]
        func set(_ root: String) {
            for (i, (s, ns)) in times.enumerated() {
                let file = root + "/f\(i)", dir = root + "/d\(i)"
                let fd = open(file, O_WRONLY | O_CREAT, 0o644)
                if fd >= 0 { close(fd) }
                #expect(mkdir(dir, 0o755) == 0)
                for path in [file, dir] {
                    var ts = [timespec(tv_sec: s, tv_nsec: ns), timespec(tv_sec: s, tv_nsec: ns)]
                    #expect(utimensat(AT_FDCWD, path, &ts, 0) == 0, "utimensat \(path): errno \(errno)")
                }
            }
        }
        /// Per time: the file's mtime, the file's atime, the directory's mtime and atime.
        func stats(_ root: String) -> [[String]] {
            func time(_ t: timespec) -> String { "\(t.tv_sec).\(t.tv_nsec)" }
            return times.indices.map { i in
                var f = Glibc.stat(), d = Glibc.stat()
                guard stat(root + "/f\(i)", &f) == 0, stat(root + "/d\(i)", &d) == 0 else { return ["errno \(errno)"] }
                return [time(f.st_mtim), time(f.st_atim), time(d.st_mtim), time(d.st_atim)]
            }
        }

        let thinDir = TempDir()
        let thinImage = try Ext4Image(dir: thinDir.path)
        var thin = try Ext4Image.Served(thinImage)
        set(thinImage.mountpoint)
        let thinBefore = stats(thinImage.mountpoint)
        try thin.close()
        thin = try Ext4Image.Served(thinImage)
        let thinAfter = stats(thinImage.mountpoint)
        try thin.close()

        let kernelDir = TempDir()
        let kernelImage = try Ext4Image(dir: kernelDir.path)
        var kernel = try Ext4Image.Kernel(kernelImage)
        set(kernelImage.mountpoint)
        let kernelBefore = stats(kernelImage.mountpoint)
        kernel.close()
        kernel = try Ext4Image.Kernel(kernelImage)
        let kernelAfter = stats(kernelImage.mountpoint)
        kernel.close()

        for i in times.indices {
            #expect(thinAfter[i] == kernelAfter[i], "time \(times[i]): thinfs says \(thinAfter[i]), kernel ext4 \(kernelAfter[i])")
            #expect(Array(thinBefore[i].dropFirst()) == Array(thinAfter[i].dropFirst()),
                    "time \(times[i]): thinfs said \(thinBefore[i]), after a remount \(thinAfter[i])")
            #expect(kernelBefore[i] == kernelAfter[i], "time \(times[i]): kernel ext4 changed across a remount")
        }
        let fsck = try Oracle.run("/sbin/e2fsck", ["-fn", thinImage.path])
        #expect(fsck.status == 0, "\(fsck.stdout)")
    }
}
