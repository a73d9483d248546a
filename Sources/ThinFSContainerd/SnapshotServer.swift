import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import ThinFS

/// The snapshots service on a unix socket: what `thinfs serve --containerd-socket PATH` hosts,
/// and what the tests start in-process.
public final class SnapshotServer: Sendable {
    public enum Error: Swift.Error, CustomStringConvertible {
        case socketInUse(path: String)
        case notListening(path: String, reason: String)
        public var description: String {
            switch self {
            case .socketInUse(let path): "\(path) exists and is not a socket; refusing to replace it"
            case .notListening(let path, let reason): "containerd snapshots socket \(path): \(reason)"
            }
        }
    }

    public let socketPath: String
    let server: GRPCServer<HTTP2ServerTransport.Posix>
    let task: Task<Void, Swift.Error>

    /// Starts serving `service` on `socketPath` and returns once the socket accepts. A socket
    /// left by a daemon that died is replaced; any other file there is an error.
    public static func start(service: SnapshotService, socketPath: String) async throws -> SnapshotServer {
        try LayerStore.validate(socketPath, what: "socket path")
        guard ServiceSocket.removeStale(at: socketPath) else { throw Error.socketInUse(path: socketPath) }
        // Only its owner may connect (containerd runs as root), whatever the umask.
        let staging = try ServiceSocket.Staging(for: socketPath)
        defer { staging.discard() }
        let server = GRPCServer(transport: .http2NIOPosix(address: .unixDomainSocket(path: staging.path),
                                                          transportSecurity: .plaintext),
                                services: [service])
        let task = Task { try await server.serve() }
        do {
            _ = try await server.listeningAddress
            try staging.publish()
        } catch {
            server.beginGracefulShutdown()
            task.cancel()
            throw Error.notListening(path: socketPath, reason: "\(error)")
        }
        return SnapshotServer(socketPath: socketPath, server: server, task: task)
    }

    init(socketPath: String, server: GRPCServer<HTTP2ServerTransport.Posix>, task: Task<Void, Swift.Error>) {
        self.socketPath = socketPath
        self.server = server
        self.task = task
    }

    /// Stops accepting, lets the calls in flight finish, and removes the socket.
    public func stop() async {
        server.beginGracefulShutdown()
        _ = try? await task.value
        unlink(socketPath)
    }
}
