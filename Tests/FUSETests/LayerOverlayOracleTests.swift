import Foundation
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// The external oracle for layer content: kernel overlayfs over GNU tar's unpacking of the same layers.
///
/// Each layer blob of the test image (scripts/make-test-image.sh) is unpacked by GNU tar into its own
/// directory, its whiteouts converted to overlay's form (`.wh.X` → a 0/0 character device X,
/// `.wh..wh..opq` → `trusted.overlay.opaque=y` on the directory), and the directories stacked as a
/// read-only overlay. The same blobs go through `LayerApplier` into a Volume on an ext4 image, each
/// layer on a copy of the previous layer's image (as a snapshot would be). The merged overlay tree and
/// the Volume tree must not differ in names, types, modes, owners, sizes, contents, symlink targets,
/// device numbers, xattrs (trusted.overlay.* aside), file mtimes, or hard-link identity. Directory
/// mtimes are left out: converting the whiteouts changes the layer directories' own mtimes.
@Suite("Layer content against kernel overlayfs", .enabled(if: OverlayOracle.available, "needs root, overlayfs, busybox-static, zstd, e2fsprogs"))
struct LayerOverlayOracleTests {
    @Test func appliedLayersMatchTheOverlayMerge() throws {
        let work = TempDir()
        // Declared first, so it runs last: the scratch directory outlives the mount and the volume.
        defer { withExtendedLifetime(work) {} }
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/make-test-image.sh").path
        let made = try Oracle.run("/bin/bash", [script, work.path + "/image"])
        try #require(made.status == 0, "make-test-image.sh: \(made.stderr)")
        let image = try ImageSource(path: work.path + "/image/oci")
        #expect(image.layers.count == 2)

        // The overlay side: GNU tar, whiteouts converted, lowerdir stack (top first).
        var lowers: [String] = []
        for layer in image.layers {
            let dir = work.path + "/layer\(layer.index)"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            let x = try Oracle.run("/bin/tar", ["--extract", "--file", layer.path, "--directory", dir, "--xattrs", "--xattrs-include=*",
                                                "--numeric-owner", "--same-owner", "--same-permissions"])
            try #require(x.status == 0, "tar -x \(layer.path): \(x.stderr)")
            try OverlayOracle.convertWhiteouts(dir)
            lowers.insert(dir, at: 0)
        }
        let merged = work.path + "/merged"
        try FileManager.default.createDirectory(atPath: merged, withIntermediateDirectories: true)
        let m = try Oracle.run("/bin/mount", ["-t", "overlay", "overlay", "-o", "lowerdir=" + lowers.joined(separator: ":"), merged])
        try #require(m.status == 0, "mount overlay: \(m.stderr)")
        defer {
            let u = umount2(merged, 0) == 0 ? 0 : errno
            if u != 0 { _ = umount2(merged, Int32(MNT_DETACH)) }
            #expect(!Host.isMounted(merged), "\(merged) is still mounted")
        }

        // The Volume side: each layer on a copy of the image after the previous one.
        var previous: String?
        var top: Volume?
        for layer in image.layers {
            let path = work.path + "/fs\(layer.index).img"
            if let previous {
                let cp = try Oracle.run("/bin/cp", ["--sparse=always", previous, path])
                try #require(cp.status == 0)
            } else {
                _ = FileManager.default.createFile(atPath: path, contents: nil)
                try FileHandle(forWritingAtPath: path)!.truncate(atOffset: 64 << 20)
                let mk = try Oracle.run("/sbin/mke2fs", ["-t", "ext4", "-b", "4096", "-F", "-q", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", path])
                try #require(mk.status == 0, "mke2fs: \(mk.stderr)")
            }
            let v = try Volume(device: FileBlockDevice(path: FilePath(path)), readOnly: false)
            try LayerApplier(volume: v).apply(reader: image.open(layer))
            if layer.index == image.layers.count - 1 {
                top = v
            } else {
                try v.close()
            }
            previous = path
        }
        let volume = try #require(top)
        defer { try? volume.close() }

        let expected = try OverlayOracle.hostTree(merged)
        let actual = try OverlayOracle.volumeTree(volume)
        #expect(expected.count > 40, "the merged tree has \(expected.count) entries")
        for p in Set(expected.keys).union(actual.keys).sorted() where expected[p] != actual[p] {
            Issue.record("\(p)\n  overlay: \(expected[p].map(\.description) ?? "absent")\n  volume:  \(actual[p].map(\.description) ?? "absent")")
        }
        // Spot checks that the comparison saw what matters.
        #expect(expected["/bin/ping"]?.xattrs["security.capability"] != nil)
        #expect(expected["/etc/issue"] == nil && expected["/var/lib/app/cache"] == nil)
        #expect(expected["/usr/share/doc/new.txt"]?.linkGroup == "/usr/share/doc/new.link")
    }
}

enum OverlayOracle {
    static var available: Bool {
        guard Host.isRoot, FileManager.default.isExecutableFile(atPath: "/bin/busybox"),
              FileManager.default.isExecutableFile(atPath: "/usr/bin/zstd"),
              FileManager.default.isExecutableFile(atPath: "/sbin/mke2fs"),
              let fs = try? String(contentsOfFile: "/proc/filesystems", encoding: .utf8) else { return false }
        return fs.contains("\toverlay\n")
    }

    struct Node: Equatable, CustomStringConvertible {
        var type: UInt32
        var mode: UInt32
        var uid: UInt32
        var gid: UInt32
        var size: UInt64
        var mtime: Timestamp?
        var rdev: (UInt32, UInt32)
        var target: String?
        var content: String?
        var xattrs: [String: [UInt8]]
        var linkGroup: String?

        static func == (a: Node, b: Node) -> Bool {
            a.type == b.type && a.mode == b.mode && a.uid == b.uid && a.gid == b.gid && a.size == b.size && a.mtime == b.mtime
                && a.rdev == b.rdev && a.target == b.target && a.content == b.content && a.xattrs == b.xattrs && a.linkGroup == b.linkGroup
        }

        var description: String {
            "type \(String(type, radix: 8)) mode \(String(mode, radix: 8)) \(uid):\(gid) size \(size) mtime \(String(describing: mtime)) rdev \(rdev) -> \(target ?? "") sha \(content?.prefix(12) ?? "") xattrs \(xattrs.keys.sorted()) link \(linkGroup ?? "-")"
        }
    }

    private static func symbol<T>(_ name: String, as: T.Type) -> T {
        unsafeBitCast(dlsym(UnsafeMutableRawPointer(bitPattern: 0), name)!, to: T.self)
    }
    typealias LListXattr = @convention(c) (UnsafePointer<CChar>, UnsafeMutablePointer<CChar>?, Int) -> Int
    typealias LGetXattr = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafeMutableRawPointer?, Int) -> Int
    typealias LSetXattr = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafeRawPointer?, Int, Int32) -> Int32

    /// The path's xattrs without following a symlink, trusted.overlay.* left out.
    static func xattrs(_ path: String) -> [String: [UInt8]] {
        let list = symbol("llistxattr", as: LListXattr.self), get = symbol("lgetxattr", as: LGetXattr.self)
        let n = list(path, nil, 0)
        guard n > 0 else { return [:] }
        var names = [CChar](repeating: 0, count: n)
        let got = list(path, &names, n)
        var map: [String: [UInt8]] = [:]
        for raw in names[0..<max(got, 0)].split(separator: 0) {
            let name = String(decoding: raw.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if name.hasPrefix("trusted.overlay.") { continue }
            let size = get(path, name, nil, 0)
            var value = [UInt8](repeating: 0, count: max(size, 0))
            let read = value.withUnsafeMutableBytes { get(path, name, $0.baseAddress, $0.count) }
            map[name] = Array(value.prefix(max(read, 0)))
        }
        return map
    }

    /// Turns OCI whiteouts into overlayfs's: `.wh.X` → character device 0/0 named X, `.wh..wh..opq` → trusted.overlay.opaque=y.
    static func convertWhiteouts(_ root: String) throws {
        let found = FileManager.default.enumerator(atPath: root)!.compactMap { $0 as? String }
            .filter { ($0 as NSString).lastPathComponent.hasPrefix(".wh.") }
        for p in found {
            let full = root + "/" + p
            let dir = (full as NSString).deletingLastPathComponent
            let base = (p as NSString).lastPathComponent
            try FileManager.default.removeItem(atPath: full)
            if base == ".wh..wh..opq" {
                let rc = symbol("lsetxattr", as: LSetXattr.self)(dir, "trusted.overlay.opaque", "y", 1, 0)
                guard rc == 0 else { throw Errno(rawValue: errno) }
            } else {
                guard mknod(dir + "/" + String(base.dropFirst(4)), 0o020600, 0) == 0 else { throw Errno(rawValue: errno) }
            }
        }
    }

    static func sha256(_ bytes: some DataProtocol) -> String { ImageDigest.sha256(bytes) }

    static func finish(_ nodes: inout [String: Node], _ inodes: [String: [String]]) {
        for (_, paths) in inodes where paths.count > 1 {
            let first = paths.min()!
            for p in paths { nodes[p]!.linkGroup = first }
        }
    }

    /// A tree on the host (the overlay mount), through lstat.
    static func hostTree(_ root: String) throws -> [String: Node] {
        var nodes: [String: Node] = [:]
        var inodes: [String: [String]] = [:]
        func walk(_ rel: String) throws {
            for name in try FileManager.default.contentsOfDirectory(atPath: root + rel).sorted() {
                let p = rel + "/" + name, full = root + p
                var st = Glibc.stat()
                guard lstat(full, &st) == 0 else { throw Errno(rawValue: errno) }
                let type = UInt32(st.st_mode) & 0o170000
                var target: String?
                if type == 0o120000 { target = try FileManager.default.destinationOfSymbolicLink(atPath: full) }
                var content: String?
                if type == 0o100000 { content = sha256(try Data(contentsOf: URL(fileURLWithPath: full))) }
                let isDir = type == 0o040000
                nodes[p] = Node(type: type, mode: UInt32(st.st_mode) & 0o7777, uid: st.st_uid, gid: st.st_gid, size: isDir ? 0 : UInt64(st.st_size),
                                mtime: isDir || type == 0o120000 ? nil : Timestamp(seconds: Int64(st.st_mtim.tv_sec), nanoseconds: UInt32(st.st_mtim.tv_nsec)),
                                rdev: (Volume.major(UInt64(st.st_rdev)), Volume.minor(UInt64(st.st_rdev))), target: target, content: content,
                                xattrs: xattrs(full), linkGroup: nil)
                if !isDir && st.st_nlink > 1 { inodes["\(st.st_dev):\(st.st_ino)", default: []].append(p) }
                if isDir { try walk(p) }
            }
        }
        try walk("")
        finish(&nodes, inodes)
        return nodes
    }

    /// The same fields from a Volume (the root's lost+found is mke2fs's, not a layer's).
    static func volumeTree(_ v: Volume) throws -> [String: Node] {
        var nodes: [String: Node] = [:]
        var inodes: [String: [String]] = [:]
        func walk(_ ino: UInt64, _ rel: String) throws {
            var entries: [DirectoryEntry] = []
            try v.readdir(ino, after: 0) { e in
                if e.name != "." && e.name != ".." { entries.append(e) }
                return true
            }
            for e in entries.sorted(by: { $0.name < $1.name }) {
                if rel.isEmpty && e.name == "lost+found" { continue }
                let p = rel + "/" + e.name
                let a = try v.getattr(e.ino)
                let type = a.mode & 0o170000
                var content: String?
                if a.isRegular {
                    var bytes = [UInt8](repeating: 0, count: Int(a.size))
                    _ = try bytes.withUnsafeMutableBytes { try v.read(e.ino, at: 0, into: $0) }
                    content = sha256(bytes)
                }
                var x: [String: [UInt8]] = [:]
                for n in try v.listxattr(e.ino) { x[n] = try v.getxattr(e.ino, name: n) }
                nodes[p] = Node(type: type, mode: a.mode & 0o7777, uid: a.uid, gid: a.gid, size: a.isDirectory ? 0 : a.size,
                                mtime: a.isDirectory || a.isSymlink ? nil : a.mtime, rdev: (Volume.major(a.rdev), Volume.minor(a.rdev)),
                                target: a.isSymlink ? try v.readlink(e.ino) : nil, content: content, xattrs: x, linkGroup: nil)
                if !a.isDirectory && a.nlink > 1 { inodes["\(a.ino)", default: []].append(p) }
                if a.isDirectory { try walk(e.ino, p) }
            }
        }
        try walk(v.rootInode, "")
        finish(&nodes, inodes)
        return nodes
    }
}
