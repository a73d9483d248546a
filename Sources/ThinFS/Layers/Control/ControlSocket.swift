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
///
/// A daemon serves for as long as layers are mounted, so what a client can hold is bounded
/// (`Limits`): the request line's length, the connections served at once (each has a thread),
/// and how long a connection may stay silent. A connection still waiting for its request
/// never keeps a stopping daemon: `Listener.close` answers it "stopping" (EAGAIN) at once.
public enum ControlSocket {
    public struct Error: Swift.Error, CustomStringConvertible {
        public var path: String
        public var operation: String
        public var errno: Errno
        public var description: String { "control socket \(path): \(operation): \(errno)" }
    }

    public struct Limits: Sendable {
        /// A request is a few hundred bytes; the longest fields are paths.
        public var maxLineBytes = 1 << 20
        /// Connections served at once; one more is answered "too many connections" and closed.
        public var maxConnections = 64
        /// How long a connection may take to send its request, and the daemon to send its answer.
        public var timeout: TimeInterval = 30

        public init(maxLineBytes: Int = 1 << 20, maxConnections: Int = 64, timeout: TimeInterval = 30) {
            self.maxLineBytes = maxLineBytes
            self.maxConnections = maxConnections
            self.timeout = timeout
        }
    }

    /// Why a connection got no request served: each is answered as an error response.
    enum Refusal: Swift.Error, CustomStringConvertible {
        case lineTooLong(limit: Int)
        case silent(seconds: Int)
        case tooManyConnections(limit: Int)
        case stopping
        case bad(LayerRequest.DecodingFailure)

        var description: String {
            switch self {
            case .lineTooLong(let limit):
                "bad request: the request line is longer than \(limit % (1 << 20) == 0 ? "\(limit >> 20) MiB" : "\(limit) bytes")"
            case .silent(let seconds): "bad request: no request within \(seconds) s; closing the connection"
            case .tooManyConnections(let limit): "the daemon is serving too many connections (\(limit)); retry"
            case .stopping: "the daemon is stopping; retry"
            case .bad(let failure): "bad request: \(failure)"
            }
        }

        var response: LayerResponse {
            switch self {
            case .lineTooLong: LayerResponse(error: description, errno: EMSGSIZE)
            case .silent: LayerResponse(error: description, errno: ETIMEDOUT)
            // Both pass: a client retries them (`StoreAccess`), as a request to a daemon that
            // is starting or stopping.
            case .tooManyConnections, .stopping: LayerResponse(error: description, errno: EAGAIN)
            case .bad: LayerResponse(error: description, errno: EINVAL)
            }
        }
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
        // A daemon answers every connection it accepts. One reset or closed without an answer
        // was still in the backlog when the daemon stopped: the request never ran, so the
        // caller may retry it (EAGAIN), as it does a request refused while the daemon stops.
        // The close may reach the send already (EPIPE, or ECONNRESET) as well as the read.
        let stopped = LayerResponse(error: "the daemon stopped before answering; retry", errno: EAGAIN)
        do {
            try writeLine(fd, try JSONEncoder().encode(request), path: path)
        } catch let e as Error where e.errno == .brokenPipe || e.errno == .connectionReset {
            return stopped
        }
        let line: Data?
        do { line = try readLine(fd, path: path) } catch let e as Error where e.errno == .connectionReset {
            line = nil
        }
        guard let line else { return stopped }
        return try JSONDecoder().decode(LayerResponse.self, from: line)
    }

    static func writeLine(_ fd: Int32, _ data: Data, path: String, flags: Int32 = 0) throws {
        var bytes = [UInt8](data)
        bytes.append(UInt8(ascii: "\n"))
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, $0.count - done, Int32(MSG_NOSIGNAL) | flags) }
            if n < 0 {
                if errno == EINTR { continue }
                throw Error(path: path, operation: "send", errno: Errno(rawValue: errno))
            }
            done += n
        }
    }

    /// Reads up to the first newline (or the end of the stream); nil if nothing came. With a
    /// `limit`, more bytes than that without a newline throw `Refusal.lineTooLong`; with a
    /// `deadline`, silence until then throws `Refusal.silent` (SO_RCVTIMEO, set to the time left
    /// before each recv, so a trickle of bytes cannot stretch it).
    static func readLine(_ fd: Int32, path: String, limit: Int? = nil, deadline: (Date, seconds: Int)? = nil) throws -> Data? {
        var data = Data()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            if let (end, seconds) = deadline {
                let left = end.timeIntervalSinceNow
                guard left > 0 else { throw Refusal.silent(seconds: seconds) }
                // Rounded up: a zero timeval would mean no timeout at all.
                let micros = Int(left * 1e6) + 1
                var timeout = timeval(tv_sec: micros / 1_000_000, tv_usec: micros % 1_000_000)
                _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            }
            let want = limit.map { min(chunk.count, $0 + 1 - data.count) } ?? chunk.count
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, want, 0) }
            if n < 0 {
                if errno == EINTR { continue }
                if let (_, seconds) = deadline, errno == EAGAIN || errno == EWOULDBLOCK { throw Refusal.silent(seconds: seconds) }
                throw Error(path: path, operation: "recv", errno: Errno(rawValue: errno))
            }
            if n == 0 { return data.isEmpty ? nil : data }
            if let newline = chunk[0..<n].firstIndex(of: UInt8(ascii: "\n")) {
                data.append(contentsOf: chunk[0...newline])
                return data
            }
            data.append(contentsOf: chunk[0..<n])
            if let limit, data.count > limit { throw Refusal.lineTooLong(limit: limit) }
        }
    }

    /// A listening socket; `serve` runs `handler` for each request on its own thread.
    public final class Listener: @unchecked Sendable {
        public let path: String
        public let limits: Limits
        private let fd: Int32
        private let lock = NSCondition()
        private var closed = false
        /// Accepted connections not yet answered; `close` waits for them.
        private var active = 0
        /// Accepted connections still reading their request line: `close` ends those reads.
        /// A connection leaves the set, under `lock`, before its descriptor is closed, so a
        /// shutdown never reaches a reused descriptor.
        private var reading: Set<Int32> = []

        /// Binds `path`, replacing a stale socket file. The caller must own the pool (its flock),
        /// so no live daemon can be listening there.
        public init(path: String, limits: Limits = Limits()) throws {
            self.path = path
            self.limits = limits
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

        /// Accepts connections until `close`; each request is handled on a new thread, at most
        /// `limits.maxConnections` at once.
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
                    let refusal = lock.withLock { () -> Refusal? in
                        if closed { return .stopping }
                        guard active < limits.maxConnections else { return .tooManyConnections(limit: limits.maxConnections) }
                        active += 1
                        reading.insert(client)
                        return nil
                    }
                    if let refusal {
                        // Without waiting: a fresh connection's buffer has room for one short line.
                        ControlSocket.answer(client, refusal.response, path: path, flags: Int32(MSG_DONTWAIT))
                        Glibc.close(client)
                        continue
                    }
                    Thread.detachNewThread { [self] in serveConnection(client, handler) }
                }
            }
            thread.name = "thinfs-control"
            thread.start()
        }

        private func serveConnection(_ client: Int32, _ handler: @Sendable (LayerRequest) -> LayerResponse) {
            // A client that stops reading cannot hold this thread past the timeout either.
            var timeout = timeval(tv_sec: Int(limits.timeout), tv_usec: 0)
            _ = setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            var line: Data?
            var refusal: Refusal?
            do {
                line = try ControlSocket.readLine(client, path: path, limit: limits.maxLineBytes,
                                                  deadline: (Date().addingTimeInterval(limits.timeout), Int(limits.timeout)))
            } catch let error as Refusal {
                refusal = error
            } catch {
                line = nil  // reset by the client: nobody to answer
            }
            let stopping = lock.withLock {
                reading.remove(client)
                return closed
            }
            defer {
                Glibc.close(client)
                lock.withLock {
                    active -= 1
                    lock.broadcast()
                }
            }
            // `close` ended the read (or it ended as the daemon stopped): the request is not run.
            if stopping && refusal == nil { refusal = .stopping }
            let response: LayerResponse
            if let refusal {
                response = refusal.response
            } else if let line {
                do throws(LayerRequest.DecodingFailure) {
                    response = handler(try LayerRequest.decode(line))
                } catch {
                    response = Refusal.bad(error).response
                }
            } else {
                return  // closed without a request
            }
            ControlSocket.answer(client, response, path: path)
        }

        /// Stops accepting, removes the socket file, ends the reads of connections that have not
        /// sent their request yet (they are answered "stopping", EAGAIN: their client retries),
        /// and waits until every request being handled has had its answer.
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
                // Under the lock: a connection leaves `reading` before its descriptor closes.
                for client in reading { shutdown(client, Int32(SHUT_RD)) }
                while active > 0 { lock.wait() }
            }
        }
    }

    /// Writes `response` as one line; a client that has gone is not an error here.
    static func answer(_ fd: Int32, _ response: LayerResponse, path: String, flags: Int32 = 0) {
        guard let data = try? JSONEncoder().encode(response) else { return }
        try? writeLine(fd, data, path: path, flags: flags)
    }
}
