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
    /// The pids holding a flock on `path` (empty if none, or if /proc cannot be read).
    ///
    /// /proc/locks is not a snapshot. It is a seq_file filled a page per read(2) and resumed by
    /// position, so a lock that another process takes or drops between two reads shifts the list
    /// under the reader: the line at a page boundary is skipped, or shown twice. (With two
    /// threads churning flocks on other files, a reader of 300 held locks saw one skipped in 48
    /// of 200 reads and one twice in 20; CI's parallel tests missed one of 300.) So /proc/locks
    /// is only the fast path, its duplicates dropped: when it names no holder, every process's
    /// descriptors are checked, and /proc/PID/fdinfo/FD lists the locks taken through that open
    /// file in one small read, which no other lock shifts.
    public static func flockHolders(of path: String) -> [pid_t] {
        var st = stat()
        guard stat(path, &st) == 0 else { return [] }
        let file = FileID(st)
        if let text = ProcFile.read("/proc/locks") {
            let holders = parse(text, file: file)
            if !holders.isEmpty { return holders }
        }
        return descriptorHolders(of: file)
    }

    /// A file as /proc names it: MAJOR:MINOR:INODE, the device numbers in hex.
    struct FileID {
        var major: UInt64
        var minor: UInt64
        var inode: UInt64

        init(major: UInt64, minor: UInt64, inode: UInt64) {
            self.major = major
            self.minor = minor
            self.inode = inode
        }

        init(_ st: stat) {
            let dev = UInt64(st.st_dev)
            // glibc's gnu_dev_major/gnu_dev_minor (macros Swift cannot import).
            self.init(major: ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff)),
                      minor: (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff)),
                      inode: UInt64(st.st_ino))
        }
    }

    /// The processes with a descriptor open on `file` whose fdinfo shows a flock on it:
    ///
    ///     pos:    0
    ///     flags:  02100002
    ///     lock:   1: FLOCK  ADVISORY  WRITE 4711 08:01:1835010 0 EOF
    ///
    /// The pid reported is the process holding the descriptor (a flock belongs to the open
    /// file, which a fork shares), not the lock line's pid, which names the process that took
    /// it and may have exited since.
    static func descriptorHolders(of file: FileID) -> [pid_t] {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return [] }
        var holders: [pid_t] = []
        for entry in entries {
            guard let pid = pid_t(entry) else { continue }
            // Another user's process, or one that exited: nothing to list.
            guard let fds = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd") else { continue }
            for fd in fds {
                var st = stat()
                guard stat("/proc/\(pid)/fd/\(fd)", &st) == 0 else { continue }
                let id = FileID(st)
                guard id.inode == file.inode, id.major == file.major, id.minor == file.minor,
                      let info = ProcFile.read("/proc/\(pid)/fdinfo/\(fd)") else { continue }
                let locks = info.split(separator: "\n").filter { $0.hasPrefix("lock:") }
                    .map { $0.dropFirst("lock:".count) }.joined(separator: "\n")
                if !parse(locks, file: file).isEmpty, !holders.contains(pid) { holders.append(pid) }
            }
        }
        return holders
    }

    static func parse(_ text: String, major: UInt64, minor: UInt64, inode: UInt64) -> [pid_t] {
        parse(text, file: FileID(major: major, minor: minor, inode: inode))
    }

    /// The pids of the FLOCK lines (not waiters) on `file` in /proc/locks-format text.
    /// Each pid once: a list shifting under the reader can show a line twice, as well as skip one.
    static func parse(_ text: String, file: FileID) -> [pid_t] {
        var seen = Set<pid_t>()
        return text.split(separator: "\n").compactMap { line -> pid_t? in
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count >= 6, f[1] == "FLOCK", let pid = pid_t(f[4]) else { return nil }
            let id = f[5].split(separator: ":")
            guard id.count == 3, UInt64(id[0], radix: 16) == file.major, UInt64(id[1], radix: 16) == file.minor,
                  UInt64(id[2]) == file.inode else { return nil }
            return pid
        }.filter { seen.insert($0).inserted }
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
