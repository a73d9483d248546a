import Foundation
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS
@testable import ThinFSFUSE
#if canImport(Glibc)
import Glibc
#endif

/// A FUSE mount whose daemon has gone answers ENOTCONN (on this 6.18 kernel, also to a request
/// queued when the daemon died), and ECONNABORTED to a request the daemon had read and not
/// answered when the connection was aborted. Both mean a dead mount, not a mount point we cannot
/// examine.
@Suite("Dead FUSE mounts", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available,
                "needs /dev/fuse, root, mke2fs, thin_check and the built binaries"))
struct DeadMountTests {
    /// A path in a mount, looked up while its daemon is stopped and then killed: reported as a
    /// dead mount naming the path.
    @Test func aRequestCutOffByTheDaemonsDeathIsADeadMount() throws {
        let f = try LayerFixture(deferredDeletion: false, options: ["dm.basesize=64M", "dm.loopdatasize=1G", "dm.loopmetadatasize=32M"])
        defer { f.tearDown() }
        try f.ok(["layer", "create", "img"])
        let mnt = f.mountpoint("img")
        try f.ok(["mount", "img", mnt])
        let daemon = try #require(f.daemons().first)
        var killed = false
        defer {
            if !killed { kill(daemon, SIGKILL) }
            umount2(mnt, Int32(MNT_DETACH))
        }

        // Stopped, the daemon reads no request: the lookup waits in the kernel.
        kill(daemon, SIGSTOP)
        let target = mnt + "/never-looked-up"
        let (outcome, done) = Self.checkMountpointOnAThread(target)
        // The request is queued once one of our threads waits for its answer.
        let waiting = eventually(10) { Self.threadsWaitingForFUSE() > 0 }
        #expect(waiting, "no thread of the test waits in request_wait_answer")
        kill(daemon, SIGKILL)
        killed = true
        #expect(eventually(20) { Binaries.exited(daemon) })
        try #require(done.wait(timeout: .now() + 20) == .success, "checkMountpoint did not return after the daemon died")

        let result = try #require(outcome.withLock { $0 })
        switch result {
        case .failure(.deadMount(let path)):
            #expect(path == target)
        default:
            Issue.record("a lookup cut off by the daemon's death (ECONNABORTED) is not reported as a dead mount: \(result)")
        }
        // New requests on the dead connection: ENOTCONN, a dead mount too.
        #expect(throws: FUSEServer.Error.self) { try FUSEServer.checkMountpoint(mnt + "/other", allowNonEmpty: true) }
    }

    /// A lookup the server has read and not answered when the connection is aborted
    /// (/sys/fs/fuse/connections/N/abort, mounting fusectl there for the test if the host has
    /// not): the stat in checkMountpoint gets ECONNABORTED, which must be reported as a dead
    /// mount naming the path (before: "cannot be examined: Software caused connection abort").
    @Test func aRequestCutOffByAnAbortIsADeadMount() throws {
        let connections = "/sys/fs/fuse/connections"
        let mountedFusectl = !Host.isMounted(connections)
        if mountedFusectl { try #require(mount("fusectl", connections, "fusectl", 0, nil) == 0, "mount fusectl: errno \(errno)") }
        defer { if mountedFusectl { umount2(connections, Int32(MNT_DETACH)) } }

        let volume = MemoryVolume()
        _ = try volume.mkdir(parent: volume.rootInode, name: "below", mode: 0o755, owner: .root)
        let m = try TestMount(volume: volume)
        defer {
            volume.lookupRelease.signal()
            m.tearDown()
            #expect(!Host.isMounted(m.path), "\(m.path) is still mounted")
        }
        let entry = try #require(MountTable.current().entry(at: m.path), "\(m.path) is not in /proc/self/mountinfo")
        volume.heldLookup.withLock { $0 = "below" }

        let target = m.path + "/below"
        let (outcome, done) = Self.checkMountpointOnAThread(target)
        try #require(volume.lookupArrived.wait(timeout: .now() + 10) == .success, "the lookup of 'below' never reached the server")
        #expect(FUSEServer.abortConnection(device: entry.device), "could not abort the connection through \(connections)")
        let returned = done.wait(timeout: .now() + 10) == .success
        volume.lookupRelease.signal()
        try #require(returned, "checkMountpoint did not return after the abort")

        let result = try #require(outcome.withLock { $0 })
        switch result {
        case .failure(.deadMount(let path)):
            #expect(path == target)
        default:
            Issue.record("a lookup cut off by the abort (ECONNABORTED) is not reported as a dead mount: \(result)")
        }
    }

    /// The kernel answers ECONNABORTED to a request it ended on aborting a connection
    /// (fuse_abort_conn; kernels differ in which requests get it: this 6.18 kernel answered
    /// ENOTCONN in both cases above). Either is a dead mount.
    @Test func bothErrnosOfADeadConnectionAreADeadMount() {
        for e in [Errno.socketNotConnected, .connectionAbort] {
            guard case .deadMount("/mnt/x") = FUSEServer.statFailure("/mnt/x", e) else {
                Issue.record("stat failing with \(e) is not a dead mount: \(FUSEServer.statFailure("/mnt/x", e))")
                continue
            }
        }
    }

    /// `FUSEServer.checkMountpoint(target)` on a thread of its own (its stat may wait in the
    /// kernel for the daemon): its result once `done` is signalled.
    static func checkMountpointOnAThread(_ target: String) -> (outcome: Locked<Result<String, FUSEServer.Error>?>, done: DispatchSemaphore) {
        let outcome = Locked<Result<String, FUSEServer.Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        Thread {
            let result: Result<String, FUSEServer.Error>
            do throws(FUSEServer.Error) {
                result = .success(try FUSEServer.checkMountpoint(target, allowNonEmpty: true))
            } catch {
                result = .failure(error)
            }
            outcome.withLock { $0 = result }
            done.signal()
        }.start()
        return (outcome, done)
    }

    /// Threads of this process in the kernel's wait for a FUSE answer (/proc/self/task/*/wchan).
    static func threadsWaitingForFUSE() -> Int {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        return tasks.filter { tid in
            let wchan = (try? String(contentsOfFile: "/proc/self/task/\(tid)/wchan", encoding: .utf8)) ?? ""
            return wchan.contains("request_wait_answer") || wchan.hasPrefix("fuse_")
        }.count
    }
}
