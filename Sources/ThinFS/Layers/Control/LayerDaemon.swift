import Foundation
import Logging

/// The pool owner while layers are mounted: serves any number of layer mounts from one
/// process, each through its own FUSE session, over one `LayerStore` (one pool writer).
///
///     thinfs mount A ──spawn──▶ thinfs-mount --layer A      (no daemon yet: it becomes the owner)
///                                 ├─ LayerStore.open (the pool's flock)
///                                 ├─ control.sock  ◀── thinfs mount B / layer create / rm / ls ...
///                                 ├─ FUSE session A (thread)   ─┐ one VolumeGroup: every commit
///                                 └─ FUSE session B (thread)   ─┘ flushes both volumes first
///
/// When a session ends (umount, fusermount3 -u), its layer is closed (deactivated, in Docker's
/// words; nothing can keep it busy after that) and deferred deletions are retried. When the
/// last session ends the daemon commits, stops listening and exits.
///
/// Two processes run one: the transient daemon `thinfs mount` starts (`thinfs-mount --layer`),
/// which exits with its last mount, and `thinfs serve`, which is `persistent`: it stays up
/// with no mount, and ends only when asked (`requestStop`, on SIGTERM). Both stop the same way.
public final class LayerDaemon: @unchecked Sendable {
    public let store: LayerStore
    let logger: Logger
    /// Stays up with no mount until `requestStop` (`thinfs serve`).
    public let persistent: Bool
    private let lock = NSCondition()
    private var mounts: [String: FUSEServer] = [:]
    /// Requests being handled; the daemon does not exit under one (it may be a mount).
    private var requestsInFlight = 0
    /// SIGTERM: new requests are refused (EAGAIN) and every mount is stopped.
    private var stopRequested = false
    private var exiting = false
    private var listener: ControlSocket.Listener?
    /// Docker retried deferred deletions every 30 s (deviceset.go `cleanupDeletedDevices`).
    public var cleanupInterval: TimeInterval = 30

    /// The daemon of `store`, which this process has open (it holds the pool's writer lock).
    /// FUSE mounts of the store that are still in the mount table belong to a daemon that was
    /// killed: they are detached here (`unmountStale`).
    public init(store: LayerStore, logger: Logger = Logger(label: "thinfs.daemon"), persistent: Bool = false) {
        self.store = store
        self.logger = logger
        self.persistent = persistent
        unmountStale()
    }

    /// Starts answering requests on `ROOT/control.sock`.
    public func listen() throws {
        let listener = try ControlSocket.Listener(path: LayerStore.controlSocketPath(store.root))
        self.listener = listener
        let service = LayerService(store: store, daemon: self)
        listener.serve { [weak self] request in
            guard let self else { return LayerResponse(error: "the daemon is stopping; retry", errno: EAGAIN) }
            guard self.begin() else { return LayerResponse(error: "the daemon is stopping; retry", errno: EAGAIN) }
            defer { self.end() }
            return service.handle(request)
        }
        // The periodic deferred-deletion worker, as Docker's (every 30 s): unmounts already retry
        // deletions; this catches one that failed then, or a layer freed by a reader going away.
        let timer = Thread { [weak self] in
            var last = Date()
            while let self, !self.isExiting {
                Thread.sleep(forTimeInterval: 1)
                guard Date().timeIntervalSince(last) >= self.cleanupInterval else { continue }
                last = Date()
                do {
                    let deleted = try self.store.cleanup()
                    if !deleted.isEmpty { self.logger.info("deferred deletions done", metadata: ["layers": "\(deleted)"]) }
                } catch {
                    self.logger.warning("deferred deletion failed; retrying later", metadata: ["error": "\(error)"])
                }
            }
        }
        timer.name = "thinfs-cleanup"
        timer.start()
    }

    private var isExiting: Bool { lock.withLock { exiting } }

    private func begin() -> Bool {
        lock.withLock {
            guard !exiting, !stopRequested else { return false }
            requestsInFlight += 1
            return true
        }
    }

    private func end() {
        lock.withLock {
            requestsInFlight -= 1
            lock.broadcast()
        }
    }

    /// Mounts layer `id` at `mountpoint` and serves it on a new thread. Image layers are
    /// read-only unless `writableImage` (Docker's graphdriver, whose `Get` mounts every layer
    /// read-write until it has a child; `openLayer` refuses one that has). Returns once the
    /// mount is ready, with the warnings for whoever asked when the mount grants less than a
    /// container's rootfs should have (`MountAccess`).
    @discardableResult
    public func mount(_ id: String, at mountpoint: String, readOnly requested: Bool, options requestedOptions: [String] = [],
                      writableImage: Bool = false) throws -> [String] {
        try LayerStore.validate(mountpoint, what: "mount point")
        for option in requestedOptions { try LayerStore.validate(option, what: "mount option") }
        let layer = try store.liveLayer(id)
        // dm.mountopt applies to every mount, as Docker added it to each layer's mount.
        let options = store.options.mountOptions + requestedOptions
        let readOnly = requested || (layer.kind == .image && !writableImage) || store.readOnly
        let extra = options.filter { $0 != "ro" && $0 != "rw" && $0 != "allow_other" }
        let canonical = try FUSEServer.checkMountpoint(mountpoint, allowNonEmpty: extra.contains("nonempty"))
        let open = try store.openLayer(id, readOnly: readOnly, what: "mounted at \(canonical)")
        // Every user of the container may enter, and its set-user-ID programs and device nodes
        // work where host users cannot reach them: as Docker's rootfs mounts.
        let server = FUSEServer(volume: open.volume, mountpoint: canonical,
                                options: .init(readOnly: readOnly, setuidAndDevices: true,
                                               source: "\(store.root):\(id)", extraOptions: extra),
                                logger: logger)
        let access: MountAccess
        do {
            access = try server.mount()
        } catch {
            try? open.close()
            throw error
        }
        let stopping = lock.withLock { () -> Bool in
            mounts[canonical] = server
            return stopRequested
        }
        let thread = Thread { [self] in
            do { try server.run() } catch {
                logger.error("serving failed", metadata: ["layer": "\(id)", "fuse.mountpoint": "\(canonical)", "error": "\(error)"])
            }
            // Deactivation: the volume and the device close, the busy lock goes.
            do { try open.close() } catch {
                logger.error("closing the layer failed", metadata: ["layer": "\(id)", "error": "\(error)"])
            }
            do {
                let deleted = try store.cleanup()
                if !deleted.isEmpty { logger.info("deferred deletions done", metadata: ["layers": "\(deleted)"]) }
            } catch {
                logger.error("deferred deletion failed", metadata: ["error": "\(error)"])
            }
            lock.withLock {
                mounts[canonical] = nil
                lock.broadcast()
            }
        }
        thread.name = "thinfs-fuse-\(id)"
        thread.start()
        logger.info("mounted layer", metadata: ["layer": "\(id)", "fuse.mountpoint": "\(canonical)", "ro": "\(readOnly)"])
        // A stop came while this mount was being made, after `requestStop` looked: it goes too.
        if stopping { server.stop() }
        return access.warnings
    }

    /// Unmounts the layer this daemon serves at `mountpoint` (canonical, as `mount` made it) and
    /// waits up to `timeout` seconds for its session to end and the layer to close (not busy any
    /// more). True when it has (or nothing was mounted there). A session outlives the unmount
    /// while a bind mount of it is left somewhere (a container's rootfs): then false, and the
    /// layer closes when that goes. The containerd snapshotter unmounts its own mounts so.
    @discardableResult
    public func unmount(_ mountpoint: String, timeout: TimeInterval = 10) -> Bool {
        guard let server = lock.withLock({ mounts[mountpoint] }) else { return true }
        server.stop()
        let deadline = Date(timeIntervalSinceNow: timeout)
        return lock.withLock {
            while mounts[mountpoint] != nil {
                if !lock.wait(until: deadline) { return mounts[mountpoint] == nil }
            }
            return true
        }
    }

    /// Whether this daemon serves a mount at `mountpoint` (canonical).
    public func isServing(_ mountpoint: String) -> Bool {
        lock.withLock { mounts[mountpoint] != nil }
    }

    /// SIGTERM: refuses new requests and unmounts every layer; each session flushes and closes
    /// as on umount. `waitUntilIdle` then returns once they are all closed. Does not block, so
    /// a signal handler may call it; a second call aborts the sessions that are still running.
    public func requestStop() {
        lock.withLock {
            stopRequested = true
            lock.broadcast()
        }
        for server in lock.withLock({ Array(mounts.values) }) { server.stop() }
    }

    /// Blocks until `requestStop` (`thinfs serve`, which then stops its services before the
    /// daemon unmounts and closes in `waitUntilIdle`).
    public func waitForStopRequest() {
        lock.withLock {
            while !stopRequested { lock.wait() }
        }
    }

    /// Stops answering on the control socket (a stopping daemon answers nothing more there).
    public func stopListening() {
        listener?.close()
    }

    /// Blocks until no layer is mounted and no request is in flight (and, when `persistent`,
    /// a stop was requested), then stops listening, runs the deferred deletions it can, and
    /// closes the store, which commits the pool.
    public func waitUntilIdle() {
        lock.withLock {
            while !mounts.isEmpty || requestsInFlight > 0 || (persistent && !stopRequested) { lock.wait() }
            exiting = true
        }
        logger.info("stopping: no layer is mounted", metadata: ["root": "\(store.root)"])
        listener?.close()
        _ = try? store.cleanup()
        do {
            try store.close()
            logger.info("store closed and committed", metadata: ["root": "\(store.root)"])
        } catch {
            logger.error("closing the store failed", metadata: ["root": "\(store.root)", "error": "\(error)"])
        }
    }
}
