import ArgumentParser
import Foundation
import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// How a layer command reaches the store.
///
/// The pool has one writer. If a `thinfs-mount` daemon owns it (layers are mounted), the
/// request goes to the daemon's control socket; otherwise this process opens the store,
/// runs the request, and closes it. A daemon that is starting or stopping holds the pool
/// for a moment without answering: then both are retried for a few seconds.
enum StoreAccess {
    static func perform(root: String, _ request: LayerRequest,
                        progress: (@Sendable (LayerStore.ImportProgress) -> Void)? = nil) throws -> LayerResponse {
        let root = URL(fileURLWithPath: root).standardizedFileURL.path
        let deadline = Date().addingTimeInterval(15)
        while true {
            if let response = try askDaemon(root: root, request, until: deadline) { return response }
            guard LayerStore.exists(at: root) else {
                return LayerResponse(error: "\(LayerStore.Error.notInitialized(root: root))", errno: ENOENT)
            }
            do {
                let store = try LayerStore.open(root: root)
                defer { try? store.close() }
                // In this process an import can report its progress as it goes.
                return LayerService(store: store, progress: progress).handle(request)
            } catch ThinPoolError.heldByAnotherProcess(let data) {
                guard Date() < deadline else { throw ThinPoolError.heldByAnotherProcess(data: data) }
                usleep(100_000)
            }
        }
    }

    /// Sends `request` to the daemon that holds `root`'s store, if one does. A daemon that is
    /// starting or stopping answers EAGAIN: it is asked again every 100 ms until `deadline`.
    /// nil when no daemon listens on the store's control socket.
    static func askDaemon(root: String, _ request: LayerRequest, until deadline: Date) throws -> LayerResponse? {
        let socket = LayerStore.controlSocketPath(URL(fileURLWithPath: root).standardizedFileURL.path)
        while let response = try ControlSocket.send(request, to: socket) {
            guard response.errno == EAGAIN, Date() < deadline else { return response }
            usleep(100_000)
        }
        return nil
    }

    /// Runs `request` and prints its output, or throws its error for ArgumentParser to print.
    static func run(root: String, _ request: LayerRequest,
                    progress: (@Sendable (LayerStore.ImportProgress) -> Void)? = nil) throws {
        let response = try perform(root: root, request, progress: progress)
        if let error = response.error { throw CommandFailure(message: error) }
        FileHandle.standardOutput.write(Data(response.output.utf8))
    }
}

/// An error message from the store, printed as it is.
struct CommandFailure: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}
