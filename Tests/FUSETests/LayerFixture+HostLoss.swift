import Foundation
import Glibc
import TestSupport

/// A host lost mid-write, and a cluster command retried until Ceph has expired the dead host's
/// watch: the steps the RBD two-host suites (sharing, netns, forget) share.
extension LayerFixture {
    /// SIGKILLs `daemons` (a host's thinfs processes) and detaches `mountpoint`, as a host that
    /// loses power does. With `whileWriting`, a dd is writing unsynced data into the mount when
    /// the kill comes, so the next writer finds a lock held by a dead client with I/O in flight.
    static func loseHost(_ daemons: [pid_t], mountedAt mountpoint: String, whileWriting: Bool) throws {
        var writer: Process?
        if whileWriting {
            let dd = Process()
            dd.executableURL = URL(fileURLWithPath: "/bin/dd")
            dd.arguments = ["if=/dev/urandom", "of=\(mountpoint)/unsynced", "bs=64k", "count=4096"]
            dd.standardError = FileHandle.nullDevice
            try dd.run()
            usleep(300_000)
            writer = dd
        }
        for pid in daemons { kill(pid, SIGKILL) }
        writer?.waitUntilExit()
        umount2(mountpoint, Int32(MNT_DETACH))
    }

    /// Runs `args` every half second until it succeeds or `seconds` have passed: a take-over or
    /// forget of a dead host waits for Ceph to expire its watch (`osd client watch timeout`).
    /// Returns the last result and how long it took.
    func retryUntilSuccess(_ args: [String], for seconds: TimeInterval = 60) throws -> (result: Oracle.Result, after: TimeInterval) {
        let start = Date()
        var result = try run(args)
        while result.status != 0, Date().timeIntervalSince(start) < seconds {
            usleep(500_000)
            result = try run(args)
        }
        return (result, Date().timeIntervalSince(start))
    }
}
