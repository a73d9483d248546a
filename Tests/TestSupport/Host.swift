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

    /// The whole text of a /proc file. /proc/mounts and its kin hand out about a page per read(2),
    /// and Foundation's String(contentsOfFile:) stops after the first: a mount past the first 4 KiB
    /// of the table was invisible to these checks (ThinFS's own reader is ProcFile.read).
    public static func procFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { return nil }
            if n == 0 { return String(decoding: bytes, as: UTF8.self) }
            bytes += chunk[..<n]
        }
    }

    /// Whether `path` is a mount point in /proc/mounts.
    public static func isMounted(_ path: String) -> Bool {
        guard let text = procFile("/proc/mounts") else { return false }
        return text.split(separator: "\n").contains { $0.split(separator: " ").dropFirst().first.map(String.init) == path }
    }

    /// The options /proc/mounts shows for the mount at `path` (the last one there), or nil.
    public static func mountOptions(_ path: String) -> [String]? {
        guard let text = procFile("/proc/mounts") else { return nil }
        let fields = text.split(separator: "\n").map { $0.split(separator: " ") }.last { $0.count > 3 && $0[1] == path }
        return fields.map { $0[3].split(separator: ",").map(String.init) }
    }
}
