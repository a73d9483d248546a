import Foundation
import PersistentData
import Synchronization
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// The volume's directory cache seen through the kernel: several threads change shared
/// directories through one mount while a second mount of the same volume, in the same
/// process, looks each result up for the first time (so its LOOKUP reaches the daemon and is
/// answered from the cache, not from the second kernel mount's dentries). A third mount
/// serves a snapshot of the same filesystem, whose inode numbers are all the same: nothing
/// done on the origin may show through it.
@Suite("Directory cache through FUSE", .enabled(if: Host.canMountFUSE && FileManager.default.isExecutableFile(atPath: "/sbin/e2fsck"),
                                                     "needs root, /dev/fuse and e2fsprogs"))
struct DirectoryCacheCoherenceTests {
    /// One FUSE server in this process, on its own thread.
    final class Served: Sendable {
        let server: FUSEServer
        let path: String
        init(_ volume: Volume, at path: String) throws {
            self.path = path
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            server = FUSEServer(volume: volume, mountpoint: path, options: .init(source: "dircache"), logger: quietLogger)
            try server.mount()
            let s = server
            Thread { try? s.run() }.start()
        }
        func close() {
            server.stop()
            _ = eventually(20) { !Host.isMounted(path) }
        }
    }

    static func inode(_ path: String) -> (errno: Int32, ino: UInt64, nlink: UInt64) {
        var st = Glibc.stat()
        guard lstat(path, &st) == 0 else { return (errno, 0, 0) }
        return (0, UInt64(st.st_ino), UInt64(st.st_nlink))
    }

    @Test func changesThroughOneMountAreWhatAnotherMountLooksUp() throws {
        let dir = TempDir()
        let size: UInt64 = 512 << 20
        let pool = try UserspaceThinPool.create(dataPath: dir.path + "/data", metadataPath: dir.path + "/metadata", dataSize: 2 << 30,
                                                metadataSize: 64 << 20, blockSize: 64 << 10, logger: quietLogger)
        try pool.message(.createThin(1))
        _ = try DeviceFormatter(logger: quietLogger).format(pool: pool, id: 1, size: size, scratchDirectory: dir.path + "/tmp")
        // Two shared directories of a few blocks each, then a snapshot of it all as device 2.
        do {
            let v = try Volume(device: pool.openDevice(1, size: size), readOnly: false, logger: quietLogger)
            for name in ["one", "two"] {
                let d = try v.mkdir(parent: v.rootInode, name: name, mode: 0o777, owner: .root)
                for i in 0..<500 { _ = try v.mknod(parent: d.ino, name: "old-\(i)", mode: 0o100644, rdev: 0, owner: .root) }
            }
            try v.close()
        }
        try pool.commit()
        try pool.message(.createSnap(2, origin: 1))
        let origin = try Volume(device: pool.openDevice(1, size: size), readOnly: false, logger: quietLogger)
        let snapshot = try Volume(device: pool.openDevice(2, size: size), readOnly: false, logger: quietLogger)
        let writer = try Served(origin, at: dir.path + "/writer")
        let checker = try Served(origin, at: dir.path + "/checker")
        let other = try Served(snapshot, at: dir.path + "/snapshot")
        let mounts = [writer, checker, other]
        var closed = false
        defer { if !closed { for m in mounts { m.close() } } }

        // Through the snapshot's mount first, so its cache of "one" and "two" is built and then
        // must stay the snapshot's own.
        let snapshotOld = Self.inode(other.path + "/one/old-7")
        #expect(snapshotOld.errno == 0)

        let threads = 4, rounds = 150
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            func fail(_ s: String) { failures.withLock { $0.append("thread \(t): \(s)") } }
            func w(_ rel: String) -> String { writer.path + "/" + rel }
            func c(_ rel: String) -> String { checker.path + "/" + rel }
            for r in 0..<rounds {
                let id = "t\(t)-r\(r)"
                // Through the writer: create, hard-link across, rename across, unlink the link,
                // rename within a directory, then swap two names across directories.
                guard Sys.writeFile(w("one/f-\(id)"), Array(id.utf8)) == 0 else { fail("create \(id): \(errno)"); continue }
                let ino = Self.inode(w("one/f-\(id)")).ino
                if link(w("one/f-\(id)"), w("two/l-\(id)")) != 0 { fail("link \(id): \(errno)") }
                if Glibc.rename(w("one/f-\(id)"), w("two/r-\(id)")) != 0 { fail("rename \(id): \(errno)") }
                if unlink(w("two/l-\(id)")) != 0 { fail("unlink \(id): \(errno)") }
                if Glibc.rename(w("two/r-\(id)"), w("two/s-\(id)")) != 0 { fail("rename within \(id): \(errno)") }
                guard Sys.writeFile(w("one/x-\(id)"), Array("x".utf8)) == 0 else { fail("create x \(id): \(errno)"); continue }
                let xIno = Self.inode(w("one/x-\(id)")).ino
                if LibC.rename(w("one/x-\(id)"), w("two/s-\(id)"), flags: LibC.renameExchange) != 0 { fail("exchange \(id)") }

                // Through the checker, each name for the first time: a LOOKUP the cache answers.
                for gone in ["one/f-\(id)", "two/l-\(id)", "two/r-\(id)"] where Self.inode(c(gone)).errno != ENOENT {
                    fail("\(gone) is still found after it was renamed or unlinked")
                }
                let s = Self.inode(c("two/s-\(id)")), x = Self.inode(c("one/x-\(id)"))
                if s.errno != 0 || s.ino != xIno { fail("two/s-\(id) is \(s), expected inode \(xIno) after the exchange") }
                if x.errno != 0 || x.ino != ino || x.nlink != 1 { fail("one/x-\(id) is \(x), expected inode \(ino) with one link") }
                if Sys.readFile(c("one/x-\(id)")) != Array(id.utf8) { fail("one/x-\(id) does not hold \(id)") }
                // Nothing of it shows in the snapshot, whose inode numbers are the same.
                for name in ["one/f-\(id)", "one/x-\(id)", "two/s-\(id)"] where Self.inode(other.path + "/" + name).errno != ENOENT {
                    fail("the snapshot sees \(name)")
                }
            }
        }
        let problems = failures.withLock { $0 }
        #expect(problems.isEmpty, "\(problems.prefix(20).joined(separator: "\n"))")
        // The snapshot still has the names the origin had when it was taken, and the origin's
        // change of one of them does not reach it.
        #expect(unlink(writer.path + "/one/old-7") == 0)
        #expect(Self.inode(checker.path + "/one/old-7").errno == ENOENT)
        let stillThere = Self.inode(other.path + "/one/old-7")
        #expect(stillThere.errno == 0 && stillThere.ino == snapshotOld.ino)

        for m in mounts { m.close() }
        closed = true
        try origin.close()
        try snapshot.close()
        try pool.commit()
        for id: ThinDeviceID in [1, 2] {
            let image = dir.path + "/dev\(id).img"
            let out = try FileBlockDevice.create(path: FilePath(image), size: size)
            try pool.openDevice(id, size: size).copy(to: out, length: size)
            let fsck = try Oracle.run("/sbin/e2fsck", ["-fn", image])
            #expect(fsck.status == 0, "device \(id): \(fsck.stdout)")
        }
    }
}
