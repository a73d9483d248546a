import Foundation
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A private working directory under a store's `ROOT/tmp`, such as the one a `docker save`
/// archive's named files are unpacked into, or the one a command spools its stdin into before a
/// daemon reads it, removed when its owner is done with it.
///
/// The owner holds an exclusive `flock` on the directory for as long as it uses it, and flock
/// dies with its process: a directory whose lock anyone can take was left by a process that was
/// killed (`kill -9`, OOM, power loss) before it could remove it. `removeStale(in:)`, run when a
/// store opens, removes those and only those.
public final class ScratchDirectory {
    static let prefix = "thinfs-image-"

    public let path: String
    private let fd: Int32

    /// Makes and locks a new directory under `parent` (made if missing).
    public init(in parent: String) throws {
        try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
        while true {
            let path = parent + "/" + Self.prefix + UUID().uuidString
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
            let fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            guard fd >= 0 else {
                if errno == ENOENT { continue }
                throw ThinPoolError.io(operation: "open", path: path, errno: Errno(rawValue: errno))
            }
            // A store opening at this moment may have found it unlocked and removed it: then the
            // directory has no links left, and another name is tried.
            var st = stat()
            guard flock(fd, LOCK_EX) == 0, fstat(fd, &st) == 0, st.st_nlink > 0 else {
                close(fd)
                continue
            }
            self.path = path
            self.fd = fd
            return
        }
    }

    deinit {
        try? FileManager.default.removeItem(atPath: path)
        close(fd)
    }

    /// Removes the scratch directories under `parent` that no process holds; returns their paths.
    @discardableResult
    static func removeStale(in parent: String, logger: Logger) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: parent)) ?? []
        var removed: [String] = []
        for name in names where name.hasPrefix(prefix) {
            let path = parent + "/" + name
            let fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            guard fd >= 0 else { continue }
            defer { close(fd) }
            // Held by its owner: in use. Removed while this lock is held, so the owner's own check sees it.
            guard flock(fd, LOCK_EX | LOCK_NB) == 0 else { continue }
            do {
                try FileManager.default.removeItem(atPath: path)
                removed.append(path)
            } catch {
                logger.warning("could not remove a stale scratch directory", metadata: ["path": "\(path)", "error": "\(error)"])
            }
        }
        if !removed.isEmpty {
            logger.info("removed scratch directories left by killed imports", metadata: ["paths": "\(removed)"])
        }
        return removed
    }
}
