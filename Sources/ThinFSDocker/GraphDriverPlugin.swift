import Foundation
import Logging
import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// Docker's graphdriver plugin (moby daemon/graphdriver/proxy.go, the client side) over a
/// layer store, without the transport: `DockerPluginServer` hands each HTTP request here as a
/// method name, the query and the body, and writes back what `handle` returns.
///
///     POST /Plugin.Activate                {"Implements":["GraphDriver"]}
///     POST /GraphDriver.Init               Home, Opts (dm.* --storage-opt values, verbatim)
///     POST /GraphDriver.Create             ID, Parent          image layer
///     POST /GraphDriver.CreateReadWrite    ID, Parent, StorageOpt{size}   container layer
///     POST /GraphDriver.Remove             ID                  deferred while busy (dm.use_deferred_deletion)
///     POST /GraphDriver.Get                ID  -> Dir          FUSE mount at HOME/mnt/ID, counted
///     POST /GraphDriver.Put                ID                  the last Put unmounts
///     POST /GraphDriver.Exists             ID  -> Exists
///     POST /GraphDriver.Status                 -> Status       the pairs of 'thinfs info'
///     POST /GraphDriver.GetMetadata        ID  -> Metadata     DeviceId, DeviceSize, DeviceName
///     POST /GraphDriver.Cleanup                                unmounts everything, deferred deletions
///     POST /GraphDriver.Capabilities           -> Capabilities
///     POST /GraphDriver.Diff               ID, Parent -> the layer tar (the body itself)
///     POST /GraphDriver.Changes            ID, Parent -> Changes
///     POST /GraphDriver.ApplyDiff?id=&parent=  body: the layer tar -> Size
///     POST /GraphDriver.DiffSize           ID, Parent -> Size
///
/// Failures answer HTTP 500 with `{"Err": "..."}`, which moby's plugin client turns into the
/// error of the call (for `Diff`, whose 200 body is the tar, it is the only way to fail).
///
/// Requests run one at a time on a queue of their own: the store's calls block (SQLite, the
/// pool, FUSE mounts), and the Get counts need an order anyway.
public final class GraphDriverPlugin: @unchecked Sendable {
    public let daemon: LayerDaemon
    var store: LayerStore { daemon.store }
    let logger: Logger
    let queue = DispatchQueue(label: "thinfs.docker-plugin")

    /// Docker's `Home` (`DATA_ROOT/NAME`), canonical, from Init. Mounts go in HOME/mnt.
    private var home: String?
    /// Layer id → how many Gets are outstanding and where it is mounted. Only `queue` touches it.
    private var gets: [String: (count: Int, path: String)] = [:]

    public init(daemon: LayerDaemon, logger: Logger = Logger(label: "thinfs.docker-plugin")) {
        self.daemon = daemon
        self.logger = logger
    }

    /// Errors of the protocol itself (the store's errors pass through as they are).
    public enum Error: Swift.Error, CustomStringConvertible, Equatable {
        case unknownMethod(String)
        case badRequest(method: String, reason: String)
        case notInitialized(method: String)
        case homeInUse(home: String, requested: String, mounted: Int)
        case notMounted(layer: String)
        case parentMismatch(layer: String, given: String, stored: String)
        case unknownStorageOption(layer: String, key: String)
        case badSize(layer: String, value: String)

        public var description: String {
            switch self {
            case .unknownMethod(let m): "unknown method \(m)"
            case .badRequest(let m, let why): "\(m): bad request: \(why)"
            case .notInitialized(let m): "\(m): the driver is not initialized (GraphDriver.Init first)"
            case .homeInUse(let home, let requested, let mounted):
                "the plugin serves a dockerd whose home is \(home) (\(mounted) layer(s) mounted); a second dockerd (home \(requested)) cannot share it: stop the first (its shutdown releases the plugin), or run another 'thinfs serve --docker-plugin NAME' with its own root and name; if the first was killed, restart the plugin"
            case .notMounted(let id): "layer \(id) is not mounted (Put without a Get)"
            case .parentMismatch(let id, let given, let stored):
                "layer \(id): parent \(given.isEmpty ? "(none)" : given) was given, but its parent is \(stored.isEmpty ? "(none)" : stored)"
            case .unknownStorageOption(let id, let key): "layer \(id): unknown storage option \(key) (ThinFS knows size)"
            case .badSize(let id, let value): "layer \(id): storage option size=\(value) is not a size (examples: 20G, 512M)"
            }
        }
    }

    /// What one request answers: JSON, or (`Diff`) a file whose bytes are the body, removed
    /// once it is sent.
    public enum Reply: Sendable {
        case json(status: Int, body: Data)
        case file(path: String)
    }

    /// moby's `graphDriverRequest` and `graphDriverInitRequest`; Go's encoder writes null for
    /// a nil slice or map, and leaves out the omitempty fields.
    struct Request: Decodable {
        var ID: String?
        var Parent: String?
        var MountLabel: String?
        var StorageOpt: [String: String]?
        var Home: String?
        var Opts: [String]?
    }

    /// Handles one request. Runs on `queue` (the server calls it there).
    public func handle(method: String, query: [String: String], body: Data, bodyFile: String?) -> Reply {
        dispatchPrecondition(condition: .onQueue(queue))
        do {
            return try answer(method: method, query: query, body: body, bodyFile: bodyFile)
        } catch let error as Error {
            logger.info("request refused", metadata: ["method": "\(method)", "error": "\(error)"])
            if case .unknownMethod = error { return Self.failure(error, status: 404) }
            return Self.failure(error, status: 500)
        } catch {
            logger.info("request failed", metadata: ["method": "\(method)", "error": "\(error)"])
            return Self.failure(error, status: 500)
        }
    }

    static func failure(_ error: Swift.Error, status: Int) -> Reply {
        .json(status: status, body: encode(["Err": "\(error)"]))
    }

    static func encode(_ object: [String: Any]) -> Data {
        // Only strings, numbers, booleans, arrays and dictionaries of them: cannot fail.
        (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
    }

    private func answer(method: String, query: [String: String], body: Data, bodyFile: String?) throws -> Reply {
        func ok(_ object: [String: Any] = [:]) -> Reply { .json(status: 200, body: Self.encode(object)) }
        func request() throws -> Request {
            // Activate has no body; the others send at least {}.
            guard !body.allSatisfy({ $0 == 0x20 || $0 == 0x0A || $0 == 0x0D || $0 == 0x09 }) else { return Request() }
            do { return try JSONDecoder().decode(Request.self, from: body) } catch {
                throw Error.badRequest(method: method, reason: "the body is not moby's request JSON: \(error)")
            }
        }
        func id(_ r: Request) throws -> String {
            guard let id = r.ID, !id.isEmpty else { throw Error.badRequest(method: method, reason: "no ID") }
            try LayerStore.validate(id: id)
            return id
        }
        switch method {
        case "Plugin.Activate":
            return ok(["Implements": ["GraphDriver"]])
        case "GraphDriver.Init":
            let r = try request()
            try initialize(home: r.Home ?? "", options: r.Opts ?? [])
            return ok()
        case "GraphDriver.Capabilities":
            // ThinFS's diff is its own (not the tar Docker applied), so not reproduced exactly:
            // Docker keeps its tar-split data to rebuild the original.
            return ok(["Capabilities": ["ReproducesExactDiffs": false]])
        case "GraphDriver.Status":
            return ok(["Status": try store.statusFields().map { [$0.0, $0.1] }])
        case "GraphDriver.Create", "GraphDriver.CreateReadWrite":
            let r = try request()
            let layer = try id(r)
            let size = try Self.size(r.StorageOpt ?? [:], layer: layer)
            let parent = r.Parent.flatMap { $0.isEmpty ? nil : $0 }
            _ = try store.createGraphdriverLayer(layer, parent: parent, readWrite: method == "GraphDriver.CreateReadWrite", size: size)
            return ok()
        case "GraphDriver.Remove":
            try remove(try id(try request()))
            return ok()
        case "GraphDriver.Get":
            return ok(["Dir": try get(try id(try request()), method: method)])
        case "GraphDriver.Put":
            try put(try id(try request()))
            return ok()
        case "GraphDriver.Exists":
            let layer = try id(try request())
            return ok(["Exists": try store.layer(layer).map { $0.state == .active } ?? false])
        case "GraphDriver.GetMetadata":
            let layer = try store.liveLayer(try id(try request()))
            return ok(["Metadata": ["DeviceId": String(layer.deviceID), "DeviceSize": String(layer.size),
                                    "DeviceName": "\(store.root):\(layer.id)"]])
        case "GraphDriver.Cleanup":
            try cleanup()
            return ok()
        case "GraphDriver.Diff":
            let r = try request()
            let layer = try id(r)
            let whole = try againstBase(layer, r.Parent ?? "")
            let path = try scratchFile("diff")
            do {
                try store.diff(layer, to: path, againstBase: whole)
            } catch {
                unlink(path)
                throw error
            }
            return .file(path: path)
        case "GraphDriver.Changes", "GraphDriver.DiffSize":
            let r = try request()
            let layer = try id(r)
            let (changes, size) = try store.changes(layer, againstBase: try againstBase(layer, r.Parent ?? ""))
            if method == "GraphDriver.DiffSize" { return ok(["Size": size]) }
            return ok(["Changes": changes.map { ["Path": $0.path, "Kind": $0.kind.rawValue] as [String: Any] }])
        case "GraphDriver.ApplyDiff":
            guard let raw = query["id"], !raw.isEmpty else { throw Error.badRequest(method: method, reason: "no id in the query") }
            try LayerStore.validate(id: raw)
            let layer = try store.liveLayer(raw)
            // The tar goes on top of the layer's own content, whatever parent Docker names, as
            // moby's naive ApplyDiff unpacks into the layer's directory; a named one must be real.
            if let parent = query["parent"], !parent.isEmpty, parent != (layer.parent ?? "") {
                throw Error.parentMismatch(layer: raw, given: parent, stored: layer.parent ?? "")
            }
            guard let bodyFile else { throw Error.badRequest(method: method, reason: "no layer tar in the body") }
            return ok(["Size": try store.applyGraphdriverDiff(layer.id, from: bodyFile)])
        default:
            throw Error.unknownMethod(method)
        }
    }

    /// `--storage-opt size=` on `docker run`, as devicemapper took it (its only key).
    static func size(_ options: [String: String], layer: String) throws -> UInt64? {
        var size: UInt64?
        for (key, value) in options {
            guard key.lowercased() == "size" else { throw Error.unknownStorageOption(layer: layer, key: key) }
            guard let v = try? ByteSize.parse(value), v > 0 else { throw Error.badSize(layer: layer, value: value) }
            size = v
        }
        return size
    }

    /// Docker names the parent it diffs against: the stored one, or none (moby's naive diff
    /// then compares with an empty directory: the layer's whole content, which is the diff
    /// against the base device). Any other parent is refused. True: diff against the base.
    private func againstBase(_ id: String, _ given: String) throws -> Bool {
        let layer = try store.liveLayer(id)
        if given.isEmpty { return true }
        try LayerStore.validate(id: given)
        let stored = layer.parent ?? ""
        guard given == stored else { throw Error.parentMismatch(layer: id, given: given, stored: stored) }
        return false
    }

    /// A file for a tar on its way in or out, in the store's scratch directory (on the store's
    /// filesystem, not a tmpfs that a layer could fill).
    func scratchFile(_ what: String) throws -> String {
        let directory = store.scratchDirectory
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        return directory + "/docker-\(what)-\(UUID().uuidString.prefix(12)).tar"
    }

    // MARK: Init, Get, Put, Remove, Cleanup

    /// `Opts` are dockerd's `--storage-opt` values: a store keeps the options it was made with
    /// (`thinfs serve --storage-opt`), so each must name a known key and agree with them; an
    /// unknown key fails naming it.
    private func initialize(home requested: String, options: [String]) throws {
        guard requested.hasPrefix("/") else {
            throw Error.badRequest(method: "GraphDriver.Init", reason: "Home \(requested.debugDescription) is not an absolute path")
        }
        try LayerStore.validate(requested, what: "Home")
        // One dockerd per plugin, from its Init to its Cleanup (its shutdown): a second one
        // would mix its layers with the first's and unmount them at its own shutdown. The same
        // Home again is the same dockerd restarted (after a crash, with no Cleanup).
        let canonical = URL(fileURLWithPath: requested).resolvingSymlinksInPath().path
        if let home, home != canonical {
            throw Error.homeInUse(home: home, requested: canonical, mounted: gets.count)
        }
        // A bigger dm.basesize grows the base device, as devicemapper's did at dockerd's start.
        if let size = try store.options.checkUnchanged(by: options, root: store.root) { try store.growBase(to: size) }
        try FileManager.default.createDirectory(atPath: requested + "/mnt", withIntermediateDirectories: true)
        home = URL(fileURLWithPath: requested).resolvingSymlinksInPath().path
        logger.info("initialized for dockerd", metadata: ["home": "\(canonical)", "options": "\(options)"])
    }

    private func get(_ id: String, method: String) throws -> String {
        guard let home else { throw Error.notInitialized(method: method) }
        if var entry = gets[id] {
            entry.count += 1
            gets[id] = entry
            return entry.path
        }
        // Docker writes every layer it has just made (graphtest too, and the -init layer);
        // one with a child is frozen and mounts read-only.
        let layer = try store.liveLayer(id)
        let readOnly = try !store.children(of: id).isEmpty
        let path = home + "/mnt/" + id
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        do {
            try daemon.mount(layer.id, at: path, readOnly: readOnly, writableImage: true)
        } catch {
            rmdir(path)
            throw error
        }
        gets[id] = (1, path)
        return path
    }

    private func put(_ id: String) throws {
        guard var entry = gets[id] else { throw Error.notMounted(layer: id) }
        entry.count -= 1
        if entry.count > 0 {
            gets[id] = entry
            return
        }
        gets[id] = nil
        if !daemon.unmount(entry.path) {
            logger.warning("layer still in use after its unmount (a bind mount of it is left)", metadata: ["layer": "\(id)"])
        }
        rmdir(entry.path)
    }

    private func remove(_ id: String) throws {
        switch try store.remove(id) {
        case .deleted:
            if gets[id] == nil, let home { rmdir(home + "/mnt/" + id) }
        case .deferred(let holder):
            logger.info("layer removed; it is deleted once free", metadata: ["layer": "\(id)", "holder": "\(holder)"])
        }
    }

    /// dockerd's shutdown: every layer it left mounted is unmounted, then the deferred deletions run.
    private func cleanup() throws {
        for (id, entry) in gets {
            if !daemon.unmount(entry.path) {
                logger.warning("layer still in use after its unmount (a bind mount of it is left)", metadata: ["layer": "\(id)"])
            }
            rmdir(entry.path)
        }
        gets = [:]
        // dockerd's shutdown: another dockerd may Init now.
        home = nil
        let deleted = try store.cleanup()
        if !deleted.isEmpty { logger.info("deferred deletions done", metadata: ["layers": "\(deleted)"]) }
    }

    /// serve's SIGTERM: the same unmounts, without the store calls (the daemon closes it next).
    func releaseAll() {
        queue.sync {
            for (_, entry) in gets {
                _ = daemon.unmount(entry.path)
                rmdir(entry.path)
            }
            gets = [:]
        }
    }
}
