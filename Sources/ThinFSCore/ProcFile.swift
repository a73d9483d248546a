import SystemPackage

/// The whole text of a /proc file.
///
/// /proc files report a size of 0, and the seq_file ones (mountinfo, locks, mounts) hand out
/// about a page per read(2). Foundation's `String(contentsOfFile:)` stops after the first read,
/// so it returned the first 4 KiB of /proc/self/mountinfo: with a few dozen mounts on the
/// machine, the later ones were not found (`thinfs umount` called a mounted layer "not a mount
/// point"). This reads until end of file.
public enum ProcFile {
    /// The file's contents, or nil if it cannot be opened or read.
    public static func read(_ path: String) -> String? {
        guard let fd = try? FileDescriptor.open(FilePath(path), .readOnly, options: [.closeOnExec]) else { return nil }
        defer { try? fd.close() }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            // FileDescriptor.read retries EINTR itself.
            guard let n = try? chunk.withUnsafeMutableBytes({ try fd.read(into: $0) }) else { return nil }
            if n == 0 { return String(decoding: bytes, as: UTF8.self) }
            bytes += chunk[..<n]
        }
    }
}
