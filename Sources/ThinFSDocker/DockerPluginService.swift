import Foundation
import Logging
import ThinFS

/// `thinfs serve --docker-plugin NAME`: Docker's graphdriver plugin as one of the pool owner's
/// front doors, on /run/docker/plugins/NAME.sock, where dockerd (with `--experimental` and
/// `--storage-driver NAME`) finds it. It mounts through the daemon's own mount path, so it and
/// the containerd front door can serve one store at once.
public final class DockerPluginService: DaemonService, @unchecked Sendable {
    public let daemon: LayerDaemon
    public let socketPath: String
    let logger: Logger
    private let lock = NSLock()
    private var server: DockerPluginServer?

    /// Where dockerd looks for a plugin's socket (moby pkg/plugins/discovery.go).
    public static let socketsDirectory = "/run/docker/plugins"

    public enum Error: Swift.Error, CustomStringConvertible {
        case invalidName(String)
        public var description: String {
            switch self {
            case .invalidName(let name):
                "invalid Docker plugin name \(name.debugDescription): use letters, digits and . _ - (it names /run/docker/plugins/NAME.sock and dockerd's --storage-driver)"
            }
        }
    }

    /// The socket of plugin `name`, which must be a plain name (it becomes a file name).
    public static func socketPath(name: String) throws -> String {
        let allowed = CharacterSet(charactersIn: "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        guard !name.isEmpty, name.count <= 100, name.first != ".", name.first != "-",
              name.unicodeScalars.allSatisfy(allowed.contains) else { throw Error.invalidName(name) }
        return socketsDirectory + "/" + name + ".sock"
    }

    public var name: String { "docker graphdriver plugin" }
    public var address: String { socketPath }

    public init(daemon: LayerDaemon, socketPath: String, logger: Logger = Logger(label: "thinfs.docker-plugin")) {
        self.daemon = daemon
        self.socketPath = socketPath
        self.logger = logger
    }

    public func start() throws {
        let server = try DockerPluginServer.start(plugin: GraphDriverPlugin(daemon: daemon, logger: logger), socketPath: socketPath)
        lock.withLock { self.server = server }
    }

    public func stop() {
        let server = lock.withLock { () -> DockerPluginServer? in
            defer { self.server = nil }
            return self.server
        }
        server?.stop()
    }
}
