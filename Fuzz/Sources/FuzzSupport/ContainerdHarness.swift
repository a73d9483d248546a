import Foundation
import GRPCCore
import Logging
import SwiftProtobuf
import ThinFS
import ThinFSContainerd

/// `containerd`: the input is a sequence of containerd snapshots requests, each
/// `[method byte][length, 2 bytes little-endian][protobuf bytes]`, the method byte modulo 10
/// choosing Prepare, View, Mounts, Commit, Remove, Stat, Update, List, Usage or Cleanup. Each
/// request is decoded with the generated swift-protobuf message (as grpc-swift-protobuf's
/// deserializer does) and handed to `SnapshotService` over a real store made once (userspace
/// pool, 16 MiB base device): the keys, parents, labels, update masks and List filters
/// (`SnapshotFilter`) are what the fuzzer works on.
///
/// The mounter is a fake that records mount points: a FUSE mount per input would be slow, and
/// one left behind by a crash would outlive the harness. After each input the snapshots go back
/// to the initial set (a committed `base` with a label, an active `work` and a view `ro` on it),
/// rebuilt from nothing when anything about them changed.
public enum ContainerdHarness {
    static let quiet = Logger(label: "thinfs.fuzz", factory: { _ in SwiftLogNoOpLogHandler() })

    /// The ten unary-or-streaming methods, in the order the method byte selects them.
    public enum Method: UInt8, CaseIterable, Sendable {
        case prepare, view, mounts, commit, remove, stat, update, list, usage, cleanup
    }

    final class FakeMounts: @unchecked Sendable {
        let mounted = Mutex<Set<String>>([])
        var mounter: SnapshotMounter {
            SnapshotMounter(
                mount: { [mounted] _, path, _ in _ = mounted.withLock { $0.insert(path) } },
                unmount: { [mounted] path, _ in _ = mounted.withLock { $0.remove(path) }; return true },
                isMounted: { [mounted] path in mounted.withLock { $0.contains(path) } })
        }
    }

    struct Setup: @unchecked Sendable {
        let store: LayerStore
        let service: SnapshotService
        let mounts: FakeMounts
    }

    /// The initial snapshots: what `restore` compares with and rebuilds.
    static let initialLabels = ["containerd.io/gc.root": "2026-01-01T00:00:00Z", "fuzz": "1"]
    struct Shape: Equatable { let key: String, parent: String?, kind: LayerStore.Snapshot.Kind, labels: [String: String] }
    static let initial: [Shape] = [
        Shape(key: "base", parent: nil, kind: .committed, labels: initialLabels),
        Shape(key: "work", parent: "base", kind: .active, labels: [:]),
        Shape(key: "ro", parent: "base", kind: .view, labels: ["fuzz": "view"]),
    ]

    static let setup: Setup = {
        let scratch = Harness.scratchDirectory("containerd")
        do {
            let options = try StorageOptions(parsing: ["dm.basesize=16M", "dm.loopdatasize=128M", "dm.loopmetadatasize=8M"])
            let store = try LayerStore.initialize(root: scratch + "/store", options: options, logger: quiet)
            let mounts = FakeMounts()
            let service = try SnapshotService(store: store, mounter: mounts.mounter, logger: quiet)
            try build(store)
            return Setup(store: store, service: service, mounts: mounts)
        } catch {
            Harness.setupFailed("making the store", error)
        }
    }()

    static func build(_ store: LayerStore) throws {
        _ = try store.createSnapshot("base-prepare", parent: nil, readOnly: false, labels: [:])
        _ = try store.commitSnapshot("base-prepare", as: "base", labels: initialLabels)
        _ = try store.createSnapshot("work", parent: "base", readOnly: false, labels: [:])
        _ = try store.createSnapshot("ro", parent: "base", readOnly: true, labels: ["fuzz": "view"])
    }

    /// Makes the fixed part once, before the first input.
    public static func prepare() { _ = setup }

    /// One request as the harness reads it.
    public static func record(_ method: Method, _ message: some SwiftProtobuf.Message) -> [UInt8] {
        let bytes: [UInt8] = (try? message.serializedBytes()) ?? []
        let n = min(bytes.count, 0xFFFF)
        return [method.rawValue, UInt8(n & 0xFF), UInt8(n >> 8)] + bytes.prefix(n)
    }

    static func context(_ method: String) -> ServerContext {
        ServerContext(descriptor: MethodDescriptor(fullyQualifiedService: "containerd.services.snapshots.v1.Snapshots", method: method),
                      remotePeer: "fuzz", localPeer: "fuzz", cancellation: .init())
    }

    /// List's stream: counts what is written.
    struct Sink: RPCWriterProtocol {
        typealias Element = Containerd_Services_Snapshots_V1_ListSnapshotsResponse
        func write(_ element: Element) async throws {}
        func write(contentsOf elements: some Sequence<Element>) async throws {}
    }

    /// Decodes one request and runs it; every thrown error (decoding's or the service's) is an answer.
    static func dispatch(_ service: SnapshotService, _ method: Method, _ bytes: Data) async {
        do {
            switch method {
            case .prepare:
                _ = try await service.prepare(request: .init(serializedBytes: bytes), context: context("Prepare"))
            case .view:
                _ = try await service.view(request: .init(serializedBytes: bytes), context: context("View"))
            case .mounts:
                _ = try await service.mounts(request: .init(serializedBytes: bytes), context: context("Mounts"))
            case .commit:
                _ = try await service.commit(request: .init(serializedBytes: bytes), context: context("Commit"))
            case .remove:
                _ = try await service.remove(request: .init(serializedBytes: bytes), context: context("Remove"))
            case .stat:
                _ = try await service.stat(request: .init(serializedBytes: bytes), context: context("Stat"))
            case .update:
                _ = try await service.update(request: .init(serializedBytes: bytes), context: context("Update"))
            case .list:
                try await service.list(request: .init(serializedBytes: bytes), response: RPCWriter(wrapping: Sink()),
                                       context: context("List"))
            case .usage:
                _ = try await service.usage(request: .init(serializedBytes: bytes), context: context("Usage"))
            case .cleanup:
                _ = try await service.cleanup(request: .init(serializedBytes: bytes), context: context("Cleanup"))
            }
        } catch {
            // A refusal: decoding's error or the service's RPCError.
        }
    }

    public static func run(_ data: UnsafeRawBufferPointer) {
        let s = setup
        var requests: [(Method, Data)] = []
        var i = 0
        while i + 3 <= data.count {
            let method = Method(rawValue: data[i] % 10)!
            let n = Int(data[i + 1]) | Int(data[i + 2]) << 8
            let end = min(data.count, i + 3 + n)
            requests.append((method, Data(data[(i + 3) ..< end])))
            i = end
        }
        guard !requests.isEmpty else { return }
        let done = DispatchSemaphore(value: 0)
        Task { [requests] in
            for (method, bytes) in requests { await dispatch(s.service, method, bytes) }
            done.signal()
        }
        done.wait()
        restore(s)
    }

    /// Back to the initial snapshots, rebuilt from nothing when any of them changed.
    static func restore(_ s: Setup) {
        s.mounts.mounted.withLock { $0.removeAll() }
        do {
            let now = try s.store.allSnapshots()
            let shapes = now.map { Shape(key: $0.key, parent: $0.parent, kind: $0.kind, labels: $0.labels) }
            if shapes == initial { return }
            // Leaves first, until none is left.
            var left = now.map(\.key)
            while !left.isEmpty {
                let before = left.count
                for key in left where try s.store.snapshotChildren(key).isEmpty {
                    _ = try s.store.removeSnapshot(key)
                }
                left = try s.store.allSnapshots().map(\.key)
                if left.count == before { Harness.setupFailed("restoring the snapshots", CocoaError(.fileWriteUnknown)) }
            }
            _ = try s.store.cleanup()
            for name in (try? FileManager.default.contentsOfDirectory(atPath: s.service.mountsDirectory)) ?? [] {
                rmdir(s.service.mountsDirectory + "/" + name)
            }
            try build(s.store)
        } catch {
            Harness.setupFailed("restoring the snapshots", error)
        }
    }

    // MARK: Seeds

    /// The seed corpus (`THINFS_FUZZ_WRITE_SEEDS`): each method on the initial snapshots, and the
    /// sequences containerd sends (prepare, commit, view of the commit; an image pull's
    /// extract-and-commit chain; the metadata store's label and filter queries).
    public static func seeds() -> [(String, [UInt8])] {
        typealias P = Containerd_Services_Snapshots_V1_PrepareSnapshotRequest
        typealias V = Containerd_Services_Snapshots_V1_ViewSnapshotRequest
        typealias C = Containerd_Services_Snapshots_V1_CommitSnapshotRequest
        typealias L = Containerd_Services_Snapshots_V1_ListSnapshotsRequest
        typealias U = Containerd_Services_Snapshots_V1_UpdateSnapshotRequest
        func prepare(_ key: String, _ parent: String = "", labels: [String: String] = [:]) -> [UInt8] {
            var r = P(); r.key = key; r.parent = parent; r.labels = labels; return record(.prepare, r)
        }
        func view(_ key: String, _ parent: String) -> [UInt8] { var r = V(); r.key = key; r.parent = parent; return record(.view, r) }
        func commit(_ key: String, as name: String, labels: [String: String] = [:]) -> [UInt8] {
            var r = C(); r.key = key; r.name = name; r.labels = labels; return record(.commit, r)
        }
        func list(_ filters: [String]) -> [UInt8] { var r = L(); r.snapshotter = "thinfs"; r.filters = filters; return record(.list, r) }
        func mounts(_ key: String) -> [UInt8] { var r = Containerd_Services_Snapshots_V1_MountsRequest(); r.key = key; return record(.mounts, r) }
        func remove(_ key: String) -> [UInt8] { var r = Containerd_Services_Snapshots_V1_RemoveSnapshotRequest(); r.key = key; return record(.remove, r) }
        func stat(_ key: String) -> [UInt8] { var r = Containerd_Services_Snapshots_V1_StatSnapshotRequest(); r.key = key; return record(.stat, r) }
        func usage(_ key: String) -> [UInt8] { var r = Containerd_Services_Snapshots_V1_UsageRequest(); r.key = key; return record(.usage, r) }
        func update(_ key: String, labels: [String: String], paths: [String]) -> [UInt8] {
            var r = U(); r.info.name = key; r.info.labels = labels; r.updateMask.paths = paths; return record(.update, r)
        }
        let chain = "sha256:" + String(repeating: "ab", count: 32)
        return [
            ("prepare", prepare("default/1/c1", "base", labels: ["containerd.io/snapshot.ref": chain])),
            ("prepare-no-parent", prepare("default/2/extract")),
            ("view", view("default/3/v", "base")),
            ("mounts", mounts("work") + mounts("ro") + mounts("base")),
            ("commit", prepare("k8s.io/4/extract-1 " + chain, "base") + commit("k8s.io/4/extract-1 " + chain, as: chain,
                                                                                labels: ["containerd.io/gc.root": "x"])),
            ("commit-work", commit("work", as: "work-committed")),
            ("remove", remove("ro") + remove("base") + remove("work") + remove("base")),
            ("stat", stat("base") + stat("missing") + stat("")),
            ("update", update("base", labels: ["containerd.io/gc.root": "", "new": "v"], paths: ["labels.containerd.io/gc.root", "labels.new"])),
            ("update-all-labels", update("work", labels: ["a": "b"], paths: [])),
            ("list", list([])),
            ("list-filters", list(["parent==base", "kind==active,name~=^w", "labels.\"containerd.io/gc.root\"",
                                   "labels.fuzz!=1", "name==`ro`"])),
            ("list-bad-filter", list(["name~=(", "labels.\"unterminated", "==x"])),
            ("usage", usage("work") + usage("base") + usage("nothing")),
            ("cleanup", remove("ro") + record(.cleanup, Containerd_Services_Snapshots_V1_CleanupRequest())),
            ("pull-chain", prepare("default/5/extract-a") + commit("default/5/extract-a", as: "layer-a")
                + prepare("default/6/extract-b", "layer-a") + commit("default/6/extract-b", as: "layer-b")
                + view("default/7/view", "layer-b") + list(["parent==layer-a"]) + remove("default/7/view")
                + remove("layer-b") + remove("layer-a")),
            ("nul-key", prepare("a\0b", "base") + stat("a\0b") + list(["name==\"a\\0b\""])),
        ]
    }
}
