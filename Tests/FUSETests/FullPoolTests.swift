import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A mounted container that writes more than its userspace pool holds (issue 10): the writer
/// hears ENOSPC, `rm` of the big file inside the full container works and frees the space, and
/// after the unmount the container's ext4 is clean by `e2fsck -fn` and the pool by thin_check.
@Suite("A full pool under a mounted container", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available,
                "needs /dev/fuse, root, the built binaries and thin-provisioning-tools"))
struct FullPoolTests {
    @Test func fillingThePoolThroughAMountLeavesACleanFilesystemAndRmFreesIt() throws {
        // A 128M pool under a 512M filesystem: the filesystem never runs out, the pool does.
        let f = try LayerFixture(deferredDeletion: false,
                                 options: ["dm.basesize=512M", "dm.loopdatasize=128M", "dm.loopmetadatasize=32M", "dm.min_free_space=0"])
        defer { f.tearDown() }
        try f.ok(["layer", "create", "img"])
        try f.ok(["layer", "create-rw", "c1", "--parent", "img"])
        let device = try f.layerDevice("c1")
        let mnt = f.mountpoint("c1")
        try f.ok(["mount", "c1", mnt])

        // Twice the pool, 1 MiB at a time, as dd would. The error may come at write(2), at
        // fsync(2) or at close(2) (the mount's writeback cache acknowledges write(2) first).
        let chunk = [UInt8](repeating: 0xa5, count: 1 << 20)
        let fd = open(mnt + "/big", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        try #require(fd >= 0, "open: \(String(cString: strerror(errno)))")
        var failure: (call: String, errno: Int32)?
        for _ in 0..<256 {
            let n = chunk.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n < 0 { failure = ("write", errno); break }
        }
        if fsync(fd) != 0, failure == nil { failure = ("fsync", errno) }
        if close(fd) != 0, failure == nil { failure = ("close", errno) }
        let reported = try #require(failure, "256 MiB went into a 128M pool with no error")
        #expect(reported.errno == ENOSPC, "\(reported.call) failed with \(String(cString: strerror(reported.errno)))")

        // The full container frees space from inside: rm works, and a new file fits afterwards.
        #expect(unlink(mnt + "/big") == 0, "rm in the full container: \(String(cString: strerror(errno)))")
        let after = (0..<(8 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let wfd = open(mnt + "/after", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        try #require(wfd >= 0)
        let wrote = after.withUnsafeBytes { Glibc.write(wfd, $0.baseAddress, $0.count) }
        let synced = fsync(wfd) == 0 ? 0 : errno
        let closed = close(wfd) == 0 ? 0 : errno
        #expect(wrote == after.count && synced == 0 && closed == 0,
                "8 MiB after the rm: wrote \(wrote), fsync \(synced), close \(closed)")

        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        let image = f.dir.path + "/c1.img"
        let export = try LayerFixture.shell("\(Binaries.path("thinfs")) dev read --root \(f.root) \(device) --length 512M > \(image)")
        #expect(export.status == 0, "\(export.stderr)")
        // -n answers every question "no"; a clean filesystem asks none (e2fsck exits 0 even for
        // a wrong free-blocks count, so its questions are checked too).
        let fsck = try LayerFixture.shell("/sbin/e2fsck -fn \(image)")
        #expect(fsck.status == 0 && !fsck.stdout.contains("Fix? no"), "e2fsck -fn: \(fsck.stdout)\(fsck.stderr)")
        #expect(try Oracle.check(f.metadata))

        // What was acknowledged after the rm is on the device.
        try f.ok(["mount", "c1", mnt, "--ro"])
        let back = Sys.readFile(mnt + "/after")
        let same = back == after
        #expect(same, "the file written after the rm reads back different (\(back?.count ?? -1) bytes)")
        #expect(Sys.readFile(mnt + "/big") == nil)
        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        try f.expectNoLeaks()
    }
}
