import Foundation
import Testing
import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// `ControlSocket.send`, the CLI's side of ROOT/control.sock, against a daemon that stops.
@Suite struct ControlSocketClientTests {
    /// A daemon that is stopping accepts connections still in its backlog and closes them unread
    /// (or closes its listener with them in it). The request never ran, so the client must hear
    /// EAGAIN (`StoreAccess.askDaemon` retries it) whether the close reaches it at its send
    /// (EPIPE, ECONNRESET) or at its read. CI's `eightContainersInParallel` met the send case:
    /// "control socket ...: send: Broken pipe", and a mount failed that a retry would have done.
    /// 300 connections, each closed as soon as it is accepted: on the old code some sends threw.
    @Test func aConnectionClosedUnreadIsARetryNotAnError() throws {
        var template = Array((NSTemporaryDirectory() + "/thinfs-control-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw POSIXError(.EIO) }
        let dir = String(cString: made)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/control.sock"
        let listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        try #require(listener >= 0)
        defer { close(listener) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        try #require(bound == 0 && listen(listener, 16) == 0)
        let count = 300
        let server = Thread {
            for _ in 0..<count {
                let fd = accept(listener, nil, nil)
                if fd >= 0 { close(fd) }
            }
        }
        server.start()
        var thrown: [String] = []
        var notRetry: [String] = []
        for _ in 0..<count {
            do {
                let response = try ControlSocket.send(LayerRequest(.list), to: path)
                if response?.errno != EAGAIN { notRetry.append("\(String(describing: response))") }
            } catch {
                thrown.append("\(error)")
            }
        }
        #expect(thrown.isEmpty, "\(thrown.count) of \(count) sends threw, e.g. \(thrown.first ?? "")")
        #expect(notRetry.isEmpty, "\(notRetry.count) of \(count) answers were not EAGAIN, e.g. \(notRetry.first ?? "")")
    }
}
