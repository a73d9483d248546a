import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The cluster stopping under a mount (issue 16): a container layer on RBD, FUSE-mounted and
/// written, while the cluster's daemons are stopped by PID. What is asked of the mount: a clear
/// EIO within a bounded time (rbd.osd_timeout, rbd.mon_timeout), never a hang or a crash of
/// the daemon; and once the cluster is back, the mount works again, the fsynced data is
/// intact, and e2fsck -fn of the container's image (exported by Ceph) is clean.
///
/// The test owns a cluster of its own, on 127.0.0.2 (scripts/ceph/cluster.sh with
/// THINFS_CEPH_ADDR): the other RBD suites run at the same time on the 127.0.0.1 one, which
/// must not go down under them. Gated like them on the CI step's cluster being up.
@Suite("RBD cluster outage", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && LayerFixture.canMakeImage && Ceph.available,
                "needs /dev/fuse, root, the built binaries, busybox-static and a Ceph test cluster (the reason is printed)"))
struct RBDOutageTests {
    static let address = "127.0.0.2"
    /// The bound the test asks of the store (rbd.osd_timeout, rbd.mon_timeout), in seconds.
    static let timeout = 4.0
    /// How long past it an error may take: librbd's retries and the FUSE round trips.
    static let slack = 16.0

    /// `body` on a thread of its own: its result and how long it took, or nil for the result
    /// when it had not returned after `seconds` (a hang; the caller then kills the daemon,
    /// which ends the FUSE request, and waits for the thread with `finish`).
    final class Timed<T: Sendable>: @unchecked Sendable {
        private let done = DispatchSemaphore(value: 0)
        private var value: T?
        private let started = Date()
        private(set) var seconds = 0.0

        init(_ body: @escaping @Sendable () -> T) {
            Thread.detachNewThread { [self] in
                let v = body()
                value = v
                seconds = Date().timeIntervalSince(started)
                done.signal()
            }
        }

        func wait(_ limit: Double) -> T? {
            done.wait(timeout: .now() + limit) == .success ? value : nil
        }
    }

    /// Writes `bytes` to a new file and fsyncs it: 0, or the errno of the first call that failed.
    static func writeAndSync(_ path: String, _ bytes: [UInt8]) -> Int32 {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { return errno }
        defer { close(fd) }
        let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        guard n == bytes.count else { return n < 0 ? errno : EIO }
        return fsync(fd) == 0 ? 0 : errno
    }

    static func payload(_ seed: UInt32, _ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: (UInt32(truncatingIfNeeded: $0) &+ seed) &* 2_654_435_761 >> 11) }
    }

    @Test func clusterStopsUnderAMountThenReturns() throws {
        let prefix = Ceph.uniquePrefix("outage")
        let scratch = TempDir()
        let cluster = CephCluster(dir: scratch.path + "/ceph", address: Self.address)
        defer { cluster.stop() }
        try cluster.start()
        let f = try LayerFixture(deferredDeletion: false, options: [
            "thinfs.backend=rbd", "rbd.conf=\(cluster.conf)", "rbd.pool=rbd", "rbd.prefix=\(prefix)", "dm.basesize=256M",
            "rbd.osd_timeout=\(Int(Self.timeout))", "rbd.mon_timeout=\(Int(Self.timeout))",
        ])
        defer { f.tearDown() }

        let top = try RBDLayerStoreTests.importImage(f)
        try f.ok(["layer", "create-rw", "c1", "--parent", top])
        let container = "\(prefix)\(try f.layerDevice("c1"))"
        let mnt = f.mountpoint("c1")
        try f.ok(["mount", "c1", mnt])
        let before = Self.payload(1, 3 << 20)
        #expect(Self.writeAndSync(mnt + "/before", before) == 0)
        let daemons = f.daemons()
        try #require(daemons.count == 1, "\(daemons)")

        // The cluster goes away under the mount.
        try cluster.halt()
        let bound = Self.timeout + Self.slack
        let during = Timed { Self.writeAndSync(mnt + "/during", Self.payload(2, 1 << 20)) }
        let result = during.wait(bound)
        if let result {
            #expect(result == EIO, "write and fsync with the cluster down: errno \(result) (\(String(cString: strerror(result)))), not EIO, after \(String(format: "%.1f", during.seconds)) s")
            print("RBDOutageTests: write and fsync with the cluster down failed (errno \(result)) after \(String(format: "%.1f", during.seconds)) s")
        } else {
            Issue.record("write and fsync with the cluster down hung: no answer after \(bound) s (rbd.osd_timeout=\(Int(Self.timeout)))")
        }
        // A read of data the kernel no longer caches: the bytes or EIO, in bounded time.
        _ = try LayerFixture.shell("echo 3 > /proc/sys/vm/drop_caches")
        let read = Timed { () -> Int32 in
            let fd = open(mnt + "/before", O_RDONLY)
            guard fd >= 0 else { return errno }
            defer { close(fd) }
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            while true {
                let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
                if n == 0 { return 0 }
                if n < 0 { return errno }
            }
        }
        if let r = read.wait(bound) {
            #expect(r == 0 || r == EIO, "a read with the cluster down: errno \(r) (\(String(cString: strerror(r))))")
        } else {
            Issue.record("a read with the cluster down hung: no answer after \(bound) s")
        }
        for pid in daemons { #expect(!Binaries.exited(pid), "the mount daemon \(pid) died while the cluster was down") }
        if result == nil || read.wait(0) == nil {
            // A hang: end it (killing the daemon ends its FUSE requests), then stop here.
            for pid in daemons { kill(pid, SIGKILL) }
            _ = during.wait(10); _ = read.wait(10)
            return
        }

        // The cluster returns, on the same data: the mount works again.
        try cluster.resume()
        let after = Self.payload(3, 2 << 20)
        let resumed = Date()
        var wrote = Self.writeAndSync(mnt + "/after", after)
        while wrote != 0, Date().timeIntervalSince(resumed) < bound {
            usleep(500_000)
            wrote = Self.writeAndSync(mnt + "/after", after)
        }
        #expect(wrote == 0, "write and fsync after the cluster returned: errno \(wrote) (\(String(cString: strerror(wrote))))")
        #expect(Sys.readFile(mnt + "/before") == before, "the file fsynced before the outage, read after it")
        try f.ok(["umount", mnt])
        try f.waitForDaemons()

        // Ceph's copy of the container's filesystem is clean, and holds both fsynced files.
        let export = f.dir.path + "/c1.img"
        defer { unlink(export) }
        let exported = try Oracle.run("/usr/bin/rbd", ["-c", cluster.conf, "export", "--no-progress", "rbd/\(container)", export])
        #expect(exported.status == 0, "\(exported.stderr)")
        let fsck = try Oracle.run("/sbin/e2fsck", ["-fn", export])
        #expect(fsck.status == 0, "e2fsck -fn of \(container) after the outage:\n\(fsck.stdout)\(fsck.stderr)")
        let mnt2 = f.mountpoint("c1-again")
        try f.ok(["mount", "c1", mnt2])
        #expect(Sys.readFile(mnt2 + "/before") == before)
        #expect(Sys.readFile(mnt2 + "/after") == after)
        try f.ok(["umount", mnt2])
        try f.waitForDaemons()
        for id in ["c1", top] { try f.ok(["layer", "rm", id]) }
        try f.expectNoLeaks()
    }
}
