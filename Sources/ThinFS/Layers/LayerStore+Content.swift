import Foundation
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Layer content: apply-diff, diff and image import, through the Volume API with no mount.
extension LayerStore {
    /// `thinfs layer apply-diff`: unpacks a layer tar (plain, gzip or zstd) into layer `id`.
    public func applyDiff(_ id: String, from path: String) throws -> String {
        let open = try openLayer(id, readOnly: false, what: "apply-diff")
        let stats: LayerApplier.Statistics
        do {
            stats = try LayerApplier(volume: open.volume, logger: logger).apply(path: path)
        } catch {
            try? open.close()
            throw error
        }
        try open.close()
        return "\(id): \(stats.entries) entries, \(stats.bytes) bytes of file data, \(stats.whiteouts) whiteouts\n"
    }

    /// `thinfs layer diff`: writes layer `id`'s changes against its parent (or the base device)
    /// to `path` as an OCI layer tar with whiteouts.
    public func diff(_ id: String, to path: String) throws {
        try locked {
            let layer = try liveLayer(id)
            let child = try openLayer(id, readOnly: true, what: "diff")
            defer { try? child.close() }
            let parentLayer = try layer.parent.map { try openLayer($0, readOnly: true, what: "diff of \(id)") }
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
    /// Returns the top layer's id. A layer whose tar fails to apply is removed again.
    public func importImage(_ path: String, name: String?,
                            progress: ((ImportProgress) -> Void)? = nil) throws -> String {
        let source = try ImageSource(path: path, temporaryDirectory: scratchDirectory)
        var parent: String?
        var done = ImportProgress(layers: source.layers.count)
        let started = Date()
        for entry in source.layers {
            let id = entry.chainID
            if let existing = try layer(id) {
                guard existing.state == .active else { throw Error.deleted(id) }
                done.reused += 1
            } else {
                // The blob's digest and its DiffID against the config, before anything is written.
                _ = try source.verify(entry)
                _ = try createImageLayer(id, parent: parent)
                do {
                    _ = try applyDiff(id, from: entry.path)
                } catch {
                    _ = try? remove(id)
                    throw error
                }
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
        public var bytesDone: UInt64 = 0
        public var elapsed: TimeInterval = 0
        public var rate: Double { elapsed > 0 ? Double(bytesDone) / elapsed : 0 }
    }
}
