import Foundation
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

extension LayerDaemon {
    /// A FUSE mount of this store that no daemon serves any more.
    public struct StaleMount: Sendable, Equatable {
        public var mountpoint: String
        public var source: String
        /// The errno a stat of the mount point gave (ENOTCONN for a dead FUSE connection), or
        /// nil if it answered.
        public var statError: Errno?
    }

    /// The FUSE mounts of `root` in this mount namespace: layer mounts (fsname
    /// `thinfs:ROOT:LAYER`) and resize views under `ROOT/tmp`. Only the pool's writer serves
    /// them, so when the caller holds the pool's writer lock every one of them was left by a
    /// daemon that died (SIGKILL, a crash): its kernel connection answers ENOTCONN.
    static func staleMounts(root: String, scratchDirectory: String) -> [StaleMount] {
        MountTable.current().compactMap { entry -> StaleMount? in
            guard entry.type.hasPrefix("fuse") else { return nil }
            let ours: Bool
            if entry.source.hasPrefix("thinfs:"), let (owner, _) = LayerStore.splitSource(entry.source.dropFirst("thinfs:".count)) {
                ours = owner == root
            } else {
                ours = entry.mountPoint.hasPrefix(scratchDirectory + "/")
            }
            guard ours else { return nil }
            var st = stat()
            let statError = stat(entry.mountPoint, &st) == 0 ? nil : Errno(rawValue: errno)
            return StaleMount(mountpoint: entry.mountPoint, source: entry.source, statError: statError)
        }
    }

    /// Lazily unmounts (MNT_DETACH) the mounts a killed daemon of this store left, and logs
    /// each: a dead FUSE mount answers ENOTCONN to everything, and would make its mount point
    /// unusable for a new mount of the layer. Lazily, because a process may still be inside
    /// one (a container's working directory); the kernel drops it when the last user goes.
    /// Returns what was found.
    @discardableResult
    func unmountStale() -> [StaleMount] {
        // Scanned again until a scan finds none new: a test that killed serve under load, with
        // other tests mounting and unmounting meanwhile, once found one of eight dead mounts
        // missing from the first scan (cause not yet known; mountinfo is read in pieces). A
        // mount that cannot be unmounted is reported once.
        var found: [StaleMount] = []
        for _ in 0..<4 {
            let more = Self.staleMounts(root: store.root, scratchDirectory: store.scratchDirectory)
                .filter { m in !found.contains { $0.mountpoint == m.mountpoint } }
            if more.isEmpty { break }
            unmount(more)
            found += more
        }
        return found
    }

    private func unmount(_ stale: [StaleMount]) {
        for mount in stale {
            let state = mount.statError.map { "dead (\($0))" } ?? "answering, but its daemon is gone"
            if umount2(mount.mountpoint, Int32(MNT_DETACH)) == 0 {
                logger.warning("unmounted a stale FUSE mount of this store left by a daemon that died",
                               metadata: ["fuse.mountpoint": "\(mount.mountpoint)", "source": "\(mount.source)", "state": "\(state)"])
            } else {
                logger.error("cannot unmount a stale FUSE mount of this store; unmount it by hand (umount -l)",
                             metadata: ["fuse.mountpoint": "\(mount.mountpoint)", "source": "\(mount.source)",
                                        "state": "\(state)", "error": "\(Errno(rawValue: errno))"])
            }
        }
    }
}
