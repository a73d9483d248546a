import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Kernel ext4 and debugfs as oracles for a filesystem image: htree dumps, a read-only loop
/// mount, every name listed and resolved by the kernel.
public enum KernelExt4 {
    /// debugfs's answer to `request` (such as `htree_dump /d`) on `image`, stdout and stderr.
    public static func debugfs(_ image: String, _ request: String) throws -> String {
        let r = try Oracle.run("/sbin/debugfs", ["-R", request, image])
        return r.stdout + r.stderr
    }

    /// Whether debugfs reads `path` in `image` as an htree-indexed directory.
    public static func isIndexed(_ image: String, _ path: String) throws -> Bool {
        let dump = try debugfs(image, "htree_dump \(path)")
        return dump.contains("Root node dump") && !dump.contains("Not a hash-indexed directory")
    }

    public static var canLoopMount: Bool {
        Host.isRoot && FileManager.default.isExecutableFile(atPath: "/sbin/losetup")
            && (Host.procFile("/proc/filesystems")?.contains("\text4") ?? false)
    }

    /// Loop-mounts `image` read-only with kernel ext4 and hands `body` the mount point; the mount
    /// and the loop device are removed afterwards, also when `body` throws.
    public static func withMount(_ image: String, _ body: (String) throws -> Void) throws {
        let dir = TempDir()
        let mnt = dir.path + "/mnt"
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let loop = try Oracle.run("/sbin/losetup", ["--find", "--show", "--read-only", image])
        let device = loop.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        try #require(loop.status == 0 && device.hasPrefix("/dev/loop"), "losetup: \(loop.stderr)")
        defer { _ = try? Oracle.run("/sbin/losetup", ["-d", device]) }
        let m = try Oracle.run("/bin/mount", ["-t", "ext4", "-o", "ro,noload", device, mnt])
        try #require(m.status == 0, "mount: \(m.stderr)")
        defer { _ = try? Oracle.run("/bin/umount", [mnt]) }
        try body(mnt)
    }

    /// Kernel ext4 lists exactly `expected` in `path` (readdir of an indexed directory walks the
    /// htree in hash order, and fails with EFSCORRUPTED on a bad index under metadata_csum), and
    /// resolves every name.
    public static func sees(_ path: String, _ expected: Set<String>, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let listed = try FileManager.default.contentsOfDirectory(atPath: path)
        #expect(listed.count == expected.count && Set(listed) == expected,
                "the kernel lists \(listed.count) names in \(path), expected \(expected.count)", sourceLocation: sourceLocation)
        var missing: [String] = []
        for name in expected {
            var st = stat()
            if lstat(path + "/" + name, &st) != 0 { missing.append(name) }
        }
        #expect(missing.isEmpty, "the kernel resolves no \(missing.prefix(5)) (\(missing.count) names) in \(path)", sourceLocation: sourceLocation)
    }
}
