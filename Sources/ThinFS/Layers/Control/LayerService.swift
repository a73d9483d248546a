import Foundation
import SystemPackage

/// Runs `LayerRequest`s against a store: in the CLI's process, or in the daemon for requests
/// that came through the control socket. Every error becomes a response naming the layer or
/// path at fault; nothing here prints.
public struct LayerService: Sendable {
    public let store: LayerStore
    /// Set in the daemon: mounts are served there. Without one, `mount` is refused (the CLI
    /// starts a daemon instead).
    let daemon: LayerDaemon?
    /// Where an image import reports its progress (the CLI's own process; a daemon has nobody
    /// to show it to).
    let progress: (@Sendable (LayerStore.ImportProgress) -> Void)?

    public init(store: LayerStore, daemon: LayerDaemon? = nil,
                progress: (@Sendable (LayerStore.ImportProgress) -> Void)? = nil) {
        self.store = store
        self.daemon = daemon
        self.progress = progress
    }

    public func handle(_ request: LayerRequest) -> LayerResponse {
        do {
            return LayerResponse(output: try perform(request))
        } catch {
            return Self.failure(error)
        }
    }

    /// An error as a response: its message, and the errno its subsystem maps it to; pool, volume
    /// and device errors (and any other) through the one mapping, `Errno(reporting:)`.
    static func failure(_ error: Swift.Error) -> LayerResponse {
        switch error {
        case let error as LayerStore.Error:
            return LayerResponse(error: "\(error)", errno: error.errno.rawValue)
        case let error as RBDPool.CatalogueError:
            return LayerResponse(error: "\(error)", errno: error.errno.rawValue)
        case let error as RBDPool.Error:
            return LayerResponse(error: "\(error)", errno: error.errno.rawValue)
        default:
            return LayerResponse(error: "\(error)", errno: Errno(reporting: error).rawValue)
        }
    }

    /// A mount's answer carries no output but its warnings (`MountAccess`), one a line, for the
    /// CLI to show on stderr.
    public static func mountWarnings(_ response: LayerResponse) -> [String] {
        response.output.split(separator: "\n").map(String.init)
    }

    private func need<T>(_ value: T?, _ what: String) throws -> T {
        guard let value else { throw LayerStore.Error.unsupported("the request has no \(what)") }
        return value
    }

    private func perform(_ r: LayerRequest) throws -> String {
        switch r.operation {
        case .create:
            let layer = try store.createImageLayer(try need(r.layer, "layer id"), parent: r.parent)
            return "\(layer.id)\n"
        case .createRW:
            let layer = try store.createContainerLayer(try need(r.layer, "layer id"), parent: try need(r.parent, "parent"), size: r.size)
            return "\(layer.id)\n"
        case .resize:
            let layer = try store.resizeLayer(try need(r.layer, "layer id"), to: try need(r.size, "size"))
            return "\(layer.id) \(layer.size)\n"
        case .remove:
            let id = try need(r.layer, "layer id")
            switch try store.remove(id) {
            case .deleted: return "\(id)\n"
            case .deferred(let holder): return "\(id) (busy, \(holder): deletion deferred until it is free)\n"
            }
        case .list:
            let rows = try store.listing()
            if r.json == true {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                return String(decoding: try encoder.encode(rows), as: UTF8.self) + "\n"
            }
            return LayerStore.formatListing(rows)
        case .info:
            return try store.info()
        case .poolStatus:
            return String(decoding: try JSONEncoder().encode(try store.poolStatusReport(human: r.human ?? false)), as: UTF8.self)
        case .cleanup:
            let deleted = try store.cleanup()
            let left = try store.deferredDeletedCount()
            return deleted.map { "deleted \($0)\n" }.joined() + "\(left) deferred deletion(s) still waiting\n"
        case .applyDiff:
            let stats = try store.applyDiff(try need(r.layer, "layer id"), from: try need(r.path, "tar path"))
            return stats
        case .diff:
            try store.diff(try need(r.layer, "layer id"), to: try need(r.path, "output path"))
            return ""
        case .importImage:
            return try store.importImage(try need(r.path, "image path"), name: r.name, progress: progress) + "\n"
        case .mount:
            guard let daemon else {
                throw LayerStore.Error.unsupported("mount requests are served by a thinfs-mount daemon")
            }
            let warnings = try daemon.mount(try need(r.layer, "layer id"), at: try need(r.mountpoint, "mount point"),
                                            readOnly: r.readOnly ?? false, options: r.mountOptions ?? [])
            return warnings.map { $0 + "\n" }.joined()
        case .kernelMount:
            let node = try store.mountInKernel(try need(r.layer, "layer id"), at: try need(r.mountpoint, "mount point"),
                                               readOnly: r.readOnly ?? false, options: r.mountOptions ?? [])
            return "\(node)\n"
        case .kernelUnmount:
            return try store.unmountFromKernel(try need(r.mountpoint, "mount point")) + "\n"
        case .clusterList:
            let (layers, containers) = try store.catalogue()
            if r.json == true {
                struct Listing: Codable { var layers: [RBDPool.SharedLayer]; var containers: [RBDPool.SharedContainer] }
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                return String(decoding: try encoder.encode(Listing(layers: layers, containers: containers)), as: UTF8.self) + "\n"
            }
            var out = "LAYER\tIMAGE\tOWNER\tUSERS\n"
            for l in layers {
                let users = (l.users ?? [:]).keys.sorted().joined(separator: ",")
                out += "\(l.chainID)\t\(l.image)\t\(l.host)@\(l.hostname)\t\(users.isEmpty ? "-" : users)\n"
            }
            out += "CONTAINER\tIMAGE\tWRITER\tPARENT\n"
            for c in containers { out += "\(c.layer)\t\(c.image)\t\(c.host)@\(c.hostname)\t\(c.parent)\n" }
            return out
        case .takeOver:
            let layer = try store.takeOver(container: try need(r.layer, "layer id"), from: try need(r.name, "store (rbd.prefix) to take it from"))
            return "\(layer.id)\n"
        case .clusterForget:
            let forgotten = try store.forgetStore(try need(r.name, "store (rbd.prefix) to forget"))
            var out = forgotten.removed.map { "removed \($0)\n" }.joined()
            out += forgotten.keptLayers.map { "kept layer \($0) (other stores may read it)\n" }.joined()
            out += forgotten.keptContainers.map { "kept container \($0) (take it over with 'thinfs cluster take-over \($0) --from \(forgotten.store)')\n" }.joined()
            return out
        }
    }
}
