import Foundation
import Logging
import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// `control`: the input is what a client writes to `ROOT/control.sock`, sent over a real
/// connection to a `ControlSocket.Listener` (line framing, length limit, JSON decoding), whose
/// handler runs the decoded request with `LayerService` against a real store made once
/// (userspace pool, base device, image layer `img`, container layer `ctr` on it).
///
/// Requests that name a file outside the store (apply-diff, diff, image-import) or mount
/// something (kernel-mount, kernel-umount) are answered without being run: they would act on
/// the host. `mount` is run: without a daemon it is refused. Layers a request created are
/// removed after it, so each input starts from the same store.
public enum ControlHarness {
    static let quiet = Logger(label: "thinfs.fuzz", factory: { _ in SwiftLogNoOpLogHandler() })
    static let hostOperations: Set<LayerRequest.Operation> = [.applyDiff, .diff, .importImage, .kernelMount, .kernelUnmount]

    struct Setup: @unchecked Sendable {
        let socket: String
        let store: LayerStore
        let listener: ControlSocket.Listener
        let initialLayers: Set<String>
    }

    static let setup: Setup = {
        let scratch = Harness.scratchDirectory("control")
        do {
            let options = try StorageOptions(parsing: ["dm.basesize=16M", "dm.loopdatasize=128M", "dm.loopmetadatasize=8M"])
            let store = try LayerStore.initialize(root: scratch + "/store", options: options, logger: quiet)
            _ = try store.createImageLayer("img", parent: nil)
            _ = try store.createContainerLayer("ctr", parent: "img", size: nil)
            let service = LayerService(store: store)
            let socket = scratch + "/control.sock"
            let listener = try ControlSocket.Listener(path: socket, limits: .init(maxLineBytes: 1 << 16, maxConnections: 8, timeout: 5))
            listener.serve { request in
                if hostOperations.contains(request.operation) { return LayerResponse(error: "not run by the fuzz harness", errno: EPERM) }
                return service.handle(request)
            }
            let initial = Set(try store.listing().map(\.id))
            return Setup(socket: socket, store: store, listener: listener, initialLayers: initial)
        } catch {
            Harness.setupFailed("making the store", error)
        }
    }()

    /// Makes the fixed part once, before the first input.
    public static func prepare() { _ = setup }

    public static func run(_ data: UnsafeRawBufferPointer) {
        let s = setup
        // The decoder on its own, as the listener calls it.
        _ = try? LayerRequest.decode(Data(data.prefix { $0 != 10 }))
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { Harness.setupFailed("socket", CocoaError(.fileWriteUnknown)) }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in s.socket.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { Harness.setupFailed("connect \(s.socket)", CocoaError(.fileReadUnknown)) }
        var done = 0
        while done < data.count {
            let n = send(fd, data.baseAddress! + done, data.count - done, Int32(MSG_NOSIGNAL))
            if n <= 0 { break }  // the daemon answered early (a line too long) and closed
            done += n
        }
        shutdown(fd, Int32(SHUT_WR))
        var response = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            response += chunk[0 ..< n]
        }
        // Every request gets exactly one answer line, and it decodes.
        if !response.isEmpty, (try? JSONDecoder().decode(LayerResponse.self, from: Data(response))) == nil {
            FileHandle.standardError.write(Data("the control socket answered with something that is not a response: \(String(decoding: response, as: UTF8.self))\n".utf8))
            abort()
        }
        // Back to the initial layers.
        if let rows = try? s.store.listing() {
            for row in rows where !s.initialLayers.contains(row.id) { _ = try? s.store.remove(row.id) }
            _ = try? s.store.cleanup()
        }
        if (try? s.store.layer("img")) == nil { _ = try? s.store.createImageLayer("img", parent: nil) }
        if (try? s.store.layer("ctr")) == nil { _ = try? s.store.createContainerLayer("ctr", parent: "img", size: nil) }
    }
}
