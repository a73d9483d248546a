import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Who holds a flock(2): /proc/locks, as proc(5) describes it:
///
///     1: FLOCK  ADVISORY  WRITE 4711 08:01:1835010 0 EOF
///     (1) (2)    (3)       (4)   (5)   (6)          (7)(8)
///
/// (5) is the pid that took the lock and (6) the file as MAJOR:MINOR:INODE, the device
/// numbers in hex. Waiters are listed too, with `->` before (2); they hold nothing.
public enum LockHolders {
    /// The pids holding a flock on `path` (empty if none, or if /proc/locks cannot be read).
    public static func flockHolders(of path: String) -> [pid_t] {
        var st = stat()
        guard stat(path, &st) == 0,
              let text = ProcFile.read("/proc/locks") else { return [] }
        let dev = UInt64(st.st_dev)
        // glibc's gnu_dev_major/gnu_dev_minor (macros Swift cannot import).
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff))
        let minor = (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff))
        return parse(text, major: major, minor: minor, inode: UInt64(st.st_ino))
    }

    static func parse(_ text: String, major: UInt64, minor: UInt64, inode: UInt64) -> [pid_t] {
        text.split(separator: "\n").compactMap { line -> pid_t? in
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count >= 6, f[1] == "FLOCK", let pid = pid_t(f[4]) else { return nil }
            let file = f[5].split(separator: ":")
            guard file.count == 3, UInt64(file[0], radix: 16) == major, UInt64(file[1], radix: 16) == minor,
                  UInt64(file[2]) == inode else { return nil }
            return pid
        }
    }

    /// `pid` and its command line, for an error message ("4711 (thinfs serve --root /r)").
    public static func describe(_ pid: pid_t) -> String {
        guard let raw = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"), !raw.isEmpty else { return "\(pid)" }
        let args = raw.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        var words = args
        if let first = words.first { words[0] = (first as NSString).lastPathComponent }
        return "\(pid) (\(words.joined(separator: " ")))"
    }
}

extension LayerStore {
    /// The processes that hold this root's pool for writing: the flock on the pool's data file
    /// (the userspace engine), or on ROOT/store.lock (kernel and loop pools).
    public static func writerLockHolders(root: String) -> [pid_t] {
        let root = URL(fileURLWithPath: root).standardizedFileURL.path
        var candidates = [storeLockPath(root), PoolRoot(path: root).defaultDataPath]
        if let config = try? PoolRoot(path: root).config() { candidates.insert(config.data, at: 0) }
        var seen = Set<pid_t>()
        return candidates.flatMap { LockHolders.flockHolders(of: $0) }.filter { seen.insert($0).inserted }
    }
}
