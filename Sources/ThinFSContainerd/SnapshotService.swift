internal import CThinFSShims
import Foundation
import GRPCCore
import Logging
import SwiftProtobuf
import ThinFS

typealias Snapshots = Containerd_Services_Snapshots_V1_Snapshots

/// How the service mounts a snapshot's layer: FUSE, served by the pool owner. The daemon
/// (`thinfs serve`) passes `.daemon(LayerDaemon)`, whose `mount` is the same path as
/// `thinfs mount`; the closures keep this module from owning FUSE sessions itself.
public struct SnapshotMounter: Sendable {
    /// Mounts layer `layer` at `mountpoint` (an existing empty directory), read-only or not,
    /// and returns once the mount is ready.
    public var mount: @Sendable (_ layer: String, _ mountpoint: String, _ readOnly: Bool) throws -> Void
    /// Unmounts `mountpoint`; true once the layer is closed (not busy), waiting at most `timeout` seconds.
    public var unmount: @Sendable (_ mountpoint: String, _ timeout: TimeInterval) -> Bool
    /// Whether `mountpoint` is served now.
    public var isMounted: @Sendable (_ mountpoint: String) -> Bool

    public init(mount: @escaping @Sendable (String, String, Bool) throws -> Void,
                unmount: @escaping @Sendable (String, TimeInterval) -> Bool,
                isMounted: @escaping @Sendable (String) -> Bool) {
        self.mount = mount
        self.unmount = unmount
        self.isMounted = isMounted
    }

    public static func daemon(_ daemon: LayerDaemon) -> SnapshotMounter {
        SnapshotMounter(
            mount: { layer, mountpoint, readOnly in _ = try daemon.mount(layer, at: mountpoint, readOnly: readOnly) },
            unmount: { daemon.unmount($0, timeout: $1) },
            isMounted: { daemon.isServing($0) })
    }
}

/// containerd's snapshots service (`containerd.services.snapshots.v1.Snapshots`) over a layer
/// store, for containerd's proxy snapshotter client. See `LayerStore+Snapshots` for the mapping.
///
/// **Mounts.** The service mounts each active snapshot and view itself (FUSE, through the
/// mounter) at `ROOT/snapshots/LAYER` and answers a bind mount of that directory. containerd
/// does a bind mount with mount(2) in its own process or the shim: no helper runs, so there
/// is nothing to fail with ECHILD (containerd retries a mount helper ten times on ECHILD, and
/// a container start fails after the tenth), and the FUSE session lives in the daemon, so a
/// container's rootfs stays served for as long as the daemon runs, whichever process mounted
/// it. Commit and Remove unmount it; the session ends once containerd's bind mounts are gone.
///
/// Store calls block (SQLite, the pool's metadata, FUSE mounts): they run one at a time on
/// a queue of their own, off the gRPC executor's threads.
public final class SnapshotService: Snapshots.SimpleServiceProtocol, @unchecked Sendable {
    let store: LayerStore
    let mounter: SnapshotMounter
    let logger: Logger
    let queue = DispatchQueue(label: "thinfs.snapshots")
    /// ROOT/snapshots, canonical (the FUSE server compares canonical mount points).
    public let mountsDirectory: String

    public init(store: LayerStore, mounter: SnapshotMounter, logger: Logger = Logger(label: "thinfs.snapshots")) throws {
        self.store = store
        self.mounter = mounter
        self.logger = logger
        let directory = store.root + "/snapshots"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        mountsDirectory = URL(fileURLWithPath: directory).resolvingSymlinksInPath().path
    }

    func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            queue.async {
                do { continuation.resume(returning: try body()) } catch { continuation.resume(throwing: Self.rpcError(error)) }
            }
        }
    }

    /// containerd's errdefs travel as gRPC codes (errdefs.ToGRPC / FromGRPC).
    static func rpcError(_ error: Swift.Error) -> RPCError {
        if let error = error as? RPCError { return error }
        let code: RPCError.Code
        switch error {
        case let e as LayerStore.SnapshotError:
            switch e.code {
            case .notFound: code = .notFound
            case .alreadyExists: code = .alreadyExists
            case .failedPrecondition: code = .failedPrecondition
            case .invalidArgument: code = .invalidArgument
            }
        case let e as LayerStore.Error:
            switch e {
            case .busy, .hasChildren, .deleted, .incomplete, .parentFrozen, .readOnlyStore: code = .failedPrecondition
            case .unknownLayer: code = .notFound
            case .invalidArgument, .invalidLayerID, .sizeTooSmall: code = .invalidArgument
            case .lowSpace, .noFreeDeviceID: code = .resourceExhausted
            default: code = .internalError
            }
        case is SnapshotFilter.Error: code = .invalidArgument
        default: code = .internalError
        }
        return RPCError(code: code, message: "\(error)")
    }

    func mountpoint(_ snapshot: LayerStore.Snapshot) -> String { mountsDirectory + "/" + snapshot.layer }

    /// Mounts the snapshot's layer if it is not mounted yet (first use, or after a restart) and
    /// returns what containerd mounts.
    func mounts(for snapshot: LayerStore.Snapshot) throws -> [Containerd_Types_Mount] {
        guard snapshot.kind != .committed else {
            throw RPCError(code: .failedPrecondition,
                           message: "snapshot \(snapshot.key.debugDescription) is committed: it has no mounts; prepare or view a child")
        }
        let path = mountpoint(snapshot)
        if !mounter.isMounted(path) {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            try mounter.mount(snapshot.layer, path, snapshot.kind == .view)
        }
        var mount = Containerd_Types_Mount()
        mount.type = "bind"
        mount.source = path
        mount.options = ["rbind", snapshot.kind == .view ? "ro" : "rw"]
        return [mount]
    }

    /// Unmounts the snapshot's mount and waits up to `timeout` seconds for its layer to close.
    /// True when it has (or nothing was mounted). A bind mount of it left elsewhere keeps the
    /// FUSE session, and the layer, open: then false.
    @discardableResult
    func release(_ snapshot: LayerStore.Snapshot, timeout: TimeInterval = 10) -> Bool {
        let path = mountpoint(snapshot)
        guard mounter.isMounted(path) else { return true }
        // The kernel's dirty pages of this filesystem, written through any of its mounts, go to
        // the daemon now: the unmount writes them back only when it is the last mount.
        let fd = open(path, O_RDONLY | O_DIRECTORY)
        if fd >= 0 {
            _ = thinfs_syncfs(fd)
            close(fd)
        }
        guard mounter.unmount(path, timeout) else {
            logger.info("snapshot still in use after its unmount (a bind mount of it is left)",
                        metadata: ["snapshot": "\(snapshot.key.debugDescription)", "layer": "\(snapshot.layer)"])
            return false
        }
        return true
    }

    /// How long Commit and Remove wait for an unmounted snapshot's layer to close before they
    /// go on with the layer in use (Commit snapshots it, `LayerStore.commitSnapshot`; Remove
    /// defers its deletion or refuses): a session ends at once when nothing else mounts it, and
    /// never while a bind mount of it is left.
    static let releaseTimeout: TimeInterval = 2

    static func info(_ s: LayerStore.Snapshot) -> Containerd_Services_Snapshots_V1_Info {
        var info = Containerd_Services_Snapshots_V1_Info()
        info.name = s.key
        info.parent = s.parent ?? ""
        info.kind = switch s.kind {
        case .view: .view
        case .active: .active
        case .committed: .committed
        }
        info.createdAt = Google_Protobuf_Timestamp(date: s.created)
        info.updatedAt = Google_Protobuf_Timestamp(date: s.updated)
        info.labels = s.labels
        return info
    }

    static func requireKey(_ key: String, _ what: String) throws {
        guard !key.isEmpty else { throw RPCError(code: .invalidArgument, message: "\(what): the key is empty") }
    }

    func create(key: String, parent: String, readOnly: Bool, labels: [String: String]) async throws -> [Containerd_Types_Mount] {
        try Self.requireKey(key, readOnly ? "view" : "prepare")
        return try await run { [self] in
            let snapshot = try store.createSnapshot(key, parent: parent.isEmpty ? nil : parent, readOnly: readOnly, labels: labels)
            do {
                return try mounts(for: snapshot)
            } catch {
                // A snapshot containerd was told failed must not stay behind.
                release(snapshot)
                _ = try? store.removeSnapshot(key)
                try? FileManager.default.removeItem(atPath: mountpoint(snapshot))
                throw error
            }
        }
    }

    // MARK: The service

    public func prepare(request: Containerd_Services_Snapshots_V1_PrepareSnapshotRequest,
                        context: ServerContext) async throws -> Containerd_Services_Snapshots_V1_PrepareSnapshotResponse {
        var response = Containerd_Services_Snapshots_V1_PrepareSnapshotResponse()
        response.mounts = try await create(key: request.key, parent: request.parent, readOnly: false, labels: request.labels)
        return response
    }

    public func view(request: Containerd_Services_Snapshots_V1_ViewSnapshotRequest,
                     context: ServerContext) async throws -> Containerd_Services_Snapshots_V1_ViewSnapshotResponse {
        var response = Containerd_Services_Snapshots_V1_ViewSnapshotResponse()
        response.mounts = try await create(key: request.key, parent: request.parent, readOnly: true, labels: request.labels)
        return response
    }

    public func mounts(request: Containerd_Services_Snapshots_V1_MountsRequest,
                       context: ServerContext) async throws -> Containerd_Services_Snapshots_V1_MountsResponse {
        let key = request.key
        return try await run { [self] in
            guard let snapshot = try store.snapshot(key) else { throw LayerStore.SnapshotError.notFound(key: key) }
            var response = Containerd_Services_Snapshots_V1_MountsResponse()
            response.mounts = try mounts(for: snapshot)
            return response
        }
    }

    public func commit(request: Containerd_Services_Snapshots_V1_CommitSnapshotRequest,
                       context: ServerContext) async throws -> Google_Protobuf_Empty {
        let (key, name, labels) = (request.key, request.name, request.labels)
        try Self.requireKey(key, "commit")
        return try await run { [self] in
            guard let active = try store.snapshot(key) else { throw LayerStore.SnapshotError.notFound(key: key) }
            // The checks that need no unmount first, so a refused commit leaves the mount alone.
            if try store.snapshot(name) != nil { throw LayerStore.SnapshotError.alreadyExists(key: name) }
            guard active.kind == .active else { throw LayerStore.SnapshotError.notActive(key: key, kind: active.kind) }
            let closed = release(active, timeout: Self.releaseTimeout)
            do {
                _ = try store.commitSnapshot(key, as: name, labels: labels)
            } catch LayerStore.Error.busy where !closed {
                // The session was closing its layer as the store looked (no longer a writer, not
                // yet free): once it has closed, the layer commits as it is.
                release(active)
                _ = try store.commitSnapshot(key, as: name, labels: labels)
            }
            try? FileManager.default.removeItem(atPath: mountpoint(active))
            return Google_Protobuf_Empty()
        }
    }

    public func remove(request: Containerd_Services_Snapshots_V1_RemoveSnapshotRequest,
                       context: ServerContext) async throws -> Google_Protobuf_Empty {
        let key = request.key
        return try await run { [self] in
            guard let snapshot = try store.snapshot(key) else { throw LayerStore.SnapshotError.notFound(key: key) }
            // Checked before the unmount too, so that a refused remove leaves the mount alone.
            let children = try store.snapshotChildren(key)
            guard children.isEmpty else { throw LayerStore.SnapshotError.hasChildren(key: key, children: children) }
            // Without deferred deletion a layer still closing would be refused: give it the time.
            release(snapshot, timeout: store.options.deferredDeletion ? Self.releaseTimeout : 10)
            let removal = try store.removeSnapshot(key)
            if case .deferred(let holder) = removal {
                logger.info("snapshot removed; its layer goes once free", metadata: ["snapshot": "\(key.debugDescription)", "holder": "\(holder)"])
            }
            // Fails while something still mounts it; Cleanup retries.
            try? FileManager.default.removeItem(atPath: mountpoint(snapshot))
            return Google_Protobuf_Empty()
        }
    }

    public func stat(request: Containerd_Services_Snapshots_V1_StatSnapshotRequest,
                     context: ServerContext) async throws -> Containerd_Services_Snapshots_V1_StatSnapshotResponse {
        let key = request.key
        return try await run { [self] in
            guard let snapshot = try store.snapshot(key) else { throw LayerStore.SnapshotError.notFound(key: key) }
            var response = Containerd_Services_Snapshots_V1_StatSnapshotResponse()
            response.info = Self.info(snapshot)
            return response
        }
    }

    public func update(request: Containerd_Services_Snapshots_V1_UpdateSnapshotRequest,
                       context: ServerContext) async throws -> Containerd_Services_Snapshots_V1_UpdateSnapshotResponse {
        let (key, labels, paths) = (request.info.name, request.info.labels, request.updateMask.paths)
        return try await run { [self] in
            let snapshot = try store.updateSnapshot(key, labels: labels, fields: paths)
            var response = Containerd_Services_Snapshots_V1_UpdateSnapshotResponse()
            response.info = Self.info(snapshot)
            return response
        }
    }

    /// containerd's service sends 100 infos a message.
    static let listBatch = 100

    public func list(request: Containerd_Services_Snapshots_V1_ListSnapshotsRequest,
                     response: RPCWriter<Containerd_Services_Snapshots_V1_ListSnapshotsResponse>,
                     context: ServerContext) async throws {
        let filters = request.filters
        let infos = try await run { [self] in
            let filter = try SnapshotFilter(parsing: filters)
            return try store.allSnapshots().filter(filter.matches).map(Self.info)
        }
        for start in stride(from: 0, to: infos.count, by: Self.listBatch) {
            var message = Containerd_Services_Snapshots_V1_ListSnapshotsResponse()
            message.info = Array(infos[start..<min(start + Self.listBatch, infos.count)])
            try await response.write(message)
        }
    }

    /// The snapshot's own blocks: what only its layer maps. Inodes are 0: the pool counts
    /// blocks, and an inode count would mean walking the filesystem (containerd's devmapper
    /// snapshotter reports no inodes either).
    public func usage(request: Containerd_Services_Snapshots_V1_UsageRequest,
                      context: ServerContext) async throws -> Containerd_Services_Snapshots_V1_UsageResponse {
        let key = request.key
        return try await run { [self] in
            var response = Containerd_Services_Snapshots_V1_UsageResponse()
            response.size = Int64(clamping: try store.snapshotUsage(key))
            response.inodes = 0
            return response
        }
    }

    /// Runs the deferred deletions, and removes the mount directories no snapshot owns.
    public func cleanup(request: Containerd_Services_Snapshots_V1_CleanupRequest,
                        context: ServerContext) async throws -> Google_Protobuf_Empty {
        try await run { [self] in
            let deleted = try store.cleanup()
            if !deleted.isEmpty { logger.info("deferred deletions done", metadata: ["layers": "\(deleted)"]) }
            let owned = Set(try store.allSnapshots().map(\.layer))
            for name in (try? FileManager.default.contentsOfDirectory(atPath: mountsDirectory)) ?? [] where !owned.contains(name) {
                let path = mountsDirectory + "/" + name
                if !mounter.isMounted(path) { rmdir(path) }
            }
            return Google_Protobuf_Empty()
        }
    }
}
