import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// Docker's legacy plugin protocol on a unix socket: HTTP/1.1 POSTs (SwiftNIO's codec), one
/// `GraphDriverPlugin` behind it. What `thinfs serve --docker-plugin NAME` hosts at
/// /run/docker/plugins/NAME.sock, and what the tests start in-process.
public final class DockerPluginServer: Sendable {
    public enum Error: Swift.Error, CustomStringConvertible {
        case socketInUse(path: String)
        case notListening(path: String, reason: String)
        public var description: String {
            switch self {
            case .socketInUse(let path): "\(path) exists and is not a socket; refusing to replace it"
            case .notListening(let path, let reason): "Docker plugin socket \(path): \(reason)"
            }
        }
    }

    public let socketPath: String
    public let plugin: GraphDriverPlugin
    let group: MultiThreadedEventLoopGroup
    let channel: Channel

    /// Starts serving `plugin` on `socketPath` and returns once the socket accepts. A socket
    /// left by a server that died is replaced; any other file there is an error.
    public static func start(plugin: GraphDriverPlugin, socketPath: String) throws -> DockerPluginServer {
        try LayerStore.validate(socketPath, what: "socket path")
        guard ServiceSocket.removeStale(at: socketPath) else { throw Error.socketInUse(path: socketPath) }
        try FileManager.default.createDirectory(atPath: (socketPath as NSString).deletingLastPathComponent,
                                                withIntermediateDirectories: true)
        // Only its owner may connect (dockerd runs as root), whatever the umask.
        let staging = try ServiceSocket.Staging(for: socketPath)
        defer { staging.discard() }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        var bound: Channel?
        do {
            let channel = try ServerBootstrap(group: group)
                .serverChannelOption(ChannelOptions.backlog, value: 64)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                        try channel.pipeline.syncOperations.addHandler(PluginHTTPHandler(plugin: plugin))
                    }
                }
                .bind(unixDomainSocketPath: staging.path).wait()
            bound = channel
            try staging.publish()
            return DockerPluginServer(socketPath: socketPath, plugin: plugin, group: group, channel: channel)
        } catch {
            try? bound?.close().wait()
            try? group.syncShutdownGracefully()
            throw Error.notListening(path: socketPath, reason: "\(error)")
        }
    }

    init(socketPath: String, plugin: GraphDriverPlugin, group: MultiThreadedEventLoopGroup, channel: Channel) {
        self.socketPath = socketPath
        self.plugin = plugin
        self.group = group
        self.channel = channel
    }

    /// Stops accepting, removes the socket, and unmounts what dockerd left mounted.
    public func stop() {
        try? channel.close().wait()
        unlink(socketPath)
        try? group.syncShutdownGracefully()
        plugin.releaseAll()
    }
}

/// One connection: collects a request (its body in memory, or for ApplyDiff in a file, as a
/// layer tar may be gigabytes), hands it to the plugin's queue, and writes the reply.
final class PluginHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    /// A JSON request is small; more than this is not moby's.
    static let maximumJSONBody = 1 << 20
    static let contentType = "application/vnd.docker.plugins.v1.2+json"

    let plugin: GraphDriverPlugin
    private var head: HTTPRequestHead?
    private var body = Data()
    private var tooLarge = false
    /// ApplyDiff's body, on its way to a scratch file.
    private var upload: (fd: Int32, path: String)?
    private var uploadError: String?

    init(plugin: GraphDriverPlugin) { self.plugin = plugin }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
            body = Data()
            tooLarge = false
            uploadError = nil
            if Self.method(of: h.uri) == "GraphDriver.ApplyDiff" {
                do {
                    let path = try plugin.scratchFile("apply")
                    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
                    if fd < 0 { uploadError = "\(path): \(String(cString: strerror(errno)))" } else { upload = (fd, path) }
                } catch {
                    uploadError = "\(error)"
                }
            }
        case .body(let buffer):
            if let upload {
                // Written here, on the event loop: a local file, and dockerd sends one request
                // at a time on a connection, so nothing else waits on this loop meanwhile.
                buffer.withUnsafeReadableBytes { bytes in
                    var offset = 0
                    while offset < bytes.count, uploadError == nil {
                        let n = write(upload.fd, bytes.baseAddress! + offset, bytes.count - offset)
                        if n < 0 {
                            if errno == EINTR { continue }
                            uploadError = "writing \(upload.path): \(String(cString: strerror(errno)))"
                        } else {
                            offset += n
                        }
                    }
                }
            } else if body.count + buffer.readableBytes > Self.maximumJSONBody {
                tooLarge = true
            } else {
                body.append(contentsOf: buffer.readableBytesView)
            }
        case .end:
            guard let head else { return }
            self.head = nil
            let method = Self.method(of: head.uri)
            let query = Self.query(of: head.uri)
            let (body, tooLarge, upload, uploadError) = (self.body, self.tooLarge, self.upload, self.uploadError)
            self.body = Data()
            self.upload = nil
            if let upload { close(upload.fd) }
            let keepAlive = head.isKeepAlive
            let plugin = plugin
            let promise = context.eventLoop.makePromise(of: GraphDriverPlugin.Reply.self)
            plugin.queue.async {
                defer { if let upload { unlink(upload.path) } }
                if head.method != .POST {
                    promise.succeed(GraphDriverPlugin.failure(GraphDriverPlugin.Error.badRequest(method: method, reason: "use POST"), status: 405))
                } else if tooLarge {
                    promise.succeed(GraphDriverPlugin.failure(
                        GraphDriverPlugin.Error.badRequest(method: method, reason: "the body is over \(Self.maximumJSONBody) bytes"), status: 413))
                } else if let uploadError {
                    promise.succeed(GraphDriverPlugin.failure(GraphDriverPlugin.Error.badRequest(method: method, reason: uploadError), status: 500))
                } else {
                    promise.succeed(plugin.handle(method: method, query: query, body: body, bodyFile: upload?.path))
                }
            }
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            promise.futureResult.whenSuccess { reply in
                let (handler, context) = bound.value
                handler.respond(reply, keepAlive: keepAlive, context: context)
            }
        }
    }

    /// "/GraphDriver.ApplyDiff?id=…" → "GraphDriver.ApplyDiff".
    static func method(of uri: String) -> String {
        let path = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        return path.hasPrefix("/") ? String(path.dropFirst()) : path
    }

    static func query(of uri: String) -> [String: String] {
        guard let items = URLComponents(string: uri)?.queryItems else { return [:] }
        var query: [String: String] = [:]
        for item in items { query[item.name] = item.value ?? "" }
        return query
    }

    private func respond(_ reply: GraphDriverPlugin.Reply, keepAlive: Bool, context: ChannelHandlerContext) {
        switch reply {
        case .json(let status, let body):
            var headers = HTTPHeaders([("Content-Type", Self.contentType), ("Content-Length", String(body.count))])
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: HTTPResponseStatus(statusCode: status),
                                                                   headers: headers))), promise: nil)
            var buffer = context.channel.allocator.buffer(capacity: body.count)
            buffer.writeBytes(body)
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
            finish(keepAlive: keepAlive, context: context)
        case .file(let path):
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            // The file goes once open: the descriptor keeps it readable until it is closed.
            unlink(path)
            var st = stat()
            guard fd >= 0, fstat(fd, &st) == 0 else {
                if fd >= 0 { close(fd) }
                respond(GraphDriverPlugin.failure(GraphDriverPlugin.Error.badRequest(method: "GraphDriver.Diff", reason: "the diff \(path) could not be read"),
                                                  status: 500), keepAlive: keepAlive, context: context)
                return
            }
            var headers = HTTPHeaders([("Content-Type", "application/x-tar"), ("Content-Length", String(st.st_size))])
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))), promise: nil)
            sendChunks(fd: fd, offset: 0, size: Int(st.st_size), keepAlive: keepAlive, context: context)
        }
    }

    static let chunkSize = 1 << 20

    /// Sends the file a chunk at a time, the next once the last is written (the socket's pace).
    /// Each read is of a local file, on the event loop: see the upload above.
    private func sendChunks(fd: Int32, offset: Int, size: Int, keepAlive: Bool, context: ChannelHandlerContext) {
        guard offset < size else {
            close(fd)
            finish(keepAlive: keepAlive, context: context)
            return
        }
        let count = min(Self.chunkSize, size - offset)
        var buffer = context.channel.allocator.buffer(capacity: count)
        let n = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { bytes in
            max(0, pread(fd, bytes.baseAddress!, count, off_t(offset)))
        }
        guard n > 0 else {
            // The length is sent: a short body is all that can say the file went wrong.
            close(fd)
            context.close(promise: nil)
            return
        }
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(buffer)))).whenComplete { result in
            let (handler, context) = bound.value
            switch result {
            case .success: handler.sendChunks(fd: fd, offset: offset + n, size: size, keepAlive: keepAlive, context: context)
            case .failure:
                close(fd)
                context.close(promise: nil)
            }
        }
    }

    private func finish(keepAlive: Bool, context: ChannelHandlerContext) {
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
            done.whenComplete { _ in bound.value.close(promise: nil) }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let upload {
            close(upload.fd)
            unlink(upload.path)
            self.upload = nil
        }
        context.fireChannelInactive()
    }
}
