import Foundation
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS

/// Layer tars made by python3's tarfile (an independent tar writer), so the tests need no root.
enum PyTar {
    static var available: Bool { (try? Oracle.run("/usr/bin/env", ["python3", "-c", "import tarfile"]).status) == 0 }

    /// Runs `body` (python, indented by nothing) with `t` an open PAX tarfile at `path` and helpers:
    /// reg(name, data=b"", mode=0o644, uid=0, gid=0, mtime=..., xattrs={}) dir(...) sym(name, target)
    /// hard(name, target) chr/blk(name, major, minor) fifo(name).
    static func make(_ path: String, _ body: String) throws {
        let script = """
        import io, sys, tarfile
        t = tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT)
        def add(name, type, data=b"", mode=0o644, uid=0, gid=0, mtime=1700000000.25, linkname="", major=0, minor=0, xattrs=None):
            i = tarfile.TarInfo(name)
            i.type = type; i.mode = mode; i.uid = uid; i.gid = gid; i.mtime = mtime; i.linkname = linkname
            i.devmajor = major; i.devminor = minor
            if xattrs: i.pax_headers = {"SCHILY.xattr." + k: v for k, v in xattrs.items()}
            i.size = len(data) if type == tarfile.REGTYPE else 0
            t.addfile(i, io.BytesIO(data) if type == tarfile.REGTYPE else None)
        def reg(name, data=b"", **kw): add(name, tarfile.REGTYPE, data, **kw)
        def dir(name, mode=0o755, **kw): add(name, tarfile.DIRTYPE, mode=mode, **kw)
        def sym(name, target, **kw): add(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kw)
        def hard(name, target, **kw): add(name, tarfile.LNKTYPE, linkname=target, **kw)
        def chr(name, major, minor, **kw): add(name, tarfile.CHRTYPE, major=major, minor=minor, **kw)
        def blk(name, major, minor, **kw): add(name, tarfile.BLKTYPE, major=major, minor=minor, **kw)
        def fifo(name, **kw): add(name, tarfile.FIFOTYPE, **kw)
        \(body)
        t.close()
        """
        let r = try Oracle.run("/usr/bin/env", ["python3", "-c", script, path])
        guard r.status == 0 else { throw Oracle.OracleError.failed("python3 tarfile: \(r.stderr)") }
    }
}

/// A volume tree flattened for comparison: every field a layer carries, and hard-link groups.
struct TreeNode: Equatable, CustomStringConvertible {
    var type: UInt32
    var mode: UInt32
    var uid: UInt32
    var gid: UInt32
    var size: UInt64
    var mtime: Timestamp?
    var rdev: UInt64
    var target: String?
    var content: String?
    var xattrs: [String: [UInt8]]
    /// The first path (in sorted order) of the node's inode, for non-directories with more than one link.
    var linkGroup: String?
    var description: String {
        "type \(String(type, radix: 8)) mode \(String(mode, radix: 8)) \(uid):\(gid) size \(size) mtime \(String(describing: mtime)) rdev \(rdev) -> \(target ?? "") sha \(content?.prefix(12) ?? "") xattrs \(xattrs.keys.sorted()) link \(linkGroup ?? "-")"
    }
}

enum VolumeTree {
    /// Walks `volume` (the root's lost+found left out). `mtimes` false leaves times out (for trees made by different tools).
    static func snapshot(_ v: FileSystemVolume, mtimes: Bool = true) throws -> [String: TreeNode] {
        var nodes: [String: TreeNode] = [:]
        var inodes: [UInt64: [String]] = [:]
        func walk(_ ino: UInt64, _ path: String) throws {
            var names: [DirectoryEntry] = []
            try v.readdir(ino, after: 0) { e in
                if e.name != "." && e.name != ".." { names.append(e) }
                return true
            }
            for e in names.sorted(by: { $0.name < $1.name }) {
                if path.isEmpty && e.name == "lost+found" { continue }
                let p = path + "/" + e.name
                let a = try v.getattr(e.ino)
                var x: [String: [UInt8]] = [:]
                for n in try v.listxattr(e.ino) { x[n] = try v.getxattr(e.ino, name: n) }
                var content: String?
                if a.isRegular {
                    var bytes = [UInt8](repeating: 0, count: Int(a.size))
                    let n = try bytes.withUnsafeMutableBytes { try v.read(e.ino, at: 0, into: $0) }
                    #expect(n == Int(a.size))
                    content = ImageDigest.sha256(bytes)
                }
                nodes[p] = TreeNode(type: a.mode & 0o170000, mode: a.mode & 0o7777, uid: a.uid, gid: a.gid,
                                    size: a.isDirectory ? 0 : a.size, mtime: mtimes && !a.isSymlink ? a.mtime : nil, rdev: a.rdev,
                                    target: a.isSymlink ? try v.readlink(e.ino) : nil, content: content, xattrs: x, linkGroup: nil)
                if !a.isDirectory && a.nlink > 1 { inodes[a.ino, default: []].append(p) }
                if a.isDirectory { try walk(e.ino, p) }
            }
        }
        try walk(v.rootInode, "")
        for (_, paths) in inodes {
            let first = paths.min()!
            for p in paths { nodes[p]!.linkGroup = first }
        }
        return nodes
    }

    static func expectEqual(_ a: [String: TreeNode], _ b: [String: TreeNode], _ what: String,
                            sourceLocation: SourceLocation = #_sourceLocation) {
        for p in Set(a.keys).union(b.keys).sorted() where a[p] != b[p] {
            Issue.record("\(what): \(p)\n  left:  \(a[p].map(\.description) ?? "absent")\n  right: \(b[p].map(\.description) ?? "absent")",
                         sourceLocation: sourceLocation)
        }
    }
}

/// A scratch ext4 image with a Volume on it.
final class ScratchVolume {
    let dir = TempDir()
    let image: String
    var volume: Volume

    init(size: UInt64 = 64 << 20) throws {
        image = dir.path + "/fs.img"
        try E2fsprogs.mkfs(image, size: size)
        volume = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false, logger: quietLogger)
    }

    /// A copy of the image as it is now (closed and reopened around the copy): a snapshot's stand-in.
    func copy() throws -> ScratchVolume {
        try volume.close()
        let other = try ScratchVolume(copying: image)
        volume = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false, logger: quietLogger)
        return other
    }

    private init(copying source: String) throws {
        image = dir.path + "/fs.img"
        let r = try Oracle.run("/bin/cp", ["--sparse=always", source, image])
        guard r.status == 0 else { throw Oracle.OracleError.failed("cp: \(r.stderr)") }
        volume = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false, logger: quietLogger)
    }

    /// Closes the volume and runs e2fsck -fn on the image.
    func closeAndCheck(sourceLocation: SourceLocation = #_sourceLocation) throws {
        try volume.close()
        try E2fsprogs.check(image, sourceLocation: sourceLocation)
    }

    func attributes(_ path: String) throws -> FileAttributes? {
        var ino = volume.rootInode
        var a = try volume.getattr(ino)
        for c in path.split(separator: "/") {
            do {
                a = try volume.lookup(parent: ino, name: String(c))
            } catch {
                if error.errno == .noSuchFileOrDirectory { return nil }
                throw error
            }
            ino = a.ino
        }
        return a
    }

    func contents(_ path: String) throws -> [UInt8] {
        let a = try #require(try attributes(path))
        var bytes = [UInt8](repeating: 0, count: Int(a.size))
        _ = try bytes.withUnsafeMutableBytes { try volume.read(a.ino, at: 0, into: $0) }
        return bytes
    }

    func names(_ path: String) throws -> Set<String> {
        let a = try #require(try attributes(path))
        var names: Set<String> = []
        try volume.readdir(a.ino, after: 0) { e in
            if e.name != "." && e.name != ".." { names.insert(e.name) }
            return true
        }
        return names
    }

    @discardableResult
    func apply(_ tar: String) throws -> LayerApplier.Statistics {
        try LayerApplier(volume: volume, logger: quietLogger).apply(path: tar)
    }
}

@Suite("Layer content: archives, apply, diff, images", .enabled(if: E2fsprogs.available && PyTar.available, "needs e2fsprogs and python3"))
struct LayerContentTests {
    // MARK: Archive

    @Test func archiveWriterAndReaderRoundTripEveryKind() throws {
        let dir = TempDir()
        let path = dir.path + "/all.tar"
        let cap: [UInt8] = [1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        let t = Timestamp(seconds: 1_700_000_000, nanoseconds: 123_456_789)
        let entries = [
            ArchiveEntry(path: "d/", kind: .directory, permissions: 0o2755, uid: 1, gid: 2, mtime: t),
            ArchiveEntry(path: "d/file", kind: .regular, permissions: 0o4750, uid: 70000, gid: 42, mtime: t, size: 5,
                         xattrs: [.init(name: "security.capability", value: cap), .init(name: "user.k", value: Array("v".utf8))]),
            ArchiveEntry(path: "d/link", kind: .hardlink, permissions: 0o4750, mtime: t, hardlinkTarget: "d/file"),
            ArchiveEntry(path: "d/sym", kind: .symlink, permissions: 0o777, mtime: t, symlinkTarget: "../x/y"),
            ArchiveEntry(path: "d/null", kind: .characterDevice, permissions: 0o666, mtime: t, deviceMajor: 1, deviceMinor: 3),
            ArchiveEntry(path: "d/sda", kind: .blockDevice, permissions: 0o660, mtime: t, deviceMajor: 259, deviceMinor: 70000),
            ArchiveEntry(path: "d/fifo", kind: .fifo, permissions: 0o600, mtime: t),
        ]
        let fd = try FileDescriptor.open(path, .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
        try fd.closeAfter {
            let w = try ArchiveWriter(fd: fd.rawValue, name: path)
            for e in entries {
                try w.writeHeader(e)
                if e.kind == .regular { try Array("hello".utf8).withUnsafeBytes { try w.writeData($0) } }
            }
            try w.finish()
        }
        // GNU tar, an independent reader, agrees on names and types.
        let listing = try Oracle.run("/bin/tar", ["--xattrs", "--xattrs-include=*", "-tvf", path])
        #expect(listing.status == 0)
        #expect(listing.stdout.contains("d/link link to d/file") && listing.stdout.contains("d/sym -> ../x/y"))
        #expect(listing.stdout.contains("70000/42"))
        // Plain, gzip and zstd all read back the same headers, nanoseconds and binary xattrs included.
        _ = try Oracle.run("/bin/sh", ["-c", "gzip -n -c '\(path)' > '\(path).gz' && zstd -q -c '\(path)' > '\(path).zst'"])
        for file in [path, path + ".gz", path + ".zst"] {
            let r = try ArchiveReader(path: file)
            var back: [ArchiveEntry] = []
            var data: [UInt8] = []
            while var e = try r.next() {
                if e.kind == .regular { data = try r.readAll() }
                if e.kind == .directory && !e.path.hasSuffix("/") { e.path += "/" }
                back.append(e)
            }
            #expect(back == entries, "read back from \(file)")
            #expect(data == Array("hello".utf8))
        }
    }

    @Test func archiveErrorsNameTheArchiveAndEntry() throws {
        let dir = TempDir()
        let bad = dir.path + "/notatar"
        try Data(repeating: 0x41, count: 3000).write(to: URL(fileURLWithPath: bad))
        let e = #expect(throws: ArchiveError.self) { let r = try ArchiveReader(path: bad); _ = try r.next() }
        #expect(e?.archive == bad)
        // A truncated archive fails in the entry being read, and says which.
        let tar = dir.path + "/t.tar"
        try PyTar.make(tar, "reg('big', b'x' * 100000)")
        let cut = dir.path + "/cut.tar"
        try Data(try Data(contentsOf: URL(fileURLWithPath: tar)).prefix(20000)).write(to: URL(fileURLWithPath: cut))
        let r = try ArchiveReader(path: cut)
        _ = try r.next()
        let e2 = #expect(throws: ArchiveError.self) { _ = try r.readAll() }
        #expect(e2?.entry == "big" && e2?.description.contains(cut) == true)
    }

    // MARK: Apply

    @Test func applyWritesEveryKindWithMetadata() throws {
        let s = try ScratchVolume()
        let tar = s.dir.path + "/l.tar"
        try PyTar.make(tar, """
        dir("./", mode=0o755)
        dir("etc", mode=0o750, uid=5, gid=6, mtime=1600000000.5, xattrs={"user.dir": "d"})
        reg("etc/passwd", b"root:x:0:0\\n", mode=0o644)
        reg("usr/bin/tool", b"#!/bin/sh\\n" * 1000, mode=0o4755, uid=1000, gid=1000, xattrs={"user.a": "1", "trusted.t": "2"})
        hard("usr/bin/tool2", "usr/bin/tool")
        sym("usr/bin/sh", "/bin/busybox")
        chr("dev/null", 1, 3, mode=0o666)
        blk("dev/big", 259, 70000, mode=0o600)
        fifo("run/fifo", mode=0o640)
        reg("sparse", b"\\0" * (3 << 20) + b"end", mode=0o600)
        """)
        let stats = try s.apply(tar)
        #expect(stats.entries == 10 && stats.whiteouts == 0)
        let expectedBytes: UInt64 = 11 + 10000 + 3 * 1_048_576 + 3
        #expect(stats.bytes == expectedBytes)

        let etc = try #require(try s.attributes("etc"))
        #expect(etc.isDirectory && etc.mode & 0o7777 == 0o750 && etc.uid == 5 && etc.gid == 6)
        #expect(etc.mtime == Timestamp(seconds: 1_600_000_000, nanoseconds: 500_000_000), "directory mtime restored after its children")
        #expect(try s.volume.getxattr(etc.ino, name: "user.dir") == Array("d".utf8))
        let tool = try #require(try s.attributes("usr/bin/tool"))
        #expect(tool.mode == 0o104755 && tool.uid == 1000 && tool.gid == 1000 && tool.nlink == 2 && tool.size == 10000)
        #expect(tool.mtime == Timestamp(seconds: 1_700_000_000, nanoseconds: 250_000_000))
        #expect(try s.attributes("usr/bin/tool2")?.ino == tool.ino)
        #expect(Set(try s.volume.listxattr(tool.ino)) == ["user.a", "trusted.t"])
        #expect(try s.contents("usr/bin/tool") == Array(String(repeating: "#!/bin/sh\n", count: 1000).utf8))
        let usr = try #require(try s.attributes("usr"))
        #expect(usr.mode == 0o040755 && usr.uid == 0, "missing parents are made 0755 root:root")
        let sh = try #require(try s.attributes("usr/bin/sh"))
        #expect(sh.isSymlink)
        #expect(try s.volume.readlink(sh.ino) == "/bin/busybox")
        let null = try #require(try s.attributes("dev/null"))
        #expect(null.mode == 0o020666 && Volume.major(null.rdev) == 1 && Volume.minor(null.rdev) == 3)
        let big = try #require(try s.attributes("dev/big"))
        #expect(big.mode == 0o060600 && Volume.major(big.rdev) == 259 && Volume.minor(big.rdev) == 70000)
        #expect(try s.attributes("run/fifo")?.mode == 0o010640)
        let sparse = try #require(try s.attributes("sparse"))
        #expect(sparse.size == (3 << 20) + 3 && sparse.blocks <= 16, "zero chunks stay holes (\(sparse.blocks) blocks)")
        #expect(try s.contents("sparse").suffix(3) == Array("end".utf8))
        try s.closeAndCheck()
    }

    @Test func applyOverExistingEntries() throws {
        let s = try ScratchVolume()
        let lower = s.dir.path + "/lower.tar", upper = s.dir.path + "/upper.tar"
        try PyTar.make(lower, """
        dir("a", mode=0o700, xattrs={"user.old": "1"})
        reg("a/f", b"old")
        reg("a/keep", b"keep")
        dir("d")
        reg("d/inner", b"inner")
        reg("x", b"file becomes dir")
        sym("s", "a")
        """)
        try PyTar.make(upper, """
        dir("a", mode=0o755, uid=7, xattrs={"user.new": "2"})
        sym("a/f", "keep")
        reg("d", b"dir becomes file")
        dir("x", mode=0o711)
        reg("s", b"symlink replaced, not written through")
        """)
        try s.apply(lower)
        let keep = try #require(try s.attributes("a/keep"))
        try s.apply(upper)
        let a = try #require(try s.attributes("a"))
        #expect(a.mode == 0o040755 && a.uid == 7, "existing directory kept, metadata updated")
        #expect(try s.volume.listxattr(a.ino) == ["user.new"], "a directory entry's xattrs replace the old set")
        #expect(try s.attributes("a/keep")?.ino == keep.ino)
        #expect(try s.attributes("a/f")?.isSymlink == true)
        #expect(try s.attributes("d")?.isRegular == true)
        #expect(try s.contents("d") == Array("dir becomes file".utf8))
        #expect(try s.attributes("x")?.mode == 0o040711)
        #expect(try s.attributes("s")?.isRegular == true)
        #expect(try s.contents("a/keep") == Array("keep".utf8))
        try s.closeAndCheck()
    }

    @Test func whiteoutsAndOpaqueDirectories() throws {
        let s = try ScratchVolume()
        let lower = s.dir.path + "/lower.tar", upper = s.dir.path + "/upper.tar"
        try PyTar.make(lower, """
        reg("gone", b"1")
        dir("tree"); dir("tree/sub"); reg("tree/sub/f", b"2")
        dir("op"); reg("op/old1", b"3"); dir("op/olddir"); reg("op/olddir/x", b"4"); dir("op/kept"); reg("op/kept/lowerfile", b"5")
        reg("stay", b"6")
        """)
        try PyTar.make(upper, """
        reg(".wh.gone")
        reg(".wh.tree")
        reg(".wh.missing")
        dir("op")
        reg("op/before", b"written before the marker")
        dir("op/kept")
        reg("op/.wh..wh..opq")
        reg("op/after", b"written after the marker")
        reg("new", b"n")
        reg(".wh.new")
        reg(".wh..wh.plnk")
        """)
        try s.apply(lower)
        let stats = try s.apply(upper)
        #expect(stats.whiteouts == 6)
        #expect(try s.names("") == ["lost+found", "op", "stay", "new"], "gone and tree whited out, new kept (same layer)")
        #expect(try s.names("op") == ["before", "kept", "after"], "opaque: only what this layer wrote")
        #expect(try s.names("op/kept").isEmpty, "a kept directory loses its lower contents too")
        try s.closeAndCheck()
    }

    /// Each hostile archive, with what must happen: rejected (the error names the entry) or confined.
    static let hostile: [(String, String, String?)] = [
        // Parent traversal is refused.
        ("dotdot", "reg('../escape', b'x')", "../escape"),
        ("dotdot-inside", "dir('a'); reg('a/../../escape', b'x')", "a/../../escape"),
        // A symlink out of the root, then a write through it: refused at the symlink component.
        ("symlink-then-write", "sym('evil', '@HOST@'); reg('evil/pwned', b'x')", "evil/pwned"),
        ("relative-symlink-then-write", "sym('up', '../../../../../../..@HOST@'); reg('up/pwned', b'x')", "up/pwned"),
        ("symlink-then-dir", "sym('evil', '@HOST@'); dir('evil/sub')", "evil/sub"),
        ("symlink-then-whiteout", "sym('evil', '@HOST@'); reg('evil/.wh.sentinel')", "evil/.wh.sentinel"),
        ("symlink-then-hardlink-through", "reg('f', b'x'); sym('evil', '@HOST@'); hard('evil/l', 'f')", "evil/l"),
        // Hard links: outside targets are refused.
        ("hardlink-dotdot", "hard('l', '../../../etc/passwd')", "l"),
        ("hardlink-through-symlink", "sym('evil', '@HOST@'); hard('l', 'evil/sentinel')", "l"),
        ("hardlink-missing", "hard('l', 'nope')", "l"),
        ("hardlink-directory", "dir('d'); hard('l', 'd')", "l"),
        // Absolute names are confined under the root.
        ("absolute", "reg('@HOST@/abs', b'confined')", nil),
        // A symlink in the last component is replaced, not written through.
        ("overwrite-symlink", "sym('evil', '@HOST@/sentinel'); reg('evil', b'replaced')", nil),
    ]

    @Test(arguments: hostile.indices)
    func hostileArchivesAreContained(_ index: Int) throws {
        let (name, body, rejected) = Self.hostile[index]
        let s = try ScratchVolume()
        let host = TempDir()   // what the archive aims at on the host
        let sentinel = host.path + "/sentinel"
        try Data("untouched".utf8).write(to: URL(fileURLWithPath: sentinel))
        let tar = s.dir.path + "/\(name).tar"
        try PyTar.make(tar, body.replacingOccurrences(of: "@HOST@", with: host.path))
        if let rejected {
            let e = #expect(throws: LayerApplier.Error.self, "\(name)") { try s.apply(tar) }
            switch e {
            case .hostileEntry(let entry, _)?, .badEntry(let entry, _)?:
                // The entry as stored (python's tarfile gives directories a trailing slash).
                #expect(entry == rejected || entry == rejected + "/", "\(name): \(String(describing: e))")
            default:
                Issue.record("\(name): unexpected \(String(describing: e))")
            }
        } else {
            try s.apply(tar)
        }
        if name == "absolute" {
            #expect(try s.contents(String(host.path.dropFirst()) + "/abs") == Array("confined".utf8))
        }
        if name == "overwrite-symlink" {
            #expect(try s.attributes("evil")?.isRegular == true)
        }
        // Nothing outside the volume changed: the host directory holds the sentinel only, as it was.
        #expect(try FileManager.default.contentsOfDirectory(atPath: host.path) == ["sentinel"], "\(name)")
        #expect(try String(contentsOfFile: sentinel, encoding: .utf8) == "untouched", "\(name)")
        #expect(!FileManager.default.fileExists(atPath: s.dir.path + "/../escape"))
        try s.closeAndCheck()
    }

    // MARK: Diff

    @Test func diffRoundTripIsExact() throws {
        let parent = try ScratchVolume()
        let base = parent.dir.path + "/base.tar"
        try PyTar.make(base, """
        dir("etc", xattrs={"user.d": "1"})
        reg("etc/unchanged", b"same" * 100)
        reg("etc/inplace", b"A" * 5000)
        reg("etc/chmod", b"c")
        reg("etc/xattr", b"x", xattrs={"user.keep": "k", "user.drop": "d"})
        reg("etc/deleted", b"d")
        reg("etc/renamed", b"r")
        reg("etc/same-bytes", b"identical")
        reg("links/a", b"linked"); hard("links/b", "links/a"); hard("links/c", "links/a")
        reg("links/solo", b"solo")
        reg("links/pair1", b"pair"); hard("links/pair2", "links/pair1")
        sym("sym", "etc/unchanged")
        dir("gone"); reg("gone/f", b"f"); dir("gone/sub"); reg("gone/sub/g", b"g")
        dir("remade"); reg("remade/old", b"o"); reg("remade/kept-name", b"k")
        reg("becomes-dir", b"f")
        dir("becomes-file"); reg("becomes-file/x", b"x")
        fifo("fifo")
        chr("null", 1, 3, mode=0o666)
        """)
        try parent.apply(base)
        let child = try parent.copy()
        let v = child.volume
        func ino(_ p: String) throws -> UInt64 { try #require(try child.attributes(p)).ino }
        func dirIno(_ p: String) throws -> UInt64 { p.isEmpty ? v.rootInode : try ino(p) }
        func write(_ p: String, _ text: String, at offset: UInt64 = 0) throws {
            _ = try Array(text.utf8).withUnsafeBytes { try v.write(try ino(p), at: offset, from: $0) }
        }
        func create(_ dir: String, _ name: String, _ text: String) throws {
            let f = try v.mknod(parent: try dirIno(dir), name: name, mode: 0o100644, rdev: 0, owner: .root)
            _ = try Array(text.utf8).withUnsafeBytes { try v.write(f.ino, at: 0, from: $0) }
        }
        try write("etc/inplace", "changed in place", at: 100)
        _ = try v.setattr(try ino("etc/chmod"), AttributeChanges(mode: 0o600, uid: 3))
        try v.removexattr(try ino("etc/xattr"), name: "user.drop")
        try v.setxattr(try ino("etc/xattr"), name: "user.add", value: [0, 1, 2], flags: [])
        try v.unlink(parent: try ino("etc"), name: "deleted")
        try v.rename(parent: try ino("etc"), name: "renamed", newParent: try ino("etc"), newName: "renamed2", flags: [])
        // Rewritten with the same bytes and its old mtime: ctime moved, nothing else; must not be in the diff.
        let same = try #require(try child.attributes("etc/same-bytes"))
        try write("etc/same-bytes", "identical")
        _ = try v.setattr(same.ino, AttributeChanges(mtime: .set(same.mtime)))
        // Links: a new name for an inode the parent has, a name removed from another, a solo file gaining a link.
        _ = try v.link(try ino("links/a"), newParent: try ino("links"), newName: "d")
        try v.unlink(parent: try ino("links"), name: "pair2")
        _ = try v.link(try ino("links/solo"), newParent: try dirIno(""), newName: "solo-link")
        try v.unlink(parent: v.rootInode, name: "sym")
        _ = try v.symlink(parent: v.rootInode, name: "sym", target: "etc/inplace", owner: .root)
        // Recursively removed, and removed then made again (an opaque directory).
        try v.unlink(parent: try ino("gone/sub"), name: "g"); try v.rmdir(parent: try ino("gone"), name: "sub")
        try v.unlink(parent: try ino("gone"), name: "f"); try v.rmdir(parent: v.rootInode, name: "gone")
        try v.unlink(parent: try ino("remade"), name: "old"); try v.unlink(parent: try ino("remade"), name: "kept-name")
        try v.rmdir(parent: v.rootInode, name: "remade")
        _ = try v.mkdir(parent: v.rootInode, name: "remade", mode: 0o700, owner: Owner(uid: 9, gid: 9))
        try create("remade", "kept-name", "k")
        try create("remade", "new", "n")
        // Type changes.
        try v.unlink(parent: v.rootInode, name: "becomes-dir")
        _ = try v.mkdir(parent: v.rootInode, name: "becomes-dir", mode: 0o755, owner: .root)
        try create("becomes-dir", "inside", "i")
        try v.unlink(parent: try ino("becomes-file"), name: "x"); try v.rmdir(parent: v.rootInode, name: "becomes-file")
        try create("", "becomes-file", "now a file")
        try create("etc", "added", "new file")
        _ = try v.mknod(parent: try ino("etc"), name: "newfifo", mode: 0o010600, rdev: 0, owner: .root)

        // The diff, and what it holds.
        let tar = child.dir.path + "/diff.tar"
        let fd = try FileDescriptor.open(tar, .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
        let stats = try fd.closeAfter { try LayerDiffer(child: child.volume, parent: parent.volume, logger: quietLogger).write(fd: fd.rawValue, name: tar) }
        let r = try ArchiveReader(path: tar)
        var names: [String: ArchiveEntry] = [:]
        while let e = try r.next() { names[e.path.hasSuffix("/") && e.path != "./" ? String(e.path.dropLast()) : e.path] = e }
        #expect(stats.entries == names.count)
        for expected in ["etc/inplace", "etc/chmod", "etc/xattr", "etc/.wh.deleted", "etc/.wh.renamed", "etc/renamed2", "etc/added",
                         "links/a", "links/b", "links/c", "links/d", ".wh.gone", "remade/.wh..wh..opq", "remade/new", "remade/kept-name",
                         "becomes-dir/inside", "becomes-file", "links/.wh.pair2", "links/solo", "solo-link", "sym", "etc/newfifo", "./"] {
            #expect(names[expected] != nil, "the diff has \(expected)")
        }
        for unchanged in ["etc/unchanged", "etc/same-bytes", "links/pair1", "fifo", "null"] {
            #expect(names[unchanged] == nil, "the diff leaves out \(unchanged)")
        }
        #expect(names["remade/old"] == nil && names["remade/.wh.old"] == nil, "an opaque directory needs no whiteouts")
        let linkNames = ["links/a", "links/b", "links/c", "links/d"].compactMap { names[$0] }
        let regularLinks: Int = linkNames.filter { $0.kind == .regular }.count
        let hardLinks: Int = linkNames.filter { $0.kind == .hardlink }.count
        #expect(regularLinks == 1)
        #expect(hardLinks == 3)
        let soloKinds: [ArchiveEntry.Kind?] = [names["links/solo"]?.kind, names["solo-link"]?.kind]
        let soloNames: Set<String> = Set(soloKinds.map { k in k.map { "\($0)" } ?? "absent" })
        #expect(soloNames == ["hardlink", "regular"])

        // Applied to a fresh copy of the parent, it gives the child's tree exactly.
        let fresh = try parent.copy()
        try fresh.apply(tar)
        VolumeTree.expectEqual(try VolumeTree.snapshot(fresh.volume), try VolumeTree.snapshot(child.volume), "parent + diff vs child")
        let rootTimes = (try fresh.volume.getattr(fresh.volume.rootInode).mtime, try child.volume.getattr(child.volume.rootInode).mtime)
        #expect(rootTimes.0 == rootTimes.1)

        // The full-tree diff (no parent) onto an empty filesystem gives the same tree too.
        let full = child.dir.path + "/full.tar"
        let fd2 = try FileDescriptor.open(full, .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
        try fd2.closeAfter { _ = try LayerDiffer(child: child.volume, parent: nil, logger: quietLogger).write(fd: fd2.rawValue) }
        let empty = try ScratchVolume()
        try empty.apply(full)
        VolumeTree.expectEqual(try VolumeTree.snapshot(empty.volume), try VolumeTree.snapshot(child.volume), "full diff vs child")

        // No change at all: an empty diff.
        let nothing = child.dir.path + "/none.tar"
        let twin = try child.copy()
        let fd3 = try FileDescriptor.open(nothing, .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
        let none = try fd3.closeAfter { try LayerDiffer(child: twin.volume, parent: child.volume, logger: quietLogger).write(fd: fd3.rawValue) }
        #expect(none.entries == 0)
        for s in [parent, child, fresh, empty, twin] { try s.closeAndCheck() }
    }

    // MARK: Images (the test image needs root: device nodes and security.capability)

    static var canMakeImage: Bool {
        Host.isRoot && FileManager.default.isExecutableFile(atPath: "/bin/busybox")
            && FileManager.default.isExecutableFile(atPath: "/usr/bin/zstd")
    }

    /// Runs scripts/make-test-image.sh into a temp dir; returns the dir and expected.env's values.
    static func makeImage() throws -> (TempDir, [String: String]) {
        let dir = TempDir()
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/make-test-image.sh").path
        let r = try Oracle.run("/bin/bash", [script, dir.path + "/image"])
        guard r.status == 0 else { throw Oracle.OracleError.failed("make-test-image.sh: \(r.stderr)") }
        var env: [String: String] = [:]
        for line in try String(contentsOfFile: dir.path + "/image/expected.env", encoding: .utf8).split(separator: "\n") {
            let kv = line.split(separator: "=", maxSplits: 1)
            env[String(kv[0])] = String(kv[1])
        }
        return (dir, env)
    }

    @Test(.enabled(if: canMakeImage, "needs root, busybox-static and zstd"))
    func imageLayoutAndDockerArchiveGiveTheSameChain() throws {
        let (dir, expected) = try Self.makeImage()
        let oci = try ImageSource(path: dir.path + "/image/oci", logger: quietLogger)
        let docker = try ImageSource(path: dir.path + "/image/docker.tar", logger: quietLogger)
        #expect(oci.format == .ociLayout && docker.format == .dockerArchive)
        for image in [oci, docker] {
            #expect(image.layers.map(\.diffID) == [expected["DIFF_ID_1"], expected["DIFF_ID_2"]])
            #expect(image.layers.map(\.chainID) == [expected["CHAIN_ID_1"], expected["CHAIN_ID_2"]])
            #expect(image.topChainID == expected["CHAIN_ID_2"])
            #expect(image.configDigest == expected["CONFIG"])
            for layer in image.layers { try image.verify(layer) }
        }
        #expect(oci.layers.map(\.mediaType) == ["application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.layer.v1.tar+zstd"])
        #expect(oci.layers.map(\.blobDigest) == [expected["BLOB_1"], expected["BLOB_2"]])
        // The chain id formula on its own, against sha256sum's answer.
        #expect(ImageDigest.chainIDs([expected["DIFF_ID_1"]!, expected["DIFF_ID_2"]!]) == [expected["CHAIN_ID_1"]!, expected["CHAIN_ID_2"]!])
        #expect(try ImageSource(path: dir.path + "/image/oci", reference: "thinfs-test:latest", logger: quietLogger).layers.count == 2)
        #expect(throws: ImageSource.Error.self) { try ImageSource(path: dir.path + "/image/oci", reference: "other", logger: quietLogger) }
        #expect(try ImageSource(path: dir.path + "/image/docker.tar", reference: "thinfs-test:latest", logger: quietLogger).layers.count == 2)

        // A damaged blob, a config with the wrong diff id, a missing blob: each named.
        let blob2 = oci.layers[1].path
        let saved = try Data(contentsOf: URL(fileURLWithPath: blob2))
        try (saved + Data([0])).write(to: URL(fileURLWithPath: blob2))
        let damaged = #expect(throws: ImageSource.Error.self) { try oci.verify(oci.layers[1]) }
        #expect(damaged?.description.contains(blob2) == true)
        try saved.write(to: URL(fileURLWithPath: blob2))
        var swapped = oci.layers[1]
        swapped.diffID = oci.layers[0].diffID
        let wrong = #expect(throws: ImageSource.Error.self) { try oci.verify(swapped) }
        if case .diffIDMismatch(let i, _, let e, let a)? = wrong { #expect(i == 1 && e == expected["DIFF_ID_1"] && a == expected["DIFF_ID_2"]) }
        else { Issue.record("expected diffIDMismatch, got \(String(describing: wrong))") }
        try FileManager.default.removeItem(atPath: oci.layers[0].path)
        let missing = #expect(throws: ImageSource.Error.self) { try ImageSource(path: dir.path + "/image/oci", logger: quietLogger) }
        #expect(missing?.description.contains(String(expected["BLOB_1"]!.dropFirst(7))) == true)
        #expect(throws: ImageSource.Error.self) { try ImageSource(path: dir.path, logger: quietLogger) }
    }

    @Test(.enabled(if: canMakeImage, "needs root, busybox-static and zstd"))
    func busyboxImageAppliesAndDiffsBack() throws {
        let (dir, _) = try Self.makeImage()
        let image = try ImageSource(path: dir.path + "/image/oci", logger: quietLogger)
        let l1 = try ScratchVolume()
        try LayerApplier(volume: l1.volume, logger: quietLogger).apply(reader: image.open(image.layers[0]))
        let busybox = try #require(try l1.attributes("bin/busybox"))
        #expect(busybox.mode == 0o100755)
        #expect(try l1.contents("bin/busybox") == Array(try Data(contentsOf: URL(fileURLWithPath: "/bin/busybox"))))
        #expect(busybox.mtime == Timestamp(seconds: 1_700_000_000, nanoseconds: 123_456_789))
        #expect(try l1.volume.readlink(try #require(try l1.attributes("bin/sh")).ino) == "busybox")
        let ping = try #require(try l1.attributes("bin/ping"))
        #expect(try l1.volume.getxattr(ping.ino, name: "security.capability") == [1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        #expect(try l1.volume.getxattr(ping.ino, name: "user.origin") == Array("busybox-static".utf8))
        #expect(try l1.attributes("bin/fake-su")?.mode == 0o104755)
        #expect(try l1.attributes("etc/hostname")?.ino == l1.attributes("etc/hostname.link")?.ino)
        #expect(try l1.attributes("tmp/fifo")?.mode == 0o010640)
        #expect(try l1.attributes("tmp")?.mode == 0o041777)
        let null = try #require(try l1.attributes("dev/null"))
        #expect(null.mode == 0o020666)
        #expect(Volume.major(null.rdev) == 1)
        #expect(Volume.minor(null.rdev) == 3)
        let home = try #require(try l1.attributes("home/user"))
        #expect(home.uid == 1000)
        #expect(home.gid == 1000)
        #expect(home.mode == 0o040750)

        let l2 = try l1.copy()
        try LayerApplier(volume: l2.volume, logger: quietLogger).apply(reader: image.open(image.layers[1]))
        #expect(try l2.attributes("etc/issue") == nil)
        #expect(try l2.attributes("usr/share/doc/old") == nil)
        #expect(try l2.names("var/lib/app") == ["app.conf", "state"])
        #expect(try l2.contents("var/lib/app/app.conf") == Array("setting=2\n".utf8))
        #expect(try l2.contents("etc/hostname") == Array("thinfs-test-2\n".utf8))
        #expect(try l2.attributes("etc/hostname")?.ino != l2.attributes("etc/hostname.link")?.ino)
        #expect(try l2.volume.listxattr(try #require(try l2.attributes("etc")).ino).isEmpty, "layer 2's /etc has no xattrs")
        #expect(try l2.attributes("usr/share/doc/new.txt")?.ino == l2.attributes("usr/share/doc/new.link")?.ino)

        // The diff of layer 2 against layer 1, applied to a fresh layer 1, gives layer 2 exactly.
        let tar = dir.path + "/diff.tar"
        let fd = try FileDescriptor.open(tar, .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
        try fd.closeAfter { _ = try LayerDiffer(child: l2.volume, parent: l1.volume, logger: quietLogger).write(fd: fd.rawValue) }
        let fresh = try l1.copy()
        try fresh.apply(tar)
        VolumeTree.expectEqual(try VolumeTree.snapshot(fresh.volume), try VolumeTree.snapshot(l2.volume), "layer 1 + diff vs layer 2")
        for s in [l1, l2, fresh] { try s.closeAndCheck() }
    }
}
