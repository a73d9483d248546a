import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf
import Synchronization
import TestSupport
import Testing
import ThinFS
@testable import ThinFSContainerd

typealias Client = Containerd_Services_Snapshots_V1_Snapshots.Client<HTTP2ClientTransport.Posix>

/// A store, the daemon that mounts its layers, and the snapshots service on a unix socket in
/// this process, driven by a grpc-swift client over that socket: what containerd's proxy
/// client sends, on the wire.
final class Harness: @unchecked Sendable {
    let dir = TempDir()
    let store: LayerStore
    let daemon: LayerDaemon
    let server: SnapshotServer

    init(options extra: [String] = []) async throws {
        let options = try StorageOptions(parsing: ["dm.basesize=64M", "dm.loopdatasize=512M", "dm.loopmetadatasize=16M"] + extra)
        store = try LayerStore.initialize(root: dir.path + "/store", options: options, logger: quietLogger)
        daemon = LayerDaemon(store: store, logger: quietLogger)
        let service = try SnapshotService(store: store, mounter: .daemon(daemon), logger: quietLogger)
        server = try await SnapshotServer.start(service: service, socketPath: dir.path + "/snapshots.sock")
    }

    /// Runs `body` with a client, then stops the server and unmounts everything, even when
    /// `body` fails.
    func run(_ body: @Sendable (Client) async throws -> Void) async throws {
        do {
            try await withGRPCClient(transport: try .http2NIOPosix(target: .unixDomainSocket(path: server.socketPath),
                                                                   transportSecurity: .plaintext)) { grpc in
                try await body(Client(wrapping: grpc))
            }
        } catch {
            await shutDown()
            throw error
        }
        await shutDown()
    }

    /// e2fsck -fn of layer `id`'s filesystem, copied out of the pool to an image.
    func fsck(_ id: String) throws -> Oracle.Result {
        let layer = try #require(try store.layer(id))
        let image = dir.path + "/\(id).img"
        #expect(FileManager.default.createFile(atPath: image, contents: nil))
        let out = try FileHandle(forWritingTo: URL(fileURLWithPath: image))
        defer { try? out.close() }
        let device = try store.pool.openDevice(layer.deviceID, size: layer.size)
        defer { device.close() }
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var offset: UInt64 = 0
        while offset < layer.size {
            let count = Int(min(UInt64(buffer.count), layer.size - offset))
            try buffer.withUnsafeMutableBytes { try device.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<count]), at: offset) }
            try out.write(contentsOf: buffer[0..<count])
            offset += UInt64(count)
        }
        return try Oracle.run("/sbin/e2fsck", ["-fn", image])
    }

    func shutDown() async {
        await server.stop()
        daemon.requestStop()
        daemon.waitUntilIdle()
    }
}

func prepare(_ c: Client, _ key: String, parent: String = "", labels: [String: String] = [:]) async throws -> [Containerd_Types_Mount] {
    var r = Containerd_Services_Snapshots_V1_PrepareSnapshotRequest()
    r.snapshotter = "thinfs"
    r.key = key
    r.parent = parent
    r.labels = labels
    return try await c.prepare(r).mounts
}

func view(_ c: Client, _ key: String, parent: String) async throws -> [Containerd_Types_Mount] {
    var r = Containerd_Services_Snapshots_V1_ViewSnapshotRequest()
    r.key = key
    r.parent = parent
    return try await c.view(r).mounts
}

func commit(_ c: Client, _ name: String, key: String, labels: [String: String] = [:]) async throws {
    var r = Containerd_Services_Snapshots_V1_CommitSnapshotRequest()
    r.name = name
    r.key = key
    r.labels = labels
    _ = try await c.commit(r)
}

func stat(_ c: Client, _ key: String) async throws -> Containerd_Services_Snapshots_V1_Info {
    var r = Containerd_Services_Snapshots_V1_StatSnapshotRequest()
    r.key = key
    return try await c.stat(r).info
}

func remove(_ c: Client, _ key: String) async throws {
    var r = Containerd_Services_Snapshots_V1_RemoveSnapshotRequest()
    r.key = key
    _ = try await c.remove(r)
}

func list(_ c: Client, _ filters: [String] = []) async throws -> [String] {
    var r = Containerd_Services_Snapshots_V1_ListSnapshotsRequest()
    r.filters = filters
    return try await c.list(r) { response in
        var names: [String] = []
        for try await message in response.messages { names += message.info.map(\.name) }
        return names.sorted()
    }
}

func usage(_ c: Client, _ key: String) async throws -> Containerd_Services_Snapshots_V1_UsageResponse {
    var r = Containerd_Services_Snapshots_V1_UsageRequest()
    r.key = key
    return try await c.usage(r)
}

/// The gRPC status code `body` fails with (nil when it succeeds).
func code(_ body: () async throws -> Void) async -> RPCError.Code? {
    do {
        try await body()
        return nil
    } catch let error as RPCError {
        return error.code
    } catch {
        return .unknown
    }
}

@Suite("containerd snapshots service", .serialized, .enabled(if: Host.canMountFUSE, "needs root and /dev/fuse (the service mounts its snapshots)"))
struct SnapshotServiceTests {
    /// Prepare → write → Commit → Prepare a child that sees the file → View; Stat, kinds and
    /// parents; the mounts are bind mounts of directories the service serves.
    @Test func prepareCommitViewAndStat() async throws {
        let h = try await Harness()
        try await h.run { c in
            let mounts = try await prepare(c, "default/1/extract")
            try #require(mounts.count == 1)
            #expect(mounts[0].type == "bind")
            #expect(mounts[0].options.contains("rw"))
            let upper = mounts[0].source
            #expect(upper.hasPrefix(h.store.root) || upper.hasPrefix(URL(fileURLWithPath: h.store.root).resolvingSymlinksInPath().path))
            #expect(Host.isMounted(upper))
            try "layer one\n".write(toFile: upper + "/one.txt", atomically: false, encoding: .utf8)

            #expect(try await stat(c, "default/1/extract").kind == .active)
            try await commit(c, "sha256:one", key: "default/1/extract", labels: ["containerd.io/gc.root": "x"])
            #expect(!Host.isMounted(upper))   // the active snapshot's mount went with the commit
            let committed = try await stat(c, "sha256:one")
            #expect(committed.kind == .committed)
            #expect(committed.parent == "")
            #expect(committed.labels == ["containerd.io/gc.root": "x"])
            #expect(await code { _ = try await stat(c, "default/1/extract") } == .notFound)

            let child = try await prepare(c, "container-a", parent: "sha256:one")
            #expect(try String(contentsOfFile: child[0].source + "/one.txt", encoding: .utf8) == "layer one\n")
            try "mine\n".write(toFile: child[0].source + "/mine.txt", atomically: false, encoding: .utf8)
            #expect(try await stat(c, "container-a").parent == "sha256:one")

            let v = try await view(c, "view-1", parent: "sha256:one")
            #expect(v[0].options.contains("ro"))
            #expect(try String(contentsOfFile: v[0].source + "/one.txt", encoding: .utf8) == "layer one\n")
            #expect(!FileManager.default.fileExists(atPath: v[0].source + "/mine.txt"))
            #expect(!FileManager.default.createFile(atPath: v[0].source + "/nope", contents: nil))
            #expect(try await stat(c, "view-1").kind == .view)

            // Mounts answers the same bind mount again.
            var m = Containerd_Services_Snapshots_V1_MountsRequest()
            m.key = "container-a"
            #expect(try await c.mounts(m).mounts == child)
            m.key = "sha256:one"
            #expect(await code { _ = try await c.mounts(m) } == .failedPrecondition)
            m.key = "nothing"
            #expect(await code { _ = try await c.mounts(m) } == .notFound)

            #expect(try await list(c) == ["container-a", "sha256:one", "view-1"])
            try await remove(c, "view-1")
            try await remove(c, "container-a")
            #expect(!Host.isMounted(child[0].source))
            try await remove(c, "sha256:one")
            #expect(try await list(c).isEmpty)
            #expect(try h.store.allLayers().isEmpty)
        }
    }

    /// The error codes containerd's errdefs expect from a snapshotter.
    @Test func errorCodes() async throws {
        let h = try await Harness()
        try await h.run { c in
            _ = try await prepare(c, "a")
            #expect(await code { _ = try await prepare(c, "a") } == .alreadyExists)
            #expect(await code { _ = try await prepare(c, "b", parent: "missing") } == .notFound)
            // The parent must be committed.
            #expect(await code { _ = try await prepare(c, "b", parent: "a") } == .invalidArgument)
            #expect(await code { _ = try await prepare(c, "") } == .invalidArgument)
            #expect(await code { try await commit(c, "x", key: "missing") } == .notFound)
            try await commit(c, "base", key: "a")
            _ = try await prepare(c, "c", parent: "base")
            _ = try await view(c, "v", parent: "base")
            #expect(await code { try await commit(c, "base", key: "c") } == .alreadyExists)
            // Only an active snapshot commits.
            #expect(await code { try await commit(c, "y", key: "v") } == .failedPrecondition)
            #expect(await code { try await commit(c, "y", key: "base") } == .failedPrecondition)
            // A parent goes after its children, and the error says so as containerd's does
            // ("cannot remove snapshot with child"; its conformance suite looks for "remove").
            #expect(await code { try await remove(c, "base") } == .failedPrecondition)
            let refused = await #expect(throws: RPCError.self) { try await remove(c, "base") }
            #expect(refused?.message.contains("cannot remove") == true, "\(String(describing: refused))")
            #expect(await code { try await remove(c, "missing") } == .notFound)
            #expect(await code { _ = try await stat(c, "missing") } == .notFound)
            #expect(await code { _ = try await usage(c, "missing") } == .notFound)
            // Nothing a refused call touched changed.
            #expect(try await list(c) == ["base", "c", "v"])
            #expect(Host.isMounted(try await {
                var m = Containerd_Services_Snapshots_V1_MountsRequest()
                m.key = "c"
                return try await c.mounts(m).mounts[0].source
            }()))
        }
    }

    /// Keys are opaque: `../`, slashes, NUL and long keys name snapshots, never paths.
    @Test func keysAreOpaque() async throws {
        let h = try await Harness()
        let keys = ["../../../etc", "a/b/c", "with\0nul", "with\0", String(repeating: "k/", count: 300), "é ü \n tab\t"]
        try await h.run { c in
            for key in keys { _ = try await prepare(c, key) }
            #expect(try await list(c) == keys.sorted())
            for key in keys { #expect(try await stat(c, key).name == key) }
            // "with" is not "with\0": a NUL does not end the key.
            #expect(await code { _ = try await stat(c, "with") } == .notFound)
            try await commit(c, "../committed\0", key: "with\0nul")
            #expect(try await stat(c, "../committed\0").kind == .committed)
            _ = try await prepare(c, "child", parent: "../committed\0")
            #expect(try await stat(c, "child").parent == "../committed\0")
            for key in try await list(c) where key != "../committed\0" { try await remove(c, key) }
            try await remove(c, "../committed\0")
            #expect(try h.store.allLayers().isEmpty)
        }
        // Nothing was made outside the store.
        #expect(!FileManager.default.fileExists(atPath: h.dir.path + "/etc"))
    }

    /// Update: labels only, with containerd's field paths; List filters on labels, name,
    /// parent and kind as containerd's filter syntax does.
    @Test func labelsUpdateAndFilters() async throws {
        let h = try await Harness()
        try await h.run { c in
            _ = try await prepare(c, "a", labels: ["containerd.io/gc.root": "2026", "l1": "v1"])
            try await commit(c, "base", key: "a", labels: ["containerd.io/gc.ref.snapshot.thinfs": "x", "l1": "v1", "l2": "v2"])
            _ = try await prepare(c, "c1", parent: "base", labels: ["l1": "other"])
            _ = try await prepare(c, "c2", parent: "base")

            var u = Containerd_Services_Snapshots_V1_UpdateSnapshotRequest()
            u.info.name = "base"
            u.info.labels = ["l1": "updated", "l2": "ignored", "l3": "new"]
            u.updateMask.paths = ["labels.l1", "labels.l3"]
            var info = try await c.update(u).info
            #expect(info.labels == ["containerd.io/gc.ref.snapshot.thinfs": "x", "l1": "updated", "l2": "v2", "l3": "new"])
            #expect(try await stat(c, "base").labels == info.labels)
            // An empty value removes the label.
            u.info.labels = [:]
            u.updateMask.paths = ["labels.l2"]
            info = try await c.update(u).info
            #expect(info.labels["l2"] == nil)
            #expect(info.updatedAt.date >= info.createdAt.date)
            // No mask: the labels are replaced.
            u.info.labels = ["only": "this"]
            u.updateMask.paths = []
            #expect(try await c.update(u).info.labels == ["only": "this"])
            u.updateMask.paths = ["parent"]
            #expect(await code { _ = try await c.update(u) } == .invalidArgument)
            u.info.name = "missing"
            u.updateMask.paths = ["labels"]
            #expect(await code { _ = try await c.update(u) } == .notFound)
            u.info.name = "c2"
            u.info.labels = ["big": String(repeating: "x", count: 5000)]
            #expect(await code { _ = try await c.update(u) } == .invalidArgument)

            #expect(try await list(c, ["parent==base"]) == ["c1", "c2"])
            #expect(try await list(c, ["name==c1"]) == ["c1"])
            #expect(try await list(c, ["kind==committed"]) == ["base"])
            #expect(try await list(c, ["labels.l1==other"]) == ["c1"])
            #expect(try await list(c, ["labels.\"only\""]) == ["base"])
            #expect(try await list(c, ["labels.l1"]) == ["c1"])
            #expect(try await list(c, ["parent==base,labels.l1!=other"]) == ["c2"])
            // Several filters: any of them.
            #expect(try await list(c, ["name==c1", "name==base"]) == ["base", "c1"])
            #expect(try await list(c, ["name~=^c[0-9]$"]) == ["c1", "c2"])
            #expect(try await list(c, ["name==\"c2\""]) == ["c2"])
            #expect(await code { _ = try await list(c, ["name=="]) } == .invalidArgument)
            #expect(await code { _ = try await list(c, ["labels.\"unterminated"]) } == .invalidArgument)
        }
    }

    /// GC labels containerd's metadata store sets (quoted in filters, with dots and slashes).
    @Test func gcLabelFilters() async throws {
        let h = try await Harness()
        try await h.run { c in
            _ = try await prepare(c, "a", labels: ["containerd.io/gc.root": "2026-12-06T00:00:00Z"])
            _ = try await prepare(c, "b", labels: ["containerd.io/snapshot.ref": "sha256:abc"])
            #expect(try await list(c, ["labels.\"containerd.io/gc.root\""]) == ["a"])
            #expect(try await list(c, ["labels.\"containerd.io/snapshot.ref\"==\"sha256:abc\""]) == ["b"])
            #expect(try await stat(c, "a").labels["containerd.io/gc.root"] == "2026-12-06T00:00:00Z")
        }
    }

    /// Usage counts the snapshot's own blocks: a file written in a child grows the child's,
    /// not the parent's. Remove of a busy snapshot follows dm.use_deferred_deletion and
    /// Cleanup deletes its layer once it is free.
    @Test func usageRemoveDeferredAndCleanup() async throws {
        let h = try await Harness(options: ["dm.use_deferred_deletion=true"])
        try await h.run { c in
            let base = try await prepare(c, "a")
            let data = Data(repeating: 0x5a, count: 4 << 20)
            try data.write(to: URL(fileURLWithPath: base[0].source + "/big"))
            try await commit(c, "base", key: "a")
            let baseUsage = try await usage(c, "base").size
            #expect(baseUsage >= 4 << 20)
            let child = try await prepare(c, "child", parent: "base")
            let before = try await usage(c, "child").size
            #expect(before < 1 << 20)
            try Data(repeating: 0xa5, count: 2 << 20).write(to: URL(fileURLWithPath: child[0].source + "/more"))
            // The daemon commits (flushes) on unmount; stat the usage after the data is on the pool.
            _ = try await stat(c, "child")
            let fd = open(child[0].source + "/more", O_RDONLY)
            #expect(fd >= 0 && fsync(fd) == 0)
            close(fd)
            let after = try await usage(c, "child").size
            #expect(after >= before + (2 << 20))
            #expect(try await usage(c, "base").size == baseUsage)

            // A reader holds a snapshot's layer: the remove is deferred, the snapshot gone at once.
            try await commit(c, "top", key: "child")
            let layer = try #require(try h.store.snapshot("top")).layer
            let holder = try h.store.openLayer(layer, readOnly: true, what: "test reader")
            try await remove(c, "top")
            #expect(await code { _ = try await stat(c, "top") } == .notFound)
            #expect(try h.store.layer(layer)?.state == .deleted)
            _ = try await c.cleanup(Containerd_Services_Snapshots_V1_CleanupRequest())
            #expect(try h.store.layer(layer) != nil)   // still busy
            try holder.close()
            _ = try await c.cleanup(Containerd_Services_Snapshots_V1_CleanupRequest())
            #expect(try h.store.layer(layer) == nil)
        }
    }

    /// A snapshot with no parent starts empty, as containerd's snapshotters start one: its
    /// devmapper snapshotter removes mkfs's lost+found, and its conformance suite (Basic and
    /// every tree comparison) compares such a snapshot with an empty directory.
    @Test func parentlessSnapshotsStartEmpty() async throws {
        let h = try await Harness()
        try await h.run { c in
            let active = try await prepare(c, "a")
            #expect(try FileManager.default.contentsOfDirectory(atPath: active[0].source) == [])
            let v = try await view(c, "v", parent: "")
            #expect(try FileManager.default.contentsOfDirectory(atPath: v[0].source) == [])
            // ext4 without lost+found is clean (e2fsck makes one only when it needs it).
            try await commit(c, "c", key: "a")
            let layer = try #require(try h.store.snapshot("c")).layer
            let fsck = try h.fsck(layer)
            #expect(fsck.status == 0 && !fsck.stdout.contains("Fix? no"), "e2fsck -fn: \(fsck.stdout)\(fsck.stderr)")
        }
    }

    /// Commit of an active snapshot that is still mounted elsewhere (a bind mount of it, as a
    /// container's rootfs is, or as containerd's conformance suite leaves it in StatCommitted,
    /// Transitivity, PrepareView and RemoveIntermediateSnapshot): the commit holds what was
    /// written before it, later writes through the old mount do not reach it, and the old
    /// layer is deleted once that mount is gone.
    @Test func commitWhileBindMountedElsewhere() async throws {
        let h = try await Harness()
        let outside = h.dir.path + "/outside"
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        try await h.run { c in
            let m = try await prepare(c, "a")
            let activeLayer = try #require(try h.store.snapshot("a")).layer
            try #require(mount(m[0].source, outside, nil, UInt(MS_BIND | MS_REC), nil) == 0, "bind mount: errno \(errno)")
            // Gone before the harness stops the daemon, also when the body fails: the daemon's
            // stop waits for every session, and this mount keeps one alive.
            defer { umount2(outside, Int32(MNT_DETACH)) }
            // Written through the bind mount and left in the kernel's cache: the commit writes it back.
            try "before\n".write(toFile: outside + "/f", atomically: false, encoding: .utf8)
            try await commit(c, "c", key: "a")
            #expect(try await stat(c, "c").kind == .committed)
            #expect(await code { _ = try await stat(c, "a") } == .notFound)
            try "after\n".write(toFile: outside + "/g", atomically: false, encoding: .utf8)

            let child = try await prepare(c, "child", parent: "c")
            #expect(try String(contentsOfFile: child[0].source + "/f", encoding: .utf8) == "before\n")
            #expect(!FileManager.default.fileExists(atPath: child[0].source + "/g"))
            let committedLayer = try #require(try h.store.snapshot("c")).layer
            let fsck = try h.fsck(committedLayer)
            #expect(fsck.status == 0 && !fsck.stdout.contains("Fix? no"), "e2fsck -fn: \(fsck.stdout)\(fsck.stderr)")

            // The old layer goes with its last mount.
            #expect(umount2(outside, 0) == 0)
            let deadline = Date(timeIntervalSinceNow: 20)
            while try h.store.layer(activeLayer) != nil, Date() < deadline { try await Task.sleep(for: .milliseconds(100)) }
            #expect(try h.store.layer(activeLayer) == nil)
            #expect(try Set(h.store.allLayers().map(\.id)) == [committedLayer, try #require(try h.store.snapshot("child")).layer])
        }
    }

    /// A directory grown through a snapshot's mount has an htree index in the committed layer
    /// (debugfs and kernel ext4 on its bytes), whether Commit closes the mount's layer first
    /// (`Volume.close` indexes it) or, with a bind mount of it left, commits a thin snapshot of it
    /// (the committed copy indexes the mount's grown directories).
    @Test func committedSnapshotsHaveTheirGrownDirectoriesIndexed() async throws {
        let h = try await Harness()
        let outside = h.dir.path + "/outside"
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        let names = Set((0..<2_000).map { "file-\($0)" })
        @Sendable func create(_ dir: String) throws {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
            for n in names {
                let fd = open(dir + "/" + n, O_CREAT | O_WRONLY | O_CLOEXEC, 0o644)
                try #require(fd >= 0, "creating \(dir)/\(n): errno \(errno)")
                close(fd)
            }
        }
        @Sendable func expectIndexed(_ key: String) throws {
            let layer = try #require(try h.store.snapshot(key)).layer
            let fsck = try h.fsck(layer)   // leaves the image at DIR/LAYER.img
            #expect(fsck.status == 0 && !fsck.stdout.contains("Fix? no"), "e2fsck -fn of \(key): \(fsck.stdout)\(fsck.stderr)")
            let image = h.dir.path + "/\(layer).img"
            let dump = try KernelExt4.debugfs(image, "htree_dump /d")
            #expect(try KernelExt4.isIndexed(image, "/d"), "\(key): \(dump.prefix(300))")
            if KernelExt4.canLoopMount { try KernelExt4.withMount(image) { try KernelExt4.sees($0 + "/d", names) } }
        }
        try await h.run { c in
            let a = try await prepare(c, "a")
            try create(a[0].source + "/d")
            try await commit(c, "ca", key: "a")
            try expectIndexed("ca")

            let b = try await prepare(c, "b")
            try #require(mount(b[0].source, outside, nil, UInt(MS_BIND | MS_REC), nil) == 0, "bind mount: errno \(errno)")
            defer { umount2(outside, Int32(MNT_DETACH)) }
            try create(outside + "/d")
            try await commit(c, "cb", key: "b")
            try expectIndexed("cb")
            #expect(umount2(outside, 0) == 0)
        }
    }

    /// Without deferred deletion a busy snapshot is not removed: FailedPrecondition, and it stays.
    @Test func busyRemoveWithoutDeferredDeletion() async throws {
        let h = try await Harness()
        try await h.run { c in
            _ = try await prepare(c, "a")
            try await commit(c, "base", key: "a")
            let layer = try #require(try h.store.snapshot("base")).layer
            let holder = try h.store.openLayer(layer, readOnly: true, what: "test reader")
            #expect(await code { try await remove(c, "base") } == .failedPrecondition)
            #expect(try await stat(c, "base").kind == .committed)
            try holder.close()
            try await remove(c, "base")
        }
    }

    /// The snapshots live in layers.db: a new store and service over the same root see them,
    /// and Mounts mounts an active snapshot again.
    @Test func snapshotsSurviveAReopen() async throws {
        let dir = TempDir()
        let options = try StorageOptions(parsing: ["dm.basesize=64M", "dm.loopdatasize=512M", "dm.loopmetadatasize=16M"])
        let root = dir.path + "/store"
        let socket = dir.path + "/s.sock"
        do {
            let store = try LayerStore.initialize(root: root, options: options, logger: quietLogger)
            let daemon = LayerDaemon(store: store, logger: quietLogger)
            let server = try await SnapshotServer.start(service: try SnapshotService(store: store, mounter: .daemon(daemon), logger: quietLogger),
                                                        socketPath: socket)
            try await withGRPCClient(transport: try .http2NIOPosix(target: .unixDomainSocket(path: socket), transportSecurity: .plaintext)) { grpc in
                let c = Client(wrapping: grpc)
                let m = try await prepare(c, "a", labels: ["k": "v"])
                try "kept\n".write(toFile: m[0].source + "/f", atomically: false, encoding: .utf8)
            }
            await server.stop()
            daemon.requestStop()
            daemon.waitUntilIdle()
        }
        let store = try LayerStore.open(root: root, logger: quietLogger)
        let daemon = LayerDaemon(store: store, logger: quietLogger)
        let server = try await SnapshotServer.start(service: try SnapshotService(store: store, mounter: .daemon(daemon), logger: quietLogger),
                                                    socketPath: socket)
        do {
            try await withGRPCClient(transport: try .http2NIOPosix(target: .unixDomainSocket(path: socket), transportSecurity: .plaintext)) { grpc in
                let c = Client(wrapping: grpc)
                #expect(try await stat(c, "a").labels == ["k": "v"])
                var r = Containerd_Services_Snapshots_V1_MountsRequest()
                r.key = "a"
                let m = try await c.mounts(r).mounts
                #expect(try String(contentsOfFile: m[0].source + "/f", encoding: .utf8) == "kept\n")
                try await remove(c, "a")
            }
        } catch {
            Issue.record(error)
        }
        await server.stop()
        daemon.requestStop()
        daemon.waitUntilIdle()
    }
}

/// The filter parser without a server.
@Suite("containerd filter syntax")
struct SnapshotFilterTests {
    static func snapshot(_ key: String, parent: String? = nil, labels: [String: String] = [:]) -> LayerStore.Snapshot {
        LayerStore.Snapshot(key: key, layer: "l", parent: parent, kind: .active, labels: labels, created: Date(), updated: Date())
    }

    @Test func selectors() throws {
        let s = Self.snapshot("k/1", parent: "p", labels: ["a.b/c": "v 1", "x": ""])
        #expect(try SnapshotFilter(parsing: []).matches(s))
        #expect(try SnapshotFilter(parsing: ["name==\"k/1\""]).matches(s))
        #expect(try SnapshotFilter(parsing: ["name==k/1"]).matches(s))
        #expect(try SnapshotFilter(parsing: ["parent==p, kind==active"]).matches(s))
        #expect(!(try SnapshotFilter(parsing: ["parent==p,kind==view"]).matches(s)))
        #expect(try SnapshotFilter(parsing: ["labels.\"a.b/c\"==\"v 1\""]).matches(s))
        #expect(try SnapshotFilter(parsing: ["labels.`a.b/c`"]).matches(s))
        #expect(!(try SnapshotFilter(parsing: ["labels.x"]).matches(s)))   // present means non-empty
        #expect(!(try SnapshotFilter(parsing: ["labels.nope"]).matches(s)))
        #expect(try SnapshotFilter(parsing: ["labels.nope!=v"]).matches(s))
        #expect(try SnapshotFilter(parsing: ["name==zzz", "parent~=^p$"]).matches(s))
        #expect(throws: SnapshotFilter.Error.self) { try SnapshotFilter(parsing: ["name==a b"]) }
        #expect(throws: SnapshotFilter.Error.self) { try SnapshotFilter(parsing: ["==a"]) }
        #expect(throws: SnapshotFilter.Error.self) { try SnapshotFilter(parsing: ["name~=("]) }
    }

    /// `~=` compiles its pattern as containerd does, with Go's regexp: RE2's syntax (Perl classes and
    /// flags accepted, backreferences refused, as `regexp.Compile` refuses them).
    @Test func patternsHaveGoSyntax() throws {
        let s = Self.snapshot("layer-42", labels: ["tag": "Release"])
        #expect(try SnapshotFilter(parsing: [#"name~=^layer-\d+$"#]).matches(s))
        #expect(try SnapshotFilter(parsing: ["labels.tag~=(?i)^release$"]).matches(s))
        #expect(try SnapshotFilter(parsing: ["name~=yer"]).matches(s))            // unanchored, as MatchString
        #expect(!(try SnapshotFilter(parsing: ["name~=^yer"]).matches(s)))
        #expect(throws: SnapshotFilter.Error.self) { try SnapshotFilter(parsing: [#"name~=(a)\1"#]) }
        #expect(throws: SnapshotFilter.Error.self) { try SnapshotFilter(parsing: ["name~=a(?=b)"]) }  // no lookahead in Go
    }

    /// A client's pattern can't make a List request take exponential time: `(a+)+$` against 40 a's
    /// and a "!" is 2^40 steps for a backtracking engine, and linear for RE2. The match runs on its
    /// own thread so that a backtracking engine fails the test at the deadline instead of hanging it.
    @Test func matchingIsLinearInTheText() async throws {
        let s = Self.snapshot(String(repeating: "a", count: 40) + "!")
        let filter = try SnapshotFilter(parsing: ["name~=(a+)+$", "name~=(a|aa)*b"])
        let finished = Mutex<Bool?>(nil)
        let thread = Thread {
            let result = filter.matches(s)   // outside the lock, which the waiting loop polls
            finished.withLock { $0 = result }
        }
        thread.start()
        let deadline = ContinuousClock.now + .seconds(10)
        while finished.withLock({ $0 }) == nil, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        guard let result = finished.withLock({ $0 }) else {
            Issue.record("the match did not finish within 10 s")
            return
        }
        #expect(!result)
    }
}

/// The wire bytes, encoded by hand from containerd's field numbers and types (snapshots.proto,
/// mount.proto): what the generated code sends must be what containerd's Go code reads.
@Suite("containerd snapshots wire format")
struct SnapshotWireTests {
    @Test func fieldNumbersAndTypes() throws {
        var prepare = Containerd_Services_Snapshots_V1_PrepareSnapshotRequest()
        prepare.snapshotter = "t"
        prepare.key = "k"
        prepare.parent = "p"
        // field 1, 2, 3: length-delimited strings (tag = number << 3 | 2)
        #expect([UInt8](try prepare.serializedBytes() as [UInt8]) == [0x0a, 1, 0x74, 0x12, 1, 0x6b, 0x1a, 1, 0x70])

        var commit = Containerd_Services_Snapshots_V1_CommitSnapshotRequest()
        commit.name = "n"
        commit.key = "k"
        #expect(try commit.serializedBytes() as [UInt8] == [0x12, 1, 0x6e, 0x1a, 1, 0x6b])

        var usage = Containerd_Services_Snapshots_V1_UsageResponse()
        usage.size = 5
        usage.inodes = 7
        #expect(try usage.serializedBytes() as [UInt8] == [0x08, 5, 0x10, 7])   // varints 1 and 2

        var mount = Containerd_Types_Mount()
        mount.type = "bind"
        mount.source = "/s"
        mount.options = ["rbind"]
        #expect(try mount.serializedBytes() as [UInt8] == [0x0a, 4] + Array("bind".utf8) + [0x12, 2] + Array("/s".utf8) + [0x22, 5] + Array("rbind".utf8))

        var info = Containerd_Services_Snapshots_V1_Info()
        info.kind = .committed
        info.labels = ["a": "b"]
        // kind: varint field 3 = 3; labels: map entry field 6 {1: "a", 2: "b"}
        #expect(try info.serializedBytes() as [UInt8] == [0x18, 3, 0x32, 6, 0x0a, 1, 0x61, 0x12, 1, 0x62])

        var update = Containerd_Services_Snapshots_V1_UpdateSnapshotRequest()
        update.info.name = "x"
        update.updateMask.paths = ["labels"]
        #expect(try update.serializedBytes() as [UInt8] == [0x12, 3, 0x0a, 1, 0x78, 0x1a, 8, 0x0a, 6] + Array("labels".utf8))

        var list = Containerd_Services_Snapshots_V1_ListSnapshotsRequest()
        list.filters = ["f"]
        #expect(try list.serializedBytes() as [UInt8] == [0x12, 1, 0x66])
        #expect(Containerd_Services_Snapshots_V1_Snapshots.descriptor.fullyQualifiedService == "containerd.services.snapshots.v1.Snapshots")
        #expect(Containerd_Services_Snapshots_V1_Snapshots.Method.List.descriptor.method == "List")
    }
}
