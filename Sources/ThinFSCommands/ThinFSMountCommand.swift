import ArgumentParser
import Dispatch
import Foundation
import Logging
import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// `thinfs-mount`: the FUSE daemon. It serves the ext4 on one thin device through FUSE.
///
/// Without `-f` it detaches: it re-executes itself with `-f` and a pipe (`THINFS_READY_FD`),
/// and waits for the child to report that the mount is ready, or why it failed. A
/// multithreaded Swift process must not fork, so the daemon is a fresh process.
///
/// As `mount.fuse.thinfs` (a symlink or `scripts/mount.fuse.thinfs`), it takes mount(8)'s
/// form instead: `mount.fuse.thinfs DIR:ID MOUNTPOINT [-o OPTIONS]`.
public struct ThinFSMountCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "thinfs-mount",
        abstract: "Serve the ext4 on a thin device, or a layer of a layer store, through FUSE.",
        discussion: """
            Detaches once the mount is ready (or stays in the foreground with -f) and exits \
            non-zero with the reason if the mount fails. umount, fusermount3 -u, SIGTERM and \
            SIGINT all flush, commit the pool and exit 0.

            As a mount(8) helper (installed as /sbin/mount.fuse.thinfs):
              mount -t fuse.thinfs DIR:ID MOUNTPOINT -o ro
            """,
        version: ThinFSVersion.string
    )

    @Option(help: "The ThinFS root directory (default: $THINFS_ROOT or /var/lib/thinfs).")
    var root: String = PoolRoot.defaultPath

    @Option(help: "Thin device id (formatted with 'thinfs dev format').")
    var device: DeviceIDArgument?

    @Option(help: "A layer of the root's layer store (made with 'thinfs init'); image layers are always read-only.")
    var layer: String?

    @Argument(help: "An empty directory to mount on.")
    var mountpoint: String

    @Option(name: .customShort("o"), help: ArgumentHelp(
        "Mount options, comma-separated, repeatable: ro, nonempty, nosuid, nodev, opens=daemon (every open and close reaches the daemon), or any FUSE or kernel mount option. Every user may enter (allow_other); suid,dev under a root-only directory.",
        valueName: "options"))
    var mountOptions: [String] = []

    @Flag(name: .customShort("f"), help: "Stay in the foreground.")
    var foreground = false

    @Flag(name: .shortAndLong, help: "Log at debug level to stderr.")
    var verbose = false

    public init() {}

    public func validate() throws {
        guard (device == nil) != (layer == nil) else {
            throw ValidationError("give exactly one of --device ID (a thin device) or --layer ID (a layer)")
        }
    }

    /// The options after splitting on commas.
    var options: [String] { mountOptions.flatMap { $0.split(separator: ",").map(String.init) }.filter { !$0.isEmpty } }
    var readOnly: Bool { options.contains("ro") }

    public func run() throws {
        if !foreground {
            // The parent: start the daemon and relay its verdict.
            throw MountDaemon.detach(arguments: canonicalArguments + ["-f"])
        }
        let ready = MountDaemon.ReadyChannel.fromEnvironment()
        if ready != nil { _ = setsid() }  // the daemon leaves the caller's session and terminal
        // Before any thread exists: SIGTERM/SIGINT/SIGHUP are taken by dispatch sources, so every
        // thread must block them, or an unblocked thread would receive (and drop) them.
        let signals = ShutdownSignals.block()
        Logging.bootstrapOnce(verbose: verbose)
        do {
            try serve(signals: signals, ready: ready)
        } catch {
            guard let ready else { throw error }
            // The waiting parent prints the reason; the daemon itself stays quiet.
            ready.fail("\(error)")
            throw ExitCode.failure
        }
    }

    /// The arguments that reproduce this invocation (what the daemon is started with).
    var canonicalArguments: [String] {
        // Absolute, so the daemon's arguments (and the fsname) do not depend on a working directory.
        let absolute = { (path: String) in URL(fileURLWithPath: path).standardizedFileURL.path }
        var args = ["--root", absolute(root)]
        if let layer { args += ["--layer", layer] }
        if let device { args += ["--device", String(device.id)] }
        args.append(absolute(mountpoint))
        if !options.isEmpty { args += ["-o", options.joined(separator: ",")] }
        if verbose { args.append("-v") }
        return args
    }

    private func serve(signals: ShutdownSignals, ready: MountDaemon.ReadyChannel?) throws {
        if let layer { return try serveLayers(first: layer, signals: signals, ready: ready) }
        let logger = Logger(label: "thinfs.mount")
        let id = device!.id
        let extra = options.filter { $0 != "ro" && $0 != "allow_other" }
        // Check the mount point before the pool is touched: a bad one must change nothing.
        let canonical = try FUSEServer.checkMountpoint(mountpoint, allowNonEmpty: extra.contains("nonempty"))

        let poolRoot = PoolRoot(path: URL(fileURLWithPath: root).standardizedFileURL.path)
        let pool = try poolRoot.open(readOnly: readOnly)
        guard try pool.deviceExists(id) else { throw MountError.noDevice(id, root: root) }
        guard let record = try poolRoot.filesystems()[id] else { throw MountError.notFormatted(id, root: root) }
        let blockDevice = try pool.openDevice(id, size: record.size)
        defer { blockDevice.close() }

        // ── The volume: the one line that puts the ext4 layer (libext2fs) under the FUSE server. ──
        let volume = try Volume(device: blockDevice, readOnly: readOnly, logger: Logger(label: "thinfs.volume"))

        do {
            let server = FUSEServer(volume: volume, mountpoint: canonical,
                                    options: .init(readOnly: readOnly, setuidAndDevices: true,
                                                   source: "\(poolRoot.path):\(id)", extraOptions: extra),
                                    logger: logger)
            let sources = signals.onSignal { signal in
                logger.info("stopping", metadata: ["signal": "\(signal)", "fuse.mountpoint": "\(canonical)"])
                server.stop()
            }
            try withExtendedLifetime(sources) {
                MountDaemon.warn(try server.mount().warnings)
                ready?.succeed()
                try server.run()  // returns after the unmount and the final fsync
            }
        } catch {
            // Closed here, while the device is still open, rather than whenever the last reference goes.
            try? volume.close()
            throw error
        }
        // Closing writes libext2fs's last state (superblock, bitmaps) and flushes the device, which
        // commits the pool; the explicit commit covers a volume that had nothing left to write.
        try volume.close()
        if !readOnly { try pool.commit() }
    }

    /// Layer mode: this process becomes the root's pool owner (`LayerDaemon`), serves `first`,
    /// and takes further mounts and store requests on the control socket until the last
    /// layer is unmounted. If another daemon owns the pool already, the mount goes to it.
    private func serveLayers(first: String, signals: ShutdownSignals, ready: MountDaemon.ReadyChannel?) throws {
        let logger = Logger(label: "thinfs.mount")
        let rootPath = URL(fileURLWithPath: root).standardizedFileURL.path
        let mp = URL(fileURLWithPath: mountpoint).standardizedFileURL.path
        let request = LayerRequest(.mount, layer: first, mountpoint: mp, readOnly: readOnly, mountOptions: options)
        let store: LayerStore
        let deadline = Date().addingTimeInterval(15)
        while true {
            do {
                store = try LayerStore.open(root: rootPath, logger: Logger(label: "thinfs.layers"))
                break
            } catch ThinPoolError.heldByAnotherProcess(let data) {
                // Another daemon owns the pool: it serves this mount too. One that is stopping
                // answers EAGAIN (or not at all): then it is about to let go of the pool.
                if let response = try ControlSocket.send(request, to: LayerStore.controlSocketPath(rootPath)),
                   response.errno != EAGAIN {
                    if let error = response.error { throw CommandFailure(message: error) }
                    MountDaemon.warn(LayerService.mountWarnings(response))
                    ready?.succeed()
                    return
                }
                guard Date() < deadline else { throw ThinPoolError.heldByAnotherProcess(data: data) }
                usleep(100_000)
            }
        }
        let daemon = LayerDaemon(store: store, logger: logger)
        let sources = signals.onSignal { signal in
            logger.info("stopping", metadata: ["signal": "\(signal)"])
            daemon.requestStop()
        }
        try withExtendedLifetime(sources) {
            do {
                MountDaemon.warn(try daemon.mount(first, at: mp, readOnly: readOnly, options: options))
                try daemon.listen()
            } catch {
                daemon.requestStop()
                daemon.waitUntilIdle()
                throw error
            }
            ready?.succeed()
            daemon.waitUntilIdle()
        }
    }

    // MARK: mount(8) helper

    /// The name mount(8) runs for `-t fuse.thinfs`.
    public static let helperName = "mount.fuse.thinfs"

    /// What `main` should parse: `argv` without its first element, translated from mount(8)'s
    /// helper form when the program was started as `mount.fuse.thinfs`.
    public static func arguments(for argv: [String]) throws(ValidationError) -> [String] {
        let rest = Array(argv.dropFirst())
        guard let name = argv.first, (name as NSString).lastPathComponent == helperName else { return rest }
        return try helperArguments(rest)
    }

    /// mount(8), "External helpers": `/sbin/mount.TYPE SPEC DIR [-sfnv] [-N NAMESPACE] [-o OPTIONS] [-t TYPE.SUBTYPE]`.
    /// SPEC is `DIR:ID`, the ThinFS root and a thin device id.
    static func helperArguments(_ args: [String]) throws(ValidationError) -> [String] {
        var positional: [String] = []
        var options: [String] = []
        var verbose = false
        var i = 0
        while i < args.count {
            let a = args[i]
            switch a {
            case "-o", "-t", "-N":
                guard i + 1 < args.count else { throw ValidationError("\(helperName): \(a) needs a value") }
                if a == "-o" { options += args[i + 1].split(separator: ",").map(String.init) }
                i += 2
                continue
            case "-v": verbose = true
            case "-s", "-n", "-f": break  // sloppy, no mtab, fake: nothing for a FUSE daemon to do differently
            default:
                if a.hasPrefix("-o") && a.count > 2 {
                    options += a.dropFirst(2).split(separator: ",").map(String.init)
                } else if a.hasPrefix("-") {
                    throw ValidationError("\(helperName): unknown option \(a)")
                } else {
                    positional.append(a)
                }
            }
            i += 1
        }
        guard positional.count == 2 else {
            throw ValidationError("usage: \(helperName) DIR:ID MOUNTPOINT [-o OPTIONS]")
        }
        let spec = positional[0]
        // A layer store's DIR:ID names a layer (LayerStore.splitSource). Otherwise DIR:ID is a
        // pool and a device id, split at the last colon (a root's path may hold colons).
        if let (dir, layer) = LayerStore.splitSource(spec) {
            return ["--root", dir, "--layer", layer, positional[1]] + Self.mountOptions(options, verbose: verbose)
        }
        guard let colon = spec.lastIndex(of: ":"), colon != spec.startIndex,
              DeviceIDArgument(argument: String(spec[spec.index(after: colon)...])) != nil else {
            throw ValidationError("\(helperName): the source must be DIR:ID (a ThinFS root and a thin device id), not '\(spec)'")
        }
        return ["--root", String(spec[..<colon]), "--device", String(spec[spec.index(after: colon)...]), positional[1]]
            + Self.mountOptions(options, verbose: verbose)
    }

    /// mount(8)'s options as thinfs-mount takes them: `-o` without those that mean something to
    /// mount(8) or fstab but not to a FUSE mount, then `-v`.
    private static func mountOptions(_ options: [String], verbose: Bool) -> [String] {
        let mountOnly: Set = ["defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "nofail", "_netdev"]
        let kept = options.filter { !mountOnly.contains($0) && !$0.hasPrefix("x-") && !$0.hasPrefix("comment=") }
        return (kept.isEmpty ? [] : ["-o", kept.joined(separator: ",")]) + (verbose ? ["-v"] : [])
    }
}

/// Errors of `thinfs-mount` that name their remedy.
enum MountError: Error, CustomStringConvertible {
    case noDevice(UInt32, root: String)
    case notFormatted(UInt32, root: String)

    var description: String {
        switch self {
        case .noDevice(let id, let root):
            "thin device \(id) does not exist in the pool at \(root): create it with 'thinfs pool message --root \(root) create_thin \(id)' and format it with 'thinfs dev format --root \(root) \(id)'"
        case .notFormatted(let id, let root):
            "thin device \(id) in \(root) holds no filesystem: format it with 'thinfs dev format --root \(root) \(id)'"
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP, delivered to a dispatch source instead of killing the process.
struct ShutdownSignals {
    static let numbers: [Int32] = [SIGTERM, SIGINT, SIGHUP]

    /// Ignores and blocks the signals in the calling thread, which every thread created later
    /// inherits; then they stay pending until a signal source reads them.
    static func block() -> ShutdownSignals {
        var set = sigset_t()
        sigemptyset(&set)
        for s in numbers {
            signal(s, SIG_IGN)
            sigaddset(&set, s)
        }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        // A write to a closed pipe (the ready channel, a closed terminal) must not kill the daemon.
        signal(SIGPIPE, SIG_IGN)
        return ShutdownSignals()
    }

    /// Calls `handler` on a dispatch queue for each signal, for as long as the returned sources live.
    func onSignal(_ handler: @escaping @Sendable (Int32) -> Void) -> [any DispatchSourceSignal] {
        Self.numbers.map { s in
            let source = DispatchSource.makeSignalSource(signal: s, queue: .global())
            source.setEventHandler { handler(s) }
            source.resume()
            return source
        }
    }
}
