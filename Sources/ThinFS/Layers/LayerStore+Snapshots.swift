import Foundation
import Logging

/// containerd's snapshots over the layer store, as dockerd's and containerd's devicemapper
/// drivers map them onto thin devices:
///
///     committed snapshot  an image layer (a thin snapshot of its parent's layer)
///     active snapshot     a container layer (read-write), from its parent or the base device
///     view                an image layer (read-only), from its parent or the base device
///
/// A snapshot key is an opaque string of any length (containerd's are like
/// "default/3/sha256:…" or "k8s.io/12/extract-… sha256:…"). It never becomes a path or a layer
/// id: every snapshot gets a generated layer id, and the `snapshots` table of layers.db maps the
/// key to it. The key is stored as the hex of its UTF-8 bytes, because SQLite's text binding (and
/// everything after it) stops at a NUL byte that a key may hold.
extension LayerStore {
    public struct Snapshot: Equatable, Sendable {
        public enum Kind: String, Sendable { case view, active, committed }
        public var key: String
        public var layer: String
        public var parent: String?
        public var kind: Kind
        public var labels: [String: String]
        public var created: Date
        public var updated: Date

        public init(key: String, layer: String, parent: String?, kind: Kind, labels: [String: String], created: Date, updated: Date) {
            self.key = key
            self.layer = layer
            self.parent = parent
            self.kind = kind
            self.labels = labels
            self.created = created
            self.updated = updated
        }
    }

    /// The snapshotter's errors, each with containerd's class (errdefs) in `code`.
    public enum SnapshotError: Swift.Error, CustomStringConvertible, Equatable {
        public enum Code: Sendable { case notFound, alreadyExists, failedPrecondition, invalidArgument }
        case notFound(key: String)
        case alreadyExists(key: String)
        case parentNotCommitted(key: String, parent: String)
        case notActive(key: String, kind: Snapshot.Kind)
        case hasChildren(key: String, children: [String])
        case invalidLabel(key: String, label: String, reason: String)
        case invalidUpdate(key: String, field: String)
        case invalidKey(key: String, reason: String)

        public var code: Code {
            switch self {
            case .notFound: .notFound
            case .alreadyExists: .alreadyExists
            case .notActive, .hasChildren: .failedPrecondition
            case .parentNotCommitted, .invalidLabel, .invalidUpdate, .invalidKey: .invalidArgument
            }
        }

        public var description: String {
            switch self {
            case .notFound(let key): "snapshot \(key.debugDescription) does not exist"
            case .alreadyExists(let key): "snapshot \(key.debugDescription) already exists"
            case .parentNotCommitted(let key, let parent):
                "snapshot \(key.debugDescription): parent \(parent.debugDescription) is not a committed snapshot"
            case .notActive(let key, let kind): "snapshot \(key.debugDescription) is not active (it is \(kind.rawValue))"
            // containerd's own words ("cannot remove snapshot with child"), which its conformance suite looks for.
            case .hasChildren(let key, let children):
                "cannot remove snapshot \(key.debugDescription): it has children: \(children.map(\.debugDescription).joined(separator: ", "))"
            case .invalidLabel(let key, let label, let why): "snapshot \(key.debugDescription): label \(label.debugDescription): \(why)"
            case .invalidUpdate(let key, let field): "snapshot \(key.debugDescription): field \(field.debugDescription) cannot be updated"
            case .invalidKey(let key, let why): "snapshot key \(key.debugDescription): \(why)"
            }
        }
    }

    /// containerd's own limit (labels.Validate): a label's key and value together at most 4096 bytes.
    static let maxLabelBytes = 4096

    static func hex(_ key: String) -> String {
        key.utf8.map { String(format: "%02x", $0) }.joined()
    }

    /// The key `hex` wrote, or nil when `text` is not hex of an even length (a damaged row: disk
    /// data, so it never reaches arithmetic that could trap).
    static func unhex(_ text: String) -> String? {
        let digits = Array(text.utf8)
        guard digits.count % 2 == 0 else { return nil }
        func nibble(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            default: nil
            }
        }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(digits.count / 2)
        for i in stride(from: 0, to: digits.count, by: 2) {
            guard let high = nibble(digits[i]), let low = nibble(digits[i + 1]) else { return nil }
            bytes.append(high << 4 | low)
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// `unhex` of a key column, or the corrupt-database error naming the column.
    private func storedKey(_ text: String?, column: String) throws -> String {
        guard let key = Self.unhex(text ?? "") else {
            throw Error.corruptDatabase(path: Self.databasePath(root), reason: "snapshots.\(column) \((text ?? "").debugDescription) is not a hex-encoded key")
        }
        return key
    }

    static func validateLabels(_ labels: [String: String], key: String) throws {
        for (label, value) in labels {
            guard label.utf8.count + value.utf8.count <= maxLabelBytes else {
                throw SnapshotError.invalidLabel(key: key, label: label, reason: "a label's key and value may have at most \(maxLabelBytes) bytes")
            }
        }
    }

    static func encodeLabels(_ labels: [String: String]) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        return String(decoding: try encoder.encode(labels), as: UTF8.self)
    }

    func decodeSnapshot(_ row: LayerDatabase.Row) throws -> Snapshot {
        let key = try storedKey(row[0].text, column: "key")
        let labelText = row[4].text ?? "{}"
        guard let labels = try? JSONDecoder().decode([String: String].self, from: Data(labelText.utf8)),
              let kind = Snapshot.Kind(rawValue: row[3].text ?? "") else {
            throw Error.corruptDatabase(path: Self.databasePath(root), reason: "snapshot \(key.debugDescription): unreadable row")
        }
        let parent = try row[2].text.map { try storedKey($0, column: "parent") }
        return Snapshot(key: key, layer: row[1].text ?? "", parent: parent, kind: kind, labels: labels,
                        created: Date(timeIntervalSince1970: Double(row[5].integer ?? 0) / 1e9),
                        updated: Date(timeIntervalSince1970: Double(row[6].integer ?? 0) / 1e9))
    }

    static let snapshotColumns = "key, layer, parent, kind, labels, created, updated"

    /// The snapshot `key`, or nil.
    public func snapshot(_ key: String) throws -> Snapshot? {
        try db.query("SELECT \(Self.snapshotColumns) FROM snapshots WHERE key = ?", [.text(Self.hex(key))])
            .first.map(decodeSnapshot)
    }

    /// Every snapshot, oldest first.
    public func allSnapshots() throws -> [Snapshot] {
        try db.query("SELECT \(Self.snapshotColumns) FROM snapshots ORDER BY created, rowid").map(decodeSnapshot)
    }

    /// The keys of the snapshots whose parent is `key`.
    public func snapshotChildren(_ key: String) throws -> [String] {
        try db.query("SELECT key FROM snapshots WHERE parent = ?", [.text(Self.hex(key))]).map { try storedKey($0[0].text, column: "key") }
    }

    /// Prepare (read-write, `.active`) or View (`readOnly`, `.view`): a new layer from `parent`'s (a committed snapshot)
    /// or from the base device.
    public func createSnapshot(_ key: String, parent: String?, readOnly: Bool, labels: [String: String]) throws -> Snapshot {
        try requireWritable("creating snapshot \(key.debugDescription)")
        let kind: Snapshot.Kind = readOnly ? .view : .active
        guard !key.isEmpty else { throw SnapshotError.invalidKey(key: key, reason: "it is empty") }
        try Self.validateLabels(labels, key: key)
        return try locked {
            if try snapshot(key) != nil { throw SnapshotError.alreadyExists(key: key) }
            var parentLayer: String?
            if let parent {
                guard let p = try snapshot(parent) else { throw SnapshotError.notFound(key: parent) }
                guard p.kind == .committed else { throw SnapshotError.parentNotCommitted(key: key, parent: parent) }
                parentLayer = p.layer
            }
            let id = "snap-" + UUID().uuidString.lowercased()
            // The layer is `applying` until the snapshot's row is written, in one transaction
            // with it: a crash in between leaves an incomplete layer, which recovery deletes (as
            // an interrupted import), not a layer no snapshot names.
            let layer = try create(id, parent: parentLayer, kind: kind == .active ? .container : .image, size: nil, state: .applying)
            Self.crashPoint("snapshot.created")
            let now = Date()
            let snapshot = Snapshot(key: key, layer: layer.id, parent: parent, kind: kind, labels: labels, created: now, updated: now)
            do {
                if parent == nil { try removeLostAndFound(layer) }
                try db.transaction {
                    try db.execute("INSERT INTO snapshots(\(Self.snapshotColumns)) VALUES(?, ?, ?, ?, ?, ?, ?)",
                                   [.text(Self.hex(key)), .text(layer.id), parent.map { .text(Self.hex($0)) } ?? .null,
                                    .text(kind.rawValue), .text(try Self.encodeLabels(labels)),
                                    .integer(Self.storedTime(now)), .integer(Self.storedTime(now))])
                    try db.execute("UPDATE layers SET state = 'active' WHERE id = ?", [.text(layer.id)])
                }
            } catch {
                // The layer without its row would be an orphan nobody can name.
                try? journaledDelete(layer)
                throw error
            }
            logger.info("created snapshot", metadata: ["snapshot": "\(key.debugDescription)", "layer": "\(id)", "kind": "\(kind.rawValue)"])
            return snapshot
        }
    }

    /// containerd's snapshotters start a snapshot with no parent empty: its devmapper snapshotter
    /// removes the `lost+found` that mkfs made (snapshotter.go, after `mkfs`), and its
    /// conformance suite compares such a snapshot with an empty directory. The base device keeps
    /// its own (Docker's devicemapper kept it, and `thinfs layer` users see kernel ext4's layout);
    /// e2fsck makes a new one only when it needs it.
    func removeLostAndFound(_ layer: Layer) throws {
        let open = try openLayer(layer.id, readOnly: false, what: "removing lost+found from a new snapshot", incomplete: true)
        do {
            let volume = open.volume
            if (try? volume.lookup(parent: volume.rootInode, name: "lost+found")) != nil {
                try volume.rmdir(parent: volume.rootInode, name: "lost+found")
            }
        } catch {
            try? open.close()
            throw error
        }
        try open.close()
    }

    /// Commit: the active snapshot `key` becomes the committed snapshot `name`, and its layer an
    /// image layer (frozen: nothing may hold it read-write). The layer is kept, not copied; the
    /// new snapshot's labels are `labels`, as containerd's storage does.
    ///
    /// An active snapshot still mounted read-write by this process (the mount outlives its
    /// unmount while a bind mount of it is left: a container's rootfs, or a caller that commits
    /// before it unmounts, as containerd's conformance suite does) is committed as a thin
    /// snapshot of its layer, taken with the volume flushed and held still: the committed
    /// snapshot is what was written up to the commit, later writes through the old mount go
    /// to the old layer, and that layer is deleted once its last user is gone (as containerd's
    /// devmapper snapshotter deactivates a committed device with deferred removal).
    public func commitSnapshot(_ key: String, as name: String, labels: [String: String]) throws -> Snapshot {
        try requireWritable("committing snapshot \(key.debugDescription)")
        guard !name.isEmpty else { throw SnapshotError.invalidKey(key: name, reason: "it is empty") }
        try Self.validateLabels(labels, key: name)
        return try locked {
            guard let active = try snapshot(key) else { throw SnapshotError.notFound(key: key) }
            if try snapshot(name) != nil { throw SnapshotError.alreadyExists(key: name) }
            guard active.kind == .active else { throw SnapshotError.notActive(key: key, kind: active.kind) }
            let now = Date()
            if let holder = try busyHolder(active.layer), !holder.readOnly {
                guard let writer = openWriters[active.layer] else {
                    throw Error.busy(active.layer, holder: "\(holder.description); a snapshot in use read-write by another process cannot be committed")
                }
                return try commitInUse(active, writer: writer, as: name, labels: labels, now: now)
            }
            try db.transaction {
                try db.execute("UPDATE layers SET kind = 'image' WHERE id = ?", [.text(active.layer)])
                try db.execute("UPDATE snapshots SET key = ?, kind = 'committed', labels = ?, created = ?, updated = ? WHERE key = ?",
                               [.text(Self.hex(name)), .text(try Self.encodeLabels(labels)), .integer(Self.storedTime(now)),
                                .integer(Self.storedTime(now)), .text(Self.hex(key))])
            }
            logger.info("committed snapshot", metadata: ["snapshot": "\(key.debugDescription)", "name": "\(name.debugDescription)", "layer": "\(active.layer)"])
            return Snapshot(key: name, layer: active.layer, parent: active.parent, kind: .committed, labels: labels,
                            created: now, updated: now)
        }
    }

    /// Commit of a snapshot whose layer `writer` holds read-write (see `commitSnapshot`).
    private func commitInUse(_ active: Snapshot, writer: OpenLayer, as name: String, labels: [String: String], now: Date) throws -> Snapshot {
        let old = try liveLayer(active.layer)
        let id = "snap-" + UUID().uuidString.lowercased()
        // `applying` until the rows switch, in one transaction: a crash before leaves the active
        // snapshot as it was and an incomplete layer for recovery to delete.
        let layer = try journaledCreate(Layer(id: id, parent: old.parent, deviceID: try allocateDeviceID(), kind: .image, size: old.size,
                                              state: .applying, uuid: old.uuid, created: now),
                                        origin: old.deviceID, holdingStill: writer.volume)
        // The mount's grown directories, taken after the snapshot (a superset of those grown
        // before it), are indexed in the committed copy; the old layer is deleted once free, so
        // its own close has nothing to index. Back to the writer if the commit fails.
        let grown = writer.volume.takeGrownDirectories()
        do {
            try indexGrownDirectories(grown, in: layer)
            try db.transaction {
                try db.execute("UPDATE layers SET state = 'active' WHERE id = ?", [.text(layer.id)])
                try db.execute("UPDATE layers SET state = 'deleted' WHERE id = ?", [.text(old.id)])
                try db.execute("UPDATE snapshots SET key = ?, layer = ?, kind = 'committed', labels = ?, created = ?, updated = ? WHERE key = ?",
                               [.text(Self.hex(name)), .text(layer.id), .text(try Self.encodeLabels(labels)), .integer(Self.storedTime(now)),
                                .integer(Self.storedTime(now)), .text(Self.hex(active.key))])
            }
        } catch {
            writer.volume.addGrownDirectories(grown)
            try? journaledDelete(layer)
            throw error
        }
        logger.info("committed a snapshot in use as a thin snapshot of its layer; the layer goes once free",
                    metadata: ["snapshot": "\(active.key.debugDescription)", "name": "\(name.debugDescription)",
                               "layer": "\(layer.id)", "was": "\(old.id)"])
        return Snapshot(key: name, layer: layer.id, parent: active.parent, kind: .committed, labels: labels, created: now, updated: now)
    }

    /// Indexes directories `dirs` (grown through the mount of the layer `layer` is a snapshot
    /// of) in the still `applying` layer `layer`: opened read-write, and indexed as it closes
    /// (`Volume.close`). A failure fails the commit, which deletes `layer`.
    private func indexGrownDirectories(_ dirs: Set<UInt64>, in layer: Layer) throws {
        guard !dirs.isEmpty else { return }
        let open = try openLayer(layer.id, readOnly: false, what: "indexing the directories of a committed snapshot", incomplete: true)
        open.volume.addGrownDirectories(dirs)
        try open.close()
    }

    /// Remove: refused while other snapshots name it as parent. A busy layer follows
    /// dm.use_deferred_deletion (`remove(_:)`): with it, the snapshot is gone at once and its
    /// layer once free; without it, nothing changes and the busy error says who holds it.
    @discardableResult
    public func removeSnapshot(_ key: String) throws -> Removal {
        try requireWritable("removing snapshot \(key.debugDescription)")
        return try locked {
            guard let snapshot = try snapshot(key) else { throw SnapshotError.notFound(key: key) }
            let children = try snapshotChildren(key)
            guard children.isEmpty else { throw SnapshotError.hasChildren(key: key, children: children) }
            let removal: Removal
            if try layer(snapshot.layer) != nil {
                removal = try remove(snapshot.layer)
            } else {
                removal = .deleted
            }
            try db.execute("DELETE FROM snapshots WHERE key = ?", [.text(Self.hex(key))])
            logger.info("removed snapshot", metadata: ["snapshot": "\(key.debugDescription)", "layer": "\(snapshot.layer)"])
            return removal
        }
    }

    /// Update: only labels change. `fields` are containerd's field paths: "labels" replaces them
    /// all, "labels.K" sets (or, with an empty value, removes) one; none replaces them all.
    public func updateSnapshot(_ key: String, labels: [String: String], fields: [String]) throws -> Snapshot {
        try requireWritable("updating snapshot \(key.debugDescription)")
        return try locked {
            guard var snapshot = try snapshot(key) else { throw SnapshotError.notFound(key: key) }
            var updated = snapshot.labels
            if fields.isEmpty {
                updated = labels
            } else {
                for field in fields {
                    if field == "labels" {
                        updated = labels
                    } else if field.hasPrefix("labels.") {
                        let label = String(field.dropFirst("labels.".count))
                        updated[label] = labels[label]
                    } else {
                        throw SnapshotError.invalidUpdate(key: key, field: field)
                    }
                }
            }
            updated = updated.filter { !$0.value.isEmpty }
            try Self.validateLabels(updated, key: key)
            snapshot.labels = updated
            snapshot.updated = Date()
            try db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE key = ?",
                           [.text(try Self.encodeLabels(updated)), .integer(Self.storedTime(snapshot.updated)), .text(Self.hex(key))])
            return snapshot
        }
    }

    /// Usage: the bytes this snapshot's layer maps that its parent's (or the base device) does
    /// not: what it adds, as containerd means a snapshot's usage. Plain exclusivity (blocks no
    /// other device maps) would not do: a committed snapshot's blocks become shared, and its
    /// usage 0, the moment a child is prepared from it.
    public func snapshotUsage(_ key: String) throws -> UInt64 {
        try locked {
            guard let snapshot = try snapshot(key) else { throw SnapshotError.notFound(key: key) }
            guard let layer = try layer(snapshot.layer) else { return 0 }
            let origin = try layer.parent.flatMap { try self.layer($0)?.deviceID } ?? base.deviceID
            let blockSize = try pool.status().dataBlockSize
            let blocks = try pool.mappedDataBlocks()
            let inherited = Set(blocks[origin] ?? [])
            let own = (blocks[layer.deviceID] ?? []).count { !inherited.contains($0) }
            return UInt64(own) * blockSize
        }
    }
}
