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

/// Serves any `FileSystemVolume` through the libfuse3 low-level API. This is the only
/// file that imports CFuse.
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
    private let state = Mutex(State())
    /// Lookups the kernel holds per inode (FUSE's `nlookup`); the root is not counted.
    private let lookups = Mutex<[UInt64: UInt64]>([:])
    /// Set by every modifying request; the periodic committer only commits when it was set,
    /// so an idle mount writes nothing.
    private let changed = Atomic<Bool>(false)
    /// READ requests served and their bytes, and GETATTRs, logged at unmount: the evidence of
    /// whether the kernel's page cache answered a read or the daemon did.
    private let readRequests = Atomic<UInt64>(0)
    private let readBytes = Atomic<UInt64>(0)
    private let getattrRequests = Atomic<UInt64>(0)

    /// The largest read and write: 256 pages, libfuse's receive buffer (FUSE_MAX_MAX_PAGES)
    /// and the kernel's default `fs.fuse.max_pages_limit`.
    static let maxIO = 1 << 20

    /// lseek(2) whence values the Glibc module hides behind _GNU_SOURCE.
    private static let seekData: Int32 = 3, seekHole: Int32 = 4

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
            && !(readOnly && o == "rw") {
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
    private func startCommitter() -> (() -> Void)? {
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

    // MARK: Errors

    /// The one place a Swift error becomes the errno given to fuse_reply_err(3).
    ///
    /// - `VolumeError` carries the errno a kernel filesystem returns in the same situation
    ///   (the ERRORS sections of open(2), rename(2), unlink(2), setxattr(2), fallocate(2)...).
    /// - ENOSYS becomes EOPNOTSUPP. The FUSE kernel module reads ENOSYS as "this filesystem
    ///   lacks the operation" and never sends it again for the life of the mount (fallocate,
    ///   lseek, xattrs, rename2 and others). EOPNOTSUPP is what fallocate(2) and the xattr
    ///   calls document for an unsupported mode or namespace.
    /// - Anything else is EIO (errno(3): "Input/output error"), as a kernel filesystem
    ///   reports a failure of the layer below it.
    static func errnoCode(for error: any Swift.Error) -> Int32 {
        guard let e = error as? VolumeError else { return EIO }
        let code = e.errno.rawValue
        if code == ENOSYS { return EOPNOTSUPP }
        return code > 0 ? code : EIO
    }

    /// For modifying requests: EROFS on a read-only mount; otherwise notes that a commit is due.
    private func writable(_ req: fuse_req_t) -> Bool {
        guard !readOnly else {
            fuse_reply_err(req, EROFS)
            return false
        }
        changed.store(true, ordering: .releasing)
        return true
    }

    private func fail(_ req: fuse_req_t, _ op: StaticString, _ error: any Swift.Error) {
        let code = Self.errnoCode(for: error)
        if code == EIO {
            logger.info("FUSE request failed", metadata: ["fuse.op": "\(op)", "fuse.error": "\(error)"])
        } else {
            logger.debug("FUSE request failed", metadata: ["fuse.op": "\(op)", "fuse.error": "\(error)"])
        }
        fuse_reply_err(req, code)
    }

    // MARK: Conversions

    @inline(__always) private func inode(_ node: fuse_ino_t) -> UInt64 { node == UInt64(FUSE_ROOT_ID) ? rootInode : node }
    @inline(__always) private func nodeID(_ ino: UInt64) -> fuse_ino_t { ino == rootInode ? fuse_ino_t(FUSE_ROOT_ID) : ino }

    private static func stat(of a: FileAttributes) -> stat {
        var st = Glibc.stat()
        st.st_ino = numericCast(a.ino)
        st.st_mode = numericCast(a.mode)
        st.st_nlink = numericCast(a.nlink)
        st.st_uid = numericCast(a.uid)
        st.st_gid = numericCast(a.gid)
        st.st_rdev = numericCast(a.rdev)
        st.st_size = numericCast(a.size)
        st.st_blocks = numericCast(a.blocks)
        st.st_blksize = numericCast(a.blockSize)
        st.st_atim = timespec(a.atime)
        st.st_mtim = timespec(a.mtime)
        st.st_ctim = timespec(a.ctime)
        return st
    }

    private static func timespec(_ t: Timestamp) -> Glibc.timespec {
        Glibc.timespec(tv_sec: numericCast(t.seconds), tv_nsec: numericCast(t.nanoseconds))
    }

    private static func timestamp(_ t: Glibc.timespec) -> Timestamp {
        Timestamp(seconds: numericCast(t.tv_sec), nanoseconds: numericCast(t.tv_nsec))
    }

    private func entryParam(_ a: FileAttributes) -> fuse_entry_param {
        var e = fuse_entry_param()
        e.ino = nodeID(a.ino)
        e.generation = UInt64(a.generation)
        e.attr = Self.stat(of: a)
        e.attr_timeout = cacheTimeout
        e.entry_timeout = cacheTimeout
        return e
    }

    private static func owner(_ req: fuse_req_t) -> Owner {
        guard let ctx = fuse_req_ctx(req) else { return .root }
        return Owner(uid: ctx.pointee.uid, gid: ctx.pointee.gid)
    }

    private static func string(_ p: UnsafePointer<CChar>?) -> String { p.map { String(cString: $0) } ?? "" }

    // MARK: Lookup counts

    /// Counts a lookup the kernel is about to hold. Called before the reply is sent: the
    /// kernel may send FORGET as soon as it has the reply.
    private func remember(_ ino: UInt64) {
        guard ino != rootInode else { return }
        lookups.withLock { $0[ino, default: 0] += 1 }
    }

    /// Drops `n` lookups; at zero the volume may free an unlinked inode.
    private func forget(_ ino: UInt64, _ n: UInt64) {
        guard ino != rootInode else { return }
        let last = lookups.withLock { counts -> Bool in
            guard let c = counts[ino] else { return false }
            if c <= n {
                counts[ino] = nil
                return true
            }
            counts[ino] = c - n
            return false
        }
        if last { volume.forget(ino) }
    }

    /// The kernel's lookup count of `ino` (tests).
    func lookupCount(_ ino: UInt64) -> UInt64 { lookups.withLock { $0[ino] ?? 0 } }

    private func replyEntry(_ req: fuse_req_t, _ a: FileAttributes) {
        var e = entryParam(a)
        remember(a.ino)
        // A failed reply (the request was interrupted) reached no one: take the count back.
        if fuse_reply_entry(req, &e) != 0 { forget(a.ino, 1) }
    }

    private func replyAttr(_ req: fuse_req_t, _ a: FileAttributes) {
        var st = Self.stat(of: a)
        fuse_reply_attr(req, &st, cacheTimeout)
    }

    // MARK: Operations

    private func initialize(_ conn: UnsafeMutablePointer<fuse_conn_info>) {
        let capable = conn.pointee.capable
        // max_pages follows max_write: libfuse sets it in the INIT reply when the kernel offers FUSE_MAX_PAGES.
        conn.pointee.max_write = UInt32(Self.maxIO)
        conn.pointee.max_read = UInt32(Self.maxIO)
        conn.pointee.max_background = 64
        if let kib = options.effectiveReadAheadKiB {
            // The kernel sets the mount's read-ahead to the smaller of the backing device's value and
            // ours when it processes this reply, so the device's value is raised first, here.
            if let device = state.withLock({ $0.device }), Self.setReadAhead(kib: kib, device: device) {
                conn.pointee.max_readahead = UInt32(kib * 1024)
            } else {
                logger.debug("could not raise read-ahead", metadata: ["fuse.mountpoint": "\(mountpoint)"])
            }
        }
        conn.pointee.congestion_threshold = 48
        var want = conn.pointee.want
        // The volume does not clear set-user-ID bits on write or chown: let the kernel do it (with a setattr).
        want &= ~UInt32(FUSE_CAP_HANDLE_KILLPRIV)
        // Without it the kernel truncates with a setattr before open, and open never sees O_TRUNC.
        want &= ~UInt32(FUSE_CAP_ATOMIC_O_TRUNC)
        want &= ~UInt32(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE)
        // Write-back caching lets the kernel merge small writes into max_write requests. It is safe on a
        // read-write mount because every change comes through this kernel; a read-only mount has no writes.
        if !readOnly, capable & UInt32(FUSE_CAP_WRITEBACK_CACHE) != 0 { want |= UInt32(FUSE_CAP_WRITEBACK_CACHE) }
        // libfuse turns on auto_inval_data by default: the kernel then refreshes a file's attributes
        // before every read() once they are older than the attr timeout (a GETATTR round trip per
        // second of a long read on rw mounts), to drop cached pages when another client changed the
        // file. Nothing else changes our files: a read-only mount never changes, and with the writeback
        // cache the kernel ignores our size and mtime for regular files anyway. The kernel still asks
        // for the size when a read reaches past the cached EOF.
        want &= ~UInt32(FUSE_CAP_AUTO_INVAL_DATA)
        // A symlink's target never changes (a new target is a new inode), so the page cache may keep it.
        if capable & UInt32(FUSE_CAP_CACHE_SYMLINKS) != 0 { want |= UInt32(FUSE_CAP_CACHE_SYMLINKS) }
        conn.pointee.want = want & capable
        logger.debug("FUSE INIT", metadata: [
            "fuse.proto": "\(conn.pointee.proto_major).\(conn.pointee.proto_minor)",
            "fuse.want": "\(String(conn.pointee.want, radix: 16))", "fuse.capable": "\(String(capable, radix: 16))",
            "fuse.max_write": "\(conn.pointee.max_write)",
        ])
    }

    private func lookup(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String) {
        do {
            replyEntry(req, try volume.lookup(parent: inode(parent), name: name))
        } catch where error.errno == .noSuchFileOrDirectory {
            // A negative entry: the kernel may remember the name's absence for the timeout.
            var e = fuse_entry_param()
            e.entry_timeout = cacheTimeout
            fuse_reply_entry(req, &e)
        } catch {
            fail(req, "lookup", error)
        }
    }

    private func getattr(_ req: fuse_req_t, _ node: fuse_ino_t) {
        getattrRequests.add(1, ordering: .relaxed)
        do { replyAttr(req, try volume.getattr(inode(node))) } catch { fail(req, "getattr", error) }
    }

    private func setattr(_ req: fuse_req_t, _ node: fuse_ino_t, _ attr: UnsafeMutablePointer<stat>?, _ toSet: Int32) {
        guard writable(req) else { return }
        guard let attr else { fuse_reply_err(req, EINVAL); return }
        var c = AttributeChanges()
        if toSet & FUSE_SET_ATTR_MODE != 0 { c.mode = numericCast(attr.pointee.st_mode) }
        if toSet & FUSE_SET_ATTR_UID != 0 { c.uid = numericCast(attr.pointee.st_uid) }
        if toSet & FUSE_SET_ATTR_GID != 0 { c.gid = numericCast(attr.pointee.st_gid) }
        if toSet & FUSE_SET_ATTR_SIZE != 0 { c.size = numericCast(attr.pointee.st_size) }
        if toSet & FUSE_SET_ATTR_ATIME_NOW != 0 {
            c.atime = .now
        } else if toSet & FUSE_SET_ATTR_ATIME != 0 {
            c.atime = .set(Self.timestamp(attr.pointee.st_atim))
        }
        if toSet & FUSE_SET_ATTR_MTIME_NOW != 0 {
            c.mtime = .now
        } else if toSet & FUSE_SET_ATTR_MTIME != 0 {
            c.mtime = .set(Self.timestamp(attr.pointee.st_mtim))
        }
        if toSet & FUSE_SET_ATTR_CTIME != 0 { c.ctime = Self.timestamp(attr.pointee.st_ctim) }
        do { replyAttr(req, try volume.setattr(inode(node), c)) } catch { fail(req, "setattr", error) }
    }

    private func readlink(_ req: fuse_req_t, _ node: fuse_ino_t) {
        do { fuse_reply_readlink(req, try volume.readlink(inode(node))) } catch { fail(req, "readlink", error) }
    }

    private func mknod(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String, _ mode: mode_t, _ rdev: dev_t) {
        guard writable(req) else { return }
        do {
            replyEntry(req, try volume.mknod(parent: inode(parent), name: name, mode: numericCast(mode), rdev: numericCast(rdev),
                                             owner: Self.owner(req)))
        } catch { fail(req, "mknod", error) }
    }

    private func mkdir(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String, _ mode: mode_t) {
        guard writable(req) else { return }
        do {
            replyEntry(req, try volume.mkdir(parent: inode(parent), name: name, mode: numericCast(mode) & 0o7777, owner: Self.owner(req)))
        } catch { fail(req, "mkdir", error) }
    }

    private func symlink(_ req: fuse_req_t, _ target: String, _ parent: fuse_ino_t, _ name: String) {
        guard writable(req) else { return }
        do {
            replyEntry(req, try volume.symlink(parent: inode(parent), name: name, target: target, owner: Self.owner(req)))
        } catch { fail(req, "symlink", error) }
    }

    private func link(_ req: fuse_req_t, _ node: fuse_ino_t, _ newParent: fuse_ino_t, _ newName: String) {
        guard writable(req) else { return }
        do {
            replyEntry(req, try volume.link(inode(node), newParent: inode(newParent), newName: newName))
        } catch { fail(req, "link", error) }
    }

    private func unlink(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String) {
        guard writable(req) else { return }
        do {
            try volume.unlink(parent: inode(parent), name: name)
            fuse_reply_err(req, 0)
        } catch { fail(req, "unlink", error) }
    }

    private func rmdir(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String) {
        guard writable(req) else { return }
        do {
            try volume.rmdir(parent: inode(parent), name: name)
            fuse_reply_err(req, 0)
        } catch { fail(req, "rmdir", error) }
    }

    private func rename(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String, _ newParent: fuse_ino_t, _ newName: String, _ flags: UInt32) {
        guard writable(req) else { return }
        let known: RenameFlags = [.noReplace, .exchange]
        let f = RenameFlags(rawValue: flags)
        // rename(2): EINVAL for an unknown flag (RENAME_WHITEOUT included), or for NOREPLACE with EXCHANGE.
        guard known.isSuperset(of: f), f != known else { fuse_reply_err(req, EINVAL); return }
        do {
            try volume.rename(parent: inode(parent), name: name, newParent: inode(newParent), newName: newName, flags: f)
            fuse_reply_err(req, 0)
        } catch { fail(req, "rename", error) }
    }

    private func open(_ req: fuse_req_t, _ node: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>) {
        if readOnly, fi.pointee.flags & O_ACCMODE != O_RDONLY { fuse_reply_err(req, EROFS); return }
        let ino = inode(node)
        do { try volume.open(ino) } catch { fail(req, "open", error); return }
        fi.pointee.direct_io = 0
        // Keep cached pages across opens. A read-only layer never changes; a read-write mount
        // is changed only through this kernel mount (the daemon holds the pool's writer lock,
        // and the volume has no other writer), so the kernel's pages are the truth there too.
        fi.pointee.keep_cache = 1
        // fuse_reply_open(3): when the reply fails, release is never called for this open.
        if fuse_reply_open(req, fi) != 0 { volume.release(ino) }
    }

    private func create(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String, _ mode: mode_t, _ fi: UnsafeMutablePointer<fuse_file_info>) {
        guard writable(req) else { return }
        let typed = mode & S_IFMT == 0 ? mode | S_IFREG : mode
        do {
            let a = try volume.mknod(parent: inode(parent), name: name, mode: numericCast(typed), rdev: 0, owner: Self.owner(req))
            try volume.open(a.ino)
            fi.pointee.direct_io = 0
            fi.pointee.keep_cache = 1
            var e = entryParam(a)
            remember(a.ino)
            if fuse_reply_create(req, &e, fi) != 0 {
                volume.release(a.ino)
                forget(a.ino, 1)
            }
        } catch { fail(req, "create", error) }
    }

    private func read(_ req: fuse_req_t, _ node: fuse_ino_t, _ size: Int, _ offset: off_t) {
        buffers.withBuffer { buffer in
            let want = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<min(size, buffer.count)])
            do {
                let n = try volume.read(inode(node), at: UInt64(offset), into: want)
                readRequests.add(1, ordering: .relaxed)
                readBytes.add(UInt64(n), ordering: .relaxed)
                fuse_reply_buf(req, buffer.baseAddress!.assumingMemoryBound(to: CChar.self), n)
            } catch { fail(req, "read", error) }
        }
    }

    private func write(_ req: fuse_req_t, _ node: fuse_ino_t, _ data: UnsafePointer<CChar>?, _ size: Int, _ offset: off_t) {
        guard writable(req) else { return }
        do {
            let n = try volume.write(inode(node), at: UInt64(offset), from: UnsafeRawBufferPointer(start: data, count: size))
            fuse_reply_write(req, n)
        } catch { fail(req, "write", error) }
    }

    private func release(_ req: fuse_req_t, _ node: fuse_ino_t) {
        volume.release(inode(node))
        fuse_reply_err(req, 0)
    }

    private func fsync(_ req: fuse_req_t, _ node: fuse_ino_t?) {
        // A read-only volume has nothing to make durable.
        guard !readOnly else { fuse_reply_err(req, 0); return }
        do {
            try volume.fsync(node.map(inode))
            fuse_reply_err(req, 0)
        } catch { fail(req, "fsync", error) }
    }

    private func opendir(_ req: fuse_req_t, _ fi: UnsafeMutablePointer<fuse_file_info>) {
        if readOnly {
            // Nothing changes a read-only directory: the kernel may cache its listing.
            fi.pointee.cache_readdir = 1
            fi.pointee.keep_cache = 1
        }
        fuse_reply_open(req, fi)
    }

    /// READDIR: as many entries after `offset` as fit in `size` bytes; each carries its cookie.
    private func readdir(_ req: fuse_req_t, _ node: fuse_ino_t, _ size: Int, _ offset: off_t) {
        buffers.withBuffer { buffer in
            let base = buffer.baseAddress!.assumingMemoryBound(to: CChar.self)
            let capacity = min(size, buffer.count)
            var used = 0
            do throws(VolumeError) {
                try volume.readdir(inode(node), after: UInt64(offset)) { entry throws(VolumeError) -> Bool in
                    var st = Glibc.stat()
                    st.st_ino = numericCast(entry.ino)
                    st.st_mode = numericCast(entry.type)
                    let n = entry.name.withCString { fuse_add_direntry(req, base + used, capacity - used, $0, &st, off_t(entry.cookie)) }
                    guard n <= capacity - used else { return false }
                    used += n
                    return true
                }
            } catch {
                // Entries already gathered are still good; the error comes back with the next call.
                if used == 0 { fail(req, "readdir", error); return }
            }
            fuse_reply_buf(req, base, used)
        }
    }

    /// READDIRPLUS: READDIR with each entry's attributes. Every entry but "." and ".." gives
    /// the kernel a lookup reference, exactly as a LOOKUP reply would.
    private func readdirplus(_ req: fuse_req_t, _ node: fuse_ino_t, _ size: Int, _ offset: off_t) {
        buffers.withBuffer { buffer in
            let base = buffer.baseAddress!.assumingMemoryBound(to: CChar.self)
            let capacity = min(size, buffer.count)
            // First gather the names that fit (getattr cannot run inside the volume's readdir:
            // the volume holds its lock there), then fill in attributes.
            var listed: [DirectoryEntry] = []
            var needed = 0
            var listError: VolumeError?
            do throws(VolumeError) {
                try volume.readdir(inode(node), after: UInt64(offset)) { entry throws(VolumeError) -> Bool in
                    // With no buffer, fuse_add_direntry_plus only reports the entry's size.
                    let n = entry.name.withCString { fuse_add_direntry_plus(req, nil, 0, $0, nil, 0) }
                    guard needed + n <= capacity else { return false }
                    needed += n
                    listed.append(entry)
                    return true
                }
            } catch {
                listError = error
            }
            var used = 0
            var counted: [UInt64] = []
            for entry in listed {
                var e = fuse_entry_param()
                if entry.name == "." || entry.name == ".." {
                    // Node id 0: the kernel makes no dentry for it and holds no lookup.
                    e.attr.st_ino = numericCast(entry.ino)
                    e.attr.st_mode = numericCast(entry.type)
                } else {
                    do throws(VolumeError) {
                        e = entryParam(try volume.getattr(entry.ino))
                    } catch where error.errno == .noSuchFileOrDirectory {
                        continue  // removed since it was listed
                    } catch {
                        listError = error
                        break
                    }
                    remember(entry.ino)
                    counted.append(entry.ino)
                }
                used += entry.name.withCString { fuse_add_direntry_plus(req, base + used, capacity - used, $0, &e, off_t(entry.cookie)) }
            }
            if used == 0, let listError { fail(req, "readdirplus", listError); return }
            if fuse_reply_buf(req, base, used) != 0 {
                for ino in counted { forget(ino, 1) }
            }
        }
    }

    private func statfs(_ req: fuse_req_t) {
        do {
            let s = try volume.statfs()
            var v = statvfs()
            v.f_bsize = numericCast(s.blockSize)
            v.f_frsize = numericCast(s.blockSize)
            v.f_blocks = numericCast(s.blocks)
            v.f_bfree = numericCast(s.freeBlocks)
            v.f_bavail = numericCast(s.availableBlocks)
            v.f_files = numericCast(s.files)
            v.f_ffree = numericCast(s.freeFiles)
            v.f_favail = numericCast(s.freeFiles)
            v.f_namemax = numericCast(s.nameMax)
            fuse_reply_statfs(req, &v)
        } catch { fail(req, "statfs", error) }
    }

    private func setxattr(_ req: fuse_req_t, _ node: fuse_ino_t, _ name: String, _ value: UnsafePointer<CChar>?, _ size: Int, _ flags: Int32) {
        guard writable(req) else { return }
        let bytes = [UInt8](UnsafeRawBufferPointer(start: value, count: value == nil ? 0 : size))
        do {
            try volume.setxattr(inode(node), name: name, value: bytes, flags: XattrFlags(rawValue: flags))
            // Before the reply, so that a stat right after setxattr returns cannot see the old mode.
            if name == "system.posix_acl_access" { invalidateAttributes(node) }
            fuse_reply_err(req, 0)
        } catch { fail(req, "setxattr", error) }
    }

    /// An access ACL changes the mode bits, which the kernel cached without knowing (FUSE_CAP_POSIX_ACL
    /// is off, so it treats the ACL as an opaque xattr): tell it to drop the cached attributes
    /// (a negative offset invalidates attributes only, fuse_lowlevel.h). Attribute-only
    /// invalidation takes no inode or page lock in the kernel, so it is safe while the
    /// setxattr request is still pending.
    private func invalidateAttributes(_ node: fuse_ino_t) {
        guard let session = state.withLock({ $0.session }) else { return }
        _ = fuse_lowlevel_notify_inval_inode(session.pointer, node, -1, 0)
    }

    /// getxattr(2)/listxattr(2): a size of 0 asks how big the value is; a smaller buffer is ERANGE.
    private func replyXattr(_ req: fuse_req_t, _ bytes: [UInt8], _ size: Int) {
        if size == 0 {
            fuse_reply_xattr(req, bytes.count)
        } else if bytes.count > size {
            fuse_reply_err(req, ERANGE)
        } else {
            _ = bytes.withUnsafeBytes { fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
        }
    }

    private func getxattr(_ req: fuse_req_t, _ node: fuse_ino_t, _ name: String, _ size: Int) {
        do { replyXattr(req, try volume.getxattr(inode(node), name: name), size) } catch { fail(req, "getxattr", error) }
    }

    private func listxattr(_ req: fuse_req_t, _ node: fuse_ino_t, _ size: Int) {
        do {
            // listxattr(2): the names, each followed by a NUL.
            let names = try volume.listxattr(inode(node))
            replyXattr(req, names.flatMap { Array($0.utf8) + [0] }, size)
        } catch { fail(req, "listxattr", error) }
    }

    private func removexattr(_ req: fuse_req_t, _ node: fuse_ino_t, _ name: String) {
        guard writable(req) else { return }
        do {
            try volume.removexattr(inode(node), name: name)
            fuse_reply_err(req, 0)
        } catch { fail(req, "removexattr", error) }
    }

    private func fallocate(_ req: fuse_req_t, _ node: fuse_ino_t, _ mode: Int32, _ offset: off_t, _ length: off_t) {
        guard writable(req) else { return }
        guard offset >= 0, length > 0 else { fuse_reply_err(req, EINVAL); return }
        do {
            try volume.fallocate(inode(node), mode: FallocateMode(rawValue: mode), offset: UInt64(offset), length: UInt64(length))
            fuse_reply_err(req, 0)
        } catch { fail(req, "fallocate", error) }
    }

    private func lseek(_ req: fuse_req_t, _ node: fuse_ino_t, _ offset: off_t, _ whence: Int32) {
        let target: SeekTarget
        switch whence {
        case Self.seekData: target = .data
        case Self.seekHole: target = .hole
        // The kernel answers SEEK_SET/CUR/END itself and only forwards these two. EINVAL, not
        // ENOSYS: ENOSYS would make it stop forwarding SEEK_DATA/SEEK_HOLE too.
        default: fuse_reply_err(req, EINVAL); return
        }
        guard offset >= 0 else { fuse_reply_err(req, ENXIO); return }
        do {
            fuse_reply_lseek(req, off_t(try volume.seek(inode(node), from: UInt64(offset), to: target)))
        } catch { fail(req, "lseek", error) }
    }

    // MARK: The operation table

    private static func server(_ req: fuse_req_t) -> FUSEServer {
        Unmanaged<FUSEServer>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
    }

    /// The `fuse_lowlevel_ops` table. libfuse copies it in fuse_session_new; each entry is a
    /// C function that finds the server through the request's user data.
    private static func operations() -> fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()
        ops.`init` = { userdata, conn in
            guard let userdata, let conn else { return }
            Unmanaged<FUSEServer>.fromOpaque(userdata).takeUnretainedValue().initialize(conn)
        }
        ops.lookup = { req, parent, name in FUSEServer.server(req!).lookup(req!, parent, FUSEServer.string(name)) }
        ops.forget = { req, node, nlookup in
            let s = FUSEServer.server(req!)
            s.forget(s.inode(node), nlookup)
            fuse_reply_none(req)
        }
        ops.forget_multi = { req, count, forgets in
            let s = FUSEServer.server(req!)
            if let forgets {
                for f in UnsafeBufferPointer(start: forgets, count: count) { s.forget(s.inode(f.ino), f.nlookup) }
            }
            fuse_reply_none(req)
        }
        ops.getattr = { req, node, _ in FUSEServer.server(req!).getattr(req!, node) }
        ops.setattr = { req, node, attr, toSet, _ in FUSEServer.server(req!).setattr(req!, node, attr, toSet) }
        ops.readlink = { req, node in FUSEServer.server(req!).readlink(req!, node) }
        ops.mknod = { req, parent, name, mode, rdev in FUSEServer.server(req!).mknod(req!, parent, FUSEServer.string(name), mode, rdev) }
        ops.mkdir = { req, parent, name, mode in FUSEServer.server(req!).mkdir(req!, parent, FUSEServer.string(name), mode) }
        ops.unlink = { req, parent, name in FUSEServer.server(req!).unlink(req!, parent, FUSEServer.string(name)) }
        ops.rmdir = { req, parent, name in FUSEServer.server(req!).rmdir(req!, parent, FUSEServer.string(name)) }
        ops.symlink = { req, target, parent, name in FUSEServer.server(req!).symlink(req!, FUSEServer.string(target), parent, FUSEServer.string(name)) }
        ops.rename = { req, parent, name, newParent, newName, flags in
            FUSEServer.server(req!).rename(req!, parent, FUSEServer.string(name), newParent, FUSEServer.string(newName), flags)
        }
        ops.link = { req, node, newParent, newName in FUSEServer.server(req!).link(req!, node, newParent, FUSEServer.string(newName)) }
        ops.open = { req, node, fi in FUSEServer.server(req!).open(req!, node, fi!) }
        ops.read = { req, node, size, offset, _ in FUSEServer.server(req!).read(req!, node, size, offset) }
        ops.write = { req, node, data, size, offset, _ in FUSEServer.server(req!).write(req!, node, data, size, offset) }
        // FLUSH (every close(2)) has nothing to do here: data reaches the volume on WRITE, and
        // durability is fsync's. ENOSYS says so once: the kernel sets no_flush and stops sending
        // FLUSH for the life of the mount, a round trip less per close. It still writes a closing
        // file's dirty pages back before close returns (fuse_flush: write_inode_now comes before
        // the no_flush test), so close keeps reporting write-back errors.
        ops.flush = { req, _, _ in fuse_reply_err(req, ENOSYS) }
        ops.release = { req, node, _ in FUSEServer.server(req!).release(req!, node) }
        ops.fsync = { req, node, _, _ in FUSEServer.server(req!).fsync(req!, node) }
        ops.opendir = { req, _, fi in FUSEServer.server(req!).opendir(req!, fi!) }
        ops.readdir = { req, node, size, offset, _ in FUSEServer.server(req!).readdir(req!, node, size, offset) }
        ops.readdirplus = { req, node, size, offset, _ in FUSEServer.server(req!).readdirplus(req!, node, size, offset) }
        ops.releasedir = { req, _, _ in fuse_reply_err(req, 0) }
        ops.fsyncdir = { req, node, _, _ in FUSEServer.server(req!).fsync(req!, node) }
        ops.statfs = { req, _ in FUSEServer.server(req!).statfs(req!) }
        ops.setxattr = { req, node, name, value, size, flags in
            FUSEServer.server(req!).setxattr(req!, node, FUSEServer.string(name), value, size, flags)
        }
        ops.getxattr = { req, node, name, size in FUSEServer.server(req!).getxattr(req!, node, FUSEServer.string(name), size) }
        ops.listxattr = { req, node, size in FUSEServer.server(req!).listxattr(req!, node, size) }
        ops.removexattr = { req, node, name in FUSEServer.server(req!).removexattr(req!, node, FUSEServer.string(name)) }
        ops.create = { req, parent, name, mode, fi in FUSEServer.server(req!).create(req!, parent, FUSEServer.string(name), mode, fi!) }
        ops.fallocate = { req, node, mode, offset, length, _ in FUSEServer.server(req!).fallocate(req!, node, mode, offset, length) }
        ops.lseek = { req, node, offset, whence, _ in FUSEServer.server(req!).lseek(req!, node, offset, whence) }
        return ops
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
