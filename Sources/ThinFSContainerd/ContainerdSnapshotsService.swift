import Foundation
import Logging
import ThinFS

/// `thinfs serve --containerd-socket PATH`: the snapshots service as one of the pool owner's
/// front doors, mounting through the daemon's own mount path.
public final class ContainerdSnapshotsService: DaemonService, @unchecked Sendable {
    public let daemon: LayerDaemon
    public let socketPath: String
    let logger: Logger
    private let lock = NSLock()
    private var server: SnapshotServer?

    public var name: String { "containerd snapshots" }
    public var address: String { socketPath }

    public init(daemon: LayerDaemon, socketPath: String, logger: Logger = Logger(label: "thinfs.snapshots")) {
        self.daemon = daemon
        self.socketPath = socketPath
        self.logger = logger
    }

    /// `DaemonService` is synchronous (serve's main thread); the gRPC server is async, so the
    /// calls wait for a task on the concurrency pool.
    public func start() throws {
        let service = try SnapshotService(store: daemon.store, mounter: .daemon(daemon), logger: logger)
        let result = Self.wait { try await SnapshotServer.start(service: service, socketPath: self.socketPath) }
        lock.withLock { server = try? result.get() }
        _ = try result.get()
    }

    public func stop() {
        guard let server = lock.withLock({ () -> SnapshotServer? in
            defer { self.server = nil }
            return self.server
        }) else { return }
        _ = Self.wait { await server.stop() }
    }

    private static func wait<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) -> Result<T, Error> {
        let done = DispatchSemaphore(value: 0)
        let box = ResultBox<T>()
        Task {
            do { box.result = .success(try await body()) } catch { box.result = .failure(error) }
            done.signal()
        }
        done.wait()
        return box.result!
    }
}

private final class ResultBox<T>: @unchecked Sendable {
    /// Written by the task before it signals, read after the wait: the semaphore orders them.
    var result: Result<T, Error>?
}
