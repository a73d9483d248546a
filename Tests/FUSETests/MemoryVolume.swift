import Foundation
import Synchronization
import SystemPackage
import ThinFS

/// An in-memory `FileSystemVolume` with enough POSIX semantics for the FUSE tests: files,
/// directories, symlinks, hard links, device nodes, xattrs, rename flags and sparse data
/// (4 KiB pages that exist only once written). It records what the server asked of it.
final class MemoryVolume: FileSystemVolume, Sendable {
    static let pageSize = 4096

    struct Node {
        var attributes: FileAttributes
        var pages: [UInt64: [UInt8]] = [:]
        var target = ""
        var xattrs: [String: [UInt8]] = [:]
        /// Directory entries by name, and the same entries in cookie order.
        var entries: [String: (ino: UInt64, cookie: UInt64)] = [:]
        var order: [(cookie: UInt64, name: String)] = []
        var parent: UInt64 = 0
    }

    /// What the server did, for the tests to check.
    struct Record {
        var calls: [String: Int] = [:]
        var fsyncs: [UInt64?] = []
        var lastCall = ""
        var maxWrite = 0
        var maxRead = 0
        var forgotten: [UInt64] = []
        var opens: [UInt64: Int] = [:]
        /// Kernel references the server reported (`remember` less `forget`), per inode.
        var remembered: [UInt64: Int] = [:]
    }

    struct State {
        var nodes: [UInt64: Node] = [:]
        var nextIno: UInt64 = 11  // as ext4: 1-10 are reserved, 2 is the root
        var nextCookie: UInt64 = 3  // 1 and 2 are "." and ".."
        var record = Record()
    }

    let rootInode: UInt64 = 2
    let isReadOnly: Bool
    private let state = Mutex(State())

    /// A lookup of this name signals `lookupArrived`, then waits until `lookupRelease` is
    /// signalled: a request the server has read and not answered yet.
    let heldLookup = Mutex<String?>(nil)
    let lookupArrived = DispatchSemaphore(value: 0)
    let lookupRelease = DispatchSemaphore(value: 0)

    static let modifying: Set = ["setattr", "mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename", "write",
                                 "fallocate", "setxattr", "removexattr"]

    init(readOnly: Bool = false) {
        isReadOnly = readOnly
        state.withLock { s in
            var root = Node(attributes: Self.attributes(ino: 2, mode: 0o040755, owner: .root))
            root.attributes.nlink = 2
            root.parent = 2
            s.nodes[2] = root
        }
    }

    var record: Record { state.withLock { $0.record } }
    var modifyingCalls: Int { record.calls.filter { Self.modifying.contains($0.key) }.values.reduce(0, +) }

    // MARK: Helpers

    static func now() -> Timestamp {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Timestamp(seconds: Int64(ts.tv_sec), nanoseconds: UInt32(ts.tv_nsec))
    }

    static func attributes(ino: UInt64, mode: UInt32, owner: Owner) -> FileAttributes {
        let t = now()
        return FileAttributes(ino: ino, mode: mode, nlink: 1, uid: owner.uid, gid: owner.gid, rdev: 0, size: 0, blocks: 0,
                              atime: t, mtime: t, ctime: t, blockSize: UInt32(pageSize), generation: 1)
    }

    private func with<T>(_ op: String, _ body: (inout State) throws(VolumeError) -> T) throws(VolumeError) -> T {
        try state.withLock { (s: inout State) throws(VolumeError) -> T in
            s.record.calls[op, default: 0] += 1
            s.record.lastCall = op
            if isReadOnly && Self.modifying.contains(op) { throw VolumeError(.readOnlyFileSystem, "\(op) on a read-only volume") }
            return try body(&s)
        }
    }

    private static func node(_ s: State, _ ino: UInt64) throws(VolumeError) -> Node {
        guard let n = s.nodes[ino] else { throw VolumeError(.noSuchFileOrDirectory, "no inode \(ino)") }
        return n
    }

    private static func directory(_ s: State, _ ino: UInt64) throws(VolumeError) -> Node {
        let n = try node(s, ino)
        guard n.attributes.isDirectory else { throw VolumeError(.notDirectory, "inode \(ino) is not a directory") }
        return n
    }

    private static func child(_ s: State, _ parent: UInt64, _ name: String) throws(VolumeError) -> UInt64 {
        guard let e = try directory(s, parent).entries[name] else {
            throw VolumeError(.noSuchFileOrDirectory, "no '\(name)' in inode \(parent)")
        }
        return e.ino
    }

    private static func addEntry(_ s: inout State, _ parent: UInt64, _ name: String, _ ino: UInt64) {
        let cookie = s.nextCookie
        s.nextCookie += 1
        s.nodes[parent]!.entries[name] = (ino, cookie)
        s.nodes[parent]!.order.append((cookie, name))
        s.nodes[parent]!.attributes.mtime = now()
    }

    private static func removeEntry(_ s: inout State, _ parent: UInt64, _ name: String) {
        guard let e = s.nodes[parent]!.entries.removeValue(forKey: name) else { return }
        s.nodes[parent]!.order.removeAll { $0.cookie == e.cookie }
        s.nodes[parent]!.attributes.mtime = now()
    }

    private static func create(_ s: inout State, parent: UInt64, name: String, mode: UInt32, owner: Owner) throws(VolumeError) -> UInt64 {
        _ = try directory(s, parent)
        guard s.nodes[parent]!.entries[name] == nil else { throw VolumeError(.fileExists, "'\(name)' exists") }
        let ino = s.nextIno
        s.nextIno += 1
        var n = Node(attributes: attributes(ino: ino, mode: mode, owner: owner))
        n.parent = parent
        s.nodes[ino] = n
        addEntry(&s, parent, name, ino)
        return ino
    }

    private static func dropLink(_ s: inout State, _ ino: UInt64) {
        s.nodes[ino]!.attributes.nlink -= 1
        s.nodes[ino]!.attributes.ctime = now()
    }

    private static func updateBlocks(_ n: inout Node) {
        n.attributes.blocks = UInt64(n.pages.count * pageSize / 512)
    }

    // MARK: FileSystemVolume

    func lookup(parent: UInt64, name: String) throws(VolumeError) -> FileAttributes {
        if heldLookup.withLock({ $0 }) == name {
            lookupArrived.signal()
            lookupRelease.wait()
        }
        return try with("lookup") { s throws(VolumeError) in try Self.node(s, try Self.child(s, parent, name)).attributes }
    }

    func getattr(_ ino: UInt64) throws(VolumeError) -> FileAttributes {
        try with("getattr") { s throws(VolumeError) in try Self.node(s, ino).attributes }
    }

    func setattr(_ ino: UInt64, _ c: AttributeChanges) throws(VolumeError) -> FileAttributes {
        try with("setattr") { s throws(VolumeError) in
            var n = try Self.node(s, ino)
            if let m = c.mode { n.attributes.mode = n.attributes.mode & 0o170000 | m & 0o7777 }
            if let u = c.uid { n.attributes.uid = u }
            if let g = c.gid { n.attributes.gid = g }
            if let size = c.size {
                n.pages = n.pages.filter { $0.key * UInt64(Self.pageSize) < size }
                let tail = Int(size % UInt64(Self.pageSize))
                if tail != 0, var last = n.pages[size / UInt64(Self.pageSize)] {
                    for i in tail..<Self.pageSize { last[i] = 0 }
                    n.pages[size / UInt64(Self.pageSize)] = last
                }
                n.attributes.size = size
                Self.updateBlocks(&n)
            }
            if let a = c.atime { n.attributes.atime = a == .now ? Self.now() : { if case .set(let t) = a { t } else { Self.now() } }() }
            if let m = c.mtime { n.attributes.mtime = m == .now ? Self.now() : { if case .set(let t) = m { t } else { Self.now() } }() }
            n.attributes.ctime = c.ctime ?? Self.now()
            s.nodes[ino] = n
            return n.attributes
        }
    }

    func readdir(_ ino: UInt64, after cookie: UInt64, _ body: (DirectoryEntry) throws(VolumeError) -> Bool) throws(VolumeError) {
        // Copy the listing out, then call body without the lock (as a volume that allows re-entry would).
        let listing: [DirectoryEntry] = try with("readdir") { s throws(VolumeError) in
            let d = try Self.directory(s, ino)
            var out: [DirectoryEntry] = []
            if cookie < 1 { out.append(DirectoryEntry(name: ".", ino: ino, type: 0o040000, cookie: 1)) }
            if cookie < 2 { out.append(DirectoryEntry(name: "..", ino: d.parent, type: 0o040000, cookie: 2)) }
            // Entries are in cookie order: find the first after `cookie` by binary search.
            var lo = 0, hi = d.order.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if d.order[mid].cookie <= cookie { lo = mid + 1 } else { hi = mid }
            }
            for (c, name) in d.order[lo...].prefix(4096) {
                let child = d.entries[name]!.ino
                out.append(DirectoryEntry(name: name, ino: child, type: s.nodes[child]!.attributes.mode & 0o170000, cookie: c))
            }
            return out
        }
        for e in listing where try !body(e) { return }
    }

    func mkdir(parent: UInt64, name: String, mode: UInt32, owner: Owner) throws(VolumeError) -> FileAttributes {
        try with("mkdir") { s throws(VolumeError) in
            let ino = try Self.create(&s, parent: parent, name: name, mode: 0o040000 | mode & 0o7777, owner: owner)
            s.nodes[ino]!.attributes.nlink = 2
            s.nodes[parent]!.attributes.nlink += 1
            return s.nodes[ino]!.attributes
        }
    }

    func mknod(parent: UInt64, name: String, mode: UInt32, rdev: UInt64, owner: Owner) throws(VolumeError) -> FileAttributes {
        try with("mknod") { s throws(VolumeError) in
            let ino = try Self.create(&s, parent: parent, name: name, mode: mode, owner: owner)
            s.nodes[ino]!.attributes.rdev = rdev
            return s.nodes[ino]!.attributes
        }
    }

    func symlink(parent: UInt64, name: String, target: String, owner: Owner) throws(VolumeError) -> FileAttributes {
        try with("symlink") { s throws(VolumeError) in
            let ino = try Self.create(&s, parent: parent, name: name, mode: 0o120777, owner: owner)
            s.nodes[ino]!.target = target
            s.nodes[ino]!.attributes.size = UInt64(target.utf8.count)
            return s.nodes[ino]!.attributes
        }
    }

    func readlink(_ ino: UInt64) throws(VolumeError) -> String {
        try with("readlink") { s throws(VolumeError) in
            let n = try Self.node(s, ino)
            guard n.attributes.isSymlink else { throw VolumeError(.invalidArgument, "inode \(ino) is not a symlink") }
            return n.target
        }
    }

    func link(_ ino: UInt64, newParent: UInt64, newName: String) throws(VolumeError) -> FileAttributes {
        try with("link") { s throws(VolumeError) in
            let n = try Self.node(s, ino)
            guard !n.attributes.isDirectory else { throw VolumeError(.notPermitted, "hard link to directory \(ino)") }
            guard try Self.directory(s, newParent).entries[newName] == nil else { throw VolumeError(.fileExists, "'\(newName)' exists") }
            Self.addEntry(&s, newParent, newName, ino)
            s.nodes[ino]!.attributes.nlink += 1
            s.nodes[ino]!.attributes.ctime = Self.now()
            return s.nodes[ino]!.attributes
        }
    }

    func unlink(parent: UInt64, name: String) throws(VolumeError) {
        try with("unlink") { s throws(VolumeError) in
            let ino = try Self.child(s, parent, name)
            guard !s.nodes[ino]!.attributes.isDirectory else { throw VolumeError(.isDirectory, "'\(name)' is a directory") }
            Self.removeEntry(&s, parent, name)
            Self.dropLink(&s, ino)
        }
    }

    func rmdir(parent: UInt64, name: String) throws(VolumeError) {
        try with("rmdir") { s throws(VolumeError) in
            let ino = try Self.child(s, parent, name)
            let d = try Self.directory(s, ino)
            guard d.entries.isEmpty else { throw VolumeError(.directoryNotEmpty, "'\(name)' is not empty") }
            Self.removeEntry(&s, parent, name)
            s.nodes[ino]!.attributes.nlink = 0
            s.nodes[parent]!.attributes.nlink -= 1
        }
    }

    func rename(parent: UInt64, name: String, newParent: UInt64, newName: String, flags: RenameFlags) throws(VolumeError) {
        try with("rename") { s throws(VolumeError) in
            let src = try Self.child(s, parent, name)
            let dst = try Self.directory(s, newParent).entries[newName]?.ino
            if flags.contains(.exchange) {
                guard let dst else { throw VolumeError(.noSuchFileOrDirectory, "no '\(newName)' to exchange with") }
                Self.removeEntry(&s, parent, name)
                Self.removeEntry(&s, newParent, newName)
                Self.addEntry(&s, parent, name, dst)
                Self.addEntry(&s, newParent, newName, src)
                s.nodes[src]!.parent = newParent
                s.nodes[dst]!.parent = parent
                return
            }
            if let dst {
                if flags.contains(.noReplace) { throw VolumeError(.fileExists, "'\(newName)' exists") }
                if dst == src { return }
                let srcDir = s.nodes[src]!.attributes.isDirectory, dstDir = s.nodes[dst]!.attributes.isDirectory
                if dstDir && !srcDir { throw VolumeError(.isDirectory, "'\(newName)' is a directory") }
                if srcDir && !dstDir { throw VolumeError(.notDirectory, "'\(newName)' is not a directory") }
                if dstDir {
                    guard s.nodes[dst]!.entries.isEmpty else { throw VolumeError(.directoryNotEmpty, "'\(newName)' is not empty") }
                    s.nodes[dst]!.attributes.nlink = 0
                    s.nodes[newParent]!.attributes.nlink -= 1
                } else {
                    Self.dropLink(&s, dst)
                }
                Self.removeEntry(&s, newParent, newName)
            }
            Self.removeEntry(&s, parent, name)
            Self.addEntry(&s, newParent, newName, src)
            if s.nodes[src]!.attributes.isDirectory && parent != newParent {
                s.nodes[parent]!.attributes.nlink -= 1
                s.nodes[newParent]!.attributes.nlink += 1
            }
            s.nodes[src]!.parent = newParent
            s.nodes[src]!.attributes.ctime = Self.now()
        }
    }

    func read(_ ino: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(VolumeError) -> Int {
        try with("read") { s throws(VolumeError) in
            s.record.maxRead = max(s.record.maxRead, buffer.count)
            let n = try Self.node(s, ino)
            guard offset < n.attributes.size else { return 0 }
            let count = Int(min(UInt64(buffer.count), n.attributes.size - offset))
            var done = 0
            while done < count {
                let pos = offset + UInt64(done)
                let page = pos / UInt64(Self.pageSize), within = Int(pos % UInt64(Self.pageSize))
                let chunk = min(Self.pageSize - within, count - done)
                if let bytes = n.pages[page] {
                    bytes.withUnsafeBytes { buffer.baseAddress!.advanced(by: done).copyMemory(from: $0.baseAddress! + within, byteCount: chunk) }
                } else {
                    buffer.baseAddress!.advanced(by: done).initializeMemory(as: UInt8.self, repeating: 0, count: chunk)
                }
                done += chunk
            }
            return count
        }
    }

    func write(_ ino: UInt64, at offset: UInt64, from buffer: UnsafeRawBufferPointer) throws(VolumeError) -> Int {
        try with("write") { s throws(VolumeError) in
            s.record.maxWrite = max(s.record.maxWrite, buffer.count)
            var n = try Self.node(s, ino)
            var done = 0
            while done < buffer.count {
                let pos = offset + UInt64(done)
                let page = pos / UInt64(Self.pageSize), within = Int(pos % UInt64(Self.pageSize))
                let chunk = min(Self.pageSize - within, buffer.count - done)
                var bytes = n.pages[page] ?? [UInt8](repeating: 0, count: Self.pageSize)
                bytes.withUnsafeMutableBytes { $0.baseAddress!.advanced(by: within).copyMemory(from: buffer.baseAddress! + done, byteCount: chunk) }
                n.pages[page] = bytes
                done += chunk
            }
            n.attributes.size = max(n.attributes.size, offset + UInt64(buffer.count))
            n.attributes.mtime = Self.now()
            Self.updateBlocks(&n)
            s.nodes[ino] = n
            return buffer.count
        }
    }

    func fallocate(_ ino: UInt64, mode: FallocateMode, offset: UInt64, length: UInt64) throws(VolumeError) {
        try with("fallocate") { s throws(VolumeError) in
            var n = try Self.node(s, ino)
            let ps = UInt64(Self.pageSize)
            if mode.contains(.punchHole) {
                guard mode.contains(.keepSize) else { throw VolumeError(.notSupported, "PUNCH_HOLE needs KEEP_SIZE") }
                for page in n.pages.keys where page * ps >= offset && (page + 1) * ps <= offset + length {
                    n.pages[page] = nil
                }
            } else {
                guard mode.subtracting(.keepSize).isEmpty else { throw VolumeError(.notSupported, "fallocate mode \(mode.rawValue)") }
                for page in (offset / ps)..<((offset + length + ps - 1) / ps) where n.pages[page] == nil {
                    n.pages[page] = [UInt8](repeating: 0, count: Self.pageSize)
                }
                if !mode.contains(.keepSize) { n.attributes.size = max(n.attributes.size, offset + length) }
            }
            Self.updateBlocks(&n)
            s.nodes[ino] = n
        }
    }

    func seek(_ ino: UInt64, from offset: UInt64, to whence: SeekTarget) throws(VolumeError) -> UInt64 {
        try with("seek") { s throws(VolumeError) in
            let n = try Self.node(s, ino)
            let ps = UInt64(Self.pageSize), size = n.attributes.size
            guard offset < size else { throw VolumeError(.init(rawValue: ENXIO), "seek past the end") }
            switch whence {
            case .data:
                guard let page = n.pages.keys.filter({ ($0 + 1) * ps > offset && $0 * ps < size }).min() else {
                    throw VolumeError(.init(rawValue: ENXIO), "no data after \(offset)")
                }
                return max(offset, page * ps)
            case .hole:
                var page = offset / ps
                while page * ps < size, n.pages[page] != nil { page += 1 }
                return min(max(offset, page * ps), size)
            }
        }
    }

    func getxattr(_ ino: UInt64, name: String) throws(VolumeError) -> [UInt8] {
        try with("getxattr") { s throws(VolumeError) in
            guard let v = try Self.node(s, ino).xattrs[name] else { throw VolumeError(.init(rawValue: ENODATA), "no xattr \(name)") }
            return v
        }
    }

    func setxattr(_ ino: UInt64, name: String, value: [UInt8], flags: XattrFlags) throws(VolumeError) {
        try with("setxattr") { s throws(VolumeError) in
            let exists = try Self.node(s, ino).xattrs[name] != nil
            if flags.contains(.create) && exists { throw VolumeError(.fileExists, "xattr \(name) exists") }
            if flags.contains(.replace) && !exists { throw VolumeError(.init(rawValue: ENODATA), "no xattr \(name)") }
            s.nodes[ino]!.xattrs[name] = value
        }
    }

    func listxattr(_ ino: UInt64) throws(VolumeError) -> [String] {
        try with("listxattr") { s throws(VolumeError) in try Self.node(s, ino).xattrs.keys.sorted() }
    }

    func removexattr(_ ino: UInt64, name: String) throws(VolumeError) {
        try with("removexattr") { s throws(VolumeError) in
            guard try Self.node(s, ino).xattrs[name] != nil else {
                throw VolumeError(.init(rawValue: ENODATA), "no xattr \(name)")
            }
            s.nodes[ino]!.xattrs[name] = nil
        }
    }

    func statfs() throws(VolumeError) -> FileSystemStatistics {
        try with("statfs") { s throws(VolumeError) in
            FileSystemStatistics(blockSize: 4096, blocks: 1 << 20, freeBlocks: 1 << 19, availableBlocks: 1 << 18,
                                 files: 1 << 16, freeFiles: (1 << 16) - UInt64(s.nodes.count), nameMax: 255)
        }
    }

    func fsync(_ ino: UInt64?) throws(VolumeError) {
        try with("fsync") { s throws(VolumeError) in s.record.fsyncs.append(ino) }
    }

    func remember(_ ino: UInt64) {
        state.withLock { s in
            s.record.calls["remember", default: 0] += 1
            s.record.remembered[ino, default: 0] += 1
        }
    }

    func forget(_ ino: UInt64) {
        state.withLock { s in
            if let n = s.record.remembered[ino] { s.record.remembered[ino] = n > 1 ? n - 1 : nil }
            s.record.calls["forget", default: 0] += 1
            s.record.forgotten.append(ino)
        }
    }

    func open(_ ino: UInt64) throws(VolumeError) {
        try with("open") { s throws(VolumeError) in
            _ = try Self.node(s, ino)
            s.record.opens[ino, default: 0] += 1
        }
    }

    func release(_ ino: UInt64) {
        state.withLock { s in
            s.record.calls["release", default: 0] += 1
            s.record.opens[ino, default: 0] -= 1
        }
    }

    // MARK: Direct access for test setup

    /// Creates a file with `data` without going through FUSE (so the kernel has no cached copy).
    @discardableResult
    func seed(parent: UInt64? = nil, name: String, data: [UInt8] = []) throws(VolumeError) -> UInt64 {
        let a = try mknod(parent: parent ?? rootInode, name: name, mode: 0o100644, rdev: 0, owner: .root)
        if !data.isEmpty {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count, alignment: 1)
            defer { buffer.deallocate() }
            buffer.copyBytes(from: data)
            _ = try write(a.ino, at: 0, from: UnsafeRawBufferPointer(buffer))
        }
        state.withLock { s in s.record = Record() }
        return a.ino
    }

    /// Creates `names` in a new directory, in the order given, without going through FUSE.
    func seedDirectory(_ name: String, entries names: [String]) throws(VolumeError) -> UInt64 {
        let dir = try mkdir(parent: rootInode, name: name, mode: 0o755, owner: .root).ino
        try state.withLock { (s: inout State) throws(VolumeError) in
            for n in names { _ = try Self.create(&s, parent: dir, name: n, mode: 0o100644, owner: .root) }
            s.record = Record()
        }
        return dir
    }

    /// The names of a directory in cookie order.
    func names(in dir: UInt64) -> [String] { state.withLock { s in s.nodes[dir]?.order.map(\.name) ?? [] } }

    func contents(_ ino: UInt64) -> [UInt8] {
        state.withLock { s in
            guard let n = s.nodes[ino] else { return [] }
            var out = [UInt8](repeating: 0, count: Int(n.attributes.size))
            for (page, bytes) in n.pages {
                let start = Int(page) * Self.pageSize
                guard start < out.count else { continue }
                let end = min(start + Self.pageSize, out.count)
                out.replaceSubrange(start..<end, with: bytes[0..<(end - start)])
            }
            return out
        }
    }

    func inode(_ path: String) -> UInt64? {
        state.withLock { s in
            var ino = rootInode
            for part in path.split(separator: "/") {
                guard let next = s.nodes[ino]?.entries[String(part)]?.ino else { return nil }
                ino = next
            }
            return ino
        }
    }

    func xattrs(_ ino: UInt64) -> [String: [UInt8]] { state.withLock { $0.nodes[ino]?.xattrs ?? [:] } }
}
