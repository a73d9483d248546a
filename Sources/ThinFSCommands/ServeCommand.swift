import ArgumentParser
import Foundation
import Logging
import ThinFS
import ThinFSContainerd
import ThinFSDocker
#if canImport(Glibc)
import Glibc
#endif

/// `thinfs serve`: the pool owner as a long-running service, as dockerd's devicemapper
/// driver was. It is the same `LayerDaemon` that `thinfs mount` starts on demand, in its
/// persistent mode: it stays up with no mount, and only SIGTERM or SIGINT ends it.
///
///     thinfs serve --root R
///       ├─ LayerStore.open (or .initialize with --storage-opt): the pool's writer lock, recovery
///       ├─ stale FUSE mounts of R (a killed daemon's) lazily unmounted
///       ├─ services, in order: R/control.sock (thinfs layer/mount/info/...), then with
///       │  --containerd-socket S containerd's snapshots API on S (ThinFSContainerd), with
///       │  --docker-plugin N Docker's graphdriver plugin on /run/docker/plugins/N.sock (ThinFSDocker)
///       ├─ READY=1 to systemd (Type=notify)
///       └─ SIGTERM: services stop in reverse, every layer unmounts, the pool commits, exit 0
public struct ServeCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Own a root's layer store as a long-running service: serve every mount and the control socket.",
        discussion: """
            Runs in the foreground and logs to stderr. Creates the store with the --storage-opt \
            options if the root has none; an existing store keeps the options it was made with, \
            and an option that would change one is refused. Ready (and, under systemd's \
            Type=notify, READY=1) once every socket accepts. SIGTERM and SIGINT unmount every \
            layer, commit the pool and exit 0.
            """)

    @Option(name: .long, help: "The ThinFS root directory (default: $THINFS_ROOT or /var/lib/thinfs).")
    var root: String = PoolRoot.defaultPath

    @Option(name: .customLong("storage-opt"), help: "KEY=VALUE, with Docker's dm.* names, as 'thinfs init' takes them (repeatable).")
    var storageOptions: [String] = []

    @Option(name: .customLong("containerd-socket"),
            help: "Also serve containerd's snapshots API (a proxy snapshotter) on this unix socket.")
    var containerdSocket: String?

    @Option(name: .customLong("docker-plugin"),
            help: "Also serve Docker's graphdriver plugin protocol as plugin NAME, on /run/docker/plugins/NAME.sock (dockerd --experimental --storage-driver NAME).")
    var dockerPlugin: String?

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: LogLevel = LogLevel(.info)

    public init() {}

    struct LogLevel: ExpressibleByArgument {
        var level: Logger.Level
        init(_ level: Logger.Level) { self.level = level }
        init?(argument: String) {
            guard let level = Logger.Level(rawValue: argument.lowercased()) else { return nil }
            self.level = level
        }
        var defaultValueDescription: String { level.rawValue }
    }

    /// Why `serve` cannot start, with the remedy.
    enum Failure: Error, CustomStringConvertible {
        case storeHeld(root: String, holders: [pid_t])

        var description: String {
            switch self {
            case .storeHeld(let root, let holders):
                let who = holders.isEmpty ? "another process" : "pid " + holders.map(LockHolders.describe).joined(separator: ", pid ")
                return "the store at \(root) is owned by \(who), which holds its pool for writing (another thinfs serve, a thinfs-mount daemon serving its mounts, or a thinfs command at work on it): stop it first; the CLI works through a running one"
            }
        }
    }

    public func run() throws {
        // Before any thread exists: the shutdown signals go to a dispatch source (as thinfs-mount).
        let signals = ShutdownSignals.block()
        Logging.bootstrapOnce(level: logLevel.level)
        let logger = Logger(label: "thinfs.serve")
        let rootPath = URL(fileURLWithPath: root).standardizedFileURL.path
        let store = try openStore(root: rootPath, logger: logger)
        if !store.lastRecovery.isEmpty {
            logger.notice("recovered the store", metadata: ["root": "\(rootPath)", "recovery": "\(store.lastRecovery)"])
        }
        let daemon = LayerDaemon(store: store, logger: Logger(label: "thinfs.daemon"), persistent: true)
        let sources = signals.onSignal { signal in
            logger.info("stopping", metadata: ["signal": "\(signal)"])
            daemon.requestStop()
        }
        try withExtendedLifetime(sources) {
            // The pool owner's front doors. Each is listening when `start` returns.
            var services: [any DaemonService] = [ControlSocketService(daemon: daemon)]
            if let containerdSocket {
                let path = URL(fileURLWithPath: containerdSocket).standardizedFileURL.path
                services.append(ContainerdSnapshotsService(daemon: daemon, socketPath: path, logger: Logger(label: "thinfs.snapshots")))
            }
            if let dockerPlugin {
                services.append(DockerPluginService(daemon: daemon, socketPath: try DockerPluginService.socketPath(name: dockerPlugin),
                                                    logger: Logger(label: "thinfs.docker-plugin")))
            }
            var started: [any DaemonService] = []
            do {
                for service in services {
                    try service.start()
                    started.append(service)
                    logger.info("listening", metadata: ["service": "\(service.name)", "address": "\(service.address)"])
                }
            } catch {
                for service in started.reversed() { service.stop() }
                daemon.requestStop()
                daemon.waitUntilIdle()
                throw error
            }
            logger.notice("ready", metadata: ["root": "\(rootPath)", "pid": "\(getpid())"])
            SystemdNotify.send("READY=1\nMAINPID=\(getpid())\nSTATUS=serving \(rootPath)")
            daemon.waitForStopRequest()
            SystemdNotify.send("STOPPING=1")
            for service in services.reversed() { service.stop() }
            daemon.waitUntilIdle()
        }
        logger.notice("stopped", metadata: ["root": "\(rootPath)"])
    }

    /// The store of `root`, open for writing, through the usual recovery (journal rollback or
    /// roll-forward, reconciliation); made first if the root has none, as dockerd's
    /// devicemapper driver made its pool on first start.
    private func openStore(root: String, logger: Logger) throws -> LayerStore {
        do {
            if try !LayerStore.probe(at: root) {
                let options = try StorageOptions(parsing: storageOptions)
                let store = try LayerStore.initialize(root: root, options: options, logger: Logger(label: "thinfs.layers"))
                logger.notice("initialized a new store", metadata: ["root": "\(root)", "base.device": "\(store.base.deviceID)",
                                                                    "base.size": "\(ByteSize.human(store.base.size))"])
                return store
            }
            let store = try LayerStore.open(root: root, logger: Logger(label: "thinfs.layers"))
            do {
                // A bigger dm.basesize grows the base device, as dockerd's devicemapper did at start.
                if let size = try store.options.checkUnchanged(by: storageOptions, root: root) { try store.growBase(to: size) }
            } catch {
                try? store.close()
                throw error
            }
            return store
        } catch ThinPoolError.heldByAnotherProcess {
            throw Failure.storeHeld(root: root, holders: LayerStore.writerLockHolders(root: root))
        }
    }
}
