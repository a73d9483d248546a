import Foundation
import SystemPackage
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

    /// Why a socket could not be made owner-only; names the socket's path.
    public enum Error: Swift.Error, CustomStringConvertible, Sendable {
        case staging(path: String, operation: String, errno: Errno)
        case pathTooLong(path: String, staged: String)

        public var description: String {
            switch self {
            case .staging(let path, let operation, let errno):
                "socket \(path): \(operation) failed: \(errno)"
            case .pathTooLong(let path, let staged):
                "socket \(path): the private path it is made at first (\(staged)) is longer than a unix socket address holds (107 bytes); use a shorter path"
            }
        }
    }

    /// Where a listening socket is made before anyone else may reach it. A bind makes the file
    /// 0777 less the umask, and the umask belongs to the whole process (a unit file or shell may
    /// leave it 000), so it cannot be narrowed for one socket while other threads make files.
    /// Instead the server binds `path`, in a fresh 0700 directory beside `destination`;
    /// `publish` makes the socket 0600 there and renames it to `destination`, so it is
    /// owner-only from the first moment another user can reach it. `discard` removes what is
    /// left, published or not.
    public struct Staging: Sendable {
        public let path: String
        public let destination: String
        let directory: String

        public init(for destination: String) throws(ServiceSocket.Error) {
            let parent = (destination as NSString).deletingLastPathComponent
            var template = Array((parent + "/.thinfs-XXXXXX").utf8CString)
            guard let made = mkdtemp(&template) else {
                throw .staging(path: destination, operation: "mkdtemp in \(parent)", errno: Errno(rawValue: errno))
            }
            directory = String(cString: made)
            path = directory + "/s"
            self.destination = destination
            guard path.utf8.count <= 107 else {
                rmdir(directory)
                throw .pathTooLong(path: destination, staged: path)
            }
        }

        public func publish() throws(ServiceSocket.Error) {
            guard chmod(path, 0o600) == 0 else { throw .staging(path: destination, operation: "chmod 0600", errno: Errno(rawValue: errno)) }
            guard rename(path, destination) == 0 else {
                throw .staging(path: destination, operation: "rename from \(path)", errno: Errno(rawValue: errno))
            }
        }

        public func discard() {
            unlink(path)
            rmdir(directory)
        }
    }
}
