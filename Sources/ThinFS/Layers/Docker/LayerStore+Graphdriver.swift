import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// What Docker's graphdriver interface (moby daemon/graphdriver/driver.go `ProtoDriver` and
/// `DiffDriver`) needs from the store beyond `thinfs layer`: the Docker plugin
/// (`ThinFSDocker`) answers each request with one of these.
///
/// Docker's layers map to store layers by id. A layer Docker creates with `Create` is an image
/// layer; one made with `CreateReadWrite` is a container layer, until Docker makes a child of it
/// (the container's `-init` layer is the parent of the container's own layer, and moby's
/// graphtest snapshots read-write layers): then it becomes an image layer, frozen from then on,
/// as `thinfs import-docker` maps an `-init` layer.
extension LayerStore {
    /// `GraphDriver.Create` (`readWrite` false) and `.CreateReadWrite` (true). A `size` grows
    /// the new layer's filesystem (`--storage-opt size=` of `docker run`).
    public func createGraphdriverLayer(_ id: String, parent: String?, readWrite: Bool, size: UInt64?) throws -> Layer {
        try requireWritable("creating layer \(id)")
        return try locked {
            if let parent, let p = try layer(parent), p.state == .active, p.kind == .container {
                // Frozen from now on; `create` refuses it while something writes it.
                if let holder = try busyHolder(parent), !holder.readOnly {
                    throw Error.busy(parent, holder: "\(holder.description); a layer mounted read-write cannot be snapshotted")
                }
                try db.execute("UPDATE layers SET kind = ? WHERE id = ?", [.text(Kind.image.rawValue), .text(parent)])
                logger.info("a container layer became an image layer (it has a child)", metadata: ["layer": "\(parent)", "child": "\(id)"])
            }
            return try create(id, parent: parent, kind: readWrite ? .container : .image, size: size)
        }
    }

    /// One entry of `GraphDriver.Changes`: moby pkg/archive `Change`, whose `Kind` is
    /// `ChangeModify` (0), `ChangeAdd` (1) or `ChangeDelete` (2).
    public struct Change: Codable, Equatable, Sendable {
        public enum Kind: Int, Codable, Sendable {
            case modify = 0, add = 1, delete = 2
        }
        public var path: String
        public var kind: Kind
        public init(path: String, kind: Kind) {
            self.path = path
            self.kind = kind
        }
    }

    /// `GraphDriver.Changes`: what layer `id` changed against its parent (or the base device),
    /// read from the layer's own diff (`diff(_:to:)`), so the two can never disagree. A whiteout
    /// is a deletion; an entry the parent has too is a modification, one it lacks an addition.
    /// Paths are absolute, as moby's `Changes` gives them. The sizes of the regular files added
    /// or modified come with them (`GraphDriver.DiffSize`, moby's `ChangesSize`).
    /// `againstBase`: against the empty filesystem, whatever the parent (Docker's empty `Parent`).
    public func changes(_ id: String, againstBase: Bool = false) throws -> (changes: [Change], size: UInt64) {
        try locked {
            let layer = try liveLayer(id)
            let tar = scratchDirectory + "/changes-\(UUID().uuidString.prefix(8)).tar"
            try FileManager.default.createDirectory(atPath: scratchDirectory, withIntermediateDirectories: true)
            defer { unlink(tar) }
            try diff(id, to: tar, againstBase: againstBase)
            let parent = try (againstBase ? nil : layer.parent).map { try openLayer($0, readOnly: true, what: "changes of \(id)") }
            defer { try? parent?.close() }
            let base = try parent == nil ? volumes.open(device: self.base.deviceID, size: self.base.size, readOnly: true) : nil
            defer { try? base?.close() }
            let volume: Volume = parent?.volume ?? base!.volume
            let reader = try ArchiveReader(path: tar)
            var changes: [Change] = []
            var size: UInt64 = 0
            while let entry = try reader.next() {
                let relative = entry.path.hasPrefix("./") ? String(entry.path.dropFirst(2)) : entry.path
                var components = relative.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
                guard let name = components.last else { continue }
                if name == ".wh..wh..opq" {
                    // An opaque directory: the directory itself was replaced.
                    components.removeLast()
                    changes.append(Change(path: "/" + components.joined(separator: "/"), kind: .modify))
                    continue
                }
                if name.hasPrefix(".wh.") {
                    components[components.count - 1] = String(name.dropFirst(4))
                    changes.append(Change(path: "/" + components.joined(separator: "/"), kind: .delete))
                    continue
                }
                if entry.kind == .regular { size += entry.size }
                let existed = Self.exists(components, in: volume)
                changes.append(Change(path: "/" + components.joined(separator: "/"), kind: existed ? .modify : .add))
            }
            return (changes, size)
        }
    }

    /// Whether `components` names something in `volume` (a failed lookup is "no").
    private static func exists(_ components: [String], in volume: Volume) -> Bool {
        var ino = volume.rootInode
        for name in components {
            guard let attributes = try? volume.lookup(parent: ino, name: name) else { return false }
            ino = attributes.ino
        }
        return true
    }

    /// `GraphDriver.ApplyDiff`: unpacks the layer tar at `path` into layer `id` (all or nothing,
    /// as `applyDiff(_:from:)`) and returns the bytes of file data it held, moby's "size".
    public func applyGraphdriverDiff(_ id: String, from path: String) throws -> UInt64 {
        try Self.validate(path, what: "tar path")
        let stats = try writeContent(id, what: "docker apply-diff") { volume in
            try LayerApplier(volume: volume, logger: logger).apply(path: path)
        }
        return stats.bytes
    }
}
