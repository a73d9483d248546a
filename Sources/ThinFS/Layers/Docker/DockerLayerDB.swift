import Foundation

/// Docker's layer database for the devicemapper driver, which names each device: image layers by
/// chain id with their parents, containers by container id. Optional: without it, layers are
/// named by their device hashes. Read only. (moby `layer/filestore.go`: one small text file per field.)
///
///     DOCKERROOT/image/devicemapper/layerdb/       DOCKERROOT = DOCKERDM/..
///     ├── sha256/<chain id hex>/
///     │   ├── cache-id        the device hash: metadata/<cache-id> (text, no newline)
///     │   ├── parent          "sha256:<parent chain id hex>"; absent for a bottom layer
///     │   └── diff, size, tar-split.json.gz
///     └── mounts/<container id>/
///         ├── mount-id        the container's device hash
///         ├── init-id         its init layer's device hash ("<mount-id>-init"), if it has one
///         └── parent          "sha256:<chain id hex>" of the image's top layer
///
/// A container's devices stack as image top ◀─ init ◀─ container: moby's `CreateRWLayer` snapshots
/// the image's top layer into `<mount-id>-init`, writes the init files, then snapshots that.
public struct DockerLayerDB: Sendable {
    /// What the database says about one device.
    public struct Entry: Equatable, Sendable {
        /// The layer id to use: `sha256:<chain id>`, `<container id>-init` or `<container id>`.
        public var id: String
        /// The parent layer's id, in the same naming; nil for a bottom layer (a snapshot of the base).
        public var parent: String?
        public var kind: LayerStore.Kind
        /// The directory it came from.
        public var source: String
    }

    public let path: String
    /// By device hash (the `metadata/<hash>` file name).
    public let entries: [String: Entry]
    /// Directories that could not be used, each with the reason (reported, never fatal: the
    /// device keeps its hash as its name).
    public let problems: [String]

    /// Where the database of the Docker whose devicemapper directory is `deviceSetRoot` lives.
    public static func path(forDeviceSet deviceSetRoot: String) -> String {
        URL(fileURLWithPath: deviceSetRoot).standardizedFileURL.deletingLastPathComponent().path + "/image/devicemapper/layerdb"
    }

    /// Reads the database at `path`; nil if there is none.
    public init?(path: String) {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path + "/sha256", isDirectory: &isDirectory), isDirectory.boolValue else {
            return nil
        }
        self.path = path
        var entries: [String: Entry] = [:]
        var problems: [String] = []
        func add(_ hash: String, _ entry: Entry) {
            if let other = entries[hash] {
                problems.append("\(entry.source) and \(other.source) both name device \(hash); keeping \(other.id)")
            } else {
                entries[hash] = entry
            }
        }
        for name in Self.list(path + "/sha256") {
            let dir = path + "/sha256/" + name
            guard name.count == 64, name.allSatisfy(\.isHexDigit) else {
                problems.append("\(dir): not a sha256 chain id; ignored")
                continue
            }
            guard let cacheID = Self.field(dir, "cache-id") else {
                problems.append("\(dir): no cache-id; ignored")
                continue
            }
            add(cacheID, Entry(id: "sha256:" + name, parent: Self.field(dir, "parent"), kind: .image, source: dir))
        }
        for container in Self.list(path + "/mounts") {
            let dir = path + "/mounts/" + container
            guard let mountID = Self.field(dir, "mount-id") else {
                problems.append("\(dir): no mount-id; ignored")
                continue
            }
            let image = Self.field(dir, "parent")
            var parent = image
            if let initID = Self.field(dir, "init-id") {
                add(initID, Entry(id: container + "-init", parent: image, kind: .image, source: dir))
                parent = container + "-init"
            }
            add(mountID, Entry(id: container, parent: parent, kind: .container, source: dir))
        }
        self.entries = entries
        self.problems = problems
    }

    private static func list(_ dir: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { !$0.hasPrefix(".") }.sorted()
    }

    /// One field file's text, trimmed; nil if absent or empty.
    private static func field(_ dir: String, _ name: String) -> String? {
        guard let data = FileManager.default.contents(atPath: dir + "/" + name) else { return nil }
        let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        return text.isEmpty ? nil : text
    }
}
