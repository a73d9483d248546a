import Foundation
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Layer content: apply-diff, diff and image import, through the Volume API with no mount.
///
/// Every writer of a layer's content goes through `writeContent` (an existing layer) or
/// `createImageLayer(_:parent:what:content:)` (a new one), so a layer never holds partial
/// content and looks complete, and an existing layer's content is never lost to a failed write.
///
/// A new layer is `applying` while it is written, and removed if its writer fails:
///
///     step                               layers.state    a crash here leaves
///     ─────────────────────────────────  ──────────────  ─────────────────────────────────────
///     1 create (journaled)               applying        applying: removed at the next open
///     2 body writes through the Volume   applying        applying: removed at the next open
///     3 volume written back, pool commit applying        applying: removed at the next open
///     4 mark complete                    active          a complete layer
///
/// An existing layer is written through a scratch device, a thin snapshot of its device (O(1)),
/// while the layer itself stays `active` with its old content and is held busy (nothing mounts,
/// snapshots, removes or writes it meanwhile):
///
///     step                               layers.device_id   a failure or crash here leaves
///     ─────────────────────────────────  ─────────────────  ──────────────────────────────────
///     1 snapshot S of D (journaled)      D (old content)    the old content; S deleted
///     2 body writes S through the Volume D                  the old content; S deleted
///     3 volume written back, pool commit D                  the old content; S deleted
///     4 switch the row                   S (new content)    the new content; D deleted
///     5 delete D, commit                 S                  the new content
///
/// A failure deletes S at once; a crash leaves it to the recovery at the next open (see
/// `LayerStore+Journal.swift`). Step 3 is `OpenLayer.close`: libext2fs's state is flushed and the
/// pool commits (data synced before the mappings that point at it), so the content is durable
/// before step 4 (a new layer's step 4) says so.
extension LayerStore {
    /// Writes the content of existing layer `id` with `body` as one unit (see above): the layer
    /// has all of what `body` wrote, or, if `body` throws or the process dies, exactly what it
    /// had before. The containerd and Docker front doors' appliers use this too.
    public func writeContent<T>(_ id: String, what: String, _ body: (Volume) throws -> T) throws -> T {
        let (open, busy) = try openScratch(id, what: what)
        // The layer stays busy until its row names the written device or the scratch is gone.
        defer { busy.release() }
        let scratch = open.member.deviceID
        let result: T
        do {
            result = try body(open.volume)
            try indexDirectories(open.volume, of: id)
            try open.close()
        } catch {
            forgetContent(open)
            discardScratch(scratch, of: id, after: error)
            throw error
        }
        do {
            try journaledSwitch(open.layer, to: scratch)
        } catch {
            discardScratch(scratch, of: id, after: error)
            throw error
        }
        logger.info("layer content written", metadata: ["layer": "\(id)", "thin.id": "\(scratch)"])
        return result
    }

    /// Holds `id` busy for writing (refused, as `openLayer` refuses it, if it is not live, has
    /// children or is in use) and opens a scratch snapshot of its device read-write. The volume
    /// is not the layer's registered writer: readers of the layer wait for the write to end, as
    /// other processes do, rather than see partial content.
    private func openScratch(_ id: String, what: String) throws -> (OpenLayer, LayerLock) {
        try requireWritable("opening layer \(id) read-write")
        return try locked {
            let layer = try liveLayer(id)
            if let child = try children(of: id).first { throw Error.parentFrozen(id, child: child.id) }
            if let holder = try busyHolder(id) {
                throw Error.busy(id, holder: "\(holder.description); a read-write open needs it unused")
            }
            // New content replaces the layer's device: not one other hosts read (a shared layer).
            try (pool as? RBDPool)?.checkDeletable(layer.deviceID)
            let busy = try holdBusy(id, what: what, readOnly: false)
            do {
                let scratch = try journaledScratch(of: layer)
                do {
                    let member = try volumes.open(device: scratch, size: layer.size, readOnly: false,
                                                  logger: Logger(label: "thinfs.volume"))
                    return (OpenLayer(layer: layer, member: member, busy: nil, borrowed: false, store: self), busy)
                } catch {
                    discardScratch(scratch, of: id, after: error)
                    throw error
                }
            } catch {
                busy.release()
                throw error
            }
        }
    }

    /// `createImageLayer`, with the new layer's content written by `body` as one unit (see
    /// above): the layer is `applying` from the moment its row exists.
    public func createImageLayer<T>(_ id: String, parent: String?, what: String,
                                    content body: (Volume) throws -> T) throws -> T {
        // Created and opened (busy) under the store's lock: no other writer ever sees it applying and unheld.
        let open = try locked {
            _ = try create(id, parent: parent, kind: .image, size: nil, state: .applying)
            do {
                return try openLayer(id, readOnly: false, what: what, incomplete: true)
            } catch {
                discardIncomplete(id, after: error)
                throw error
            }
        }
        return try fill(open, body)
    }

    private func fill<T>(_ open: OpenLayer, _ body: (Volume) throws -> T) throws -> T {
        let id = open.layer.id
        do {
            let result = try body(open.volume)
            try indexDirectories(open.volume, of: id)
            try open.close()
            try setState(id, .active)
            logger.info("layer content complete", metadata: ["layer": "\(id)"])
            return result
        } catch {
            forgetContent(open)
            discardIncomplete(id, after: error)
            throw error
        }
    }

    /// The content is complete: every directory it grew past one block gets an htree index, so
    /// that kernel ext4 looks names up in it by hash once the layer is kernel-mounted
    /// (Volume+DirectoryIndex.swift). Only grown directories are visited; a failure fails the write.
    private func indexDirectories(_ volume: Volume, of id: String) throws {
        let count = try volume.indexGrownDirectories()
        if count > 0 { logger.debug("indexed directories", metadata: ["layer": "\(id)", "count": "\(count)"]) }
    }

    /// Closes the volume of a write that failed, whose device is discarded next: its grown
    /// directories are not indexed at the close (one may be half indexed, if that is what failed).
    private func forgetContent(_ open: OpenLayer) {
        _ = open.volume.takeGrownDirectories()
        try? open.close()
    }

    func setState(_ id: String, _ state: State) throws {
        try db.execute("UPDATE layers SET state = ? WHERE id = ?", [.text(state.rawValue), .text(id)])
    }

    /// Removes layer `id`, whose content a writer failed to finish. If that fails too, the layer
    /// stays `applying`: unusable, and removed by `layer rm` or the next open.
    private func discardIncomplete(_ id: String, after failure: Swift.Error) {
        do {
            _ = try remove(id)
            logger.warning("removed a layer whose content could not be written",
                           metadata: ["layer": "\(id)", "error": "\(failure)"])
        } catch {
            logger.error("could not remove a layer whose content could not be written; it stays incomplete",
                         metadata: ["layer": "\(id)", "error": "\(failure)", "remove.error": "\(error)"])
        }
    }

    /// `thinfs layer apply-diff`: unpacks a layer tar (plain, gzip or zstd) into layer `id`, all
    /// or nothing: on failure, or if the process is killed, the layer keeps its previous content.
    public func applyDiff(_ id: String, from path: String) throws -> String {
        // Before the layer is opened: a failure inside `writeContent` removes the layer.
        try Self.validate(path, what: "tar path")
        let stats = try writeContent(id, what: "apply-diff") { volume in
            try LayerApplier(volume: volume, logger: logger).apply(path: path)
        }
        return "\(id): \(stats.entries) entries, \(stats.bytes) bytes of file data, \(stats.whiteouts) whiteouts\n"
    }

    /// `thinfs layer diff`: writes layer `id`'s changes against its parent (or the base device)
    /// to `path` as an OCI layer tar with whiteouts. `againstBase` diffs against the base device
    /// (the empty filesystem) whatever the parent: the layer's whole content, as Docker's
    /// graphdriver asks with no parent.
    public func diff(_ id: String, to path: String, againstBase: Bool = false) throws {
        try Self.validate(path, what: "output path")
        try locked {
            let layer = try liveLayer(id)
            let child = try openLayer(id, readOnly: true, what: "diff")
            defer { try? child.close() }
            let parentLayer = try (againstBase ? nil : layer.parent).map { try openLayer($0, readOnly: true, what: "diff of \(id)") }
            defer { try? parentLayer?.close() }
            let base = try parentLayer == nil ? volumes.open(device: self.base.deviceID, size: self.base.size, readOnly: true) : nil
            defer { try? base?.close() }
            let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw ThinPoolError.io(operation: "open", path: path, errno: Errno(rawValue: errno)) }
            defer { Glibc.close(fd) }
            _ = try LayerDiffer(child: child.volume, parent: parentLayer?.volume ?? base?.volume, logger: logger)
                .write(fd: fd, name: path)
        }
    }

    /// `thinfs image import`: one image layer per tar, in order, each named by its chain id, so
    /// a second import of the same image (or one sharing a base) reuses the layers it has.
    /// Returns the top layer's id. A layer whose tar fails to apply is removed again; one an
    /// interrupted import left is removed when the store next opens, so only complete layers are
    /// reused.
    public func importImage(_ path: String, name: String?,
                            progress: ((ImportProgress) -> Void)? = nil) throws -> String {
        try Self.validate(path, what: "image path")
        if let name { try Self.validate(name, what: "image name") }
        let source = try ImageSource(path: path, temporaryDirectory: scratchDirectory)
        var parent: String?
        var done = ImportProgress(layers: source.layers.count)
        let started = Date()
        for entry in source.layers {
            let id = entry.chainID
            let existing = try layer(id)
            if existing?.state == .applying {
                // Another import writes it now (it holds the layer busy), or a writer failed and
                // could not remove it: then it goes now, to be written again.
                try locked {
                    if try busyHolder(id) != nil { throw Error.incomplete(id) }
                    _ = try remove(id)
                }
            }
            if let existing, existing.state != .applying {
                guard existing.state == .active else { throw Error.deleted(id) }
                done.reused += 1
            } else if try adoptShared(id, parent: parent) {
                // Another host imported it into the cluster: used as it is, nothing unpacked.
                done.reused += 1
                done.adopted += 1
            } else {
                // The blob's digest and its DiffID against the config, before anything is written.
                _ = try source.verify(entry)
                try createImageLayer(id, parent: parent, what: "image import") { volume in
                    _ = try LayerApplier(volume: volume, logger: logger).apply(path: entry.path)
                }
                publishShared(id)
            }
            done.layersDone += 1
            done.bytesDone += UInt64((try? FileManager.default.attributesOfItem(atPath: entry.path)[.size] as? NSNumber)??.uint64Value ?? 0)
            done.elapsed = Date().timeIntervalSince(started)
            progress?(done)
            parent = id
        }
        guard let top = parent else { throw Error.unsupported("image \(path) has no layers") }
        if let name {
            try Self.setSetting(db, "image.\(name)", top)
        }
        return top
    }

    public struct ImportProgress: Sendable {
        public var layers: Int
        public var layersDone = 0
        public var reused = 0
        /// Of the reused layers, those another host had imported into the cluster (RBD catalogue).
        public var adopted = 0
        public var bytesDone: UInt64 = 0
        public var elapsed: TimeInterval = 0
        public var rate: Double { elapsed > 0 ? Double(bytesDone) / elapsed : 0 }
    }
}
