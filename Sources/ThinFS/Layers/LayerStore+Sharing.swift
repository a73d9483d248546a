import Foundation
import Logging
import PersistentData

/// Sharing layers between hosts through a Ceph cluster (issue 16; `RBDPool+Catalogue.swift`).
///
/// Each host keeps its own store: its SQLite says which device holds which layer on this host.
/// The cluster's catalogue (`rbd.catalogue`) is the shared truth for image layers: an import
/// publishes each new layer there, and another host's import of the same image finds it by
/// chain id and adopts it (its own device id, an alias of the same RBD image) instead of
/// unpacking it again. Containers are recorded there too, so another host can take one over
/// once its writer is gone.
extension LayerStore {
    /// The store's RBD pool, if it shares layers through a catalogue.
    var sharingPool: RBDPool? {
        guard let rbd = pool as? RBDPool, rbd.configuration.catalogue != nil else { return nil }
        return rbd
    }

    /// `image import`: adopts published layer `chainID` (whose parent is `parent`) if another
    /// store published it. Returns whether it did; then nothing was unpacked or written.
    func adoptShared(_ chainID: String, parent: String?) throws -> Bool {
        guard let rbd = sharingPool, let shared = try rbd.sharedLayer(chainID),
              shared.host != rbd.configuration.prefix, shared.parent == parent else { return false }
        try requireWritable("adopting layer \(chainID)")
        return try locked {
            if try layer(chainID) != nil { return false }
            let id = try allocateDeviceID()
            let adopted = try rbd.adoptLayer(chainID, as: id)
            // The record's size and uuid are the publisher's: its base device made the filesystem.
            try db.transaction {
                try insert(Layer(id: chainID, parent: parent, deviceID: id, kind: .image, size: adopted.size,
                                 state: .active, uuid: adopted.uuid, created: Date()))
                try Self.setSetting(db, "next.device", String(id + 1))
            }
            logger.info("adopted a shared layer", metadata: ["layer": "\(chainID)", "rbd.image": "\(adopted.image)", "from": "\(adopted.host)"])
            return true
        }
    }

    /// Publishes image layer `id` (complete, named by its chain id) for other hosts. A failure
    /// leaves the layer this store's own: it is logged, not thrown.
    func publishShared(_ id: String) {
        guard let rbd = sharingPool else { return }
        do {
            let layer = try liveLayer(id)
            try rbd.publishLayer(layer.deviceID, chainID: id, size: layer.size, uuid: layer.uuid, parent: layer.parent)
        } catch {
            logger.warning("could not publish the layer to the cluster's catalogue; other hosts will unpack it themselves",
                           metadata: ["layer": "\(id)", "error": "\(error)"])
        }
    }

    /// Records container layer `layer` in the catalogue, so that another host can take it over.
    func publishContainer(_ layer: Layer) {
        guard let rbd = sharingPool, layer.kind == .container, let parent = layer.parent else { return }
        do {
            try rbd.publishContainer(layer.deviceID, layer: layer.id, size: layer.size, uuid: layer.uuid, parent: parent)
        } catch {
            logger.warning("could not record the container in the cluster's catalogue", metadata: ["layer": "\(layer.id)", "error": "\(error)"])
        }
    }

    /// Deletes device `id` for recovery (an orphan, a replaced device). A shared image another
    /// host still uses is kept and logged instead: a refusal must not stop the store opening.
    func deleteUnlessShared(_ id: ThinDeviceID) throws -> Bool {
        do {
            try pool.message(.delete(id))
            return true
        } catch let error as RBDPool.CatalogueError {
            logger.warning("kept a device another host still uses; it goes once they let go", metadata: ["thin.id": "\(id)", "reason": "\(error)"])
            return false
        }
    }

    /// What the cluster's catalogue holds: image layers (with the stores using them) and containers.
    public func catalogue() throws -> (layers: [RBDPool.SharedLayer], containers: [RBDPool.SharedContainer]) {
        guard let rbd = sharingPool else { throw RBDPool.CatalogueError.notConfigured(pool: (pool as? RBDPool)?.configuration.pool ?? "(not rbd)") }
        return (try rbd.sharedLayers(), try rbd.sharedContainers())
    }

    /// Drops the catalogue records of the store with rbd.prefix `host`, gone for good (its user
    /// records and aliases), so the owners of the layers it read can delete them; refused,
    /// naming the holder, while that store still holds one of its images (RBDPool.forgetStore).
    public func forgetStore(_ host: String) throws -> RBDPool.ForgottenStore {
        try requireWritable("forgetting store \(host)")
        guard let rbd = sharingPool else { throw RBDPool.CatalogueError.notConfigured(pool: (pool as? RBDPool)?.configuration.pool ?? "(not rbd)") }
        return try rbd.forgetStore(host)
    }

    /// Takes over container `id` of the store with rbd.prefix `host` (a host that is gone):
    /// refused, naming the holder, while that host's daemon still holds the image's exclusive
    /// lock. Adopts the container's image layers first if this store lacks them.
    public func takeOver(container id: String, from host: String) throws -> Layer {
        try requireWritable("taking over layer \(id)")
        guard let rbd = sharingPool else { throw RBDPool.CatalogueError.notConfigured(pool: (pool as? RBDPool)?.configuration.pool ?? "(not rbd)") }
        try Self.validate(id: id)
        return try locked {
            if let existing = try layer(id) { throw Error.layerExists(id, state: existing.state) }
            guard let record = try rbd.sharedContainers().first(where: { $0.host == host && $0.layer == id }) else {
                throw RBDPool.CatalogueError.unknownContainer(catalogue: rbd.configuration.catalogue ?? "", host: host, layer: id)
            }
            try adoptChain(record.parent, rbd: rbd)
            let deviceID = try allocateDeviceID()
            let (taken, device) = try rbd.takeOver(container: id, from: host, as: deviceID)
            // The lock proved the old writer gone; this store's mounts take it again when they open.
            device.close()
            let layer = Layer(id: id, parent: record.parent, deviceID: deviceID, kind: .container, size: taken.size,
                              state: .active, uuid: taken.uuid, created: Date())
            try db.transaction {
                try insert(layer)
                try Self.setSetting(db, "next.device", String(deviceID + 1))
            }
            logger.info("took over a container", metadata: ["layer": "\(id)", "from": "\(host)", "rbd.image": "\(taken.image)"])
            return layer
        }
    }

    /// Makes sure image layer `chainID` and its parents are in this store, adopting them.
    private func adoptChain(_ chainID: String, rbd: RBDPool) throws {
        if let existing = try layer(chainID) {
            guard existing.state == .active else { throw Error.deleted(chainID) }
            return
        }
        guard let shared = try rbd.sharedLayer(chainID) else {
            throw RBDPool.CatalogueError.unknownLayer(catalogue: rbd.configuration.catalogue ?? "", chainID: chainID)
        }
        if let parent = shared.parent { try adoptChain(parent, rbd: rbd) }
        guard try adoptShared(chainID, parent: shared.parent) else {
            throw RBDPool.CatalogueError.unknownLayer(catalogue: rbd.configuration.catalogue ?? "", chainID: chainID)
        }
    }
}
