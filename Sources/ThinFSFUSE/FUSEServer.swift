internal import CFuse
import Dispatch
import Foundation
import Logging
import Synchronization
import SystemPackage
import ThinFSCore
#if canImport(Glibc)
import Glibc
#endif

/// Serves any `FileSystemVolume` through the libfuse3 low-level API. ThinFSFUSE is the only
/// module that imports CFuse.
///
/// ## Life cycle
///
///     let server = FUSEServer(volume: v, mountpoint: "/mnt/x", options: .init(), logger: log)
///     try server.mount()   // checks the mount point, creates the session, mounts
///     try server.run()     // blocks in libfuse's multithreaded loop until the mount goes away
///     server.stop()        // from any thread (a signal source): unmounts, so run() returns
///
/// `run()` returns once the kernel ends the connection: `umount`, `fusermount3 -u` or
/// `stop()`. It then commits one last time (`volume.fsync(nil)`) before returning.
///
/// ## Threading
/// libfuse calls the operations below on its worker threads, each through a
/// `@convention(c)` closure that finds the server with `fuse_req_userdata`. The server's
/// mutable state is in two Mutexes, never held together and never held across a volume
/// call: `state` (the session and its phase) and `lookups` (the kernel's lookup counts).
/// The volume serializes itself. Read replies come from `ReplyBufferPool`, so a request
/// allocates no data buffer.
///
/// ## Opens
/// Where the kernel offers FUSE_CAP_NO_OPEN_SUPPORT, the first OPEN is answered ENOSYS and the
/// kernel opens and closes regular files by itself from then on: no OPEN, no RELEASE, cached
/// pages kept (as FOPEN_KEEP_CACHE). Reads, writes and fsyncs arrive with file handle 0; none
/// of them uses the handle. The volume then hears of the kernel's references instead of
/// opens: `volume.remember` when an inode's lookup count leaves 0, `volume.forget` when it
/// returns there (or when the connection ends), so an unlinked file that is still open stays.
/// CREATE still returns a handle, and kernels since 6.9 send RELEASE for it; that open is
/// not counted either, since older kernels drop that RELEASE.
///
/// ## Node ids
/// FUSE's root is node 1 (FUSE_ROOT_ID); the volume's root is `volume.rootInode` (ext4: 2).
/// Every other node id is the volume's inode number: ext4 never hands out inode 1 (the
/// bad-blocks inode), so the two never clash. `st_ino` is always the volume's number.
public final class FUSEServer: Sendable {
    public let volume: any FileSystemVolume
    public let mountpoint: String
    public let options: Options
    let logger: Logger
    /// Read-only when asked to be, or when the volume is.
    let readOnly: Bool
    let rootInode: UInt64
    /// How long the kernel may trust an entry or attributes it got from us, in seconds.
    ///
    /// Read-only mounts: nothing can change the filesystem, so an hour; the kernel still
    /// drops entries under memory pressure. Read-write mounts: the kernel invalidates what
    /// its own requests change, but not what the volume changes on the side. The volume
    /// API is public (the layer store writes through it) and some changes have effects the
    /// kernel cannot derive, such as a directory's link count or set-group-ID inheritance.
    /// One second bounds that staleness. It is libfuse's default and fuse2fs's value, and
    /// costs at most one GETATTR per hot inode per second. With the writeback cache, the
    /// kernel is authoritative for size and mtime of files it has open anyway.
    let cacheTimeout: Double
    let buffers: ReplyBufferPool
    let state = Mutex(State())
    /// Lookups the kernel holds per inode (FUSE's `nlookup`); the root is not counted.
    let lookups = Mutex<[UInt64: UInt64]>([:])
    /// Set by every modifying request; the periodic committer only commits when it was set,
    /// so an idle mount writes nothing.
    let changed = Atomic<Bool>(false)
    /// Set at INIT when the kernel opens and closes regular files without us (`Options.opensInKernel`
    /// and FUSE_CAP_NO_OPEN_SUPPORT): OPEN is answered ENOSYS, and an inode's life in the volume
    /// follows the kernel's lookup count (`remember`, `forget`) instead of open handles.
    let opensInKernel = Atomic<Bool>(false)
    /// READ requests served and their bytes, GETATTRs, OPENs and RELEASEs, logged at unmount: the
    /// evidence of whether the kernel's page cache answered a read or the daemon did.
    let readRequests = Atomic<UInt64>(0)
    let readBytes = Atomic<UInt64>(0)
    let getattrRequests = Atomic<UInt64>(0)
    let openRequests = Atomic<UInt64>(0)
    let releaseRequests = Atomic<UInt64>(0)

    /// The largest read and write: 256 pages, libfuse's receive buffer (FUSE_MAX_MAX_PAGES)
    /// and the kernel's default `fs.fuse.max_pages_limit`.
    static let maxIO = 1 << 20

    /// lseek(2) whence values the Glibc module hides behind _GNU_SOURCE.
    static let seekData: Int32 = 3, seekHole: Int32 = 4

    /// The libfuse version, for `thinfs info`.
    public static var libraryVersion: String { String(cString: fuse_pkgversion()) }

    public init(volume: any FileSystemVolume, mountpoint: String, options: Options = Options(),
                logger: Logger = Logger(label: "thinfs.fuse")) {
        self.volume = volume
        self.mountpoint = mountpoint
        self.options = options
        self.logger = logger
        readOnly = options.readOnly || volume.isReadOnly
        rootInode = volume.rootInode
        cacheTimeout = readOnly ? 3600 : 1
        buffers = ReplyBufferPool(bufferSize: Self.maxIO, expectedConcurrency: options.maxThreads)
    }

    deinit {
        // A server that mounted but never ran (or whose owner gave up) must not leave the mount behind.
        state.withLock { s in
            if let session = s.session {
                fuse_session_unmount(session.pointer)
                fuse_session_destroy(session.pointer)
                s.session = nil
            }
        }
    }

    // MARK: Session

    /// The libfuse session. @unchecked: only `run()`'s thread drives it; `stop()` calls
    /// fuse_session_exit (a flag store, what libfuse's own signal handlers do) under `state`'s lock.
    struct Session: @unchecked Sendable {
        let pointer: OpaquePointer
    }

    struct State {
        enum Phase { case idle, mounted, running, finished }
        var phase = Phase.idle
        var session: Session?
        var canonicalMountpoint: String?
        var device: MountTable.Entry.Device?
        var stopRequests = 0
    }

    /// Checks the mount point, creates the session and mounts. Errors name the mount point.
    /// Returns what the mount grants (`MountAccess`), with warnings for its owner when that is
    /// less than the options asked for.
    @discardableResult
    public func mount() throws(Error) -> MountAccess {
        try state.withLock { s throws(Error) in
            guard s.phase == .idle, s.stopRequests == 0 else {
                throw .wrongState(mountpoint, s.stopRequests > 0 ? "stopped before it was mounted" : "already mounted")
            }
        }
        let canonical = try Self.checkMountpoint(mountpoint, allowNonEmpty: options.allowsNonEmptyMountpoint)
        FUSELog.install()
        let access = MountAccess.decide(mountpoint: canonical, allowOther: options.allowOther,
                                        setuidAndDevices: options.setuidAndDevices, options: options.extraOptions,
                                        context: .current(mountpoint: canonical))
        let optionList = mountOptions(access)

        var args = fuse_args(argc: 0, argv: nil, allocated: 0)
        defer { fuse_opt_free_args(&args) }
        for arg in ["thinfs-mount", "-o", optionList.joined(separator: ",")] where fuse_opt_add_arg(&args, arg) != 0 {
            throw .invalidOptions(canonical, message: "out of memory building the argument vector")
        }
        var ops = Self.operations()
        // The session keeps an unretained pointer: callbacks only arrive while run() (a method
        // of self) is in the loop, and the session is destroyed before self.
        guard let session = fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size,
                                             Unmanaged.passUnretained(self).toOpaque()) else {
            throw .invalidOptions(canonical, message: FUSELog.takeLastError() ?? "libfuse rejected \(optionList)")
        }
        guard fuse_session_mount(session, canonical) == 0 else {
            fuse_session_destroy(session)
            throw .mountFailed(canonical, message: FUSELog.takeLastError() ?? "fuse_session_mount failed")
        }
        let device = MountTable.current().entry(at: canonical)?.device
        state.withLock { s in
            s.phase = .mounted
            s.session = Session(pointer: session)
            s.canonicalMountpoint = canonical
            s.device = device
        }
        logger.info("mounted", metadata: ["fuse.mountpoint": "\(canonical)", "fuse.options": "\(optionList.joined(separator: ","))",
                                          "fuse.warnings": "\(access.warnings)"])
        return access
    }

    /// The `-o` options given to libfuse, for a mount that grants `access`.
    func mountOptions(_ access: MountAccess) -> [String] {
        // fuse_opt splits on commas; a backslash escapes the next character.
        let source = options.source.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: ",", with: "\\,")
        var opts = ["default_permissions", "fsname=thinfs:\(source)", "subtype=thinfs",
                    // libfuse refuses a max_read in INIT that differs from the mount option's.
                    "max_read=\(Self.maxIO)"]
        if readOnly { opts.append("ro") }
        if access.allowOther { opts.append("allow_other") }
        // libfuse mounts nosuid,nodev unless told otherwise.
        if access.setuidAndDevices { opts += ["suid", "dev"] }
        let ours: Set = ["default_permissions", "ro", "allow_other", "nonempty"]
        for o in options.extraOptions where !ours.contains(o) && !o.hasPrefix("max_read=") && !o.hasPrefix("readahead=")
            && o != "opens=daemon" && !(readOnly && o == "rw") {
            opts.append(o)
        }
        return opts
    }

    /// Serves requests until the mount goes away, then commits a last time. Blocks.
    public func run() throws(Error) {
        let session = try state.withLock { s throws(Error) -> Session in
            guard s.phase == .mounted, let session = s.session else {
                throw .wrongState(mountpoint, "run() needs a mounted server that is not yet running")
            }
            s.phase = .running
            return session
        }
        let stopCommitter = startCommitter()
        let config = fuse_loop_cfg_create()
        fuse_loop_cfg_set_max_threads(config, UInt32(max(options.maxThreads, 1)))
        let rc = fuse_session_loop_mt(session.pointer, config)
        fuse_loop_cfg_destroy(config)
        stopCommitter?()

        // Closes /dev/fuse; unmounts (lazily) if the loop ended some other way than an unmount.
        fuse_session_unmount(session.pointer)
        // The kernel's references ended with the connection, FORGET sent or not: unlinked inodes
        // it still held are freed before the last commit.
        forgetAll()
        var commitError: VolumeError?
        if !readOnly {
            do { try volume.fsync(nil) } catch { commitError = error }
        }
        state.withLock { s in
            s.phase = .finished
            s.session = nil
        }
        fuse_session_destroy(session.pointer)
        logger.info("unmounted", metadata: [
            "fuse.mountpoint": "\(mountpoint)",
            "fuse.read_requests": "\(readRequests.load(ordering: .relaxed))",
            "fuse.read_bytes": "\(readBytes.load(ordering: .relaxed))",
            "fuse.getattr_requests": "\(getattrRequests.load(ordering: .relaxed))",
            "fuse.open_requests": "\(openRequests.load(ordering: .relaxed))",
            "fuse.release_requests": "\(releaseRequests.load(ordering: .relaxed))",
        ])
        if rc < 0 { throw .loopFailed(mountpoint, Errno(rawValue: -rc)) }
        if let commitError { throw .commitFailed(mountpoint, "\(commitError)") }
    }

    /// Ends the session: safe from any thread, such as a signal source's.
    ///
    /// The first call unmounts, as `umount` would. The kernel writes back the pages it caches
    /// through the still-running workers and then ends the connection, and `run()` returns.
    /// (Setting libfuse's exit flag first would stop the workers while the kernel still has
    /// pages to write, and those writes would be lost.) A busy mount is detached lazily; it
    /// goes away when its last open file is closed. A second call aborts the connection:
    /// requests in flight fail and the kernel's dirty pages are dropped.
    public func stop() {
        enum Action { case none, unmount(String), abort(MountTable.Entry.Device?) }
        let action = state.withLock { s -> Action in
            s.stopRequests += 1
            switch s.phase {
            case .idle, .finished:
                return .none
            case .mounted, .running:
                if s.stopRequests == 1, let mp = s.canonicalMountpoint { return .unmount(mp) }
                if let session = s.session { fuse_session_exit(session.pointer) }
                return .abort(s.device)
            }
        }
        switch action {
        case .none:
            break
        case .unmount(let mp):
            if let failure = Self.unmountFromOutside(mp) {
                logger.info("unmount failed; aborting the connection", metadata: ["fuse.mountpoint": "\(mp)", "fuse.error": "\(failure)"])
                stop()
            }
        case .abort(let device):
            if let device, Self.abortConnection(device: device) {
                logger.info("aborted the FUSE connection", metadata: ["fuse.mountpoint": "\(mountpoint)"])
            }
        }
    }

    /// Commits about every `commitInterval` while the loop runs (rw only), as dm-thin commits
    /// every second. Returns the function that stops it and waits for a commit in progress.
    func startCommitter() -> (() -> Void)? {
        guard !readOnly, let interval = options.commitInterval else { return nil }
        let (seconds, attoseconds) = interval.components
        let period = DispatchTimeInterval.nanoseconds(Int(seconds) * 1_000_000_000 + Int(attoseconds / 1_000_000_000))
        let timer = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "thinfs.fuse.commit"))
        timer.schedule(deadline: .now() + period, repeating: period, leeway: .milliseconds(100))
        timer.setEventHandler { [self] in
            guard changed.exchange(false, ordering: .acquiringAndReleasing) else { return }
            do { try volume.fsync(nil) } catch {
                changed.store(true, ordering: .releasing)
                logger.info("periodic commit failed", metadata: ["fuse.mountpoint": "\(mountpoint)", "fuse.error": "\(error)"])
            }
        }
        let cancelled = DispatchSemaphore(value: 0)
        timer.setCancelHandler { cancelled.signal() }
        timer.activate()
        return {
            // The cancel handler runs after any event handler in progress has returned.
            timer.cancel()
            cancelled.wait()
        }
    }
}

/// libfuse's own messages (a refused option, a failed mount) arrive through fuse_log. They go
/// to swift-log, and the last error is kept so a thrown error can name the cause. libfuse
/// builds some lines from several calls ("unknown option(s): `" ... "'\n"), so error text
/// is gathered until a newline ends the line.
enum FUSELog {
    private struct Errors {
        var partial = ""
        var last: String?
    }
    private static let errors = Mutex(Errors())
    private static let installed: Bool = {
        fuse_set_log_func { level, format, args in
            guard let format, let args else { return }
            var text = [CChar](repeating: 0, count: 1024)
            _ = vsnprintf(&text, text.count, format, args)
            let raw = text.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
            let logger = Logger(label: "thinfs.fuse.libfuse")
            guard level.rawValue <= FUSE_LOG_ERR.rawValue else {
                logger.debug("\(raw.trimmingCharacters(in: .whitespacesAndNewlines))")
                return
            }
            let line = FUSELog.errors.withLock { e -> String? in
                e.partial += raw
                guard e.partial.hasSuffix("\n") else { return nil }
                defer { e.partial = "" }
                e.last = e.partial.trimmingCharacters(in: .whitespacesAndNewlines)
                return e.last
            }
            if let line { logger.info("\(line)") }
        }
        return true
    }()

    static func install() { _ = installed }

    static func takeLastError() -> String? {
        errors.withLock { e in
            defer { e = Errors() }
            let pending = e.partial.trimmingCharacters(in: .whitespacesAndNewlines)
            return e.last ?? (pending.isEmpty ? nil : pending)
        }
    }
}
