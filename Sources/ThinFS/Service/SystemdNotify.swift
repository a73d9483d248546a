import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// sd_notify(3) without libsystemd: a `Type=notify` unit passes a unix datagram socket in
/// `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace), and the service sends it
/// newline-separated `KEY=VALUE` states (`READY=1`, `STOPPING=1`, `STATUS=...`).
public enum SystemdNotify {
    /// Sends `state` if `NOTIFY_SOCKET` is set. Returns nil when it is not set (not started by
    /// systemd, or not `Type=notify`), true when sent, false when sending failed.
    @discardableResult
    public static func send(_ state: String, environment: [String: String] = ProcessInfo.processInfo.environment) -> Bool? {
        guard let target = environment["NOTIFY_SOCKET"], !target.isEmpty else { return nil }
        var path = Array(target.utf8)
        // "@name" is Linux's abstract namespace: a leading NUL, and no terminating one.
        let abstract = path.first == UInt8(ascii: "@")
        if abstract { path[0] = 0 }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        guard path.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.enumerated() { raw[i] = b }
        }
        let length = MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + path.count + (abstract ? 0 : 1)
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let bytes = Array(state.utf8)
        let sent = withUnsafePointer(to: &addr) { a in
            a.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                bytes.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), sa, socklen_t(length)) }
            }
        }
        return sent == bytes.count
    }
}
