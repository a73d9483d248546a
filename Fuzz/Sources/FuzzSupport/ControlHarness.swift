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
        let fd = Harness.connect(unixSocket: s.socket)
        defer { close(fd) }
        Harness.send(fd, data)
        shutdown(fd, Int32(SHUT_WR))
        let response = Harness.receiveAll(fd)
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
