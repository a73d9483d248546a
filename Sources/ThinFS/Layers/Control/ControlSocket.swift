import Foundation
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// `ROOT/control.sock`: a Unix stream socket carrying one JSON request and one JSON response
/// per connection, each a single line.
///
///     client                               pool owner (thinfs-mount daemon)
///     connect ───────────────────────────▶ accept (one thread per connection)
///     {"operation":"create",...}\n ──────▶ LayerService.handle
///     ◀────────────── {"output":"..."}\n   close
///
/// Only root (the socket's owner, mode 0600) can connect: the daemon runs requests with its
/// own privileges.
public enum ControlSocket {
    public struct Error: Swift.Error, CustomStringConvertible {
        public var path: String
        public var operation: String
        public var errno: Errno
        public var description: String { "control socket \(path): \(operation): \(errno)" }
    }

    static func address(_ path: String) throws -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw Error(path: path, operation: "address", errno: .fileNameTooLong)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        return addr
    }

    /// Connects, sends `request`, and returns the response; nil if nobody listens at `path`.
    public static func send(_ request: LayerRequest, to path: String) throws -> LayerResponse? {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Error(path: path, operation: "socket", errno: Errno(rawValue: errno)) }
        defer { close(fd) }
        var addr = try address(path)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc != 0 {
            if errno == ENOENT || errno == ECONNREFUSED { return nil }
            throw Error(path: path, operation: "connect", errno: Errno(rawValue: errno))
        }
        try writeLine(fd, try JSONEncoder().encode(request), path: path)
        // A daemon answers every connection it accepts. One reset or closed without an answer
        // was still in the backlog when the daemon stopped: the request never ran, so the
        // caller may retry it (EAGAIN), as it does a request refused while the daemon stops.
        let line: Data?
        do { line = try readLine(fd, path: path) } catch let e as Error where e.errno == .connectionReset {
            line = nil
        }
        guard let line else { return LayerResponse(error: "the daemon stopped before answering; retry", errno: EAGAIN) }
        return try JSONDecoder().decode(LayerResponse.self, from: line)
    }

    static func writeLine(_ fd: Int32, _ data: Data, path: String) throws {
        var bytes = [UInt8](data)
        bytes.append(UInt8(ascii: "\n"))
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, $0.count - done, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw Error(path: path, operation: "send", errno: Errno(rawValue: errno))
            }
            done += n
        }
    }

    static func readLine(_ fd: Int32, path: String) throws -> Data? {
        var data = Data()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 {
                if errno == EINTR { continue }
                throw Error(path: path, operation: "recv", errno: Errno(rawValue: errno))
            }
            if n == 0 { return data.isEmpty ? nil : data }
            data.append(contentsOf: chunk[0..<n])
            if chunk[n - 1] == UInt8(ascii: "\n") { return data }
        }
    }

    /// A listening socket; `serve` runs `handler` for each request on its own thread.
    public final class Listener: @unchecked Sendable {
        public let path: String
        private let fd: Int32
        private let lock = NSCondition()
        private var closed = false
        /// Accepted connections not yet answered; `close` waits for them.
        private var active = 0

        /// Binds `path`, replacing a stale socket file. The caller must own the pool (its flock),
        /// so no live daemon can be listening there.
        public init(path: String) throws {
            self.path = path
            unlink(path)
            fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw Error(path: path, operation: "socket", errno: Errno(rawValue: errno)) }
            var addr = try ControlSocket.address(path)
            // The socket file is born 0600: a chmod after bind would leave a moment in which
            // anyone could connect. (umask is per process; nothing else here creates files now.)
            let oldMask = umask(0o177)
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            umask(oldMask)
            guard rc == 0 else {
                let e = Errno(rawValue: errno)
                Glibc.close(fd)
                throw Error(path: path, operation: "bind", errno: e)
            }
            guard listen(fd, 64) == 0 else {
                let e = Errno(rawValue: errno)
                Glibc.close(fd)
                throw Error(path: path, operation: "listen", errno: e)
            }
        }

        deinit { close() }

        /// Accepts connections until `close`; each request is handled on a new thread.
        public func serve(_ handler: @escaping @Sendable (LayerRequest) -> LayerResponse) {
            let thread = Thread { [self] in
                while true {
                    let client = accept(fd, nil, nil)
                    if client < 0 {
                        if errno == EINTR || errno == ECONNABORTED { continue }
                        return  // closed
                    }
                    // Children (fusermount3, mke2fs) must not inherit connections.
                    _ = fcntl(client, F_SETFD, FD_CLOEXEC)
                    lock.withLock { active += 1 }
                    Thread.detachNewThread { [path, lock] in
                        defer {
                            Glibc.close(client)
                            lock.withLock {
                                self.active -= 1
                                lock.broadcast()
                            }
                        }
                        let response: LayerResponse
                        do {
                            guard let line = try ControlSocket.readLine(client, path: path) else { return }
                            response = handler(try JSONDecoder().decode(LayerRequest.self, from: line))
                        } catch {
                            response = LayerResponse(error: "bad request: \(error)", errno: EINVAL)
                        }
                        try? ControlSocket.writeLine(client, (try? JSONEncoder().encode(response)) ?? Data(), path: path)
                    }
                }
            }
            thread.name = "thinfs-control"
            thread.start()
        }

        /// Stops accepting, removes the socket file, and waits until every accepted connection
        /// has had its answer.
        public func close() {
            let first = lock.withLock { () -> Bool in
                defer { closed = true }
                return !closed
            }
            guard first else { return }
            unlink(path)
            shutdown(fd, Int32(SHUT_RDWR))
            Glibc.close(fd)
            lock.withLock {
                while active > 0 { lock.wait() }
            }
        }
    }
}
