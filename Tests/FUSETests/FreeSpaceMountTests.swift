import Foundation
import TestSupport
import ThinFS
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Issue 10 as a new user met it: a 200 MiB pool under a 1 GiB base, a container mounted with
/// `thinfs mount` (the thinfs-mount daemon, its VolumeGroup, FUSE), 150 MiB written into it.
/// `df` in the container (statvfs) must say what `thinfs info` says the pool has left, not the
/// ext4's free space, and shrink as the data goes in.
@Suite("Free space in a mounted container", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available,
                "needs /dev/fuse, root, the built binaries and thin-provisioning-tools"))
struct FreeSpaceMountTests {
    /// `thinfs info`'s "Data Space Available", in bytes, and how far its rounding can be off
    /// (it prints two decimals of a decimal unit, as docker info does).
    static func infoAvailable(_ f: LayerFixture) throws -> (bytes: Double, slack: Double) {
        let r = try f.run(["info"])
        guard r.status == 0,
              let line = r.stdout.split(separator: "\n").first(where: { $0.contains("Data Space Available:") }) else {
            throw LayerFixture.Failure("thinfs info has no Data Space Available: \(r.stdout)\(r.stderr)")
        }
        let words = line.split(separator: ":")[1].split(separator: " ")
        let units: [Substring: Double] = ["B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12]
        guard words.count == 2, let value = Double(words[0]), let unit = units[words[1]] else {
            throw LayerFixture.Failure("cannot read '\(line)'")
        }
        return (value * unit, unit == 1 ? 0 : unit / 200)
    }

    /// statvfs(2) of the mount point: f_bavail and f_bfree in bytes.
    static func statvfsBytes(_ path: String) throws -> (available: UInt64, free: UInt64) {
        var st = statvfs()
        guard statvfs(path, &st) == 0 else { throw LayerFixture.Failure("statvfs \(path): errno \(errno)") }
        return (UInt64(st.f_bavail) * UInt64(st.f_frsize), UInt64(st.f_bfree) * UInt64(st.f_frsize))
    }

    @Test func dfInAContainerShowsThePoolsFreeSpace() throws {
        let f = try LayerFixture(deferredDeletion: false, options: ["dm.basesize=1G", "dm.loopdatasize=200M", "dm.loopmetadatasize=16M",
                                                                    "dm.blocksize=64K"])
        defer { f.tearDown() }
        try f.ok(["layer", "create", "img"])
        try f.ok(["layer", "create-rw", "c1", "--parent", "img"])
        let mnt = f.mountpoint("c1")
        try f.ok(["mount", "c1", mnt])
        #expect(Host.isMounted(mnt))

        /// The container's statvfs against the pool's available space from `thinfs info` (through
        /// the daemon's control socket); nothing writes in between. statfs counts whole 4 KiB
        /// ext4 blocks, so it may be up to one block under the pool's bytes.
        // f_bavail leaves out the userspace pool's reserve for metadata, which file data cannot
        // have (as ext4's f_bavail leaves out its root reserve); f_bfree includes it.
        // The pool is the options' 200 MiB in 64 KiB blocks.
        let reserve = Double(UserspaceThinPool.reservedDataBlocks(nrDataBlocks: (200 << 20) / (64 << 10), blockSize: 64 << 10) * (64 << 10))
        #expect(reserve > 0)
        func compare(_ when: String) throws -> UInt64 {
            let df = try Self.statvfsBytes(mnt)
            let pool = try Self.infoAvailable(f)
            for (what, bytes, expected) in [("f_bavail", df.available, pool.bytes - reserve), ("f_bfree", df.free, pool.bytes)] {
                #expect(Double(bytes) <= expected + pool.slack && Double(bytes) + 4096 + pool.slack >= expected,
                        "\(when): \(what) says \(bytes) bytes, thinfs info says the pool has \(pool.bytes), \(reserve) of it reserved")
            }
            return df.available
        }
        let before = try compare("fresh container")
        #expect(before < 200 << 20)

        // 150 MiB in 1 MiB writes, then fsync: the daemon writes it into the pool.
        let fd = open(mnt + "/big", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        #expect(fd >= 0, "open: errno \(errno)")
        if fd >= 0 {
            let chunk = [UInt8](repeating: 0x5a, count: 1 << 20)
            for i in 0..<150 {
                let n = chunk.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                guard n == chunk.count else {
                    Issue.record("write \(i): \(n), errno \(errno)")
                    break
                }
            }
            #expect(fsync(fd) == 0, "fsync: errno \(errno)")
            close(fd)
        }
        let after = try compare("after 150 MiB")
        #expect(before >= after + (150 << 20), "the available space shrank by the data written: \(before) → \(after)")

        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        #expect(try Oracle.check(f.metadata))
        try f.expectNoLeaks()
    }
}
