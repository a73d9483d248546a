import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What this host lets the tests do, for `.enabled(if:)`: one place, so a root-only or FUSE test
/// is gated the same way in every test target, and is reported as skipped with its reason
/// instead of passing without having run.
public enum Host {
    /// Root (the effective uid, which is what the kernel checks): mount(2) and umount2, device
    /// nodes and security.* xattrs in a test image, nodes under /dev/mapper.
    public static var isRoot: Bool { geteuid() == 0 }

    /// The FUSE device exists (the fuse module is loaded or built in).
    public static var hasFUSE: Bool { FileManager.default.fileExists(atPath: "/dev/fuse") }

    /// Real FUSE mounts need the device and root (mount(2), and the tests unmount with umount2).
    public static var canMountFUSE: Bool { hasFUSE && isRoot }

    /// Whether `path` is a mount point in /proc/mounts.
    public static func isMounted(_ path: String) -> Bool {
        guard let text = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8) else { return false }
        return text.split(separator: "\n").contains { $0.split(separator: " ").dropFirst().first.map(String.init) == path }
    }

    /// The options /proc/mounts shows for the mount at `path` (the last one there), or nil.
    public static func mountOptions(_ path: String) -> [String]? {
        guard let text = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8) else { return nil }
        let fields = text.split(separator: "\n").map { $0.split(separator: " ") }.last { $0.count > 3 && $0[1] == path }
        return fields.map { $0[3].split(separator: ",").map(String.init) }
    }
}
