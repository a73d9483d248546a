import Foundation

/// A front door of the pool owner (`thinfs serve`): a socket through which requests reach the
/// one `LayerDaemon` of a root. `thinfs serve` starts each of its services in order, reports
/// ready once every one accepts, and on SIGTERM stops them in reverse order before the daemon
/// unmounts its layers and commits.
public protocol DaemonService: AnyObject, Sendable {
    /// What the log calls it.
    var name: String { get }
    /// Where it listens (a socket path).
    var address: String { get }
    /// Starts listening; returns once a client can connect.
    func start() throws
    /// Stops accepting and waits for the requests being handled. Idempotent.
    func stop()
}

/// `ROOT/control.sock`: the `thinfs` CLI's door (`ControlSocket`, `LayerService`).
public final class ControlSocketService: DaemonService {
    public let daemon: LayerDaemon
    public var name: String { "control socket" }
    public var address: String { LayerStore.controlSocketPath(daemon.store.root) }

    public init(daemon: LayerDaemon) { self.daemon = daemon }

    public func start() throws { try daemon.listen() }
    public func stop() { daemon.stopListening() }
}
