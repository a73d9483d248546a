import Foundation
import Logging
import SystemPackage

/// What went through a layer tar: by an apply (headers read, file bytes written to the
/// volume) or a diff (headers and file bytes written to the tar).
public struct LayerTarStatistics: Equatable, Sendable {
    /// Tar headers, whiteouts included.
    public var entries = 0
    /// Regular-file data bytes.
    public var bytes: UInt64 = 0
    public var whiteouts = 0
    public init() {}
}

/// Applies an OCI layer tar (plain, gzip or zstd) to a `FileSystemVolume`
/// holding a snapshot of the layer's parent, through the Volume API: no mount.
///
/// ## Semantics (containerd's and moby's unpacking onto a snapshot)
/// - An entry over an existing non-directory replaces it; an existing
///   directory under a directory entry is kept and its metadata (mode, owner,
///   mtime and xattrs, which are replaced as a set, as overlayfs shows an upper
///   directory's) is updated; an existing directory under a non-directory entry
///   is removed with its contents.
/// - Missing parent directories are created 0755 root:root.
/// - Directory mtimes are restored after all entries are written, since
///   creating children changes them.
/// - `.wh.NAME` removes NAME (recursively), and `.wh..wh..opq` removes everything
///   in its directory that existed before this tar: entries the same tar
///   writes are kept, whatever their order (OCI image spec, "Whiteouts").
///   Other `.wh..wh.` names (aufs bookkeeping) are skipped. The root's
///   `lost+found` belongs to the filesystem, not to a layer: an opaque root keeps it.
/// - Hard links whose target comes from a lower layer are made, as containerd does.
/// - Regular-file data is written chunk by chunk; all-zero chunks are left as
///   holes, then the size is set, so sparse files stay sparse.
///
/// ## Hostile archives
/// Nothing is ever written outside the volume: the applier has no host path
/// at all, and every path component is looked up inside the volume. The
/// policy per case:
/// - **Absolute names** (`/etc/passwd`) are *confined*: the leading slashes
///   are dropped, as GNU tar and containerd do, so they land under the root.
/// - **`..` components** anywhere in a name or hard-link target are *rejected*:
///   the apply stops with `Error.hostileEntry` naming the entry.
/// - **A symlink as an intermediate component** (`evil -> /etc`, then
///   `evil/passwd`) is *rejected*: symlinks are never followed while
///   resolving a path, wherever they point. A symlink in the last component
///   is replaced, never written through.
/// - **Hard links** resolve their target the same way: a target with `..`, a
///   symlink on the way, a directory, or a missing target is *rejected*. An
///   absolute target is confined like a name.
/// - A non-directory where a parent directory should be is rejected too.
/// A rejected entry ends the apply; entries before it stay written (the
/// layer store applies into a fresh snapshot and deletes it on failure).
/// A damaged or truncated archive ends it too, with the reader's `ArchiveError`
/// (which names the archive and the entry).
public struct LayerApplier: Sendable {
    public typealias Statistics = LayerTarStatistics

    public enum Error: Swift.Error, CustomStringConvertible, Sendable {
        /// A name or link the policy refuses (see the type's documentation).
        case hostileEntry(entry: String, reason: String)
        /// The entry cannot be applied (a missing hard-link target, a file where a directory must be, ...).
        case badEntry(entry: String, reason: String)
        /// The volume refused an operation for this entry.
        case volume(entry: String, VolumeError)

        public var description: String {
            switch self {
            case .hostileEntry(let e, let r): return "refused layer entry '\(e)': \(r)"
            case .badEntry(let e, let r): return "cannot apply layer entry '\(e)': \(r)"
            case .volume(let e, let v): return "applying layer entry '\(e)': \(v)"
            }
        }
    }

    static let whiteoutPrefix = ".wh."
    static let opaqueMarker = ".wh..wh..opq"
    static let whiteoutMetaPrefix = ".wh..wh."

    public let volume: FileSystemVolume
    let logger: Logger

    public init(volume: FileSystemVolume, logger: Logger = Logger(label: "thinfs.layer.apply")) {
        self.volume = volume
        self.logger = logger
    }

    /// Applies the tar (tar, tar.gz, tar.zst) at `path`.
    @discardableResult
    public func apply(path: String) throws -> Statistics {
        try apply(reader: ArchiveReader(path: path))
    }

    /// Applies the tar read from `fd` (for example stdin); `name` is for errors.
    @discardableResult
    public func apply(fd: Int32, name: String) throws -> Statistics {
        try apply(reader: ArchiveReader(fd: fd, name: name))
    }

    @discardableResult
    public func apply(reader: ArchiveReader) throws -> Statistics {
        var run = Run(volume: volume, logger: logger)
        while let entry = try reader.next() {
            try run.apply(entry, reader: reader)
        }
        try run.finish()
        logger.info("layer applied", metadata: ["layer.archive": "\(reader.name)", "layer.entries": "\(run.stats.entries)",
                                                "layer.bytes": "\(run.stats.bytes)"])
        return run.stats
    }

    /// Splits a tar name into components: leading "/" and "." components dropped (confined), ".." rejected.
    static func components(_ name: String, entry: String) throws(Error) -> [String] {
        var parts: [String] = []
        for part in name.split(separator: "/", omittingEmptySubsequences: true) {
            if part == "." { continue }
            if part == ".." { throw .hostileEntry(entry: entry, reason: "the name has a '..' component") }
            parts.append(String(part))
        }
        return parts
    }

    /// One apply: what this tar has written so far, and the directory times to restore.
    struct Run {
        let volume: FileSystemVolume
        let logger: Logger
        var stats = Statistics()
        /// Paths ("a/b") this tar wrote or created, for the opaque and whiteout rules.
        var unpacked: Set<String> = []
        /// Directory path → (inode, mtime) to set once every entry is written.
        var directoryTimes: [String: (UInt64, Timestamp)] = [:]

        init(volume: FileSystemVolume, logger: Logger) {
            self.volume = volume
            self.logger = logger
        }

        private func attempt<T>(_ entry: String, _ body: () throws(VolumeError) -> T) throws(Error) -> T {
            do { return try body() } catch { throw .volume(entry: entry, error) }
        }

        /// nil when `name` is not in `parent`.
        private func find(_ parent: UInt64, _ name: String, entry: String) throws(Error) -> FileAttributes? {
            do {
                return try volume.lookup(parent: parent, name: name)
            } catch where error.errno == .noSuchFileOrDirectory {
                return nil
            } catch {
                throw .volume(entry: entry, error)
            }
        }

        /// Walks `components` from the root, never following a symlink. With `create`, missing directories
        /// are made 0755 root:root; without, a missing component gives nil.
        mutating func resolveDirectory(_ components: ArraySlice<String>, entry: String, create: Bool) throws(Error) -> UInt64? {
            var ino = volume.rootInode
            var path = ""
            for name in components {
                path = path.isEmpty ? name : path + "/" + name
                if let a = try find(ino, name, entry: entry) {
                    if a.isSymlink {
                        throw .hostileEntry(entry: entry, reason: "path component '\(path)' is a symbolic link, which is never followed")
                    }
                    guard a.isDirectory else { throw .badEntry(entry: entry, reason: "path component '\(path)' is not a directory") }
                    ino = a.ino
                } else if create {
                    let parent = ino
                    let made = try attempt(entry) { () throws(VolumeError) in
                        try volume.mkdir(parent: parent, name: name, mode: 0o755, owner: .root)
                    }
                    unpacked.insert(path)
                    ino = made.ino
                } else {
                    return nil
                }
            }
            return ino
        }

        mutating func apply(_ entry: ArchiveEntry, reader: ArchiveReader) throws {
            stats.entries += 1
            let parts = try LayerApplier.components(entry.path, entry: entry.path)
            guard let base = parts.last else {
                // The root itself ("./", "/"): only its metadata can change.
                guard entry.kind == .directory else { throw Error.hostileEntry(entry: entry.path, reason: "names the root but is not a directory") }
                let root = try attempt(entry.path) { () throws(VolumeError) in try volume.getattr(volume.rootInode) }
                try setMetadata(root, entry, replaceXattrs: true)
                directoryTimes[""] = (root.ino, entry.mtime)
                return
            }
            let path = parts.joined(separator: "/")
            if base.hasPrefix(LayerApplier.whiteoutPrefix) {
                try whiteout(parts, base: base, entry: entry.path)
                return
            }
            guard let parent = try resolveDirectory(parts.dropLast(), entry: entry.path, create: true) else { return }

            // A hard link's target is resolved before anything at the link's own name is removed.
            var linkTarget: FileAttributes?
            if entry.kind == .hardlink {
                linkTarget = try resolveLinkTarget(entry)
            }
            if let existing = try find(parent, base, entry: entry.path) {
                if existing.isDirectory && entry.kind == .directory {
                    try setMetadata(existing, entry, replaceXattrs: true)
                    directoryTimes[path] = (existing.ino, entry.mtime)
                    unpacked.insert(path)
                    return
                }
                if let linkTarget, linkTarget.ino == existing.ino {
                    unpacked.insert(path)
                    return
                }
                try removeTree(parent, base, existing, entry: entry.path)
            }
            let made = try create(entry, parent: parent, name: base, linkTarget: linkTarget, reader: reader)
            if entry.kind == .directory { directoryTimes[path] = (made.ino, entry.mtime) }
            unpacked.insert(path)
        }

        private mutating func resolveLinkTarget(_ entry: ArchiveEntry) throws(Error) -> FileAttributes {
            let target = entry.hardlinkTarget ?? ""
            let parts: [String]
            do { parts = try LayerApplier.components(target, entry: entry.path) } catch {
                throw .hostileEntry(entry: entry.path, reason: "hard-link target '\(target)' has a '..' component")
            }
            guard let last = parts.last else { throw .hostileEntry(entry: entry.path, reason: "hard link to the root directory") }
            let dir: UInt64?
            do {
                dir = try resolveDirectory(parts.dropLast(), entry: entry.path, create: false)
            } catch .hostileEntry(_, let reason) {
                throw .hostileEntry(entry: entry.path, reason: "hard-link target '\(target)': \(reason)")
            }
            guard let dir, let a = try find(dir, last, entry: entry.path) else {
                throw .badEntry(entry: entry.path, reason: "hard-link target '\(target)' does not exist")
            }
            guard !a.isDirectory else { throw .hostileEntry(entry: entry.path, reason: "hard-link target '\(target)' is a directory") }
            return a
        }

        private mutating func create(_ entry: ArchiveEntry, parent: UInt64, name: String, linkTarget: FileAttributes?,
                                     reader: ArchiveReader) throws -> FileAttributes {
            let owner = Owner(uid: entry.uid, gid: entry.gid)
            let made: FileAttributes = try attempt(entry.path) { () throws(VolumeError) in
                switch entry.kind {
                case .directory:
                    return try volume.mkdir(parent: parent, name: name, mode: entry.permissions, owner: owner)
                case .symlink:
                    return try volume.symlink(parent: parent, name: name, target: entry.symlinkTarget ?? "", owner: owner)
                case .hardlink:
                    return try volume.link(linkTarget!.ino, newParent: parent, newName: name)
                case .characterDevice, .blockDevice:
                    return try volume.mknod(parent: parent, name: name, mode: entry.typeBits | entry.permissions,
                                            rdev: Volume.makedev(major: entry.deviceMajor, minor: entry.deviceMinor), owner: owner)
                case .regular, .fifo, .socket:
                    return try volume.mknod(parent: parent, name: name, mode: entry.typeBits | entry.permissions, rdev: 0, owner: owner)
                }
            }
            if entry.kind == .hardlink { return made }
            if entry.kind == .regular {
                var offset: UInt64 = 0
                try reader.readData { chunk in
                    // Runs of non-zero 4 KiB blocks (aligned to the file offset) are written; zero blocks stay holes.
                    var i = 0
                    while i < chunk.count {
                        var start = i
                        while start < chunk.count, Self.isZero(Self.block(chunk, from: start, fileOffset: offset)) {
                            start += Self.block(chunk, from: start, fileOffset: offset).count
                        }
                        var end = start
                        while end < chunk.count, !Self.isZero(Self.block(chunk, from: end, fileOffset: offset)) {
                            end += Self.block(chunk, from: end, fileOffset: offset).count
                        }
                        if end > start {
                            let run = UnsafeRawBufferPointer(rebasing: chunk[start..<end]), at = offset + UInt64(start)
                            _ = try attempt(entry.path) { () throws(VolumeError) in try volume.write(made.ino, at: at, from: run) }
                        }
                        i = end
                    }
                    offset += UInt64(chunk.count)
                }
                if offset > 0 {
                    // Trailing zero chunks were skipped: the size says where the file ends.
                    let end = offset
                    _ = try attempt(entry.path) { () throws(VolumeError) in try volume.setattr(made.ino, AttributeChanges(size: end)) }
                }
                stats.bytes += offset
            }
            try setMetadata(made, entry, replaceXattrs: false)
            return made
        }

        /// Owner, mode, xattrs and times from the header. Symlink permissions stay 0777, as on Linux.
        private func setMetadata(_ a: FileAttributes, _ entry: ArchiveEntry, replaceXattrs: Bool) throws(Error) {
            let ino = a.ino
            if replaceXattrs {
                let wanted = Set(entry.xattrs.map(\.name))
                for name in try attempt(entry.path, { () throws(VolumeError) in try volume.listxattr(ino) }) where !wanted.contains(name) {
                    try attempt(entry.path) { () throws(VolumeError) in try volume.removexattr(ino, name: name) }
                }
            }
            for x in entry.xattrs {
                try attempt(entry.path) { () throws(VolumeError) in try volume.setxattr(ino, name: x.name, value: x.value, flags: []) }
            }
            let changes = AttributeChanges(mode: a.isSymlink ? nil : entry.permissions, uid: entry.uid, gid: entry.gid,
                                           atime: .set(entry.mtime), mtime: .set(entry.mtime))
            _ = try attempt(entry.path) { () throws(VolumeError) in try volume.setattr(ino, changes) }
        }

        private mutating func whiteout(_ parts: [String], base: String, entry: String) throws(Error) {
            stats.whiteouts += 1
            let dirParts = parts.dropLast()
            let dirPath = dirParts.joined(separator: "/")
            if base == LayerApplier.opaqueMarker {
                guard let dir = try resolveDirectory(dirParts, entry: entry, create: true) else { return }
                try removeLower(dir, path: dirPath, entry: entry)
                return
            }
            if base.hasPrefix(LayerApplier.whiteoutMetaPrefix) {
                logger.debug("skipping whiteout metadata entry", metadata: ["layer.entry": "\(entry)"])
                return
            }
            let name = String(base.dropFirst(LayerApplier.whiteoutPrefix.count))
            guard !name.isEmpty, name != ".", name != ".." else {
                throw .hostileEntry(entry: entry, reason: "whiteout of '\(name)'")
            }
            let path = dirPath.isEmpty ? name : dirPath + "/" + name
            // A whiteout hides lower layers only: what this tar wrote stays.
            guard !unpacked.contains(path) else { return }
            guard let dir = try resolveDirectory(dirParts, entry: entry, create: false),
                  let victim = try find(dir, name, entry: entry) else { return }
            try removeTree(dir, name, victim, entry: entry)
        }

        /// Removes what `dir` held before this tar, keeping what the tar wrote (and descending into it).
        private mutating func removeLower(_ dir: UInt64, path: String, entry: String) throws(Error) {
            for child in try children(dir, entry: entry) {
                let childPath = path.isEmpty ? child.name : path + "/" + child.name
                if path.isEmpty && child.name == "lost+found" { continue }
                if unpacked.contains(childPath) {
                    if child.type == 0o040000 { try removeLower(child.ino, path: childPath, entry: entry) }
                    continue
                }
                let a = try attempt(entry) { () throws(VolumeError) in try volume.lookup(parent: dir, name: child.name) }
                try removeTree(dir, child.name, a, entry: entry)
            }
        }

        private func children(_ dir: UInt64, entry: String) throws(Error) -> [DirectoryEntry] {
            var list: [DirectoryEntry] = []
            try attempt(entry) { () throws(VolumeError) in
                try volume.readdir(dir, after: 0) { e in
                    if e.name != "." && e.name != ".." { list.append(e) }
                    return true
                }
            }
            return list
        }

        /// Removes `name` from `parent`, with everything under it when it is a directory.
        private func removeTree(_ parent: UInt64, _ name: String, _ a: FileAttributes, entry: String) throws(Error) {
            if a.isDirectory {
                for child in try children(a.ino, entry: entry) {
                    let c = try attempt(entry) { () throws(VolumeError) in try volume.lookup(parent: a.ino, name: child.name) }
                    try removeTree(a.ino, child.name, c, entry: entry)
                }
                try attempt(entry) { () throws(VolumeError) in try volume.rmdir(parent: parent, name: name) }
            } else {
                try attempt(entry) { () throws(VolumeError) in try volume.unlink(parent: parent, name: name) }
            }
        }

        /// Restores directory mtimes, deepest first, for directories still where the tar put them.
        mutating func finish() throws(Error) {
            for (path, (ino, mtime)) in directoryTimes.sorted(by: { $0.key.count > $1.key.count }) {
                let parts = path.isEmpty ? [] : path.split(separator: "/").map(String.init)
                guard let current = try resolveDirectory(parts[...], entry: path, create: false), current == ino else { continue }
                _ = try attempt(path) { () throws(VolumeError) in
                    try volume.setattr(ino, AttributeChanges(atime: .set(mtime), mtime: .set(mtime)))
                }
            }
        }

        /// The bytes of `chunk` from `index` to the next 4 KiB boundary of the file (or the chunk's end).
        static func block(_ chunk: UnsafeRawBufferPointer, from index: Int, fileOffset: UInt64) -> UnsafeRawBufferPointer {
            let position = fileOffset + UInt64(index)
            let next = Int((position / 4096 + 1) * 4096 - fileOffset)
            return UnsafeRawBufferPointer(rebasing: chunk[index..<min(next, chunk.count)])
        }

        static func isZero(_ chunk: UnsafeRawBufferPointer) -> Bool {
            // A word at a time: chunks are up to 1 MiB.
            let words = chunk.count / 8
            for i in 0..<words where chunk.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != 0 { return false }
            for i in (words * 8)..<chunk.count where chunk[i] != 0 { return false }
            return true
        }
    }
}
