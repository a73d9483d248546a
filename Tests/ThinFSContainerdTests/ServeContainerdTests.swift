import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import TestSupport
import Testing
import ThinFS
import ThinFSContainerd
#if canImport(Glibc)
import Glibc
#endif

/// `thinfs serve --containerd-socket`, the built binary: ready once the socket accepts, a
/// Prepare mounts through serve's daemon, SIGTERM unmounts, removes the socket and exits 0.
@Suite("thinfs serve --containerd-socket", .serialized,
       .enabled(if: Host.canMountFUSE && ServeBinary.available, "needs root, /dev/fuse and the built thinfs"))
struct ServeContainerdTests {
    @Test func serveHostsTheSnapshotsService() async throws {
        let dir = TempDir()
        let root = dir.path + "/root"
        let socket = dir.path + "/containerd.sock"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: ServeBinary.path)
        p.arguments = ["serve", "--root", root, "--containerd-socket", socket, "--log-level", "warning",
                       "--storage-opt", "dm.basesize=64M", "--storage-opt", "dm.loopdatasize=512M",
                       "--storage-opt", "dm.loopmetadatasize=16M"]
        let log = dir.path + "/serve.log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        p.standardError = FileHandle(forWritingAtPath: log)
        try p.run()
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() } }
        // Ready: the socket exists (serve makes it before it reports ready).
        let deadline = Date(timeIntervalSinceNow: 30)
        while !FileManager.default.fileExists(atPath: socket), p.isRunning, Date() < deadline { usleep(50_000) }
        try #require(FileManager.default.fileExists(atPath: socket), "serve did not listen: \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")

        var source = ""
        try await withGRPCClient(transport: try .http2NIOPosix(target: .unixDomainSocket(path: socket), transportSecurity: .plaintext)) { grpc in
            let c = Client(wrapping: grpc)
            let mounts = try await prepare(c, "k8s.io/1/extract-1 sha256:abc")
            source = mounts[0].source
            #expect(Host.isMounted(source))
            try "x\n".write(toFile: source + "/f", atomically: false, encoding: .utf8)
            try await commit(c, "sha256:abc", key: "k8s.io/1/extract-1 sha256:abc")
            _ = try await prepare(c, "container", parent: "sha256:abc")
            #expect(try await list(c) == ["container", "sha256:abc"])
        }
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0, "\((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
        #expect(!FileManager.default.fileExists(atPath: socket))
        #expect(try String(contentsOfFile: "/proc/mounts", encoding: .utf8).contains(root) == false)
    }
}

/// `thinfs serve` killed (SIGKILL, `THINFS_CRASH_AT`) while a Prepare has made the snapshot's
/// layer and not yet its row: reopening the store deletes that layer (and its thin device), so
/// no layer is left that no snapshot names.
@Suite("containerd snapshots crash recovery", .serialized,
       .enabled(if: Host.canMountFUSE && ServeBinary.available && Oracle.available, "needs root, /dev/fuse, the built thinfs and thin_check"))
struct SnapshotCrashTests {
    @Test(arguments: [
        "create.closed",      // the layer's device committed, its row not yet written
        "snapshot.created",   // the layer made, its snapshot row not yet written
    ])
    func prepareCrashLeavesNoOrphan(point: String) async throws {
        let dir = TempDir()
        let root = dir.path + "/root"
        let socket = dir.path + "/containerd.sock"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: ServeBinary.path)
        p.arguments = ["serve", "--root", root, "--containerd-socket", socket, "--log-level", "warning",
                       "--storage-opt", "dm.basesize=64M", "--storage-opt", "dm.loopdatasize=512M",
                       "--storage-opt", "dm.loopmetadatasize=16M"]
        p.environment = ProcessInfo.processInfo.environment.merging(["THINFS_CRASH_AT": point]) { $1 }
        let log = dir.path + "/serve.log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        p.standardError = FileHandle(forWritingAtPath: log)
        try p.run()
        defer {
            if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
            // A killed serve leaves its FUSE mounts dead: detach them.
            let mounts = (try? String(contentsOfFile: "/proc/mounts", encoding: .utf8)) ?? ""
            for line in mounts.split(separator: "\n") {
                let fields = line.split(separator: " ")
                if fields.count > 1, fields[1].hasPrefix(root + "/") { umount2(String(fields[1]), Int32(MNT_DETACH)) }
            }
        }
        let deadline = Date(timeIntervalSinceNow: 30)
        while !FileManager.default.fileExists(atPath: socket), p.isRunning, Date() < deadline { usleep(50_000) }
        try #require(FileManager.default.fileExists(atPath: socket), "serve did not listen: \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")

        await #expect(throws: (any Error).self, "the crash hook did not fire at \(point)") {
            try await withGRPCClient(transport: try .http2NIOPosix(target: .unixDomainSocket(path: socket), transportSecurity: .plaintext)) { grpc in
                _ = try await prepare(Client(wrapping: grpc), "k8s.io/1/extract-1 sha256:abc")
            }
        }
        let exitDeadline = Date(timeIntervalSinceNow: 10)
        while p.isRunning, Date() < exitDeadline { usleep(50_000) }
        try #require(!p.isRunning, "serve is still running: the crash hook did not fire at \(point)")
        #expect(p.terminationReason == .uncaughtSignal && p.terminationStatus == SIGKILL)

        let store = try LayerStore.open(root: root, logger: quietLogger)
        #expect(try store.allSnapshots().isEmpty)
        let left = try store.allLayers().map(\.id)
        #expect(left.isEmpty, "a layer no snapshot names was left: \(left)")
        #expect(Set(try store.pool.deviceIDs()) == [store.base.deviceID])
        try store.close()
        #expect(try Oracle.check(try store.poolRoot.config().metadata))
    }
}

enum ServeBinary {
    static var path: String {
        let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for candidate in [dir, dir.deletingLastPathComponent()] {
            let p = candidate.appendingPathComponent("thinfs").path
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return dir.appendingPathComponent("thinfs").path
    }

    static var available: Bool {
        FileManager.default.isExecutableFile(atPath: path)
            && ["/sbin/mke2fs", "/usr/sbin/mke2fs"].contains { FileManager.default.isExecutableFile(atPath: $0) }
    }
}
