import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `thinfs serve` end to end, through the built binary: the CLI goes through it, it stays up
/// with no mount, SIGTERM unmounts and commits, SIGKILL loses nothing fsynced and a restart
/// cleans the dead mount, and a second owner of the root is refused naming the first.
@Suite("thinfs serve",
       .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available,
                "needs /dev/fuse, root, mke2fs, thin_check and the built binaries"),
       .serialized)
struct ServeTests {
    typealias Failure = LayerFixture.Failure

    /// Starts serve, makes an image layer and a container from it, mounts, writes, unmounts:
    /// every command went through serve (no thinfs-mount daemon started, no "open by another
    /// process"), and serve is still up, answering `thinfs info`.
    @Test func servesTheCLIAndStaysUpWithNoMount() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        // The store's own options are accepted again.
        let serve = try ServeProcess(root: f.root, arguments: ["--storage-opt", "dm.basesize=256M"])
        defer { serve.tearDown() }
        try serve.waitReady()

        try f.ok(["layer", "create", "img"])
        try f.ok(["layer", "create-rw", "c1", "--parent", "img"])
        let mnt = f.mountpoint("c1")
        try f.ok(["mount", "c1", mnt])
        #expect(f.daemons().isEmpty, "thinfs mount started its own daemon instead of asking serve: \(f.daemons())")
        #expect(FUSESource.at(mnt) == "thinfs:\(f.root):c1")
        let bytes = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        #expect(Sys.writeFile(mnt + "/hello.bin", bytes) == 0)
        #expect(Sys.readFile(mnt + "/hello.bin") == bytes)
        try f.ok(["umount", mnt])
        #expect(!Host.isMounted(mnt))

        // No mount left: serve stays and answers.
        usleep(500_000)
        #expect(serve.isRunning, "serve exited after the last unmount:\n\(serve.log)")
        let info = try f.run(["info"])
        #expect(info.status == 0, "\(info.stderr)")
        #expect(info.stdout.contains(f.root), "\(info.stdout)")
        let ls = try f.run(["layer", "ls"])
        #expect(ls.status == 0 && ls.stdout.contains("c1"), "\(ls.stdout)\(ls.stderr)")
        #expect(!ls.stderr.contains("another process"))

        let status = try serve.stop(SIGTERM)
        #expect(status == .exited(0), "serve: \(status)\n\(serve.log)")
        #expect(!FileManager.default.fileExists(atPath: LayerFixture.controlSocket(f.root)))
        #expect(try Oracle.check(f.metadata))
        try f.expectNoLeaks()
    }

    /// SIGTERM with a container mounted: the mount goes, serve exits 0, the pool is clean, and
    /// the file is there after a restart.
    @Test func sigtermUnmountsAndCommits() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        var serve = try ServeProcess(root: f.root)
        defer { serve.tearDown() }
        try serve.waitReady()
        try f.ok(["layer", "create", "img"])
        try f.ok(["layer", "create-rw", "c1", "--parent", "img"])
        let mnt = f.mountpoint("c1")
        try f.ok(["mount", "c1", mnt])
        let bytes = Array("written before SIGTERM, never fsynced\n".utf8)
        #expect(Sys.writeFile(mnt + "/note.txt", bytes) == 0)

        let status = try serve.stop(SIGTERM)
        #expect(status == .exited(0), "serve: \(status)\n\(serve.log)")
        #expect(!Host.isMounted(mnt), "the mount outlived serve")
        #expect(try Oracle.check(f.metadata))

        serve.tearDown()
        serve = try ServeProcess(root: f.root)
        try serve.waitReady()
        try f.ok(["mount", "c1", mnt])
        #expect(Sys.readFile(mnt + "/note.txt") == bytes)
        try f.ok(["umount", mnt])
        #expect(try serve.stop(SIGTERM) == .exited(0), "\(serve.log)")
        #expect(try Oracle.check(f.metadata))
        try f.expectNoLeaks()
    }

    /// SIGKILL with an fsynced file in a mounted container leaves a dead FUSE mount (ENOTCONN).
    /// A new serve detaches it and says so; the file's bytes are intact after a remount, and
    /// thin_check and e2fsck find the pool and the container's ext4 clean.
    @Test func sigkillThenRestartCleansTheStaleMount() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        var serve = try ServeProcess(root: f.root)
        defer { serve.tearDown() }
        try serve.waitReady()
        try f.ok(["layer", "create", "img"])
        try f.ok(["layer", "create-rw", "c1", "--parent", "img"])
        let mnt = f.mountpoint("c1")
        try f.ok(["mount", "c1", mnt])
        var rng = SeededRandom(seed: 12)
        let bytes = (0..<(3 << 20)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let fd = open(mnt + "/durable.bin", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        try #require(fd >= 0)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        #expect(written == bytes.count)
        #expect(fsync(fd) == 0)
        close(fd)

        let status = try serve.stop(SIGKILL)
        #expect(status == .signalled(SIGKILL))
        var st = stat()
        let (rc, error) = (stat(mnt, &st), errno)
        #expect(rc != 0 && (error == ENOTCONN || error == ECONNABORTED), "the killed daemon's mount is not dead (ENOTCONN): \(rc), errno \(error)")
        #expect(Host.isMounted(mnt))

        serve.tearDown()
        serve = try ServeProcess(root: f.root)
        try serve.waitReady()
        #expect(!Host.isMounted(mnt), "the restarted serve left the dead mount at \(mnt)")
        #expect(serve.log.contains("stale FUSE mount") && serve.log.contains(mnt), "serve did not log the stale mount:\n\(serve.log)")
        try f.ok(["mount", "c1", mnt])
        #expect(Sys.readFile(mnt + "/durable.bin") == bytes, "the fsynced file changed across SIGKILL")
        try f.ok(["umount", mnt])
        #expect(try serve.stop(SIGTERM) == .exited(0), "\(serve.log)")

        #expect(try Oracle.check(f.metadata))
        let fsck = try f.checkFilesystem("c1", length: "256M").fsck
        #expect(fsck.status == 0, "e2fsck: \(fsck.stdout)\(fsck.stderr)")
        try f.expectNoLeaks()
    }

    /// The on-demand daemon (`thinfs mount` with no serve) is the same daemon: killed with
    /// SIGKILL, it leaves a dead mount, which the next one detaches, so the layer mounts again
    /// at the same place (before: "mount point ... is busy"), and its busy-lock record goes.
    @Test func aKilledMountDaemonsDeadMountIsCleanedByTheNext() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        try f.ok(["layer", "create", "img"])
        let mnt = f.mountpoint("img")
        try f.ok(["mount", "img", mnt])
        let killed = try #require(f.daemons().first)
        kill(killed, SIGKILL)
        #expect(eventually(10) { Binaries.exited(killed) })
        var st = stat()
        let (rc, error) = (stat(mnt, &st), errno)
        // A dead FUSE connection: ENOTCONN, or ECONNABORTED once the kernel counts it aborted.
        #expect(rc != 0 && (error == ENOTCONN || error == ECONNABORTED), "stat \(mnt): \(rc), errno \(error)")

        let again = try f.run(["mount", "img", mnt])
        #expect(again.status == 0, "\(again.stderr)")
        #expect(stat(mnt + "/lost+found", &st) == 0, "the remounted layer does not answer")
        let records = (try? FileManager.default.contentsOfDirectory(atPath: f.root + "/locks")) ?? []
        #expect(!records.contains { $0.contains(".holder.\(killed).") }, "the killed daemon's busy-lock record is left: \(records)")
        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        try f.expectNoLeaks()
    }

    /// A root has one owner: a second serve, or a serve while `thinfs mount`'s daemon holds the
    /// root, fails naming the root and the holder's pid, and the first goes on serving.
    @Test func aSecondOwnerIsRefusedNamingTheHolder() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        let first = try ServeProcess(root: f.root)
        defer { first.tearDown() }
        try first.waitReady()
        let second = try Binaries.run("thinfs", ["serve", "--root", f.root])
        #expect(second.status != 0)
        #expect(second.stderr.contains(f.root) && second.stderr.contains("pid \(first.pid)"), "\(second.stderr)")
        #expect(first.isRunning)
        #expect(try f.run(["info"]).status == 0)
        #expect(try first.stop(SIGTERM) == .exited(0), "\(first.log)")

        // The transient daemon `thinfs mount` starts holds the root too.
        try f.ok(["layer", "create", "img"])
        let mnt = f.mountpoint("img")
        try f.ok(["mount", "img", mnt])
        let daemon = try #require(f.daemons().first)
        let refused = try Binaries.run("thinfs", ["serve", "--root", f.root])
        #expect(refused.status != 0)
        #expect(refused.stderr.contains(f.root) && refused.stderr.contains("pid \(daemon)"), "\(refused.stderr)")
        #expect(refused.stderr.contains("thinfs-mount"), "\(refused.stderr)")
        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        try f.expectNoLeaks()
    }

    /// On a root with no store, serve makes one with the given options; on a root with one, an
    /// option that would change it is refused naming the key, and nothing changes.
    @Test func storageOptionsInitializeOrMustMatch() throws {
        let dir = TempDir()
        let root = dir.path + "/root"
        let options = ["dm.basesize=128M", "dm.loopdatasize=1G", "dm.loopmetadatasize=16M", "dm.use_deferred_deletion=true"]
        let serve = try ServeProcess(root: root, arguments: options.flatMap { ["--storage-opt", $0] })
        defer { serve.tearDown() }
        try serve.waitReady()
        // The store has the options it was made with (the options are the --storage-opt ones).
        let info = try Binaries.run("thinfs", ["info", "--root", root])
        #expect(info.status == 0, "\(info.stderr)")
        #expect(info.stdout.contains("Base Device Size: 134.22 MB"), "\(info.stdout)")
        #expect(info.stdout.contains("Deferred Deletion Enabled: true"), "\(info.stdout)")
        #expect(try serve.stop(SIGTERM) == .exited(0), "\(serve.log)")

        let shrink = try Binaries.run("thinfs", ["serve", "--root", root, "--storage-opt", "dm.basesize=64M"])
        #expect(shrink.status != 0)
        #expect(shrink.stderr.contains("dm.basesize") && shrink.stderr.contains(root) && shrink.stderr.contains("128M")
                && shrink.stderr.contains("64M"), "\(shrink.stderr)")
        let deletion = try Binaries.run("thinfs", ["serve", "--root", root, "--storage-opt", "dm.use_deferred_deletion=false"])
        #expect(deletion.status != 0 && deletion.stderr.contains("dm.use_deferred_deletion"), "\(deletion.stderr)")
        let unknown = try Binaries.run("thinfs", ["serve", "--root", root, "--storage-opt", "dm.nosuchkey=1"])
        #expect(unknown.status != 0 && unknown.stderr.contains("dm.nosuchkey"), "\(unknown.stderr)")
        // The refused starts released the root: a plain serve starts.
        let again = try ServeProcess(root: root)
        defer { again.tearDown() }
        try again.waitReady()
        #expect(try again.stop(SIGTERM) == .exited(0), "\(again.log)")

        // A bigger dm.basesize grows the base device, as dockerd's devicemapper did: layers made
        // from the base afterwards have the new size; one made before keeps its own.
        let old = try Binaries.run("thinfs", ["layer", "create", "old", "--root", root])
        #expect(old.status == 0, "\(old.stderr)")
        let grown = try ServeProcess(root: root, arguments: ["--storage-opt", "dm.basesize=256M"])
        defer { grown.tearDown() }
        try grown.waitReady()
        let made = try Binaries.run("thinfs", ["layer", "create", "new", "--root", root])
        #expect(made.status == 0, "\(made.stderr)")
        let grownInfo = try Binaries.run("thinfs", ["info", "--root", root])
        #expect(grownInfo.stdout.contains("Base Device Size: 268.44 MB"), "\(grownInfo.stdout)")
        let listing = try Binaries.run("thinfs", ["layer", "ls", "--json", "--root", root])
        let rows = try JSONSerialization.jsonObject(with: Data(listing.stdout.utf8)) as? [[String: Any]] ?? []
        let sizes = Dictionary(uniqueKeysWithValues: rows.compactMap { row in (row["id"] as? String).map { ($0, row["size"] as? Int) } })
        #expect(sizes["old"] == 128 << 20 && sizes["new"] == 256 << 20, "\(listing.stdout)")
        #expect(try grown.stop(SIGTERM) == .exited(0), "\(grown.log)")
        // The base device's filesystem has grown with it: e2fsck and dumpe2fs judge the new layer's.
        let device = rows.first { $0["id"] as? String == "new" }?["deviceID"] as? Int ?? -1
        let (fsck, bytes) = try LayerFixture.checkFilesystem(root: root, device: device, length: "256M", image: dir.path + "/new.img")
        #expect(fsck.status == 0, "e2fsck: \(fsck.stdout)\(fsck.stderr)")
        #expect(bytes == 256 << 20, "the new layer's filesystem has \(String(describing: bytes)) bytes")
        // The smaller size, now refused against the grown base.
        let smaller = try Binaries.run("thinfs", ["serve", "--root", root, "--storage-opt", "dm.basesize=128M"])
        #expect(smaller.status != 0 && smaller.stderr.contains("256M") && smaller.stderr.contains("128M"), "\(smaller.stderr)")
    }
}

extension LayerFixture {
    static func controlSocket(_ root: String) -> String { root + "/control.sock" }
}

enum FUSESource {
    /// The source /proc/mounts shows for the mount at `path`.
    static func at(_ path: String) -> String? {
        guard let text = Host.procFile("/proc/mounts") else { return nil }
        var source: String?
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ")
            if fields.count > 2, fields[1] == path { source = String(fields[0]) }
        }
        return source
    }
}

/// A `thinfs serve` child with its stderr in a file and a systemd notification socket
/// (`NOTIFY_SOCKET`), which it must answer READY=1 on once it serves. Stopped by pid.
final class ServeProcess {
    enum Exit: Equatable, CustomStringConvertible {
        case exited(Int32), signalled(Int32)
        var description: String {
            switch self {
            case .exited(let code): "exited with status \(code)"
            case .signalled(let signal): "killed by signal \(signal)"
            }
        }
    }

    let process = Process()
    let root: String
    let logPath: String
    let notifyPath: String
    private let notifyFD: Int32
    var pid: pid_t { process.processIdentifier }
    var isRunning: Bool { process.isRunning }
    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// `umask`: serve starts under this umask (through sh, which execs it: the pid is serve's).
    init(root: String, arguments: [String] = [], umask: mode_t? = nil) throws {
        self.root = root
        let id = UUID().uuidString.prefix(8)
        logPath = NSTemporaryDirectory() + "thinfs-serve-\(id).log"
        // sun_path holds 108 bytes: a short path in /tmp.
        notifyPath = "/tmp/thinfs-notify-\(id).sock"
        notifyFD = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard notifyFD >= 0 else { throw LayerFixture.Failure("socket: errno \(errno)") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in notifyPath.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(notifyFD, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw LayerFixture.Failure("bind \(notifyPath): errno \(errno)") }
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let command = [Binaries.path("thinfs"), "serve", "--root", root, "--log-level", "info"] + arguments
        if let umask {
            process.executableURL = URL(fileURLWithPath: "/bin/sh")
            process.arguments = ["-c", "umask \(String(umask, radix: 8)) && exec \"$@\"", "sh"] + command
        } else {
            process.executableURL = URL(fileURLWithPath: command[0])
            process.arguments = Array(command.dropFirst())
        }
        var environment = ProcessInfo.processInfo.environment
        environment["NOTIFY_SOCKET"] = notifyPath
        process.environment = environment
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle(forWritingAtPath: logPath)
        try process.run()
    }

    /// Waits for READY=1 on the notification socket; then the control socket must accept.
    func waitReady(seconds: Int = 60) throws {
        var timeout = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(notifyFD, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let deadline = Date().addingTimeInterval(TimeInterval(seconds))
        var buffer = [UInt8](repeating: 0, count: 4096)
        while Date() < deadline {
            let n = buffer.withUnsafeMutableBytes { recv(notifyFD, $0.baseAddress, $0.count, 0) }
            if n > 0 {
                let message = String(decoding: buffer[0..<n], as: UTF8.self)
                if message.split(separator: "\n").contains("READY=1") {
                    #expect(message.contains("MAINPID=\(pid)"), "\(message)")
                    #expect(ControlProbe.accepts(LayerFixture.controlSocket(root)), "READY=1 before the control socket accepts")
                    return
                }
                continue
            }
            guard process.isRunning else { throw LayerFixture.Failure("serve exited before it was ready:\n\(log)") }
        }
        throw LayerFixture.Failure("serve sent no READY=1 within \(seconds) s:\n\(log)")
    }

    /// Sends `signal` and waits for the exit.
    func stop(_ signal: Int32, seconds: Double = 60) throws -> Exit {
        kill(pid, signal)
        guard eventually(seconds, { !process.isRunning }) else {
            throw LayerFixture.Failure("serve (pid \(pid)) did not exit within \(Int(seconds)) s of signal \(signal):\n\(log)")
        }
        let status: Int32 = process.terminationStatus
        if process.terminationReason == .uncaughtSignal { return .signalled(status) }
        return .exited(status)
    }

    /// Stops it if it still runs (SIGTERM, then SIGKILL), by pid; removes its files.
    func tearDown() {
        if process.isRunning {
            kill(pid, SIGTERM)
            if !eventually(20, { !process.isRunning }) { kill(pid, SIGKILL) }
            _ = eventually(10) { !process.isRunning }
        }
        close(notifyFD)
        unlink(notifyPath)
        unlink(logPath)
    }
}

enum ControlProbe {
    /// Whether something accepts connections on the unix socket at `path`.
    static func accepts(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() where i < raw.count - 1 { raw[i] = b }
        }
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        } == 0
    }
}
