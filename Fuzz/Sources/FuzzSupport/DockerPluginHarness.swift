import Foundation
import Logging
import ThinFS
import ThinFSDocker
#if canImport(Glibc)
import Glibc
#endif

/// `docker-plugin`: the input is a `FileBundle` of requests, each `METHOD?QUERY \n BODY` (for
/// example `GraphDriver.CreateReadWrite \n {"ID":"c1","Parent":"img","StorageOpt":{"size":"32M"}}`
/// or `GraphDriver.ApplyDiff?id=ctr \n <a layer tar>`). Each is sent as dockerd's plugin client
/// sends it, an HTTP/1.1 POST with a Content-Length, on a connection of its own to a real
/// `DockerPluginServer` (SwiftNIO's HTTP codec, the body limit, ApplyDiff's upload to a scratch
/// file) whose `GraphDriverPlugin` runs over a real store made once (userspace pool, 16 MiB base,
/// image layer `img`, container layer `ctr` on it), and the answer is read back.
///
/// Two methods are answered by the harness without being sent, as they would act on the host:
/// `GraphDriver.Init` makes `Home/mnt` wherever its body says (the harness sends one Init at
/// startup, with a home in its scratch directory) and `GraphDriver.Get` mounts a layer with FUSE
/// (a mount left by a crash would outlive the harness). `Put` and `Cleanup` are sent: with no
/// Get they have nothing to unmount. The URI's bytes outside printable ASCII are percent-encoded,
/// so the request line stays one line and names the method the input gave. After each input the
/// layers go back to `img` and `ctr` (`ctr` made again if a request wrote to it).
public enum DockerPluginHarness {
    static let quiet = Logger(label: "thinfs.fuzz", factory: { _ in SwiftLogNoOpLogHandler() })
    /// Not sent: see above.
    static let hostMethods: Set<String> = ["GraphDriver.Init", "GraphDriver.Get"]

    struct Setup: @unchecked Sendable {
        let socket: String
        let store: LayerStore
        let server: DockerPluginServer
        let initialLayers: Set<String>
    }

    static let setup: Setup = {
        let scratch = Harness.scratchDirectory("docker-plugin")
        do {
            let options = try StorageOptions(parsing: ["dm.basesize=16M", "dm.loopdatasize=128M", "dm.loopmetadatasize=8M"])
            let store = try LayerStore.initialize(root: scratch + "/store", options: options, logger: quiet)
            try makeLayers(store)
            let daemon = LayerDaemon(store: store, logger: quiet)
            let socket = scratch + "/plugin.sock"
            let server = try DockerPluginServer.start(plugin: GraphDriverPlugin(daemon: daemon, logger: quiet), socketPath: socket)
            let initial = Set(try store.listing().map(\.id))
            let s = Setup(socket: socket, store: store, server: server, initialLayers: initial)
            // The one Init: Home in the scratch directory, no options.
            let reply = exchange(s, uri: "/GraphDriver.Init", body: Array(#"{"Home":"\#(scratch)/home","Opts":[]}"#.utf8))
            guard reply.starts(with: Array("HTTP/1.1 200".utf8)) else {
                Harness.setupFailed("GraphDriver.Init", CocoaError(.fileWriteUnknown, userInfo: ["reply": String(decoding: reply, as: UTF8.self)]))
            }
            return s
        } catch {
            Harness.setupFailed("making the store", error)
        }
    }()

    static func makeLayers(_ store: LayerStore) throws {
        if try store.layer("img") == nil { _ = try store.createGraphdriverLayer("img", parent: nil, readWrite: false, size: nil) }
        if try store.layer("ctr") == nil { _ = try store.createGraphdriverLayer("ctr", parent: "img", readWrite: true, size: nil) }
    }

    /// Makes the fixed part once, before the first input.
    public static func prepare() { _ = setup }

    /// Bytes of the request line that would break it (space, controls, non-ASCII), percent-encoded.
    static func uri(_ text: String) -> String {
        var out = "/"
        for b in text.utf8 {
            if b > 0x20 && b < 0x7F { out.append(Character(Unicode.Scalar(b))) } else { out += String(format: "%%%02X", b) }
        }
        return out
    }

    /// The method the server will see for `uri` (PluginHTTPHandler.method(of:)).
    static func method(of uri: String) -> String {
        let path = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        return path.hasPrefix("/") ? String(path.dropFirst()) : path
    }

    /// Sends one POST on a connection of its own and returns everything the server wrote back.
    static func exchange(_ s: Setup, uri: String, body: [UInt8]) -> [UInt8] {
        let fd = Harness.connect(unixSocket: s.socket)
        defer { close(fd) }
        let head = "POST \(uri) HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n"
        let request = Array(head.utf8) + body
        request.withUnsafeBytes { Harness.send(fd, $0) }
        return Harness.receiveAll(fd)
    }

    public static func run(_ data: UnsafeRawBufferPointer) {
        let s = setup
        var wrote = false
        for (line, body) in FileBundle.decode(data) {
            let uri = uri(line)
            let method = method(of: uri)
            if hostMethods.contains(method) { continue }
            if method != "GraphDriver.Exists" && method != "GraphDriver.Status" { wrote = true }
            let response = exchange(s, uri: uri, body: body)
            // Every request gets an HTTP answer: a reply of the plugin, or the codec's 400.
            guard response.starts(with: Array("HTTP/1.1 ".utf8)) else {
                FileHandle.standardError.write(Data("the plugin answered \(method.debugDescription) with something that is not HTTP: \(String(decoding: response.prefix(200), as: UTF8.self).debugDescription)\n".utf8))
                abort()
            }
        }
        guard wrote else { return }
        // Back to the initial layers; ctr afresh, as ApplyDiff may have written to it.
        do {
            // Children before parents: a few passes.
            for _ in 0 ..< 8 {
                let extra = try s.store.listing().filter { !s.initialLayers.contains($0.id) || $0.id == "ctr" }
                if extra.isEmpty { break }
                for row in extra { _ = try? s.store.remove(row.id) }
                _ = try s.store.cleanup()
            }
            try makeLayers(s.store)
        } catch {
            Harness.setupFailed("restoring the layers", error)
        }
    }
}
