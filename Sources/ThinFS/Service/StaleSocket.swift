import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The socket files `thinfs serve`'s front doors listen on (containerd's snapshots API, Docker's
/// plugin protocol).
public enum ServiceSocket {
    /// Makes `path` free for a new listening socket: a socket file there was left by a server that
    /// died and is removed; any other file is left alone. Returns false when such a file is there,
    /// for the caller to refuse with its own error.
    public static func removeStale(at path: String) -> Bool {
        var st = stat()
        guard lstat(path, &st) == 0 else { return true }
        guard st.st_mode & S_IFMT == S_IFSOCK else { return false }
        unlink(path)
        return true
    }
}
