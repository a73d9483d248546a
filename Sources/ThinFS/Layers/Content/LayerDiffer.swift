import Foundation
import Logging
import SystemPackage

/// Writes an OCI layer tar of a child volume's changes against its parent
/// volume (nil: the whole child tree), with whiteouts for deletions.
///
/// ## Change detection
/// Both trees are walked by name, so the result is exact whatever happened in
/// the child (renames, inode reuse, a directory removed and made again). For a
/// name present in both:
/// - a different type, mode, owner, rdev, size or mtime is a change;
/// - the same inode number, generation and ctime (to the nanosecond) mean the
///   inode is the very one the snapshot shares with the parent and was never
///   touched since: unchanged, with no further reads (every change through
///   the Volume moves ctime);
/// - otherwise xattrs, the symlink target and, for regular files, the bytes
///   are compared; equal means unchanged (a `chmod` and back, `touch -d` of
///   the old time after identical rewrites).
/// Directories compare metadata (mode, owner, mtime, xattrs) and are always
/// descended into: an in-place file change does not reach its ancestors.
///
/// ## What is written
/// - Every changed entry, and every ancestor directory of a change with its
///   current metadata (as moby does), so an apply restores their mtimes too.
///   The root is written as "./".
/// - `.wh.NAME` for each name the parent has and the child lacks.
/// - A directory whose inode differs from the parent's (removed and made
///   again) is written opaque (`.wh..wh..opq`) with all its contents, instead
///   of a whiteout per old name.
/// - Hard links: when any name of a multiply-linked inode is in the diff,
///   every name of it in the child is, the first (in tar order) as the file and
///   the others as tar hard links to it, so link identity survives the apply.
/// - The root's `lost+found` belongs to the filesystem, not to a layer: it is
///   neither written nor whited out.
/// - Unix sockets are left out, with a warning naming each: no tar type holds
///   one (libarchive refuses them, Go's archive/tar too), and one left behind
///   by a daemon killed mid-run must not fail the diff. moby's ExportChanges
///   leaves them out the same way (moby/go-archive changes.go: addTarFile's
///   error is logged and the walk goes on). Where the parent has something
///   else under a socket's name, that is whited out: the child no longer has it.
/// Entries are in depth-first order, sorted by name bytes, directories before
/// their contents, so the output is deterministic.
///
/// ## Names are bytes
/// Paths are compared, hashed and sorted by their UTF-8 bytes (`ByteName`), never
/// with String equality, under which "café" composed (NFC) and decomposed (NFD)
/// are one name while ext4 and tar hold two. The Volume API's names are
/// Strings, which cannot hold bytes that are not UTF-8 (ext4 allows any byte but
/// '/' and NUL; the Volume decodes them as U+FFFD): such a name or symlink target
/// ends the diff with `Error.notUTF8` naming it, rather than being written as
/// another name.
public struct LayerDiffer: Sendable {
    public typealias Statistics = LayerTarStatistics

    public enum Error: Swift.Error, CustomStringConvertible, Sendable {
        /// A volume call failed on `path` ("child" or "parent" says which tree).
        case volume(tree: String, path: String, VolumeError)
        /// A file changed size while it was being read.
        case changedDuringDiff(path: String)
        /// A name (or a symlink's target) on the volume is not UTF-8, which the Volume API cannot carry;
        /// `path` shows U+FFFD for the bytes it could not decode.
        case notUTF8(tree: String, path: String, what: String)

        public var description: String {
            switch self {
            case .volume(let t, let p, let e): return "diff: reading '\(p)' in the \(t): \(e)"
            case .changedDuringDiff(let p): return "diff: '\(p)' changed while it was being read"
            case .notUTF8(let t, let p, let w):
                return "diff: '\(p)' in the \(t): its \(w) is not valid UTF-8 (shown with U+FFFD), which the volume API cannot "
                    + "read back; rename it to UTF-8 to diff this layer"
            }
        }
    }

    public let child: FileSystemVolume
    public let parent: FileSystemVolume?
    let logger: Logger

    public init(child: FileSystemVolume, parent: FileSystemVolume?, logger: Logger = Logger(label: "thinfs.layer.diff")) {
        self.child = child
        self.parent = parent
        self.logger = logger
    }

    /// Writes the diff as a tar to `fd`; `name` is for errors.
    @discardableResult
    public func write(fd: Int32, name: String? = nil) throws -> Statistics {
        let writer = try ArchiveWriter(fd: fd, name: name)
        let stats = try write(to: writer)
        try writer.finish()
        return stats
    }

    /// Writes the diff's entries to `writer` (the caller finishes it).
    @discardableResult
    public func write(to writer: ArchiveWriter) throws -> Statistics {
        var plan = Plan()
        let root = try read(child, "child", "", { () throws(VolumeError) in try child.getattr(child.rootInode) })
        if let parent {
            let old = try read(parent, "parent", "", { () throws(VolumeError) in try parent.getattr(parent.rootInode) })
            if try !sameDirectory(root, old, "") { plan.changed.insert(ByteName("")) }
        } else {
            plan.changed.insert(ByteName(""))
        }
        try compare(&plan, path: "", child: child.rootInode, parent: parent?.rootInode, addAll: parent == nil)
        plan.closeOverLinks()
        let emitter = Emitter(volume: child, plan: plan, writer: writer)
        if !plan.needed.isEmpty { try emitter.emit(path: "", attributes: root) }
        logger.info("layer diff written", metadata: ["layer.entries": "\(emitter.stats.entries)", "layer.bytes": "\(emitter.stats.bytes)",
                                                     "layer.whiteouts": "\(emitter.stats.whiteouts)"])
        return emitter.stats
    }

    // MARK: Planning

    struct Plan {
        /// Paths to write ("" is the root).
        var changed: Set<ByteName> = []
        /// Directory → names to white out in it.
        var whiteouts: [ByteName: [ByteName]] = [:]
        var opaque: Set<ByteName> = []
        /// Child inode → its paths, for multiply-linked non-directories.
        var links: [UInt64: [String]] = [:]
        var changedLinked: Set<UInt64> = []
        /// `changed`, the directories holding whiteouts or opaque markers, and all their ancestors.
        var needed: Set<ByteName> = []

        mutating func closeOverLinks() {
            for ino in changedLinked { changed.formUnion((links[ino] ?? []).map(ByteName.init)) }
            for path in changed.union(whiteouts.keys).union(opaque) {
                var p = path.string
                // "/" is ASCII, so splitting the String there splits the bytes there.
                while needed.insert(ByteName(p)).inserted && !p.isEmpty {
                    p = p.lastIndex(of: "/").map { String(p[..<$0]) } ?? ""
                }
            }
        }
    }

    private func read<T>(_ volume: FileSystemVolume, _ tree: String, _ path: String,
                         _ body: () throws(VolumeError) -> T) throws(Error) -> T {
        do { return try body() } catch { throw .volume(tree: tree, path: path.isEmpty ? "/" : path, error) }
    }

    /// The entries of directory `ino` at `path` by name bytes, "." and ".." left out.
    static func children(_ volume: FileSystemVolume, _ ino: UInt64, path: String, tree: String) throws(Error) -> [ByteName: DirectoryEntry] {
        var list: [ByteName: DirectoryEntry] = [:]
        do {
            try volume.readdir(ino, after: 0) { e in
                if e.name != "." && e.name != ".." { list[ByteName(e.name)] = e }
                return true
            }
        } catch {
            throw .volume(tree: tree, path: path.isEmpty ? "/" : path, error)
        }
        // The Volume decodes names leniently, so a U+FFFD may stand for bytes that are not UTF-8. A lookup by
        // the decoded name tells: it reaches the same inode only if that is the name on disk.
        for (name, e) in list where name.string.unicodeScalars.contains("\u{FFFD}") {
            let full = path.isEmpty ? name.string : path + "/" + name.string
            let found: FileAttributes?
            do {
                found = try volume.lookup(parent: ino, name: name.string)
            } catch where error.errno == .noSuchFileOrDirectory {
                found = nil
            } catch {
                throw .volume(tree: tree, path: full, error)
            }
            guard found?.ino == e.ino else { throw .notUTF8(tree: tree, path: full, what: "name") }
        }
        return list
    }

    static func isSocket(_ a: FileAttributes) -> Bool { a.mode & 0o170000 == 0o140000 }

    private func compare(_ plan: inout Plan, path: String, child c: UInt64, parent p: UInt64?, addAll: Bool) throws(Error) {
        let childVolume = child
        let kids = try Self.children(child, c, path: path, tree: "child")
        var olds: [ByteName: DirectoryEntry] = [:]
        if let p, let parent, !addAll {
            olds = try Self.children(parent, p, path: path, tree: "parent")
            for name in olds.keys.sorted() where kids[name] == nil && !(path.isEmpty && name.string == "lost+found") {
                plan.whiteouts[ByteName(path), default: []].append(name)
            }
        }
        for name in kids.keys.sorted() {
            if path.isEmpty && name.string == "lost+found" { continue }
            let childPath = path.isEmpty ? name.string : path + "/" + name.string
            let ino = kids[name]!.ino
            let a = try read(child, "child", childPath) { () throws(VolumeError) in try childVolume.getattr(ino) }
            if Self.isSocket(a) {
                logger.warning("left a unix socket out of the layer diff: a tar cannot hold one", metadata: ["layer.path": "\(childPath)"])
                // Whatever the parent has under this name is gone from the child: white it out.
                if let old = olds[name], let parent {
                    let oldIno = old.ino
                    let b = try read(parent, "parent", childPath) { () throws(VolumeError) in try parent.getattr(oldIno) }
                    if !Self.isSocket(b) { plan.whiteouts[ByteName(path), default: []].append(name) }
                }
                continue
            }
            if !a.isDirectory && a.nlink > 1 { plan.links[a.ino, default: []].append(childPath) }
            guard let old = olds[name], let parent else {
                plan.changed.insert(ByteName(childPath))
                if !a.isDirectory && a.nlink > 1 { plan.changedLinked.insert(a.ino) }
                if a.isDirectory { try compare(&plan, path: childPath, child: a.ino, parent: nil, addAll: true) }
                continue
            }
            let oldIno = old.ino
            let b = try read(parent, "parent", childPath) { () throws(VolumeError) in try parent.getattr(oldIno) }
            if a.isDirectory && b.isDirectory {
                if a.ino != b.ino || a.generation != b.generation {
                    // Removed and made again: everything below is new, and nothing below in the parent survives.
                    plan.changed.insert(ByteName(childPath))
                    plan.opaque.insert(ByteName(childPath))
                    try compare(&plan, path: childPath, child: a.ino, parent: nil, addAll: true)
                } else {
                    if try !sameDirectory(a, b, childPath) { plan.changed.insert(ByteName(childPath)) }
                    try compare(&plan, path: childPath, child: a.ino, parent: b.ino, addAll: false)
                }
            } else if a.mode & 0o170000 != b.mode & 0o170000 {
                plan.changed.insert(ByteName(childPath))
                if !a.isDirectory && a.nlink > 1 { plan.changedLinked.insert(a.ino) }
                if a.isDirectory { try compare(&plan, path: childPath, child: a.ino, parent: nil, addAll: true) }
            } else if try !sameFile(a, b, childPath) {
                plan.changed.insert(ByteName(childPath))
                if a.nlink > 1 { plan.changedLinked.insert(a.ino) }
            }
        }
    }

    private func xattrs(_ volume: FileSystemVolume, _ tree: String, _ ino: UInt64, _ path: String) throws(Error) -> [ByteName: [UInt8]] {
        try read(volume, tree, path) { () throws(VolumeError) in
            var map: [ByteName: [UInt8]] = [:]
            for name in try volume.listxattr(ino) { map[ByteName(name)] = try volume.getxattr(ino, name: name) }
            return map
        }
    }

    private func sameDirectory(_ a: FileAttributes, _ b: FileAttributes, _ path: String) throws(Error) -> Bool {
        guard a.mode == b.mode, a.uid == b.uid, a.gid == b.gid, a.mtime == b.mtime, let parent else { return false }
        return try xattrs(child, "child", a.ino, path) == xattrs(parent, "parent", b.ino, path)
    }

    private func sameFile(_ a: FileAttributes, _ b: FileAttributes, _ path: String) throws(Error) -> Bool {
        guard a.mode == b.mode, a.uid == b.uid, a.gid == b.gid, a.rdev == b.rdev, a.size == b.size, a.mtime == b.mtime,
              let parent else { return false }
        // The inode the snapshot shares, untouched since: nothing more to read.
        if a.ino == b.ino && a.generation == b.generation && a.ctime == b.ctime { return true }
        guard try xattrs(child, "child", a.ino, path) == xattrs(parent, "parent", b.ino, path) else { return false }
        let childVolume = child
        if a.isSymlink {
            return try read(child, "child", path) { () throws(VolumeError) in try childVolume.readlink(a.ino) }.utf8
                .elementsEqual(read(parent, "parent", path) { () throws(VolumeError) in try parent.readlink(b.ino) }.utf8)
        }
        guard a.isRegular, a.size > 0 else { return true }
        return try sameContent(a.ino, b.ino, size: a.size, path: path)
    }

    private func sameContent(_ c: UInt64, _ p: UInt64, size: UInt64, path: String) throws(Error) -> Bool {
        guard let parent else { return false }
        let chunk = 1 << 20
        let x = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 16)
        let y = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 16)
        defer { x.deallocate(); y.deallocate() }
        let childVolume = child
        var offset: UInt64 = 0
        while offset < size {
            let want = Int(min(UInt64(chunk), size - offset))
            let at = offset
            let n = try read(child, "child", path) { () throws(VolumeError) in
                try childVolume.read(c, at: at, into: UnsafeMutableRawBufferPointer(rebasing: x[0..<want]))
            }
            let m = try read(parent, "parent", path) { () throws(VolumeError) in
                try parent.read(p, at: at, into: UnsafeMutableRawBufferPointer(rebasing: y[0..<want]))
            }
            guard n == want, m == want else { throw .changedDuringDiff(path: path) }
            if memcmp(x.baseAddress!, y.baseAddress!, want) != 0 { return false }
            offset += UInt64(want)
        }
        return true
    }

    // MARK: Writing

    final class Emitter {
        let volume: FileSystemVolume
        let plan: Plan
        let writer: ArchiveWriter
        var stats = Statistics()
        /// Child inode → the tar name it was first written under.
        var written: [UInt64: String] = [:]
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)

        init(volume: FileSystemVolume, plan: Plan, writer: ArchiveWriter) {
            self.volume = volume
            self.plan = plan
            self.writer = writer
        }

        private func attempt<T>(_ path: String, _ body: () throws(VolumeError) -> T) throws(Error) -> T {
            do { return try body() } catch { throw .volume(tree: "child", path: path.isEmpty ? "/" : path, error) }
        }

        deinit { buffer.deallocate() }

        func emit(path: String, attributes a: FileAttributes) throws {
            try writeEntry(path: path, a)
            guard a.isDirectory else { return }
            let prefix = path.isEmpty ? "" : path + "/"
            if plan.opaque.contains(ByteName(path)) { try marker(prefix + LayerApplier.opaqueMarker, a) }
            for name in (plan.whiteouts[ByteName(path)] ?? []).sorted() {
                try marker(prefix + LayerApplier.whiteoutPrefix + name.string, a)
            }
            let volume = self.volume
            let kids = try LayerDiffer.children(volume, a.ino, path: path, tree: "child")
            for name in kids.keys.sorted() where plan.needed.contains(ByteName(prefix + name.string)) {
                let ino = kids[name]!.ino
                let c = try attempt(prefix + name.string) { () throws(VolumeError) in try volume.getattr(ino) }
                try emit(path: prefix + name.string, attributes: c)
            }
        }

        /// A whiteout or opaque marker: an empty regular file, with its directory's time for determinism.
        private func marker(_ name: String, _ dir: FileAttributes) throws {
            try writer.writeHeader(ArchiveEntry(path: name, kind: .regular, permissions: 0, mtime: dir.mtime))
            stats.entries += 1
            stats.whiteouts += 1
        }

        private func writeEntry(path: String, _ a: FileAttributes) throws {
            let volume = self.volume
            let name = path.isEmpty ? "./" : path
            if !a.isDirectory, a.nlink > 1, let first = written[a.ino] {
                try writer.writeHeader(ArchiveEntry(path: name, kind: .hardlink, permissions: a.mode & 0o7777, uid: a.uid, gid: a.gid,
                                                    mtime: a.mtime, hardlinkTarget: first))
                stats.entries += 1
                return
            }
            let kind: ArchiveEntry.Kind
            switch a.mode & 0o170000 {
            case 0o040000: kind = .directory
            case 0o120000: kind = .symlink
            case 0o020000: kind = .characterDevice
            case 0o060000: kind = .blockDevice
            case 0o010000: kind = .fifo
            case 0o140000: kind = .socket
            default: kind = .regular
            }
            let xattrs = try attempt(path) { () throws(VolumeError) in
                var list: [ArchiveEntry.Xattr] = []
                for n in try volume.listxattr(a.ino).sorted() { list.append(.init(name: n, value: try volume.getxattr(a.ino, name: n))) }
                return list
            }
            var target: String?
            if kind == .symlink {
                let link = try attempt(path) { () throws(VolumeError) in try volume.readlink(a.ino) }
                // The Volume decodes a target leniently: bytes that are not UTF-8 come back as U+FFFD, whose
                // three bytes do not add up to the size the inode records.
                guard UInt64(link.utf8.count) == a.size else { throw Error.notUTF8(tree: "child", path: path, what: "symlink target") }
                target = link
            }
            let entry = ArchiveEntry(path: name, kind: kind, permissions: a.mode & 0o7777, uid: a.uid, gid: a.gid, mtime: a.mtime,
                                     size: kind == .regular ? a.size : 0, symlinkTarget: target,
                                     deviceMajor: Volume.major(a.rdev), deviceMinor: Volume.minor(a.rdev), xattrs: xattrs)
            try writer.writeHeader(entry)
            stats.entries += 1
            if !a.isDirectory && a.nlink > 1 { written[a.ino] = name }
            guard kind == .regular else { return }
            var offset: UInt64 = 0
            let buffer = self.buffer
            while offset < a.size {
                let want = Int(min(UInt64(buffer.count), a.size - offset))
                let at = offset
                let n = try attempt(path) { () throws(VolumeError) in
                    try volume.read(a.ino, at: at, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<want]))
                }
                guard n == want else { throw Error.changedDuringDiff(path: path) }
                try writer.writeData(UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
                offset += UInt64(n)
            }
            stats.bytes += offset
        }
    }
}

/// A name or path compared, hashed and sorted by its UTF-8 bytes, as ext4 and tar compare names. Swift's
/// String equality is canonical equivalence: "caf\u{E9}" and "cafe\u{301}" are equal Strings, so a
/// String-keyed map would let one hide the other, and a rename from one spelling to the other would look
/// like no change.
struct ByteName: Hashable, Comparable, Sendable {
    let string: String

    init(_ string: String) { self.string = string }

    static func == (a: ByteName, b: ByteName) -> Bool { a.string.utf8.elementsEqual(b.string.utf8) }

    static func < (a: ByteName, b: ByteName) -> Bool { a.string.utf8.lexicographicallyPrecedes(b.string.utf8) }

    func hash(into hasher: inout Hasher) {
        var s = string
        s.withUTF8 { hasher.combine(bytes: UnsafeRawBufferPointer($0)) }
    }
}
