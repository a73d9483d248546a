import Foundation
import SystemPackage
import ThinFSCore
#if canImport(Glibc)
import Glibc
#endif

// Everything about the mount point that needs no libfuse: checking it before
// mounting, finding our mount in /proc/self/mountinfo, and unmounting it from
// the outside (which is how `stop()` ends the session loop).

extension FUSEServer {
    /// How a FUSE mount is made and served.
    public struct Options: Sendable {
        /// Mount `ro` and answer EROFS to every modifying request.
        public var readOnly: Bool
        /// `allow_other`: every user may enter, the kernel checking the mode bits. A process that
        /// may not have it (not root, no `user_allow_other` in /etc/fuse.conf) mounts without it
        /// and says so (`MountAccess`).
        public var allowOther: Bool
        /// `suid,dev` where the mount point is under a root-only directory, as a container's
        /// rootfs is mounted; elsewhere `nosuid,nodev` and a warning (`MountAccess`). Explicit
        /// `suid`, `nosuid`, `dev` or `nodev` in `extraOptions` win. Off: libfuse's `nosuid,nodev`.
        public var setuidAndDevices: Bool
        /// What /proc/mounts shows as the source: `thinfs:<source>`.
        public var source: String
        /// Further mount options, passed to libfuse as they are (`noatime`, `nosuid`, ...).
        /// `nonempty` is ours: it allows a mount point that is not empty. So is `readahead=KiB`:
        /// it overrides `readAheadKiB`.
        public var extraOptions: [String]
        /// Upper bound on libfuse worker threads.
        public var maxThreads: Int
        /// How often a read-write mount commits (`volume.fsync(nil)`); nil never does.
        public var commitInterval: Duration?
        /// The kernel's read-ahead for the mount, in KiB (FUSE starts at 128); nil leaves it.
        public var readAheadKiB: Int?
        /// Leave opens and closes of regular files to the kernel (FUSE_CAP_NO_OPEN_SUPPORT) where
        /// it offers that: no OPEN or RELEASE upcall per file. Off (or `opens=daemon` in
        /// `extraOptions`): every open reaches the daemon, as with a kernel that lacks it.
        public var opensInKernel: Bool

        public init(readOnly: Bool = false, allowOther: Bool = true, setuidAndDevices: Bool = false, source: String = "thinfs",
                    extraOptions: [String] = [], maxThreads: Int = 16, commitInterval: Duration? = .seconds(1),
                    readAheadKiB: Int? = 1024, opensInKernel: Bool = true) {
            self.readOnly = readOnly
            self.allowOther = allowOther
            self.setuidAndDevices = setuidAndDevices
            self.source = source
            self.extraOptions = extraOptions
            self.maxThreads = maxThreads
            self.commitInterval = commitInterval
            self.readAheadKiB = readAheadKiB
            self.opensInKernel = opensInKernel
        }

        var allowsNonEmptyMountpoint: Bool { extraOptions.contains("nonempty") }

        /// `opensInKernel`, unless the extra options say `opens=daemon` (ours, not libfuse's).
        var effectiveOpensInKernel: Bool { opensInKernel && !extraOptions.contains("opens=daemon") }

        /// `readahead=KiB` from the extra options (the last one wins), else `readAheadKiB`.
        var effectiveReadAheadKiB: Int? {
            for o in extraOptions.reversed() where o.hasPrefix("readahead=") {
                if let kib = Int(o.dropFirst("readahead=".count)), kib > 0 { return kib }
            }
            return readAheadKiB
        }
    }

    /// Errors of mounting and serving. Each names the mount point.
    public enum Error: Swift.Error, CustomStringConvertible, Sendable {
        case mountpointMissing(String)
        case mountpointInaccessible(String, Errno)
        case notADirectory(String)
        case notEmpty(String)
        case busy(String)
        case deadMount(String)
        case invalidOptions(String, message: String)
        case mountFailed(String, message: String)
        case wrongState(String, String)
        case loopFailed(String, Errno)
        case commitFailed(String, String)

        public var description: String {
            switch self {
            case .mountpointMissing(let p): "mount point \(p) does not exist: create the directory first"
            case .mountpointInaccessible(let p, let e): "mount point \(p) cannot be examined: \(e)"
            case .notADirectory(let p): "mount point \(p) is not a directory"
            case .notEmpty(let p): "mount point \(p) is not empty: use an empty directory, or pass -o nonempty to hide its contents"
            case .busy(let p): "mount point \(p) is busy: something is already mounted there; unmount it first"
            case .deadMount(let p): "mount point \(p) is a FUSE mount whose daemon has gone: run 'fusermount3 -u \(p)' (or 'umount -l \(p)') first"
            case .invalidOptions(let p, let m): "mount options for \(p) were refused: \(m)"
            case .mountFailed(let p, let m): "mounting \(p) failed: \(m)"
            case .wrongState(let p, let why): "FUSE server for \(p): \(why)"
            case .loopFailed(let p, let e): "serving \(p) failed: \(e)"
            case .commitFailed(let p, let why): "the final commit of \(p) failed: \(why)"
            }
        }
    }

    /// Checks that `path` can take a mount and returns its canonical path.
    ///
    /// The mount table is consulted before anything touches the path itself, so a hung
    /// FUSE mount there is reported instead of hanging us.
    public static func checkMountpoint(_ path: String, allowNonEmpty: Bool) throws(Error) -> String {
        let lexical = URL(fileURLWithPath: path).standardizedFileURL.path
        if MountTable.current().contains(where: { $0.mountPoint == lexical }) { throw .busy(lexical) }
        var st = stat()
        guard stat(path, &st) == 0 else { throw statFailure(path, Errno(rawValue: errno)) }
        guard st.st_mode & S_IFMT == S_IFDIR else { throw .notADirectory(path) }
        guard let resolved = realpath(path, nil) else { throw .mountpointInaccessible(path, Errno(rawValue: errno)) }
        let canonical = String(cString: resolved)
        free(resolved)
        if canonical != lexical, MountTable.current().contains(where: { $0.mountPoint == canonical }) {
            throw .busy(canonical)
        }
        if !allowNonEmpty {
            guard let dir = Glibc.opendir(canonical) else { throw .mountpointInaccessible(canonical, Errno(rawValue: errno)) }
            defer { closedir(dir) }
            while let entry = Glibc.readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
                if name != "." && name != ".." { throw .notEmpty(canonical) }
            }
        }
        return canonical
    }

    /// What a failed stat(2) of a mount point means.
    static func statFailure(_ path: String, _ e: Errno) -> Error {
        switch e {
        case .noSuchFileOrDirectory: .mountpointMissing(path)
        // ENOTCONN: a FUSE mount with no daemon; ECONNABORTED: a request the kernel ended when
        // it aborted the connection (fuse_abort_conn). Either way the mount is dead.
        case .socketNotConnected, .connectionAbort: .deadMount(path)
        case .notDirectory: .notADirectory(path)
        default: .mountpointInaccessible(path, e)
        }
    }

    /// Unmounts from outside the session, as `umount` would: the kernel first writes back
    /// cached pages through the still-running workers, then ends the connection, and the
    /// session loop returns. A busy mount point is detached lazily instead; the loop then
    /// ends when the last open file on it is closed.
    /// Returns nil on success, or why it failed.
    public static func unmountFromOutside(_ mountpoint: String) -> String? {
        if geteuid() == 0 {
            if umount2(mountpoint, 0) == 0 { return nil }
            let e = errno
            if e == EINVAL || e == ENOENT { return nil }  // not mounted any more
            if e == EBUSY {
                if umount2(mountpoint, Int32(MNT_DETACH)) == 0 { return nil }
                return "umount2(MNT_DETACH): \(Errno(rawValue: errno))"
            }
            return "umount2: \(Errno(rawValue: e))"
        }
        // Unprivileged: fusermount3 is setuid root and checks that we own the mount.
        if runFusermount(["-u", "-q", mountpoint]) || runFusermount(["-u", "-q", "-z", mountpoint]) { return nil }
        return "fusermount3 -u failed"
    }

    /// The source (`ROOT:ID`) of the FUSE mount at `mountpoint` (canonical path), if one is there.
    public static func mountSource(at mountpoint: String) -> String? {
        MountTable.current().entry(at: mountpoint).flatMap { $0.type.hasPrefix("fuse") ? $0.source : nil }
    }

    private static func runFusermount(_ args: [String]) -> Bool {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/fusermount3")
        p.arguments = args
        do { try p.run() } catch { return false }
        p.waitUntilExit()
        return p.terminationStatus == 0
    }

    /// Ends the connection without unmounting cleanly: requests in flight fail with ENOTCONN
    /// and pages cached in the kernel are lost. Used when a second stop is asked for.
    static func abortConnection(device: MountTable.Entry.Device) -> Bool {
        // /sys/fs/fuse/connections/N is named by the minor number of the mount's anonymous device.
        let path = "/sys/fs/fuse/connections/\(device.minor)/abort"
        return (try? "1".write(toFile: path, atomically: false, encoding: .utf8)) != nil
    }

    /// FUSE gives a mount 128 KiB of read-ahead, and INIT can only lower it (the kernel keeps
    /// the smaller of the device's value and the reply's). Raising the backing-device knob
    /// before the INIT reply lets sequential reads reach the 1 MiB requests the server
    /// accepts. Best effort: it needs root.
    static func setReadAhead(kib: Int, device: MountTable.Entry.Device) -> Bool {
        let path = "/sys/class/bdi/\(device.major):\(device.minor)/read_ahead_kb"
        return (try? "\(kib)".write(toFile: path, atomically: false, encoding: .utf8)) != nil
    }
}
